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
        // Steps are handled in their own task so a panicking step cannot take the
        // runtime down; a panic counts as a transient failure.
        let handled = tokio::spawn(handle_message(
            js.clone(),
            ledger.clone(),
            step.clone(),
            def.clone(),
            msg,
        ))
        .await;
        if let Err(e) = handled {
            tracing::error!(step = def.name, error = %e, "step task failed");
        }
    }
    Ok(())
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
    let last_attempt = delivered >= def.max_deliver;
    let event: Event = match codec::from_msgpack(&msg.payload) {
        Ok(e) => e,
        Err(e) => {
            dead_letter(
                &js,
                &ledger,
                &def,
                &msg,
                stream_seq,
                delivered,
                &format!("undecodable event: {e}"),
            )
            .await;
            return;
        }
    };
    let outcome = {
        let step = step.clone();
        let event = event.clone();
        tokio::spawn(async move { step.handle(&event).await }).await
    };
    let result = match outcome {
        Ok(r) => r,
        Err(panic) => Err(StepError::Transient(format!("step panicked: {panic}"))),
    };
    match result {
        Ok(proposals) if proposals.is_empty() => ack(&msg).await,
        Ok(proposals) => match ledger.append(proposals).await {
            // Conflict: the workflow moved on, so this event was handled already.
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => ack(&msg).await,
            AppendReply::Refused { reason } => {
                fail_permanently(
                    &js, &ledger, &def, &msg, &event, stream_seq, delivered, &reason,
                )
                .await
            }
            AppendReply::Unavailable { reason } => {
                retry_or_dead_letter(
                    &js,
                    &ledger,
                    &def,
                    &msg,
                    stream_seq,
                    delivered,
                    last_attempt,
                    &reason,
                )
                .await
            }
        },
        Err(StepError::Transient(reason)) => {
            retry_or_dead_letter(
                &js,
                &ledger,
                &def,
                &msg,
                stream_seq,
                delivered,
                last_attempt,
                &reason,
            )
            .await
        }
        Err(StepError::Permanent(reason)) => {
            fail_permanently(
                &js, &ledger, &def, &msg, &event, stream_seq, delivered, &reason,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn retry_or_dead_letter<A: Appender>(
    js: &jetstream::Context,
    ledger: &A,
    def: &StepConsumer,
    msg: &jetstream::Message,
    stream_seq: u64,
    delivered: i64,
    last_attempt: bool,
    reason: &str,
) {
    if last_attempt {
        let why = format!("still failing after {delivered} deliveries: {reason}");
        dead_letter(js, ledger, def, msg, stream_seq, delivered, &why).await;
    } else {
        tracing::info!(
            step = def.name,
            seq = stream_seq,
            delivered,
            reason,
            "transient failure, redelivering later"
        );
        if let Err(e) = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await {
            tracing::warn!(error = %e, "nak failed; the server redelivers after ack_wait");
        }
    }
}

/// Records a permanent failure on the workflow, then acks.
#[allow(clippy::too_many_arguments)]
async fn fail_permanently<A: Appender>(
    js: &jetstream::Context,
    ledger: &A,
    def: &StepConsumer,
    msg: &jetstream::Message,
    event: &Event,
    stream_seq: u64,
    delivered: i64,
    reason: &str,
) {
    let payload = Payload::StepFailed {
        step: def.name.into(),
        reason: reason.into(),
    };
    let proposal = if event.aggregate_kind == AggregateKind::Tx {
        Proposal {
            aggregate_kind: AggregateKind::Tx,
            workflow_id: event.workflow_id.clone(),
            expected_version: event.version,
            event_type: EventType::TransactionFailed,
            causation_id: Some(event.id.clone()),
            actor: Actor::system(def.name),
            target: event.target.clone(),
            context: RequestContext::default(),
            result: Outcome::Failure,
            metadata: Default::default(),
            payload,
        }
    } else {
        alert(def, stream_seq, &event.id, payload)
    };
    match ledger.append(vec![proposal]).await {
        AppendReply::Appended { .. } | AppendReply::Conflict { .. } => ack(msg).await,
        AppendReply::Refused { reason: why } => {
            let why = format!("{reason}; and the failure could not be recorded: {why}");
            dead_letter(js, ledger, def, msg, stream_seq, delivered, &why).await;
        }
        AppendReply::Unavailable { .. } => {
            let _ = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
        }
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

/// Moves a poison message to the dead-letter stream with its reason, records a
/// `MESSAGE_DEAD_LETTERED` event, then acks it. If either write fails, the message
/// is left for redelivery: nothing is dropped silently.
async fn dead_letter<A: Appender>(
    js: &jetstream::Context,
    ledger: &A,
    def: &StepConsumer,
    msg: &jetstream::Message,
    stream_seq: u64,
    delivered: i64,
    reason: &str,
) {
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
    let stored = match js
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
        deliveries: delivered.max(0) as u64,
        reason: reason.into(),
    };
    let recorded = matches!(
        ledger
            .append(vec![alert(
                def,
                stream_seq,
                &format!("stream-seq-{stream_seq}"),
                payload
            )])
            .await,
        AppendReply::Appended { .. } | AppendReply::Conflict { .. }
    );
    if stored && recorded {
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            tracing::warn!(error = %e, "could not terminate a dead-lettered message");
        }
    } else {
        let _ = msg.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
    }
}

async fn ack(msg: &jetstream::Message) {
    if let Err(e) = msg.ack().await {
        tracing::warn!(error = %e, "ack failed; the event will be redelivered and deduplicated");
    }
}
