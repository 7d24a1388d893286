//! Conversions between frost's opaque types and k256 arithmetic, through their
//! canonical encodings (frost keeps its raw constructors behind an unstable feature).

use frost_secp256k1_tr::keys::{SigningShare, VerifyingShare};
use frost_secp256k1_tr::{Identifier, VerifyingKey};
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use k256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar};

/// Why a conversion failed: only reachable with malformed or degenerate values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConvError {
    #[error("scalar encoding is not canonical")]
    Scalar,
    #[error("point encoding is invalid or the point is the identity")]
    Point,
}

pub(crate) fn scalar_from_bytes(bytes: &[u8]) -> Result<Scalar, ConvError> {
    let arr: [u8; 32] = bytes.try_into().map_err(|_| ConvError::Scalar)?;
    Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(arr))).ok_or(ConvError::Scalar)
}

pub(crate) fn point_from_bytes(bytes: &[u8]) -> Result<ProjectivePoint, ConvError> {
    let ep = EncodedPoint::from_bytes(bytes).map_err(|_| ConvError::Point)?;
    let p = Option::<AffinePoint>::from(AffinePoint::from_encoded_point(&ep))
        .ok_or(ConvError::Point)?;
    Ok(ProjectivePoint::from(p))
}

pub(crate) fn point_to_bytes(p: &ProjectivePoint) -> Result<[u8; 33], ConvError> {
    let ep = p.to_affine().to_encoded_point(true);
    ep.as_bytes().try_into().map_err(|_| ConvError::Point)
}

pub(crate) fn identifier_scalar(id: &Identifier) -> Result<Scalar, ConvError> {
    scalar_from_bytes(&id.serialize())
}

pub(crate) fn share_scalar(share: &SigningShare) -> Result<Scalar, ConvError> {
    let mut bytes = share.serialize();
    let s = scalar_from_bytes(&bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    s
}

pub(crate) fn share_from_scalar(s: &Scalar) -> Result<SigningShare, ConvError> {
    let mut bytes: [u8; 32] = s.to_bytes().into();
    let share = SigningShare::deserialize(&bytes).map_err(|_| ConvError::Scalar);
    zeroize::Zeroize::zeroize(&mut bytes);
    share
}

pub(crate) fn verifying_share_point(v: &VerifyingShare) -> Result<ProjectivePoint, ConvError> {
    point_from_bytes(&v.serialize().map_err(|_| ConvError::Point)?)
}

pub(crate) fn verifying_share_from_point(p: &ProjectivePoint) -> Result<VerifyingShare, ConvError> {
    VerifyingShare::deserialize(&point_to_bytes(p)?).map_err(|_| ConvError::Point)
}

pub(crate) fn verifying_key_point(v: &VerifyingKey) -> Result<ProjectivePoint, ConvError> {
    point_from_bytes(&v.serialize().map_err(|_| ConvError::Point)?)
}

/// The Lagrange coefficient of `me` at x = 0 over the set `set` (which contains `me`).
pub(crate) fn lagrange_at_zero(me: &Scalar, set: &[Scalar]) -> Result<Scalar, ConvError> {
    let mut num = Scalar::ONE;
    let mut den = Scalar::ONE;
    for x in set {
        if x == me {
            continue;
        }
        num *= x;
        den *= *x - me;
    }
    Option::<Scalar>::from(den.invert())
        .map(|inv| num * inv)
        .ok_or(ConvError::Scalar)
}

/// Length-prefixed field for domain-separated hashing and associated data.
pub(crate) fn put(buf: &mut Vec<u8>, field: &[u8]) {
    buf.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(field);
}
