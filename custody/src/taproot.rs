//! A minimal Bitcoin transaction model and the BIP-341 `SIGHASH_DEFAULT` digest of
//! a key-path spend: what a guardian recomputes from the approved transaction
//! before it releases a signature share (never a digest handed to it).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::address::tagged_hash;

/// A 32-byte message a guardian has recomputed itself. Round 2 of signing only
/// signs a package whose message equals one of these.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sighash([u8; 32]);

impl Sighash {
    /// For digests the guardian computed with its own code for another chain.
    /// Never build one from bytes the coordinator sent.
    pub fn from_recomputed(bytes: [u8; 32]) -> Self {
        Sighash(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for Sighash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sighash({})", hex::encode(self.0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutPoint {
    /// The previous transaction's id in internal (serialization) byte order.
    pub txid: [u8; 32],
    pub vout: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxIn {
    pub previous_output: OutPoint,
    pub sequence: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxOut {
    pub value: u64,
    pub script_pubkey: Vec<u8>,
}

/// An unsigned transaction (no script sigs: Taproot key-path spends only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub version: i32,
    pub lock_time: u32,
    pub inputs: Vec<TxIn>,
    pub outputs: Vec<TxOut>,
}

/// Why a digest or serialization could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaprootError {
    #[error("input index {index} out of range ({inputs} inputs)")]
    InputIndex { index: usize, inputs: usize },
    #[error("{spent} spent outputs given for {inputs} inputs (BIP-341 commits to all of them)")]
    SpentOutputs { spent: usize, inputs: usize },
    #[error("{witnesses} witnesses given for {inputs} inputs")]
    Witnesses { witnesses: usize, inputs: usize },
    #[error("malformed transaction at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
}

/// Reads a serialized transaction, refusing anything not canonical.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, reason: &'static str) -> Result<T, TaprootError> {
        Err(TaprootError::Malformed {
            offset: self.pos,
            reason,
        })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TaprootError> {
        match self.bytes.get(self.pos..self.pos.saturating_add(n)) {
            Some(b) => {
                self.pos += n;
                Ok(b)
            }
            None => self.fail(what),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TaprootError> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TaprootError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, TaprootError> {
        let [first] = self.array::<1>(what)?;
        let (n, min) = match first {
            0xfd => (u64::from(u16::from_le_bytes(self.array(what)?)), 0xfd),
            0xfe => (u64::from(u32::from_le_bytes(self.array(what)?)), 0x1_0000),
            0xff => (u64::from_le_bytes(self.array(what)?), 0x1_0000_0000),
            n => (u64::from(n), 0),
        };
        if n < min {
            return self.fail("non-canonical compact size");
        }
        Ok(n)
    }

    /// A count of items of at least `min_item` bytes each: bounded by what is left,
    /// so a forged count cannot make us allocate.
    fn count(&mut self, min_item: usize, what: &'static str) -> Result<usize, TaprootError> {
        let n = self.varint(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return self.fail(what);
        }
        Ok(n as usize)
    }
}

fn varint(buf: &mut Vec<u8>, n: usize) {
    let n = n as u64;
    match n {
        0..=0xfc => buf.push(n as u8),
        0xfd..=0xffff => {
            buf.push(0xfd);
            buf.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(0xfe);
            buf.extend_from_slice(&(n as u32).to_le_bytes());
        }
        _ => {
            buf.push(0xff);
            buf.extend_from_slice(&n.to_le_bytes());
        }
    }
}

fn put_txout(buf: &mut Vec<u8>, o: &TxOut) {
    buf.extend_from_slice(&o.value.to_le_bytes());
    varint(buf, o.script_pubkey.len());
    buf.extend_from_slice(&o.script_pubkey);
}

impl Transaction {
    /// Parses the legacy (witness-free) serialization of an unsigned transaction.
    /// Witness serializations, script sigs and trailing bytes are refused: an
    /// unsigned key-path spend has none of them.
    pub fn parse(bytes: &[u8]) -> Result<Transaction, TaprootError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = i32::from_le_bytes(r.array("truncated version")?);
        let n_in = r.count(41, "input count exceeds the data")?;
        if n_in == 0 {
            return r.fail("no inputs (or a witness serialization, which an unsigned transaction must not use)");
        }
        let mut inputs = Vec::with_capacity(n_in);
        for _ in 0..n_in {
            let txid = r.array("truncated outpoint")?;
            let vout = r.u32("truncated outpoint")?;
            if r.varint("truncated script sig")? != 0 {
                return r.fail("input has a script sig (only key-path spends are signed here)");
            }
            let sequence = r.u32("truncated sequence")?;
            inputs.push(TxIn {
                previous_output: OutPoint { txid, vout },
                sequence,
            });
        }
        let n_out = r.count(9, "output count exceeds the data")?;
        let mut outputs = Vec::with_capacity(n_out);
        for _ in 0..n_out {
            let value = u64::from_le_bytes(r.array("truncated output value")?);
            let len = r.count(1, "script longer than the data")?;
            let script_pubkey = r.take(len, "truncated script")?.to_vec();
            outputs.push(TxOut {
                value,
                script_pubkey,
            });
        }
        let lock_time = r.u32("truncated lock time")?;
        if r.pos != bytes.len() {
            return r.fail("trailing bytes after the lock time");
        }
        Ok(Transaction {
            version,
            lock_time,
            inputs,
            outputs,
        })
    }

    /// The legacy (witness-free) serialization: what the txid hashes.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.version.to_le_bytes());
        self.put_body(&mut b);
        b.extend_from_slice(&self.lock_time.to_le_bytes());
        b
    }

    fn put_body(&self, b: &mut Vec<u8>) {
        varint(b, self.inputs.len());
        for i in &self.inputs {
            b.extend_from_slice(&i.previous_output.txid);
            b.extend_from_slice(&i.previous_output.vout.to_le_bytes());
            varint(b, 0); // empty scriptSig
            b.extend_from_slice(&i.sequence.to_le_bytes());
        }
        varint(b, self.outputs.len());
        for o in &self.outputs {
            put_txout(b, o);
        }
    }

    /// The txid as nodes display it (byte-reversed double SHA-256, hex). Witnesses
    /// do not change it, so it is known before signing.
    pub fn txid(&self) -> String {
        let mut h: [u8; 32] = Sha256::digest(Sha256::digest(self.serialize())).into();
        h.reverse();
        hex::encode(h)
    }

    /// Virtual size once every input carries a key-path witness (one 64-byte
    /// `SIGHASH_DEFAULT` signature): exact, so fees can be set and checked before
    /// signing.
    pub fn keypath_vsize(&self) -> u64 {
        // Witness bytes: marker and flag, then per input a stack count (1), a
        // length (1) and the signature (64).
        let weight = 4 * self.serialize().len() as u64 + 2 + 66 * self.inputs.len() as u64;
        weight.div_ceil(4)
    }

    /// BIP-341 signature message digest for a key-path spend of input `index` with
    /// `SIGHASH_DEFAULT` (no annex), given every spent output in input order.
    pub fn sighash_default(&self, index: usize, spent: &[TxOut]) -> Result<Sighash, TaprootError> {
        if index >= self.inputs.len() {
            return Err(TaprootError::InputIndex {
                index,
                inputs: self.inputs.len(),
            });
        }
        if spent.len() != self.inputs.len() {
            return Err(TaprootError::SpentOutputs {
                spent: spent.len(),
                inputs: self.inputs.len(),
            });
        }
        let mut prevouts = Sha256::new();
        let mut sequences = Sha256::new();
        for i in &self.inputs {
            prevouts.update(i.previous_output.txid);
            prevouts.update(i.previous_output.vout.to_le_bytes());
            sequences.update(i.sequence.to_le_bytes());
        }
        let mut amounts = Sha256::new();
        let mut spks = Sha256::new();
        for o in spent {
            amounts.update(o.value.to_le_bytes());
            let mut b = Vec::with_capacity(o.script_pubkey.len() + 9);
            varint(&mut b, o.script_pubkey.len());
            b.extend_from_slice(&o.script_pubkey);
            spks.update(&b);
        }
        let mut outputs = Vec::new();
        for o in &self.outputs {
            put_txout(&mut outputs, o);
        }
        let mut msg = Vec::with_capacity(4 + 4 + 5 * 32 + 6);
        msg.push(0x00); // epoch
        msg.push(0x00); // hash_type: SIGHASH_DEFAULT
        msg.extend_from_slice(&self.version.to_le_bytes());
        msg.extend_from_slice(&self.lock_time.to_le_bytes());
        msg.extend_from_slice(&prevouts.finalize());
        msg.extend_from_slice(&amounts.finalize());
        msg.extend_from_slice(&spks.finalize());
        msg.extend_from_slice(&sequences.finalize());
        msg.extend_from_slice(&Sha256::digest(&outputs));
        msg.push(0x00); // spend_type: key path, no annex
        msg.extend_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_le_bytes());
        Ok(Sighash(tagged_hash("TapSighash", &[&msg])))
    }

    /// Segwit serialization with one witness stack per input (a key-path spend's
    /// stack is the single 64-byte signature).
    pub fn serialize_with_witnesses(
        &self,
        witnesses: &[Vec<Vec<u8>>],
    ) -> Result<Vec<u8>, TaprootError> {
        if witnesses.len() != self.inputs.len() {
            return Err(TaprootError::Witnesses {
                witnesses: witnesses.len(),
                inputs: self.inputs.len(),
            });
        }
        let mut b = Vec::new();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&[0x00, 0x01]); // segwit marker and flag
        self.put_body(&mut b);
        for stack in witnesses {
            varint(&mut b, stack.len());
            for item in stack {
                varint(&mut b, item.len());
                b.extend_from_slice(item);
            }
        }
        b.extend_from_slice(&self.lock_time.to_le_bytes());
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx() -> Transaction {
        Transaction {
            version: 2,
            lock_time: 0,
            inputs: vec![TxIn {
                previous_output: OutPoint {
                    txid: [1; 32],
                    vout: 0,
                },
                sequence: 0xffff_fffd,
            }],
            outputs: vec![TxOut {
                value: 1000,
                script_pubkey: vec![
                    0x51, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
            }],
        }
    }

    #[test]
    fn sighash_commits_to_everything_and_checks_arity() {
        let t = tx();
        let spent = vec![TxOut {
            value: 5000,
            script_pubkey: vec![0x51, 0x20, 9, 9],
        }];
        let base = t.sighash_default(0, &spent).unwrap();
        let mut t2 = t.clone();
        t2.outputs[0].value = 1001;
        assert_ne!(t2.sighash_default(0, &spent).unwrap(), base);
        let mut s2 = spent.clone();
        s2[0].value = 5001;
        assert_ne!(t.sighash_default(0, &s2).unwrap(), base);
        assert_eq!(
            t.sighash_default(1, &spent),
            Err(TaprootError::InputIndex {
                index: 1,
                inputs: 1
            })
        );
        assert_eq!(
            t.sighash_default(0, &[]),
            Err(TaprootError::SpentOutputs {
                spent: 0,
                inputs: 1
            })
        );
    }

    /// A transaction litecoind made with `createrawtransaction` (one input, one
    /// P2WPKH output); its txid and vsize as `decoderawtransaction` reports them.
    const NODE_TX: &str = "020000000122111111111111111111111111111111111111111111111111111111111111110300000000fdffffff0180f0fa020000000016001407e5b7087d33966045cd2bf8d7e76ded752b1a2f00000000";

    #[test]
    fn parse_serialize_and_txid_match_the_node() {
        let raw = hex::decode(NODE_TX).unwrap();
        let t = Transaction::parse(&raw).unwrap();
        assert_eq!(t.version, 2);
        assert_eq!(t.inputs[0].previous_output.vout, 3);
        assert_eq!(t.inputs[0].sequence, 0xffff_fffd);
        assert_eq!(t.outputs[0].value, 50_000_000);
        assert_eq!(t.serialize(), raw);
        assert_eq!(
            t.txid(),
            "a2b8344848435a89742563157a56993d818cf621ae22f08d9f78267833e01eaf"
        );
        // The node's vsize of the unsigned form is 82; a key-path witness adds
        // (2 + 66) / 4 rounded up.
        assert_eq!(t.keypath_vsize(), (82 * 4 + 2 + 66_u64).div_ceil(4));
    }

    #[test]
    fn parse_refuses_malformed_input_without_panicking() {
        let raw = hex::decode(NODE_TX).unwrap();
        for len in 0..raw.len() {
            assert!(
                matches!(
                    Transaction::parse(&raw[..len]),
                    Err(TaprootError::Malformed { .. })
                ),
                "truncated at {len}"
            );
        }
        let mut trailing = raw.clone();
        trailing.push(0);
        let reason = |b: &[u8]| match Transaction::parse(b) {
            Err(TaprootError::Malformed { reason, .. }) => reason,
            other => panic!("accepted: {other:?}"),
        };
        assert_eq!(reason(&trailing), "trailing bytes after the lock time");
        let witness = tx().serialize_with_witnesses(&[vec![vec![1; 64]]]).unwrap();
        assert!(reason(&witness).starts_with("no inputs"));
        let mut script_sig = raw.clone();
        script_sig[4 + 1 + 36] = 1; // scriptSig length
        assert!(reason(&script_sig).contains("script sig"));
        // A count of 1 spelled as 0xfd 0x01 0x00 is not canonical.
        let mut noncanonical = raw[..4].to_vec();
        noncanonical.extend_from_slice(&[0xfd, 0x01, 0x00]);
        noncanonical.extend_from_slice(&raw[5..]);
        assert_eq!(reason(&noncanonical), "non-canonical compact size");
        // A huge count is refused before any allocation.
        let mut huge = raw[..4].to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(reason(&huge), "input count exceeds the data");
    }

    #[test]
    fn serialization_layout() {
        let t = tx();
        let raw = t.serialize_with_witnesses(&[vec![vec![0xaa; 64]]]).unwrap();
        // version 4 + marker/flag 2 + 1 + input 41 + 1 + output 8+1+34 + witness 1+1+64 + locktime 4
        assert_eq!(raw.len(), 4 + 2 + 1 + 41 + 1 + 43 + 66 + 4);
        assert_eq!(&raw[..6], &[2, 0, 0, 0, 0, 1]);
        assert!(t.serialize_with_witnesses(&[]).is_err());
    }
}
