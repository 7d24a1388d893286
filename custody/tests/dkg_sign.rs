//! DKG ceremonies (echo check, sealed round 2, transcript) and signing (guardian
//! refusals, single use, cheater detection, BIP-340 verification, a P2TR spend).

mod support;

use std::collections::BTreeMap;

use custos_custody::dkg::{self, Ceremony, DkgError, Echo};
use custos_custody::frost::keys::dkg::round1;
use custos_custody::identity::GuardianKeys;
use custos_custody::sign::{self, AggregateError, SignError, Signer};
use custos_custody::taproot::{OutPoint, Transaction, TxIn, TxOut};
use custos_custody::{Identifier, address, sim};
use support::*;

#[test]
fn dkg_2_of_3_and_3_of_5_agree_on_key_transcript_and_address() {
    for (t, n) in [(2u16, 3u16), (3, 5)] {
        let g = dkg(t, n, 11);
        let first = g.outputs.values().next().unwrap();
        for o in g.outputs.values() {
            assert_eq!(o.public_key_package, first.public_key_package);
            assert_eq!(o.transcript, first.transcript);
            assert_eq!(*o.key_package.min_signers(), t);
        }
        assert_eq!(
            first.public_key_package.verifying_shares().len(),
            usize::from(n)
        );
        let w = address::wallet(first.public_key_package.verifying_key(), "btc-regtest").unwrap();
        assert!(w.address.starts_with("bcrt1p"), "{}", w.address);
        // The output key is the taptweak of x(Q), not x(Q) itself.
        assert_ne!(w.output_key, w.internal_key);
        // Debug never shows the share.
        let dbg = format!("{first:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&hex::encode(first.key_package.signing_share().serialize())));
    }
    // Another ceremony gives another key and transcript.
    let a = dkg(2, 3, 1);
    let b = dkg(2, 3, 2);
    assert_ne!(
        a.public_key_package().unwrap().verifying_key(),
        b.public_key_package().unwrap().verifying_key()
    );
}

struct Manual {
    ceremony: Ceremony,
    keys: BTreeMap<Identifier, GuardianKeys>,
}

fn manual(t: u16, n: u16, seed: u64) -> Manual {
    let mut r = rng(seed);
    let mut keys = BTreeMap::new();
    for i in 1..=n {
        keys.insert(id(i), GuardianKeys::generate(&format!("g{i}"), &mut r));
    }
    let ceremony =
        Ceremony::new("cer", t, (1..=n).map(|i| (i, keys[&id(i)].public()))).expect("roster");
    Manual { ceremony, keys }
}

#[test]
fn echo_check_names_an_equivocating_guardian() {
    let m = manual(2, 3, 5);
    let mut r = rng(6);
    let (s1, p1) = dkg::start(m.ceremony.clone(), &m.keys[&id(1)], &mut r).unwrap();
    // g1 equivocates: a second, different round-1 package for g3.
    let (_, p1_other) = dkg::start(m.ceremony.clone(), &m.keys[&id(1)], &mut r).unwrap();
    let (s2, p2) = dkg::start(m.ceremony.clone(), &m.keys[&id(2)], &mut r).unwrap();
    let (s3, p3) = dkg::start(m.ceremony.clone(), &m.keys[&id(3)], &mut r).unwrap();
    let _ = s1;
    let recv2: BTreeMap<_, _> = [(id(1), p1.clone()), (id(3), p3.clone())].into();
    let recv3: BTreeMap<_, _> = [(id(1), p1_other), (id(2), p2.clone())].into();
    let (r2, echo2, _) = s2.round2(&recv2, &m.keys[&id(2)], &mut r).unwrap();
    let (r3, echo3, _) = s3.round2(&recv3, &m.keys[&id(3)], &mut r).unwrap();
    assert_ne!(echo2, echo3);
    let echoes_for_2: BTreeMap<_, _> = [(id(1), echo2.clone()), (id(3), echo3.clone())].into();
    let err = r2
        .finalize(&echoes_for_2, &BTreeMap::new(), &m.keys[&id(2)])
        .unwrap_err();
    assert_eq!(
        err,
        DkgError::Equivocation {
            sender: "g1".into(),
            reported_by: "g3".into()
        }
    );
    // An echo over another set of senders is a mismatch of that participant.
    let mut short = echo2.clone();
    short.digests.remove(&id(1));
    let echoes_for_3: BTreeMap<_, _> = [(id(1), echo3.clone()), (id(2), short)].into();
    assert_eq!(
        r3.finalize(&echoes_for_3, &BTreeMap::new(), &m.keys[&id(3)])
            .unwrap_err(),
        DkgError::EchoMismatch {
            participant: "g2".into()
        }
    );
    // Echo encoding round-trips and rejects garbage.
    assert_eq!(Echo::from_bytes(&echo2.to_bytes()), Some(echo2));
    assert_eq!(Echo::from_bytes(&[0u8; 63]), None);
}

#[test]
fn dkg_names_bad_proofs_missing_packages_bad_shares_and_refuses_misdirected_seals() {
    let m = manual(2, 3, 7);
    let mut r = rng(8);
    let mut states = BTreeMap::new();
    let mut pkgs = BTreeMap::new();
    for i in 1..=3 {
        let (s, p) = dkg::start(m.ceremony.clone(), &m.keys[&id(i)], &mut r).unwrap();
        states.insert(i, s);
        pkgs.insert(id(i), p);
    }
    let others = |me: u16| -> BTreeMap<Identifier, round1::Package> {
        pkgs.iter()
            .filter(|(k, _)| **k != id(me))
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    };
    // A forged proof of knowledge for g1 (g2's proof on g1's commitment).
    let mut forged = others(3);
    forged.insert(
        id(1),
        round1::Package::new(
            pkgs[&id(1)].commitment().clone(),
            *pkgs[&id(2)].proof_of_knowledge(),
        ),
    );
    let s3 = states.remove(&3).unwrap();
    let err = s3.round2(&forged, &m.keys[&id(3)], &mut r).unwrap_err();
    assert_eq!(
        err,
        DkgError::InvalidProofOfKnowledge {
            participant: "g1".into()
        }
    );
    // Missing package.
    let mut missing = others(2);
    missing.remove(&id(1));
    let s2 = states.remove(&2).unwrap();
    assert_eq!(
        s2.round2(&missing, &m.keys[&id(2)], &mut r).unwrap_err(),
        DkgError::Missing {
            from: "g1".into(),
            what: "round-1 package"
        }
    );
    // Unknown guardian / wrong keys.
    let stranger = GuardianKeys::generate("g9", &mut r);
    assert_eq!(
        dkg::start(m.ceremony.clone(), &stranger, &mut r).unwrap_err(),
        DkgError::NotAMember("g9".into())
    );
    let impostor = GuardianKeys::generate("g1", &mut r);
    assert_eq!(
        dkg::start(m.ceremony.clone(), &impostor, &mut r).unwrap_err(),
        DkgError::IdentityMismatch("g1".into())
    );

    // A clean run, then g1 sends g2 the share meant for g3 (re-sealed to g2).
    let m = manual(2, 3, 9);
    let mut states = BTreeMap::new();
    let mut pkgs = BTreeMap::new();
    for i in 1..=3 {
        let (s, p) = dkg::start(m.ceremony.clone(), &m.keys[&id(i)], &mut r).unwrap();
        states.insert(i, s);
        pkgs.insert(id(i), p);
    }
    let mut r2s = BTreeMap::new();
    let mut echoes = BTreeMap::new();
    let mut sealed = BTreeMap::new();
    for i in 1..=3u16 {
        let recv = pkgs
            .iter()
            .filter(|(k, _)| **k != id(i))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let (s, e, out) = states
            .remove(&i)
            .unwrap()
            .round2(&recv, &m.keys[&id(i)], &mut r)
            .unwrap();
        r2s.insert(i, s);
        echoes.insert(id(i), e);
        sealed.insert(id(i), out);
    }
    let for_me = |me: u16, sealed: &BTreeMap<Identifier, BTreeMap<Identifier, _>>| {
        let mut echo = echoes.clone();
        echo.remove(&id(me));
        let s: BTreeMap<Identifier, custos_custody::seal::Sealed> = sealed
            .iter()
            .filter(|(from, _)| **from != id(me))
            .map(|(from, m)| (*from, m.get(&id(me)).cloned().unwrap()))
            .collect();
        (echo, s)
    };
    // g2 gets from g1 the plaintext meant for g3, re-sealed to g2.
    let plain = m.keys[&id(3)]
        .open(&sealed[&id(1)][&id(3)], "cer", "g1", "dkg-round2")
        .unwrap();
    let resealed = m.keys[&id(1)]
        .seal_to(
            &m.keys[&id(2)].public(),
            &plain,
            "cer",
            "dkg-round2",
            &mut r,
        )
        .unwrap();
    let mut bad = sealed.clone();
    bad.get_mut(&id(1)).unwrap().insert(id(2), resealed);
    let (e2, s2) = for_me(2, &bad);
    assert_eq!(
        r2s.remove(&2)
            .unwrap()
            .finalize(&e2, &s2, &m.keys[&id(2)])
            .unwrap_err(),
        DkgError::InvalidShare {
            sender: "g1".into()
        }
    );
    // g3 is handed the ciphertext g1 sealed for g1→g2 (a coordinator redirecting): it does not open.
    let mut redirected = sealed.clone();
    let for_g2 = redirected[&id(1)][&id(2)].clone();
    redirected.get_mut(&id(1)).unwrap().insert(id(3), for_g2);
    let (e3, s3) = for_me(3, &redirected);
    assert!(matches!(
        r2s.remove(&3).unwrap().finalize(&e3, &s3, &m.keys[&id(3)]).unwrap_err(),
        DkgError::Sealed { sender, .. } if sender == "g1"
    ));
    // And g1 completes normally with the honest packages.
    let (e1, s1) = for_me(1, &sealed);
    assert!(
        r2s.remove(&1)
            .unwrap()
            .finalize(&e1, &s1, &m.keys[&id(1)])
            .is_ok()
    );
}

#[test]
fn signing_2_of_3_and_3_of_5_verify_as_bip340_for_every_quorum() {
    let g = dkg(2, 3, 21);
    let pkp = g.public_key_package().unwrap();
    for (a, b) in [(1, 2), (1, 3), (2, 3)] {
        assert!(signs(
            &[kp(&g, a), kp(&g, b)],
            pkp,
            30 + a as u64 + b as u64
        ));
    }
    let g = dkg(3, 5, 22);
    let pkp = g.public_key_package().unwrap();
    for q in [[1, 2, 3], [1, 4, 5], [2, 3, 5]] {
        assert!(signs(&[kp(&g, q[0]), kp(&g, q[1]), kp(&g, q[2])], pkp, 40));
    }
    // Below threshold: refused by the guardians.
    assert!(!signs(&[kp(&g, 1), kp(&g, 2)], pkp, 41));
}

#[test]
fn guardian_refuses_coordinator_digest_replays_and_tampered_commitments() {
    let g = dkg(2, 3, 23);
    let (k1, k2) = (kp(&g, 1), kp(&g, 2));
    let mut r = rng(24);
    let mine = msg(1);
    let mut g1 = Signer::new(8);
    let mut g2 = Signer::new(8);
    let (n1, n2) = (sign::preprocess(k1, &mut r), sign::preprocess(k2, &mut r));
    let (c1, c2) = (*n1.commitments(), *n2.commitments());
    g1.hand_out(n1, (), 0).unwrap();
    g2.hand_out(n2, (), 0).unwrap();
    // The coordinator asks g1 to sign another digest: refused, and the nonces are spent.
    let evil = sign::signing_package([(id(1), c1), (id(2), c2)].into(), &msg(2));
    let ((), nonces) = g1.take(&evil, &id(1)).unwrap();
    assert!(matches!(
        sign::round2(nonces, &sign::TweakedKey::new(k1), &evil, &mine).unwrap_err(),
        SignError::MessageMismatch { .. }
    ));
    let good = sign::signing_package([(id(1), c1), (id(2), c2)].into(), &mine);
    assert_eq!(
        g1.take(&good, &id(1)).map(|_| ()).unwrap_err(),
        SignError::UnknownCommitment
    );
    // Single use: g2 signs once; a second package naming the same nonces is refused.
    let ((), nonces) = g2.take(&good, &id(2)).unwrap();
    assert!(sign::round2(nonces, &sign::TweakedKey::new(k2), &good, &mine).is_ok());
    assert_eq!(
        g2.take(&good, &id(2)).map(|_| ()).unwrap_err(),
        SignError::UnknownCommitment
    );
    // A restarted guardian has no nonces: nothing handed out before signs.
    let mut restarted: Signer<()> = Signer::new(8);
    assert_eq!(
        restarted.take(&good, &id(2)).map(|_| ()).unwrap_err(),
        SignError::UnknownCommitment
    );
    // Commitments it never made, or none at all for it: refused.
    let forged = sign::preprocess(k2, &mut r);
    let unknown =
        sign::signing_package([(id(1), c1), (id(2), *forged.commitments())].into(), &mine);
    assert_eq!(
        g2.take(&unknown, &id(2)).map(|_| ()).unwrap_err(),
        SignError::UnknownCommitment
    );
    assert_eq!(
        g2.take(&sign::signing_package([(id(1), c1)].into(), &mine), &id(2))
            .map(|_| ())
            .unwrap_err(),
        SignError::MissingCommitment
    );

    // Tampered / missing commitment, too few signers, wrong key: each refused.
    let s = sign::preprocess(k1, &mut r);
    let other = *sign::preprocess(k1, &mut r).commitments();
    let c2 = *sign::preprocess(k2, &mut r).commitments();
    assert!(format!("{s:?}").contains("<redacted>"));
    let tampered = sign::signing_package([(id(1), other), (id(2), c2)].into(), &mine);
    assert_eq!(
        sign::round2(s, &sign::TweakedKey::new(k1), &tampered, &mine).unwrap_err(),
        SignError::CommitmentMismatch
    );
    let s = sign::preprocess(k1, &mut r);
    let without = sign::signing_package([(id(2), c2)].into(), &mine);
    assert_eq!(
        sign::round2(s, &sign::TweakedKey::new(k1), &without, &mine).unwrap_err(),
        SignError::MissingCommitment
    );
    let s = sign::preprocess(k1, &mut r);
    let alone = sign::signing_package([(id(1), *s.commitments())].into(), &mine);
    assert_eq!(
        sign::round2(s, &sign::TweakedKey::new(k1), &alone, &mine).unwrap_err(),
        SignError::TooFewSigners {
            signers: 1,
            threshold: 2
        }
    );
    let s = sign::preprocess(k1, &mut r);
    assert_eq!(
        sign::round2(s, &sign::TweakedKey::new(k2), &good, &mine).unwrap_err(),
        SignError::WrongSigner
    );
}

#[test]
fn coordinator_names_the_guardian_with_an_invalid_share() {
    let g = dkg(3, 5, 25);
    let pkp = g.public_key_package().unwrap();
    let mut r = rng(26);
    let m = msg(9);
    let signers = [1u16, 3, 4];
    let mut sessions = Vec::new();
    let mut commitments = BTreeMap::new();
    for i in signers {
        let s = sign::preprocess(kp(&g, i), &mut r);
        commitments.insert(id(i), *s.commitments());
        sessions.push((i, s));
    }
    let package = sign::signing_package(commitments.clone(), &m);
    let mut shares = BTreeMap::new();
    for (i, s) in sessions {
        shares.insert(
            id(i),
            sign::round2(s, &sign::TweakedKey::new(kp(&g, i)), &package, &m).unwrap(),
        );
    }
    assert!(sign::aggregate(&package, &shares, &sign::AggregationKey::new(pkp)).is_ok());
    // g3 sends a share from another session (a different nonce): named.
    let s = sign::preprocess(kp(&g, 3), &mut r);
    let mut other = commitments.clone();
    other.insert(id(3), *s.commitments());
    let other_pkg = sign::signing_package(other, &m);
    let wrong = sign::round2(s, &sign::TweakedKey::new(kp(&g, 3)), &other_pkg, &m).unwrap();
    let mut bad = shares.clone();
    bad.insert(id(3), wrong);
    assert_eq!(
        sign::aggregate(&package, &bad, &sign::AggregationKey::new(pkp)).unwrap_err(),
        AggregateError::InvalidShares {
            culprits: vec![id(3)]
        }
    );
}

#[test]
fn p2tr_key_path_spend_is_accepted_by_bitcoinconsensus() {
    for (t, n, quorum) in [(2u16, 3u16, vec![1u16, 3]), (3, 5, vec![2, 4, 5])] {
        let g = dkg(t, n, 27);
        let pkp = g.public_key_package().unwrap();
        let w = address::wallet(pkp.verifying_key(), "bc").unwrap();
        let spent = vec![
            TxOut {
                value: 150_000,
                script_pubkey: w.script_pubkey.to_vec(),
            },
            TxOut {
                value: 60_000,
                script_pubkey: w.script_pubkey.to_vec(),
            },
        ];
        let tx = Transaction {
            version: 2,
            lock_time: 0,
            inputs: vec![
                TxIn {
                    previous_output: OutPoint {
                        txid: [0x11; 32],
                        vout: 0,
                    },
                    sequence: 0xffff_fffd,
                },
                TxIn {
                    previous_output: OutPoint {
                        txid: [0x22; 32],
                        vout: 3,
                    },
                    sequence: 0xffff_fffd,
                },
            ],
            outputs: vec![
                TxOut {
                    value: 200_000,
                    script_pubkey: address::p2tr_script_pubkey(&[0x42; 32]).to_vec(),
                },
                TxOut {
                    value: 9_000,
                    script_pubkey: w.script_pubkey.to_vec(),
                },
            ],
        };
        let kps: Vec<_> = quorum.iter().map(|i| kp(&g, *i)).collect();
        let mut witnesses = Vec::new();
        for index in 0..tx.inputs.len() {
            // Each guardian recomputes the sighash from the approved transaction.
            let sighash = tx.sighash_default(index, &spent).unwrap();
            let sig = sim::run_signing(&kps, pkp, &sighash, &mut rng(index as u64)).unwrap();
            witnesses.push(vec![sig.signature().to_vec()]);
        }
        let raw = tx.serialize_with_witnesses(&witnesses).unwrap();
        let utxos: Vec<bitcoinconsensus::Utxo> = spent
            .iter()
            .map(|o| bitcoinconsensus::Utxo {
                script_pubkey: o.script_pubkey.as_ptr(),
                script_pubkey_len: o.script_pubkey.len() as u32,
                value: o.value as i64,
            })
            .collect();
        let flags = bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT;
        for (index, o) in spent.iter().enumerate() {
            bitcoinconsensus::verify_with_flags(
                &o.script_pubkey,
                o.value,
                &raw,
                Some(&utxos),
                index,
                flags,
            )
            .unwrap_or_else(|e| panic!("{t}-of-{n} input {index} rejected: {e:?}"));
        }
        // A signature over another digest is rejected by the node's rules.
        let mut forged = witnesses.clone();
        let other = sim::run_signing(&kps, pkp, &msg(3), &mut rng(99)).unwrap();
        forged[0] = vec![other.signature().to_vec()];
        let raw = tx.serialize_with_witnesses(&forged).unwrap();
        assert!(
            bitcoinconsensus::verify_with_flags(
                &spent[0].script_pubkey,
                spent[0].value,
                &raw,
                Some(&utxos),
                0,
                flags
            )
            .is_err()
        );
    }
}
