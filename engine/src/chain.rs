//! The audit chain: one hash chain over the whole event stream, in stream order.
//!
//! `hash(n) = SHA-256("custos-audit-v1" ‖ hash(n-1) ‖ seq(n) as u64 BE ‖ len(subject) as
//! u16 BE ‖ subject ‖ body)`, where `body` is the event's canonical MessagePack exactly
//! as stored and `hash(0)` is 32 zero bytes. Binding the stream sequence and the
//! subject means an event cannot be moved, renumbered or re-filed without breaking
//! the chain; binding the previous hash means none can be removed or inserted.
//! Checkpoints sign `(stream, seq, hash(seq))` so that truncating the tail is
//! detectable by whoever holds one.

use std::fmt;

use custos_schemas::{Checkpoint, EventType};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"custos-audit-v1";

/// A chain hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The predecessor of the first event.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `s` is this hash in lowercase hex, without allocating.
    pub fn hex_eq(&self, s: &str) -> bool {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).is_ok() && buf == s.as_bytes()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChainHash(out))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// The hash of the event stored at `seq` on `subject` with `body`, following `prev`.
pub fn link(prev: &ChainHash, seq: u64, subject: &str, body: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev.0);
    h.update(seq.to_be_bytes());
    // Subjects are short (tokens are at most 128 bytes each); saturate rather than wrap.
    h.update(
        u16::try_from(subject.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    h.update(subject.as_bytes());
    h.update(body);
    ChainHash(h.finalize().into())
}

/// One stored event as the verifier sees it: where it sits, its bytes, and the
/// chain fields stored beside it.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub seq: u64,
    pub subject: &'a str,
    pub body: &'a [u8],
    pub prev_hash: Option<&'a str>,
    pub hash: Option<&'a str>,
}

/// Checks that `l` follows the event at `last_seq` whose hash is `head`, and
/// returns its hash. Shared by the verifier and the ledger's replay.
pub fn check_link(head: &ChainHash, last_seq: u64, l: Link<'_>) -> Result<ChainHash, BreakKind> {
    let seq = l.seq;
    if seq <= last_seq {
        return Err(BreakKind::OutOfOrder { previous: last_seq });
    }
    if seq != last_seq + 1 {
        return Err(BreakKind::Missing {
            expected: last_seq + 1,
        });
    }
    let (Some(prev_hex), Some(hash_hex)) = (l.prev_hash, l.hash) else {
        return Err(BreakKind::Unchained);
    };
    let computed = link(head, seq, l.subject, l.body);
    // The hot path compares hex as stored; decoding happens only to explain a break.
    if computed.hex_eq(hash_hex) && head.hex_eq(prev_hex) {
        return Ok(computed);
    }
    let (Some(prev), Some(hash)) = (ChainHash::from_hex(prev_hex), ChainHash::from_hex(hash_hex))
    else {
        return Err(BreakKind::Unchained);
    };
    if computed != hash {
        // Tell a modified event from one that sits in the wrong place: if its own
        // recorded predecessor reproduces its hash, only its position is wrong.
        let moved = link(&prev, seq, l.subject, l.body) == hash;
        return Err(if moved || prev != *head {
            BreakKind::Unlinked
        } else {
            BreakKind::Modified
        });
    }
    if prev != *head {
        return Err(BreakKind::Unlinked);
    }
    Ok(computed)
}

/// What broke, and where: the first finding ends verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub seq: u64,
    pub kind: BreakKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakKind {
    /// Sequences jump: events before this one were deleted.
    Missing { expected: u64 },
    /// A sequence at or below one already seen: events reordered or duplicated.
    OutOfOrder { previous: u64 },
    /// The event's bytes no longer produce its recorded hash.
    Modified,
    /// The recorded predecessor is not the event before it: an event was inserted,
    /// removed or moved here.
    Unlinked,
    /// No chain fields at all: not written by the ledger.
    Unchained,
    /// A checkpoint that does not match the chain, or whose signature fails.
    BadCheckpoint(String),
    /// The trail ends before a checkpoint it must contain.
    Truncated { last: u64 },
    /// The trail starts after aged-out events and no signed checkpoint in it
    /// vouches for where it starts.
    Unanchored,
    /// A checkpoint held by the auditor covers events that aged out.
    AgedOut { first: u64 },
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seq = self.seq;
        match &self.kind {
            BreakKind::Missing { expected } => write!(
                f,
                "seq {seq}: events {expected}..{} are missing (deleted)",
                seq - 1
            ),
            BreakKind::OutOfOrder { previous } => write!(
                f,
                "seq {seq}: follows seq {previous} (reordered or duplicated event)"
            ),
            BreakKind::Modified => write!(
                f,
                "seq {seq}: content does not match its hash (modified event)"
            ),
            BreakKind::Unlinked => write!(
                f,
                "seq {seq}: its previous-hash is not the hash of the event before it (inserted, deleted or reordered event)"
            ),
            BreakKind::Unchained => write!(
                f,
                "seq {seq}: carries no chain hash (not written by the ledger: inserted event)"
            ),
            BreakKind::BadCheckpoint(why) => write!(f, "seq {seq}: checkpoint rejected: {why}"),
            BreakKind::Unanchored => write!(
                f,
                "the trail starts at seq {seq} (earlier events aged out) and no signed checkpoint after it vouches for it"
            ),
            BreakKind::AgedOut { first } => write!(
                f,
                "seq {seq}: the checkpoint covers events that aged out (the trail starts at seq {first}); use a newer checkpoint"
            ),
            BreakKind::Truncated { last } => write!(
                f,
                "trail truncated: a checkpoint covers seq {seq} but the trail ends at seq {last}"
            ),
        }
    }
}

/// Incremental verifier: feed events in order, then [`Verifier::finish`].
#[derive(Debug)]
pub struct Verifier {
    stream: String,
    trusted: Vec<VerifyingKey>,
    head: ChainHash,
    last_seq: u64,
    /// External checkpoints the trail has not reached yet.
    pending: Vec<Checkpoint>,
    verified_checkpoints: u64,
    events: u64,
    /// The first event's seq when earlier ones aged out.
    resumed_at: Option<u64>,
}

/// Summary of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub events: u64,
    pub last_seq: u64,
    pub head: ChainHash,
    pub checkpoints: u64,
}

impl Verifier {
    /// `trusted`: audit public keys whose checkpoints are accepted. With none, a
    /// checkpoint is checked against its own embedded key (consistency only).
    pub fn new(stream: &str, trusted: Vec<VerifyingKey>) -> Self {
        Verifier {
            stream: stream.to_string(),
            trusted,
            head: ChainHash::GENESIS,
            last_seq: 0,
            pending: Vec::new(),
            verified_checkpoints: 0,
            events: 0,
            resumed_at: None,
        }
    }

    /// Makes this verifier follow a trail whose events before `first` aged out
    /// (retention): the chain continues from `first`'s recorded predecessor, and
    /// only a signed checkpoint later in the trail can vouch for it (else
    /// [`Verifier::finish`] fails). Call before the first [`Verifier::push`].
    pub fn resume_at(&mut self, first: Link<'_>) -> Result<(), Break> {
        let head = first.prev_hash.and_then(ChainHash::from_hex).ok_or(Break {
            seq: first.seq,
            kind: BreakKind::Unchained,
        })?;
        self.head = head;
        self.last_seq = first.seq.saturating_sub(1);
        self.resumed_at = Some(first.seq);
        Ok(())
    }

    /// Requires the trail to contain `checkpoint`'s prefix unchanged.
    pub fn expect_checkpoint(&mut self, checkpoint: Checkpoint) -> Result<(), Break> {
        let fail = |why: String| Break {
            seq: checkpoint.sequence,
            kind: BreakKind::BadCheckpoint(why),
        };
        if checkpoint.stream != self.stream {
            return Err(fail(format!(
                "names stream {:?}, expected {:?}",
                checkpoint.stream, self.stream
            )));
        }
        if checkpoint.sequence == 0 {
            return Err(fail("covers no event (sequence 0)".into()));
        }
        self.check_signature(&checkpoint).map_err(fail)?;
        self.pending.push(checkpoint);
        Ok(())
    }

    pub fn push(&mut self, l: Link<'_>) -> Result<(), Break> {
        let seq = l.seq;
        let brk = |kind| Err(Break { seq, kind });
        let computed = match check_link(&self.head, self.last_seq, l) {
            Ok(h) => h,
            Err(kind) => return brk(kind),
        };
        let covered = self.head;
        self.head = computed;
        self.last_seq = seq;
        self.events += 1;
        if l.subject.ends_with(EventType::AuditCheckpoint.as_str()) {
            self.check_embedded_checkpoint(l, &covered)?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let head_hex = self.head.to_hex();
        let mut mismatch = None;
        let before = self.pending.len();
        self.pending.retain(|cp| {
            if cp.sequence != seq {
                return true;
            }
            if cp.head_hash != head_hex {
                mismatch = Some(cp.head_hash.clone());
            }
            false
        });
        match mismatch {
            Some(h) => brk(BreakKind::BadCheckpoint(format!(
                "the checkpoint says the head is {h} but the trail has {head_hex}"
            ))),
            None => {
                self.verified_checkpoints += (before - self.pending.len()) as u64;
                Ok(())
            }
        }
    }

    fn check_embedded_checkpoint(&mut self, l: Link<'_>, covered: &ChainHash) -> Result<(), Break> {
        let fail = |why: String| Break {
            seq: l.seq,
            kind: BreakKind::BadCheckpoint(why),
        };
        let event: custos_schemas::Event = custos_schemas::codec::from_msgpack(l.body)
            .map_err(|e| fail(format!("undecodable: {e}")))?;
        let custos_schemas::Payload::Checkpoint(cp) = event.payload else {
            return Err(fail("no checkpoint payload".into()));
        };
        self.check_signature(&cp).map_err(fail)?;
        if cp.stream != self.stream {
            return Err(fail(format!(
                "names stream {:?}, expected {:?}",
                cp.stream, self.stream
            )));
        }
        // A checkpoint states the head as of the event just before it.
        if cp.sequence.checked_add(1) != Some(l.seq) || cp.head_hash != covered.to_hex() {
            return Err(fail(format!(
                "states head {} at seq {}, the trail has {} at seq {}",
                cp.head_hash,
                cp.sequence,
                covered.to_hex(),
                l.seq.saturating_sub(1)
            )));
        }
        self.verified_checkpoints += 1;
        Ok(())
    }

    fn check_signature(&self, cp: &Checkpoint) -> Result<(), String> {
        let key_bytes: [u8; 32] = hex::decode(&cp.public_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("public key is not 32 hex bytes")?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| "public key is not a valid ed25519 key")?;
        if !self.trusted.is_empty() && !self.trusted.contains(&key) {
            return Err(format!("signed by untrusted key {}", cp.public_key));
        }
        let sig_bytes: [u8; 64] = hex::decode(&cp.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("signature is not 64 hex bytes")?;
        key.verify(
            &Checkpoint::signed_bytes(&cp.stream, cp.sequence, &cp.head_hash),
            &Signature::from_bytes(&sig_bytes),
        )
        .map_err(|_| "signature does not verify".to_string())
    }

    pub fn finish(self) -> Result<Verified, Break> {
        if let Some(first) = self.resumed_at {
            if let Some(cp) = self.pending.iter().find(|cp| cp.sequence < first) {
                return Err(Break {
                    seq: cp.sequence,
                    kind: BreakKind::AgedOut { first },
                });
            }
            if self.verified_checkpoints == 0 {
                return Err(Break {
                    seq: first,
                    kind: BreakKind::Unanchored,
                });
            }
        }
        if let Some(cp) = self.pending.iter().min_by_key(|cp| cp.sequence) {
            return Err(Break {
                seq: cp.sequence,
                kind: BreakKind::Truncated {
                    last: self.last_seq,
                },
            });
        }
        Ok(Verified {
            events: self.events,
            last_seq: self.last_seq,
            head: self.head,
            checkpoints: self.verified_checkpoints,
        })
    }
}

/// Signs a checkpoint of the chain head at `sequence`.
pub fn sign_checkpoint(
    key: &SigningKey,
    stream: &str,
    sequence: u64,
    head: &ChainHash,
) -> Checkpoint {
    let head_hash = head.to_hex();
    let signature = key.sign(&Checkpoint::signed_bytes(stream, sequence, &head_hash));
    Checkpoint {
        stream: stream.to_string(),
        sequence,
        head_hash,
        public_key: hex::encode(key.verifying_key().as_bytes()),
        signature: hex::encode(signature.to_bytes()),
    }
}
