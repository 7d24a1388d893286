//! The step runtime against a real nats-server: explicit acks, backoff on
//! transient errors, failure events, dead letters, idempotent redelivery.
//!
//! The step here is scripted by the test (the real steps land with their issues):
//! it reacts to `TRANSACTION_CREATED` the way the policy step will, so that each
//! outcome of the runtime can be provoked on purpose.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use custos_adapters::jetstream::StepConsumer;
use custos_adapters::nats_server::Durability;
use custos_schemas::{
    AggregateKind, Event, EventType, IntakeReply, Outcome, Payload, Proposal, subjects,
};
use custos_tests::*;
use custos_workers::Shutdown;
use custos_workers::runtime::{self, Step, StepError};
use futures::StreamExt;
use serde_json::json;

/// What the scripted step does with a request, by its memo.
#[derive(Clone)]
struct Scripted {
    calls: Arc<AtomicU32>,
}

impl Step for Scripted {
    fn consumer(&self) -> StepConsumer {
        StepConsumer {
            name: "scripted",
            filters: vec![subjects::event_type_filter(
                AggregateKind::Tx,
                EventType::TransactionCreated.as_str(),
            )],
            max_deliver: 3,
            ack_wait: Duration::from_secs(5),
        }
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let Payload::TransferRequested { request, .. } = &event.payload else {
            return Err(StepError::Permanent("not a transfer".into()));
        };
        let allow = Proposal {
            aggregate_kind: AggregateKind::Tx,
            workflow_id: event.workflow_id.clone(),
            expected_version: event.version,
            event_type: EventType::PolicyEvaluated,
            causation_id: Some(event.id.clone()),
            actor: custos_schemas::Actor::system("scripted"),
            target: event.target.clone(),
            context: Default::default(),
            result: Outcome::Success,
            metadata: Default::default(),
            payload: Payload::PolicyEvaluated(custos_schemas::policy::PolicyDecision {
                outcome: custos_schemas::policy::PolicyOutcome::Allow,
                policy_version: "00".repeat(32),
                action: "transfer".into(),
                initiator: request.initiator.clone(),
                wallet: Some(request.wallet.clone()),
                evaluated_at: event.timestamp,
                fiat_value: None,
                approvals: Vec::new(),
                expires_at: None,
                delay_ms: 0,
                matched_rules: Vec::new(),
                explanation: "scripted".into(),
            }),
        };
        match request.memo.as_deref() {
            Some("flaky") if call.is_multiple_of(2) => {
                Err(StepError::Transient("node down".into()))
            }
            Some("permanent") => Err(StepError::Permanent("destination sanctioned".into())),
            Some("poison") => Err(StepError::Transient("always down".into())),
            Some("panic") => panic!("step bug"),
            _ => Ok(vec![allow]),
        }
    }
}

async fn submit(engine: &Engine, id: &str, memo: &str) -> String {
    let to = taproot_address("rltc", [5; 32]);
    let body = json!({"requestId": id, "wallet": "w", "asset": "LTC", "destination": to, "amount": "1", "initiator": "erp", "memo": memo});
    match submit_json(&engine.client, &body).await {
        IntakeReply::Accepted { workflow_id, .. } => workflow_id,
        other => panic!("{other:?}"),
    }
}

async fn history(nats: &Nats, workflow_id: &str) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.workflow_id == workflow_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_outcomes_ack_retry_fail_and_dead_letter() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    append_ok(
        &engine.ledger,
        vec![wallet_created(
            "w",
            "ltc-regtest",
            &taproot_address("rltc", [6; 32]),
        )],
    )
    .await;
    let ok = submit(&engine, "ok", "fine").await;
    let flaky = submit(&engine, "flaky", "flaky").await;
    let permanent = submit(&engine, "permanent", "permanent").await;
    let poison = submit(&engine, "poison", "poison").await;
    let panics = submit(&engine, "panics", "panic").await;

    let calls = Arc::new(AtomicU32::new(0));
    let (trigger, shutdown) = Shutdown::new();
    let js = nats.js().await;
    let worker = tokio::spawn(runtime::run(
        js.clone(),
        engine.ledger.clone(),
        Scripted {
            calls: calls.clone(),
        },
        shutdown,
    ));

    let advanced = |id: String| {
        let nats = &nats;
        async move {
            history(nats, &id)
                .await
                .iter()
                .any(|e| e.event_type == EventType::PolicyEvaluated)
        }
    };
    assert!(
        eventually(Duration::from_secs(20), || advanced(ok.clone())).await,
        "ok workflow advanced"
    );
    assert!(
        eventually(Duration::from_secs(20), || advanced(flaky.clone())).await,
        "flaky workflow advanced after a retry"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            history(&nats, &permanent)
                .await
                .iter()
                .any(|e| e.event_type == EventType::TransactionFailed)
        })
        .await,
        "permanent failure recorded"
    );
    let failed = history(&nats, &permanent)
        .await
        .into_iter()
        .find(|e| e.event_type == EventType::TransactionFailed)
        .expect("failed");
    assert!(
        matches!(&failed.payload, Payload::StepFailed { reason, .. } if reason.contains("sanctioned"))
    );

    // Poison and panicking messages end in the dead-letter stream with the reason,
    // and in the trail as MESSAGE_DEAD_LETTERED.
    let dead_letters = || async {
        all_events(&js)
            .await
            .into_iter()
            .filter(|(_, e)| e.event_type == EventType::MessageDeadLettered)
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(40), || async {
            dead_letters().await.len() == 2
        })
        .await,
        "two dead letters"
    );
    let letters = dead_letters().await;
    assert!(letters.iter().any(|e| matches!(&e.payload, Payload::DeadLettered { reason, deliveries: 3, .. } if reason.contains("always down"))), "{letters:?}");
    assert!(letters.iter().any(|e| matches!(&e.payload, Payload::DeadLettered { reason, .. } if reason.contains("panicked"))), "{letters:?}");
    let dlq = js
        .get_stream(subjects::DLQ_STREAM)
        .await
        .expect("dlq stream");
    let consumer = dlq
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("dlq message")
            .expect("some")
            .expect("ok");
        reasons.push(
            msg.headers
                .as_ref()
                .and_then(|h| h.get(subjects::headers::DLQ_REASON))
                .map(|v| v.to_string())
                .unwrap_or_default(),
        );
    }
    assert!(
        reasons.iter().all(|r| r.contains("deliveries")),
        "{reasons:?}"
    );
    // The poisoned workflows did not advance; nothing else was written for them.
    for id in [&poison, &panics] {
        assert_eq!(history(&nats, id).await.len(), 1);
    }

    // Redelivery is idempotent: a second runtime on a fresh consumer re-handles every
    // created event, but the version check makes its appends no-ops.
    let ok_events = history(&nats, &ok).await.len();
    trigger.trigger();
    let _ = worker.await;
    js.get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("stream")
        .delete_consumer("scripted")
        .await
        .expect("delete consumer");
    let (trigger, shutdown) = Shutdown::new();
    let before = calls.load(Ordering::SeqCst);
    let worker = tokio::spawn(runtime::run(
        js.clone(),
        engine.ledger.clone(),
        Scripted {
            calls: calls.clone(),
        },
        shutdown,
    ));
    assert!(
        eventually(Duration::from_secs(20), || async {
            calls.load(Ordering::SeqCst) > before
        })
        .await
    );
    // Give a wrong second append time to land before checking that none did.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        history(&nats, &ok).await.len(),
        ok_events,
        "a redelivered event must not advance the workflow again"
    );
    trigger.trigger();
    let _ = worker.await;
    verify_stream(&js).await.expect("chain verifies");
}
