//! Policy files (TOML): syntax, unknown fields, and the semantic checks, with the
//! line, column and field of every error.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use custos_schemas::policy::{Combine, Escalation, RequiredMfa};
use custos_schemas::validate_token;
use serde::Deserialize;
use toml::Spanned;

use super::ActionKind;
use super::PolicyError;
use super::fiat::{Currency, parse_duration, parse_micros};
use super::model::{
    AmountRange, ApprovalSpec, Conditions, Destination, Policy, Rule, RuleOutcome, TimeWindow,
    Velocity, Weekday,
};
use super::state::Scope;
use crate::chains;

/// The only policy file format version this build reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest approval expiry and time delay accepted.
pub const MAX_EXPIRY_MS: u64 = 30 * 86_400_000;
/// Longest velocity window accepted.
pub const MAX_WINDOW_MS: u64 = 90 * 86_400_000;
/// Most approvals one group can be asked for.
pub const MAX_QUORUM: u32 = 100;

/// An amount written as a string (`"1000.50"`) or an integer (`1000`); floats are
/// refused (they lose money).
#[derive(Debug, Clone)]
struct AmountLit(String);

impl<'de> Deserialize<'de> for AmountLit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AmountLit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an amount as a string (\"1000.50\") or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AmountLit, E> {
                Ok(AmountLit(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<AmountLit, E> {
                Ok(AmountLit(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<AmountLit, E> {
                Ok(AmountLit(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<AmountLit, E> {
                Err(E::custom(
                    "write amounts as strings (\"1000.50\") or integers, never floats",
                ))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<u32>,
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    currency: Spanned<String>,
    max_price_age: Spanned<String>,
    approval_expiry: Spanned<String>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    actions: Spanned<Vec<Spanned<String>>>,
    wallets: Option<Spanned<Vec<String>>>,
    chains: Option<Spanned<Vec<Spanned<String>>>>,
    assets: Option<Spanned<Vec<String>>>,
    initiators: Option<Spanned<Vec<String>>>,
    initiator_roles: Option<Spanned<Vec<String>>>,
    initiator_groups: Option<Spanned<Vec<Spanned<String>>>>,
    mfa: Option<bool>,
    amount: Option<Spanned<RawAmount>>,
    destination: Option<Spanned<RawDestination>>,
    velocity: Option<Spanned<RawVelocity>>,
    time: Option<Spanned<RawTime>>,
    outcome: Spanned<String>,
    approvals: Option<Spanned<RawApprovals>>,
    expires_after: Option<Spanned<String>>,
    delay: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAmount {
    above: Option<Spanned<AmountLit>>,
    at_most: Option<Spanned<AmountLit>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(rename = "in")]
    in_lists: Option<Vec<String>>,
    not_in: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVelocity {
    scope: Spanned<String>,
    window: Spanned<String>,
    max_amount: Option<Spanned<AmountLit>>,
    max_count: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTime {
    from: Spanned<String>,
    to: Spanned<String>,
    days: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    outside: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    combine: Option<Spanned<String>>,
    groups: Spanned<Vec<Spanned<RawQuorum>>>,
    #[serde(default)]
    initiator_may_approve: bool,
    escalate_to: Option<Spanned<String>>,
    escalate_after: Option<Spanned<String>>,
    mfa: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    group: Spanned<String>,
    count: Spanned<u32>,
}

/// Line and column (1-based) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.chars().count(), |p| before[p + 1..].chars().count())
        + 1;
    (line, column)
}

struct Checker<'a> {
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) {
        let (line, column) = position(self.text, span.start);
        self.errors.push(PolicyError {
            line: Some(line),
            column: Some(column),
            field: Some(field.into()),
            message: message.into(),
        });
    }

    fn line(&self, span: &Range<usize>) -> usize {
        position(self.text, span.start).0
    }

    fn duration(
        &mut self,
        s: &Spanned<String>,
        field: &str,
        min_ms: u64,
        max_ms: u64,
    ) -> Option<u64> {
        match parse_duration(s.get_ref()) {
            Err(e) => {
                self.error(s.span(), field, e);
                None
            }
            Ok(ms) if ms < min_ms || ms > max_ms => {
                self.error(
                    s.span(),
                    field,
                    format!(
                        "{} is outside {} to {}",
                        s.get_ref(),
                        super::fiat::format_duration(min_ms),
                        super::fiat::format_duration(max_ms)
                    ),
                );
                None
            }
            Ok(ms) => Some(ms),
        }
    }

    fn amount(&mut self, a: &Spanned<AmountLit>, field: &str) -> Option<u64> {
        match parse_micros(&a.get_ref().0) {
            Ok(m) => Some(m),
            Err(e) => {
                self.error(a.span(), field, e);
                None
            }
        }
    }

    /// A non-empty list of names, as a set.
    fn set(
        &mut self,
        list: &Option<Spanned<Vec<String>>>,
        field: &str,
        token: bool,
    ) -> Option<BTreeSet<String>> {
        let list = list.as_ref()?;
        if list.get_ref().is_empty() {
            self.error(
                list.span(),
                field,
                "an empty list never matches; leave the key out to match any",
            );
        }
        for item in list.get_ref() {
            if item.is_empty() || (token && validate_token("name", item).is_err()) {
                self.error(list.span(), field, format!("{item:?} is not a valid name"));
            }
        }
        Some(list.get_ref().iter().cloned().collect())
    }
}

impl Policy {
    /// Parses and validates a policy file. On error, every problem found is
    /// returned, each with its line, column and field; nothing else changes (the
    /// active policy is whatever the caller holds).
    pub fn parse(text: &str) -> Result<Policy, Vec<PolicyError>> {
        let raw: RawPolicy = {
            let de =
                toml::Deserializer::parse(text).map_err(|e| vec![syntax_error(text, &e, None)])?;
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = field_of(&e);
                vec![syntax_error(text, e.inner(), field)]
            })?
        };
        let mut c = Checker {
            text,
            errors: Vec::new(),
        };
        if *raw.version.get_ref() != FORMAT_VERSION {
            c.error(
                raw.version.span(),
                "version",
                format!(
                    "policy format version {} is not supported (this build reads {FORMAT_VERSION})",
                    raw.version.get_ref()
                ),
            );
        }
        if validate_token("name", raw.name.get_ref()).is_err() {
            c.error(
                raw.name.span(),
                "name",
                "must be 1 to 128 of A-Z, a-z, 0-9, '-' and '_'",
            );
        }
        let currency = Currency::parse(raw.currency.get_ref());
        if currency.is_none() {
            c.error(
                raw.currency.span(),
                "currency",
                format!(
                    "{:?} is not supported: use \"EUR\" or \"USD\"",
                    raw.currency.get_ref()
                ),
            );
        }
        let max_price_age_ms = c.duration(&raw.max_price_age, "max_price_age", 1_000, 86_400_000);
        let approval_expiry_ms = c.duration(
            &raw.approval_expiry,
            "approval_expiry",
            60_000,
            MAX_EXPIRY_MS,
        );
        let mut groups = BTreeMap::new();
        for (name, description) in &raw.groups {
            if validate_token("group", name.get_ref()).is_err() {
                c.error(
                    name.span(),
                    format!("groups.{}", name.get_ref()),
                    "a group name is 1 to 128 of A-Z, a-z, 0-9, '-' and '_'",
                );
            }
            groups.insert(name.get_ref().clone(), description.clone());
        }
        if raw.rule.is_empty() {
            c.errors.push(PolicyError {
                line: None,
                column: None,
                field: Some("rule".into()),
                message: "the policy has no [[rule]]: it would deny everything".into(),
            });
        }
        let mut rules = Vec::new();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, raw_rule) in raw.rule.iter().enumerate() {
            if let Some(rule) = check_rule(&mut c, i, raw_rule, &groups, approval_expiry_ms) {
                if let Some(first) = names.get(&rule.name) {
                    c.error(
                        raw_rule.get_ref().name.span(),
                        format!("rule[{i}].name"),
                        format!(
                            "duplicate rule name {:?} (first used on line {first})",
                            rule.name
                        ),
                    );
                } else {
                    names.insert(rule.name.clone(), rule.line);
                }
                rules.push(rule);
            }
        }
        contradictions(&mut c, &rules);
        let (Some(currency), Some(max_price_age_ms), Some(approval_expiry_ms)) =
            (currency, max_price_age_ms, approval_expiry_ms)
        else {
            return Err(sorted(c.errors));
        };
        if !c.errors.is_empty() {
            return Err(sorted(c.errors));
        }
        Ok(Policy {
            name: raw.name.into_inner(),
            description: raw.description,
            currency,
            max_price_age_ms,
            approval_expiry_ms,
            groups,
            rules,
            version: String::new(),
            by_action: Vec::new(),
        }
        .seal())
    }
}

fn sorted(mut errors: Vec<PolicyError>) -> Vec<PolicyError> {
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    errors
}

fn field_of(e: &serde_path_to_error::Error<toml::de::Error>) -> Option<String> {
    // `Spanned` values add a private segment to the path: drop it.
    let path = e
        .path()
        .to_string()
        .replace(".$__serde_spanned_private_value", "")
        .replace("$__serde_spanned_private_value", "");
    let message = e.inner().message();
    // For an unknown or missing key serde names it in the message; the path is
    // the enclosing table.
    let named = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"));
    match (named, path.as_str()) {
        (Some(name), "." | "") => Some(name.to_string()),
        (Some(name), p) if p == name || p.ends_with(&format!(".{name}")) => Some(p.to_string()),
        (Some(name), p) => Some(format!("{p}.{name}")),
        (None, "." | "") => None,
        (None, p) => Some(p.to_string()),
    }
}

fn syntax_error(text: &str, e: &toml::de::Error, field: Option<String>) -> PolicyError {
    let (line, column) = match e.span() {
        Some(span) => {
            let (l, c) = position(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    PolicyError {
        line,
        column,
        field,
        message: e.message().trim().to_string(),
    }
}

fn check_rule(
    c: &mut Checker<'_>,
    i: usize,
    spanned: &Spanned<RawRule>,
    groups: &BTreeMap<String, String>,
    approval_expiry_ms: Option<u64>,
) -> Option<Rule> {
    let raw = spanned.get_ref();
    let f = |name: &str| format!("rule[{i}].{name}");
    let errors_before = c.errors.len();
    let name = raw.name.get_ref().clone();
    if validate_token("name", &name).is_err() {
        c.error(
            raw.name.span(),
            f("name"),
            "a rule name is 1 to 128 of A-Z, a-z, 0-9, '-' and '_'",
        );
    }
    let mut actions = BTreeSet::new();
    if raw.actions.get_ref().is_empty() {
        c.error(raw.actions.span(), f("actions"), "name at least one action");
    }
    for a in raw.actions.get_ref() {
        match ActionKind::parse(a.get_ref()) {
            Some(kind) => {
                if !actions.insert(kind) {
                    c.error(
                        a.span(),
                        f("actions"),
                        format!("{} is listed twice", a.get_ref()),
                    );
                }
            }
            None => c.error(
                a.span(),
                f("actions"),
                format!(
                    "unknown action {:?}; one of {}",
                    a.get_ref(),
                    ActionKind::ALL.map(ActionKind::as_str).join(", ")
                ),
            ),
        }
    }
    let transfers_only = actions.iter().all(|a| *a == ActionKind::Transfer);
    let moving_funds = actions.iter().all(|a| a.moves_funds());
    let mut conditions = Conditions {
        wallets: c.set(&raw.wallets, &f("wallets"), true),
        assets: c.set(&raw.assets, &f("assets"), false),
        initiators: c.set(&raw.initiators, &f("initiators"), true),
        initiator_roles: c.set(&raw.initiator_roles, &f("initiator_roles"), true),
        mfa: raw.mfa,
        ..Conditions::default()
    };
    if let Some(list) = &raw.chains {
        if list.get_ref().is_empty() {
            c.error(
                list.span(),
                f("chains"),
                "an empty list never matches; leave the key out to match any",
            );
        }
        for chain in list.get_ref() {
            if chains::chain(chain.get_ref()).is_none() {
                c.error(
                    chain.span(),
                    f("chains"),
                    format!(
                        "unknown chain {:?}; known: {}",
                        chain.get_ref(),
                        chains::CHAINS
                            .iter()
                            .map(|c| c.id)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        conditions.chains = Some(list.get_ref().iter().map(|s| s.get_ref().clone()).collect());
    }
    if let Some(list) = &raw.initiator_groups {
        if list.get_ref().is_empty() {
            c.error(
                list.span(),
                f("initiator_groups"),
                "an empty list never matches; leave the key out to match any",
            );
        }
        for g in list.get_ref() {
            if !groups.contains_key(g.get_ref()) {
                c.error(
                    g.span(),
                    f("initiator_groups"),
                    format!("group {:?} is not declared in [groups]", g.get_ref()),
                );
            }
        }
        conditions.initiator_groups =
            Some(list.get_ref().iter().map(|s| s.get_ref().clone()).collect());
    }
    let only_for_transfers = |c: &mut Checker<'_>, span: Range<usize>, key: &str| {
        if !transfers_only {
            c.error(
                span,
                f(key),
                format!("{key} only applies to transfers, but the rule's actions include others"),
            );
        }
    };
    if let Some(amount) = &raw.amount {
        if !moving_funds {
            c.error(
                amount.span(),
                f("amount"),
                "amount only applies to transfers and fee bumps, but the rule's actions include others",
            );
        }
        let a = amount.get_ref();
        let above = a
            .above
            .as_ref()
            .and_then(|v| c.amount(v, &f("amount.above")));
        let at_most = a
            .at_most
            .as_ref()
            .and_then(|v| c.amount(v, &f("amount.at_most")));
        if a.above.is_none() && a.at_most.is_none() {
            c.error(amount.span(), f("amount"), "give above, at_most or both");
        }
        if let (Some(lo), Some(hi)) = (above, at_most)
            && lo >= hi
        {
            c.error(
                amount.span(),
                f("amount"),
                "above must be less than at_most: no amount can match",
            );
        }
        conditions.amount = Some(AmountRange { above, at_most });
    }
    if let Some(dest) = &raw.destination {
        only_for_transfers(c, dest.span(), "destination");
        let d = dest.get_ref();
        conditions.destination = match (&d.in_lists, &d.not_in) {
            (Some(lists), None) if !lists.is_empty() => {
                Some(Destination::In(lists.iter().cloned().collect()))
            }
            (None, Some(lists)) if !lists.is_empty() => {
                Some(Destination::NotIn(lists.iter().cloned().collect()))
            }
            _ => {
                c.error(
                    dest.span(),
                    f("destination"),
                    "give exactly one of `in` or `not_in`, each a non-empty list of whitelists",
                );
                None
            }
        };
    }
    if let Some(v) = &raw.velocity {
        only_for_transfers(c, v.span(), "velocity");
        let r = v.get_ref();
        let scope = match r.scope.get_ref().as_str() {
            "wallet" => Some(Scope::Wallet),
            "initiator" => Some(Scope::Initiator),
            other => {
                c.error(
                    r.scope.span(),
                    f("velocity.scope"),
                    format!("{other:?} is not a scope: use \"wallet\" or \"initiator\""),
                );
                None
            }
        };
        let window_ms = c.duration(&r.window, &f("velocity.window"), 1_000, MAX_WINDOW_MS);
        let max_amount = r
            .max_amount
            .as_ref()
            .and_then(|a| c.amount(a, &f("velocity.max_amount")));
        let max_count = r.max_count.as_ref().map(|n| *n.get_ref());
        if let Some(n) = &r.max_count
            && *n.get_ref() == 0
        {
            c.error(
                n.span(),
                f("velocity.max_count"),
                "must be at least 1 (to refuse every transfer, use outcome = \"block\")",
            );
        }
        if r.max_amount.is_none() && r.max_count.is_none() {
            c.error(
                v.span(),
                f("velocity"),
                "give max_amount, max_count or both",
            );
        }
        if let (Some(scope), Some(window_ms)) = (scope, window_ms) {
            conditions.velocity = Some(Velocity {
                scope,
                window_ms,
                max_amount,
                max_count,
            });
        }
    }
    if let Some(t) = &raw.time {
        let r = t.get_ref();
        let from = minute_of_day(c, &r.from, &f("time.from"));
        let to = minute_of_day(c, &r.to, &f("time.to"));
        let days = r.days.as_ref().map(|days| {
            let mut set = BTreeSet::new();
            for d in days {
                match Weekday::parse(d.get_ref()) {
                    Some(w) => {
                        set.insert(w);
                    }
                    None => c.error(
                        d.span(),
                        f("time.days"),
                        format!(
                            "{:?} is not a day: use mon, tue, wed, thu, fri, sat, sun",
                            d.get_ref()
                        ),
                    ),
                }
            }
            set
        });
        if days.as_ref().is_some_and(BTreeSet::is_empty) {
            c.error(
                t.span(),
                f("time.days"),
                "an empty list of days never matches",
            );
        }
        if let (Some(from), Some(to)) = (from, to) {
            if from == to {
                c.error(
                    t.span(),
                    f("time"),
                    "from and to are equal: the window is empty",
                );
            }
            conditions.time = Some(TimeWindow {
                from_minute: from,
                to_minute: to,
                days,
                outside: r.outside,
            });
        }
    }
    let outcome = match (raw.outcome.get_ref().as_str(), &raw.approvals) {
        ("allow", None) => Some(RuleOutcome::Allow),
        ("block", None) => Some(RuleOutcome::Block),
        ("allow" | "block", Some(a)) => {
            c.error(
                a.span(),
                f("approvals"),
                format!("outcome = {:?} takes no approvals", raw.outcome.get_ref()),
            );
            None
        }
        ("require-approvals", None) => {
            c.error(
                raw.outcome.span(),
                f("approvals"),
                "outcome = \"require-approvals\" needs approvals = { groups = [...] }",
            );
            None
        }
        ("require-approvals", Some(a)) => {
            approvals(c, &f("approvals"), a, groups).map(RuleOutcome::RequireApprovals)
        }
        (other, _) => {
            c.error(
                raw.outcome.span(),
                f("outcome"),
                format!(
                    "{other:?} is not an outcome: use \"allow\", \"block\" or \"require-approvals\""
                ),
            );
            None
        }
    };
    let expires_after_ms = raw.expires_after.as_ref().and_then(|e| {
        if raw.outcome.get_ref() != "require-approvals" {
            c.error(
                e.span(),
                f("expires_after"),
                "only rules that require approvals expire",
            );
        }
        c.duration(e, &f("expires_after"), 60_000, MAX_EXPIRY_MS)
    });
    // An escalation due only after the approvals expired would never happen.
    if let (Some(RuleOutcome::RequireApprovals(spec)), Some(a)) = (&outcome, &raw.approvals)
        && let (Some(e), Some(after)) = (&spec.escalation, &a.get_ref().escalate_after)
        && let Some(expiry) = expires_after_ms.or(approval_expiry_ms)
        && e.after_ms >= expiry
    {
        c.error(
            after.span(),
            f("approvals.escalate_after"),
            format!(
                "{} is not before the approvals expire ({}): the escalation would never happen",
                after.get_ref(),
                super::fiat::format_duration(expiry)
            ),
        );
    }
    let delay_ms = match &raw.delay {
        Some(d) => {
            if raw.outcome.get_ref() == "block" {
                c.error(d.span(), f("delay"), "a blocking rule has no delay");
            }
            c.duration(d, &f("delay"), 1_000, MAX_EXPIRY_MS)
                .unwrap_or(0)
        }
        None => 0,
    };
    if c.errors.len() > errors_before {
        return None;
    }
    Some(Rule {
        name,
        description: raw.description.clone(),
        actions,
        conditions,
        outcome: outcome?,
        expires_after_ms,
        delay_ms,
        line: c.line(&spanned.span()),
    })
}

fn minute_of_day(c: &mut Checker<'_>, s: &Spanned<String>, field: &str) -> Option<u16> {
    let parsed = s.get_ref().split_once(':').and_then(|(h, m)| {
        let ok = h.len() == 2 && m.len() == 2;
        let h: u16 = h.parse().ok()?;
        let m: u16 = m.parse().ok()?;
        (ok && h < 24 && m < 60).then_some(h * 60 + m)
    });
    if parsed.is_none() {
        c.error(
            s.span(),
            field,
            format!("{:?} is not a UTC time like \"08:00\"", s.get_ref()),
        );
    }
    parsed
}

fn approvals(
    c: &mut Checker<'_>,
    field: &str,
    a: &Spanned<RawApprovals>,
    groups: &BTreeMap<String, String>,
) -> Option<ApprovalSpec> {
    let r = a.get_ref();
    let combine = match r.combine.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("all") => Combine::All,
        Some("any") => Combine::Any,
        Some(other) => {
            if let Some(s) = &r.combine {
                c.error(
                    s.span(),
                    format!("{field}.combine"),
                    format!("{other:?} is not a combination: use \"all\" (AND) or \"any\" (OR)"),
                );
            }
            return None;
        }
    };
    if r.groups.get_ref().is_empty() {
        c.error(
            r.groups.span(),
            format!("{field}.groups"),
            "name at least one group",
        );
    }
    let mut out: Vec<(String, u32)> = Vec::new();
    for (j, q) in r.groups.get_ref().iter().enumerate() {
        let q = q.get_ref();
        let group = q.group.get_ref();
        if !groups.contains_key(group) {
            c.error(
                q.group.span(),
                format!("{field}.groups[{j}].group"),
                format!(
                    "approvals from group {group:?}, which is not declared in [groups] (declared: {})",
                    groups.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if out.iter().any(|(g, _)| g == group) {
            c.error(
                q.group.span(),
                format!("{field}.groups[{j}].group"),
                format!("group {group:?} is listed twice"),
            );
        }
        let count = *q.count.get_ref();
        if count == 0 || count > MAX_QUORUM {
            c.error(
                q.count.span(),
                format!("{field}.groups[{j}].count"),
                format!(
                    "must be 1 to {MAX_QUORUM} (to need no approvals, use outcome = \"allow\")"
                ),
            );
        }
        out.push((group.clone(), count));
    }
    let escalation = escalation(c, field, a, &out, groups);
    let mfa = match r.mfa.as_ref() {
        None => None,
        Some(m) if m.get_ref() == RequiredMfa::Webauthn.as_str() => Some(RequiredMfa::Webauthn),
        Some(m) => {
            let why = match m.get_ref().as_str() {
                // Every link already asks for a code or a passkey.
                "totp" => "every web approval already needs an authenticator code or a passkey; only \"webauthn\" (passkeys) can be demanded".to_string(),
                other => format!("{other:?} is not a second factor a rule can demand: use \"webauthn\" (passkeys)"),
            };
            c.error(m.span(), format!("{field}.mfa"), why);
            return None;
        }
    };
    Some(ApprovalSpec {
        combine,
        groups: out,
        initiator_may_approve: r.initiator_may_approve,
        escalation,
        mfa,
    })
}

/// `escalate_to` and `escalate_after`: both or neither; a declared group that
/// is not already one of the requirement's own.
fn escalation(
    c: &mut Checker<'_>,
    field: &str,
    a: &Spanned<RawApprovals>,
    own: &[(String, u32)],
    groups: &BTreeMap<String, String>,
) -> Option<Escalation> {
    let r = a.get_ref();
    match (&r.escalate_to, &r.escalate_after) {
        (None, None) => None,
        (Some(to), None) => {
            c.error(
                to.span(),
                format!("{field}.escalate_after"),
                "escalate_to needs escalate_after: how long after the decision the group is asked",
            );
            None
        }
        (None, Some(after)) => {
            c.error(
                after.span(),
                format!("{field}.escalate_to"),
                "escalate_after needs escalate_to: the group asked once it passes",
            );
            None
        }
        (Some(to), Some(after)) => {
            let group = to.get_ref();
            let mut ok = true;
            if !groups.contains_key(group) {
                c.error(
                    to.span(),
                    format!("{field}.escalate_to"),
                    format!(
                        "escalation to group {group:?}, which is not declared in [groups] (declared: {})",
                        groups.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
                ok = false;
            }
            if own.iter().any(|(g, _)| g == group) {
                c.error(
                    to.span(),
                    format!("{field}.escalate_to"),
                    format!(
                        "{group:?} already approves for this requirement: escalate to another group"
                    ),
                );
                ok = false;
            }
            let after_ms = c.duration(
                after,
                &format!("{field}.escalate_after"),
                1_000,
                MAX_EXPIRY_MS,
            );
            Some(Escalation {
                group: group.clone(),
                after_ms: after_ms.filter(|_| ok)?,
            })
        }
    }
}

/// Rules with the same actions and conditions: one would shadow the other.
fn contradictions(c: &mut Checker<'_>, rules: &[Rule]) {
    let mut seen: BTreeMap<Vec<u8>, &Rule> = BTreeMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let key = custos_schemas::codec::to_msgpack(&(&rule.actions, &rule.conditions));
        if let Some(first) = seen.get(&key) {
            let message = if first.outcome == rule.outcome {
                format!(
                    "rule {:?} repeats the actions and conditions of rule {:?} (line {})",
                    rule.name, first.name, first.line
                )
            } else {
                format!(
                    "rule {:?} has the same actions and conditions as rule {:?} (line {}) but a different outcome: the rules contradict each other",
                    rule.name, first.name, first.line
                )
            };
            let (line, column) = (Some(rule.line), Some(1));
            c.errors.push(PolicyError {
                line,
                column,
                field: Some(format!("rule[{i}]")),
                message,
            });
        } else {
            seen.insert(key, rule);
        }
    }
}
