//! The broadcast step against a real litecoind and a real ledger: the signed
//! transaction is sent (idempotently) and `TRANSACTION_BROADCAST` proposed; a
//! node that is down is retried and raises one alert after the threshold; a
//! transaction the node rejects fails for good.

mod chain_support;

use chain_support::{CHAIN, Wallet, build, sign_as_guardians};
use custos_adapters::nats_server::Durability;
use custos_custody::spend::script_pubkey_for_address;
use custos_schemas::chain::SignedTransaction;
use custos_schemas::{Actor, AggregateKind, Event, EventType, Outcome, Payload, Target};
use custos_tests::litecoind::Litecoind;
use custos_tests::{Engine, Nats, all_events};
use custos_workers::chain_steps::{BroadcastStep, ChainNodes};
use custos_workers::runtime::{Step, StepError};

fn signed_event(workflow: &str, signed: SignedTransaction) -> Event {
    Event {
        schema_version: 1,
        id: Event::message_id(AggregateKind::Tx, workflow, 5),
        timestamp: 0,
        event_type: EventType::TransactionSigned,
        aggregate_kind: AggregateKind::Tx,
        workflow_id: workflow.into(),
        version: 5,
        causation_id: None,
        actor: Actor::system("signing"),
        target: Target {
            kind: "transfer".into(),
            id: workflow.into(),
            amount: None,
            currency: None,
        },
        context: Default::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::TransactionSigned(signed),
    }
}

#[tokio::test]
async fn broadcast_step_sends_retries_alerts_and_refuses() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let mut node = Litecoind::start().await;
    let w = Wallet::new("broadcast-step");
    node.fund(&w.taproot.address, 0.3).await;
    node.mine(1).await;
    let destination = script_pubkey_for_address(
        CHAIN,
        &node
            .rpc
            .get_new_address(Some("bech32"))
            .await
            .expect("address"),
    )
    .expect("script");
    let unsigned = build(&node.rpc, &w, &destination, 10_000_000)
        .await
        .expect("build");
    let (_, signed) = sign_as_guardians(&w, &unsigned, &destination, 10_000_000);
    let step = BroadcastStep::new(
        ChainNodes::new([(CHAIN.to_string(), node.rpc.clone())]),
        engine.ledger.clone(),
        2,
    )
    .expect("step");

    // A transaction the node rejects (a corrupted signature) fails for good.
    let mut corrupted = signed.clone();
    let n = corrupted.raw_tx.len();
    let flipped = if &corrupted.raw_tx[n - 10..n - 9] == "0" {
        "1"
    } else {
        "0"
    };
    corrupted.raw_tx.replace_range(n - 10..n - 9, flipped);
    match step.handle(&signed_event("tx-bad", corrupted)).await {
        Err(StepError::Permanent(reason)) => {
            assert!(reason.contains("Schnorr"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // While the node is down: transient, and one alert once the threshold is
    // reached (not one per retry).
    node.stop().await;
    let event = signed_event("tx-1", signed.clone());
    for _ in 0..3 {
        assert!(matches!(
            step.handle(&event).await,
            Err(StepError::Transient(_))
        ));
    }
    let alerts: Vec<Event> = all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.event_type == EventType::AlertRaised)
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].workflow_id, "broadcast-unreachable-tx-1");
    match &alerts[0].payload {
        Payload::Alert { summary, .. } => {
            assert!(summary.contains("failed 2 times"), "{summary}")
        }
        other => panic!("{other:?}"),
    }

    // Back up: broadcast, and again (a redelivery) with the same answer.
    node.restart().await;
    for _ in 0..2 {
        let proposals = step.handle(&event).await.expect("broadcast");
        assert_eq!(proposals.len(), 1);
        let p = &proposals[0];
        assert_eq!(p.event_type, EventType::TransactionBroadcast);
        assert_eq!(p.expected_version, 5);
        assert!(matches!(
            &p.payload,
            Payload::TransactionBroadcast { chain, txid } if chain == CHAIN && *txid == signed.txid
        ));
    }
    node.mine(1).await;
    let tx = node
        .rpc
        .get_raw_transaction(&signed.txid)
        .await
        .expect("rpc")
        .expect("known");
    assert_eq!(tx.confirmations, 1);

    // A chain without a configured node is a permanent failure.
    let mut other = signed.clone();
    other.chain = "btc-regtest".into();
    assert!(matches!(
        step.handle(&signed_event("tx-2", other)).await,
        Err(StepError::Permanent(r)) if r.contains("no node is configured for btc-regtest")
    ));
    engine.stop().await;
}
