//! The ballot box every approval channel feeds: judges each vote against the
//! verified trail (engine `judge_vote`) and records it, or records why not.

use std::time::{SystemTime, UNIX_EPOCH};

use custos_engine::policy::{ApprovalStatus, VoteVerdict, approvals_satisfied, judge_vote};
use custos_engine::transfer::Stage;
use custos_schemas::approval::{ApprovalNotice, Vote};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, EventType, Outcome, Payload, Proposal, RequestContext,
    Target, UserRecord,
};
use futures::future::BoxFuture;

use super::{Ballot, BallotBox, BallotError, Receipt};
use crate::remote::Appender;
use crate::trail::{Trail, TrailView};

/// Concurrent votes on one workflow race for its next version; the loser re-judges.
const ATTEMPTS: usize = 8;

#[derive(Debug, Clone)]
pub struct TrailBallotBox<A> {
    trail: Trail,
    appender: A,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl<A: Appender> TrailBallotBox<A> {
    pub fn new(trail: Trail, appender: A) -> Self {
        TrailBallotBox { trail, appender }
    }

    async fn cast_ballot(&self, ballot: Ballot) -> Result<Receipt, BallotError> {
        for _ in 0..ATTEMPTS {
            let now = now_ms();
            let judged = self
                .trail
                .read(|view| judge(view, &ballot, now))
                .await
                .map_err(BallotError::Unavailable)?;
            let (verdict, expected_version, email) = match judged {
                Ok(j) => j,
                Err(Judged::Unknown) => {
                    return Err(BallotError::UnknownWorkflow(ballot.workflow_id.clone()));
                }
                Err(Judged::Refused(reason)) => {
                    self.record_refusal(&ballot, &reason).await;
                    return Err(BallotError::Refused(reason));
                }
            };
            let (event_type, result) = match verdict {
                VoteVerdict::Duplicate => return Ok(Receipt::Duplicate),
                VoteVerdict::Approve { completes: false } => {
                    (EventType::TransactionApproved, Outcome::Pending)
                }
                VoteVerdict::Approve { completes: true } => {
                    (EventType::TransactionApproved, Outcome::Success)
                }
                VoteVerdict::Reject => (EventType::TransactionRejected, Outcome::Denied),
            };
            let mut metadata = std::collections::BTreeMap::new();
            if event_type == EventType::TransactionRejected {
                metadata.insert(
                    "reason".into(),
                    format!(
                        "rejected by {}{}",
                        ballot.user_id,
                        ballot
                            .vote
                            .comment
                            .as_deref()
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default()
                    ),
                );
            }
            let proposal = Proposal {
                aggregate_kind: AggregateKind::Tx,
                workflow_id: ballot.workflow_id.clone(),
                expected_version,
                event_type,
                causation_id: None,
                actor: Actor {
                    user_id: ballot.user_id.clone(),
                    email,
                    role: Some("approver".into()),
                },
                target: Target {
                    kind: "transaction".into(),
                    id: ballot.workflow_id.clone(),
                    amount: None,
                    currency: None,
                },
                context: context(&ballot),
                result,
                metadata,
                payload: Payload::ApprovalVote(ballot.vote.clone()),
            };
            match self.appender.append(vec![proposal]).await {
                AppendReply::Appended { .. } => {
                    return Ok(Receipt::Recorded {
                        quorum_reached: result == Outcome::Success,
                    });
                }
                // Another vote took the version: judge again on the new state.
                AppendReply::Conflict { .. } => continue,
                AppendReply::Refused { reason } => return Err(BallotError::Refused(reason)),
                AppendReply::Unavailable { reason } => {
                    return Err(BallotError::Unavailable(reason));
                }
            }
        }
        Err(BallotError::Unavailable(
            "too many concurrent votes on this request; try again".into(),
        ))
    }

    /// A vote that did not count is itself audited (channel, user, reason).
    async fn record_refusal(&self, ballot: &Ballot, reason: &str) {
        let id = format!("approval-{}", hex::encode(rand::random::<[u8; 12]>()));
        let proposal = Proposal {
            aggregate_kind: AggregateKind::Auth,
            workflow_id: id,
            expected_version: 0,
            event_type: EventType::ApprovalRefused,
            causation_id: None,
            actor: Actor {
                user_id: ballot.user_id.clone(),
                email: None,
                role: None,
            },
            target: Target {
                kind: "transaction".into(),
                id: ballot.workflow_id.clone(),
                amount: None,
                currency: None,
            },
            context: context(ballot),
            result: Outcome::Denied,
            metadata: Default::default(),
            payload: Payload::StepFailed {
                step: format!("approval via {}", ballot.vote.channel.as_str()),
                reason: reason.to_string(),
            },
        };
        if let AppendReply::Unavailable { reason } | AppendReply::Refused { reason } =
            self.appender.append(vec![proposal]).await
        {
            tracing::warn!(%reason, "could not record a refused approval");
        }
    }
}

fn context(ballot: &Ballot) -> RequestContext {
    RequestContext {
        ip_address: ballot.masked_ip.clone(),
        user_agent: ballot.user_agent.clone(),
        session_id: None,
    }
}

enum Judged {
    Unknown,
    Refused(String),
}

type Judgement = Result<(VoteVerdict, u64, Option<String>), Judged>;

fn judge(view: &TrailView, ballot: &Ballot, now: i64) -> Judgement {
    let transfer = view.transfer(&ballot.workflow_id).ok_or(Judged::Unknown)?;
    let verdict = judge_vote(
        transfer,
        &view.directory,
        &ballot.user_id,
        &ballot.vote,
        now,
    )
    .map_err(Judged::Refused)?;
    let email = view
        .directory
        .user(&ballot.user_id)
        .map(|u| u.email.clone());
    Ok((verdict, transfer.version, email))
}

/// The notice approvers see for a workflow, as the trail has it now.
pub fn notice(view: &TrailView, workflow_id: &str, now: i64) -> Option<ApprovalNotice> {
    let transfer = view.transfer(workflow_id)?;
    let request = transfer.request.clone()?;
    let decision = transfer.decision.as_ref()?;
    let approvals: Vec<_> = transfer
        .votes
        .iter()
        .filter(|v| v.vote.vote == Vote::Approve)
        .map(|v| custos_engine::policy::Approval {
            user: v.user.clone(),
            at: v.at,
        })
        .collect();
    let missing = match approvals_satisfied(decision, &approvals, &view.directory, now) {
        ApprovalStatus::Pending { missing } => missing,
        ApprovalStatus::Expired { .. } => vec!["expired".into()],
        ApprovalStatus::Blocked => vec!["blocked by policy".into()],
        ApprovalStatus::Satisfied { .. } => Vec::new(),
    };
    let chain = view
        .ledger
        .wallet(&request.wallet)
        .map(|w| w.chain.clone())
        .unwrap_or_default();
    Some(ApprovalNotice {
        workflow_id: workflow_id.to_string(),
        request_hash: transfer.request_hash.clone()?,
        policy_version: decision.policy_version.clone(),
        chain,
        fiat_value: decision.fiat_value.clone(),
        whitelisted: None,
        explanation: decision.explanation.clone(),
        approved_by: approvals.into_iter().map(|a| a.user).collect(),
        missing,
        expires_at: decision.expires_at,
        step_up_required: step_up(decision),
        request,
    })
    .filter(|_| transfer.stage != Stage::New)
}

/// High-value approvals need MFA on the web page: anything that needs more than
/// two approvals from one rule (the default policy's above-EUR-10,000 tier).
fn step_up(decision: &custos_schemas::policy::PolicyDecision) -> bool {
    decision
        .approvals
        .iter()
        .any(|r| r.groups.iter().map(|q| q.count).sum::<u32>() > 2)
}

fn user_record(u: &custos_engine::policy::User) -> UserRecord {
    UserRecord {
        id: u.id.clone(),
        name: u.name.clone(),
        email: u.email.clone(),
        slack_user_id: u.slack_user_id.clone(),
        roles: u.roles.iter().cloned().collect(),
        groups: u.groups.iter().cloned().collect(),
        mfa_enrolled: u.mfa_enrolled,
    }
}

impl<A: Appender> BallotBox for TrailBallotBox<A> {
    fn cast(&self, ballot: Ballot) -> BoxFuture<'_, Result<Receipt, BallotError>> {
        Box::pin(self.cast_ballot(ballot))
    }

    fn notice<'a>(
        &'a self,
        workflow_id: &'a str,
    ) -> BoxFuture<'a, Result<ApprovalNotice, BallotError>> {
        Box::pin(async move {
            self.trail
                .read(|view| notice(view, workflow_id, now_ms()))
                .await
                .map_err(BallotError::Unavailable)?
                .ok_or_else(|| BallotError::UnknownWorkflow(workflow_id.to_string()))
        })
    }

    fn user<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async move {
            self.trail
                .read(|view| view.directory.user(user_id).map(user_record))
                .await
                .ok()
                .flatten()
        })
    }

    fn user_by_slack_id<'a>(&'a self, slack_user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async move {
            self.trail
                .read(|view| {
                    view.directory
                        .users()
                        .find(|u| u.slack_user_id.as_deref() == Some(slack_user_id))
                        .map(user_record)
                })
                .await
                .ok()
                .flatten()
        })
    }
}
