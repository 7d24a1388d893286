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
        varint(&mut b, self.inputs.len());
        for i in &self.inputs {
            b.extend_from_slice(&i.previous_output.txid);
            b.extend_from_slice(&i.previous_output.vout.to_le_bytes());
            varint(&mut b, 0); // empty scriptSig
            b.extend_from_slice(&i.sequence.to_le_bytes());
        }
        varint(&mut b, self.outputs.len());
        for o in &self.outputs {
            put_txout(&mut b, o);
        }
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
