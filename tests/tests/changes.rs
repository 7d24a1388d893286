//! Administrative changes on a real nats-server and the real engine: the change
//! service, the policy step, a followed trail and the ballot box. A policy apply
//! takes effect only after two administrators approve it, and new transfers are
//! then decided by the new version; a rejected one leaves the old policy; a
//! freeze by an administrator blocks the wallet's transfers (and its signing) at
//! once and lifting it needs the quorum; a whitelisted destination is allowed
//! where a whitelist rule applies, any other never is. Users and roles change
//! through the same quorum: a user added after it can initiate, a deactivated
//! user's approvals stop counting, separation of duties is refused up front.

use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_engine::change::Stage as ChangeStage;
use custos_engine::policy::{
    self, AddressBook, Currency, Directory, FreezeState, Inputs, Policy, PriceSnapshot, Request,
    VelocityState,
};
use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
use custos_schemas::{
    Actor, AggregateKind, ContentType, EventType, IntakeReply, Outcome, Payload, Proposal,
    RequestContext, Target, TransferRequest, UserRecord, WalletDescriptor, subjects,
};
use custos_tests::*;
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::{Ballot, BallotBox, BallotError, Receipt};
use custos_workers::policy_step::{PolicyStep, PriceTable};
use custos_workers::remote::RemoteLedger;
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use rand::Rng;
use serde_json::json;

const ADMINISTRATION: &str = r#"
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

const HEADER: &str = r#"
version = 1
name = "changes-test"
description = "Change workflow tests."
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
approvers = "Approve transfers."
administrators = "Approve administration."
"#;

/// Up to EUR 1,000 allowed, above 2 approvers. At EUR 80 per LTC, 1 LTC passes.
const AMOUNTS: &str = r#"
[[rule]]
name = "small"
actions = ["transfer"]
amount = { at_most = "1000" }
outcome = "allow"

[[rule]]
name = "large"
actions = ["transfer"]
amount = { above = "1000" }
outcome = "require-approvals"
approvals = { groups = [{ group = "approvers", count = 2 }] }
"#;

/// Whitelisted destinations (the wallet's own whitelist) allowed; any other
/// needs 2 approvers.
const WHITELIST: &str = r#"
[[rule]]
name = "whitelisted"
actions = ["transfer"]
destination = { in = ["treasury"] }
outcome = "allow"

[[rule]]
name = "elsewhere"
actions = ["transfer"]
destination = { not_in = ["treasury"] }
outcome = "require-approvals"
approvals = { groups = [{ group = "approvers", count = 2 }] }
"#;

fn amounts_policy() -> String {
    format!("{HEADER}{AMOUNTS}{ADMINISTRATION}")
}

/// The amounts policy with EUR 10 instead of EUR 1,000: 1 LTC needs approvers.
fn strict_policy() -> String {
    amounts_policy().replace("\"1000\"", "\"10\"")
}

fn whitelist_policy() -> String {
    format!("{HEADER}{WHITELIST}{ADMINISTRATION}")
}

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
        payload: Payload::UserCreated(record(id, roles, groups)),
    }
}

fn record(id: &str, roles: &[&str], groups: &[&str]) -> UserRecord {
    UserRecord {
        id: id.into(),
        name: id.to_uppercase(),
        email: format!("{id}@example.com"),
        slack_user_id: None,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        mfa_enrolled: true,
    }
}

/// The engine, the policy step and the change service under `policy`, a
/// followed trail and the ballot box. Directory: `erp` initiates transfers;
/// `admin1`..`admin4` administer and approve for `administrators`; `alice`
/// approves transfers only.
struct Setup {
    nats: Nats,
    engine: Engine,
    trail: Trail,
    ballot_box: TrailBallotBox<RemoteLedger>,
    trigger: ShutdownTrigger,
}

impl Setup {
    async fn start(policy: &str) -> Setup {
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
            user("alice", &["approver"], &["approvers"]),
        ];
        users.extend((1..=4).map(|i| {
            user(
                &format!("admin{i}"),
                &["administrator", "approver"],
                &["administrators"],
            )
        }));
        append_ok(&engine.ledger, users).await;
        let mut prices = PriceTable::default();
        prices
            .quotes
            .entry("LTC".into())
            .or_default()
            .insert("EUR".into(), "80".into());
        let policy = Policy::parse(policy).expect("the test policy parses");
        let prices = custos_workers::policy_step::Prices::Table(std::sync::Arc::new(prices));
        let step = PolicyStep::with_prices(nats.js().await, policy.clone(), prices.clone())
            .await
            .expect("policy step");
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(custos_workers::runtime::run(
            nats.js().await,
            engine.ledger.clone(),
            step,
            shutdown.clone(),
        ));
        let trail = Trail::follow(nats.js().await, shutdown.clone())
            .await
            .expect("the trail is followed");
        tokio::spawn(custos_workers::change::serve(
            engine.client.clone(),
            trail.clone(),
            engine.ledger.clone(),
            policy,
            prices,
            shutdown,
        ));
        let ballot_box =
            TrailBallotBox::new(trail.clone(), RemoteLedger::new(engine.client.clone()));
        Setup {
            nats,
            engine,
            trail,
            ballot_box,
            trigger,
        }
    }

    /// Sends a change request and returns the service's answer.
    async fn ask(&self, request_id: &str, initiator: &str, change: Change) -> ChangeReply {
        let request = ChangeRequest {
            request_id: request_id.into(),
            initiator: initiator.into(),
            change,
        };
        // The service subscribes right after start; retry until it answers.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(subjects::headers::CONTENT_TYPE, ContentType::JSON);
            let reply = self
                .engine
                .client
                .request_with_headers(
                    subjects::REQ_CHANGE,
                    headers,
                    ContentType::Json.encode(&request).into(),
                )
                .await;
            match reply {
                Ok(msg) => {
                    return ContentType::Json
                        .decode::<ChangeReply>(&msg.payload)
                        .expect("a change reply");
                }
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the change service does not answer: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks for `change` and expects it accepted; returns the workflow id.
    async fn accepted(&self, request_id: &str, initiator: &str, change: Change) -> String {
        match self.ask(request_id, initiator, change).await {
            ChangeReply::Accepted { workflow_id } => workflow_id,
            other => panic!("{request_id} should be accepted: {other:?}"),
        }
    }

    async fn change_stage(&self, id: &str) -> Option<ChangeStage> {
        self.trail
            .read(|view| view.change(id).map(|c| c.stage))
            .await
            .expect("the trail replica reads")
    }

    /// `user`'s vote on change `id`, bound to what the notice shows.
    async fn vote(&self, id: &str, user: &str, vote: Vote) -> Result<Receipt, BallotError> {
        let notice = self.ballot_box.notice(id).await.expect("a notice");
        self.ballot_box
            .cast(Ballot {
                workflow_id: id.into(),
                user_id: user.into(),
                vote: ApprovalVote {
                    vote,
                    request_hash: notice.request_hash,
                    policy_version: notice.policy_version,
                    channel: ApprovalChannel::Console,
                    mfa: MfaMethod::Totp,
                    comment: None,
                },
                masked_ip: None,
                user_agent: None,
            })
            .await
    }

    /// Asks for `change` as `admin1` and has `admin3` and `admin4` approve it;
    /// returns the workflow id once it is applied.
    async fn approved(&self, request_id: &str, change: Change) -> String {
        let id = self.accepted(request_id, "admin1", change).await;
        assert_eq!(
            self.change_stage(&id).await,
            Some(ChangeStage::AwaitingApprovals)
        );
        self.counted(&id, "admin3", Vote::Approve).await;
        self.counted(&id, "admin4", Vote::Approve).await;
        assert_eq!(self.change_stage(&id).await, Some(ChangeStage::Applied));
        id
    }

    /// Asks for `change` and expects it refused for `field`; returns the reason.
    async fn refused(&self, request_id: &str, change: Change, field: &str) -> String {
        match self.ask(request_id, "admin1", change).await {
            ChangeReply::Refused {
                field: Some(f),
                reason,
            } if f == field => {
                let id = format!("change-{request_id}");
                assert_eq!(self.change_stage(&id).await, None, "nothing is recorded");
                reason
            }
            other => panic!("{request_id} should be refused for {field}: {other:?}"),
        }
    }

    /// Casts a vote that must count.
    async fn counted(&self, id: &str, user: &str, vote: Vote) {
        if let Err(e) = self.vote(id, user, vote).await {
            panic!("{user}'s vote on {id} should count: {e}");
        }
    }

    /// Submits a transfer of 1 LTC (EUR 80) by `erp` to `destination` and
    /// returns the policy's decision on it.
    async fn transfer(&self, request_id: &str, destination: &str) -> PolicyDecision {
        self.transfer_by(request_id, "erp", destination).await
    }

    /// The same, initiated by `initiator`.
    async fn transfer_by(
        &self,
        request_id: &str,
        initiator: &str,
        destination: &str,
    ) -> PolicyDecision {
        let body = json!({
            "requestId": request_id,
            "wallet": "treasury",
            "asset": "LTC",
            "destination": destination,
            "amount": "1",
            "initiator": initiator,
        });
        let id = match submit_json(&self.engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => panic!("intake refused {request_id}: {other:?}"),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let decision = self
                .trail
                .read(|view| view.transfer(&id).and_then(|t| t.decision.clone()))
                .await
                .expect("the trail replica reads");
            if let Some(d) = decision {
                return d;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} is not decided"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) {
        self.trigger.trigger();
        let verified = verify_stream(&self.nats.js().await).await;
        assert!(verified.is_ok(), "the trail verifies: {verified:?}");
        self.engine.stop().await;
    }
}

fn to() -> String {
    taproot_address("rltc", [9; 32])
}

fn policy_apply(document: &str) -> Change {
    let policy = Policy::parse(document).expect("parses");
    Change::PolicyApply {
        name: policy.name.clone(),
        version: policy.version().to_string(),
        document: document.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_applies_after_two_administrators_and_decides_new_transfers() {
    let s = Setup::start(&amounts_policy()).await;
    let old = Policy::parse(&amounts_policy()).expect("parses");
    let new = Policy::parse(&strict_policy()).expect("parses");
    let before = s.transfer("before", &to()).await;
    assert_eq!(
        (before.outcome, before.policy_version.as_str()),
        (PolicyOutcome::Allow, old.version())
    );

    let id = s
        .accepted("apply", "admin1", policy_apply(&strict_policy()))
        .await;
    assert_eq!(
        s.change_stage(&id).await,
        Some(ChangeStage::AwaitingApprovals)
    );
    let notice = s.ballot_box.notice(&id).await.expect("notice");
    assert_eq!(
        notice.missing,
        vec!["administrators: 0 of 2 (rule administration)".to_string()]
    );
    assert!(notice.approved_by.is_empty(), "{:?}", notice.approved_by);
    // The initiator never approves their own change; a transfer approver cannot.
    for outsider in ["admin1", "alice"] {
        assert!(
            matches!(
                s.vote(&id, outsider, Vote::Approve).await,
                Err(BallotError::Refused(_))
            ),
            "{outsider}'s approval does not count"
        );
    }
    assert_eq!(
        s.vote(&id, "admin2", Vote::Approve).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        })
    );
    let meanwhile = s.transfer("meanwhile", &to()).await;
    assert_eq!(
        (meanwhile.outcome, meanwhile.policy_version.as_str()),
        (PolicyOutcome::Allow, old.version()),
        "one approval changes nothing"
    );
    assert_eq!(
        s.vote(&id, "admin3", Vote::Approve).await,
        Ok(Receipt::Recorded {
            quorum_reached: true
        })
    );
    assert_eq!(s.change_stage(&id).await, Some(ChangeStage::Applied));
    let active = s
        .trail
        .read(|view| view.active_policy.clone().map(|(v, _)| v))
        .await
        .expect("reads");
    assert_eq!(active.as_deref(), Some(new.version()));
    let after = s.transfer("after", &to()).await;
    assert_eq!(
        (after.outcome, after.policy_version.as_str()),
        (PolicyOutcome::RequireApprovals, new.version())
    );
    // A retry with the same request id returns the same workflow, applying nothing twice.
    assert_eq!(
        s.ask("apply", "admin1", policy_apply(&strict_policy()))
            .await,
        ChangeReply::Accepted { workflow_id: id }
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_policy_apply_leaves_the_old_policy() {
    let s = Setup::start(&amounts_policy()).await;
    let old = Policy::parse(&amounts_policy()).expect("parses");
    let id = s
        .accepted("apply", "admin1", policy_apply(&strict_policy()))
        .await;
    s.counted(&id, "admin2", Vote::Approve).await;
    s.counted(&id, "admin3", Vote::Reject).await;
    assert_eq!(s.change_stage(&id).await, Some(ChangeStage::Rejected));
    let after = s.transfer("after", &to()).await;
    assert_eq!(
        (after.outcome, after.policy_version.as_str()),
        (PolicyOutcome::Allow, old.version())
    );
    // A document that does not parse, or whose version is not its own, is refused.
    let mut forged = policy_apply(&strict_policy());
    if let Change::PolicyApply { version, .. } = &mut forged {
        *version = old.version().to_string();
    }
    assert!(matches!(
        s.ask("forged", "admin1", forged).await,
        ChangeReply::Refused { field: Some(f), .. } if f == "change.version"
    ));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freeze_blocks_at_once_and_lifting_it_needs_the_quorum() {
    let s = Setup::start(&amounts_policy()).await;
    let freeze = || Change::Freeze {
        wallet: Some("treasury".into()),
        reason: "incident 42".into(),
    };
    match s.ask("by-alice", "alice", freeze()).await {
        ChangeReply::Refused { field, reason } => {
            assert_eq!(field.as_deref(), Some("initiator"));
            assert!(reason.contains("not an active administrator"), "{reason}");
        }
        other => panic!("a non-administrator cannot freeze: {other:?}"),
    }
    assert_eq!(
        s.transfer("before", &to()).await.outcome,
        PolicyOutcome::Allow
    );
    let unfreeze = || Change::Unfreeze {
        wallet: Some("treasury".into()),
    };
    assert!(
        matches!(
            s.ask("early", "admin1", unfreeze()).await,
            ChangeReply::Refused { field: Some(f), .. } if f == "change.wallet"
        ),
        "nothing is frozen yet"
    );

    let id = s.accepted("freeze", "admin1", freeze()).await;
    assert_eq!(s.change_stage(&id).await, Some(ChangeStage::Applied));
    let frozen = s.transfer("frozen", &to()).await;
    assert_eq!(frozen.outcome, PolicyOutcome::Block);
    assert!(frozen.explanation.contains("incident 42"), "{frozen:?}");
    // Guardians check the same replica state before every ceremony.
    let may_sign = s
        .trail
        .read(|view| view.admin.freeze.may_sign("treasury"))
        .await
        .expect("reads");
    assert!(
        may_sign.is_err_and(|e| e.contains("frozen")),
        "signing is frozen"
    );

    let lift = s.accepted("unfreeze", "admin1", unfreeze()).await;
    assert_eq!(
        s.change_stage(&lift).await,
        Some(ChangeStage::AwaitingApprovals)
    );
    s.counted(&lift, "admin2", Vote::Approve).await;
    assert_eq!(
        s.transfer("still-frozen", &to()).await.outcome,
        PolicyOutcome::Block,
        "one approval does not lift it"
    );
    s.counted(&lift, "admin3", Vote::Approve).await;
    assert_eq!(s.change_stage(&lift).await, Some(ChangeStage::Applied));
    assert_eq!(
        s.transfer("thawed", &to()).await.outcome,
        PolicyOutcome::Allow
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whitelisted_destination_is_allowed_after_the_quorum() {
    let s = Setup::start(&whitelist_policy()).await;
    let (listed, other) = (to(), taproot_address("rltc", [7; 32]));
    assert_eq!(
        s.transfer("before", &listed).await.outcome,
        PolicyOutcome::RequireApprovals
    );
    let add = Change::WhitelistAdd {
        wallet: "treasury".into(),
        address: listed.clone(),
    };
    // Whitelist changes are started by an initiator, approved by administrators.
    let id = s.accepted("add", "erp", add).await;
    let decision = s
        .trail
        .read(|view| view.change(&id).and_then(|c| c.decision.clone()))
        .await
        .expect("reads");
    assert_eq!(
        decision.as_ref().map(|d| d.outcome),
        Some(PolicyOutcome::RequireApprovals),
        "{decision:?}"
    );
    s.counted(&id, "admin2", Vote::Approve).await;
    assert_eq!(
        s.transfer("pending", &listed).await.outcome,
        PolicyOutcome::RequireApprovals,
        "not before the quorum"
    );
    s.counted(&id, "admin3", Vote::Approve).await;
    assert_eq!(s.change_stage(&id).await, Some(ChangeStage::Applied));
    assert_eq!(
        s.transfer("listed", &listed).await.outcome,
        PolicyOutcome::Allow
    );
    assert_eq!(
        s.transfer("other", &other).await.outcome,
        PolicyOutcome::RequireApprovals
    );
    // An address of another chain's format is refused by field.
    let bad = Change::WhitelistAdd {
        wallet: "treasury".into(),
        address: "bc1qnotregtest".into(),
    };
    assert!(matches!(
        s.ask("bad", "erp", bad).await,
        ChangeReply::Refused { field: Some(f), .. } if f == "change.address"
    ));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_added_after_two_administrators_can_initiate() {
    let s = Setup::start(&amounts_policy()).await;
    let unknown = s.transfer_by("before", "bob", &to()).await;
    assert_eq!(unknown.outcome, PolicyOutcome::Block);
    assert!(
        unknown.explanation.contains("not in the directory"),
        "{unknown:?}"
    );
    let add = Change::UserAdd(record("bob", &["initiator"], &[]));
    let id = s.accepted("add-bob", "admin1", add.clone()).await;
    let notice = s.ballot_box.notice(&id).await.expect("notice");
    assert_eq!(
        notice.missing,
        vec!["administrators: 0 of 2 (rule administration)".to_string()]
    );
    s.counted(&id, "admin2", Vote::Approve).await;
    let known = |view: &custos_workers::trail::TrailView| view.directory.user("bob").is_some();
    assert!(
        !s.trail.read(known).await.expect("reads"),
        "not before the quorum"
    );
    s.counted(&id, "admin3", Vote::Approve).await;
    assert_eq!(s.change_stage(&id).await, Some(ChangeStage::Applied));
    assert!(s.trail.read(known).await.expect("reads"));
    let after = s.transfer_by("after", "bob", &to()).await;
    assert_eq!(after.outcome, PolicyOutcome::Allow, "{after:?}");
    // The id is taken now; so is the email under another id.
    let reason = s.refused("again", add, "change.id").await;
    assert!(reason.contains("already exists"), "{reason}");
    let mut twin = record("bobby", &[], &[]);
    twin.email = "bob@example.com".into();
    s.refused("twin", Change::UserAdd(twin), "change.email")
        .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deactivated_users_approvals_stop_counting_and_they_cannot_vote() {
    let s = Setup::start(&amounts_policy()).await;
    let pending = s
        .accepted("apply", "admin1", policy_apply(&strict_policy()))
        .await;
    s.counted(&pending, "admin2", Vote::Approve).await;
    let other = s
        .accepted(
            "whitelist",
            "erp",
            Change::WhitelistAdd {
                wallet: "treasury".into(),
                address: to(),
            },
        )
        .await;
    assert_eq!(
        s.ballot_box
            .notice(&pending)
            .await
            .expect("notice")
            .approved_by,
        vec!["admin2".to_string()]
    );

    s.refused(
        "nobody",
        Change::UserDeactivate {
            user: "nobody".into(),
        },
        "change.user",
    )
    .await;
    let deactivate = Change::UserDeactivate {
        user: "admin2".into(),
    };
    s.approved("deactivate", deactivate.clone()).await;

    // The approval given before no longer counts...
    let notice = s.ballot_box.notice(&pending).await.expect("notice");
    assert_eq!(
        notice.missing,
        vec!["administrators: 0 of 2 (rule administration)".to_string()]
    );
    // ... so one more approval does not complete the quorum, two do.
    assert_eq!(
        s.vote(&pending, "admin3", Vote::Approve).await,
        Ok(Receipt::Recorded {
            quorum_reached: false
        })
    );
    // They can no longer vote, nor initiate.
    assert!(
        matches!(
            s.vote(&other, "admin2", Vote::Approve).await,
            Err(BallotError::Refused(_))
        ),
        "a deactivated user's vote is refused"
    );
    match s
        .ask(
            "late-freeze",
            "admin2",
            Change::Freeze {
                wallet: None,
                reason: "after leaving".into(),
            },
        )
        .await
    {
        ChangeReply::Refused { field, .. } => assert_eq!(field.as_deref(), Some("initiator")),
        other => panic!("a deactivated administrator cannot freeze: {other:?}"),
    }
    s.counted(&pending, "admin4", Vote::Approve).await;
    assert_eq!(s.change_stage(&pending).await, Some(ChangeStage::Applied));
    let reason = s.refused("twice", deactivate, "change.user").await;
    assert!(reason.contains("already deactivated"), "{reason}");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_change_through_the_quorum_and_separation_of_duties_is_refused() {
    let s = Setup::start(&amounts_policy()).await;
    // Refused with the field and reason before anything is recorded.
    let reason = s
        .refused(
            "auditing-approver",
            Change::RoleAssign {
                user: "alice".into(),
                role: "auditor".into(),
            },
            "change.role",
        )
        .await;
    assert!(
        reason.contains("alice holds approver") && reason.contains("separation of duties"),
        "{reason}"
    );
    let reason = s
        .refused(
            "signing-admin",
            Change::RoleCreate {
                name: "signing-admin".into(),
                duties: vec!["administer".into(), "operate-guardian".into()],
            },
            "change.duties",
        )
        .await;
    assert!(reason.contains("separation of duties"), "{reason}");
    s.refused(
        "no-such-duty",
        Change::RoleCreate {
            name: "x".into(),
            duties: vec!["sign".into()],
        },
        "change.duties",
    )
    .await;
    s.refused(
        "conflicted-user",
        Change::UserAdd(record("carol", &["guardian-operator", "approver"], &[])),
        "change.roles",
    )
    .await;
    s.refused(
        "no-such-role",
        Change::RoleAssign {
            user: "alice".into(),
            role: "treasurer".into(),
        },
        "change.role",
    )
    .await;

    let duties = |view: &custos_workers::trail::TrailView| view.directory.duties("alice");
    s.approved(
        "create",
        Change::RoleCreate {
            name: "treasurer".into(),
            duties: vec!["initiate".into(), "approve".into()],
        },
    )
    .await;
    s.approved(
        "assign",
        Change::RoleAssign {
            user: "alice".into(),
            role: "treasurer".into(),
        },
    )
    .await;
    assert!(
        s.trail
            .read(duties)
            .await
            .expect("reads")
            .contains(&policy::Duty::Initiate)
    );
    assert_eq!(
        s.transfer_by("as-treasurer", "alice", &to()).await.outcome,
        PolicyOutcome::Allow
    );
    s.approved(
        "revoke",
        Change::RoleRevoke {
            user: "alice".into(),
            role: "treasurer".into(),
        },
    )
    .await;
    assert!(
        !s.trail
            .read(duties)
            .await
            .expect("reads")
            .contains(&policy::Duty::Initiate)
    );
    assert_eq!(
        s.transfer_by("revoked", "alice", &to()).await.outcome,
        PolicyOutcome::Block
    );
    s.finish().await;
}

/// On the pure engine: over random destinations, only whitelisted ones are
/// allowed outright under a whitelist rule; every other one needs approvals.
#[test]
fn only_whitelisted_destinations_are_ever_allowed() {
    let policy = Policy::parse(&whitelist_policy()).expect("parses");
    let wallet = WalletDescriptor {
        name: "treasury".into(),
        model: "frost".into(),
        chain: "ltc-regtest".into(),
        address: taproot_address("rltc", [1; 32]),
        threshold: None,
        guardians: Vec::new(),
        group_key: None,
        transcript: None,
    };
    let mut directory = Directory::new();
    directory
        .add_record(&record("erp", &["initiator"], &[]))
        .expect("user");
    let now = 1_800_000_000_000;
    let mut prices = PriceSnapshot::new();
    prices
        .insert("LTC", Currency::Eur, "80", now)
        .expect("price");
    let mut rng = rand::thread_rng();
    let mut book = AddressBook::new();
    let listed: Vec<String> = (0..8)
        .map(|_| taproot_address("rltc", rng.r#gen()))
        .collect();
    for a in &listed {
        book.add("treasury", "ltc-regtest", a);
    }
    let decide = |destination: &str| {
        let request = TransferRequest {
            request_id: "r".into(),
            wallet: "treasury".into(),
            asset: "LTC".into(),
            destination: destination.into(),
            amount: "1".into(),
            memo: None,
            initiator: "erp".into(),
        };
        let request = Request::transfer(&request, &wallet, false).expect("a valid request");
        policy::evaluate(
            &policy,
            &request,
            &Inputs {
                directory: &directory,
                prices: &prices,
                velocity: &VelocityState::new(policy.currency),
                address_book: &book,
                freeze: &FreezeState::new(),
                now,
            },
        )
        .outcome
    };
    for a in &listed {
        assert_eq!(decide(a), PolicyOutcome::Allow, "{a}");
        assert_eq!(decide(&a.to_uppercase()), PolicyOutcome::Allow, "{a}");
    }
    for _ in 0..500 {
        let a = taproot_address("rltc", rng.r#gen());
        if listed.contains(&a) {
            continue;
        }
        assert_ne!(decide(&a), PolicyOutcome::Allow, "{a} is not whitelisted");
    }
}
