//! Decision latency on a 200-rule policy with velocity state (`custos bench
//! policy`). The engine reads no clock: the caller passes one in, a function
//! returning the time elapsed since any fixed origin.

use std::hint::black_box;
use std::time::Duration;

use custos_schemas::Decimal;
use custos_schemas::policy::PolicyOutcome;

use super::directory::{Directory, NewUser};
use super::fiat::Currency;
use super::state::{AddressBook, FreezeState, VelocityState};
use super::{ActionKind, Inputs, Policy, PriceSnapshot, Request, evaluate};

/// Wallets, initiators and recorded transfers of the fixture.
pub const WALLETS: usize = 20;
pub const INITIATORS: usize = 50;
pub const VELOCITY_ENTRIES: usize = 5_000;
/// The fixture's evaluation time: 2026-01-05T12:00:00Z, a Monday.
pub const NOW: i64 = 1_767_614_400_000;

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub iterations: usize,
    pub rules: usize,
    pub velocity_entries: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Decisions per second on one core, measured over a separate run of
    /// `iterations` decisions without per-decision clock reads.
    pub decisions_per_sec: f64,
    pub allowed: usize,
    pub approvals: usize,
    pub blocked: usize,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "policy decisions: {} rules, {} velocity entries, {} decisions \
             (allow {}, require approvals {}, block {}): p50 {:.1} µs, p90 {:.1} µs, \
             p99 {:.1} µs, max {:.1} µs; {:.0} decisions/s on one core",
            self.rules,
            self.velocity_entries,
            self.iterations,
            self.allowed,
            self.approvals,
            self.blocked,
            micros(self.p50),
            micros(self.p90),
            micros(self.p99),
            micros(self.max),
            self.decisions_per_sec
        )
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The fixture's 200-rule policy: per-wallet amount tiers, velocity limits on
/// amount and count, whitelists, time-of-day, MFA, role and group rules, asset
/// and chain rules, and administration.
pub fn bench_policy_toml() -> String {
    let mut t = String::from(
        "version = 1\nname = \"bench-200\"\ncurrency = \"EUR\"\nmax_price_age = \"5m\"\napproval_expiry = \"24h\"\n\n[groups]\napprovers = \"\"\ntreasury-managers = \"\"\nadministrators = \"\"\nops = \"\"\n\n",
    );
    let mut rule = |body: String| {
        t.push_str("[[rule]]\n");
        t.push_str(&body);
        t.push('\n');
    };
    for w in 0..WALLETS {
        let base = format!("actions = [\"transfer\"]\nwallets = [\"w{w:02}\"]\n");
        rule(format!(
            "name = \"w{w:02}-small\"\n{base}amount = {{ at_most = \"1000\" }}\noutcome = \"allow\"\n"
        ));
        rule(format!(
            "name = \"w{w:02}-medium\"\n{base}amount = {{ above = \"1000\", at_most = \"10000\" }}\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"approvers\", count = 2 }}] }}\n"
        ));
        rule(format!(
            "name = \"w{w:02}-large\"\n{base}amount = {{ above = \"10000\" }}\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"treasury-managers\", count = 4 }}] }}\ndelay = \"1h\"\n"
        ));
        rule(format!(
            "name = \"w{w:02}-daily-volume\"\n{base}velocity = {{ scope = \"wallet\", window = \"24h\", max_amount = \"{}\" }}\noutcome = \"require-approvals\"\napprovals = {{ combine = \"all\", groups = [{{ group = \"treasury-managers\", count = 2 }}, {{ group = \"approvers\", count = 1 }}] }}\n",
            50_000 + w * 1_000
        ));
        rule(format!(
            "name = \"w{w:02}-hourly-count\"\n{base}velocity = {{ scope = \"initiator\", window = \"{}m\", max_count = {} }}\noutcome = \"block\"\n",
            60 + w,
            30 + w
        ));
        rule(format!(
            "name = \"w{w:02}-unknown-destination\"\n{base}destination = {{ not_in = [\"w{w:02}-book\", \"exchanges\"] }}\noutcome = \"require-approvals\"\napprovals = {{ combine = \"any\", groups = [{{ group = \"approvers\", count = 2 }}, {{ group = \"treasury-managers\", count = 1 }}] }}\n"
        ));
        rule(format!(
            "name = \"w{w:02}-night\"\n{base}amount = {{ above = \"{}\" }}\ntime = {{ from = \"07:00\", to = \"20:00\", days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"], outside = true }}\noutcome = \"block\"\n",
            100_000 + w
        ));
        rule(format!(
            "name = \"w{w:02}-no-mfa\"\n{base}mfa = false\namount = {{ above = \"{}\" }}\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"approvers\", count = 1 }}] }}\n",
            500 + w
        ));
        rule(format!(
            "name = \"w{w:02}-ops-initiators\"\n{base}initiator_groups = [\"ops\"]\ninitiator_roles = [\"initiator\"]\namount = {{ above = \"{}\" }}\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"approvers\", count = 3 }}] }}\nexpires_after = \"2h\"\n",
            20_000 + w
        ));
    }
    for (i, chain) in [
        "evm-1",
        "evm-11155111",
        "btc-mainnet",
        "ltc-mainnet",
        "evm-31337",
    ]
    .iter()
    .enumerate()
    {
        rule(format!(
            "name = \"chain-{chain}-watch\"\nactions = [\"transfer\"]\nchains = [\"{chain}\"]\namount = {{ above = \"{}\" }}\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"treasury-managers\", count = 1 }}] }}\n",
            5_000 + i
        ));
        rule(format!(
            "name = \"chain-{chain}-initiators\"\nactions = [\"transfer\"]\nchains = [\"{chain}\"]\ninitiators = [\"u00\", \"u01\", \"u02\"]\noutcome = \"block\"\n"
        ));
    }
    // The administrative actions (the benchmark asks for no fee bumps).
    for (i, action) in ActionKind::ALL
        .iter()
        .filter(|a| !a.moves_funds())
        .enumerate()
    {
        rule(format!(
            "name = \"admin-{}\"\nactions = [\"{}\"]\noutcome = \"require-approvals\"\napprovals = {{ groups = [{{ group = \"administrators\", count = {} }}] }}\n",
            action.as_str(),
            action.as_str(),
            2 + i % 2
        ));
    }
    t
}

/// Everything a benchmark decision reads.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub policy: Policy,
    pub directory: Directory,
    pub prices: PriceSnapshot,
    pub velocity: VelocityState,
    pub address_book: AddressBook,
    pub freeze: FreezeState,
    pub requests: Vec<Request>,
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// Builds the fixture (deterministic).
pub fn fixture() -> Result<Fixture, String> {
    let policy = Policy::parse(&bench_policy_toml()).map_err(|e| super::render_errors(&e))?;
    let mut directory = Directory::new();
    let fail = |e: custos_schemas::FieldError| e.to_string();
    for g in ["approvers", "treasury-managers", "administrators", "ops"] {
        directory.create_group(g, "").map_err(fail)?;
    }
    for u in 0..INITIATORS {
        let id = format!("u{u:02}");
        directory
            .add_user(NewUser {
                id: id.clone(),
                name: format!("User {u}"),
                email: format!("u{u}@example.com"),
                slack_user_id: None,
                mfa_enrolled: true,
            })
            .map_err(fail)?;
        directory.assign_role(&id, "initiator").map_err(fail)?;
        if u % 3 == 0 {
            directory.add_to_group(&id, "ops").map_err(fail)?;
        }
    }
    let mut prices = PriceSnapshot::new();
    for (asset, price) in [("ETH", "2000.50"), ("BTC", "60000"), ("LTC", "80.25")] {
        prices
            .insert(asset, Currency::Eur, price, NOW - 30_000)
            .map_err(fail)?;
    }
    let mut rng = Lcg(7);
    let mut velocity = VelocityState::new(Currency::Eur);
    for _ in 0..VELOCITY_ENTRIES {
        let at = NOW - i64::try_from(rng.next() % 86_400_000).unwrap_or(0);
        let w = rng.next() as usize % WALLETS;
        let u = rng.next() as usize % INITIATORS;
        velocity.record(
            at,
            &format!("w{w:02}"),
            &format!("u{u:02}"),
            u128::from(rng.next() % 300_000_000),
        );
    }
    let mut address_book = AddressBook::new();
    for w in 0..WALLETS {
        for k in 0..50 {
            address_book.add(
                &format!("w{w:02}-book"),
                "evm-1",
                &format!("0x{:040x}", w * 1000 + k),
            );
        }
    }
    let mut requests = Vec::with_capacity(1024);
    for _ in 0..1024 {
        let w = rng.next() as usize % WALLETS;
        let u = rng.next() as usize % INITIATORS;
        let destination = if rng.next().is_multiple_of(4) {
            format!("0x{:040x}", 999_999 + rng.next())
        } else {
            format!("0x{:040x}", w * 1000 + (rng.next() as usize % 50))
        };
        // 0.0001 to ~20 ETH.
        let units = u128::from(1 + rng.next() % 200_000);
        requests.push(Request {
            action: ActionKind::Transfer,
            initiator: format!("u{u:02}"),
            mfa_verified: !rng.next().is_multiple_of(5),
            wallet: Some(format!("w{w:02}")),
            chain: Some("evm-1".into()),
            asset: Some("ETH".into()),
            amount: Some(Decimal { units, scale: 4 }),
            destination: Some(destination),
        });
    }
    Ok(Fixture {
        policy,
        directory,
        prices,
        velocity,
        address_book,
        freeze: FreezeState::new(),
        requests,
    })
}

/// Runs `iterations` decisions (after a tenth as many to warm up), timing each
/// with `clock` (elapsed time since any fixed origin, e.g. from a monotonic
/// clock the caller owns), then `iterations` more untimed for throughput.
pub fn run_benchmark(
    iterations: usize,
    mut clock: impl FnMut() -> Duration,
) -> Result<BenchReport, String> {
    let f = fixture()?;
    let inputs = Inputs {
        directory: &f.directory,
        prices: &f.prices,
        velocity: &f.velocity,
        address_book: &f.address_book,
        freeze: &f.freeze,
        now: NOW,
    };
    let iterations = iterations.max(1);
    let n = f.requests.len();
    for i in 0..iterations / 10 {
        black_box(evaluate(&f.policy, &f.requests[i % n], &inputs));
    }
    let (mut allowed, mut approvals, mut blocked) = (0, 0, 0);
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let request = black_box(&f.requests[i % n]);
        let start = clock();
        let decision = evaluate(&f.policy, request, &inputs);
        let end = clock();
        samples.push(end.saturating_sub(start));
        match black_box(decision).outcome {
            PolicyOutcome::Allow => allowed += 1,
            PolicyOutcome::RequireApprovals => approvals += 1,
            PolicyOutcome::Block => blocked += 1,
        }
    }
    let start = clock();
    for i in 0..iterations {
        black_box(evaluate(&f.policy, black_box(&f.requests[i % n]), &inputs));
    }
    let total = clock().saturating_sub(start);
    samples.sort_unstable();
    let pick = |q: f64| {
        let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(idx).copied().unwrap_or_default()
    };
    Ok(BenchReport {
        iterations,
        rules: f.policy.rules.len(),
        velocity_entries: f.velocity.len(),
        p50: pick(0.50),
        p90: pick(0.90),
        p99: pick(0.99),
        max: samples.last().copied().unwrap_or_default(),
        decisions_per_sec: iterations as f64 / total.as_secs_f64().max(1e-9),
        allowed,
        approvals,
        blocked,
    })
}
