//! Fee bumps in the transfer state machine: a broadcast transfer takes a
//! replacement (Broadcast → Built → Signed → Broadcast), remembers what it
//! replaced, confirms by any of its transactions, and goes back to waiting
//! for the one on the network when a replacement is abandoned.

mod common;

use std::collections::BTreeMap;

use common::*;
use custos_engine::transfer::{self, Command, Stage, Transfer};
use custos_schemas::chain::{Confirmation, SignedTransaction, UnsignedTransaction};
use custos_schemas::{AggregateKind, Event, EventType, Outcome, Payload, SCHEMA_VERSION};

const NEW_TXID: &str = "5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf5eaf";

fn event(event_type: EventType, result: Outcome, version: u64, payload: Payload) -> Event {
    Event {
        schema_version: SCHEMA_VERSION,
        id: Event::message_id(AggregateKind::Tx, "tx-1", version),
        timestamp: 1_000 * version as i64,
        event_type,
        aggregate_kind: AggregateKind::Tx,
        workflow_id: "tx-1".into(),
        version,
        causation_id: None,
        actor: Default::default(),
        target: Default::default(),
        context: Default::default(),
        result,
        metadata: BTreeMap::new(),
        payload,
    }
}

fn apply(state: &Transfer, event_type: EventType, result: Outcome, payload: Payload) -> Transfer {
    let e = event(event_type, result, state.version + 1, payload);
    transfer::apply(state, &e)
        .unwrap_or_else(|err| panic!("{event_type:?}: {err}"))
        .0
}

fn refused(state: &Transfer, event_type: EventType, result: Outcome, payload: Payload) -> String {
    let e = event(event_type, result, state.version + 1, payload);
    transfer::apply(state, &e).expect_err("refused").to_string()
}

fn step(state: &Transfer, event_type: EventType, result: Outcome) -> Transfer {
    apply(
        state,
        event_type,
        result,
        step_payload("tx-1", event_type, result),
    )
}

fn broadcast() -> Transfer {
    let mut t = Transfer::default();
    for (e, o) in [
        (EventType::TransactionCreated, Outcome::Pending),
        (EventType::PolicyEvaluated, Outcome::Success),
        (EventType::TransactionBuilt, Outcome::Success),
        (EventType::TransactionSigned, Outcome::Success),
        (EventType::TransactionBroadcast, Outcome::Success),
    ] {
        t = step(&t, e, o);
    }
    assert_eq!(t.stage, Stage::Broadcast);
    t
}

fn bumped_tx() -> UnsignedTransaction {
    UnsignedTransaction::Bitcoin {
        chain: "ltc-regtest".into(),
        unsigned_tx: "02000000000000000001".into(),
        spent: Vec::new(),
        fee: 500,
        fee_rate: 5,
        change_vout: None,
    }
}

fn replacement(replaces: &str) -> Payload {
    Payload::TransactionReplacement {
        replaces: replaces.into(),
        unsigned: bumped_tx(),
    }
}

fn signed(txid: &str) -> Payload {
    Payload::TransactionSigned(SignedTransaction {
        chain: "ltc-regtest".into(),
        txid: txid.into(),
        raw_tx: "02".into(),
        signers: vec!["g1".into()],
    })
}

fn confirmed(txid: &str) -> Payload {
    Payload::TransactionConfirmed(Confirmation {
        chain: "ltc-regtest".into(),
        txid: txid.into(),
        block_hash: "cd".repeat(32),
        block_height: 103,
        confirmations: 1,
    })
}

fn replacing() -> Transfer {
    let t = broadcast();
    let (next, commands) = transfer::apply(
        &t,
        &event(
            EventType::TransactionBuilt,
            Outcome::Success,
            t.version + 1,
            replacement(TEST_TXID),
        ),
    )
    .expect("a replacement of the broadcast transaction");
    assert_eq!(commands, vec![Command::Sign]);
    next
}

#[test]
fn a_replacement_is_signed_and_broadcast_and_the_old_txid_is_remembered() {
    let before = broadcast();
    assert_eq!(before.waiting_since, Some(5_000));
    let t = replacing();
    assert_eq!(t.stage, Stage::Built);
    assert!(t.replacing());
    assert_eq!(t.unsigned, Some(bumped_tx()));
    assert_eq!(t.signed, None);
    assert_eq!(
        t.txid.as_deref(),
        Some(TEST_TXID),
        "still the one on the network"
    );
    let replaced = t.replaces().expect("what it replaces");
    assert_eq!(replaced.txid, TEST_TXID);
    assert_eq!(Some(&replaced.unsigned), before.unsigned.as_ref());
    assert_eq!(Some(&replaced.signed), before.signed.as_ref());

    let t = apply(
        &t,
        EventType::TransactionSigned,
        Outcome::Success,
        signed(NEW_TXID),
    );
    assert_eq!(t.stage, Stage::Signed);
    let t = apply(
        &t,
        EventType::TransactionBroadcast,
        Outcome::Success,
        Payload::TransactionBroadcast {
            chain: "ltc-regtest".into(),
            txid: NEW_TXID.into(),
        },
    );
    assert_eq!(t.stage, Stage::Broadcast);
    assert!(!t.replacing());
    assert_eq!(t.replaces(), None);
    assert_eq!(t.txid.as_deref(), Some(NEW_TXID));
    assert_eq!(t.waiting_since, Some(8_000));
    assert_eq!(
        t.candidate_txids().collect::<Vec<_>>(),
        [NEW_TXID, TEST_TXID]
    );
    // Either may be mined: the new one, or the old one a miner kept.
    for txid in [NEW_TXID, TEST_TXID] {
        let done = apply(
            &t,
            EventType::TransactionConfirmed,
            Outcome::Success,
            confirmed(txid),
        );
        assert_eq!(done.stage, Stage::Confirmed);
        assert_eq!(done.txid.as_deref(), Some(txid));
        assert_eq!(done.replaced.len(), 1);
    }
    let other = "77".repeat(32);
    assert!(
        refused(
            &t,
            EventType::TransactionConfirmed,
            Outcome::Success,
            confirmed(&other)
        )
        .contains("confirms another txid")
    );
    // A second bump replaces the new transaction, not the first.
    let again = apply(
        &t,
        EventType::TransactionBuilt,
        Outcome::Success,
        replacement(NEW_TXID),
    );
    assert_eq!(
        again
            .replaced
            .iter()
            .map(|r| r.txid.as_str())
            .collect::<Vec<_>>(),
        [TEST_TXID, NEW_TXID]
    );
}

#[test]
fn the_replaced_transaction_may_confirm_while_its_replacement_is_on_its_way() {
    for signed_first in [false, true] {
        let mut t = replacing();
        if signed_first {
            t = apply(
                &t,
                EventType::TransactionSigned,
                Outcome::Success,
                signed(NEW_TXID),
            );
        }
        // The replacement was never sent: only the replaced one can confirm.
        assert!(
            refused(
                &t,
                EventType::TransactionConfirmed,
                Outcome::Success,
                confirmed(NEW_TXID)
            )
            .contains("confirms another txid")
        );
        let done = apply(
            &t,
            EventType::TransactionConfirmed,
            Outcome::Success,
            confirmed(TEST_TXID),
        );
        assert_eq!(done.stage, Stage::Confirmed);
        assert_eq!(done.txid.as_deref(), Some(TEST_TXID));
    }
}

#[test]
fn an_abandoned_replacement_leaves_the_broadcast_transaction_waiting() {
    let before = broadcast();
    for signed_first in [false, true] {
        let mut t = replacing();
        if signed_first {
            t = apply(
                &t,
                EventType::TransactionSigned,
                Outcome::Success,
                signed(NEW_TXID),
            );
        }
        let failed = Payload::StepFailed {
            step: "signing".into(),
            reason: "the wallet is frozen".into(),
        };
        let e = event(
            EventType::TransactionFailed,
            Outcome::Failure,
            t.version + 1,
            failed,
        );
        let (back, commands) = transfer::apply(&t, &e).expect("abandoned");
        assert_eq!(commands, vec![Command::AwaitConfirmation]);
        assert_eq!(back.stage, Stage::Broadcast);
        assert_eq!(back.txid, before.txid);
        assert_eq!(back.unsigned, before.unsigned);
        assert_eq!(back.signed, before.signed);
        assert!(back.replaced.is_empty());
        assert_eq!(back.reason, None, "the transfer has not failed");
        assert_eq!(
            back.replacement_failed.as_deref(),
            Some("signing: the wallet is frozen")
        );
        assert_eq!(
            back.waiting_since,
            Some(e.timestamp),
            "the wait starts again"
        );
        // A failure of the broadcast transfer itself still ends it.
        let ended = step(&back, EventType::TransactionFailed, Outcome::Failure);
        assert_eq!(ended.stage, Stage::Failed);
    }
}

#[test]
fn replacements_are_refused_unless_they_replace_the_broadcast_transaction() {
    let t = broadcast();
    let other = "77".repeat(32);
    assert!(
        refused(
            &t,
            EventType::TransactionBuilt,
            Outcome::Success,
            replacement(&other)
        )
        .contains(&format!("it replaces {other}"))
    );
    // A plain build is not a replacement, nor is a replacement outcome other
    // than success.
    assert!(
        transfer::apply(
            &t,
            &event(
                EventType::TransactionBuilt,
                Outcome::Success,
                t.version + 1,
                Payload::TransactionBuilt(bumped_tx())
            )
        )
        .is_err()
    );
    assert!(
        transfer::apply(
            &t,
            &event(
                EventType::TransactionBuilt,
                Outcome::Pending,
                t.version + 1,
                replacement(TEST_TXID)
            )
        )
        .is_err()
    );
    // Before a broadcast there is nothing to replace.
    let mut ready = Transfer::default();
    for (e, o) in [
        (EventType::TransactionCreated, Outcome::Pending),
        (EventType::PolicyEvaluated, Outcome::Success),
    ] {
        ready = step(&ready, e, o);
    }
    assert!(
        refused(
            &ready,
            EventType::TransactionBuilt,
            Outcome::Success,
            replacement(TEST_TXID)
        )
        .contains("payload must be the unsigned transaction")
    );
    let built = step(&ready, EventType::TransactionBuilt, Outcome::Success);
    assert!(
        transfer::apply(
            &built,
            &event(
                EventType::TransactionBuilt,
                Outcome::Success,
                built.version + 1,
                replacement(TEST_TXID)
            )
        )
        .is_err()
    );
    // While one replacement is on its way, another is refused.
    let t = replacing();
    assert!(
        transfer::apply(
            &t,
            &event(
                EventType::TransactionBuilt,
                Outcome::Success,
                t.version + 1,
                replacement(TEST_TXID)
            )
        )
        .is_err()
    );
}
