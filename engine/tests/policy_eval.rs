//! Decisions: every condition and outcome (table-driven), fail-closed prices,
//! freezes, RBAC, the union of approvals, and approval counting.

mod policy_support;

use custos_engine::policy::{
    ActionKind, Approval, ApprovalStatus, Currency, Directory, Duty, NewUser, Request,
    approvals_satisfied, default_policy,
};
use custos_schemas::policy::{Combine, PolicyDecision, PolicyOutcome};
use policy_support::*;

const R_APPROVERS_2: &str = "assets = [\"ETH\"]\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 2 }] }\n";

/// One rule (besides a catch-all allow for transfers) and how a request fares.
struct Case {
    name: &'static str,
    rule: &'static str,
    setup: fn(&mut World, &mut Request),
    expect: PolicyOutcome,
}

fn nothing(_: &mut World, _: &mut Request) {}

#[test]
fn every_condition_decides_as_written() {
    let cases = [
        Case {
            name: "wallet matches",
            rule: "wallets = [\"hot\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "wallet differs",
            rule: "wallets = [\"cold\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "chain matches",
            rule: "chains = [\"evm-1\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "chain differs",
            rule: "chains = [\"ltc-mainnet\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "asset matches",
            rule: "assets = [\"ETH\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "asset differs",
            rule: "assets = [\"LTC\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "amount above (EUR 2,000 > 1,000)",
            rule: "amount = { above = \"1000\" }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "amount not above",
            rule: "amount = { above = \"2000\" }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "amount at most (inclusive)",
            rule: "amount = { at_most = \"2000\" }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "amount in range",
            rule: "amount = { above = \"1999.99\", at_most = \"2000.01\" }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "whitelisted destination, in",
            rule: "destination = { in = [\"book\"] }\noutcome = \"block\"\n",
            setup: |w, _| {
                w.address_book
                    .add("book", "evm-1", &DEST.to_uppercase().replace("0X", "0x"))
            },
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "not whitelisted, in",
            rule: "destination = { in = [\"book\"] }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "not whitelisted, not_in",
            rule: "destination = { not_in = [\"book\"] }\noutcome = \"block\"\n",
            setup: |w, _| w.address_book.add("book", "evm-1", OTHER_DEST),
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "whitelisted on another chain only",
            rule: "destination = { not_in = [\"book\"] }\noutcome = \"block\"\n",
            setup: |w, _| w.address_book.add("book", "evm-11155111", DEST),
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "whitelisted, not_in",
            rule: "destination = { not_in = [\"book\"] }\noutcome = \"block\"\n",
            setup: |w, _| w.address_book.add("book", "evm-1", DEST),
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "wallet velocity amount exceeded",
            rule: "velocity = { scope = \"wallet\", window = \"24h\", max_amount = \"5000\" }\noutcome = \"block\"\n",
            setup: |w, _| w.velocity.record(NOW - HOUR, "hot", "bob", 3_500_000_000),
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "wallet velocity amount within",
            rule: "velocity = { scope = \"wallet\", window = \"24h\", max_amount = \"5000\" }\noutcome = \"block\"\n",
            setup: |w, _| w.velocity.record(NOW - HOUR, "hot", "bob", 2_500_000_000),
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "wallet velocity outside window",
            rule: "velocity = { scope = \"wallet\", window = \"1h\", max_amount = \"5000\" }\noutcome = \"block\"\n",
            setup: |w, _| {
                w.velocity
                    .record(NOW - 2 * HOUR, "hot", "bob", 3_500_000_000)
            },
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "other wallet's transfers do not count",
            rule: "velocity = { scope = \"wallet\", window = \"24h\", max_amount = \"5000\" }\noutcome = \"block\"\n",
            setup: |w, _| {
                w.velocity
                    .record(NOW - HOUR, "cold", "alice", 3_500_000_000)
            },
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "initiator velocity count exceeded",
            rule: "velocity = { scope = \"initiator\", window = \"1h\", max_count = 2 }\noutcome = \"block\"\n",
            setup: |w, _| {
                w.velocity.record(NOW - MINUTE, "a", "alice", 1);
                w.velocity.record(NOW - 2 * MINUTE, "b", "alice", 1);
            },
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "initiator velocity count within",
            rule: "velocity = { scope = \"initiator\", window = \"1h\", max_count = 2 }\noutcome = \"block\"\n",
            setup: |w, _| w.velocity.record(NOW - MINUTE, "a", "alice", 1),
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "inside hours",
            rule: "time = { from = \"08:00\", to = \"18:00\" }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "outside hours (night)",
            rule: "time = { from = \"08:00\", to = \"18:00\", outside = true }\noutcome = \"block\"\n",
            setup: |w, _| w.now = NOW + 10 * HOUR,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "over midnight window",
            rule: "time = { from = \"22:00\", to = \"06:00\" }\noutcome = \"block\"\n",
            setup: |w, _| w.now = NOW + 11 * HOUR,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "weekday only, on Monday",
            rule: "time = { from = \"00:00\", to = \"23:59\", days = [\"mon\"] }\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "weekday only, on Tuesday",
            rule: "time = { from = \"00:00\", to = \"23:59\", days = [\"mon\"] }\noutcome = \"block\"\n",
            setup: |w, _| w.now = NOW + 24 * HOUR,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "initiator listed",
            rule: "initiators = [\"alice\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "initiator not listed",
            rule: "initiators = [\"bob\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "initiator role",
            rule: "initiator_roles = [\"approver\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "initiator role absent",
            rule: "initiator_roles = [\"approver\"]\noutcome = \"block\"\n",
            setup: |_, r| r.initiator = "bob".into(),
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "initiator group",
            rule: "initiator_groups = [\"ops\"]\noutcome = \"block\"\n",
            setup: |_, r| r.initiator = "ops1".into(),
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "initiator group absent",
            rule: "initiator_groups = [\"ops\"]\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "no MFA at initiation",
            rule: "mfa = false\noutcome = \"block\"\n",
            setup: |_, r| r.mfa_verified = false,
            expect: PolicyOutcome::Block,
        },
        Case {
            name: "MFA at initiation",
            rule: "mfa = false\noutcome = \"block\"\n",
            setup: nothing,
            expect: PolicyOutcome::Allow,
        },
        Case {
            name: "require approvals",
            rule: R_APPROVERS_2,
            setup: nothing,
            expect: PolicyOutcome::RequireApprovals,
        },
    ];
    for case in cases {
        let policy = policy_with(&format!(
            "[[rule]]\nname = \"any-transfer\"\nactions = [\"transfer\"]\noutcome = \"allow\"\n\n[[rule]]\nname = \"under-test\"\nactions = [\"transfer\"]\n{}",
            case.rule
        ));
        let mut world = World::new();
        let mut request = transfer("alice", "hot", "1");
        (case.setup)(&mut world, &mut request);
        let d = world.decide(&policy, &request);
        assert_eq!(d.outcome, case.expect, "{}:\n{}", case.name, d.explanation);
        let under_test_matched = d.matched_rules.iter().any(|m| m.rule == "under-test");
        assert_eq!(
            under_test_matched,
            case.expect != PolicyOutcome::Allow,
            "{}",
            case.name
        );
        assert!(d.explanation.contains("any-transfer"), "{}", d.explanation);
        // Deterministic: the same inputs give the same decision.
        assert_eq!(world.decide(&policy, &request), d);
    }
}

fn default_decision(world: &World, amount: &str) -> PolicyDecision {
    world.decide(
        &default_policy().expect("default"),
        &transfer("alice", "hot", amount),
    )
}

#[test]
fn default_policy_tiers() {
    let w = World::new();
    // ETH = EUR 2,000.
    let table = [
        ("0.0001", PolicyOutcome::Allow, None),
        ("0.5", PolicyOutcome::Allow, None),
        (
            "0.5000001",
            PolicyOutcome::RequireApprovals,
            Some(("approvers", 2)),
        ),
        ("5", PolicyOutcome::RequireApprovals, Some(("approvers", 2))),
        (
            "5.0000001",
            PolicyOutcome::RequireApprovals,
            Some(("treasury-managers", 4)),
        ),
        (
            "1000",
            PolicyOutcome::RequireApprovals,
            Some(("treasury-managers", 4)),
        ),
    ];
    for (amount, outcome, quorum) in table {
        let d = default_decision(&w, amount);
        assert_eq!(d.outcome, outcome, "{amount}: {}", d.explanation);
        let got = d
            .approvals
            .first()
            .map(|a| (a.groups[0].group.as_str(), a.groups[0].count));
        assert_eq!(got, quorum, "{amount}");
        assert_eq!(d.policy_version, default_policy().expect("p").version());
        if outcome == PolicyOutcome::RequireApprovals {
            assert_eq!(d.expires_at, Some(NOW + 24 * HOUR));
            assert!(d.explanation.contains("never counts"), "{}", d.explanation);
        }
    }
    // A fee bump's amount is the fee it adds (ETH = EUR 2,000).
    for (fee_added, outcome) in [
        ("0.025", PolicyOutcome::Allow),
        ("0.0250001", PolicyOutcome::RequireApprovals),
    ] {
        let mut bump = transfer("alice", "hot", fee_added);
        bump.action = ActionKind::FeeBump;
        let d = w.decide(&default_policy().expect("p"), &bump);
        assert_eq!(d.outcome, outcome, "{fee_added}: {}", d.explanation);
        if outcome == PolicyOutcome::RequireApprovals {
            assert_eq!(d.approvals[0].groups[0].group, "approvers");
            assert_eq!(d.approvals[0].groups[0].count, 2);
        }
    }
    for action in ActionKind::ALL
        .into_iter()
        .filter(|a| !matches!(a, ActionKind::Transfer | ActionKind::FeeBump))
    {
        let initiator = if action.initiator_duty() == Duty::Initiate {
            "alice"
        } else {
            "admin1"
        };
        let d = w.decide(
            &default_policy().expect("p"),
            &Request::action(action, initiator, true),
        );
        assert_eq!(
            d.outcome,
            PolicyOutcome::RequireApprovals,
            "{action:?}: {}",
            d.explanation
        );
        assert_eq!(d.approvals[0].groups[0].group, "administrators");
        assert_eq!(d.approvals[0].groups[0].count, 2);
    }
}

fn approve(users: &[&str], at: i64) -> Vec<Approval> {
    users
        .iter()
        .map(|u| Approval {
            user: (*u).into(),
            at,
            passkey: false,
        })
        .collect()
}

#[test]
fn frost_2_of_3_wallet_above_eur_10000_needs_4_distinct_treasury_approvals() {
    // The wallet's key is FROST 2-of-3; the policy is about people, not shares.
    let policy = policy_with(
        "[[rule]]\nname = \"large-from-frost\"\ndescription = \"Above EUR 10,000: 4 approvals from treasury managers.\"\nactions = [\"transfer\"]\nwallets = [\"frost-2of3\"]\namount = { above = \"10000\" }\noutcome = \"require-approvals\"\napprovals = { groups = [{ group = \"treasury-managers\", count = 4 }] }\n",
    );
    let w = World::new();
    let d = w.decide(&policy, &transfer("alice", "frost-2of3", "6"));
    assert_eq!(
        d.outcome,
        PolicyOutcome::RequireApprovals,
        "{}",
        d.explanation
    );
    assert_eq!(d.approvals.len(), 1);
    assert_eq!(d.approvals[0].groups[0].count, 4);
    let at = NOW + MINUTE;
    let dir = &w.directory;
    // Two or three approvals (the key threshold) are not enough.
    for n in [2, 3] {
        let given = approve(&["t1", "t2", "t3", "t4"][..n], at);
        assert!(
            matches!(
                approvals_satisfied(&d, &given, dir, at),
                ApprovalStatus::Pending { .. }
            ),
            "{n}"
        );
    }
    // The same approver four times is one approval.
    let same = approve(&["t1", "t1", "t1", "t1"], at);
    assert!(matches!(
        approvals_satisfied(&d, &same, dir, at),
        ApprovalStatus::Pending { .. }
    ));
    // The initiator (a treasury manager herself) does not count.
    let with_initiator = approve(&["alice", "t1", "t2", "t3"], at);
    let status = approvals_satisfied(&d, &with_initiator, dir, at);
    assert_eq!(
        status,
        ApprovalStatus::Pending {
            missing: vec!["treasury-managers: 3 of 4 (rule large-from-frost)".into()]
        }
    );
    // Four distinct treasury managers do.
    let four = approve(&["t1", "t2", "t3", "t4"], at);
    assert_eq!(
        approvals_satisfied(&d, &four, dir, at),
        ApprovalStatus::Satisfied {
            completed_at: at,
            sign_after: at
        }
    );
}

#[test]
fn approvals_count_only_active_eligible_approvers_within_expiry() {
    let w = World::new();
    let d = default_decision(&w, "2"); // 2 approvers
    let at = NOW + MINUTE;
    let mut dir = w.directory.clone();
    let ok = approve(&["a1", "a2"], at);
    assert!(matches!(
        approvals_satisfied(&d, &ok, &dir, at),
        ApprovalStatus::Satisfied { .. }
    ));
    // Not members of the group; approvals before the decision or after now.
    for (users, when) in [
        (vec!["t1", "t2"], at),
        (vec!["a1", "a2"], NOW - 1),
        (vec!["a1", "a2"], at + 1),
    ] {
        let given = approve(&users, when);
        assert!(
            matches!(
                approvals_satisfied(&d, &given, &dir, at),
                ApprovalStatus::Pending { .. }
            ),
            "{users:?} at {when}"
        );
    }
    // A member without the approver role.
    add_user(&mut dir, "nora", &["initiator"], &["approvers"]);
    let given = approve(&["a1", "nora"], at);
    assert!(matches!(
        approvals_satisfied(&d, &given, &dir, at),
        ApprovalStatus::Pending { .. }
    ));
    // Deactivated after approving: the in-flight approval stops counting.
    dir.deactivate("a2").expect("deactivate");
    assert!(matches!(
        approvals_satisfied(&d, &ok, &dir, at),
        ApprovalStatus::Pending { .. }
    ));
    // Expiry.
    let late = NOW + 25 * HOUR;
    let given = approve(&["a1", "a3"], late);
    assert_eq!(
        approvals_satisfied(&d, &given, &w.directory, late),
        ApprovalStatus::Expired {
            expires_at: NOW + 24 * HOUR
        }
    );
    // Completed before the expiry stays satisfied afterwards.
    let given = approve(&["a1", "a3"], at);
    assert!(matches!(
        approvals_satisfied(&d, &given, &w.directory, late),
        ApprovalStatus::Satisfied { .. }
    ));
    // Blocked and allowed decisions.
    let blocked = w.decide(
        &default_policy().expect("p"),
        &transfer("nobody", "hot", "1"),
    );
    assert_eq!(
        approvals_satisfied(&blocked, &ok, &dir, at),
        ApprovalStatus::Blocked
    );
    let allowed = default_decision(&w, "0.1");
    assert_eq!(
        approvals_satisfied(&allowed, &[], &dir, at),
        ApprovalStatus::Satisfied {
            completed_at: NOW,
            sign_after: NOW
        }
    );
}

#[test]
fn and_or_initiator_and_union_of_rules() {
    let policy = policy_with(concat!(
        "[[rule]]\nname = \"and\"\nactions = [\"transfer\"]\nwallets = [\"and\"]\noutcome = \"require-approvals\"\n",
        "approvals = { combine = \"all\", groups = [{ group = \"approvers\", count = 1 }, { group = \"treasury-managers\", count = 1 }] }\n\n",
        "[[rule]]\nname = \"or\"\nactions = [\"transfer\"]\nwallets = [\"or\"]\noutcome = \"require-approvals\"\n",
        "approvals = { combine = \"any\", groups = [{ group = \"approvers\", count = 2 }, { group = \"treasury-managers\", count = 1 }] }\n\n",
        "[[rule]]\nname = \"self\"\nactions = [\"transfer\"]\nwallets = [\"self\"]\noutcome = \"require-approvals\"\n",
        "approvals = { groups = [{ group = \"approvers\", count = 1 }], initiator_may_approve = true }\n\n",
        "[[rule]]\nname = \"union-a\"\nactions = [\"transfer\"]\nwallets = [\"union\"]\noutcome = \"require-approvals\"\nexpires_after = \"2h\"\n",
        "approvals = { groups = [{ group = \"approvers\", count = 2 }] }\n\n",
        "[[rule]]\nname = \"union-b\"\nactions = [\"transfer\"]\nassets = [\"ETH\"]\nwallets = [\"union\"]\noutcome = \"require-approvals\"\ndelay = \"1h\"\n",
        "approvals = { groups = [{ group = \"treasury-managers\", count = 1 }] }\n\n",
        "[[rule]]\nname = \"union-c\"\nactions = [\"transfer\"]\nchains = [\"evm-1\"]\nwallets = [\"union\"]\noutcome = \"require-approvals\"\n",
        "approvals = { groups = [{ group = \"approvers\", count = 2 }] }\n",
    ));
    let w = World::new();
    let at = NOW + MINUTE;
    let status = |wallet: &str, users: &[&str]| {
        let d = w.decide(&policy, &transfer("alice", wallet, "1"));
        approvals_satisfied(&d, &approve(users, at), &w.directory, at)
    };
    let ok = |s: ApprovalStatus| matches!(s, ApprovalStatus::Satisfied { .. });
    // AND: one from each group; one person cannot fill both slots.
    assert!(ok(status("and", &["a1", "t1"])));
    assert!(!ok(status("and", &["a1", "a2"])));
    let mut both = w.directory.clone();
    add_user(
        &mut both,
        "dual",
        &["approver"],
        &["approvers", "treasury-managers"],
    );
    let d = w.decide(&policy, &transfer("bob", "and", "1"));
    assert!(!ok(approvals_satisfied(
        &d,
        &approve(&["dual"], at),
        &both,
        at
    )));
    assert!(ok(approvals_satisfied(
        &d,
        &approve(&["dual", "t1"], at),
        &both,
        at
    )));
    // OR: either group's quorum.
    assert!(ok(status("or", &["t1"])));
    assert!(ok(status("or", &["a1", "a2"])));
    assert!(!ok(status("or", &["a1"])));
    // The rule lets the initiator count.
    assert!(ok(status("self", &["alice"])));
    // Union: every triggered rule's demand, identical demands merged; earliest
    // expiry, longest delay.
    let d = w.decide(&policy, &transfer("bob", "union", "1"));
    assert_eq!(d.approvals.len(), 2, "{:?}", d.approvals);
    assert_eq!(d.approvals[0].rule, "union-a, union-c");
    assert_eq!(d.approvals[0].combine, Combine::All);
    assert_eq!(d.expires_at, Some(NOW + 2 * HOUR));
    assert_eq!(d.delay_ms, 3_600_000);
    assert!(!ok(approvals_satisfied(
        &d,
        &approve(&["a1", "a2"], at),
        &w.directory,
        at
    )));
    let s = approvals_satisfied(
        &d,
        &[
            Approval {
                user: "a1".into(),
                at,
                passkey: false,
            },
            Approval {
                user: "t1".into(),
                at: at + 5,
                passkey: false,
            },
            Approval {
                user: "a2".into(),
                at: at + 9,
                passkey: false,
            },
        ],
        &w.directory,
        at + 10,
    );
    assert_eq!(
        s,
        ApprovalStatus::Satisfied {
            completed_at: at + 9,
            sign_after: at + 9 + HOUR
        }
    );
}

#[test]
fn fail_closed_prices_unmatched_requests_and_rbac() {
    let p = default_policy().expect("default");
    let mut w = World::new();
    let blocked = |w: &World, r: &Request, words: &str| {
        let d = w.decide(&p, r);
        assert_eq!(d.outcome, PolicyOutcome::Block, "{}", d.explanation);
        assert!(
            d.explanation.contains(words),
            "{words:?} not in:\n{}",
            d.explanation
        );
    };
    let t = transfer("alice", "hot", "0.1");
    // Stale, missing, future-dated prices.
    w.now = NOW + 10 * MINUTE;
    blocked(&w, &t, "older than the 5m the policy accepts");
    w.now = NOW - 2 * MINUTE;
    blocked(&w, &t, "after the evaluation time");
    w.now = NOW;
    w.prices = Default::default();
    blocked(&w, &t, "no ETH/EUR price is available");
    w.prices = prices();
    // A velocity state in another currency cannot be compared.
    w.velocity = custos_engine::policy::VelocityState::new(Currency::Usd);
    blocked(&w, &t, "counts USD");
    w.velocity = custos_engine::policy::VelocityState::new(Currency::Eur);
    // RBAC: unknown, deactivated, lacking the duty.
    blocked(
        &w,
        &transfer("mallory", "hot", "0.1"),
        "not in the directory",
    );
    blocked(
        &w,
        &Request::action(ActionKind::PolicyChange, "alice", true),
        "administer",
    );
    w.directory.deactivate("alice").expect("deactivate");
    blocked(&w, &t, "deactivated");
    w.directory = directory();
    // Incomplete transfer.
    let mut partial = t.clone();
    partial.destination = None;
    blocked(&w, &partial, "lacks destination");
    // Nothing matches: denied.
    let only_cold = policy_with(
        "[[rule]]\nname = \"cold\"\nactions = [\"transfer\"]\nwallets = [\"cold\"]\noutcome = \"allow\"\n",
    );
    let d = w.decide(&only_cold, &t);
    assert_eq!(d.outcome, PolicyOutcome::Block);
    assert!(
        d.explanation.contains("no rule of the policy matches"),
        "{}",
        d.explanation
    );
    // Price is only needed when a rule needs it: not for administration.
    w.prices = Default::default();
    let d = w.decide(&p, &Request::action(ActionKind::UserAdmin, "admin1", true));
    assert_eq!(d.outcome, PolicyOutcome::RequireApprovals);
}

#[test]
fn freezes_block_transfers_and_signing_but_not_administration() {
    let p = default_policy().expect("default");
    let mut w = World::new();
    w.freeze.freeze_wallet("hot", "incident 42");
    let d = w.decide(&p, &transfer("alice", "hot", "0.1"));
    assert_eq!(d.outcome, PolicyOutcome::Block);
    assert!(
        d.explanation.contains("wallet hot is frozen: incident 42"),
        "{}",
        d.explanation
    );
    assert_eq!(
        w.decide(&p, &transfer("alice", "cold", "0.1")).outcome,
        PolicyOutcome::Allow
    );
    assert!(w.freeze.may_sign("hot").is_err());
    assert!(w.freeze.may_sign("cold").is_ok());
    let mut rotation = Request::action(ActionKind::KeyRotation, "admin1", true);
    rotation.wallet = Some("hot".into());
    assert_eq!(w.decide(&p, &rotation).outcome, PolicyOutcome::Block);
    w.freeze.freeze_everything("breach");
    assert_eq!(
        w.decide(&p, &transfer("alice", "cold", "0.1")).outcome,
        PolicyOutcome::Block
    );
    assert!(w.freeze.may_sign("cold").is_err());
    let d = w.decide(
        &p,
        &Request::action(ActionKind::PolicyChange, "admin1", true),
    );
    assert_eq!(d.outcome, PolicyOutcome::RequireApprovals);
    w.freeze.unfreeze_everything();
    assert!(w.freeze.unfreeze_wallet("hot"));
    assert_eq!(
        w.decide(&p, &transfer("alice", "hot", "0.1")).outcome,
        PolicyOutcome::Allow
    );
}

#[test]
fn velocity_state_records_in_order_and_prunes_by_now() {
    let mut v = custos_engine::policy::VelocityState::new(Currency::Eur);
    v.record(NOW - 3 * HOUR, "w", "u", 1);
    v.record(NOW - HOUR, "w", "u", 10);
    v.record(NOW - 2 * HOUR, "w", "v", 100); // out of order
    let t = v.window(custos_engine::policy::Scope::Wallet, "w", NOW, 150 * 60_000);
    assert_eq!((t.count, t.amount_micros), (2, 110));
    let t = v.window(
        custos_engine::policy::Scope::Initiator,
        "u",
        NOW,
        4 * 3_600_000,
    );
    assert_eq!((t.count, t.amount_micros), (2, 11));
    v.prune(NOW, 2 * 3_600_000);
    assert_eq!(v.len(), 1);
    v.prune(NOW + 10 * HOUR, 3_600_000);
    assert!(v.is_empty());
}

#[test]
fn directory_enforces_separation_of_duties_and_names_fields() {
    let mut d = Directory::new();
    let user = |id: &str, email: &str| NewUser {
        id: id.into(),
        name: "N".into(),
        email: email.into(),
        slack_user_id: Some("U024BE7LH".into()),
        mfa_enrolled: false,
    };
    d.add_user(user("ann", "ann@example.com")).expect("ann");
    let field = |r: Result<(), custos_schemas::FieldError>| r.expect_err("refused").field;
    assert_eq!(field(d.add_user(user("ann", "x@example.com"))), "id");
    assert_eq!(field(d.add_user(user("bad id", "y@example.com"))), "id");
    assert_eq!(field(d.add_user(user("ben", "ANN@example.com"))), "email");
    assert_eq!(field(d.add_user(user("ben", "not-an-email"))), "email");
    assert_eq!(
        field(d.add_user(user("ben", "ben@example.com"))),
        "slackUserId"
    );
    assert_eq!(
        field(d.add_user(NewUser {
            slack_user_id: Some("bob".into()),
            ..user("ben", "ben@example.com")
        })),
        "slackUserId"
    );
    assert_eq!(
        field(d.add_user(NewUser {
            name: " ".into(),
            ..user("ben", "ben@example.com")
        })),
        "name"
    );
    d.assign_role("ann", "approver").expect("approver");
    assert_eq!(field(d.assign_role("ann", "auditor")), "role");
    assert_eq!(field(d.assign_role("ann", "guardian-operator")), "role");
    assert_eq!(field(d.assign_role("ann", "nope")), "role");
    assert_eq!(field(d.assign_role("nobody", "approver")), "user");
    d.assign_role("ann", "initiator")
        .expect("initiator and approver may combine");
    assert_eq!(
        field(d.create_role("approve-and-audit", &[Duty::Approve, Duty::Audit])),
        "duties"
    );
    d.create_role("treasurer", &[Duty::Initiate, Duty::Execute])
        .expect("custom role");
    d.assign_role("ann", "treasurer").expect("treasurer");
    assert!(d.may("ann", Duty::Execute));
    d.revoke_role("ann", "treasurer").expect("revoke");
    assert!(!d.may("ann", Duty::Execute));
    assert_eq!(field(d.add_to_group("ann", "ghosts")), "group");
    d.create_group("approvers", "").expect("group");
    d.add_to_group("ann", "approvers").expect("member");
    assert!(d.may_approve_for("ann", "approvers"));
    d.deactivate("ann").expect("deactivate");
    assert!(!d.may_approve_for("ann", "approvers"));
    assert!(!d.may("ann", Duty::Initiate));
    assert_eq!(field(d.deactivate("ann")), "user");
    assert_eq!(field(d.assign_role("ann", "executor")), "user");
}

#[test]
fn explanations_say_which_rules_why_and_from_whom() {
    let w = World::new();
    let d = default_decision(&w, "6");
    let e = &d.explanation;
    // The rule's `[[rule]]` line in the default policy file.
    let line = custos_engine::policy::DEFAULT_POLICY_TOML
        .lines()
        .position(|l| l == "name = \"transfers-above-10000\"")
        .expect("the rule is in the default policy");
    let matched = format!("rule transfers-above-10000 (line {line}) matched");
    for words in [
        "REQUIRE APPROVALS transfer by alice on wallet hot of 6 ETH (EUR 12,000.00)",
        matched.as_str(),
        "amount EUR 12,000.00 is above EUR 10,000.00",
        "4 approvals from treasury-managers",
        "the initiator alice never counts",
        "2026-01-06T12:00:00Z",
    ] {
        assert!(e.contains(words), "{words:?} not in:\n{e}");
    }
    assert_eq!(
        d.fiat_value.as_ref().map(|f| f.amount.as_str()),
        Some("12000.00")
    );
    assert_eq!(d.matched_rules.len(), 1);
    assert!(
        d.matched_rules[0]
            .reasons
            .iter()
            .any(|r| r.contains("above EUR 10,000.00"))
    );
}
