//! In-process compute of DKG and signing (with the Taproot tweak), all parties
//! summed on one thread. Run in release to read the numbers:
//! `cargo test --release -p custos-custody --test timing -- --nocapture`.

mod support;

use std::time::Instant;

use std::collections::BTreeMap;

use custos_custody::frost::keys::dkg as frost_dkg;
use custos_custody::sim;
use support::*;

/// Bare frost DKG (no envelopes, no sealing, no echo), all parties, for comparison.
fn bare_dkg(t: u16, n: u16, r: &mut rand_chacha::ChaCha20Rng) {
    let mut s1 = BTreeMap::new();
    let mut p1 = BTreeMap::new();
    for i in 1..=n {
        let (s, p) = frost_dkg::part1(id(i), n, t, &mut *r).expect("part1");
        s1.insert(id(i), s);
        p1.insert(id(i), p);
    }
    let mut s2 = BTreeMap::new();
    let mut p2: BTreeMap<_, BTreeMap<_, _>> = BTreeMap::new();
    for (me, s) in s1 {
        let recv: BTreeMap<_, _> = p1
            .iter()
            .filter(|(k, _)| **k != me)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let (next, out) = frost_dkg::part2(s, &recv).expect("part2");
        for (to, pkg) in out {
            p2.entry(to).or_default().insert(me, pkg);
        }
        s2.insert(me, (next, recv));
    }
    for (me, (s, recv)) in s2 {
        frost_dkg::part3(&s, &recv, &p2[&me]).expect("part3");
    }
}

fn mean_ms(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len() as f64
}

fn median_ms(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[test]
fn compute_time_of_dkg_and_signing() {
    let iterations = if cfg!(debug_assertions) { 3 } else { 30 };
    let mut r = rng(90);
    for (t, n) in [(2u16, 3u16), (3, 5)] {
        let mut dkg_ms = Vec::new();
        let mut group = None;
        for i in 0..iterations {
            let start = Instant::now();
            let g = sim::run_dkg(&format!("bench-{i}"), t, n, &mut r).unwrap();
            dkg_ms.push(start.elapsed().as_secs_f64() * 1e3);
            group = Some(g);
        }
        let mut bare_ms = Vec::new();
        for _ in 0..iterations {
            let start = Instant::now();
            bare_dkg(t, n, &mut r);
            bare_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let g = group.unwrap();
        let pkp = g.public_key_package().unwrap();
        let quorum: Vec<_> = (1..=t).map(|i| kp(&g, i)).collect();
        let mut sign_ms = Vec::new();
        for i in 0..iterations * 10 {
            let m = msg(i as u8);
            let start = Instant::now();
            let sig = sim::run_signing(&quorum, pkp, &m, &mut r).unwrap();
            sign_ms.push(start.elapsed().as_secs_f64() * 1e3);
            assert_eq!(sig.signature().len(), 64);
        }
        println!(
            "{t}-of-{n}: DKG mean {:.2} ms (median {:.2}; bare frost DKG median {:.2}); signing with tweak mean {:.3} ms (median {:.3}) [{} build]",
            mean_ms(&dkg_ms),
            median_ms(&mut dkg_ms),
            median_ms(&mut bare_ms),
            mean_ms(&sign_ms),
            median_ms(&mut sign_ms),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        );
    }
}
