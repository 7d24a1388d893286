//! The Slack approval channel over real HTTP: the notifier posts to a Slack Web
//! API emulator, and signed interactions are sent to the real router the way
//! Slack sends them. The ballot box is a recording one (the real one is tested
//! with the engine); the assertions are on what it received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custos_adapters::slack::SlackApi;
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice, MfaMethod, Vote};
use custos_schemas::policy::FiatValue;
use custos_schemas::{TransferRequest, UserRecord};
use custos_tests::slack_emulator::{
    HttpReply, Served, SlackEmulator, block_actions, post_interaction, sign_body, sign_interaction,
};
use custos_workers::approvals::slack::{
    SlackInteractions, SlackNotifier, SlackSecrets, slack_router,
};
use custos_workers::approvals::{
    ApprovalLinks, Ballot, BallotBox, BallotError, Notifier, NotifyError, Receipt,
};
use futures::future::BoxFuture;
use serde_json::{Value, json};

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT_TOKEN: &str = "xoxb-test-token";
const NOW: i64 = 1_800_000_000;
const HASH: &str = "9c1185a5c5e9fc54612808977ee8f548b2258d31f1e1c2a2b1d5b6d1f4a1c0de";

/// Records every ballot; one answer per (workflow, user), like the real one.
#[derive(Debug, Default)]
struct RecordingBallotBox {
    users: Vec<UserRecord>,
    notices: Mutex<HashMap<String, ApprovalNotice>>,
    cast: Mutex<Vec<Ballot>>,
}

impl RecordingBallotBox {
    fn ballots(&self) -> Vec<Ballot> {
        self.cast.lock().expect("cast").clone()
    }
}

impl BallotBox for RecordingBallotBox {
    fn cast(&self, ballot: Ballot) -> BoxFuture<'_, Result<Receipt, BallotError>> {
        Box::pin(async move {
            let mut notices = self.notices.lock().expect("notices");
            let notice = notices
                .get_mut(&ballot.workflow_id)
                .ok_or_else(|| BallotError::UnknownWorkflow(ballot.workflow_id.clone()))?;
            if ballot.vote.request_hash != notice.request_hash {
                return Err(BallotError::Refused("the request changed".into()));
            }
            let mut cast = self.cast.lock().expect("cast");
            let duplicate = cast
                .iter()
                .any(|b| b.workflow_id == ballot.workflow_id && b.user_id == ballot.user_id);
            cast.push(ballot.clone());
            if duplicate {
                return Ok(Receipt::Duplicate);
            }
            if ballot.vote.vote == Vote::Approve {
                notice.approved_by.push(ballot.user_id.clone());
                notice.missing.clear();
            }
            Ok(Receipt::Recorded {
                quorum_reached: ballot.vote.vote == Vote::Approve,
            })
        })
    }

    fn notice<'a>(
        &'a self,
        workflow_id: &'a str,
    ) -> BoxFuture<'a, Result<ApprovalNotice, BallotError>> {
        Box::pin(async move {
            self.notices
                .lock()
                .expect("notices")
                .get(workflow_id)
                .cloned()
                .ok_or_else(|| BallotError::UnknownWorkflow(workflow_id.into()))
        })
    }

    fn user<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async move { self.users.iter().find(|u| u.id == user_id).cloned() })
    }

    fn user_by_slack_id<'a>(&'a self, slack_id: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async move {
            self.users
                .iter()
                .find(|u| u.slack_user_id.as_deref() == Some(slack_id))
                .cloned()
        })
    }
}

#[derive(Debug)]
struct FixedLinks;

impl ApprovalLinks for FixedLinks {
    fn link_for<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<String, NotifyError>> {
        Box::pin(async move {
            Ok(format!(
                "https://custos.example/approve/{}?for={}",
                notice.workflow_id, to.id
            ))
        })
    }
}

fn user(id: &str, name: &str, slack: &str) -> UserRecord {
    UserRecord {
        id: id.into(),
        name: name.into(),
        email: format!("{id}@example.com"),
        slack_user_id: Some(slack.into()),
        roles: vec!["approver".into()],
        groups: vec!["treasury-managers".into()],
        mfa_enrolled: true,
    }
}

fn notice(workflow_id: &str, step_up: bool) -> ApprovalNotice {
    ApprovalNotice {
        workflow_id: workflow_id.into(),
        request: TransferRequest {
            request_id: "req-7781".into(),
            wallet: "treasury-hot".into(),
            asset: "LTC".into(),
            destination: "rltc1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into(),
            amount: "12.5".into(),
            memo: Some("supplier <!channel> invoice 42".into()),
            initiator: "carol".into(),
        },
        request_hash: HASH.into(),
        policy_version: "policy-v3".into(),
        chain: "ltc-regtest".into(),
        fiat_value: Some(FiatValue {
            currency: "EUR".into(),
            amount: "1062.50".into(),
        }),
        whitelisted: Some(false),
        explanation: "rule large-outbound: amount above 1000 EUR; needs 2 of treasury-managers"
            .into(),
        approved_by: vec!["dave".into()],
        missing: vec!["treasury-managers: 1 of 4".into()],
        expires_at: Some(1_700_000_000_000),
        step_up_required: step_up,
    }
}

struct Setup {
    emulator: SlackEmulator,
    ballots: Arc<RecordingBallotBox>,
    server: Served,
    api: Arc<SlackApi>,
    clock: Arc<AtomicI64>,
}

impl Setup {
    async fn start(notices: Vec<ApprovalNotice>) -> Setup {
        let emulator = SlackEmulator::start(BOT_TOKEN).await;
        let ballots = Arc::new(RecordingBallotBox {
            users: vec![
                user("alice", "Alice", "U0ALICE"),
                user("bob", "Bob", "U0BOB"),
            ],
            notices: Mutex::new(
                notices
                    .into_iter()
                    .map(|n| (n.workflow_id.clone(), n))
                    .collect(),
            ),
            cast: Mutex::new(Vec::new()),
        });
        let secrets = SlackSecrets::new(SIGNING_SECRET.into(), BOT_TOKEN.into()).expect("secrets");
        let api = Arc::new(SlackApi::new(secrets.bot_token(), &emulator.api_url()).expect("api"));
        let clock = Arc::new(AtomicI64::new(NOW));
        let now = clock.clone();
        let interactions = SlackInteractions::new(ballots.clone(), api.clone(), &secrets)
            .with_response_url_prefix(emulator.response_url_prefix())
            .with_clock(Arc::new(move || now.load(Ordering::SeqCst)));
        let server = Served::start(slack_router(interactions)).await;
        Setup {
            emulator,
            ballots,
            server,
            api,
            clock,
        }
    }

    fn notifier(&self) -> SlackNotifier {
        SlackNotifier::new(self.api.clone(), Arc::new(FixedLinks))
    }

    /// A click signed now, as Slack sends it.
    async fn click(&self, slack_user: &str, action: &str, value: Option<&str>) -> HttpReply {
        let payload = block_actions(
            slack_user,
            action,
            value,
            &self.emulator.response_url("T1/B1/x"),
        );
        let signed = sign_interaction(SIGNING_SECRET, self.clock.load(Ordering::SeqCst), &payload);
        post_interaction(self.server.addr, &signed, &[]).await
    }
}

fn button_value(n: &ApprovalNotice) -> String {
    json!({
        "workflowId": n.workflow_id,
        "requestHash": n.request_hash,
        "policyVersion": n.policy_version,
    })
    .to_string()
}

/// Every text in a Block Kit message, joined.
fn texts(message: &Value) -> String {
    let mut out = Vec::new();
    collect_texts(message, &mut out);
    out.join("\n")
}

fn collect_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("text", Value::String(s)) => out.push(s.clone()),
                    _ => collect_texts(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_texts(i, out)),
        _ => {}
    }
}

fn buttons(message: &Value) -> Vec<Value> {
    message["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn the_posted_message_shows_the_notice_and_is_updated_with_the_outcome() {
    let n = notice("wf-show", false);
    let s = Setup::start(vec![n.clone()]).await;
    let notifier = s.notifier();
    let alice = user("alice", "Alice", "U0ALICE");
    notifier.ask(&alice, &n).await.expect("ask");

    let posts = s.emulator.calls_to("chat.postMessage");
    assert_eq!(posts.len(), 1);
    let post = &posts[0];
    assert!(post.authorized, "bearer token sent");
    assert_eq!(post.body["channel"], "U0ALICE");
    let shown = texts(&post.body);
    for expected in [
        "12.5 LTC",
        "1062.50 EUR",
        "ltc-regtest",
        "treasury-hot",
        "rltc1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080",
        "NOT in the wallet's address book",
        "carol",
        "rule large-outbound: amount above 1000 EUR; needs 2 of treasury-managers",
        "dave",
        "treasury-managers: 1 of 4",
        "<!date^1700000000^",
        "req-7781",
        "policy-v3",
        // The memo's mention is shown, not executed.
        "supplier &lt;!channel&gt; invoice 42",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from {shown}"
        );
    }
    assert!(!shown.contains("<!channel>"), "{shown}");
    let shown_buttons = buttons(&post.body);
    assert_eq!(shown_buttons.len(), 2, "{shown_buttons:?}");
    assert_eq!(shown_buttons[0]["action_id"], "custos_approve");
    assert_eq!(shown_buttons[1]["action_id"], "custos_reject");
    for b in &shown_buttons {
        let value: Value = serde_json::from_str(b["value"].as_str().expect("value")).expect("json");
        assert_eq!(value["workflowId"], "wf-show");
        assert_eq!(value["requestHash"], HASH);
        assert_eq!(value["policyVersion"], "policy-v3");
        assert!(b.get("url").is_none());
    }

    notifier
        .conclude(&alice, &n, "Approved: signing started")
        .await
        .expect("conclude");
    let updates = s.emulator.calls_to("chat.update");
    assert_eq!(updates.len(), 1);
    let update = &updates[0].body;
    assert!(updates[0].authorized);
    // The DM the post answered, and the post's ts.
    assert_eq!(update["channel"], "D0ALICE");
    assert_eq!(update["ts"], "1700000000.000002");
    assert!(texts(update).contains("Approved: signing started"));
    assert!(buttons(update).is_empty(), "no buttons once concluded");
}

#[tokio::test]
async fn whitelisted_destinations_and_missing_slack_ids_are_shown_and_refused() {
    let mut n = notice("wf-white", false);
    n.whitelisted = Some(true);
    n.fiat_value = None;
    let s = Setup::start(vec![n.clone()]).await;
    let notifier = s.notifier();
    notifier
        .ask(&user("alice", "Alice", "U0ALICE"), &n)
        .await
        .expect("ask");
    let shown = texts(&s.emulator.calls_to("chat.postMessage")[0].body);
    assert!(shown.contains("in the wallet's address book"), "{shown}");
    assert!(!shown.contains("NOT in"), "{shown}");

    let mut no_slack = user("erin", "Erin", "");
    no_slack.slack_user_id = None;
    let err = notifier.ask(&no_slack, &n).await.expect_err("no Slack id");
    assert!(err.to_string().contains("no Slack user id"), "{err}");
}

#[tokio::test]
async fn a_wrong_bot_token_is_refused_by_the_api() {
    let n = notice("wf-token", false);
    let s = Setup::start(vec![n.clone()]).await;
    let wrong = Arc::new(SlackApi::new("xoxb-wrong", &s.emulator.api_url()).expect("api"));
    let notifier = SlackNotifier::new(wrong, Arc::new(FixedLinks));
    let err = notifier
        .ask(&user("alice", "Alice", "U0ALICE"), &n)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("invalid_auth"), "{err}");
    let calls = s.emulator.calls_to("chat.postMessage");
    assert_eq!(calls.len(), 1);
    assert!(!calls[0].authorized);
}

#[tokio::test]
async fn approve_casts_a_ballot_and_replaces_the_message() {
    let n = notice("wf-approve", false);
    let s = Setup::start(vec![n.clone()]).await;
    let payload = block_actions(
        "U0ALICE",
        "custos_approve",
        Some(&button_value(&n)),
        &s.emulator.response_url("T1/B1/approve"),
    );
    let signed = sign_interaction(SIGNING_SECRET, NOW, &payload);
    let reply = post_interaction(
        s.server.addr,
        &signed,
        &[("X-Forwarded-For", "203.0.113.77, 10.0.0.1")],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let responses = s.emulator.wait_for("response_url", 1).await;
    assert_eq!(responses[0].path, "/actions/T1/B1/approve");
    let body = &responses[0].body;
    assert_eq!(body["replace_original"], true);
    let shown = texts(body);
    assert!(shown.contains("Approved by Alice."), "{shown}");
    assert!(shown.contains("All required approvals are in."), "{shown}");
    assert!(buttons(body).is_empty());

    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1);
    let b = &ballots[0];
    assert_eq!(b.workflow_id, "wf-approve");
    assert_eq!(b.user_id, "alice");
    assert_eq!(b.vote.vote, Vote::Approve);
    assert_eq!(b.vote.request_hash, HASH);
    assert_eq!(b.vote.policy_version, "policy-v3");
    assert_eq!(b.vote.channel, ApprovalChannel::Slack);
    assert_eq!(b.vote.mfa, MfaMethod::None);
    assert_eq!(b.masked_ip.as_deref(), Some("203.0.113.***"));
    assert!(
        b.user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("Slackbot"))
    );
}

#[tokio::test]
async fn reject_casts_a_rejection_from_the_peer_address() {
    let n = notice("wf-reject", false);
    let s = Setup::start(vec![n.clone()]).await;
    let reply = s
        .click("U0BOB", "custos_reject", Some(&button_value(&n)))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let responses = s.emulator.wait_for("response_url", 1).await;
    assert!(texts(&responses[0].body).contains("Rejected by Bob."));
    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1);
    assert_eq!(ballots[0].user_id, "bob");
    assert_eq!(ballots[0].vote.vote, Vote::Reject);
    assert_eq!(ballots[0].masked_ip.as_deref(), Some("127.0.0.***"));
}

#[tokio::test]
async fn forged_signatures_are_refused_before_anything_is_read() {
    let n = notice("wf-forged", false);
    let s = Setup::start(vec![n.clone()]).await;
    let payload = block_actions(
        "U0ALICE",
        "custos_approve",
        Some(&button_value(&n)),
        &s.emulator.response_url("x"),
    );

    let forged = sign_interaction("not-the-secret", NOW, &payload);
    let reply = post_interaction(s.server.addr, &forged, &[]).await;
    assert_eq!(
        reply,
        HttpReply {
            status: 401,
            body: "signature mismatch".into()
        }
    );

    // A genuine signature over another body.
    let genuine = sign_interaction(SIGNING_SECRET, NOW, &payload);
    let mut tampered = genuine.clone();
    tampered.body = tampered.body.replace("U0ALICE", "U0BOB");
    let reply = post_interaction(s.server.addr, &tampered, &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (401, "signature mismatch")
    );

    let unsigned = custos_tests::slack_emulator::post_form(
        s.server.addr,
        "/slack/interactions",
        &[],
        &genuine.body,
    )
    .await;
    assert_eq!(
        (unsigned.status, unsigned.body.as_str()),
        (401, "missing X-Slack-Request-Timestamp")
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.ballots.ballots().is_empty());
    assert!(s.emulator.calls().is_empty());
}

#[tokio::test]
async fn stale_and_future_timestamps_are_refused() {
    let n = notice("wf-stale", false);
    let s = Setup::start(vec![n.clone()]).await;
    let payload = block_actions(
        "U0ALICE",
        "custos_approve",
        Some(&button_value(&n)),
        &s.emulator.response_url("x"),
    );
    for ts in [NOW - 301, NOW + 301] {
        let signed = sign_interaction(SIGNING_SECRET, ts, &payload);
        let reply = post_interaction(s.server.addr, &signed, &[]).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (401, "stale timestamp")
        );
    }
    // Signed five minutes ago and now presented: still inside the window.
    let signed = sign_interaction(SIGNING_SECRET, NOW - 300, &payload);
    assert_eq!(
        post_interaction(s.server.addr, &signed, &[]).await.status,
        200
    );
    s.emulator.wait_for("response_url", 1).await;
    assert_eq!(s.ballots.ballots().len(), 1);

    // The same request once the clock moved past the window.
    s.clock.store(NOW + 1, Ordering::SeqCst);
    let reply = post_interaction(s.server.addr, &signed, &[]).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (401, "stale timestamp")
    );
}

#[tokio::test]
async fn an_exact_replay_inside_the_window_is_refused() {
    let n = notice("wf-replay", false);
    let s = Setup::start(vec![n.clone()]).await;
    let payload = block_actions(
        "U0ALICE",
        "custos_reject",
        Some(&button_value(&n)),
        &s.emulator.response_url("x"),
    );
    let signed = sign_interaction(SIGNING_SECRET, NOW, &payload);
    assert_eq!(
        post_interaction(s.server.addr, &signed, &[]).await.status,
        200
    );
    s.clock.store(NOW + 60, Ordering::SeqCst);
    let again = post_interaction(s.server.addr, &signed, &[]).await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (401, "replayed request")
    );
    // The same signature spelled in upper case is the same request.
    let mut shouted = signed.clone();
    shouted.signature = format!("v0={}", signed.signature[3..].to_uppercase());
    let again = post_interaction(s.server.addr, &shouted, &[]).await;
    assert_eq!(
        (again.status, again.body.as_str()),
        (401, "replayed request")
    );
    s.emulator.wait_for("response_url", 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.ballots.ballots().len(), 1, "cast once");
    assert_eq!(s.emulator.calls_to("response_url").len(), 1);
}

#[tokio::test]
async fn unknown_slack_users_are_refused() {
    let n = notice("wf-unknown", false);
    let s = Setup::start(vec![n.clone()]).await;
    let reply = s
        .click("U0MALLORY", "custos_approve", Some(&button_value(&n)))
        .await;
    assert_eq!(reply.status, 200);
    let responses = s.emulator.wait_for("response_url", 1).await;
    assert_eq!(responses[0].body["replace_original"], false);
    assert!(
        texts(&responses[0].body).contains("not linked to a Custos approver"),
        "{:?}",
        responses[0].body
    );
    assert!(s.ballots.ballots().is_empty());
}

#[tokio::test]
async fn a_second_click_is_shown_as_a_duplicate() {
    let n = notice("wf-dup", false);
    let s = Setup::start(vec![n.clone()]).await;
    assert_eq!(
        s.click("U0ALICE", "custos_approve", Some(&button_value(&n)))
            .await
            .status,
        200
    );
    s.emulator.wait_for("response_url", 1).await;
    // Slack signs each click anew: a later, different request.
    s.clock.store(NOW + 5, Ordering::SeqCst);
    assert_eq!(
        s.click("U0ALICE", "custos_approve", Some(&button_value(&n)))
            .await
            .status,
        200
    );
    let responses = s.emulator.wait_for("response_url", 2).await;
    let second = &responses[1].body;
    assert_eq!(second["replace_original"], false);
    assert!(
        texts(second).contains("You already answered this request"),
        "{second:?}"
    );
    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 2, "both reached the ballot box");
    assert!(ballots.iter().all(|b| b.user_id == "alice"));
}

#[tokio::test]
async fn step_up_requests_link_to_the_web_page_and_refuse_in_place_approval() {
    let n = notice("wf-stepup", true);
    let s = Setup::start(vec![n.clone()]).await;
    s.notifier()
        .ask(&user("alice", "Alice", "U0ALICE"), &n)
        .await
        .expect("ask");
    let post = &s.emulator.calls_to("chat.postMessage")[0].body;
    let shown_buttons = buttons(post);
    assert_eq!(shown_buttons.len(), 2);
    assert_eq!(shown_buttons[0]["action_id"], "custos_approve_web");
    assert_eq!(
        shown_buttons[0]["url"],
        "https://custos.example/approve/wf-stepup?for=alice"
    );
    assert!(
        shown_buttons[0].get("value").is_none(),
        "no in-place approval"
    );
    assert_eq!(shown_buttons[1]["action_id"], "custos_reject");
    assert!(texts(post).contains("second factor"));

    // Opening the link: Slack reports the click, which only needs an answer.
    let reply = s.click("U0ALICE", "custos_approve_web", None).await;
    assert_eq!(reply.status, 200);

    // An in-place approval (a stale message or a crafted click) is refused.
    s.clock.store(NOW + 1, Ordering::SeqCst);
    let reply = s
        .click("U0ALICE", "custos_approve", Some(&button_value(&n)))
        .await;
    assert_eq!(reply.status, 200);
    let responses = s.emulator.wait_for("response_url", 1).await;
    assert_eq!(responses.len(), 1, "the link click answered nothing");
    assert_eq!(responses[0].body["replace_original"], false);
    assert!(texts(&responses[0].body).contains("web approval page"));
    assert!(s.ballots.ballots().is_empty());

    // Rejecting in place stays possible.
    s.clock.store(NOW + 2, Ordering::SeqCst);
    s.click("U0ALICE", "custos_reject", Some(&button_value(&n)))
        .await;
    s.emulator.wait_for("response_url", 2).await;
    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1);
    assert_eq!(ballots[0].vote.vote, Vote::Reject);
}

#[tokio::test]
async fn signed_but_malformed_payloads_are_refused_with_the_field() {
    let n = notice("wf-bad", false);
    let s = Setup::start(vec![n.clone()]).await;
    let value = button_value(&n);
    let good_url = s.emulator.response_url("x");
    let cases: Vec<(String, &str)> = vec![
        ("nothing=here".into(), "missing payload field"),
        (
            form(&json!({"type": "block_actions"})),
            "payload: missing field `user`",
        ),
        (
            form(&json!({"type": "block_actions", "user": {}})),
            "payload.user: missing field `id`",
        ),
        (
            form(&json!({"type": "view_submission", "user": {"id": "U0ALICE"}})),
            "payload.type: unsupported interaction view_submission",
        ),
        (
            form(&block_actions(
                "U0ALICE",
                "custos_launch",
                Some(&value),
                &good_url,
            )),
            "payload.actions[0].action_id: unknown action custos_launch",
        ),
        (
            form(&block_actions("U0ALICE", "custos_approve", None, &good_url)),
            "payload.actions[0].value: missing",
        ),
        (
            form(&block_actions(
                "U0ALICE",
                "custos_approve",
                Some("{}"),
                &good_url,
            )),
            "payload.actions[0].value: missing field `workflowId`",
        ),
        (
            form(&block_actions(
                "U0ALICE",
                "custos_approve",
                Some(&value),
                "https://attacker.example/hook",
            )),
            "payload.response_url: not a Slack response URL",
        ),
    ];
    for (i, (body, reason)) in cases.into_iter().enumerate() {
        let signed = sign_body(SIGNING_SECRET, NOW + i as i64, body);
        let reply = post_interaction(s.server.addr, &signed, &[]).await;
        assert_eq!(reply.status, 400, "{reason}: {reply:?}");
        assert!(reply.body.starts_with(reason), "{reason}: {reply:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.ballots.ballots().is_empty());
    assert!(s.emulator.calls().is_empty());
}

fn form(payload: &Value) -> String {
    format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    )
}
