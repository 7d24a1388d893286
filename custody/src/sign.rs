//! Guardian-side signing and coordinator-side aggregation.
//!
//! A guardian draws nonces ahead ([`preprocess`], FROST preprocessing) and
//! hands out only their commitments; [`Signer`] keeps the nonces in memory
//! (not `Clone`, not serializable, `Debug` redacted, zeroized on drop) until a
//! signing package names one of them. Taking them out for a package removes
//! them whatever follows, so each signs at most one package. [`round2`] signs
//! **only** a package whose message equals the [`Sighash`] the guardian
//! recomputed itself and that carries its own commitment and the threshold of
//! signers; anything else is refused.
//!
//! Signing and aggregation use key packages with the Taproot tweak (BIP-341, no
//! script tree) applied once ([`TweakedKey`], [`AggregationKey`]), as
//! `sign_with_tweak(.., None)` would each time: the signature verifies under the
//! Taproot output key (BIP-340), see [`crate::address`].

use std::collections::{BTreeMap, HashMap};
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
    #[error(
        "refused: the signing package's commitment for this guardian is not one it has outstanding (never handed out, expired, or spent)"
    )]
    UnknownCommitment,
    #[error("refused: {signers} signers in the package, the threshold is {threshold}")]
    TooFewSigners { signers: usize, threshold: u16 },
    /// The nonces were drawn by a signer of another identifier (which share
    /// of that identifier drew them is the caller's to check).
    #[error("refused: the nonces were drawn by a signer of another identifier")]
    WrongSigner,
    #[error("signing failed: {0}")]
    Frost(String),
}

/// Nonces drawn before any request needs them (FROST preprocessing), and
/// their commitments. Memory only: not `Clone`, not serializable, `Debug`
/// redacted, zeroized on drop; [`round2`] consumes them.
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

impl Preprocessed {
    /// What the coordinator gets: the public images of the nonces.
    pub fn commitments(&self) -> &SigningCommitments {
        &self.commitments
    }
}

/// Fresh nonces for a later signing by the holder of `key_package`.
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

/// Round 2: signs `signing_package` with `nonces` iff its message is
/// `my_sighash`, it carries this guardian's commitment to exactly these nonces
/// and at least the threshold of signers. Consumes the nonces whatever the
/// outcome: they are dropped (and zeroized).
pub fn round2(
    nonces: Preprocessed,
    key: &TweakedKey,
    signing_package: &SigningPackage,
    my_sighash: &Sighash,
) -> Result<SignatureShare, SignError> {
    let key_package = &key.0;
    if *key_package.identifier() != nonces.identifier {
        return Err(SignError::WrongSigner);
    }
    if signing_package.message().as_slice() != my_sighash.as_bytes() {
        return Err(SignError::MessageMismatch {
            expected: hex::encode(my_sighash.as_bytes()),
            found: hex::encode(signing_package.message()),
        });
    }
    match signing_package
        .signing_commitments()
        .get(&nonces.identifier)
    {
        None => return Err(SignError::MissingCommitment),
        Some(c) if *c != nonces.commitments => return Err(SignError::CommitmentMismatch),
        Some(_) => {}
    }
    let signers = signing_package.signing_commitments().len();
    let threshold = *key_package.min_signers();
    if signers < usize::from(threshold) {
        return Err(SignError::TooFewSigners { signers, threshold });
    }
    frost_secp256k1_tr::round2::sign(signing_package, &nonces.nonces, key_package)
        .map_err(|e| SignError::Frost(e.to_string()))
}

/// Nonces handed out, with what they were drawn for (`T`) and when.
struct Outstanding<T> {
    tag: T,
    at: u64,
    commitment: Vec<u8>,
    nonces: Preprocessed,
}

/// One guardian's outstanding nonces: those whose commitments it handed out
/// and that no package has named yet, at most `capacity` (the oldest are
/// dropped first), each tagged with what it may sign for. Sans-IO: the
/// caller says what time it is.
pub struct Signer<T> {
    capacity: usize,
    next: u64,
    by_order: BTreeMap<u64, Outstanding<T>>,
    by_commitment: HashMap<Vec<u8>, u64>,
}

impl<T> fmt::Debug for Signer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("outstanding", &self.by_order.len())
            .finish_non_exhaustive()
    }
}

impl<T> Signer<T> {
    pub fn new(capacity: usize) -> Self {
        Signer {
            capacity,
            next: 0,
            by_order: BTreeMap::new(),
            by_commitment: HashMap::new(),
        }
    }

    /// Keeps `nonces` for a package that may name them, tagged `tag`, handed
    /// out at `at`; returns the commitments to hand out, serialized (what
    /// the nonces are found by again).
    pub fn hand_out(
        &mut self,
        nonces: Preprocessed,
        tag: T,
        at: u64,
    ) -> Result<Vec<u8>, SignError> {
        let commitment = nonces
            .commitments
            .serialize()
            .map_err(|e| SignError::Frost(e.to_string()))?;
        while self.by_order.len() >= self.capacity {
            let Some((_, dropped)) = self.by_order.pop_first() else {
                break;
            };
            self.by_commitment.remove(&dropped.commitment);
        }
        self.by_commitment.insert(commitment.clone(), self.next);
        self.by_order.insert(
            self.next,
            Outstanding {
                tag,
                at,
                commitment: commitment.clone(),
                nonces,
            },
        );
        self.next += 1;
        Ok(commitment)
    }

    /// Drops the nonces handed out before `before`.
    pub fn expire(&mut self, before: u64) {
        while let Some(entry) = self.by_order.first_entry() {
            if entry.get().at >= before {
                break;
            }
            self.by_commitment.remove(&entry.remove().commitment);
        }
    }

    /// Drops the nonces whose tag `dropped` says so.
    pub fn forget(&mut self, mut dropped: impl FnMut(&T) -> bool) {
        let by_commitment = &mut self.by_commitment;
        self.by_order.retain(|_, o| {
            let keep = !dropped(&o.tag);
            if !keep {
                by_commitment.remove(&o.commitment);
            }
            keep
        });
    }

    /// Takes out the nonces of the commitment `package` carries for
    /// `identifier`, with their tag: no other package can name them after.
    pub fn take(
        &mut self,
        package: &SigningPackage,
        identifier: &Identifier,
    ) -> Result<(T, Preprocessed), SignError> {
        let mine = package
            .signing_commitments()
            .get(identifier)
            .ok_or(SignError::MissingCommitment)?;
        let commitment = mine
            .serialize()
            .map_err(|e| SignError::Frost(e.to_string()))?;
        let order = self
            .by_commitment
            .remove(&commitment)
            .ok_or(SignError::UnknownCommitment)?;
        let o = self
            .by_order
            .remove(&order)
            .ok_or(SignError::UnknownCommitment)?;
        Ok((o.tag, o.nonces))
    }

    /// How many nonces are outstanding.
    pub fn outstanding(&self) -> usize {
        self.by_order.len()
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

    /// Hands `nonces` out from `signer`: their commitments.
    fn handed<T>(
        signer: &mut Signer<T>,
        nonces: Preprocessed,
        tag: T,
        at: u64,
    ) -> SigningCommitments {
        let commitments = *nonces.commitments();
        signer.hand_out(nonces, tag, at).expect("handed out");
        commitments
    }

    /// Handed-out nonces sign the one package that names them; the oldest
    /// go beyond capacity, the stale on expiry, and a tag's on forgetting.
    #[test]
    fn handed_out_nonces_sign_one_package() {
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([3; 32]);
        let group = crate::sim::run_dkg("pre", 2, 3, &mut rng).expect("dkg");
        let public = group.public_key_package().expect("public");
        let (k1, k2) = (
            group.key_package(1).expect("k1"),
            group.key_package(2).expect("k2"),
        );
        let sighash = Sighash::from_recomputed([5; 32]);
        let (mut g1, mut g2) = (Signer::new(4), Signer::new(4));
        let c1 = handed(&mut g1, preprocess(k1, &mut rng), "w", 0);
        let c2 = handed(&mut g2, preprocess(k2, &mut rng), "w", 0);
        let package = signing_package(
            [(*k1.identifier(), c1), (*k2.identifier(), c2)].into(),
            &sighash,
        );
        let mut shares = BTreeMap::new();
        for (g, k) in [(&mut g1, k1), (&mut g2, k2)] {
            let (tag, nonces) = g.take(&package, k.identifier()).expect("outstanding");
            assert_eq!(tag, "w");
            let share = round2(nonces, &TweakedKey::new(k), &package, &sighash).expect("share");
            shares.insert(*k.identifier(), share);
        }
        aggregate(&package, &shares, &AggregationKey::new(public)).expect("a valid signature");
        assert_eq!(
            g1.take(&package, k1.identifier()).map(|_| ()),
            Err(SignError::UnknownCommitment)
        );
        // Two packages (two inputs) naming one commitment: the second finds
        // its nonces spent, so one nonce never signs two messages.
        let c1 = handed(&mut g1, preprocess(k1, &mut rng), "w", 0);
        let first = signing_package(
            [(*k1.identifier(), c1), (*k2.identifier(), c2)].into(),
            &sighash,
        );
        let other = Sighash::from_recomputed([6; 32]);
        let second = signing_package(
            [(*k1.identifier(), c1), (*k2.identifier(), c2)].into(),
            &other,
        );
        assert!(g1.take(&first, k1.identifier()).is_ok());
        assert_eq!(
            g1.take(&second, k1.identifier()).map(|_| ()),
            Err(SignError::UnknownCommitment)
        );

        for at in 1..=5 {
            g1.hand_out(preprocess(k1, &mut rng), "w", at)
                .expect("handed");
        }
        assert_eq!(g1.outstanding(), 4, "the oldest dropped beyond capacity");
        g1.expire(4);
        assert_eq!(g1.outstanding(), 2);
        let kept = handed(&mut g1, preprocess(k1, &mut rng), "x", 6);
        g1.forget(|tag| *tag == "w");
        assert_eq!(g1.outstanding(), 1);
        let named = signing_package(
            [(*k1.identifier(), kept), (*k2.identifier(), c2)].into(),
            &sighash,
        );
        assert_eq!(g1.take(&named, k1.identifier()).map(|(t, _)| t), Ok("x"));
        assert!(format!("{:?}", preprocess(k1, &mut rng)).contains("redacted"));
        let tweaked = format!("{:?}", TweakedKey::new(k1));
        assert!(!tweaked.contains("signing_share"), "{tweaked}");
    }
}
