//! End-to-end encryption of point-to-point ceremony payloads (DKG round-2 packages,
//! redistribution sub-shares, repair values), so that neither NATS nor the
//! coordinator can read a share.
//!
//! Construction (ECIES over X25519): the sender draws an ephemeral X25519 key `e`,
//! computes `z = X25519(e, R)` for the recipient's static key `R` (refusing a
//! non-contributory result), derives `k = HKDF-SHA256(salt = E ‖ R, ikm = z,
//! info = "custos-seal-v1")` and encrypts with ChaCha20-Poly1305 under `k` with a
//! zero nonce (every key is fresh, so a nonce is never reused). The associated data
//! binds the ceremony id, the sender, the recipient and the purpose, so a sealed
//! payload cannot be replayed into another ceremony or redirected. Sender
//! authenticity comes from the signed envelope ([`crate::identity::SignedMessage`])
//! that carries the sealed payload.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::conv::put;

const INFO: &[u8] = b"custos-seal-v1";

/// What a sealed payload is bound to; all fields go into the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealContext<'a> {
    pub ceremony_id: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    /// What the payload is, e.g. `"dkg-round2"`; stops cross-protocol reuse.
    pub purpose: &'a str,
}

impl SealContext<'_> {
    fn associated_data(&self, ephemeral: &[u8; 32], recipient_key: &[u8; 32]) -> Vec<u8> {
        let mut ad = Vec::with_capacity(128);
        put(&mut ad, INFO);
        put(&mut ad, self.ceremony_id.as_bytes());
        put(&mut ad, self.sender.as_bytes());
        put(&mut ad, self.recipient.as_bytes());
        put(&mut ad, self.purpose.as_bytes());
        put(&mut ad, ephemeral);
        put(&mut ad, recipient_key);
        ad
    }
}

/// A sealed payload: the sender's ephemeral public key and the AEAD ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub ephemeral: [u8; 32],
    pub ciphertext: Vec<u8>,
}

impl Sealed {
    /// `ephemeral ‖ ciphertext`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.ciphertext.len());
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Sealed> {
        if bytes.len() < 32 + 16 {
            return None;
        }
        let (e, c) = bytes.split_at(32);
        Some(Sealed {
            ephemeral: e.try_into().ok()?,
            ciphertext: c.to_vec(),
        })
    }
}

/// Why a payload could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the recipient's X25519 key is a low-order point (non-contributory key exchange)")]
    WeakRecipientKey,
    #[error(
        "the sender's ephemeral X25519 key is a low-order point (non-contributory key exchange)"
    )]
    WeakEphemeralKey,
    #[error(
        "sealed payload does not open: not for this recipient, bound to another ceremony/sender/purpose, or modified"
    )]
    Open,
    #[error("encryption failed")]
    Encrypt,
}

fn cipher(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's output limit, so expand cannot fail;
    // an (impossible) failure leaves the all-zero key, which `open` would reject anyway.
    let _ = hk.expand(INFO, okm.as_mut());
    ChaCha20Poly1305::new(Key::from_slice(okm.as_ref()))
}

/// Seals `plaintext` for the holder of `recipient_public` (an X25519 public key).
pub fn seal_for(
    recipient_public: &[u8; 32],
    plaintext: &[u8],
    ctx: &SealContext<'_>,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Sealed, SealError> {
    let recipient = PublicKey::from(*recipient_public);
    let secret = EphemeralSecret::random_from_rng(rng);
    let ephemeral = PublicKey::from(&secret).to_bytes();
    let shared = secret.diffie_hellman(&recipient);
    if !shared.was_contributory() {
        return Err(SealError::WeakRecipientKey);
    }
    let aead = cipher(shared.as_bytes(), &ephemeral, recipient_public);
    let ad = ctx.associated_data(&ephemeral, recipient_public);
    let ciphertext = aead
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .map_err(|_| SealError::Encrypt)?;
    Ok(Sealed {
        ephemeral,
        ciphertext,
    })
}

/// Opens a payload sealed for `recipient_secret` under the same context.
pub fn open(
    recipient_secret: &StaticSecret,
    sealed: &Sealed,
    ctx: &SealContext<'_>,
) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let recipient_public = PublicKey::from(recipient_secret).to_bytes();
    let shared = recipient_secret.diffie_hellman(&PublicKey::from(sealed.ephemeral));
    if !shared.was_contributory() {
        return Err(SealError::WeakEphemeralKey);
    }
    let aead = cipher(shared.as_bytes(), &sealed.ephemeral, &recipient_public);
    let ad = ctx.associated_data(&sealed.ephemeral, &recipient_public);
    aead.decrypt(
        Nonce::from_slice(&[0u8; 12]),
        Payload {
            msg: &sealed.ciphertext,
            aad: &ad,
        },
    )
    .map(Zeroizing::new)
    .map_err(|_| SealError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn ctx<'a>(c: &'a str, s: &'a str, r: &'a str) -> SealContext<'a> {
        SealContext {
            ceremony_id: c,
            sender: s,
            recipient: r,
            purpose: "test",
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let bob = StaticSecret::random_from_rng(&mut rng);
        let bob_pub = PublicKey::from(&bob).to_bytes();
        let sealed = seal_for(&bob_pub, b"share", &ctx("c1", "g1", "g2"), &mut rng).unwrap();
        assert!(!sealed.ciphertext.windows(5).any(|w| w == b"share"));
        assert_eq!(
            open(&bob, &sealed, &ctx("c1", "g1", "g2"))
                .unwrap()
                .as_slice(),
            b"share"
        );
        // Another ceremony, sender, recipient or purpose: refused.
        for c in [
            ctx("c2", "g1", "g2"),
            ctx("c1", "g3", "g2"),
            ctx("c1", "g1", "g3"),
        ] {
            assert_eq!(open(&bob, &sealed, &c), Err(SealError::Open));
        }
        let mut other = ctx("c1", "g1", "g2");
        other.purpose = "other";
        assert_eq!(open(&bob, &sealed, &other), Err(SealError::Open));
        // Another recipient key: refused.
        let eve = StaticSecret::random_from_rng(&mut rng);
        assert_eq!(
            open(&eve, &sealed, &ctx("c1", "g1", "g2")),
            Err(SealError::Open)
        );
        // A flipped bit: refused.
        let mut bad = sealed.clone();
        bad.ciphertext[0] ^= 1;
        assert_eq!(
            open(&bob, &bad, &ctx("c1", "g1", "g2")),
            Err(SealError::Open)
        );
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        assert_eq!(
            seal_for(&[0u8; 32], b"x", &ctx("c", "a", "b"), &mut rng),
            Err(SealError::WeakRecipientKey)
        );
        let bob = StaticSecret::random_from_rng(&mut rng);
        let forged = Sealed {
            ephemeral: [0u8; 32],
            ciphertext: vec![0; 20],
        };
        assert_eq!(
            open(&bob, &forged, &ctx("c", "a", "b")),
            Err(SealError::WeakEphemeralKey)
        );
    }
}
