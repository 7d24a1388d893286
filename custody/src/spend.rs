//! Bitcoin-family spends from a FROST Taproot wallet: the builder that turns a
//! transfer into an unsigned transaction, and the check every guardian runs on
//! that transaction before it signs anything.
//!
//! [`check_spend`] is the security core: a guardian signs only what it passes.
//! It trusts nothing the coordinator says about the transaction beyond what the
//! transaction itself commits to (BIP-341 signs every spent amount and script, so
//! a lie about them only makes the signature invalid), and then checks that the
//! money goes where the approval says, in the approved amount, for a bounded fee.

use std::collections::BTreeSet;

use custos_schemas::chain::{SignedTransaction, SpentOutput, UnsignedTransaction};

use crate::address::{AddressError, hrp_for};
use crate::taproot::{OutPoint, Sighash, TaprootError, Transaction, TxIn, TxOut};

/// Version 2 (BIP-68 semantics), no lock time.
pub const TX_VERSION: i32 = 2;
/// Opts in to replace-by-fee (BIP-125) so a stuck transfer can be bumped.
pub const RBF_SEQUENCE: u32 = 0xffff_fffd;
/// Beyond this many inputs the transaction risks the standard size limit; the
/// wallet should be consolidated first.
pub const MAX_INPUTS: usize = 500;

/// Why a spend could not be built or is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    #[error("{0}")]
    Chain(#[from] AddressError),
    #[error("address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    #[error(
        "insufficient funds: {needed} sat needed (amount {amount} + fee {fee}), {available} sat available"
    )]
    InsufficientFunds {
        needed: u64,
        amount: u64,
        fee: u64,
        available: u64,
    },
    #[error("transaction: {0}")]
    Transaction(#[from] TaprootError),
    #[error("refused: {0}")]
    Refused(String),
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> SpendError {
    SpendError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn refused(reason: impl Into<String>) -> SpendError {
    SpendError::Refused(reason.into())
}

/// The scriptPubKey an address of `chain` (a chain id or an HRP) pays to. Only
/// segwit v0 (P2WPKH, P2WSH) and v1 (P2TR) are accepted: those are the
/// addresses the engine admits, and later witness versions are not yet
/// spendable by anyone's rules (sending to them risks the funds).
pub fn script_pubkey_for_address(chain: &str, address: &str) -> Result<Vec<u8>, SpendError> {
    let hrp = hrp_for(chain)?;
    let bad = |reason: String| SpendError::Address {
        address: address.to_owned(),
        reason,
    };
    let (found, version, program) =
        bech32::segwit::decode(address).map_err(|e| bad(format!("not a segwit address: {e}")))?;
    if !found.as_str().eq_ignore_ascii_case(hrp) {
        return Err(bad(format!(
            "it is for network {:?}, this chain is {hrp:?}",
            found.as_str()
        )));
    }
    let opcode = match (version.to_u8(), program.len()) {
        (0, 20 | 32) => 0x00,
        (1, 32) => 0x51,
        (v, n) => {
            return Err(bad(format!(
                "witness version {v} with a {n}-byte program is not supported (only P2WPKH, P2WSH, P2TR)"
            )));
        }
    };
    let mut spk = Vec::with_capacity(2 + program.len());
    spk.push(opcode);
    spk.push(program.len() as u8);
    spk.extend_from_slice(&program);
    Ok(spk)
}

/// A display-order txid (as nodes print it) in internal byte order.
pub fn txid_from_hex(field_name: &str, txid: &str) -> Result<[u8; 32], SpendError> {
    let mut bytes: [u8; 32] = hex::decode(txid)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| field(field_name, "must be 64 hex digits"))?;
    bytes.reverse();
    Ok(bytes)
}

fn hex_field(field_name: &str, value: &str) -> Result<Vec<u8>, SpendError> {
    hex::decode(value).map_err(|e| field(field_name, format!("not hex: {e}")))
}

/// Fee limits for one chain: the builder clamps its rate into
/// `[min_rate, max_rate]`; guardians refuse any fee above [`FeePolicy::fee_cap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeePolicy {
    /// Floor, sat/vB (the nodes' minimum relay fee).
    pub min_rate: u64,
    /// Cap, sat/vB.
    pub max_rate: u64,
    /// Absolute cap on one transaction's fee, satoshi.
    pub max_fee: u64,
    /// The nodes' dust relay fee, sat/vB: an output worth less than spending it
    /// would cost at this rate is not relayed.
    pub dust_rate: u64,
}

impl FeePolicy {
    /// Defaults for a chain id or HRP: Bitcoin Core relays from 1 sat/vB with a
    /// dust relay fee of 3 sat/vB; Litecoin Core from 1 sat/vB with 30 sat/vB
    /// (its P2TR dust threshold is 3,300 sat).
    pub fn for_chain(chain: &str) -> Result<FeePolicy, SpendError> {
        let hrp = hrp_for(chain)?;
        Ok(if hrp.ends_with("ltc") {
            FeePolicy {
                min_rate: 1,
                max_rate: 200,
                max_fee: 1_000_000,
                dust_rate: 30,
            }
        } else {
            FeePolicy {
                min_rate: 1,
                max_rate: 500,
                max_fee: 1_000_000,
                dust_rate: 3,
            }
        })
    }

    /// Bitcoin Core's dust threshold for a witness output with this script:
    /// (output size + 67 bytes to spend it) × dust rate.
    pub fn dust_threshold(&self, script_pubkey: &[u8]) -> u64 {
        (8 + 1 + script_pubkey.len() as u64 + 67) * self.dust_rate
    }

    /// The most a guardian lets a transaction of `vsize` pay: the top rate for
    /// it with a change output to `wallet_script`, plus that change had it been
    /// dust (a builder gives dust change to the fee), and never above `max_fee`.
    pub fn fee_cap(&self, vsize: u64, wallet_script: &[u8]) -> u64 {
        let change_vbytes = 8 + 1 + wallet_script.len() as u64;
        self.max_rate
            .saturating_mul(vsize.saturating_add(change_vbytes))
            .saturating_add(self.dust_threshold(wallet_script))
            .min(self.max_fee)
    }
}

/// What to build: pay `amount` satoshi to `destination` from the wallet whose
/// (P2TR key-path) script is `wallet_script`, choosing among `utxos`.
#[derive(Debug, Clone, Copy)]
pub struct SpendRequest<'a> {
    pub chain: &'a str,
    pub wallet_script: &'a [u8],
    /// Unspent outputs of the wallet (confirmed and not spent in the mempool).
    pub utxos: &'a [SpentOutput],
    pub destination: &'a [u8],
    pub amount: u64,
    /// The node's estimate, sat/vB (`None`: no estimate, use the floor).
    pub fee_rate: Option<u64>,
    pub fees: FeePolicy,
}

struct Candidate {
    outpoint: OutPoint,
    utxo: SpentOutput,
}

fn p2tr_key(field_name: &str, script: &[u8]) -> Result<[u8; 32], SpendError> {
    match script {
        [0x51, 0x20, key @ ..] if key.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(key);
            Ok(k)
        }
        _ => Err(field(field_name, "must be a P2TR script (OP_1 <32 bytes>)")),
    }
}

/// Builds the unsigned transaction of a transfer: version 2, lock time 0, RBF
/// sequences; coins chosen largest first (ties by outpoint) so the same inputs
/// always give the same transaction; the destination is output 0 and the change,
/// if any, output 1; change worth less than the dust threshold goes to the fee.
pub fn build_spend(req: &SpendRequest<'_>) -> Result<UnsignedTransaction, SpendError> {
    p2tr_key("wallet script", req.wallet_script)?;
    if req.destination == req.wallet_script {
        return Err(field("destination", "is the wallet itself"));
    }
    let dust = req.fees.dust_threshold(req.destination);
    if req.amount < dust {
        return Err(field(
            "amount",
            format!(
                "{} sat is below the dust threshold of {dust} sat",
                req.amount
            ),
        ));
    }
    if req.fees.min_rate > req.fees.max_rate {
        return Err(field("fee policy", "the floor is above the cap"));
    }
    let rate = req
        .fee_rate
        .unwrap_or(req.fees.min_rate)
        .clamp(req.fees.min_rate, req.fees.max_rate);

    let mut seen = BTreeSet::new();
    let mut candidates = Vec::with_capacity(req.utxos.len());
    for (i, u) in req.utxos.iter().enumerate() {
        let outpoint = OutPoint {
            txid: txid_from_hex(&format!("utxos[{i}].txid"), &u.txid)?,
            vout: u.vout,
        };
        if hex_field(&format!("utxos[{i}].scriptPubKey"), &u.script_pubkey)? != req.wallet_script {
            return Err(field(
                format!("utxos[{i}].scriptPubKey"),
                "is not the wallet's script",
            ));
        }
        if !seen.insert((outpoint.txid, outpoint.vout)) {
            return Err(field(
                format!("utxos[{i}]"),
                format!("{}:{} is listed twice", u.txid, u.vout),
            ));
        }
        candidates.push(Candidate {
            outpoint,
            utxo: u.clone(),
        });
    }
    candidates.sort_by(|a, b| {
        b.utxo
            .value
            .cmp(&a.utxo.value)
            .then_with(|| a.utxo.txid.cmp(&b.utxo.txid))
            .then_with(|| a.utxo.vout.cmp(&b.utxo.vout))
    });

    let destination = TxOut {
        value: req.amount,
        script_pubkey: req.destination.to_vec(),
    };
    let change_dust = req.fees.dust_threshold(req.wallet_script);
    let mut tx = Transaction {
        version: TX_VERSION,
        lock_time: 0,
        inputs: Vec::new(),
        outputs: vec![destination],
    };
    let available = candidates
        .iter()
        .try_fold(0u64, |sum, c| sum.checked_add(c.utxo.value))
        .ok_or_else(|| field("utxos", "values overflow"))?;
    let mut spent = Vec::new();
    let mut total: u64 = 0;
    for c in candidates.into_iter().take(MAX_INPUTS) {
        tx.inputs.push(TxIn {
            previous_output: c.outpoint,
            sequence: RBF_SEQUENCE,
        });
        // Cannot overflow: bounded by `available`.
        total += c.utxo.value;
        spent.push(c.utxo);
        let fee_alone = rate.saturating_mul(tx.keypath_vsize());
        if total < req.amount.saturating_add(fee_alone) {
            continue;
        }
        let mut with_change = tx.clone();
        with_change.outputs.push(TxOut {
            value: 0,
            script_pubkey: req.wallet_script.to_vec(),
        });
        let fee_with_change = rate.saturating_mul(with_change.keypath_vsize());
        let change = total
            .saturating_sub(req.amount)
            .saturating_sub(fee_with_change);
        let change_vout = if change >= change_dust {
            with_change.outputs[1].value = change;
            tx = with_change;
            Some(1)
        } else {
            None
        };
        let outputs: u64 = tx.outputs.iter().map(|o| o.value).sum();
        let fee = total - outputs;
        let cap = req.fees.fee_cap(tx.keypath_vsize(), req.wallet_script);
        if fee > cap {
            return Err(refused(format!(
                "the fee would be {fee} sat, above the cap of {cap} sat"
            )));
        }
        return Ok(UnsignedTransaction::Bitcoin {
            chain: req.chain.to_owned(),
            unsigned_tx: hex::encode(tx.serialize()),
            spent,
            fee,
            fee_rate: rate,
            change_vout,
        });
    }
    let fee = rate.saturating_mul(tx.keypath_vsize());
    if available > total && available >= req.amount.saturating_add(fee) {
        return Err(refused(format!(
            "more than {MAX_INPUTS} inputs would be needed; consolidate the wallet's outputs first"
        )));
    }
    Err(SpendError::InsufficientFunds {
        needed: req.amount.saturating_add(fee),
        amount: req.amount,
        fee,
        available,
    })
}

/// What the approval says a transfer may do; a guardian checks the recorded
/// transaction against it.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub chain: &'a str,
    pub wallet_script: &'a [u8],
    pub destination: &'a [u8],
    pub amount: u64,
    pub fees: FeePolicy,
}

/// A transaction that passed [`check_spend`]: the guardian recomputes each
/// input's sighash from these, never from a digest it was handed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedSpend {
    pub tx: Transaction,
    /// One per input, in input order.
    pub spent: Vec<TxOut>,
    pub txid: String,
    pub fee: u64,
    pub vsize: u64,
}

impl CheckedSpend {
    /// BIP-341 `SIGHASH_DEFAULT` of input `index`, computed here.
    pub fn sighash(&self, index: usize) -> Result<Sighash, SpendError> {
        Ok(self.tx.sighash_default(index, &self.spent)?)
    }

    /// Every input's sighash, in input order.
    pub fn sighashes(&self) -> Result<Vec<Sighash>, SpendError> {
        (0..self.tx.inputs.len()).map(|i| self.sighash(i)).collect()
    }

    /// The broadcastable transaction: one key-path signature per input, each
    /// one FROST verified under the spent output's key on that input's sighash.
    pub fn finalize(
        &self,
        chain: &str,
        signatures: &[crate::sign::Aggregated],
        signers: Vec<String>,
    ) -> Result<SignedTransaction, SpendError> {
        if signatures.len() != self.tx.inputs.len() {
            return Err(field(
                "signatures",
                format!(
                    "{} given for {} inputs",
                    signatures.len(),
                    self.tx.inputs.len()
                ),
            ));
        }
        let mut witnesses = Vec::with_capacity(signatures.len());
        for (i, (sig, spent)) in signatures.iter().zip(&self.spent).enumerate() {
            let key = p2tr_key(&format!("spent[{i}].scriptPubKey"), &spent.script_pubkey)?;
            if sig.output_key() != &key {
                return Err(field(
                    format!("signatures[{i}]"),
                    "was made under another key than the spent output's",
                ));
            }
            if sig.message() != self.sighash(i)?.as_bytes() {
                return Err(field(
                    format!("signatures[{i}]"),
                    "signs another message than the input's sighash",
                ));
            }
            witnesses.push(vec![sig.signature().to_vec()]);
        }
        Ok(SignedTransaction {
            chain: chain.to_owned(),
            txid: self.txid.clone(),
            raw_tx: hex::encode(self.tx.serialize_with_witnesses(&witnesses)?),
            signers,
        })
    }
}

/// The guardian's check of a recorded transaction against the approval: the
/// chain; one spent output per input with the same outpoint, each the wallet's
/// own script; no input twice; exactly one output to the destination, for
/// exactly the approved amount; every other output back to the wallet (and the
/// recorded change index says which); the recorded fee equal to inputs minus
/// outputs and within the caps.
pub fn check_spend(
    unsigned: &UnsignedTransaction,
    expect: &Expectation<'_>,
) -> Result<CheckedSpend, SpendError> {
    let UnsignedTransaction::Bitcoin {
        chain,
        unsigned_tx,
        spent,
        fee,
        change_vout,
        ..
    } = unsigned
    else {
        return Err(refused("not a Bitcoin-family transaction"));
    };
    if hrp_for(chain)? != hrp_for(expect.chain)? {
        return Err(refused(format!(
            "the transaction is for {chain}, the approval for {}",
            expect.chain
        )));
    }
    p2tr_key("wallet script", expect.wallet_script)?;
    if expect.destination == expect.wallet_script {
        return Err(refused("the destination is the wallet itself"));
    }
    let tx = Transaction::parse(&hex_field("unsignedTx", unsigned_tx)?)?;
    if tx.version != TX_VERSION || tx.lock_time != 0 {
        return Err(refused(format!(
            "version {} / lock time {}: only version {TX_VERSION} with lock time 0 is signed",
            tx.version, tx.lock_time
        )));
    }
    if spent.len() != tx.inputs.len() {
        return Err(refused(format!(
            "{} spent outputs recorded for {} inputs",
            spent.len(),
            tx.inputs.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut spent_outs = Vec::with_capacity(spent.len());
    let mut input_total: u64 = 0;
    for (i, (input, s)) in tx.inputs.iter().zip(spent).enumerate() {
        let prev = &input.previous_output;
        if !seen.insert((prev.txid, prev.vout)) {
            return Err(refused(format!(
                "input {i} spends an outpoint already spent by an earlier input"
            )));
        }
        let txid = txid_from_hex(&format!("spent[{i}].txid"), &s.txid)?;
        if txid != prev.txid || s.vout != prev.vout {
            return Err(refused(format!(
                "spent[{i}] is {}:{}, the input spends another outpoint",
                s.txid, s.vout
            )));
        }
        let script = hex_field(&format!("spent[{i}].scriptPubKey"), &s.script_pubkey)?;
        if script != expect.wallet_script {
            return Err(refused(format!(
                "input {i} spends a script that is not the wallet's"
            )));
        }
        input_total = input_total
            .checked_add(s.value)
            .ok_or_else(|| refused("spent values overflow"))?;
        spent_outs.push(TxOut {
            value: s.value,
            script_pubkey: script,
        });
    }
    let mut payments = 0;
    let mut change = None;
    let mut output_total: u64 = 0;
    for (i, o) in tx.outputs.iter().enumerate() {
        output_total = output_total
            .checked_add(o.value)
            .ok_or_else(|| refused("output values overflow"))?;
        if o.script_pubkey == expect.destination {
            if o.value != expect.amount {
                return Err(refused(format!(
                    "output {i} pays the destination {} sat, the approved amount is {}",
                    o.value, expect.amount
                )));
            }
            payments += 1;
        } else if o.script_pubkey == expect.wallet_script {
            if change.replace(i).is_some() {
                return Err(refused("more than one change output"));
            }
        } else {
            return Err(refused(format!(
                "output {i} pays a script that is neither the destination nor the wallet"
            )));
        }
    }
    if payments != 1 {
        return Err(refused(format!(
            "{payments} outputs pay the destination, exactly one must"
        )));
    }
    if change.map(|i| i as u32) != *change_vout {
        return Err(refused(format!(
            "the recorded change output {change_vout:?} is not the wallet's output {change:?}"
        )));
    }
    let actual_fee = input_total.checked_sub(output_total).ok_or_else(|| {
        refused(format!(
            "outputs ({output_total} sat) exceed inputs ({input_total} sat)"
        ))
    })?;
    if actual_fee != *fee {
        return Err(refused(format!(
            "the recorded fee is {fee} sat, inputs minus outputs is {actual_fee} sat"
        )));
    }
    let vsize = tx.keypath_vsize();
    let cap = expect.fees.fee_cap(vsize, expect.wallet_script);
    if actual_fee > cap {
        return Err(refused(format!(
            "the fee of {actual_fee} sat exceeds the cap of {cap} sat for {vsize} vB"
        )));
    }
    Ok(CheckedSpend {
        txid: tx.txid(),
        tx,
        spent: spent_outs,
        fee: actual_fee,
        vsize,
    })
}

impl FeePolicy {
    /// The nodes' incremental relay fee, sat/vB: what a replacement must pay
    /// on top of the fee of the transaction it replaces, per vbyte of itself
    /// (BIP-125 rule 4). Bitcoin Core and Litecoin Core default it to their
    /// minimum relay fee, the floor.
    pub fn incremental_rate(&self) -> u64 {
        self.min_rate.max(1)
    }
}

/// The fee-bumped replacement of `previous`, a recorded transaction of the
/// transfer `expect` describes: exactly its inputs, the same payment, and a fee
/// rate of `rate` sat/vB (raised to the least BIP-125 accepts, and never above
/// the policy's cap). The change pays the difference; change that would fall
/// below the dust threshold goes to the fee. Refused when the change cannot pay
/// the least acceptable fee within the caps.
pub fn build_replacement(
    previous: &UnsignedTransaction,
    rate: u64,
    expect: &Expectation<'_>,
) -> Result<UnsignedTransaction, SpendError> {
    let old = check_spend(previous, expect)?;
    let UnsignedTransaction::Bitcoin {
        chain,
        spent,
        fee_rate: old_rate,
        ..
    } = previous
    else {
        return Err(refused("not a Bitcoin-family transaction"));
    };
    let fees = expect.fees;
    let incremental = fees.incremental_rate();
    let least_rate = old_rate.saturating_add(incremental);
    if least_rate > fees.max_rate {
        return Err(refused(format!(
            "a replacement needs at least {least_rate} sat/vB, above the cap of {} sat/vB",
            fees.max_rate
        )));
    }
    let rate = rate.clamp(least_rate, fees.max_rate);
    let input_total: u64 = old.spent.iter().map(|o| o.value).sum();
    let mut tx = Transaction {
        version: TX_VERSION,
        lock_time: 0,
        inputs: old.tx.inputs.clone(),
        outputs: vec![
            TxOut {
                value: expect.amount,
                script_pubkey: expect.destination.to_vec(),
            },
            TxOut {
                value: 0,
                script_pubkey: expect.wallet_script.to_vec(),
            },
        ],
    };
    // The least fee BIP-125 accepts for a transaction of `vsize`: more than
    // the old one by the incremental rate, and at `rate`.
    let least_fee = |vsize: u64| {
        rate.saturating_mul(vsize)
            .max(old.fee.saturating_add(incremental.saturating_mul(vsize)))
    };
    let fee = least_fee(tx.keypath_vsize());
    let change = input_total
        .checked_sub(expect.amount)
        .and_then(|c| c.checked_sub(fee))
        .unwrap_or(0);
    let change_vout = if change >= fees.dust_threshold(expect.wallet_script) {
        tx.outputs[1].value = change;
        Some(1)
    } else {
        tx.outputs.truncate(1);
        let needed = expect.amount.saturating_add(least_fee(tx.keypath_vsize()));
        if input_total < needed {
            return Err(refused(format!(
                "the inputs ({input_total} sat) cannot pay the amount and a replacement fee ({needed} sat in all)"
            )));
        }
        None
    };
    let outputs: u64 = tx.outputs.iter().map(|o| o.value).sum();
    let replacement = UnsignedTransaction::Bitcoin {
        chain: chain.clone(),
        unsigned_tx: hex::encode(tx.serialize()),
        spent: spent.clone(),
        fee: input_total - outputs,
        fee_rate: rate,
        change_vout,
    };
    check_replacement(&replacement, previous, expect)?;
    Ok(replacement)
}

/// A signer's check of a replacement: it passes [`check_spend`] against the
/// approval (same destination and amount, fee within the cap), spends exactly
/// the inputs of `previous` (which must pass that check too), and pays a
/// higher fee and fee rate, by at least the incremental relay fee for its own
/// size (BIP-125 rules 3 and 4). Anything else is not a fee bump.
pub fn check_replacement(
    replacement: &UnsignedTransaction,
    previous: &UnsignedTransaction,
    expect: &Expectation<'_>,
) -> Result<CheckedSpend, SpendError> {
    let old = check_spend(previous, expect)
        .map_err(|e| refused(format!("the replaced transaction: {e}")))?;
    let new = check_spend(replacement, expect)?;
    let outpoints = |c: &CheckedSpend| {
        c.tx.inputs
            .iter()
            .map(|i| (i.previous_output.txid, i.previous_output.vout))
            .collect::<BTreeSet<_>>()
    };
    if new.tx.inputs.len() != old.tx.inputs.len() || outpoints(&new) != outpoints(&old) {
        return Err(refused(format!(
            "the replacement spends other inputs than {}",
            old.txid
        )));
    }
    let least = old
        .fee
        .saturating_add(expect.fees.incremental_rate().saturating_mul(new.vsize));
    if new.fee < least {
        return Err(refused(format!(
            "the replacement pays {} sat, less than the {least} sat BIP-125 needs over {}'s {} sat",
            new.fee, old.txid, old.fee
        )));
    }
    // new.fee / new.vsize > old.fee / old.vsize, without division.
    if u128::from(new.fee) * u128::from(old.vsize) <= u128::from(old.fee) * u128::from(new.vsize) {
        return Err(refused(format!(
            "the replacement's fee rate is not above {}'s",
            old.txid
        )));
    }
    Ok(new)
}
