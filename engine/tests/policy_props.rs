//! Properties: raising the amount never lowers the required approvals; a
//! destination off the whitelist is never auto-allowed where a whitelist rule
//! applies; a freeze blocks every transfer and every signing.

mod policy_support;

use custos_engine::policy::{Policy, default_policy};
use custos_schemas::policy::{Combine, PolicyDecision, PolicyOutcome};
use policy_support::*;
use proptest::prelude::*;

/// How much a decision demands: allow < approvals (the least number of distinct
/// approvers that could satisfy it) < block.
fn demand(d: &PolicyDecision) -> u64 {
    match d.outcome {
        PolicyOutcome::Allow => 0,
        PolicyOutcome::Block => u64::MAX,
        PolicyOutcome::RequireApprovals => d
            .approvals
            .iter()
            .map(|a| {
                let counts = a.groups.iter().map(|g| u64::from(g.count));
                match a.combine {
                    Combine::All => counts.sum(),
                    Combine::Any => counts.min().unwrap_or(0),
                }
            })
            .max()
            .unwrap_or(0),
    }
}

const GROUPS: [&str; 3] = ["approvers", "treasury-managers", "administrators"];

/// A policy of cumulative tiers: "above X: N from G" (and sometimes "above X:
/// block"), plus "at most the lowest tier: allow".
fn tiers_policy(tiers: &[(u32, u32, usize, bool)]) -> Policy {
    let lowest = tiers.iter().map(|t| t.0).min().unwrap_or(1);
    let mut text = format!(
        "[[rule]]\nname = \"small\"\nactions = [\"transfer\"]\namount = {{ at_most = \"{lowest}\" }}\noutcome = \"allow\"\n"
    );
    for (i, (above, count, group, block)) in tiers.iter().enumerate() {
        text.push_str(&format!(
            "\n[[rule]]\nname = \"tier-{i}\"\nactions = [\"transfer\"]\namount = {{ above = \"{above}\" }}\n"
        ));
        if *block {
            text.push_str("outcome = \"block\"\n");
        } else {
            text.push_str(&format!(
                "outcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"{}\", count = {count} }}] }}\n",
                GROUPS[group % 3]
            ));
        }
    }
    policy_with(&text)
}

fn amount_string(milli: u64) -> String {
    format!("{}.{:03}", milli / 1000, milli % 1000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn raising_the_amount_never_lowers_the_default_policy_demand(a in 1u64..20_000_000, b in 1u64..20_000_000) {
        let (lo, hi) = (a.min(b), a.max(b));
        let p = default_policy().expect("default");
        let w = World::new();
        let d_lo = w.decide(&p, &transfer("alice", "hot", &amount_string(lo)));
        let d_hi = w.decide(&p, &transfer("alice", "hot", &amount_string(hi)));
        prop_assert!(demand(&d_hi) >= demand(&d_lo), "{}\n{}", d_lo.explanation, d_hi.explanation);
    }

    #[test]
    fn raising_the_amount_never_lowers_the_demand_of_tiered_policies(
        tiers in proptest::collection::vec((1u32..100_000, 1u32..10, 0usize..3, proptest::bool::weighted(0.1)), 1..8),
        a in 1u64..100_000_000,
        b in 1u64..100_000_000,
    ) {
        let mut seen = std::collections::BTreeSet::new();
        let tiers: Vec<_> = tiers.into_iter().filter(|t| seen.insert(t.0)).collect();
        let p = tiers_policy(&tiers);
        let w = World::new();
        let (lo, hi) = (a.min(b), a.max(b));
        for initiator in ["alice", "bob"] {
            let d_lo = w.decide(&p, &transfer(initiator, "hot", &amount_string(lo)));
            let d_hi = w.decide(&p, &transfer(initiator, "hot", &amount_string(hi)));
            prop_assert!(demand(&d_hi) >= demand(&d_lo), "{}\n{}", d_lo.explanation, d_hi.explanation);
        }
    }

    #[test]
    fn a_destination_off_the_whitelist_is_never_auto_allowed(
        whitelist_outcome_blocks in any::<bool>(),
        extra_allow_rules in 0usize..5,
        listed in proptest::collection::vec(0u64..1000, 0..20),
        dest in 1000u64..2000,
        milli in 1u64..50_000_000,
        wallet in "[a-z]{1,8}",
    ) {
        let mut text = String::new();
        for i in 0..extra_allow_rules {
            text.push_str(&format!("[[rule]]\nname = \"allow-{i}\"\nactions = [\"transfer\"]\namount = {{ above = \"{}\" }}\noutcome = \"allow\"\n\n", i * 10 + 1));
        }
        text.push_str("[[rule]]\nname = \"allow-all\"\nactions = [\"transfer\"]\noutcome = \"allow\"\n\n");
        text.push_str("[[rule]]\nname = \"whitelist\"\nactions = [\"transfer\"]\ndestination = { not_in = [\"book\"] }\n");
        if whitelist_outcome_blocks {
            text.push_str("outcome = \"block\"\n");
        } else {
            text.push_str("outcome = \"require-approvals\"\napprovals = { groups = [{ group = \"approvers\", count = 1 }] }\n");
        }
        let p = policy_with(&text);
        let mut w = World::new();
        for l in &listed {
            w.address_book.add("book", "evm-1", &format!("0x{l:040x}"));
        }
        let mut request = transfer("alice", &wallet, &amount_string(milli));
        request.destination = Some(format!("0x{dest:040x}"));
        let d = w.decide(&p, &request);
        prop_assert_ne!(d.outcome, PolicyOutcome::Allow, "{}", d.explanation);
        // And whitelisted destinations are allowed by the same policy.
        if let Some(l) = listed.first() {
            request.destination = Some(format!("0x{l:040x}"));
            let d = w.decide(&p, &request);
            prop_assert!(d.outcome == PolicyOutcome::Allow || d.outcome == PolicyOutcome::Block, "{}", d.explanation);
        }
    }

    #[test]
    fn a_freeze_blocks_every_transfer_and_every_signing(
        milli in 1u64..50_000_000,
        wallet in "[a-z]{1,8}",
        initiator in prop_oneof![Just("alice"), Just("bob"), Just("ops1")],
        everything in any::<bool>(),
        mfa in any::<bool>(),
    ) {
        let p = default_policy().expect("default");
        let mut w = World::new();
        if everything {
            w.freeze.freeze_everything("drill");
        } else {
            w.freeze.freeze_wallet(&wallet, "drill");
        }
        let mut request = transfer(initiator, &wallet, &amount_string(milli));
        request.mfa_verified = mfa;
        let d = w.decide(&p, &request);
        prop_assert_eq!(d.outcome, PolicyOutcome::Block, "{}", d.explanation);
        prop_assert!(d.explanation.contains("frozen"), "{}", d.explanation);
        prop_assert!(w.freeze.may_sign(&wallet).is_err());
    }

    #[test]
    fn decisions_are_deterministic(milli in 1u64..50_000_000, offset in 0i64..86_400_000) {
        let p = default_policy().expect("default");
        let mut w = World::new();
        w.now = NOW + offset % 200_000;
        let r = transfer("alice", "hot", &amount_string(milli));
        prop_assert_eq!(w.decide(&p, &r), w.decide(&p, &r));
    }
}
