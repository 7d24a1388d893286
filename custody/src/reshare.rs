//! Threshold change with the same group key: verifiable share redistribution.
//!
//! The old quorum `D` (at least `t_old` holders of the current key) re-shares the
//! group secret to a new set of identifiers under a new threshold `t_new`, without
//! the secret ever existing in one place. Protocol and security argument:
//! `docs/threshold-change.md`. In short, with `s_i` dealer `i`'s share, `Y_i = s_i·G`
//! its public verifying share and `λ_i` its Lagrange coefficient at 0 over `D`:
//!
//! 1. [`deal`]: dealer `i` draws `f_i(x) = λ_i·s_i + c_1·x + … + c_{t_new−1}·x^{t_new−1}`,
//!    broadcasts the [`Dealing`] `C_{i,k} = coefficient_k·G` and sends each new
//!    member `j` the [`SubShare`] `f_i(j)`, sealed to `j`.
//! 2. [`verify_dealing`] (anyone): `C_{i,0} = λ_i·Y_i`, so a dealing cannot change
//!    the secret. [`verify_sub_share`] (receiver `j`): `f_i(j)·G = Σ_k C_{i,k}·j^k`.
//!    A failure names the dealer.
//! 3. [`combine`] (receiver `j`): `s'_j = Σ_i f_i(j)`; [`public_package`] (anyone):
//!    `Y'_j = Σ_i Σ_k C_{i,k}·j^k` and the group key `Σ_i C_{i,0} = Σ_i λ_i·Y_i`,
//!    which must equal the old group key (checked).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use frost_secp256k1_tr::Identifier;
use frost_secp256k1_tr::keys::{KeyPackage, PublicKeyPackage};
use k256::elliptic_curve::Field;
use k256::{ProjectivePoint, Scalar};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::conv::{
    ConvError, identifier_scalar, lagrange_at_zero, point_from_bytes, point_to_bytes, put,
    scalar_from_bytes, share_from_scalar, share_scalar, verifying_key_point,
    verifying_share_from_point, verifying_share_point,
};
use crate::identity::{GuardianKeys, GuardianPublic};
use crate::seal::{SealError, Sealed};

const PURPOSE: &str = "reshare-subshare";

fn hexid(id: &Identifier) -> String {
    hex::encode(id.serialize())
}

/// Why a redistribution step failed; dealers are named by identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReshareError {
    #[error("invalid redistribution parameters: {0}")]
    InvalidParameters(String),
    #[error("identifier {} is not a dealer of this redistribution", hexid(.0))]
    NotADealer(Identifier),
    #[error("identifier {} is not a new member of this redistribution", hexid(.0))]
    NotANewMember(Identifier),
    #[error("the key package belongs to another group key")]
    WrongGroup,
    #[error("no dealing from dealer {}", hexid(.0))]
    MissingDealing(Identifier),
    #[error("no sub-share from dealer {}", hexid(.0))]
    MissingSubShare(Identifier),
    #[error("dealing from dealer {} has {found} commitments, expected {expected}", hexid(.dealer))]
    WrongDegree {
        dealer: Identifier,
        found: usize,
        expected: usize,
    },
    #[error("dealing from dealer {} has a malformed commitment", hexid(.0))]
    MalformedCommitment(Identifier),
    #[error("dealer {} tried to change the secret: its constant-term commitment is not λ·(its verifying share)", hexid(.0))]
    DealerChangedSecret(Identifier),
    #[error("dealer {} sent a sub-share that does not match its public commitments", hexid(.0))]
    BadSubShare(Identifier),
    #[error("sub-share from dealer {} does not open: {reason}", hexid(.dealer))]
    Sealed {
        dealer: Identifier,
        reason: SealError,
    },
    #[error("the redistributed group key differs from the old one")]
    GroupKeyChanged,
    #[error("arithmetic on a degenerate value: {0}")]
    Degenerate(#[from] ConvError),
}

/// The public parameters of one redistribution, agreed by everyone beforehand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redistribution {
    pub ceremony_id: String,
    /// The current group's public key package (verifying shares, group key, `t_old`).
    pub old: PublicKeyPackage,
    /// The old members who deal (at least `t_old` of them).
    pub dealers: BTreeSet<Identifier>,
    pub new_min_signers: u16,
    pub new_members: BTreeSet<Identifier>,
}

impl Redistribution {
    pub fn new(
        ceremony_id: &str,
        old: PublicKeyPackage,
        dealers: BTreeSet<Identifier>,
        new_min_signers: u16,
        new_members: BTreeSet<Identifier>,
    ) -> Result<Self, ReshareError> {
        let bad = |m: String| Err(ReshareError::InvalidParameters(m));
        let t_old = old.min_signers().ok_or_else(|| {
            ReshareError::InvalidParameters("old package has no threshold".into())
        })?;
        if let Some(d) = dealers
            .iter()
            .find(|d| !old.verifying_shares().contains_key(d))
        {
            return bad(format!(
                "dealer {} has no verifying share in the old group",
                hexid(d)
            ));
        }
        if dealers.len() < usize::from(t_old) {
            return bad(format!(
                "{} dealers, the old threshold is {t_old}",
                dealers.len()
            ));
        }
        if new_min_signers < 2 || usize::from(new_min_signers) > new_members.len() {
            return bad(format!(
                "new threshold {new_min_signers} of {} members (needs 2 <= threshold <= members)",
                new_members.len()
            ));
        }
        Ok(Redistribution {
            ceremony_id: ceremony_id.to_owned(),
            old,
            dealers,
            new_min_signers,
            new_members,
        })
    }

    fn lambda(&self, dealer: &Identifier) -> Result<Scalar, ReshareError> {
        let xs = self
            .dealers
            .iter()
            .map(identifier_scalar)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lagrange_at_zero(&identifier_scalar(dealer)?, &xs)?)
    }
}

/// A dealer's public commitments `C_k = coefficient_k·G`, k = 0..t_new (compressed points).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dealing {
    pub dealer: Identifier,
    pub commitments: Vec<Vec<u8>>,
}

impl Dealing {
    fn points(&self) -> Result<Vec<ProjectivePoint>, ReshareError> {
        self.commitments
            .iter()
            .map(|c| {
                point_from_bytes(c).map_err(|_| ReshareError::MalformedCommitment(self.dealer))
            })
            .collect()
    }
}

/// `f_i(j)` for one recipient: secret, zeroized on drop, `Debug` redacted.
#[derive(Clone, PartialEq, Eq, Zeroize, zeroize::ZeroizeOnDrop)]
pub struct SubShare([u8; 32]);

impl fmt::Debug for SubShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubShare(<redacted>)")
    }
}

impl SubShare {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SubShare(bytes)
    }

    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0)
    }

    fn scalar(&self) -> Result<Scalar, ConvError> {
        scalar_from_bytes(&self.0)
    }
}

fn eval_points(points: &[ProjectivePoint], x: &Scalar) -> ProjectivePoint {
    // Horner: ((C_{t-1}·x + C_{t-2})·x + …)·x + C_0
    points
        .iter()
        .rev()
        .fold(ProjectivePoint::IDENTITY, |acc, c| acc * x + c)
}

/// Step 1 (dealer): the dealing to broadcast and one sub-share per new member.
pub fn deal(
    params: &Redistribution,
    key_package: &KeyPackage,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(Dealing, BTreeMap<Identifier, SubShare>), ReshareError> {
    let me = *key_package.identifier();
    if !params.dealers.contains(&me) {
        return Err(ReshareError::NotADealer(me));
    }
    if key_package.verifying_key() != params.old.verifying_key() {
        return Err(ReshareError::WrongGroup);
    }
    let mut coefficients: Zeroizing<Vec<Scalar>> =
        Zeroizing::new(Vec::with_capacity(usize::from(params.new_min_signers)));
    let mut a0 = share_scalar(key_package.signing_share())?;
    a0 *= params.lambda(&me)?;
    coefficients.push(a0);
    a0.zeroize();
    for _ in 1..params.new_min_signers {
        coefficients.push(Scalar::random(&mut *rng));
    }
    let commitments = coefficients
        .iter()
        .map(|c| point_to_bytes(&(ProjectivePoint::GENERATOR * c)).map(|b| b.to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut subs = BTreeMap::new();
    for j in &params.new_members {
        let x = identifier_scalar(j)?;
        let mut y = coefficients
            .iter()
            .rev()
            .fold(Scalar::ZERO, |acc, c| acc * x + c);
        subs.insert(*j, SubShare(y.to_bytes().into()));
        y.zeroize();
    }
    Ok((
        Dealing {
            dealer: me,
            commitments,
        },
        subs,
    ))
}

/// Step 2 (anyone): the dealing has `t_new` commitments and its constant term is
/// `λ_i·Y_i`, so it re-shares exactly the dealer's weighted share of the secret.
pub fn verify_dealing(params: &Redistribution, dealing: &Dealing) -> Result<(), ReshareError> {
    let dealer = dealing.dealer;
    let y_i = params
        .old
        .verifying_shares()
        .get(&dealer)
        .filter(|_| params.dealers.contains(&dealer))
        .ok_or(ReshareError::NotADealer(dealer))?;
    let expected = usize::from(params.new_min_signers);
    if dealing.commitments.len() != expected {
        return Err(ReshareError::WrongDegree {
            dealer,
            found: dealing.commitments.len(),
            expected,
        });
    }
    let points = dealing.points()?;
    if points[0] != verifying_share_point(y_i)? * params.lambda(&dealer)? {
        return Err(ReshareError::DealerChangedSecret(dealer));
    }
    Ok(())
}

/// Step 2 (receiver `me`): `f_i(me)·G = Σ_k C_{i,k}·me^k`.
pub fn verify_sub_share(
    params: &Redistribution,
    dealing: &Dealing,
    me: &Identifier,
    sub: &SubShare,
) -> Result<(), ReshareError> {
    if !params.new_members.contains(me) {
        return Err(ReshareError::NotANewMember(*me));
    }
    let points = dealing.points()?;
    let x = identifier_scalar(me)?;
    let s = sub
        .scalar()
        .map_err(|_| ReshareError::BadSubShare(dealing.dealer))?;
    if ProjectivePoint::GENERATOR * s != eval_points(&points, &x) {
        return Err(ReshareError::BadSubShare(dealing.dealer));
    }
    Ok(())
}

fn check_all_dealers<T>(
    params: &Redistribution,
    got: &BTreeMap<Identifier, T>,
    missing: fn(Identifier) -> ReshareError,
) -> Result<(), ReshareError> {
    if let Some(d) = got.keys().find(|d| !params.dealers.contains(d)) {
        return Err(ReshareError::NotADealer(*d));
    }
    if let Some(d) = params.dealers.iter().find(|d| !got.contains_key(d)) {
        return Err(missing(*d));
    }
    Ok(())
}

/// Step 3 (anyone): the new public key package from the dealings; fails unless
/// every dealing verifies and the group key is unchanged.
pub fn public_package(
    params: &Redistribution,
    dealings: &BTreeMap<Identifier, Dealing>,
) -> Result<PublicKeyPackage, ReshareError> {
    check_all_dealers(params, dealings, ReshareError::MissingDealing)?;
    let mut summed = vec![ProjectivePoint::IDENTITY; usize::from(params.new_min_signers)];
    for (id, d) in dealings {
        if d.dealer != *id {
            return Err(ReshareError::NotADealer(d.dealer));
        }
        verify_dealing(params, d)?;
        for (acc, c) in summed.iter_mut().zip(d.points()?) {
            *acc += c;
        }
    }
    let group = verifying_key_point(params.old.verifying_key())?;
    if summed[0] != group {
        return Err(ReshareError::GroupKeyChanged);
    }
    let mut shares = BTreeMap::new();
    for j in &params.new_members {
        let y = eval_points(&summed, &identifier_scalar(j)?);
        shares.insert(*j, verifying_share_from_point(&y)?);
    }
    Ok(PublicKeyPackage::new(
        shares,
        *params.old.verifying_key(),
        Some(params.new_min_signers),
    ))
}

/// Step 3 (receiver `me`): verifies every dealing and sub-share (naming a bad
/// dealer) and builds the new key package and public key package.
pub fn combine(
    params: &Redistribution,
    me: &Identifier,
    dealings: &BTreeMap<Identifier, Dealing>,
    sub_shares: &BTreeMap<Identifier, SubShare>,
) -> Result<(KeyPackage, PublicKeyPackage), ReshareError> {
    if !params.new_members.contains(me) {
        return Err(ReshareError::NotANewMember(*me));
    }
    check_all_dealers(params, dealings, ReshareError::MissingDealing)?;
    check_all_dealers(params, sub_shares, ReshareError::MissingSubShare)?;
    let mut share = Scalar::ZERO;
    for (dealer, d) in dealings {
        verify_dealing(params, d)?;
        let sub = sub_shares
            .get(dealer)
            .ok_or(ReshareError::MissingSubShare(*dealer))?;
        verify_sub_share(params, d, me, sub)?;
        let mut s = sub.scalar()?;
        share += s;
        s.zeroize();
    }
    let pkp = public_package(params, dealings)?;
    let verifying_share = *pkp
        .verifying_shares()
        .get(me)
        .ok_or(ReshareError::NotANewMember(*me))?;
    if ProjectivePoint::GENERATOR * share != verifying_share_point(&verifying_share)? {
        return Err(ReshareError::GroupKeyChanged);
    }
    let signing_share = share_from_scalar(&share)?;
    share.zeroize();
    let kp = KeyPackage::new(
        *me,
        signing_share,
        verifying_share,
        *params.old.verifying_key(),
        params.new_min_signers,
    );
    Ok((kp, pkp))
}

/// A digest of the parameters and all dealings; every participant computes it and
/// the workflow compares them (an echo of the broadcast) before activating the new
/// shares. Goes into `THRESHOLD_MODIFIED`.
pub fn transcript(
    params: &Redistribution,
    dealings: &BTreeMap<Identifier, Dealing>,
) -> Result<[u8; 32], ReshareError> {
    let mut b = Vec::new();
    put(&mut b, b"custos-reshare-transcript-v1");
    put(&mut b, params.ceremony_id.as_bytes());
    put(
        &mut b,
        &point_to_bytes(&verifying_key_point(params.old.verifying_key())?)?,
    );
    for d in &params.dealers {
        put(&mut b, &d.serialize());
    }
    b.extend_from_slice(&params.new_min_signers.to_be_bytes());
    for j in &params.new_members {
        put(&mut b, &j.serialize());
    }
    for (id, d) in dealings {
        put(&mut b, &id.serialize());
        for c in &d.commitments {
            put(&mut b, c);
        }
    }
    Ok(Sha256::digest(&b).into())
}

/// Seals a sub-share from dealer `keys` to new member `recipient`.
pub fn seal_sub_share(
    keys: &GuardianKeys,
    recipient: &GuardianPublic,
    ceremony_id: &str,
    sub: &SubShare,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Sealed, SealError> {
    keys.seal_to(recipient, &sub.0, ceremony_id, PURPOSE, rng)
}

/// Opens a sub-share sealed to `keys` by the guardian `sender` (dealer `dealer`).
pub fn open_sub_share(
    keys: &GuardianKeys,
    sealed: &Sealed,
    ceremony_id: &str,
    sender: &str,
    dealer: Identifier,
) -> Result<SubShare, ReshareError> {
    let plain = keys
        .open(sealed, ceremony_id, sender, PURPOSE)
        .map_err(|reason| ReshareError::Sealed { dealer, reason })?;
    let bytes: [u8; 32] = plain
        .as_slice()
        .try_into()
        .map_err(|_| ReshareError::BadSubShare(dealer))?;
    Ok(SubShare(bytes))
}
