//! Guardian-side signing sessions and coordinator-side aggregation.
//!
//! A guardian commits in round 1 ([`round1`]) and gets a [`SigningSession`] that
//! holds its nonces in memory only: not `Clone`, not serializable, `Debug` redacted,
//! zeroized on drop. Round 2 ([`round2`]) consumes the session and signs **only** a
//! signing package whose message equals the [`Sighash`] the guardian recomputed
//! itself; anything else is refused. [`Signer`] keeps the open sessions of one
//! guardian and the ids of consumed ones, so a redelivered or replayed request for
//! a consumed session is refused (the guardian persists those ids).
//!
//! Signing and aggregation use key packages with the Taproot tweak (BIP-341, no
//! script tree) applied once ([`TweakedKey`], [`AggregationKey`]), as
//! `sign_with_tweak(.., None)` would each time: the signature verifies under the
//! Taproot output key (BIP-340), see [`crate::address`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use frost_secp256k1_tr::keys::{KeyPackage, PublicKeyPackage, Tweak};
use frost_secp256k1_tr::round1::{SigningCommitments, SigningNonces};
use frost_secp256k1_tr::round2::SignatureShare;
use frost_secp256k1_tr::{Error as FrostError, Identifier, SigningPackage};
use rand_core::{CryptoRng, RngCore};

pub use crate::taproot::Sighash;

/// Why a guardian refused to sign, or a coordinator could not aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error(
        "refused: the signing package's message {found} is not the sighash this guardian recomputed ({expected})"
    )]
    MessageMismatch { expected: String, found: String },
    #[error("refused: the signing package has no commitment for this guardian")]
    MissingCommitment,
    #[error(
        "refused: the signing package carries a different commitment for this guardian than it made"
    )]
    CommitmentMismatch,
    #[error("refused: {signers} signers in the package, the threshold is {threshold}")]
    TooFewSigners { signers: usize, threshold: u16 },
    #[error("refused: session {0:?} was made with another key share")]
    WrongKey(String),
    #[error("refused: session {0:?} was already consumed (its nonces are gone)")]
    SessionConsumed(String),
    #[error("refused: session id {0:?} already used")]
    SessionReused(String),
    #[error("unknown signing session {0:?}")]
    UnknownSession(String),
    #[error("signing failed: {0}")]
    Frost(String),
}

/// One guardian's round-1 state for one signing session.
pub struct SigningSession {
    session_id: String,
    identifier: Identifier,
    nonces: SigningNonces,
    commitments: SigningCommitments,
}

impl fmt::Debug for SigningSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningSession")
            .field("session_id", &self.session_id)
            .field("nonces", &"<redacted>")
            .finish()
    }
}

impl SigningSession {
    fn from_preprocessed(session_id: &str, pre: Preprocessed) -> Self {
        let Preprocessed {
            identifier,
            nonces,
            commitments,
        } = pre;
        SigningSession {
            session_id: session_id.to_owned(),
            identifier,
            nonces,
            commitments,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    pub fn commitments(&self) -> &SigningCommitments {
        &self.commitments
    }
}

/// Round 1: fresh nonces for `session_id`; the commitments go to the coordinator.
pub fn round1(
    session_id: &str,
    key_package: &KeyPackage,
    rng: &mut (impl RngCore + CryptoRng),
) -> (SigningSession, SigningCommitments) {
    let session = SigningSession::from_preprocessed(session_id, preprocess(key_package, rng));
    let commitments = session.commitments;
    (session, commitments)
}

/// Nonces drawn before any request needs them (FROST preprocessing), so that a
/// commitment costs no curve arithmetic on the request's path. Memory only:
/// not `Clone`, not serializable, `Debug` redacted, zeroized on drop; consumed
/// by the one session [`Signer::commit_preprocessed`] opens with them.
pub struct Preprocessed {
    identifier: Identifier,
    nonces: SigningNonces,
    commitments: SigningCommitments,
}

impl fmt::Debug for Preprocessed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preprocessed")
            .field("nonces", &"<redacted>")
            .finish()
    }
}

/// Fresh nonces for a later session of the holder of `key_package`.
pub fn preprocess(key_package: &KeyPackage, rng: &mut (impl RngCore + CryptoRng)) -> Preprocessed {
    let (nonces, commitments) =
        frost_secp256k1_tr::round1::commit(key_package.signing_share(), rng);
    Preprocessed {
        identifier: *key_package.identifier(),
        nonces,
        commitments,
    }
}

/// A guardian's key package with the Taproot tweak (BIP-341, no script tree)
/// applied: what round 2 signs with. Made once per share; the tweak costs
/// curve arithmetic. Holds the (tweaked) signing share: `Debug` shows only
/// the identifier.
pub struct TweakedKey(KeyPackage);

impl TweakedKey {
    pub fn new(key_package: &KeyPackage) -> Self {
        TweakedKey(key_package.clone().tweak(None::<&[u8]>))
    }
}

impl fmt::Debug for TweakedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TweakedKey")
            .field("identifier", self.0.identifier())
            .finish_non_exhaustive()
    }
}

/// Round 2: signs `signing_package` iff its message is `my_sighash`, it carries this
/// guardian's own commitment and at least the threshold of signers. Consumes the
/// session whatever the outcome: its nonces are dropped (and zeroized).
pub fn round2(
    session: SigningSession,
    key: &TweakedKey,
    signing_package: &SigningPackage,
    my_sighash: &Sighash,
) -> Result<SignatureShare, SignError> {
    let key_package = &key.0;
    if *key_package.identifier() != session.identifier {
        return Err(SignError::WrongKey(session.session_id.clone()));
    }
    if signing_package.message().as_slice() != my_sighash.as_bytes() {
        return Err(SignError::MessageMismatch {
            expected: hex::encode(my_sighash.as_bytes()),
            found: hex::encode(signing_package.message()),
        });
    }
    match signing_package
        .signing_commitments()
        .get(&session.identifier)
    {
        None => return Err(SignError::MissingCommitment),
        Some(c) if *c != session.commitments => return Err(SignError::CommitmentMismatch),
        Some(_) => {}
    }
    let signers = signing_package.signing_commitments().len();
    let threshold = *key_package.min_signers();
    if signers < usize::from(threshold) {
        return Err(SignError::TooFewSigners { signers, threshold });
    }
    frost_secp256k1_tr::round2::sign(signing_package, &session.nonces, key_package)
        .map_err(|e| SignError::Frost(e.to_string()))
}

/// One guardian's signing sessions: open ones (nonces in memory) and consumed ids.
#[derive(Debug, Default)]
pub struct Signer {
    open: BTreeMap<String, SigningSession>,
    consumed: BTreeSet<String>,
}

impl Signer {
    pub fn new() -> Self {
        Signer::default()
    }

    /// Marks sessions consumed before this process started (from the guardian's
    /// persisted markers).
    pub fn restore_consumed(&mut self, ids: impl IntoIterator<Item = String>) {
        self.consumed.extend(ids);
    }

    /// Drops a session's nonces unused (a refused request): it can never sign.
    pub fn discard(&mut self, session_id: &str) {
        self.open.remove(session_id);
        self.consumed.insert(session_id.to_owned());
    }

    pub fn is_consumed(&self, session_id: &str) -> bool {
        self.consumed.contains(session_id)
    }

    /// Round 1 for a new session id; an id seen before is refused.
    pub fn commit(
        &mut self,
        session_id: &str,
        key_package: &KeyPackage,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<SigningCommitments, SignError> {
        self.commit_preprocessed(session_id, preprocess(key_package, rng))
    }

    /// Round 1 for a new session id with nonces drawn beforehand ([`preprocess`]);
    /// an id seen before is refused, and the nonces are dropped either way.
    pub fn commit_preprocessed(
        &mut self,
        session_id: &str,
        pre: Preprocessed,
    ) -> Result<SigningCommitments, SignError> {
        if self.consumed.contains(session_id) || self.open.contains_key(session_id) {
            return Err(SignError::SessionReused(session_id.to_owned()));
        }
        let session = SigningSession::from_preprocessed(session_id, pre);
        let commitments = session.commitments;
        self.open.insert(session_id.to_owned(), session);
        Ok(commitments)
    }

    /// Round 2 for an open session; the session is consumed first, whatever the
    /// outcome, so a second request for it is refused.
    pub fn sign(
        &mut self,
        session_id: &str,
        key: &TweakedKey,
        signing_package: &SigningPackage,
        my_sighash: &Sighash,
    ) -> Result<SignatureShare, SignError> {
        let Some(session) = self.open.remove(session_id) else {
            return Err(if self.consumed.contains(session_id) {
                SignError::SessionConsumed(session_id.to_owned())
            } else {
                SignError::UnknownSession(session_id.to_owned())
            });
        };
        self.consumed.insert(session_id.to_owned());
        round2(session, key, signing_package, my_sighash)
    }
}

/// Why aggregation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("invalid signature share from {}", culprits.iter().map(|c| hex::encode(c.serialize())).collect::<Vec<_>>().join(", "))]
    InvalidShares { culprits: Vec<Identifier> },
    #[error("aggregation failed: {0}")]
    Frost(String),
}

/// Coordinator: the signing package for `sighash` over the chosen commitments.
pub fn signing_package(
    commitments: BTreeMap<Identifier, SigningCommitments>,
    sighash: &Sighash,
) -> SigningPackage {
    SigningPackage::new(commitments, sighash.as_bytes())
}

/// A wallet's public key package with the Taproot tweak (BIP-341, no script
/// tree) applied: what the coordinator aggregates with, and the x-only output
/// key it is of. Made once per package; the tweak costs curve arithmetic for
/// the key and every verifying share.
#[derive(Debug, Clone)]
pub struct AggregationKey {
    package: PublicKeyPackage,
    output_key: [u8; 32],
}

impl AggregationKey {
    pub fn new(public_key_package: &PublicKeyPackage) -> Self {
        let package = public_key_package.clone().tweak(None::<&[u8]>);
        // The x coordinate of the compressed key: the Taproot output key.
        let output_key = package
            .verifying_key()
            .serialize()
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k.get(1..)?).ok())
            .unwrap_or([0; 32]);
        AggregationKey {
            package,
            output_key,
        }
    }
}

/// A signature FROST aggregated and verified as BIP-340 under an
/// [`AggregationKey`]'s output key, on the package's message. Only
/// [`aggregate`] makes one, so a transaction's `finalize` need not verify it
/// again: it checks that the key is the spent output's and the message the
/// input's sighash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregated {
    signature: [u8; 64],
    output_key: [u8; 32],
    message: Vec<u8>,
}

impl Aggregated {
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    pub(crate) fn output_key(&self) -> &[u8; 32] {
        &self.output_key
    }

    pub(crate) fn message(&self) -> &[u8] {
        &self.message
    }
}

/// Coordinator: aggregates the shares under the tweaked key and names any
/// guardian whose share is invalid. FROST verifies the aggregate signature
/// under the tweaked group key (BIP-340 under its x-only output key, which
/// `custody/tests/spend.rs` checks against the consensus library).
pub fn aggregate(
    signing_package: &SigningPackage,
    shares: &BTreeMap<Identifier, SignatureShare>,
    key: &AggregationKey,
) -> Result<Aggregated, AggregateError> {
    let sig = frost_secp256k1_tr::aggregate(signing_package, shares, &key.package).map_err(
        |e| match e {
            FrostError::InvalidSignatureShare { culprits } => {
                AggregateError::InvalidShares { culprits }
            }
            other => AggregateError::Frost(other.to_string()),
        },
    )?;
    let signature = sig
        .serialize()
        .map_err(|e| AggregateError::Frost(e.to_string()))?
        .try_into()
        .map_err(|_| AggregateError::Frost("signature is not 64 bytes".into()))?;
    Ok(Aggregated {
        signature,
        output_key: key.output_key,
        message: signing_package.message().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    /// Nonces drawn ahead sign exactly one session, under any id not seen before.
    #[test]
    fn preprocessed_nonces_sign_one_session() {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([3; 32]);
        let group = crate::sim::run_dkg("pre", 2, 3, &mut rng).expect("dkg");
        let public = group.public_key_package().expect("public");
        let (k1, k2) = (
            group.key_package(1).expect("k1"),
            group.key_package(2).expect("k2"),
        );
        let sighash = Sighash::from_recomputed([5; 32]);
        let (mut g1, mut g2) = (Signer::new(), Signer::new());
        let c1 = g1
            .commit_preprocessed("s", preprocess(k1, &mut rng))
            .expect("commit");
        let c2 = g2.commit("s", k2, &mut rng).expect("commit");
        assert_eq!(
            g1.commit_preprocessed("s", preprocess(k1, &mut rng)),
            Err(SignError::SessionReused("s".into()))
        );
        let package = signing_package(
            [(*k1.identifier(), c1), (*k2.identifier(), c2)].into(),
            &sighash,
        );
        let shares = [
            (
                *k1.identifier(),
                g1.sign("s", &TweakedKey::new(k1), &package, &sighash)
                    .expect("share"),
            ),
            (
                *k2.identifier(),
                g2.sign("s", &TweakedKey::new(k2), &package, &sighash)
                    .expect("share"),
            ),
        ]
        .into();
        aggregate(&package, &shares, &AggregationKey::new(public)).expect("a valid signature");
        assert_eq!(
            g1.sign("s", &TweakedKey::new(k1), &package, &sighash),
            Err(SignError::SessionConsumed("s".into()))
        );
        assert!(format!("{:?}", preprocess(k1, &mut rng)).contains("redacted"));
        let tweaked = format!("{:?}", TweakedKey::new(k1));
        assert!(!tweaked.contains("signing_share"), "{tweaked}");
    }
}
