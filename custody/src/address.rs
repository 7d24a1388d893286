//! The wallet's Taproot address from the DKG group key.
//!
//! `frost-secp256k1-tr` already tweaks the DKG group key (Q = P + H_TapTweak(P)·G,
//! P never exposed). Custos treats x(Q) as the BIP-341 **internal key** and signs
//! with `sign_with_tweak(.., None)`, so the **output key** is
//! `taptweak(x(Q), no script tree)` and the address is the bech32m segwit v1
//! encoding of that output key with the chain's HRP.

use frost_secp256k1_tr::VerifyingKey;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::point::AffineCoordinates;
use k256::{FieldBytes, ProjectivePoint, Scalar};
use sha2::{Digest, Sha256};

use crate::conv::{point_from_bytes, point_to_bytes, verifying_key_point};

/// The HRPs of the chains a Taproot wallet can live on.
pub const HRPS: [&str; 6] = ["bc", "tb", "bcrt", "ltc", "tltc", "rltc"];

/// Why an address could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "unknown chain or HRP {0:?} (known: btc-/ltc- mainnet/testnet/regtest, or bc, tb, bcrt, ltc, tltc, rltc)"
    )]
    UnknownChain(String),
    #[error("the group key is not a valid secp256k1 point")]
    InvalidGroupKey,
    #[error("{0} is not the x coordinate of a secp256k1 point")]
    NotOnCurve(&'static str),
    #[error("the tweak is out of range or the tweaked key is the point at infinity")]
    InvalidTweak,
    #[error("bech32m encoding failed: {0}")]
    Encoding(String),
}

/// BIP-340 tagged hash: `SHA256(SHA256(tag) ‖ SHA256(tag) ‖ parts…)`.
pub fn tagged_hash(tag: &str, parts: &[&[u8]]) -> [u8; 32] {
    let t = Sha256::digest(tag.as_bytes());
    let mut h = Sha256::new();
    h.update(t);
    h.update(t);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The HRP for a chain id as the engine names them (`btc-mainnet`, ...) or for an HRP itself.
pub fn hrp_for(chain: &str) -> Result<&'static str, AddressError> {
    let hrp = match chain {
        "btc-mainnet" => "bc",
        "btc-testnet" => "tb",
        "btc-regtest" => "bcrt",
        "ltc-mainnet" => "ltc",
        "ltc-testnet" => "tltc",
        "ltc-regtest" => "rltc",
        other => HRPS
            .iter()
            .find(|h| **h == other)
            .copied()
            .ok_or_else(|| AddressError::UnknownChain(other.to_owned()))?,
    };
    Ok(hrp)
}

/// The BIP-341 internal key of a wallet: x(Q) of the (already tweaked) group key.
pub fn internal_key(group_key: &VerifyingKey) -> Result<[u8; 32], AddressError> {
    let p = verifying_key_point(group_key).map_err(|_| AddressError::InvalidGroupKey)?;
    Ok(p.to_affine().x().into())
}

fn lift_x(x: &[u8; 32], what: &'static str) -> Result<ProjectivePoint, AddressError> {
    let mut enc = [0u8; 33];
    enc[0] = 0x02;
    enc[1..].copy_from_slice(x);
    point_from_bytes(&enc).map_err(|_| AddressError::NotOnCurve(what))
}

/// The BIP-341 output key for an internal key with no script tree:
/// x(lift_x(P) + int(H_TapTweak(P))·G).
pub fn output_key(internal: &[u8; 32]) -> Result<[u8; 32], AddressError> {
    let p = lift_x(internal, "internal key")?;
    let t = tagged_hash("TapTweak", &[internal]);
    let t = Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(t)))
        .ok_or(AddressError::InvalidTweak)?;
    let q = p + ProjectivePoint::GENERATOR * t;
    let bytes = point_to_bytes(&q).map_err(|_| AddressError::InvalidTweak)?;
    let mut x = [0u8; 32];
    x.copy_from_slice(&bytes[1..]);
    Ok(x)
}

/// `OP_1 OP_PUSHBYTES_32 <output key>`.
pub fn p2tr_script_pubkey(output: &[u8; 32]) -> [u8; 34] {
    let mut spk = [0u8; 34];
    spk[0] = 0x51;
    spk[1] = 0x20;
    spk[2..].copy_from_slice(output);
    spk
}

/// The bech32m segwit v1 address of an output key.
pub fn p2tr_address(hrp: &str, output: &[u8; 32]) -> Result<String, AddressError> {
    let hrp = bech32::Hrp::parse(hrp).map_err(|e| AddressError::Encoding(e.to_string()))?;
    bech32::segwit::encode_v1(hrp, output).map_err(|e| AddressError::Encoding(e.to_string()))
}

/// Everything about a FROST wallet's Taproot output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaprootWallet {
    pub internal_key: [u8; 32],
    pub output_key: [u8; 32],
    pub script_pubkey: [u8; 34],
    pub address: String,
}

/// The wallet's Taproot output for `chain` (a chain id or an HRP).
pub fn wallet(group_key: &VerifyingKey, chain: &str) -> Result<TaprootWallet, AddressError> {
    let hrp = hrp_for(chain)?;
    let internal_key = internal_key(group_key)?;
    let output_key = output_key(&internal_key)?;
    Ok(TaprootWallet {
        internal_key,
        output_key,
        script_pubkey: p2tr_script_pubkey(&output_key),
        address: p2tr_address(hrp, &output_key)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// BIP-86, first receiving address of the test mnemonic (m/86'/0'/0'/0/0).
    #[test]
    fn bip86_vector() {
        let internal = h32("cc8a4bc64d897bddc5fbc2f670f7a8ba0b386779106cf1223c6fc5d7cd6fc115");
        let output = output_key(&internal).unwrap();
        assert_eq!(
            hex::encode(output),
            "a60869f0dbcf1dc659c9cecbaf8050135ea9e8cdc487053f1dc6880949dc684c"
        );
        assert_eq!(
            hex::encode(p2tr_script_pubkey(&output)),
            "5120a60869f0dbcf1dc659c9cecbaf8050135ea9e8cdc487053f1dc6880949dc684c"
        );
        assert_eq!(
            p2tr_address("bc", &output).unwrap(),
            "bc1p5cyxnuxmeuwuvkwfem96lqzszd02n6xdcjrs20cac6yqjjwudpxqkedrcr"
        );
    }

    /// BIP-341 wallet test vectors, scriptPubKey[0] (no script tree).
    #[test]
    fn bip341_vector_no_scripts() {
        let internal = h32("d6889cb081036e0faefa3a35157ad71086b123b2b144b649798b494c300a961d");
        let output = output_key(&internal).unwrap();
        assert_eq!(
            hex::encode(output),
            "53a1f6e454df1aa2776a2814a721372d6258050de330b3c6d10ee8f4e0dda343"
        );
        assert_eq!(
            p2tr_address("bc", &output).unwrap(),
            "bc1p2wsldez5mud2yam29q22wgfh9439spgduvct83k3pm50fcxa5dps59h4z5"
        );
    }

    #[test]
    fn hrps_and_errors() {
        assert_eq!(hrp_for("btc-regtest").unwrap(), "bcrt");
        assert_eq!(hrp_for("ltc-testnet").unwrap(), "tltc");
        assert_eq!(hrp_for("rltc").unwrap(), "rltc");
        assert!(matches!(
            hrp_for("evm-1"),
            Err(AddressError::UnknownChain(_))
        ));
        // x = 5 is not on secp256k1 (5^3 + 7 = 132 is a non-residue mod p).
        let mut x = [0u8; 32];
        x[31] = 5;
        assert_eq!(
            output_key(&x),
            Err(AddressError::NotOnCurve("internal key"))
        );
        let output = [7u8; 32];
        for hrp in HRPS {
            let a = p2tr_address(hrp, &output).unwrap();
            let (h, v, prog) = bech32::segwit::decode(&a).unwrap();
            assert_eq!(h.as_str(), hrp);
            assert_eq!(v, bech32::segwit::VERSION_1);
            assert_eq!(prog, output);
        }
    }
}
