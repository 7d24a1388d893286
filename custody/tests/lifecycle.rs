//! Key lifecycle: rotation, removal, addition/repair, and threshold change by
//! verifiable redistribution, all on the same group key and address.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use custos_custody::frost::keys::{KeyPackage, PublicKeyPackage};
use custos_custody::lifecycle::{self, LifecycleError};
use custos_custody::reshare::{self, Dealing, Redistribution, ReshareError, SubShare};
use custos_custody::sim::Group;
use custos_custody::{Identifier, address};
use support::*;

/// Runs a refresh among `members` (identifiers) with their current key packages.
fn refresh(
    old_pkp: &PublicKeyPackage,
    old: &BTreeMap<Identifier, KeyPackage>,
    members: &[u16],
    seed: u64,
) -> BTreeMap<Identifier, (KeyPackage, PublicKeyPackage)> {
    let mut r = rng(seed);
    let set: BTreeSet<_> = members.iter().map(|i| id(*i)).collect();
    let mut s1 = BTreeMap::new();
    let mut p1 = BTreeMap::new();
    for me in &set {
        let (s, p) = lifecycle::refresh_start(old_pkp, &set, *me, &mut r).expect("refresh round 1");
        s1.insert(*me, s);
        p1.insert(*me, p);
    }
    let mut s2 = BTreeMap::new();
    let mut p2: BTreeMap<Identifier, BTreeMap<Identifier, _>> = BTreeMap::new();
    for (me, s) in s1 {
        let recv = p1
            .iter()
            .filter(|(k, _)| **k != me)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let (next, out) = s.round2(&recv).expect("refresh round 2");
        s2.insert(me, next);
        for (to, pkg) in out {
            p2.entry(to).or_default().insert(me, pkg);
        }
    }
    s2.into_iter()
        .map(|(me, s)| {
            (
                me,
                s.finish(&p2[&me], old_pkp, &old[&me]).expect("refresh end"),
            )
        })
        .collect()
}

fn key_packages(g: &Group) -> BTreeMap<Identifier, KeyPackage> {
    g.outputs
        .iter()
        .map(|(i, o)| (*i, o.key_package.clone()))
        .collect()
}

#[test]
fn rotation_keeps_the_address_and_old_shares_no_longer_combine() {
    let g = dkg(2, 3, 31);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    let new = refresh(&pkp, &old, &[1, 2, 3], 32);
    let new_pkp = &new[&id(1)].1;
    assert_eq!(new_pkp.verifying_key(), pkp.verifying_key());
    for (_, p) in new.values() {
        assert_eq!(
            lifecycle::public_digest(p).unwrap(),
            lifecycle::public_digest(new_pkp).unwrap()
        );
    }
    assert_ne!(new_pkp.verifying_shares(), pkp.verifying_shares());
    assert_eq!(
        address::wallet(new_pkp.verifying_key(), "bc").unwrap(),
        address::wallet(pkp.verifying_key(), "bc").unwrap()
    );
    assert!(signs(&[&new[&id(1)].0, &new[&id(3)].0], new_pkp, 33));
    // An old share with a new one: refused (against either public package).
    assert!(!signs(&[&old[&id(1)], &new[&id(3)].0], new_pkp, 34));
    assert!(!signs(&[&old[&id(1)], &new[&id(3)].0], &pkp, 35));
}

#[test]
fn removing_a_guardian_refreshes_the_rest_and_locks_it_out() {
    let g = dkg(3, 5, 36);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    let new = refresh(&pkp, &old, &[1, 2, 3, 5], 37);
    let new_pkp = &new[&id(1)].1;
    assert_eq!(new_pkp.verifying_key(), pkp.verifying_key());
    assert!(!new_pkp.verifying_shares().contains_key(&id(4)));
    assert_eq!(new_pkp.verifying_shares().len(), 4);
    assert!(signs(
        &[&new[&id(1)].0, &new[&id(2)].0, &new[&id(5)].0],
        new_pkp,
        38
    ));
    // The removed guardian's share does not combine with the new ones.
    assert!(!signs(
        &[&old[&id(4)], &new[&id(2)].0, &new[&id(5)].0],
        new_pkp,
        39
    ));
    // Too few remaining to keep the threshold: refused up front.
    let two: BTreeSet<_> = [id(1), id(2)].into();
    assert!(matches!(
        lifecycle::refresh_start(&pkp, &two, id(1), &mut rng(1)).unwrap_err(),
        LifecycleError::InvalidParameters(_)
    ));
}

fn repair(
    helpers: &[u16],
    kps: &BTreeMap<Identifier, KeyPackage>,
    target: u16,
    pkp: &PublicKeyPackage,
    seed: u64,
) -> Result<(KeyPackage, PublicKeyPackage), LifecycleError> {
    let mut r = rng(seed);
    let hs: Vec<_> = helpers.iter().map(|i| id(*i)).collect();
    let mut deltas: BTreeMap<Identifier, Vec<_>> = BTreeMap::new();
    for h in &hs {
        for (to, d) in lifecycle::repair_help(&hs, &kps[h], id(target), &mut r)? {
            deltas.entry(to).or_default().push(d);
        }
    }
    let sigmas: Vec<_> = hs
        .iter()
        .map(|h| lifecycle::repair_combine(&deltas[h]))
        .collect();
    lifecycle::repair_finish(&sigmas, id(target), pkp)
}

#[test]
fn repair_restores_a_lost_share_and_adds_a_new_guardian() {
    let g = dkg(2, 3, 40);
    let pkp = g.public_key_package().unwrap().clone();
    let kps = key_packages(&g);
    // g2 lost its share: g1 and g3 rebuild exactly it.
    let (kp2, pkp2) = repair(&[1, 3], &kps, 2, &pkp, 41).unwrap();
    assert_eq!(kp2.signing_share(), kps[&id(2)].signing_share());
    assert_eq!(pkp2, pkp);
    // A new guardian g4 (replacing g2, say) gets a share and a verifying share.
    let (kp4, pkp4) = repair(&[1, 3], &kps, 4, &pkp, 42).unwrap();
    assert_eq!(pkp4.verifying_key(), pkp.verifying_key());
    assert_eq!(pkp4.verifying_shares().len(), 4);
    assert_eq!(
        lifecycle::with_member(&pkp, id(4), *kp4.verifying_share()),
        pkp4
    );
    assert!(signs(&[&kp4, &kps[&id(1)]], &pkp4, 43));
    assert!(signs(&[&kp4, &kps[&id(2)]], &pkp4, 44));
    // Fewer helpers than the threshold, or the target among the helpers: refused.
    assert!(matches!(
        repair(&[1], &kps, 4, &pkp, 45).unwrap_err(),
        LifecycleError::InvalidParameters(_)
    ));
    assert!(matches!(
        repair(&[1, 2], &kps, 2, &pkp, 46).unwrap_err(),
        LifecycleError::InvalidParameters(_)
    ));
    // A helper with a stale (pre-rotation) share makes the lost share wrong: detected.
    let rotated = refresh(&pkp, &kps, &[1, 2, 3], 47);
    let mut mixed: BTreeMap<_, _> = rotated.iter().map(|(i, (k, _))| (*i, k.clone())).collect();
    mixed.insert(id(1), kps[&id(1)].clone());
    assert_eq!(
        repair(&[1, 3], &mixed, 2, &rotated[&id(3)].1, 48).unwrap_err(),
        LifecycleError::RepairMismatch(id(2))
    );
}

struct Reshared {
    kps: BTreeMap<Identifier, KeyPackage>,
    pkp: PublicKeyPackage,
}

/// Redistribution driven end to end; `tamper` may corrupt dealings and sub-shares.
fn redistribute(
    old_pkp: &PublicKeyPackage,
    old: &BTreeMap<Identifier, KeyPackage>,
    dealers: &[u16],
    t_new: u16,
    new_members: &[u16],
    seed: u64,
    tamper: impl Fn(
        &mut BTreeMap<Identifier, Dealing>,
        &mut BTreeMap<Identifier, BTreeMap<Identifier, SubShare>>,
    ),
) -> Result<Reshared, ReshareError> {
    let mut r = rng(seed);
    let params = Redistribution::new(
        "reshare-1",
        old_pkp.clone(),
        dealers.iter().map(|i| id(*i)).collect(),
        t_new,
        new_members.iter().map(|i| id(*i)).collect(),
    )?;
    let mut dealings = BTreeMap::new();
    let mut subs: BTreeMap<Identifier, BTreeMap<Identifier, SubShare>> = BTreeMap::new();
    for d in dealers {
        let (dealing, out) = reshare::deal(&params, &old[&id(*d)], &mut r)?;
        dealings.insert(id(*d), dealing);
        for (to, s) in out {
            subs.entry(to).or_default().insert(id(*d), s);
        }
    }
    tamper(&mut dealings, &mut subs);
    let digest = reshare::transcript(&params, &dealings)?;
    let mut kps = BTreeMap::new();
    let mut pkp = None;
    for j in new_members {
        let (kp, p) = reshare::combine(&params, &id(*j), &dealings, &subs[&id(*j)])?;
        assert_eq!(reshare::transcript(&params, &dealings)?, digest);
        if let Some(prev) = &pkp {
            assert_eq!(prev, &p);
        }
        kps.insert(id(*j), kp);
        pkp = Some(p);
    }
    // Anyone (the coordinator) derives the same public package from the broadcast.
    let public = reshare::public_package(&params, &dealings)?;
    assert_eq!(Some(&public), pkp.as_ref());
    Ok(Reshared { kps, pkp: public })
}

#[test]
fn threshold_2_of_3_to_3_of_5_keeps_the_address() {
    let g = dkg(2, 3, 50);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    let before = address::wallet(pkp.verifying_key(), "tb").unwrap();
    let new = redistribute(&pkp, &old, &[1, 3], 3, &[1, 2, 3, 4, 5], 51, |_, _| {}).unwrap();
    assert_eq!(new.pkp.min_signers(), Some(3));
    assert_eq!(new.pkp.verifying_key(), pkp.verifying_key());
    assert_eq!(
        address::wallet(new.pkp.verifying_key(), "tb").unwrap(),
        before
    );
    let k = |i: u16| &new.kps[&id(i)];
    assert!(signs(&[k(1), k(2), k(3)], &new.pkp, 52));
    assert!(signs(&[k(2), k(4), k(5)], &new.pkp, 53));
    // Two new shares are no longer enough.
    assert!(!signs(&[k(4), k(5)], &new.pkp, 54));
    // Old shares do not mix with new ones.
    assert!(!signs(&[&old[&id(1)], k(4), k(5)], &new.pkp, 55));
}

#[test]
fn threshold_3_of_5_to_2_of_3_keeps_the_address() {
    let g = dkg(3, 5, 56);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    let new = redistribute(&pkp, &old, &[2, 4, 5], 2, &[6, 7, 8], 57, |_, _| {}).unwrap();
    assert_eq!(new.pkp.min_signers(), Some(2));
    assert_eq!(
        address::wallet(new.pkp.verifying_key(), "bc").unwrap(),
        address::wallet(pkp.verifying_key(), "bc").unwrap()
    );
    let k = |i: u16| &new.kps[&id(i)];
    for (a, b) in [(6, 7), (6, 8), (7, 8)] {
        assert!(signs(&[k(a), k(b)], &new.pkp, 58 + a as u64));
    }
    // Fewer dealers than the old threshold: refused before anything is dealt.
    assert!(matches!(
        redistribute(&pkp, &old, &[1, 2], 2, &[6, 7, 8], 59, |_, _| {}).err(),
        Some(ReshareError::InvalidParameters(_))
    ));
}

#[test]
fn a_dealer_sending_a_bad_sub_share_is_named() {
    let g = dkg(2, 3, 60);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    let err = redistribute(&pkp, &old, &[1, 2], 3, &[1, 2, 3, 4], 61, |_, subs| {
        // Dealer 2 sends member 3 a sub-share off by one.
        let s = subs.get_mut(&id(3)).unwrap().get_mut(&id(2)).unwrap();
        let mut b = *s.to_bytes();
        b[31] ^= 1;
        *s = SubShare::from_bytes(b);
    })
    .err();
    assert_eq!(err, Some(ReshareError::BadSubShare(id(2))));
    // Another member's sub-share from dealer 1 passed to member 4: named too.
    let err = redistribute(&pkp, &old, &[1, 2], 3, &[1, 2, 3, 4], 62, |_, subs| {
        let other = subs[&id(1)][&id(1)].clone();
        subs.get_mut(&id(4)).unwrap().insert(id(1), other);
    })
    .err();
    assert_eq!(err, Some(ReshareError::BadSubShare(id(1))));
}

#[test]
fn a_dealer_changing_the_secret_is_named_even_with_consistent_sub_shares() {
    let g = dkg(2, 3, 63);
    let pkp = g.public_key_package().unwrap().clone();
    let old = key_packages(&g);
    // Dealer 3 deals a *different* secret consistently (its dealing and sub-shares
    // agree, so the Feldman check alone would pass): the constant-term check catches it.
    let params_other = Redistribution::new(
        "reshare-1",
        pkp.clone(),
        [id(1), id(3)].into(),
        2,
        [id(1), id(2), id(3)].into(),
    )
    .unwrap();
    let mut evil = old[&id(3)].clone();
    let fake = dkg(2, 3, 64);
    let fk = fake.key_package(3).unwrap();
    evil = KeyPackage::new(
        *evil.identifier(),
        *fk.signing_share(),
        *fk.verifying_share(),
        *evil.verifying_key(),
        *evil.min_signers(),
    );
    let (bad_dealing, bad_subs) = reshare::deal(&params_other, &evil, &mut rng(65)).unwrap();
    assert_eq!(
        reshare::verify_dealing(&params_other, &bad_dealing),
        Err(ReshareError::DealerChangedSecret(id(3)))
    );
    for (j, s) in &bad_subs {
        assert!(reshare::verify_sub_share(&params_other, &bad_dealing, j, s).is_ok());
    }
    let err = redistribute(&pkp, &old, &[1, 3], 2, &[1, 2, 3], 66, |dealings, subs| {
        dealings.insert(id(3), bad_dealing.clone());
        for (j, s) in &bad_subs {
            subs.get_mut(j).unwrap().insert(id(3), s.clone());
        }
    })
    .err();
    assert_eq!(err, Some(ReshareError::DealerChangedSecret(id(3))));
    // Wrong degree and missing dealing are named too.
    let err = redistribute(&pkp, &old, &[1, 3], 2, &[1, 2, 3], 67, |dealings, _| {
        dealings.get_mut(&id(1)).unwrap().commitments.pop();
    })
    .err();
    assert_eq!(
        err,
        Some(ReshareError::WrongDegree {
            dealer: id(1),
            found: 1,
            expected: 2
        })
    );
    let err = redistribute(&pkp, &old, &[1, 3], 2, &[1, 2, 3], 68, |dealings, _| {
        dealings.remove(&id(3));
    })
    .err();
    assert_eq!(err, Some(ReshareError::MissingDealing(id(3))));
}

#[test]
fn sub_shares_travel_sealed_to_their_recipient_only() {
    let g = dkg(2, 3, 70);
    let (k1, k2, k3) = (&g.keys[&id(1)], &g.keys[&id(2)], &g.keys[&id(3)]);
    let sub = SubShare::from_bytes([5; 32]);
    let sealed = reshare::seal_sub_share(k1, &k2.public(), "rs", &sub, &mut rng(71)).unwrap();
    assert_eq!(
        reshare::open_sub_share(k2, &sealed, "rs", "g1", id(1)).unwrap(),
        sub
    );
    assert!(matches!(
        reshare::open_sub_share(k3, &sealed, "rs", "g1", id(1)),
        Err(ReshareError::Sealed { .. })
    ));
    assert!(matches!(
        reshare::open_sub_share(k2, &sealed, "other", "g1", id(1)),
        Err(ReshareError::Sealed { .. })
    ));
    assert_eq!(format!("{sub:?}"), "SubShare(<redacted>)");
}
