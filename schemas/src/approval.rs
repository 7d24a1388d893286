//! Business approvals: what an approver's answer records, and what every approval
//! channel (Slack, email link, chat link) shows before asking.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::FiatValue;
use crate::request::TransferRequest;

/// Where an approver answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ApprovalChannel {
    Slack,
    Email,
    ChatLink,
    /// The `custos` CLI, by an operator with directory credentials.
    Console,
}

impl ApprovalChannel {
    pub const fn as_str(self) -> &'static str {
        match self {
            ApprovalChannel::Slack => "slack",
            ApprovalChannel::Email => "email",
            ApprovalChannel::ChatLink => "chatLink",
            ApprovalChannel::Console => "console",
        }
    }
}

/// How the approver proved it was them beyond the channel's own login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MfaMethod {
    /// The channel's identity only (a Slack user id mapped to the directory).
    None,
    Totp,
    Webauthn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Vote {
    Approve,
    Reject,
}

/// Payload of `TRANSACTION_APPROVED` / `TRANSACTION_REJECTED` by an approver (the
/// event's actor). Bound to the exact request and policy version: if either
/// changed, the vote no longer counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalVote {
    pub vote: Vote,
    /// Hex SHA-256 of the canonical request the approver saw.
    pub request_hash: String,
    /// The policy version whose decision the approver answered.
    pub policy_version: String,
    pub channel: ApprovalChannel,
    pub mfa: MfaMethod,
    #[serde(default)]
    pub comment: Option<String>,
}

/// Payload of `APPROVAL_ESCALATED`: a requirement still unmet when its
/// escalation delay passed; its escalation group was asked. Recorded on the
/// system aggregate [`ApprovalEscalation::aggregate_id`] (one per requirement,
/// so a second sweep's append conflicts instead of asking twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalEscalation {
    /// The workflow awaiting approvals (a transfer or a change).
    pub workflow_id: String,
    /// Index of the requirement in the decision's `approvals`.
    pub requirement: u32,
    /// The rule(s) that demand it.
    pub rule: String,
    /// The escalation group.
    pub group: String,
    /// From when the group's approvals count (decision time plus the delay, ms
    /// since the epoch): what every replica computes from the decision.
    pub counts_from: i64,
    /// Directory ids of the members asked.
    pub notified: Vec<String>,
}

impl ApprovalEscalation {
    /// The system aggregate holding requirement `requirement`'s escalation of
    /// workflow `workflow_id`.
    pub fn aggregate_id(workflow_id: &str, requirement: u32) -> String {
        format!("escalation-{workflow_id}-{requirement}")
    }
}

/// Everything an approver sees before answering, on every channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalNotice {
    pub workflow_id: String,
    pub request: TransferRequest,
    pub request_hash: String,
    pub policy_version: String,
    /// Chain of the wallet, e.g. `ltc-regtest`.
    pub chain: String,
    #[serde(default)]
    pub fiat_value: Option<FiatValue>,
    /// Whether the destination is in the wallet's address book (`None`: no
    /// address book applies).
    #[serde(default)]
    pub whitelisted: Option<bool>,
    /// The policy's explanation: which rules, why, how many approvals from whom.
    pub explanation: String,
    /// Users whose approval counts so far.
    pub approved_by: Vec<String>,
    /// What is still missing, e.g. `treasury-managers: 2 of 4`.
    pub missing: Vec<String>,
    /// Ms since the epoch after which the request is rejected.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// High value: approving needs the web page with MFA, never an in-place click.
    pub step_up_required: bool,
}

/// The second factor an enrolment link sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EnrolMethod {
    /// An authenticator app: the page shows the secret once and activates it
    /// only once the user types a valid current code.
    Totp,
    /// A passkey (WebAuthn), created on the page.
    #[default]
    Passkey,
}

impl EnrolMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            EnrolMethod::Totp => "totp",
            EnrolMethod::Passkey => "passkey",
        }
    }
}

/// An operator's request ([`crate::subjects::REQ_MFA_ENROL`], JSON) for a
/// one-time enrolment link, delivered to the user on their channels: the
/// operator never sees the link or the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrolmentRequest {
    /// Directory id of the user who enrols.
    pub user: String,
    pub method: EnrolMethod,
    /// Directory id of the operator asking: an active administrator.
    pub requested_by: String,
}

/// The answer to an [`EnrolmentRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", tag = "status")]
pub enum EnrolmentReply {
    /// A link was issued (and recorded); `sent` names the channels that
    /// delivered it, `failed` those that could not (with why).
    Issued {
        user: String,
        method: EnrolMethod,
        /// Hex SHA-256 of the link's token, as the audit trail records it.
        link_hash: String,
        /// Ms since the epoch.
        expires_at: i64,
        sent: Vec<String>,
        failed: Vec<String>,
    },
    Refused {
        #[serde(default)]
        field: Option<String>,
        reason: String,
    },
}
