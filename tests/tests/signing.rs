//! Threshold signing over NATS on a real nats-server: a FROST 2-of-3 wallet from
//! a DKG among three guardians, an allowed transfer, its recorded transaction
//! signed by two guardians that each checked the trail themselves; the spend
//! verified by libbitcoinconsensus. Then a coordinator that misbehaves: every
//! guardian refuses what the trail does not justify, and a guardian that is
//! down is named and replaced.

use std::path::PathBuf;
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_custody::spend::{self, FeePolicy, SpendRequest};
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::chain::{SpentOutput, UnsignedTransaction};
use custos_schemas::{
    Actor, AggregateKind, Event, EventType, IntakeReply, Outcome, Payload, Proposal,
    RequestContext, Target, UserRecord, WalletDescriptor, codec, subjects,
};
use custos_tests::*;
use custos_workers::guardian::GuardianConfig;
use custos_workers::policy_step::{PolicyStep, PriceTable};
use custos_workers::signing::{SignReply, SignRequest, SignStep, wallet_script};
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use serde_json::json;
use zeroize::Zeroizing;

fn record(kind: AggregateKind, id: &str, event_type: EventType, payload: Payload) -> Proposal {
    Proposal {
        aggregate_kind: kind,
        workflow_id: id.into(),
        expected_version: 0,
        event_type,
        causation_id: None,
        actor: Actor::system("test"),
        target: Target::default(),
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload,
    }
}

struct Guardian {
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), custos_workers::guardian::GuardianError>>,
    _dir: tempfile::TempDir,
}

fn start_guardian(client: async_nats::Client, id: &str) -> Guardian {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = GuardianConfig {
        id: id.into(),
        data_dir: PathBuf::from(dir.path()),
        passphrase: Zeroizing::new(format!("passphrase of {id}")),
    };
    let (trigger, shutdown) = Shutdown::new();
    let task = tokio::spawn(custos_workers::guardian::run(client, config, shutdown));
    Guardian {
        trigger,
        task,
        _dir: dir,
    }
}

async fn history(nats: &Nats, workflow_id: &str) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == workflow_id)
        .collect()
}

async fn stage_of(nats: &Nats, workflow_id: &str) -> Stage {
    transfer::fold(&history(nats, workflow_id).await)
        .map(|(t, _)| t.stage)
        .unwrap_or(Stage::New)
}

async fn ask(client: &async_nats::Client, guardian: &str, request: &SignRequest) -> SignReply {
    let msg = client
        .request(
            subjects::guardian_subject(guardian, "sign"),
            codec::to_msgpack(request).into(),
        )
        .await
        .expect("guardian answers");
    codec::from_msgpack(&msg.payload).expect("a sign reply")
}

/// An unsigned transaction of `wallet` paying `amount` satoshi to `destination`
/// from one (made-up) 5 LTC output of the wallet.
fn built(wallet: &WalletDescriptor, destination: &str, amount: u64, seed: u8) -> Payload {
    let script = wallet_script(wallet).expect("wallet script");
    let utxo = SpentOutput {
        txid: hex::encode([seed; 32]),
        vout: 1,
        value: 500_000_000,
        script_pubkey: hex::encode(&script),
    };
    let dest = spend::script_pubkey_for_address(&wallet.chain, destination).expect("address");
    let unsigned = spend::build_spend(&SpendRequest {
        chain: &wallet.chain,
        wallet_script: &script,
        utxos: &[utxo],
        destination: &dest,
        amount,
        fee_rate: Some(2),
        fees: FeePolicy::for_chain(&wallet.chain).expect("fees"),
    })
    .expect("builds");
    Payload::TransactionBuilt(unsigned)
}

async fn append_built(engine: &Engine, nats: &Nats, workflow_id: &str, payload: Payload) {
    let version = history(nats, workflow_id).await.len() as u64;
    let mut p = record(
        AggregateKind::Tx,
        workflow_id,
        EventType::TransactionBuilt,
        payload,
    );
    p.expected_version = version;
    append_ok(&engine.ledger, vec![p]).await;
}

/// What the signing tests start from.
struct Frost {
    guardians: Vec<Guardian>,
    wallet: WalletDescriptor,
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
}

/// Three in-process guardians, a FROST 2-of-3 wallet `name` from their DKG,
/// `policy` recorded as active, the initiator `erp`, and the policy step
/// (LTC at EUR 80) running until `trigger`.
async fn frost_setup(nats: &Nats, engine: &Engine, name: &str, policy: policy::Policy) -> Frost {
    let client = nats.client().await;
    let js = nats.js().await;
    let guardians: Vec<Guardian> = ["g1", "g2", "g3"]
        .iter()
        .map(|id| start_guardian(client.clone(), id))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
                return false;
            };
            let mut n = 0;
            for id in ["g1", "g2", "g3"] {
                n += usize::from(matches!(kv.get(id).await, Ok(Some(_))));
            }
            n == 3
        })
        .await,
        "guardians announce themselves"
    );
    let wallet = custos_tests::ceremonies::approved_ceremony(
        nats,
        engine,
        custos_schemas::change::Change::WalletCreate {
            name: name.into(),
            model: "frost".into(),
            chain: "ltc-regtest".into(),
            threshold: 2,
            guardians: vec!["g1".into(), "g2".into(), "g3".into()],
        },
    )
    .await
    .expect("wallet created");
    append_ok(
        &engine.ledger,
        vec![
            record(
                AggregateKind::Policy,
                "active",
                EventType::PolicyCreated,
                Payload::PolicyActivated {
                    name: policy.name.clone(),
                    version: policy.version().to_string(),
                },
            ),
            record(
                AggregateKind::User,
                "erp",
                EventType::UserCreated,
                Payload::UserCreated(UserRecord {
                    id: "erp".into(),
                    name: "ERP".into(),
                    email: "erp@example.com".into(),
                    slack_user_id: None,
                    roles: vec!["initiator".into()],
                    groups: vec![],
                    mfa_enrolled: false,
                }),
            ),
        ],
    )
    .await;
    let mut prices = PriceTable::default();
    prices
        .quotes
        .entry("LTC".into())
        .or_default()
        .insert("EUR".into(), "80".into());
    let (trigger, shutdown) = Shutdown::new();
    let policy_step = PolicyStep::new(js.clone(), policy, prices)
        .await
        .expect("policy step");
    tokio::spawn(custos_workers::runtime::run(
        js,
        engine.ledger.clone(),
        policy_step,
        shutdown.clone(),
    ));
    Frost {
        guardians,
        wallet,
        trigger,
        shutdown,
    }
}

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

    // A coordinator may not get a commitment for a transfer that is not built.
    let refused = ask(
        &client,
        "g1",
        &SignRequest::Commit {
            session_id: "early-1".into(),
            workflow_id: ids[0].clone(),
        },
    )
    .await;
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

    // A misbehaving coordinator on a built transfer: a package for a message the
    // guardian did not compute is refused, and the session is gone after.
    append_built(
        &engine,
        &nats,
        &ids[3],
        built(&wallet, &destination, 150_000_000, 4),
    )
    .await;
    let committed = ask(
        &client,
        "g2",
        &SignRequest::Commit {
            session_id: "rogue-1".into(),
            workflow_id: ids[3].clone(),
        },
    )
    .await;
    let SignReply::Committed {
        identifier,
        commitments,
        ..
    } = committed
    else {
        panic!("{committed:?}")
    };
    use custos_custody::frost::{Identifier, SigningPackage, round1::SigningCommitments};
    let id = Identifier::deserialize(&identifier).expect("identifier");
    let mine = SigningCommitments::deserialize(&commitments[0]).expect("commitments");
    let other = custos_custody::frost::round1::commit(
        // Any second signer's commitments make a well-formed package.
        &custos_custody::frost::keys::SigningShare::deserialize(&[7u8; 32]).expect("share"),
        &mut rand::rngs::OsRng,
    )
    .1;
    let other_id = Identifier::try_from(3u16).expect("id");
    let forged = SigningPackage::new([(id, mine), (other_id, other)].into(), &[0xAB; 32]);
    let share = SignRequest::Share {
        session_id: "rogue-1".into(),
        packages: vec![forged.serialize().expect("package")],
    };
    let reply = ask(&client, "g2", &share).await;
    assert!(
        matches!(&reply, SignReply::Refused { reason } if reason.contains("not the sighash")),
        "{reply:?}"
    );
    for request in [
        share.clone(),
        SignRequest::Commit {
            session_id: "rogue-1".into(),
            workflow_id: ids[3].clone(),
        },
    ] {
        let reply = ask(&client, "g2", &request).await;
        assert!(
            matches!(&reply, SignReply::Refused { reason } if reason.contains("consumed")),
            "a replayed session is refused: {reply:?}"
        );
    }

    // g1 goes down with its heartbeat still fresh: the coordinator asks it,
    // names it when it does not answer, and signs with g2 and g3.
    let mut guardians = guardians;
    let g1 = guardians.remove(0);
    g1.trigger.trigger();
    let _ = g1.task.await;
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
    let reply = ask(
        &client,
        "g2",
        &SignRequest::Commit {
            session_id: "late-1".into(),
            workflow_id: ids[0].clone(),
        },
    )
    .await;
    assert!(matches!(reply, SignReply::Refused { .. }), "{reply:?}");

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
