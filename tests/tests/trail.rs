//! A trail replica's reads against a real nats-server: a read waits until the
//! replica holds every event stored before the call.

use custos_adapters::nats_server::Durability;
use custos_tests::*;
use custos_workers::Shutdown;
use custos_workers::trail::Trail;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sees_every_event_stored_before_it() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let js = nats.js().await;
    let (_stop, shutdown) = Shutdown::new();
    let trail = Trail::follow(js.clone(), shutdown).await.expect("trail");
    // A stream without events has nothing to wait for.
    let stored = js
        .get_stream(custos_schemas::subjects::EVENTS_STREAM)
        .await
        .expect("stream")
        .cached_info()
        .state
        .messages;
    assert_eq!(stored, 0);
    let seen = trail.read(|view| view.ledger.last_seq()).await;
    assert_eq!(seen, Ok(0));

    for round in 0..3 {
        // A thousand events, in appends of at most 256.
        let appends = (0..4).map(|a| {
            append_ok(
                &engine.ledger,
                (0..250)
                    .map(|i| alert(&format!("r{round}-{a}-{i}"), 0))
                    .collect(),
            )
        });
        let appended = futures::future::join_all(appends).await;
        let last = appended.iter().flatten().max().copied().expect("appended");
        // Read at once: the replica has not been delivered a thousand events
        // yet, and the read waits for them.
        let seen = trail
            .read(|view| view.ledger.last_seq())
            .await
            .expect("read");
        assert!(seen >= last, "read at seq {seen}, {last} was stored before");
    }
}
