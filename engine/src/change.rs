//! The administrative change workflow as a pure state machine, like the transfer
//! workflow: requested, decided by the active policy (the meta-policy), approved
//! through the same ballot box, then applied; or rejected. A freeze skips the
//! decision: it is an emergency and takes effect at once. [`Admin`] folds the
//! applied changes into what later decisions read (address book, freezes, the
//! active policy's document); [`directory_after`] is what a user or role change
//! does to the directory.

use custos_schemas::approval::{ApprovalVote, Vote};
use custos_schemas::change::{Change, ChangeRequest};
use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
use custos_schemas::{AggregateKind, Event, EventType, FieldError, Outcome, Payload, codec};
use sha2::{Digest, Sha256};

use crate::policy::{ActionKind, AddressBook, Directory, Duty, FreezeState};
use crate::transfer::CastVote;

/// Where a change request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    New,
    /// Recorded; the active policy decides next.
    AwaitingPolicy,
    AwaitingApprovals,
    /// Allowed (outright, by the quorum, or as a freeze): the change is applied next.
    Approved,
    Applied,
    /// Blocked by policy, rejected by an approver, or expired.
    Rejected,
    /// Approved, but its key ceremony failed (the reason says why); nothing
    /// changed. A new request may try again.
    Failed,
}

impl Stage {
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Applied | Stage::Rejected | Stage::Failed)
    }
}

/// The state of one change workflow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeState {
    pub stage: Stage,
    pub version: u64,
    pub request: Option<ChangeRequest>,
    /// Hex SHA-256 of the canonical request: what approvals bind to.
    pub request_hash: Option<String>,
    pub votes: Vec<CastVote>,
    pub decision: Option<PolicyDecision>,
    pub reason: Option<String>,
}

/// An event the machine does not accept in the current stage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not allowed when the change is {stage:?}{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
pub struct TransitionError {
    pub stage: Stage,
    pub event: &'static str,
    pub detail: Option<String>,
}

/// Hex SHA-256 of the canonical (MessagePack) request.
pub fn request_hash(request: &ChangeRequest) -> String {
    hex::encode(Sha256::digest(codec::to_msgpack(request)))
}

/// The action the policy decides a change as. Lifting a freeze changes what the
/// policy lets through, so it is decided as a policy change.
pub fn action(change: &Change) -> ActionKind {
    match change {
        Change::WhitelistAdd { .. } | Change::WhitelistRemove { .. } => ActionKind::WhitelistChange,
        Change::PolicyApply { .. } | Change::Freeze { .. } | Change::Unfreeze { .. } => {
            ActionKind::PolicyChange
        }
        Change::UserAdd(_) | Change::UserDeactivate { .. } => ActionKind::UserAdmin,
        Change::RoleCreate { .. } | Change::RoleAssign { .. } | Change::RoleRevoke { .. } => {
            ActionKind::RoleAdmin
        }
        Change::WalletCreate { .. } => ActionKind::WalletCreate,
        Change::KeyRotation { .. } => ActionKind::KeyRotation,
        // Repairing a share gives a guardian its key material back: decided
        // as adding one.
        Change::GuardianAdd { .. } | Change::ShareRepair { .. } => ActionKind::GuardianAdd,
        Change::GuardianRemove { .. } => ActionKind::GuardianRemove,
        Change::ThresholdChange { .. } => ActionKind::ThresholdChange,
        Change::FeeBump { .. } => ActionKind::FeeBump,
    }
}

/// The event that applies a change.
pub fn effect(change: &Change) -> EventType {
    match change {
        Change::PolicyApply { .. } => EventType::PolicyModified,
        Change::WhitelistAdd { .. } => EventType::WhitelistEntryAdded,
        Change::WhitelistRemove { .. } => EventType::WhitelistEntryRemoved,
        Change::Freeze { .. } => EventType::FreezeApplied,
        Change::Unfreeze { .. } => EventType::FreezeLifted,
        Change::UserAdd(_) => EventType::UserCreated,
        Change::UserDeactivate { .. } => EventType::UserDeactivated,
        Change::RoleCreate { .. } => EventType::RoleCreated,
        Change::RoleAssign { .. } => EventType::RoleAssigned,
        Change::RoleRevoke { .. } => EventType::PermissionChanged,
        // The ceremony's own event is the wallet's; the change only ends.
        Change::WalletCreate { .. }
        | Change::KeyRotation { .. }
        | Change::GuardianAdd { .. }
        | Change::GuardianRemove { .. }
        | Change::ThresholdChange { .. }
        | Change::ShareRepair { .. } => EventType::ChangeApplied,
        // The replacement is the transfer's event; the change only ends.
        Change::FeeBump { .. } => EventType::ChangeApplied,
    }
}

/// The directory once `change` is applied to it, all or nothing; `None` when
/// the change is not about users or roles. What the change service checks a
/// request against before recording it, and what every replica folds once it
/// is applied. The error names the change's field at fault.
pub fn directory_after(
    directory: &Directory,
    change: &Change,
) -> Result<Option<Directory>, FieldError> {
    let edit = |f: &dyn Fn(&mut Directory) -> Result<(), FieldError>| {
        let mut next = directory.clone();
        f(&mut next).map(|()| Some(next))
    };
    // The directory names a user's roles and groups, and a new role, in the singular.
    let rename = |from: &'static str, to: &'static str| {
        move |e: FieldError| match e.field == from {
            true => FieldError::new(to, e.reason),
            false => e,
        }
    };
    match change {
        Change::PolicyApply { .. }
        | Change::WhitelistAdd { .. }
        | Change::WhitelistRemove { .. }
        | Change::Freeze { .. }
        | Change::Unfreeze { .. } => Ok(None),
        Change::WalletCreate { .. }
        | Change::KeyRotation { .. }
        | Change::GuardianAdd { .. }
        | Change::GuardianRemove { .. }
        | Change::ThresholdChange { .. }
        | Change::ShareRepair { .. }
        | Change::FeeBump { .. } => Ok(None),
        Change::UserAdd(record) => edit(&|d| d.add_record(record))
            .map_err(rename("role", "roles"))
            .map_err(rename("group", "groups")),
        Change::UserDeactivate { user } => edit(&|d| d.deactivate(user)),
        Change::RoleCreate { name, duties } => {
            let duties = duties
                .iter()
                .map(|d| {
                    Duty::parse(d).ok_or_else(|| {
                        let known: Vec<&str> = Duty::ALL.iter().map(|d| d.as_str()).collect();
                        FieldError::new(
                            "duties",
                            format!("no duty {d:?} (one of {})", known.join(", ")),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            edit(&|d| d.create_role(name, &duties)).map_err(rename("role", "name"))
        }
        Change::RoleAssign { user, role } => edit(&|d| d.assign_role(user, role)),
        Change::RoleRevoke { user, role } => edit(&|d| d.revoke_role(user, role)),
    }
}

/// Applies one event. `event.version` must be `state.version + 1`.
pub fn apply(state: &ChangeState, event: &Event) -> Result<ChangeState, TransitionError> {
    use EventType as E;
    use Stage as S;
    let refuse = |detail: &str| TransitionError {
        stage: state.stage,
        event: event.event_type.as_str(),
        detail: (!detail.is_empty()).then(|| detail.to_string()),
    };
    if event.version != state.version + 1 {
        return Err(refuse(&format!(
            "version {} does not follow {}",
            event.version, state.version
        )));
    }
    let mut next = state.clone();
    next.version = event.version;
    let reason = event.metadata.get("reason").cloned();
    match (state.stage, event.event_type, &event.payload) {
        (
            S::New,
            E::ChangeRequested,
            Payload::ChangeRequested {
                request,
                request_hash: hash,
            },
        ) => {
            if *hash != request_hash(request) {
                return Err(refuse("request hash does not match the request"));
            }
            next.stage = match request.change {
                Change::Freeze { .. } => S::Approved,
                _ => S::AwaitingPolicy,
            };
            next.request = Some(request.clone());
            next.request_hash = Some(hash.clone());
        }
        (S::AwaitingPolicy, E::PolicyEvaluated, Payload::PolicyEvaluated(decision)) => {
            let request = state.request.as_ref().ok_or_else(|| refuse("no request"))?;
            if decision.action != action(&request.change).as_str()
                || decision.initiator != request.initiator
            {
                return Err(refuse("the decision is about another action or initiator"));
            }
            next.stage = match (decision.outcome, event.result) {
                (PolicyOutcome::Allow, Outcome::Success) => S::Approved,
                (PolicyOutcome::RequireApprovals, Outcome::Pending) => S::AwaitingApprovals,
                (PolicyOutcome::Block, Outcome::Denied | Outcome::Failure) => {
                    next.reason = reason.or_else(|| Some(decision.explanation.clone()));
                    S::Rejected
                }
                _ => return Err(refuse("the result contradicts the decision")),
            };
            next.decision = Some(decision.clone());
        }
        (S::AwaitingApprovals, E::TransactionApproved | E::TransactionRejected, payload) => {
            let approving = event.event_type == E::TransactionApproved;
            match payload {
                Payload::ApprovalVote(vote) => {
                    bound(state, vote, approving).map_err(|d| refuse(&d))?;
                    let voter = &event.actor.user_id;
                    if state.votes.iter().any(|v| &v.user == voter) {
                        return Err(refuse(&format!("{voter} has already voted")));
                    }
                    next.votes.push(CastVote {
                        user: voter.clone(),
                        at: event.timestamp,
                        vote: vote.clone(),
                    });
                }
                // A system rejection (expiry) carries no vote.
                Payload::None if !approving => {}
                _ => return Err(refuse("payload must be the approver's vote")),
            }
            next.stage = match (approving, event.result) {
                (true, Outcome::Pending) => S::AwaitingApprovals,
                (true, Outcome::Success) => S::Approved,
                (true, _) => return Err(refuse("an approval is pending or completes")),
                (false, _) => {
                    next.reason = reason;
                    S::Rejected
                }
            };
        }
        (S::Approved, kind, Payload::ChangeApplied(change)) if event.result == Outcome::Success => {
            let request = state.request.as_ref().ok_or_else(|| refuse("no request"))?;
            if *change != request.change || kind != effect(change) {
                return Err(refuse("it is not the requested change"));
            }
            next.stage = S::Applied;
        }
        // A key ceremony or fee bump that failed: its alert ends the workflow.
        (S::Approved, E::AlertRaised, Payload::Alert { summary, .. })
            if event.result == Outcome::Failure
                && state
                    .request
                    .as_ref()
                    .is_some_and(|r| r.change.applied_by_a_step()) =>
        {
            next.reason = Some(summary.clone());
            next.stage = S::Failed;
        }
        _ => return Err(refuse("")),
    }
    Ok(next)
}

/// Whether a vote is bound to this request and its decision's policy version.
fn bound(state: &ChangeState, vote: &ApprovalVote, approving: bool) -> Result<(), String> {
    if (vote.vote == Vote::Approve) != approving {
        return Err(format!("the vote says {:?}", vote.vote));
    }
    if state.request_hash.as_deref() != Some(vote.request_hash.as_str()) {
        return Err("the vote is bound to another request hash".into());
    }
    if state.decision.as_ref().map(|d| d.policy_version.as_str())
        != Some(vote.policy_version.as_str())
    {
        return Err("the vote is bound to another policy version".into());
    }
    Ok(())
}

impl crate::policy::AwaitsApprovals for ChangeState {
    fn awaiting_approvals(&self) -> Result<(), String> {
        crate::policy::awaiting(self.stage, self.stage == Stage::AwaitingApprovals)
    }

    fn decision(&self) -> Option<&PolicyDecision> {
        self.decision.as_ref()
    }

    fn request_hash(&self) -> Option<&str> {
        self.request_hash.as_deref()
    }

    fn votes(&self) -> &[CastVote] {
        &self.votes
    }
}

/// What applied changes say, folded from the trail in order: the whitelists
/// (one per wallet, named after it, on the wallet's chain), the freezes, and the
/// latest policy document applied, by version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admin {
    pub address_book: AddressBook,
    pub freeze: FreezeState,
    /// `(version, document)` of the policy last applied through a change.
    pub applied_policy: Option<(String, String)>,
}

impl Admin {
    /// Folds one recorded event. Only a change workflow's applied change counts
    /// (the ledger writes one only after its approvals); `chain_of` names a
    /// wallet's chain.
    pub fn apply(&mut self, event: &Event, chain_of: impl Fn(&str) -> Option<String>) {
        let (AggregateKind::Change, Payload::ChangeApplied(change)) =
            (event.aggregate_kind, &event.payload)
        else {
            return;
        };
        match change {
            Change::PolicyApply {
                version, document, ..
            } => self.applied_policy = Some((version.clone(), document.clone())),
            Change::WhitelistAdd { wallet, address } => {
                if let Some(chain) = chain_of(wallet) {
                    self.address_book.add(wallet, &chain, address);
                }
            }
            Change::WhitelistRemove { wallet, address } => {
                if let Some(chain) = chain_of(wallet) {
                    self.address_book.remove(wallet, &chain, address);
                }
            }
            Change::Freeze {
                wallet: Some(w),
                reason,
            } => self.freeze.freeze_wallet(w, reason),
            Change::Freeze {
                wallet: None,
                reason,
            } => self.freeze.freeze_everything(reason),
            Change::Unfreeze { wallet: Some(w) } => {
                self.freeze.unfreeze_wallet(w);
            }
            Change::Unfreeze { wallet: None } => self.freeze.unfreeze_everything(),
            // The directory folds these (see `directory_after`).
            Change::UserAdd(_)
            | Change::UserDeactivate { .. }
            | Change::RoleCreate { .. }
            | Change::RoleAssign { .. }
            | Change::RoleRevoke { .. } => {}
            // The ledger folds the wallet events the ceremonies record.
            Change::WalletCreate { .. }
            | Change::KeyRotation { .. }
            | Change::GuardianAdd { .. }
            | Change::GuardianRemove { .. }
            | Change::ThresholdChange { .. }
            | Change::ShareRepair { .. } => {}
            // The ledger folds the replacement the fee-bump worker records.
            Change::FeeBump { .. } => {}
        }
    }
}
