//! Shared helpers for the custody tests.
#![allow(dead_code)]

use custos_custody::frost::keys::{KeyPackage, PublicKeyPackage};
use custos_custody::sign::Sighash;
use custos_custody::sim::{self, Group};
use custos_custody::{Identifier, address};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

pub fn id(i: u16) -> Identifier {
    Identifier::try_from(i).expect("non-zero identifier")
}

pub fn dkg(t: u16, n: u16, seed: u64) -> Group {
    sim::run_dkg(&format!("dkg-{t}-{n}-{seed}"), t, n, &mut rng(seed)).expect("DKG")
}

pub fn kp(g: &Group, i: u16) -> &KeyPackage {
    g.key_package(i).expect("member")
}

pub fn msg(tag: u8) -> Sighash {
    Sighash::from_recomputed([tag; 32])
}

/// Signs with the given key packages and checks the result with k256's BIP-340
/// verifier under the wallet's output key; returns whether it verified.
pub fn signs(kps: &[&KeyPackage], pkp: &PublicKeyPackage, seed: u64) -> bool {
    let m = msg(seed as u8);
    match sim::run_signing(kps, pkp, &m, &mut rng(seed)) {
        Ok(sig) => {
            let w = address::wallet(pkp.verifying_key(), "bcrt").expect("address");
            let vk = k256::schnorr::VerifyingKey::from_bytes(&w.output_key).expect("output key");
            let sig =
                k256::schnorr::Signature::try_from(sig.signature().as_slice()).expect("64 bytes");
            vk.verify_raw(m.as_bytes(), &sig).is_ok()
        }
        Err(_) => false,
    }
}
