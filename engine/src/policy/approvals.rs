//! Whether the approvals given so far meet a decision. Used by the approval
//! worker after each approval and by guardians before they sign.

use custos_schemas::approval::MfaMethod;
use custos_schemas::policy::{
    ApprovalRequirement, Combine, PolicyDecision, PolicyOutcome, RequiredMfa,
};

use super::directory::Directory;
use super::evaluate::format_utc;

/// How explanations and what is still missing say that a requirement counts
/// only votes confirmed with a passkey (channels show it to approvers).
pub const PASSKEY_REQUIRED: &str = "passkey required";

/// One approval given by `user` at `at` (ms since the epoch). Group membership is
/// read from the directory at the time of the check, so an approver who has been
/// deactivated or removed from the group no longer counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub user: String,
    pub at: i64,
    /// Confirmed with a passkey: only such approvals count toward a
    /// requirement with `mfa = "webauthn"`.
    pub passkey: bool,
}

/// Where a decision's approvals stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// Every requirement is met (or none was needed). Signing may start at
    /// `sign_after`: the completing approval's time (the decision's, when
    /// allowed outright) plus the decision's delay.
    Satisfied { completed_at: i64, sign_after: i64 },
    /// Still short; each entry says of what, e.g. `treasury-managers: 2 of 4`.
    Pending { missing: Vec<String> },
    /// Not complete by the expiry: the request is to be rejected.
    Expired { expires_at: i64 },
    /// The decision was a block: nothing can be approved.
    Blocked,
}

/// Checks `approvals` against `decision` at `now`. Counted: one approval per
/// distinct user, given between the decision and `now` and not after the expiry,
/// by an active user holding the approver role who is (now) a member of the group
/// (or of the requirement's escalation group, for an approval given once the
/// escalation was due), and never by the initiator unless the requirement allows
/// it. `All` requires a distinct approver for every slot of every group (one
/// person fills one slot); `Any` requires one group to reach its count. Every
/// requirement must be met.
pub fn approvals_satisfied(
    decision: &PolicyDecision,
    approvals: &[Approval],
    directory: &Directory,
    now: i64,
) -> ApprovalStatus {
    match decision.outcome {
        PolicyOutcome::Block => return ApprovalStatus::Blocked,
        PolicyOutcome::Allow => {
            return ApprovalStatus::Satisfied {
                completed_at: decision.evaluated_at,
                sign_after: sign_after(decision, decision.evaluated_at),
            };
        }
        PolicyOutcome::RequireApprovals => {}
    }
    if decision.approvals.is_empty() {
        // A decision that needs approvals but names none is malformed: fail closed.
        return ApprovalStatus::Pending {
            missing: vec!["the decision names no approval requirement".into()],
        };
    }
    let valid = counted(decision, approvals, directory, now);
    let mut approvers: Vec<&Approval> = Vec::with_capacity(valid.len());
    for a in &valid {
        approvers.push(a);
        if decision
            .approvals
            .iter()
            .all(|r| shortfall(decision, r, &approvers, directory, now).is_none())
        {
            return ApprovalStatus::Satisfied {
                completed_at: a.at,
                sign_after: sign_after(decision, a.at),
            };
        }
    }
    if let Some(expires_at) = decision.expires_at
        && now > expires_at
    {
        return ApprovalStatus::Expired { expires_at };
    }
    let missing = decision
        .approvals
        .iter()
        .filter_map(|r| shortfall(decision, r, &approvers, directory, now))
        .collect();
    ApprovalStatus::Pending { missing }
}

/// The valid approvals, in time order: given between the decision and `now`,
/// not after the expiry, by an active user. A user may appear more than once
/// (an approval given before an escalation counts for less than one after);
/// [`shortfall`] counts each user once.
fn counted<'a>(
    decision: &PolicyDecision,
    approvals: &'a [Approval],
    directory: &Directory,
    now: i64,
) -> Vec<&'a Approval> {
    let mut valid: Vec<&Approval> = approvals
        .iter()
        .filter(|a| {
            a.at >= decision.evaluated_at
                && a.at <= now
                && decision.expires_at.is_none_or(|e| a.at <= e)
                && directory.user(&a.user).is_some_and(|u| u.active)
        })
        .collect();
    valid.sort_by(|a, b| (a.at, &a.user).cmp(&(b.at, &b.user)));
    valid
}

fn sign_after(decision: &PolicyDecision, completed_at: i64) -> i64 {
    completed_at.saturating_add(i64::try_from(decision.delay_ms).unwrap_or(i64::MAX))
}

/// When `req`'s escalation group starts to count: the decision's time plus the
/// escalation's delay (`None` without one). It depends on the recorded
/// decision alone, so every replica and every guardian agrees on it.
pub fn escalates_at(decision: &PolicyDecision, req: &ApprovalRequirement) -> Option<i64> {
    let e = req.escalation.as_ref()?;
    Some(
        decision
            .evaluated_at
            .saturating_add(i64::try_from(e.after_ms).unwrap_or(i64::MAX)),
    )
}

/// Whether `user`'s approval given at `at` may fill a slot of `group` in `req`:
/// a member of the group, or of the escalation group once the escalation is
/// due; never the initiator unless the requirement allows it.
fn fills(
    decision: &PolicyDecision,
    req: &ApprovalRequirement,
    directory: &Directory,
    user: &str,
    at: i64,
    group: &str,
) -> bool {
    (req.initiator_may_approve || user != decision.initiator)
        && (directory.may_approve_for(user, group)
            || escalated_member(decision, req, directory, user).is_some_and(|from| at >= from))
}

/// When `user` starts to count for `req` as a member of its escalation group.
fn escalated_member(
    decision: &PolicyDecision,
    req: &ApprovalRequirement,
    directory: &Directory,
    user: &str,
) -> Option<i64> {
    let e = req.escalation.as_ref()?;
    directory
        .may_approve_for(user, &e.group)
        .then(|| escalates_at(decision, req))
        .flatten()
}

/// Whether an approval by `user` given at `at` would count toward one of the
/// decision's requirements (an active user is assumed; see [`judge_vote`]).
pub fn may_approve(decision: &PolicyDecision, directory: &Directory, user: &str, at: i64) -> bool {
    decision.approvals.iter().any(|r| {
        r.groups
            .iter()
            .any(|q| fills(decision, r, directory, user, at, &q.group))
    })
}

/// The first requirement demanding a passkey that an approval by `user` at
/// `at` would count toward, if any: votes of such a user must be confirmed with
/// a passkey (see [`judge_vote`]).
pub fn passkey_required<'a>(
    decision: &'a PolicyDecision,
    directory: &Directory,
    user: &str,
    at: i64,
) -> Option<&'a ApprovalRequirement> {
    decision.approvals.iter().find(|r| {
        r.mfa == Some(RequiredMfa::Webauthn)
            && r.groups
                .iter()
                .any(|q| fills(decision, r, directory, user, at, &q.group))
    })
}

/// A requirement whose escalation is due (see [`escalations_due`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueEscalation {
    /// Index of the requirement in the decision's `approvals`.
    pub requirement: usize,
    pub rule: String,
    /// The group asked now.
    pub group: String,
    /// From when its approvals count (ms since the epoch).
    pub counts_from: i64,
}

/// The requirements to escalate at `now`: those with an escalation whose delay
/// has passed and that the approvals given so far do not meet, while the
/// decision still collects approvals (not once complete, blocked or expired).
pub fn escalations_due(
    decision: &PolicyDecision,
    approvals: &[Approval],
    directory: &Directory,
    now: i64,
) -> Vec<DueEscalation> {
    if !matches!(
        approvals_satisfied(decision, approvals, directory, now),
        ApprovalStatus::Pending { .. }
    ) {
        return Vec::new();
    }
    let valid = counted(decision, approvals, directory, now);
    decision
        .approvals
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let counts_from = escalates_at(decision, r).filter(|t| *t <= now)?;
            shortfall(decision, r, &valid, directory, now)?;
            Some(DueEscalation {
                requirement: i,
                rule: r.rule.clone(),
                group: r.escalation.as_ref()?.group.clone(),
                counts_from,
            })
        })
        .collect()
}

/// What a requirement still lacks with these approvers, or `None` when met.
fn shortfall(
    decision: &PolicyDecision,
    req: &ApprovalRequirement,
    approvers: &[&Approval],
    directory: &Directory,
    now: i64,
) -> Option<String> {
    let passkey_only = req.mfa == Some(RequiredMfa::Webauthn);
    // Each user counts once, with whichever of their approvals fits.
    let mut users: Vec<Vec<&Approval>> = Vec::new();
    for a in approvers {
        match users.iter_mut().find(|u| u[0].user == a.user) {
            Some(u) => u.push(a),
            None => users.push(vec![a]),
        }
    }
    let fits = |user: &Vec<&Approval>, group: &str| {
        user.iter().any(|a| {
            (a.passkey || !passkey_only) && fills(decision, req, directory, &a.user, a.at, group)
        })
    };
    let mut escalated = match (&req.escalation, escalates_at(decision, req)) {
        (Some(e), Some(t)) if t <= now => format!("; escalated to {}", e.group),
        _ => String::new(),
    };
    if req.mfa == Some(RequiredMfa::Webauthn) {
        escalated.push_str("; ");
        escalated.push_str(PASSKEY_REQUIRED);
    }
    match req.combine {
        Combine::Any => {
            let mut parts = Vec::new();
            for q in &req.groups {
                let n = users.iter().filter(|u| fits(u, &q.group)).count();
                if n >= q.count as usize {
                    return None;
                }
                parts.push(format!("{}: {n} of {}", q.group, q.count));
            }
            Some(format!(
                "one of {} (rule {}{escalated})",
                parts.join(" or "),
                req.rule
            ))
        }
        Combine::All => {
            // Slots: `count` per group; each user fills at most one slot.
            let slots: Vec<&str> = req
                .groups
                .iter()
                .flat_map(|q| std::iter::repeat_n(q.group.as_str(), q.count as usize))
                .collect();
            let filled = max_assignment(&slots, &users, |u, g| fits(u, g));
            if filled.iter().all(Option::is_some) {
                return None;
            }
            let parts: Vec<String> = req
                .groups
                .iter()
                .map(|q| {
                    let n = slots
                        .iter()
                        .zip(&filled)
                        .filter(|(g, f)| **g == q.group && f.is_some())
                        .count();
                    format!("{}: {n} of {}", q.group, q.count)
                })
                .collect();
            Some(format!(
                "{} (rule {}{escalated})",
                parts.join(", "),
                req.rule
            ))
        }
    }
}

/// Maximum bipartite matching of approvers to slots (Kuhn's augmenting paths):
/// for each slot, the index of the approver filling it.
fn max_assignment<T>(
    slots: &[&str],
    approvers: &[T],
    eligible: impl Fn(&T, &str) -> bool,
) -> Vec<Option<usize>> {
    let mut filled: Vec<Option<usize>> = vec![None; slots.len()];
    fn augment<T>(
        u: usize,
        slots: &[&str],
        approvers: &[T],
        eligible: &dyn Fn(&T, &str) -> bool,
        visited: &mut [bool],
        filled: &mut [Option<usize>],
    ) -> bool {
        for (s, group) in slots.iter().enumerate() {
            if visited[s] || !eligible(&approvers[u], group) {
                continue;
            }
            visited[s] = true;
            let free = match filled[s] {
                None => true,
                Some(other) => augment(other, slots, approvers, eligible, visited, filled),
            };
            if free {
                filled[s] = Some(u);
                return true;
            }
        }
        false
    }
    for u in 0..approvers.len() {
        let mut visited = vec![false; slots.len()];
        augment(u, slots, approvers, &eligible, &mut visited, &mut filled);
    }
    filled
}

/// Human-readable status, for the approval worker and the CLI.
impl std::fmt::Display for ApprovalStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApprovalStatus::Satisfied {
                completed_at,
                sign_after,
            } => write!(
                f,
                "approved at {}; signing may start at {}",
                format_utc(*completed_at),
                format_utc(*sign_after)
            ),
            ApprovalStatus::Pending { missing } => write!(f, "waiting for {}", missing.join("; ")),
            ApprovalStatus::Expired { expires_at } => {
                write!(f, "approvals expired at {}", format_utc(*expires_at))
            }
            ApprovalStatus::Blocked => write!(f, "blocked by policy"),
        }
    }
}

/// What a vote does to a workflow awaiting approvals (see [`judge_vote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteVerdict {
    /// The approver already voted on this request: nothing double-counts.
    Duplicate,
    /// Record the approval; `completes` when it meets every requirement.
    Approve { completes: bool },
    /// Record the rejection: it ends the request.
    Reject,
}

/// A workflow that collects approvals (a transfer, an administrative change):
/// what [`judge_vote`] reads.
pub trait AwaitsApprovals {
    /// `Ok` while it awaits approvals; otherwise why a vote comes too late.
    fn awaiting_approvals(&self) -> Result<(), String>;
    fn decision(&self) -> Option<&PolicyDecision>;
    /// Hex SHA-256 of the canonical request approvals bind to.
    fn request_hash(&self) -> Option<&str>;
    fn votes(&self) -> &[crate::transfer::CastVote];
}

impl AwaitsApprovals for crate::transfer::Transfer {
    fn awaiting_approvals(&self) -> Result<(), String> {
        awaiting(
            self.stage,
            self.stage == crate::transfer::Stage::AwaitingApprovals,
        )
    }

    fn decision(&self) -> Option<&PolicyDecision> {
        self.decision.as_ref()
    }

    fn request_hash(&self) -> Option<&str> {
        self.request_hash.as_deref()
    }

    fn votes(&self) -> &[crate::transfer::CastVote] {
        &self.votes
    }
}

/// `Ok` when `awaits`; otherwise why a vote comes too late for a workflow at `stage`.
pub fn awaiting(stage: impl std::fmt::Debug, awaits: bool) -> Result<(), String> {
    match awaits {
        true => Ok(()),
        false => Err(format!(
            "the request no longer awaits approvals (it is {stage:?})"
        )),
    }
}

/// The approvals recorded on a workflow so far.
pub fn approvals_of(workflow: &(impl AwaitsApprovals + ?Sized)) -> Vec<Approval> {
    workflow
        .votes()
        .iter()
        .filter(|v| v.vote.vote == custos_schemas::approval::Vote::Approve)
        .map(|v| Approval {
            user: v.user.clone(),
            at: v.at,
            passkey: v.vote.mfa == MfaMethod::Webauthn,
        })
        .collect()
}

/// Judges one approver's vote on a workflow at `now`: bound to the exact
/// request hash and policy version, by an active user eligible for one of the
/// decision's groups (never the initiator unless a rule allows it), before the
/// expiry, while the workflow still awaits approvals. The error says why the
/// vote does not count, for the approver and the audit trail.
pub fn judge_vote(
    workflow: &(impl AwaitsApprovals + ?Sized),
    directory: &Directory,
    user: &str,
    vote: &custos_schemas::approval::ApprovalVote,
    now: i64,
) -> Result<VoteVerdict, String> {
    use custos_schemas::approval::Vote;
    if workflow.votes().iter().any(|v| v.user == user) {
        return Ok(VoteVerdict::Duplicate);
    }
    workflow.awaiting_approvals()?;
    let decision = workflow
        .decision()
        .ok_or("the request has no policy decision")?;
    if workflow.request_hash() != Some(vote.request_hash.as_str()) {
        return Err(
            "the request changed since this approval was asked for: it no longer \
                    counts"
                .into(),
        );
    }
    if vote.policy_version != decision.policy_version {
        return Err(
            "the policy changed since this approval was asked for: it no longer counts".into(),
        );
    }
    if let Some(expires_at) = decision.expires_at
        && now > expires_at
    {
        return Err(format!("the request expired at {}", format_utc(expires_at)));
    }
    match directory.user(user) {
        None => return Err(format!("{user} is not in the directory")),
        Some(u) if !u.active => return Err(format!("{user} is deactivated")),
        Some(_) => {}
    }
    // Recorded votes happened: a clock behind the ledger's must not drop them.
    let at = workflow.votes().iter().map(|v| v.at).fold(now, i64::max);
    if !may_approve(decision, directory, user, at) {
        if user == decision.initiator {
            return Err(format!(
                "{user} initiated this request and may not approve it"
            ));
        }
        if let Some((r, from)) = decision
            .approvals
            .iter()
            .find_map(|r| Some((r, escalated_member(decision, r, directory, user)?)))
        {
            return Err(format!(
                "{user} counts for rule {} only once it escalates to {}, at {}",
                r.rule,
                r.escalation.as_ref().map_or("", |e| e.group.as_str()),
                format_utc(from)
            ));
        }
        let groups: Vec<&str> = decision
            .approvals
            .iter()
            .flat_map(|r| r.groups.iter().map(|q| q.group.as_str()))
            .collect();
        return Err(format!(
            "{user} is not an approver for this request (approvers come from: {})",
            groups.join(", ")
        ));
    }
    // A user who would count toward a passkey-only requirement answers with a
    // passkey, whatever the vote: counting does not record how each approval
    // was confirmed, so a weaker one must never be recorded for them.
    if vote.mfa != MfaMethod::Webauthn
        && let Some(r) = passkey_required(decision, directory, user, at)
    {
        return Err(format!(
            "rule {} requires a passkey (mfa = \"webauthn\"): a vote confirmed {} does not count; answer on the web approval page with your passkey",
            r.rule,
            match vote.mfa {
                MfaMethod::Totp => "with an authenticator code",
                MfaMethod::None => "without a second factor",
                MfaMethod::Webauthn => "with a passkey",
            }
        ));
    }
    if vote.vote == Vote::Reject {
        return Ok(VoteVerdict::Reject);
    }
    let mut approvals = approvals_of(workflow);
    approvals.push(Approval {
        user: user.to_string(),
        at,
        passkey: vote.mfa == MfaMethod::Webauthn,
    });
    let completes = matches!(
        approvals_satisfied(decision, &approvals, directory, at),
        ApprovalStatus::Satisfied { .. }
    );
    Ok(VoteVerdict::Approve { completes })
}
