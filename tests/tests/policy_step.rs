//! The policy step on a real nats-server: each created transfer gets a recorded
//! decision under the default policy, and the workflow moves accordingly.

use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::policy::PolicyOutcome;
use custos_schemas::{
    Actor, AggregateKind, Event, EventType, IntakeReply, Outcome, Payload, Proposal,
    RequestContext, Target, UserRecord,
};
use custos_tests::*;
use custos_workers::Shutdown;
use custos_workers::policy_step::{PolicyStep, PriceTable};
use serde_json::json;

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

async fn history(nats: &Nats, workflow_id: &str) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.workflow_id == workflow_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_are_allowed_sent_for_approval_or_blocked_by_the_default_policy() {
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
    append_ok(
        &engine.ledger,
        vec![wallet_created(
            "eth-ops",
            "evm-31337",
            "0x1111111111111111111111111111111111111111",
        )],
    )
    .await;
    append_ok(
        &engine.ledger,
        vec![
            user("erp", &["initiator"], &[]),
            user("tm1", &["approver"], &["treasury-managers"]),
        ],
    )
    .await;
    let mut prices = PriceTable::default();
    prices
        .quotes
        .entry("LTC".into())
        .or_default()
        .insert("EUR".into(), "80".into());
    let default = policy::default_policy().expect("default policy");
    let version = default.version().to_string();
    let step = PolicyStep::new(nats.js().await, default, prices)
        .await
        .expect("policy step");
    let (trigger, shutdown) = Shutdown::new();
    let worker = tokio::spawn(custos_workers::runtime::run(
        nats.js().await,
        engine.ledger.clone(),
        step,
        shutdown,
    ));

    let to = taproot_address("rltc", [9; 32]);
    let submit = |id: &str,
                  wallet: &str,
                  asset: &str,
                  dest: &str,
                  amount: &str,
                  initiator: &str| {
        json!({"requestId": id, "wallet": wallet, "asset": asset, "destination": dest, "amount": amount, "initiator": initiator})
    };
    let mut ids = Vec::new();
    for body in [
        submit("small", "treasury", "LTC", &to, "1", "erp"),
        submit("large", "treasury", "LTC", &to, "200", "erp"),
        submit("stranger", "treasury", "LTC", &to, "1", "ghost"),
        submit(
            "unpriced",
            "eth-ops",
            "ETH",
            "0x2222222222222222222222222222222222222222",
            "1",
            "erp",
        ),
    ] {
        match submit_json(&engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => ids.push(workflow_id),
            other => panic!("{other:?}"),
        }
    }
    for id in &ids {
        assert!(
            eventually(Duration::from_secs(20), || async {
                history(&nats, id).await.len() == 2
            })
            .await,
            "{id} was evaluated"
        );
    }
    let decided = |events: &[Event]| match &events[1].payload {
        Payload::PolicyEvaluated(d) => d.clone(),
        other => panic!("{other:?}"),
    };
    let stage = |events: &[Event]| transfer::fold(events).expect("replays").0.stage;

    let small = history(&nats, &ids[0]).await;
    let d = decided(&small);
    assert_eq!(
        (d.outcome, d.policy_version.as_str(), stage(&small)),
        (PolicyOutcome::Allow, version.as_str(), Stage::ReadyToSign)
    );
    assert_eq!(d.fiat_value.map(|f| f.amount), Some("80.00".to_string()));

    let large = history(&nats, &ids[1]).await;
    let d = decided(&large);
    assert_eq!(
        (d.outcome, stage(&large)),
        (PolicyOutcome::RequireApprovals, Stage::AwaitingApprovals)
    );
    assert_eq!(d.approvals[0].groups[0].group, "treasury-managers");
    assert_eq!(d.approvals[0].groups[0].count, 4);

    for (id, why) in [(&ids[2], "ghost"), (&ids[3], "price")] {
        let events = history(&nats, id).await;
        let d = decided(&events);
        assert_eq!(
            (d.outcome, stage(&events)),
            (PolicyOutcome::Block, Stage::Rejected),
            "{id}"
        );
        assert!(d.explanation.contains(why), "{id}: {}", d.explanation);
    }
    trigger.trigger();
    let _ = worker.await;
    verify_stream(&nats.js().await)
        .await
        .expect("the trail verifies");
}

/// Prices from an HTTP feed: the step decides with the feed's latest reading,
/// follows its changes, and a reading older than the policy's maximum price age
/// counts as missing (the transfer is blocked, fail closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_price_feed_is_followed_and_a_stale_reading_fails_closed() {
    use custos_workers::policy_step::{Prices, follow_price_feed};
    use std::sync::{Arc, Mutex};
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    append_ok(
        &engine.ledger,
        vec![
            wallet_created("treasury", "ltc-regtest", &taproot_address("rltc", [1; 32])),
            user("erp", &["initiator"], &[]),
        ],
    )
    .await;
    let served = Arc::new(Mutex::new(r#"{"LTC": {"EUR": "80"}}"#.to_string()));
    let body = served.clone();
    let app = axum::Router::new().route(
        "/prices",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body.lock().map(|b| b.clone()).unwrap_or_default() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/prices", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let reading = Arc::new(Mutex::new(None));
    let (feed_trigger, feed_shutdown) = Shutdown::new();
    let feed = tokio::spawn(follow_price_feed(
        url,
        Duration::from_millis(100),
        reading.clone(),
        feed_shutdown,
    ));
    let price_of = |reading: &Arc<Mutex<Option<(i64, PriceTable)>>>| {
        reading.lock().ok().and_then(|r| {
            r.as_ref()
                .and_then(|(_, t)| t.quotes.get("LTC").and_then(|q| q.get("EUR")).cloned())
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            price_of(&reading).as_deref() == Some("80")
        })
        .await,
        "the feed is read"
    );
    let step = PolicyStep::with_prices(
        nats.js().await,
        policy::default_policy().expect("default policy"),
        Prices::Feed(reading.clone()),
    )
    .await
    .expect("policy step");
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(custos_workers::runtime::run(
        nats.js().await,
        engine.ledger.clone(),
        step,
        shutdown,
    ));
    let to = taproot_address("rltc", [9; 32]);
    let decide = |id: &'static str| {
        let (nats, client, to) = (&nats, &engine.client, to.clone());
        async move {
            let body = json!({"requestId": id, "wallet": "treasury", "asset": "LTC",
                "destination": to, "amount": "1", "initiator": "erp"});
            let wf = match submit_json(client, &body).await {
                IntakeReply::Accepted { workflow_id, .. } => workflow_id,
                other => panic!("{other:?}"),
            };
            assert!(
                eventually(Duration::from_secs(20), || async {
                    history(nats, &wf).await.len() == 2
                })
                .await,
                "{id} decided"
            );
            match &history(nats, &wf).await[1].payload {
                Payload::PolicyEvaluated(d) => d.clone(),
                other => panic!("{other:?}"),
            }
        }
    };
    let d = decide("feed-80").await;
    assert_eq!(d.outcome, PolicyOutcome::Allow, "{}", d.explanation);
    assert_eq!(d.fiat_value.map(|f| f.amount), Some("80.00".to_string()));

    *served.lock().expect("served") = r#"{"LTC": {"EUR": "2000"}}"#.into();
    assert!(
        eventually(Duration::from_secs(10), || async {
            price_of(&reading).as_deref() == Some("2000")
        })
        .await,
        "the feed's change is read"
    );
    let d = decide("feed-2000").await;
    assert_eq!(
        d.outcome,
        PolicyOutcome::RequireApprovals,
        "{}",
        d.explanation
    );

    // The feed stops; its last reading ages past the policy's 5 minutes.
    feed_trigger.trigger();
    feed.await.expect("the feed stops");
    if let Ok(mut r) = reading.lock()
        && let Some((at, _)) = r.as_mut()
    {
        *at -= 10 * 60 * 1000;
    }
    let d = decide("feed-stale").await;
    assert_eq!(d.outcome, PolicyOutcome::Block, "{}", d.explanation);
    assert!(d.explanation.contains("price"), "{}", d.explanation);
    trigger.trigger();
}
