//! HD wallets (BIP-39 mnemonic, BIP-32 derivation on secp256k1, BIP-44 paths)
//! and their Ethereum accounts.
//!
//! The mnemonic's entropy comes from the caller's RNG; the 64-byte seed is what
//! the signer keeps, sealed at rest with [`crate::store`] (argon2id +
//! ChaCha20-Poly1305, bound to the signer and the wallet). Every secret here
//! zeroizes on drop and shows as `<redacted>` in `Debug`.

use std::fmt;

use alloy_primitives::Address;
use hmac::{Hmac, Mac};
use k256::ecdsa::{SigningKey, VerifyingKey};
use k256::elliptic_curve::PrimeField;
use k256::{NonZeroScalar, Scalar};
use rand_core::{CryptoRng, RngCore};
use sha2::Sha512;
use zeroize::{Zeroize, Zeroizing};

use crate::store::{self, StoreError};

/// BIP-32's hardened-index flag.
pub const HARDENED: u32 = 0x8000_0000;
/// `m/44'/60'/0'`: the BIP-44 Ethereum account whose extended public key a
/// watch-only tool derives receive addresses from.
pub const ETH_ACCOUNT: [u32; 3] = [44 | HARDENED, 60 | HARDENED, HARDENED];
/// Mainnet `xpub` version bytes.
const XPUB_VERSION: [u8; 4] = [0x04, 0x88, 0xB2, 0x1E];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HdError {
    #[error("mnemonic: {0}")]
    Mnemonic(String),
    /// Probability about 2^-127 per step (BIP-32: move on to the next index).
    #[error("derivation path: index {0} gives an invalid key")]
    InvalidChild(u32),
    #[error("the seed does not give a valid master key")]
    InvalidMaster,
    #[error("sealed seed: {0}")]
    Store(#[from] StoreError),
    #[error("sealed seed: holds {0} bytes, a BIP-39 seed has 64")]
    SeedLength(usize),
}

/// A BIP-39 mnemonic (24 words from 32 bytes of entropy).
pub struct Mnemonic(bip39::Mnemonic);

impl fmt::Debug for Mnemonic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Mnemonic(<redacted>)")
    }
}

impl Mnemonic {
    /// A fresh 24-word mnemonic from `rng`.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Result<Mnemonic, HdError> {
        let mut entropy = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(entropy.as_mut());
        bip39::Mnemonic::from_entropy(entropy.as_ref())
            .map(Mnemonic)
            .map_err(|e| HdError::Mnemonic(e.to_string()))
    }

    /// Parses a phrase (checks words and checksum).
    pub fn parse(phrase: &str) -> Result<Mnemonic, HdError> {
        bip39::Mnemonic::parse_normalized(phrase)
            .map(Mnemonic)
            .map_err(|e| HdError::Mnemonic(e.to_string()))
    }

    /// The BIP-39 seed (PBKDF2-HMAC-SHA512, 2048 rounds) with an optional
    /// passphrase.
    pub fn to_seed(&self, passphrase: &str) -> Seed {
        Seed(Zeroizing::new(self.0.to_seed_normalized(passphrase)))
    }

    /// The words, for a backup shown once to an operator (never logged).
    pub fn phrase(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.to_string())
    }
}

/// A 64-byte BIP-39 seed: the root of every key of a wallet.
#[derive(Clone)]
pub struct Seed(Zeroizing<[u8; 64]>);

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

impl Seed {
    pub fn from_bytes(bytes: [u8; 64]) -> Seed {
        Seed(Zeroizing::new(bytes))
    }

    /// Encrypts the seed for `signer_id` and `wallet` (a file copied to another
    /// signer or wallet does not open).
    pub fn seal(
        &self,
        passphrase: &[u8],
        signer_id: &str,
        wallet: &str,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<u8>, HdError> {
        Ok(store::seal_secret(
            self.0.as_ref(),
            passphrase,
            signer_id,
            wallet,
            rng,
        )?)
    }

    /// Opens a file written by [`Seed::seal`].
    pub fn open(
        file: &[u8],
        passphrase: &[u8],
        signer_id: &str,
        wallet: &str,
    ) -> Result<Seed, HdError> {
        let plain = store::open_secret(file, passphrase, signer_id, wallet)?;
        let bytes: [u8; 64] = plain
            .as_slice()
            .try_into()
            .map_err(|_| HdError::SeedLength(plain.len()))?;
        Ok(Seed(Zeroizing::new(bytes)))
    }

    /// The BIP-32 master key.
    pub fn master(&self) -> Result<ExtendedKey, HdError> {
        let i = hmac_sha512(b"Bitcoin seed", &[self.0.as_ref()]);
        let key = scalar(&i[..32]).ok_or(HdError::InvalidMaster)?;
        let mut chain_code = Zeroizing::new([0u8; 32]);
        chain_code.copy_from_slice(&i[32..]);
        Ok(ExtendedKey {
            key: SigningKey::from(key),
            chain_code,
            depth: 0,
            parent_fingerprint: [0; 4],
            child_number: 0,
        })
    }

    /// The key at `path` (indices with [`HARDENED`] set are hardened).
    pub fn derive(&self, path: &[u32]) -> Result<ExtendedKey, HdError> {
        path.iter()
            .try_fold(self.master()?, |key, &index| key.child(index))
    }

    /// The Ethereum account `m/44'/60'/0'/0/index`.
    pub fn ethereum_account(&self, index: u32) -> Result<EthAccount, HdError> {
        let key = self.derive(&[ETH_ACCOUNT[0], ETH_ACCOUNT[1], ETH_ACCOUNT[2], 0, index])?;
        Ok(EthAccount::from_key(key.key))
    }

    /// The extended public key of `m/44'/60'/0'` (Base58Check `xpub`).
    pub fn ethereum_xpub(&self) -> Result<String, HdError> {
        Ok(self.derive(&ETH_ACCOUNT)?.xpub())
    }
}

fn hmac_sha512(key: &[u8], data: &[&[u8]]) -> Zeroizing<[u8; 64]> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for d in data {
        mac.update(d);
    }
    let mut out = Zeroizing::new([0u8; 64]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// A non-zero scalar below the group order, or `None` (BIP-32's invalid case).
fn scalar(bytes: &[u8]) -> Option<NonZeroScalar> {
    let mut repr = k256::FieldBytes::default();
    repr.copy_from_slice(bytes);
    let s: Option<Scalar> = Scalar::from_repr(repr).into();
    repr.zeroize();
    s.and_then(|s| NonZeroScalar::new(s).into())
}

/// A BIP-32 extended private key.
pub struct ExtendedKey {
    key: SigningKey,
    chain_code: Zeroizing<[u8; 32]>,
    depth: u8,
    parent_fingerprint: [u8; 4],
    child_number: u32,
}

impl fmt::Debug for ExtendedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtendedKey")
            .field("depth", &self.depth)
            .field("child_number", &self.child_number)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ExtendedKey {
    fn public_bytes(&self) -> [u8; 33] {
        compressed(self.key.verifying_key())
    }

    /// CKDpriv (BIP-32).
    pub fn child(&self, index: u32) -> Result<ExtendedKey, HdError> {
        let mut data = Zeroizing::new([0u8; 37]);
        if index & HARDENED != 0 {
            data[1..33].copy_from_slice(&self.key.to_bytes());
        } else {
            data[..33].copy_from_slice(&self.public_bytes());
        }
        data[33..].copy_from_slice(&index.to_be_bytes());
        let i = hmac_sha512(self.chain_code.as_ref(), &[data.as_ref()]);
        let tweak = scalar(&i[..32]).ok_or(HdError::InvalidChild(index))?;
        let sum = *tweak.as_ref() + self.key.as_nonzero_scalar().as_ref();
        let key: NonZeroScalar =
            Option::from(NonZeroScalar::new(sum)).ok_or(HdError::InvalidChild(index))?;
        let mut chain_code = Zeroizing::new([0u8; 32]);
        chain_code.copy_from_slice(&i[32..]);
        let id = hash160(&self.public_bytes());
        Ok(ExtendedKey {
            key: SigningKey::from(key),
            chain_code,
            depth: self.depth.saturating_add(1),
            parent_fingerprint: [id[0], id[1], id[2], id[3]],
            child_number: index,
        })
    }

    /// The Base58Check `xpub` serialization (BIP-32, mainnet version bytes).
    pub fn xpub(&self) -> String {
        let mut out = Vec::with_capacity(78);
        out.extend_from_slice(&XPUB_VERSION);
        out.push(self.depth);
        out.extend_from_slice(&self.parent_fingerprint);
        out.extend_from_slice(&self.child_number.to_be_bytes());
        out.extend_from_slice(self.chain_code.as_ref());
        out.extend_from_slice(&self.public_bytes());
        bs58::encode(out).with_check().into_string()
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

fn hash160(bytes: &[u8]) -> [u8; 20] {
    use bitcoin_hashes::{Hash, hash160};
    hash160::Hash::hash(bytes).to_byte_array()
}

fn compressed(key: &VerifyingKey) -> [u8; 33] {
    let mut out = [0u8; 33];
    out.copy_from_slice(key.to_encoded_point(true).as_bytes());
    out
}

/// An Ethereum account: its key and address.
pub struct EthAccount {
    key: SigningKey,
    pub address: Address,
}

impl fmt::Debug for EthAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EthAccount")
            .field("address", &self.address)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl EthAccount {
    pub fn from_key(key: SigningKey) -> EthAccount {
        let address = Address::from_public_key(key.verifying_key());
        EthAccount { key, address }
    }

    /// The EIP-55 (mixed-case checksum) address.
    pub fn checksummed(&self) -> String {
        self.address.to_checksum(None)
    }

    /// The compressed public key, hex (what the wallet's record pins).
    pub fn public_key_hex(&self) -> String {
        hex::encode(compressed(self.key.verifying_key()))
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BIP-32 test vector 1 (its seed is 16 bytes, so the master is made from
    /// it directly rather than through [`Seed`]).
    #[test]
    fn bip32_vector_1() {
        let raw = hex::decode("000102030405060708090a0b0c0d0e0f").expect("hex");
        let i = hmac_sha512(b"Bitcoin seed", &[&raw]);
        let master = ExtendedKey {
            key: SigningKey::from(scalar(&i[..32]).expect("valid")),
            chain_code: Zeroizing::new(i[32..].try_into().expect("32 bytes")),
            depth: 0,
            parent_fingerprint: [0; 4],
            child_number: 0,
        };
        assert_eq!(
            master.xpub(),
            "xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8"
        );
        let m0h = master.child(HARDENED).expect("m/0'");
        assert_eq!(
            m0h.xpub(),
            "xpub68Gmy5EdvgibQVfPdqkBBCHxA5htiqg55crXYuXoQRKfDBFA1WEjWgP6LHhwBZeNK1VTsfTFUHCdrfp1bgwQ9xv5ski8PX9rL2dZXvgGDnw"
        );
        let m0h1 = m0h.child(1).expect("m/0'/1");
        assert_eq!(
            m0h1.xpub(),
            "xpub6ASuArnXKPbfEwhqN6e3mwBcDTgzisQN1wXN9BJcM47sSikHjJf3UFHKkNAWbWMiGj7Wf5uMash7SyYq527Hqck2AxYysAA7xmALppuCkwQ"
        );
    }

    /// Anvil's (Hardhat's) dev mnemonic and its first account.
    #[test]
    fn ethereum_account_of_the_dev_mnemonic() {
        let m = Mnemonic::parse("test test test test test test test test test test test junk")
            .expect("mnemonic");
        let seed = m.to_seed("");
        let a0 = seed.ethereum_account(0).expect("account 0");
        assert_eq!(
            a0.checksummed(),
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
        );
        let a1 = seed.ethereum_account(1).expect("account 1");
        assert_eq!(
            a1.checksummed(),
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
        );
        assert!(seed.ethereum_xpub().expect("xpub").starts_with("xpub6"));
    }

    #[test]
    fn generated_mnemonics_come_from_the_rng_and_secrets_are_redacted() {
        use rand_core::SeedableRng;
        let mut a = rand_chacha::ChaCha20Rng::from_seed([7; 32]);
        let mut b = rand_chacha::ChaCha20Rng::from_seed([7; 32]);
        let (ma, mb) = (
            Mnemonic::generate(&mut a).expect("mnemonic"),
            Mnemonic::generate(&mut b).expect("mnemonic"),
        );
        assert_eq!(ma.phrase().as_str(), mb.phrase().as_str());
        assert_eq!(ma.phrase().split(' ').count(), 24);
        let other = Mnemonic::generate(&mut a).expect("mnemonic");
        assert_ne!(ma.phrase().as_str(), other.phrase().as_str());
        let seed = ma.to_seed("");
        let account = seed.ethereum_account(0).expect("account");
        for shown in [
            format!("{ma:?}"),
            format!("{seed:?}"),
            format!("{account:?}"),
            format!("{:?}", seed.master().expect("master")),
        ] {
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(!shown.contains(ma.phrase().as_str()), "{shown}");
        }
        assert!(Mnemonic::parse("test test test").is_err());
    }

    #[test]
    fn sealed_seed_opens_only_for_its_signer_and_wallet() {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([9; 32]);
        let seed = Mnemonic::generate(&mut rng).expect("mnemonic").to_seed("");
        let file = seed.seal(b"pass", "s1", "hot", &mut rng).expect("seal");
        let opened = Seed::open(&file, b"pass", "s1", "hot").expect("open");
        assert_eq!(
            opened.ethereum_account(0).expect("a").address,
            seed.ethereum_account(0).expect("a").address
        );
        assert!(matches!(
            Seed::open(&file, b"wrong", "s1", "hot"),
            Err(HdError::Store(StoreError::WrongPassphrase))
        ));
        assert!(matches!(
            Seed::open(&file, b"pass", "s1", "cold"),
            Err(HdError::Store(StoreError::Tampered))
        ));
    }
}
