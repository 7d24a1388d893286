//! Policy files: the default policy, the version hash, and bad files that give
//! errors naming the line and field (and leave the active policy untouched).

mod policy_support;

use custos_engine::policy::{
    ActionKind, DEFAULT_POLICY_TOML, Directory, Policy, PolicyError, RuleOutcome, default_policy,
    render_errors,
};
use policy_support::*;

#[test]
fn default_policy_parses_and_says_what_the_issue_says() {
    let p = default_policy().expect("default policy");
    assert_eq!(p.name, "default");
    assert_eq!(p.currency.as_str(), "EUR");
    assert_eq!(p.rules.len(), 6);
    for action in ActionKind::ALL {
        assert!(
            p.rules.iter().any(|r| r.actions.contains(&action)),
            "{action:?} has no rule"
        );
    }
    for rule in &p.rules {
        if let RuleOutcome::RequireApprovals(spec) = &rule.outcome {
            assert!(!spec.initiator_may_approve, "{}", rule.name);
        }
    }
    assert_eq!(p.version().len(), 64);
    assert_eq!(default_policy().expect("again").version(), p.version());
}

#[test]
fn version_ignores_formatting_but_not_meaning() {
    let p = default_policy().expect("default");
    // Comments, blank lines, key order, "1000" vs "1000.00" vs 1000, list order.
    let reformatted = DEFAULT_POLICY_TOML
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "amount = { at_most = \"1000\" }",
            "amount = { at_most = 1000 }",
        )
        .replace(
            "amount = { above = \"1000\", at_most = \"10000\" }",
            "amount = { at_most = \"10000.00\", above = \"1000.0\" }",
        )
        .replace(
            "    \"wallet-create\",\n    \"wallet-import\",",
            "    \"wallet-import\",\n    \"wallet-create\",",
        );
    let q = Policy::parse(&reformatted).expect("reformatted");
    assert_eq!(q.version(), p.version());
    let changed = DEFAULT_POLICY_TOML.replace("count = 4", "count = 5");
    let r = Policy::parse(&changed).expect("changed");
    assert_ne!(r.version(), p.version());
    let renamed = DEFAULT_POLICY_TOML.replace("name = \"default\"", "name = \"other\"");
    assert_ne!(
        Policy::parse(&renamed).expect("renamed").version(),
        p.version()
    );
}

fn one_error(text: &str) -> PolicyError {
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{}", render_errors(&errors));
    errors.into_iter().next().expect("one")
}

fn rule(body: &str) -> String {
    // HEADER has 11 lines; the blank line makes `[[rule]]` line 13, `name` 14.
    format!("{HEADER}\n[[rule]]\n{body}")
}

#[test]
fn bad_files_name_line_and_field() {
    // (text, text on the expected line, expected field, words the message contains)
    let cases: Vec<(String, Option<&str>, Option<&str>, &str)> = vec![
        (
            "version = 1\nname = \"x\"\ncurrency = \"EUR\"\nmax_price_age = \"5m\"\napproval_expiry = \"24h\"\ncolour = \"red\"\n".into(),
            Some("colour"),
            Some("colour"),
            "unknown field `colour`",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\nwalets = [\"w\"]\n"),
            Some("walets"),
            Some("rule[0].walets"),
            "unknown field `walets`",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\namount = { above = \"1\", below = \"2\" }\n"),
            Some("amount ="),
            Some("rule[0].amount.below"),
            "unknown field `below`",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"\noutcome = \"allow\"\n"),
            Some("outcome"),
            None,
            "expected",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\namount = { above = 1000.5 }\n"),
            Some("amount ="),
            Some("rule[0].amount.above"),
            "never floats",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"alow\"\n"),
            Some("outcome"),
            Some("rule[0].outcome"),
            "not an outcome",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfers\"]\noutcome = \"allow\"\n"),
            Some("actions"),
            Some("rule[0].actions"),
            "unknown action \"transfers\"",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"aprovers\", count = 2 }] }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.groups[0].group"),
            "not declared in [groups]",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 0 }] }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.groups[0].count"),
            "must be 1 to",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\n"),
            Some("outcome"),
            Some("rule[0].approvals"),
            "needs approvals",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"block\"\napprovals = { groups = [{ group = \"approvers\", count = 1 }] }\n"),
            Some("approvals ="),
            Some("rule[0].approvals"),
            "takes no approvals",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\namount = { above = \"10000\", at_most = \"1000\" }\n"),
            Some("amount ="),
            Some("rule[0].amount"),
            "no amount can match",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\", \"policy-change\"]\noutcome = \"allow\"\namount = { above = \"1\" }\n"),
            Some("amount ="),
            Some("rule[0].amount"),
            "only applies to transfers",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\nchains = [\"dogecoin\"]\noutcome = \"allow\"\n"),
            Some("chains"),
            Some("rule[0].chains"),
            "unknown chain",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\nwallets = []\noutcome = \"allow\"\n"),
            Some("wallets"),
            Some("rule[0].wallets"),
            "never matches",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\ntime = { from = \"25:00\", to = \"08:00\" }\noutcome = \"block\"\n"),
            Some("time ="),
            Some("rule[0].time.from"),
            "not a UTC time",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\nvelocity = { scope = \"wallet\", window = \"1w\", max_count = 3 }\noutcome = \"block\"\n"),
            Some("velocity ="),
            Some("rule[0].velocity.window"),
            "not a duration",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\nvelocity = { scope = \"desk\", window = \"1h\", max_count = 3 }\noutcome = \"block\"\n"),
            Some("velocity ="),
            Some("rule[0].velocity.scope"),
            "not a scope",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\ndestination = { in = [\"x\"], not_in = [\"y\"] }\noutcome = \"allow\"\n"),
            Some("destination ="),
            Some("rule[0].destination"),
            "exactly one",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\ninitiator_groups = [\"nobody\"]\noutcome = \"allow\"\n"),
            Some("initiator_groups"),
            Some("rule[0].initiator_groups"),
            "not declared",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\n").replace("currency = \"EUR\"", "currency = \"GBP\""),
            Some("currency"),
            Some("currency"),
            "not supported",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\n").replace("version = 1", "version = 2"),
            Some("version"),
            Some("version"),
            "not supported",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"treasury-managers\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_after"),
            "escalate_to needs escalate_after",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_after = \"4h\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_to"),
            "escalate_after needs escalate_to",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"managers\", escalate_after = \"4h\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_to"),
            "group \"managers\", which is not declared in [groups]",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"approvers\", escalate_after = \"4h\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_to"),
            "already approves for this requirement",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"treasury-managers\", escalate_after = \"4 hours\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_after"),
            "4 hours",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\nexpires_after = \"2h\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"treasury-managers\", escalate_after = \"2h\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_after"),
            "not before the approvals expire (2h)",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"treasury-managers\", escalate_after = \"25h\" }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.escalate_after"),
            "not before the approvals expire (1d)",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }],\n  mfa = \"passkey\" }\n"),
            Some("mfa ="),
            Some("rule[0].approvals.mfa"),
            "\"passkey\" is not a second factor a rule can demand: use \"webauthn\"",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }],\n  mfa = \"totp\" }\n"),
            Some("mfa ="),
            Some("rule[0].approvals.mfa"),
            "only \"webauthn\" (passkeys) can be demanded",
        ),
        (
            rule("name = \"a\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], mfa = true }\n"),
            Some("approvals ="),
            Some("rule[0].approvals.mfa"),
            "expected a string",
        ),
        (HEADER.to_string(), None, Some("rule"), "deny everything"),
    ];
    for (text, marker, field, words) in cases {
        let line = marker.map(|m| {
            let at = text.find(m).expect("marker in text");
            text[..at].matches('\n').count() + 1
        });
        let e = one_error(&text);
        assert_eq!(e.line, line, "{e}\n---\n{text}");
        assert_eq!(e.field.as_deref(), field, "{e}\n---\n{text}");
        assert!(e.message.contains(words), "{e:?} lacks {words:?}");
        if let Some(l) = line {
            assert!(e.to_string().starts_with(&format!("line {l}")), "{e}");
        }
    }
}

#[test]
fn contradictory_and_duplicate_rules_are_refused() {
    let text = format!(
        "{HEADER}\n[[rule]]\nname = \"a\"\nactions = [\"transfer\"]\noutcome = \"allow\"\n\n[[rule]]\nname = \"b\"\nactions = [\"transfer\"]\noutcome = \"block\"\n"
    );
    let e = one_error(&text);
    assert_eq!(e.line, Some(18));
    assert!(e.message.contains("contradict"), "{e}");
    assert!(e.message.contains("line 13"), "{e}");

    let text = format!(
        "{HEADER}\n[[rule]]\nname = \"a\"\nactions = [\"transfer\"]\nwallets = [\"x\"]\noutcome = \"allow\"\n\n[[rule]]\nname = \"a\"\nactions = [\"transfer\"]\nwallets = [\"y\"]\noutcome = \"allow\"\n"
    );
    let e = one_error(&text);
    assert_eq!(e.field.as_deref(), Some("rule[1].name"));
    assert!(e.message.contains("duplicate rule name"), "{e}");

    // Every problem is reported, in line order.
    let text = format!(
        "{HEADER}\n[[rule]]\nname = \"a\"\nactions = [\"nope\"]\noutcome = \"allow\"\n\n[[rule]]\nname = \"b\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = {{ combine = \"either\", groups = [{{ group = \"approvers\", count = 1 }}] }}\n"
    );
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 2, "{}", render_errors(&errors));
    assert!(errors[0].line < errors[1].line);
}

#[test]
fn a_bad_file_leaves_the_active_policy_untouched() {
    let active = default_policy().expect("default");
    let before = active.clone();
    let candidate = Policy::parse("this is not toml");
    let active = match candidate {
        Ok(p) => p,
        Err(_) => active,
    };
    assert_eq!(active, before);
}

#[test]
fn checking_against_the_directory_finds_missing_groups_and_unreachable_quorums() {
    let p = default_policy().expect("default");
    let empty = Directory::new();
    let errors = p.check_directory(&empty);
    assert_eq!(errors.len(), 3, "{}", render_errors(&errors));
    assert!(errors.iter().all(|e| e.message.contains("does not exist")));

    let d = directory();
    // treasury-managers: alice + t1..t5 = 6 >= 4; approvers: alice + a1..a3; administrators: 3.
    assert!(
        p.check_directory(&d).is_empty(),
        "{}",
        render_errors(&p.check_directory(&d))
    );
    let strict =
        Policy::parse(&DEFAULT_POLICY_TOML.replace("count = 4", "count = 7")).expect("parse");
    let errors = strict.check_directory(&d);
    assert_eq!(errors.len(), 1, "{}", render_errors(&errors));
    assert_eq!(
        errors[0].field.as_deref(),
        Some("rule[2].approvals.groups[0].count")
    );
    assert!(errors[0].message.contains("only 6"), "{}", errors[0]);
    assert!(errors[0].line.is_some());
}

#[test]
fn an_escalation_is_part_of_the_decision_and_of_the_version() {
    let with = |escalation: &str| {
        policy_with(&format!(
            "[[rule]]\nname = \"large\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"approvers\", count = 2 }}]{escalation} }}\n"
        ))
    };
    let plain = with("");
    let escalating = with(", escalate_to = \"treasury-managers\", escalate_after = \"4h\"");
    let later = with(", escalate_to = \"treasury-managers\", escalate_after = \"5h\"");
    assert_ne!(plain.version(), escalating.version());
    assert_ne!(escalating.version(), later.version());
    let d = World::new().decide(&escalating, &transfer("bob", "hot", "1"));
    assert_eq!(
        d.approvals
            .iter()
            .map(|r| r.escalation.clone())
            .collect::<Vec<_>>(),
        vec![Some(custos_schemas::policy::Escalation {
            group: "treasury-managers".into(),
            after_ms: 4 * HOUR as u64,
        })]
    );
    assert!(
        d.explanation
            .contains("escalated to treasury-managers if not met 4h after the decision"),
        "{}",
        d.explanation
    );
    // A requirement without escalation records none: decisions and policy
    // versions from before escalations existed are unchanged.
    let d = World::new().decide(&plain, &transfer("bob", "hot", "1"));
    assert_eq!(d.approvals[0].escalation, None);
    let json = String::from_utf8(custos_schemas::ContentType::Json.encode(&d)).expect("utf-8");
    assert!(!json.contains("escalation"), "{json}");
}

#[test]
fn a_passkey_requirement_is_part_of_the_decision_and_of_the_version() {
    let with = |mfa: &str| {
        policy_with(&format!(
            "[[rule]]\nname = \"large\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"approvers\", count = 2 }}]{mfa} }}\n"
        ))
    };
    let plain = with("");
    let passkeys = with(", mfa = \"webauthn\"");
    assert_ne!(plain.version(), passkeys.version());
    let d = World::new().decide(&passkeys, &transfer("bob", "hot", "1"));
    assert_eq!(
        d.approvals.iter().map(|r| r.mfa).collect::<Vec<_>>(),
        vec![Some(custos_schemas::policy::RequiredMfa::Webauthn)]
    );
    assert!(
        d.explanation.contains("(rule large), passkey required"),
        "{}",
        d.explanation
    );
    let json = String::from_utf8(custos_schemas::ContentType::Json.encode(&d)).expect("utf-8");
    assert!(json.contains("\"mfa\":\"webauthn\""), "{json}");
    // Without the key nothing is recorded: earlier versions are unchanged.
    let d = World::new().decide(&plain, &transfer("bob", "hot", "1"));
    assert_eq!(d.approvals[0].mfa, None);
    let json = String::from_utf8(custos_schemas::ContentType::Json.encode(&d)).expect("utf-8");
    assert!(!json.contains("\"mfa\""), "{json}");
}

#[test]
fn an_escalation_group_without_an_active_approver_is_found_before_applying() {
    let p = policy_with(
        "[[rule]]\nname = \"large\"\nactions = [\"transfer\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }], escalate_to = \"administrators\", escalate_after = \"1h\" }\n",
    );
    let mut d = directory();
    assert!(p.check_directory(&d).is_empty());
    for a in ["admin1", "admin2", "admin3"] {
        d.deactivate(a).expect("deactivate");
    }
    let errors = p.check_directory(&d);
    assert_eq!(errors.len(), 1, "{}", render_errors(&errors));
    assert_eq!(
        errors[0].field.as_deref(),
        Some("rule[0].approvals.escalate_to")
    );
    assert!(
        errors[0]
            .message
            .contains("escalates to administrators, which has no active member"),
        "{}",
        errors[0]
    );
}
