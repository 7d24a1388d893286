//! Ledger: optimistic concurrency, all-or-nothing batches, versions, timestamps,
//! replay, and concurrent writers.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::*;
use custos_engine::chain::{self, ChainHash};
use custos_engine::ledger::{Ledger, ReplayError, SealError, Sealed};
use custos_engine::transfer::Stage;
use custos_schemas::{
    AggregateKind, Event, EventType, Outcome, Payload, SCHEMA_VERSION, codec, subjects,
};
use proptest::prelude::*;

fn seal_one(ledger: &mut Ledger, p: custos_schemas::Proposal, now: i64) -> Sealed {
    let mut s = ledger.seal(vec![p], now).expect("seals");
    assert_eq!(s.len(), 1);
    s.remove(0)
}

/// Everything observable about a ledger's state for the given aggregates and wallets.
fn snapshot(l: &Ledger, keys: &[(AggregateKind, &str)], wallets: &[&str]) -> String {
    let aggs: Vec<_> = keys
        .iter()
        .map(|(k, id)| l.aggregate(*k, id).cloned())
        .collect();
    let ws: Vec<_> = wallets.iter().map(|w| l.wallet(w).cloned()).collect();
    format!("{:?} {} {aggs:?} {ws:?}", l.head(), l.last_seq())
}

#[test]
fn fresh_ledger_is_at_genesis() {
    let l = Ledger::default();
    assert_eq!(l.head(), ChainHash::GENESIS);
    assert_eq!(l.last_seq(), 0);
    assert_eq!(l.version(AggregateKind::User, "x"), 0);
    assert!(l.aggregate(AggregateKind::User, "x").is_none());
    assert!(l.wallet("x").is_none());
}

#[test]
fn sealed_event_is_stamped_by_the_ledger() {
    let mut l = Ledger::default();
    let mut p = simple(AggregateKind::User, "alice", 0, EventType::UserCreated);
    p.causation_id = Some("req-1".into());
    p.metadata.insert("k".into(), "v".into());
    let s = seal_one(&mut l, p.clone(), 1234);
    assert_eq!(s.seq, 1);
    assert_eq!(s.subject, "custos.evt.user.alice.USER_CREATED");
    assert_eq!(
        s.subject,
        subjects::event_subject(AggregateKind::User, "alice", "USER_CREATED")
    );
    assert_eq!(s.msg_id, "user.alice.1");
    assert_eq!(s.prev_hash, ChainHash::GENESIS);
    assert_eq!(
        s.hash,
        chain::link(&ChainHash::GENESIS, 1, &s.subject, &s.body)
    );
    assert_eq!(s.body, codec::to_msgpack(&s.event));
    let e = &s.event;
    assert_eq!(e.schema_version, SCHEMA_VERSION);
    assert_eq!(e.id, "user.alice.1");
    assert_eq!(e.timestamp, 1234);
    assert_eq!(e.version, 1);
    assert_eq!(
        (e.aggregate_kind, e.workflow_id.as_str(), e.event_type),
        (AggregateKind::User, "alice", EventType::UserCreated)
    );
    assert_eq!(e.causation_id, p.causation_id);
    assert_eq!(e.metadata, p.metadata);
    assert_eq!(e.actor, p.actor);
    assert_eq!(e.target, p.target);
    assert_eq!(e.payload, p.payload);
    assert_eq!(l.head(), s.hash);
    assert_eq!(l.last_seq(), 1);
    let agg = l.aggregate(AggregateKind::User, "alice").expect("exists");
    assert_eq!(
        (agg.version, agg.last_event, agg.transfer.clone()),
        (1, Some(EventType::UserCreated), None)
    );
}

#[test]
fn wrong_expected_version_conflicts_and_seals_nothing() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::User, "alice", 0, EventType::UserCreated),
        10,
    );
    seal_one(
        &mut l,
        simple(AggregateKind::User, "alice", 1, EventType::RoleAssigned),
        11,
    );
    let keys = [(AggregateKind::User, "alice"), (AggregateKind::User, "bob")];
    let before = snapshot(&l, &keys, &[]);
    let (head, seq) = (l.head(), l.last_seq());
    for expected in [0u64, 1, 3, 100] {
        let err = l.seal(
            vec![simple(
                AggregateKind::User,
                "alice",
                expected,
                EventType::RoleAssigned,
            )],
            12,
        );
        assert_eq!(
            err,
            Err(SealError::Conflict {
                workflow_id: "alice".into(),
                expected,
                actual: 2
            })
        );
        assert_eq!((l.head(), l.last_seq()), (head, seq));
        assert_eq!(snapshot(&l, &keys, &[]), before);
    }
    // A new aggregate is at version 0.
    let err = l.seal(
        vec![simple(
            AggregateKind::User,
            "bob",
            1,
            EventType::UserCreated,
        )],
        12,
    );
    assert_eq!(
        err,
        Err(SealError::Conflict {
            workflow_id: "bob".into(),
            expected: 1,
            actual: 0
        })
    );
    assert_eq!(snapshot(&l, &keys, &[]), before);
    // The right version still goes through, at the next sequence.
    let s = seal_one(
        &mut l,
        simple(AggregateKind::User, "alice", 2, EventType::RoleAssigned),
        13,
    );
    assert_eq!((s.seq, s.event.version, s.prev_hash), (3, 3, head));
}

#[test]
fn versions_are_per_kind_and_id() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::User, "x", 0, EventType::UserCreated),
        1,
    );
    // Same id, other kind: independent.
    seal_one(
        &mut l,
        simple(AggregateKind::Policy, "x", 0, EventType::PolicyCreated),
        1,
    );
    seal_one(
        &mut l,
        simple(AggregateKind::User, "x", 1, EventType::RoleAssigned),
        1,
    );
    assert_eq!(l.version(AggregateKind::User, "x"), 2);
    assert_eq!(l.version(AggregateKind::Policy, "x"), 1);
    assert_eq!(l.version(AggregateKind::Auth, "x"), 0);
}

#[test]
fn batches_are_all_or_nothing() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::User, "alice", 0, EventType::UserCreated),
        10,
    );
    let keys = [
        (AggregateKind::User, "alice"),
        (AggregateKind::User, "carol"),
        (AggregateKind::Wallet, "w1"),
    ];
    let before = snapshot(&l, &keys, &["w1"]);
    let (head, seq) = (l.head(), l.last_seq());

    // The second proposal conflicts: the first (and its wallet) is not sealed either.
    let batch = vec![
        wallet_created("w1", "ltc-regtest", &rltc_address(1)),
        simple(AggregateKind::User, "carol", 0, EventType::UserCreated),
        simple(AggregateKind::User, "alice", 0, EventType::RoleAssigned),
    ];
    assert!(matches!(l.seal(batch, 20), Err(SealError::Conflict { .. })));
    assert_eq!(snapshot(&l, &keys, &["w1"]), before);
    assert!(l.wallet("w1").is_none());

    // A refused last proposal also discards the whole batch.
    let batch = vec![
        wallet_created("w1", "ltc-regtest", &rltc_address(1)),
        tx_created("tx-1"),
        tx_step("tx-1", 1),
        proposal(
            AggregateKind::Tx,
            "tx-1",
            2,
            EventType::TransactionConfirmed,
            Outcome::Success,
            Payload::None,
        ),
    ];
    assert!(matches!(l.seal(batch, 20), Err(SealError::Refused(_))));
    assert_eq!(snapshot(&l, &keys, &["w1"]), before);
    assert_eq!(l.version(AggregateKind::Tx, "tx-1"), 0);

    // An invalid workflow id is refused.
    let batch = vec![
        simple(AggregateKind::User, "carol", 0, EventType::UserCreated),
        simple(AggregateKind::User, "bad.id", 0, EventType::UserCreated),
    ];
    let err = l.seal(batch, 20);
    assert!(
        matches!(&err, Err(SealError::Refused(why)) if why.contains("workflowId")),
        "{err:?}"
    );
    assert_eq!(snapshot(&l, &keys, &["w1"]), before);

    // Nothing leaked into the timestamp either: the failed batches' clock reading
    // (20) was not kept, so a seal at 15 is stamped 15.
    let s = seal_one(
        &mut l,
        simple(AggregateKind::User, "carol", 0, EventType::UserCreated),
        15,
    );
    assert_eq!((s.seq, s.prev_hash, s.event.timestamp), (seq + 1, head, 15));
}

#[test]
fn failed_batch_leaves_timestamp_unchanged() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::User, "a", 0, EventType::UserCreated),
        100,
    );
    let bad = vec![simple(AggregateKind::User, "a", 0, EventType::UserCreated)];
    assert!(l.seal(bad, 5_000).is_err());
    let s = seal_one(
        &mut l,
        simple(AggregateKind::User, "a", 1, EventType::RoleAssigned),
        200,
    );
    assert_eq!(s.event.timestamp, 200);
}

#[test]
fn empty_batch_seals_nothing() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::User, "a", 0, EventType::UserCreated),
        100,
    );
    let (head, seq) = (l.head(), l.last_seq());
    assert_eq!(l.seal(Vec::new(), 200), Ok(Vec::new()));
    assert_eq!((l.head(), l.last_seq()), (head, seq));
}

#[test]
fn one_batch_can_advance_an_aggregate_several_times() {
    let mut l = Ledger::default();
    seal_one(
        &mut l,
        simple(AggregateKind::System, "other", 0, EventType::AlertRaised),
        1,
    );
    let head = l.head();
    let batch = vec![
        tx_created("tx-a"),
        simple(AggregateKind::User, "u", 0, EventType::UserCreated),
        tx_step("tx-a", 1),
        tx_step("tx-a", 2),
        simple(AggregateKind::User, "u", 1, EventType::RoleAssigned),
        tx_step("tx-a", 3),
    ];
    let sealed = l.seal(batch, 50).expect("seals");
    assert_eq!(
        sealed.iter().map(|s| s.seq).collect::<Vec<_>>(),
        vec![2, 3, 4, 5, 6, 7]
    );
    let tx_versions: Vec<u64> = sealed
        .iter()
        .filter(|s| s.event.aggregate_kind == AggregateKind::Tx)
        .map(|s| s.event.version)
        .collect();
    assert_eq!(tx_versions, vec![1, 2, 3, 4]);
    let user_versions: Vec<u64> = sealed
        .iter()
        .filter(|s| s.event.aggregate_kind == AggregateKind::User)
        .map(|s| s.event.version)
        .collect();
    assert_eq!(user_versions, vec![1, 2]);
    assert_eq!(sealed[5].msg_id, "tx.tx-a.4");
    // Each links to the one before; all share the batch's timestamp.
    let mut prev = head;
    for s in &sealed {
        assert_eq!(s.prev_hash, prev);
        assert_eq!(s.hash, chain::link(&prev, s.seq, &s.subject, &s.body));
        assert_eq!(s.event.timestamp, 50);
        prev = s.hash;
    }
    assert_eq!(l.head(), prev);
    let tx = l.aggregate(AggregateKind::Tx, "tx-a").expect("exists");
    assert_eq!(tx.version, 4);
    assert_eq!(tx.last_event, Some(EventType::TransactionSigned));
    assert_eq!(tx.first_seq, 2);
    assert_eq!(
        l.aggregate(AggregateKind::User, "u").map(|a| a.first_seq),
        Some(3)
    );
    assert_eq!(
        l.aggregate(AggregateKind::System, "other")
            .map(|a| a.first_seq),
        Some(1)
    );
    assert_eq!(
        tx.transfer.as_ref().map(|t| (t.stage, t.version)),
        Some((Stage::Signed, 4))
    );
}

#[test]
fn the_same_version_twice_in_a_batch_conflicts() {
    let mut l = Ledger::default();
    let batch = vec![
        simple(AggregateKind::User, "u", 0, EventType::UserCreated),
        simple(AggregateKind::User, "u", 0, EventType::RoleAssigned),
    ];
    assert_eq!(
        l.seal(batch, 1),
        Err(SealError::Conflict {
            workflow_id: "u".into(),
            expected: 0,
            actual: 1
        })
    );
    assert_eq!(l.last_seq(), 0);
    assert_eq!(l.version(AggregateKind::User, "u"), 0);
}

#[test]
fn timestamps_never_go_backwards() {
    let mut l = Ledger::default();
    let mut last = i64::MIN;
    let clock = [1_000i64, 500, 1_000, 2_000, -7, 1_999, 3_000, 0];
    for (i, now) in clock.into_iter().enumerate() {
        let s = seal_one(
            &mut l,
            simple(
                AggregateKind::User,
                "u",
                i as u64,
                EventType::SettingsModified,
            ),
            now,
        );
        assert!(
            s.event.timestamp >= last,
            "{} after {last}",
            s.event.timestamp
        );
        assert_eq!(s.event.timestamp, now.max(last));
        last = s.event.timestamp;
    }
    assert_eq!(last, 3_000);
}

/// A ledger with a bit of everything: users, wallets, a finished and an unfinished
/// transfer, a rejected one, an intake rejection and a checkpoint.
fn busy_ledger() -> (Ledger, Vec<Sealed>) {
    let mut l = Ledger::default();
    let mut all = Vec::new();
    let key = key(4);
    let mut push = |l: &mut Ledger, batch: Vec<custos_schemas::Proposal>, now: i64| {
        all.extend(l.seal(batch, now).expect("seals"));
    };
    push(
        &mut l,
        vec![
            wallet_created("ltc", "ltc-regtest", &rltc_address(1)),
            wallet_created(
                "eth",
                "evm-31337",
                "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            ),
        ],
        1_000,
    );
    push(
        &mut l,
        vec![simple(
            AggregateKind::User,
            "alice",
            0,
            EventType::UserCreated,
        )],
        900,
    );
    push(
        &mut l,
        vec![tx_created("tx-done"), tx_step("tx-done", 1)],
        2_000,
    );
    push(
        &mut l,
        vec![
            tx_step("tx-done", 2),
            tx_step("tx-done", 3),
            tx_step("tx-done", 4),
            tx_step("tx-done", 5),
        ],
        3_000,
    );
    push(&mut l, vec![tx_created("tx-open")], 3_500);
    let cp = checkpoint_proposal(
        STREAM,
        0,
        custos_engine::chain::sign_checkpoint(&key, STREAM, l.last_seq(), &l.head()),
    );
    push(&mut l, vec![cp], 3_600);
    let mut deny = proposal(
        AggregateKind::Tx,
        "tx-no",
        1,
        EventType::PolicyEvaluated,
        Outcome::Denied,
        Payload::None,
    );
    deny.metadata
        .insert("reason".into(), "over the limit".into());
    push(&mut l, vec![tx_created("tx-no"), deny], 4_000);
    let rej = proposal(
        AggregateKind::Intake,
        "req-9",
        0,
        EventType::RequestRejected,
        Outcome::Denied,
        Payload::RequestRejected {
            request_id: Some("req-9".into()),
            field: Some("amount".into()),
            reason: "r".into(),
        },
    );
    push(&mut l, vec![rej], 5_000);
    push(&mut l, vec![tx_step("tx-open", 1)], 4_500);
    (l, all)
}

const BUSY_KEYS: [(AggregateKind, &str); 9] = [
    (AggregateKind::Wallet, "ltc"),
    (AggregateKind::Wallet, "eth"),
    (AggregateKind::User, "alice"),
    (AggregateKind::Tx, "tx-done"),
    (AggregateKind::Tx, "tx-open"),
    (AggregateKind::Tx, "tx-no"),
    (AggregateKind::Audit, STREAM),
    (AggregateKind::Intake, "req-9"),
    (AggregateKind::User, "nobody"),
];

#[test]
fn replay_reproduces_the_ledger() {
    let (mut original, sealed) = busy_ledger();
    let mut replayed = Ledger::default();
    for s in stored(&sealed).iter() {
        replayed.replay(s.link()).expect("replays");
    }
    assert_eq!(replayed.head(), original.head());
    assert_eq!(replayed.last_seq(), original.last_seq());
    assert_eq!(replayed.last_seq(), sealed.len() as u64);
    assert_eq!(
        snapshot(&replayed, &BUSY_KEYS, &["ltc", "eth", "nope"]),
        snapshot(&original, &BUSY_KEYS, &["ltc", "eth", "nope"])
    );
    assert_eq!(
        replayed.wallet("eth").map(|w| w.chain.as_str()),
        Some("evm-31337")
    );
    for (k, id) in BUSY_KEYS {
        let first = sealed
            .iter()
            .find(|s| s.event.aggregate_kind == k && s.event.workflow_id == id)
            .map(|s| s.seq);
        assert_eq!(
            replayed.aggregate(k, id).map(|a| a.first_seq),
            first,
            "{k:?}.{id}"
        );
        assert_eq!(
            original.aggregate(k, id).map(|a| a.first_seq),
            first,
            "{k:?}.{id}"
        );
    }
    let done = replayed
        .aggregate(AggregateKind::Tx, "tx-done")
        .and_then(|a| a.transfer.clone())
        .expect("transfer");
    assert_eq!((done.stage, done.version), (Stage::Confirmed, 6));
    let no = replayed
        .aggregate(AggregateKind::Tx, "tx-no")
        .and_then(|a| a.transfer.clone())
        .expect("transfer");
    assert_eq!(
        (no.stage, no.reason.as_deref()),
        (Stage::Rejected, Some("over the limit"))
    );

    // Both continue identically, including the timestamp floor (5_000).
    let next = || {
        vec![
            tx_step("tx-open", 2),
            simple(AggregateKind::User, "alice", 1, EventType::Logout),
        ]
    };
    let a = original.seal(next(), 10).expect("seals");
    let b = replayed.seal(next(), 10).expect("seals");
    assert_eq!(a, b);
    assert_eq!(a[0].event.timestamp, 5_000);
    // And both refuse what the replayed state forbids.
    let forbidden = || {
        vec![proposal(
            AggregateKind::Tx,
            "tx-done",
            6,
            EventType::TransactionFailed,
            Outcome::Failure,
            Payload::None,
        )]
    };
    assert!(matches!(
        original.seal(forbidden(), 10),
        Err(SealError::Refused(_))
    ));
    assert!(matches!(
        replayed.seal(forbidden(), 10),
        Err(SealError::Refused(_))
    ));
}

#[test]
fn replay_refuses_a_tampered_trail_and_keeps_its_state() {
    let (_, sealed) = busy_ledger();
    let n = sealed.len();
    type Tamper = fn(&mut Vec<Stored>);
    let cases: [(&str, usize, Tamper); 5] = [
        ("body byte", 4, |t| t[4].body[20] ^= 0x80),
        ("deleted", 4, |t| {
            t.remove(4);
        }),
        ("unchained", 4, |t| t[4].hash = None),
        ("prev header", 4, |t| {
            t[4].prev_hash = Some(ChainHash([1; 32]).to_hex())
        }),
        ("swapped", 4, |t| t.swap(4, 5)),
    ];
    for (name, at, tamper) in cases {
        let mut trail = stored(&sealed);
        tamper(&mut trail);
        let mut l = Ledger::default();
        let mut err = None;
        for s in &trail {
            if let Err(e) = l.replay(s.link()) {
                err = Some(e);
                break;
            }
        }
        let err = err.unwrap_or_else(|| panic!("{name}: tampered trail replayed"));
        assert!(
            err.seq == at as u64 + 1 || err.seq == at as u64 + 2,
            "{name}: {err}"
        );
        // The ledger stays where the intact prefix left it.
        assert_eq!(l.last_seq(), at as u64, "{name}");
        assert_eq!(l.head(), sealed[at - 1].hash, "{name}");
        assert!(n > at);
    }
}

#[test]
fn replay_refuses_a_correctly_linked_but_forbidden_event() {
    let (mut l, _) = busy_ledger();
    // A rogue writer appends a transition the machine forbids, with valid hashes.
    let seq = l.last_seq() + 1;
    let mut event: Event = Event {
        schema_version: SCHEMA_VERSION,
        id: Event::message_id(AggregateKind::Tx, "tx-done", 7),
        timestamp: 9_000,
        event_type: EventType::TransactionBroadcast,
        aggregate_kind: AggregateKind::Tx,
        workflow_id: "tx-done".into(),
        version: 7,
        causation_id: None,
        actor: Default::default(),
        target: Default::default(),
        context: Default::default(),
        result: Outcome::Success,
        metadata: BTreeMap::new(),
        payload: Payload::None,
    };
    let subject = subjects::event_subject(AggregateKind::Tx, "tx-done", "TRANSACTION_BROADCAST");
    let forged = Stored::forge(&l.head(), seq, &subject, codec::to_msgpack(&event));
    let (head, last) = (l.head(), l.last_seq());
    let err = l.replay(forged.link()).expect_err("forbidden transition");
    assert_eq!(err.seq, seq);
    assert!(err.reason.contains("TRANSACTION_BROADCAST"), "{err}");
    assert_eq!((l.head(), l.last_seq()), (head, last));

    // A version gap is refused too.
    event.event_type = EventType::UserCreated;
    event.aggregate_kind = AggregateKind::User;
    event.workflow_id = "alice".into();
    event.version = 5;
    let forged = Stored::forge(
        &l.head(),
        seq,
        "custos.evt.user.alice.USER_CREATED",
        codec::to_msgpack(&event),
    );
    let err = l.replay(forged.link()).expect_err("version gap");
    assert!(err.reason.contains("version"), "{err}");

    // Undecodable bytes with a valid link.
    let forged = Stored::forge(
        &l.head(),
        seq,
        "custos.evt.user.alice.USER_CREATED",
        b"\xc1nope".to_vec(),
    );
    let err = l.replay(forged.link()).expect_err("undecodable");
    assert_eq!(
        err,
        ReplayError {
            seq,
            reason: err.reason.clone()
        }
    );
    assert!(err.reason.contains("undecodable"), "{err}");
    assert_eq!((l.head(), l.last_seq()), (head, last));

    // A wallet created outside its own aggregate.
    event.version = 2;
    event.payload = Payload::WalletCreated(custos_schemas::WalletDescriptor {
        name: "evil".into(),
        model: "hd".into(),
        chain: "ltc-regtest".into(),
        address: rltc_address(6),
        threshold: None,
        guardians: Vec::new(),
        group_key: None,
        transcript: None,
    });
    let forged = Stored::forge(
        &l.head(),
        seq,
        "custos.evt.user.alice.USER_CREATED",
        codec::to_msgpack(&event),
    );
    assert!(l.replay(forged.link()).is_err());
    assert!(l.wallet("evil").is_none());
}

#[test]
fn wallets_are_created_once_in_their_own_aggregate() {
    let mut l = Ledger::default();
    let s = seal_one(
        &mut l,
        wallet_created("w1", "ltc-regtest", &rltc_address(1)),
        1,
    );
    assert_eq!(s.subject, "custos.evt.wallet.w1.WALLET_CREATED");
    assert_eq!(
        l.wallet("w1").map(|w| (w.model.as_str(), w.chain.as_str())),
        Some(("frost", "ltc-regtest"))
    );
    // Again: the aggregate is at version 1.
    let mut again = wallet_created(
        "w1",
        "evm-31337",
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    );
    assert!(matches!(
        l.seal(vec![again.clone()], 2),
        Err(SealError::Conflict { .. })
    ));
    again.expected_version = 1;
    assert!(matches!(l.seal(vec![again], 2), Err(SealError::Refused(_))));
    assert_eq!(
        l.wallet("w1").map(|w| w.chain.as_str()),
        Some("ltc-regtest")
    );
    // Under another name than the aggregate's.
    let mut other = wallet_created("w2", "ltc-regtest", &rltc_address(2));
    other.workflow_id = "w3".into();
    assert!(matches!(
        l.seal(vec![other.clone()], 2),
        Err(SealError::Refused(_))
    ));
    // Under another aggregate kind.
    other.workflow_id = "w2".into();
    other.aggregate_kind = AggregateKind::User;
    assert!(matches!(l.seal(vec![other], 2), Err(SealError::Refused(_))));
    assert!(l.wallet("w2").is_none() && l.wallet("w3").is_none());
    assert_eq!(l.last_seq(), 1);
}

// ---- concurrent writers ----

const AGGS: [(AggregateKind, &str); 5] = [
    (AggregateKind::User, "u1"),
    (AggregateKind::User, "u2"),
    (AggregateKind::Policy, "u1"),
    (AggregateKind::System, "s"),
    (AggregateKind::Auth, "a"),
];

#[derive(Debug, Clone)]
enum Step {
    /// The writer reads the current version of an aggregate.
    Refresh { writer: usize, agg: usize },
    /// The writer proposes against the version it saw (one or two aggregates at once).
    Propose { writer: usize, aggs: Vec<usize> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (0..4usize, 0..AGGS.len()).prop_map(|(writer, agg)| Step::Refresh { writer, agg }),
        3 => (0..4usize, proptest::collection::vec(0..AGGS.len(), 1..3)).prop_map(|(writer, aggs)| Step::Propose { writer, aggs }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn concurrent_writers_never_fork_an_aggregate(steps in proptest::collection::vec(step(), 1..120)) {
        let mut l = Ledger::default();
        let mut seen: Vec<HashMap<usize, u64>> = vec![HashMap::new(); 4];
        let mut all: Vec<Sealed> = Vec::new();
        for (t, s) in steps.iter().enumerate() {
            match s {
                Step::Refresh { writer, agg } => {
                    let (k, id) = AGGS[*agg];
                    seen[*writer].insert(*agg, l.version(k, id));
                }
                Step::Propose { writer, aggs } => {
                    // Versions the writer believes in, counting its own batch.
                    let mut mine = seen[*writer].clone();
                    let mut batch = Vec::new();
                    for a in aggs {
                        let (k, id) = AGGS[*a];
                        let v = mine.entry(*a).or_insert(0);
                        batch.push(simple(k, id, *v, EventType::SettingsModified));
                        *v += 1;
                    }
                    let up_to_date = aggs.iter().all(|a| {
                        let (k, id) = AGGS[*a];
                        seen[*writer].get(a).copied().unwrap_or(0) == l.version(k, id)
                    });
                    let (head, last) = (l.head(), l.last_seq());
                    match l.seal(batch, t as i64) {
                        Ok(sealed) => {
                            prop_assert!(up_to_date, "sealed against a stale view");
                            prop_assert_eq!(sealed.len(), aggs.len());
                            seen[*writer] = mine;
                            all.extend(sealed);
                        }
                        Err(SealError::Conflict { workflow_id, expected, actual }) => {
                            prop_assert!(!up_to_date, "conflict on an up-to-date view");
                            prop_assert!(expected != actual);
                            prop_assert_eq!((l.head(), l.last_seq()), (head, last));
                            // The writer learns the version it raced against.
                            for a in aggs {
                                let (k, id) = AGGS[*a];
                                if id == workflow_id {
                                    seen[*writer].insert(*a, l.version(k, id));
                                }
                            }
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
            }
        }
        let mut pairs = HashSet::new();
        let mut by_agg: HashMap<(AggregateKind, String), Vec<u64>> = HashMap::new();
        for s in &all {
            prop_assert!(pairs.insert((s.event.aggregate_kind, s.event.workflow_id.clone(), s.event.version)), "duplicate version");
            by_agg.entry((s.event.aggregate_kind, s.event.workflow_id.clone())).or_default().push(s.event.version);
        }
        for ((k, id), versions) in &by_agg {
            let n = versions.len() as u64;
            prop_assert_eq!(versions, &(1..=n).collect::<Vec<_>>(), "{:?}.{}", k, id);
            prop_assert_eq!(l.version(*k, id), n);
        }
        for (i, s) in all.iter().enumerate() {
            prop_assert_eq!(s.seq, i as u64 + 1);
        }
        prop_assert!(verify(&stored(&all)).is_ok());
    }
}

/// Gap (ledger.rs, `Ledger::replay`): the subject an event is stored under is hashed
/// but never compared with the event it carries, so a correctly linked event filed
/// under another aggregate's subject (here a USER_CREATED for `alice` filed as
/// `tx.tx-open.TRANSACTION_CONFIRMED`) is replayed without complaint. Subject-filtered
/// consumers, and the verifier's subject-based checkpoint detection, see a different
/// event than the ledger.
#[test]
fn replay_refuses_an_event_filed_under_another_subject() {
    let (_, sealed) = busy_ledger();
    let mut l = Ledger::default();
    for s in stored(&sealed) {
        l.replay(s.link()).expect("replays");
    }
    let mut next = Ledger::default();
    let body = next
        .seal(
            vec![simple(
                AggregateKind::User,
                "zed",
                0,
                EventType::UserCreated,
            )],
            1,
        )
        .expect("seals")
        .remove(0)
        .body;
    let subject = subjects::event_subject(AggregateKind::Tx, "tx-open", "TRANSACTION_CONFIRMED");
    let forged = Stored::forge(&l.head(), l.last_seq() + 1, &subject, body);
    assert!(l.replay(forged.link()).is_err());
}
