//! Crashes and races against a real nats-server: acknowledged events survive a
//! kill -9, the chain never forks, no aggregate version is written twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use custos_adapters::jetstream::Batching;
use custos_adapters::nats_server::Durability;
use custos_schemas::{AppendReply, IntakeReply};
use custos_tests::*;
use custos_workers::ledger::LedgerConfig;
use serde_json::json;
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_event_and_intake_resumes() {
    kill_9_mid_load(Durability::Always, Batching::Atomic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_with_pipelined_appends() {
    kill_9_mid_load(Durability::Default, Batching::Pipelined).await;
}

fn config(batching: Batching) -> LedgerConfig {
    LedgerConfig {
        batching,
        ..LedgerConfig::new(audit_key())
    }
}

async fn kill_9_mid_load(durability: Durability, batching: Batching) {
    let mut nats = Nats::start(durability).await;
    let engine = Engine::start_with(&nats, config(batching)).await;
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (ledger, acknowledged, stop) =
            (engine.ledger.clone(), acknowledged.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut version = 0;
            let id = format!("w{w}");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match ledger.append(vec![alert(&id, version)]).await {
                    AppendReply::Appended { .. } => {
                        version += 1;
                        acknowledged.lock().await.push((id.clone(), version));
                    }
                    // The first attempt after the crash may have been stored without
                    // its ack reaching us: then the aggregate is one ahead.
                    AppendReply::Conflict { actual_version, .. } => version = actual_version,
                    AppendReply::Unavailable { .. } => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    AppendReply::Refused { reason } => panic!("refused: {reason}"),
                }
            }
        }));
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            acknowledged.lock().await.len() >= 300
        })
        .await,
        "load did not start"
    );
    nats.server.kill();
    // The server stays down a moment, so that appends fail and pile up meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.server.restart().await.expect("restart");
    let before = acknowledged.lock().await.len();
    assert!(
        eventually(Duration::from_secs(60), || async {
            acknowledged.lock().await.len() >= before + 300
        })
        .await,
        "appends did not resume after the restart"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    let js = nats.js().await;
    let stored: HashSet<(String, u64)> = all_events(&js)
        .await
        .into_iter()
        .map(|(_, e)| (e.workflow_id, e.version))
        .collect();
    for ack in acknowledged.lock().await.iter() {
        assert!(stored.contains(ack), "acknowledged event {ack:?} was lost");
    }
    verify_stream(&js)
        .await
        .expect("chain verifies after the crash");

    // Intake answers again.
    let to = taproot_address("rltc", [3; 32]);
    append_ok(
        &engine.ledger,
        vec![wallet_created(
            "after-crash",
            "ltc-regtest",
            &taproot_address("rltc", [4; 32]),
        )],
    )
    .await;
    let reply = submit_json(&engine.client, &json!({"requestId": "post-crash", "wallet": "after-crash", "asset": "LTC", "destination": to, "amount": "1", "initiator": "erp"})).await;
    assert!(matches!(reply, IntakeReply::Accepted { .. }), "{reply:?}");
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_workflow_never_write_a_version_twice() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    // 20 writers race on one aggregate and on their own, each always proposing the
    // version it last saw.
    let mut tasks = Vec::new();
    for w in 0..20 {
        let ledger = engine.ledger.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = 0;
            let mut seen = 0;
            for own in 0..30 {
                match ledger.append(vec![alert("shared", seen)]).await {
                    AppendReply::Appended { .. } => {
                        wins += 1;
                        seen += 1;
                    }
                    AppendReply::Conflict { actual_version, .. } => seen = actual_version,
                    other => panic!("{other:?}"),
                }
                append_ok(&ledger, vec![alert(&format!("own-{w}"), own)]).await;
            }
            wins
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.expect("writer");
    }
    // An empty append is refused, not answered as if the writer were gone.
    let empty = engine.ledger.append(Vec::new()).await;
    assert!(
        matches!(&empty, AppendReply::Refused { reason } if reason.contains("at least one")),
        "{empty:?}"
    );
    let js = nats.js().await;
    let events = all_events(&js).await;
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    for (_, e) in &events {
        versions
            .entry(e.workflow_id.clone())
            .or_default()
            .push(e.version);
    }
    for (id, v) in &versions {
        let expected: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(
            v, &expected,
            "{id}: versions must be 1..n in order, without gaps or repeats"
        );
    }
    assert_eq!(versions["shared"].len(), wins);
    assert_eq!(
        versions.keys().filter(|k| k.starts_with("own-")).count(),
        20
    );
    verify_stream(&js).await.expect("chain verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ledger_writer_stands_by_and_takes_over() {
    ledger_failover(Batching::Atomic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pipelining_ledger_writer_stands_by_and_takes_over() {
    ledger_failover(Batching::Pipelined).await;
}

/// Two ledger writers on one stream: the lease lets one write at a time, the
/// other waits, and takes over when the first stops; one unbroken chain results.
async fn ledger_failover(batching: Batching) {
    let nats = Nats::start(Durability::Default).await;
    let first = Engine::start_with(&nats, config(batching)).await;
    for v in 0..20 {
        append_ok(&first.ledger, vec![alert("first", v)]).await;
    }
    let second = Engine::start_with(&nats, config(batching)).await;
    let waiting = {
        let ledger = second.ledger.clone();
        tokio::spawn(async move { ledger.append(vec![alert("second", 0)]).await })
    };
    // While the first holds the lease it keeps writing; the second writes nothing.
    for v in 20..220 {
        append_ok(&first.ledger, vec![alert("first", v)]).await;
    }
    assert!(
        !waiting.is_finished(),
        "the standby wrote while the first held the lease"
    );
    first.stop().await;
    let reply = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the standby took over")
        .expect("task");
    assert!(matches!(reply, AppendReply::Appended { .. }), "{reply:?}");
    for v in 1..50 {
        append_ok(&second.ledger, vec![alert("second", v)]).await;
    }
    let js = nats.js().await;
    let verified = verify_stream(&js).await.expect("one unbroken chain");
    assert!(verified.events >= 270);
    let mut seen = HashSet::new();
    for (_, e) in all_events(&js).await {
        assert!(
            seen.insert((e.workflow_id.clone(), e.version)),
            "{} v{} written twice",
            e.workflow_id,
            e.version
        );
    }
}

/// A message that did not come through the ledger (written around it, e.g. by a
/// misconfigured account) breaks the chain: the ledger refuses to extend such a
/// trail, at start and while running, and writes nothing more (fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_refuses_to_extend_a_trail_it_cannot_verify() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    append_ok(&engine.ledger, vec![alert("before", 0)]).await;
    let js = nats.js().await;
    // Published through JetStream, acknowledged once stored: a plain publish
    // could still be on its way into the stream when `forged_at` is read.
    let forged = js
        .publish(
            "custos.evt.system.forged.ALERT_RAISED",
            "not from the ledger".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    let last = || async {
        js.get_stream(custos_schemas::subjects::EVENTS_STREAM)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .last_sequence
    };
    let forged_at = last().await;
    assert_eq!(forged_at, forged.sequence);

    // The running ledger's next append fails its sequence check, it replays, finds
    // the break, and stops.
    let reply = engine.ledger.append(vec![alert("after", 0)]).await;
    assert!(
        matches!(reply, AppendReply::Unavailable { .. }),
        "{reply:?}"
    );
    // A ledger started on the broken trail never takes an append either.
    let restarted = Engine::start(&nats).await;
    let reply = restarted
        .ledger
        .append(vec![alert("after-restart", 0)])
        .await;
    assert!(
        matches!(reply, AppendReply::Unavailable { .. }),
        "{reply:?}"
    );
    assert_eq!(
        last().await,
        forged_at,
        "nothing was appended after the break"
    );
    let broken = verify_stream(&js).await.expect_err("the chain is broken");
    assert_eq!(broken.seq, forged_at);
}
