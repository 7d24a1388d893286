//! The per-guardian DKG state machine: `start` → [`DkgRound1::round2`] →
//! [`DkgRound2::finalize`], over `frost-secp256k1-tr`'s `keys::dkg`.
//!
//! - Round 1: each guardian broadcasts its [`round1::Package`] (commitment + proof
//!   of knowledge).
//! - Round 2: each guardian checks every other guardian's proof, broadcasts an
//!   [`Echo`] (a digest of every round-1 package it received, its own included)
//!   and sends each other guardian its round-2 package **sealed** to that
//!   guardian's X25519 key, bound to (ceremony, sender, recipient).
//! - Finalize: every echo must equal this guardian's own: a guardian that sent
//!   different round-1 packages to different peers (equivocation) is named. Then
//!   the sealed packages are opened and the shares verified (a bad share names its
//!   sender), and the output carries a transcript hash that every honest guardian
//!   computes identically (it commits to the roster, the round-1 broadcast and the
//!   resulting group key and verifying shares).
//!
//! The resulting group key is already BIP-341-tweaked by the ciphersuite (see
//! `address`): sign with `sign_with_tweak(.., None)`.

use std::collections::BTreeMap;
use std::fmt;

use frost_secp256k1_tr::keys::dkg::{self, round1, round2};
use frost_secp256k1_tr::keys::{KeyPackage, PublicKeyPackage};
use frost_secp256k1_tr::{Error as FrostError, Identifier};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::conv::put;
use crate::identity::{GuardianKeys, GuardianPublic};
use crate::seal::{SealError, Sealed};

const PURPOSE_ROUND2: &str = "dkg-round2";

/// The roster of a ceremony: its id, the threshold and the participating guardians
/// with their FROST identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ceremony {
    pub id: String,
    pub min_signers: u16,
    pub members: BTreeMap<Identifier, GuardianPublic>,
}

impl Ceremony {
    /// A roster from `(index, guardian)` pairs; indexes are the FROST identifiers
    /// (non-zero, unique), guardian ids must be unique too.
    pub fn new(
        id: &str,
        min_signers: u16,
        members: impl IntoIterator<Item = (u16, GuardianPublic)>,
    ) -> Result<Self, DkgError> {
        let mut map = BTreeMap::new();
        for (index, g) in members {
            let ident = Identifier::try_from(index)
                .map_err(|_| DkgError::InvalidParameters(format!("identifier {index} is zero")))?;
            if map.values().any(|m: &GuardianPublic| m.id == g.id) {
                return Err(DkgError::InvalidParameters(format!(
                    "guardian {:?} listed twice",
                    g.id
                )));
            }
            if map.insert(ident, g).is_some() {
                return Err(DkgError::InvalidParameters(format!(
                    "identifier {index} used twice"
                )));
            }
        }
        let n = map.len();
        if min_signers < 2 || usize::from(min_signers) > n {
            return Err(DkgError::InvalidParameters(format!(
                "threshold {min_signers} of {n} guardians (needs 2 <= threshold <= guardians)"
            )));
        }
        Ok(Ceremony {
            id: id.to_owned(),
            min_signers,
            members: map,
        })
    }

    pub fn max_signers(&self) -> u16 {
        u16::try_from(self.members.len()).unwrap_or(u16::MAX)
    }

    /// The guardian id behind a FROST identifier (or the identifier in hex).
    pub fn name(&self, id: &Identifier) -> String {
        self.members
            .get(id)
            .map(|g| g.id.clone())
            .unwrap_or_else(|| format!("identifier {}", hex::encode(id.serialize())))
    }

    /// The FROST identifier of guardian `guardian_id`.
    pub fn identifier_of(&self, guardian_id: &str) -> Option<Identifier> {
        self.members
            .iter()
            .find(|(_, g)| g.id == guardian_id)
            .map(|(i, _)| *i)
    }

    fn me(&self, keys: &GuardianKeys) -> Result<Identifier, DkgError> {
        let id = self
            .identifier_of(keys.id())
            .ok_or_else(|| DkgError::NotAMember(keys.id().to_owned()))?;
        if self.members.get(&id) != Some(&keys.public()) {
            return Err(DkgError::IdentityMismatch(keys.id().to_owned()));
        }
        Ok(id)
    }

    fn others(&self, me: &Identifier) -> impl Iterator<Item = &Identifier> {
        self.members.keys().filter(move |i| *i != me)
    }

    /// Checks that `received` has exactly one entry from every other member.
    fn check_senders<T>(
        &self,
        me: &Identifier,
        received: &BTreeMap<Identifier, T>,
        what: &'static str,
    ) -> Result<(), DkgError> {
        if let Some(stranger) = received
            .keys()
            .find(|i| *i == me || !self.members.contains_key(i))
        {
            return Err(DkgError::UnexpectedSender {
                sender: self.name(stranger),
                what,
            });
        }
        if let Some(missing) = self.others(me).find(|i| !received.contains_key(i)) {
            return Err(DkgError::Missing {
                from: self.name(missing),
                what,
            });
        }
        Ok(())
    }
}

/// Why a DKG step failed; participants are named by guardian id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DkgError {
    #[error("invalid ceremony parameters: {0}")]
    InvalidParameters(String),
    #[error("guardian {0:?} is not a member of this ceremony")]
    NotAMember(String),
    #[error("guardian {0:?}'s keys do not match its roster entry")]
    IdentityMismatch(String),
    #[error("{what} from {sender}, who is not another member of this ceremony")]
    UnexpectedSender { sender: String, what: &'static str },
    #[error("no {what} from {from}")]
    Missing { from: String, what: &'static str },
    #[error("invalid proof of knowledge in the round-1 package of {participant}")]
    InvalidProofOfKnowledge { participant: String },
    #[error(
        "equivocation: {reported_by} received a different round-1 package from {sender} than this guardian did"
    )]
    Equivocation { sender: String, reported_by: String },
    #[error("echo mismatch: {participant} echoed a different set of round-1 packages")]
    EchoMismatch { participant: String },
    #[error("round-2 package from {sender} does not open: {reason}")]
    Sealed { sender: String, reason: SealError },
    #[error("malformed {what} from {sender}")]
    Malformed { sender: String, what: &'static str },
    #[error("the secret share sent by {sender} does not match its commitment")]
    InvalidShare { sender: String },
    #[error("DKG failed: {0}")]
    Frost(String),
}

/// A digest of every round-1 package a guardian received (its own included),
/// broadcast in round 2 so that equivocation in round 1 is caught.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub digests: BTreeMap<Identifier, [u8; 32]>,
}

impl Echo {
    /// Canonical encoding: per entry, the 32-byte identifier then the 32-byte digest.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.digests.len() * 64);
        for (id, d) in &self.digests {
            out.extend_from_slice(&id.serialize());
            out.extend_from_slice(d);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Echo> {
        if !bytes.len().is_multiple_of(64) {
            return None;
        }
        let mut digests = BTreeMap::new();
        for chunk in bytes.chunks_exact(64) {
            let id = Identifier::deserialize(&chunk[..32]).ok()?;
            let d: [u8; 32] = chunk[32..].try_into().ok()?;
            if digests.insert(id, d).is_some() {
                return None;
            }
        }
        Some(Echo { digests })
    }

    fn hash(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"custos-dkg-echo-v1")
            .chain_update(self.to_bytes())
            .finalize()
            .into()
    }
}

fn package_digest(ceremony_id: &str, pkg: &round1::Package) -> Result<[u8; 32], DkgError> {
    let bytes = pkg
        .serialize()
        .map_err(|e| DkgError::Frost(format!("serialize round-1 package: {e}")))?;
    let mut b = Vec::new();
    put(&mut b, b"custos-dkg-round1-v1");
    put(&mut b, ceremony_id.as_bytes());
    put(&mut b, &bytes);
    Ok(Sha256::digest(&b).into())
}

/// A guardian between round 1 and round 2. Holds its secret polynomial in memory
/// (frost's secret package zeroizes on drop); not `Clone`.
pub struct DkgRound1 {
    ceremony: Ceremony,
    me: Identifier,
    secret: round1::SecretPackage,
    own: round1::Package,
}

impl fmt::Debug for DkgRound1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkgRound1")
            .field("ceremony", &self.ceremony.id)
            .field("me", &self.ceremony.name(&self.me))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Round 1: draws this guardian's polynomial and returns the package to broadcast.
pub fn start(
    ceremony: Ceremony,
    keys: &GuardianKeys,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(DkgRound1, round1::Package), DkgError> {
    let me = ceremony.me(keys)?;
    let (secret, own) = dkg::part1(me, ceremony.max_signers(), ceremony.min_signers, rng)
        .map_err(|e| DkgError::InvalidParameters(e.to_string()))?;
    Ok((
        DkgRound1 {
            ceremony,
            me,
            secret,
            own: own.clone(),
        },
        own,
    ))
}

/// Round-2 output: the echo to broadcast and one sealed package per other member.
pub type Round2Out = (DkgRound2, Echo, BTreeMap<Identifier, Sealed>);

impl DkgRound1 {
    /// Round 2: takes every other member's round-1 package (as received, already
    /// authenticated by the envelope), checks their proofs, and returns the echo to
    /// broadcast and the sealed round-2 packages, keyed by recipient.
    pub fn round2(
        self,
        received: &BTreeMap<Identifier, round1::Package>,
        keys: &GuardianKeys,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Round2Out, DkgError> {
        let c = &self.ceremony;
        c.check_senders(&self.me, received, "round-1 package")?;
        let mut digests = BTreeMap::new();
        digests.insert(self.me, package_digest(&c.id, &self.own)?);
        for (id, pkg) in received {
            digests.insert(*id, package_digest(&c.id, pkg)?);
        }
        let (secret, packages) = dkg::part2(self.secret, received).map_err(|e| match e {
            FrostError::InvalidProofOfKnowledge { culprit } => DkgError::InvalidProofOfKnowledge {
                participant: c.name(&culprit),
            },
            other => DkgError::Frost(other.to_string()),
        })?;
        let mut sealed = BTreeMap::new();
        for (rid, pkg) in packages {
            let recipient = c
                .members
                .get(&rid)
                .ok_or_else(|| DkgError::UnexpectedSender {
                    sender: c.name(&rid),
                    what: "round-2 recipient",
                })?;
            let bytes = zeroize::Zeroizing::new(
                pkg.serialize()
                    .map_err(|e| DkgError::Frost(format!("serialize round-2 package: {e}")))?,
            );
            let s = keys
                .seal_to(recipient, &bytes, &c.id, PURPOSE_ROUND2, rng)
                .map_err(|reason| DkgError::Sealed {
                    sender: keys.id().to_owned(),
                    reason,
                })?;
            sealed.insert(rid, s);
        }
        let echo = Echo { digests };
        Ok((
            DkgRound2 {
                ceremony: self.ceremony,
                me: self.me,
                secret,
                round1: received.clone(),
                echo: echo.clone(),
            },
            echo,
            sealed,
        ))
    }
}

/// A guardian between round 2 and the end. Not `Clone`.
pub struct DkgRound2 {
    ceremony: Ceremony,
    me: Identifier,
    secret: round2::SecretPackage,
    round1: BTreeMap<Identifier, round1::Package>,
    echo: Echo,
}

impl fmt::Debug for DkgRound2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkgRound2")
            .field("ceremony", &self.ceremony.id)
            .field("me", &self.ceremony.name(&self.me))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What a DKG gives a guardian.
pub struct DkgOutput {
    pub key_package: KeyPackage,
    pub public_key_package: PublicKeyPackage,
    /// Identical at every honest guardian: roster, round-1 broadcast, group key
    /// and verifying shares. Goes into `WALLET_CREATED`.
    pub transcript: [u8; 32],
}

impl fmt::Debug for DkgOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkgOutput")
            .field(
                "identifier",
                &hex::encode(self.key_package.identifier().serialize()),
            )
            .field("signing_share", &"<redacted>")
            .field("transcript", &hex::encode(self.transcript))
            .finish()
    }
}

impl DkgRound2 {
    /// Finalize: checks every other member's echo against this guardian's own,
    /// opens the round-2 packages sealed to this guardian and verifies them.
    pub fn finalize(
        self,
        echoes: &BTreeMap<Identifier, Echo>,
        sealed: &BTreeMap<Identifier, Sealed>,
        keys: &GuardianKeys,
    ) -> Result<DkgOutput, DkgError> {
        let c = &self.ceremony;
        c.check_senders(&self.me, echoes, "echo")?;
        for (from, echo) in echoes {
            if echo.digests.keys().ne(self.echo.digests.keys()) {
                return Err(DkgError::EchoMismatch {
                    participant: c.name(from),
                });
            }
            for (sender, digest) in &echo.digests {
                if self.echo.digests.get(sender) != Some(digest) {
                    return Err(DkgError::Equivocation {
                        sender: c.name(sender),
                        reported_by: c.name(from),
                    });
                }
            }
        }
        c.check_senders(&self.me, sealed, "round-2 package")?;
        let mut round2 = BTreeMap::new();
        for (from, s) in sealed {
            let sender = c.name(from);
            let plain = keys
                .open(s, &c.id, &sender, PURPOSE_ROUND2)
                .map_err(|reason| DkgError::Sealed {
                    sender: sender.clone(),
                    reason,
                })?;
            let pkg = round2::Package::deserialize(&plain).map_err(|_| DkgError::Malformed {
                sender,
                what: "round-2 package",
            })?;
            round2.insert(*from, pkg);
        }
        let (key_package, public_key_package) = dkg::part3(&self.secret, &self.round1, &round2)
            .map_err(|e| match e {
                FrostError::InvalidSecretShare {
                    culprit: Some(culprit),
                } => DkgError::InvalidShare {
                    sender: c.name(&culprit),
                },
                other => DkgError::Frost(other.to_string()),
            })?;
        let transcript = transcript(c, &self.echo, &public_key_package)?;
        Ok(DkgOutput {
            key_package,
            public_key_package,
            transcript,
        })
    }
}

fn transcript(c: &Ceremony, echo: &Echo, pkp: &PublicKeyPackage) -> Result<[u8; 32], DkgError> {
    let ser = |e: FrostError| DkgError::Frost(format!("serialize public key: {e}"));
    let mut b = Vec::new();
    put(&mut b, b"custos-dkg-transcript-v1");
    put(&mut b, c.id.as_bytes());
    b.extend_from_slice(&c.min_signers.to_be_bytes());
    for (id, g) in &c.members {
        put(&mut b, &id.serialize());
        put(&mut b, g.id.as_bytes());
        put(&mut b, &g.signing_key);
        put(&mut b, &g.encryption_key);
    }
    put(&mut b, &echo.hash());
    put(&mut b, &pkp.verifying_key().serialize().map_err(ser)?);
    for (id, share) in pkp.verifying_shares() {
        put(&mut b, &id.serialize());
        put(&mut b, &share.serialize().map_err(ser)?);
    }
    Ok(Sha256::digest(&b).into())
}
