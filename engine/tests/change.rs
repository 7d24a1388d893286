//! The administrative change workflow: every transition the machine allows and
//! the ones it refuses, and the fold of applied changes.

use custos_engine::change::{Admin, ChangeState, Stage, action, apply, effect, request_hash};
use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
use custos_schemas::change::{Change, ChangeRequest};
use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
use custos_schemas::{Actor, AggregateKind, Event, EventType, Outcome, Payload};

fn event(version: u64, event_type: EventType, result: Outcome, payload: Payload) -> Event {
    Event {
        schema_version: 1,
        id: Event::message_id(AggregateKind::Change, "change-1", version),
        timestamp: 1_000 + version as i64,
        event_type,
        aggregate_kind: AggregateKind::Change,
        workflow_id: "change-1".into(),
        version,
        causation_id: None,
        actor: Actor {
            user_id: format!("user-{version}"),
            ..Actor::default()
        },
        target: Default::default(),
        context: Default::default(),
        result,
        metadata: Default::default(),
        payload,
    }
}

fn request(change: Change) -> ChangeRequest {
    ChangeRequest {
        request_id: "1".into(),
        initiator: "alice".into(),
        change,
    }
}

fn unfreeze() -> Change {
    Change::Unfreeze {
        wallet: Some("treasury".into()),
    }
}

fn requested(change: Change) -> Event {
    let request = request(change);
    let request_hash = request_hash(&request);
    event(
        1,
        EventType::ChangeRequested,
        Outcome::Pending,
        Payload::ChangeRequested {
            request,
            request_hash,
        },
    )
}

fn decision(outcome: PolicyOutcome, action: &str) -> PolicyDecision {
    PolicyDecision {
        outcome,
        policy_version: "v1".into(),
        action: action.into(),
        initiator: "alice".into(),
        wallet: None,
        evaluated_at: 1_000,
        fiat_value: None,
        approvals: Vec::new(),
        expires_at: None,
        delay_ms: 0,
        matched_rules: Vec::new(),
        explanation: "because".into(),
    }
}

fn evaluated(outcome: PolicyOutcome, result: Outcome) -> Event {
    event(
        2,
        EventType::PolicyEvaluated,
        result,
        Payload::PolicyEvaluated(decision(outcome, "policy-change")),
    )
}

fn vote(version: u64, v: Vote, hash: &str, policy_version: &str, result: Outcome) -> Event {
    let event_type = match v {
        Vote::Approve => EventType::TransactionApproved,
        Vote::Reject => EventType::TransactionRejected,
    };
    event(
        version,
        event_type,
        result,
        Payload::ApprovalVote(ApprovalVote {
            vote: v,
            request_hash: hash.into(),
            policy_version: policy_version.into(),
            channel: ApprovalChannel::Console,
            mfa: MfaMethod::None,
            comment: None,
        }),
    )
}

fn fold(events: &[Event]) -> Result<ChangeState, String> {
    let mut state = ChangeState::default();
    for e in events {
        state = apply(&state, e).map_err(|e| e.to_string())?;
    }
    Ok(state)
}

#[test]
fn transitions() {
    let hash = request_hash(&request(unfreeze()));
    let applied = |version| {
        event(
            version,
            EventType::FreezeLifted,
            Outcome::Success,
            Payload::ChangeApplied(unfreeze()),
        )
    };
    let pending = || evaluated(PolicyOutcome::RequireApprovals, Outcome::Pending);
    // (name, events, the stage reached or the refusal's text)
    let cases: Vec<(&str, Vec<Event>, Result<Stage, &str>)> = vec![
        (
            "requested",
            vec![requested(unfreeze())],
            Ok(Stage::AwaitingPolicy),
        ),
        (
            "a freeze needs no decision",
            vec![requested(Change::Freeze {
                wallet: None,
                reason: "incident".into(),
            })],
            Ok(Stage::Approved),
        ),
        (
            "allowed outright, then applied",
            vec![
                requested(unfreeze()),
                evaluated(PolicyOutcome::Allow, Outcome::Success),
                applied(3),
            ],
            Ok(Stage::Applied),
        ),
        (
            "blocked",
            vec![
                requested(unfreeze()),
                evaluated(PolicyOutcome::Block, Outcome::Denied),
            ],
            Ok(Stage::Rejected),
        ),
        (
            "the result contradicts the decision",
            vec![
                requested(unfreeze()),
                evaluated(PolicyOutcome::Block, Outcome::Success),
            ],
            Err("contradicts"),
        ),
        (
            "quorum, then applied",
            vec![
                requested(unfreeze()),
                pending(),
                vote(3, Vote::Approve, &hash, "v1", Outcome::Pending),
                vote(4, Vote::Approve, &hash, "v1", Outcome::Success),
                applied(5),
            ],
            Ok(Stage::Applied),
        ),
        (
            "not applied before the quorum",
            vec![requested(unfreeze()), pending(), applied(3)],
            Err("not allowed when the change is AwaitingApprovals"),
        ),
        (
            "a rejection ends it",
            vec![
                requested(unfreeze()),
                pending(),
                vote(3, Vote::Reject, &hash, "v1", Outcome::Denied),
            ],
            Ok(Stage::Rejected),
        ),
        (
            "a vote bound to another request",
            vec![
                requested(unfreeze()),
                pending(),
                vote(3, Vote::Approve, "other", "v1", Outcome::Pending),
            ],
            Err("another request hash"),
        ),
        (
            "a vote bound to another policy version",
            vec![
                requested(unfreeze()),
                pending(),
                vote(3, Vote::Approve, &hash, "v0", Outcome::Pending),
            ],
            Err("another policy version"),
        ),
        (
            "another change than requested is not applied",
            vec![
                requested(unfreeze()),
                evaluated(PolicyOutcome::Allow, Outcome::Success),
                event(
                    3,
                    EventType::FreezeLifted,
                    Outcome::Success,
                    Payload::ChangeApplied(Change::Unfreeze { wallet: None }),
                ),
            ],
            Err("not the requested change"),
        ),
        (
            "a decision on another action",
            vec![
                requested(unfreeze()),
                event(
                    2,
                    EventType::PolicyEvaluated,
                    Outcome::Success,
                    Payload::PolicyEvaluated(decision(PolicyOutcome::Allow, "transfer")),
                ),
            ],
            Err("another action"),
        ),
        (
            "a tampered request hash",
            vec![event(
                1,
                EventType::ChangeRequested,
                Outcome::Pending,
                Payload::ChangeRequested {
                    request: request(unfreeze()),
                    request_hash: "00".into(),
                },
            )],
            Err("does not match"),
        ),
        (
            "a version gap",
            vec![requested(unfreeze()), applied(3)],
            Err("does not follow"),
        ),
    ];
    for (name, events, expected) in cases {
        match (fold(&events), expected) {
            (Ok(state), Ok(stage)) => assert_eq!(state.stage, stage, "{name}"),
            (Err(e), Err(text)) => assert!(e.contains(text), "{name}: {e}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn every_change_has_its_action_and_event() {
    let doc = Change::PolicyApply {
        name: "p".into(),
        version: "ab".repeat(32),
        document: String::new(),
    };
    assert_eq!(action(&doc).as_str(), "policy-change");
    assert_eq!(effect(&doc), EventType::PolicyModified);
    let add = Change::WhitelistAdd {
        wallet: "w".into(),
        address: "a".into(),
    };
    assert_eq!(action(&add).as_str(), "whitelist-change");
    assert_eq!(effect(&add), EventType::WhitelistEntryAdded);
    assert_eq!(effect(&unfreeze()), EventType::FreezeLifted);
}

#[test]
fn admin_folds_only_applied_changes_of_change_workflows() {
    let chain_of = |w: &str| (w == "treasury").then(|| "ltc-regtest".to_string());
    let mut admin = Admin::default();
    let applied = |change: Change| {
        event(
            3,
            effect(&change),
            Outcome::Success,
            Payload::ChangeApplied(change),
        )
    };
    admin.apply(
        &applied(Change::Freeze {
            wallet: Some("treasury".into()),
            reason: "incident".into(),
        }),
        chain_of,
    );
    assert!(admin.freeze.may_sign("treasury").is_err());
    assert!(admin.freeze.may_sign("ops").is_ok());
    admin.apply(&applied(unfreeze()), chain_of);
    assert!(admin.freeze.may_sign("treasury").is_ok());

    let add = Change::WhitelistAdd {
        wallet: "treasury".into(),
        address: "RLTC1QABC".into(),
    };
    admin.apply(&applied(add.clone()), chain_of);
    assert!(
        admin
            .address_book
            .contains("treasury", "ltc-regtest", "rltc1qabc")
    );
    // The same payload outside a change workflow is ignored.
    let mut elsewhere = applied(Change::Freeze {
        wallet: None,
        reason: "forged".into(),
    });
    elsewhere.aggregate_kind = AggregateKind::Policy;
    admin.apply(&elsewhere, chain_of);
    assert_eq!(admin.freeze.everything, None);
    admin.apply(
        &applied(Change::WhitelistRemove {
            wallet: "treasury".into(),
            address: "rltc1qabc".into(),
        }),
        chain_of,
    );
    assert!(
        !admin
            .address_book
            .contains("treasury", "ltc-regtest", "rltc1qabc")
    );
}
