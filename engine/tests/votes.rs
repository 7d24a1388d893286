//! Judging approvers' votes (`judge_vote`): every verdict and every refusal, the
//! "4 approvals from treasury-managers" scenario, `All` / `Any` combinations, and
//! that an approval never undoes a completing one. Votes are folded through the
//! transfer state machine the way the ballot box records them.

mod common;

use std::collections::BTreeMap;

use custos_engine::policy::{
    Approval, ApprovalStatus, Directory, DueEscalation, NewUser, VoteVerdict, approvals_satisfied,
    escalations_due, judge_vote, passkey_required,
};
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
use custos_schemas::policy::{
    ApprovalRequirement, Combine, Escalation, GroupQuorum, PolicyDecision, PolicyOutcome,
    RequiredMfa,
};
use custos_schemas::{Actor, AggregateKind, Event, EventType, Outcome, Payload, SCHEMA_VERSION};
use proptest::prelude::*;

/// When the policy decided (2023-11-14T22:13:20Z).
const T0: i64 = 1_700_000_000_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
/// 24 hours after the decision (2023-11-15T22:13:20Z).
const EXPIRES: i64 = T0 + 24 * HOUR;
const TM: &str = "treasury-managers";
const AP: &str = "approvers";

fn policy_version() -> String {
    "ab".repeat(32)
}

fn add(d: &mut Directory, id: &str, roles: &[&str], groups: &[&str]) {
    d.add_user(NewUser {
        id: id.into(),
        name: id.to_uppercase(),
        email: format!("{id}@example.com"),
        slack_user_id: None,
        mfa_enrolled: true,
    })
    .unwrap_or_else(|e| panic!("add {id}: {e}"));
    for r in roles {
        d.assign_role(id, r)
            .unwrap_or_else(|e| panic!("{id} gets {r}: {e}"));
    }
    for g in groups {
        if d.group(g).is_none() {
            d.create_group(g, "").expect("group");
        }
        d.add_to_group(id, g)
            .unwrap_or_else(|e| panic!("{id} joins {g}: {e}"));
    }
}

/// tm1..tm6: treasury managers; ap1..ap3: approvers; `both`: in both groups;
/// `alice`: the initiator, also a treasury manager with the approver role; `erp`:
/// initiator only; `loner`: approver in no group; `exec`: a treasury manager
/// without the approve duty; `gone`: a deactivated treasury manager.
fn directory() -> Directory {
    let mut d = Directory::new();
    for i in 1..=6 {
        add(&mut d, &format!("tm{i}"), &["approver"], &[TM]);
    }
    for i in 1..=3 {
        add(&mut d, &format!("ap{i}"), &["approver"], &[AP]);
    }
    add(&mut d, "both", &["approver"], &[TM, AP]);
    add(&mut d, "alice", &["initiator", "approver"], &[TM]);
    add(&mut d, "erp", &["initiator"], &[]);
    add(&mut d, "loner", &["approver"], &[]);
    add(&mut d, "exec", &["executor"], &[TM]);
    add(&mut d, "gone", &["approver"], &[TM]);
    d.deactivate("gone").expect("deactivate");
    d
}

fn req(combine: Combine, groups: &[(&str, u32)]) -> ApprovalRequirement {
    ApprovalRequirement {
        rule: format!("rule-{}", groups.len()),
        combine,
        groups: groups
            .iter()
            .map(|(g, n)| GroupQuorum {
                group: (*g).into(),
                count: *n,
            })
            .collect(),
        initiator_may_approve: false,
        escalation: None,
        mfa: None,
    }
}

fn decision(approvals: Vec<ApprovalRequirement>) -> PolicyDecision {
    PolicyDecision {
        outcome: PolicyOutcome::RequireApprovals,
        policy_version: policy_version(),
        action: "transfer".into(),
        initiator: "alice".into(),
        wallet: Some("w".into()),
        evaluated_at: T0,
        fiat_value: None,
        approvals,
        expires_at: Some(EXPIRES),
        delay_ms: 0,
        matched_rules: Vec::new(),
        explanation: "test decision".into(),
    }
}

/// The default policy's top tier: 4 approvals from treasury-managers.
fn four_treasury_managers() -> PolicyDecision {
    decision(vec![req(Combine::All, &[(TM, 4)])])
}

fn event(
    state: &Transfer,
    event_type: EventType,
    result: Outcome,
    user: &str,
    at: i64,
    payload: Payload,
) -> Event {
    let version = state.version + 1;
    Event {
        schema_version: SCHEMA_VERSION,
        id: Event::message_id(AggregateKind::Tx, "tx-1", version),
        timestamp: at,
        event_type,
        aggregate_kind: AggregateKind::Tx,
        workflow_id: "tx-1".into(),
        version,
        causation_id: None,
        actor: Actor {
            user_id: user.into(),
            email: None,
            role: None,
        },
        target: Default::default(),
        context: Default::default(),
        result,
        metadata: BTreeMap::new(),
        payload,
    }
}

/// One transfer workflow and the directory its votes are judged against.
#[derive(Debug, Clone)]
struct Flow {
    state: Transfer,
    directory: Directory,
    /// The time of the last event; each cast is a minute later.
    at: i64,
}

impl Flow {
    /// Created, policy not yet decided.
    fn awaiting_policy() -> Flow {
        let mut flow = Flow {
            state: Transfer::default(),
            directory: directory(),
            at: T0 - MINUTE,
        };
        let created = common::tx_created("tx-1").payload;
        flow.apply(
            EventType::TransactionCreated,
            Outcome::Pending,
            "erp",
            created,
        );
        flow.at = T0;
        flow
    }

    /// Created and decided: awaiting approvals under `decision`.
    fn awaiting(decision: PolicyDecision) -> Flow {
        let mut flow = Flow::awaiting_policy();
        flow.apply(
            EventType::PolicyEvaluated,
            Outcome::Pending,
            "policy",
            Payload::PolicyEvaluated(decision),
        );
        assert_eq!(flow.state.stage, Stage::AwaitingApprovals);
        flow
    }

    fn apply(&mut self, event_type: EventType, result: Outcome, user: &str, payload: Payload) {
        let e = event(&self.state, event_type, result, user, self.at, payload);
        let (next, _) = transfer::apply(&self.state, &e)
            .unwrap_or_else(|err| panic!("{event_type:?}/{result:?} by {user}: {err}"));
        self.state = next;
    }

    /// A vote bound to this workflow's request hash and policy version.
    fn ballot(&self, vote: Vote) -> ApprovalVote {
        ApprovalVote {
            vote,
            request_hash: self.state.request_hash.clone().expect("created"),
            policy_version: self
                .state
                .decision
                .as_ref()
                .map_or_else(policy_version, |d| d.policy_version.clone()),
            channel: ApprovalChannel::Email,
            mfa: MfaMethod::Totp,
            comment: None,
        }
    }

    fn judge(&self, user: &str, vote: &ApprovalVote, now: i64) -> Result<VoteVerdict, String> {
        judge_vote(&self.state, &self.directory, user, vote, now)
    }

    /// Casts a vote a minute after the last event and records it as the ballot
    /// box does (a duplicate records nothing). Panics on a refusal.
    fn cast(&mut self, user: &str, vote: Vote) -> VoteVerdict {
        self.cast_at(user, vote, self.at + MINUTE)
    }

    /// [`Flow::cast`] at `now`.
    fn cast_at(&mut self, user: &str, vote: Vote, now: i64) -> VoteVerdict {
        let ballot = self.ballot(vote);
        let verdict = self
            .judge(user, &ballot, now)
            .unwrap_or_else(|e| panic!("{user}'s {vote:?} was refused: {e}"));
        let (event_type, result) = match verdict {
            VoteVerdict::Duplicate => return verdict,
            VoteVerdict::Approve { completes: false } => {
                (EventType::TransactionApproved, Outcome::Pending)
            }
            VoteVerdict::Approve { completes: true } => {
                (EventType::TransactionApproved, Outcome::Success)
            }
            VoteVerdict::Reject => (EventType::TransactionRejected, Outcome::Denied),
        };
        self.at = now;
        self.apply(event_type, result, user, Payload::ApprovalVote(ballot));
        verdict
    }

    fn approvals(&self) -> Vec<Approval> {
        self.state
            .votes
            .iter()
            .filter(|v| v.vote.vote == Vote::Approve)
            .map(|v| Approval {
                user: v.user.clone(),
                at: v.at,
                passkey: false,
            })
            .collect()
    }
}

fn approve(completes: bool) -> VoteVerdict {
    VoteVerdict::Approve { completes }
}

// ---- setups for the table ----

fn fresh() -> Flow {
    Flow::awaiting(four_treasury_managers())
}

fn tm1_approved() -> Flow {
    let mut f = fresh();
    assert_eq!(f.cast("tm1", Vote::Approve), approve(false));
    f
}

fn tm1_rejected() -> Flow {
    let mut f = fresh();
    assert_eq!(f.cast("tm1", Vote::Reject), VoteVerdict::Reject);
    assert_eq!(f.state.stage, Stage::Rejected);
    f
}

fn quorum_reached() -> Flow {
    let mut f = fresh();
    for (user, completes) in [
        ("tm1", false),
        ("tm2", false),
        ("tm3", false),
        ("tm4", true),
    ] {
        assert_eq!(f.cast(user, Vote::Approve), approve(completes), "{user}");
    }
    assert_eq!(f.state.stage, Stage::ReadyToSign);
    f
}

fn allowed_outright() -> Flow {
    let mut f = Flow::awaiting_policy();
    let mut d = four_treasury_managers();
    d.outcome = PolicyOutcome::Allow;
    d.approvals.clear();
    f.apply(
        EventType::PolicyEvaluated,
        Outcome::Success,
        "policy",
        Payload::PolicyEvaluated(d),
    );
    assert_eq!(f.state.stage, Stage::ReadyToSign);
    f
}

fn initiator_may_approve() -> Flow {
    let mut r = req(Combine::All, &[(TM, 4)]);
    r.initiator_may_approve = true;
    Flow::awaiting(decision(vec![r]))
}

fn keep(_: &mut ApprovalVote) {}

fn other_hash(v: &mut ApprovalVote) {
    v.request_hash = "ff".repeat(32);
}

fn other_policy(v: &mut ApprovalVote) {
    v.policy_version = "11".repeat(32);
}

fn reject(v: &mut ApprovalVote) {
    v.vote = Vote::Reject;
}

/// What a case expects: a verdict, or a refusal whose message holds every part.
#[derive(Debug)]
enum Want {
    Verdict(VoteVerdict),
    Refused(&'static [&'static str]),
}

struct Case {
    name: &'static str,
    setup: fn() -> Flow,
    user: &'static str,
    edit: fn(&mut ApprovalVote),
    /// Ms after the decision.
    after: i64,
    want: Want,
}

#[test]
fn every_verdict_and_refusal() {
    use Want::*;
    let hour = HOUR;
    let cases = [
        // Verdicts.
        Case {
            name: "an eligible approver's first approval is pending",
            setup: fresh,
            user: "tm1",
            edit: keep,
            after: hour,
            want: Verdict(approve(false)),
        },
        Case {
            name: "an eligible approver may reject",
            setup: fresh,
            user: "tm1",
            edit: reject,
            after: hour,
            want: Verdict(VoteVerdict::Reject),
        },
        Case {
            name: "a member of both groups is eligible",
            setup: fresh,
            user: "both",
            edit: keep,
            after: hour,
            want: Verdict(approve(false)),
        },
        Case {
            name: "a vote at the very expiry instant still counts",
            setup: fresh,
            user: "tm1",
            edit: keep,
            after: EXPIRES - T0,
            want: Verdict(approve(false)),
        },
        Case {
            name: "the initiator counts where the rule allows it",
            setup: initiator_may_approve,
            user: "alice",
            edit: keep,
            after: hour,
            want: Verdict(approve(false)),
        },
        // Duplicates: checked first, so a second answer never double-counts and
        // never changes the first.
        Case {
            name: "approving twice",
            setup: tm1_approved,
            user: "tm1",
            edit: keep,
            after: hour,
            want: Verdict(VoteVerdict::Duplicate),
        },
        Case {
            name: "rejecting after one's own approval",
            setup: tm1_approved,
            user: "tm1",
            edit: reject,
            after: hour,
            want: Verdict(VoteVerdict::Duplicate),
        },
        Case {
            name: "a duplicate bound to another hash is still a duplicate",
            setup: tm1_approved,
            user: "tm1",
            edit: other_hash,
            after: hour,
            want: Verdict(VoteVerdict::Duplicate),
        },
        Case {
            name: "a duplicate after the quorum moved the workflow on",
            setup: quorum_reached,
            user: "tm2",
            edit: keep,
            after: hour,
            want: Verdict(VoteVerdict::Duplicate),
        },
        Case {
            name: "a duplicate after the request was rejected",
            setup: tm1_rejected,
            user: "tm1",
            edit: keep,
            after: hour,
            want: Verdict(VoteVerdict::Duplicate),
        },
        Case {
            name: "a duplicate after the expiry",
            setup: tm1_approved,
            user: "tm1",
            edit: keep,
            after: EXPIRES - T0 + 1,
            want: Verdict(VoteVerdict::Duplicate),
        },
        // The workflow is not awaiting approvals.
        Case {
            name: "a new approver after the quorum",
            setup: quorum_reached,
            user: "tm5",
            edit: keep,
            after: hour,
            want: Refused(&["no longer awaits approvals", "ReadyToSign"]),
        },
        Case {
            name: "a new approver after a rejection",
            setup: tm1_rejected,
            user: "tm2",
            edit: keep,
            after: hour,
            want: Refused(&["no longer awaits approvals", "Rejected"]),
        },
        Case {
            name: "before the policy decided",
            setup: Flow::awaiting_policy,
            user: "tm1",
            edit: keep,
            after: hour,
            want: Refused(&["no longer awaits approvals", "AwaitingPolicy"]),
        },
        Case {
            name: "a transfer the policy allowed outright",
            setup: allowed_outright,
            user: "tm1",
            edit: keep,
            after: hour,
            want: Refused(&["no longer awaits approvals", "ReadyToSign"]),
        },
        // Bound payload.
        Case {
            name: "bound to another request hash",
            setup: fresh,
            user: "tm1",
            edit: other_hash,
            after: hour,
            want: Refused(&["request changed", "no longer counts"]),
        },
        Case {
            name: "bound to another policy version",
            setup: fresh,
            user: "tm1",
            edit: other_policy,
            after: hour,
            want: Refused(&["policy changed", "no longer counts"]),
        },
        Case {
            name: "a rejection bound to another request hash",
            setup: fresh,
            user: "tm1",
            edit: |v| {
                reject(v);
                other_hash(v);
            },
            after: hour,
            want: Refused(&["request changed"]),
        },
        // Expiry.
        Case {
            name: "an approval a millisecond after the expiry",
            setup: fresh,
            user: "tm1",
            edit: keep,
            after: EXPIRES - T0 + 1,
            want: Refused(&["expired at", "2023-11-15"]),
        },
        Case {
            name: "a rejection after the expiry",
            setup: fresh,
            user: "tm1",
            edit: reject,
            after: EXPIRES - T0 + HOUR,
            want: Refused(&["expired at"]),
        },
        // Who votes.
        Case {
            name: "a user not in the directory",
            setup: fresh,
            user: "ghost",
            edit: keep,
            after: hour,
            want: Refused(&["ghost is not in the directory"]),
        },
        Case {
            name: "a deactivated treasury manager",
            setup: fresh,
            user: "gone",
            edit: keep,
            after: hour,
            want: Refused(&["gone is deactivated"]),
        },
        Case {
            name: "a deactivated user's rejection",
            setup: fresh,
            user: "gone",
            edit: reject,
            after: hour,
            want: Refused(&["gone is deactivated"]),
        },
        Case {
            name: "the initiator (an eligible treasury manager otherwise)",
            setup: fresh,
            user: "alice",
            edit: keep,
            after: hour,
            want: Refused(&["alice initiated this request and may not approve it"]),
        },
        Case {
            name: "the initiator's rejection",
            setup: fresh,
            user: "alice",
            edit: reject,
            after: hour,
            want: Refused(&["alice initiated this request"]),
        },
        Case {
            name: "an approver of another group",
            setup: fresh,
            user: "ap1",
            edit: keep,
            after: hour,
            want: Refused(&[
                "ap1 is not an approver for this request",
                "approvers come from: treasury-managers",
            ]),
        },
        Case {
            name: "an approver in no group",
            setup: fresh,
            user: "loner",
            edit: keep,
            after: hour,
            want: Refused(&["loner is not an approver for this request"]),
        },
        Case {
            name: "a group member without the approve duty",
            setup: fresh,
            user: "exec",
            edit: keep,
            after: hour,
            want: Refused(&["exec is not an approver for this request"]),
        },
        Case {
            name: "an initiator who is not this request's initiator",
            setup: fresh,
            user: "erp",
            edit: keep,
            after: hour,
            want: Refused(&["erp is not an approver for this request"]),
        },
        Case {
            name: "an ineligible user's rejection",
            setup: fresh,
            user: "ap1",
            edit: reject,
            after: hour,
            want: Refused(&["ap1 is not an approver for this request"]),
        },
    ];
    for case in &cases {
        let flow = (case.setup)();
        let mut vote = flow.ballot(Vote::Approve);
        (case.edit)(&mut vote);
        let before = flow.state.clone();
        let got = flow.judge(case.user, &vote, T0 + case.after);
        assert_eq!(flow.state, before, "{}: judging changed nothing", case.name);
        match (&case.want, &got) {
            (Want::Verdict(want), Ok(got)) => assert_eq!(got, want, "{}", case.name),
            (Want::Refused(parts), Err(msg)) => {
                for part in *parts {
                    assert!(
                        msg.contains(part),
                        "{}: the refusal {msg:?} should say {part:?}",
                        case.name
                    );
                }
            }
            (want, got) => panic!("{}: expected {want:?}, got {got:?}", case.name),
        }
    }
}

/// Awaiting approvals without a decision (the machine never gets there, but the
/// judge must not rely on it): every vote is refused, fail closed.
#[test]
fn a_decision_less_workflow_awaiting_approvals_refuses_every_vote() {
    let mut flow = fresh();
    flow.state.decision = None;
    for vote in [Vote::Approve, Vote::Reject] {
        let got = flow.judge("tm1", &flow.ballot(vote), T0 + HOUR);
        assert!(
            matches!(&got, Err(m) if m.contains("no policy decision")),
            "{vote:?}: {got:?}"
        );
    }
}

#[test]
fn four_treasury_managers_need_four_distinct_approvers() {
    let mut flow = fresh();
    for (n, user) in ["tm1", "tm2", "tm3"].into_iter().enumerate() {
        assert_eq!(
            flow.cast(user, Vote::Approve),
            approve(false),
            "approval {} of 4 ({user}) must not complete",
            n + 1
        );
        assert_eq!(flow.state.stage, Stage::AwaitingApprovals);
    }
    // Neither a second approval by the same person nor the initiator's fills
    // the fourth slot.
    for user in ["tm1", "tm2", "tm3"] {
        assert_eq!(flow.cast(user, Vote::Approve), VoteVerdict::Duplicate);
    }
    let refused = flow.judge("alice", &flow.ballot(Vote::Approve), flow.at + MINUTE);
    assert!(refused.is_err(), "the initiator: {refused:?}");
    assert_eq!(
        (flow.state.votes.len(), flow.state.stage),
        (3, Stage::AwaitingApprovals),
        "three distinct approvals recorded, still waiting"
    );
    let status = approvals_satisfied(
        flow.state.decision.as_ref().expect("decided"),
        &flow.approvals(),
        &flow.directory,
        flow.at,
    );
    assert!(
        matches!(&status, ApprovalStatus::Pending { missing } if missing == &vec![format!("{TM}: 3 of 4 (rule rule-1)")]),
        "{status:?}"
    );

    assert_eq!(
        flow.cast("tm4", Vote::Approve),
        approve(true),
        "the fourth distinct treasury manager completes"
    );
    assert_eq!(flow.state.stage, Stage::ReadyToSign);
    let users: Vec<&str> = flow.state.votes.iter().map(|v| v.user.as_str()).collect();
    assert_eq!(users, ["tm1", "tm2", "tm3", "tm4"]);
    let status = approvals_satisfied(
        flow.state.decision.as_ref().expect("decided"),
        &flow.approvals(),
        &flow.directory,
        flow.at,
    );
    assert_eq!(
        status,
        ApprovalStatus::Satisfied {
            completed_at: flow.at,
            sign_after: flow.at
        },
        "the recorded votes satisfy the decision as of the fourth"
    );
}

#[test]
fn an_approver_deactivated_after_approving_no_longer_counts() {
    let mut flow = fresh();
    for user in ["tm1", "tm2", "tm3"] {
        assert_eq!(flow.cast(user, Vote::Approve), approve(false), "{user}");
    }
    flow.directory.deactivate("tm1").expect("deactivate tm1");
    assert_eq!(
        flow.cast("tm4", Vote::Approve),
        approve(false),
        "tm1 is deactivated: tm2, tm3, tm4 are three of four"
    );
    assert_eq!(flow.state.stage, Stage::AwaitingApprovals);
    // tm1 answered already: a new answer is a duplicate, it does not re-count.
    assert_eq!(flow.cast("tm1", Vote::Approve), VoteVerdict::Duplicate);
    assert_eq!(
        flow.cast("tm5", Vote::Approve),
        approve(true),
        "tm5 is the fourth active treasury manager"
    );
    assert_eq!(
        (flow.state.stage, flow.state.votes.len()),
        (Stage::ReadyToSign, 5)
    );
}

#[test]
fn an_approver_removed_from_the_group_or_stripped_of_the_role_no_longer_counts() {
    let mut flow = fresh();
    for user in ["tm1", "tm2", "tm3"] {
        assert_eq!(flow.cast(user, Vote::Approve), approve(false), "{user}");
    }
    flow.directory
        .remove_from_group("tm1", TM)
        .expect("tm1 leaves the group");
    flow.directory
        .revoke_role("tm2", "approver")
        .expect("tm2 loses the role");
    for user in ["tm4", "tm5"] {
        assert_eq!(
            flow.cast(user, Vote::Approve),
            approve(false),
            "{user}: only tm3, tm4, tm5 still count"
        );
    }
    assert_eq!(flow.cast("tm6", Vote::Approve), approve(true));
    assert_eq!(flow.state.stage, Stage::ReadyToSign);
}

#[test]
fn a_rejection_ends_the_request_whatever_the_approvals_so_far() {
    let mut flow = fresh();
    for user in ["tm1", "tm2", "tm3"] {
        assert_eq!(flow.cast(user, Vote::Approve), approve(false), "{user}");
    }
    assert_eq!(flow.cast("tm4", Vote::Reject), VoteVerdict::Reject);
    assert_eq!(flow.state.stage, Stage::Rejected);
    let late = flow.judge("tm5", &flow.ballot(Vote::Approve), flow.at + MINUTE);
    assert!(
        matches!(&late, Err(m) if m.contains("Rejected")),
        "nothing approves a rejected request: {late:?}"
    );
}

/// A case: its name, the decision's requirements, and each approver in turn with
/// whether their approval completes.
type Combination = (
    &'static str,
    Vec<ApprovalRequirement>,
    Vec<(&'static str, bool)>,
);

/// `All` needs one distinct approver per slot of every group; `Any` needs one
/// group to reach its count; several requirements must all be met.
#[test]
fn all_and_any_combinations() {
    let with_initiator = |mut r: ApprovalRequirement| {
        r.initiator_may_approve = true;
        r
    };
    let table: Vec<Combination> = vec![
        (
            "All: two treasury managers and one approver",
            vec![req(Combine::All, &[(TM, 2), (AP, 1)])],
            vec![("tm1", false), ("tm2", false), ("ap1", true)],
        ),
        (
            "All: approvers do not fill treasury-manager slots",
            vec![req(Combine::All, &[(TM, 2), (AP, 1)])],
            vec![
                ("ap1", false),
                ("ap2", false),
                ("tm1", false),
                ("tm2", true),
            ],
        ),
        (
            "All: a third treasury manager does not fill the approver slot",
            vec![req(Combine::All, &[(TM, 2), (AP, 1)])],
            vec![
                ("tm1", false),
                ("tm2", false),
                ("tm3", false),
                ("both", true),
            ],
        ),
        (
            "All: a member of both groups fills one slot, not two",
            vec![req(Combine::All, &[(TM, 1), (AP, 1)])],
            vec![("both", false), ("tm1", true)],
        ),
        (
            "All: a member of both groups moves to the slot still free",
            vec![req(Combine::All, &[(AP, 1), (TM, 1)])],
            vec![("both", false), ("ap1", true)],
        ),
        (
            "All: a member of both groups completes either side",
            vec![req(Combine::All, &[(TM, 2), (AP, 1)])],
            vec![("tm1", false), ("ap1", false), ("both", true)],
        ),
        (
            "Any: treasury managers reach their count first",
            vec![req(Combine::Any, &[(TM, 2), (AP, 2)])],
            vec![("ap1", false), ("tm1", false), ("tm2", true)],
        ),
        (
            "Any: approvers reach their count first",
            vec![req(Combine::Any, &[(TM, 2), (AP, 2)])],
            vec![("tm1", false), ("ap1", false), ("ap2", true)],
        ),
        (
            "Any: a member of both groups counts for either",
            vec![req(Combine::Any, &[(TM, 3), (AP, 2)])],
            vec![("both", false), ("ap1", true)],
        ),
        (
            "All and Any requirements: both must be met",
            vec![
                req(Combine::All, &[(TM, 2)]),
                req(Combine::Any, &[(AP, 1), (TM, 3)]),
            ],
            vec![("tm1", false), ("tm2", false), ("ap1", true)],
        ),
        (
            "All and Any requirements: the Any side met through treasury managers",
            vec![
                req(Combine::All, &[(TM, 2)]),
                req(Combine::Any, &[(AP, 2), (TM, 3)]),
            ],
            vec![
                ("ap1", false),
                ("tm1", false),
                ("tm2", false),
                ("tm3", true),
            ],
        ),
        (
            "the initiator counts only for the rule that allows it",
            vec![
                req(Combine::All, &[(TM, 2)]),
                with_initiator(req(Combine::Any, &[(TM, 1)])),
            ],
            vec![("alice", false), ("tm1", false), ("tm2", true)],
        ),
        (
            "the initiator fills a slot where the rule allows it",
            vec![with_initiator(req(Combine::All, &[(TM, 2), (AP, 1)]))],
            vec![("alice", false), ("ap1", false), ("tm1", true)],
        ),
    ];
    for (name, requirements, votes) in table {
        let mut flow = Flow::awaiting(decision(requirements));
        for (i, (user, completes)) in votes.iter().enumerate() {
            assert_eq!(
                flow.cast(user, Vote::Approve),
                approve(*completes),
                "{name}: vote {} by {user}",
                i + 1
            );
            let want = if *completes {
                Stage::ReadyToSign
            } else {
                Stage::AwaitingApprovals
            };
            assert_eq!(flow.state.stage, want, "{name}: after {user}");
        }
        assert_eq!(
            flow.state.stage,
            Stage::ReadyToSign,
            "{name}: the sequence completes"
        );
    }
}

// ---- property tests ----

const USERS: usize = 8;
const GROUPS: [&str; 3] = ["g0", "g1", "g2"];

/// Per user: group membership bits, holds the approver role, active.
fn random_directory() -> impl Strategy<Value = Vec<(u8, bool, bool)>> {
    proptest::collection::vec(
        (
            0u8..8,
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.85),
        ),
        USERS,
    )
}

fn build_directory(spec: &[(u8, bool, bool)]) -> Directory {
    let mut d = Directory::new();
    for g in GROUPS {
        d.create_group(g, "").expect("group");
    }
    for (i, (groups, approver, active)) in spec.iter().enumerate() {
        let id = format!("u{i}");
        let roles: &[&str] = if *approver { &["approver"] } else { &[] };
        let groups: Vec<&str> = GROUPS
            .iter()
            .enumerate()
            .filter(|(b, _)| groups & (1 << b) != 0)
            .map(|(_, g)| *g)
            .collect();
        add(&mut d, &id, roles, &groups);
        if !active {
            d.deactivate(&id).expect("deactivate");
        }
    }
    d
}

/// One or two requirements of one to three groups, counts 1 to 3.
fn random_requirements() -> impl Strategy<Value = Vec<ApprovalRequirement>> {
    let one = (
        any::<bool>(),
        proptest::sample::subsequence(GROUPS.to_vec(), 1..=3),
        proptest::collection::vec(1u32..=3, 3),
        prop::bool::weighted(0.3),
        prop::option::weighted(0.3, (proptest::sample::select(GROUPS.to_vec()), 0u64..45)),
    )
        .prop_map(|(all, groups, counts, initiator_may_approve, escalation)| {
            ApprovalRequirement {
                rule: "r".into(),
                combine: if all { Combine::All } else { Combine::Any },
                groups: groups
                    .into_iter()
                    .zip(counts)
                    .map(|(g, count)| GroupQuorum {
                        group: g.into(),
                        count,
                    })
                    .collect(),
                initiator_may_approve,
                escalation: escalation.map(|(group, after_ms)| Escalation {
                    group: group.into(),
                    after_ms,
                }),
                mfa: None,
            }
        });
    proptest::collection::vec(one, 1..=2)
}

fn random_decision() -> impl Strategy<Value = PolicyDecision> {
    (random_requirements(), prop::option::of(0i64..40)).prop_map(|(approvals, expiry)| {
        let mut d = decision(approvals);
        d.initiator = "u0".into();
        d.expires_at = expiry.map(|e| T0 + e);
        d
    })
}

// ---- escalation to a second group ----

/// 2 approvers, escalated to the treasury managers an hour after the decision.
fn escalating(after: i64) -> ApprovalRequirement {
    let mut r = req(Combine::All, &[(AP, 2)]);
    r.escalation = Some(Escalation {
        group: TM.into(),
        after_ms: after as u64,
    });
    r
}

#[test]
fn an_escalation_group_counts_only_from_the_decision_plus_the_delay() {
    let mut f = Flow::awaiting(decision(vec![escalating(HOUR)]));
    assert_eq!(f.cast("ap1", Vote::Approve), approve(false));
    let before = f.judge("tm1", &f.ballot(Vote::Approve), T0 + HOUR - 1);
    assert_eq!(
        before,
        Err(format!(
            "tm1 counts for rule rule-1 only once it escalates to {TM}, at 2023-11-14T23:13:20Z"
        )),
        "a treasury manager's vote before the escalation is refused with when it will count"
    );
    let reject_before = f.judge("tm1", &f.ballot(Vote::Reject), T0 + HOUR - 1);
    assert!(
        reject_before.is_err(),
        "nor may they reject: {reject_before:?}"
    );
    assert_eq!(
        escalations_due(
            f.state.decision.as_ref().expect("decided"),
            &f.approvals(),
            &f.directory,
            T0 + HOUR - 1
        ),
        vec![],
        "not due before the delay"
    );
    let due = vec![DueEscalation {
        requirement: 0,
        rule: "rule-1".into(),
        group: TM.into(),
        counts_from: T0 + HOUR,
    }];
    let d = f.state.decision.clone().expect("decided");
    assert_eq!(
        escalations_due(&d, &f.approvals(), &f.directory, T0 + HOUR),
        due
    );
    assert_eq!(
        approvals_satisfied(&d, &f.approvals(), &f.directory, T0 + HOUR),
        ApprovalStatus::Pending {
            missing: vec![format!("{AP}: 1 of 2 (rule rule-1; escalated to {TM})")]
        },
        "the shortfall says the requirement is escalated"
    );
    // The initiator stays excluded, escalated or not.
    assert_eq!(
        f.judge("alice", &f.ballot(Vote::Approve), T0 + HOUR),
        Err("alice initiated this request and may not approve it".into())
    );
    assert_eq!(f.cast_at("tm1", Vote::Approve, T0 + HOUR), approve(true));
    assert_eq!(f.state.stage, Stage::ReadyToSign);
    assert_eq!(
        approvals_satisfied(&d, &f.approvals(), &f.directory, T0 + 2 * HOUR),
        ApprovalStatus::Satisfied {
            completed_at: T0 + HOUR,
            sign_after: T0 + HOUR
        },
        "re-counted from the recorded votes and times, as a guardian does"
    );
    assert_eq!(
        escalations_due(&d, &f.approvals(), &f.directory, T0 + 2 * HOUR),
        vec![],
        "a met decision escalates nothing"
    );
}

#[test]
fn a_recorded_escalation_group_approval_from_before_the_delay_does_not_count() {
    // What a guardian re-counting a forged or mistaken trail sees: the time of
    // each recorded approval decides, not when it is counted.
    let d = decision(vec![escalating(HOUR)]);
    let dir = directory();
    let early = [
        Approval {
            user: "ap1".into(),
            at: T0 + MINUTE,
            passkey: false,
        },
        Approval {
            user: "tm1".into(),
            at: T0 + HOUR - 1,
            passkey: false,
        },
    ];
    assert_eq!(
        approvals_satisfied(&d, &early, &dir, T0 + 2 * HOUR),
        ApprovalStatus::Pending {
            missing: vec![format!("{AP}: 1 of 2 (rule rule-1; escalated to {TM})")]
        }
    );
    let on_time = [
        Approval {
            user: "ap1".into(),
            at: T0 + MINUTE,
            passkey: false,
        },
        Approval {
            user: "tm1".into(),
            at: T0 + HOUR,
            passkey: false,
        },
    ];
    assert!(matches!(
        approvals_satisfied(&d, &on_time, &dir, T0 + 2 * HOUR),
        ApprovalStatus::Satisfied { completed_at, .. } if completed_at == T0 + HOUR
    ));
}

#[test]
fn only_unmet_requirements_escalate_and_none_after_the_expiry() {
    let mut other = req(Combine::All, &[(TM, 1)]);
    other.rule = "other".into();
    other.escalation = Some(Escalation {
        group: AP.into(),
        after_ms: (2 * HOUR) as u64,
    });
    let d = decision(vec![escalating(HOUR), other]);
    let dir = directory();
    let tm1 = [Approval {
        user: "tm1".into(),
        at: T0 + MINUTE,
        passkey: false,
    }];
    assert_eq!(
        escalations_due(&d, &tm1, &dir, T0 + 3 * HOUR),
        vec![DueEscalation {
            requirement: 0,
            rule: "rule-1".into(),
            group: TM.into(),
            counts_from: T0 + HOUR,
        }],
        "the met requirement (one treasury manager) is not escalated"
    );
    assert_eq!(
        escalations_due(&d, &[], &dir, T0 + 3 * HOUR)
            .iter()
            .map(|e| (e.requirement, e.counts_from))
            .collect::<Vec<_>>(),
        vec![(0, T0 + HOUR), (1, T0 + 2 * HOUR)]
    );
    assert_eq!(
        escalations_due(&d, &[], &dir, EXPIRES + 1),
        vec![],
        "expired"
    );
}

// ---- requirements that demand passkeys ----

/// 2 treasury managers, each vote confirmed with a passkey.
fn passkeys_only() -> ApprovalRequirement {
    let mut r = req(Combine::All, &[(TM, 2)]);
    r.mfa = Some(RequiredMfa::Webauthn);
    r
}

/// [`Flow::ballot`] confirmed with `mfa`.
fn ballot_with(f: &Flow, vote: Vote, mfa: MfaMethod) -> ApprovalVote {
    ApprovalVote {
        mfa,
        ..f.ballot(vote)
    }
}

#[test]
fn a_passkey_requirement_refuses_votes_confirmed_otherwise() {
    let f = Flow::awaiting(decision(vec![passkeys_only()]));
    let now = T0 + MINUTE;
    for (mfa, how) in [
        (MfaMethod::Totp, "with an authenticator code"),
        (MfaMethod::None, "without a second factor"),
    ] {
        for vote in [Vote::Approve, Vote::Reject] {
            assert_eq!(
                f.judge("tm1", &ballot_with(&f, vote, mfa), now),
                Err(format!(
                    "rule rule-1 requires a passkey (mfa = \"webauthn\"): a vote confirmed {how} does not count; answer on the web approval page with your passkey"
                )),
                "{vote:?} with {mfa:?}"
            );
        }
    }
    // Someone who would not count is told that first, not about passkeys.
    let outsider = f.judge("ap1", &ballot_with(&f, Vote::Approve, MfaMethod::Totp), now);
    assert!(
        outsider
            .as_ref()
            .is_err_and(|e| e.contains("ap1 is not an approver")),
        "{outsider:?}"
    );
    assert_eq!(
        f.judge(
            "tm1",
            &ballot_with(&f, Vote::Approve, MfaMethod::Webauthn),
            now
        ),
        Ok(approve(false))
    );
    assert_eq!(
        f.judge(
            "tm1",
            &ballot_with(&f, Vote::Reject, MfaMethod::Webauthn),
            now
        ),
        Ok(VoteVerdict::Reject)
    );
}

#[test]
fn passkey_approvals_complete_a_passkey_requirement_and_missing_says_so() {
    let mut f = Flow::awaiting(decision(vec![passkeys_only()]));
    let pending = approvals_satisfied(
        f.state.decision.as_ref().expect("decided"),
        &f.approvals(),
        &f.directory,
        T0 + MINUTE,
    );
    assert_eq!(
        pending,
        ApprovalStatus::Pending {
            missing: vec![format!("{TM}: 0 of 2 (rule rule-1; passkey required)")]
        }
    );
    for (user, completes) in [("tm1", false), ("tm2", true)] {
        let ballot = ballot_with(&f, Vote::Approve, MfaMethod::Webauthn);
        let now = f.at + MINUTE;
        let verdict = f.judge(user, &ballot, now).expect("a passkey vote counts");
        assert_eq!(verdict, approve(completes));
        let result = if completes {
            Outcome::Success
        } else {
            Outcome::Pending
        };
        f.at = now;
        f.apply(
            EventType::TransactionApproved,
            result,
            user,
            Payload::ApprovalVote(ballot),
        );
    }
    assert_eq!(f.state.stage, Stage::ReadyToSign);
}

/// What guardians re-run counts only passkey approvals toward a passkey
/// requirement, whoever gave the others and whenever they joined the group.
#[test]
fn only_passkey_approvals_count_toward_a_passkey_requirement() {
    let f = Flow::awaiting(decision(vec![passkeys_only()]));
    let d = f.state.decision.as_ref().expect("decided");
    let given = |passkey: bool| {
        ["tm1", "tm2"]
            .map(|user| Approval {
                user: user.into(),
                at: T0 + MINUTE,
                passkey,
            })
            .to_vec()
    };
    assert_eq!(
        approvals_satisfied(d, &given(false), &f.directory, T0 + 2 * MINUTE),
        ApprovalStatus::Pending {
            missing: vec![format!("{TM}: 0 of 2 (rule rule-1; passkey required)")]
        }
    );
    assert!(matches!(
        approvals_satisfied(d, &given(true), &f.directory, T0 + 2 * MINUTE),
        ApprovalStatus::Satisfied { .. }
    ));
}

#[test]
fn a_passkey_requirement_binds_only_the_approvers_it_would_count() {
    // Passkeys from treasury managers, plus one approver (codes are fine).
    let f = Flow::awaiting(decision(vec![
        passkeys_only(),
        req(Combine::All, &[(AP, 1)]),
    ]));
    let now = T0 + MINUTE;
    assert_eq!(
        f.judge("ap1", &ballot_with(&f, Vote::Approve, MfaMethod::Totp), now),
        Ok(approve(false))
    );
    // In both groups: counting does not know how a vote was confirmed, so a
    // code is refused for them (fail closed).
    let both = f.judge(
        "both",
        &ballot_with(&f, Vote::Approve, MfaMethod::Totp),
        now,
    );
    assert!(
        both.as_ref()
            .is_err_and(|e| e.contains("requires a passkey")),
        "{both:?}"
    );
    let d = f.state.decision.as_ref().expect("decided");
    assert_eq!(
        passkey_required(d, &f.directory, "tm1", now).map(|r| r.rule.as_str()),
        Some("rule-1")
    );
    assert_eq!(passkey_required(d, &f.directory, "ap1", now), None);
}

#[test]
fn an_escalation_group_needs_passkeys_once_it_counts() {
    let mut r = escalating(HOUR);
    r.mfa = Some(RequiredMfa::Webauthn);
    let f = Flow::awaiting(decision(vec![r]));
    let code = ballot_with(&f, Vote::Approve, MfaMethod::Totp);
    // Before the escalation the treasury manager does not count at all.
    let early = f.judge("tm1", &code, T0 + HOUR - 1);
    assert!(
        early
            .as_ref()
            .is_err_and(|e| e.contains("only once it escalates")),
        "{early:?}"
    );
    let late = f.judge("tm1", &code, T0 + HOUR);
    assert!(
        late.as_ref()
            .is_err_and(|e| e.contains("requires a passkey")),
        "{late:?}"
    );
    assert_eq!(
        f.judge(
            "tm1",
            &ballot_with(&f, Vote::Approve, MfaMethod::Webauthn),
            T0 + HOUR
        ),
        Ok(approve(false))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// `approvals_satisfied`: whatever approval is added (anyone's, any time),
    /// satisfied approvals stay satisfied.
    #[test]
    fn adding_an_approval_keeps_satisfied_approvals_satisfied(
        users in random_directory(),
        decision in random_decision(),
        given in proptest::collection::vec((0..USERS, -5i64..45), 0..12),
        extra in (0..USERS, -5i64..45),
        now in 0i64..50,
    ) {
        let directory = build_directory(&users);
        let approval = |(u, at): (usize, i64)| Approval { user: format!("u{u}"), at: T0 + at, passkey: false };
        let mut approvals: Vec<Approval> = given.into_iter().map(approval).collect();
        let before = approvals_satisfied(&decision, &approvals, &directory, T0 + now);
        approvals.push(approval(extra));
        let after = approvals_satisfied(&decision, &approvals, &directory, T0 + now);
        if matches!(before, ApprovalStatus::Satisfied { .. }) {
            prop_assert!(
                matches!(after, ApprovalStatus::Satisfied { .. }),
                "satisfied by {:?}, not after adding {:?}: {:?}",
                &approvals[..approvals.len() - 1], approvals.last(), after
            );
        }
    }

    /// `judge_vote`: when an approver's vote would complete the request, another
    /// approver's (pending) approval recorded first never makes it not complete.
    /// Votes arrive in a random order and are recorded as the ballot box does.
    #[test]
    fn an_approval_never_undoes_a_completing_one(
        users in random_directory(),
        requirements in random_requirements(),
        order in Just((0..USERS).collect::<Vec<usize>>()).prop_shuffle(),
    ) {
        let mut d = decision(requirements);
        d.initiator = "u0".into();
        let mut flow = Flow::awaiting(d);
        flow.directory = build_directory(&users);
        for &u in &order {
            let user = format!("u{u}");
            let now = flow.at + MINUTE;
            let Ok(verdict) = flow.judge(&user, &flow.ballot(Vote::Approve), now) else {
                continue;
            };
            if verdict == approve(true) {
                for &w in &order {
                    let other = format!("u{w}");
                    if flow.state.votes.iter().any(|v| v.user == other) || other == user {
                        continue;
                    }
                    let mut with_other = flow.clone();
                    if with_other.judge(&other, &flow.ballot(Vote::Approve), now) != Ok(approve(false)) {
                        continue;
                    }
                    prop_assert_eq!(with_other.cast(&other, Vote::Approve), approve(false));
                    let again = with_other.judge(&user, &with_other.ballot(Vote::Approve), with_other.at + MINUTE);
                    prop_assert_eq!(
                        again, Ok(approve(true)),
                        "{} completed after {:?}, but not once {} approved too",
                        &user, flow.state.votes.iter().map(|v| &v.user).collect::<Vec<_>>(), &other
                    );
                }
            }
            let recorded = flow.cast(&user, Vote::Approve);
            prop_assert_eq!(recorded, verdict.clone());
            // Every recorded approver is recorded once; a second answer is a duplicate.
            prop_assert_eq!(flow.judge(&user, &flow.ballot(Vote::Approve), flow.at), Ok(VoteVerdict::Duplicate));
            if verdict == approve(true) {
                prop_assert_eq!(flow.state.stage, Stage::ReadyToSign);
                break;
            }
            prop_assert_eq!(flow.state.stage, Stage::AwaitingApprovals);
        }
        let mut voters: Vec<&str> = flow.state.votes.iter().map(|v| v.user.as_str()).collect();
        let n = voters.len();
        voters.sort_unstable();
        voters.dedup();
        prop_assert_eq!(voters.len(), n, "one vote per approver");
    }
}
