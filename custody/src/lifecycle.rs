//! Key lifecycle on the same group key (and so the same address):
//!
//! - **Rotation** ([`refresh_start`] → [`RefreshRound1::round2`] →
//!   [`RefreshRound2::finish`]): every member adds a fresh sharing of zero to its
//!   share (frost's `refresh_dkg_*`). Old shares no longer combine with new ones.
//! - **Removing a guardian**: the same refresh, run among the remaining members
//!   only; the removed identifier is no longer in the new public key package.
//!   What this does *not* promise: see `docs/threshold-change.md` ("Refresh").
//! - **Adding or replacing a guardian**, and **repairing a lost share**
//!   ([`repair_help`] → [`repair_combine`] → [`repair_finish`]): `t` helpers
//!   compute the share of an identifier (new or lost) without reconstructing the
//!   key (frost's repairable threshold scheme). For a new identifier its verifying
//!   share is added to the public key package; for a lost one it must match.
//!
//! Point-to-point values (refresh round-2 packages, repair deltas and sigmas) must
//! travel sealed: [`crate::identity::GuardianKeys::seal_to`] with the purposes below.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use frost_secp256k1_tr::keys::dkg::{round1, round2};
use frost_secp256k1_tr::keys::refresh;
use frost_secp256k1_tr::keys::repairable::{self, Delta, Sigma};
use frost_secp256k1_tr::keys::{KeyPackage, PublicKeyPackage};
use frost_secp256k1_tr::{Error as FrostError, Identifier, Secp256K1Sha256TR};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};

use crate::conv::put;

/// Seal purposes for lifecycle payloads.
pub const PURPOSE_REFRESH_ROUND2: &str = "refresh-round2";
pub const PURPOSE_REPAIR_DELTA: &str = "repair-delta";
pub const PURPOSE_REPAIR_SIGMA: &str = "repair-sigma";

fn hexid(id: &Identifier) -> String {
    hex::encode(id.serialize())
}

/// Why a lifecycle step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    #[error("identifier {} is not a participant of this refresh", hexid(.0))]
    NotAParticipant(Identifier),
    #[error("no {what} from {}", hexid(.from))]
    Missing {
        from: Identifier,
        what: &'static str,
    },
    #[error("{what} from {}, who is not another participant", hexid(.from))]
    Unexpected {
        from: Identifier,
        what: &'static str,
    },
    #[error("invalid proof of knowledge from {}", hexid(.0))]
    InvalidProofOfKnowledge(Identifier),
    #[error("invalid refreshing share from {}", hexid(.0))]
    InvalidShare(Identifier),
    #[error("the repaired share does not match the public verifying share of {}: a helper sent a bad value", hexid(.0))]
    RepairMismatch(Identifier),
    #[error("the group key changed: refusing the result")]
    GroupKeyChanged,
    #[error("lifecycle step failed: {0}")]
    Frost(String),
}

fn frost_err(e: FrostError) -> LifecycleError {
    match e {
        FrostError::InvalidProofOfKnowledge { culprit } => {
            LifecycleError::InvalidProofOfKnowledge(culprit)
        }
        FrostError::InvalidSecretShare {
            culprit: Some(culprit),
        } => LifecycleError::InvalidShare(culprit),
        other => LifecycleError::Frost(other.to_string()),
    }
}

fn check_from<T>(
    participants: &BTreeSet<Identifier>,
    me: &Identifier,
    got: &BTreeMap<Identifier, T>,
    what: &'static str,
) -> Result<(), LifecycleError> {
    if let Some(from) = got.keys().find(|i| *i == me || !participants.contains(i)) {
        return Err(LifecycleError::Unexpected { from: *from, what });
    }
    if let Some(from) = participants
        .iter()
        .find(|i| *i != me && !got.contains_key(i))
    {
        return Err(LifecycleError::Missing { from: *from, what });
    }
    Ok(())
}

/// A digest of a public key package (group key, threshold, verifying shares) that
/// every participant of a lifecycle ceremony computes and the workflow compares.
pub fn public_digest(pkp: &PublicKeyPackage) -> Result<[u8; 32], LifecycleError> {
    let ser = |e: FrostError| LifecycleError::Frost(e.to_string());
    let mut b = Vec::new();
    put(&mut b, b"custos-public-key-package-v1");
    put(&mut b, &pkp.verifying_key().serialize().map_err(ser)?);
    b.extend_from_slice(&pkp.min_signers().unwrap_or(0).to_be_bytes());
    for (id, v) in pkp.verifying_shares() {
        put(&mut b, &id.serialize());
        put(&mut b, &v.serialize().map_err(ser)?);
    }
    Ok(Sha256::digest(&b).into())
}

/// A member between refresh round 1 and round 2.
pub struct RefreshRound1 {
    participants: BTreeSet<Identifier>,
    me: Identifier,
    secret: round1::SecretPackage,
}

impl fmt::Debug for RefreshRound1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshRound1")
            .field("me", &hexid(&self.me))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Refresh round 1 among `participants` (all current members for a rotation, the
/// remaining ones to remove a guardian). The threshold stays `old`'s.
pub fn refresh_start(
    old: &PublicKeyPackage,
    participants: &BTreeSet<Identifier>,
    me: Identifier,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(RefreshRound1, round1::Package), LifecycleError> {
    let t = old
        .min_signers()
        .ok_or_else(|| LifecycleError::InvalidParameters("old package has no threshold".into()))?;
    if !participants.contains(&me) {
        return Err(LifecycleError::NotAParticipant(me));
    }
    if let Some(p) = participants
        .iter()
        .find(|p| !old.verifying_shares().contains_key(p))
    {
        return Err(LifecycleError::NotAParticipant(*p));
    }
    if participants.len() < usize::from(t) {
        return Err(LifecycleError::InvalidParameters(format!(
            "{} participants cannot keep a threshold of {t}",
            participants.len()
        )));
    }
    let n = u16::try_from(participants.len())
        .map_err(|_| LifecycleError::InvalidParameters("too many participants".into()))?;
    let (secret, pkg) = refresh::refresh_dkg_part1(me, n, t, &mut *rng).map_err(frost_err)?;
    Ok((
        RefreshRound1 {
            participants: participants.clone(),
            me,
            secret,
        },
        pkg,
    ))
}

/// A member between refresh round 2 and the end.
pub struct RefreshRound2 {
    participants: BTreeSet<Identifier>,
    me: Identifier,
    secret: round2::SecretPackage,
    round1: BTreeMap<Identifier, round1::Package>,
}

impl fmt::Debug for RefreshRound2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshRound2")
            .field("me", &hexid(&self.me))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl RefreshRound1 {
    /// Refresh round 2: the packages to send (sealed) to each other participant.
    pub fn round2(
        self,
        received: &BTreeMap<Identifier, round1::Package>,
    ) -> Result<(RefreshRound2, BTreeMap<Identifier, round2::Package>), LifecycleError> {
        check_from(
            &self.participants,
            &self.me,
            received,
            "refresh round-1 package",
        )?;
        let (secret, out) = refresh::refresh_dkg_part2(self.secret, received).map_err(frost_err)?;
        Ok((
            RefreshRound2 {
                participants: self.participants,
                me: self.me,
                secret,
                round1: received.clone(),
            },
            out,
        ))
    }
}

impl RefreshRound2 {
    /// Refresh end: the new key package and public key package. Refuses a result
    /// whose group key differs from the old one.
    pub fn finish(
        self,
        received: &BTreeMap<Identifier, round2::Package>,
        old_public: &PublicKeyPackage,
        old_key_package: &KeyPackage,
    ) -> Result<(KeyPackage, PublicKeyPackage), LifecycleError> {
        check_from(
            &self.participants,
            &self.me,
            received,
            "refresh round-2 package",
        )?;
        if *old_key_package.identifier() != self.me {
            return Err(LifecycleError::NotAParticipant(
                *old_key_package.identifier(),
            ));
        }
        let (kp, pkp) = refresh::refresh_dkg_shares(
            &self.secret,
            &self.round1,
            received,
            old_public.clone(),
            old_key_package.clone(),
        )
        .map_err(frost_err)?;
        if kp.verifying_key() != old_public.verifying_key()
            || pkp.verifying_key() != old_public.verifying_key()
        {
            return Err(LifecycleError::GroupKeyChanged);
        }
        Ok((kp, pkp))
    }
}

/// Repair step 1 (each helper): the deltas to send (sealed) to each helper, to
/// recover the share of `participant` (a lost identifier, or a new one).
pub fn repair_help(
    helpers: &[Identifier],
    key_package: &KeyPackage,
    participant: Identifier,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<BTreeMap<Identifier, Delta>, LifecycleError> {
    if helpers.len() < usize::from(*key_package.min_signers()) {
        return Err(LifecycleError::InvalidParameters(format!(
            "{} helpers, the threshold is {}",
            helpers.len(),
            key_package.min_signers()
        )));
    }
    if helpers.contains(&participant) {
        return Err(LifecycleError::InvalidParameters(
            "the participant being repaired cannot help".into(),
        ));
    }
    repairable::repair_share_part1::<Secp256K1Sha256TR, _>(helpers, key_package, rng, participant)
        .map_err(frost_err)
}

/// Repair step 2 (each helper): the sigma to send (sealed) to the participant,
/// from the deltas this helper received from all helpers (its own included).
pub fn repair_combine(deltas: &[Delta]) -> Sigma {
    repairable::repair_share_part2(deltas)
}

/// Repair step 3 (the participant): its key package and the public key package,
/// with its verifying share added if the identifier is new, or checked against the
/// recorded one if the share was lost.
pub fn repair_finish(
    sigmas: &[Sigma],
    identifier: Identifier,
    public: &PublicKeyPackage,
) -> Result<(KeyPackage, PublicKeyPackage), LifecycleError> {
    let t = public
        .min_signers()
        .ok_or_else(|| LifecycleError::InvalidParameters("package has no threshold".into()))?;
    if sigmas.len() < usize::from(t) {
        return Err(LifecycleError::InvalidParameters(format!(
            "{} sigmas, the threshold is {t}",
            sigmas.len()
        )));
    }
    let kp = repairable::repair_share_part3(sigmas, identifier, public).map_err(frost_err)?;
    let mut shares = public.verifying_shares().clone();
    match shares.get(&identifier) {
        Some(recorded) if recorded != kp.verifying_share() => {
            return Err(LifecycleError::RepairMismatch(identifier));
        }
        Some(_) => {}
        None => {
            shares.insert(identifier, *kp.verifying_share());
        }
    }
    let pkp = PublicKeyPackage::new(shares, *public.verifying_key(), Some(t));
    Ok((kp, pkp))
}

/// The public key package with `identifier`'s verifying share added (what every
/// other member records once a new guardian has been repaired in).
pub fn with_member(
    public: &PublicKeyPackage,
    identifier: Identifier,
    verifying_share: frost_secp256k1_tr::keys::VerifyingShare,
) -> PublicKeyPackage {
    let mut shares = public.verifying_shares().clone();
    shares.insert(identifier, verifying_share);
    PublicKeyPackage::new(shares, *public.verifying_key(), public.min_signers())
}
