//! Approval collection: the channels approvers answer on (Slack, email links,
//! chat links) and the ballot box they all feed. Channels only authenticate the
//! approver and carry the answer; the ballot box decides whether it counts.

pub mod links;
pub mod slack;

use futures::future::BoxFuture;

pub mod ballot_box;
pub mod console;
pub mod enrolment;
pub mod step;

use custos_schemas::UserRecord;
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice, ApprovalVote, EnrolMethod};
use zeroize::Zeroizing;

/// One approver's answer, authenticated by a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub workflow_id: String,
    /// Directory user id (a channel maps its own identity, e.g. a Slack user id).
    pub user_id: String,
    pub vote: ApprovalVote,
    /// Already masked (`RequestContext::mask_ip`).
    pub masked_ip: Option<String>,
    pub user_agent: Option<String>,
}

/// What became of a ballot that counted or was already counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// Recorded; `quorum_reached` when it completed the approvals.
    Recorded { quorum_reached: bool },
    /// This user already answered this request: nothing double-counts.
    Duplicate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BallotError {
    /// Refused for a reason the approver may see (wrong payload hash, not an
    /// eligible approver, deactivated, expired, the workflow moved on, ...). The
    /// ballot box records the refusal in the audit trail.
    #[error("{0}")]
    Refused(String),
    /// No such workflow (or not one awaiting approvals).
    #[error("unknown workflow {0}")]
    UnknownWorkflow(String),
    /// The engine could not be reached; the approver may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// The ballot box: the one place approvals are counted.
pub trait BallotBox: Send + Sync {
    /// Records an answer. Idempotent per (workflow, user).
    fn cast(&self, ballot: Ballot) -> BoxFuture<'_, Result<Receipt, BallotError>>;
    /// What the approver is asked to approve, as it stands now.
    fn notice<'a>(
        &'a self,
        workflow_id: &'a str,
    ) -> BoxFuture<'a, Result<ApprovalNotice, BallotError>>;
    /// A directory user by id (active or not), to render and to authorize.
    fn user<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>>;
    /// The directory user whose Slack user id this is.
    fn user_by_slack_id<'a>(&'a self, slack_user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>>;
}

/// Mints the one-time web approval link of one approver for one notice (email,
/// chat links, and Slack's step-up button all open it).
pub trait ApprovalLinks: Send + Sync {
    fn link_for<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<String, NotifyError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{channel} notification to {user} failed: {reason}")]
pub struct NotifyError {
    pub channel: &'static str,
    pub user: String,
    pub reason: String,
}

/// A one-time MFA enrolment link for its user. The link is a credential (whoever
/// opens it first enrols): zeroized, and redacted in `Debug`.
pub struct EnrolmentNotice {
    pub url: Zeroizing<String>,
    pub method: EnrolMethod,
    /// Ms since the epoch.
    pub expires_at: i64,
    /// Directory id of the operator who asked.
    pub requested_by: String,
}

impl std::fmt::Debug for EnrolmentNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentNotice")
            .field("url", &"<redacted>")
            .field("method", &self.method)
            .field("expires_at", &self.expires_at)
            .field("requested_by", &self.requested_by)
            .finish()
    }
}

/// A channel that asks approvers.
pub trait Notifier: Send + Sync {
    fn channel(&self) -> ApprovalChannel;
    /// Asks `to` to answer `notice`.
    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
    /// Tells `to` how the request ended (updates the message where the channel can).
    fn conclude<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
        outcome: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>>;
    /// Hands `to` their enrolment link. Only channels that reach `to` alone
    /// may: the default refuses.
    fn enrol<'a>(
        &'a self,
        to: &'a UserRecord,
        _enrolment: &'a EnrolmentNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            Err(NotifyError {
                channel: self.channel().as_str(),
                user: to.id.clone(),
                reason: "this channel does not deliver enrolment links".into(),
            })
        })
    }
}
