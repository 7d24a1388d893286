//! Shared fixtures of the policy tests: a directory with the default policy's
//! groups, prices, and helpers to build requests and inputs.

#![allow(dead_code)]

use custos_engine::policy::{
    ActionKind, AddressBook, Currency, Directory, FreezeState, Inputs, NewUser, Policy,
    PriceSnapshot, Request, VelocityState, evaluate,
};
use custos_schemas::Decimal;
use custos_schemas::policy::PolicyDecision;

/// 2026-01-05T12:00:00Z, a Monday.
pub const NOW: i64 = 1_767_614_400_000;
pub const HOUR: i64 = 3_600_000;
pub const MINUTE: i64 = 60_000;

pub const DEST: &str = "0x00000000000000000000000000000000000000aa";
pub const OTHER_DEST: &str = "0x00000000000000000000000000000000000000bb";

pub fn add_user(d: &mut Directory, id: &str, roles: &[&str], groups: &[&str]) {
    d.add_user(NewUser {
        id: id.into(),
        name: format!("User {id}"),
        email: format!("{id}@example.com"),
        slack_user_id: None,
        mfa_enrolled: true,
    })
    .expect("user");
    for r in roles {
        d.assign_role(id, r).expect("role");
    }
    for g in groups {
        if d.group(g).is_none() {
            d.create_group(g, "").expect("group");
        }
        d.add_to_group(id, g).expect("group membership");
    }
}

/// alice and bob initiate; a1..a3 approvers; t1..t5 treasury managers; admin1..3
/// administrators (who also hold the approver role); ops1 initiator in `ops`.
pub fn directory() -> Directory {
    let mut d = Directory::new();
    for g in ["approvers", "treasury-managers", "administrators", "ops"] {
        d.create_group(g, "").expect("group");
    }
    add_user(
        &mut d,
        "alice",
        &["initiator", "approver"],
        &["approvers", "treasury-managers"],
    );
    add_user(&mut d, "bob", &["initiator"], &[]);
    add_user(&mut d, "ops1", &["initiator"], &["ops"]);
    for a in ["a1", "a2", "a3"] {
        add_user(&mut d, a, &["approver"], &["approvers"]);
    }
    for t in ["t1", "t2", "t3", "t4", "t5"] {
        add_user(&mut d, t, &["approver"], &["treasury-managers"]);
    }
    for a in ["admin1", "admin2", "admin3"] {
        add_user(
            &mut d,
            a,
            &["administrator", "approver"],
            &["administrators"],
        );
    }
    d
}

/// ETH at EUR 2,000 and USD 2,200; LTC at EUR 100; all observed a minute ago.
pub fn prices() -> PriceSnapshot {
    let mut p = PriceSnapshot::new();
    p.insert("ETH", Currency::Eur, "2000", NOW - MINUTE)
        .expect("price");
    p.insert("ETH", Currency::Usd, "2200", NOW - MINUTE)
        .expect("price");
    p.insert("LTC", Currency::Eur, "100", NOW - MINUTE)
        .expect("price");
    p
}

/// A transfer of `amount` ETH from `wallet` by `initiator`.
pub fn transfer(initiator: &str, wallet: &str, amount: &str) -> Request {
    Request {
        action: ActionKind::Transfer,
        initiator: initiator.into(),
        mfa_verified: true,
        wallet: Some(wallet.into()),
        chain: Some("evm-1".into()),
        asset: Some("ETH".into()),
        amount: Some(Decimal::parse(amount).expect("amount")),
        destination: Some(DEST.into()),
    }
}

/// Everything an evaluation reads, owned, with defaults a test can change.
pub struct World {
    pub directory: Directory,
    pub prices: PriceSnapshot,
    pub velocity: VelocityState,
    pub address_book: AddressBook,
    pub freeze: FreezeState,
    pub now: i64,
}

impl World {
    pub fn new() -> Self {
        World {
            directory: directory(),
            prices: prices(),
            velocity: VelocityState::new(Currency::Eur),
            address_book: AddressBook::new(),
            freeze: FreezeState::new(),
            now: NOW,
        }
    }

    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            directory: &self.directory,
            prices: &self.prices,
            velocity: &self.velocity,
            address_book: &self.address_book,
            freeze: &self.freeze,
            now: self.now,
        }
    }

    pub fn decide(&self, policy: &Policy, request: &Request) -> PolicyDecision {
        evaluate(policy, request, &self.inputs())
    }
}

/// A policy with the default header and the given rules (TOML text).
pub fn policy_with(rules: &str) -> Policy {
    let text = format!("{HEADER}\n{rules}");
    match Policy::parse(&text) {
        Ok(p) => p,
        Err(e) => panic!(
            "policy does not parse:\n{}\n---\n{text}",
            custos_engine::policy::render_errors(&e)
        ),
    }
}

pub const HEADER: &str = r#"version = 1
name = "test"
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
approvers = ""
treasury-managers = ""
administrators = ""
ops = ""
"#;

/// The errors of a policy that must not parse.
pub fn errors_of(text: &str) -> Vec<custos_engine::policy::PolicyError> {
    match Policy::parse(text) {
        Ok(_) => panic!("policy parsed but should not:\n{text}"),
        Err(e) => e,
    }
}
