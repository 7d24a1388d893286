//! A parsed and validated policy. Built only by [`Policy::parse`]; immutable.

use std::collections::{BTreeMap, BTreeSet};

use custos_schemas::codec;
use custos_schemas::policy::{Combine, Escalation, RequiredMfa};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::directory::{Directory, Duty};
use super::fiat::Currency;
use super::state::Scope;
use super::{ActionKind, PolicyError};

/// Days of the week, for time-of-day windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Weekday::Mon => "mon",
            Weekday::Tue => "tue",
            Weekday::Wed => "wed",
            Weekday::Thu => "thu",
            Weekday::Fri => "fri",
            Weekday::Sat => "sat",
            Weekday::Sun => "sun",
        }
    }

    pub fn parse(s: &str) -> Option<Weekday> {
        Weekday::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// The UTC weekday at `now` (ms since the epoch; 1970-01-01 was a Thursday).
    pub fn at(now: i64) -> Weekday {
        let day = now.div_euclid(86_400_000);
        Weekday::ALL[usize::try_from((day + 3).rem_euclid(7)).unwrap_or(0)]
    }
}

/// Fiat amount bounds, in micro-units of the policy currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct AmountRange {
    /// The amount is strictly above this.
    pub above: Option<u64>,
    /// The amount is at most this.
    pub at_most: Option<u64>,
}

/// Whether the destination is on (or off) any of some whitelists.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Destination {
    /// On at least one of these lists.
    In(BTreeSet<String>),
    /// On none of these lists.
    NotIn(BTreeSet<String>),
}

/// Matches when the request would take a rolling window past a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Velocity {
    pub scope: Scope,
    pub window_ms: u64,
    /// Fiat total, this request included, above which the rule matches.
    pub max_amount: Option<u64>,
    /// Number of transfers, this one included, above which the rule matches.
    pub max_count: Option<u32>,
}

/// A UTC time-of-day window, in minutes after midnight; `to` may be before
/// `from` (over midnight).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TimeWindow {
    pub from_minute: u16,
    pub to_minute: u16,
    /// Only on these days (all days when absent).
    pub days: Option<BTreeSet<Weekday>>,
    /// Match outside the window instead of inside.
    pub outside: bool,
}

impl TimeWindow {
    pub fn holds(&self, now: i64) -> bool {
        let minute = u16::try_from(now.rem_euclid(86_400_000) / 60_000).unwrap_or(0);
        let in_hours = if self.from_minute < self.to_minute {
            (self.from_minute..self.to_minute).contains(&minute)
        } else {
            minute >= self.from_minute || minute < self.to_minute
        };
        let on_day = self
            .days
            .as_ref()
            .is_none_or(|d| d.contains(&Weekday::at(now)));
        (in_hours && on_day) != self.outside
    }

    pub fn describe(&self) -> String {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        let days = self
            .days
            .as_ref()
            .map(|d| {
                let names: Vec<&str> = d.iter().map(|x| x.as_str()).collect();
                format!(" on {}", names.join(","))
            })
            .unwrap_or_default();
        format!(
            "{} {}-{} UTC{days}",
            if self.outside { "outside" } else { "within" },
            hm(self.from_minute),
            hm(self.to_minute)
        )
    }
}

/// Approvals a rule demands.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ApprovalSpec {
    pub combine: Combine,
    /// (group, count), in the order written.
    pub groups: Vec<(String, u32)>,
    pub initiator_may_approve: bool,
    /// Left out of the canonical form when absent, so policies without one
    /// keep their versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
    /// The second factor votes must use (absent: any; left out of the
    /// canonical form then, like `escalation`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfa: Option<RequiredMfa>,
}

/// What a matching rule decides.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum RuleOutcome {
    Allow,
    Block,
    RequireApprovals(ApprovalSpec),
}

/// Every condition of a rule; all must hold (an absent one always holds).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Conditions {
    pub wallets: Option<BTreeSet<String>>,
    pub chains: Option<BTreeSet<String>>,
    pub assets: Option<BTreeSet<String>>,
    pub initiators: Option<BTreeSet<String>>,
    pub initiator_roles: Option<BTreeSet<String>>,
    pub initiator_groups: Option<BTreeSet<String>>,
    /// Whether the initiator confirmed MFA when initiating.
    pub mfa: Option<bool>,
    pub amount: Option<AmountRange>,
    pub destination: Option<Destination>,
    pub velocity: Option<Velocity>,
    pub time: Option<TimeWindow>,
}

impl Conditions {
    /// Whether a condition needs the request's fiat value.
    pub fn needs_fiat(&self) -> bool {
        self.amount.is_some() || self.velocity.is_some_and(|v| v.max_amount.is_some())
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub name: String,
    pub description: String,
    pub actions: BTreeSet<ActionKind>,
    pub conditions: Conditions,
    pub outcome: RuleOutcome,
    /// Approvals must be complete within this (the policy default when absent).
    pub expires_after_ms: Option<u64>,
    /// Between the final approval (or the decision) and signing.
    pub delay_ms: u64,
    /// Line of the rule in its file (not part of the version hash).
    #[serde(skip)]
    pub line: usize,
}

/// A validated policy. Its version is the hex SHA-256 of its canonical encoding:
/// see [`Policy::canonical_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    pub description: String,
    pub currency: Currency,
    pub max_price_age_ms: u64,
    pub approval_expiry_ms: u64,
    /// Groups the rules may name, with their descriptions.
    pub groups: BTreeMap<String, String>,
    pub rules: Vec<Rule>,
    #[serde(skip)]
    pub(crate) version: String,
    /// Rule indices per action, in policy order.
    #[serde(skip)]
    pub(crate) by_action: Vec<Vec<usize>>,
}

impl Policy {
    /// Finishes a policy: indexes it and computes its version.
    pub(crate) fn seal(mut self) -> Policy {
        self.by_action = ActionKind::ALL
            .iter()
            .map(|a| {
                self.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.actions.contains(a))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        self.version = hex::encode(Sha256::digest(self.canonical_bytes()));
        self
    }

    /// The bytes the version hashes: a domain tag, then the parsed policy as
    /// MessagePack (fields in a fixed order, sets and maps sorted, amounts in
    /// micro-units, durations in milliseconds). Comments, whitespace, key order,
    /// quoting, `"1000"` versus `"1000.00"` and the order of list items do not
    /// change it; the order of rules does (it is the order of explanations).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = b"custos-policy-v1\0".to_vec();
        bytes.extend(codec::to_msgpack(self));
        bytes
    }

    /// Hex SHA-256 of [`Policy::canonical_bytes`]: recorded with every decision.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    pub(crate) fn rules_for(&self, action: ActionKind) -> &[usize] {
        self.by_action
            .get(action.index())
            .map_or(&[][..], Vec::as_slice)
    }

    /// The longest velocity window: how far back [`super::VelocityState`] must
    /// remember.
    pub fn longest_window_ms(&self) -> u64 {
        self.rules
            .iter()
            .filter_map(|r| r.conditions.velocity.map(|v| v.window_ms))
            .max()
            .unwrap_or(0)
    }

    /// Checks the policy against a directory before it is applied: every group it
    /// names exists, and every quorum can be met by the active members holding the
    /// approve duty. An empty result means it fits.
    pub fn check_directory(&self, directory: &Directory) -> Vec<PolicyError> {
        let mut errors = Vec::new();
        for group in self.groups.keys() {
            if directory.group(group).is_none() {
                errors.push(PolicyError::semantic(
                    None,
                    format!("groups.{group}"),
                    format!("group {group:?} does not exist in the directory"),
                ));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if let RuleOutcome::RequireApprovals(spec) = &rule.outcome {
                for (j, (group, count)) in spec.groups.iter().enumerate() {
                    if directory.group(group).is_none() {
                        continue;
                    }
                    let eligible = directory
                        .active_members(group)
                        .filter(|u| directory.may(&u.id, Duty::Approve))
                        .count();
                    if eligible < *count as usize {
                        errors.push(PolicyError::semantic(
                            Some(rule.line),
                            format!("rule[{i}].approvals.groups[{j}].count"),
                            format!(
                                "rule {:?} needs {count} approvals from {group}, which has only {eligible} active member(s) with the approver role",
                                rule.name
                            ),
                        ));
                    }
                }
                if let Some(e) = &spec.escalation
                    && directory.group(&e.group).is_some()
                    && !directory
                        .active_members(&e.group)
                        .any(|u| directory.may(&u.id, Duty::Approve))
                {
                    errors.push(PolicyError::semantic(
                        Some(rule.line),
                        format!("rule[{i}].approvals.escalate_to"),
                        format!(
                            "rule {:?} escalates to {}, which has no active member with the approver role",
                            rule.name, e.group
                        ),
                    ));
                }
            }
        }
        errors
    }
}
