//! The audit signing key on disk: created once, readable only by its owner, never
//! printed. Its public half is written beside it for verifiers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

pub fn audit_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-key")
}

pub fn audit_pub_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-key.pub")
}

/// Loads the audit key from `data_dir`, creating it on first use.
pub fn load_or_create_audit_key(data_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = audit_key_path(data_dir);
    let key = if path.exists() {
        let text = Zeroizing::new(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), bytes.as_mut())
            .with_context(|| format!("{}: not a 32-byte hex key", path.display()))?;
        SigningKey::from_bytes(&bytes)
    } else {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        write_private(&path, &Zeroizing::new(hex::encode(key.to_bytes())))?;
        key
    };
    std::fs::write(
        audit_pub_path(data_dir),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )?;
    Ok(key)
}

/// Reads a public key given as hex, or from a file holding hex.
pub fn parse_public_key(hex_or_path: &str) -> anyhow::Result<VerifyingKey> {
    let text = if Path::new(hex_or_path).exists() {
        std::fs::read_to_string(hex_or_path)?
    } else {
        hex_or_path.to_string()
    };
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes)
        .context("audit public key: expected 32 bytes of hex")?;
    VerifyingKey::from_bytes(&bytes).context("audit public key: not a valid ed25519 key")
}

/// Writes a secret file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    custos_adapters::files::write_private(path, contents.as_bytes())
        .with_context(|| format!("creating {}", path.display()))
}
