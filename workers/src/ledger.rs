//! The ledger writer: the one process that extends the event stream and its hash
//! chain. Writers hand it proposals (in-process through [`LedgerHandle`], or over
//! NATS through [`crate::remote`]); it checks them against the engine's state,
//! seals them (version, timestamp, hash), and publishes them as pipelined atomic
//! batches that each carry the stream's expected last sequence. A writer's answer
//! is sent only once its events are durably stored.
//!
//! Failure handling: when an append fails or is not acknowledged in time, the
//! writer stops, replays the stream to learn what was stored, answers the writers
//! whose events made it, and retries the others (their proposals are checked again
//! against the true state). It never extends a chain it could not verify.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use async_nats::jetstream;
use custos_adapters::jetstream::{
    Batching, EventPublisher, OutgoingEvent, PubAck, TrailStart, read_events, trail_start,
};
use custos_engine::chain::{self, ChainHash};
use custos_engine::intake::{self, Admission};
use custos_engine::ledger::{Ledger, ReplayError, SealError, Sealed};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, DecodeError, EventType, IntakeReply, Outcome, Payload,
    Proposal, RequestContext, Target, TransferRequest, subjects,
};
use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot};

use crate::Shutdown;
use crate::lease::{KeptLease, Lease};

/// Tuning of the ledger writer.
#[derive(Debug)]
pub struct LedgerConfig {
    /// Signs checkpoints. Never leaves this process.
    pub audit_key: SigningKey,
    /// A checkpoint after this many events...
    pub checkpoint_every: u64,
    /// ...or after this long with events not yet covered.
    pub checkpoint_interval: Duration,
    /// Most events in one atomic batch.
    pub max_batch: usize,
    /// Most batches awaiting their acknowledgement (with atomic batches, at
    /// most [`ATOMIC_INFLIGHT`]).
    pub max_inflight: usize,
    /// An append not acknowledged within this is treated as failed.
    pub ack_timeout: Duration,
    /// Atomic batches when the server fsyncs every write; pipelining otherwise.
    pub batching: Batching,
    /// With retention by age: a checkpoint at least this often, even when idle.
    pub idle_checkpoint: Option<Duration>,
}

/// Atomic batches awaiting acknowledgement at most. The server writes and
/// fsyncs one stream's batches one after another, and stages each in a
/// temporary file store, so a second batch in flight only splits the waiting
/// events into more, smaller batches: more work for the same events. With
/// one, `custos bench e2e` at 300 transfers/s for 60 s has p99 405–415 ms;
/// with 4, 652–805 ms; with 32 it did not keep up. The price: 1,000 writers
/// appending flat out get 23k events/s instead of 36k.
pub const ATOMIC_INFLIGHT: usize = 1;

impl LedgerConfig {
    /// Batches awaiting acknowledgement at most, for the batching in use.
    fn inflight_limit(&self) -> usize {
        match self.batching {
            Batching::Atomic => self.max_inflight.min(ATOMIC_INFLIGHT),
            Batching::Pipelined => self.max_inflight,
        }
    }

    pub fn new(audit_key: SigningKey) -> Self {
        LedgerConfig {
            audit_key,
            checkpoint_every: 1_000,
            checkpoint_interval: Duration::from_secs(10),
            max_batch: 256,
            max_inflight: 32,
            ack_timeout: Duration::from_secs(5),
            batching: Batching::Atomic,
            idle_checkpoint: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "the audit trail does not verify, refusing to extend it ({0}); run `custos audit verify` to inspect it"
    )]
    Broken(ReplayError),
    #[error("event stream: {0}")]
    Nats(#[from] async_nats::Error),
    #[error("{0}; stopping so that two writers never extend the chain at once")]
    LostLease(String),
}

enum Job {
    Append {
        proposals: Vec<Proposal>,
        reply: oneshot::Sender<AppendReply>,
    },
    Intake {
        request: Box<IntakeRequest>,
        reply: oneshot::Sender<IntakeReply>,
    },
}

/// An upstream request as intake decoded it.
#[derive(Clone)]
struct IntakeRequest {
    decoded: Result<TransferRequest, DecodeError>,
    context: RequestContext,
}

/// Submits work to the ledger writer running in this process.
#[derive(Debug, Clone)]
pub struct LedgerHandle {
    jobs: mpsc::Sender<Job>,
}

const GONE: &str = "the ledger writer is not running";

impl LedgerHandle {
    /// Appends proposals, all or none; answers once stored.
    pub async fn append(&self, proposals: Vec<Proposal>) -> AppendReply {
        let (reply, answer) = oneshot::channel();
        if self
            .jobs
            .send(Job::Append { proposals, reply })
            .await
            .is_err()
        {
            return AppendReply::Unavailable {
                reason: GONE.into(),
            };
        }
        answer.await.unwrap_or(AppendReply::Unavailable {
            reason: GONE.into(),
        })
    }

    /// Admits an upstream transfer request; answers once the outcome is recorded.
    pub async fn intake(
        &self,
        decoded: Result<TransferRequest, DecodeError>,
        context: RequestContext,
    ) -> IntakeReply {
        let (reply, answer) = oneshot::channel();
        if self
            .jobs
            .send(Job::Intake {
                request: Box::new(IntakeRequest { decoded, context }),
                reply,
            })
            .await
            .is_err()
        {
            return IntakeReply::Unavailable {
                reason: GONE.into(),
            };
        }
        answer.await.unwrap_or(IntakeReply::Unavailable {
            reason: GONE.into(),
        })
    }
}

/// Creates the handle and the receiving end for [`run`].
pub fn channel() -> (LedgerHandle, LedgerJobs) {
    let (jobs, rx) = mpsc::channel(4_096);
    (LedgerHandle { jobs }, LedgerJobs(rx))
}

/// The receiving end of a [`LedgerHandle`].
pub struct LedgerJobs(mpsc::Receiver<Job>);

impl std::fmt::Debug for LedgerJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LedgerJobs")
    }
}

/// Where a job's answer goes.
enum Reply {
    Append(oneshot::Sender<AppendReply>),
    Intake(oneshot::Sender<IntakeReply>),
}

/// What to answer a job with once its events are stored.
enum Answer {
    Appended(oneshot::Sender<AppendReply>),
    Accepted {
        workflow_id: String,
        reply: oneshot::Sender<IntakeReply>,
    },
    Rejected {
        error: custos_schemas::IntakeError,
        reply: oneshot::Sender<IntakeReply>,
    },
    /// A checkpoint: nobody waits.
    Nobody,
}

/// A job whose events are sealed and published, waiting for the ack.
struct Waiter {
    answer: Answer,
    /// What to re-seal if the batch fails. `None` for checkpoints (re-made instead)
    /// and duplicate intakes (answered when the original is).
    retry: Option<Retry>,
    /// (message id, body) of its events, to find them after a failure.
    events: Vec<(String, bytes::Bytes)>,
    /// The same for earlier attempts: one of them may be what the server stored.
    earlier: Vec<Vec<(String, bytes::Bytes)>>,
    sequences: Vec<u64>,
    attempts: u32,
}

/// A job to seal: what, where its answer goes, and what earlier attempts sealed.
struct Work {
    retry: Retry,
    reply: Reply,
    attempts: u32,
    earlier: Vec<Vec<(String, bytes::Bytes)>>,
}

enum Retry {
    Append(Vec<Proposal>),
    Intake(Box<IntakeRequest>),
}

struct Inflight {
    token: u64,
    last_seq: u64,
    sent_at: Instant,
    waiters: Vec<Waiter>,
}

/// Runs the ledger writer until `shutdown`. Returns an error only when it cannot
/// go on safely (a broken trail).
pub async fn run(
    client: Client,
    config: LedgerConfig,
    jobs: LedgerJobs,
    mut shutdown: Shutdown,
) -> Result<(), LedgerError> {
    let js = jetstream::new(client.clone());
    let holder = format!("{}-{}", std::process::id(), client.new_inbox());
    let Some(lease) = Lease::acquire(&js, &holder, &mut shutdown).await? else {
        return Ok(());
    };
    let lease = lease.keep();
    let publisher = EventPublisher::new(client).await?;
    let mut writer = Writer {
        lease,
        js,
        publisher,
        ledger: Ledger::default(),
        confirmed_seq: 0,
        config,
        inflight: VecDeque::new(),
        since_checkpoint: 0,
        last_checkpoint_at: Instant::now(),
        healthy: false,
        retries: VecDeque::new(),
        waiting_duplicates: Vec::new(),
    };
    writer.rebuild(&mut []).await?;
    let mut jobs = jobs.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let can_take = writer.healthy && writer.inflight.len() < writer.config.inflight_limit();
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            Some((token, ack)) = writer.publisher.next_ack() => writer.on_ack(token, ack).await?,
            job = jobs.recv(), if can_take => {
                let Some(job) = job else { break };
                let mut batch = vec![job];
                while batch.len() < writer.config.max_batch {
                    match jobs.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                writer.process(batch).await?;
            }
            _ = tick.tick() => writer.on_tick().await?,
        }
    }
    writer.drain().await;
    writer.lease.release().await;
    Ok(())
}

struct Writer {
    /// Renewed by its own task; once lost, nothing more is published.
    lease: KeptLease,
    js: jetstream::Context,
    publisher: EventPublisher,
    ledger: Ledger,
    confirmed_seq: u64,
    config: LedgerConfig,
    inflight: VecDeque<Inflight>,
    since_checkpoint: u64,
    last_checkpoint_at: Instant,
    healthy: bool,
    /// Jobs to seal again after a failure, before new ones.
    retries: VecDeque<Work>,
    /// Duplicate intakes whose original is not yet acknowledged: (seq, answer).
    waiting_duplicates: Vec<(u64, Answer)>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const MAX_ATTEMPTS: u32 = 5;
/// Longest a full replay may take before it counts as NATS being unreachable.
const REPLAY_LIMIT: Duration = Duration::from_secs(300);

impl Writer {
    async fn process(&mut self, jobs: Vec<Job>) -> Result<(), LedgerError> {
        let mut sealed_all: Vec<Sealed> = Vec::new();
        let mut waiters = Vec::new();
        let mut work: Vec<Work> = self.retries.drain(..).collect();
        work.extend(jobs.into_iter().map(|job| match job {
            Job::Append { proposals, reply } => Work {
                retry: Retry::Append(proposals),
                reply: Reply::Append(reply),
                attempts: 0,
                earlier: Vec::new(),
            },
            Job::Intake { request, reply } => Work {
                retry: Retry::Intake(request),
                reply: Reply::Intake(reply),
                attempts: 0,
                earlier: Vec::new(),
            },
        }));
        for job in work {
            if sealed_all.len() >= self.config.max_batch {
                // Full: keep the rest for the next batch.
                self.retries.push_back(job);
                continue;
            }
            self.seal_one(job, &mut sealed_all, &mut waiters);
        }
        if self.since_checkpoint + sealed_all.len() as u64 >= self.config.checkpoint_every
            && !sealed_all.is_empty()
        {
            self.seal_checkpoint(&mut sealed_all, &mut waiters);
        }
        self.publish(sealed_all, waiters).await
    }

    fn seal_one(&mut self, job: Work, out: &mut Vec<Sealed>, waiters: &mut Vec<Waiter>) {
        let Work {
            retry,
            reply,
            attempts,
            earlier,
        } = job;
        let (proposals, answer) = match (&retry, reply) {
            (Retry::Append(p), Reply::Append(reply)) => {
                if p.is_empty() {
                    let reason = "an append needs at least one event".to_string();
                    let _ = reply.send(AppendReply::Refused { reason });
                    return;
                }
                if p.len() > self.config.max_batch {
                    let reason = format!(
                        "too many events in one append ({}, at most {})",
                        p.len(),
                        self.config.max_batch
                    );
                    let _ = reply.send(AppendReply::Refused { reason });
                    return;
                }
                (p.clone(), Answer::Appended(reply))
            }
            (Retry::Intake(request), Reply::Intake(reply)) => match intake::admit(
                &self.ledger,
                request.decoded.clone(),
                request.context.clone(),
            ) {
                Admission::Duplicate { workflow_id } => {
                    let created = self
                        .ledger
                        .aggregate(AggregateKind::Tx, &workflow_id)
                        .map_or(0, |a| a.first_seq);
                    let answer = Answer::Accepted { workflow_id, reply };
                    if created <= self.confirmed_seq {
                        answer.send(true, &[]);
                    } else {
                        self.waiting_duplicates.push((created, answer));
                    }
                    return;
                }
                Admission::Create {
                    workflow_id,
                    proposal,
                } => (vec![proposal], Answer::Accepted { workflow_id, reply }),
                Admission::Reject { error, proposal } => {
                    (vec![proposal], Answer::Rejected { error, reply })
                }
            },
            (_, Reply::Append(reply)) => {
                let _ = reply.send(AppendReply::Refused {
                    reason: "internal: job and answer do not match".into(),
                });
                return;
            }
            (_, Reply::Intake(reply)) => {
                let _ = reply.send(IntakeReply::Unavailable {
                    reason: "internal: job and answer do not match".into(),
                });
                return;
            }
        };
        match self.ledger.seal(proposals, now_ms()) {
            Ok(sealed) => {
                let events = sealed
                    .iter()
                    .map(|s| (s.msg_id.clone(), bytes::Bytes::from(s.body.clone())))
                    .collect();
                let sequences = sealed.iter().map(|s| s.seq).collect();
                waiters.push(Waiter {
                    answer,
                    retry: Some(retry),
                    events,
                    earlier,
                    sequences,
                    attempts,
                });
                out.extend(sealed);
            }
            Err(SealError::Conflict {
                workflow_id,
                expected,
                actual,
            }) => answer.conflict(workflow_id, expected, actual),
            Err(SealError::Refused(reason)) => answer.refuse(reason),
        }
    }

    fn seal_checkpoint(&mut self, out: &mut Vec<Sealed>, waiters: &mut Vec<Waiter>) {
        let stream = subjects::EVENTS_STREAM;
        let checkpoint = chain::sign_checkpoint(
            &self.config.audit_key,
            stream,
            self.ledger.last_seq(),
            &self.ledger.head(),
        );
        let proposal = Proposal {
            aggregate_kind: AggregateKind::Audit,
            workflow_id: "chain".into(),
            expected_version: self.ledger.version(AggregateKind::Audit, "chain"),
            event_type: EventType::AuditCheckpoint,
            causation_id: None,
            actor: Actor::system("ledger"),
            target: Target {
                kind: "audit-chain".into(),
                id: stream.into(),
                amount: None,
                currency: None,
            },
            context: RequestContext::default(),
            result: Outcome::Success,
            metadata: Default::default(),
            payload: Payload::Checkpoint(checkpoint),
        };
        if let Ok(sealed) = self.ledger.seal(vec![proposal], now_ms()) {
            let sequences = sealed.iter().map(|s| s.seq).collect();
            waiters.push(Waiter {
                answer: Answer::Nobody,
                retry: None,
                events: Vec::new(),
                earlier: Vec::new(),
                sequences,
                attempts: 0,
            });
            out.extend(sealed);
            self.since_checkpoint = 0;
            self.last_checkpoint_at = Instant::now();
        }
    }

    async fn publish(
        &mut self,
        sealed: Vec<Sealed>,
        waiters: Vec<Waiter>,
    ) -> Result<(), LedgerError> {
        if self.lease.lost() {
            return Err(LedgerError::LostLease(
                "the ledger writer lease was lost".into(),
            ));
        }
        self.since_checkpoint += sealed
            .iter()
            .filter(|s| s.event.event_type != EventType::AuditCheckpoint)
            .count() as u64;
        let mut sealed = sealed.into_iter();
        let mut groups = self.group(waiters).into_iter();
        while let Some((batching, waiters, count)) = groups.next() {
            let outgoing: Vec<OutgoingEvent> = sealed
                .by_ref()
                .take(count)
                .map(|s| OutgoingEvent {
                    subject: s.subject,
                    msg_id: s.msg_id,
                    body: s.body.into(),
                    prev_hash: s.prev_hash.to_hex(),
                    hash: s.hash.to_hex(),
                })
                .collect();
            let Some(last_seq) = waiters
                .iter()
                .flat_map(|w| w.sequences.iter())
                .max()
                .copied()
            else {
                continue;
            };
            let expected = last_seq - outgoing.len() as u64;
            let sent_at = Instant::now();
            // While NATS reconnects, a publish or flush waits for the connection:
            // bound it, so that recovery (and shutdown) still run.
            let published = tokio::time::timeout(
                self.config.ack_timeout,
                self.publisher.publish(expected, &outgoing, batching),
            )
            .await
            .unwrap_or_else(|_| Err("publishing timed out".into()));
            match published {
                Ok(token) => self.inflight.push_back(Inflight {
                    token,
                    last_seq,
                    sent_at,
                    waiters,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "publishing to the event stream failed");
                    // This group and the ones not yet sent are resolved by recovery.
                    let unsent = waiters
                        .into_iter()
                        .chain(groups.flat_map(|(_, w, _)| w))
                        .collect();
                    self.inflight.push_back(Inflight {
                        token: u64::MAX,
                        last_seq,
                        sent_at,
                        waiters: unsent,
                    });
                    return self.recover().await;
                }
            }
        }
        Ok(())
    }

    /// Splits waiters (in sealing order) into groups to publish, with their event
    /// counts: one atomic batch, or, when pipelining, runs of single-event appends
    /// pipelined and every multi-event append as its own atomic batch.
    fn group(&self, waiters: Vec<Waiter>) -> Vec<(Batching, Vec<Waiter>, usize)> {
        let mut groups: Vec<(Batching, Vec<Waiter>, usize)> = Vec::new();
        for w in waiters {
            let n = w.sequences.len();
            let batching = match self.config.batching {
                Batching::Pipelined if n == 1 => Batching::Pipelined,
                _ => Batching::Atomic,
            };
            match groups.last_mut() {
                Some((b, ws, count)) if *b == batching => {
                    ws.push(w);
                    *count += n;
                }
                _ => groups.push((batching, vec![w], n)),
            }
        }
        groups
    }

    async fn on_ack(&mut self, token: u64, ack: PubAck) -> Result<(), LedgerError> {
        let Some(front) = self.inflight.front() else {
            return Ok(());
        };
        if front.token != token {
            // A late answer to a batch already given up on. If the server stored
            // it after all, the state rebuilt since does not know: rebuild again.
            if ack.error.is_none() && ack.seq > self.confirmed_seq {
                tracing::warn!(seq = ack.seq, "a batch given up on was stored after all");
                return self.recover().await;
            }
            return Ok(());
        }
        if ack.duplicate {
            // The server already had this message id: what it holds is an earlier
            // attempt, not these bytes. Learn what is stored before going on.
            tracing::warn!(seq = ack.seq, "append answered as a duplicate");
            return self.recover().await;
        }
        if let Some(err) = &ack.error {
            tracing::warn!(code = err.err_code, description = %err.description, "append refused by the server");
            return self.recover().await;
        }
        if ack.seq != front.last_seq {
            tracing::warn!(
                expected = front.last_seq,
                got = ack.seq,
                "append stored at an unexpected sequence"
            );
            return self.recover().await;
        }
        if let Some(done) = self.inflight.pop_front() {
            self.confirmed_seq = done.last_seq;
            for w in done.waiters {
                w.answer.send(false, &w.sequences);
            }
            self.answer_duplicates();
        }
        Ok(())
    }

    fn answer_duplicates(&mut self) {
        let confirmed = self.confirmed_seq;
        let (ready, waiting) = std::mem::take(&mut self.waiting_duplicates)
            .into_iter()
            .partition(|(seq, _)| *seq <= confirmed);
        self.waiting_duplicates = waiting;
        for (_, answer) in ready {
            answer.send(true, &[]);
        }
    }

    async fn on_tick(&mut self) -> Result<(), LedgerError> {
        if !self.healthy {
            return self.recover().await;
        }
        if let Some(front) = self.inflight.front()
            && front.sent_at.elapsed() > self.config.ack_timeout
        {
            tracing::warn!(seq = front.last_seq, "append not acknowledged in time");
            return self.recover().await;
        }
        let since = self.last_checkpoint_at.elapsed();
        // Idle checkpoints keep a signed head in the trail when retention would
        // otherwise age out every checkpoint of a quiet system.
        let due = (self.since_checkpoint > 0 && since >= self.config.checkpoint_interval)
            || self
                .config
                .idle_checkpoint
                .is_some_and(|idle| since >= idle);
        if due && self.inflight.len() < self.config.inflight_limit() {
            let mut sealed = Vec::new();
            let mut waiters = Vec::new();
            self.seal_checkpoint(&mut sealed, &mut waiters);
            self.publish(sealed, waiters).await?;
        }
        if !self.retries.is_empty() {
            self.process(Vec::new()).await?;
        }
        Ok(())
    }

    /// After a failed append: learn what was stored, answer those writers, retry the rest.
    async fn recover(&mut self) -> Result<(), LedgerError> {
        self.healthy = false;
        let mut waiters: Vec<Waiter> = self.inflight.drain(..).flat_map(|i| i.waiters).collect();
        match self.rebuild(&mut waiters).await {
            Ok(()) => {}
            Err(LedgerError::Nats(e)) => {
                // Still unreachable: keep the writers waiting until they time out, and
                // try again on the next tick.
                tracing::warn!(error = %e, "event stream unreachable; retrying");
                let mut keep = Vec::new();
                for mut w in waiters {
                    w.attempts += 1;
                    if w.attempts >= MAX_ATTEMPTS {
                        w.answer
                            .fail("the event stream is unreachable; retry with the same ids");
                    } else {
                        keep.push(w);
                    }
                }
                self.inflight.push_back(Inflight {
                    token: u64::MAX,
                    last_seq: 0,
                    sent_at: Instant::now(),
                    waiters: keep,
                });
                return Ok(());
            }
            Err(broken) => return Err(broken),
        }
        for w in waiters {
            let stored = !w.sequences.is_empty();
            if stored {
                w.answer.send(false, &w.sequences);
            } else if let Some(retry) = w.retry {
                if w.attempts + 1 >= MAX_ATTEMPTS {
                    w.answer
                        .fail("the event stream did not store the event; retry with the same ids");
                } else {
                    if let Some(reply) = w.answer.into_reply() {
                        let mut earlier = w.earlier;
                        earlier.push(w.events);
                        self.retries.push_back(Work {
                            retry,
                            reply,
                            attempts: w.attempts + 1,
                            earlier,
                        });
                    }
                }
            }
        }
        // Duplicates waited on an original that may now sit elsewhere or nowhere:
        // let them ask again (intake is idempotent by request id).
        for (_, answer) in std::mem::take(&mut self.waiting_duplicates) {
            answer.fail(
                "the original request is being recorded again; retry with the same request id",
            );
        }
        Ok(())
    }

    /// Replays the whole stream into a fresh ledger, verifying the chain. Marks the
    /// waiters whose events are found, byte for byte, with their sequences.
    async fn rebuild(&mut self, waiters: &mut [Waiter]) -> Result<(), LedgerError> {
        // Every attempt of every waiter: (waiter, attempt, event) by message id.
        // Attempt 0 is the latest; the server may hold any one of them.
        let mut wanted: HashMap<String, Vec<(usize, usize, usize)>> = HashMap::new();
        let mut found: Vec<Vec<Vec<u64>>> = Vec::with_capacity(waiters.len());
        for (wi, w) in waiters.iter().enumerate() {
            let attempts: Vec<&Vec<(String, bytes::Bytes)>> = std::iter::once(&w.events)
                .chain(w.earlier.iter().rev())
                .collect();
            for (ai, events) in attempts.iter().enumerate() {
                for (ei, (id, _)) in events.iter().enumerate() {
                    wanted.entry(id.clone()).or_default().push((wi, ai, ei));
                }
            }
            found.push(
                attempts
                    .iter()
                    .map(|events| vec![0; events.len()])
                    .collect(),
            );
        }
        // With retention, the trail may start after aged-out events: replay goes on
        // from the first one's recorded predecessor, and a checkpoint right after
        // the replay vouches for the resumed chain from then on.
        let (mut ledger, from) = match trail_start(&self.js).await? {
            TrailStart::Genesis => (Ledger::default(), 1),
            TrailStart::AgedOut(first) => (Ledger::default(), first.seq),
            TrailStart::Empty { next_seq } => {
                (Ledger::resume(next_seq, ChainHash::GENESIS), next_seq)
            }
        };
        let mut first_read = true;
        let mut resumed = from > 1;
        let mut broken = None;
        let mut since_checkpoint = u64::from(resumed);
        let replay = read_events(&self.js, from, None, |stored| {
            if broken.is_some() {
                return Ok(());
            }
            // The first event delivered may sit later than asked: more aged out
            // meanwhile. The chain goes on from its recorded predecessor.
            if std::mem::take(&mut first_read) && stored.seq > 1 {
                match stored.prev_hash.as_deref().and_then(ChainHash::from_hex) {
                    Some(prev) => ledger = Ledger::resume(stored.seq, prev),
                    None => {
                        broken = Some(ReplayError {
                            seq: stored.seq,
                            reason: "the first retained event has no chain hash".into(),
                        });
                        return Ok(());
                    }
                }
                resumed = true;
                since_checkpoint = 1;
            }
            if let Err(e) = ledger.replay(stored.link()) {
                broken = Some(e);
                return Ok(());
            }
            since_checkpoint = if stored
                .subject
                .ends_with(EventType::AuditCheckpoint.as_str())
            {
                0
            } else {
                since_checkpoint + 1
            };
            if !wanted.is_empty() {
                let id = custos_schemas::codec::from_msgpack::<custos_schemas::Event>(&stored.body)
                    .map(|e| e.id)
                    .unwrap_or_default();
                for (wi, ai, ei) in wanted.get(&id).into_iter().flatten() {
                    let w = &waiters[*wi];
                    let body = if *ai == 0 {
                        &w.events[*ei].1
                    } else {
                        &w.earlier[w.earlier.len() - ai][*ei].1
                    };
                    if *body == stored.body {
                        found[*wi][*ai][*ei] = stored.seq;
                    }
                }
            }
            Ok(())
        });
        // A replay of a million events takes seconds; one that makes no progress
        // for minutes means NATS is gone.
        tokio::time::timeout(REPLAY_LIMIT, replay)
            .await
            .map_err(|_| LedgerError::Nats("replaying the event stream timed out".into()))??;
        if let Some(e) = broken {
            return Err(LedgerError::Broken(e));
        }
        // A waiter is stored when one of its attempts is stored whole.
        for (w, attempts) in waiters.iter_mut().zip(found) {
            w.sequences = attempts
                .into_iter()
                .find(|seqs| !seqs.is_empty() && seqs.iter().all(|s| *s > 0))
                .unwrap_or_default();
        }
        tracing::info!(events = ledger.last_seq(), head = ?ledger.head(), "ledger state rebuilt from the event stream");
        self.confirmed_seq = ledger.last_seq();
        self.ledger = ledger;
        self.healthy = true;
        self.since_checkpoint = since_checkpoint;
        if resumed {
            tracing::info!(
                from,
                "the trail starts after aged-out events; checkpointing the resumed chain"
            );
            self.last_checkpoint_at = Instant::now() - self.config.checkpoint_interval;
        }
        Ok(())
    }

    /// On shutdown: checkpoint the head, and wait briefly for outstanding acks so
    /// writers get their answers.
    async fn drain(&mut self) {
        // A last checkpoint, so that the head at shutdown is signed.
        if self.healthy && self.since_checkpoint > 0 {
            let (mut sealed, mut waiters) = (Vec::new(), Vec::new());
            self.seal_checkpoint(&mut sealed, &mut waiters);
            if self.publish(sealed, waiters).await.is_err() {
                tracing::warn!("could not append the shutdown checkpoint");
            }
        }
        let deadline = Instant::now() + self.config.ack_timeout;
        while !self.inflight.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout(deadline - Instant::now(), self.publisher.next_ack()).await {
                Ok(Some((token, ack))) => {
                    if self.on_ack(token, ack).await.is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        for w in self.inflight.drain(..).flat_map(|i| i.waiters) {
            w.answer.fail("the ledger writer stopped before the event was acknowledged; retry with the same ids");
        }
    }
}

impl Answer {
    fn into_reply(self) -> Option<Reply> {
        match self {
            Answer::Appended(reply) => Some(Reply::Append(reply)),
            Answer::Accepted { reply, .. } | Answer::Rejected { reply, .. } => {
                Some(Reply::Intake(reply))
            }
            Answer::Nobody => None,
        }
    }

    fn send(self, duplicate: bool, sequences: &[u64]) {
        match self {
            Answer::Appended(reply) => {
                let _ = reply.send(AppendReply::Appended {
                    sequences: sequences.to_vec(),
                });
            }
            Answer::Accepted { workflow_id, reply } => {
                let _ = reply.send(IntakeReply::Accepted {
                    workflow_id,
                    duplicate,
                });
            }
            Answer::Rejected { error, reply } => {
                let _ = reply.send(IntakeReply::Rejected(error));
            }
            Answer::Nobody => {}
        }
    }

    fn fail(self, reason: &str) {
        match self {
            Answer::Appended(reply) => {
                let _ = reply.send(AppendReply::Unavailable {
                    reason: reason.into(),
                });
            }
            Answer::Accepted { reply, .. } | Answer::Rejected { reply, .. } => {
                let _ = reply.send(IntakeReply::Unavailable {
                    reason: reason.into(),
                });
            }
            Answer::Nobody => {}
        }
    }

    fn conflict(self, workflow_id: String, expected_version: u64, actual_version: u64) {
        match self {
            Answer::Appended(reply) => {
                let _ = reply.send(AppendReply::Conflict {
                    workflow_id,
                    expected_version,
                    actual_version,
                });
            }
            other => other.fail("internal: intake conflict; retry with the same request id"),
        }
    }

    fn refuse(self, reason: String) {
        match self {
            Answer::Appended(reply) => {
                let _ = reply.send(AppendReply::Refused { reason });
            }
            other => other.fail(&reason),
        }
    }
}
