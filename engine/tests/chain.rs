//! Audit chain: sealed trails verify; every kind of tampering is found at the right
//! sequence with the right finding; checkpoints (external and embedded).

mod common;

use common::*;
use custos_engine::chain::{self, Break, BreakKind, ChainHash, Verifier, sign_checkpoint};
use custos_engine::ledger::{Ledger, Sealed};
use custos_schemas::{AggregateKind, Checkpoint, EventType, Outcome, Payload, Proposal, codec};
use proptest::prelude::*;

fn brk(seq: u64, kind: BreakKind) -> Result<chain::Verified, Break> {
    Err(Break { seq, kind })
}

/// Head of the chain after the event at `seq` (GENESIS for 0).
fn head_at(sealed: &[Sealed], seq: u64) -> ChainHash {
    if seq == 0 {
        ChainHash::GENESIS
    } else {
        sealed[seq as usize - 1].hash
    }
}

#[test]
fn sealed_chain_verifies() {
    let (ledger, sealed) = sample_chain(40);
    let trail = stored(&sealed);
    let v = verify(&trail).expect("an untouched trail verifies");
    assert_eq!(v.events, 40);
    assert_eq!(v.last_seq, 40);
    assert_eq!(v.head, ledger.head());
    assert_eq!(v.checkpoints, 0);
    // Sequences are 1..=n and every event links to the one before.
    for (i, s) in sealed.iter().enumerate() {
        assert_eq!(s.seq, i as u64 + 1);
        assert_eq!(s.prev_hash, head_at(&sealed, i as u64));
        assert_eq!(
            s.hash,
            chain::link(&s.prev_hash, s.seq, &s.subject, &s.body)
        );
    }
}

#[test]
fn empty_trail_verifies_to_genesis() {
    let v = verify(&[]).expect("empty trail");
    assert_eq!((v.events, v.last_seq, v.head), (0, 0, ChainHash::GENESIS));
}

#[test]
fn link_binds_every_input() {
    let prev = ChainHash([9; 32]);
    let base = chain::link(&prev, 5, "custos.evt.user.a.USER_CREATED", b"body");
    assert_ne!(
        base,
        chain::link(
            &ChainHash::GENESIS,
            5,
            "custos.evt.user.a.USER_CREATED",
            b"body"
        )
    );
    assert_ne!(
        base,
        chain::link(&prev, 6, "custos.evt.user.a.USER_CREATED", b"body")
    );
    assert_ne!(
        base,
        chain::link(&prev, 5, "custos.evt.user.b.USER_CREATED", b"body")
    );
    assert_ne!(
        base,
        chain::link(&prev, 5, "custos.evt.user.a.USER_CREATED", b"bodz")
    );
    // The subject length is hashed, so moving bytes between subject and body changes the hash.
    assert_ne!(
        chain::link(&prev, 5, "ab", b"c"),
        chain::link(&prev, 5, "a", b"bc"),
    );
    assert_eq!(
        base,
        chain::link(&prev, 5, "custos.evt.user.a.USER_CREATED", b"body")
    );
}

#[test]
fn chain_hash_hex_round_trip() {
    let h = ChainHash([0xab; 32]);
    assert_eq!(h.to_hex(), "ab".repeat(32));
    assert_eq!(ChainHash::from_hex(&h.to_hex()), Some(h));
    assert_eq!(ChainHash::from_hex("ab"), None);
    assert_eq!(ChainHash::from_hex(&"zz".repeat(32)), None);
    assert_eq!(ChainHash::from_hex(&"ab".repeat(33)), None);
}

#[test]
fn modified_body_byte_is_found_at_its_seq() {
    let (_, sealed) = sample_chain(20);
    for target in [0usize, 7, 19] {
        let mut trail = stored(&sealed);
        let mid = trail[target].body.len() / 2;
        trail[target].body[mid] ^= 0x01;
        assert_eq!(
            verify(&trail),
            brk(target as u64 + 1, BreakKind::Modified),
            "event {target}"
        );
    }
}

#[test]
fn modified_subject_is_found() {
    let (_, sealed) = sample_chain(10);
    let mut trail = stored(&sealed);
    trail[4].subject = trail[4].subject.replace("custos.evt", "custos.evx");
    assert_eq!(verify(&trail), brk(5, BreakKind::Modified));
}

#[test]
fn replaced_hash_header_is_found() {
    let (_, sealed) = sample_chain(10);
    let mut trail = stored(&sealed);
    trail[3].hash = Some(ChainHash([0x11; 32]).to_hex());
    assert_eq!(verify(&trail), brk(4, BreakKind::Modified));
}

#[test]
fn replaced_prev_hash_header_is_unlinked() {
    let (_, sealed) = sample_chain(10);
    let mut trail = stored(&sealed);
    trail[3].prev_hash = Some(ChainHash([0x22; 32]).to_hex());
    assert_eq!(verify(&trail), brk(4, BreakKind::Unlinked));
}

#[test]
fn deleted_event_is_missing() {
    let (_, sealed) = sample_chain(12);
    for deleted in [0usize, 5, 10] {
        let mut trail = stored(&sealed);
        trail.remove(deleted);
        assert_eq!(
            verify(&trail),
            brk(
                deleted as u64 + 2,
                BreakKind::Missing {
                    expected: deleted as u64 + 1
                }
            ),
            "deleted {deleted}"
        );
    }
}

#[test]
fn deleted_run_of_events_is_missing() {
    let (_, sealed) = sample_chain(12);
    let mut trail = stored(&sealed);
    trail.drain(3..7);
    assert_eq!(verify(&trail), brk(8, BreakKind::Missing { expected: 4 }));
    let msg = Break {
        seq: 8,
        kind: BreakKind::Missing { expected: 4 },
    }
    .to_string();
    assert!(msg.contains("4..7"), "{msg}");
}

#[test]
fn deleted_event_with_renumbered_tail_is_unlinked() {
    let (_, sealed) = sample_chain(12);
    let mut trail = stored(&sealed);
    trail.remove(5);
    for s in &mut trail[5..] {
        s.seq -= 1;
    }
    assert_eq!(verify(&trail), brk(6, BreakKind::Unlinked));
}

fn forged_body() -> (String, Vec<u8>) {
    // A perfectly plausible event, sealed by a rogue ledger.
    let mut rogue = Ledger::default();
    let sealed = rogue
        .seal(
            vec![simple(
                AggregateKind::User,
                "mallory",
                0,
                EventType::RoleAssigned,
            )],
            1,
        )
        .expect("seals");
    (sealed[0].subject.clone(), sealed[0].body.clone())
}

#[test]
fn inserted_event_over_the_right_head_is_found_at_the_next_event() {
    let (_, sealed) = sample_chain(12);
    let k = 6u64; // insert after the event at seq 6
    let (subject, body) = forged_body();
    let forged = Stored::forge(&head_at(&sealed, k), k + 1, &subject, body);
    // The forgery itself links correctly.
    assert!(chain::check_link(&head_at(&sealed, k), k, forged.link()).is_ok());

    // Kept numbering: the original seq 7 now follows the forged seq 7.
    let mut trail = stored(&sealed);
    trail.insert(k as usize, forged.clone());
    assert_eq!(
        verify(&trail),
        brk(k + 1, BreakKind::OutOfOrder { previous: k + 1 })
    );

    // Renumbered tail: the original seq 7 (now 8) no longer links.
    let mut trail = stored(&sealed);
    for s in &mut trail[k as usize..] {
        s.seq += 1;
    }
    trail.insert(k as usize, forged);
    assert_eq!(verify(&trail), brk(k + 2, BreakKind::Unlinked));
}

#[test]
fn inserted_event_with_rehashed_follower_is_still_unlinked_later() {
    // The forger also re-hashes the next event, but cannot re-hash the one after
    // without rewriting the rest of the trail.
    let (_, sealed) = sample_chain(12);
    let k = 4u64;
    let (subject, body) = forged_body();
    let forged = Stored::forge(&head_at(&sealed, k), k + 1, &subject, body);
    let forged_hash = ChainHash::from_hex(forged.hash.as_deref().unwrap_or_default()).expect("hex");
    let mut trail = stored(&sealed);
    for s in &mut trail[k as usize..] {
        s.seq += 1;
    }
    let next = &trail[k as usize];
    let rehashed = Stored::forge(
        &forged_hash,
        next.seq,
        &next.subject.clone(),
        next.body.clone(),
    );
    trail[k as usize] = rehashed;
    trail.insert(k as usize, forged);
    assert_eq!(verify(&trail), brk(k + 3, BreakKind::Unlinked));
}

#[test]
fn duplicated_event_is_out_of_order() {
    let (_, sealed) = sample_chain(8);
    let mut trail = stored(&sealed);
    let dup = trail[3].clone();
    trail.insert(4, dup);
    assert_eq!(
        verify(&trail),
        brk(4, BreakKind::OutOfOrder { previous: 4 })
    );
}

#[test]
fn reordered_events_are_found() {
    let (_, sealed) = sample_chain(10);
    // Whole messages swapped (sequences travel with them).
    let mut trail = stored(&sealed);
    trail.swap(3, 4);
    assert_eq!(verify(&trail), brk(5, BreakKind::Missing { expected: 4 }));

    // Contents swapped between two stream positions (sequences stay positional).
    let mut trail = stored(&sealed);
    let (a, b) = (trail[3].clone(), trail[4].clone());
    trail[3] = Stored { seq: a.seq, ..b };
    trail[4] = Stored {
        seq: a.seq + 1,
        ..a
    };
    assert_eq!(verify(&trail), brk(4, BreakKind::Unlinked));

    // Swap with a distant event.
    let mut trail = stored(&sealed);
    let (a, b) = (trail[1].clone(), trail[8].clone());
    trail[1] = Stored { seq: 2, ..b };
    trail[8] = Stored { seq: 9, ..a };
    assert_eq!(verify(&trail), brk(2, BreakKind::Unlinked));
}

#[test]
fn dropped_chain_headers_are_unchained() {
    let (_, sealed) = sample_chain(8);
    let cases: [(Option<String>, Option<String>); 4] = [
        (None, None),
        (None, Some(sealed[5].hash.to_hex())),
        (Some(sealed[5].prev_hash.to_hex()), None),
        (Some("not-hex".into()), Some(sealed[5].hash.to_hex())),
    ];
    for (prev, hash) in cases {
        let mut trail = stored(&sealed);
        trail[5].prev_hash = prev.clone();
        trail[5].hash = hash.clone();
        assert_eq!(
            verify(&trail),
            brk(6, BreakKind::Unchained),
            "{prev:?} {hash:?}"
        );
    }
}

#[test]
fn first_event_must_follow_genesis() {
    let (_, sealed) = sample_chain(3);
    let trail = stored(&sealed);
    // Starting mid-trail without the prefix is reported as missing events.
    assert_eq!(
        verify(&trail[1..]),
        brk(2, BreakKind::Missing { expected: 1 })
    );
    // Seq 0 is never valid.
    let bad = Stored {
        seq: 0,
        ..trail[0].clone()
    };
    assert_eq!(
        verify(&[bad]),
        brk(0, BreakKind::OutOfOrder { previous: 0 })
    );
}

#[test]
fn a_rewritten_chain_verifies_alone_but_not_against_a_checkpoint() {
    // Someone who can write the stream rewrites event 3 and re-hashes everything
    // after it: the chain alone is consistent, only a checkpoint exposes it.
    let (_, sealed) = sample_chain(10);
    let key = key(7);
    let cp = sign_checkpoint(&key, STREAM, 8, &sealed[7].hash);
    let mut trail = stored(&sealed);
    trail[2].body[10] ^= 0x40;
    let mut head = head_at(&sealed, 2);
    for s in &mut trail[2..] {
        let re = Stored::forge(&head, s.seq, &s.subject, s.body.clone());
        head = ChainHash::from_hex(re.hash.as_deref().unwrap_or_default()).expect("hex");
        *s = re;
    }
    assert!(verify(&trail).is_ok());
    let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
    v.expect_checkpoint(cp).expect("valid checkpoint");
    let err = verify_with(v, &trail).expect_err("rewrite detected");
    assert_eq!(err.seq, 8);
    assert!(matches!(err.kind, BreakKind::BadCheckpoint(_)), "{err:?}");
}

#[test]
fn external_checkpoint_is_verified_and_counted() {
    let (_, sealed) = sample_chain(10);
    let key = key(1);
    for at in [1u64, 7, 10] {
        let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
        v.expect_checkpoint(sign_checkpoint(&key, STREAM, at, &head_at(&sealed, at)))
            .expect("trusted");
        let ok = verify_with(v, &stored(&sealed)).expect("checkpoint matches");
        assert_eq!(ok.checkpoints, 1, "at {at}");
    }
    // Two checkpoints, same trail.
    let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
    v.expect_checkpoint(sign_checkpoint(&key, STREAM, 3, &head_at(&sealed, 3)))
        .expect("trusted");
    v.expect_checkpoint(sign_checkpoint(&key, STREAM, 9, &head_at(&sealed, 9)))
        .expect("trusted");
    assert_eq!(
        verify_with(v, &stored(&sealed)).map(|v| v.checkpoints),
        Ok(2)
    );
}

#[test]
fn truncation_after_an_external_checkpoint_is_found() {
    let (_, sealed) = sample_chain(10);
    let key = key(1);
    let cp = sign_checkpoint(&key, STREAM, 8, &head_at(&sealed, 8));
    for keep in [0usize, 5, 7] {
        let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
        v.expect_checkpoint(cp.clone()).expect("trusted");
        let trail = stored(&sealed[..keep]);
        for s in &trail {
            v.push(s.link()).expect("prefix is intact");
        }
        assert_eq!(
            v.finish(),
            brk(8, BreakKind::Truncated { last: keep as u64 }),
            "keep {keep}"
        );
    }
    // Exactly up to the checkpoint is fine.
    let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
    v.expect_checkpoint(cp).expect("trusted");
    assert!(verify_with(v, &stored(&sealed[..8])).is_ok());
    // With two pending checkpoints the earliest one is reported.
    let mut v = Verifier::new(STREAM, Vec::new());
    v.expect_checkpoint(sign_checkpoint(&key, STREAM, 9, &head_at(&sealed, 9)))
        .expect("ok");
    v.expect_checkpoint(sign_checkpoint(&key, STREAM, 6, &head_at(&sealed, 6)))
        .expect("ok");
    assert_eq!(
        verify_with(v, &stored(&sealed[..4])),
        brk(6, BreakKind::Truncated { last: 4 })
    );
}

#[test]
fn external_checkpoint_with_wrong_head_is_rejected_at_its_seq() {
    let (_, sealed) = sample_chain(10);
    let key = key(1);
    let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
    v.expect_checkpoint(sign_checkpoint(&key, STREAM, 6, &head_at(&sealed, 5)))
        .expect("signature is fine");
    let err = verify_with(v, &stored(&sealed)).expect_err("head differs");
    assert_eq!(err.seq, 6);
    assert!(
        matches!(&err.kind, BreakKind::BadCheckpoint(why) if why.contains(&head_at(&sealed, 6).to_hex())),
        "{err:?}"
    );
}

#[test]
fn external_checkpoint_from_an_untrusted_key_is_refused() {
    let (_, sealed) = sample_chain(4);
    let trusted = key(1);
    let rogue = key(2);
    let mut v = Verifier::new(STREAM, vec![trusted.verifying_key()]);
    let err = v
        .expect_checkpoint(sign_checkpoint(&rogue, STREAM, 3, &head_at(&sealed, 3)))
        .expect_err("untrusted");
    assert_eq!(err.seq, 3);
    assert!(
        matches!(&err.kind, BreakKind::BadCheckpoint(why) if why.contains("untrusted")),
        "{err:?}"
    );
    // Without trusted keys it is checked for consistency only, and accepted.
    let mut v = Verifier::new(STREAM, Vec::new());
    assert!(
        v.expect_checkpoint(sign_checkpoint(&rogue, STREAM, 3, &head_at(&sealed, 3)))
            .is_ok()
    );
    // Several trusted keys: any of them will do.
    let mut v = Verifier::new(STREAM, vec![trusted.verifying_key(), rogue.verifying_key()]);
    assert!(
        v.expect_checkpoint(sign_checkpoint(&rogue, STREAM, 3, &head_at(&sealed, 3)))
            .is_ok()
    );
}

#[test]
fn forged_checkpoint_signatures_are_refused() {
    let (_, sealed) = sample_chain(4);
    let key = key(1);
    let good = sign_checkpoint(&key, STREAM, 3, &head_at(&sealed, 3));
    let tampered: Vec<Checkpoint> = vec![
        // Moved to another sequence without re-signing.
        Checkpoint {
            sequence: 2,
            ..good.clone()
        },
        // Another head without re-signing.
        Checkpoint {
            head_hash: head_at(&sealed, 2).to_hex(),
            ..good.clone()
        },
        // Another stream without re-signing.
        Checkpoint {
            stream: "OTHER".into(),
            ..good.clone()
        },
        // Broken signature encodings.
        Checkpoint {
            signature: "00".repeat(64),
            ..good.clone()
        },
        Checkpoint {
            signature: "abc".into(),
            ..good.clone()
        },
        Checkpoint {
            public_key: "00".into(),
            ..good.clone()
        },
        Checkpoint {
            public_key: hex::encode(key_for_other_sig()),
            ..good.clone()
        },
    ];
    for cp in tampered {
        for trusted in [vec![], vec![key.verifying_key()]] {
            let mut v = Verifier::new(STREAM, trusted);
            let err = v.expect_checkpoint(cp.clone()).expect_err("refused");
            assert!(
                matches!(err.kind, BreakKind::BadCheckpoint(_)),
                "{cp:?}: {err:?}"
            );
            assert_eq!(err.seq, cp.sequence);
        }
    }
}

fn key_for_other_sig() -> [u8; 32] {
    *common::key(3).verifying_key().as_bytes()
}

/// Seals `before` simple events, an embedded checkpoint built by `make`, then `after` more.
fn chain_with_embedded(
    before: usize,
    after: usize,
    make: impl FnOnce(&Ledger) -> Proposal,
) -> (Ledger, Vec<Sealed>) {
    let mut ledger = Ledger::default();
    let mut sealed = Vec::new();
    for i in 0..before {
        let id = format!("u{}", i % 3);
        let p = simple(
            AggregateKind::User,
            &id,
            ledger.version(AggregateKind::User, &id),
            EventType::PermissionChanged,
        );
        sealed.extend(ledger.seal(vec![p], i as i64).expect("seals"));
    }
    let cp = make(&ledger);
    sealed.extend(ledger.seal(vec![cp], 100).expect("checkpoint seals"));
    for i in 0..after {
        let p = simple(
            AggregateKind::System,
            "ops",
            ledger.version(AggregateKind::System, "ops"),
            EventType::AlertRaised,
        );
        sealed.extend(ledger.seal(vec![p], 200 + i as i64).expect("seals"));
    }
    (ledger, sealed)
}

fn embedded(ledger: &Ledger, cp: Checkpoint) -> Proposal {
    checkpoint_proposal(STREAM, ledger.version(AggregateKind::Audit, STREAM), cp)
}

#[test]
fn embedded_checkpoint_verifies() {
    let key = key(5);
    for before in [0usize, 1, 6] {
        let (ledger, sealed) = chain_with_embedded(before, 3, |l| {
            embedded(l, sign_checkpoint(&key, STREAM, l.last_seq(), &l.head()))
        });
        assert!(sealed[before].subject.ends_with(".AUDIT_CHECKPOINT"));
        let trail = stored(&sealed);
        let ok = verify_with(Verifier::new(STREAM, vec![key.verifying_key()]), &trail)
            .expect("verifies");
        assert_eq!(ok.checkpoints, 1);
        assert_eq!(ok.events, before as u64 + 4);
        assert_eq!(ok.head, ledger.head());
        assert_eq!(verify(&trail).map(|v| v.checkpoints), Ok(1));
    }
}

#[test]
fn several_embedded_checkpoints_verify() {
    let key = key(5);
    let mut ledger = Ledger::default();
    let mut sealed = Vec::new();
    for round in 0..3 {
        for _ in 0..2 {
            let p = simple(
                AggregateKind::User,
                "u",
                ledger.version(AggregateKind::User, "u"),
                EventType::PasswordChanged,
            );
            sealed.extend(ledger.seal(vec![p], round).expect("seals"));
        }
        let cp = embedded(
            &ledger,
            sign_checkpoint(&key, STREAM, ledger.last_seq(), &ledger.head()),
        );
        sealed.extend(ledger.seal(vec![cp], round).expect("seals"));
    }
    let ok = verify_with(
        Verifier::new(STREAM, vec![key.verifying_key()]),
        &stored(&sealed),
    );
    assert_eq!(ok.map(|v| (v.checkpoints, v.events)), Ok((3, 9)));
}

#[test]
fn embedded_checkpoint_with_untrusted_key_is_rejected() {
    let trusted = key(5);
    let rogue = key(6);
    let (_, sealed) = chain_with_embedded(4, 2, |l| {
        embedded(l, sign_checkpoint(&rogue, STREAM, l.last_seq(), &l.head()))
    });
    let err = verify_with(
        Verifier::new(STREAM, vec![trusted.verifying_key()]),
        &stored(&sealed),
    )
    .expect_err("untrusted key");
    assert_eq!(err.seq, 5);
    assert!(
        matches!(&err.kind, BreakKind::BadCheckpoint(why) if why.contains("untrusted")),
        "{err:?}"
    );
    // Consistency-only verification accepts it.
    assert!(verify(&stored(&sealed)).is_ok());
}

#[test]
fn embedded_checkpoint_with_wrong_head_is_rejected() {
    let key = key(5);
    // Head of an earlier event.
    let (_, sealed) = chain_with_embedded(4, 2, |l| {
        embedded(
            l,
            sign_checkpoint(&key, STREAM, l.last_seq(), &ChainHash([3; 32])),
        )
    });
    let err = verify_with(
        Verifier::new(STREAM, vec![key.verifying_key()]),
        &stored(&sealed),
    )
    .expect_err("wrong head");
    assert_eq!(err.seq, 5);
    assert!(matches!(err.kind, BreakKind::BadCheckpoint(_)), "{err:?}");
}

type MakeProposal<'a> = dyn Fn(&Ledger) -> Proposal + 'a;

#[test]
fn embedded_checkpoint_with_wrong_sequence_stream_or_payload_is_rejected() {
    let key = key(5);
    let makers: Vec<Box<MakeProposal>> = vec![
        // Right head, claimed at the wrong sequence.
        Box::new(|l: &Ledger| {
            embedded(
                l,
                sign_checkpoint(&key, STREAM, l.last_seq() - 1, &l.head()),
            )
        }),
        // Another stream.
        Box::new(|l: &Ledger| {
            embedded(
                l,
                sign_checkpoint(&key, "OTHER_STREAM", l.last_seq(), &l.head()),
            )
        }),
        // Signature broken after signing.
        Box::new(|l: &Ledger| {
            let mut cp = sign_checkpoint(&key, STREAM, l.last_seq(), &l.head());
            cp.signature =
                sign_checkpoint(&key, STREAM, l.last_seq(), &ChainHash::GENESIS).signature;
            embedded(l, cp)
        }),
        // No checkpoint payload at all.
        Box::new(|l: &Ledger| {
            proposal(
                AggregateKind::Audit,
                STREAM,
                l.version(AggregateKind::Audit, STREAM),
                EventType::AuditCheckpoint,
                Outcome::Success,
                Payload::None,
            )
        }),
    ];
    for (i, make) in makers.iter().enumerate() {
        let (_, sealed) = chain_with_embedded(4, 1, make);
        for trusted in [vec![], vec![key.verifying_key()]] {
            let err = verify_with(Verifier::new(STREAM, trusted), &stored(&sealed))
                .expect_err("rejected");
            assert_eq!(err.seq, 5, "case {i}");
            assert!(
                matches!(err.kind, BreakKind::BadCheckpoint(_)),
                "case {i}: {err:?}"
            );
        }
    }
}

#[test]
fn break_messages_name_the_seq() {
    let cases = [
        BreakKind::Missing { expected: 3 },
        BreakKind::OutOfOrder { previous: 9 },
        BreakKind::Modified,
        BreakKind::Unlinked,
        BreakKind::Unchained,
        BreakKind::BadCheckpoint("why".into()),
        BreakKind::Truncated { last: 2 },
    ];
    for kind in cases {
        let msg = Break {
            seq: 9,
            kind: kind.clone(),
        }
        .to_string();
        assert!(msg.contains('9'), "{kind:?}: {msg}");
    }
}

/// Engine bug (chain.rs, `Verifier::expect_checkpoint`): an external checkpoint
/// that names another stream is accepted and counted for this one. The embedded
/// path checks `cp.stream`; the external one does not.
#[test]
fn external_checkpoint_for_another_stream_is_refused() {
    let (_, sealed) = sample_chain(6);
    let key = key(1);
    let mut v = Verifier::new(STREAM, vec![key.verifying_key()]);
    let res = v.expect_checkpoint(sign_checkpoint(
        &key,
        "OTHER_STREAM",
        4,
        &head_at(&sealed, 4),
    ));
    assert!(
        matches!(
            res,
            Err(Break {
                seq: 4,
                kind: BreakKind::BadCheckpoint(_)
            })
        ),
        "{res:?}"
    );
}

/// Engine bug (chain.rs, `check_embedded_checkpoint`: `cp.sequence + 1 != l.seq`):
/// a self-signed embedded checkpoint claiming sequence u64::MAX overflows and
/// panics in debug builds instead of being reported as a bad checkpoint.
#[test]
fn embedded_checkpoint_with_huge_sequence_is_rejected_not_panicking() {
    let key = key(5);
    let (_, sealed) = chain_with_embedded(2, 0, |l| {
        embedded(l, sign_checkpoint(&key, STREAM, u64::MAX, &l.head()))
    });
    let res = std::panic::catch_unwind(|| verify(&stored(&sealed)));
    let res = res.expect("verifier must not panic");
    assert!(
        matches!(
            res,
            Err(Break {
                seq: 3,
                kind: BreakKind::BadCheckpoint(_)
            })
        ),
        "{res:?}"
    );
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum Action {
    /// An event on an aggregate without a state machine.
    Generic {
        kind: usize,
        id: usize,
        event: usize,
        payload: usize,
        meta: Option<String>,
    },
    /// The next happy-path step of transfer `id` (or an alert when it is done).
    TxStep { id: usize },
    /// A wallet, created once.
    Wallet { id: usize },
    /// An embedded checkpoint of the head.
    Checkpoint,
}

const GENERIC_KINDS: [AggregateKind; 6] = [
    AggregateKind::User,
    AggregateKind::Policy,
    AggregateKind::Intake,
    AggregateKind::System,
    AggregateKind::Auth,
    AggregateKind::Wallet,
];

fn generic_types() -> Vec<EventType> {
    EventType::ALL
        .iter()
        .copied()
        .filter(|t| *t != EventType::AuditCheckpoint)
        .collect()
}

fn action() -> impl Strategy<Value = Action> {
    let n_types = generic_types().len();
    prop_oneof![
        4 => (0..GENERIC_KINDS.len(), 0..3usize, 0..n_types, 0..4usize, proptest::option::of("[a-z ]{0,12}"))
            .prop_map(|(kind, id, event, payload, meta)| Action::Generic { kind, id, event, payload, meta }),
        3 => (0..3usize).prop_map(|id| Action::TxStep { id }),
        1 => (0..3usize).prop_map(|id| Action::Wallet { id }),
        1 => Just(Action::Checkpoint),
    ]
}

/// Seals the actions in batches (sizes from `batches`, cycled) with the given clock
/// readings; returns the ledger and everything sealed.
fn build(actions: &[Action], batches: &[usize], clock: &[i64]) -> (Ledger, Vec<Sealed>) {
    let key = key(9);
    let types = generic_types();
    let mut ledger = Ledger::default();
    let mut all = Vec::new();
    let mut i = 0;
    let mut b = 0;
    while i < actions.len() {
        let size = batches[b % batches.len()].max(1);
        let now = clock[b % clock.len()];
        b += 1;
        // Versions as they will be once the batch's earlier proposals are sealed.
        let mut pending: std::collections::HashMap<(AggregateKind, String), u64> =
            Default::default();
        let mut version = |l: &Ledger, kind: AggregateKind, id: &str| {
            let v = pending
                .entry((kind, id.to_string()))
                .or_insert_with(|| l.version(kind, id));
            *v += 1;
            *v - 1
        };
        let mut batch = Vec::new();
        let end = (i + size).min(actions.len());
        for a in &actions[i..end] {
            let p = match a {
                Action::Generic {
                    kind,
                    id,
                    event,
                    payload,
                    meta,
                } => {
                    let kind = GENERIC_KINDS[*kind];
                    // Wallet aggregates are reserved for creations.
                    let id = format!(
                        "{}{id}",
                        if kind == AggregateKind::Wallet {
                            "notwallet"
                        } else {
                            "a"
                        }
                    );
                    let payload = match payload {
                        0 => Payload::None,
                        1 => Payload::Alert {
                            severity: "warn".into(),
                            summary: meta.clone().unwrap_or_default(),
                        },
                        2 => Payload::StepFailed {
                            step: "sign".into(),
                            reason: "x".into(),
                        },
                        _ => Payload::RequestRejected {
                            request_id: None,
                            field: meta.clone(),
                            reason: "r".into(),
                        },
                    };
                    let mut p = proposal(
                        kind,
                        &id,
                        version(&ledger, kind, &id),
                        types[*event],
                        Outcome::Success,
                        payload,
                    );
                    if let Some(m) = meta {
                        p.metadata.insert("note".into(), m.clone());
                    }
                    p
                }
                Action::TxStep { id } => {
                    let id = format!("tx-{id}");
                    let v = version(&ledger, AggregateKind::Tx, &id);
                    if v < 5 {
                        tx_step(&id, v)
                    } else {
                        let v = version(&ledger, AggregateKind::System, "done");
                        simple(AggregateKind::System, "done", v, EventType::AlertRaised)
                    }
                }
                Action::Wallet { id } => {
                    let name = format!("w{id}");
                    let v = version(&ledger, AggregateKind::Wallet, &name);
                    if v == 0 {
                        wallet_created(&name, "ltc-regtest", &rltc_address(*id as u8))
                    } else {
                        simple(AggregateKind::Wallet, &name, v, EventType::GuardianAdded)
                    }
                }
                Action::Checkpoint => {
                    // Only valid as the first proposal of a batch (it states the sealed head).
                    if batch.is_empty() {
                        let v = version(&ledger, AggregateKind::Audit, STREAM);
                        checkpoint_proposal(
                            STREAM,
                            v,
                            sign_checkpoint(&key, STREAM, ledger.last_seq(), &ledger.head()),
                        )
                    } else {
                        let v = version(&ledger, AggregateKind::System, "cp");
                        simple(AggregateKind::System, "cp", v, EventType::SettingsModified)
                    }
                }
            };
            batch.push(p);
        }
        let sealed = ledger.seal(batch, now).expect("valid proposals seal");
        assert_eq!(sealed.len(), end - i);
        all.extend(sealed);
        i = end;
    }
    (ledger, all)
}

fn chain_inputs() -> impl Strategy<Value = (Vec<Action>, Vec<usize>, Vec<i64>)> {
    (
        proptest::collection::vec(action(), 1..40),
        proptest::collection::vec(1..4usize, 1..5),
        proptest::collection::vec(-5i64..2_000_000_000_000, 1..5),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_proposals_make_a_verifiable_chain((actions, batches, clock) in chain_inputs()) {
        let (ledger, sealed) = build(&actions, &batches, &clock);
        let key = key(9);
        let ok = verify_with(Verifier::new(STREAM, vec![key.verifying_key()]), &stored(&sealed));
        prop_assert!(ok.is_ok(), "{:?}", ok);
        let ok = ok.unwrap_or_else(|_| unreachable!());
        prop_assert_eq!(ok.events, actions.len() as u64);
        prop_assert_eq!(ok.last_seq, ledger.last_seq());
        prop_assert_eq!(ok.head, ledger.head());
        let embedded = sealed.iter().filter(|s| s.event.event_type == EventType::AuditCheckpoint).count();
        prop_assert_eq!(ok.checkpoints, embedded as u64);
    }

    #[test]
    fn any_single_byte_change_breaks_at_that_event(
        (actions, batches, clock) in chain_inputs(),
        pick in any::<prop::sample::Index>(),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let (_, sealed) = build(&actions, &batches, &clock);
        let mut trail = stored(&sealed);
        let target = pick.index(trail.len());
        let at = pos.index(trail[target].body.len());
        trail[target].body[at] ^= flip;
        let seq = trail[target].seq;
        prop_assert_eq!(verify(&trail), brk(seq, BreakKind::Modified));
    }

    #[test]
    fn any_deleted_event_but_the_last_is_missing(
        (actions, batches, clock) in chain_inputs(),
        pick in any::<prop::sample::Index>(),
    ) {
        let (_, sealed) = build(&actions, &batches, &clock);
        prop_assume!(sealed.len() >= 2);
        let mut trail = stored(&sealed);
        let target = pick.index(trail.len() - 1);
        trail.remove(target);
        prop_assert_eq!(
            verify(&trail),
            brk(target as u64 + 2, BreakKind::Missing { expected: target as u64 + 1 })
        );
    }
}

#[test]
fn sealed_bodies_decode_to_their_events() {
    let (_, sealed) = sample_chain(12);
    for s in &sealed {
        let e: custos_schemas::Event = codec::from_msgpack(&s.body).expect("decodes");
        assert_eq!(e, s.event);
    }
}
