//! Transactions as the trail records them, per chain family. Hex strings, never
//! floats: amounts are integer base units (satoshi, wei).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An output a Bitcoin-family input spends (BIP-341 commits to all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpentOutput {
    /// Previous transaction id, as nodes display it (big-endian hex).
    pub txid: String,
    pub vout: u32,
    /// Satoshi.
    pub value: u64,
    pub script_pubkey: String,
}

/// The unsigned transaction of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "family"
)]
pub enum UnsignedTransaction {
    /// A Bitcoin-family transaction (Taproot key-path or P2WPKH inputs).
    Bitcoin {
        chain: String,
        /// Serialized without witnesses, hex.
        unsigned_tx: String,
        /// One per input, in input order.
        spent: Vec<SpentOutput>,
        /// Satoshi paid to miners (inputs minus outputs).
        fee: u64,
        /// Fee rate used, satoshi per virtual byte.
        fee_rate: u64,
        /// The output paying back to the wallet, if any.
        #[serde(default)]
        change_vout: Option<u32>,
    },
}

/// A complete signed transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedTransaction {
    pub chain: String,
    pub txid: String,
    /// Serialized with witnesses, hex: what is broadcast.
    pub raw_tx: String,
    /// Guardians (or keys) whose shares made the signature.
    pub signers: Vec<String>,
}

/// Where a transaction was buried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Confirmation {
    pub chain: String,
    pub txid: String,
    pub block_hash: String,
    pub block_height: u64,
    pub confirmations: u64,
}
