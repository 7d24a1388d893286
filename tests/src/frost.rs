//! The FROST signing harness: in-process guardians, each on its own NATS
//! connection through a [`Proxy`] (so a test can hold its traffic or kill it
//! as a killed process dies), a 2-of-3 wallet from their DKG, transfers allowed
//! by the policy step, and their transactions recorded for signing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use custos_custody::frost::keys::SigningShare;
use custos_custody::frost::round1::SigningCommitments;
use custos_custody::frost::{Identifier, SigningPackage};
use custos_custody::sign::Sighash;
use custos_custody::spend::{self, Expectation, FeePolicy, SpendRequest};
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::chain::{SpentOutput, UnsignedTransaction};
use custos_schemas::{AggregateKind, Event, EventType, Payload, WalletDescriptor, codec, subjects};
use custos_workers::guardian::{GuardianConfig, GuardianError};
use custos_workers::signing::{SignReply, SignRequest, wallet_script};
use custos_workers::{Shutdown, ShutdownTrigger};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::tcp_proxy::Proxy;
use crate::workflows::policy_and_initiator;
use crate::{Engine, Nats, all_events, append_ok, eventually};

pub use crate::record;

/// A guardian running in this process on its own connection; dropping it
/// stops it (its shutdown trigger goes with it).
#[derive(Debug)]
pub struct Guardian {
    pub id: String,
    pub proxy: Proxy,
    dir: TempDir,
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), GuardianError>>,
}

impl Guardian {
    pub async fn start(nats: &Nats, id: &str) -> Guardian {
        Self::start_in(nats, id, tempfile::tempdir().expect("tempdir")).await
    }

    /// Starts guardian `id` on the data (identity, shares, session log) in `dir`.
    pub async fn start_in(nats: &Nats, id: &str, dir: TempDir) -> Guardian {
        let upstream = SocketAddr::from(([127, 0, 0, 1], nats.server.port()));
        let proxy = Proxy::start(upstream).await;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(proxy.url())
            .await
            .expect("guardian connects");
        let config = GuardianConfig {
            id: id.into(),
            data_dir: PathBuf::from(dir.path()),
            passphrase: Zeroizing::new(format!("passphrase of {id}")),
        };
        let (trigger, shutdown) = Shutdown::new();
        let task = tokio::spawn(custos_workers::guardian::run(client, config, shutdown));
        Guardian {
            id: id.into(),
            proxy,
            dir,
            trigger,
            task,
        }
    }

    /// Stops it and waits until it has: its data stays for a restart.
    pub async fn stop(self) -> TempDir {
        self.trigger.trigger();
        let _ = self.task.await;
        self.dir
    }

    /// Stops it and starts it again on the same data, once it announced
    /// itself again (a heartbeat after the restart).
    pub async fn restart(self, nats: &Nats) -> Guardian {
        let heartbeats = nats
            .js()
            .await
            .get_key_value(subjects::GUARDIANS_BUCKET)
            .await
            .expect("bucket");
        let id = self.id.clone();
        let dir = self.stop().await;
        let last = heartbeats
            .entry(&id)
            .await
            .expect("entry")
            .map(|e| e.revision);
        let guardian = Guardian::start_in(nats, &id, dir).await;
        assert!(
            eventually(Duration::from_secs(30), || async {
                heartbeats
                    .entry(&id)
                    .await
                    .ok()
                    .flatten()
                    .map(|e| e.revision)
                    > last
            })
            .await,
            "{id} is back"
        );
        guardian
    }

    /// Ends it at once, as a `kill -9` would: no shutdown path runs, its
    /// memory (nonces, shares) is dropped, and its connection is cut.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.proxy.sever();
        // Its trail follower (a task of its own) stops too.
        self.trigger.trigger();
    }

    /// Whether it holds its share of `wallet` (a key ceremony's commit reaches
    /// guardians after the wallet is recorded).
    pub fn holds_share(&self, wallet: &str) -> bool {
        self.dir
            .path()
            .join("shares")
            .join(format!("{wallet}.share"))
            .exists()
    }

    /// Whether its task still runs (it did not panic or return).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

/// Waits until each of `ids` has announced itself in the guardians bucket.
pub async fn announced(nats: &Nats, ids: &[&str]) -> bool {
    let js = nats.js().await;
    eventually(Duration::from_secs(20), || async {
        let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
            return false;
        };
        let mut n = 0;
        for id in ids {
            n += usize::from(matches!(kv.get(*id).await, Ok(Some(_))));
        }
        n == ids.len()
    })
    .await
}

pub async fn history(nats: &Nats, workflow_id: &str) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == workflow_id)
        .collect()
}

pub async fn stage_of(nats: &Nats, workflow_id: &str) -> Stage {
    transfer::fold(&history(nats, workflow_id).await)
        .map(|(t, _)| t.stage)
        .unwrap_or(Stage::New)
}

/// What a coordinator asks guardian `guardian`, and its answer.
pub async fn ask(client: &async_nats::Client, guardian: &str, request: &SignRequest) -> SignReply {
    let msg = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(
            subjects::guardian_subject(guardian, "sign"),
            codec::to_msgpack(request).into(),
        ),
    )
    .await
    .expect("guardian answers in time")
    .expect("guardian answers");
    codec::from_msgpack(&msg.payload).expect("a sign reply")
}

/// `count` commitments `guardian` hands out for `wallet`, with its identifier.
pub async fn preprocess(
    client: &async_nats::Client,
    guardian: &str,
    wallet: &str,
    count: u16,
) -> (Identifier, Vec<SigningCommitments>) {
    let request = SignRequest::Preprocess {
        wallet: wallet.into(),
        count,
    };
    match ask(client, guardian, &request).await {
        SignReply::Preprocessed {
            identifier,
            commitments,
            ..
        } => (
            Identifier::deserialize(&identifier).expect("identifier"),
            commitments
                .iter()
                .map(|c| SigningCommitments::deserialize(c).expect("commitments"))
                .collect(),
        ),
        other => panic!("{guardian} hands out commitments for {wallet}: {other:?}"),
    }
}

/// Asks `guardian` to sign one-input `workflow_id` of `wallet` with a package
/// that carries a commitment it handed out (and an outsider's beside it) over
/// a made-up message: what it answers when its checks of the workflow fail.
pub async fn ask_to_sign(
    client: &async_nats::Client,
    guardian: &str,
    wallet: &str,
    workflow_id: &str,
    session_id: &str,
) -> SignReply {
    let (mine, commitments) = preprocess(client, guardian, wallet, 1).await;
    let share = SigningShare::deserialize(&[7; 32]).expect("share");
    let other = custos_custody::frost::round1::commit(&share, &mut rand::rngs::OsRng).1;
    let other_id = Identifier::try_from(if mine == Identifier::try_from(3u16).expect("id") {
        1u16
    } else {
        3
    })
    .expect("id");
    let package = SigningPackage::new(
        [(mine, commitments[0]), (other_id, other)].into(),
        &[0xAB; 32],
    );
    let request = SignRequest::Sign {
        session_id: session_id.into(),
        workflow_id: workflow_id.into(),
        packages: vec![package.serialize().expect("package")],
    };
    ask(client, guardian, &request).await
}

/// An unsigned transaction of `wallet` paying `amount` satoshi to `destination`
/// from one (made-up) 5 LTC output of the wallet.
pub fn built(wallet: &WalletDescriptor, destination: &str, amount: u64, seed: u8) -> Payload {
    built_from(wallet, destination, amount, &[(seed, 500_000_000)])
}

/// An unsigned transaction of `wallet` paying `amount` satoshi to
/// `destination` from made-up outputs of the wallet (`(seed, value)` each: the
/// seed makes its txid), as many as it takes.
pub fn built_from(
    wallet: &WalletDescriptor,
    destination: &str,
    amount: u64,
    coins: &[(u8, u64)],
) -> Payload {
    let script = wallet_script(wallet).expect("wallet script");
    let utxos: Vec<SpentOutput> = coins
        .iter()
        .map(|(seed, value)| SpentOutput {
            txid: hex::encode([*seed; 32]),
            vout: 1,
            value: *value,
            script_pubkey: hex::encode(&script),
        })
        .collect();
    let dest = spend::script_pubkey_for_address(&wallet.chain, destination).expect("address");
    let unsigned = spend::build_spend(&SpendRequest {
        chain: &wallet.chain,
        wallet_script: &script,
        utxos: &utxos,
        destination: &dest,
        amount,
        fee_rate: Some(2),
        fees: FeePolicy::for_chain(&wallet.chain).expect("fees"),
    })
    .expect("builds");
    Payload::TransactionBuilt(unsigned)
}

/// The sighashes of a [`built`] transaction, as an honest guardian computes them.
pub fn sighashes(
    wallet: &WalletDescriptor,
    built: &Payload,
    destination: &str,
    amount: u64,
) -> Vec<Sighash> {
    let Payload::TransactionBuilt(unsigned @ UnsignedTransaction::Bitcoin { .. }) = built else {
        panic!("a built bitcoin-family transaction")
    };
    let script = wallet_script(wallet).expect("wallet script");
    let dest = spend::script_pubkey_for_address(&wallet.chain, destination).expect("address");
    spend::check_spend(
        unsigned,
        &Expectation {
            chain: &wallet.chain,
            wallet_script: &script,
            destination: &dest,
            amount,
            fees: FeePolicy::for_chain(&wallet.chain).expect("fees"),
        },
    )
    .expect("the transaction is the transfer")
    .sighashes()
    .expect("sighashes")
}

pub async fn append_built(engine: &Engine, nats: &Nats, workflow_id: &str, payload: Payload) {
    let version = history(nats, workflow_id).await.len() as u64;
    let mut p = record(
        AggregateKind::Tx,
        workflow_id,
        EventType::TransactionBuilt,
        payload,
    );
    p.expected_version = version;
    append_ok(&engine.ledger, vec![p]).await;
}

/// What the signing tests start from.
#[derive(Debug)]
pub struct Frost {
    pub guardians: Vec<Guardian>,
    pub wallet: WalletDescriptor,
    pub trigger: ShutdownTrigger,
    pub shutdown: Shutdown,
}

/// Three in-process guardians, a FROST 2-of-3 wallet `name` from their DKG,
/// `policy` recorded as active, the initiator `erp`, and the policy step
/// (LTC at EUR 80) running until `trigger`.
pub async fn frost_setup(
    nats: &Nats,
    engine: &Engine,
    name: &str,
    policy: policy::Policy,
) -> Frost {
    let mut guardians = Vec::new();
    for id in ["g1", "g2", "g3"] {
        guardians.push(Guardian::start(nats, id).await);
    }
    if !announced(nats, &["g1", "g2", "g3"]).await {
        for g in guardians {
            if !g.is_running() {
                panic!("guardian {} ended: {:?}", g.id, g.task.await);
            }
        }
        panic!("guardians announce themselves");
    }
    let wallet = crate::ceremonies::approved_ceremony(
        nats,
        engine,
        custos_schemas::change::Change::WalletCreate {
            name: name.into(),
            model: "frost".into(),
            chain: "ltc-regtest".into(),
            threshold: 2,
            guardians: vec!["g1".into(), "g2".into(), "g3".into()],
        },
    )
    .await
    .expect("wallet created");
    assert!(
        eventually(Duration::from_secs(20), || async {
            guardians.iter().all(|g| g.holds_share(name))
        })
        .await,
        "every guardian commits its share"
    );
    let (trigger, shutdown) = Shutdown::new();
    policy_and_initiator(nats, engine, policy, shutdown.clone()).await;
    Frost {
        guardians,
        wallet,
        trigger,
        shutdown,
    }
}
