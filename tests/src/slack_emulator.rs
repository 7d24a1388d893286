//! A Slack Web API emulator on a free loopback port (`chat.postMessage`,
//! `chat.update`, and `response_url` targets) that checks the bot token and
//! records every call, plus interaction payloads built and signed as Slack does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// One call the emulator received.
#[derive(Debug, Clone)]
pub struct SlackCall {
    /// `chat.postMessage`, `chat.update` or `response_url`.
    pub method: String,
    pub path: String,
    /// Whether it carried the expected bot token (`response_url` calls carry none).
    pub authorized: bool,
    pub body: Value,
}

#[derive(Debug)]
struct Recorder {
    token: String,
    calls: Mutex<Vec<SlackCall>>,
    next_ts: Mutex<u64>,
}

impl Recorder {
    fn record(&self, call: SlackCall) {
        self.calls.lock().expect("calls").push(call);
    }
}

/// The emulator, stopped in `Drop`.
#[derive(Debug)]
pub struct SlackEmulator {
    addr: SocketAddr,
    recorder: Arc<Recorder>,
    task: JoinHandle<()>,
}

impl SlackEmulator {
    /// Serves on a free loopback port; API calls must carry `Bearer {token}`.
    pub async fn start(token: &str) -> SlackEmulator {
        let recorder = Arc::new(Recorder {
            token: token.to_string(),
            calls: Mutex::new(Vec::new()),
            next_ts: Mutex::new(1),
        });
        let app = Router::new()
            .route("/api/{method}", post(api_call))
            .route("/actions/{*id}", post(response_url))
            .with_state(recorder.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind emulator");
        let addr = listener.local_addr().expect("emulator address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlackEmulator {
            addr,
            recorder,
            task,
        }
    }

    /// The Web API base URL, as `SlackApi::new` takes it.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Prefix of every `response_url` this emulator hands out.
    pub fn response_url_prefix(&self) -> String {
        format!("http://{}/actions/", self.addr)
    }

    /// A fresh `response_url`, as Slack puts one in each interaction payload.
    pub fn response_url(&self, id: &str) -> String {
        format!("{}{id}", self.response_url_prefix())
    }

    pub fn calls(&self) -> Vec<SlackCall> {
        self.recorder.calls.lock().expect("calls").clone()
    }

    pub fn calls_to(&self, method: &str) -> Vec<SlackCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Waits until `count` calls of `method` arrived (they are made after Slack
    /// got its answer), or panics after a few seconds.
    pub async fn wait_for(&self, method: &str, count: usize) -> Vec<SlackCall> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let calls = self.calls_to(method);
            if calls.len() >= count {
                return calls;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {count} {method} calls, got {}: {:?}",
                calls.len(),
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SlackEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn slack_json(value: Value) -> Response {
    // Slack answers API errors with 200 and `ok: false`.
    (StatusCode::OK, axum::Json(value)).into_response()
}

async fn api_call(
    State(rec): State<Arc<Recorder>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", rec.token));
    let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    rec.record(SlackCall {
        method: method.clone(),
        path: format!("/api/{method}"),
        authorized,
        body: parsed.clone(),
    });
    if !authorized {
        return slack_json(json!({"ok": false, "error": "invalid_auth"}));
    }
    let channel = parsed["channel"].as_str().unwrap_or_default();
    let text = parsed["text"].as_str().unwrap_or_default();
    match method.as_str() {
        "chat.postMessage" => {
            let ts = {
                let mut next = rec.next_ts.lock().expect("ts");
                *next += 1;
                format!("1700000000.{:06}", *next)
            };
            // Posting to a user id opens the app's DM with them.
            let channel = match channel.strip_prefix('U') {
                Some(rest) => format!("D{rest}"),
                None => channel.to_string(),
            };
            slack_json(json!({
                "ok": true, "channel": channel, "ts": ts,
                "message": {"ts": ts, "text": text}
            }))
        }
        "chat.update" => slack_json(json!({
            "ok": true, "channel": channel, "ts": parsed["ts"], "text": text,
            "message": {"text": text}
        })),
        _ => slack_json(json!({"ok": false, "error": "unknown_method"})),
    }
}

async fn response_url(
    State(rec): State<Arc<Recorder>>,
    Path(id): Path<String>,
    body: String,
) -> Response {
    let parsed: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    rec.record(SlackCall {
        method: "response_url".into(),
        path: format!("/actions/{id}"),
        authorized: true,
        body: parsed,
    });
    slack_json(json!({"ok": true}))
}

/// A `block_actions` payload as Slack sends it when `slack_user_id` clicks the
/// button `action_id` carrying `value`.
pub fn block_actions(
    slack_user_id: &str,
    action_id: &str,
    value: Option<&str>,
    response_url: &str,
) -> Value {
    let mut action = json!({
        "type": "button",
        "block_id": "b1",
        "action_id": action_id,
        "text": {"type": "plain_text", "text": "Approve", "emoji": true},
        "action_ts": "1700000001.000200"
    });
    if let Some(v) = value {
        action["value"] = json!(v);
    }
    json!({
        "type": "block_actions",
        "user": {"id": slack_user_id, "username": "someone", "name": "someone", "team_id": "T0001"},
        "api_app_id": "A0001",
        "token": "legacy-verification-token",
        "container": {"type": "message", "message_ts": "1700000000.000002", "channel_id": "D0001", "is_ephemeral": false},
        "trigger_id": "1.2.3",
        "team": {"id": "T0001", "domain": "custos"},
        "channel": {"id": "D0001", "name": "directmessage"},
        "message": {"type": "message", "ts": "1700000000.000002", "text": "Approval requested", "blocks": []},
        "response_url": response_url,
        "actions": [action]
    })
}

/// A signed interaction request: the form body and Slack's two headers.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub body: String,
    pub timestamp: String,
    pub signature: String,
}

/// Form-encodes `payload` and signs it the way Slack does: `v0=` + hex
/// HMAC-SHA256 over `v0:{timestamp}:{body}` with the signing secret.
pub fn sign_interaction(signing_secret: &str, timestamp: i64, payload: &Value) -> SignedRequest {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    sign_body(signing_secret, timestamp, body)
}

/// Signs an already encoded body.
pub fn sign_body(signing_secret: &str, timestamp: i64, body: String) -> SignedRequest {
    let timestamp = timestamp.to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_secret.as_bytes()).expect("hmac key");
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    SignedRequest {
        signature: format!("v0={}", hex::encode(mac.finalize().into_bytes())),
        body,
        timestamp,
    }
}

/// A router served on a free loopback port (with peer addresses), stopped in `Drop`.
#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Served {
    pub async fn start(router: Router) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Served { addr, task }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 answer: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// POSTs a form body to `path` over a real TCP connection, with `headers`.
pub async fn post_form(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpReply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: Slackbot 1.0 (+https://api.slack.com/robots)\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read reply");
    let raw = String::from_utf8_lossy(&raw);
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    HttpReply {
        status,
        body: rest.to_string(),
    }
}

/// POSTs a signed interaction as Slack does.
pub async fn post_interaction(
    addr: SocketAddr,
    signed: &SignedRequest,
    extra: &[(&str, &str)],
) -> HttpReply {
    let mut headers = vec![
        ("X-Slack-Request-Timestamp", signed.timestamp.as_str()),
        ("X-Slack-Signature", signed.signature.as_str()),
    ];
    headers.extend_from_slice(extra);
    post_form(addr, "/slack/interactions", &headers, &signed.body).await
}
