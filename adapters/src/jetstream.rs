//! JetStream: the stream and consumer definitions, provisioning, pipelined atomic
//! batch appends, and ordered reads of the event stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use custos_schemas::{AggregateKind, EventType, subjects};
use futures::StreamExt;
use serde::Deserialize;

/// Settings of the event stream an operator may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// 1 for a single server, 3 for an R3 cluster.
    pub replicas: usize,
    /// Retention by age; `None` keeps events forever.
    pub max_age: Option<Duration>,
}

impl StreamSettings {
    /// `retention_days` 0 keeps events forever.
    pub fn new(replicas: usize, retention_days: u64) -> Self {
        let max_age = (retention_days > 0)
            .then(|| Duration::from_secs(retention_days.saturating_mul(86_400)));
        StreamSettings { replicas, max_age }
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            max_age: None,
        }
    }
}

/// How long the server remembers message ids to drop duplicates.
const DEDUPE_WINDOW: Duration = Duration::from_secs(120);

/// The event stream: system of record and audit trail. Nothing may be deleted or
/// purged; only whole-age retention applies.
pub fn events_stream(settings: StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::EVENTS_STREAM.into(),
        description: Some("Custos events: system of record and hash-chained audit trail".into()),
        subjects: vec![subjects::EVENTS_ALL.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: settings.replicas,
        max_age: settings.max_age.unwrap_or_default(),
        deny_delete: true,
        deny_purge: true,
        allow_atomic_publish: true,
        allow_direct: true,
        // The server requires the window to fit in the retention.
        duplicate_window: settings
            .max_age
            .map_or(DEDUPE_WINDOW, |age| age.min(DEDUPE_WINDOW)),
        ..Default::default()
    }
}

/// Dead letters, kept as evidence like the events themselves.
pub fn dlq_stream(settings: StreamSettings) -> stream::Config {
    stream::Config {
        name: subjects::DLQ_STREAM.into(),
        description: Some("Custos dead letters: poison messages and why".into()),
        subjects: vec![format!("{}.>", subjects::DLQ_PREFIX)],
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        max_age: settings.max_age.unwrap_or_default(),
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// Where guardians announce their public keys and liveness; an entry not
/// refreshed for a minute expires.
pub fn guardians_bucket(settings: StreamSettings) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: subjects::GUARDIANS_BUCKET.into(),
        description: "Custos guardians: public keys and heartbeats".into(),
        history: 1,
        max_age: Duration::from_secs(60),
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// Holds the ledger writer's lease: one writer at a time; an entry not renewed
/// within [`LEASE_TTL`] expires, so a standby takes over from a writer that died.
pub fn ledger_lease_bucket(settings: StreamSettings) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: subjects::LEDGER_LEASE_BUCKET.into(),
        description: "Custos ledger writer lease".into(),
        history: 1,
        max_age: LEASE_TTL,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// One-time approval links (email, chat, Slack step-up), keyed by the hex SHA-256
/// of the token; the token itself is never stored. Links expire long before a
/// record ages out; a record past the bucket's age reads as an unknown link.
pub fn approval_links_bucket(settings: StreamSettings) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: subjects::APPROVAL_LINKS_BUCKET.into(),
        description: "Custos one-time approval links (token hashes)".into(),
        history: 1,
        max_age: APPROVAL_LINK_RETENTION,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// How long a used or expired approval link record is kept (to tell "already
/// used" and "expired" apart from "unknown").
pub const APPROVAL_LINK_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// Approvers' second factors: TOTP secrets sealed with the engine's key, with the
/// replay and lockout state. Kept until re-enrolment; every update is
/// revision-checked.
pub fn mfa_bucket(settings: StreamSettings) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: subjects::MFA_BUCKET.into(),
        description: "Custos approver second factors (sealed)".into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// A ledger writer lease not renewed within this expires.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// A workflow step's durable pull consumer: which events it takes and how often
/// it may be redelivered before the message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepConsumer {
    pub name: &'static str,
    pub filters: Vec<String>,
    pub max_deliver: i64,
    pub ack_wait: Duration,
}

impl StepConsumer {
    pub fn config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.name.into()),
            description: Some(format!("Custos step {}", self.name)),
            filter_subjects: self.filters.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // One more than the runtime's own limit: the runtime dead-letters at
            // `max_deliver`, the server must still deliver that last attempt.
            max_deliver: self.max_deliver + 1,
            max_ack_pending: 1_000,
            ..Default::default()
        }
    }
}

/// The consumers of the transfer workflow's steps. Each waits on the event that
/// hands a workflow to it; until a step's worker runs, its workflows wait there.
pub fn workflow_consumers() -> Vec<StepConsumer> {
    let step = |name, event: EventType| StepConsumer {
        name,
        filters: vec![subjects::event_type_filter(
            AggregateKind::Tx,
            event.as_str(),
        )],
        max_deliver: 5,
        ack_wait: Duration::from_secs(30),
    };
    vec![
        step("policy", EventType::TransactionCreated),
        // Asks approvers when a decision needs them, tells them how it ended.
        StepConsumer {
            name: "approvals",
            filters: [
                EventType::PolicyEvaluated,
                EventType::TransactionApproved,
                EventType::TransactionRejected,
            ]
            .iter()
            .map(|e| subjects::event_type_filter(AggregateKind::Tx, e.as_str()))
            .collect(),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
        },
        // Builds the transaction once a transfer may go on: allowed outright, or by
        // the approval that completed the quorum.
        StepConsumer {
            name: "build",
            filters: vec![
                subjects::event_type_filter(AggregateKind::Tx, EventType::PolicyEvaluated.as_str()),
                subjects::event_type_filter(
                    AggregateKind::Tx,
                    EventType::TransactionApproved.as_str(),
                ),
            ],
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
        },
        StepConsumer {
            name: "signing",
            filters: vec![subjects::event_type_filter(
                AggregateKind::Tx,
                EventType::TransactionBuilt.as_str(),
            )],
            max_deliver: 5,
            ack_wait: Duration::from_secs(60),
        },
        step("broadcast", EventType::TransactionSigned),
    ]
}

/// The consumer definition of one workflow step, by name.
pub fn workflow_consumer(name: &str) -> Option<StepConsumer> {
    workflow_consumers().into_iter().find(|c| c.name == name)
}

/// What provisioning did to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub what: String,
    pub created: bool,
}

/// Creates or updates the streams and workflow consumers; safe to run again.
pub async fn provision(
    js: &jetstream::Context,
    settings: StreamSettings,
) -> Result<Vec<Provisioned>, async_nats::Error> {
    let mut done = Vec::new();
    for config in [events_stream(settings), dlq_stream(settings)] {
        let existed = js.get_stream(&config.name).await.is_ok();
        js.create_or_update_stream(config.clone()).await?;
        done.push(Provisioned {
            what: format!("stream {}", config.name),
            created: !existed,
        });
    }
    for bucket in [
        guardians_bucket(settings),
        ledger_lease_bucket(settings),
        approval_links_bucket(settings),
        mfa_bucket(settings),
    ] {
        let existed = js.get_key_value(&bucket.bucket).await.is_ok();
        let name = bucket.bucket.clone();
        js.create_or_update_key_value(bucket).await?;
        done.push(Provisioned {
            what: format!("key-value bucket {name}"),
            created: !existed,
        });
    }
    let events = js.get_stream(subjects::EVENTS_STREAM).await?;
    for step in workflow_consumers() {
        let existed = events.consumer_info(step.name).await.is_ok();
        events.create_consumer(step.config()).await?;
        done.push(Provisioned {
            what: format!("consumer {}/{}", subjects::EVENTS_STREAM, step.name),
            created: !existed,
        });
    }
    Ok(done)
}

/// One event ready to publish, with its chain fields.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub subject: String,
    pub msg_id: String,
    pub body: Bytes,
    pub prev_hash: String,
    pub hash: String,
}

/// A JetStream publish acknowledgement, or its error.
#[derive(Debug, Clone, Deserialize)]
pub struct PubAck {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub error: Option<ApiError>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub code: u64,
    #[serde(default)]
    pub err_code: u64,
    #[serde(default)]
    pub description: String,
}

/// How a group of events goes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// One JetStream atomic batch: stored all or none, one fsync for all of them.
    /// The right choice when the server fsyncs every write (`sync_interval: always`).
    Atomic,
    /// Separate messages, each checked against its predecessor's sequence and only
    /// the last acknowledged: cheaper for the server when it does not fsync each
    /// write, but not all-or-none, so only for groups of independent events.
    Pipelined,
}

/// Pipelined appends to the event stream. Each call publishes one batch (atomic
/// when it holds more than one event) whose first event carries the stream's
/// expected last sequence, so a second writer can never interleave. Acks arrive
/// in [`EventPublisher::next_ack`] tagged with the token `publish` returned.
#[derive(Debug)]
pub struct EventPublisher {
    client: Client,
    inbox: String,
    acks: Subscriber,
    next_token: u64,
}

impl EventPublisher {
    pub async fn new(client: Client) -> Result<Self, async_nats::Error> {
        let inbox = client.new_inbox();
        let acks = client.subscribe(format!("{inbox}.*")).await?;
        Ok(EventPublisher {
            client,
            inbox,
            acks,
            next_token: 0,
        })
    }

    /// Publishes `events` (at least one) to follow stream sequence `expected_last_seq`.
    pub async fn publish(
        &mut self,
        expected_last_seq: u64,
        events: &[OutgoingEvent],
        batching: Batching,
    ) -> Result<u64, async_nats::Error> {
        let token = self.next_token;
        self.next_token += 1;
        let batch_id = format!(
            "b{token}-{}",
            &self.inbox[self.inbox.len().saturating_sub(8)..]
        );
        let atomic = batching == Batching::Atomic && events.len() > 1;
        for (i, e) in events.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", e.msg_id.as_str());
            h.insert(subjects::headers::PREV_HASH, e.prev_hash.as_str());
            h.insert(subjects::headers::HASH, e.hash.as_str());
            // A batch is checked once, at its start; pipelined messages each check
            // their own predecessor, so the first refusal refuses all that follow.
            if i == 0 || !atomic {
                h.insert(
                    "Nats-Expected-Last-Sequence",
                    (expected_last_seq + i as u64).to_string().as_str(),
                );
            }
            if atomic {
                h.insert("Nats-Batch-Id", batch_id.as_str());
                h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            }
            if i + 1 == events.len() {
                if atomic {
                    h.insert("Nats-Batch-Commit", "1");
                }
                let reply = format!("{}.{token}", self.inbox);
                self.client
                    .publish_with_reply_and_headers(e.subject.clone(), reply, h, e.body.clone())
                    .await?;
            } else {
                self.client
                    .publish_with_headers(e.subject.clone(), h, e.body.clone())
                    .await?;
            }
        }
        self.client.flush().await?;
        Ok(token)
    }

    /// The next acknowledgement: the token of its batch and the server's answer.
    pub async fn next_ack(&mut self) -> Option<(u64, PubAck)> {
        loop {
            let msg = self.acks.next().await?;
            let Some(token) = msg.subject.rsplit('.').next().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let ack = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| PubAck {
                seq: 0,
                duplicate: false,
                error: Some(ApiError {
                    code: 0,
                    err_code: 0,
                    description: format!("unreadable ack: {e}"),
                }),
            });
            return Some((token, ack));
        }
    }
}

/// One stored event as read back.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    pub body: Bytes,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

impl StoredEvent {
    pub fn link(&self) -> custos_engine::chain::Link<'_> {
        custos_engine::chain::Link {
            seq: self.seq,
            subject: &self.subject,
            body: &self.body,
            prev_hash: self.prev_hash.as_deref(),
            hash: self.hash.as_deref(),
        }
    }

    pub fn from_message(msg: &jetstream::Message) -> Result<Self, async_nats::Error> {
        let info = msg.info()?;
        let header = |k: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.as_str().to_string())
        };
        Ok(StoredEvent {
            seq: info.stream_sequence,
            subject: msg.subject.to_string(),
            body: msg.payload.clone(),
            prev_hash: header(subjects::headers::PREV_HASH),
            hash: header(subjects::headers::HASH),
        })
    }
}

/// Verifies the live events stream with `verifier`, following it from where it
/// starts (after aged-out events, a signed checkpoint must vouch for the start).
pub async fn verify_events(
    js: &jetstream::Context,
    mut verifier: custos_engine::chain::Verifier,
) -> Result<Result<custos_engine::chain::Verified, custos_engine::chain::Break>, async_nats::Error>
{
    let from = match trail_start(js).await? {
        TrailStart::Genesis => 1,
        TrailStart::AgedOut(first) => first.seq,
        TrailStart::Empty { next_seq } => next_seq,
    };
    let mut broken = None;
    let mut first_read = true;
    read_events(js, from, None, |stored| {
        // The server's retention decides where the trail starts, also if more
        // aged out since it was asked.
        if std::mem::take(&mut first_read)
            && stored.seq > 1
            && let Err(b) = verifier.resume_at(stored.link())
        {
            broken = Some(b);
        }
        if broken.is_none()
            && let Err(b) = verifier.push(stored.link())
        {
            broken = Some(b);
        }
        Ok(())
    })
    .await?;
    Ok(match broken {
        Some(b) => Err(b),
        None => verifier.finish(),
    })
}

/// Where the events stream starts when retention removed its first events.
#[derive(Debug, Clone)]
pub enum TrailStart {
    /// Nothing aged out: the chain starts at seq 1 from the genesis hash.
    Genesis,
    /// Events before this one aged out: the chain continues from its recorded
    /// predecessor.
    AgedOut(StoredEvent),
    /// Everything aged out; the next event will have this seq.
    Empty { next_seq: u64 },
}

/// Where the trail starts (see [`TrailStart`]).
pub async fn trail_start(js: &jetstream::Context) -> Result<TrailStart, async_nats::Error> {
    let mut stream = js.get_stream(subjects::EVENTS_STREAM).await?;
    let state = stream.info().await?.state.clone();
    if state.first_sequence <= 1 {
        return Ok(TrailStart::Genesis);
    }
    if state.messages == 0 {
        return Ok(TrailStart::Empty {
            next_seq: state.last_sequence + 1,
        });
    }
    let msg = stream.get_raw_message(state.first_sequence).await?;
    let header = |k: &str| msg.headers.get(k).map(|v| v.as_str().to_string());
    Ok(TrailStart::AgedOut(StoredEvent {
        seq: msg.sequence,
        subject: msg.subject.to_string(),
        body: msg.payload.clone(),
        prev_hash: header(subjects::headers::PREV_HASH),
        hash: header(subjects::headers::HASH),
    }))
}

/// Reads the events stream in order from `from_seq`, optionally filtered, calling
/// `each` for every event, until the end as of the call. Returns how many were read.
pub async fn read_events<F>(
    js: &jetstream::Context,
    from_seq: u64,
    filter: Option<String>,
    mut each: F,
) -> Result<u64, async_nats::Error>
where
    F: FnMut(StoredEvent) -> Result<(), async_nats::Error>,
{
    let stream = js.get_stream(subjects::EVENTS_STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.unwrap_or_default(),
            deliver_policy: if from_seq <= 1 {
                consumer::DeliverPolicy::All
            } else {
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from_seq,
                }
            },
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await?;
    let mut read = 0;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let pending = msg.info()?.pending;
        each(StoredEvent::from_message(&msg)?)?;
        read += 1;
        if pending == 0 {
            break;
        }
    }
    Ok(read)
}
