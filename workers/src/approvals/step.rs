//! The approval step: when a decision needs approvals, asks every eligible
//! approver on every configured channel; rejects requests whose approvals did not
//! come in before the expiry; reminds those who have not answered; escalates
//! requirements still unmet after their escalation delay to a second group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use custos_adapters::jetstream::{StepConsumer, workflow_consumer};
use custos_engine::policy::{AwaitsApprovals, approvals_of, escalations_due, may_approve};
use custos_engine::transfer::Stage;
use custos_schemas::approval::{ApprovalEscalation, ApprovalNotice};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, Outcome, Payload, Proposal, Target,
    UserRecord,
};

use super::Notifier;
use super::ballot_box::notice;
use crate::Shutdown;
use crate::remote::Appender;
use crate::runtime::{Step, StepError};
use crate::trail::{Trail, TrailView};

#[derive(Clone)]
pub struct ApprovalStep {
    trail: Trail,
    notifiers: Arc<Vec<Arc<dyn Notifier>>>,
    consumer: StepConsumer,
}

impl std::fmt::Debug for ApprovalStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalStep")
            .field(
                "channels",
                &self
                    .notifiers
                    .iter()
                    .map(|n| n.channel().as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ApprovalStep {
    pub fn new(trail: Trail, notifiers: Vec<Arc<dyn Notifier>>) -> Result<Self, String> {
        Ok(ApprovalStep {
            trail,
            notifiers: Arc::new(notifiers),
            consumer: workflow_consumer("approvals")
                .ok_or("no consumer definition for the approval step")?,
        })
    }

    /// The same step for administrative change workflows (its own consumer,
    /// [`crate::change::approvals_consumer`]), asking on the same channels.
    pub fn changes(trail: Trail, notifiers: Vec<Arc<dyn Notifier>>) -> Self {
        ApprovalStep {
            trail,
            notifiers: Arc::new(notifiers),
            consumer: crate::change::approvals_consumer(),
        }
    }
}

/// Active users whose approval would count at `now`: of one of the decision's
/// groups, or of an escalation group once due; the initiator only where a rule
/// allows it.
pub fn eligible_approvers(view: &TrailView, workflow_id: &str, now: i64) -> Vec<UserRecord> {
    let Some(decision) = view
        .awaiting(workflow_id)
        .and_then(|(_, w, _)| w.decision())
    else {
        return Vec::new();
    };
    view.directory
        .users()
        .filter(|u| u.active && may_approve(decision, &view.directory, &u.id, now))
        .map(super::ballot_box::user_record)
        .collect()
}

impl Step for ApprovalStep {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let id = event.workflow_id.clone();
        let outcome = match (event.event_type, event.result) {
            (EventType::PolicyEvaluated, Outcome::Pending) => None,
            (EventType::TransactionApproved, Outcome::Success) => {
                Some("approved: the quorum is reached".to_string())
            }
            (EventType::TransactionRejected, _) => Some(format!(
                "rejected{}",
                event
                    .metadata
                    .get("reason")
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )),
            _ => return Ok(Vec::new()),
        };
        let (notice, approvers) = self
            .trail
            .read(|view| {
                let now = now_ms();
                (notice(view, &id, now), eligible_approvers(view, &id, now))
            })
            .await
            .map_err(StepError::Transient)?;
        let Some(notice) = notice else {
            return Err(StepError::Permanent(format!("workflow {id} has no notice")));
        };
        if approvers.is_empty() {
            tracing::warn!(workflow = %id, "no eligible approver in the directory");
        }
        for user in &approvers {
            for n in self.notifiers.iter() {
                let sent = match &outcome {
                    None => n.ask(user, &notice).await,
                    Some(outcome) => n.conclude(user, &notice, outcome).await,
                };
                if let Err(e) = sent {
                    tracing::warn!(error = %e, "approval notice not delivered");
                }
            }
        }
        Ok(Vec::new())
    }
}

/// Rejects, every `every`, the requests whose approvals expired, until `shutdown`.
pub async fn expire<A: Appender>(
    trail: Trail,
    appender: A,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let expired = trail.read(|view| expired(view, now)).await;
        let proposals = match expired {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "approval expiry skipped");
                continue;
            }
        };
        for p in proposals {
            match appender.append(vec![p]).await {
                AppendReply::Appended { .. } | AppendReply::Conflict { .. } => {}
                AppendReply::Refused { reason } | AppendReply::Unavailable { reason } => {
                    tracing::warn!(%reason, "could not record an expiry");
                }
            }
        }
    }
}

/// Every request (transfer or change) awaiting approvals.
fn awaiting_approvals(
    view: &TrailView,
) -> impl Iterator<Item = (AggregateKind, &str, &dyn AwaitsApprovals, u64)> {
    let transfers = view
        .ledger
        .transfers()
        .filter(|(_, t)| t.stage == Stage::AwaitingApprovals)
        .map(|(id, t)| (AggregateKind::Tx, id, t as &dyn AwaitsApprovals, t.version));
    let changes = view
        .ledger
        .changes()
        .filter(|(_, c)| c.stage == custos_engine::change::Stage::AwaitingApprovals)
        .map(|(id, c)| {
            (
                AggregateKind::Change,
                id,
                c as &dyn AwaitsApprovals,
                c.version,
            )
        });
    transfers.chain(changes)
}

/// The eligible approvers who have not answered, per request awaiting
/// approvals that was last asked `every` ago or more (`asked`: when each was
/// last asked, ms; absent means at its decision).
pub fn reminders_due(
    view: &TrailView,
    now: i64,
    every: i64,
    asked: &HashMap<String, i64>,
) -> Vec<(ApprovalNotice, Vec<UserRecord>)> {
    awaiting_approvals(view)
        .filter_map(|(_, id, w, _)| {
            let last = asked
                .get(id)
                .copied()
                .or_else(|| w.decision().map(|d| d.evaluated_at))?;
            if now - last < every {
                return None;
            }
            let notice = notice(view, id, now)?;
            let voted: Vec<&str> = w.votes().iter().map(|v| v.user.as_str()).collect();
            let waiting: Vec<UserRecord> = eligible_approvers(view, id, now)
                .into_iter()
                .filter(|u| !voted.contains(&u.id.as_str()))
                .collect();
            Some((notice, waiting))
        })
        .collect()
}

/// Asks again, every `every`, the approvers who have not answered a request
/// still awaiting approvals, until `shutdown`.
pub async fn remind(
    trail: Trail,
    notifiers: Vec<Arc<dyn Notifier>>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut asked: HashMap<String, i64> = HashMap::new();
    let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(every.min(Duration::from_secs(60)));
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let due = match trail
            .read(|view| reminders_due(view, now, every_ms, &asked))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "approval reminders skipped");
                continue;
            }
        };
        for (notice, waiting) in due {
            for user in &waiting {
                for n in &notifiers {
                    if let Err(e) = n.ask(user, &notice).await {
                        tracing::warn!(error = %e, "approval reminder not delivered");
                    }
                }
            }
            asked.insert(notice.workflow_id.clone(), now);
        }
    }
}

/// `TRANSACTION_REJECTED` for every request (transfer or change) awaiting
/// approvals past its expiry.
pub fn expired(view: &TrailView, now: i64) -> Vec<Proposal> {
    awaiting_approvals(view)
        .filter_map(|(kind, id, w, version)| {
            let expires_at = w.decision()?.expires_at?;
            (now > expires_at).then(|| Proposal {
                aggregate_kind: kind,
                workflow_id: id.to_string(),
                expected_version: version,
                event_type: EventType::TransactionRejected,
                causation_id: None,
                actor: Actor::system("approvals"),
                target: Default::default(),
                context: Default::default(),
                result: Outcome::Denied,
                metadata: [(
                    "reason".to_string(),
                    "approvals did not reach the quorum before the expiry".to_string(),
                )]
                .into(),
                payload: Payload::None,
            })
        })
        .collect()
}

/// An escalation to record, the notice to send and whom to ask once recorded.
pub type DueEscalation = (Proposal, ApprovalNotice, Vec<UserRecord>);

/// `APPROVAL_ESCALATED` for every requirement (of a transfer or change awaiting
/// approvals) whose escalation the engine finds due at `now` and that is not
/// recorded yet, with the escalation group's members it newly lets approve and
/// who have not answered.
pub fn escalations(view: &TrailView, now: i64) -> Vec<DueEscalation> {
    let mut due = Vec::new();
    for (_, id, w, _) in awaiting_approvals(view) {
        let Some(decision) = w.decision() else {
            continue;
        };
        for e in escalations_due(decision, &approvals_of(w), &view.directory, now) {
            let requirement = u32::try_from(e.requirement).unwrap_or(u32::MAX);
            let aggregate = ApprovalEscalation::aggregate_id(id, requirement);
            if view.ledger.version(AggregateKind::System, &aggregate) > 0 {
                continue;
            }
            let Some(notice) = notice(view, id, now) else {
                continue;
            };
            let voted: Vec<&str> = w.votes().iter().map(|v| v.user.as_str()).collect();
            // Members who count now but did not at the decision: those this
            // escalation adds (others were asked from the start).
            let asked: Vec<UserRecord> = view
                .directory
                .users()
                .filter(|u| {
                    u.active
                        && view.directory.may_approve_for(&u.id, &e.group)
                        && may_approve(decision, &view.directory, &u.id, now)
                        && !may_approve(decision, &view.directory, &u.id, decision.evaluated_at)
                        && !voted.contains(&u.id.as_str())
                })
                .map(super::ballot_box::user_record)
                .collect();
            let proposal = Proposal {
                aggregate_kind: AggregateKind::System,
                workflow_id: aggregate,
                expected_version: 0,
                event_type: EventType::ApprovalEscalated,
                causation_id: None,
                actor: Actor::system("approvals"),
                target: Target {
                    kind: "transaction".into(),
                    id: id.to_string(),
                    amount: None,
                    currency: None,
                },
                context: Default::default(),
                result: Outcome::Success,
                metadata: Default::default(),
                payload: Payload::ApprovalEscalated(ApprovalEscalation {
                    workflow_id: id.to_string(),
                    requirement,
                    rule: e.rule,
                    group: e.group,
                    counts_from: e.counts_from,
                    notified: asked.iter().map(|u| u.id.clone()).collect(),
                }),
            };
            due.push((proposal, notice, asked));
        }
    }
    due
}

/// Every `every`, records the escalations that are due and then asks the
/// escalation groups on every channel, until `shutdown`. An escalation another
/// sweep recorded first conflicts and is not asked again.
pub async fn escalate<A: Appender>(
    trail: Trail,
    appender: A,
    notifiers: Vec<Arc<dyn Notifier>>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let due = match trail.read(|view| escalations(view, now_ms())).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "approval escalations skipped");
                continue;
            }
        };
        for (proposal, notice, asked) in due {
            match appender.append(vec![proposal]).await {
                AppendReply::Appended { .. } => {}
                AppendReply::Conflict { .. } => continue,
                AppendReply::Refused { reason } | AppendReply::Unavailable { reason } => {
                    tracing::warn!(%reason, "could not record an escalation");
                    continue;
                }
            }
            for user in &asked {
                for n in &notifiers {
                    if let Err(e) = n.ask(user, &notice).await {
                        tracing::warn!(error = %e, "escalation notice not delivered");
                    }
                }
            }
        }
    }
}
