//! Key shares (and other guardian secrets) encrypted at rest.
//!
//! A passphrase goes through argon2id (parameters below, fresh 16-byte salt per
//! file) to a 32-byte key; the secret is encrypted with ChaCha20-Poly1305 with the
//! whole header, the guardian id and the wallet id as associated data, so a file
//! copied to another guardian or wallet does not open.
//!
//! File format, version 1 (all integers big-endian):
//!
//! ```text
//! magic "CUSTOSKS" (8) | version (1) = 1 | m_cost KiB (4) | t_cost (4) | p_cost (4)
//! | salt (16) | nonce (12) | key check (16) | ciphertext+tag
//! ```
//!
//! The key check (`SHA-256("custos-keystore-check-v1" ‖ key)[..16]`) tells a wrong
//! passphrase apart from a modified file; it reveals nothing the AEAD tag would not.
//! Parameters read from a file are accepted only within bounds (no downgrade to a
//! trivial KDF, no memory blow-up).

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use frost_secp256k1_tr::keys::KeyPackage;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use subtle_eq::ct_eq;
use zeroize::Zeroizing;

use crate::conv::put;

/// argon2id memory cost in KiB (64 MiB).
pub const ARGON2_M_COST_KIB: u32 = 64 * 1024;
/// argon2id passes.
pub const ARGON2_T_COST: u32 = 3;
/// argon2id lanes.
pub const ARGON2_P_COST: u32 = 1;

const MAGIC: &[u8; 8] = b"CUSTOSKS";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 8 + 1 + 12 + 16 + 12 + 16;
const MIN_M_COST_KIB: u32 = 19 * 1024;
const MAX_M_COST_KIB: u32 = 1024 * 1024;
const MAX_T_COST: u32 = 16;
const MAX_P_COST: u32 = 8;

/// Why a secret could not be stored or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not a Custos key-share file (bad magic)")]
    NotAShareFile,
    #[error("unsupported key-share file version {0} (this build reads version 1)")]
    UnsupportedVersion(u8),
    #[error("key-share file is truncated")]
    Truncated,
    #[error("key-share file has out-of-range argon2 parameters (m={m} KiB, t={t}, p={p})")]
    KdfParams { m: u32, t: u32, p: u32 },
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("key-share file was modified, or belongs to another guardian or wallet")]
    Tampered,
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("the decrypted secret is not a valid key package")]
    Malformed,
    #[error("encryption failed")]
    Encrypt,
}

/// Constant-time comparison of short byte strings.
mod subtle_eq {
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn derive_key(
    passphrase: &[u8],
    salt: &[u8],
    m: u32,
    t: u32,
    p: u32,
) -> Result<Zeroizing<[u8; 32]>, StoreError> {
    let params = Params::new(m, t, p, Some(32)).map_err(|e| StoreError::Kdf(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|e| StoreError::Kdf(e.to_string()))?;
    Ok(key)
}

fn key_check(key: &[u8; 32]) -> [u8; 16] {
    let d = Sha256::new()
        .chain_update(b"custos-keystore-check-v1")
        .chain_update(key)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

fn associated_data(header: &[u8], guardian_id: &str, wallet_id: &str) -> Vec<u8> {
    let mut ad = header.to_vec();
    put(&mut ad, guardian_id.as_bytes());
    put(&mut ad, wallet_id.as_bytes());
    ad
}

/// Encrypts `secret` for guardian `guardian_id` and wallet `wallet_id`.
pub fn seal_secret(
    secret: &[u8],
    passphrase: &[u8],
    guardian_id: &str,
    wallet_id: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<u8>, StoreError> {
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let key = derive_key(
        passphrase,
        &salt,
        ARGON2_M_COST_KIB,
        ARGON2_T_COST,
        ARGON2_P_COST,
    )?;
    let mut out = Vec::with_capacity(HEADER_LEN + secret.len() + 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&ARGON2_M_COST_KIB.to_be_bytes());
    out.extend_from_slice(&ARGON2_T_COST.to_be_bytes());
    out.extend_from_slice(&ARGON2_P_COST.to_be_bytes());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&key_check(&key));
    let ad = associated_data(&out, guardian_id, wallet_id);
    let ct = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: secret,
                aad: &ad,
            },
        )
        .map_err(|_| StoreError::Encrypt)?;
    out.extend_from_slice(&ct);
    Ok(out)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

/// Decrypts a file written by [`seal_secret`]; the plaintext zeroizes on drop.
pub fn open_secret(
    file: &[u8],
    passphrase: &[u8],
    guardian_id: &str,
    wallet_id: &str,
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    if file.len() < 9 {
        return Err(if file.starts_with(&MAGIC[..file.len().min(8)]) {
            StoreError::Truncated
        } else {
            StoreError::NotAShareFile
        });
    }
    if &file[..8] != MAGIC {
        return Err(StoreError::NotAShareFile);
    }
    if file[8] != VERSION {
        return Err(StoreError::UnsupportedVersion(file[8]));
    }
    if file.len() < HEADER_LEN + 16 {
        return Err(StoreError::Truncated);
    }
    let (m, t, p) = (be32(file, 9), be32(file, 13), be32(file, 17));
    if !(MIN_M_COST_KIB..=MAX_M_COST_KIB).contains(&m)
        || !(1..=MAX_T_COST).contains(&t)
        || !(1..=MAX_P_COST).contains(&p)
    {
        return Err(StoreError::KdfParams { m, t, p });
    }
    let salt = &file[21..37];
    let nonce = &file[37..49];
    let check = &file[49..65];
    let key = derive_key(passphrase, salt, m, t, p)?;
    if !ct_eq(&key_check(&key), check) {
        return Err(StoreError::WrongPassphrase);
    }
    let ad = associated_data(&file[..HEADER_LEN], guardian_id, wallet_id);
    ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: &file[HEADER_LEN..],
                aad: &ad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| StoreError::Tampered)
}

/// Encrypts a guardian's key package; the serialized plaintext is zeroized.
pub fn seal_key_package(
    key_package: &KeyPackage,
    passphrase: &[u8],
    guardian_id: &str,
    wallet_id: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<u8>, StoreError> {
    let plain = Zeroizing::new(key_package.serialize().map_err(|_| StoreError::Malformed)?);
    seal_secret(&plain, passphrase, guardian_id, wallet_id, rng)
}

/// Decrypts a guardian's key package.
pub fn open_key_package(
    file: &[u8],
    passphrase: &[u8],
    guardian_id: &str,
    wallet_id: &str,
) -> Result<KeyPackage, StoreError> {
    let plain = open_secret(file, passphrase, guardian_id, wallet_id)?;
    KeyPackage::deserialize(&plain).map_err(|_| StoreError::Malformed)
}
