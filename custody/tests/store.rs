//! Key shares at rest: round trip, wrong passphrase, tampering, misfiling.

mod support;

use custos_custody::store::{self, StoreError};
use support::*;

#[test]
fn key_package_round_trips_and_each_failure_is_named() {
    let g = dkg(2, 3, 80);
    let k = kp(&g, 1);
    let file = store::seal_key_package(k, b"correct horse", "g1", "w1", &mut rng(81)).unwrap();
    assert_eq!(&file[..8], b"CUSTOSKS");
    assert_eq!(file[8], 1);
    let share = k.signing_share().serialize();
    assert!(!file.windows(share.len()).any(|w| w == share.as_slice()));
    assert_eq!(
        &store::open_key_package(&file, b"correct horse", "g1", "w1").unwrap(),
        k
    );

    assert_eq!(
        store::open_key_package(&file, b"wrong", "g1", "w1").unwrap_err(),
        StoreError::WrongPassphrase
    );
    assert_eq!(
        store::open_key_package(&file, b"correct horse", "g2", "w1").unwrap_err(),
        StoreError::Tampered
    );
    assert_eq!(
        store::open_key_package(&file, b"correct horse", "g1", "w2").unwrap_err(),
        StoreError::Tampered
    );
    let mut bad = file.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(
        store::open_key_package(&bad, b"correct horse", "g1", "w1").unwrap_err(),
        StoreError::Tampered
    );
    let mut bad = file.clone();
    bad[40] ^= 1; // the nonce, in the header
    assert_eq!(
        store::open_key_package(&bad, b"correct horse", "g1", "w1").unwrap_err(),
        StoreError::Tampered
    );
    let mut bad = file.clone();
    bad[8] = 2;
    assert_eq!(
        store::open_key_package(&bad, b"x", "g1", "w1").unwrap_err(),
        StoreError::UnsupportedVersion(2)
    );
    let mut bad = file.clone();
    bad[9..13].copy_from_slice(&8u32.to_be_bytes()); // m_cost 8 KiB: a downgrade
    assert!(matches!(
        store::open_key_package(&bad, b"x", "g1", "w1").unwrap_err(),
        StoreError::KdfParams { m: 8, .. }
    ));
    assert_eq!(
        store::open_key_package(&file[..50], b"x", "g1", "w1").unwrap_err(),
        StoreError::Truncated
    );
    assert_eq!(
        store::open_key_package(b"PK\x03\x04 not ours at all", b"x", "g1", "w1").unwrap_err(),
        StoreError::NotAShareFile
    );
    // A fresh salt and nonce per file.
    let again = store::seal_key_package(k, b"correct horse", "g1", "w1", &mut rng(82)).unwrap();
    assert_ne!(again[21..49], file[21..49]);
    // Generic secrets (e.g. identity keys) use the same format.
    let f = store::seal_secret(b"identity", b"pw", "g1", "identity", &mut rng(83)).unwrap();
    assert_eq!(
        store::open_secret(&f, b"pw", "g1", "identity")
            .unwrap()
            .as_slice(),
        b"identity"
    );
}
