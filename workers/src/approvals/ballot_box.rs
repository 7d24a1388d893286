//! The ballot box every approval channel feeds: judges each vote against the
//! verified trail (engine `judge_vote`) and records it, or records why not.

use std::time::{SystemTime, UNIX_EPOCH};

use custos_engine::policy::{
    ApprovalStatus, AwaitsApprovals, VoteVerdict, approvals_of, approvals_satisfied, judge_vote,
};
use custos_engine::transfer::Stage;
use custos_schemas::TransferRequest;
use custos_schemas::approval::ApprovalNotice;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, EventType, Outcome, Payload, Proposal, RequestContext,
    Target, UserRecord,
};
use futures::future::BoxFuture;

use super::{Ballot, BallotBox, BallotError, Receipt};
use crate::remote::Appender;
use crate::trail::{Trail, TrailView};

/// Concurrent votes on one workflow race for its next version; the losers
/// re-judge. Each conflict means another vote was recorded, so retrying ends;
/// the bound is on time, not on attempts.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

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
        let started = std::time::Instant::now();
        while started.elapsed() < RETRY_FOR {
            // The clock is read once the replica has caught up: votes it just
            // learned of were recorded before this one is judged.
            let judged = self
                .trail
                .read(|view| judge(view, &ballot, now_ms()))
                .await
                .map_err(BallotError::Unavailable)?;
            let (verdict, kind, expected_version, email, applies) = match judged {
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
            let mut proposals = vec![Proposal {
                aggregate_kind: kind,
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
            }];
            // The vote that completes a change's quorum applies it, in the same
            // atomic append: an approved change never waits on another step.
            if result == Outcome::Success
                && let Some(change) = applies
            {
                proposals.push(crate::change::applied(
                    &ballot.workflow_id,
                    expected_version + 1,
                    Actor::system("approvals"),
                    change,
                ));
            }
            match self.appender.append(proposals).await {
                AppendReply::Appended { .. } => {
                    return Ok(Receipt::Recorded {
                        quorum_reached: result == Outcome::Success,
                    });
                }
                // Another vote took the version: judge again on the new state,
                // after a short random pause so contenders spread out.
                AppendReply::Conflict { .. } => {
                    let pause = rand::random::<u64>() % 20;
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                    continue;
                }
                AppendReply::Refused { reason } => {
                    self.record_refusal(&ballot, &reason).await;
                    return Err(BallotError::Refused(reason));
                }
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

/// The verdict, the workflow's kind and version, the voter's email, and (for a
/// change) the change a completing approval applies.
type Judgement = Result<
    (
        VoteVerdict,
        AggregateKind,
        u64,
        Option<String>,
        Option<custos_schemas::change::Change>,
    ),
    Judged,
>;

fn judge(view: &TrailView, ballot: &Ballot, now: i64) -> Judgement {
    let (kind, workflow, version) = view.awaiting(&ballot.workflow_id).ok_or(Judged::Unknown)?;
    let verdict = judge_vote(
        workflow,
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
    // A key ceremony's or fee bump's change is applied by its step, once it ran.
    let applies = view
        .change(&ballot.workflow_id)
        .and_then(|c| c.request.as_ref())
        .filter(|r| !r.change.applied_by_a_step())
        .map(|r| r.change.clone());
    Ok((verdict, kind, version, email, applies))
}

/// The notice approvers see for a workflow, as the trail has it now. A change
/// is shown in the transfer-shaped notice every channel renders: its
/// description as the memo, its wallet (or `*`), no asset and no amount.
pub fn notice(view: &TrailView, workflow_id: &str, now: i64) -> Option<ApprovalNotice> {
    let (request, chain, workflow): (TransferRequest, String, &dyn AwaitsApprovals) =
        match (view.transfer(workflow_id), view.change(workflow_id)) {
            (Some(t), _) if t.stage != Stage::New => {
                let request = t.request.clone()?;
                let chain = view
                    .ledger
                    .wallet(&request.wallet)
                    .map(|w| w.chain.clone())
                    .unwrap_or_default();
                (request, chain, t)
            }
            (None, Some(c)) => {
                let r = c.request.as_ref()?;
                let wallet = r.change.wallet();
                let request = TransferRequest {
                    request_id: r.request_id.clone(),
                    wallet: wallet.unwrap_or("*").to_string(),
                    asset: String::new(),
                    destination: String::new(),
                    amount: "0".into(),
                    memo: Some(r.change.describe()),
                    initiator: r.initiator.clone(),
                };
                let chain = wallet
                    .and_then(|w| view.ledger.wallet(w))
                    .map(|w| w.chain.clone())
                    .unwrap_or_default();
                (request, chain, c)
            }
            _ => return None,
        };
    let decision = workflow.decision()?;
    let approvals = approvals_of(workflow);
    let missing = match approvals_satisfied(decision, &approvals, &view.directory, now) {
        ApprovalStatus::Pending { missing } => missing,
        ApprovalStatus::Expired { .. } => vec!["expired".into()],
        ApprovalStatus::Blocked => vec!["blocked by policy".into()],
        ApprovalStatus::Satisfied { .. } => Vec::new(),
    };
    Some(ApprovalNotice {
        workflow_id: workflow_id.to_string(),
        request_hash: workflow.request_hash()?.to_string(),
        policy_version: decision.policy_version.clone(),
        chain,
        fiat_value: decision.fiat_value.clone(),
        whitelisted: None,
        explanation: decision.explanation.clone(),
        // Only approvals that still count: a deactivated approver's do not.
        approved_by: approvals
            .into_iter()
            .filter(|a| view.directory.user(&a.user).is_some_and(|u| u.active))
            .map(|a| a.user)
            .collect(),
        missing,
        expires_at: decision.expires_at,
        step_up_required: step_up(decision),
        request,
    })
}

/// High-value approvals need MFA on the web page: anything that needs more than
/// two approvals from one rule (the default policy's above-EUR-10,000 tier),
/// and anything a rule wants confirmed with passkeys (only that page asks).
fn step_up(decision: &custos_schemas::policy::PolicyDecision) -> bool {
    decision
        .approvals
        .iter()
        .any(|r| r.mfa.is_some() || r.groups.iter().map(|q| q.count).sum::<u32>() > 2)
}

/// Whether what `notice` still lacks includes a requirement that counts only
/// passkey votes (the engine's shortfall says so).
pub fn needs_passkey(notice: &ApprovalNotice) -> bool {
    notice
        .missing
        .iter()
        .any(|m| m.contains(custos_engine::policy::PASSKEY_REQUIRED))
}

/// A directory user as channels see it.
pub(crate) fn user_record(u: &custos_engine::policy::User) -> UserRecord {
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
