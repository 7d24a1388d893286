//! The runtime every workflow step runs in: a durable pull consumer with explicit
//! acks. For each event it asks the step what to append next and appends it with
//! the event's version as the expected one, so a redelivered or concurrently
//! handled event can never advance a workflow twice.
//!
//! - transient error: nak with backoff, redelivered later;
//! - permanent error: a failure event on the workflow (`TRANSACTION_FAILED` for
//!   transfers, `ALERT_RAISED` otherwise), then ack;
//! - poison (undecodable, or still failing at the last allowed delivery, or the
//!   step panicked that often): copied to `custos.dlq.<step>` with the reason,
//!   a `MESSAGE_DEAD_LETTERED` event, then ack.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use custos_adapters::jetstream::StepConsumer;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, Outcome, Payload, Proposal,
    RequestContext, Target, codec, subjects,
};
use futures::StreamExt;

use crate::Shutdown;
use crate::remote::Appender;

/// Why a step could not handle an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth retrying later (a node or service is down).
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help; the workflow records the failure.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// One workflow step: given an event, the events to append next.
pub trait Step: Send + Sync + 'static {
    fn consumer(&self) -> StepConsumer;
    fn handle(
        &self,
        event: &Event,
    ) -> impl Future<Output = Result<Vec<Proposal>, StepError>> + Send;
}

/// Backoff before the n-th redelivery after a transient error.
pub fn backoff(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 8) as u32 - 1;
    Duration::from_millis(200u64 << exp).min(Duration::from_secs(30))
}

/// Runs `step` until `shutdown`.
pub async fn run<S: Step, A: Appender>(
    js: jetstream::Context,
    ledger: A,
    step: S,
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let def = step.consumer();
    let stream = js.get_stream(subjects::EVENTS_STREAM).await?;
    let consumer = stream.create_consumer(def.config()).await?;
    let mut messages = consumer.messages().await?;
    let step = Arc::new(step);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            msg = messages.next() => match msg {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(step = def.name, error = %e, "consumer error");
                    continue;
                }
                None => break,
            },
        };
        // Several messages in flight (each workflow's order is kept by the
        // ledger's version check, not by handling one at a time).
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (js, ledger, step, def) = (js.clone(), ledger.clone(), step.clone(), def.clone());
        tokio::spawn(async move {
            // Handled in its own task so a panicking step cannot take the
            // runtime down; a panic counts as a transient failure.
            let name = def.name;
            if let Err(e) = tokio::spawn(handle_message(js, ledger, step, def, msg)).await {
                tracing::error!(step = name, error = %e, "step task failed");
            }
            drop(permit);
        });
    }
    // Let the messages in flight settle before returning.
    let _ = in_flight.acquire_many(IN_FLIGHT as u32).await;
    Ok(())
}

/// Messages a step handles at once.
const IN_FLIGHT: usize = 32;

/// One delivery of one message to a step, and what the runtime needs to settle it.
struct Delivery<'a, A> {
    js: &'a jetstream::Context,
    ledger: &'a A,
    def: &'a StepConsumer,
    msg: &'a jetstream::Message,
    stream_seq: u64,
    delivered: i64,
}

/// How a delivery ends.
enum Settle {
    Ack,
    /// Transient: redeliver later, or dead-letter at the last attempt.
    Retry(String),
    /// Permanent: record the failure on the workflow.
    Fail(String),
}

async fn handle_message<S: Step, A: Appender>(
    js: jetstream::Context,
    ledger: A,
    step: Arc<S>,
    def: StepConsumer,
    msg: jetstream::Message,
) {
    let (delivered, stream_seq) = match msg.info() {
        Ok(info) => (info.delivered, info.stream_sequence),
        Err(_) => (1, 0),
    };
    let d = Delivery {
        js: &js,
        ledger: &ledger,
        def: &def,
        msg: &msg,
        stream_seq,
        delivered,
    };
    let event: Event = match codec::from_msgpack(&msg.payload) {
        Ok(e) => e,
        Err(e) => return d.dead_letter(&format!("undecodable event: {e}")).await,
    };
    let outcome = {
        let (step, event) = (step.clone(), event.clone());
        tokio::spawn(async move { step.handle(&event).await }).await
    };
    let settle = match outcome {
        Err(panic) => Settle::Retry(format!("step panicked: {panic}")),
        Ok(Err(StepError::Transient(reason))) => Settle::Retry(reason),
        Ok(Err(StepError::Permanent(reason))) => Settle::Fail(reason),
        Ok(Ok(proposals)) if proposals.is_empty() => Settle::Ack,
        Ok(Ok(proposals)) => match ledger.append(proposals).await {
            // Conflict: the workflow moved on, so this event was handled already.
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => Settle::Ack,
            AppendReply::Refused { reason } => Settle::Fail(reason),
            AppendReply::Unavailable { reason } => Settle::Retry(reason),
        },
    };
    match settle {
        Settle::Ack => ack(&msg).await,
        Settle::Retry(reason) => d.retry_or_dead_letter(&reason).await,
        Settle::Fail(reason) => d.fail_permanently(&event, &reason).await,
    }
}

impl<A: Appender> Delivery<'_, A> {
    async fn retry_or_dead_letter(&self, reason: &str) {
        if self.delivered >= self.def.max_deliver {
            let why = format!(
                "still failing after {} deliveries: {reason}",
                self.delivered
            );
            self.dead_letter(&why).await;
        } else {
            tracing::info!(
                step = self.def.name,
                seq = self.stream_seq,
                delivered = self.delivered,
                reason,
                "transient failure, redelivering later"
            );
            self.nak().await;
        }
    }

    /// Records a permanent failure on the workflow, then acks.
    async fn fail_permanently(&self, event: &Event, reason: &str) {
        let payload = Payload::StepFailed {
            step: self.def.name.into(),
            reason: reason.into(),
        };
        let proposal = if event.aggregate_kind == AggregateKind::Tx {
            Proposal {
                aggregate_kind: AggregateKind::Tx,
                workflow_id: event.workflow_id.clone(),
                expected_version: event.version,
                event_type: EventType::TransactionFailed,
                causation_id: Some(event.id.clone()),
                actor: Actor::system(self.def.name),
                target: event.target.clone(),
                context: RequestContext::default(),
                result: Outcome::Failure,
                metadata: Default::default(),
                payload,
            }
        } else {
            alert(self.def, self.stream_seq, &event.id, payload)
        };
        match self.ledger.append(vec![proposal]).await {
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => ack(self.msg).await,
            AppendReply::Refused { reason: why } => {
                self.dead_letter(&format!(
                    "{reason}; and the failure could not be recorded: {why}"
                ))
                .await;
            }
            AppendReply::Unavailable { .. } => self.nak().await,
        }
    }

    /// Moves a poison message to the dead-letter stream with its reason, records a
    /// `MESSAGE_DEAD_LETTERED` event, then acks it. If either write fails, the
    /// message is left for redelivery: nothing is dropped silently.
    async fn dead_letter(&self, reason: &str) {
        let (def, msg, stream_seq) = (self.def, self.msg, self.stream_seq);
        tracing::warn!(
            step = def.name,
            seq = stream_seq,
            reason,
            "dead-lettering a message"
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            subjects::headers::DLQ_REASON,
            reason.chars().take(512).collect::<String>().as_str(),
        );
        headers.insert(
            subjects::headers::DLQ_STREAM_SEQ,
            stream_seq.to_string().as_str(),
        );
        headers.insert(subjects::headers::DLQ_SUBJECT, msg.subject.as_str());
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq-{}-{stream_seq}", def.name).as_str(),
        );
        let stored = match self
            .js
            .publish_with_headers(
                subjects::dlq_subject(def.name),
                headers,
                msg.payload.clone(),
            )
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        let payload = Payload::DeadLettered {
            step: def.name.into(),
            stream_sequence: stream_seq,
            subject: msg.subject.to_string(),
            deliveries: self.delivered.max(0) as u64,
            reason: reason.into(),
        };
        let cause = format!("stream-seq-{stream_seq}");
        let recorded = matches!(
            self.ledger
                .append(vec![alert(def, stream_seq, &cause, payload)])
                .await,
            AppendReply::Appended { .. } | AppendReply::Conflict { .. }
        );
        if stored && recorded {
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "could not terminate a dead-lettered message");
            }
        } else {
            self.nak().await;
        }
    }

    async fn nak(&self) {
        if let Err(e) = self
            .msg
            .ack_with(AckKind::Nak(Some(backoff(self.delivered))))
            .await
        {
            tracing::warn!(error = %e, "nak failed; the server redelivers after ack_wait");
        }
    }
}

/// A high-severity alert about transfer `workflow_id`, on its own aggregate
/// `alert_id` (a fixed id makes recording it twice a harmless conflict).
pub fn transfer_alert(
    step: &str,
    alert_id: String,
    workflow_id: &str,
    causation: Option<String>,
    summary: String,
) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::System,
        workflow_id: alert_id,
        expected_version: 0,
        event_type: EventType::AlertRaised,
        causation_id: causation,
        actor: Actor::system(step),
        target: Target {
            kind: "transaction".into(),
            id: workflow_id.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Failure,
        metadata: Default::default(),
        payload: Payload::Alert {
            severity: "high".into(),
            summary,
        },
    }
}

/// An operational event on its own aggregate: one per consumed message, so that
/// recording it again after a redelivery is a harmless conflict.
fn alert(def: &StepConsumer, stream_seq: u64, cause: &str, payload: Payload) -> Proposal {
    let event_type = match payload {
        Payload::DeadLettered { .. } => EventType::MessageDeadLettered,
        _ => EventType::AlertRaised,
    };
    Proposal {
        aggregate_kind: AggregateKind::System,
        workflow_id: format!("{}-{stream_seq}", def.name),
        expected_version: 0,
        event_type,
        causation_id: Some(cause.to_string()),
        actor: Actor::system(def.name),
        target: Target {
            kind: "message".into(),
            id: stream_seq.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Failure,
        metadata: Default::default(),
        payload,
    }
}

async fn ack(msg: &jetstream::Message) {
    if let Err(e) = msg.ack().await {
        tracing::warn!(error = %e, "ack failed; the event will be redelivered and deduplicated");
    }
}
