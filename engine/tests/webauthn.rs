//! Passkey verification (`custos_engine::webauthn`) on vectors made here with a
//! fixed P-256 key, the way a platform authenticator makes them: registration
//! (none and packed self attestation) and assertions, and each tampering an
//! attacker or a broken client could bring.

use custos_engine::webauthn::{
    Assertion, PasskeyCredential, RelyingParty, WebauthnError, verify_assertion,
    verify_registration,
};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

const ORIGIN: &str = "http://localhost:8443";
const CHALLENGE: [u8; 32] = [0x5a; 32];
const CRED_ID: [u8; 16] = [0xc1; 16];

fn rp() -> RelyingParty {
    RelyingParty::from_public_url("http://localhost:8443/approve").expect("rp")
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32].into()).expect("key")
}

// A CBOR writer for the few shapes WebAuthn uses.
fn head(major: u8, n: u64) -> Vec<u8> {
    match n {
        0..=23 => vec![(major << 5) | n as u8],
        24..=0xff => vec![(major << 5) | 24, n as u8],
        0x100..=0xffff => [vec![(major << 5) | 25], (n as u16).to_be_bytes().to_vec()].concat(),
        _ => [vec![(major << 5) | 26], (n as u32).to_be_bytes().to_vec()].concat(),
    }
}
fn int(i: i64) -> Vec<u8> {
    if i >= 0 {
        head(0, i as u64)
    } else {
        head(1, (-1 - i) as u64)
    }
}
fn bytes(b: &[u8]) -> Vec<u8> {
    [head(2, b.len() as u64), b.to_vec()].concat()
}
fn text(t: &str) -> Vec<u8> {
    [head(3, t.len() as u64), t.as_bytes().to_vec()].concat()
}
fn map(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = head(5, entries.len() as u64);
    for (k, v) in entries {
        out.extend(k);
        out.extend(v);
    }
    out
}

fn cose_key(k: &SigningKey) -> Vec<u8> {
    let point = k.verifying_key().to_encoded_point(false);
    map(&[
        (int(1), int(2)),
        (int(3), int(-7)),
        (int(-1), int(1)),
        (int(-2), bytes(point.x().expect("x"))),
        (int(-3), bytes(point.y().expect("y"))),
    ])
}

fn b64(b: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(b)
}

fn client_data(kind: &str, challenge: &[u8], origin: &str) -> Vec<u8> {
    format!(
        r#"{{"type":"{kind}","challenge":"{}","origin":"{origin}","crossOrigin":false}}"#,
        b64(challenge)
    )
    .into_bytes()
}

/// Authenticator data: RP ID hash, flags, counter, optional attested data.
fn auth_data(rp_id: &str, flags: u8, count: u32, attested: Option<&SigningKey>) -> Vec<u8> {
    let mut out = Sha256::digest(rp_id.as_bytes()).to_vec();
    out.push(flags | if attested.is_some() { 0x40 } else { 0 });
    out.extend(count.to_be_bytes());
    if let Some(k) = attested {
        out.extend([0u8; 16]);
        out.extend((CRED_ID.len() as u16).to_be_bytes());
        out.extend(CRED_ID);
        out.extend(cose_key(k));
    }
    out
}

const UP_UV: u8 = 0x05;

fn sign(k: &SigningKey, auth: &[u8], client: &[u8]) -> Vec<u8> {
    let msg = [auth, Sha256::digest(client).as_slice()].concat();
    let sig: Signature = k.sign(&msg);
    sig.to_der().as_bytes().to_vec()
}

fn attestation(fmt: &str, statement: Vec<u8>, auth: &[u8]) -> Vec<u8> {
    map(&[
        (text("fmt"), text(fmt)),
        (text("attStmt"), statement),
        (text("authData"), bytes(auth)),
    ])
}

fn registered() -> PasskeyCredential {
    let client = client_data("webauthn.create", &CHALLENGE, ORIGIN);
    let auth = auth_data("localhost", UP_UV, 0, Some(&key()));
    verify_registration(
        &rp(),
        &CHALLENGE,
        &client,
        &attestation("none", map(&[]), &auth),
    )
    .expect("registration")
}

#[test]
fn relying_party_comes_from_the_public_url_and_refuses_ip_addresses() {
    let rp = rp();
    assert_eq!((rp.id(), rp.origin()), ("localhost", ORIGIN));
    let https = RelyingParty::from_public_url("https://Custos.Example.com:443/x").expect("https");
    assert_eq!(
        (https.id(), https.origin()),
        ("custos.example.com", "https://custos.example.com")
    );
    for (url, words) in [
        ("http://127.0.0.1:8080", "IP address"),
        ("https://[::1]:8080", "IP address"),
        ("http://custos.example.com", "secure context"),
        ("ftp://localhost", "not http(s)"),
        ("localhost:8080", "absolute URL"),
        ("https://bad_host", "not a domain name"),
    ] {
        let e = RelyingParty::from_public_url(url).expect_err(url);
        assert!(e.to_string().contains(words), "{url}: {e}");
        assert!(
            e.to_string().contains(url),
            "{url}: the error names the URL: {e}"
        );
    }
}

#[test]
fn registration_with_none_attestation_yields_the_credential() {
    let c = registered();
    assert_eq!(c.id, CRED_ID);
    assert_eq!(
        c.public_key,
        key().verifying_key().to_encoded_point(false).as_bytes()
    );
    assert_eq!(c.sign_count, 0);
}

#[test]
fn registration_with_packed_self_attestation_checks_its_signature() {
    let client = client_data("webauthn.create", &CHALLENGE, ORIGIN);
    let auth = auth_data("localhost", UP_UV, 1, Some(&key()));
    let sig = sign(&key(), &auth, &client);
    let st = map(&[(text("alg"), int(-7)), (text("sig"), bytes(&sig))]);
    let c = verify_registration(
        &rp(),
        &CHALLENGE,
        &client,
        &attestation("packed", st, &auth),
    )
    .expect("packed self attestation");
    assert_eq!(c.sign_count, 1);
    let other = SigningKey::from_bytes(&[9u8; 32].into()).expect("other");
    let forged = map(&[
        (text("alg"), int(-7)),
        (text("sig"), bytes(&sign(&other, &auth, &client))),
    ]);
    assert_eq!(
        verify_registration(
            &rp(),
            &CHALLENGE,
            &client,
            &attestation("packed", forged, &auth)
        ),
        Err(WebauthnError::BadSignature)
    );
    let x5c = map(&[
        (text("alg"), int(-7)),
        (text("sig"), bytes(&sig)),
        (text("x5c"), bytes(b"cert")),
    ]);
    assert!(matches!(
        verify_registration(
            &rp(),
            &CHALLENGE,
            &client,
            &attestation("packed", x5c, &auth)
        ),
        Err(WebauthnError::UnsupportedAttestation(_))
    ));
}

#[test]
fn registration_refusals() {
    let good_client = client_data("webauthn.create", &CHALLENGE, ORIGIN);
    let good_auth = auth_data("localhost", UP_UV, 0, Some(&key()));
    let cases: Vec<(Vec<u8>, Vec<u8>, WebauthnError)> = vec![
        (
            client_data("webauthn.get", &CHALLENGE, ORIGIN),
            good_auth.clone(),
            WebauthnError::WrongType {
                expected: "webauthn.create",
                got: "webauthn.get".into(),
            },
        ),
        (
            client_data("webauthn.create", &[0u8; 32], ORIGIN),
            good_auth.clone(),
            WebauthnError::ChallengeMismatch,
        ),
        (
            client_data("webauthn.create", &CHALLENGE, "http://evil.example"),
            good_auth.clone(),
            WebauthnError::OriginMismatch {
                expected: ORIGIN.into(),
                got: "http://evil.example".into(),
            },
        ),
        (
            good_client.clone(),
            auth_data("evil.example", UP_UV, 0, Some(&key())),
            WebauthnError::RpIdMismatch,
        ),
        (
            good_client.clone(),
            auth_data("localhost", 0x01, 0, Some(&key())),
            WebauthnError::UserNotVerified,
        ),
        (
            good_client.clone(),
            auth_data("localhost", 0x04, 0, Some(&key())),
            WebauthnError::UserNotPresent,
        ),
    ];
    for (client, auth, want) in cases {
        assert_eq!(
            verify_registration(
                &rp(),
                &CHALLENGE,
                &client,
                &attestation("none", map(&[]), &auth)
            ),
            Err(want)
        );
    }
    // Truncated or garbled input is an error naming the part, never a panic.
    let whole = attestation("none", map(&[]), &good_auth);
    for cut in 0..whole.len() {
        let got = verify_registration(&rp(), &CHALLENGE, &good_client, &whole[..cut]);
        assert!(
            matches!(got, Err(WebauthnError::Malformed { .. })),
            "cut at {cut}: {got:?}"
        );
    }
    let rs256 = {
        let mut a = auth_data("localhost", UP_UV, 0, None);
        a[32] |= 0x40;
        a.extend([0u8; 16]);
        a.extend((CRED_ID.len() as u16).to_be_bytes());
        a.extend(CRED_ID);
        a.extend(map(&[(int(1), int(3)), (int(3), int(-257))]));
        a
    };
    assert!(matches!(
        verify_registration(
            &rp(),
            &CHALLENGE,
            &good_client,
            &attestation("none", map(&[]), &rs256)
        ),
        Err(WebauthnError::UnsupportedKey(_))
    ));
}

/// An assertion by the test key over `challenge` with counter `count`.
fn asserted(
    challenge: &[u8],
    origin: &str,
    rp_id: &str,
    count: u32,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let client = client_data("webauthn.get", challenge, origin);
    let auth = auth_data(rp_id, UP_UV, count, None);
    let sig = sign(&key(), &auth, &client);
    (client, auth, sig)
}

fn check(
    c: &PasskeyCredential,
    challenge: &[u8],
    v: &(Vec<u8>, Vec<u8>, Vec<u8>),
) -> Result<u32, WebauthnError> {
    verify_assertion(
        &rp(),
        c,
        challenge,
        &Assertion {
            credential_id: &CRED_ID,
            client_data_json: &v.0,
            authenticator_data: &v.1,
            signature: &v.2,
        },
    )
}

#[test]
fn assertions_verify_and_every_tampering_is_refused() {
    let c = registered();
    let good = asserted(&CHALLENGE, ORIGIN, "localhost", 1);
    assert_eq!(check(&c, &CHALLENGE, &good), Ok(1));

    let mut tampered = good.clone();
    let last = tampered.2.len() - 2;
    tampered.2[last] ^= 1;
    assert_eq!(
        check(&c, &CHALLENGE, &tampered),
        Err(WebauthnError::BadSignature)
    );
    let mut flipped = good.clone();
    flipped.1[36] = 9; // the counter, after signing
    assert_eq!(
        check(&c, &CHALLENGE, &flipped),
        Err(WebauthnError::BadSignature)
    );

    assert_eq!(
        check(
            &c,
            &CHALLENGE,
            &asserted(&CHALLENGE, "http://localhost:9999", "localhost", 1)
        ),
        Err(WebauthnError::OriginMismatch {
            expected: ORIGIN.into(),
            got: "http://localhost:9999".into()
        })
    );
    assert_eq!(
        check(
            &c,
            &CHALLENGE,
            &asserted(&CHALLENGE, ORIGIN, "example.com", 1)
        ),
        Err(WebauthnError::RpIdMismatch)
    );
    // A response to an earlier challenge presented against the current one.
    assert_eq!(
        check(&c, &[1u8; 32], &good),
        Err(WebauthnError::ChallengeMismatch)
    );
    let other = verify_assertion(
        &rp(),
        &c,
        &CHALLENGE,
        &Assertion {
            credential_id: b"another",
            client_data_json: &good.0,
            authenticator_data: &good.1,
            signature: &good.2,
        },
    );
    assert_eq!(other, Err(WebauthnError::UnknownCredential));
    let without_uv = {
        let client = client_data("webauthn.get", &CHALLENGE, ORIGIN);
        let auth = auth_data("localhost", 0x01, 1, None);
        let sig = sign(&key(), &auth, &client);
        (client, auth, sig)
    };
    assert_eq!(
        check(&c, &CHALLENGE, &without_uv),
        Err(WebauthnError::UserNotVerified)
    );
}

#[test]
fn the_signature_counter_must_grow_unless_both_are_zero() {
    let mut c = registered();
    assert_eq!(
        check(
            &c,
            &CHALLENGE,
            &asserted(&CHALLENGE, ORIGIN, "localhost", 0)
        ),
        Ok(0),
        "an authenticator without a counter"
    );
    c.sign_count = 5;
    assert_eq!(
        check(
            &c,
            &CHALLENGE,
            &asserted(&CHALLENGE, ORIGIN, "localhost", 6)
        ),
        Ok(6)
    );
    for got in [5, 4, 0] {
        assert_eq!(
            check(
                &c,
                &CHALLENGE,
                &asserted(&CHALLENGE, ORIGIN, "localhost", got)
            ),
            Err(WebauthnError::CounterRegressed { stored: 5, got }),
            "a clone (or a replay) shows as counter {got} after 5"
        );
    }
}
