//! EVM transfers: the EIP-1559 transaction of an approved transfer, the check a
//! signer runs before it signs ([`check`]), and the signature (ECDSA on
//! secp256k1, low-S, with the recovery parity) into the EIP-2718 envelope
//! nodes accept.
//!
//! A signer never signs what it is handed: [`check`] rebuilds the transaction
//! from the approved request (destination, value, chain) and the recorded build
//! (nonce, gas limit and fees, each within the chain's caps), and the signature
//! hash is computed from that rebuilt transaction.

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::{Decodable2718, Encodable2718};
use alloy_primitives::{Address, Bytes, Signature, TxKind, U256};
use custos_schemas::chain::{SignedTransaction, UnsignedTransaction};
use k256::ecdsa::SigningKey;

/// Amounts in wei (256 bits, as the chain has them).
pub type Wei = U256;

/// The gas a plain value transfer to an account without code uses.
pub const TRANSFER_GAS: u64 = 21_000;
const GWEI: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvmError {
    #[error("{0}")]
    Refused(String),
    #[error("unknown EVM chain {0}")]
    UnknownChain(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("signing failed: {0}")]
    Signing(String),
}

fn refused(reason: impl Into<String>) -> EvmError {
    EvmError::Refused(reason.into())
}

/// What a chain allows a transfer to spend on gas: the build step stays within
/// these and a signer refuses anything beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GasPolicy {
    /// Highest gas limit (a transfer to a contract may use more than 21,000).
    pub max_gas_limit: u64,
    /// Highest `maxFeePerGas`, wei.
    pub max_fee_per_gas: u64,
    /// Lowest tip the build offers, wei per gas.
    pub min_priority_fee: u64,
    /// Highest tip, wei per gas.
    pub max_priority_fee: u64,
}

impl GasPolicy {
    /// The caps of a known EVM chain: tighter on mainnet, where fees are real.
    pub fn for_chain(chain: &str) -> Result<GasPolicy, EvmError> {
        chain_id(chain)?;
        Ok(match chain {
            "evm-1" => GasPolicy {
                max_gas_limit: 100_000,
                max_fee_per_gas: 300 * GWEI,
                min_priority_fee: GWEI / 100,
                max_priority_fee: 10 * GWEI,
            },
            _ => GasPolicy {
                max_gas_limit: 100_000,
                max_fee_per_gas: 1_000 * GWEI,
                min_priority_fee: GWEI,
                max_priority_fee: 100 * GWEI,
            },
        })
    }
}

/// The EIP-155 chain id of a Custos EVM chain id (`evm-<id>`; custody does not
/// depend on the engine's chain table).
pub fn chain_id(chain: &str) -> Result<u64, EvmError> {
    chain
        .strip_prefix("evm-")
        .filter(|d| !d.starts_with('0') && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| EvmError::UnknownChain(chain.to_string()))
}

/// An address with a valid EIP-55 checksum when mixed-case.
pub fn parse_address(field: &'static str, address: &str) -> Result<Address, EvmError> {
    let invalid = |reason: String| EvmError::Invalid { field, reason };
    let hex_part = address
        .strip_prefix("0x")
        .ok_or_else(|| invalid("must start with 0x".into()))?;
    let mixed =
        hex_part != hex_part.to_ascii_lowercase() && hex_part != hex_part.to_ascii_uppercase();
    if mixed {
        Address::parse_checksummed(address, None)
            .map_err(|e| invalid(format!("EIP-55 checksum: {e}")))
    } else {
        address
            .parse::<Address>()
            .map_err(|e| invalid(format!("not 0x and 40 hex digits: {e}")))
    }
}

/// What the build step asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest<'a> {
    pub chain: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// Wei.
    pub value: U256,
    pub nonce: u64,
    pub gas_limit: u64,
    pub max_fee_per_gas: u64,
    pub max_priority_fee_per_gas: u64,
}

/// The unsigned transaction of `r`, after the same check a signer makes.
pub fn build(r: &TransferRequest<'_>, gas: &GasPolicy) -> Result<UnsignedTransaction, EvmError> {
    let from = parse_address("from", r.from)?;
    let to = parse_address("to", r.to)?;
    let unsigned = UnsignedTransaction::Evm {
        chain: r.chain.to_string(),
        chain_id: chain_id(r.chain)?,
        from: from.to_checksum(None),
        to: to.to_checksum(None),
        value: r.value.to_string(),
        nonce: r.nonce,
        gas_limit: r.gas_limit,
        max_fee_per_gas: r.max_fee_per_gas,
        max_priority_fee_per_gas: r.max_priority_fee_per_gas,
    };
    check(
        &unsigned,
        &Expectation {
            chain: r.chain,
            wallet: r.from,
            destination: r.to,
            value: r.value,
            gas: *gas,
        },
    )?;
    Ok(unsigned)
}

/// What a signer holds a recorded transaction to: the approved transfer and the
/// chain's gas caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation<'a> {
    pub chain: &'a str,
    /// The wallet's recorded address.
    pub wallet: &'a str,
    pub destination: &'a str,
    /// Wei.
    pub value: U256,
    pub gas: GasPolicy,
}

/// A transaction that passed [`check`]: rebuilt from the expectation and the
/// recorded nonce, gas limit and fees.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedTransfer {
    pub chain: String,
    pub from: Address,
    pub tx: TxEip1559,
}

/// Checks a recorded transaction against the approved transfer and rebuilds it.
/// Refuses another chain, sender, destination or value, a gas limit below a
/// transfer's or above the cap, fees above their caps, and a tip above the fee.
pub fn check(
    unsigned: &UnsignedTransaction,
    expect: &Expectation<'_>,
) -> Result<CheckedTransfer, EvmError> {
    let UnsignedTransaction::Evm {
        chain,
        chain_id: recorded_id,
        from,
        to,
        value,
        nonce,
        gas_limit,
        max_fee_per_gas,
        max_priority_fee_per_gas,
    } = unsigned
    else {
        return Err(refused("not an EVM transaction"));
    };
    if chain != expect.chain {
        return Err(refused(format!(
            "the transaction is for {chain}, the approval for {}",
            expect.chain
        )));
    }
    let id = chain_id(expect.chain)?;
    if *recorded_id != id {
        return Err(refused(format!(
            "chain id {recorded_id} is not {}'s ({id})",
            expect.chain
        )));
    }
    let wallet = parse_address("wallet", expect.wallet)?;
    if parse_address("from", from)? != wallet {
        return Err(refused(format!(
            "the transaction spends from {from}, not the wallet's {}",
            expect.wallet
        )));
    }
    let destination = parse_address("destination", expect.destination)?;
    if parse_address("to", to)? != destination {
        return Err(refused(format!(
            "the transaction pays {to}, the approval {}",
            expect.destination
        )));
    }
    let recorded_value: U256 = value.parse().map_err(|e| EvmError::Invalid {
        field: "value",
        reason: format!("not a decimal amount of wei: {e}"),
    })?;
    if recorded_value != expect.value {
        return Err(refused(format!(
            "the transaction pays {recorded_value} wei, the approval {} wei",
            expect.value
        )));
    }
    let gas = &expect.gas;
    if *gas_limit < TRANSFER_GAS || *gas_limit > gas.max_gas_limit {
        return Err(refused(format!(
            "gas limit {gas_limit} is outside {TRANSFER_GAS}..={}",
            gas.max_gas_limit
        )));
    }
    if *max_fee_per_gas > gas.max_fee_per_gas {
        return Err(refused(format!(
            "max fee per gas {max_fee_per_gas} wei exceeds the cap of {} wei",
            gas.max_fee_per_gas
        )));
    }
    if *max_priority_fee_per_gas > gas.max_priority_fee
        || max_priority_fee_per_gas > max_fee_per_gas
    {
        return Err(refused(format!(
            "priority fee {max_priority_fee_per_gas} wei exceeds the cap of {} wei or the max fee",
            gas.max_priority_fee
        )));
    }
    Ok(CheckedTransfer {
        chain: chain.clone(),
        from: wallet,
        tx: TxEip1559 {
            chain_id: id,
            nonce: *nonce,
            gas_limit: *gas_limit,
            max_fee_per_gas: u128::from(*max_fee_per_gas),
            max_priority_fee_per_gas: u128::from(*max_priority_fee_per_gas),
            to: TxKind::Call(destination),
            value: expect.value,
            access_list: Default::default(),
            input: Bytes::new(),
        },
    })
}

impl CheckedTransfer {
    /// The hash the key signs (keccak256 of `0x02 ‖ rlp(fields)`).
    pub fn signature_hash(&self) -> [u8; 32] {
        self.tx.signature_hash().0
    }

    /// Signs with `key`, which must be the sender's: the signature is low-S,
    /// carries its recovery parity, and must recover the sender's address.
    pub fn sign(
        &self,
        key: &SigningKey,
        signers: Vec<String>,
    ) -> Result<SignedTransaction, EvmError> {
        let hash = self.tx.signature_hash();
        let (mut sig, mut recid) = key
            .sign_prehash_recoverable(hash.as_slice())
            .map_err(|e| EvmError::Signing(e.to_string()))?;
        // Ethereum (EIP-2) accepts only low-S signatures.
        if let Some(low) = sig.normalize_s() {
            sig = low;
            recid = k256::ecdsa::RecoveryId::new(!recid.is_y_odd(), recid.is_x_reduced());
        }
        let signature = Signature::from_signature_and_parity(sig, recid.is_y_odd());
        let recovered = signature
            .recover_address_from_prehash(&hash)
            .map_err(|e| EvmError::Signing(e.to_string()))?;
        if recovered != self.from {
            return Err(EvmError::Signing(format!(
                "the key signs for {recovered}, the transaction is from {}",
                self.from
            )));
        }
        let signed = self.tx.clone().into_signed(signature);
        let txid = format!("{:#x}", signed.hash());
        let raw = TxEnvelope::from(signed).encoded_2718();
        Ok(SignedTransaction {
            chain: self.chain.clone(),
            txid,
            raw_tx: format!("0x{}", hex::encode(raw)),
            signers,
        })
    }
}

impl CheckedTransfer {
    /// Checks a signed transaction someone else produced for this one: the
    /// same fields, the sender's signature, the hash it is named by.
    pub fn verify_signed(&self, signed: &SignedTransaction) -> Result<(), EvmError> {
        let raw = signed
            .raw_tx
            .strip_prefix("0x")
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| refused("the signed transaction is not 0x-prefixed hex"))?;
        let envelope = TxEnvelope::decode_2718(&mut raw.as_slice())
            .map_err(|e| refused(format!("the signed transaction does not decode: {e}")))?;
        let TxEnvelope::Eip1559(s) = envelope else {
            return Err(refused("the signed transaction is not EIP-1559"));
        };
        if s.tx() != &self.tx || signed.chain != self.chain {
            return Err(refused("the signed transaction is not the checked one"));
        }
        let sender = s
            .signature()
            .recover_address_from_prehash(&s.tx().signature_hash())
            .map_err(|e| refused(format!("the signature does not recover: {e}")))?;
        if sender != self.from {
            return Err(refused(format!("signed by {sender}, not by {}", self.from)));
        }
        if signed.txid != format!("{:#x}", s.hash()) {
            return Err(refused("the txid is not the transaction's hash"));
        }
        Ok(())
    }
}

/// How much each fee of a replacement must exceed the replaced
/// transaction's, in percent (geth's and anvil's price bump).
pub const REPLACEMENT_BUMP_PERCENT: u128 = 10;

/// The fee-bumped replacement of `previous`: the same nonce, gas limit and
/// payment, with `max_fee_per_gas` and `max_priority_fee_per_gas` each at
/// least [`REPLACEMENT_BUMP_PERCENT`] higher, and at least `max_fee` and
/// `tip` (what the node suggests now). Refused when that goes above the caps.
pub fn build_replacement(
    previous: &UnsignedTransaction,
    max_fee: u128,
    tip: u128,
    expect: &Expectation<'_>,
) -> Result<UnsignedTransaction, EvmError> {
    let old = check(previous, expect)?;
    let tip = tip.max(bumped(old.tx.max_priority_fee_per_gas));
    let max_fee = max_fee.max(bumped(old.tx.max_fee_per_gas)).max(tip);
    let narrow = |what: &str, v: u128, cap: u64| {
        u64::try_from(v).ok().filter(|v| *v <= cap).ok_or_else(|| {
            refused(format!(
                "a replacement needs a {what} of {v} wei, above the cap of {cap} wei"
            ))
        })
    };
    let UnsignedTransaction::Evm {
        chain,
        chain_id,
        from,
        to,
        value,
        nonce,
        gas_limit,
        ..
    } = previous
    else {
        return Err(refused("not an EVM transaction"));
    };
    let replacement = UnsignedTransaction::Evm {
        chain: chain.clone(),
        chain_id: *chain_id,
        from: from.clone(),
        to: to.clone(),
        value: value.clone(),
        nonce: *nonce,
        gas_limit: *gas_limit,
        max_fee_per_gas: narrow("max fee per gas", max_fee, expect.gas.max_fee_per_gas)?,
        max_priority_fee_per_gas: narrow("priority fee", tip, expect.gas.max_priority_fee)?,
    };
    check_replacement(&replacement, previous, expect)?;
    Ok(replacement)
}

/// `fee` raised by [`REPLACEMENT_BUMP_PERCENT`], rounded up.
fn bumped(fee: u128) -> u128 {
    (fee * (100 + REPLACEMENT_BUMP_PERCENT)).div_ceil(100)
}

/// A signer's check of a replacement: it passes [`check`] against the
/// approval (same destination and value, fees within the caps), and against
/// `previous` (which must pass too) it keeps the nonce and gas limit and
/// raises both fees by at least [`REPLACEMENT_BUMP_PERCENT`]. Anything else is
/// not a fee bump.
pub fn check_replacement(
    replacement: &UnsignedTransaction,
    previous: &UnsignedTransaction,
    expect: &Expectation<'_>,
) -> Result<CheckedTransfer, EvmError> {
    let old =
        check(previous, expect).map_err(|e| refused(format!("the replaced transaction: {e}")))?;
    let new = check(replacement, expect)?;
    if new.tx.nonce != old.tx.nonce {
        return Err(refused(format!(
            "the replacement has nonce {}, the replaced transaction {}",
            new.tx.nonce, old.tx.nonce
        )));
    }
    if new.tx.gas_limit != old.tx.gas_limit {
        return Err(refused(format!(
            "the replacement's gas limit {} is not the replaced transaction's {}",
            new.tx.gas_limit, old.tx.gas_limit
        )));
    }
    for (what, new_fee, old_fee) in [
        (
            "max fee per gas",
            new.tx.max_fee_per_gas,
            old.tx.max_fee_per_gas,
        ),
        (
            "priority fee",
            new.tx.max_priority_fee_per_gas,
            old.tx.max_priority_fee_per_gas,
        ),
    ] {
        let least = bumped(old_fee);
        if new_fee < least {
            return Err(refused(format!(
                "the replacement's {what} {new_fee} wei is less than {least} wei ({REPLACEMENT_BUMP_PERCENT}% above {old_fee})"
            )));
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALLET: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
    const DEST: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

    fn request(nonce: u64) -> TransferRequest<'static> {
        TransferRequest {
            chain: "evm-31337",
            from: WALLET,
            to: DEST,
            value: U256::from(10u64).pow(U256::from(17u64)),
            nonce,
            gas_limit: TRANSFER_GAS,
            max_fee_per_gas: 3 * GWEI,
            max_priority_fee_per_gas: GWEI,
        }
    }

    fn expectation(value: U256) -> Expectation<'static> {
        Expectation {
            chain: "evm-31337",
            wallet: WALLET,
            destination: DEST,
            value,
            gas: GasPolicy::for_chain("evm-31337").expect("known"),
        }
    }

    fn dev_key() -> SigningKey {
        // Anvil's first dev account (public test key).
        let bytes = hex::decode("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80")
            .expect("hex");
        SigningKey::from_slice(&bytes).expect("key")
    }

    #[test]
    fn signs_a_transaction_that_decodes_and_recovers_to_the_wallet() {
        let r = request(7);
        let gas = GasPolicy::for_chain("evm-31337").expect("known");
        let unsigned = build(&r, &gas).expect("build");
        let checked = check(&unsigned, &expectation(r.value)).expect("check");
        let signed = checked.sign(&dev_key(), vec!["s1".into()]).expect("sign");
        let raw = hex::decode(signed.raw_tx.trim_start_matches("0x")).expect("hex");
        assert_eq!(raw[0], 2, "an EIP-1559 envelope");
        let decoded = TxEnvelope::decode_2718(&mut raw.as_slice()).expect("decodes");
        assert_eq!(format!("{:#x}", decoded.tx_hash()), signed.txid);
        let TxEnvelope::Eip1559(s) = &decoded else {
            panic!("type 2")
        };
        assert_eq!(s.tx(), &checked.tx);
        let sender = s
            .signature()
            .recover_address_from_prehash(&s.tx().signature_hash())
            .expect("recovers");
        assert_eq!(sender.to_checksum(None), WALLET);
        // Low S (EIP-2).
        assert!(s.signature().normalize_s().is_none());
        checked.verify_signed(&signed).expect("verifies");
        let mut other_tx = checked.clone();
        other_tx.tx.nonce += 1;
        assert!(other_tx.verify_signed(&signed).is_err());
        let mut renamed = signed.clone();
        renamed.txid = format!("0x{}", "00".repeat(32));
        assert!(checked.verify_signed(&renamed).is_err());
        // Another key is refused rather than signing for someone else.
        let other = SigningKey::from_slice(&[1u8; 32]).expect("key");
        assert!(matches!(
            checked.sign(&other, vec![]),
            Err(EvmError::Signing(_))
        ));
    }

    #[test]
    fn check_refuses_anything_but_the_approved_transfer() {
        let r = request(0);
        let gas = GasPolicy::for_chain("evm-31337").expect("known");
        let unsigned = build(&r, &gas).expect("build");
        let refusal = |u: &UnsignedTransaction, e: &Expectation<'_>| match check(u, e) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {u:?}"),
        };
        let with = |f: &dyn Fn(&mut UnsignedTransaction)| {
            let mut u = unsigned.clone();
            f(&mut u);
            u
        };
        let set = |f: fn(&mut u64, &mut u64, &mut u64, &mut String, &mut String)| {
            with(&move |u: &mut UnsignedTransaction| {
                if let UnsignedTransaction::Evm {
                    gas_limit,
                    max_fee_per_gas,
                    max_priority_fee_per_gas,
                    to,
                    value,
                    ..
                } = u
                {
                    f(
                        gas_limit,
                        max_fee_per_gas,
                        max_priority_fee_per_gas,
                        to,
                        value,
                    )
                }
            })
        };
        let e = expectation(r.value);
        assert!(refusal(&set(|_, _, _, to, _| *to = WALLET.into()), &e).contains("pays"));
        assert!(
            refusal(&set(|_, _, _, _, v| *v = "100000000000000001".into()), &e).contains("wei")
        );
        assert!(refusal(&set(|g, _, _, _, _| *g = 5_000_000), &e).contains("gas limit"));
        assert!(refusal(&set(|g, _, _, _, _| *g = 20_999), &e).contains("gas limit"));
        assert!(refusal(&set(|_, f, _, _, _| *f = 5_000 * GWEI), &e).contains("max fee per gas"));
        assert!(refusal(&set(|_, _, p, _, _| *p = 200 * GWEI), &e).contains("priority"));
        assert!(
            refusal(&set(|_, f, p, _, _| (*f, *p) = (GWEI, 2 * GWEI)), &e).contains("priority")
        );
        let mut other_chain = e.clone();
        other_chain.chain = "evm-1";
        assert!(refusal(&unsigned, &other_chain).contains("evm-31337"));
        let mut other_wallet = e.clone();
        other_wallet.wallet = DEST;
        assert!(refusal(&unsigned, &other_wallet).contains("spends from"));
        // A checksum typo in a recorded address is refused by field.
        let bad = set(|_, _, _, to, _| *to = "0x70997970c51812dc3A010C7d01b50e0d17dc79C8".into());
        assert!(refusal(&bad, &e).starts_with("to: EIP-55"));
        // Same transfer, any case: accepted.
        let lower = set(|_, _, _, to, _| *to = DEST.to_ascii_lowercase());
        assert!(check(&lower, &e).is_ok());
    }

    #[test]
    fn chain_ids() {
        assert_eq!(chain_id("evm-31337"), Ok(31_337));
        assert!(chain_id("ltc-regtest").is_err());
        assert!(chain_id("evm-").is_err());
        assert!(chain_id("evm-01").is_err());
    }
}
