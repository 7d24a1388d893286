//! Key ceremonies for tests that need a wallet but are about something else:
//! the change asking for it is recorded as asked by administrator `ops` and
//! allowed outright by the active policy (as the policy step decides under a
//! policy that allows key ceremonies), then the engine's ceremony step runs it
//! among the guardians, which check that approval on their own replicas.
//! Tests of the approval path itself go through the change service.

use std::time::Duration;

use custos_engine::change::{Stage, request_hash};
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
use custos_schemas::{
    AggregateKind, EventType, Outcome, Payload, Proposal, UserRecord, WalletDescriptor,
};
use custos_workers::Shutdown;
use custos_workers::policy_step::Prices;
use custos_workers::trail::Trail;

use crate::{Engine, Nats, append_ok};

/// The administrator that asks for the ceremonies.
pub const OPERATOR: &str = "ops";

/// The operator's directory record: asks for wallets and administers them.
pub fn operator() -> UserRecord {
    UserRecord {
        id: OPERATOR.into(),
        name: "Operations".into(),
        email: "ops@example.com".into(),
        slack_user_id: None,
        roles: vec!["initiator".into(), "administrator".into()],
        groups: vec!["administrators".into()],
        mfa_enrolled: true,
    }
}

/// A policy under which the operator's key ceremonies need no approval (and
/// transfers pass): for tests about the ceremonies, not the approvals.
pub const CEREMONIES_ALLOWED: &str = r#"
version = 1
name = "ceremonies-allowed"
description = "Tests: key ceremonies and transfers need no approval."
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
administrators = "Nothing here needs approvals."

[[rule]]
name = "key-ceremonies"
description = "Key ceremonies run at once."
actions = ["wallet-create", "key-rotation", "guardian-add", "guardian-remove", "threshold-change"]
outcome = "allow"

[[rule]]
name = "transfers"
description = "Transfers pass."
actions = ["transfer"]
outcome = "allow"
"#;

/// Activates `policy` (TOML), records the operator, and runs the change
/// service on it until the returned trigger fires.
pub async fn change_service(
    nats: &Nats,
    engine: &Engine,
    policy: &str,
) -> custos_workers::ShutdownTrigger {
    let policy = custos_engine::policy::Policy::parse(policy).expect("policy parses");
    append_ok(
        &engine.ledger,
        vec![
            proposal(
                AggregateKind::Policy,
                "test-active",
                0,
                EventType::PolicyCreated,
                Payload::PolicyActivated {
                    name: policy.name.clone(),
                    version: policy.version().to_string(),
                },
            ),
            proposal(
                AggregateKind::User,
                OPERATOR,
                0,
                EventType::UserCreated,
                Payload::UserCreated(operator()),
            ),
        ],
    )
    .await;
    let (trigger, shutdown) = Shutdown::new();
    let trail = Trail::follow(nats.js().await, shutdown.clone())
        .await
        .expect("trail");
    tokio::spawn(custos_workers::change::serve(
        engine.client.clone(),
        trail,
        engine.ledger.clone(),
        policy,
        Prices::Table(Default::default()),
        shutdown,
    ));
    trigger
}

/// Runs the key ceremony `change` asks for; the wallet as recorded after it,
/// or the reason its change failed.
pub async fn approved_ceremony(
    nats: &Nats,
    engine: &Engine,
    change: Change,
) -> Result<WalletDescriptor, String> {
    let (trigger, shutdown) = Shutdown::new();
    let trail = Trail::follow(nats.js().await, shutdown)
        .await
        .expect("trail");
    let (active, known) = trail
        .read(|v| {
            (
                v.active_policy.as_ref().map(|(version, _)| version.clone()),
                v.directory.user(OPERATOR).is_some(),
            )
        })
        .await
        .expect("trail read");
    let mut setup = Vec::new();
    if !known {
        setup.push(proposal(
            AggregateKind::User,
            OPERATOR,
            0,
            EventType::UserCreated,
            Payload::UserCreated(operator()),
        ));
    }
    // A policy of its own only when none is active: the test's own stays.
    let version = match active {
        Some(v) => v,
        None => {
            setup.push(proposal(
                AggregateKind::Policy,
                "test-ceremonies",
                0,
                EventType::PolicyCreated,
                Payload::PolicyActivated {
                    name: "test-ceremonies".into(),
                    version: "test-ceremonies-v1".into(),
                },
            ));
            "test-ceremonies-v1".to_string()
        }
    };
    if !setup.is_empty() {
        append_ok(&engine.ledger, setup).await;
    }
    let request = ChangeRequest {
        request_id: format!("test-{}", hex::encode(rand::random::<[u8; 8]>())),
        initiator: OPERATOR.into(),
        change: change.clone(),
    };
    let workflow_id = format!("change-{}", request.request_id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let decision = PolicyDecision {
        outcome: PolicyOutcome::Allow,
        policy_version: version,
        action: custos_engine::change::action(&change).as_str().into(),
        initiator: OPERATOR.into(),
        wallet: change.wallet().map(str::to_string),
        evaluated_at: now,
        fiat_value: None,
        approvals: Vec::new(),
        expires_at: None,
        delay_ms: 0,
        matched_rules: Vec::new(),
        explanation: "allowed: key ceremonies in tests".into(),
    };
    let hash = request_hash(&request);
    append_ok(
        &engine.ledger,
        vec![
            Proposal {
                result: Outcome::Pending,
                ..proposal(
                    AggregateKind::Change,
                    &workflow_id,
                    0,
                    EventType::ChangeRequested,
                    Payload::ChangeRequested {
                        request,
                        request_hash: hash,
                    },
                )
            },
            proposal(
                AggregateKind::Change,
                &workflow_id,
                1,
                EventType::PolicyEvaluated,
                Payload::PolicyEvaluated(decision),
            ),
        ],
    )
    .await;
    let name = change.wallet().unwrap_or_default().to_string();
    let started = std::time::Instant::now();
    let outcome = loop {
        let state = trail
            .read(|v| {
                v.change(&workflow_id)
                    .map(|c| (c.stage, c.reason.clone(), v.ledger.wallet(&name).cloned()))
            })
            .await
            .expect("trail read");
        match state {
            Some((Stage::Applied, _, Some(wallet))) => break Ok(wallet),
            Some((Stage::Failed | Stage::Rejected, reason, _)) => {
                break Err(reason.unwrap_or_default());
            }
            _ if started.elapsed() > Duration::from_secs(120) => {
                break Err(format!("change {workflow_id} did not end: {state:?}"));
            }
            // Poll the replica: the ceremony step records the outcome there.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    trigger.trigger();
    outcome
}

fn proposal(
    kind: AggregateKind,
    id: &str,
    expected_version: u64,
    event_type: EventType,
    payload: Payload,
) -> Proposal {
    Proposal {
        expected_version,
        ..crate::record(kind, id, event_type, payload)
    }
}

/// The change service's answer to `change` asked for by the operator under
/// the default policy.
async fn ask_as_operator(nats: &Nats, engine: &Engine, change: Change) -> ChangeReply {
    let (trigger, shutdown) = Shutdown::new();
    let trail = Trail::follow(nats.js().await, shutdown)
        .await
        .expect("trail");
    let active = custos_workers::change::ActivePolicy::new(
        custos_engine::policy::default_policy().expect("default policy"),
    );
    let request = ChangeRequest {
        request_id: format!("test-{}", hex::encode(rand::random::<[u8; 8]>())),
        initiator: OPERATOR.into(),
        change,
    };
    let reply = custos_workers::change::submit(
        &trail,
        &engine.ledger,
        &active,
        &Prices::Table(Default::default()),
        &request,
    )
    .await;
    trigger.trigger();
    reply
}

/// What the change service answers when `change` is asked for by the
/// operator and refused before anything is recorded: `field: reason`.
pub async fn refused_change(nats: &Nats, engine: &Engine, change: Change) -> String {
    match ask_as_operator(nats, engine, change).await {
        ChangeReply::Refused { field, reason } => {
            format!("{}: {reason}", field.unwrap_or_default())
        }
        other => panic!("not refused: {other:?}"),
    }
}

/// The operator freezes `wallet` (in effect at once, as an emergency).
pub async fn freeze(nats: &Nats, engine: &Engine, wallet: &str) {
    let change = Change::Freeze {
        wallet: Some(wallet.into()),
        reason: "test".into(),
    };
    let reply = ask_as_operator(nats, engine, change).await;
    assert!(
        matches!(reply, ChangeReply::Accepted { .. }),
        "freeze: {reply:?}"
    );
}
