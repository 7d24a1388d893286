//! The transfer workflow as a pure state machine: `apply(state, event) -> (state,
//! commands)`. A workflow's state is the fold of its events; the ledger runs this
//! fold before it appends, so an event the machine does not allow is never written.

use custos_schemas::approval::{ApprovalVote, Vote};
use custos_schemas::chain::{Confirmation, SignedTransaction, UnsignedTransaction};
use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
use custos_schemas::{Event, EventType, Outcome, Payload, TransferRequest};

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// No event yet.
    #[default]
    New,
    /// Created; the policy step decides next.
    AwaitingPolicy,
    /// The policy requires business approvals.
    AwaitingApprovals,
    /// Allowed (by policy or by a reached quorum); the transaction is built next.
    ReadyToSign,
    /// The unsigned transaction is recorded; guardians sign exactly it.
    Built,
    Signed,
    Broadcast,
    Confirmed,
    /// Blocked by policy or rejected by an approver.
    Rejected,
    /// A step failed for good.
    Failed,
}

impl Stage {
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Confirmed | Stage::Rejected | Stage::Failed)
    }
}

/// What the workflow asks the workers to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    EvaluatePolicy,
    CollectApprovals,
    Build,
    Sign,
    Broadcast,
    AwaitConfirmation,
}

/// The state of one transfer workflow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transfer {
    pub stage: Stage,
    pub version: u64,
    pub request: Option<TransferRequest>,
    /// Hex SHA-256 of the canonical request: what approvals and guardians bind to.
    pub request_hash: Option<String>,
    /// Approvers' votes so far, in trail order.
    pub votes: Vec<CastVote>,
    /// The policy decision, once made.
    pub decision: Option<PolicyDecision>,
    /// Why it was rejected or failed.
    pub reason: Option<String>,
    /// The transaction guardians sign, once built.
    pub unsigned: Option<UnsignedTransaction>,
    pub signed: Option<SignedTransaction>,
    /// Txid once broadcast: the transaction on the network (while a
    /// replacement is built and signed, still the one it replaces).
    pub txid: Option<String>,
    /// Since when the transaction `txid` names has been waiting (ms since the
    /// epoch): its broadcast, or the abandonment of a replacement of it. A fee
    /// bump waits from there.
    pub waiting_since: Option<i64>,
    pub confirmation: Option<Confirmation>,
    /// Broadcast transactions replaced by a fee bump, oldest first. While a
    /// replacement is built or signed, the last is the one on the network
    /// (`txid`); any of them may still be the one that confirms.
    pub replaced: Vec<Replaced>,
    /// Why the last replacement was abandoned (the transaction it was to
    /// replace stays on the network).
    pub replacement_failed: Option<String>,
}

/// A broadcast transaction that a fee bump replaced (or is replacing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub txid: String,
    pub unsigned: UnsignedTransaction,
    pub signed: SignedTransaction,
}

impl Transfer {
    /// Whether a replacement of the broadcast transaction is being built or
    /// signed.
    pub fn replacing(&self) -> bool {
        matches!(self.stage, Stage::Built | Stage::Signed) && !self.replaced.is_empty()
    }

    /// The transaction the one being signed replaces, if it is a replacement:
    /// what signers hold it to (same inputs or nonce, only a higher fee).
    pub fn replaces(&self) -> Option<&Replaced> {
        self.replaced.last().filter(|_| self.replacing())
    }

    /// Every txid that may confirm this transfer: the broadcast one and those
    /// it replaced (a miner may have taken an earlier one).
    pub fn candidate_txids(&self) -> impl Iterator<Item = &str> {
        self.txid
            .as_deref()
            .into_iter()
            .chain(self.replaced.iter().map(|r| r.txid.as_str()))
    }
}

/// One approver's recorded vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CastVote {
    pub user: String,
    /// When the trail recorded it (ms since the epoch).
    pub at: i64,
    pub vote: ApprovalVote,
}

/// An event the machine does not accept in the current stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not allowed when the transfer is {stage:?}{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct TransitionError {
    pub stage: Stage,
    pub event: &'static str,
    pub detail: Option<String>,
}

/// Applies one event. `event.version` must be `state.version + 1`.
pub fn apply(state: &Transfer, event: &Event) -> Result<(Transfer, Vec<Command>), TransitionError> {
    use EventType as E;
    use Stage as S;
    let refuse = |detail: Option<String>| TransitionError {
        stage: state.stage,
        event: event.event_type.as_str(),
        detail,
    };
    if event.version != state.version + 1 {
        return Err(refuse(Some(format!(
            "version {} does not follow {}",
            event.version, state.version
        ))));
    }
    let mut next = state.clone();
    next.version = event.version;
    let reason = || match &event.payload {
        Payload::StepFailed { step, reason } => Some(format!("{step}: {reason}")),
        Payload::PolicyEvaluated(d) => event
            .metadata
            .get("reason")
            .cloned()
            .or_else(|| Some(d.explanation.clone())),
        _ => event.metadata.get("reason").cloned(),
    };
    // The decision is the evidence approvers and guardians check: it must be
    // there, and the event's result must say the same.
    let decided = || -> Result<PolicyDecision, TransitionError> {
        let Payload::PolicyEvaluated(decision) = &event.payload else {
            return Err(refuse(Some("payload must be the policy decision".into())));
        };
        let consistent = matches!(
            (decision.outcome, event.result),
            (PolicyOutcome::Allow, Outcome::Success)
                | (PolicyOutcome::RequireApprovals, Outcome::Pending)
                | (PolicyOutcome::Block, Outcome::Denied | Outcome::Failure)
        );
        if !consistent {
            return Err(refuse(Some(format!(
                "result {:?} contradicts the decision {}",
                event.result,
                decision.outcome.as_str()
            ))));
        }
        Ok(decision.clone())
    };
    let commands = match (state.stage, event.event_type, event.result) {
        (S::New, E::TransactionCreated, _) => {
            let Payload::TransferRequested {
                request,
                request_hash,
            } = &event.payload
            else {
                return Err(refuse(Some("payload must be the transfer request".into())));
            };
            if *request_hash != crate::intake::request_hash(request) {
                return Err(refuse(Some(
                    "request hash does not match the request".into(),
                )));
            }
            next.request = Some(request.clone());
            next.request_hash = Some(request_hash.clone());
            next.stage = S::AwaitingPolicy;
            vec![Command::EvaluatePolicy]
        }
        (S::AwaitingPolicy, E::PolicyEvaluated, Outcome::Success) => {
            next.decision = Some(decided()?);
            next.stage = S::ReadyToSign;
            vec![Command::Build]
        }
        (S::AwaitingPolicy, E::PolicyEvaluated, Outcome::Pending) => {
            next.decision = Some(decided()?);
            next.stage = S::AwaitingApprovals;
            vec![Command::CollectApprovals]
        }
        (S::AwaitingPolicy, E::PolicyEvaluated, Outcome::Denied | Outcome::Failure) => {
            next.decision = Some(decided()?);
            next.stage = S::Rejected;
            next.reason = reason();
            vec![]
        }
        // An approver's vote: bound to this request and this decision's policy
        // version, one per approver. Pending keeps collecting; Success is the
        // approval that completed the quorum; a Reject vote (or a system
        // rejection, e.g. expiry, with no vote) ends the request.
        (S::AwaitingApprovals, E::TransactionApproved, Outcome::Pending | Outcome::Success)
        | (S::AwaitingApprovals, E::TransactionRejected, _) => {
            let approving = event.event_type == E::TransactionApproved;
            match &event.payload {
                Payload::ApprovalVote(vote) => {
                    let expected = if approving {
                        Vote::Approve
                    } else {
                        Vote::Reject
                    };
                    if vote.vote != expected {
                        return Err(refuse(Some(format!("the vote says {:?}", vote.vote))));
                    }
                    if Some(&vote.request_hash) != state.request_hash.as_ref() {
                        return Err(refuse(Some(
                            "the vote is bound to another request hash".into(),
                        )));
                    }
                    let version = state.decision.as_ref().map(|d| d.policy_version.as_str());
                    if Some(vote.policy_version.as_str()) != version {
                        return Err(refuse(Some(
                            "the vote is bound to another policy version".into(),
                        )));
                    }
                    let voter = &event.actor.user_id;
                    if state.votes.iter().any(|v| &v.user == voter) {
                        return Err(refuse(Some(format!("{voter} has already voted"))));
                    }
                    next.votes.push(CastVote {
                        user: voter.clone(),
                        at: event.timestamp,
                        vote: vote.clone(),
                    });
                }
                Payload::None | Payload::StepFailed { .. } if !approving => {}
                _ => return Err(refuse(Some("payload must be the approver's vote".into()))),
            }
            match (approving, event.result) {
                (true, Outcome::Pending) => vec![],
                (true, _) => {
                    next.stage = S::ReadyToSign;
                    vec![Command::Build]
                }
                (false, _) => {
                    next.stage = S::Rejected;
                    next.reason = reason();
                    vec![]
                }
            }
        }
        (S::ReadyToSign, E::TransactionBuilt, Outcome::Success) => {
            let Payload::TransactionBuilt(tx) = &event.payload else {
                return Err(refuse(Some(
                    "payload must be the unsigned transaction".into(),
                )));
            };
            next.unsigned = Some(tx.clone());
            next.stage = S::Built;
            vec![Command::Sign]
        }
        // A fee bump: the broadcast transaction is stuck, and this one is to
        // replace it. It goes through signing and broadcast again; the one it
        // replaces is remembered (it may still confirm).
        (S::Broadcast, E::TransactionBuilt, Outcome::Success)
            if matches!(event.payload, Payload::TransactionReplacement { .. }) =>
        {
            let Payload::TransactionReplacement { replaces, unsigned } = &event.payload else {
                return Err(refuse(None));
            };
            let (Some(txid), Some(current), Some(signed)) =
                (&state.txid, &state.unsigned, &state.signed)
            else {
                return Err(refuse(Some(
                    "the broadcast transaction is not recorded".into(),
                )));
            };
            if replaces != txid {
                return Err(refuse(Some(format!(
                    "it replaces {replaces}, the broadcast transaction is {txid}"
                ))));
            }
            next.replaced.push(Replaced {
                txid: txid.clone(),
                unsigned: current.clone(),
                signed: signed.clone(),
            });
            next.unsigned = Some(unsigned.clone());
            next.signed = None;
            next.replacement_failed = None;
            next.stage = S::Built;
            vec![Command::Sign]
        }
        // A replacement that could not be signed or sent is abandoned: the
        // transaction it was to replace is still on the network.
        (S::Built | S::Signed, E::TransactionFailed, _) if state.replacing() => {
            let Some(previous) = next.replaced.pop() else {
                return Err(refuse(None));
            };
            next.unsigned = Some(previous.unsigned);
            next.signed = Some(previous.signed);
            next.txid = Some(previous.txid);
            next.replacement_failed = reason();
            next.waiting_since = Some(event.timestamp);
            next.stage = S::Broadcast;
            vec![Command::AwaitConfirmation]
        }
        // While a replacement is on its way, the transaction it replaces (or an
        // earlier one) may be mined.
        (S::Built | S::Signed, E::TransactionConfirmed, Outcome::Success) if state.replacing() => {
            let Payload::TransactionConfirmed(c) = &event.payload else {
                return Err(refuse(Some("payload must be the confirmation".into())));
            };
            if !state.candidate_txids().any(|t| t == c.txid) {
                return Err(refuse(Some("confirms another txid".into())));
            }
            next.txid = Some(c.txid.clone());
            next.confirmation = Some(c.clone());
            next.stage = S::Confirmed;
            vec![]
        }
        (S::Built, E::TransactionSigned, Outcome::Success) => {
            let Payload::TransactionSigned(tx) = &event.payload else {
                return Err(refuse(Some(
                    "payload must be the signed transaction".into(),
                )));
            };
            next.signed = Some(tx.clone());
            next.stage = S::Signed;
            vec![Command::Broadcast]
        }
        (S::Signed, E::TransactionBroadcast, Outcome::Success) => {
            let Payload::TransactionBroadcast { txid, .. } = &event.payload else {
                return Err(refuse(Some("payload must name the broadcast txid".into())));
            };
            if next.signed.as_ref().is_some_and(|s| &s.txid != txid) {
                return Err(refuse(Some(
                    "txid differs from the signed transaction's".into(),
                )));
            }
            next.txid = Some(txid.clone());
            next.waiting_since = Some(event.timestamp);
            next.stage = S::Broadcast;
            vec![Command::AwaitConfirmation]
        }
        (S::Broadcast, E::TransactionConfirmed, Outcome::Success) => {
            let Payload::TransactionConfirmed(c) = &event.payload else {
                return Err(refuse(Some("payload must be the confirmation".into())));
            };
            if !state.candidate_txids().any(|t| t == c.txid) {
                return Err(refuse(Some("confirms another txid".into())));
            }
            next.txid = Some(c.txid.clone());
            next.confirmation = Some(c.clone());
            next.stage = S::Confirmed;
            vec![]
        }
        (stage, E::TransactionFailed, _) if stage != S::New && !stage.is_terminal() => {
            next.stage = S::Failed;
            next.reason = reason();
            vec![]
        }
        _ => return Err(refuse(None)),
    };
    Ok((next, commands))
}

/// Folds a whole history; the commands are those of the last event.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a Event>,
) -> Result<(Transfer, Vec<Command>), TransitionError> {
    let mut state = Transfer::default();
    let mut commands = Vec::new();
    for e in events {
        (state, commands) = apply(&state, e)?;
    }
    Ok((state, commands))
}
