//! Request intake against a real nats-server: what upstream systems see.

use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_schemas::{ContentType, EventType, IntakeReply, Payload, subjects};
use custos_tests::*;
use serde_json::json;

const WALLET: &str = "treasury";

async fn setup() -> (Nats, Engine, String) {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let own = taproot_address("rltc", [1; 32]);
    append_ok(
        &engine.ledger,
        vec![wallet_created(WALLET, "ltc-regtest", &own)],
    )
    .await;
    (nats, engine, own)
}

fn request(id: &str, amount: &str, to: &str) -> serde_json::Value {
    json!({"requestId": id, "wallet": WALLET, "asset": "LTC", "destination": to, "amount": amount, "initiator": "erp"})
}

fn rejected(reply: IntakeReply) -> (Option<String>, String) {
    match reply {
        IntakeReply::Rejected(e) => (e.field, e.reason),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_request_creates_a_workflow_waiting_at_the_policy_step() {
    let (nats, engine, _) = setup().await;
    let to = taproot_address("rltc", [9; 32]);
    let IntakeReply::Accepted {
        workflow_id,
        duplicate,
    } = submit_json(&engine.client, &request("r-1", "1.25", &to)).await
    else {
        panic!("not accepted");
    };
    assert!(!duplicate);
    let js = nats.js().await;
    let events = all_events(&js).await;
    let (_, created) = events
        .iter()
        .find(|(_, e)| e.workflow_id == workflow_id)
        .expect("created event");
    assert_eq!(created.event_type, EventType::TransactionCreated);
    let Payload::TransferRequested {
        request,
        request_hash,
    } = &created.payload
    else {
        panic!("payload")
    };
    assert_eq!(
        (request.amount.as_str(), request.destination.as_str()),
        ("1.25", to.as_str())
    );
    assert_eq!(request_hash.len(), 64);
    // Nothing fakes the later steps: the workflow's only event is its creation, and
    // the policy step's consumer holds it.
    assert_eq!(
        events
            .iter()
            .filter(|(_, e)| e.workflow_id == workflow_id)
            .count(),
        1
    );
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("stream");
    let policy = stream
        .consumer_info("policy")
        .await
        .expect("policy consumer");
    assert_eq!(policy.num_pending, 1);
    assert!(verify_stream(&js).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_request_id_returns_the_same_workflow_also_after_a_restart() {
    let (nats, engine, _) = setup().await;
    let to = taproot_address("rltc", [9; 32]);
    let first = submit_json(&engine.client, &request("r-idem", "2", &to)).await;
    let IntakeReply::Accepted {
        workflow_id,
        duplicate: false,
    } = first
    else {
        panic!("{first:?}")
    };
    let again = submit_json(&engine.client, &request("r-idem", "2", &to)).await;
    assert_eq!(
        again,
        IntakeReply::Accepted {
            workflow_id: workflow_id.clone(),
            duplicate: true
        }
    );
    // The same id with different content is refused, naming the field.
    let (field, reason) = rejected(submit_json(&engine.client, &request("r-idem", "3", &to)).await);
    assert_eq!(field.as_deref(), Some("requestId"), "{reason}");

    engine.stop().await;
    nats_restart_keeps(&nats, &workflow_id, &to).await;
}

async fn nats_restart_keeps(nats: &Nats, workflow_id: &str, to: &str) {
    let engine = Engine::start(nats).await;
    let after = submit_json(&engine.client, &request("r-idem", "2", to)).await;
    assert_eq!(
        after,
        IntakeReply::Accepted {
            workflow_id: workflow_id.to_string(),
            duplicate: true
        }
    );
    let created = all_events(&nats.js().await)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::TransactionCreated)
        .count();
    assert_eq!(created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_error_naming_the_field_and_an_audit_event() {
    let (nats, engine, own) = setup().await;
    let to = taproot_address("rltc", [9; 32]);
    let mainnet = taproot_address("ltc", [9; 32]);
    let mut bad_checksum = to.clone();
    let last = bad_checksum.pop().expect("char");
    bad_checksum.push(if last == 'q' { 'p' } else { 'q' });
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("negative", request("b1", "-5", &to), "amount"),
        ("zero", request("b2", "0", &to), "amount"),
        ("absurd", request("b3", "1000000000000000", &to), "amount"),
        ("exponent", request("b4", "1e9", &to), "amount"),
        (
            "too precise for LTC",
            request("b5", "0.000000001", &to),
            "amount",
        ),
        (
            "number instead of string",
            json!({"requestId": "b6", "wallet": WALLET, "asset": "LTC", "destination": to, "amount": 5, "initiator": "erp"}),
            "amount",
        ),
        (
            "unknown field",
            json!({"requestId": "b7", "wallet": WALLET, "asset": "LTC", "destination": to, "amount": "1", "initiator": "erp", "fee": "9"}),
            "fee",
        ),
        (
            "missing field",
            json!({"requestId": "b8", "wallet": WALLET, "asset": "LTC", "amount": "1", "initiator": "erp"}),
            "destination",
        ),
        (
            "unknown wallet",
            json!({"requestId": "b9", "wallet": "nope", "asset": "LTC", "destination": to, "amount": "1", "initiator": "erp"}),
            "wallet",
        ),
        (
            "wrong asset",
            json!({"requestId": "b10", "wallet": WALLET, "asset": "ETH", "destination": to, "amount": "1", "initiator": "erp"}),
            "asset",
        ),
        (
            "wrong network",
            request("b11", "1", &mainnet),
            "destination",
        ),
        (
            "bad checksum",
            request("b12", "1", &bad_checksum),
            "destination",
        ),
        (
            "not an address",
            request("b13", "1", "hello"),
            "destination",
        ),
        ("own address", request("b14", "1", &own), "destination"),
        (
            "bad request id",
            request("has space", "1", &to),
            "requestId",
        ),
    ];
    for (name, body, field) in &cases {
        let (got, reason) = rejected(submit_json(&engine.client, body).await);
        assert_eq!(got.as_deref(), Some(*field), "{name}: {reason}");
    }
    // Garbage and unsupported encodings: an error, never a crash.
    let (_, reason) = rejected(
        submit_raw(
            &engine.client,
            Some(ContentType::JSON),
            b"\x00\xff{not json".to_vec(),
        )
        .await,
    );
    assert!(!reason.is_empty());
    let (_, reason) = rejected(submit_raw(&engine.client, None, b"\xc1\xc1\xc1".to_vec()).await);
    assert!(!reason.is_empty());
    let (_, reason) =
        rejected(submit_raw(&engine.client, Some("text/plain"), b"hi".to_vec()).await);
    assert!(reason.contains("Content-Type"), "{reason}");
    let (_, reason) = rejected(
        submit_raw(
            &engine.client,
            Some(ContentType::JSON),
            vec![b' '; 64 * 1024],
        )
        .await,
    );
    assert!(reason.contains("bytes"), "{reason}");

    let js = nats.js().await;
    let rejections: Vec<_> = all_events(&js)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::RequestRejected)
        .collect();
    assert_eq!(rejections.len(), cases.len() + 4);
    let (_, negative) = rejections
        .iter()
        .find(|(_, e)| e.workflow_id == "b1")
        .expect("b1 rejection");
    let Payload::RequestRejected { field, .. } = &negative.payload else {
        panic!("payload")
    };
    assert_eq!(field.as_deref(), Some("amount"));

    // Intake still works, and the trail verifies.
    let ok = submit_raw(
        &engine.client,
        Some(ContentType::MSGPACK),
        ContentType::MsgPack.encode(
            &serde_json::from_value::<custos_schemas::TransferRequest>(request("good", "0.5", &to))
                .expect("request"),
        ),
    )
    .await;
    assert!(matches!(ok, IntakeReply::Accepted { .. }), "{ok:?}");
    assert!(verify_stream(&js).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_publishers_each_get_exactly_one_workflow() {
    let (nats, engine, _) = setup().await;
    let to = taproot_address("rltc", [9; 32]);
    let mut tasks = Vec::new();
    for p in 0..50 {
        let client = engine.client.clone();
        let to = to.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                // Every publisher sends each request twice, as a retrying upstream would.
                let id = format!("p{p}-{i}");
                for _ in 0..2 {
                    match submit_json(&client, &request(&id, "0.1", &to)).await {
                        IntakeReply::Accepted { workflow_id, .. } => ids.push(workflow_id),
                        other => panic!("{other:?}"),
                    }
                }
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.expect("publisher"));
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 500);
    let js = nats.js().await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            all_events(&js)
                .await
                .iter()
                .filter(|(_, e)| e.event_type == EventType::TransactionCreated)
                .count()
                == 500
        })
        .await
    );
    assert!(verify_stream(&js).await.is_ok());
}
