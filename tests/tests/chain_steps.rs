//! The chain steps against a real litecoind, a real ledger and nats-server.
//!
//! - broadcast: the signed transaction is sent (idempotently) and
//!   `TRANSACTION_BROADCAST` proposed; a node that is down is retried and raises
//!   one alert after the threshold; a transaction the node rejects fails for good;
//! - build: concurrent builds of one wallet choose disjoint coins, coins spent in
//!   the mempool are skipped, insufficient funds fail with the reason, a node
//!   that is down is transient, a workflow not ready to build is left alone;
//! - the whole path with guardian processes: built, signed, broadcast, and
//!   confirmed only at the required depth, also across a reorg.

mod chain_support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chain_support::{CHAIN, Wallet, build, sign_as_guardians};
use custos_adapters::jetstream::workflow_consumer;
use custos_adapters::nats_server::Durability;
use custos_custody::spend::script_pubkey_for_address;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::chain::{SignedTransaction, UnsignedTransaction};
use custos_schemas::change::Change;
use custos_schemas::{
    Actor, AggregateKind, Event, EventType, IntakeReply, Outcome, Payload, Proposal, Target,
    subjects,
};
use custos_tests::ceremonies::approved_ceremony;
use custos_tests::litecoind::Litecoind;
use custos_tests::workflows::policy_and_initiator;
use custos_tests::{
    Engine, Nats, all_events, append_ok, eventually, record, submit_json, wallet_created,
};
use custos_workers::chain_steps::{
    BroadcastStep, BuildStep, ChainNodes, ConfirmWatcher, Confirmations,
};
use custos_workers::guardian::GuardianConfig;
use custos_workers::runtime::{Step, StepError};
use custos_workers::signing::SignStep;
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use serde_json::json;
use zeroize::Zeroizing;

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

async fn history(nats: &Nats, workflow_id: &str) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == workflow_id)
        .collect()
}

async fn state(nats: &Nats, workflow_id: &str) -> Transfer {
    transfer::fold(&history(nats, workflow_id).await)
        .map(|(t, _)| t)
        .unwrap_or_default()
}

/// The outpoints a built transfer spends.
fn inputs(t: &Transfer) -> BTreeSet<(String, u32)> {
    let Some(UnsignedTransaction::Bitcoin { spent, .. }) = &t.unsigned else {
        panic!("not built: {t:?}")
    };
    spent.iter().map(|s| (s.txid.clone(), s.vout)).collect()
}

/// Submits a transfer through intake and waits until the policy decided it.
async fn submit(
    engine: &Engine,
    nats: &Nats,
    request_id: &str,
    destination: &str,
    amount: &str,
) -> String {
    let body = json!({"requestId": request_id, "wallet": "vault", "asset": "LTC",
        "destination": destination, "amount": amount, "initiator": "erp"});
    let id = match submit_json(&engine.client, &body).await {
        IntakeReply::Accepted { workflow_id, .. } => workflow_id,
        other => panic!("{other:?}"),
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            state(nats, &id).await.decision.is_some()
        })
        .await,
        "{id} decided by the policy step"
    );
    id
}

/// The event the build consumer would deliver: the workflow's latest.
/// An HTTP relay to the JSON-RPC server at `node_url`: its URL, and how many
/// calls of `method` went through it.
async fn counting_relay(node_url: String, method: &'static str) -> (String, Arc<AtomicUsize>) {
    let asked = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::new();
    let counter = asked.clone();
    let relay = move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
        let (http, node_url, counter) = (http.clone(), node_url.clone(), counter.clone());
        async move {
            let call: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if call["method"] == method {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let mut forward = http.post(&node_url).body(body);
            if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
                forward = forward.header(axum::http::header::AUTHORIZATION, auth);
            }
            match forward.send().await {
                Ok(answer) => {
                    let status = answer.status().as_u16();
                    let body = answer.bytes().await.unwrap_or_default();
                    (
                        axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                        body,
                    )
                }
                Err(_) => (axum::http::StatusCode::BAD_GATEWAY, bytes::Bytes::new()),
            }
        }
    };
    let app = axum::Router::new().route("/", axum::routing::post(relay));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listener");
    let url = format!("http://{}", listener.local_addr().expect("relay address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, asked)
}

async fn latest(nats: &Nats, workflow_id: &str) -> Event {
    history(nats, workflow_id).await.pop().expect("an event")
}

fn failure_reason(proposals: &[Proposal]) -> String {
    match proposals {
        [
            Proposal {
                event_type: EventType::TransactionFailed,
                payload: Payload::StepFailed { step, reason },
                ..
            },
        ] if step == "build" => reason.clone(),
        other => panic!("expected one build failure: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn build_step_spends_each_coin_once() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let mut node = Litecoind::start().await;
    let (_stop, shutdown) = Shutdown::new();
    let w = Wallet::new("build-step");
    let mut created = wallet_created("vault", CHAIN, &w.taproot.address);
    if let Payload::WalletCreated(d) = &mut created.payload {
        d.threshold = Some(2);
        d.group_key = Some(hex::encode(
            w.public().verifying_key().serialize().expect("key"),
        ));
    }
    append_ok(&engine.ledger, vec![created]).await;
    policy_and_initiator(
        &nats,
        &engine,
        policy::default_policy().expect("default policy"),
        shutdown.clone(),
    )
    .await;
    let coin_a = node.fund(&w.taproot.address, 1.0).await;
    let coin_b = node.fund(&w.taproot.address, 0.7).await;
    let coin_c = node.fund(&w.taproot.address, 0.2).await;
    node.mine(1).await;
    let destination = node
        .rpc
        .get_new_address(Some("bech32"))
        .await
        .expect("address");
    let dest_script = script_pubkey_for_address(CHAIN, &destination).expect("script");

    let trail = Trail::follow(nats.js().await, shutdown.clone())
        .await
        .expect("trail");
    let step = BuildStep::new(
        trail,
        ChainNodes::new([(CHAIN.to_string(), node.rpc.clone())]),
        engine.ledger.clone(),
    )
    .expect("build step");
    assert_eq!(
        step.consumer().filters,
        workflow_consumer("build").expect("build").filters
    );

    // Waiting for approvals: acknowledged, nothing proposed or appended.
    let big = submit(&engine, &nats, "big", &destination, "20").await;
    assert_eq!(state(&nats, &big).await.stage, Stage::AwaitingApprovals);
    let before = history(&nats, &big).await.len();
    let proposals = step
        .handle(&latest(&nats, &big).await)
        .await
        .expect("handled");
    assert!(proposals.is_empty(), "{proposals:?}");
    assert_eq!(history(&nats, &big).await.len(), before);

    // Two builds of one wallet at once: each picks the largest free coin, so
    // without the wallet lock and the reservations both would take coin A.
    let t1 = submit(&engine, &nats, "pay-1", &destination, "0.6").await;
    let t2 = submit(&engine, &nats, "pay-2", &destination, "0.5").await;
    let (e1, e2) = (latest(&nats, &t1).await, latest(&nats, &t2).await);
    let (r1, r2) = tokio::join!(step.handle(&e1), step.handle(&e2));
    assert!(r1.expect("t1 built").is_empty());
    assert!(r2.expect("t2 built").is_empty());
    let (s1, s2) = (state(&nats, &t1).await, state(&nats, &t2).await);
    assert_eq!((s1.stage, s2.stage), (Stage::Built, Stage::Built));
    let (i1, i2) = (inputs(&s1), inputs(&s2));
    assert!(i1.is_disjoint(&i2), "{i1:?} {i2:?}");
    let firsts: BTreeSet<String> = i1.iter().chain(&i2).map(|(t, _)| t.clone()).collect();
    assert_eq!(firsts, BTreeSet::from([coin_a.clone(), coin_b.clone()]));
    // The recorded transaction is what guardians sign.
    let Some(unsigned1) = s1.unsigned.clone() else {
        panic!("t1 built")
    };
    let (_, signed1) = sign_as_guardians(&w, &unsigned1, &dest_script, 60_000_000);

    // A redelivery of a built workflow's event changes nothing.
    assert!(step.handle(&e1).await.expect("handled").is_empty());
    assert_eq!(history(&nats, &t1).await.len(), e1.version as usize + 1);

    // Only coin C is free: insufficient funds, with what is needed and held.
    let t3 = submit(&engine, &nats, "pay-3", &destination, "0.5").await;
    let e3 = latest(&nats, &t3).await;
    let proposals = step.handle(&e3).await.expect("handled");
    let reason = failure_reason(&proposals);
    assert!(
        reason.contains("insufficient funds")
            && reason.contains("20000000 sat available")
            && reason.contains("another 170000000 sat"),
        "{reason}"
    );
    assert_eq!(proposals[0].expected_version, e3.version);
    append_ok(&engine.ledger, proposals).await;
    let s3 = state(&nats, &t3).await;
    assert_eq!(s3.stage, Stage::Failed);
    assert!(
        s3.reason
            .as_deref()
            .is_some_and(|r| r.contains("insufficient funds")),
        "{:?}",
        s3.reason
    );

    // The node down: retried later, nothing recorded; back up: built from C.
    let t4 = submit(&engine, &nats, "pay-4", &destination, "0.1").await;
    let e4 = latest(&nats, &t4).await;
    node.stop().await;
    assert!(
        matches!(step.handle(&e4).await, Err(StepError::Transient(_))),
        "a node that is down is transient"
    );
    assert_eq!(state(&nats, &t4).await.stage, Stage::ReadyToSign);
    node.restart().await;
    assert!(step.handle(&e4).await.expect("t4 built").is_empty());
    let s4 = state(&nats, &t4).await;
    assert_eq!(s4.stage, Stage::Built);
    assert!(inputs(&s4).iter().all(|(t, _)| *t == coin_c), "{s4:?}");

    // t1's transaction goes out, then t1 is abandoned in the trail: its coin is
    // no longer reserved, but the mempool has it spent.
    let sent = node
        .rpc
        .send_raw_transaction(&signed1.raw_tx)
        .await
        .expect("broadcast");
    let mut abandon = record(
        AggregateKind::Tx,
        &t1,
        EventType::TransactionFailed,
        Payload::StepFailed {
            step: "operator".into(),
            reason: "abandoned".into(),
        },
    );
    abandon.expected_version = s1.version;
    abandon.result = Outcome::Failure;
    append_ok(&engine.ledger, vec![abandon]).await;
    let t5 = submit(&engine, &nats, "pay-5", &destination, "0.05").await;
    let e5 = latest(&nats, &t5).await;
    let reason = failure_reason(&step.handle(&e5).await.expect("handled"));
    assert!(reason.contains("0 sat available"), "{reason}");
    // Once mined, t1's change is a confirmed coin of the wallet.
    node.mine(1).await;
    assert!(step.handle(&e5).await.expect("t5 built").is_empty());
    let s5 = state(&nats, &t5).await;
    assert_eq!(s5.stage, Stage::Built);
    let Some(UnsignedTransaction::Bitcoin { change_vout, .. }) = &s1.unsigned else {
        panic!("t1 built")
    };
    let change = (sent, change_vout.expect("t1 has change"));
    assert_eq!(inputs(&s5), BTreeSet::from([change]));
    engine.stop().await;
}

struct Guardian {
    _trigger: ShutdownTrigger,
    _dir: tempfile::TempDir,
}

fn start_guardian(client: async_nats::Client, id: &str) -> Guardian {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = GuardianConfig {
        id: id.into(),
        data_dir: PathBuf::from(dir.path()),
        passphrase: Zeroizing::new(format!("passphrase of {id}")),
    };
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(custos_workers::guardian::run(client, config, shutdown));
    Guardian {
        _trigger: trigger,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_is_built_signed_broadcast_and_confirmed() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let node = Litecoind::start().await;
    let client = nats.client().await;
    let js = nats.js().await;
    let _guardians: Vec<Guardian> = ["g1", "g2", "g3"]
        .iter()
        .map(|id| start_guardian(client.clone(), id))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
                return false;
            };
            let mut n = 0;
            for id in ["g1", "g2", "g3"] {
                n += usize::from(matches!(kv.get(id).await, Ok(Some(_))));
            }
            n == 3
        })
        .await,
        "guardians announce themselves"
    );
    let wallet = approved_ceremony(
        &nats,
        &engine,
        Change::WalletCreate {
            name: "vault".into(),
            model: "frost".into(),
            chain: CHAIN.into(),
            threshold: 2,
            guardians: vec!["g1".into(), "g2".into(), "g3".into()],
        },
    )
    .await
    .expect("wallet created");
    let (_stop, shutdown) = Shutdown::new();
    policy_and_initiator(
        &nats,
        &engine,
        policy::default_policy().expect("default policy"),
        shutdown.clone(),
    )
    .await;
    node.fund(&wallet.address, 1.0).await;
    node.mine(1).await;

    let nodes = ChainNodes::new([(CHAIN.to_string(), node.rpc.clone())]);
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .expect("trail");
    let build =
        BuildStep::new(trail.clone(), nodes.clone(), engine.ledger.clone()).expect("build step");
    let sign = SignStep::new(client.clone(), trail.clone()).expect("sign step");
    let broadcast =
        BroadcastStep::new(nodes.clone(), engine.ledger.clone(), 3).expect("broadcast step");
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        engine.ledger.clone(),
        build,
        shutdown.clone(),
    ));
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        engine.ledger.clone(),
        sign,
        shutdown.clone(),
    ));
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        engine.ledger.clone(),
        broadcast,
        shutdown.clone(),
    ));

    let destination = node
        .rpc
        .get_new_address(Some("bech32"))
        .await
        .expect("address");
    let id = submit(&engine, &nats, "pay-1", &destination, "0.3").await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            state(&nats, &id).await.stage == Stage::Broadcast
        })
        .await,
        "{id} broadcast, is {:?}",
        state(&nats, &id).await
    );
    let txid = state(&nats, &id).await.txid.expect("txid");
    assert_eq!(
        node.rpc
            .get_raw_transaction(&txid)
            .await
            .expect("rpc")
            .expect("in the mempool")
            .confirmations,
        0
    );

    // Two blocks deep on this chain: not in the mempool, not at one block, not
    // after a reorg takes that block away. The watcher reaches the node
    // through a relay that counts what it is asked.
    let depth = Confirmations::new([(CHAIN.to_string(), 2)]);
    let (relay, asked) = counting_relay(node.rpc.url().to_string(), "getrawtransaction").await;
    let watched = ChainNodes::new([(
        CHAIN.to_string(),
        node.client_via(&relay).expect("relay client"),
    )]);
    let watcher = ConfirmWatcher::new(trail, watched, engine.ledger.clone(), depth);
    assert!(watcher.poll().await.is_empty());
    // Nothing about it can change before the tip does: not asked again.
    assert!(watcher.poll().await.is_empty());
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let first = node.mine(1).await;
    assert!(watcher.poll().await.is_empty());
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "asked again at the new tip"
    );
    node.rpc
        .invalidate_block(&first[0])
        .await
        .expect("invalidateblock");
    let back = node.rpc.get_raw_transaction(&txid).await.expect("rpc");
    assert_eq!(
        back.map(|t| t.confirmations),
        Some(0),
        "back in the mempool"
    );
    assert!(watcher.poll().await.is_empty());
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "asked again after the reorg"
    );
    assert_eq!(state(&nats, &id).await.stage, Stage::Broadcast);

    // Mined again on the new branch and buried two deep: the running watcher
    // records it, with the block that now holds it.
    // (To another address: the same template would remake the invalid block.)
    let elsewhere = node
        .rpc
        .get_new_address(Some("bech32"))
        .await
        .expect("address");
    let mined = node
        .rpc
        .generate_to_address(2, &elsewhere)
        .await
        .expect("mine");
    tokio::spawn(watcher.run(Duration::from_millis(100), shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(20), || async {
            state(&nats, &id).await.stage == Stage::Confirmed
        })
        .await,
        "{id} confirmed"
    );
    let confirmation = state(&nats, &id).await.confirmation.expect("confirmation");
    assert_eq!(confirmation.txid, txid);
    assert_eq!(confirmation.block_hash, mined[0]);
    assert_ne!(confirmation.block_hash, first[0]);
    assert_eq!(confirmation.confirmations, 2);
    let height = node
        .rpc
        .get_block_header(&mined[0])
        .await
        .expect("header")
        .height;
    assert_eq!(confirmation.block_height, height);
    engine.stop().await;
}
