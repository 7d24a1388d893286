//! The pure core of MPC-FROST custody (`frost-secp256k1-tr`, BIP-340/341).
//!
//! No IO, no clock and no ambient randomness: every function that needs randomness
//! takes `rng: &mut (impl RngCore + CryptoRng)`, and the guardian process around this
//! crate does the networking, the persistence and the timing.
//!
//! - [`identity`]: guardian identities (ed25519 + X25519) and the signed envelope
//!   every ceremony message travels in ([`identity::SignedMessage`], [`identity::Inbox`]).
//! - [`seal`]: end-to-end encryption of point-to-point ceremony payloads
//!   (X25519 + HKDF-SHA256 + ChaCha20-Poly1305), bound to (ceremony, sender, recipient).
//! - [`dkg`]: the per-guardian DKG state machine with an echo check and a transcript hash.
//! - [`address`]: the wallet's Taproot address from the (already tweaked) group key.
//! - [`taproot`]: a minimal transaction model and the BIP-341 `SIGHASH_DEFAULT`
//!   a guardian recomputes before it signs.
//! - [`sign`]: guardian-side signing sessions (single-use nonces, message check) and
//!   coordinator-side aggregation with cheater detection.
//! - [`store`]: key shares encrypted at rest (argon2id + ChaCha20-Poly1305).
//! - [`lifecycle`]: refresh (rotation), removal, addition by repair, lost-share repair.
//! - [`reshare`]: threshold change with the same group key by verifiable share
//!   redistribution (see `docs/threshold-change.md`).
//! - [`spend`]: Bitcoin-family spends: addresses to scripts, the deterministic
//!   builder, and the check a guardian runs before it signs ([`spend::check_spend`]).
//! - [`hd`]: HD wallets: BIP-39 mnemonics from the caller's RNG, BIP-32/44
//!   derivation, Ethereum accounts, the seed sealed at rest.
//! - [`evm`]: EIP-1559 transfers: the build, the check a signer runs before it
//!   signs ([`evm::check`]), low-S ECDSA signatures and the EIP-2718 envelope.
//! - [`sim`]: whole ceremonies run in process, for tests and compute benchmarks.

pub mod address;
mod conv;
pub mod dkg;
pub mod evm;
pub mod hd;
pub mod identity;
pub mod lifecycle;
pub mod reshare;
pub mod seal;
pub mod sign;
pub mod sim;
pub mod spend;
pub mod store;
pub mod taproot;

/// The FROST ciphersuite crate this core is built on, re-exported so that callers
/// use exactly the same types.
pub use frost_secp256k1_tr as frost;
pub use frost_secp256k1_tr::Identifier;
