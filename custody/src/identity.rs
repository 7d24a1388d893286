//! Guardian identities and the signed envelope of every ceremony message.
//!
//! Each guardian has a long-term ed25519 signing key (authenticates what it says)
//! and a long-term X25519 key (receives sealed payloads); both public halves are
//! registered in the directory as a [`GuardianPublic`]. Every ceremony message is a
//! [`SignedMessage`]; a receiver's [`Inbox`] accepts it only from a registered
//! sender, with a valid signature, for this ceremony, addressed to everyone or to
//! this guardian, for the current or a later round, and at most once per
//! (sender, round).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::conv::put;
use crate::seal::{self, SealContext, SealError, Sealed};

const DOMAIN: &[u8] = b"custos-ceremony-msg-v1";

/// A guardian's public identity, as registered in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardianPublic {
    /// The guardian's id (e.g. `g1`).
    pub id: String,
    /// ed25519 public key that verifies its ceremony messages.
    pub signing_key: [u8; 32],
    /// X25519 public key that sealed payloads are addressed to.
    pub encryption_key: [u8; 32],
}

/// A guardian's long-term secret keys. Not `Clone`; `Debug` shows only public data;
/// both keys zeroize on drop.
pub struct GuardianKeys {
    id: String,
    signing: SigningKey,
    encryption: StaticSecret,
}

impl fmt::Debug for GuardianKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardianKeys")
            .field("id", &self.id)
            .field(
                "signing_key",
                &hex::encode(self.signing.verifying_key().as_bytes()),
            )
            .field("secrets", &"<redacted>")
            .finish()
    }
}

impl GuardianKeys {
    /// Draws fresh keys for guardian `id`.
    pub fn generate(id: &str, rng: &mut (impl RngCore + CryptoRng)) -> Self {
        GuardianKeys {
            id: id.to_owned(),
            signing: SigningKey::generate(rng),
            encryption: StaticSecret::random_from_rng(rng),
        }
    }

    /// Rebuilds keys from their 32-byte secrets (as loaded from the guardian's store).
    pub fn from_secrets(id: &str, signing: &[u8; 32], encryption: &[u8; 32]) -> Self {
        GuardianKeys {
            id: id.to_owned(),
            signing: SigningKey::from_bytes(signing),
            encryption: StaticSecret::from(*encryption),
        }
    }

    /// The 32-byte secrets, for the guardian's encrypted store.
    pub fn to_secrets(&self) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        (
            Zeroizing::new(self.signing.to_bytes()),
            Zeroizing::new(self.encryption.to_bytes()),
        )
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn public(&self) -> GuardianPublic {
        GuardianPublic {
            id: self.id.clone(),
            signing_key: self.signing.verifying_key().to_bytes(),
            encryption_key: PublicKey::from(&self.encryption).to_bytes(),
        }
    }

    /// Signs a ceremony message; `recipient` is `None` for a broadcast.
    pub fn sign_message(
        &self,
        ceremony_id: &str,
        recipient: Option<&str>,
        round: u32,
        payload: Vec<u8>,
    ) -> SignedMessage {
        let bytes = signing_bytes(ceremony_id, &self.id, recipient, round, &payload);
        SignedMessage {
            ceremony_id: ceremony_id.to_owned(),
            sender: self.id.clone(),
            recipient: recipient.map(str::to_owned),
            round,
            payload,
            signature: self.signing.sign(&bytes).to_bytes().to_vec(),
        }
    }

    /// Opens a payload sealed for this guardian by `sender` in `ceremony_id`.
    pub fn open(
        &self,
        sealed: &Sealed,
        ceremony_id: &str,
        sender: &str,
        purpose: &str,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        seal::open(
            &self.encryption,
            sealed,
            &SealContext {
                ceremony_id,
                sender,
                recipient: &self.id,
                purpose,
            },
        )
    }

    /// Seals `plaintext` from this guardian to `recipient` in `ceremony_id`.
    pub fn seal_to(
        &self,
        recipient: &GuardianPublic,
        plaintext: &[u8],
        ceremony_id: &str,
        purpose: &str,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Sealed, SealError> {
        seal::seal_for(
            &recipient.encryption_key,
            plaintext,
            &SealContext {
                ceremony_id,
                sender: &self.id,
                recipient: &recipient.id,
                purpose,
            },
            rng,
        )
    }
}

fn signing_bytes(
    ceremony_id: &str,
    sender: &str,
    recipient: Option<&str>,
    round: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + payload.len());
    put(&mut b, DOMAIN);
    put(&mut b, ceremony_id.as_bytes());
    put(&mut b, sender.as_bytes());
    match recipient {
        None => b.push(0),
        Some(r) => {
            b.push(1);
            put(&mut b, r.as_bytes());
        }
    }
    b.extend_from_slice(&round.to_be_bytes());
    put(&mut b, payload);
    b
}

/// A ceremony message signed by its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMessage {
    pub ceremony_id: String,
    pub sender: String,
    /// `None` for a broadcast, else the one guardian it is addressed to.
    pub recipient: Option<String>,
    pub round: u32,
    pub payload: Vec<u8>,
    /// ed25519 signature (64 bytes) over all the fields above.
    pub signature: Vec<u8>,
}

/// Why a ceremony message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message from unknown sender {0:?}")]
    UnknownSender(String),
    #[error("bad signature on a message claiming to be from {sender:?}")]
    BadSignature { sender: String },
    #[error("message is for ceremony {found:?}, this is ceremony {expected:?}")]
    WrongCeremony { expected: String, found: String },
    #[error("message from {sender:?} is addressed to {recipient:?}, not to this guardian")]
    NotForMe { sender: String, recipient: String },
    #[error("message from {sender:?} is for round {round}, an old round (now in round {current})")]
    StaleRound {
        sender: String,
        round: u32,
        current: u32,
    },
    #[error("replayed message: {sender:?} already sent its round {round} message")]
    Replay { sender: String, round: u32 },
    #[error("directory lists guardian {0:?} twice")]
    DuplicateGuardian(String),
    #[error("directory entry for {0:?} has an invalid ed25519 key")]
    InvalidDirectoryKey(String),
}

/// A receiver's view of one ceremony: who may speak, which round it is in, and
/// which (sender, round) messages it has already accepted.
#[derive(Debug)]
pub struct Inbox {
    ceremony_id: String,
    me: String,
    directory: BTreeMap<String, VerifyingKey>,
    round: u32,
    seen: BTreeSet<(String, u32)>,
}

impl Inbox {
    pub fn new(
        ceremony_id: &str,
        me: &str,
        directory: &[GuardianPublic],
    ) -> Result<Self, EnvelopeError> {
        let mut keys = BTreeMap::new();
        for g in directory {
            let vk = VerifyingKey::from_bytes(&g.signing_key)
                .map_err(|_| EnvelopeError::InvalidDirectoryKey(g.id.clone()))?;
            if keys.insert(g.id.clone(), vk).is_some() {
                return Err(EnvelopeError::DuplicateGuardian(g.id.clone()));
            }
        }
        Ok(Inbox {
            ceremony_id: ceremony_id.to_owned(),
            me: me.to_owned(),
            directory: keys,
            round: 1,
            seen: BTreeSet::new(),
        })
    }

    /// The round this guardian is in; messages of earlier rounds are refused.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Moves to `round` (never backwards).
    pub fn advance_to(&mut self, round: u32) {
        self.round = self.round.max(round);
    }

    /// Checks `msg` and returns its payload.
    pub fn accept<'m>(&mut self, msg: &'m SignedMessage) -> Result<&'m [u8], EnvelopeError> {
        let vk = self
            .directory
            .get(&msg.sender)
            .ok_or_else(|| EnvelopeError::UnknownSender(msg.sender.clone()))?;
        let bad_sig = || EnvelopeError::BadSignature {
            sender: msg.sender.clone(),
        };
        let sig = Signature::from_slice(&msg.signature).map_err(|_| bad_sig())?;
        let bytes = signing_bytes(
            &msg.ceremony_id,
            &msg.sender,
            msg.recipient.as_deref(),
            msg.round,
            &msg.payload,
        );
        vk.verify(&bytes, &sig).map_err(|_| bad_sig())?;
        if msg.ceremony_id != self.ceremony_id {
            return Err(EnvelopeError::WrongCeremony {
                expected: self.ceremony_id.clone(),
                found: msg.ceremony_id.clone(),
            });
        }
        if let Some(r) = &msg.recipient
            && *r != self.me
        {
            return Err(EnvelopeError::NotForMe {
                sender: msg.sender.clone(),
                recipient: r.clone(),
            });
        }
        if msg.round < self.round {
            return Err(EnvelopeError::StaleRound {
                sender: msg.sender.clone(),
                round: msg.round,
                current: self.round,
            });
        }
        if !self.seen.insert((msg.sender.clone(), msg.round)) {
            return Err(EnvelopeError::Replay {
                sender: msg.sender.clone(),
                round: msg.round,
            });
        }
        Ok(&msg.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn setup() -> (GuardianKeys, GuardianKeys, Inbox) {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let g1 = GuardianKeys::generate("g1", &mut rng);
        let g2 = GuardianKeys::generate("g2", &mut rng);
        let inbox = Inbox::new("cer-1", "g2", &[g1.public(), g2.public()]).unwrap();
        (g1, g2, inbox)
    }

    #[test]
    fn accepts_a_valid_message_once() {
        let (g1, _, mut inbox) = setup();
        let m = g1.sign_message("cer-1", None, 1, b"hello".to_vec());
        assert_eq!(inbox.accept(&m).unwrap(), b"hello");
        assert_eq!(
            inbox.accept(&m),
            Err(EnvelopeError::Replay {
                sender: "g1".into(),
                round: 1
            })
        );
    }

    #[test]
    fn rejects_unknown_sender_bad_signature_wrong_ceremony_and_misaddressed() {
        let (g1, _, mut inbox) = setup();
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let mallory = GuardianKeys::generate("g9", &mut rng);
        let m = mallory.sign_message("cer-1", None, 1, vec![1]);
        assert_eq!(
            inbox.accept(&m),
            Err(EnvelopeError::UnknownSender("g9".into()))
        );

        // An impostor signing as g1 with its own key.
        let impostor = GuardianKeys::generate("g1", &mut rng);
        let m = impostor.sign_message("cer-1", None, 1, vec![1]);
        assert_eq!(
            inbox.accept(&m),
            Err(EnvelopeError::BadSignature {
                sender: "g1".into()
            })
        );

        // Tampered payload.
        let mut m = g1.sign_message("cer-1", None, 1, vec![1]);
        m.payload[0] = 2;
        assert!(matches!(
            inbox.accept(&m),
            Err(EnvelopeError::BadSignature { .. })
        ));
        // Truncated signature.
        let mut m = g1.sign_message("cer-1", None, 1, vec![1]);
        m.signature.truncate(10);
        assert!(matches!(
            inbox.accept(&m),
            Err(EnvelopeError::BadSignature { .. })
        ));
        // Re-labelled ceremony id breaks the signature; a genuinely other ceremony is refused.
        let mut m = g1.sign_message("cer-0", None, 1, vec![1]);
        assert_eq!(
            inbox.accept(&m),
            Err(EnvelopeError::WrongCeremony {
                expected: "cer-1".into(),
                found: "cer-0".into()
            })
        );
        m.ceremony_id = "cer-1".into();
        assert!(matches!(
            inbox.accept(&m),
            Err(EnvelopeError::BadSignature { .. })
        ));
        // Addressed to someone else.
        let m = g1.sign_message("cer-1", Some("g3"), 1, vec![1]);
        assert!(matches!(
            inbox.accept(&m),
            Err(EnvelopeError::NotForMe { .. })
        ));
        let m = g1.sign_message("cer-1", Some("g2"), 1, vec![1]);
        assert!(inbox.accept(&m).is_ok());
    }

    #[test]
    fn rejects_replay_of_an_old_round() {
        let (g1, _, mut inbox) = setup();
        let old = g1.sign_message("cer-1", None, 1, vec![1]);
        inbox.advance_to(2);
        inbox.advance_to(1);
        assert_eq!(inbox.round(), 2);
        assert_eq!(
            inbox.accept(&old),
            Err(EnvelopeError::StaleRound {
                sender: "g1".into(),
                round: 1,
                current: 2
            })
        );
        assert!(
            inbox
                .accept(&g1.sign_message("cer-1", None, 2, vec![2]))
                .is_ok()
        );
    }

    #[test]
    fn debug_redacts_secrets_and_keys_round_trip() {
        let (g1, _, _) = setup();
        let (s, e) = g1.to_secrets();
        let dbg = format!("{g1:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&hex::encode(*s)));
        let back = GuardianKeys::from_secrets("g1", &s, &e);
        assert_eq!(back.public(), g1.public());
    }
}
