//! WebAuthn passkeys, relying-party side (W3C Web Authentication, level 2):
//! registration with `none` or `packed` self attestation, and assertions, for
//! ES256 (ECDSA P-256 with SHA-256) credentials only, the algorithm every
//! platform authenticator offers. Pure: the caller stores credentials and
//! single-use challenges and passes them in.
//!
//! What is checked, in both ceremonies: the client data's type, challenge and
//! origin (never cross-origin); the authenticator data's RP ID hash, user
//! presence and user verification (a passkey here is a second factor, so the
//! authenticator must have verified the user). A registration yields the
//! credential id and public key; an assertion is verified over
//! `authenticatorData || SHA-256(clientDataJSON)`, and its signature counter
//! must grow whenever either side is non-zero (a clone shows as a regression).

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a passkey ceremony was refused. Messages say what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebauthnError {
    #[error("passkeys need a relying party: {0}")]
    RelyingParty(String),
    #[error("malformed {field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error("client data type is {got:?}, expected {expected:?}")]
    WrongType { expected: &'static str, got: String },
    #[error("the challenge is not the one this server issued (stale page or replay)")]
    ChallengeMismatch,
    #[error("origin {got:?} is not this server's ({expected})")]
    OriginMismatch { expected: String, got: String },
    #[error("cross-origin ceremonies are refused")]
    CrossOrigin,
    #[error("the authenticator answered for another relying party (RP ID hash)")]
    RpIdMismatch,
    #[error("the authenticator did not confirm user presence")]
    UserNotPresent,
    #[error("the authenticator did not verify the user (PIN or biometrics)")]
    UserNotVerified,
    #[error("unsupported credential: {0}")]
    UnsupportedKey(String),
    #[error("unsupported attestation: {0}")]
    UnsupportedAttestation(String),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("this passkey is not enrolled for the user")]
    UnknownCredential,
    #[error("signature counter went from {stored} to {got}: the passkey may have been cloned")]
    CounterRegressed { stored: u32, got: u32 },
}

fn malformed(field: &'static str, reason: impl Into<String>) -> WebauthnError {
    WebauthnError::Malformed {
        field,
        reason: reason.into(),
    }
}

/// The relying party: its RP ID (a domain) and the origin pages are served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelyingParty {
    id: String,
    origin: String,
}

impl RelyingParty {
    /// From the public URL the approval pages are served under. The RP ID is its
    /// host, which must be a domain name (browsers refuse IP addresses), and the
    /// page must be a secure context: `https://`, or `http://localhost`.
    pub fn from_public_url(url: &str) -> Result<Self, WebauthnError> {
        let bad = |m: String| WebauthnError::RelyingParty(format!("public URL {url:?}: {m}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not an absolute URL".into()))?;
        let scheme = scheme.to_ascii_lowercase();
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(bad("user information is not allowed".into()));
        }
        if authority.starts_with('[') {
            return Err(bad(
                "an IP address cannot be a passkey RP ID: use a domain name (locally, http://localhost:PORT)".into(),
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p.parse().map_err(|_| bad(format!("bad port {p:?}")))?;
                (h.to_ascii_lowercase(), Some(port))
            }
            None => (authority.to_ascii_lowercase(), None),
        };
        if host.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err(bad(
                "an IP address cannot be a passkey RP ID: use a domain name (locally, http://localhost:PORT)".into(),
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad(format!("{host:?} is not a domain name")));
        }
        let default_port = match scheme.as_str() {
            "https" => 443,
            "http" if host == "localhost" => 80,
            "http" => {
                return Err(bad(
                    "passkeys need a secure context: https://, or http://localhost".into(),
                ));
            }
            other => return Err(bad(format!("scheme {other:?} is not http(s)"))),
        };
        let origin = match port {
            Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
            _ => format!("{scheme}://{host}"),
        };
        Ok(RelyingParty { id: host, origin })
    }

    /// The RP ID browsers scope credentials to (the host).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The origin the browser reports in client data.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// An enrolled passkey: public data only (nothing here is secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PasskeyCredential {
    /// Credential id, as the authenticator chose it.
    #[serde(with = "b64")]
    pub id: Vec<u8>,
    /// P-256 public key, SEC1 uncompressed (65 bytes).
    #[serde(with = "b64")]
    pub public_key: Vec<u8>,
    /// The last signature counter seen.
    pub sign_count: u32,
}

mod b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::BASE64URL_NOPAD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        data_encoding::BASE64URL_NOPAD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// What a browser's `navigator.credentials.get` returned.
#[derive(Debug, Clone, Copy)]
pub struct Assertion<'a> {
    pub credential_id: &'a [u8],
    pub client_data_json: &'a [u8],
    pub authenticator_data: &'a [u8],
    /// DER-encoded ECDSA signature.
    pub signature: &'a [u8],
}

const FLAG_UP: u8 = 0x01;
const FLAG_UV: u8 = 0x04;
const FLAG_AT: u8 = 0x40;
const FLAG_ED: u8 = 0x80;
/// COSE algorithm id of ES256.
const ES256: i128 = -7;

/// Verifies a registration (`navigator.credentials.create`) answering
/// `challenge`, and returns the credential to store.
pub fn verify_registration(
    rp: &RelyingParty,
    challenge: &[u8],
    client_data_json: &[u8],
    attestation_object: &[u8],
) -> Result<PasskeyCredential, WebauthnError> {
    check_client_data(rp, challenge, client_data_json, "webauthn.create")?;
    let (object, rest) = cbor::parse(attestation_object, "attestationObject")?;
    if !rest.is_empty() {
        return Err(malformed("attestationObject", "trailing bytes"));
    }
    let fmt = object
        .get_text("fmt")
        .and_then(cbor::Value::as_text)
        .ok_or_else(|| malformed("attestationObject", "no fmt"))?;
    let statement = object
        .get_text("attStmt")
        .and_then(cbor::Value::as_map)
        .ok_or_else(|| malformed("attestationObject", "no attStmt"))?;
    let auth_data = object
        .get_text("authData")
        .and_then(cbor::Value::as_bytes)
        .ok_or_else(|| malformed("attestationObject", "no authData"))?;
    let data = AuthenticatorData::parse(auth_data)?;
    data.check(rp)?;
    let (id, key) = data
        .attested
        .ok_or_else(|| malformed("authenticatorData", "no attested credential data"))?;
    match fmt {
        "none" if statement.is_empty() => {}
        "none" => return Err(malformed("attStmt", "must be empty for fmt \"none\"")),
        "packed" => {
            let st = cbor::Value::Map(statement.to_vec());
            if st.get_text("x5c").is_some() {
                return Err(WebauthnError::UnsupportedAttestation(
                    "packed attestation with a certificate chain; use none or self attestation"
                        .into(),
                ));
            }
            if st.get_text("alg").and_then(cbor::Value::as_int) != Some(ES256) {
                return Err(WebauthnError::UnsupportedAttestation(
                    "packed self attestation must use ES256".into(),
                ));
            }
            let sig = st
                .get_text("sig")
                .and_then(cbor::Value::as_bytes)
                .ok_or_else(|| malformed("attStmt", "no sig"))?;
            verify_signature(&key, auth_data, client_data_json, sig)?;
        }
        other => {
            return Err(WebauthnError::UnsupportedAttestation(format!(
                "format {other:?} (accepted: none, packed self attestation)"
            )));
        }
    }
    Ok(PasskeyCredential {
        id: id.to_vec(),
        public_key: key.to_encoded_point(false).as_bytes().to_vec(),
        sign_count: data.sign_count,
    })
}

/// Verifies an assertion (`navigator.credentials.get`) answering `challenge`
/// with `credential`; returns the new signature counter to store.
pub fn verify_assertion(
    rp: &RelyingParty,
    credential: &PasskeyCredential,
    challenge: &[u8],
    assertion: &Assertion<'_>,
) -> Result<u32, WebauthnError> {
    if assertion.credential_id != credential.id.as_slice() {
        return Err(WebauthnError::UnknownCredential);
    }
    check_client_data(rp, challenge, assertion.client_data_json, "webauthn.get")?;
    let data = AuthenticatorData::parse(assertion.authenticator_data)?;
    data.check(rp)?;
    let key = VerifyingKey::from_sec1_bytes(&credential.public_key)
        .map_err(|_| WebauthnError::UnsupportedKey("the stored public key is not P-256".into()))?;
    verify_signature(
        &key,
        assertion.authenticator_data,
        assertion.client_data_json,
        assertion.signature,
    )?;
    let (stored, got) = (credential.sign_count, data.sign_count);
    if (stored != 0 || got != 0) && got <= stored {
        return Err(WebauthnError::CounterRegressed { stored, got });
    }
    Ok(got)
}

fn verify_signature(
    key: &VerifyingKey,
    auth_data: &[u8],
    client_data_json: &[u8],
    der: &[u8],
) -> Result<(), WebauthnError> {
    let signature = Signature::from_der(der).map_err(|_| WebauthnError::BadSignature)?;
    let message = [auth_data, Sha256::digest(client_data_json).as_slice()].concat();
    key.verify(&message, &signature)
        .map_err(|_| WebauthnError::BadSignature)
}

#[derive(Deserialize)]
struct ClientData {
    #[serde(rename = "type")]
    kind: String,
    challenge: String,
    origin: String,
    #[serde(rename = "crossOrigin", default)]
    cross_origin: bool,
}

fn check_client_data(
    rp: &RelyingParty,
    challenge: &[u8],
    json: &[u8],
    expected: &'static str,
) -> Result<(), WebauthnError> {
    let data: ClientData =
        serde_json::from_slice(json).map_err(|e| malformed("clientDataJSON", e.to_string()))?;
    if data.kind != expected {
        return Err(WebauthnError::WrongType {
            expected,
            got: data.kind,
        });
    }
    let given = data_encoding::BASE64URL_NOPAD
        .decode(data.challenge.trim_end_matches('=').as_bytes())
        .map_err(|_| malformed("clientDataJSON.challenge", "not base64url"))?;
    if given != challenge {
        return Err(WebauthnError::ChallengeMismatch);
    }
    if data.origin != rp.origin {
        return Err(WebauthnError::OriginMismatch {
            expected: rp.origin.clone(),
            got: data.origin,
        });
    }
    if data.cross_origin {
        return Err(WebauthnError::CrossOrigin);
    }
    Ok(())
}

struct AuthenticatorData<'a> {
    rp_id_hash: &'a [u8],
    flags: u8,
    sign_count: u32,
    attested: Option<(&'a [u8], VerifyingKey)>,
}

impl<'a> AuthenticatorData<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, WebauthnError> {
        let field = "authenticatorData";
        if bytes.len() < 37 {
            return Err(malformed(
                field,
                format!("{} bytes, at least 37", bytes.len()),
            ));
        }
        let flags = bytes[32];
        let sign_count = u32::from_be_bytes([bytes[33], bytes[34], bytes[35], bytes[36]]);
        let mut rest = &bytes[37..];
        let attested = if flags & FLAG_AT != 0 {
            if rest.len() < 18 {
                return Err(malformed(field, "attested credential data truncated"));
            }
            let len = usize::from(u16::from_be_bytes([rest[16], rest[17]]));
            let after = &rest[18..];
            if len == 0 || len > 1023 || after.len() < len {
                return Err(malformed(field, format!("credential id of {len} bytes")));
            }
            let (id, after) = after.split_at(len);
            let (key, after) = cbor::parse(after, "credentialPublicKey")?;
            rest = after;
            Some((id, cose_p256(&key)?))
        } else {
            None
        };
        if flags & FLAG_ED == 0 && !rest.is_empty() {
            return Err(malformed(field, "trailing bytes"));
        }
        Ok(AuthenticatorData {
            rp_id_hash: &bytes[..32],
            flags,
            sign_count,
            attested,
        })
    }

    fn check(&self, rp: &RelyingParty) -> Result<(), WebauthnError> {
        if self.rp_id_hash != Sha256::digest(rp.id.as_bytes()).as_slice() {
            return Err(WebauthnError::RpIdMismatch);
        }
        if self.flags & FLAG_UP == 0 {
            return Err(WebauthnError::UserNotPresent);
        }
        if self.flags & FLAG_UV == 0 {
            return Err(WebauthnError::UserNotVerified);
        }
        Ok(())
    }
}

/// A COSE_Key that must be EC2 / ES256 / P-256.
fn cose_p256(key: &cbor::Value<'_>) -> Result<VerifyingKey, WebauthnError> {
    let int = |k: i128| key.get_int(k).and_then(cbor::Value::as_int);
    let coord = |k: i128| {
        key.get_int(k)
            .and_then(cbor::Value::as_bytes)
            .filter(|b| b.len() == 32)
    };
    if int(1) != Some(2) || int(3) != Some(ES256) || int(-1) != Some(1) {
        return Err(WebauthnError::UnsupportedKey(
            "only ES256 (EC2, P-256) credentials are accepted".into(),
        ));
    }
    let (Some(x), Some(y)) = (coord(-2), coord(-3)) else {
        return Err(malformed("credentialPublicKey", "x and y must be 32 bytes"));
    };
    let sec1 = [&[0x04][..], x, y].concat();
    VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| WebauthnError::UnsupportedKey("the point is not on P-256".into()))
}

/// The CBOR that WebAuthn uses (CTAP2 canonical: definite lengths, no tags or
/// floats), read without copying. Nesting is bounded.
mod cbor {
    use super::{WebauthnError, malformed};

    const MAX_DEPTH: usize = 8;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Value<'a> {
        Int(i128),
        Bytes(&'a [u8]),
        Text(&'a str),
        Array(Vec<Value<'a>>),
        Map(Vec<(Value<'a>, Value<'a>)>),
        Bool(bool),
        Null,
    }

    impl<'a> Value<'a> {
        pub fn as_int(&self) -> Option<i128> {
            match self {
                Value::Int(i) => Some(*i),
                _ => None,
            }
        }
        pub fn as_bytes(&self) -> Option<&'a [u8]> {
            match self {
                Value::Bytes(b) => Some(b),
                _ => None,
            }
        }
        pub fn as_text(&self) -> Option<&'a str> {
            match self {
                Value::Text(t) => Some(t),
                _ => None,
            }
        }
        pub fn as_map(&self) -> Option<&[(Value<'a>, Value<'a>)]> {
            match self {
                Value::Map(m) => Some(m),
                _ => None,
            }
        }
        pub fn get_text(&self, key: &str) -> Option<&Value<'a>> {
            self.as_map()?
                .iter()
                .find(|(k, _)| k.as_text() == Some(key))
                .map(|(_, v)| v)
        }
        pub fn get_int(&self, key: i128) -> Option<&Value<'a>> {
            self.as_map()?
                .iter()
                .find(|(k, _)| k.as_int() == Some(key))
                .map(|(_, v)| v)
        }
    }

    /// One value from the start of `input`, and what follows it.
    pub fn parse<'a>(
        input: &'a [u8],
        field: &'static str,
    ) -> Result<(Value<'a>, &'a [u8]), WebauthnError> {
        item(input, field, 0)
    }

    fn item<'a>(
        input: &'a [u8],
        field: &'static str,
        depth: usize,
    ) -> Result<(Value<'a>, &'a [u8]), WebauthnError> {
        if depth > MAX_DEPTH {
            return Err(malformed(field, "nested too deeply"));
        }
        let (&first, mut rest) = input
            .split_first()
            .ok_or_else(|| malformed(field, "truncated CBOR"))?;
        let (major, info) = (first >> 5, first & 0x1f);
        let arg: u64 = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let n = 1usize << (info - 24);
                if rest.len() < n {
                    return Err(malformed(field, "truncated CBOR"));
                }
                let (b, r) = rest.split_at(n);
                rest = r;
                b.iter().fold(0u64, |a, x| (a << 8) | u64::from(*x))
            }
            _ => return Err(malformed(field, "indefinite lengths are not allowed")),
        };
        let take = |rest: &'a [u8], n: u64| -> Result<(&'a [u8], &'a [u8]), WebauthnError> {
            let n = usize::try_from(n).map_err(|_| malformed(field, "length too large"))?;
            if rest.len() < n {
                return Err(malformed(field, "truncated CBOR"));
            }
            Ok(rest.split_at(n))
        };
        // Every element takes at least one byte: bounds allocations by the input.
        let count = |n: u64, rest: &[u8]| -> Result<usize, WebauthnError> {
            usize::try_from(n)
                .ok()
                .filter(|n| *n <= rest.len())
                .ok_or_else(|| malformed(field, "length beyond the input"))
        };
        match major {
            0 => Ok((Value::Int(i128::from(arg)), rest)),
            1 => Ok((Value::Int(-1 - i128::from(arg)), rest)),
            2 => {
                let (b, r) = take(rest, arg)?;
                Ok((Value::Bytes(b), r))
            }
            3 => {
                let (b, r) = take(rest, arg)?;
                let text = std::str::from_utf8(b).map_err(|_| malformed(field, "bad UTF-8"))?;
                Ok((Value::Text(text), r))
            }
            4 => {
                let n = count(arg, rest)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let (v, r) = item(rest, field, depth + 1)?;
                    items.push(v);
                    rest = r;
                }
                Ok((Value::Array(items), rest))
            }
            5 => {
                let n = count(arg, rest)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let (k, r) = item(rest, field, depth + 1)?;
                    let (v, r) = item(r, field, depth + 1)?;
                    entries.push((k, v));
                    rest = r;
                }
                Ok((Value::Map(entries), rest))
            }
            7 => match info {
                20 => Ok((Value::Bool(false), rest)),
                21 => Ok((Value::Bool(true), rest)),
                22 => Ok((Value::Null, rest)),
                _ => Err(malformed(field, "unsupported simple value or float")),
            },
            _ => Err(malformed(field, "tags are not allowed")),
        }
    }
}
