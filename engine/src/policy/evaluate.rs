//! One decision: freezes, the initiator's standing, then every rule for the action.

use custos_schemas::policy::{
    ApprovalRequirement, FiatValue, GroupQuorum, PolicyDecision, PolicyOutcome, RuleMatch,
};

use super::Request;
use super::directory::Directory;
use super::fiat::{PriceSnapshot, format_duration, format_micros, plain_micros};
use super::model::{Conditions, Destination, Policy, Rule, RuleOutcome};
use super::state::{AddressBook, FreezeState, Scope, VelocityState};

/// Everything a decision reads besides the policy and the request.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub directory: &'a Directory,
    pub prices: &'a PriceSnapshot,
    pub velocity: &'a VelocityState,
    pub address_book: &'a AddressBook,
    pub freeze: &'a FreezeState,
    /// The evaluation time, milliseconds since the Unix epoch, UTC.
    pub now: i64,
}

/// The request's fiat value, computed at most once and only when a rule needs it.
enum Fiat {
    NotYet,
    Known(u128),
    Unknown(String),
}

/// Decides on `request` under `policy`. Deterministic: the same arguments always
/// give the same decision.
pub fn evaluate(policy: &Policy, request: &Request, inputs: &Inputs<'_>) -> PolicyDecision {
    let mut decision = PolicyDecision {
        outcome: PolicyOutcome::Block,
        policy_version: policy.version().to_string(),
        action: request.action.as_str().to_string(),
        initiator: request.initiator.clone(),
        wallet: request.wallet.clone(),
        evaluated_at: inputs.now,
        fiat_value: None,
        approvals: Vec::new(),
        expires_at: None,
        delay_ms: 0,
        matched_rules: Vec::new(),
        explanation: String::new(),
    };
    if let Some(reason) = inputs
        .freeze
        .blocks(request.action, request.wallet.as_deref())
    {
        return finish_blocked(policy, request, decision, &reason);
    }
    if let Some(reason) = initiator_problem(inputs.directory, request) {
        return finish_blocked(policy, request, decision, &reason);
    }
    if let Some(reason) = incomplete(request) {
        return finish_blocked(policy, request, decision, &reason);
    }

    let mut fiat = Fiat::NotYet;
    let mut unvalued: Vec<&Rule> = Vec::new();
    let mut matched: Vec<&Rule> = Vec::new();
    for &i in policy.rules_for(request.action) {
        let Some(rule) = policy.rules.get(i) else {
            continue;
        };
        let c = &rule.conditions;
        if !holds_without_fiat(c, request, inputs) {
            continue;
        }
        if c.needs_fiat() {
            if let Fiat::NotYet = fiat {
                fiat = value(policy, request, inputs);
            }
            match fiat {
                Fiat::Known(micros) => {
                    if !holds_with_fiat(c, request, inputs, micros) {
                        continue;
                    }
                }
                _ => {
                    unvalued.push(rule);
                    continue;
                }
            }
        } else if !holds_velocity_count(c, request, inputs) {
            continue;
        }
        matched.push(rule);
    }

    let fiat_known = match fiat {
        Fiat::Known(m) => Some(m),
        _ => None,
    };
    decision.fiat_value = fiat_known.map(|m| FiatValue {
        currency: policy.currency.as_str().to_string(),
        amount: plain_micros(m),
    });
    for rule in &matched {
        decision.matched_rules.push(RuleMatch {
            rule: rule.name.clone(),
            outcome: outcome_of(&rule.outcome),
            reasons: reasons(policy, rule, request, inputs, fiat_known),
        });
    }

    let blocked = matched
        .iter()
        .any(|r| matches!(r.outcome, RuleOutcome::Block));
    let mut summary;
    if let (false, Fiat::Unknown(problem)) = (unvalued.is_empty(), &fiat) {
        decision.outcome = PolicyOutcome::Block;
        let names: Vec<&str> = unvalued.iter().map(|r| r.name.as_str()).collect();
        summary = format!(
            "Blocked (fail closed): rule(s) {} need the amount in {}, and {problem}.",
            names.join(", "),
            policy.currency.as_str()
        );
    } else if blocked {
        decision.outcome = PolicyOutcome::Block;
        let names: Vec<&str> = matched
            .iter()
            .filter(|r| matches!(r.outcome, RuleOutcome::Block))
            .map(|r| r.name.as_str())
            .collect();
        summary = format!(
            "Blocked by rule(s) {}: a block wins over every other rule.",
            names.join(", ")
        );
    } else if matched.is_empty() {
        decision.outcome = PolicyOutcome::Block;
        summary = format!(
            "Denied: no rule of the policy matches this {} (anything unmatched is denied).",
            request.action.as_str()
        );
    } else {
        let mut expiry: Option<u64> = None;
        for rule in &matched {
            decision.delay_ms = decision.delay_ms.max(rule.delay_ms);
            if let RuleOutcome::RequireApprovals(spec) = &rule.outcome {
                let e = rule.expires_after_ms.unwrap_or(policy.approval_expiry_ms);
                expiry = Some(expiry.map_or(e, |x| x.min(e)));
                let groups: Vec<GroupQuorum> = spec
                    .groups
                    .iter()
                    .map(|(g, n)| GroupQuorum {
                        group: g.clone(),
                        count: *n,
                    })
                    .collect();
                match decision.approvals.iter_mut().find(|a| {
                    a.combine == spec.combine
                        && a.groups == groups
                        && a.initiator_may_approve == spec.initiator_may_approve
                        && a.escalation == spec.escalation
                        && a.mfa == spec.mfa
                }) {
                    // The union: the same demand from two rules is one demand.
                    Some(same) => {
                        same.rule.push_str(", ");
                        same.rule.push_str(&rule.name);
                    }
                    None => decision.approvals.push(ApprovalRequirement {
                        rule: rule.name.clone(),
                        combine: spec.combine,
                        groups,
                        initiator_may_approve: spec.initiator_may_approve,
                        escalation: spec.escalation.clone(),
                        mfa: spec.mfa,
                    }),
                }
            }
        }
        if decision.approvals.is_empty() {
            decision.outcome = PolicyOutcome::Allow;
            summary = "Allowed without approvals.".into();
        } else {
            decision.outcome = PolicyOutcome::RequireApprovals;
            let expires_at = inputs.now.saturating_add(
                i64::try_from(expiry.unwrap_or(policy.approval_expiry_ms)).unwrap_or(i64::MAX),
            );
            decision.expires_at = Some(expires_at);
            let needs: Vec<String> = decision
                .approvals
                .iter()
                .map(describe_requirement)
                .collect();
            summary = format!(
                "Needs approvals, all of: {}. Approvers are distinct, active members of the group with the approver role; the initiator {} {}. Approvals must be complete by {}.",
                needs.join("; "),
                request.initiator,
                if decision.approvals.iter().all(|a| !a.initiator_may_approve) {
                    "never counts"
                } else {
                    "counts only where a rule says so"
                },
                format_utc(expires_at)
            );
        }
        if decision.delay_ms > 0 {
            summary.push_str(&format!(
                " Signing waits {} after the {}.",
                format_duration(decision.delay_ms),
                if decision.approvals.is_empty() {
                    "decision"
                } else {
                    "final approval"
                }
            ));
        }
    }
    decision.explanation = explanation(policy, request, &decision, fiat_known, &summary);
    decision
}

fn outcome_of(outcome: &RuleOutcome) -> PolicyOutcome {
    match outcome {
        RuleOutcome::Allow => PolicyOutcome::Allow,
        RuleOutcome::Block => PolicyOutcome::Block,
        RuleOutcome::RequireApprovals(_) => PolicyOutcome::RequireApprovals,
    }
}

fn finish_blocked(
    policy: &Policy,
    request: &Request,
    mut decision: PolicyDecision,
    reason: &str,
) -> PolicyDecision {
    decision.outcome = PolicyOutcome::Block;
    let summary = format!("Blocked: {reason}.");
    decision.explanation = explanation(policy, request, &decision, None, &summary);
    decision
}

/// Why the initiator may not start this action at all.
fn initiator_problem(directory: &Directory, request: &Request) -> Option<String> {
    let Some(user) = directory.user(&request.initiator) else {
        return Some(format!(
            "initiator {:?} is not in the directory",
            request.initiator
        ));
    };
    if !user.active {
        return Some(format!("initiator {} is deactivated", user.id));
    }
    let duty = request.action.initiator_duty();
    if !directory.may(&user.id, duty) {
        return Some(format!(
            "initiator {} holds no role with the {} duty, which {} needs",
            user.id,
            duty.as_str(),
            request.action.as_str()
        ));
    }
    None
}

/// What a transfer or fee bump lacks to be judged.
fn incomplete(request: &Request) -> Option<String> {
    if !request.action.moves_funds() {
        return None;
    }
    let missing: Vec<&str> = [
        ("wallet", request.wallet.is_none()),
        ("chain", request.chain.is_none()),
        ("asset", request.asset.is_none()),
        ("amount", request.amount.is_none()),
        ("destination", request.destination.is_none()),
    ]
    .into_iter()
    .filter(|(_, m)| *m)
    .map(|(f, _)| f)
    .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the {} request lacks {}",
            request.action.as_str(),
            missing.join(", ")
        )
    })
}

fn in_set(set: &Option<std::collections::BTreeSet<String>>, value: Option<&str>) -> bool {
    match set {
        None => true,
        Some(s) => value.is_some_and(|v| s.contains(v)),
    }
}

/// Every condition but the fiat-valued ones and the velocity limits.
fn holds_without_fiat(c: &Conditions, request: &Request, inputs: &Inputs<'_>) -> bool {
    if !in_set(&c.wallets, request.wallet.as_deref())
        || !in_set(&c.chains, request.chain.as_deref())
        || !in_set(&c.assets, request.asset.as_deref())
        || !in_set(&c.initiators, Some(&request.initiator))
    {
        return false;
    }
    if c.mfa.is_some_and(|m| m != request.mfa_verified) {
        return false;
    }
    if c.initiator_roles.is_some() || c.initiator_groups.is_some() {
        let Some(user) = inputs.directory.user(&request.initiator) else {
            return false;
        };
        if c.initiator_roles
            .as_ref()
            .is_some_and(|roles| roles.is_disjoint(&user.roles))
            || c.initiator_groups
                .as_ref()
                .is_some_and(|groups| groups.is_disjoint(&user.groups))
        {
            return false;
        }
    }
    if c.time.as_ref().is_some_and(|t| !t.holds(inputs.now)) {
        return false;
    }
    if let Some(dest) = &c.destination
        && !destination_holds(dest, request, inputs.address_book)
    {
        return false;
    }
    true
}

fn destination_holds(dest: &Destination, request: &Request, book: &AddressBook) -> bool {
    let listed =
        |lists: &std::collections::BTreeSet<String>| match (&request.chain, &request.destination) {
            (Some(chain), Some(address)) => lists.iter().any(|l| book.contains(l, chain, address)),
            _ => false,
        };
    match dest {
        Destination::In(lists) => listed(lists),
        Destination::NotIn(lists) => !listed(lists),
    }
}

fn velocity_key(scope: Scope, request: &Request) -> &str {
    match scope {
        Scope::Wallet => request.wallet.as_deref().unwrap_or(""),
        Scope::Initiator => &request.initiator,
    }
}

/// For rules without fiat conditions: a count-only velocity limit.
fn holds_velocity_count(c: &Conditions, request: &Request, inputs: &Inputs<'_>) -> bool {
    match &c.velocity {
        None => true,
        Some(v) => {
            let totals = inputs.velocity.window(
                v.scope,
                velocity_key(v.scope, request),
                inputs.now,
                v.window_ms,
            );
            v.max_count
                .is_some_and(|max| totals.count.saturating_add(1) > u64::from(max))
        }
    }
}

fn holds_with_fiat(c: &Conditions, request: &Request, inputs: &Inputs<'_>, micros: u128) -> bool {
    if let Some(range) = &c.amount {
        if range.above.is_some_and(|a| micros <= u128::from(a)) {
            return false;
        }
        if range.at_most.is_some_and(|m| micros > u128::from(m)) {
            return false;
        }
    }
    if let Some(v) = &c.velocity {
        let totals = inputs.velocity.window(
            v.scope,
            velocity_key(v.scope, request),
            inputs.now,
            v.window_ms,
        );
        let over_count = v
            .max_count
            .is_some_and(|max| totals.count.saturating_add(1) > u64::from(max));
        let over_amount = v
            .max_amount
            .is_some_and(|max| totals.amount_micros.saturating_add(micros) > u128::from(max));
        if !(over_count || over_amount) {
            return false;
        }
    }
    true
}

fn value(policy: &Policy, request: &Request, inputs: &Inputs<'_>) -> Fiat {
    let (Some(asset), Some(amount)) = (&request.asset, request.amount) else {
        return Fiat::Unknown("the request carries no asset amount".into());
    };
    if inputs.velocity.currency() != policy.currency {
        return Fiat::Unknown(format!(
            "the velocity state counts {}, not the policy's {}",
            inputs.velocity.currency().as_str(),
            policy.currency.as_str()
        ));
    }
    match inputs.prices.value_micros(
        asset,
        amount,
        policy.currency,
        inputs.now,
        policy.max_price_age_ms,
    ) {
        Ok(m) => Fiat::Known(m),
        Err(p) => Fiat::Unknown(p.to_string()),
    }
}

/// Why each condition of a matched rule held, in words.
fn reasons(
    policy: &Policy,
    rule: &Rule,
    request: &Request,
    inputs: &Inputs<'_>,
    fiat: Option<u128>,
) -> Vec<String> {
    let c = &rule.conditions;
    let cur = policy.currency.as_str();
    let money = |m: u128| format!("{cur} {}", format_micros(m));
    let mut out = vec![format!("action is {}", request.action.as_str())];
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    if c.wallets.is_some() {
        out.push(format!("wallet {} is listed", opt(&request.wallet)));
    }
    if c.chains.is_some() {
        out.push(format!("chain {} is listed", opt(&request.chain)));
    }
    if c.assets.is_some() {
        out.push(format!("asset {} is listed", opt(&request.asset)));
    }
    if c.initiators.is_some() {
        out.push(format!("initiator {} is listed", request.initiator));
    }
    if c.initiator_roles.is_some() {
        out.push(format!(
            "initiator {} holds a listed role",
            request.initiator
        ));
    }
    if c.initiator_groups.is_some() {
        out.push(format!(
            "initiator {} is in a listed group",
            request.initiator
        ));
    }
    if let Some(m) = c.mfa {
        out.push(if m {
            "the initiator confirmed MFA".into()
        } else {
            "the initiator did not confirm MFA".into()
        });
    }
    if let (Some(range), Some(v)) = (&c.amount, fiat) {
        let mut s = format!("amount {}", money(v));
        if let Some(a) = range.above {
            s.push_str(&format!(" is above {}", money(u128::from(a))));
        }
        if let Some(m) = range.at_most {
            s.push_str(&format!(
                "{} at most {}",
                if range.above.is_some() { " and" } else { " is" },
                money(u128::from(m))
            ));
        }
        out.push(s);
    }
    if let Some(dest) = &c.destination {
        let lists = |l: &std::collections::BTreeSet<String>| {
            l.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        out.push(match dest {
            Destination::In(l) => format!(
                "destination {} is on whitelist {}",
                opt(&request.destination),
                lists(l)
            ),
            Destination::NotIn(l) => format!(
                "destination {} is not on whitelist {}",
                opt(&request.destination),
                lists(l)
            ),
        });
    }
    if let Some(v) = &c.velocity {
        let key = velocity_key(v.scope, request);
        let t = inputs
            .velocity
            .window(v.scope, key, inputs.now, v.window_ms);
        let window = format_duration(v.window_ms);
        if let Some(max) = v.max_count
            && t.count.saturating_add(1) > u64::from(max)
        {
            out.push(format!(
                "{} {key} would make {} transfers in {window}, above the limit of {max}",
                v.scope.as_str(),
                t.count + 1
            ));
        }
        if let (Some(max), Some(f)) = (v.max_amount, fiat)
            && t.amount_micros.saturating_add(f) > u128::from(max)
        {
            out.push(format!(
                "{} {key} would move {} in {window}, above the limit of {}",
                v.scope.as_str(),
                money(t.amount_micros.saturating_add(f)),
                money(u128::from(max))
            ));
        }
    }
    if let Some(t) = &c.time {
        out.push(format!(
            "the time {} is {}",
            format_utc(inputs.now),
            t.describe()
        ));
    }
    match &rule.outcome {
        RuleOutcome::RequireApprovals(spec) => {
            let groups: Vec<String> = spec
                .groups
                .iter()
                .map(|(g, n)| format!("{n} from {g}"))
                .collect();
            out.push(format!(
                "requires {} ({}){}",
                groups.join(match spec.combine {
                    custos_schemas::policy::Combine::All => " and ",
                    custos_schemas::policy::Combine::Any => " or ",
                }),
                if spec.initiator_may_approve {
                    "the initiator may count"
                } else {
                    "the initiator excluded"
                },
                spec.escalation
                    .as_ref()
                    .map(describe_escalation)
                    .unwrap_or_default()
                    + &describe_mfa(spec.mfa)
            ));
        }
        RuleOutcome::Allow => out.push("allows".into()),
        RuleOutcome::Block => out.push("blocks".into()),
    }
    if rule.delay_ms > 0 {
        out.push(format!("signing waits {}", format_duration(rule.delay_ms)));
    }
    out
}

fn describe_requirement(a: &ApprovalRequirement) -> String {
    let groups: Vec<String> = a
        .groups
        .iter()
        .map(|q| {
            format!(
                "{} approval{} from {}",
                q.count,
                if q.count == 1 { "" } else { "s" },
                q.group
            )
        })
        .collect();
    let joined = match a.combine {
        custos_schemas::policy::Combine::All => groups.join(" and "),
        custos_schemas::policy::Combine::Any => groups.join(" or "),
    };
    format!(
        "{joined} (rule {}){}{}",
        a.rule,
        a.escalation
            .as_ref()
            .map(describe_escalation)
            .unwrap_or_default(),
        describe_mfa(a.mfa)
    )
}

fn describe_mfa(mfa: Option<custos_schemas::policy::RequiredMfa>) -> String {
    match mfa {
        Some(custos_schemas::policy::RequiredMfa::Webauthn) => {
            format!(", {}", super::approvals::PASSKEY_REQUIRED)
        }
        None => String::new(),
    }
}

fn describe_escalation(e: &custos_schemas::policy::Escalation) -> String {
    format!(
        ", escalated to {} if not met {} after the decision",
        e.group,
        format_duration(e.after_ms)
    )
}

fn explanation(
    policy: &Policy,
    request: &Request,
    decision: &PolicyDecision,
    fiat: Option<u128>,
    summary: &str,
) -> String {
    let mut head = format!(
        "{} {} by {}",
        match decision.outcome {
            PolicyOutcome::Allow => "ALLOW",
            PolicyOutcome::Block => "BLOCK",
            PolicyOutcome::RequireApprovals => "REQUIRE APPROVALS",
        },
        request.action.as_str(),
        request.initiator
    );
    if let Some(w) = &request.wallet {
        head.push_str(&format!(" on wallet {w}"));
    }
    if let (Some(amount), Some(asset)) = (request.amount, &request.asset) {
        head.push_str(&format!(" of {} {asset}", decimal_string(amount)));
        if let Some(m) = fiat {
            head.push_str(&format!(
                " ({} {})",
                policy.currency.as_str(),
                format_micros(m)
            ));
        }
    }
    if let Some(d) = &request.destination {
        head.push_str(&format!(" to {d}"));
    }
    let version = policy.version();
    head.push_str(&format!(
        ", under policy {} version {}, at {}.",
        policy.name,
        version.get(..12).unwrap_or(version),
        format_utc(decision.evaluated_at)
    ));
    let mut lines = vec![head];
    for m in &decision.matched_rules {
        let line = policy.rule(&m.rule).map_or(0, |r| r.line);
        lines.push(format!(
            "- rule {} (line {line}) matched: {}.",
            m.rule,
            m.reasons.join("; ")
        ));
    }
    lines.push(summary.to_string());
    lines.join("\n")
}

fn decimal_string(d: custos_schemas::Decimal) -> String {
    let digits = d.units.to_string();
    let scale = usize::from(d.scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

/// `2026-11-24T06:04:16Z` for milliseconds since the epoch.
pub(crate) fn format_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_rendering() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn decimals_render() {
        let d = |units, scale| custos_schemas::Decimal { units, scale };
        assert_eq!(decimal_string(d(15, 3)), "0.015");
        assert_eq!(decimal_string(d(1500, 2)), "15.00");
        assert_eq!(decimal_string(d(7, 0)), "7");
    }
}
