//! The policy benchmark runs and exercises every outcome. Figures are printed
//! (`cargo test --release -p custos-engine --test policy_bench -- --nocapture`);
//! they are asserted only for sanity, since a shared machine's timing varies.

use std::time::{Duration, Instant};

use custos_engine::policy::bench::{self, run_benchmark};

#[test]
fn bench_fixture_has_200_rules_and_velocity_state() {
    let f = bench::fixture().expect("fixture");
    assert_eq!(f.policy.rules.len(), 200);
    assert_eq!(f.velocity.len(), bench::VELOCITY_ENTRIES);
    assert!(f.policy.longest_window_ms() >= 86_400_000);
}

#[test]
fn benchmark_reports_latency_and_throughput() {
    let origin = Instant::now();
    let iterations = if cfg!(debug_assertions) {
        2_000
    } else {
        200_000
    };
    let report = run_benchmark(iterations, || origin.elapsed()).expect("benchmark");
    println!("{report}");
    assert_eq!(report.iterations, iterations);
    assert_eq!(
        report.allowed + report.approvals + report.blocked,
        iterations
    );
    assert!(
        report.allowed > 0 && report.approvals > 0 && report.blocked > 0,
        "{report}"
    );
    assert!(report.p50 <= report.p99 && report.p99 <= report.max);
    assert!(report.decisions_per_sec > 0.0);
    assert!(report.p99 < Duration::from_secs(1));
}

#[test]
fn benchmark_uses_only_the_clock_it_is_given() {
    // A fake clock that advances 1 µs per reading: every decision takes 1 µs.
    let mut t = Duration::ZERO;
    let report = run_benchmark(100, || {
        t += Duration::from_micros(1);
        t
    })
    .expect("benchmark");
    assert_eq!(report.p50, Duration::from_micros(1));
    assert_eq!(report.p99, Duration::from_micros(1));
    assert!((report.decisions_per_sec - 100e6).abs() < 1.0, "{report}");
}
