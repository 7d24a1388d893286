//! The EVM path against a real anvil: the JSON-RPC client, EIP-1559 transfers
//! signed from an HD wallet's key, and the workflow end to end with the HD
//! signer (its own task, NATS connection and trail replica): policy, build with
//! per-wallet nonces, signing, broadcast, receipts; the signer's refusals,
//! failures with their reasons, and a node that is down during broadcast.

use std::path::PathBuf;
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_custody::evm::{self, GasPolicy, TRANSFER_GAS};
use custos_custody::hd::Mnemonic;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::{AggregateKind, Event, EventType, IntakeReply, Payload, codec};
use custos_tests::anvil::{Anvil, ETHER};
use custos_tests::workflows::policy_and_initiator;
use custos_tests::{
    Engine, Nats, all_events, append_ok, eventually, record, submit_json, verify_stream,
};
use custos_workers::chain_steps::{
    BroadcastStep, BuildStep, ChainNodes, ConfirmWatcher, Confirmations,
};
use custos_workers::evm_steps::EvmNodes;
use custos_workers::hd_signer::{self, SignerConfig, SignerReply, SignerRequest, signer_subject};
use custos_workers::runtime::{Step, StepError};
use custos_workers::signing::SignStep;
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use futures::future::join_all;
use rand::SeedableRng;
use serde_json::json;
use zeroize::Zeroizing;

const CHAIN: &str = "evm-31337";
const SIGNER: &str = "s1";

#[tokio::test]
async fn client_builds_signs_broadcasts_idempotently_and_reads_receipts() {
    let node = Anvil::start().await;
    let rpc = &node.rpc;
    assert_eq!(rpc.chain_id().await.expect("chain id"), 31_337);
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([3; 32]);
    let seed = Mnemonic::generate(&mut rng).expect("mnemonic").to_seed("");
    let account = seed.ethereum_account(0).expect("account");
    let wallet = account.checksummed();
    node.fund(&wallet, 2 * ETHER).await;
    assert_eq!(node.balance(&wallet).await, 2 * ETHER);
    assert_eq!(rpc.pending_nonce(&wallet).await.expect("nonce"), 0);

    let dest = seed.ethereum_account(1).expect("account").checksummed();
    let value = ETHER / 10;
    let gas = rpc
        .estimate_gas(&wallet, &dest, value)
        .await
        .expect("estimate");
    assert_eq!(gas, TRANSFER_GAS);
    let outlook = rpc.fee_outlook(5).await.expect("fee history");
    assert!(outlook.next_base_fee > 0, "{outlook:?}");
    let tip = rpc.max_priority_fee().await.expect("tip");
    let policy = GasPolicy::for_chain(CHAIN).expect("gas policy");
    let unsigned = evm::build(
        &evm::TransferRequest {
            chain: CHAIN,
            from: &wallet,
            to: &dest,
            value: alloy_value(value),
            nonce: 0,
            gas_limit: gas,
            max_fee_per_gas: u64::try_from(outlook.next_base_fee * 2 + tip).expect("fits"),
            max_priority_fee_per_gas: u64::try_from(tip).expect("fits"),
        },
        &policy,
    )
    .expect("build");
    let checked = evm::check(
        &unsigned,
        &evm::Expectation {
            chain: CHAIN,
            wallet: &wallet,
            destination: &dest,
            value: alloy_value(value),
            gas: policy,
        },
    )
    .expect("check");
    let signed = checked
        .sign(account.signing_key(), vec!["test".into()])
        .expect("sign");

    let before = rpc.block_number().await.expect("block number");
    let txid = rpc
        .send_raw_transaction(&signed.raw_tx, &signed.txid)
        .await
        .expect("broadcast");
    assert_eq!(txid, signed.txid);
    // Already mined (automine): sending again is a success with the same hash.
    assert_eq!(
        rpc.send_raw_transaction(&signed.raw_tx, &signed.txid)
            .await
            .expect("rebroadcast"),
        signed.txid
    );
    let receipt = rpc.receipt(&txid).await.expect("receipt").expect("mined");
    assert!(receipt.success);
    assert_eq!(receipt.gas_used, TRANSFER_GAS);
    assert_eq!(receipt.block_number, before + 1);
    assert_eq!(
        rpc.block_hash(receipt.block_number).await.expect("block"),
        Some(receipt.block_hash.clone())
    );
    assert_eq!(node.balance(&dest).await, value);
    assert_eq!(rpc.pending_nonce(&wallet).await.expect("nonce"), 1);
    // A transaction the node refuses (nonce reused for another payment) is an
    // RPC error, not a success.
    let again = evm::build(
        &evm::TransferRequest {
            chain: CHAIN,
            from: &wallet,
            to: &dest,
            value: alloy_value(value + 1),
            nonce: 0,
            gas_limit: gas,
            max_fee_per_gas: u64::try_from(outlook.next_base_fee * 2 + tip).expect("fits"),
            max_priority_fee_per_gas: u64::try_from(tip).expect("fits"),
        },
        &policy,
    )
    .expect("build");
    let stale = evm::check(
        &again,
        &evm::Expectation {
            chain: CHAIN,
            wallet: &wallet,
            destination: &dest,
            value: alloy_value(value + 1),
            gas: policy,
        },
    )
    .expect("check")
    .sign(account.signing_key(), vec![])
    .expect("sign");
    let err = rpc
        .send_raw_transaction(&stale.raw_tx, &stale.txid)
        .await
        .expect_err("nonce already used");
    assert!(err.to_string().contains("nonce"), "{err}");
    assert!(!err.is_transient());
    assert_eq!(rpc.block_hash(1_000_000).await.expect("rpc"), None);
}

fn alloy_value(wei: u128) -> custos_custody::evm::Wei {
    custos_custody::evm::Wei::from(wei)
}

/// A fresh EIP-55 address nobody holds a key for in these tests.
fn destination(n: u8) -> String {
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([n; 32]);
    Mnemonic::generate(&mut rng)
        .expect("mnemonic")
        .to_seed("")
        .ethereum_account(0)
        .expect("account")
        .checksummed()
}

/// NATS, the engine, anvil, the default policy with an initiator and ETH at
/// EUR 3,000 (up to 1/3 ETH is allowed outright), and an HD signer.
struct Setup {
    nats: Nats,
    engine: Engine,
    anvil: Anvil,
    client: async_nats::Client,
    shutdown: Shutdown,
    _stop: ShutdownTrigger,
    _signer_dir: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let nats = Nats::start(Durability::Default).await;
        let engine = Engine::start(&nats).await;
        let anvil = Anvil::start().await;
        let client = nats.client().await;
        let (stop, shutdown) = Shutdown::new();
        let default = policy::default_policy().expect("default policy");
        policy_and_initiator(&nats, &engine, default, shutdown.clone()).await;
        let signer_dir = tempfile::tempdir().expect("tempdir");
        let config = SignerConfig {
            id: SIGNER.into(),
            data_dir: PathBuf::from(signer_dir.path()),
            passphrase: Zeroizing::new("signer passphrase".into()),
        };
        tokio::spawn(hd_signer::run(client.clone(), config, shutdown.clone()));
        Setup {
            nats,
            engine,
            anvil,
            client,
            shutdown,
            _stop: stop,
            _signer_dir: signer_dir,
        }
    }

    fn nodes(&self) -> ChainNodes {
        ChainNodes::default().with_evm(EvmNodes::new([(CHAIN.to_string(), self.anvil.rpc.clone())]))
    }

    async fn trail(&self) -> Trail {
        Trail::follow(self.nats.js().await, self.shutdown.clone())
            .await
            .expect("trail")
    }

    /// An HD wallet asked for as a change and made by the signer through the
    /// engine's key-ceremony step, funded with `wei` from anvil's dev account.
    async fn wallet(&self, name: &str, wei: u128) -> String {
        // The signer subscribes once its replica has caught up: ask until then
        // (asking again before the wallet is recorded answers the same address).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let created = loop {
            match hd_signer::create_wallet(&self.client, SIGNER, name, CHAIN).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("creating {name}: {e}"),
                // Poll for the signer's subscription.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(created.xpub.starts_with("xpub"), "{created:?}");
        let wallet = custos_tests::ceremonies::approved_ceremony(
            &self.nats,
            &self.engine,
            custos_schemas::change::Change::WalletCreate {
                name: name.into(),
                model: "hd".into(),
                chain: CHAIN.into(),
                threshold: 1,
                guardians: vec![SIGNER.into()],
            },
        )
        .await
        .expect("HD wallet created");
        assert_eq!(wallet.model, "hd");
        assert_eq!(wallet.address, created.wallet.address);
        if wei > 0 {
            self.anvil.fund(&wallet.address, wei).await;
        }
        wallet.address
    }

    /// Build, signing, broadcast and the confirmation watcher.
    async fn run_steps(&self, broadcast: bool) {
        let js = self.nats.js().await;
        let trail = self.trail().await;
        let ledger = self.engine.ledger.clone();
        let build = BuildStep::new(trail.clone(), self.nodes(), ledger.clone()).expect("build");
        let sign = SignStep::new(self.client.clone(), trail.clone()).expect("sign");
        tokio::spawn(custos_workers::runtime::run(
            js.clone(),
            ledger.clone(),
            build,
            self.shutdown.clone(),
        ));
        tokio::spawn(custos_workers::runtime::run(
            js.clone(),
            ledger.clone(),
            sign,
            self.shutdown.clone(),
        ));
        if broadcast {
            let step = BroadcastStep::new(self.nodes(), ledger.clone(), 3).expect("broadcast");
            tokio::spawn(custos_workers::runtime::run(
                js,
                ledger.clone(),
                step,
                self.shutdown.clone(),
            ));
        }
        let watcher = ConfirmWatcher::new(trail, self.nodes(), ledger, Confirmations::default());
        tokio::spawn(watcher.run(Duration::from_millis(100), self.shutdown.clone()));
    }

    /// Submits a transfer through intake and waits until the policy decided it.
    async fn submit(&self, request_id: &str, wallet: &str, to: &str, eth: &str) -> String {
        let body = json!({"requestId": request_id, "wallet": wallet, "asset": "ETH",
            "destination": to, "amount": eth, "initiator": "erp"});
        let id = match submit_json(&self.engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => panic!("{other:?}"),
        };
        assert!(
            eventually(Duration::from_secs(20), || async {
                self.state(&id).await.decision.is_some()
            })
            .await,
            "{id} decided by the policy step"
        );
        id
    }

    async fn history(&self, workflow_id: &str) -> Vec<Event> {
        all_events(&self.nats.js().await)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == workflow_id)
            .collect()
    }

    async fn state(&self, workflow_id: &str) -> Transfer {
        transfer::fold(&self.history(workflow_id).await)
            .map(|(t, _)| t)
            .unwrap_or_default()
    }

    async fn until_stage(&self, workflow_id: &str, stages: &[Stage]) -> Transfer {
        assert!(
            eventually(Duration::from_secs(60), || async {
                stages.contains(&self.state(workflow_id).await.stage)
            })
            .await,
            "{workflow_id} reaches {stages:?}, is {:?}",
            self.state(workflow_id).await
        );
        self.state(workflow_id).await
    }

    async fn ask_signer(&self, workflow_id: &str) -> SignerReply {
        let request = SignerRequest::Sign {
            workflow_id: workflow_id.into(),
        };
        let reply = self
            .client
            .request(
                signer_subject(SIGNER, "sign"),
                codec::to_msgpack(&request).into(),
            )
            .await
            .expect("signer answers");
        codec::from_msgpack(&reply.payload).expect("readable reply")
    }
}

fn nonce_of(t: &Transfer) -> u64 {
    match &t.unsigned {
        Some(UnsignedTransaction::Evm { nonce, .. }) => *nonce,
        other => panic!("not an EVM build: {other:?}"),
    }
}

fn failure(t: &Transfer) -> String {
    assert_eq!(t.stage, Stage::Failed, "{t:?}");
    t.reason.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hd_transfers_are_approved_signed_broadcast_and_confirmed_with_distinct_nonces() {
    let s = Setup::start().await;
    let wallet = s.wallet("hot", 5 * ETHER).await;
    s.run_steps(true).await;
    let to = destination(40);
    let id = s.submit("pay-1", "hot", &to, "0.01").await;
    let t = s
        .until_stage(&id, &[Stage::Confirmed, Stage::Failed, Stage::Rejected])
        .await;
    assert_eq!(t.stage, Stage::Confirmed, "{t:?}");
    assert_eq!(s.anvil.balance(&to).await, ETHER / 100);
    assert_eq!(nonce_of(&t), 0);
    let signed = t.signed.as_ref().expect("signed");
    assert_eq!(signed.signers, vec![SIGNER.to_string()]);
    let receipt = s
        .anvil
        .rpc
        .receipt(t.txid.as_deref().expect("txid"))
        .await
        .expect("rpc")
        .expect("mined");
    let confirmation = t.confirmation.as_ref().expect("confirmation");
    assert_eq!(confirmation.block_hash, receipt.block_hash);
    assert_eq!(confirmation.block_height, receipt.block_number);
    let kinds: Vec<EventType> = s.history(&id).await.iter().map(|e| e.event_type).collect();
    assert_eq!(
        kinds,
        [
            EventType::TransactionCreated,
            EventType::PolicyEvaluated,
            EventType::TransactionBuilt,
            EventType::TransactionSigned,
            EventType::TransactionBroadcast,
            EventType::TransactionConfirmed,
        ]
    );

    // Twenty at once from the same wallet: consecutive nonces, each once, all
    // confirmed, every destination paid.
    let tos: Vec<String> = (0..20).map(|i| destination(100 + i)).collect();
    let request_ids: Vec<String> = (0..20).map(|i| format!("burst-{i}")).collect();
    let ids = join_all(
        request_ids
            .iter()
            .zip(&tos)
            .map(|(r, to)| s.submit(r, "hot", to, "0.001")),
    )
    .await;
    let mut nonces = Vec::new();
    for id in &ids {
        let t = s
            .until_stage(id, &[Stage::Confirmed, Stage::Failed, Stage::Rejected])
            .await;
        assert_eq!(t.stage, Stage::Confirmed, "{t:?}");
        nonces.push(nonce_of(&t));
    }
    nonces.sort_unstable();
    assert_eq!(nonces, (1..=20).collect::<Vec<u64>>());
    for to in &tos {
        assert_eq!(s.anvil.balance(to).await, ETHER / 1000);
    }
    assert_eq!(s.anvil.rpc.pending_nonce(&wallet).await.expect("nonce"), 21);
    let verified = verify_stream(&s.nats.js().await)
        .await
        .expect("the trail verifies");
    assert!(verified.events > 0);
    s.engine.stop().await;
}

/// The recorded destination, value, nonce, gas limit and max fee.
fn evm_fields(
    u: &mut UnsignedTransaction,
) -> (&mut String, &mut String, &mut u64, &mut u64, &mut u64) {
    match u {
        UnsignedTransaction::Evm {
            to,
            value,
            nonce,
            gas_limit,
            max_fee_per_gas,
            ..
        } => (to, value, nonce, gas_limit, max_fee_per_gas),
        other => panic!("{other:?}"),
    }
}

/// The latest event of a workflow: what the build consumer would deliver.
async fn latest(s: &Setup, workflow_id: &str) -> Event {
    s.history(workflow_id).await.pop().expect("an event")
}

/// Records `unsigned` as the build of `workflow_id` (as a dishonest builder would).
async fn record_build(s: &Setup, workflow_id: &str, unsigned: UnsignedTransaction) {
    let t = s.state(workflow_id).await;
    assert_eq!(t.stage, Stage::ReadyToSign, "{t:?}");
    let mut p = record(
        AggregateKind::Tx,
        workflow_id,
        EventType::TransactionBuilt,
        Payload::TransactionBuilt(unsigned),
    );
    p.expected_version = t.version;
    append_ok(&s.engine.ledger, vec![p]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nonces_survive_a_restart_and_the_signer_refuses_anything_but_the_approved_transfer() {
    let s = Setup::start().await;
    let wallet = s.wallet("cold", ETHER).await;
    let to = destination(7);
    let a = s.submit("a", "cold", &to, "0.01").await;
    let b = s.submit("b", "cold", &to, "0.02").await;
    let first = BuildStep::new(s.trail().await, s.nodes(), s.engine.ledger.clone()).expect("build");
    assert!(
        first
            .handle(&latest(&s, &a).await)
            .await
            .expect("built")
            .is_empty()
    );
    assert_eq!(nonce_of(&s.state(&a).await), 0);
    // A new build step (a restart: new replica, no memory) while the first
    // transaction is not broadcast: the node still says 0, the trail says taken.
    drop(first);
    assert_eq!(s.anvil.rpc.pending_nonce(&wallet).await.expect("nonce"), 0);
    let restarted =
        BuildStep::new(s.trail().await, s.nodes(), s.engine.ledger.clone()).expect("build");
    assert!(
        restarted
            .handle(&latest(&s, &b).await)
            .await
            .expect("built")
            .is_empty()
    );
    assert_eq!(nonce_of(&s.state(&b).await), 1);

    // The signer signs the honest build...
    let SignerReply::Signed(signed) = s.ask_signer(&a).await else {
        panic!("the honest build is signed")
    };
    assert_eq!(signed.signers, vec![SIGNER.to_string()]);
    // ...and refuses one that pays elsewhere, more, with more gas or higher
    // fees than the caps, or reuses a nonce another transfer holds.
    let honest = s.state(&a).await.unsigned.expect("built");
    let gas = GasPolicy::for_chain(CHAIN).expect("caps");
    let tamper = |f: &dyn Fn(&mut UnsignedTransaction)| {
        let mut u = honest.clone();
        f(&mut u);
        u
    };
    let elsewhere = destination(8);
    let cases: Vec<(UnsignedTransaction, &str)> = vec![
        (
            tamper(&|u| {
                let (to, _, n, _, _) = evm_fields(u);
                (*to, *n) = (elsewhere.clone(), 5);
            }),
            "pays",
        ),
        (
            tamper(&|u| {
                let (_, v, n, _, _) = evm_fields(u);
                (*v, *n) = ("20000000000000000".into(), 6);
            }),
            "wei",
        ),
        (
            tamper(&|u| {
                let (_, _, n, g, _) = evm_fields(u);
                (*n, *g) = (7, gas.max_gas_limit + 1);
            }),
            "gas limit",
        ),
        (
            tamper(&|u| {
                let (_, _, n, _, f) = evm_fields(u);
                (*n, *f) = (8, gas.max_fee_per_gas + 1);
            }),
            "max fee per gas",
        ),
        (tamper(&|_| {}), "already used"),
    ];
    for (i, (unsigned, reason)) in cases.into_iter().enumerate() {
        let id = s.submit(&format!("bad-{i}"), "cold", &to, "0.01").await;
        record_build(&s, &id, unsigned).await;
        match s.ask_signer(&id).await {
            SignerReply::Refused { reason: why } => {
                assert!(why.contains(reason), "case {i}: {why}")
            }
            other => panic!("case {i} signed: {other:?}"),
        }
    }
    s.engine.stop().await;
}

/// Runtime code that accepts ether while storage slot 0 is zero and reverts
/// after (a call with data sets it): `36600c57600054601357 0000
/// 5b600160005500 5b60006000fd`, behind init code that returns it.
const FLAG_CONTRACT: &str =
    "0x6019600c60003960196000f336600c576000546013570000 5b6001600055005b60006000fd";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_end_with_their_reason_and_a_node_down_is_retried_and_alerted() {
    let mut s = Setup::start().await;
    s.wallet("hot", ETHER).await;
    s.wallet("poor", ETHER / 20).await;
    s.run_steps(false).await;

    // More than the wallet holds: failed at the build, with the amounts.
    let id = s.submit("too-much", "poor", &destination(9), "0.1").await;
    let reason = failure(&s.until_stage(&id, &[Stage::Failed, Stage::Built]).await);
    assert!(reason.contains("insufficient funds"), "{reason}");

    // Node down during broadcast: transient, one alert after the threshold,
    // then sent once the node is back, and confirmed.
    let to = destination(10);
    let id = s.submit("while-down", "hot", &to, "0.01").await;
    s.until_stage(&id, &[Stage::Signed]).await;
    let signed_event = latest(&s, &id).await;
    assert_eq!(signed_event.event_type, EventType::TransactionSigned);
    let step = BroadcastStep::new(s.nodes(), s.engine.ledger.clone(), 2).expect("broadcast");
    s.anvil.stop().await;
    for _ in 0..3 {
        assert!(matches!(
            step.handle(&signed_event).await,
            Err(StepError::Transient(_))
        ));
    }
    let alerts: Vec<String> = all_events(&s.nats.js().await)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::AlertRaised)
        .filter_map(|(_, e)| match e.payload {
            Payload::Alert { summary, .. } => Some(summary),
            _ => None,
        })
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].contains("unreachable"), "{alerts:?}");
    s.anvil.restart().await;
    let proposals = step.handle(&signed_event).await.expect("broadcast");
    assert_eq!(proposals.len(), 1);
    assert_eq!(proposals[0].event_type, EventType::TransactionBroadcast);
    append_ok(&s.engine.ledger, proposals).await;
    let t = s.until_stage(&id, &[Stage::Confirmed, Stage::Failed]).await;
    assert_eq!(t.stage, Stage::Confirmed, "{t:?}");
    assert_eq!(s.anvil.balance(&to).await, ETHER / 100);

    // A transfer to a contract that reverts by the time it is mined: failed
    // with the receipt's reason, its nonce spent.
    let deployed: String = s
        .anvil
        .rpc
        .call(
            "eth_sendTransaction",
            json!([{"from": custos_adapters::anvil::DEV_ACCOUNT, "data": FLAG_CONTRACT.replace(' ', "")}]),
        )
        .await
        .expect("deploy");
    let contract = s.anvil.receipt(&deployed).await;
    let contract = contract["contractAddress"]
        .as_str()
        .unwrap_or_else(|| panic!("contract address: {contract}"))
        .to_string();
    s.anvil.set_automine(false).await.expect("automine off");
    let id = s.submit("to-contract", "hot", &contract, "0.01").await;
    let step = BroadcastStep::new(s.nodes(), s.engine.ledger.clone(), 3).expect("broadcast");
    s.until_stage(&id, &[Stage::Signed]).await;
    let proposals = step
        .handle(&latest(&s, &id).await)
        .await
        .expect("broadcast");
    append_ok(&s.engine.ledger, proposals).await;
    let _: serde_json::Value = s
        .anvil
        .rpc
        .call(
            "anvil_setStorageAt",
            json!([contract, "0x0", format!("0x{:064x}", 1)]),
        )
        .await
        .expect("set the flag");
    s.anvil.mine(1).await;
    let reason = failure(&s.until_stage(&id, &[Stage::Failed, Stage::Confirmed]).await);
    assert!(
        reason.starts_with("confirmation: ") && reason.contains("reverted in block"),
        "{reason}"
    );
    verify_stream(&s.nats.js().await)
        .await
        .expect("the trail verifies");
    s.engine.stop().await;
}
