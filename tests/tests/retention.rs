//! Retention by age: the trail's first events age out, the ledger writer resumes
//! from the first retained event (a signed checkpoint vouches for it), and the
//! trail still verifies.

use std::time::Duration;

use custos_adapters::jetstream::{StreamSettings, TrailStart, trail_start};
use custos_adapters::nats_server::Durability;
use custos_schemas::AppendReply;
use custos_tests::*;
use custos_workers::ledger::LedgerConfig;

fn config() -> LedgerConfig {
    LedgerConfig {
        checkpoint_every: 5,
        checkpoint_interval: Duration::from_millis(300),
        idle_checkpoint: Some(Duration::from_millis(500)),
        ..LedgerConfig::new(audit_key())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_resumes_after_events_age_out_and_the_trail_verifies() {
    let nats = Nats::start(Durability::Default).await;
    let settings = StreamSettings {
        replicas: 1,
        max_age: Some(Duration::from_secs(2)),
    };
    let engine = Engine::start_on(&nats, config(), settings).await;
    for i in 0..12 {
        append_ok(&engine.ledger, vec![alert(&format!("old-{i}"), 0)]).await;
    }
    let js = nats.js().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            matches!(trail_start(&js).await, Ok(TrailStart::AgedOut(_)))
        })
        .await,
        "the first events age out"
    );
    // The running writer keeps going, and the retained trail verifies.
    append_ok(&engine.ledger, vec![alert("while-running", 0)]).await;
    verify_stream(&js)
        .await
        .expect("the retained trail verifies");

    // A new writer replays from the first retained event.
    engine.stop().await;
    let engine = Engine::start_on(&nats, config(), settings).await;
    append_ok(&engine.ledger, vec![alert("after-restart", 0)]).await;
    let verified = verify_stream(&js)
        .await
        .expect("verifies after the restart");
    assert!(
        verified.checkpoints >= 1,
        "a signed checkpoint vouches for where the trail starts"
    );

    // Checkpoints go on after the restart (their aggregate's start aged out too).
    // Old checkpoints age out meanwhile: compare where the latest one sits.
    let checkpoints = || async {
        all_events(&js)
            .await
            .into_iter()
            .filter(|(_, e)| e.event_type == custos_schemas::EventType::AuditCheckpoint)
            .map(|(seq, _)| seq)
            .max()
            .unwrap_or(0)
    };
    let before = checkpoints().await;
    append_ok(&engine.ledger, vec![alert("later", 0)]).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            checkpoints().await > before
        })
        .await,
        "checkpoints continue"
    );
    let reply = engine.ledger.append(vec![alert("after-restart", 1)]).await;
    assert!(matches!(reply, AppendReply::Appended { .. }), "{reply:?}");
    verify_stream(&js).await.expect("still verifies");
}
