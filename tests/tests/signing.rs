//! Threshold signing over NATS on a real nats-server: a FROST 2-of-3 wallet from
//! a DKG among three guardians, an allowed transfer, its recorded transaction
//! signed by two guardians that each checked the trail themselves; the spend
//! verified by libbitcoinconsensus. Then a coordinator that misbehaves: every
//! guardian refuses what the trail does not justify, and a guardian that is
//! down is named and replaced.

use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::{EventType, IntakeReply, Payload};
use custos_tests::frost::{
    Frost, append_built, ask, ask_to_sign, built, frost_setup, history, preprocess, stage_of,
};
use custos_tests::*;
use custos_workers::signing::{SignReply, SignRequest, SignStep};
use custos_workers::trail::Trail;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guardians_sign_only_what_the_trail_justifies() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let policy = policy::default_policy().expect("default policy");
    let Frost {
        guardians,
        wallet,
        trigger,
        shutdown,
    } = frost_setup(&nats, &engine, "vault", policy).await;

    let destination = taproot_address("rltc", [9; 32]);
    let mut ids = Vec::new();
    for n in 0..4 {
        let body = json!({"requestId": format!("pay-{n}"), "wallet": "vault", "asset": "LTC",
            "destination": destination, "amount": "1.5", "initiator": "erp"});
        match submit_json(&engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => ids.push(workflow_id),
            other => panic!("{other:?}"),
        }
    }
    for id in &ids {
        assert!(
            eventually(Duration::from_secs(20), || async {
                stage_of(&nats, id).await == Stage::ReadyToSign
            })
            .await,
            "{id} allowed by policy"
        );
    }

    // A coordinator may not get a share for a transfer that is not built.
    let refused = ask_to_sign(&client, "g1", "vault", &ids[0], "early-1").await;
    assert!(
        matches!(&refused, SignReply::Refused { reason } if reason.contains("not built")),
        "{refused:?}"
    );

    // The honest path: built as approved, signed by two guardians.
    append_built(
        &engine,
        &nats,
        &ids[0],
        built(&wallet, &destination, 150_000_000, 1),
    )
    .await;
    // Built paying someone else: every guardian refuses it.
    let thief = taproot_address("rltc", [66; 32]);
    append_built(
        &engine,
        &nats,
        &ids[1],
        built(&wallet, &thief, 150_000_000, 2),
    )
    .await;
    // Built for the right destination but more money.
    append_built(
        &engine,
        &nats,
        &ids[2],
        built(&wallet, &destination, 250_000_000, 3),
    )
    .await;
    // Each guardian refuses both itself when asked directly (the honest
    // coordinator's own check stops them before it asks any).
    for id in [&ids[1], &ids[2]] {
        for g in ["g1", "g2", "g3"] {
            let reply = ask_to_sign(&client, g, "vault", id, &format!("direct-{g}")).await;
            assert!(
                matches!(&reply, SignReply::Refused { reason } if reason.contains("not the approved transfer")),
                "{g} on {id}: {reply:?}"
            );
        }
    }

    // A misbehaving coordinator on a built transfer: a package for a message the
    // guardian did not compute is refused, and its commitment is spent after.
    append_built(
        &engine,
        &nats,
        &ids[3],
        built(&wallet, &destination, 150_000_000, 4),
    )
    .await;
    let (id, mine) = preprocess(&client, "g2", "vault", 1).await;
    use custos_custody::frost::{Identifier, SigningPackage};
    let other = custos_custody::frost::round1::commit(
        // Any second signer's commitments make a well-formed package.
        &custos_custody::frost::keys::SigningShare::deserialize(&[7u8; 32]).expect("share"),
        &mut rand::rngs::OsRng,
    )
    .1;
    let other_id = Identifier::try_from(3u16).expect("id");
    let forged = SigningPackage::new([(id, mine[0]), (other_id, other)].into(), &[0xAB; 32]);
    let share = SignRequest::Sign {
        session_id: "rogue-1".into(),
        workflow_id: ids[3].clone(),
        packages: vec![forged.serialize().expect("package")],
    };
    let reply = ask(&client, "g2", &share).await;
    assert!(
        matches!(&reply, SignReply::Refused { reason } if reason.contains("not the sighash")),
        "{reply:?}"
    );
    let reply = ask(&client, "g2", &share).await;
    assert!(
        matches!(&reply, SignReply::Stale { reason } if reason.contains("spent")),
        "a refused package spent the nonces of its commitment: {reply:?}"
    );

    // g1 goes down with its heartbeat still fresh: the coordinator asks it,
    // names it when it does not answer, and signs with g2 and g3.
    let mut guardians = guardians;
    let g1 = guardians.remove(0);
    g1.stop().await;
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .expect("trail");
    let step = SignStep::new(client.clone(), trail).expect("sign step");
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        engine.ledger.clone(),
        step,
        shutdown.clone(),
    ));
    for (id, want) in [
        (&ids[0], Stage::Signed),
        (&ids[1], Stage::Failed),
        (&ids[2], Stage::Failed),
        (&ids[3], Stage::Signed),
    ] {
        assert!(
            eventually(Duration::from_secs(60), || async {
                stage_of(&nats, id).await == want
            })
            .await,
            "{id} ends {want:?}, is {:?}",
            stage_of(&nats, id).await
        );
    }
    let events = all_events(&js).await;
    let alerts: Vec<String> = events
        .iter()
        .filter_map(|(_, e)| match &e.payload {
            Payload::Alert { summary, .. } if e.event_type == EventType::AlertRaised => {
                Some(summary.clone())
            }
            _ => None,
        })
        .collect();
    assert!(
        alerts
            .iter()
            .any(|a| a.contains("guardian g1 excluded") && a.contains("unreachable")),
        "the silent guardian is named: {alerts:?}"
    );
    for (id, why) in [
        (&ids[1], "not the approved transfer"),
        (&ids[2], "not the approved transfer"),
    ] {
        let (t, _) = transfer::fold(&history(&nats, id).await).expect("folds");
        assert!(
            t.reason.as_deref().is_some_and(|r| r.contains(why)),
            "{id}: {:?}",
            t.reason
        );
    }

    // The signed spends are valid Bitcoin-family transactions.
    for id in [&ids[0], &ids[3]] {
        let (t, _) = transfer::fold(&history(&nats, id).await).expect("folds");
        let signed = t.signed.expect("signed");
        assert_eq!(signed.signers, vec!["g2".to_string(), "g3".to_string()]);
        let Some(UnsignedTransaction::Bitcoin { spent, .. }) = t.unsigned else {
            panic!("bitcoin transaction")
        };
        let raw = hex::decode(&signed.raw_tx).expect("hex");
        let scripts: Vec<Vec<u8>> = spent
            .iter()
            .map(|s| hex::decode(&s.script_pubkey).expect("hex"))
            .collect();
        let utxos: Vec<bitcoinconsensus::Utxo> = spent
            .iter()
            .zip(&scripts)
            .map(|(s, script)| bitcoinconsensus::Utxo {
                script_pubkey: script.as_ptr(),
                script_pubkey_len: script.len() as u32,
                value: s.value as i64,
            })
            .collect();
        for (i, s) in spent.iter().enumerate() {
            bitcoinconsensus::verify_with_flags(
                &scripts[i],
                s.value,
                &raw,
                Some(&utxos),
                i,
                bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT,
            )
            .unwrap_or_else(|e| panic!("{id} input {i}: {e:?}"));
        }
    }
    // A signed workflow gets no more signatures.
    let reply = ask_to_sign(&client, "g2", "vault", &ids[0], "late-1").await;
    assert!(
        matches!(&reply, SignReply::Refused { reason } if reason.contains("not built")),
        "{reply:?}"
    );

    trigger.trigger();
    drop(guardians);
    verify_stream(&js).await.expect("the trail verifies");
}

/// A policy time delay between approval and signing: the coordinator leaves a
/// built transfer alone until it passes (guardians would refuse before), then
/// the sweep signs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_time_delay_holds_signing_until_it_passes() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    // The default policy, with an 8-second delay on small transfers (far from
    // the moment the test looks, so a slow machine cannot blur the two).
    let text = policy::DEFAULT_POLICY_TOML.replacen(
        "amount = { at_most = \"1000\" }\noutcome = \"allow\"",
        "amount = { at_most = \"1000\" }\noutcome = \"allow\"\ndelay = \"8s\"",
        1,
    );
    assert_ne!(
        text,
        policy::DEFAULT_POLICY_TOML,
        "the rule to delay is found"
    );
    let delayed = policy::Policy::parse(&text).expect("policy parses");
    let Frost {
        guardians: _guardians,
        wallet,
        trigger,
        shutdown,
    } = frost_setup(&nats, &engine, "slow", delayed).await;
    let destination = taproot_address("rltc", [9; 32]);
    let body = json!({"requestId": "slow-1", "wallet": "slow", "asset": "LTC",
        "destination": destination, "amount": "1.5", "initiator": "erp"});
    let id = match submit_json(&engine.client, &body).await {
        IntakeReply::Accepted { workflow_id, .. } => workflow_id,
        other => panic!("{other:?}"),
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            stage_of(&nats, &id).await == Stage::ReadyToSign
        })
        .await,
        "allowed by policy"
    );
    append_built(
        &engine,
        &nats,
        &id,
        built(&wallet, &destination, 150_000_000, 9),
    )
    .await;
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .expect("trail");
    let step = SignStep::new(client.clone(), trail).expect("sign step");
    tokio::spawn(custos_workers::signing::sign_when_due(
        step.clone(),
        engine.ledger.clone(),
        Duration::from_millis(200),
        shutdown.clone(),
    ));
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        engine.ledger.clone(),
        step,
        shutdown.clone(),
    ));
    // Nothing to wait on: the point is that nothing happens in the meantime
    // (1.5 s into an 8 s delay).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stage_of(&nats, &id).await,
        Stage::Built,
        "not signed during the delay"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            stage_of(&nats, &id).await == Stage::Signed
        })
        .await,
        "signed once the delay passed"
    );
    trigger.trigger();
    verify_stream(&js).await.expect("the trail verifies");
}
