//! Guardian changes on a FROST wallet over NATS among guardians: removing one
//! (a refresh among the others) and adding one (a repair by threshold-many
//! helpers), each recorded with the wallet's new roster and the same address;
//! signing follows the recorded roster; bad requests are refused with nothing
//! recorded, and a ceremony that fails leaves the wallet as it was. A threshold
//! change (verifiable redistribution among the same guardians) keeps the
//! address and group key, and signing then needs the new threshold.

use std::path::{Path, PathBuf};
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_custody::frost::keys::{KeyPackage, PublicKeyPackage};
use custos_custody::sign::Sighash;
use custos_custody::spend::{self, FeePolicy, SpendRequest};
use custos_custody::{sim, store};
use custos_engine::policy;
use custos_engine::transfer::{self, Stage};
use custos_schemas::chain::SpentOutput;
use custos_schemas::change::Change;
use custos_schemas::{
    AggregateKind, Event, EventType, IntakeReply, Payload, WalletDescriptor, subjects,
};
use custos_tests::ceremonies::{approved_ceremony, refused_change};
use custos_tests::workflows::policy_and_initiator;
use custos_tests::*;
use custos_workers::guardian::GuardianConfig;
use custos_workers::signing::{Ceremony, SignStep, wallet_script};
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use serde_json::json;
use zeroize::Zeroizing;

struct Guardian {
    trigger: ShutdownTrigger,
    dir: tempfile::TempDir,
    task: Option<tokio::task::JoinHandle<Result<(), custos_workers::guardian::GuardianError>>>,
}

impl Guardian {
    /// Stops it and waits until it has (its subjects are gone, its files closed).
    async fn stop(&mut self) {
        self.trigger.trigger();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn passphrase(id: &str) -> String {
    format!("passphrase of {id}")
}

fn start_guardian(client: async_nats::Client, id: &str) -> Guardian {
    restart_guardian(client, id, tempfile::tempdir().expect("tempdir"))
}

/// A guardian process on `dir` (its identity and shares, if any).
fn restart_guardian(client: async_nats::Client, id: &str, dir: tempfile::TempDir) -> Guardian {
    let config = GuardianConfig {
        id: id.into(),
        data_dir: PathBuf::from(dir.path()),
        passphrase: Zeroizing::new(passphrase(id)),
    };
    let (trigger, shutdown) = Shutdown::new();
    let task = Some(tokio::spawn(custos_workers::guardian::run(
        client, config, shutdown,
    )));
    Guardian { trigger, dir, task }
}

/// A guardian's share of `wallet` as it holds it on disk (decrypted), read as
/// the guardian reads it: between a commit's two renames the share is bound
/// to the staged ceremony marker, not yet to the current one.
fn share_on_disk(dir: &Path, id: &str, wallet: &str) -> Option<(KeyPackage, PublicKeyPackage)> {
    let shares = dir.join("shares");
    let file = std::fs::read(shares.join(format!("{wallet}.share"))).ok()?;
    let plain = ["ceremony", "ceremony.new"].iter().find_map(|marker| {
        let ceremony = std::fs::read_to_string(shares.join(format!("{wallet}.{marker}"))).ok()?;
        store::open_secret(&file, passphrase(id).as_bytes(), id, ceremony.trim()).ok()
    })?;
    let len = u32::from_be_bytes(plain[..4].try_into().expect("length")) as usize;
    Some((
        KeyPackage::deserialize(&plain[4..4 + len]).expect("key package"),
        PublicKeyPackage::deserialize(&plain[4 + len..]).expect("public package"),
    ))
}

fn remove(guardian: &str) -> Change {
    Change::GuardianRemove {
        wallet: "vault".into(),
        guardian: guardian.into(),
    }
}

fn add(guardian: &str, helpers: &[&str]) -> Change {
    Change::GuardianAdd {
        wallet: "vault".into(),
        guardian: guardian.into(),
        helpers: helpers.iter().map(|h| h.to_string()).collect(),
    }
}

fn create_vault(guardians: &[&str]) -> Change {
    Change::WalletCreate {
        name: "vault".into(),
        model: "frost".into(),
        chain: "ltc-regtest".into(),
        threshold: 2,
        guardians: guardians.iter().map(|g| g.to_string()).collect(),
    }
}

/// A guardian's share of `wallet` once it committed one (guardians commit
/// when the coordinator tells them the outcome is recorded).
async fn committed_share(dir: &Path, id: &str, wallet: &str) -> (KeyPackage, PublicKeyPackage) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            share_on_disk(dir, id, wallet).is_some()
        })
        .await,
        "{id} committed a share of {wallet}"
    );
    share_on_disk(dir, id, wallet).expect("a share")
}

/// The default policy and its step, two transfers of vault allowed by it,
/// and a sign step: the stop trigger, the destination, the workflows, the step.
async fn two_allowed_transfers(
    nats: &Nats,
    engine: &Engine,
) -> (ShutdownTrigger, String, Vec<String>, SignStep) {
    let default = policy::default_policy().expect("default policy");
    let (trigger, shutdown) = Shutdown::new();
    policy_and_initiator(nats, engine, default, shutdown.clone()).await;
    let destination = taproot_address("rltc", [9; 32]);
    let mut transfers = Vec::new();
    for n in 0..2 {
        let body = json!({"requestId": format!("pay-{n}"), "wallet": "vault", "asset": "LTC",
            "destination": destination, "amount": "1.5", "initiator": "erp"});
        match submit_json(&engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => transfers.push(workflow_id),
            other => panic!("{other:?}"),
        }
    }
    for id in &transfers {
        assert!(
            eventually(Duration::from_secs(20), || async {
                stage_of(nats, id).await == Stage::ReadyToSign
            })
            .await,
            "{id} allowed by policy"
        );
    }
    let trail = Trail::follow(nats.js().await, shutdown)
        .await
        .expect("trail");
    let step = SignStep::new(nats.client().await, trail).expect("sign step");
    (trigger, destination, transfers, step)
}

async fn events(nats: &Nats) -> Vec<Event> {
    all_events(&nats.js().await)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

async fn stage_of(nats: &Nats, workflow_id: &str) -> Stage {
    let history: Vec<Event> = events(nats)
        .await
        .into_iter()
        .filter(|e| e.aggregate_kind == AggregateKind::Tx && e.workflow_id == workflow_id)
        .collect();
    transfer::fold(&history)
        .map(|(t, _)| t.stage)
        .unwrap_or(Stage::New)
}

/// Records the transaction built for an allowed transfer: one made-up 5 LTC
/// output of the wallet, paying `destination`.
async fn build(engine: &Engine, nats: &Nats, wallet: &WalletDescriptor, id: &str, dest: &str) {
    let script = wallet_script(wallet).expect("wallet script");
    let utxo = SpentOutput {
        txid: hex::encode([id.len() as u8; 32]),
        vout: 1,
        value: 500_000_000,
        script_pubkey: hex::encode(&script),
    };
    let unsigned = spend::build_spend(&SpendRequest {
        chain: &wallet.chain,
        wallet_script: &script,
        utxos: &[utxo],
        destination: &spend::script_pubkey_for_address(&wallet.chain, dest).expect("address"),
        amount: 150_000_000,
        fee_rate: Some(2),
        fees: FeePolicy::for_chain(&wallet.chain).expect("fees"),
    })
    .expect("builds");
    let version = events(nats)
        .await
        .iter()
        .filter(|e| e.workflow_id == id)
        .count() as u64;
    let mut p = record(
        AggregateKind::Tx,
        id,
        EventType::TransactionBuilt,
        Payload::TransactionBuilt(unsigned),
    );
    p.expected_version = version;
    append_ok(&engine.ledger, vec![p]).await;
}

/// Who signed the built transfer `id`.
async fn signers(step: &SignStep, id: &str) -> Vec<String> {
    match step.ceremony(id).await.expect("ceremony runs") {
        Ceremony::Signed { signed, .. } => signed.signers,
        other => panic!("{id} not signed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guardians_are_removed_and_added_on_the_same_address() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let ids = ["g1", "g2", "g3", "g4"];
    let mut guardians: Vec<Guardian> = ids
        .iter()
        .map(|id| start_guardian(client.clone(), id))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
                return false;
            };
            let mut n = 0;
            for id in ids {
                n += usize::from(matches!(kv.get(id).await, Ok(Some(_))));
            }
            n == ids.len()
        })
        .await,
        "guardians announce themselves"
    );
    let created = approved_ceremony(&nats, &engine, create_vault(&["g1", "g2", "g3"]))
        .await
        .expect("created");
    let (old_g3, _) = committed_share(guardians[2].dir.path(), "g3", "vault").await;

    // Wrong inputs: refused with the field and reason, nothing recorded.
    let before = events(&nats).await.len();
    for (request, why) in [
        (
            remove("g9"),
            "change.guardian: g9 is not a guardian of wallet vault",
        ),
        (
            add("g2", &[]),
            "change.guardian: g2 already guards wallet vault",
        ),
        (
            add("g4", &["g1", "g9"]),
            "change.helpers: g9 is not a guardian of wallet vault",
        ),
        (
            add("g4", &["g1"]),
            "change.helpers: 1 helpers, the threshold is 2",
        ),
    ] {
        let reason = refused_change(&nats, &engine, request).await;
        assert!(reason.contains(why), "{why}: {reason}");
    }
    assert_eq!(events(&nats).await.len(), before, "nothing recorded");
    // An approved addition of a guardian that never ran ends the change with
    // the reason; the wallet stays as it was.
    let reason = approved_ceremony(&nats, &engine, add("g5", &[]))
        .await
        .expect_err("g5 is not running");
    assert!(reason.contains("g5 has never announced itself"), "{reason}");

    // Remove g3: 2-of-2 with the same key and address, recorded with the roster.
    let removed = approved_ceremony(&nats, &engine, remove("g3"))
        .await
        .expect("removed");
    let roster = |w: &WalletDescriptor| -> Vec<(String, u16)> {
        w.guardians
            .iter()
            .map(|g| (g.id.clone(), g.index))
            .collect()
    };
    assert_eq!(
        roster(&removed),
        [("g1".to_string(), 1), ("g2".to_string(), 2)]
    );
    assert_eq!(
        (&removed.address, &removed.group_key, removed.threshold),
        (&created.address, &created.group_key, Some(2))
    );
    let recorded = events(&nats).await;
    let last = recorded
        .iter()
        .rfind(|e| e.aggregate_kind == AggregateKind::Wallet)
        .expect("a wallet event");
    assert_eq!(last.event_type, EventType::GuardianRemoved);
    assert!(
        last.metadata.contains_key("change"),
        "the wallet event names the approved change"
    );
    assert!(
        matches!(&last.payload, Payload::GuardianChanged { guardian, wallet, public_digest, .. }
            if guardian == "g3" && *wallet == removed && public_digest.len() == 64),
        "{:?}",
        last.payload
    );
    // g3 forgot its share; its old share does not combine with g1's new one.
    // (Guardians commit once the outcome is recorded: wait for their disks.)
    assert!(
        eventually(Duration::from_secs(20), || async {
            share_on_disk(guardians[2].dir.path(), "g3", "vault").is_none()
                && share_on_disk(guardians[0].dir.path(), "g1", "vault")
                    .is_some_and(|(_, p)| p.verifying_shares().len() == 2)
                && share_on_disk(guardians[1].dir.path(), "g2", "vault")
                    .is_some_and(|(_, p)| p.verifying_shares().len() == 2)
        })
        .await,
        "the remaining guardians committed, g3 forgot"
    );
    let (new_g1, public) = share_on_disk(guardians[0].dir.path(), "g1", "vault").expect("g1");
    assert_eq!(public.verifying_shares().len(), 2);
    let sighash = Sighash::from_recomputed([5; 32]);
    assert!(
        sim::run_signing(
            &[&new_g1, &old_g3],
            &public,
            &sighash,
            &mut rand::rngs::OsRng
        )
        .is_err(),
        "an old share of the removed guardian no longer combines"
    );
    let (new_g2, _) = share_on_disk(guardians[1].dir.path(), "g2", "vault").expect("g2");
    assert!(
        sim::run_signing(
            &[&new_g1, &new_g2],
            &public,
            &sighash,
            &mut rand::rngs::OsRng
        )
        .is_ok()
    );

    // Below the threshold: refused, nothing recorded.
    let before = events(&nats).await.len();
    let reason = refused_change(&nats, &engine, remove("g2")).await;
    assert!(
        reason.contains("would leave 1 guardians for a threshold of 2"),
        "{reason}"
    );
    assert_eq!(events(&nats).await.len(), before);

    // A transfer on the 2-of-2 wallet is signed by g1 and g2.
    let (trigger, destination, transfers, step) = two_allowed_transfers(&nats, &engine).await;
    build(&engine, &nats, &removed, &transfers[0], &destination).await;
    assert_eq!(signers(&step, &transfers[0]).await, ["g1", "g2"]);

    // Add g4, repaired by g1 and g2: 2-of-3, same address, a fresh identifier.
    let added = approved_ceremony(&nats, &engine, add("g4", &[]))
        .await
        .expect("added");
    assert_eq!(
        roster(&added),
        [
            ("g1".to_string(), 1),
            ("g2".to_string(), 2),
            ("g4".to_string(), 3)
        ]
    );
    assert_eq!(
        (&added.address, &added.group_key, added.threshold),
        (&created.address, &created.group_key, Some(2))
    );
    let last = events(&nats)
        .await
        .into_iter()
        .rfind(|e| e.aggregate_kind == AggregateKind::Wallet)
        .expect("a wallet event");
    assert_eq!(last.event_type, EventType::GuardianAdded);
    assert!(
        matches!(&last.payload, Payload::GuardianChanged { guardian, wallet, .. } if guardian == "g4" && *wallet == added)
    );
    // Adding an existing guardian is refused.
    let reason = refused_change(&nats, &engine, add("g1", &[])).await;
    assert!(reason.contains("g1 already guards"), "{reason}");

    // g2 goes down: g4 signs with g1.
    guardians[1].stop().await;
    build(&engine, &nats, &added, &transfers[1], &destination).await;
    assert_eq!(signers(&step, &transfers[1]).await, ["g1", "g4"]);

    // A ceremony that fails (g2 does not answer) leaves the wallet as it was;
    // its change ends with an alert giving the reason.
    let reason = approved_ceremony(&nats, &engine, remove("g4"))
        .await
        .expect_err("g2 is down");
    assert!(
        reason.contains("guardian removal failed") && reason.contains("g2"),
        "{reason}"
    );
    let last = events(&nats).await.pop().expect("an event");
    assert!(
        last.aggregate_kind == AggregateKind::Change
            && matches!(&last.payload, Payload::Alert { summary, .. } if summary.contains("g2")),
        "{last:?}"
    );
    let shown = share_on_disk(guardians[3].dir.path(), "g4", "vault").expect("g4 keeps its share");
    assert_eq!(shown.1.verifying_shares().len(), 3);

    trigger.trigger();
    drop(guardians);
    verify_stream(&js).await.expect("the trail verifies");
}

fn threshold(t: u16) -> Change {
    Change::ThresholdChange {
        wallet: "vault".into(),
        threshold: t,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_threshold_changes_on_the_same_address() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let ids = ["g1", "g2", "g3"];
    let mut guardians: Vec<Guardian> = ids
        .iter()
        .map(|id| start_guardian(client.clone(), id))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
                return false;
            };
            let mut n = 0;
            for id in ids {
                n += usize::from(matches!(kv.get(id).await, Ok(Some(_))));
            }
            n == ids.len()
        })
        .await,
        "guardians announce themselves"
    );
    let created = approved_ceremony(&nats, &engine, create_vault(&ids))
        .await
        .expect("created");

    // Thresholds out of range (or unchanged): refused, nothing recorded.
    let before = events(&nats).await.len();
    for (t, why) in [
        (
            1,
            "change.threshold: 1 of 3 guardians (needs 2 <= threshold <= guardians)",
        ),
        (
            4,
            "change.threshold: 4 of 3 guardians (needs 2 <= threshold <= guardians)",
        ),
        (2, "change.threshold: wallet vault already has threshold 2"),
    ] {
        let reason = refused_change(&nats, &engine, threshold(t)).await;
        assert!(reason.contains(why), "{why}: {reason}");
    }
    assert_eq!(events(&nats).await.len(), before, "nothing recorded");

    // 2-of-3 becomes 3-of-3: same guardians, group key and address.
    let changed = approved_ceremony(&nats, &engine, threshold(3))
        .await
        .expect("changed");
    assert_eq!(changed.threshold, Some(3));
    assert_eq!(
        (&changed.address, &changed.group_key, &changed.guardians),
        (&created.address, &created.group_key, &created.guardians)
    );
    let last = events(&nats)
        .await
        .into_iter()
        .rfind(|e| e.aggregate_kind == AggregateKind::Wallet)
        .expect("a wallet event");
    assert_eq!(last.event_type, EventType::ThresholdModified);
    assert!(
        matches!(&last.payload, Payload::ThresholdChanged { threshold: 3, wallet, transcript, .. }
            if *wallet == changed && transcript.len() == 64),
        "{:?}",
        last.payload
    );

    // The guardians' new shares: any two no longer sign, all three do, under
    // the unchanged group key.
    assert!(
        eventually(Duration::from_secs(20), || async {
            guardians.iter().zip(ids).all(|(g, id)| {
                share_on_disk(g.dir.path(), id, "vault")
                    .is_some_and(|(_, p)| p.min_signers() == Some(3))
            })
        })
        .await,
        "every guardian committed its new share"
    );
    let shares: Vec<(KeyPackage, PublicKeyPackage)> = guardians
        .iter()
        .zip(ids)
        .map(|(g, id)| share_on_disk(g.dir.path(), id, "vault").expect("a share"))
        .collect();
    let public = &shares[0].1;
    assert_eq!(public.min_signers(), Some(3));
    assert_eq!(
        hex::encode(public.verifying_key().serialize().expect("key")),
        created.group_key.clone().expect("group key")
    );
    let sighash = Sighash::from_recomputed([7; 32]);
    assert!(
        sim::run_signing(
            &[&shares[0].0, &shares[1].0],
            public,
            &sighash,
            &mut rand::rngs::OsRng
        )
        .is_err(),
        "two shares no longer sign"
    );
    assert!(
        sim::run_signing(
            &[&shares[0].0, &shares[1].0, &shares[2].0],
            public,
            &sighash,
            &mut rand::rngs::OsRng
        )
        .is_ok()
    );

    // A transfer is signed by all three guardians; with g3 down, g1 and g2
    // alone cannot sign the next one.
    let (trigger, destination, transfers, step) = two_allowed_transfers(&nats, &engine).await;
    build(&engine, &nats, &changed, &transfers[0], &destination).await;
    assert_eq!(signers(&step, &transfers[0]).await, ["g1", "g2", "g3"]);

    guardians[2].stop().await;
    build(&engine, &nats, &changed, &transfers[1], &destination).await;
    match step.ceremony(&transfers[1]).await {
        Err(reason) | Ok(Ceremony::Failed { reason, .. }) => {
            assert!(reason.contains("fewer than 3 guardians"), "{reason}")
        }
        Ok(other) => panic!("signed with two guardians: {other:?}"),
    }
    assert_ne!(stage_of(&nats, &transfers[1]).await, Stage::Signed);

    trigger.trigger();
    drop(guardians);
    verify_stream(&js).await.expect("the trail verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_share_is_repaired_under_its_own_index() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let client = nats.client().await;
    let js = nats.js().await;
    let ids = ["g1", "g2", "g3"];
    let mut guardians: Vec<Guardian> = ids
        .iter()
        .map(|id| start_guardian(client.clone(), id))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || async {
            let Ok(kv) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
                return false;
            };
            let mut n = 0;
            for id in ids {
                n += usize::from(matches!(kv.get(id).await, Ok(Some(_))));
            }
            n == ids.len()
        })
        .await,
        "guardians announce themselves"
    );
    let created = approved_ceremony(&nats, &engine, create_vault(&ids))
        .await
        .expect("created");
    let (g1_share, _) = committed_share(guardians[0].dir.path(), "g1", "vault").await;

    // g3 loses its disk's shares (its identity survives) and comes back.
    let mut g3 = guardians.pop().expect("g3");
    g3.stop().await;
    let shares = g3.dir.path().join("shares");
    for entry in std::fs::read_dir(&shares).expect("shares dir") {
        std::fs::remove_file(entry.expect("entry").path()).expect("removed");
    }
    assert!(share_on_disk(g3.dir.path(), "g3", "vault").is_none());
    guardians.push(restart_guardian(client.clone(), "g3", g3.dir));
    // Its announcement from before the stop is still there: wait until it
    // answers on its own subjects (a refusal of an empty request will do).
    let listening = eventually(Duration::from_secs(30), || async {
        client
            .request(subjects::guardian_subject("g3", "sign"), "{}".into())
            .await
            .is_ok()
    })
    .await;
    assert!(listening, "g3 listens again");

    // A repair that names g3 as its own helper is refused before anything runs.
    let reason = refused_change(
        &nats,
        &engine,
        Change::ShareRepair {
            wallet: "vault".into(),
            guardian: "g3".into(),
            helpers: vec!["g1".into(), "g3".into()],
        },
    )
    .await;
    assert!(reason.contains("change.helpers: g3"), "{reason}");

    let repaired = approved_ceremony(
        &nats,
        &engine,
        Change::ShareRepair {
            wallet: "vault".into(),
            guardian: "g3".into(),
            helpers: Vec::new(),
        },
    )
    .await
    .expect("repaired");
    assert_eq!(repaired, created, "the wallet is exactly as it was");
    let last = events(&nats)
        .await
        .into_iter()
        .rfind(|e| e.aggregate_kind == AggregateKind::Wallet)
        .expect("a wallet event");
    assert_eq!(last.event_type, EventType::ShareRepaired);

    // g3's rebuilt share is the one the wallet recorded, and signs with g1's.
    assert!(
        eventually(Duration::from_secs(20), || async {
            share_on_disk(guardians[2].dir.path(), "g3", "vault").is_some()
        })
        .await,
        "g3 committed its repaired share"
    );
    let (g3_share, public) = share_on_disk(guardians[2].dir.path(), "g3", "vault").expect("g3");
    assert_eq!(
        public.verifying_shares().get(g3_share.identifier()),
        Some(g3_share.verifying_share())
    );
    assert_eq!(
        hex::encode(public.verifying_key().serialize().expect("key")),
        created.group_key.clone().expect("group key")
    );
    assert!(
        sim::run_signing(
            &[&g1_share, &g3_share],
            &public,
            &Sighash::from_recomputed([3; 32]),
            &mut rand::rngs::OsRng
        )
        .is_ok()
    );

    // A freeze stops key ceremonies on the wallet, also one approved before it.
    custos_tests::ceremonies::freeze(&nats, &engine, "vault").await;
    let reason = approved_ceremony(
        &nats,
        &engine,
        Change::KeyRotation {
            wallet: "vault".into(),
        },
    )
    .await
    .expect_err("the wallet is frozen");
    assert!(reason.contains("wallet vault is frozen"), "{reason}");
    drop(guardians);
    verify_stream(&js).await.expect("the trail verifies");
}
