//! Fee bumps on real nodes. litecoind regtest with a FROST 2-of-3 wallet and
//! guardian processes: a transfer broadcast and left unmined is replaced by a
//! fee bump (same inputs, higher fee) that the guardians sign; the node
//! replaces it in its mempool, the replacement is mined and the transfer is
//! confirmed with the new txid, the trail recording both. Guardians refuse a
//! replacement that pays elsewhere or more. anvil with automine off: an HD
//! transfer stuck in the pool is replaced by the same nonce with higher fees,
//! signed by the HD signer, mined and confirmed.

use std::path::PathBuf;
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_custody::spend::{self, Expectation, FeePolicy};
use custos_custody::taproot::Transaction;
use custos_engine::change::Stage as ChangeStage;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::change::Change;
use custos_schemas::{
    AggregateKind, Event, EventType, IntakeReply, Outcome, Payload, WalletDescriptor,
};
use custos_tests::anvil::{Anvil, ETHER};
use custos_tests::frost::{ask_to_sign, frost_setup, history, record};
use custos_tests::litecoind::Litecoind;
use custos_tests::workflows::{change_service, policy_and_initiator};
use custos_tests::{Engine, Nats, append_ok, eventually, submit_json, verify_stream};
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::{Ballot, BallotBox, Receipt};
use custos_workers::chain_steps::{
    BroadcastStep, BuildStep, ChainNodes, ConfirmWatcher, Confirmations,
};
use custos_workers::evm_steps::EvmNodes;
use custos_workers::fee_bump::{BumpAfter, FeeBumper};
use custos_workers::hd_signer::{self, SignerConfig};
use custos_workers::remote::RemoteLedger;
use custos_workers::signing::{SignReply, SignStep, wallet_script};
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use serde_json::json;
use zeroize::Zeroizing;

async fn state(nats: &Nats, workflow_id: &str) -> Transfer {
    transfer::fold(&history(nats, workflow_id).await)
        .map(|(t, _)| t)
        .unwrap_or_default()
}

/// Waits until `workflow_id` satisfies `done`; panics with its state if not.
async fn until(
    nats: &Nats,
    workflow_id: &str,
    what: &str,
    done: impl Fn(&Transfer) -> bool,
) -> Transfer {
    let reached = eventually(Duration::from_secs(60), || async {
        done(&state(nats, workflow_id).await)
    })
    .await;
    let t = state(nats, workflow_id).await;
    assert!(reached, "{workflow_id}: {what}: {t:?}");
    t
}

fn is_broadcast(t: &Transfer) -> bool {
    t.stage == Stage::Broadcast
}

async fn submit(engine: &Engine, request_id: &str, body: serde_json::Value) -> String {
    let mut body = body;
    body["requestId"] = json!(request_id);
    match submit_json(&engine.client, &body).await {
        IntakeReply::Accepted { workflow_id, .. } => workflow_id,
        other => panic!("{other:?}"),
    }
}

/// Starts the build, signing and broadcast steps and the confirmation watcher
/// until `shutdown`; returns the trigger that stops the signing step alone.
async fn run_steps(
    nats: &Nats,
    engine: &Engine,
    nodes: &ChainNodes,
    shutdown: &Shutdown,
) -> ShutdownTrigger {
    let js = nats.js().await;
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .expect("trail");
    let ledger = engine.ledger.clone();
    let build = BuildStep::new(trail.clone(), nodes.clone(), ledger.clone()).expect("build");
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        build,
        shutdown.clone(),
    ));
    let broadcast = BroadcastStep::new(nodes.clone(), ledger.clone(), 3).expect("broadcast");
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        broadcast,
        shutdown.clone(),
    ));
    let watcher = ConfirmWatcher::new(
        trail.clone(),
        nodes.clone(),
        ledger,
        Confirmations::default(),
    );
    tokio::spawn(watcher.run(Duration::from_millis(100), shutdown.clone()));
    signing_step(nats, engine, &trail).await
}

async fn signing_step(nats: &Nats, engine: &Engine, trail: &Trail) -> ShutdownTrigger {
    let (stop, shutdown) = Shutdown::new();
    let sign = SignStep::new(nats.client().await, trail.clone()).expect("sign");
    tokio::spawn(custos_workers::runtime::run(
        nats.js().await,
        engine.ledger.clone(),
        sign,
        shutdown,
    ));
    stop
}

/// A bumper that finds every broadcast transaction stuck at once: the tests
/// decide when a transaction is stuck by not mining it.
async fn bumper(
    nats: &Nats,
    engine: &Engine,
    nodes: &ChainNodes,
    chain: &str,
    shutdown: &Shutdown,
) -> FeeBumper<custos_workers::ledger::LedgerHandle> {
    let trail = Trail::follow(nats.js().await, shutdown.clone())
        .await
        .expect("trail");
    FeeBumper::new(
        nats.client().await,
        trail,
        nodes.clone(),
        engine.ledger.clone(),
        BumpAfter::new([(chain.to_string(), Duration::ZERO)]),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn mempool(node: &Litecoind) -> Vec<String> {
    node.rpc
        .call("getrawmempool", json!([]))
        .await
        .expect("getrawmempool")
}

/// Records `unsigned` as a replacement of `t`'s broadcast transaction.
async fn record_replacement(
    engine: &Engine,
    workflow_id: &str,
    t: &Transfer,
    unsigned: UnsignedTransaction,
) {
    let mut p = record(
        AggregateKind::Tx,
        workflow_id,
        EventType::TransactionBuilt,
        Payload::TransactionReplacement {
            replaces: t.txid.clone().expect("broadcast"),
            unsigned,
        },
    );
    p.expected_version = t.version;
    append_ok(&engine.ledger, vec![p]).await;
}

/// Abandons a replacement (as a failed signing would).
async fn abandon(engine: &Engine, workflow_id: &str, version: u64) {
    let mut p = record(
        AggregateKind::Tx,
        workflow_id,
        EventType::TransactionFailed,
        Payload::StepFailed {
            step: "test".into(),
            reason: "refused by the guardians".into(),
        },
    );
    p.result = Outcome::Failure;
    p.expected_version = version;
    append_ok(&engine.ledger, vec![p]).await;
}

/// A guardian's answer when asked to sign `workflow_id`.
async fn guardian_answer(
    nats: &Nats,
    guardian: &str,
    workflow_id: &str,
    session: &str,
) -> SignReply {
    let client = nats.client().await;
    ask_to_sign(&client, guardian, "hot", workflow_id, session).await
}

/// `unsigned` with its outputs edited; the recorded fee follows.
fn edited(
    unsigned: &UnsignedTransaction,
    edit: impl FnOnce(&mut Transaction),
) -> UnsignedTransaction {
    let UnsignedTransaction::Bitcoin {
        chain,
        unsigned_tx,
        spent,
        fee_rate,
        change_vout,
        ..
    } = unsigned
    else {
        panic!("a Bitcoin-family transaction")
    };
    let mut tx = Transaction::parse(&hex::decode(unsigned_tx).expect("hex")).expect("parses");
    edit(&mut tx);
    let inputs: u64 = spent.iter().map(|s| s.value).sum();
    let outputs: u64 = tx.outputs.iter().map(|o| o.value).sum();
    UnsignedTransaction::Bitcoin {
        chain: chain.clone(),
        unsigned_tx: hex::encode(tx.serialize()),
        spent: spent.clone(),
        fee: inputs - outputs,
        fee_rate: *fee_rate,
        change_vout: *change_vout,
    }
}

fn expectation<'a>(
    wallet: &'a WalletDescriptor,
    script: &'a [u8],
    destination: &'a [u8],
    amount: u64,
) -> Expectation<'a> {
    Expectation {
        chain: &wallet.chain,
        wallet_script: script,
        destination,
        amount,
        fees: FeePolicy::for_chain(&wallet.chain).expect("fees"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_litecoin_transfer_is_replaced_by_a_fee_bump_and_confirmed() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let node = Litecoind::start().await;
    let frost = frost_setup(
        &nats,
        &engine,
        "hot",
        policy::default_policy().expect("policy"),
    )
    .await;
    // The change service decides the bump: a few satoshi more in fees are
    // allowed outright by the default policy.
    change_service(
        &nats,
        &engine,
        policy::default_policy().expect("policy"),
        frost.shutdown.clone(),
    )
    .await;
    let wallet = frost.wallet.clone();
    node.fund(&wallet.address, 10.0).await;
    node.mine(1).await;
    let nodes = ChainNodes::new([("ltc-regtest".to_string(), node.rpc.clone())]);
    let signing = run_steps(&nats, &engine, &nodes, &frost.shutdown).await;
    let bump = bumper(&nats, &engine, &nodes, "ltc-regtest", &frost.shutdown).await;

    // EUR 80: allowed outright; broadcast and left unmined.
    let to = custos_tests::taproot_address("rltc", [0x77; 32]);
    let id = submit(
        &engine,
        "stuck-1",
        json!({"wallet": "hot", "asset": "LTC", "destination": to, "amount": "1", "initiator": "erp"}),
    )
    .await;
    let first = until(&nats, &id, "broadcast", is_broadcast).await;
    let first_txid = first.txid.clone().expect("txid");
    assert_eq!(mempool(&node).await, vec![first_txid.clone()]);
    let (first_fee, first_rate) = match &first.unsigned {
        Some(UnsignedTransaction::Bitcoin { fee, fee_rate, .. }) => (*fee, *fee_rate),
        other => panic!("{other:?}"),
    };

    // Guardians refuse replacements that are not fee bumps: with the signing
    // step stopped, each is put to a guardian directly, then abandoned.
    drop(signing);
    let script = wallet_script(&wallet).expect("script");
    let dest = spend::script_pubkey_for_address(&wallet.chain, &to).expect("destination");
    let honest = spend::build_replacement(
        first.unsigned.as_ref().expect("unsigned"),
        first_rate + 5,
        &expectation(&wallet, &script, &dest, 100_000_000),
    )
    .expect("a fee bump");
    let elsewhere = custos_tests::taproot_address("rltc", [0x66; 32]);
    let elsewhere = spend::script_pubkey_for_address(&wallet.chain, &elsewhere).expect("address");
    let dishonest = [
        (
            "pays elsewhere",
            edited(&honest, |tx| {
                tx.outputs[1].script_pubkey = elsewhere.clone()
            }),
            "neither the destination nor the wallet",
        ),
        (
            "pays more",
            edited(&honest, |tx| {
                tx.outputs[0].value += 50_000;
                tx.outputs[1].value -= 50_000;
            }),
            "the approved amount is 100000000",
        ),
    ];
    for (n, (what, unsigned, why)) in dishonest.into_iter().enumerate() {
        let t = state(&nats, &id).await;
        record_replacement(&engine, &id, &t, unsigned).await;
        for g in ["g1", "g2"] {
            match guardian_answer(&nats, g, &id, &format!("dishonest-{n}-{g}")).await {
                SignReply::Refused { reason } => {
                    assert!(
                        reason.contains("not a fee bump") && reason.contains(why),
                        "{what}: {reason}"
                    )
                }
                other => panic!("{g} took part in a replacement that {what}: {other:?}"),
            }
        }
        abandon(&engine, &id, t.version + 1).await;
        let back = state(&nats, &id).await;
        assert_eq!(
            (back.stage, back.txid.as_deref()),
            (Stage::Broadcast, Some(first_txid.as_str()))
        );
    }

    // The bump: signed by the guardians, broadcast, replacing the first in the
    // node's mempool.
    let trail = Trail::follow(nats.js().await, frost.shutdown.clone())
        .await
        .expect("trail");
    let _signing = signing_step(&nats, &engine, &trail).await;
    assert_eq!(bump.poll(now_ms()).await, vec![id.clone()]);
    let bumped = until(&nats, &id, "the replacement broadcast", |t| {
        is_broadcast(t) && t.txid.as_deref() != Some(first_txid.as_str())
    })
    .await;
    let new_txid = bumped.txid.clone().expect("txid");
    assert_eq!(
        mempool(&node).await,
        vec![new_txid.clone()],
        "the node replaced the first"
    );
    let (new_fee, new_rate) = match &bumped.unsigned {
        Some(UnsignedTransaction::Bitcoin { fee, fee_rate, .. }) => (*fee, *fee_rate),
        other => panic!("{other:?}"),
    };
    assert!(
        new_fee > first_fee && new_rate > first_rate,
        "{new_fee} > {first_fee}"
    );
    assert_eq!(bumped.replaced.len(), 1);
    assert_eq!(bumped.replaced[0].txid, first_txid);

    node.mine(1).await;
    let done = until(&nats, &id, "confirmed", |t| t.stage == Stage::Confirmed).await;
    assert_eq!(done.txid.as_deref(), Some(new_txid.as_str()));
    assert_eq!(
        done.confirmation.as_ref().map(|c| c.txid.as_str()),
        Some(new_txid.as_str())
    );
    let received: serde_json::Value = node
        .rpc
        .call("gettxout", json!([new_txid, 0]))
        .await
        .expect("gettxout");
    assert_eq!(received["value"], json!(1.0));

    // The trail records both transactions: the first build, the refused
    // replacements and the bump, each broadcast once.
    let events = history(&nats, &id).await;
    let kinds: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(
        kinds,
        [
            EventType::TransactionCreated,
            EventType::PolicyEvaluated,
            EventType::TransactionBuilt,
            EventType::TransactionSigned,
            EventType::TransactionBroadcast,
            EventType::TransactionBuilt,
            EventType::TransactionFailed,
            EventType::TransactionBuilt,
            EventType::TransactionFailed,
            EventType::TransactionBuilt,
            EventType::TransactionSigned,
            EventType::TransactionBroadcast,
            EventType::TransactionConfirmed,
        ]
    );
    let broadcasts: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::TransactionBroadcast { txid, .. } => Some(txid.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(broadcasts, [first_txid.as_str(), new_txid.as_str()]);
    let last_build: &Event = &events[9];
    assert!(
        matches!(&last_build.payload, Payload::TransactionReplacement { replaces, .. } if *replaces == first_txid),
        "{last_build:?}"
    );
    verify_stream(&nats.js().await)
        .await
        .expect("the trail verifies");
    drop(frost);
    engine.stop().await;
}

/// `policy` and the initiator `erp`, the policy step and the change service
/// deciding under it, an HD signer process `s1`, and the HD wallet `hot` on
/// anvil funded with one ether; anvil mines only when told. The signer's
/// directory lives as long as the returned one.
async fn evm_setup(
    nats: &Nats,
    engine: &Engine,
    policy: policy::Policy,
    shutdown: &Shutdown,
) -> (Anvil, tempfile::TempDir) {
    let anvil = Anvil::start().await;
    let client = nats.client().await;
    policy_and_initiator(nats, engine, policy.clone(), shutdown.clone()).await;
    change_service(nats, engine, policy, shutdown.clone()).await;
    let signer_dir = tempfile::tempdir().expect("tempdir");
    let config = SignerConfig {
        id: "s1".into(),
        data_dir: PathBuf::from(signer_dir.path()),
        passphrase: Zeroizing::new("signer passphrase".into()),
    };
    tokio::spawn(hd_signer::run(client.clone(), config, shutdown.clone()));
    // The signer subscribes once its replica has caught up: ask until then.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match hd_signer::create_wallet(&client, "s1", "hot", "evm-31337").await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("creating hot: {e}"),
            // Poll for the signer's subscription.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let wallet = custos_tests::ceremonies::approved_ceremony(
        nats,
        engine,
        custos_schemas::change::Change::WalletCreate {
            name: "hot".into(),
            model: "hd".into(),
            chain: "evm-31337".into(),
            threshold: 1,
            guardians: vec!["s1".into()],
        },
    )
    .await
    .expect("HD wallet created");
    anvil.fund(&wallet.address, ETHER).await;
    let _: serde_json::Value = anvil
        .rpc
        .call("evm_setAutomine", json!([false]))
        .await
        .expect("automine off");
    (anvil, signer_dir)
}

/// A stuck EVM transfer: the chain steps and a bumper on `anvil`, and the
/// workflow and state of a transfer `request_id` of 0.01 ether from `hot`,
/// broadcast and not mined.
async fn stuck_evm_transfer(
    nats: &Nats,
    engine: &Engine,
    anvil: &Anvil,
    request_id: &str,
    shutdown: &Shutdown,
) -> (
    ShutdownTrigger,
    FeeBumper<custos_workers::ledger::LedgerHandle>,
    String,
    Transfer,
) {
    let nodes = ChainNodes::default().with_evm(EvmNodes::new([(
        "evm-31337".to_string(),
        anvil.rpc.clone(),
    )]));
    let signing = run_steps(nats, engine, &nodes, shutdown).await;
    let bump = bumper(nats, engine, &nodes, "evm-31337", shutdown).await;
    let id = submit(
        engine,
        request_id,
        json!({"wallet": "hot", "asset": "ETH", "destination": EVM_TO, "amount": "0.01", "initiator": "erp"}),
    )
    .await;
    let first = until(nats, &id, "broadcast", is_broadcast).await;
    (signing, bump, id, first)
}

const EVM_TO: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_evm_transfer_is_replaced_with_the_same_nonce_and_higher_fees() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let (_stop, shutdown) = Shutdown::new();
    let default = policy::default_policy().expect("default policy");
    let (anvil, _signer_dir) = evm_setup(&nats, &engine, default, &shutdown).await;
    let (_signing, bump, id, first) =
        stuck_evm_transfer(&nats, &engine, &anvil, "stuck-evm", &shutdown).await;
    let first_txid = first.txid.clone().expect("txid");
    assert!(
        anvil.rpc.receipt(&first_txid).await.expect("rpc").is_none(),
        "not mined"
    );
    let fees = |t: &Transfer| match &t.unsigned {
        Some(UnsignedTransaction::Evm {
            nonce,
            max_fee_per_gas,
            max_priority_fee_per_gas,
            ..
        }) => (*nonce, *max_fee_per_gas, *max_priority_fee_per_gas),
        other => panic!("{other:?}"),
    };
    let (nonce, max_fee, tip) = fees(&first);

    assert_eq!(bump.poll(now_ms()).await, vec![id.clone()]);
    let bumped = until(&nats, &id, "the replacement broadcast", |t| {
        is_broadcast(t) && t.txid.as_deref() != Some(first_txid.as_str())
    })
    .await;
    let new_txid = bumped.txid.clone().expect("txid");
    let (new_nonce, new_max_fee, new_tip) = fees(&bumped);
    assert_eq!(new_nonce, nonce);
    assert!(
        u128::from(new_max_fee) * 10 >= u128::from(max_fee) * 11,
        "{new_max_fee} vs {max_fee}"
    );
    assert!(
        u128::from(new_tip) * 10 >= u128::from(tip) * 11,
        "{new_tip} vs {tip}"
    );
    assert_eq!(
        bumped.signed.as_ref().map(|s| s.signers.clone()),
        Some(vec!["s1".to_string()])
    );
    assert!(anvil.rpc.has_transaction(&new_txid).await.expect("rpc"));

    anvil.mine(1).await;
    let done = until(&nats, &id, "confirmed", |t| t.stage == Stage::Confirmed).await;
    assert_eq!(done.txid.as_deref(), Some(new_txid.as_str()));
    assert!(anvil.rpc.receipt(&new_txid).await.expect("rpc").is_some());
    assert!(
        anvil.rpc.receipt(&first_txid).await.expect("rpc").is_none(),
        "the first was replaced"
    );
    assert_eq!(anvil.balance(EVM_TO).await, 10_000 * ETHER + ETHER / 100);
    assert_eq!(done.replaced.len(), 1);
    assert_eq!(done.replaced[0].txid, first_txid);
    verify_stream(&nats.js().await)
        .await
        .expect("the trail verifies");
    engine.stop().await;
}

/// Transfers pass; every fee bump needs two approvers; wallets are created
/// without approvals.
const BUMPS_NEED_APPROVERS: &str = r#"
version = 1
name = "bumps-need-approvers"
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
approvers = "Approve fee bumps."

[[rule]]
name = "transfers"
actions = ["transfer"]
outcome = "allow"

[[rule]]
name = "fee-bumps"
actions = ["fee-bump"]
outcome = "require-approvals"
approvals = { groups = [{ group = "approvers", count = 2 }] }

[[rule]]
name = "wallets"
actions = ["wallet-create"]
outcome = "allow"
"#;

fn approver(id: &str) -> custos_schemas::Proposal {
    record(
        AggregateKind::User,
        id,
        EventType::UserCreated,
        Payload::UserCreated(custos_schemas::UserRecord {
            id: id.into(),
            name: id.into(),
            email: format!("{id}@example.com"),
            slack_user_id: None,
            roles: vec!["approver".into()],
            groups: vec!["approvers".into()],
            mfa_enrolled: true,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fee_bump_the_policy_holds_waits_for_its_approvers() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let (_stop, shutdown) = Shutdown::new();
    let policy = policy::Policy::parse(BUMPS_NEED_APPROVERS).expect("policy parses");
    let (anvil, _signer_dir) = evm_setup(&nats, &engine, policy, &shutdown).await;
    append_ok(&engine.ledger, vec![approver("ann"), approver("ben")]).await;
    let (_signing, bump, id, first) =
        stuck_evm_transfer(&nats, &engine, &anvil, "held-bump", &shutdown).await;
    let first_txid = first.txid.clone().expect("txid");

    // Asked, not applied: the change waits for two approvers.
    assert_eq!(bump.poll(now_ms()).await, Vec::<String>::new());
    let trail = Trail::follow(nats.js().await, shutdown.clone())
        .await
        .expect("trail");
    let change_id = trail
        .read(|v| {
            v.ledger
                .changes()
                .find(|(_, c)| {
                    c.request
                        .as_ref()
                        .is_some_and(|r| matches!(&r.change, Change::FeeBump { workflow, .. } if *workflow == id))
                })
                .map(|(change_id, c)| (change_id.to_string(), c.stage))
        })
        .await
        .expect("trail read");
    let (change_id, stage) = change_id.expect("a fee-bump change was asked");
    assert_eq!(stage, ChangeStage::AwaitingApprovals);
    // Asked once per stuck transaction, however often the bumper looks.
    assert_eq!(bump.poll(now_ms()).await, Vec::<String>::new());
    let asked = trail
        .read(|v| {
            v.ledger
                .changes()
                .filter(|(_, c)| {
                    c.request
                        .as_ref()
                        .is_some_and(|r| matches!(r.change, Change::FeeBump { .. }))
                })
                .count()
        })
        .await
        .expect("trail read");
    assert_eq!(asked, 1);

    // A replacement recorded without its change approved (as a compromised
    // engine would) is refused by the signer and abandoned.
    let Some(UnsignedTransaction::Evm {
        max_fee_per_gas,
        max_priority_fee_per_gas,
        ..
    }) = first.unsigned.clone()
    else {
        panic!("an EVM transaction: {:?}", first.unsigned)
    };
    let rogue = trail
        .read(|v| {
            let terms = custos_workers::evm_steps::evm_terms(v, first.request.as_ref()?).ok()?;
            custos_custody::evm::build_replacement(
                first.unsigned.as_ref()?,
                u128::from(max_fee_per_gas) * 2,
                u128::from(max_priority_fee_per_gas) * 2,
                &terms.expectation(),
            )
            .ok()
        })
        .await
        .expect("trail read")
        .expect("a fee bump");
    record_replacement(&engine, &id, &first, rogue).await;
    let refused = until(&nats, &id, "the rogue replacement abandoned", |t| {
        is_broadcast(t) && t.version > first.version + 1
    })
    .await;
    assert_eq!(refused.txid.as_deref(), Some(first_txid.as_str()));
    let reasons: Vec<String> = history(&nats, &id)
        .await
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::StepFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no approved fee-bump change")),
        "{reasons:?}"
    );

    // Two approvers approve; the next pass records the replacement, which
    // the signer signs and anvil mines.
    let ballots = TrailBallotBox::new(trail.clone(), RemoteLedger::new(nats.client().await));
    for user in ["ann", "ben"] {
        let notice = ballots.notice(&change_id).await.expect("a notice");
        let receipt = ballots
            .cast(Ballot {
                workflow_id: change_id.clone(),
                user_id: user.into(),
                vote: ApprovalVote {
                    vote: Vote::Approve,
                    request_hash: notice.request_hash,
                    policy_version: notice.policy_version,
                    channel: ApprovalChannel::Console,
                    mfa: MfaMethod::Totp,
                    comment: None,
                },
                masked_ip: None,
                user_agent: None,
            })
            .await;
        assert!(
            matches!(receipt, Ok(Receipt::Recorded { .. })),
            "{user}: {receipt:?}"
        );
    }
    assert_eq!(bump.poll(now_ms()).await, vec![id.clone()]);
    let bumped = until(&nats, &id, "the approved replacement broadcast", |t| {
        is_broadcast(t) && t.txid.as_deref() != Some(first_txid.as_str())
    })
    .await;
    let new_txid = bumped.txid.clone().expect("txid");
    anvil.mine(1).await;
    let done = until(&nats, &id, "confirmed", |t| t.stage == Stage::Confirmed).await;
    assert_eq!(done.txid.as_deref(), Some(new_txid.as_str()));
    let applied = trail
        .read(|v| v.change(&change_id).map(|c| c.stage))
        .await
        .expect("trail read");
    assert_eq!(applied, Some(ChangeStage::Applied));
    verify_stream(&nats.js().await)
        .await
        .expect("the trail verifies");
    engine.stop().await;
}
