//! The ballot box on a real nats-server and the real engine: transfers decided by
//! the policy step under a test policy, ballots judged against the followed trail
//! (`Trail::follow`) and appended through the remote ledger, refusals audited,
//! concurrent votes counted once each, rejection and expiry, and a trail that
//! verifies at the end.

use std::sync::Arc;
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_engine::policy::Policy;
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice, ApprovalVote, MfaMethod, Vote};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, IntakeReply, Outcome, Payload, Proposal,
    RequestContext, Target, UserRecord,
};
use custos_tests::*;
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::step::expired;
use custos_workers::approvals::{Ballot, BallotBox, BallotError, Notifier, NotifyError, Receipt};
use custos_workers::policy_step::{PolicyStep, PriceTable};
use custos_workers::remote::{Appender, RemoteLedger};
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use futures::future::BoxFuture;
use serde_json::json;

/// Up to EUR 1,000 allowed; above, 4 treasury managers; above EUR 100,000, 20
/// board members. At EUR 80 per LTC: 200 LTC needs the treasury managers, 2,000
/// LTC the board.
const POLICY: &str = r#"
version = 1
name = "ballot-box-test"
description = "Ballot box tests: treasury managers above EUR 1,000, the board above EUR 100,000."
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
treasury-managers = "Approve large transfers."
board = "Approve very large transfers."
approvers = "Approve nothing in this policy."
administrators = "Approve administration."

[[rule]]
name = "small"
actions = ["transfer"]
amount = { at_most = "1000" }
outcome = "allow"

[[rule]]
name = "large"
actions = ["transfer"]
amount = { above = "1000", at_most = "100000" }
outcome = "require-approvals"
approvals = { groups = [{ group = "treasury-managers", count = 4 }] }

[[rule]]
name = "huge"
actions = ["transfer"]
amount = { above = "100000" }
outcome = "require-approvals"
approvals = { groups = [{ group = "board", count = 20 }] }

[[rule]]
name = "administration"
actions = [
    "wallet-create",
    "wallet-import",
    "guardian-add",
    "guardian-remove",
    "key-rotation",
    "threshold-change",
    "policy-change",
    "whitelist-change",
    "user-admin",
    "role-admin",
]
outcome = "require-approvals"
approvals = { groups = [{ group = "administrators", count = 2 }] }
"#;

const BOARD: usize = 20;
const MASKED_IP: &str = "203.0.113.***";
const WAIT: Duration = Duration::from_secs(30);

fn user(id: &str, roles: &[&str], groups: &[&str]) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::User,
        workflow_id: id.into(),
        expected_version: 0,
        event_type: EventType::UserCreated,
        causation_id: None,
        actor: Actor::system("bootstrap"),
        target: Target {
            kind: "user".into(),
            id: id.into(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::UserCreated(UserRecord {
            id: id.into(),
            name: id.to_uppercase(),
            email: format!("{id}@example.com"),
            slack_user_id: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            mfa_enrolled: true,
        }),
    }
}

fn board_member(i: usize) -> String {
    format!("b{i:02}")
}

/// A server, the engine, the policy step under [`POLICY`], a followed trail and
/// the ballot box appending through the remote ledger. Directory: `erp`
/// initiates; `tm1`..`tm6` are treasury managers; `b01`..`b20` the board;
/// `outsider` approves for another group.
struct Setup {
    nats: Nats,
    engine: Engine,
    trail: Trail,
    ballot_box: Arc<TrailBallotBox<RemoteLedger>>,
    remote: RemoteLedger,
    trigger: ShutdownTrigger,
    worker: tokio::task::JoinHandle<Result<(), async_nats::Error>>,
}

impl Setup {
    async fn start() -> Setup {
        Setup::start_with(POLICY).await
    }

    /// [`Setup::start`] under another policy.
    async fn start_with(policy: &str) -> Setup {
        let nats = Nats::start(Durability::Default).await;
        let engine = Engine::start(&nats).await;
        append_ok(
            &engine.ledger,
            vec![wallet_created(
                "treasury",
                "ltc-regtest",
                &taproot_address("rltc", [1; 32]),
            )],
        )
        .await;
        let mut users = vec![
            user("erp", &["initiator"], &[]),
            user("outsider", &["approver"], &["approvers"]),
            user("admin1", &["approver"], &["administrators"]),
        ];
        users.extend(
            (1..=6).map(|i| user(&format!("tm{i}"), &["approver"], &["treasury-managers"])),
        );
        users.extend((1..=BOARD).map(|i| user(&board_member(i), &["approver"], &["board"])));
        append_ok(&engine.ledger, users).await;

        let mut prices = PriceTable::default();
        prices
            .quotes
            .entry("LTC".into())
            .or_default()
            .insert("EUR".into(), "80".into());
        let policy = Policy::parse(policy).expect("the test policy parses");
        let step = PolicyStep::new(nats.js().await, policy, prices)
            .await
            .expect("policy step");
        let (trigger, shutdown) = Shutdown::new();
        let worker = tokio::spawn(custos_workers::runtime::run(
            nats.js().await,
            engine.ledger.clone(),
            step,
            shutdown.clone(),
        ));
        let trail = Trail::follow(nats.js().await, shutdown)
            .await
            .expect("the trail is followed");
        let remote = RemoteLedger::new(engine.client.clone());
        let ballot_box = Arc::new(TrailBallotBox::new(trail.clone(), remote.clone()));
        Setup {
            nats,
            engine,
            trail,
            ballot_box,
            remote,
            trigger,
            worker,
        }
    }

    /// Submits a transfer of `amount` LTC by `erp` and waits until it awaits
    /// approvals; returns its workflow id.
    async fn transfer_awaiting_approvals(&self, request_id: &str, amount: &str) -> String {
        let body = json!({
            "requestId": request_id,
            "wallet": "treasury",
            "asset": "LTC",
            "destination": taproot_address("rltc", [9; 32]),
            "amount": amount,
            "initiator": "erp",
        });
        let id = match submit_json(&self.engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => panic!("intake refused {request_id}: {other:?}"),
        };
        let awaiting = eventually(WAIT, || async {
            self.stage(&id).await == Some(Stage::AwaitingApprovals)
        })
        .await;
        assert!(
            awaiting,
            "{id} should await approvals, it is {:?}",
            self.stage(&id).await
        );
        id
    }

    async fn transfer(&self, id: &str) -> Option<Transfer> {
        self.trail
            .read(|view| view.transfer(id).cloned())
            .await
            .expect("the trail replica reads")
    }

    async fn stage(&self, id: &str) -> Option<Stage> {
        self.transfer(id).await.map(|t| t.stage)
    }

    async fn notice(&self, id: &str) -> ApprovalNotice {
        self.ballot_box
            .notice(id)
            .await
            .unwrap_or_else(|e| panic!("notice of {id}: {e}"))
    }

    /// Every event of the trail, in order.
    async fn events(&self) -> Vec<Event> {
        all_events(&self.nats.js().await)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    /// The events of workflow `id`.
    async fn history(&self, id: &str) -> Vec<Event> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == id)
            .collect()
    }

    /// `APPROVAL_REFUSED` events about workflow `id`.
    async fn refusals(&self, id: &str) -> Vec<Event> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.event_type == EventType::ApprovalRefused && e.target.id == id)
            .collect()
    }

    /// `APPROVAL_ESCALATED` events about workflow `id`.
    async fn escalations(&self, id: &str) -> Vec<Event> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.event_type == EventType::ApprovalEscalated && e.target.id == id)
            .collect()
    }

    /// Stops the policy step and checks the whole trail verifies.
    async fn finish(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.worker).await;
        let verified = verify_stream(&self.nats.js().await).await;
        assert!(
            verified.is_ok(),
            "the audit trail should verify: {verified:?}"
        );
        self.engine.stop().await;
    }
}

/// How long one scenario may take; they finish in seconds.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `scenario` on its own runtime in its own thread and fails if it does
/// not finish within [`LIMIT`]. A tokio timeout cannot do this: a deadlock that
/// blocks every worker thread on a lock also stops the runtime's timers.
fn bounded<F: Future<Output = ()> + 'static>(scenario: fn() -> F) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(scenario());
        let _ = done.send(());
    });
    match finished.recv_timeout(LIMIT) {
        Ok(()) => runner.join().expect("the scenario thread"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "the scenario did not finish within {LIMIT:?}: the ballot box froze (every tokio worker \
             blocked; seen as Trail::read holding the watch::Ref from wait_for while it takes the \
             view lock, and the trail follower holding the view's write lock while it sends on the \
             watch, workers/src/trail.rs:150 and :171-172)"
        ),
    }
}

/// `user`'s vote on `notice` (bound to its hash and policy version).
fn ballot(notice: &ApprovalNotice, user: &str, vote: Vote, channel: ApprovalChannel) -> Ballot {
    let mfa = match channel {
        ApprovalChannel::Slack => MfaMethod::None,
        ApprovalChannel::Email | ApprovalChannel::Console => MfaMethod::Totp,
        ApprovalChannel::ChatLink => MfaMethod::Webauthn,
    };
    Ballot {
        workflow_id: notice.workflow_id.clone(),
        user_id: user.into(),
        vote: ApprovalVote {
            vote,
            request_hash: notice.request_hash.clone(),
            policy_version: notice.policy_version.clone(),
            channel,
            mfa,
            comment: None,
        },
        masked_ip: Some(MASKED_IP.into()),
        user_agent: Some(format!("{user}-agent")),
    }
}

fn approve(notice: &ApprovalNotice, user: &str) -> Ballot {
    ballot(notice, user, Vote::Approve, ApprovalChannel::Email)
}

fn refused(got: Result<Receipt, BallotError>, why: &str, what: &str) -> String {
    match got {
        Err(BallotError::Refused(msg)) => {
            assert!(
                msg.contains(why),
                "{what}: the refusal {msg:?} should say {why:?}"
            );
            msg
        }
        other => panic!("{what} should be refused ({why}), got {other:?}"),
    }
}

#[test]
fn votes_are_recorded_until_the_quorum_and_refusals_are_audited() {
    bounded(votes_are_recorded_until_the_quorum_and_refusals_are_audited_scenario);
}

async fn votes_are_recorded_until_the_quorum_and_refusals_are_audited_scenario() {
    let s = Setup::start().await;
    let id = s.transfer_awaiting_approvals("large", "200").await;
    let notice = s.notice(&id).await;
    assert_eq!(
        (
            notice.missing.clone(),
            notice.approved_by.clone(),
            notice.step_up_required
        ),
        (
            vec!["treasury-managers: 0 of 4 (rule large)".to_string()],
            vec![],
            true
        ),
        "the notice before any vote"
    );

    // Three pending approvals, on three channels.
    let channels = [
        ("tm1", ApprovalChannel::Slack),
        ("tm2", ApprovalChannel::Email),
        ("tm3", ApprovalChannel::ChatLink),
    ];
    for (user, channel) in channels {
        let got = s
            .ballot_box
            .cast(ballot(&notice, user, Vote::Approve, channel))
            .await;
        assert_eq!(
            got,
            Ok(Receipt::Recorded {
                quorum_reached: false
            }),
            "{user}'s approval is recorded and pending"
        );
        assert_eq!(s.stage(&id).await, Some(Stage::AwaitingApprovals));
    }
    let votes = s.history(&id).await;
    let approved: Vec<&Event> = votes
        .iter()
        .filter(|e| e.event_type == EventType::TransactionApproved)
        .collect();
    assert_eq!(approved.len(), 3, "three approvals in the trail");
    for (e, (user, channel)) in approved.iter().zip(channels) {
        assert_eq!(e.result, Outcome::Pending, "{user}'s approval is pending");
        assert_eq!(
            (
                e.actor.user_id.as_str(),
                e.actor.email.as_deref(),
                e.actor.role.as_deref()
            ),
            (
                user,
                Some(format!("{user}@example.com").as_str()),
                Some("approver")
            ),
            "the approver is the event's actor"
        );
        assert_eq!(
            (
                e.context.ip_address.as_deref(),
                e.context.user_agent.clone()
            ),
            (Some(MASKED_IP), Some(format!("{user}-agent"))),
            "{user}: masked IP and user agent recorded"
        );
        let Payload::ApprovalVote(v) = &e.payload else {
            panic!("{user}: the payload is the vote, got {:?}", e.payload);
        };
        assert_eq!(
            (v.vote, v.channel, &v.request_hash, &v.policy_version),
            (
                Vote::Approve,
                channel,
                &notice.request_hash,
                &notice.policy_version
            ),
            "{user}: the vote is bound to the request and the policy"
        );
        let want_mfa = ballot(&notice, user, Vote::Approve, channel).vote.mfa;
        assert_eq!(v.mfa, want_mfa, "{user}: the MFA method is recorded");
    }
    let notice_now = s.notice(&id).await;
    assert_eq!(
        (notice_now.approved_by, notice_now.missing),
        (
            vec!["tm1".to_string(), "tm2".into(), "tm3".into()],
            vec!["treasury-managers: 3 of 4 (rule large)".to_string()]
        )
    );

    // A second answer by the same approver appends nothing.
    let before = s.events().await.len();
    for user in ["tm1", "tm2"] {
        assert_eq!(
            s.ballot_box.cast(approve(&notice, user)).await,
            Ok(Receipt::Duplicate),
            "{user} again"
        );
    }
    let reject_again = ballot(&notice, "tm3", Vote::Reject, ApprovalChannel::Slack);
    assert_eq!(
        s.ballot_box.cast(reject_again).await,
        Ok(Receipt::Duplicate),
        "tm3 cannot turn the approval into a rejection"
    );
    assert_eq!(
        s.events().await.len(),
        before,
        "a duplicate appends nothing"
    );

    // Refused ballots: each refusal is audited.
    let mut stale = approve(&notice, "tm4");
    stale.vote.request_hash = "ff".repeat(32);
    let mut other_policy = approve(&notice, "tm4");
    other_policy.vote.policy_version = "11".repeat(32);
    let cases = [
        (
            stale,
            "request changed",
            "a ballot bound to another request",
        ),
        (
            other_policy,
            "policy changed",
            "a ballot bound to another policy version",
        ),
        (
            approve(&notice, "outsider"),
            "outsider is not an approver for this request",
            "an approver of another group",
        ),
        (
            approve(&notice, "erp"),
            "erp initiated this request",
            "the initiator",
        ),
        (
            approve(&notice, "ghost"),
            "ghost is not in the directory",
            "an unknown user",
        ),
    ];
    let mut reasons = Vec::new();
    for (b, why, what) in cases {
        let user = b.user_id.clone();
        let msg = refused(s.ballot_box.cast(b).await, why, what);
        reasons.push((user, msg));
    }
    let refusals = s.refusals(&id).await;
    assert_eq!(
        refusals.len(),
        reasons.len(),
        "one APPROVAL_REFUSED per refused ballot: {refusals:#?}"
    );
    for (user, msg) in &reasons {
        let e = refusals
            .iter()
            .find(|e| {
                &e.actor.user_id == user
                    && matches!(&e.payload, Payload::StepFailed { reason, .. } if reason == msg)
            })
            .unwrap_or_else(|| panic!("APPROVAL_REFUSED for {user} ({msg}) in {refusals:#?}"));
        assert_eq!(e.result, Outcome::Denied, "{user}: the refusal is a denial");
        assert_eq!(
            e.context.ip_address.as_deref(),
            Some(MASKED_IP),
            "{user}: the refusal keeps the masked IP"
        );
        assert!(
            matches!(&e.payload, Payload::StepFailed { step, .. } if step == "approval via email"),
            "{user}: the refusal names the channel: {:?}",
            e.payload
        );
    }
    assert_eq!(
        s.stage(&id).await,
        Some(Stage::AwaitingApprovals),
        "refusals change nothing"
    );

    // The fourth treasury manager completes the quorum.
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm4")).await,
        Ok(Receipt::Recorded {
            quorum_reached: true
        }),
        "tm4 completes"
    );
    assert_eq!(s.stage(&id).await, Some(Stage::ReadyToSign));
    let history = s.history(&id).await;
    let last = history.last().expect("history");
    assert_eq!(
        (last.event_type, last.result, last.actor.user_id.as_str()),
        (EventType::TransactionApproved, Outcome::Success, "tm4"),
        "the completing approval is a success"
    );
    let (folded, _) = transfer::fold(&history).expect("the history replays");
    assert_eq!(
        (folded.stage, folded.votes.len()),
        (Stage::ReadyToSign, 4),
        "the workflow's own fold agrees"
    );

    // After the quorum: a new vote is refused, an old one is a duplicate.
    refused(
        s.ballot_box.cast(approve(&notice, "tm5")).await,
        "no longer awaits approvals",
        "a vote after the quorum",
    );
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm2")).await,
        Ok(Receipt::Duplicate)
    );
    assert_eq!(s.history(&id).await.len(), history.len());
    let mut nowhere = approve(&notice, "tm5");
    nowhere.workflow_id = "no-such-workflow".into();
    assert_eq!(
        s.ballot_box.cast(nowhere).await,
        Err(BallotError::UnknownWorkflow("no-such-workflow".into()))
    );
    s.finish().await;
}

#[test]
fn twenty_concurrent_ballots_from_distinct_approvers_count_once_each() {
    bounded(twenty_concurrent_ballots_from_distinct_approvers_count_once_each_scenario);
}

async fn twenty_concurrent_ballots_from_distinct_approvers_count_once_each_scenario() {
    let s = Setup::start().await;
    let id = s.transfer_awaiting_approvals("huge", "2000").await;
    let notice = s.notice(&id).await;
    assert_eq!(
        notice.missing,
        vec![format!("board: 0 of {BOARD} (rule huge)")],
        "the board decides"
    );
    let cast_all = |wave: &'static str| {
        let start = Arc::new(tokio::sync::Barrier::new(BOARD));
        let tasks: Vec<_> = (1..=BOARD)
            .map(|i| {
                let (ballot_box, start) = (s.ballot_box.clone(), start.clone());
                let b = ballot(
                    &notice,
                    &board_member(i),
                    Vote::Approve,
                    ApprovalChannel::Slack,
                );
                tokio::spawn(async move {
                    start.wait().await;
                    (b.user_id.clone(), ballot_box.cast(b).await)
                })
            })
            .collect();
        async move {
            let mut receipts = Vec::new();
            for t in tasks {
                receipts.push(
                    t.await
                        .unwrap_or_else(|e| panic!("{wave}: a ballot task: {e}")),
                );
            }
            receipts
        }
    };

    let receipts = cast_all("first wave").await;
    let failed: Vec<_> = receipts.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "every concurrent ballot is recorded, none lost: {failed:#?}"
    );
    let completing: Vec<&str> = receipts
        .iter()
        .filter(|(_, r)| {
            *r == Ok(Receipt::Recorded {
                quorum_reached: true,
            })
        })
        .map(|(u, _)| u.as_str())
        .collect();
    assert_eq!(
        completing.len(),
        1,
        "exactly one ballot completes the quorum: {receipts:#?}"
    );
    assert_eq!(
        receipts
            .iter()
            .filter(|(_, r)| {
                *r == Ok(Receipt::Recorded {
                    quorum_reached: false,
                })
            })
            .count(),
        BOARD - 1,
        "every other ballot is a pending approval: {receipts:#?}"
    );

    let history = s.history(&id).await;
    let approvals: Vec<&Event> = history
        .iter()
        .filter(|e| e.event_type == EventType::TransactionApproved)
        .collect();
    let mut voters: Vec<&str> = approvals.iter().map(|e| e.actor.user_id.as_str()).collect();
    voters.sort_unstable();
    let board: Vec<String> = (1..=BOARD).map(board_member).collect();
    assert_eq!(
        voters, board,
        "each board member's approval is in the trail exactly once"
    );
    let (last, pending) = approvals.split_last().expect("approvals");
    assert_eq!(
        (last.result, last.actor.user_id.as_str()),
        (Outcome::Success, completing[0]),
        "the last approval is the completing one"
    );
    assert!(
        pending.iter().all(|e| e.result == Outcome::Pending),
        "all earlier approvals are pending"
    );
    let t = s.transfer(&id).await.expect("the workflow");
    assert_eq!(
        (t.stage, t.votes.len()),
        (Stage::ReadyToSign, BOARD),
        "twenty votes, quorum reached"
    );

    // Everyone again, at once: all duplicates, nothing appended.
    let before = s.history(&id).await.len();
    let again = cast_all("second wave").await;
    assert!(
        again.iter().all(|(_, r)| *r == Ok(Receipt::Duplicate)),
        "a second answer is a duplicate: {again:#?}"
    );
    assert_eq!(s.history(&id).await.len(), before);
    s.finish().await;
}

#[test]
fn a_rejection_ends_the_workflow() {
    bounded(a_rejection_ends_the_workflow_scenario);
}

async fn a_rejection_ends_the_workflow_scenario() {
    let s = Setup::start().await;
    let id = s.transfer_awaiting_approvals("rejected", "200").await;
    let notice = s.notice(&id).await;
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm1")).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        })
    );
    let mut no = ballot(&notice, "tm2", Vote::Reject, ApprovalChannel::Slack);
    no.vote.comment = Some("destination unknown to us".into());
    assert_eq!(
        s.ballot_box.cast(no).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        }),
        "the rejection is recorded"
    );
    let t = s.transfer(&id).await.expect("the workflow");
    assert_eq!(
        (t.stage, t.reason.as_deref()),
        (
            Stage::Rejected,
            Some("rejected by tm2: destination unknown to us")
        ),
        "a rejection ends the workflow with its reason"
    );
    let history = s.history(&id).await;
    let last = history.last().expect("history");
    assert_eq!(
        (last.event_type, last.result, last.actor.user_id.as_str()),
        (EventType::TransactionRejected, Outcome::Denied, "tm2")
    );
    assert!(
        matches!(&last.payload, Payload::ApprovalVote(v) if v.vote == Vote::Reject && v.mfa == MfaMethod::None),
        "the rejection carries the vote: {:?}",
        last.payload
    );
    refused(
        s.ballot_box.cast(approve(&notice, "tm3")).await,
        "no longer awaits approvals",
        "an approval after the rejection",
    );
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm2")).await,
        Ok(Receipt::Duplicate),
        "the rejecter cannot approve after all"
    );
    assert_eq!(s.stage(&id).await, Some(Stage::Rejected));
    s.finish().await;
}

#[test]
fn requests_past_their_expiry_are_rejected() {
    bounded(requests_past_their_expiry_are_rejected_scenario);
}

async fn requests_past_their_expiry_are_rejected_scenario() {
    let s = Setup::start().await;
    let id = s.transfer_awaiting_approvals("stale", "200").await;
    let notice = s.notice(&id).await;
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm1")).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        })
    );
    let t = s.transfer(&id).await.expect("the workflow");
    let decision = t.decision.clone().expect("decided");
    let expires_at = decision.expires_at.expect("approvals expire");
    assert_eq!(
        expires_at - decision.evaluated_at,
        24 * 3_600_000,
        "the policy's approval expiry is 24h"
    );
    assert_eq!(notice.expires_at, Some(expires_at));

    let at_expiry = s
        .trail
        .read(|view| expired(view, expires_at))
        .await
        .expect("read");
    assert!(
        at_expiry.is_empty(),
        "not expired at the instant itself: {at_expiry:#?}"
    );
    let late = s
        .trail
        .read(|view| expired(view, expires_at + 1))
        .await
        .expect("read");
    assert_eq!(late.len(), 1, "one request expired: {late:#?}");
    let p = &late[0];
    assert_eq!(
        (
            p.workflow_id.as_str(),
            p.expected_version,
            p.event_type,
            p.result
        ),
        (
            id.as_str(),
            t.version,
            EventType::TransactionRejected,
            Outcome::Denied
        )
    );
    match s.remote.append(late).await {
        AppendReply::Appended { sequences } => assert_eq!(sequences.len(), 1),
        other => panic!("the expiry is recorded: {other:?}"),
    }
    let t = s.transfer(&id).await.expect("the workflow");
    assert_eq!(
        (t.stage, t.reason.as_deref()),
        (
            Stage::Rejected,
            Some("approvals did not reach the quorum before the expiry")
        )
    );
    let again = s
        .trail
        .read(|view| expired(view, expires_at + 1))
        .await
        .expect("read");
    assert!(again.is_empty(), "a rejected request does not expire again");
    refused(
        s.ballot_box.cast(approve(&notice, "tm2")).await,
        "no longer awaits approvals",
        "an approval after the expiry",
    );
    s.finish().await;
}

#[test]
fn reminders_go_to_the_approvers_who_have_not_answered() {
    bounded(reminders_go_to_the_approvers_who_have_not_answered_scenario);
}

async fn reminders_go_to_the_approvers_who_have_not_answered_scenario() {
    use custos_workers::approvals::step::reminders_due;
    use std::collections::HashMap;
    let s = Setup::start().await;
    let id = s.transfer_awaiting_approvals("remind", "200").await;
    let notice = s.notice(&id).await;
    s.ballot_box
        .cast(approve(&notice, "tm1"))
        .await
        .expect("tm1 approves");
    let due = |every: i64, asked: HashMap<String, i64>| {
        let trail = s.trail.clone();
        async move {
            trail
                .read(move |view| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    reminders_due(view, now, every, &asked)
                        .into_iter()
                        .map(|(n, users)| {
                            (n.workflow_id, users.into_iter().map(|u| u.id).collect())
                        })
                        .collect::<Vec<(String, Vec<String>)>>()
                })
                .await
                .expect("the replica reads")
        }
    };
    // Due at once: the treasury managers who have not answered, nobody else.
    let reminded = due(0, HashMap::new()).await;
    let ours: Vec<&Vec<String>> = reminded
        .iter()
        .filter(|(w, _)| *w == id)
        .map(|(_, u)| u)
        .collect();
    assert_eq!(
        ours,
        [&(2..=6).map(|i| format!("tm{i}")).collect::<Vec<_>>()],
        "{reminded:?}"
    );
    // Not yet due an hour after the decision, nor right after a reminder.
    assert!(
        due(3_600_000, HashMap::new())
            .await
            .iter()
            .all(|(w, _)| *w != id),
        "not due within the hour"
    );
    let asked = HashMap::from([(id.clone(), i64::MAX / 2)]);
    assert!(
        due(1, asked).await.iter().all(|(w, _)| *w != id),
        "not due right after a reminder"
    );
    s.finish().await;
}

/// Who was asked about which workflow, by a channel that only records.
#[derive(Clone, Default)]
struct Recorder(Arc<std::sync::Mutex<Vec<(String, String)>>>);

impl Recorder {
    fn asked(&self) -> Vec<(String, String)> {
        self.0.lock().expect("recorder").clone()
    }
}

impl Notifier for Recorder {
    fn channel(&self) -> ApprovalChannel {
        ApprovalChannel::Email
    }

    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        self.0
            .lock()
            .expect("recorder")
            .push((to.id.clone(), notice.workflow_id.clone()));
        Box::pin(async { Ok(()) })
    }

    fn conclude<'a>(
        &'a self,
        _: &'a UserRecord,
        _: &'a ApprovalNotice,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async { Ok(()) })
    }
}

#[test]
fn an_unmet_requirement_escalates_to_its_second_group_after_the_delay() {
    bounded(an_unmet_requirement_escalates_to_its_second_group_after_the_delay_scenario);
}

async fn an_unmet_requirement_escalates_to_its_second_group_after_the_delay_scenario() {
    use custos_schemas::approval::ApprovalEscalation;
    use custos_workers::approvals::step::escalate;
    // Above EUR 1,000: two approvers (only `outsider` is one), escalated to the
    // treasury managers 3 s after the decision.
    let policy = POLICY.replace(
        r#"approvals = { groups = [{ group = "treasury-managers", count = 4 }] }"#,
        r#"approvals = { groups = [{ group = "approvers", count = 2 }], escalate_to = "treasury-managers", escalate_after = "3s" }"#,
    );
    let s = Setup::start_with(&policy).await;
    let id = s.transfer_awaiting_approvals("escalate", "200").await;
    let notice = s.notice(&id).await;
    let decided_at = s
        .transfer(&id)
        .await
        .and_then(|t| t.decision)
        .map(|d| d.evaluated_at)
        .expect("decided");
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "outsider")).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        })
    );
    refused(
        s.ballot_box.cast(approve(&notice, "tm1")).await,
        "tm1 counts for rule large only once it escalates to treasury-managers",
        "a treasury manager before the escalation",
    );
    assert_eq!(s.refusals(&id).await.len(), 1, "the early vote is audited");

    let recorder = Recorder::default();
    let (stop, shutdown) = Shutdown::new();
    let sweep = tokio::spawn(escalate(
        s.trail.clone(),
        s.remote.clone(),
        vec![Arc::new(recorder.clone()) as Arc<dyn Notifier>],
        Duration::from_millis(100),
        shutdown,
    ));
    assert!(
        eventually(WAIT, || async { !s.escalations(&id).await.is_empty() }).await,
        "the escalation is recorded once the delay passed"
    );
    let managers: Vec<String> = (1..=6).map(|i| format!("tm{i}")).collect();
    let escalations = s.escalations(&id).await;
    assert_eq!(escalations.len(), 1, "{escalations:#?}");
    let e = &escalations[0];
    assert_eq!(
        (
            e.aggregate_kind,
            e.workflow_id.as_str(),
            e.version,
            e.actor.user_id.as_str(),
            e.result
        ),
        (
            AggregateKind::System,
            ApprovalEscalation::aggregate_id(&id, 0).as_str(),
            1,
            "system:approvals",
            Outcome::Success
        )
    );
    assert_eq!(
        e.payload,
        Payload::ApprovalEscalated(ApprovalEscalation {
            workflow_id: id.clone(),
            requirement: 0,
            rule: "large".into(),
            group: "treasury-managers".into(),
            counts_from: decided_at + 3_000,
            notified: managers.clone(),
        })
    );
    assert!(
        e.timestamp >= decided_at + 3_000,
        "not recorded before it was due"
    );
    // Asked after it was recorded: every treasury manager, once, and nobody else.
    assert!(
        eventually(WAIT, || async { recorder.asked().len() >= managers.len() }).await,
        "the treasury managers are asked: {:?}",
        recorder.asked()
    );
    // Deliberate: let a few more sweeps (every 100 ms) pass; none may record
    // or ask again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked: Vec<(String, String)> = managers.iter().map(|m| (m.clone(), id.clone())).collect();
    assert_eq!(recorder.asked(), asked);
    assert_eq!(s.escalations(&id).await.len(), 1, "escalated once");
    let notice = s.notice(&id).await;
    assert_eq!(
        notice.missing,
        vec!["approvers: 1 of 2 (rule large; escalated to treasury-managers)".to_string()]
    );

    // From now on a treasury manager's approval counts and completes.
    assert_eq!(
        s.ballot_box.cast(approve(&notice, "tm1")).await,
        Ok(Receipt::Recorded {
            quorum_reached: true
        })
    );
    assert_eq!(s.stage(&id).await, Some(Stage::ReadyToSign));
    stop.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), sweep).await;
    s.finish().await;
}
