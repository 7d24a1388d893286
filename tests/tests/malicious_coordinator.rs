//! A malicious coordinator against real guardians over a real nats-server: the
//! test speaks the signing protocol itself and tampers with it. Guardians
//! refuse commitments they never handed out and strangers, never sign twice
//! on the same nonces or in the same session (also across a restart), survive
//! garbage on every subject they listen on, and a guardian killed after
//! handing out commitments is named and replaced.
//! After each, honest signing still works, and no nonce or key share is in
//! any message of the events stream.

use std::collections::BTreeMap;
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_custody::frost::round1::SigningCommitments;
use custos_custody::frost::{Identifier, SigningPackage};
use custos_custody::sign::Sighash;
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::{EventType, IntakeReply, Payload, WalletDescriptor, codec, subjects};
use custos_tests::frost::{
    Frost, Guardian, append_built, ask, built, built_from, frost_setup, history, preprocess,
    sighashes, stage_of,
};
use custos_tests::*;
use custos_workers::ceremony::{GuardianReply, GuardianRequest, Joining, RosterEntry};
use custos_workers::signing::{SignReply, SignRequest, SignStep};
use custos_workers::trail::Trail;
use futures::StreamExt;
use serde_json::json;

const AMOUNT: u64 = 150_000_000;

/// `count` transfers allowed by the policy, each with its transaction built
/// (not yet recorded): their ids, transactions and sighashes.
async fn allowed_transfers(
    nats: &Nats,
    engine: &Engine,
    wallet: &WalletDescriptor,
    tag: &str,
    count: u8,
) -> Vec<(String, Payload, Sighash)> {
    let destination = taproot_address("rltc", [9; 32]);
    let mut out = Vec::new();
    for n in 0..count {
        let body = json!({"requestId": format!("{tag}-{n}"), "wallet": wallet.name, "asset": "LTC",
            "destination": destination, "amount": "1.5", "initiator": "erp"});
        let id = match submit_json(&engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => panic!("{other:?}"),
        };
        assert!(
            eventually(Duration::from_secs(20), || async {
                stage_of(nats, &id).await == Stage::ReadyToSign
            })
            .await,
            "{id} allowed by policy"
        );
        let payload = built(wallet, &destination, AMOUNT, n + 1);
        let sighash = sighashes(wallet, &payload, &destination, AMOUNT)[0];
        out.push((id, payload, sighash));
    }
    out
}

/// [`allowed_transfers`] with their transactions recorded: ids and sighashes.
async fn built_transfers(
    nats: &Nats,
    engine: &Engine,
    wallet: &WalletDescriptor,
    tag: &str,
    count: u8,
) -> Vec<(String, Sighash)> {
    let mut out = Vec::new();
    for (id, payload, sighash) in allowed_transfers(nats, engine, wallet, tag, count).await {
        append_built(engine, nats, &id, payload).await;
        out.push((id, sighash));
    }
    out
}

/// One commitment `guardian` hands out for the wallet `vault`.
async fn commit(client: &async_nats::Client, guardian: &str) -> (Identifier, SigningCommitments) {
    let (id, commitments) = preprocess(client, guardian, "vault", 1).await;
    (id, commitments[0])
}

/// Asks `guardian` to sign one-input `workflow_id` in `session` with `package`.
async fn sign(
    client: &async_nats::Client,
    guardian: &str,
    session: &str,
    workflow_id: &str,
    package: &SigningPackage,
) -> SignReply {
    ask(
        client,
        guardian,
        &SignRequest::Sign {
            session_id: session.into(),
            workflow_id: workflow_id.into(),
            packages: vec![package.serialize().expect("package")],
        },
    )
    .await
}

/// The guardians and their 2-of-3 wallet `vault` under the default policy.
async fn vault(nats: &Nats, engine: &Engine) -> Frost {
    frost_setup(
        nats,
        engine,
        "vault",
        policy::default_policy().expect("policy"),
    )
    .await
}

/// Commitments no guardian made (of an unrelated share).
fn forged() -> SigningCommitments {
    let share = custos_custody::frost::keys::SigningShare::deserialize(&rand::random::<[u8; 32]>())
        .expect("share");
    custos_custody::frost::round1::commit(&share, &mut rand::rngs::OsRng).1
}

fn package(commitments: &[(Identifier, SigningCommitments)], sighash: &Sighash) -> SigningPackage {
    let map: BTreeMap<Identifier, SigningCommitments> = commitments.iter().copied().collect();
    SigningPackage::new(map, sighash.as_bytes())
}

#[track_caller]
fn refused(reply: &SignReply, why: &str) {
    assert!(
        matches!(reply, SignReply::Refused { reason } if reason.contains(why)),
        "refused because {why:?}: {reply:?}"
    );
}

/// The guardian holds no nonces for its commitment in the package.
#[track_caller]
fn stale(reply: &SignReply) {
    assert!(
        matches!(reply, SignReply::Stale { reason } if reason.contains("not one it has outstanding")),
        "stale: {reply:?}"
    );
}

#[track_caller]
fn shares(reply: &SignReply) {
    assert!(
        matches!(reply, SignReply::Shares { .. }),
        "shares: {reply:?}"
    );
}

/// Runs the signing step (the honest coordinator) until `shutdown`.
async fn run_coordinator(nats: &Nats, engine: &Engine, shutdown: &custos_workers::Shutdown) {
    let js = nats.js().await;
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .expect("trail");
    let step = SignStep::new(nats.client().await, trail).expect("sign step");
    tokio::spawn(custos_workers::runtime::run(
        js,
        engine.ledger.clone(),
        step,
        shutdown.clone(),
    ));
}

/// Waits until `workflow_id` is signed; returns its signers.
async fn signed_by(nats: &Nats, workflow_id: &str) -> Vec<String> {
    if !eventually(Duration::from_secs(60), || async {
        stage_of(nats, workflow_id).await == Stage::Signed
    })
    .await
    {
        let events: Vec<String> = all_events(&nats.js().await)
            .await
            .into_iter()
            .filter(|(_, e)| e.workflow_id == workflow_id || e.event_type == EventType::AlertRaised)
            .map(|(_, e)| format!("{:?} {:?}", e.event_type, e.payload))
            .collect();
        panic!("{workflow_id} is not signed: {events:#?}");
    }
    let (t, _) = transfer::fold(&history(nats, workflow_id).await).expect("folds");
    t.signed.expect("signed").signers
}

/// No message of the stream holds a nonce or a key share the guardians
/// answered for (more than the three verifying shares and some commitments
/// were collected: the scan is not vacuous).
async fn no_secret_in_the_stream(nats: &Nats, watch: &leaks::Watch, min_commitments: usize) {
    let images = watch.images();
    assert!(
        images.len() >= 3 + 2 * min_commitments,
        "collected {} images",
        images.len()
    );
    let bodies = leaks::stream_bodies(&nats.js().await).await;
    let leaked = leaks::find(&bodies, &images);
    assert!(
        leaked.is_empty(),
        "stream messages {leaked:?} hold a nonce or a share"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_commitments_and_second_shares_are_refused() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let watch = leaks::Watch::start(&client).await;
    let Frost {
        mut guardians,
        wallet,
        trigger,
        shutdown,
    } = vault(&nats, &engine).await;
    let transfers = built_transfers(&nats, &engine, &wallet, "rogue", 2).await;
    let (id, sighash) = &transfers[0];
    let sign = |g: &'static str, session: &'static str, package: SigningPackage| {
        let client = client.clone();
        let id = id.clone();
        async move { sign(&client, g, session, &id, &package).await }
    };

    // A commitment g2 never handed out in its place: it holds no nonces for
    // it, and signs nothing.
    let (id2, c2) = commit(&client, "g2").await;
    let (id3, c3) = commit(&client, "g3").await;
    let tampered = package(&[(id2, forged()), (id3, c3)], sighash);
    stale(&sign("g2", "own-1", tampered.clone()).await);
    // Another guardian's commitment replaced: g3 cannot know it is not g2's,
    // and signs; its nonces are spent, so the genuine package cannot have a
    // second share on them, nor a second share in that session.
    shares(&sign("g3", "own-1", tampered).await);
    let genuine = package(&[(id2, c2), (id3, c3)], sighash);
    stale(&sign("g3", "own-2", genuine).await);
    let (id3, c3) = commit(&client, "g3").await;
    refused(
        &sign("g3", "own-1", package(&[(id2, c2), (id3, c3)], sighash)).await,
        "already consumed",
    );

    // Packages a guardian must not sign: without its commitment, below the
    // threshold, with a signer that is not a guardian of the wallet,
    // unreadable, or more packages than inputs. Each spends the nonces named.
    let id1 = Identifier::try_from(1u16).expect("id");
    let stranger = Identifier::try_from(9u16).expect("id");
    refused(
        &sign(
            "g2",
            "missing-1",
            package(&[(id1, forged()), (id3, forged())], sighash),
        )
        .await,
        "no commitment for this guardian",
    );
    let (id2, c2) = commit(&client, "g2").await;
    refused(
        &sign("g2", "few-1", package(&[(id2, c2)], sighash)).await,
        "the threshold is 2",
    );
    stale(&sign("g2", "few-2", package(&[(id2, c2), (id3, c3)], sighash)).await);
    let (id2, c2) = commit(&client, "g2").await;
    refused(
        &sign(
            "g2",
            "stranger-1",
            package(&[(id2, c2), (stranger, forged())], sighash),
        )
        .await,
        "is not a guardian of vault",
    );
    let reply = ask(
        &client,
        "g2",
        &SignRequest::Sign {
            session_id: "garbled-1".into(),
            workflow_id: id.clone(),
            packages: vec![vec![0xEE; 120]],
        },
    )
    .await;
    refused(&reply, "package 0");
    let (id2, c2) = commit(&client, "g2").await;
    let genuine = package(&[(id2, c2), (id3, c3)], sighash).serialize();
    let reply = ask(
        &client,
        "g2",
        &SignRequest::Sign {
            session_id: "two-1".into(),
            workflow_id: id.clone(),
            packages: vec![genuine.clone().expect("package"), genuine.expect("package")],
        },
    )
    .await;
    refused(&reply, "2 packages for 1 inputs");
    // Two inputs' packages naming one commitment of g2's: one nonce would
    // sign two messages. The second finds it spent, and nothing is signed.
    let (two_inputs, _, _) = allowed_transfers(&nats, &engine, &wallet, "two-inputs", 1)
        .await
        .remove(0);
    let destination = taproot_address("rltc", [9; 32]);
    let payload = built_from(
        &wallet,
        &destination,
        AMOUNT,
        &[(31, 100_000_000), (32, 100_000_000)],
    );
    let two_sighashes = sighashes(&wallet, &payload, &destination, AMOUNT);
    assert_eq!(two_sighashes.len(), 2, "a two-input transaction");
    append_built(&engine, &nats, &two_inputs, payload).await;
    let (id2, mine) = preprocess(&client, "g2", "vault", 3).await;
    let (id3, theirs) = preprocess(&client, "g3", "vault", 2).await;
    let two = |g2_first: SigningCommitments, g2_second: SigningCommitments| {
        [g2_first, g2_second]
            .into_iter()
            .zip(&theirs)
            .zip(&two_sighashes)
            .map(|((g2, g3), h)| {
                package(&[(id2, g2), (id3, *g3)], h)
                    .serialize()
                    .expect("package")
            })
            .collect::<Vec<_>>()
    };
    let ask_two = |session: &str, packages: Vec<Vec<u8>>| SignRequest::Sign {
        session_id: session.into(),
        workflow_id: two_inputs.clone(),
        packages,
    };
    let reply = ask(&client, "g2", &ask_two("reused-1", two(mine[0], mine[0]))).await;
    stale(&reply);
    // With a commitment per input it signs both, once.
    let reply = ask(
        &client,
        "g2",
        &ask_two("two-inputs-1", two(mine[1], mine[2])),
    )
    .await;
    assert!(
        matches!(&reply, SignReply::Shares { shares } if shares.len() == 2),
        "{reply:?}"
    );

    // A second request after a share was given: the same package, another
    // one, or four at once: one share at most per commitment and session.
    let (id2, c2) = commit(&client, "g2").await;
    let (id3, c3) = commit(&client, "g3").await;
    let genuine = package(&[(id2, c2), (id3, c3)], sighash);
    shares(&sign("g2", "twice-1", genuine.clone()).await);
    stale(&sign("g2", "twice-2", genuine).await);
    let (id1, c1) = commit(&client, "g1").await;
    let (id2, c2) = commit(&client, "g2").await;
    refused(
        &sign("g2", "twice-1", package(&[(id1, c1), (id2, c2)], sighash)).await,
        "already consumed",
    );
    // Four packages at once naming one commitment of g2's, each with another
    // co-signer commitment and in its own session: one share at most.
    let mut raced = Vec::new();
    for _ in 0..4 {
        raced.push(package(&[(id2, c2), (id3, forged())], sighash));
    }
    let sessions = ["race-1", "race-2", "race-3", "race-4"];
    let replies = futures::future::join_all(
        sessions
            .iter()
            .zip(raced)
            .map(|(session, p)| sign("g2", session, p)),
    )
    .await;
    let given = replies
        .iter()
        .filter(|r| matches!(r, SignReply::Shares { .. }))
        .count();
    assert_eq!(given, 1, "one share for four concurrent asks: {replies:?}");

    // A restarted guardian knows the sessions it signed in (on disk), and
    // holds no nonces from before.
    let (id2, before) = commit(&client, "g2").await;
    let g2 = guardians.remove(1).restart(&nats).await;
    guardians.insert(1, g2);
    stale(
        &sign(
            "g2",
            "after-restart-1",
            package(&[(id2, before), (id3, c3)], sighash),
        )
        .await,
    );
    let raced = sessions.iter().zip(&replies);
    let signed_in = raced
        .filter(|(_, r)| matches!(r, SignReply::Shares { .. }))
        .map(|(session, _)| *session);
    for session in ["twice-1"].into_iter().chain(signed_in) {
        let (id2, c2) = commit(&client, "g2").await;
        refused(
            &sign("g2", session, package(&[(id2, c2), (id3, c3)], sighash)).await,
            "already consumed",
        );
    }

    // The honest coordinator signs both transfers with them all the same.
    run_coordinator(&nats, &engine, &shutdown).await;
    for (id, _) in &transfers {
        assert_eq!(signed_by(&nats, id).await, vec!["g1", "g2"]);
    }
    assert!(guardians.iter().all(Guardian::is_running));
    no_secret_in_the_stream(&nats, &watch, 12).await;
    trigger.trigger();
    verify_stream(&nats.js().await)
        .await
        .expect("the trail verifies");
}

/// What a hostile peer can put on a guardian's subjects.
fn garbage(workflow_id: &str) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let commit = codec::to_msgpack(&SignRequest::Sign {
        session_id: "garbage-1".into(),
        workflow_id: workflow_id.into(),
        packages: vec![vec![0xFF; 64]],
    });
    let bad_peer = custos_custody::identity::SignedMessage {
        ceremony_id: "c-1".into(),
        sender: "g9".into(),
        recipient: None,
        round: u32::MAX,
        payload: vec![0xFF; 300],
        signature: vec![1; 3],
    };
    let roster = |index: u16| RosterEntry {
        index,
        guardian: custos_custody::identity::GuardianPublic {
            id: "g1".into(),
            signing_key: [0; 32],
            encryption_key: [0xFF; 32],
        },
    };
    let ceremonies = [
        GuardianRequest::DkgStart {
            ceremony_id: "c-1".into(),
            change: "nope".into(),
            min_signers: 0,
            roster: vec![],
        },
        GuardianRequest::DkgStart {
            ceremony_id: "c-2".into(),
            change: "nope".into(),
            min_signers: u16::MAX,
            roster: vec![roster(0), roster(0), roster(u16::MAX)],
        },
        GuardianRequest::DkgShares {
            ceremony_id: "c-1".into(),
            packages: vec![bad_peer.clone(); 50],
        },
        GuardianRequest::DkgFinalize {
            ceremony_id: "c-1".into(),
            echoes: vec![bad_peer.clone()],
            shares: vec![],
        },
        GuardianRequest::RefreshStart {
            ceremony_id: "c-3".into(),
            change: "nope".into(),
            wallet: "vault".into(),
            roster: vec![roster(1)],
        },
        GuardianRequest::RefreshFinalize {
            ceremony_id: "c-3".into(),
            shares: vec![bad_peer.clone()],
        },
        GuardianRequest::RepairStart {
            ceremony_id: "c-4".into(),
            change: "nope".into(),
            wallet: "vault".into(),
            joining: Joining {
                roster: vec![roster(1)],
                helpers: vec![0, u16::MAX],
                newcomer: 0,
            },
        },
        GuardianRequest::RepairAdmit {
            ceremony_id: "c-4".into(),
            result: bad_peer.clone(),
        },
        GuardianRequest::ReshareStart {
            ceremony_id: "c-5".into(),
            change: "nope".into(),
            wallet: "vault".into(),
            min_signers: 0,
            roster: vec![],
        },
        GuardianRequest::ReshareFinalize {
            ceremony_id: "c-5".into(),
            dealings: vec![bad_peer.clone()],
            shares: vec![bad_peer],
        },
        GuardianRequest::Commit {
            ceremony_id: "c-6".into(),
            wallet: "vault".into(),
        },
        GuardianRequest::Abort {
            ceremony_id: "../../c-7".into(),
        },
    ];
    let mut out: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();
    for op in ["sign", "ceremony"] {
        out.extend([
            (op, "empty", Vec::new()),
            (
                op,
                "random bytes",
                (0..1024).map(|_| rand::random::<u8>()).collect(),
            ),
            (
                op,
                "a truncated request",
                commit[..commit.len() / 2].to_vec(),
            ),
            // 0xC1 is the one byte MessagePack never uses.
            (op, "oversized", vec![0xC1; 900 * 1024]),
            (op, "deeply nested arrays", vec![0x91; 200_000]),
            (
                op,
                "JSON",
                serde_json::to_vec(
                    &json!({"Sign": {"session_id": "x", "workflow_id": "y", "packages": []}}),
                )
                .expect("json"),
            ),
            (op, "an integer", codec::to_msgpack(&42u32)),
            (
                op,
                "an unknown variant",
                codec::to_msgpack(&json!({"Explode": {}})),
            ),
            (
                op,
                "missing fields",
                codec::to_msgpack(&json!({"Sign": {}})),
            ),
            (
                op,
                "fields of the wrong type",
                codec::to_msgpack(&json!({"Preprocess": {"wallet": 7, "count": [1, 2]}})),
            ),
        ]);
    }
    out.extend([
        (
            "sign",
            "a ceremony request",
            codec::to_msgpack(&ceremonies[0]),
        ),
        ("ceremony", "a signing request", commit.clone()),
        (
            "sign",
            "a 100 kB session id",
            codec::to_msgpack(&SignRequest::Sign {
                session_id: "s".repeat(100_000),
                workflow_id: workflow_id.into(),
                packages: Vec::new(),
            }),
        ),
        (
            "sign",
            "a path as session id",
            codec::to_msgpack(&SignRequest::Sign {
                session_id: "../../shares/vault".into(),
                workflow_id: workflow_id.into(),
                packages: Vec::new(),
            }),
        ),
        (
            "sign",
            "5,000 packages",
            codec::to_msgpack(&SignRequest::Sign {
                session_id: "nope".into(),
                workflow_id: workflow_id.into(),
                packages: vec![vec![0xFF; 64]; 5_000],
            }),
        ),
    ]);
    for (what, wallet, count) in [
        ("a path as wallet", "../../shares/vault", 1),
        ("65,535 commitments at once", "vault", u16::MAX),
        ("no commitments", "vault", 0),
        ("commitments for an unknown wallet", "nowhere", 1),
    ] {
        let wallet = wallet.into();
        let preprocess = codec::to_msgpack(&SignRequest::Preprocess { wallet, count });
        out.push(("sign", what, preprocess));
    }
    out.extend(ceremonies.iter().map(|r| {
        (
            "ceremony",
            "a hostile ceremony request",
            codec::to_msgpack(r),
        )
    }));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_every_guardian_subject_is_refused_and_signing_goes_on() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let watch = leaks::Watch::start(&client).await;
    let Frost {
        guardians,
        wallet,
        trigger,
        shutdown,
    } = vault(&nats, &engine).await;
    let transfers = built_transfers(&nats, &engine, &wallet, "after-garbage", 1).await;
    let heartbeats = js
        .get_key_value(subjects::GUARDIANS_BUCKET)
        .await
        .expect("bucket");
    for g in ["g1", "g2"] {
        for (op, what, body) in garbage(&transfers[0].0) {
            let subject = subjects::guardian_subject(g, op);
            // Without a reply subject: nothing to answer, and nothing breaks.
            client
                .publish(subject.clone(), body.clone().into())
                .await
                .expect("publish");
            let reply = tokio::time::timeout(
                Duration::from_secs(30),
                client.request(subject, body.into()),
            )
            .await
            .unwrap_or_else(|_| panic!("{g} answers {what} on {op}"))
            .unwrap_or_else(|e| panic!("{g} answers {what} on {op}: {e}"));
            let reason = match op {
                "sign" => match codec::from_msgpack::<SignReply>(&reply.payload) {
                    Ok(SignReply::Refused { reason }) => reason,
                    other => panic!("{g}: {what} on {op}: {other:?}"),
                },
                _ => match codec::from_msgpack::<GuardianReply>(&reply.payload) {
                    Ok(GuardianReply::Refused { reason }) => reason,
                    other => panic!("{g}: {what} on {op}: {other:?}"),
                },
            };
            assert!(!reason.is_empty(), "{g}: {what} on {op}: a reason");
            if what.starts_with("a 100 kB") {
                assert!(reason.contains("sessionId"), "names the field: {reason}");
            }
            if what == "a path as wallet" {
                assert!(reason.contains("wallet"), "names the field: {reason}");
            }
            if what.ends_with("at once") {
                assert!(reason.contains("count"), "names the field: {reason}");
            }
        }
    }
    // Still alive: running, announcing, and signing.
    assert!(guardians.iter().all(Guardian::is_running));
    for g in ["g1", "g2"] {
        let before = heartbeats
            .entry(g)
            .await
            .expect("entry")
            .expect("announced")
            .revision;
        assert!(
            eventually(Duration::from_secs(10), || async {
                heartbeats
                    .entry(g)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|e| e.revision > before)
            })
            .await,
            "{g} still announces itself"
        );
    }
    run_coordinator(&nats, &engine, &shutdown).await;
    assert_eq!(signed_by(&nats, &transfers[0].0).await, vec!["g1", "g2"]);
    no_secret_in_the_stream(&nats, &watch, 1).await;
    trigger.trigger();
    verify_stream(&js).await.expect("the trail verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guardian_killed_after_handing_out_commitments_is_named_and_replaced() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let watch = leaks::Watch::start(&client).await;
    let Frost {
        mut guardians,
        wallet,
        trigger,
        shutdown,
    } = vault(&nats, &engine).await;
    // The coordinator asks g1 and g2 (live, in the wallet's order) for
    // commitments. g2 hears nothing until g1 has handed its out and died;
    // then the coordinator's request for shares finds g1 gone.
    let mut committed = client.subscribe("_INBOX.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    run_coordinator(&nats, &engine, &shutdown).await;
    let (id, payload, _) = allowed_transfers(&nats, &engine, &wallet, "killed", 1)
        .await
        .remove(0);
    // g2 and g3 decrypt their shares (argon2id) now, not within the
    // coordinator's request timeout on a loaded machine.
    for g in ["g2", "g3"] {
        preprocess(&client, g, "vault", 1).await;
    }
    // Held only moments (the server drops a client that does not read for long).
    guardians[1].proxy.hold();
    append_built(&engine, &nats, &id, payload).await;
    let g1_id = Identifier::try_from(1u16).expect("id").serialize();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = committed.next().await {
            if let Ok(SignReply::Preprocessed { identifier, .. }) =
                codec::from_msgpack(&msg.payload)
                && identifier == g1_id
            {
                return;
            }
        }
    })
    .await
    .expect("g1 hands out commitments");
    guardians.remove(0).kill().await;
    guardians[0].proxy.release();

    assert_eq!(signed_by(&nats, &id).await, vec!["g2", "g3"]);
    let alerts: Vec<String> = all_events(&js)
        .await
        .into_iter()
        .filter_map(|(_, e)| match e.payload {
            Payload::Alert { summary, .. } if e.event_type == EventType::AlertRaised => {
                Some(summary)
            }
            _ => None,
        })
        .collect();
    assert!(
        alerts.iter().any(|a| a.contains(&format!(
            "signing {id}: guardian g1 excluded: g1 unreachable"
        )) || a.contains(&format!(
            "signing {id}: guardian g1 excluded: g1 did not answer"
        ))),
        "the guardian that died after handing out commitments is named: {alerts:?}"
    );
    assert!(
        !alerts
            .iter()
            .any(|a| a.contains("g2 excluded") || a.contains("g3 excluded")),
        "only g1 is blamed: {alerts:?}"
    );
    no_secret_in_the_stream(&nats, &watch, 4).await;
    trigger.trigger();
    verify_stream(&js).await.expect("the trail verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_guardian_is_asked_for_fresh_commitments_not_blamed() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let js = nats.js().await;
    let Frost {
        mut guardians,
        wallet,
        trigger,
        shutdown,
    } = vault(&nats, &engine).await;
    run_coordinator(&nats, &engine, &shutdown).await;
    let (first, _) = built_transfers(&nats, &engine, &wallet, "before-restart", 1)
        .await
        .remove(0);
    assert_eq!(signed_by(&nats, &first).await, vec!["g1", "g2"]);
    // The coordinator holds g2's commitments of before; g2 restarts without
    // their nonces, and says so when they are named.
    let client = nats.client().await;
    let mut replies = client.subscribe("_INBOX.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let g2 = guardians.remove(1).restart(&nats).await;
    guardians.insert(1, g2);
    let (second, _) = built_transfers(&nats, &engine, &wallet, "after-restart", 1)
        .await
        .remove(0);
    assert_eq!(
        signed_by(&nats, &second).await,
        vec!["g1", "g2"],
        "signed by the same guardians, with g2's fresh commitments"
    );
    let stale = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = replies.next().await {
            if let Ok(SignReply::Stale { .. }) = codec::from_msgpack(&msg.payload) {
                return;
            }
        }
    })
    .await;
    assert!(stale.is_ok(), "g2 answered that its commitments were stale");
    let alerts: Vec<String> = all_events(&js)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::AlertRaised)
        .map(|(_, e)| format!("{:?}", e.payload))
        .collect();
    assert!(alerts.is_empty(), "no guardian blamed: {alerts:?}");
    trigger.trigger();
    verify_stream(&js).await.expect("the trail verifies");
}
