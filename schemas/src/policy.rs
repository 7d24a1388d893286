//! The policy engine's decision, as recorded in a `POLICY_EVALUATED` event and
//! shown to approvers and auditors. The engine (`custos_engine::policy`) produces
//! it; guardians re-run the engine on the same inputs and compare.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the policy decided.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PolicyOutcome {
    /// Go ahead (after `delayMs`, when set) without business approvals.
    Allow,
    /// Business approvals are needed first: every entry of `approvals`.
    RequireApprovals,
    /// Refused. Any block wins over every other rule.
    Block,
}

impl PolicyOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicyOutcome::Allow => "allow",
            PolicyOutcome::RequireApprovals => "require-approvals",
            PolicyOutcome::Block => "block",
        }
    }
}

/// How the groups of one approval requirement combine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Combine {
    /// AND: every group reaches its count, each approver counted for one group only.
    All,
    /// OR: at least one group reaches its count.
    Any,
}

/// `count` distinct approvers from `group`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupQuorum {
    pub group: String,
    pub count: u32,
}

/// The approvals one rule demands. A decision's requirements are the union of
/// every triggered rule's: all of them must be met.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalRequirement {
    /// The rule that demands it.
    pub rule: String,
    pub combine: Combine,
    pub groups: Vec<GroupQuorum>,
    /// Whether the initiator's own approval counts (false unless the rule says so).
    #[serde(default)]
    pub initiator_may_approve: bool,
    /// A second group that also counts toward this requirement once it has
    /// gone unmet for a while after the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
    /// The second factor every vote toward this requirement must be confirmed
    /// with (`mfa = "webauthn"` in the rule's `approvals`); any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfa: Option<RequiredMfa>,
}

/// A second factor an approval requirement demands.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum RequiredMfa {
    /// A passkey: authenticator codes and channel logins (Slack) do not count.
    Webauthn,
}

impl RequiredMfa {
    pub const fn as_str(self) -> &'static str {
        match self {
            RequiredMfa::Webauthn => "webauthn",
        }
    }
}

/// Escalation of an approval requirement: from `afterMs` after the decision,
/// approvals from `group` count toward it too (each fills any of its slots),
/// and its members are asked. Written as `escalate_to` / `escalate_after` in a
/// rule's `approvals`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Escalation {
    pub group: String,
    pub after_ms: u64,
}

/// An amount in fiat money, as a decimal string (never a float), e.g. `"1500.00"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FiatValue {
    /// `EUR` or `USD`.
    pub currency: String,
    pub amount: String,
}

/// One rule that matched, its outcome, and why it matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMatch {
    pub rule: String,
    pub outcome: PolicyOutcome,
    /// Each condition that held, in words.
    pub reasons: Vec<String>,
}

/// The policy engine's decision on one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyDecision {
    pub outcome: PolicyOutcome,
    /// Hex SHA-256 of the canonical policy that decided.
    pub policy_version: String,
    /// The action decided on, e.g. `transfer`, `policy-change`.
    pub action: String,
    /// Directory id of the initiator (never counted as an approver unless a rule
    /// allows it).
    pub initiator: String,
    #[serde(default)]
    pub wallet: Option<String>,
    /// When it was decided, milliseconds since the Unix epoch, UTC.
    pub evaluated_at: i64,
    /// The request's amount in the policy's currency, when it was needed and known.
    #[serde(default)]
    pub fiat_value: Option<FiatValue>,
    /// Every requirement must be met (empty unless `requireApprovals`).
    #[serde(default)]
    pub approvals: Vec<ApprovalRequirement>,
    /// Approvals must be complete by then (ms since the epoch), or the request is
    /// rejected. Set with `requireApprovals`.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Time between the final approval (or the decision, when allowed outright)
    /// and the start of signing, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Every rule that matched, in policy order.
    pub matched_rules: Vec<RuleMatch>,
    /// The decision in words: which rules, why, how many approvals from whom.
    pub explanation: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ContentType;

    fn decision() -> PolicyDecision {
        PolicyDecision {
            outcome: PolicyOutcome::RequireApprovals,
            policy_version: "ab".repeat(32),
            action: "transfer".into(),
            initiator: "alice".into(),
            wallet: Some("treasury".into()),
            evaluated_at: 1_700_000_000_000,
            fiat_value: Some(FiatValue {
                currency: "EUR".into(),
                amount: "15000.00".into(),
            }),
            approvals: vec![ApprovalRequirement {
                rule: "large".into(),
                combine: Combine::All,
                groups: vec![GroupQuorum {
                    group: "treasury-managers".into(),
                    count: 4,
                }],
                initiator_may_approve: false,
                escalation: None,
                mfa: None,
            }],
            expires_at: Some(1_700_086_400_000),
            delay_ms: 0,
            matched_rules: vec![RuleMatch {
                rule: "large".into(),
                outcome: PolicyOutcome::RequireApprovals,
                reasons: vec!["amount EUR 15,000.00 is above EUR 10,000.00".into()],
            }],
            explanation: "needs 4 approvals".into(),
        }
    }

    #[test]
    fn decision_round_trips_in_both_encodings() {
        for ct in [ContentType::Json, ContentType::MsgPack] {
            let bytes = ct.encode(&decision());
            assert_eq!(ct.decode::<PolicyDecision>(&bytes), Ok(decision()));
        }
        let json = String::from_utf8(ContentType::Json.encode(&decision())).unwrap_or_default();
        assert!(json.contains("\"outcome\":\"requireApprovals\""), "{json}");
        assert!(json.contains("\"policyVersion\""), "{json}");
        assert!(json.contains("\"combine\":\"all\""), "{json}");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let mut value = serde_json::to_value(decision()).unwrap_or_default();
        value["surprise"] = serde_json::json!(1);
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        let e = ContentType::Json
            .decode::<PolicyDecision>(&bytes)
            .expect_err("unknown field");
        assert_eq!(e.field.as_deref(), Some("surprise"), "{e}");
    }

    #[test]
    fn schema_is_strict() {
        let schema =
            serde_json::to_value(schemars::schema_for!(PolicyDecision)).unwrap_or_default();
        assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    }
}
