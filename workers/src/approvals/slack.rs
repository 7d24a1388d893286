//! The Slack approval channel: a Block Kit message in each approver's DM with
//! Approve and Reject buttons ([`SlackNotifier`]), and the endpoint Slack calls
//! when one is clicked ([`slack_router`]).
//!
//! Slack only authenticates who clicked: each request's v0 signature is checked
//! before anything in it is read, the Slack user is mapped to a directory user,
//! and the ballot box decides whether the answer counts. A request that needs
//! step-up is never approved in place: its Approve button opens the web approval
//! page, where the second factor is asked.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use slack_morphism::prelude::{
    SlackActionId, SlackActionsBlock, SlackBlock, SlackBlockButtonElement, SlackBlockButtonStyle,
    SlackBlockMarkDownText, SlackBlockPlainText, SlackContextBlock, SlackHeaderBlock,
    SlackMessageContent, SlackSectionBlock,
};
use zeroize::Zeroizing;

use custos_adapters::slack::{MessageRef, SlackApi};
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice, ApprovalVote, MfaMethod, Vote};
use custos_schemas::{RequestContext, UserRecord};

use super::{
    ApprovalLinks, Ballot, BallotBox, BallotError, EnrolmentNotice, Notifier, NotifyError, Receipt,
};

/// Environment variables holding the secrets (never CLI arguments: those show in
/// process listings and shell history).
pub const SIGNING_SECRET_ENV: &str = "CUSTOS_SLACK_SIGNING_SECRET";
pub const BOT_TOKEN_ENV: &str = "CUSTOS_SLACK_BOT_TOKEN";

/// Where Slack's `response_url`s point; anything else in a payload is refused so
/// the endpoint cannot be used to make Custos post elsewhere.
pub const SLACK_RESPONSE_URL_PREFIX: &str = "https://hooks.slack.com/";

/// The path Slack's interactivity request URL must name.
pub const INTERACTIONS_PATH: &str = "/slack/interactions";

/// Slack's advice: refuse a signature whose timestamp is further than this from now.
const SIGNATURE_WINDOW_SECS: u64 = 300;
/// Interaction payloads carry the clicked message; they stay far below this.
const MAX_BODY_BYTES: usize = 256 * 1024;

const ACTION_APPROVE: &str = "custos_approve";
const ACTION_REJECT: &str = "custos_reject";
/// The step-up Approve button only opens a URL, but Slack still reports the click.
const ACTION_APPROVE_WEB: &str = "custos_approve_web";

// Block Kit limits (characters).
const HEADER_MAX: usize = 150;
const FIELD_MAX: usize = 2000;
const SECTION_MAX: usize = 3000;

/// The two Slack secrets, from the environment. Redacted in `Debug`.
pub struct SlackSecrets {
    signing_secret: Zeroizing<String>,
    bot_token: Zeroizing<String>,
}

impl fmt::Debug for SlackSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SlackSecrets(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not set (or empty): the Slack approval channel needs it")]
pub struct MissingSecret(pub &'static str);

impl SlackSecrets {
    pub fn new(signing_secret: String, bot_token: String) -> Result<Self, MissingSecret> {
        if signing_secret.is_empty() {
            return Err(MissingSecret(SIGNING_SECRET_ENV));
        }
        if bot_token.is_empty() {
            return Err(MissingSecret(BOT_TOKEN_ENV));
        }
        Ok(SlackSecrets {
            signing_secret: Zeroizing::new(signing_secret),
            bot_token: Zeroizing::new(bot_token),
        })
    }

    /// From `CUSTOS_SLACK_SIGNING_SECRET` and `CUSTOS_SLACK_BOT_TOKEN`.
    pub fn from_env() -> Result<Self, MissingSecret> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (the environment, a config map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, MissingSecret> {
        let signing_secret = lookup(SIGNING_SECRET_ENV).ok_or(MissingSecret(SIGNING_SECRET_ENV))?;
        let bot_token = lookup(BOT_TOKEN_ENV).ok_or(MissingSecret(BOT_TOKEN_ENV))?;
        Self::new(signing_secret, bot_token)
    }

    pub fn bot_token(&self) -> &str {
        &self.bot_token
    }
}

/// What an Approve or Reject button carries: the exact request and policy the
/// approver was shown, so the ballot box can refuse a stale answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ButtonValue {
    workflow_id: String,
    request_hash: String,
    policy_version: String,
}

// ---------------------------------------------------------------------------
// Notifier

/// Asks approvers in a Slack DM from the app and updates that message with the
/// outcome.
pub struct SlackNotifier {
    api: Arc<SlackApi>,
    links: Arc<dyn ApprovalLinks>,
    /// (workflow id, directory user id) -> the message that asked them.
    sent: Mutex<HashMap<(String, String), MessageRef>>,
}

impl fmt::Debug for SlackNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackNotifier")
            .field("api", &self.api)
            .field("messages", &self.sent_lock().len())
            .finish_non_exhaustive()
    }
}

impl SlackNotifier {
    /// `links` mints the web approval page link shown when a notice needs step-up.
    pub fn new(api: Arc<SlackApi>, links: Arc<dyn ApprovalLinks>) -> Self {
        SlackNotifier {
            api,
            links,
            sent: Mutex::new(HashMap::new()),
        }
    }

    fn sent_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), MessageRef>> {
        // A panic elsewhere while holding the lock leaves a valid map.
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn ask_inner(&self, to: &UserRecord, notice: &ApprovalNotice) -> Result<(), String> {
        let slack_id = slack_id(to)?;
        let link = if notice.step_up_required {
            Some(
                self.links
                    .link_for(to, notice)
                    .await
                    .map_err(|e| e.reason)?,
            )
        } else {
            None
        };
        let content = approval_message(notice, link.as_deref())?;
        let key = (notice.workflow_id.clone(), to.id.clone());
        let existing = self.sent_lock().get(&key).cloned();
        match existing {
            // Asked again (the notice changed): refresh the same message.
            Some(at) => self
                .api
                .update_message(&at, content)
                .await
                .map_err(|e| e.to_string()),
            None => {
                let at = self
                    .api
                    .post_message(slack_id, content)
                    .await
                    .map_err(|e| e.to_string())?;
                self.sent_lock().insert(key, at);
                Ok(())
            }
        }
    }

    async fn conclude_inner(
        &self,
        to: &UserRecord,
        notice: &ApprovalNotice,
        outcome: &str,
    ) -> Result<(), String> {
        let content = concluded_message(notice, outcome);
        let at = self
            .sent_lock()
            .remove(&(notice.workflow_id.clone(), to.id.clone()));
        match at {
            Some(at) => self
                .api
                .update_message(&at, content)
                .await
                .map_err(|e| e.to_string()),
            // Not asked by this process (e.g. it restarted): say it in a new message.
            None => self
                .api
                .post_message(slack_id(to)?, content)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}

fn slack_id(to: &UserRecord) -> Result<&str, String> {
    to.slack_user_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "no Slack user id in the directory".to_string())
}

fn notify_error(to: &UserRecord, reason: String) -> NotifyError {
    NotifyError {
        channel: ApprovalChannel::Slack.as_str(),
        user: to.id.clone(),
        reason,
    }
}

impl Notifier for SlackNotifier {
    fn channel(&self) -> ApprovalChannel {
        ApprovalChannel::Slack
    }

    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            self.ask_inner(to, notice)
                .await
                .map_err(|r| notify_error(to, r))
        })
    }

    /// In the user's DM from the app, which only they read.
    fn enrol<'a>(
        &'a self,
        to: &'a UserRecord,
        enrolment: &'a EnrolmentNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let text = zeroize::Zeroizing::new(format!(
                "{} asked Custos to set up your {} for approvals. Open this one-time link yourself (do not forward it): {}",
                esc(&enrolment.requested_by),
                super::links::enrolment_what(enrolment.method),
                enrolment.url.as_str()
            ));
            let id = slack_id(to).map_err(|r| notify_error(to, r))?;
            self.api
                .post_message(id, SlackMessageContent::new().with_text(text.to_string()))
                .await
                .map(|_| ())
                .map_err(|e| notify_error(to, e.to_string()))
        })
    }

    fn conclude<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
        outcome: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            self.conclude_inner(to, notice, outcome)
                .await
                .map_err(|r| notify_error(to, r))
        })
    }
}

// ---------------------------------------------------------------------------
// Rendering

/// The message asking for an answer. `approve_link` (step-up) replaces the
/// in-place Approve button by a link to the web approval page.
fn approval_message(
    notice: &ApprovalNotice,
    approve_link: Option<&str>,
) -> Result<SlackMessageContent, String> {
    let value = serde_json::to_string(&ButtonValue {
        workflow_id: notice.workflow_id.clone(),
        request_hash: notice.request_hash.clone(),
        policy_version: notice.policy_version.clone(),
    })
    .map_err(|e| format!("button value: {e}"))?;
    let approve = match approve_link {
        Some(link) => {
            let url: url::Url = link
                .parse()
                .map_err(|e| format!("approval link is not a URL: {e}"))?;
            SlackBlockButtonElement::new(
                SlackBlockPlainText::from("Approve on the web (MFA)").into(),
            )
            .with_action_id(SlackActionId(ACTION_APPROVE_WEB.into()))
            .with_url(url)
            .with_style(SlackBlockButtonStyle::Primary)
        }
        None => SlackBlockButtonElement::new(SlackBlockPlainText::from("Approve").into())
            .with_action_id(SlackActionId(ACTION_APPROVE.into()))
            .with_value(value.clone())
            .with_style(SlackBlockButtonStyle::Primary),
    };
    let reject = SlackBlockButtonElement::new(SlackBlockPlainText::from("Reject").into())
        .with_action_id(SlackActionId(ACTION_REJECT.into()))
        .with_value(value)
        .with_style(SlackBlockButtonStyle::Danger);

    let mut blocks = notice_blocks(notice, "Approval requested");
    if super::ballot_box::needs_passkey(notice) {
        blocks.push(context(
            "A passkey is required: approve on the web approval page with your passkey, never here.",
        ));
    } else if notice.step_up_required {
        blocks.push(context(
            "High value: approving needs the web approval page and a second factor.",
        ));
    }
    blocks.push(SlackActionsBlock::new(vec![approve.into(), reject.into()]).into());
    Ok(SlackMessageContent::new()
        .with_text(summary(notice, "Approval requested"))
        .with_blocks(blocks))
}

/// The same facts without buttons, with how it ended.
fn concluded_message(notice: &ApprovalNotice, outcome: &str) -> SlackMessageContent {
    let mut blocks = notice_blocks(notice, "Approval request");
    blocks.push(section(&format!("*Outcome*\n{}", esc(outcome))));
    SlackMessageContent::new()
        .with_text(format!(
            "{}: {}",
            summary(notice, "Approval request"),
            esc(outcome)
        ))
        .with_blocks(blocks)
}

/// A message only the clicking user sees.
fn note(text: &str) -> SlackMessageContent {
    SlackMessageContent::new().with_text(esc(text))
}

fn summary(notice: &ApprovalNotice, title: &str) -> String {
    let r = &notice.request;
    // The fallback `text` is mrkdwn too (notifications show it).
    esc(&format!(
        "{title}: {} {} from {} to {}",
        r.amount, r.asset, r.wallet, r.destination
    ))
}

fn notice_blocks(notice: &ApprovalNotice, title: &str) -> Vec<SlackBlock> {
    let r = &notice.request;
    let mut amount = format!("*Amount*\n{} {}", esc(&r.amount), esc(&r.asset));
    if let Some(fiat) = &notice.fiat_value {
        amount.push_str(&format!(
            " (≈ {} {})",
            esc(&fiat.amount),
            esc(&fiat.currency)
        ));
    }
    let whitelisted = match notice.whitelisted {
        Some(true) => "in the wallet's address book",
        Some(false) => ":warning: NOT in the wallet's address book",
        None => "no address book applies",
    };
    let mut fields = vec![
        amount,
        format!("*Asset*\n{}", esc(&r.asset)),
        format!("*Chain*\n{}", esc(&notice.chain)),
        format!("*Wallet*\n{}", esc(&r.wallet)),
        format!("*Destination*\n`{}`\n{whitelisted}", code(&r.destination)),
        format!("*Initiator*\n{}", esc(&r.initiator)),
        format!("*Expires*\n{}", expiry(notice.expires_at)),
        format!("*Request*\n{}", esc(&r.request_id)),
    ];
    if let Some(memo) = r.memo.as_deref().filter(|m| !m.is_empty()) {
        fields.push(format!("*Memo*\n{}", esc(memo)));
    }
    let fields = fields
        .iter()
        .map(|f| SlackBlockMarkDownText::from(clip(f, FIELD_MAX)).into())
        .collect();
    let approved = if notice.approved_by.is_empty() {
        "none yet".to_string()
    } else {
        esc(&notice.approved_by.join(", "))
    };
    let missing = if notice.missing.is_empty() {
        "nothing".to_string()
    } else {
        esc(&notice.missing.join("; "))
    };
    vec![
        SlackHeaderBlock::new(
            SlackBlockPlainText::from(clip(
                &format!("{title}: {} {}", r.amount, r.asset),
                HEADER_MAX,
            ))
            .into(),
        )
        .into(),
        SlackSectionBlock::new().with_fields(fields).into(),
        section(&format!(
            "*Why approval is needed*\n{}",
            esc(&notice.explanation)
        )),
        section(&format!(
            "*Approvals so far*\n{approved}\n*Still missing*\n{missing}"
        )),
        context(&format!(
            "Workflow {} · request hash `{}` · policy {}",
            esc(&notice.workflow_id),
            code(&notice.request_hash),
            esc(&notice.policy_version)
        )),
    ]
}

fn section(mrkdwn: &str) -> SlackBlock {
    SlackSectionBlock::new()
        .with_text(SlackBlockMarkDownText::from(clip(mrkdwn, SECTION_MAX)).into())
        .into()
}

fn context(mrkdwn: &str) -> SlackBlock {
    SlackContextBlock::new(vec![
        SlackBlockMarkDownText::from(clip(mrkdwn, SECTION_MAX)).into(),
    ])
    .into()
}

/// Slack's mrkdwn control characters: without this a memo could mention
/// `<!channel>` or show a link whose text lies about its target.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Escaped for inside a code span, which a backtick would end.
fn code(s: &str) -> String {
    esc(s).replace('`', "'")
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Slack renders `<!date^…>` in the reader's time zone; the fallback is UTC.
fn expiry(expires_at_ms: Option<i64>) -> String {
    let Some(ms) = expires_at_ms else {
        return "no expiry".to_string();
    };
    let secs = ms.div_euclid(1000);
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    match time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&format).ok())
    {
        Some(utc) => format!("<!date^{secs}^{{date_short_pretty}} {{time}}|{utc}>"),
        None => format!("{ms} ms after the epoch"),
    }
}

// ---------------------------------------------------------------------------
// Interactions endpoint

/// Unix seconds now. Injectable so tests can present stale signatures.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Everything the interactions endpoint needs.
pub struct SlackInteractions {
    ballots: Arc<dyn BallotBox>,
    api: Arc<SlackApi>,
    signing_secret: Zeroizing<Vec<u8>>,
    response_url_prefix: String,
    clock: Clock,
    /// Signatures seen inside the window, with their timestamps.
    seen: Mutex<HashMap<String, i64>>,
}

impl fmt::Debug for SlackInteractions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackInteractions")
            .field("api", &self.api)
            .field("signing_secret", &"<redacted>")
            .field("response_url_prefix", &self.response_url_prefix)
            .finish_non_exhaustive()
    }
}

impl SlackInteractions {
    /// Answers go to Slack's `response_url`s (see [`SLACK_RESPONSE_URL_PREFIX`]);
    /// the system clock dates signatures.
    pub fn new(ballots: Arc<dyn BallotBox>, api: Arc<SlackApi>, secrets: &SlackSecrets) -> Self {
        SlackInteractions {
            ballots,
            api,
            signing_secret: Zeroizing::new(secrets.signing_secret.as_bytes().to_vec()),
            response_url_prefix: SLACK_RESPONSE_URL_PREFIX.to_string(),
            clock: Arc::new(system_now),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Accept `response_url`s under another prefix (an emulator).
    pub fn with_response_url_prefix(mut self, prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        // Without the slash `https://hooks.slack.com` would admit `…slack.com.evil`.
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        self.response_url_prefix = prefix;
        self
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Refuses a signature already seen inside the window (a captured request
    /// sent again). Only signed requests get here, so only Slack can grow the map.
    fn admit(&self, signature: &str, timestamp: i64, now: i64) -> Result<(), &'static str> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, ts| now.abs_diff(*ts) <= SIGNATURE_WINDOW_SECS);
        if seen.contains_key(signature) {
            return Err("replayed request");
        }
        seen.insert(signature.to_string(), timestamp);
        Ok(())
    }
}

fn system_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `POST /slack/interactions`, Slack's interactivity request URL.
pub fn slack_router(interactions: SlackInteractions) -> Router {
    Router::new()
        .route(INTERACTIONS_PATH, post(interaction))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(interactions))
}

/// Checks Slack's v0 signature: HMAC-SHA256 over `v0:{timestamp}:{body}` with
/// the signing secret, the timestamp within the window. Returns the digest (hex)
/// and the timestamp.
fn verify_signature(
    secret: &[u8],
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(String, i64), &'static str> {
    let raw_ts = headers
        .get("x-slack-request-timestamp")
        .ok_or("missing X-Slack-Request-Timestamp")?
        .to_str()
        .map_err(|_| "malformed X-Slack-Request-Timestamp")?;
    let timestamp: i64 = raw_ts
        .parse()
        .map_err(|_| "malformed X-Slack-Request-Timestamp")?;
    if now.abs_diff(timestamp) > SIGNATURE_WINDOW_SECS {
        return Err("stale timestamp");
    }
    let signature = headers
        .get("x-slack-signature")
        .ok_or("missing X-Slack-Signature")?
        .to_str()
        .map_err(|_| "malformed X-Slack-Signature")?;
    let digest = signature
        .strip_prefix("v0=")
        .ok_or("unsupported signature version")?;
    let digest = hex::decode(digest).map_err(|_| "malformed X-Slack-Signature")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "unusable signing secret")?;
    mac.update(b"v0:");
    mac.update(raw_ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    // Constant time: `verify_slice` compares with `subtle`.
    mac.verify_slice(&digest)
        .map_err(|_| "signature mismatch")?;
    // Normalized, so an upper-case copy of a signature is the same replay.
    Ok((hex::encode(digest), timestamp))
}

/// The parts of a `block_actions` payload this channel reads.
#[derive(Debug, Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: String,
    user: InteractionUser,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    actions: Vec<InteractionAction>,
}

#[derive(Debug, Deserialize)]
struct InteractionUser {
    id: String,
}

#[derive(Debug, Deserialize)]
struct InteractionAction {
    action_id: String,
    #[serde(default)]
    value: Option<String>,
}

/// A click to record.
#[derive(Debug)]
struct Click {
    slack_user_id: String,
    vote: Vote,
    button: ButtonValue,
    response_url: String,
    masked_ip: Option<String>,
    user_agent: Option<String>,
}

fn parse_interaction(body: &[u8]) -> Result<Interaction, String> {
    let payload = form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v)
        .ok_or("missing payload field")?;
    let mut de = serde_json::Deserializer::from_str(&payload);
    serde_path_to_error::deserialize(&mut de).map_err(|e| match e.path().to_string() {
        // The path of a top-level error is ".".
        path if path == "." => format!("payload: {}", e.inner()),
        path => format!("payload.{path}: {}", e.inner()),
    })
}

fn refuse(status: StatusCode, reason: &str) -> Response {
    (status, reason.to_string()).into_response()
}

async fn interaction(
    State(slack): State<Arc<SlackInteractions>>,
    // Present when served with `into_make_service_with_connect_info`.
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = (slack.clock)();
    let (signature, timestamp) = match verify_signature(&slack.signing_secret, &headers, &body, now)
    {
        Ok(ok) => ok,
        Err(reason) => {
            tracing::warn!(reason, "Slack interaction refused");
            return refuse(StatusCode::UNAUTHORIZED, reason);
        }
    };
    if let Err(reason) = slack.admit(&signature, timestamp, now) {
        tracing::warn!(reason, "Slack interaction refused");
        return refuse(StatusCode::UNAUTHORIZED, reason);
    }
    let click = match read_click(&slack, &body, &headers, peer.map(|p| p.0.0.ip())) {
        Ok(Some(click)) => click,
        // A click on the web-page link: Slack only needs the acknowledgement.
        Ok(None) => return StatusCode::OK.into_response(),
        Err(reason) => {
            tracing::warn!(%reason, "Slack interaction refused");
            return refuse(StatusCode::BAD_REQUEST, &reason);
        }
    };
    // Slack wants an answer within 3 s; casting waits on the ledger, so the
    // outcome goes to the message through its response_url.
    tokio::spawn(async move {
        let (content, replace) = decide(&slack, &click).await;
        if let Err(e) = slack
            .api
            .respond(&click.response_url, content, replace)
            .await
        {
            tracing::warn!(workflow = %click.button.workflow_id, error = %e, "could not show a Slack approval's outcome");
        }
    });
    StatusCode::OK.into_response()
}

fn read_click(
    slack: &SlackInteractions,
    body: &[u8],
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Option<Click>, String> {
    let interaction = parse_interaction(body)?;
    if interaction.kind != "block_actions" {
        return Err(format!(
            "payload.type: unsupported interaction {}",
            clip(&interaction.kind, 64)
        ));
    }
    let action = interaction
        .actions
        .first()
        .ok_or("payload.actions: no action")?;
    let vote = match action.action_id.as_str() {
        ACTION_APPROVE => Vote::Approve,
        ACTION_REJECT => Vote::Reject,
        ACTION_APPROVE_WEB => return Ok(None),
        other => {
            return Err(format!(
                "payload.actions[0].action_id: unknown action {}",
                clip(other, 64)
            ));
        }
    };
    let value = action
        .value
        .as_deref()
        .ok_or("payload.actions[0].value: missing")?;
    let button: ButtonValue =
        serde_json::from_str(value).map_err(|e| format!("payload.actions[0].value: {e}"))?;
    let response_url = interaction
        .response_url
        .ok_or("payload.response_url: missing")?;
    if !response_url.starts_with(&slack.response_url_prefix) {
        return Err("payload.response_url: not a Slack response URL".into());
    }
    // Behind a proxy the client is the first X-Forwarded-For hop.
    let forwarded = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|ip| ip.trim().parse::<IpAddr>().ok());
    let user_agent = headers
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .map(|ua| clip(ua, 256));
    Ok(Some(Click {
        slack_user_id: interaction.user.id,
        vote,
        button,
        response_url,
        masked_ip: forwarded.or(peer).map(RequestContext::mask_ip),
        user_agent,
    }))
}

/// Records the click and says what became of it: a replacement of the clicked
/// message (`true`), or a note only the clicking user sees (`false`).
async fn decide(slack: &SlackInteractions, click: &Click) -> (SlackMessageContent, bool) {
    let workflow_id = &click.button.workflow_id;
    let Some(user) = slack.ballots.user_by_slack_id(&click.slack_user_id).await else {
        tracing::warn!(slack_user = %click.slack_user_id, workflow = %workflow_id, "Slack user not in the directory");
        return (
            note("Your Slack account is not linked to a Custos approver: nothing was recorded."),
            false,
        );
    };
    let notice = slack.ballots.notice(workflow_id).await;
    if click.vote == Vote::Approve {
        // The ballot box's notice decides, never the button that was clicked.
        match &notice {
            Ok(n) if super::ballot_box::needs_passkey(n) => {
                return (
                    note(
                        "This request requires a passkey: use the \"Approve on the web (MFA)\" \
                         button and answer with your passkey there. Nothing was recorded.",
                    ),
                    false,
                );
            }
            Ok(n) if n.step_up_required => {
                return (
                    note(
                        "This request needs the web approval page and a second factor: \
                         use the \"Approve on the web (MFA)\" button. Nothing was recorded.",
                    ),
                    false,
                );
            }
            Ok(_) => {}
            Err(e) => return (note(&not_recorded(e)), false),
        }
    }
    let ballot = Ballot {
        workflow_id: workflow_id.clone(),
        user_id: user.id.clone(),
        vote: ApprovalVote {
            vote: click.vote,
            request_hash: click.button.request_hash.clone(),
            policy_version: click.button.policy_version.clone(),
            channel: ApprovalChannel::Slack,
            mfa: MfaMethod::None,
            comment: None,
        },
        masked_ip: click.masked_ip.clone(),
        user_agent: click.user_agent.clone(),
    };
    match slack.ballots.cast(ballot).await {
        Ok(Receipt::Recorded { quorum_reached }) => {
            let mut outcome = match click.vote {
                Vote::Approve => format!("Approved by {}.", user.name),
                Vote::Reject => format!("Rejected by {}.", user.name),
            };
            if quorum_reached {
                outcome.push_str(" All required approvals are in.");
            }
            // Re-read so the message lists this approval too.
            let shown = match slack.ballots.notice(workflow_id).await {
                Ok(fresh) => Some(fresh),
                Err(_) => notice.ok(),
            };
            match shown {
                Some(n) => (concluded_message(&n, &outcome), true),
                None => (note(&outcome), false),
            }
        }
        Ok(Receipt::Duplicate) => (
            note("You already answered this request: nothing changed."),
            false,
        ),
        Err(e) => (note(&not_recorded(&e)), false),
    }
}

fn not_recorded(e: &BallotError) -> String {
    match e {
        BallotError::Refused(reason) => format!("Not recorded: {reason}"),
        BallotError::UnknownWorkflow(_) => {
            "Not recorded: this request is no longer awaiting approvals.".to_string()
        }
        BallotError::Unavailable(_) => {
            "Not recorded: Custos is unavailable right now, please try again.".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(secret: &[u8], ts: &str, body: &[u8]) -> HeaderMap {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("key");
        mac.update(format!("v0:{ts}:").as_bytes());
        mac.update(body);
        let sig = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
        let mut h = HeaderMap::new();
        h.insert("x-slack-request-timestamp", ts.parse().expect("header"));
        h.insert("x-slack-signature", sig.parse().expect("header"));
        h
    }

    #[test]
    fn signatures_are_checked() {
        let body = b"payload=%7B%7D";
        let h = signed(b"secret", "1000", body);
        assert!(verify_signature(b"secret", &h, body, 1000).is_ok());
        assert!(verify_signature(b"secret", &h, body, 1300).is_ok());
        assert_eq!(
            verify_signature(b"secret", &h, body, 1301),
            Err("stale timestamp")
        );
        assert_eq!(
            verify_signature(b"secret", &h, body, 699),
            Err("stale timestamp")
        );
        assert_eq!(
            verify_signature(b"other", &h, body, 1000),
            Err("signature mismatch")
        );
        assert_eq!(
            verify_signature(b"secret", &h, b"payload=%7B%7D ", 1000),
            Err("signature mismatch")
        );
        let mut bad = h.clone();
        bad.insert("x-slack-signature", "v1=00".parse().expect("header"));
        assert_eq!(
            verify_signature(b"secret", &bad, body, 1000),
            Err("unsupported signature version")
        );
        bad.insert("x-slack-signature", "v0=zz".parse().expect("header"));
        assert_eq!(
            verify_signature(b"secret", &bad, body, 1000),
            Err("malformed X-Slack-Signature")
        );
        bad.insert("x-slack-request-timestamp", "soon".parse().expect("header"));
        assert_eq!(
            verify_signature(b"secret", &bad, body, 1000),
            Err("malformed X-Slack-Request-Timestamp")
        );
        assert_eq!(
            verify_signature(b"secret", &HeaderMap::new(), body, 1000),
            Err("missing X-Slack-Request-Timestamp")
        );
    }

    #[test]
    fn bad_payloads_name_the_field() {
        assert_eq!(
            parse_interaction(b"foo=bar").map(|_| ()),
            Err("missing payload field".into())
        );
        let err = parse_interaction(b"payload=%7B%22type%22%3A%22block_actions%22%7D")
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("user"), "{err}");
        let err = parse_interaction(b"payload=not-json")
            .map(|_| ())
            .unwrap_err();
        assert!(err.starts_with("payload"), "{err}");
    }

    #[test]
    fn secrets_come_from_the_environment_and_stay_hidden() {
        let vars = |name: &str| match name {
            SIGNING_SECRET_ENV => Some("sign-me".to_string()),
            BOT_TOKEN_ENV => Some("xoxb-token".to_string()),
            _ => None,
        };
        let secrets = SlackSecrets::from_lookup(vars).expect("secrets");
        assert_eq!(secrets.bot_token(), "xoxb-token");
        let dbg = format!("{secrets:?}");
        assert!(!dbg.contains("sign-me") && !dbg.contains("xoxb"), "{dbg}");
        assert_eq!(
            SlackSecrets::from_lookup(|_| None).map(|_| ()),
            Err(MissingSecret(SIGNING_SECRET_ENV))
        );
        assert_eq!(
            SlackSecrets::new("s".into(), String::new()).map(|_| ()),
            Err(MissingSecret(BOT_TOKEN_ENV))
        );
    }

    #[test]
    fn mrkdwn_is_escaped_and_clipped() {
        assert_eq!(
            esc("<!channel> & <http://x|y>"),
            "&lt;!channel&gt; &amp; &lt;http://x|y&gt;"
        );
        assert_eq!(code("a`b"), "a'b");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
        assert_eq!(expiry(None), "no expiry");
        assert_eq!(
            expiry(Some(1_700_000_000_000)),
            "<!date^1700000000^{date_short_pretty} {time}|2023-11-14 22:13 UTC>"
        );
    }
}
