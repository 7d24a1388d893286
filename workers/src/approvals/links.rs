//! Email and chat approval links with a TOTP second factor.
//!
//! A link is `{base_url}/approve/{token}`: 256 random bits, bound to one
//! workflow, approver, request hash, policy version, channel and expiry. Only the
//! token's SHA-256 is stored (bucket `CUSTOS_APPROVAL_LINKS`), and a link is spent
//! by a revision-checked update, so two submissions can never both count.
//!
//! Opening a link only shows the request: mail scanners open links and some even
//! submit forms, so approving takes an explicit decision, the approver's current
//! TOTP code and a CSRF token bound to the link. TOTP secrets are sealed with
//! ChaCha20-Poly1305 under the engine's key (bucket `CUSTOS_MFA`, with the replay
//! and lockout state of `custos_engine::mfa`). Every verification is recorded
//! (`MFA_VERIFIED` or `LOGIN_FAILURE` with the reason) before anything is acted on.
//!
//! Second factors are enrolled on one-time links ([`LinkIssuer::enrolment_link`],
//! `/enrol/{token}`, issued when an operator asks `custos user enrol` and
//! delivered to the user, recorded as `MFA_CONFIGURED` pending with the
//! token's hash). For an authenticator app the page shows a new secret once
//! (sealed in the link record from then on) and activates it only once the user
//! types a valid current code; for a passkey (WebAuthn, `custos_engine::webauthn`)
//! the page creates the credential. Either way the server records
//! `MFA_CONFIGURED` (method, and for a passkey its credential id and public
//! key) before storing the new factor, which replaces the old one of its kind
//! only then. The approval page of a user with a passkey then offers to answer
//! with it: its challenge is random, kept in the link record (single use) and
//! bound to the link and the request hash and policy version. The RP ID is the
//! public URL's host, so passkeys need a domain (locally `http://localhost:PORT`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Path, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Extensions, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use custos_adapters::mail::{Mailer, OutgoingMail};
use custos_engine::mfa::{self, Lockout, TotpRefusal, TotpSecret, TotpState};
use custos_engine::webauthn::{self, Assertion, PasskeyCredential, RelyingParty};
use custos_schemas::approval::{
    ApprovalChannel, ApprovalNotice, ApprovalVote, EnrolMethod, MfaMethod, Vote,
};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, EventType, Outcome, Payload, Proposal, RequestContext,
    Target, UserRecord, subjects, validate_token,
};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use rand::RngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    ApprovalLinks, Ballot, BallotBox, BallotError, EnrolmentNotice, Notifier, NotifyError, Receipt,
};
use crate::remote::Appender;

/// Milliseconds since the Unix epoch, as the engine counts time. Injected so
/// tests can age links and lockouts.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// The engine's key that seals TOTP secrets at rest (and keys the CSRF tokens).
/// Zeroized on drop, never shown.
pub struct MfaKey(Zeroizing<[u8; 32]>);

impl MfaKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MfaKey(Zeroizing::new(bytes))
    }

    /// A fresh random key (to be stored by the caller, e.g. with
    /// `custos_adapters::files::write_private`).
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        MfaKey(key)
    }

    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A subkey for one purpose, so one key never serves two constructions.
    fn derive(&self, purpose: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&hmac_sha256(self.0.as_ref(), &[purpose]));
        out
    }
}

impl std::fmt::Debug for MfaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MfaKey(<redacted>)")
    }
}

/// What an operator configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSettings {
    /// Public base URL the router is served under, e.g. `https://custos.example.com`.
    pub base_url: String,
    /// Life of a link; never beyond the request's own expiry.
    pub link_ttl: Duration,
    /// Issuer shown by authenticator apps.
    pub issuer: String,
    pub lockout: Lockout,
}

impl LinkSettings {
    pub fn new(base_url: impl Into<String>) -> Self {
        LinkSettings {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            link_ttl: Duration::from_secs(24 * 3600),
            issuer: "Custos".into(),
            lockout: Lockout::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} has no second factor enrolled")]
    NotEnrolled(String),
    #[error("key-value store: {0}")]
    Store(String),
    #[error("the audit trail did not record it: {0}")]
    Audit(String),
}

/// What the links bucket holds per token hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LinkRecord {
    workflow_id: String,
    user_id: String,
    request_hash: String,
    policy_version: String,
    channel: ApprovalChannel,
    issued_at: i64,
    expires_at: i64,
    #[serde(default)]
    used_at: Option<i64>,
    /// The random part of the passkey challenge the page last showed; taken
    /// by the answer that uses it.
    #[serde(default)]
    passkey_nonce: Option<String>,
}

/// An enrolment link, stored under `enrol.<token hash>` in the links bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnrolRecord {
    user_id: String,
    issued_at: i64,
    expires_at: i64,
    #[serde(default)]
    used_at: Option<i64>,
    /// Passkey: the random part of the challenge the page last showed.
    #[serde(default)]
    nonce: Option<String>,
    /// Links from before TOTP links existed were passkey links.
    #[serde(default)]
    method: EnrolMethod,
    /// The operator who asked for the link.
    #[serde(default)]
    requested_by: Option<String>,
    /// TOTP: the new secret, sealed like the stored ones, from the page's first
    /// opening (it is shown once) until a code confirms it.
    #[serde(default)]
    sealed_secret: Option<String>,
    /// TOTP: wrong confirmation codes so far.
    #[serde(default)]
    attempts: u32,
}

/// Wrong codes a TOTP enrolment link takes before it is spent.
const MAX_ENROL_ATTEMPTS: u32 = 5;

/// An issued enrolment link. The URL is a credential: zeroized, redacted.
pub struct EnrolmentLink {
    pub url: Zeroizing<String>,
    /// Hex SHA-256 of the token: what the audit trail records.
    pub link_hash: String,
    /// Ms since the epoch.
    pub expires_at: i64,
}

impl std::fmt::Debug for EnrolmentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentLink")
            .field("url", &"<redacted>")
            .field("link_hash", &self.link_hash)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What the MFA bucket holds per user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MfaRecord {
    /// Base64url of nonce ‖ ChaCha20-Poly1305 ciphertext of the TOTP secret
    /// (empty: no authenticator app, passkeys only).
    #[serde(default)]
    sealed_secret: String,
    /// Enrolled passkeys (public keys only).
    #[serde(default)]
    passkeys: Vec<PasskeyCredential>,
    #[serde(default)]
    state: TotpState,
    #[serde(default)]
    deactivated: bool,
}

/// Mints links, enrols and verifies second factors, and serves the pages (see
/// [`links_router`]). Cheap to clone; [`LinkIssuer::for_channel`] gives the
/// minter of another channel over the same state.
pub struct LinkIssuer<A> {
    inner: Arc<Inner<A>>,
    channel: ApprovalChannel,
}

struct Inner<A> {
    links: kv::Store,
    mfa: kv::Store,
    seal_key: Zeroizing<[u8; 32]>,
    csrf_key: Zeroizing<[u8; 32]>,
    ballots: Arc<dyn BallotBox>,
    appender: A,
    settings: LinkSettings,
    clock: Clock,
}

impl<A> Clone for LinkIssuer<A> {
    fn clone(&self) -> Self {
        LinkIssuer {
            inner: Arc::clone(&self.inner),
            channel: self.channel,
        }
    }
}

impl<A> std::fmt::Debug for LinkIssuer<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkIssuer")
            .field("channel", &self.channel)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl<A: Appender> LinkIssuer<A> {
    /// Over the provisioned `CUSTOS_APPROVAL_LINKS` and `CUSTOS_MFA` buckets;
    /// mints email links until [`LinkIssuer::for_channel`].
    pub async fn new(
        js: &jetstream::Context,
        ballots: Arc<dyn BallotBox>,
        appender: A,
        key: &MfaKey,
        settings: LinkSettings,
        clock: Clock,
    ) -> Result<Self, LinkError> {
        let bucket = |name: &'static str| async move {
            js.get_key_value(name)
                .await
                .map_err(|e| LinkError::Store(format!("bucket {name}: {e} (run provisioning)")))
        };
        Ok(LinkIssuer {
            inner: Arc::new(Inner {
                links: bucket(subjects::APPROVAL_LINKS_BUCKET).await?,
                mfa: bucket(subjects::MFA_BUCKET).await?,
                seal_key: key.derive(b"custos-mfa-seal-v1"),
                csrf_key: key.derive(b"custos-link-csrf-v1"),
                ballots,
                appender,
                settings,
                clock,
            }),
            channel: ApprovalChannel::Email,
        })
    }

    /// The same issuer minting links recorded as answered on `channel`.
    pub fn for_channel(&self, channel: ApprovalChannel) -> Self {
        LinkIssuer {
            inner: Arc::clone(&self.inner),
            channel,
        }
    }

    /// Enrols (or re-enrols) `user`'s authenticator and records `MFA_CONFIGURED`
    /// by `by`. Returns the `otpauth://` URI to show the user once: it holds the
    /// secret. The event is recorded before the secret is stored.
    pub async fn enrol_totp(
        &self,
        user: &UserRecord,
        by: Actor,
    ) -> Result<Zeroizing<String>, LinkError> {
        validate_token("user", &user.id).map_err(|e| LinkError::Invalid(e.to_string()))?;
        let secret = new_totp_secret()?;
        let sealed = self.seal(&user.id, &secret)?;
        let mut event = auth_event(
            EventType::MfaConfigured,
            Outcome::Success,
            user,
            RequestContext::default(),
        );
        event.actor = by;
        event.metadata.insert("method".into(), "totp".into());
        self.record(event).await?;
        self.store_totp(&user.id, sealed, TotpState::default())
            .await?;
        Ok(mfa::otpauth_uri(
            &secret,
            &self.inner.settings.issuer,
            &user.email,
        ))
    }

    /// Replaces `user_id`'s authenticator-app secret by `sealed` with `state`;
    /// passkeys stay.
    async fn store_totp(
        &self,
        user_id: &str,
        sealed: String,
        state: TotpState,
    ) -> Result<(), LinkError> {
        self.update_mfa(user_id, |r| MfaRecord {
            sealed_secret: sealed.clone(),
            state: state.clone(),
            ..r
        })
        .await
    }

    /// Read-modify-write of `user_id`'s MFA record (an empty one when there is
    /// none), retried when another write lands in between.
    async fn update_mfa(
        &self,
        user_id: &str,
        change: impl Fn(MfaRecord) -> MfaRecord,
    ) -> Result<(), LinkError> {
        let mfa = &self.inner.mfa;
        for _ in 0..3 {
            let (current, revision) = match self.mfa_record(user_id).await? {
                Some((r, rev)) => (r, Some(rev)),
                None => (
                    MfaRecord {
                        sealed_secret: String::new(),
                        passkeys: Vec::new(),
                        state: TotpState::default(),
                        deactivated: false,
                    },
                    None,
                ),
            };
            let value = encode(&change(current))?;
            match revision {
                Some(rev) => match mfa.update(user_id, value, rev).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(store(e)),
                },
                None => match mfa.create(user_id, value).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(store(e)),
                },
            }
        }
        Err(LinkError::Store(format!(
            "{user_id}: the MFA record kept changing"
        )))
    }

    /// Refuses every link of `user_id` from now on (wire to `USER_DEACTIVATED`):
    /// the directory record the ballot box hands out does not say who is active.
    pub async fn deactivate(&self, user_id: &str) -> Result<(), LinkError> {
        for _ in 0..3 {
            let Some((mut record, revision)) = self.mfa_record(user_id).await? else {
                return Ok(());
            };
            record.deactivated = true;
            match self
                .inner
                .mfa
                .update(user_id, encode(&record)?, revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(store(e)),
            }
        }
        Err(LinkError::Store(format!(
            "{user_id}: the MFA record kept changing"
        )))
    }

    async fn mint(&self, to: &UserRecord, notice: &ApprovalNotice) -> Result<String, LinkError> {
        validate_token("user", &to.id).map_err(|e| LinkError::Invalid(e.to_string()))?;
        validate_token("workflowId", &notice.workflow_id)
            .map_err(|e| LinkError::Invalid(e.to_string()))?;
        match self.mfa_record(&to.id).await? {
            None => return Err(LinkError::NotEnrolled(to.id.clone())),
            Some((r, _)) if r.deactivated => {
                return Err(LinkError::Invalid(format!("{} is deactivated", to.id)));
            }
            Some(_) => {}
        }
        let now = self.now();
        let ttl = i64::try_from(self.inner.settings.link_ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at = now
            .saturating_add(ttl)
            .min(notice.expires_at.unwrap_or(i64::MAX));
        if expires_at <= now {
            return Err(LinkError::Invalid(format!(
                "{} has already expired",
                notice.workflow_id
            )));
        }
        let mut token = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(token.as_mut());
        let record = LinkRecord {
            workflow_id: notice.workflow_id.clone(),
            user_id: to.id.clone(),
            request_hash: notice.request_hash.clone(),
            policy_version: notice.policy_version.clone(),
            channel: self.channel,
            issued_at: now,
            expires_at,
            used_at: None,
            passkey_nonce: None,
        };
        self.inner
            .links
            .create(token_key(token.as_ref()), encode(&record)?)
            .await
            .map_err(store)?;
        Ok(format!(
            "{}/approve/{}",
            self.inner.settings.base_url,
            data_encoding::BASE64URL_NOPAD.encode(token.as_ref())
        ))
    }

    fn now(&self) -> i64 {
        (self.inner.clock)()
    }

    /// Records `proposal` (for the enrolment service's refusals).
    pub(super) async fn audit(&self, proposal: Proposal) -> Result<(), LinkError> {
        self.record(proposal).await
    }

    async fn record(&self, proposal: Proposal) -> Result<(), LinkError> {
        match self.inner.appender.append(vec![proposal]).await {
            AppendReply::Appended { .. } => Ok(()),
            other => Err(LinkError::Audit(format!("{other:?}"))),
        }
    }

    async fn mfa_record(&self, user_id: &str) -> Result<Option<(MfaRecord, u64)>, LinkError> {
        if validate_token("user", user_id).is_err() {
            return Ok(None);
        }
        match self.inner.mfa.entry(user_id).await.map_err(store)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode(&e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    fn aad(user_id: &str) -> Vec<u8> {
        [b"custos-mfa-totp-v1\0".as_slice(), user_id.as_bytes()].concat()
    }

    fn seal(&self, user_id: &str, secret: &TotpSecret) -> Result<String, LinkError> {
        let cipher = ChaCha20Poly1305::new(self.inner.seal_key.as_ref().into());
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(user_id);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                AeadPayload {
                    msg: secret.expose_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| LinkError::Invalid("sealing the TOTP secret failed".into()))?;
        Ok(data_encoding::BASE64URL_NOPAD.encode(&[nonce.as_slice(), &sealed].concat()))
    }

    fn unseal(&self, user_id: &str, sealed: &str) -> Result<TotpSecret, LinkError> {
        let bad = || LinkError::Store(format!("{user_id}: the sealed TOTP secret does not open"));
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(sealed.as_bytes())
            .map_err(|_| bad())?;
        if bytes.len() < 12 {
            return Err(bad());
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let cipher = ChaCha20Poly1305::new(self.inner.seal_key.as_ref().into());
        let aad = Self::aad(user_id);
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    AeadPayload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| bad())?,
        );
        TotpSecret::from_bytes(&plain).map_err(|_| bad())
    }

    /// Verifies `code` for `user`, persisting the replay and lockout state with a
    /// revision-checked update, and records the outcome in the audit trail.
    async fn verify_totp(
        &self,
        user: &UserRecord,
        link: &LinkRecord,
        code: &str,
        context: &RequestContext,
    ) -> Result<(), Refusal> {
        let now_secs = u64::try_from(self.now() / 1000).unwrap_or(0);
        let mut outcome = None;
        for _ in 0..3 {
            let Some((record, revision)) = self.mfa_record(&user.id).await.map_err(unavailable)?
            else {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "No second factor is enrolled for this approver.",
                ));
            };
            if record.deactivated {
                return Err(deactivated());
            }
            if record.sealed_secret.is_empty() {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "No authenticator app is enrolled for this approver: answer with your passkey.",
                ));
            }
            let secret = self
                .unseal(&user.id, &record.sealed_secret)
                .map_err(unavailable)?;
            let attempt = mfa::verify(
                &secret,
                &record.state,
                code,
                now_secs,
                self.inner.settings.lockout,
            );
            if attempt.state == record.state {
                outcome = Some(attempt.outcome);
                break;
            }
            let next = MfaRecord {
                state: attempt.state,
                ..record
            };
            match self
                .inner
                .mfa
                .update(
                    user.id.as_str(),
                    encode(&next).map_err(unavailable)?,
                    revision,
                )
                .await
            {
                Ok(_) => {
                    outcome = Some(attempt.outcome);
                    break;
                }
                // Another attempt landed first: verify again against its state.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(store(e))),
            }
        }
        let Some(outcome) = outcome else {
            return Err(unavailable(LinkError::Store(
                "too many concurrent attempts".into(),
            )));
        };
        let (event_type, result) = match outcome {
            Ok(_) => (EventType::MfaVerified, Outcome::Success),
            Err(_) => (EventType::LoginFailure, Outcome::Failure),
        };
        let mut event = auth_event(event_type, result, user, context.clone());
        event.causation_id = Some(link.workflow_id.clone());
        let meta = &mut event.metadata;
        meta.insert("method".into(), "totp".into());
        meta.insert("channel".into(), link.channel.as_str().into());
        meta.insert("workflowId".into(), link.workflow_id.clone());
        if let Err(refusal) = &outcome {
            meta.insert("reason".into(), refusal.to_string());
        }
        let recorded = self.record(event).await;
        match outcome {
            // Nothing is acted on before it is recorded.
            Ok(_) => recorded.map_err(unavailable),
            Err(refusal) => {
                if let Err(e) = recorded {
                    tracing::warn!(user = %user.id, error = %e, "a failed TOTP attempt was not recorded");
                }
                Err(totp_refusal(refusal, now_secs))
            }
        }
    }
}

impl<A: Appender> LinkIssuer<A> {
    /// The relying party passkeys are scoped to: the public URL's host.
    pub fn relying_party(&self) -> Result<RelyingParty, LinkError> {
        RelyingParty::from_public_url(&self.inner.settings.base_url)
            .map_err(|e| LinkError::Invalid(e.to_string()))
    }

    /// A one-time passkey enrolment link for `user` (see [`Self::enrolment_link`]).
    pub async fn passkey_enrolment_link(&self, user: &UserRecord) -> Result<String, LinkError> {
        let link = self
            .enrolment_link(user, EnrolMethod::Passkey, &Actor::system("links"))
            .await?;
        Ok(link.url.to_string())
    }

    /// A one-time link (as long-lived as approval links) on which `user` sets
    /// up `method`, asked for by `by`. The issue is recorded (`MFA_CONFIGURED`
    /// pending: who asked, for whom, the method and the token's hash, never the
    /// token) before the link exists. Refused for a deactivated user, and for
    /// passkeys when the public URL cannot host them.
    pub async fn enrolment_link(
        &self,
        user: &UserRecord,
        method: EnrolMethod,
        by: &Actor,
    ) -> Result<EnrolmentLink, LinkError> {
        validate_token("user", &user.id).map_err(|e| LinkError::Invalid(e.to_string()))?;
        if method == EnrolMethod::Passkey {
            self.relying_party()?;
        }
        if self
            .mfa_record(&user.id)
            .await?
            .is_some_and(|(r, _)| r.deactivated)
        {
            return Err(LinkError::Invalid(format!("{} is deactivated", user.id)));
        }
        let now = self.now();
        let ttl = i64::try_from(self.inner.settings.link_ttl.as_millis()).unwrap_or(i64::MAX);
        let mut token = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(token.as_mut());
        let record = EnrolRecord {
            user_id: user.id.clone(),
            issued_at: now,
            expires_at: now.saturating_add(ttl),
            used_at: None,
            nonce: None,
            method,
            requested_by: Some(by.user_id.clone()),
            sealed_secret: None,
            attempts: 0,
        };
        let link_hash = token_key(token.as_ref());
        let mut event = auth_event(
            EventType::MfaConfigured,
            Outcome::Pending,
            user,
            RequestContext::default(),
        );
        event.actor = by.clone();
        let meta = &mut event.metadata;
        meta.insert("method".into(), mfa_method(method).into());
        meta.insert("stage".into(), "link-issued".into());
        meta.insert("linkHash".into(), link_hash.clone());
        meta.insert("expiresAt".into(), format_ms(record.expires_at));
        self.record(event).await?;
        self.inner
            .links
            .create(enrol_key(token.as_ref()), encode(&record)?)
            .await
            .map_err(store)?;
        Ok(EnrolmentLink {
            url: Zeroizing::new(format!(
                "{}/enrol/{}",
                self.inner.settings.base_url,
                data_encoding::BASE64URL_NOPAD.encode(token.as_ref())
            )),
            link_hash,
            expires_at: record.expires_at,
        })
    }

    /// Checks a passkey answer on the link `found` against the challenge its
    /// page showed, stores the new signature counter and records the outcome
    /// (`MFA_VERIFIED` or `LOGIN_FAILURE`) in the audit trail.
    async fn verify_passkey(
        &self,
        found: &Found,
        form: &Answer,
        context: &RequestContext,
    ) -> Result<(), Refusal> {
        let outcome = self.check_passkey(found, form).await?;
        let (event_type, result) = match &outcome {
            Ok(()) => (EventType::MfaVerified, Outcome::Success),
            Err(_) => (EventType::LoginFailure, Outcome::Failure),
        };
        let mut event = auth_event(event_type, result, &found.user, context.clone());
        event.causation_id = Some(found.record.workflow_id.clone());
        let meta = &mut event.metadata;
        meta.insert("method".into(), "webauthn".into());
        meta.insert("channel".into(), found.record.channel.as_str().into());
        meta.insert("workflowId".into(), found.record.workflow_id.clone());
        if let Err(e) = &outcome {
            meta.insert("reason".into(), e.to_string());
        }
        let recorded = self.record(event).await;
        match outcome {
            Ok(()) => recorded.map_err(unavailable),
            Err(e) => {
                if let Err(r) = recorded {
                    tracing::warn!(user = %found.user.id, error = %r, "a failed passkey attempt was not recorded");
                }
                // The challenge is single use: a failed answer spends it too.
                let cleared = LinkRecord {
                    passkey_nonce: None,
                    ..found.record.clone()
                };
                if let Ok(value) = encode(&cleared) {
                    let _ = self
                        .inner
                        .links
                        .update(found.key.as_str(), value, found.revision)
                        .await;
                }
                Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "The passkey was not accepted ({e}). Nothing was recorded as a vote; reload the page to try again."
                    ),
                ))
            }
        }
    }

    /// The verification itself; `Err` inside is a refusal to audit.
    async fn check_passkey(
        &self,
        found: &Found,
        form: &Answer,
    ) -> Result<Result<(), webauthn::WebauthnError>, Refusal> {
        let Some(nonce) = &found.record.passkey_nonce else {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "This page's passkey challenge was already used or replaced: reload the page.",
            ));
        };
        let field = |name: &'static str, value: &str| {
            data_encoding::BASE64URL_NOPAD
                .decode(value.trim_end_matches('=').as_bytes())
                .map_err(|_| {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!("The passkey answer's {name} is not base64url."),
                    )
                })
        };
        let id = field("credentialId", &form.credential_id)?;
        let client_data = field("clientDataJSON", &form.client_data_json)?;
        let auth_data = field("authenticatorData", &form.authenticator_data)?;
        let signature = field("signature", &form.signature)?;
        let rp = self.relying_party().map_err(unavailable)?;
        let challenge = approval_challenge(nonce, &found.key, &found.record);
        for _ in 0..3 {
            let Some((mut record, revision)) =
                self.mfa_record(&found.user.id).await.map_err(unavailable)?
            else {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "No second factor is enrolled for this approver.",
                ));
            };
            if record.deactivated {
                return Err(deactivated());
            }
            let Some(passkey) = record.passkeys.iter_mut().find(|p| p.id == id) else {
                return Ok(Err(webauthn::WebauthnError::UnknownCredential));
            };
            let assertion = Assertion {
                credential_id: &id,
                client_data_json: &client_data,
                authenticator_data: &auth_data,
                signature: &signature,
            };
            let count = match webauthn::verify_assertion(&rp, passkey, &challenge, &assertion) {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            passkey.sign_count = count;
            match self
                .inner
                .mfa
                .update(
                    found.user.id.as_str(),
                    encode(&record).map_err(unavailable)?,
                    revision,
                )
                .await
            {
                Ok(_) => return Ok(Ok(())),
                // Another sign-in moved the counter: check against it.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(store(e))),
            }
        }
        Err(unavailable(LinkError::Store(
            "too many concurrent attempts".into(),
        )))
    }

    /// A fresh challenge nonce for the page of link `found`, stored in its
    /// record; `None` when the user has no passkey (or the link changed).
    async fn passkey_offer(&self, found: &Found) -> Option<PasskeyOffer> {
        let rp = self.relying_party().ok()?;
        let (record, _) = self.mfa_record(&found.user.id).await.ok()??;
        if record.passkeys.is_empty() {
            return None;
        }
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let nonce = data_encoding::BASE64URL_NOPAD.encode(&nonce);
        let next = LinkRecord {
            passkey_nonce: Some(nonce.clone()),
            ..found.record.clone()
        };
        self.inner
            .links
            .update(found.key.as_str(), encode(&next).ok()?, found.revision)
            .await
            .ok()?;
        Some(PasskeyOffer {
            challenge: approval_challenge(&nonce, &found.key, &found.record),
            rp_id: rp.id().to_string(),
            credentials: record.passkeys.iter().map(|p| p.id.clone()).collect(),
        })
    }
}

/// What the approval page needs to ask for a passkey.
struct PasskeyOffer {
    challenge: [u8; 32],
    rp_id: String,
    credentials: Vec<Vec<u8>>,
}

/// The approval challenge: the stored random nonce, bound to the link (its
/// token hash) and to the request hash and policy version it answers.
fn approval_challenge(nonce: &str, link_key: &str, link: &LinkRecord) -> [u8; 32] {
    hmac_sha256(
        nonce.as_bytes(),
        &[
            b"custos-webauthn-approval-v1",
            link_key.as_bytes(),
            link.request_hash.as_bytes(),
            link.policy_version.as_bytes(),
        ],
    )
}

fn enrol_challenge(nonce: &str, enrol_key: &str) -> [u8; 32] {
    hmac_sha256(
        nonce.as_bytes(),
        &[b"custos-webauthn-enrol-v1", enrol_key.as_bytes()],
    )
}

fn enrol_key(token: &[u8]) -> String {
    format!("enrol.{}", token_key(token))
}

/// The audit trail's name of what an enrolment sets up (as `MFA_VERIFIED` says).
fn mfa_method(method: EnrolMethod) -> &'static str {
    match method {
        EnrolMethod::Totp => "totp",
        EnrolMethod::Passkey => "webauthn",
    }
}

fn new_totp_secret() -> Result<TotpSecret, LinkError> {
    let mut bytes = Zeroizing::new([0u8; mfa::SECRET_LEN]);
    OsRng.fill_bytes(bytes.as_mut());
    TotpSecret::from_bytes(bytes.as_ref()).map_err(|e| LinkError::Invalid(e.to_string()))
}

impl<A: Appender> ApprovalLinks for LinkIssuer<A> {
    fn link_for<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<String, NotifyError>> {
        Box::pin(async move {
            self.mint(to, notice).await.map_err(|e| NotifyError {
                channel: self.channel.as_str(),
                user: to.id.clone(),
                reason: e.to_string(),
            })
        })
    }
}

/// An `MFA_CONFIGURED` / `MFA_VERIFIED` / `LOGIN_FAILURE` event about `user`, on
/// an auth aggregate of its own.
pub(super) fn auth_event(
    event_type: EventType,
    result: Outcome,
    user: &UserRecord,
    context: RequestContext,
) -> Proposal {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    Proposal {
        aggregate_kind: AggregateKind::Auth,
        workflow_id: format!("mfa-{}", hex::encode(id)),
        expected_version: 0,
        event_type,
        causation_id: None,
        actor: Actor {
            user_id: user.id.clone(),
            email: Some(user.email.clone()),
            role: None,
        },
        target: Target {
            kind: "user".into(),
            id: user.id.clone(),
            amount: None,
            currency: None,
        },
        context,
        result,
        metadata: Default::default(),
        payload: Payload::None,
    }
}

fn token_key(token: &[u8]) -> String {
    hex::encode(Sha256::digest(token))
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length: the error branch cannot be taken.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        return [0; 32];
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn encode<T: Serialize>(value: &T) -> Result<Bytes, LinkError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| LinkError::Store(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, LinkError> {
    serde_json::from_slice(bytes).map_err(|e| LinkError::Store(format!("unreadable record: {e}")))
}

fn store(e: impl std::fmt::Display) -> LinkError {
    LinkError::Store(e.to_string())
}

// ---------------------------------------------------------------------------
// The pages.

/// `GET /approve/{token}` shows the request; `POST /approve/{token}` answers it.
/// Serve with `into_make_service_with_connect_info::<SocketAddr>()` so ballots
/// carry the (masked) client address.
pub fn links_router<A: Appender>(issuer: LinkIssuer<A>) -> Router {
    Router::new()
        .route("/approve/{token}", get(show::<A>).post(answer::<A>))
        .route(
            "/enrol/{token}",
            get(enrol_page::<A>).post(enrol_answer::<A>),
        )
        .route("/passkey.js", get(passkey_script))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(issuer)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // The token is in the URL: never hand it to another site. (Not
        // `no-referrer`: browsers then send `Origin: null` on the page's own post.)
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A refusal the approver sees.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = page(
            "Not accepted",
            &format!(
                "<p class=\"refused\" id=\"refusal\">{}</p>",
                escape(&self.message)
            ),
        );
        (self.status, Html(body)).into_response()
    }
}

fn unavailable(e: LinkError) -> Refusal {
    tracing::warn!(error = %e, "approval link unavailable");
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Custos could not process this right now; nothing was recorded. Try again shortly.",
    )
}

fn deactivated() -> Refusal {
    Refusal::new(
        StatusCode::FORBIDDEN,
        "This approver is deactivated: the link no longer works.",
    )
}

fn totp_refusal(refusal: TotpRefusal, now_secs: u64) -> Refusal {
    match refusal {
        TotpRefusal::LockedOut { until } => Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many wrong codes: locked for {} more minute(s). Nothing was recorded as a vote.",
                until.saturating_sub(now_secs).div_ceil(60)
            ),
        ),
        TotpRefusal::Replayed => Refusal::new(
            StatusCode::UNAUTHORIZED,
            "That code was already used. Wait for the next code from your authenticator.",
        ),
        TotpRefusal::Malformed | TotpRefusal::Wrong => Refusal::new(
            StatusCode::UNAUTHORIZED,
            "Wrong authenticator code. Nothing was recorded as a vote; after 5 wrong codes the approver is locked out.",
        ),
    }
}

/// A link as found, with the bucket revision it was read at.
struct Found {
    key: String,
    record: LinkRecord,
    revision: u64,
    user: UserRecord,
}

impl<A: Appender> LinkIssuer<A> {
    /// The live link behind `token`, or why not.
    async fn find(&self, token: &str) -> Result<Found, Refusal> {
        let unknown = || {
            Refusal::new(
                StatusCode::NOT_FOUND,
                "Unknown approval link: it may be mistyped or altered. Use the link exactly as sent.",
            )
        };
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(token.as_bytes())
            .map_err(|_| unknown())?;
        if bytes.len() != 32 {
            return Err(unknown());
        }
        let key = token_key(&bytes);
        let entry = self
            .inner
            .links
            .entry(key.as_str())
            .await
            .map_err(|e| unavailable(store(e)))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Err(unknown());
        };
        let record: LinkRecord = decode(&entry.value).map_err(unavailable)?;
        if record.used_at.is_some() {
            return Err(Refusal::new(
                StatusCode::GONE,
                "This approval link was already used. Each link answers once.",
            ));
        }
        if self.now() >= record.expires_at {
            return Err(Refusal::new(
                StatusCode::GONE,
                "This approval link has expired.",
            ));
        }
        let Some(user) = self.inner.ballots.user(&record.user_id).await else {
            return Err(deactivated());
        };
        if self
            .mfa_record(&user.id)
            .await
            .map_err(unavailable)?
            .is_some_and(|(r, _)| r.deactivated)
        {
            return Err(deactivated());
        }
        Ok(Found {
            key,
            record,
            revision: entry.revision,
            user,
        })
    }

    /// A CSRF token for the page of the link stored under `key`: a nonce and its
    /// MAC, so only this server's pages for this link produce valid ones.
    fn csrf_token(&self, key: &str) -> String {
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let nonce = data_encoding::BASE64URL_NOPAD.encode(&nonce);
        let mac = hmac_sha256(
            self.inner.csrf_key.as_ref(),
            &[key.as_bytes(), b".", nonce.as_bytes()],
        );
        format!("{nonce}.{}", data_encoding::BASE64URL_NOPAD.encode(&mac))
    }

    fn csrf_valid(&self, key: &str, token: &str) -> bool {
        let Some((nonce, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(mac) = data_encoding::BASE64URL_NOPAD.decode(mac.as_bytes()) else {
            return false;
        };
        let Ok(mut expected) = <Hmac<Sha256> as Mac>::new_from_slice(self.inner.csrf_key.as_ref())
        else {
            return false;
        };
        expected.update(key.as_bytes());
        expected.update(b".");
        expected.update(nonce.as_bytes());
        expected.verify_slice(&mac).is_ok()
    }

    fn secure_cookies(&self) -> bool {
        self.inner.settings.base_url.starts_with("https://")
    }

    /// Whether the browser says the post came from this server's page: `Origin`
    /// names this server and `Sec-Fetch-Site` is `same-origin`. Absent headers
    /// are allowed (older clients): the CSRF token still has to match.
    fn same_origin(&self, headers: &HeaderMap) -> bool {
        if headers
            .get("sec-fetch-site")
            .is_some_and(|site| site != "same-origin")
        {
            return false;
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let base = &self.inner.settings.base_url;
        let ours = base
            .find("://")
            .and_then(|i| base[i + 3..].find('/').map(|j| &base[..i + 3 + j]))
            .unwrap_or(base);
        origin.to_str().is_ok_and(|o| o == ours)
    }
}

const CSRF_COOKIE: &str = "custos_csrf";

async fn show<A: Appender>(
    State(issuer): State<LinkIssuer<A>>,
    Path(token): Path<String>,
) -> Response {
    let found = match issuer.find(&token).await {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let notice = match issuer.inner.ballots.notice(&found.record.workflow_id).await {
        Ok(n) => n,
        Err(e) => return ballot_refusal(e).into_response(),
    };
    if notice.request_hash != found.record.request_hash
        || notice.policy_version != found.record.policy_version
    {
        return Refusal::new(
            StatusCode::CONFLICT,
            "The request changed since this link was sent; this link cannot answer it. A new request for approval will follow if one is needed.",
        )
        .into_response();
    }
    let csrf = issuer.csrf_token(&found.key);
    let offer = issuer.passkey_offer(&found).await;
    let body = page(
        "Approval requested",
        &format!(
            "<p>{name}, your approval is requested{channel}.</p>{notice}{form}",
            name = escape(&found.user.name),
            channel = match found.record.channel {
                ApprovalChannel::ChatLink => " (chat link)",
                ApprovalChannel::Email => " (email link)",
                _ => "",
            },
            notice = notice_html(&notice),
            form = form_html(
                &token,
                &csrf,
                &found.record.workflow_id,
                offer.as_ref(),
                super::ballot_box::needs_passkey(&notice),
            ),
        ),
    );
    let cookie = format!(
        "{CSRF_COOKIE}={csrf}; Path=/approve/{token}; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        if issuer.secure_cookies() {
            "; Secure"
        } else {
            ""
        }
    );
    let mut response = Html(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The form as posted.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    decision: String,
    /// A one-time code, spent once verified: not worth zeroizing.
    #[serde(default)]
    code: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
    /// A passkey answer (base64url), filled by the page's script.
    #[serde(default, rename = "credentialId")]
    credential_id: String,
    #[serde(default, rename = "clientDataJSON")]
    client_data_json: String,
    #[serde(default, rename = "authenticatorData")]
    authenticator_data: String,
    #[serde(default)]
    signature: String,
}

async fn answer<A: Appender>(
    State(issuer): State<LinkIssuer<A>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    extensions: Extensions,
    Form(form): Form<Answer>,
) -> Response {
    match cast(&issuer, &token, &headers, &extensions, form).await {
        Ok(message) => Html(page(
            "Answer recorded",
            &format!("<p class=\"done\" id=\"recorded\">{}</p>", escape(&message)),
        ))
        .into_response(),
        Err(r) => r.into_response(),
    }
}

async fn cast<A: Appender>(
    issuer: &LinkIssuer<A>,
    token: &str,
    headers: &HeaderMap,
    extensions: &Extensions,
    form: Answer,
) -> Result<String, Refusal> {
    let forged = || {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "This form did not come from the approval page of this link. Open the link again and answer there.",
        )
    };
    if !issuer.same_origin(headers) {
        return Err(forged());
    }
    let found = issuer.find(token).await?;
    let cookie = cookie_value(headers, CSRF_COOKIE);
    if cookie.as_deref() != Some(form.csrf.as_str()) || !issuer.csrf_valid(&found.key, &form.csrf) {
        return Err(forged());
    }
    let vote = match form.decision.as_str() {
        "approve" => Vote::Approve,
        "reject" => Vote::Reject,
        _ => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "Choose approve or reject.",
            ));
        }
    };
    let masked_ip = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| RequestContext::mask_ip(addr.ip()));
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(256).collect::<String>());
    let context = RequestContext {
        ip_address: masked_ip.clone(),
        user_agent: user_agent.clone(),
        session_id: None,
    };
    let method = if form.signature.is_empty() {
        issuer
            .verify_totp(&found.user, &found.record, &form.code, &context)
            .await?;
        MfaMethod::Totp
    } else {
        issuer.verify_passkey(&found, &form, &context).await?;
        MfaMethod::Webauthn
    };
    // Spend the link (and its challenge) before casting: a second submission,
    // even concurrent, finds it used.
    let used = LinkRecord {
        used_at: Some(issuer.now()),
        passkey_nonce: None,
        ..found.record.clone()
    };
    let links = &issuer.inner.links;
    let revision = match links
        .update(
            found.key.as_str(),
            encode(&used).map_err(unavailable)?,
            found.revision,
        )
        .await
    {
        Ok(r) => r,
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
            return Err(Refusal::new(
                StatusCode::GONE,
                "This approval link was already used. Each link answers once.",
            ));
        }
        Err(e) => return Err(unavailable(store(e))),
    };
    let comment = form.comment.trim();
    let ballot = Ballot {
        workflow_id: found.record.workflow_id.clone(),
        user_id: found.user.id.clone(),
        vote: ApprovalVote {
            vote,
            request_hash: found.record.request_hash.clone(),
            policy_version: found.record.policy_version.clone(),
            channel: found.record.channel,
            mfa: method,
            comment: (!comment.is_empty()).then(|| comment.chars().take(1000).collect()),
        },
        masked_ip,
        user_agent,
    };
    match issuer.inner.ballots.cast(ballot).await {
        Ok(Receipt::Recorded { quorum_reached }) => Ok(format!(
            "Your {} of {} is recorded.{}",
            match vote {
                Vote::Approve => "approval",
                Vote::Reject => "rejection",
            },
            found.record.workflow_id,
            if quorum_reached {
                " The required approvals are complete."
            } else {
                ""
            }
        )),
        Ok(Receipt::Duplicate) => Ok(format!(
            "You had already answered {}; your first answer stands.",
            found.record.workflow_id
        )),
        Err(BallotError::Unavailable(reason)) => {
            // Nothing was counted: give the link back so the approver can retry.
            if let Err(e) = links
                .update(
                    found.key.as_str(),
                    encode(&found.record).map_err(unavailable)?,
                    revision,
                )
                .await
            {
                tracing::warn!(error = %e, "could not release an approval link after a failed cast");
            }
            Err(unavailable(LinkError::Store(reason)))
        }
        Err(e) => Err(ballot_refusal(e)),
    }
}

/// The passkey enrolment link behind `token`: its bucket key, record,
/// revision and user, or why not.
async fn find_enrolment<A: Appender>(
    issuer: &LinkIssuer<A>,
    token: &str,
) -> Result<(String, EnrolRecord, u64, UserRecord), Refusal> {
    let unknown = || {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "Unknown enrolment link: it may be mistyped or altered. Use the link exactly as sent.",
        )
    };
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(token.as_bytes())
        .map_err(|_| unknown())?;
    if bytes.len() != 32 {
        return Err(unknown());
    }
    let key = enrol_key(&bytes);
    let entry = issuer
        .inner
        .links
        .entry(key.as_str())
        .await
        .map_err(|e| unavailable(store(e)))?
        .filter(|e| e.operation == kv::Operation::Put)
        .ok_or_else(unknown)?;
    let record: EnrolRecord = decode(&entry.value).map_err(unavailable)?;
    if record.used_at.is_some() {
        return Err(Refusal::new(
            StatusCode::GONE,
            "This enrolment link was already used. Ask an operator for a new one.",
        ));
    }
    if issuer.now() >= record.expires_at {
        return Err(Refusal::new(
            StatusCode::GONE,
            "This enrolment link has expired. Ask an operator for a new one.",
        ));
    }
    let Some(user) = issuer.inner.ballots.user(&record.user_id).await else {
        return Err(deactivated());
    };
    if issuer
        .mfa_record(&user.id)
        .await
        .map_err(unavailable)?
        .is_some_and(|(r, _)| r.deactivated)
    {
        return Err(deactivated());
    }
    Ok((key, record, entry.revision, user))
}

/// `GET /enrol/{token}`: the page that creates a passkey.
async fn enrol_page<A: Appender>(
    State(issuer): State<LinkIssuer<A>>,
    Path(token): Path<String>,
) -> Response {
    let result = async {
        let (key, record, revision, user) = find_enrolment(&issuer, &token).await?;
        if record.method == EnrolMethod::Totp {
            return totp_enrol_page(&issuer, &token, &key, record, revision, &user).await;
        }
        let rp = issuer.relying_party().map_err(|e| {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        })?;
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let nonce = data_encoding::BASE64URL_NOPAD.encode(&nonce);
        let next = EnrolRecord {
            nonce: Some(nonce.clone()),
            ..record
        };
        issuer
            .inner
            .links
            .update(key.as_str(), encode(&next).map_err(unavailable)?, revision)
            .await
            .map_err(|_| {
                Refusal::new(
                    StatusCode::CONFLICT,
                    "The enrolment page was opened elsewhere at the same time: reload it.",
                )
            })?;
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        let csrf = issuer.csrf_token(&key);
        let body = page(
            "Create your passkey",
            &format!(
                "<p>{name}, create the passkey you will approve requests with.</p>\
                 <div id=\"enrol\" data-challenge=\"{challenge}\" data-rp-id=\"{rp}\" \
                 data-user-id=\"{uid}\" data-user-name=\"{email}\" data-display-name=\"{name}\"></div>\
                 <form method=\"post\" action=\"/enrol/{token}\" id=\"enrol-form\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"hidden\" name=\"clientDataJSON\"><input type=\"hidden\" name=\"attestationObject\">\
                 <p><button type=\"button\" id=\"create\">Create passkey</button></p>\
                 <p id=\"enrol-status\"></p></form><script src=\"/passkey.js\" defer></script>",
                name = escape(&user.name),
                email = escape(&user.email),
                challenge = b64(&enrol_challenge(&nonce, &key)),
                rp = escape(rp.id()),
                uid = b64(user.id.as_bytes()),
                token = escape(&token),
                csrf = escape(&csrf),
            ),
        );
        Ok::<_, Refusal>((body, csrf))
    }
    .await;
    match result {
        Ok((body, csrf)) => {
            let cookie = format!(
                "{CSRF_COOKIE}={csrf}; Path=/enrol/{token}; HttpOnly; SameSite=Strict; Max-Age=3600{}",
                if issuer.secure_cookies() {
                    "; Secure"
                } else {
                    ""
                }
            );
            let mut response = Html(body).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Err(r) => r.into_response(),
    }
}

/// `GET /enrol/{token}` of an authenticator-app link: a new secret, sealed
/// into the link's record first so that the page shows it only once, and the
/// form that confirms it with a current code.
async fn totp_enrol_page<A: Appender>(
    issuer: &LinkIssuer<A>,
    token: &str,
    key: &str,
    record: EnrolRecord,
    revision: u64,
    user: &UserRecord,
) -> Result<(String, String), Refusal> {
    if record.sealed_secret.is_some() {
        return Err(Refusal::new(
            StatusCode::GONE,
            "This enrolment link was already opened: its secret is shown only once. Ask an operator for a new link.",
        ));
    }
    let secret = new_totp_secret().map_err(unavailable)?;
    let next = EnrolRecord {
        sealed_secret: Some(issuer.seal(&user.id, &secret).map_err(unavailable)?),
        ..record
    };
    issuer
        .inner
        .links
        .update(key, encode(&next).map_err(unavailable)?, revision)
        .await
        .map_err(|_| {
            Refusal::new(
                StatusCode::CONFLICT,
                "The enrolment page was opened elsewhere at the same time. Ask an operator for a new link.",
            )
        })?;
    let uri = mfa::otpauth_uri(&secret, &issuer.inner.settings.issuer, &user.email);
    let base32 = secret.to_base32();
    let csrf = issuer.csrf_token(key);
    let body = page(
        "Set up your authenticator app",
        &format!(
            "<p>{name}, add this account to your authenticator app, then type the code it shows. \
             The secret is shown only on this page and only once: do not reload it.</p>\
             <p>Paste this URI into the app (or a QR code tool):<br><code id=\"otpauth\">{uri}</code></p>\
             <p>Or type the key by hand: <code id=\"secret\">{base32}</code></p>{form}",
            name = escape(&user.name),
            uri = escape(&uri),
            base32 = escape(&base32),
            form = totp_enrol_form(token, &csrf, ""),
        ),
    );
    Ok((body, csrf))
}

/// The form confirming a new authenticator app with its current code.
fn totp_enrol_form(token: &str, csrf: &str, note: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/enrol/{token}\" id=\"enrol-form\" autocomplete=\"off\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{note}\
         <p><label>Code from your app <input name=\"code\" id=\"code\" inputmode=\"numeric\" \
         pattern=\"[0-9]{{6}}\" maxlength=\"6\" required autocomplete=\"one-time-code\"></label></p>\
         <p><button type=\"submit\" id=\"confirm\">Confirm</button></p></form>\
         <p>Until a code confirms it, your current second factor stays as it is.</p>",
        token = escape(token),
        csrf = escape(csrf),
        note = if note.is_empty() {
            String::new()
        } else {
            format!("<p class=\"refused\" id=\"refusal\">{}</p>", escape(note))
        },
    )
}

/// The enrolment form as posted (by the passkey page's script, or the
/// authenticator-app page).
#[derive(Deserialize)]
struct Enrolment {
    #[serde(default)]
    csrf: String,
    /// A one-time code, spent once verified: not worth zeroizing.
    #[serde(default)]
    code: String,
    #[serde(default, rename = "clientDataJSON")]
    client_data_json: String,
    #[serde(default, rename = "attestationObject")]
    attestation_object: String,
}

/// `POST /enrol/{token}`: verifies the new credential, records
/// `MFA_CONFIGURED` and only then stores it.
async fn enrol_answer<A: Appender>(
    State(issuer): State<LinkIssuer<A>>,
    Path(token): Path<String>,
    headers: HeaderMap,
    Form(form): Form<Enrolment>,
) -> Response {
    match enrol(&issuer, &token, &headers, form).await {
        Ok(Enrolled::Passkey) => Html(page(
            "Passkey enrolled",
            "<p class=\"done\" id=\"enrolled\">Your passkey is enrolled: approval pages will offer it.</p>",
        ))
        .into_response(),
        Ok(Enrolled::Totp) => Html(page(
            "Authenticator app enrolled",
            "<p class=\"done\" id=\"enrolled\">Your authenticator app is enrolled: approval pages take its codes from now on.</p>",
        ))
        .into_response(),
        Ok(Enrolled::TryAgain { csrf, note }) => (
            StatusCode::UNAUTHORIZED,
            Html(page(
                "Set up your authenticator app",
                &totp_enrol_form(&token, &csrf, &note),
            )),
        )
            .into_response(),
        Err(r) => r.into_response(),
    }
}

/// What an enrolment post achieved.
enum Enrolled {
    Passkey,
    Totp,
    /// A wrong code: the page asks again (same link, same secret).
    TryAgain {
        csrf: String,
        note: String,
    },
}

async fn enrol<A: Appender>(
    issuer: &LinkIssuer<A>,
    token: &str,
    headers: &HeaderMap,
    form: Enrolment,
) -> Result<Enrolled, Refusal> {
    let forged = || {
        Refusal::new(
            StatusCode::FORBIDDEN,
            "This form did not come from the enrolment page of this link. Open the link again.",
        )
    };
    if !issuer.same_origin(headers) {
        return Err(forged());
    }
    let (key, record, revision, user) = find_enrolment(issuer, token).await?;
    let cookie = cookie_value(headers, CSRF_COOKIE);
    if cookie.as_deref() != Some(form.csrf.as_str()) || !issuer.csrf_valid(&key, &form.csrf) {
        return Err(forged());
    }
    if record.method == EnrolMethod::Totp {
        return confirm_totp(issuer, &key, record, revision, &user, &form).await;
    }
    let Some(nonce) = record.nonce.clone() else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "This page's challenge was already used: reload the page.",
        ));
    };
    let decode64 = |name: &str, v: &str| {
        data_encoding::BASE64URL_NOPAD
            .decode(v.trim_end_matches('=').as_bytes())
            .map_err(|_| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("The passkey's {name} is not base64url."),
                )
            })
    };
    let client_data = decode64("clientDataJSON", &form.client_data_json)?;
    let attestation = decode64("attestationObject", &form.attestation_object)?;
    let rp = issuer.relying_party().map_err(unavailable)?;
    let verified = webauthn::verify_registration(
        &rp,
        &enrol_challenge(&nonce, &key),
        &client_data,
        &attestation,
    );
    let requested_by = record.requested_by.clone();
    // Spend the link (and its challenge) whatever the outcome: single use.
    let spent = EnrolRecord {
        used_at: verified.is_ok().then(|| issuer.now()),
        nonce: None,
        ..record
    };
    if let Err(e) = issuer
        .inner
        .links
        .update(key.as_str(), encode(&spent).map_err(unavailable)?, revision)
        .await
    {
        return Err(match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => Refusal::new(
                StatusCode::GONE,
                "This enrolment link was used or reopened meanwhile: reload the page.",
            ),
            _ => unavailable(store(e)),
        });
    }
    let mut event = auth_event(
        EventType::MfaConfigured,
        if verified.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        &user,
        RequestContext::default(),
    );
    event.metadata.insert("method".into(), "webauthn".into());
    let credential = match verified {
        Ok(c) => c,
        Err(e) => {
            event.metadata.insert("reason".into(), e.to_string());
            if let Err(r) = issuer.record(event).await {
                tracing::warn!(user = %user.id, error = %r, "a failed passkey enrolment was not recorded");
            }
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("The passkey was not accepted: {e}. Reload the page to try again."),
            ));
        }
    };
    let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
    event
        .metadata
        .insert("credentialId".into(), b64(&credential.id));
    event
        .metadata
        .insert("publicKey".into(), hex::encode(&credential.public_key));
    if let Some(by) = requested_by {
        event.metadata.insert("requestedBy".into(), by);
    }
    issuer.record(event).await.map_err(unavailable)?;
    // The new passkey replaces the old ones: re-enrolling is how a lost or
    // compromised one is retired.
    issuer
        .update_mfa(&user.id, |r| MfaRecord {
            passkeys: vec![credential.clone()],
            ..r
        })
        .await
        .map_err(unavailable)?;
    Ok(Enrolled::Passkey)
}

/// `POST /enrol/{token}` of an authenticator-app link: the code must be valid
/// now for the secret the page showed. Only then is the link spent,
/// `MFA_CONFIGURED` recorded and the secret stored in place of the old one
/// (with the code's step spent, so it cannot approve anything). Wrong codes
/// ask again, up to [`MAX_ENROL_ATTEMPTS`].
async fn confirm_totp<A: Appender>(
    issuer: &LinkIssuer<A>,
    key: &str,
    record: EnrolRecord,
    revision: u64,
    user: &UserRecord,
    form: &Enrolment,
) -> Result<Enrolled, Refusal> {
    let Some(sealed) = record.sealed_secret.clone() else {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "Open the enrolment link first: its page shows the secret to add to your app.",
        ));
    };
    let secret = issuer.unseal(&user.id, &sealed).map_err(unavailable)?;
    let now = issuer.now();
    let now_secs = u64::try_from(now / 1000).unwrap_or(0);
    let attempt = mfa::verify(
        &secret,
        &TotpState::default(),
        form.code.trim(),
        now_secs,
        issuer.inner.settings.lockout,
    );
    let confirmed = attempt.outcome.is_ok();
    let attempts = record.attempts + u32::from(!confirmed);
    let spent = confirmed || attempts >= MAX_ENROL_ATTEMPTS;
    let requested_by = record.requested_by.clone();
    let next = EnrolRecord {
        used_at: spent.then_some(now),
        sealed_secret: (!spent).then_some(sealed.clone()),
        attempts,
        ..record
    };
    issuer
        .inner
        .links
        .update(key, encode(&next).map_err(unavailable)?, revision)
        .await
        .map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => Refusal::new(
                StatusCode::GONE,
                "This enrolment link was used meanwhile. Ask an operator for a new one.",
            ),
            _ => unavailable(store(e)),
        })?;
    if !spent {
        return Ok(Enrolled::TryAgain {
            // Checked above and still the cookie's: the retry posts it again.
            csrf: form.csrf.clone(),
            note: format!(
                "Wrong code ({attempts} of {MAX_ENROL_ATTEMPTS} tries): nothing was set up. Type the code your app shows now."
            ),
        });
    }
    let mut event = auth_event(
        EventType::MfaConfigured,
        if confirmed {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        user,
        RequestContext::default(),
    );
    event.metadata.insert("method".into(), "totp".into());
    if let Some(by) = requested_by {
        event.metadata.insert("requestedBy".into(), by);
    }
    if !confirmed {
        event
            .metadata
            .insert("reason".into(), "too many wrong confirmation codes".into());
        if let Err(e) = issuer.record(event).await {
            tracing::warn!(user = %user.id, error = %e, "a failed TOTP enrolment was not recorded");
        }
        return Err(Refusal::new(
            StatusCode::GONE,
            "Too many wrong codes: this enrolment link is spent and nothing changed. Ask an operator for a new one.",
        ));
    }
    issuer.record(event).await.map_err(unavailable)?;
    issuer
        .store_totp(&user.id, sealed, attempt.state)
        .await
        .map_err(unavailable)?;
    Ok(Enrolled::Totp)
}

/// The script of the approval and enrolment pages (served from this origin:
/// the pages' CSP allows no inline script).
async fn passkey_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PASSKEY_JS,
    )
        .into_response()
}

const PASSKEY_JS: &str = r#""use strict";
const enc = (buf) => btoa(String.fromCharCode(...new Uint8Array(buf)))
  .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const dec = (s) => Uint8Array.from(
  atob(s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4)),
  (c) => c.charCodeAt(0));
const say = (id, text) => { const p = document.getElementById(id); if (p) p.textContent = text; };
const box = document.getElementById("passkey");
if (box) {
  for (const button of box.querySelectorAll("button[data-decision]")) {
    button.addEventListener("click", async () => {
      const form = document.getElementById("answer");
      try {
        const cred = await navigator.credentials.get({ publicKey: {
          challenge: dec(box.dataset.challenge), rpId: box.dataset.rpId,
          allowCredentials: box.dataset.credentials.split(",").filter(Boolean)
            .map((id) => ({ type: "public-key", id: dec(id) })),
          userVerification: "required", timeout: 120000 } });
        form.elements.decision.value = button.dataset.decision;
        form.elements.credentialId.value = enc(cred.rawId);
        form.elements.clientDataJSON.value = enc(cred.response.clientDataJSON);
        form.elements.authenticatorData.value = enc(cred.response.authenticatorData);
        form.elements.signature.value = enc(cred.response.signature);
        // The form's own submit button is named "submit" and shadows the method.
        HTMLFormElement.prototype.submit.call(form);
      } catch (e) { say("passkey-status", "The passkey did not answer: " + e.message); }
    });
  }
}
const enrol = document.getElementById("enrol");
if (enrol) {
  document.getElementById("create").addEventListener("click", async () => {
    const form = document.getElementById("enrol-form");
    try {
      const d = enrol.dataset;
      const cred = await navigator.credentials.create({ publicKey: {
        challenge: dec(d.challenge), rp: { id: d.rpId, name: "Custos" },
        user: { id: dec(d.userId), name: d.userName, displayName: d.displayName },
        pubKeyCredParams: [{ type: "public-key", alg: -7 }],
        authenticatorSelection: { residentKey: "preferred", userVerification: "required" },
        attestation: "none", timeout: 120000 } });
      form.elements.clientDataJSON.value = enc(cred.response.clientDataJSON);
      form.elements.attestationObject.value = enc(cred.response.attestationObject);
      HTMLFormElement.prototype.submit.call(form);
    } catch (e) { say("enrol-status", "The passkey was not created: " + e.message); }
  });
}
"#;

fn ballot_refusal(e: BallotError) -> Refusal {
    match e {
        BallotError::Refused(reason) => Refusal::new(
            StatusCode::CONFLICT,
            format!("Custos did not count this answer: {reason}"),
        ),
        BallotError::UnknownWorkflow(id) => Refusal::new(
            StatusCode::CONFLICT,
            format!("{id} is not awaiting approvals any more."),
        ),
        BallotError::Unavailable(reason) => unavailable(LinkError::Store(reason)),
    }
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"robots\" content=\"noindex\"><title>{title} · Custos</title>\
         <style>body{{font-family:sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}}\
         th{{text-align:left;padding-right:1rem;vertical-align:top}}.refused{{color:#a00}}\
         .done{{color:#060}}fieldset{{margin-top:1rem}}</style></head>\
         <body><h1>{title}</h1>{body}</body></html>",
        title = escape(title),
    )
}

fn notice_html(n: &ApprovalNotice) -> String {
    let r = &n.request;
    let mut rows = vec![
        ("Request", n.workflow_id.clone()),
        ("Upstream id", r.request_id.clone()),
        ("Amount", format!("{} {}", r.amount, r.asset)),
        ("From wallet", format!("{} ({})", r.wallet, n.chain)),
        ("To", r.destination.clone()),
        (
            "Address book",
            match n.whitelisted {
                Some(true) => "destination is in the address book".into(),
                Some(false) => "destination is NOT in the address book".into(),
                None => "no address book applies".into(),
            },
        ),
        ("Initiator", r.initiator.clone()),
    ];
    if let Some(v) = &n.fiat_value {
        rows.push(("Value", format!("{} {}", v.amount, v.currency)));
    }
    if let Some(memo) = &r.memo {
        rows.push(("Memo", memo.clone()));
    }
    rows.extend([
        ("Why approval is needed", n.explanation.clone()),
        (
            "Approved so far",
            if n.approved_by.is_empty() {
                "nobody yet".into()
            } else {
                n.approved_by.join(", ")
            },
        ),
        ("Still missing", n.missing.join("; ")),
        (
            "Expires",
            n.expires_at.map_or_else(|| "no expiry".into(), format_ms),
        ),
        (
            "Step-up",
            if super::ballot_box::needs_passkey(n) {
                "a passkey is required: answer with your passkey below; an authenticator code does not count".into()
            } else if n.step_up_required {
                "high value: approval needs this page and your authenticator code".into()
            } else {
                "approval needs your authenticator code".into()
            },
        ),
        ("Policy version", n.policy_version.clone()),
        ("Request hash", n.request_hash.clone()),
    ]);
    let rows: String = rows
        .into_iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(&v)))
        .collect();
    format!("<table id=\"notice\">{rows}</table>")
}

fn form_html(
    token: &str,
    csrf: &str,
    workflow_id: &str,
    offer: Option<&PasskeyOffer>,
    passkey_required: bool,
) -> String {
    let missing = if passkey_required && offer.is_none() {
        "<p class=\"refused\" id=\"no-passkey\">This request requires a passkey and you have none enrolled: \
         ask an operator to run <code>custos user enrol YOUR-ID --method passkey</code>.</p>"
    } else {
        ""
    };
    let passkey = offer.map_or_else(|| missing.to_string(), |o| {
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        format!(
            "<fieldset id=\"passkey\" data-challenge=\"{challenge}\" data-rp-id=\"{rp}\" data-credentials=\"{ids}\">\
             <legend>Or answer with your passkey</legend>\
             <input type=\"hidden\" name=\"credentialId\"><input type=\"hidden\" name=\"clientDataJSON\">\
             <input type=\"hidden\" name=\"authenticatorData\"><input type=\"hidden\" name=\"signature\">\
             <button type=\"button\" id=\"passkey-approve\" data-decision=\"approve\">Approve with passkey</button> \
             <button type=\"button\" id=\"passkey-reject\" data-decision=\"reject\">Reject with passkey</button>\
             <p id=\"passkey-status\"></p></fieldset><script src=\"/passkey.js\" defer></script>",
            challenge = b64(&o.challenge),
            rp = escape(&o.rp_id),
            ids = o.credentials.iter().map(|c| b64(c)).collect::<Vec<_>>().join(","),
        )
    });
    format!(
        "<form method=\"post\" action=\"/approve/{token}\" id=\"answer\" autocomplete=\"off\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <fieldset><legend>Your answer to {wf}</legend>\
         <label><input type=\"radio\" name=\"decision\" value=\"approve\" id=\"approve\"> Approve</label> \
         <label><input type=\"radio\" name=\"decision\" value=\"reject\" id=\"reject\"> Reject</label>\
         <p><label>Authenticator code <input name=\"code\" id=\"code\" inputmode=\"numeric\" \
         pattern=\"[0-9]{{6}}\" maxlength=\"6\" required autocomplete=\"one-time-code\"></label></p>\
         <p><label>Comment (optional) <input name=\"comment\" id=\"comment\" maxlength=\"1000\"></label></p>\
         <p><button type=\"submit\" id=\"submit\">Submit answer</button></p></fieldset>{passkey}</form>\
         <p>Opening this page records nothing; only submitting the form with your code does.</p>",
        token = escape(token),
        csrf = escape(csrf),
        wf = escape(workflow_id),
    )
}

/// RFC 3339 UTC of a millisecond timestamp.
fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms since the epoch"))
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The notifiers.

/// A short plain-text summary of a notice, for mail and chat.
fn summary(n: &ApprovalNotice) -> String {
    let r = &n.request;
    let mut lines = vec![
        format!(
            "{} {} from wallet {} ({}) to {}",
            r.amount, r.asset, r.wallet, n.chain, r.destination
        ),
        format!("Request {} by {}", n.workflow_id, r.initiator),
    ];
    if let Some(v) = &n.fiat_value {
        lines.push(format!("Value: {} {}", v.amount, v.currency));
    }
    if !n.missing.is_empty() {
        lines.push(format!("Still missing: {}", n.missing.join("; ")));
    }
    if let Some(at) = n.expires_at {
        lines.push(format!("Expires: {}", format_ms(at)));
    }
    lines.join("\n")
}

/// What an enrolment sets up, in words.
pub(super) fn enrolment_what(method: EnrolMethod) -> &'static str {
    match method {
        EnrolMethod::Totp => "authenticator app",
        EnrolMethod::Passkey => "passkey",
    }
}

/// Asks approvers by email, each with their own one-time link.
pub struct EmailNotifier {
    links: Arc<dyn ApprovalLinks>,
    mailer: Mailer,
}

impl std::fmt::Debug for EmailNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailNotifier")
            .field("mailer", &self.mailer)
            .finish_non_exhaustive()
    }
}

impl EmailNotifier {
    /// `links` mints the links (a [`LinkIssuer`] for [`ApprovalChannel::Email`]).
    pub fn new(links: Arc<dyn ApprovalLinks>, mailer: Mailer) -> Self {
        EmailNotifier { links, mailer }
    }

    async fn send(
        &self,
        to: &UserRecord,
        subject: String,
        text: String,
    ) -> Result<(), NotifyError> {
        self.mailer
            .send(OutgoingMail {
                to_name: to.name.clone(),
                to_address: to.email.clone(),
                subject,
                text,
                html: None,
            })
            .await
            .map_err(|e| NotifyError {
                channel: ApprovalChannel::Email.as_str(),
                user: to.id.clone(),
                reason: e.to_string(),
            })
    }
}

impl Notifier for EmailNotifier {
    fn channel(&self) -> ApprovalChannel {
        ApprovalChannel::Email
    }

    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let link = self.links.link_for(to, notice).await?;
            let r = &notice.request;
            let text = format!(
                "Hello {name},\n\nYour approval is requested:\n\n{summary}\n\n\
                 Review and answer (one-time link, for you only):\n{link}\n\n\
                 Opening the link records nothing; answering needs your authenticator code.\n",
                name = to.name,
                summary = summary(notice),
            );
            self.send(
                to,
                format!(
                    "Approval requested: {} {} from {}",
                    r.amount, r.asset, r.wallet
                ),
                text,
            )
            .await
        })
    }

    fn enrol<'a>(
        &'a self,
        to: &'a UserRecord,
        enrolment: &'a EnrolmentNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let text = Zeroizing::new(format!(
                "Hello {name},\n\n{by} asked Custos to set up your {what} for approvals.\n\n\
                 Open this one-time link yourself (it is for you only; do not forward it):\n{url}\n\n\
                 It expires at {expires}. Until you finish on that page, your current second factor stays as it is.\n",
                name = to.name,
                by = enrolment.requested_by,
                what = enrolment_what(enrolment.method),
                url = enrolment.url.as_str(),
                expires = format_ms(enrolment.expires_at),
            ));
            self.send(
                to,
                format!("Set up your {}", enrolment_what(enrolment.method)),
                text.to_string(),
            )
            .await
        })
    }

    fn conclude<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
        outcome: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let text = format!(
                "Hello {},\n\n{} ended: {outcome}.\n\n{}\n\nAny approval link sent for it no longer counts.\n",
                to.name,
                notice.workflow_id,
                summary(notice),
            );
            self.send(to, format!("{}: {outcome}", notice.workflow_id), text)
                .await
        })
    }
}

/// An incoming-webhook URL (Teams, Mattermost, Google Chat): whoever holds it can
/// post, so it is never shown.
#[derive(Clone)]
pub struct WebhookUrl(Zeroizing<String>);

impl WebhookUrl {
    pub fn new(url: impl Into<String>) -> Result<Self, NotifyError> {
        let url = Zeroizing::new(url.into());
        let ok = reqwest::Url::parse(&url).is_ok_and(|u| matches!(u.scheme(), "https" | "http"));
        if !ok {
            return Err(NotifyError {
                channel: ApprovalChannel::ChatLink.as_str(),
                user: String::new(),
                reason: "the webhook URL must be an http(s) URL".into(),
            });
        }
        Ok(WebhookUrl(url))
    }
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookUrl(<redacted>)")
    }
}

/// Posts each approver's link and a summary to a chat channel's incoming webhook
/// as `{"text": ...}`, the form Teams, Mattermost and Google Chat all accept.
/// Everyone in the channel may see the link; only its approver's code answers it.
pub struct ChatWebhookNotifier {
    links: Arc<dyn ApprovalLinks>,
    url: WebhookUrl,
    http: reqwest::Client,
}

impl std::fmt::Debug for ChatWebhookNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatWebhookNotifier")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ChatWebhookNotifier {
    /// `links` mints the links (a [`LinkIssuer`] for [`ApprovalChannel::ChatLink`]).
    pub fn new(links: Arc<dyn ApprovalLinks>, url: WebhookUrl) -> Result<Self, NotifyError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            // A redirect would carry the link somewhere unconfigured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| NotifyError {
                channel: ApprovalChannel::ChatLink.as_str(),
                user: String::new(),
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(ChatWebhookNotifier { links, url, http })
    }

    async fn post(&self, to: &UserRecord, text: String) -> Result<(), NotifyError> {
        let fail = |reason: String| NotifyError {
            channel: ApprovalChannel::ChatLink.as_str(),
            user: to.id.clone(),
            reason,
        };
        let body = serde_json::json!({ "text": text }).to_string();
        let response = self
            .http
            .post(self.url.0.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            // Without the URL: it is a secret.
            .map_err(|e| fail(format!("webhook unreachable: {}", e.without_url())))?;
        if !response.status().is_success() {
            return Err(fail(format!("webhook answered {}", response.status())));
        }
        Ok(())
    }
}

impl Notifier for ChatWebhookNotifier {
    fn channel(&self) -> ApprovalChannel {
        ApprovalChannel::ChatLink
    }

    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let link = self.links.link_for(to, notice).await?;
            let text = format!(
                "Approval requested from {name} ({email}):\n{summary}\n\
                 Review and answer: {link}\n\
                 (one-time link for {name}; answering needs their authenticator code)",
                name = to.name,
                email = to.email,
                summary = summary(notice),
            );
            self.post(to, text).await
        })
    }

    /// Never: whoever opens an enrolment link first enrols, and a chat
    /// channel's members would all see it.
    fn enrol<'a>(
        &'a self,
        to: &'a UserRecord,
        _enrolment: &'a EnrolmentNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            Err(NotifyError {
                channel: ApprovalChannel::ChatLink.as_str(),
                user: to.id.clone(),
                reason: "a shared chat channel would show the enrolment link to everyone in it"
                    .into(),
            })
        })
    }

    fn conclude<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
        outcome: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let text = format!(
                "{} ended: {outcome}. The approval link sent to {} no longer counts.",
                notice.workflow_id, to.name
            );
            self.post(to, text).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralizes_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let key = MfaKey::from_bytes([7; 32]);
        assert_eq!(format!("{key:?}"), "MfaKey(<redacted>)");
        let url = WebhookUrl::new("https://chat.example.com/hooks/SECRETPART").expect("url");
        assert!(!format!("{url:?}").contains("SECRETPART"));
        assert!(WebhookUrl::new("ftp://x").is_err());
        assert!(WebhookUrl::new("not a url").is_err());
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; custos_csrf=n.m; b=2"),
        );
        assert_eq!(cookie_value(&h, "custos_csrf").as_deref(), Some("n.m"));
        assert_eq!(cookie_value(&h, "missing"), None);
    }

    #[test]
    fn timestamps_render_in_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert!(format_ms(i64::MAX).contains("ms since the epoch"));
    }
}
