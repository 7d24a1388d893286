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
    /// An EVM EIP-1559 (type 2) transaction paying the chain's native asset
    /// from the wallet's address; nothing else (no calldata, no access list).
    Evm {
        chain: String,
        /// EIP-155 chain id, bound into the signature.
        chain_id: u64,
        /// The wallet's address (EIP-55): the sender.
        from: String,
        /// The destination (EIP-55).
        to: String,
        /// Wei, as a decimal string (can exceed 64 bits).
        value: String,
        /// Allocated by the build step: one per transaction of the wallet.
        nonce: u64,
        gas_limit: u64,
        /// Wei per gas.
        max_fee_per_gas: u64,
        /// Wei per gas.
        max_priority_fee_per_gas: u64,
    },
}

impl UnsignedTransaction {
    /// The chain id it is for.
    pub fn chain(&self) -> &str {
        match self {
            UnsignedTransaction::Bitcoin { chain, .. } | UnsignedTransaction::Evm { chain, .. } => {
                chain
            }
        }
    }

    /// The most it pays in fees, in the chain's base unit: satoshi, or wei
    /// (the gas limit at the most per gas).
    pub fn max_fee(&self) -> u128 {
        match self {
            UnsignedTransaction::Bitcoin { fee, .. } => u128::from(*fee),
            UnsignedTransaction::Evm {
                gas_limit,
                max_fee_per_gas,
                ..
            } => u128::from(*gas_limit) * u128::from(*max_fee_per_gas),
        }
    }
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
