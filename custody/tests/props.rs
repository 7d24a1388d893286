//! Property tests: decoders never panic, redistribution keeps the key for any shape.

mod support;

use custos_custody::dkg::Echo;
use custos_custody::reshare::{self, Redistribution};
use custos_custody::seal::Sealed;
use custos_custody::{address, identity, store};
use proptest::prelude::*;
use support::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Echo::from_bytes(&bytes);
        let _ = Sealed::from_bytes(&bytes);
        // Anything without the magic is refused before the KDF runs.
        prop_assume!(!bytes.starts_with(b"CUSTOSKS"));
        prop_assert!(store::open_secret(&bytes, b"pw", "g", "w").is_err());
    }

    #[test]
    fn envelopes_reject_any_single_byte_change(i in 0usize..8, flip in 1u8..=255) {
        let mut r = rng(1);
        let g1 = identity::GuardianKeys::generate("g1", &mut r);
        let mut inbox = identity::Inbox::new("c", "g2", &[g1.public()]).unwrap();
        let mut m = g1.sign_message("c", None, 1, vec![0, 1, 2, 3, 4, 5, 6, 7]);
        m.payload[i] ^= flip;
        prop_assert!(inbox.accept(&m).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn redistribution_preserves_the_key_for_any_shape(
        t_old in 2u16..=3, extra_old in 0u16..=1, t_new in 2u16..=4, extra_new in 0u16..=1, seed in any::<u64>()
    ) {
        let n_old = t_old + extra_old;
        let n_new = t_new + extra_new;
        let g = sim_group(t_old, n_old, seed);
        let pkp = g.public_key_package().unwrap().clone();
        // The last t_old old members deal to identifiers 10..10+n_new.
        let dealers: Vec<u16> = (n_old - t_old + 1..=n_old).collect();
        let params = Redistribution::new(
            "p",
            pkp.clone(),
            dealers.iter().map(|d| id(*d)).collect(),
            t_new,
            (10..10 + n_new).map(id).collect(),
        ).unwrap();
        let mut r = rng(seed ^ 1);
        let mut dealings = std::collections::BTreeMap::new();
        let mut subs: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> = Default::default();
        for d in &dealers {
            let (dealing, out) = reshare::deal(&params, kp(&g, *d), &mut r).unwrap();
            dealings.insert(id(*d), dealing);
            for (to, s) in out {
                subs.entry(to).or_default().insert(id(*d), s);
            }
        }
        let mut kps = Vec::new();
        let mut public = None;
        for j in 10..10 + n_new {
            let (k, p) = reshare::combine(&params, &id(j), &dealings, &subs[&id(j)]).unwrap();
            kps.push(k);
            public = Some(p);
        }
        let public = public.unwrap();
        prop_assert_eq!(public.verifying_key(), pkp.verifying_key());
        prop_assert_eq!(
            address::wallet(public.verifying_key(), "bc").unwrap(),
            address::wallet(pkp.verifying_key(), "bc").unwrap()
        );
        let quorum: Vec<_> = kps.iter().take(usize::from(t_new)).collect();
        prop_assert!(signs(&quorum, &public, seed));
        let short: Vec<_> = kps.iter().take(usize::from(t_new) - 1).collect();
        prop_assert!(!signs(&short, &public, seed));
    }
}

fn sim_group(t: u16, n: u16, seed: u64) -> custos_custody::sim::Group {
    dkg(t, n, seed)
}
