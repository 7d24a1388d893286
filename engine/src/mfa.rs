//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA-1, six
//! digits, 30-second steps, one step of clock drift either way, the profile every
//! authenticator app speaks. Pure: the caller passes the secret and the time, and
//! keeps the [`TotpState`] (replay and lockout) between attempts.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use zeroize::Zeroizing;

/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Seconds per time step.
pub const STEP_SECS: u64 = 30;
/// Steps of drift accepted on either side of the current one.
pub const DRIFT_STEPS: u64 = 1;
/// Length of the secrets Custos generates (RFC 4226 recommends 160 bits).
pub const SECRET_LEN: usize = 20;
/// Shortest secret accepted (RFC 4226 requires 128 bits).
const MIN_SECRET_LEN: usize = 16;
const MAX_SECRET_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MfaError {
    #[error("a TOTP secret must be {MIN_SECRET_LEN} to {MAX_SECRET_LEN} bytes, got {0}")]
    SecretLength(usize),
    #[error("a TOTP secret must be base32 (RFC 4648)")]
    SecretEncoding,
}

/// A shared TOTP secret. Zeroized on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpSecret(Zeroizing<Vec<u8>>);

impl TotpSecret {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MfaError> {
        if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
            return Err(MfaError::SecretLength(bytes.len()));
        }
        Ok(TotpSecret(Zeroizing::new(bytes.to_vec())))
    }

    /// From the base32 form authenticator apps show (case, spaces and padding
    /// forgiven).
    pub fn from_base32(text: &str) -> Result<Self, MfaError> {
        let cleaned: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|c| !c.is_whitespace() && *c != '=')
                .map(|c| c.to_ascii_uppercase())
                .collect(),
        );
        let bytes = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .decode(cleaned.as_bytes())
                .map_err(|_| MfaError::SecretEncoding)?,
        );
        Self::from_bytes(&bytes)
    }

    /// The base32 form (no padding), as enrolment shows it.
    pub fn to_base32(&self) -> Zeroizing<String> {
        Zeroizing::new(data_encoding::BASE32_NOPAD.encode(&self.0))
    }

    pub fn expose_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret(<redacted>)")
    }
}

/// RFC 4226 HOTP value of `counter` with `digits` digits (at most 9).
pub fn hotp(secret: &TotpSecret, counter: u64, digits: u32) -> u32 {
    // HMAC accepts keys of any length; the error branch cannot be taken.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.expose_bytes()) else {
        return 0;
    };
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[19] & 0x0f);
    let binary = u32::from_be_bytes([
        digest[offset] & 0x7f,
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]);
    binary % 10u32.pow(digits.min(9))
}

/// The time step of a Unix time.
pub fn step_at(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The six-digit code an authenticator shows at `unix_secs`.
pub fn code_at(secret: &TotpSecret, unix_secs: u64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step_at(unix_secs), DIGITS),
        width = DIGITS as usize
    )
}

/// How many consecutive failures lock a user out, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    pub max_failures: u32,
    pub period_secs: u64,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout {
            max_failures: 5,
            period_secs: 15 * 60,
        }
    }
}

/// What verification remembers about one user between attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TotpState {
    /// The last time step a code was accepted for: it and earlier steps are spent.
    #[serde(default)]
    pub last_step: Option<u64>,
    /// Consecutive failed attempts.
    #[serde(default)]
    pub failures: u32,
    /// Unix seconds until which every attempt is refused.
    #[serde(default)]
    pub locked_until: Option<u64>,
}

/// Why a code was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TotpRefusal {
    #[error("the code must be {DIGITS} digits")]
    Malformed,
    #[error("wrong code")]
    Wrong,
    #[error("this code was already used; wait for the next one")]
    Replayed,
    #[error("too many wrong codes; locked until {until} (Unix seconds)")]
    LockedOut { until: u64 },
}

/// The result of one attempt: the state to keep, and the accepted step or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub state: TotpState,
    pub outcome: Result<u64, TotpRefusal>,
}

/// Checks `code` at `now_secs` against `secret`, given what `state` remembers. A
/// code is accepted only for a step later than the last accepted one (replay), and
/// after `lockout.max_failures` consecutive failures every attempt is refused for
/// `lockout.period_secs`, a right code included. Malformed and replayed codes count
/// as failures: each is a guess.
pub fn verify(
    secret: &TotpSecret,
    state: &TotpState,
    code: &str,
    now_secs: u64,
    lockout: Lockout,
) -> Attempt {
    let mut next = state.clone();
    if let Some(until) = state.locked_until {
        if now_secs < until {
            return Attempt {
                state: next,
                outcome: Err(TotpRefusal::LockedOut { until }),
            };
        }
        next.locked_until = None;
        next.failures = 0;
    }
    let outcome = match parse_code(code) {
        None => Err(TotpRefusal::Malformed),
        Some(given) => match_step(secret, given, now_secs, state.last_step),
    };
    match outcome {
        Ok(step) => {
            next.last_step = Some(step);
            next.failures = 0;
            Attempt {
                state: next,
                outcome: Ok(step),
            }
        }
        Err(refusal) => {
            next.failures = next.failures.saturating_add(1);
            if next.failures >= lockout.max_failures {
                let until = now_secs.saturating_add(lockout.period_secs);
                next.locked_until = Some(until);
            }
            Attempt {
                state: next,
                outcome: Err(refusal),
            }
        }
    }
}

fn parse_code(code: &str) -> Option<u32> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

/// The latest unspent step within the drift window whose code is `given`. Every
/// candidate is computed and compared, so timing does not tell which one matched.
fn match_step(
    secret: &TotpSecret,
    given: u32,
    now_secs: u64,
    last_step: Option<u64>,
) -> Result<u64, TotpRefusal> {
    let now = step_at(now_secs);
    let mut fresh = None;
    let mut spent = false;
    for step in now.saturating_sub(DRIFT_STEPS)..=now.saturating_add(DRIFT_STEPS) {
        let same = (hotp(secret, step, DIGITS) ^ given) == 0;
        let unspent = last_step.is_none_or(|last| step > last);
        if same && unspent {
            fresh = Some(step);
        }
        spent |= same && !unspent;
    }
    match (fresh, spent) {
        (Some(step), _) => Ok(step),
        (None, true) => Err(TotpRefusal::Replayed),
        (None, false) => Err(TotpRefusal::Wrong),
    }
}

/// The `otpauth://` URI an authenticator app enrols from (usually shown as a QR
/// code). It holds the secret: zeroized on drop.
pub fn otpauth_uri(secret: &TotpSecret, issuer: &str, account: &str) -> Zeroizing<String> {
    let issuer = percent_encode(issuer);
    Zeroizing::new(format!(
        "otpauth://totp/{issuer}:{account}?secret={secret}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        account = percent_encode(account),
        secret = secret.to_base32().as_str(),
    ))
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc_secret() -> TotpSecret {
        TotpSecret::from_bytes(b"12345678901234567890").expect("secret")
    }

    #[test]
    fn rfc4226_hotp_vectors() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, want) in expected.into_iter().enumerate() {
            assert_eq!(hotp(&rfc_secret(), counter as u64, 6), want);
        }
    }

    #[test]
    fn rfc6238_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1 column (8 digits), and their 6-digit tails.
        let vectors: [(u64, u32); 6] = [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ];
        for (t, want) in vectors {
            assert_eq!(hotp(&rfc_secret(), step_at(t), 8), want, "T={t}");
            assert_eq!(
                code_at(&rfc_secret(), t),
                format!("{:06}", want % 1_000_000)
            );
        }
    }

    #[test]
    fn accepts_one_step_of_drift_and_no_more() {
        let s = rfc_secret();
        let now: u64 = 1_000_000_000;
        for (offset, ok) in [
            (-60i64, false),
            (-30, true),
            (0, true),
            (30, true),
            (60, false),
        ] {
            let at = now.checked_add_signed(offset).expect("time");
            let attempt = verify(
                &s,
                &TotpState::default(),
                &code_at(&s, at),
                now,
                Lockout::default(),
            );
            assert_eq!(attempt.outcome.is_ok(), ok, "offset {offset}");
        }
    }

    #[test]
    fn a_step_is_spent_once_and_earlier_steps_with_it() {
        let s = rfc_secret();
        let now = 1_000_000_000;
        let first = verify(
            &s,
            &TotpState::default(),
            &code_at(&s, now),
            now,
            Lockout::default(),
        );
        assert_eq!(first.outcome, Ok(step_at(now)));
        let again = verify(
            &s,
            &first.state,
            &code_at(&s, now),
            now + 5,
            Lockout::default(),
        );
        assert_eq!(again.outcome, Err(TotpRefusal::Replayed));
        let older = verify(
            &s,
            &first.state,
            &code_at(&s, now - 30),
            now,
            Lockout::default(),
        );
        assert_eq!(older.outcome, Err(TotpRefusal::Replayed));
        let next = verify(
            &s,
            &again.state,
            &code_at(&s, now + 30),
            now + 30,
            Lockout::default(),
        );
        assert_eq!(next.outcome, Ok(step_at(now + 30)));
        assert_eq!(next.state.failures, 0);
    }

    #[test]
    fn five_failures_lock_out_even_the_right_code_until_the_period_ends() {
        let s = rfc_secret();
        let lockout = Lockout::default();
        let mut now = 1_000_000_000;
        let mut state = TotpState::default();
        for i in 1..=5 {
            let a = verify(&s, &state, "000000", now, lockout);
            assert_eq!(a.outcome, Err(TotpRefusal::Wrong));
            assert_eq!(a.state.failures, i);
            state = a.state;
            now += 1;
        }
        let until = state.locked_until.expect("locked");
        assert_eq!(until, now - 1 + lockout.period_secs);
        let locked = verify(&s, &state, &code_at(&s, now), now, lockout);
        assert_eq!(locked.outcome, Err(TotpRefusal::LockedOut { until }));
        assert_eq!(locked.state, state, "attempts while locked change nothing");
        let later = until + 1;
        let after = verify(&s, &state, &code_at(&s, later), later, lockout);
        assert_eq!(after.outcome, Ok(step_at(later)));
        assert_eq!(after.state.failures, 0);
        assert_eq!(after.state.locked_until, None);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let s = rfc_secret();
        let now = 1_000_000_000;
        let mut state = TotpState::default();
        for _ in 0..4 {
            state = verify(&s, &state, "12345", now, Lockout::default()).state;
        }
        assert_eq!(state.failures, 4);
        let ok = verify(&s, &state, &code_at(&s, now), now, Lockout::default());
        assert!(ok.outcome.is_ok());
        assert_eq!(ok.state.failures, 0);
        assert_eq!(ok.state.locked_until, None);
    }

    #[test]
    fn malformed_codes_are_refused_without_panicking() {
        let s = rfc_secret();
        for code in [
            "",
            "12345",
            "1234567",
            "12a456",
            "１２３４５６",
            "-12345",
            "+12345",
        ] {
            let a = verify(&s, &TotpState::default(), code, 0, Lockout::default());
            assert_eq!(a.outcome, Err(TotpRefusal::Malformed), "{code:?}");
        }
        let near_end = verify(
            &s,
            &TotpState::default(),
            "123456",
            u64::MAX,
            Lockout::default(),
        );
        assert!(near_end.outcome.is_err());
    }

    #[test]
    fn secrets_round_trip_base32_and_stay_out_of_debug() {
        let s = rfc_secret();
        let b32 = s.to_base32();
        assert_eq!(b32.as_str(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(
            TotpSecret::from_base32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq").as_ref(),
            Ok(&s)
        );
        assert_eq!(
            TotpSecret::from_base32("not base32!"),
            Err(MfaError::SecretEncoding)
        );
        assert_eq!(
            TotpSecret::from_bytes(&[1; 10]),
            Err(MfaError::SecretLength(10))
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains("GEZD") && !shown.contains("49"), "{shown}");
    }

    #[test]
    fn otpauth_uri_names_issuer_account_and_parameters() {
        let uri = otpauth_uri(&rfc_secret(), "Custos Bank", "ann@example.com");
        assert_eq!(
            uri.as_str(),
            "otpauth://totp/Custos%20Bank:ann%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Custos%20Bank&algorithm=SHA1&digits=6&period=30"
        );
    }
}
