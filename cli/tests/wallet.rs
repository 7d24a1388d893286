//! FROST wallet creation: a DKG among three separate guardian processes over a
//! real nats-server, driven by `custos wallet create`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_schemas::{EventType, IntakeReply, Payload, WalletDescriptor, codec, subjects};
use custos_tests::ceremonies::{CEREMONIES_ALLOWED, OPERATOR, change_service};
use custos_tests::*;
use custos_workers::ceremony::{GuardianReply, GuardianRequest};
use serde_json::json;

/// A guardian process, killed on drop.
struct Guardian {
    child: Child,
}

impl Guardian {
    fn start(url: &str, id: &str, dir: &Path, passphrase: &str) -> Guardian {
        let child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args([
                "guardian",
                "run",
                "--id",
                id,
                "--nats-url",
                url,
                "--data-dir",
            ])
            .arg(dir.join(id))
            .env("CUSTOS_GUARDIAN_PASSPHRASE", passphrase)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("guardian starts");
        Guardian { child }
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `custos` as the operator: success, stdout, stderr.
fn custos_out(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(args)
        .env("CUSTOS_NATS_URL", url)
        .env("CUSTOS_USER", OPERATOR)
        .output()
        .expect("custos runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn custos(url: &str, args: &[&str]) -> (bool, String) {
    let (ok, stdout, stderr) = custos_out(url, args);
    (ok, format!("{stdout}{stderr}"))
}

async fn announced(nats: &Nats, ids: &[&str]) -> bool {
    let js = nats.js().await;
    let Ok(bucket) = js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
        return false;
    };
    for id in ids {
        if !matches!(bucket.get(*id).await, Ok(Some(_))) {
            return false;
        }
    }
    true
}

async fn ask(client: &async_nats::Client, guardian: &str, body: Vec<u8>) -> GuardianReply {
    let msg = client
        .request(
            subjects::guardian_subject(guardian, "ceremony"),
            body.into(),
        )
        .await
        .expect("guardian answers");
    codec::from_msgpack(&msg.payload).expect("a guardian reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frost_wallet_from_a_dkg_among_three_guardian_processes() {
    let nats = Nats::start(Durability::Default).await;
    let engine = Engine::start(&nats).await;
    let url = nats.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let _guardians: Vec<Guardian> = ["g1", "g2", "g3"]
        .iter()
        .map(|id| Guardian::start(&url, id, dir.path(), &format!("pass-{id}")))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || announced(
            &nats,
            &["g1", "g2", "g3"]
        ))
        .await,
        "guardians announce themselves"
    );
    let _changes = change_service(&nats, &engine, CEREMONIES_ALLOWED).await;

    let (ok, out, err) = custos_out(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "2",
            "--guardians",
            "g1,g2,g3",
            "--chain",
            "ltc-regtest",
            "--name",
            "treasury",
            "--json",
        ],
    );
    assert!(ok, "{out}{err}");
    let wallet: WalletDescriptor = serde_json::from_str(&out).expect("wallet json");
    assert!(
        err.contains("create frost wallet treasury on ltc-regtest: 2-of-3"),
        "the change is named: {err}"
    );
    assert!(
        wallet.address.starts_with("rltc1p"),
        "a Taproot address: {}",
        wallet.address
    );
    assert_eq!(
        (
            wallet.model.as_str(),
            wallet.threshold,
            wallet.guardians.len()
        ),
        ("frost", Some(2), 3)
    );
    assert_eq!(wallet.transcript.as_ref().map(String::len), Some(64));

    // Recorded once, with the ceremony; `wallet show` reads it back from the trail.
    let js = nats.js().await;
    let created: Vec<_> = all_events(&js)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::WalletCreated)
        .collect();
    assert_eq!(created.len(), 1);
    assert!(matches!(&created[0].1.payload, Payload::WalletCreated(w) if *w == wallet));
    let (ok, shown) = custos(&url, &["wallet", "show", "treasury", "--json"]);
    assert!(
        ok && serde_json::from_str::<WalletDescriptor>(&shown).ok() == Some(wallet.clone()),
        "{shown}"
    );

    // Each guardian holds its own share, encrypted: the file does not contain the
    // serialized group key in the clear.
    let group_key = hex::decode(wallet.group_key.as_deref().unwrap_or_default()).expect("hex");
    for id in ["g1", "g2", "g3"] {
        let share = std::fs::read(dir.path().join(id).join("shares").join("treasury.share"))
            .expect("share file");
        assert!(
            !share
                .windows(group_key.len())
                .any(|w| w == group_key.as_slice()),
            "{id}'s share file is not encrypted"
        );
    }

    // The wallet takes transfers.
    let to = taproot_address("rltc", [8; 32]);
    let reply = submit_json(&engine.client, &json!({"requestId": "first", "wallet": "treasury", "asset": "LTC", "destination": to, "amount": "0.5", "initiator": "erp"})).await;
    assert!(matches!(reply, IntakeReply::Accepted { .. }), "{reply:?}");

    // Rotation: new shares, same key and address, recorded; and again.
    let before =
        std::fs::read(dir.path().join("g1").join("shares").join("treasury.share")).expect("share");
    for round in 1..=2 {
        let (ok, out) = custos(&url, &["wallet", "rotate", "treasury"]);
        assert!(
            ok && out.contains(&wallet.address),
            "rotation {round}: {out}"
        );
    }
    let after =
        std::fs::read(dir.path().join("g1").join("shares").join("treasury.share")).expect("share");
    assert_ne!(before, after, "the share was replaced");
    let rotations: Vec<_> = all_events(&js)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::KeyRotationCeremony)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(rotations.len(), 2);
    assert!(
        matches!(&rotations[1].payload, Payload::KeyCeremony { wallet, public_digest, .. } if wallet == "treasury" && public_digest.len() == 64)
    );
    let (ok, shown) = custos(&url, &["wallet", "show", "treasury", "--json"]);
    assert!(
        ok && serde_json::from_str::<WalletDescriptor>(&shown).ok() == Some(wallet.clone()),
        "{shown}"
    );
    let (ok, out) = custos(&url, &["wallet", "rotate", "nope"]);
    assert!(!ok && out.contains("no wallet nope"), "{out}");

    // Guardian changes keep the address; `wallet show` follows the roster.
    let (ok, out) = custos(
        &url,
        &["wallet", "remove-guardian", "treasury", "--guardian", "g3"],
    );
    assert!(
        ok && out.contains("2-of-2") && out.contains(&wallet.address),
        "{out}"
    );
    let (ok, out) = custos(
        &url,
        &["wallet", "remove-guardian", "treasury", "--guardian", "g2"],
    );
    assert!(!ok && out.contains("threshold of 2"), "{out}");
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "add-guardian",
            "treasury",
            "--guardian",
            "g3",
            "--helpers",
            "g2,g1",
        ],
    );
    assert!(
        ok && out.contains("2-of-3") && out.contains(&wallet.address),
        "{out}"
    );
    let (ok, shown) = custos(&url, &["wallet", "show", "treasury", "--json"]);
    let shown: WalletDescriptor = serde_json::from_str(&shown).expect("wallet json");
    assert_eq!(
        (shown.guardians.len(), &shown.address, ok),
        (3, &wallet.address, true)
    );
    let (ok, out) = custos(
        &url,
        &["wallet", "add-guardian", "treasury", "--guardian", "g1"],
    );
    assert!(!ok && out.contains("g1 already guards"), "{out}");

    // A second wallet of the same name is refused and nothing more is recorded.
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "2",
            "--guardians",
            "g1,g2,g3",
            "--chain",
            "ltc-regtest",
            "--name",
            "treasury",
        ],
    );
    assert!(!ok, "{out}");
    // Bad parameters name the field.
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "4",
            "--guardians",
            "g1,g2,g3",
            "--chain",
            "ltc-regtest",
            "--name",
            "other",
        ],
    );
    assert!(!ok && out.contains("threshold"), "{out}");
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "2",
            "--guardians",
            "g1,g1,g3",
            "--chain",
            "ltc-regtest",
            "--name",
            "other",
        ],
    );
    assert!(!ok && out.contains("twice"), "{out}");
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "2",
            "--guardians",
            "g1,g2",
            "--chain",
            "doge",
            "--name",
            "other",
        ],
    );
    assert!(!ok && out.contains("chain"), "{out}");

    // A ceremony with a guardian that is not running fails, naming it, and leaves
    // no wallet behind; the failure is in the trail.
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "2",
            "--guardians",
            "g1,g2,g9",
            "--chain",
            "ltc-regtest",
            "--name",
            "broken",
        ],
    );
    assert!(!ok && out.contains("g9"), "{out}");
    let events = all_events(&js).await;
    assert!(
        !events
            .iter()
            .any(|(_, e)| e.event_type == EventType::WalletCreated && e.workflow_id == "broken")
    );

    let alert = events
        .iter()
        .filter(|(_, e)| e.event_type == EventType::AlertRaised)
        .map(|(_, e)| e.payload.clone())
        .find(|p| matches!(p, Payload::Alert { summary, .. } if summary.contains("broken")));
    assert!(
        matches!(&alert, Some(Payload::Alert { summary, .. }) if summary.contains("broken") && summary.contains("g9")),
        "{alert:?}"
    );

    // Guardians refuse a replayed ceremony (its change is applied), one no
    // change asked for, and garbage, and keep working.
    let ceremony_id = created[0]
        .1
        .metadata
        .get("ceremonyId")
        .cloned()
        .expect("ceremony id recorded");
    let roster: Vec<custos_workers::ceremony::RosterEntry> = wallet
        .guardians
        .iter()
        .map(|g| custos_workers::ceremony::RosterEntry {
            index: g.index,
            guardian: custos_custody::identity::GuardianPublic {
                id: g.id.clone(),
                signing_key: hex::decode(&g.signing_key)
                    .expect("hex")
                    .try_into()
                    .expect("32 bytes"),
                encryption_key: hex::decode(&g.encryption_key)
                    .expect("hex")
                    .try_into()
                    .expect("32 bytes"),
            },
        })
        .collect();
    let change = created[0]
        .1
        .metadata
        .get("change")
        .cloned()
        .expect("the approving change recorded");
    let unasked = GuardianRequest::DkgStart {
        ceremony_id: "dkg-unasked".into(),
        change: "change-nobody-asked".into(),
        min_signers: 2,
        roster: roster.clone(),
    };
    let answer = ask(&engine.client, "g1", codec::to_msgpack(&unasked)).await;
    assert!(
        matches!(&answer, GuardianReply::Refused { reason } if reason.contains("change-nobody-asked is not in the trail")),
        "{answer:?}"
    );
    let replay = GuardianRequest::DkgStart {
        ceremony_id,
        change,
        min_signers: 2,
        roster,
    };
    let answer = ask(&engine.client, "g1", codec::to_msgpack(&replay)).await;
    assert!(
        matches!(&answer, GuardianReply::Refused { reason } if reason.contains("Applied, not approved")),
        "{answer:?}"
    );
    assert!(
        matches!(ask(&engine.client, "g1", b"\xc1garbage".to_vec()).await, GuardianReply::Refused { reason } if reason.contains("undecodable"))
    );
    let (ok, out) = custos(
        &url,
        &[
            "wallet",
            "create",
            "--threshold",
            "3",
            "--guardians",
            "g3,g2,g1",
            "--chain",
            "btc-regtest",
            "--name",
            "vault",
        ],
    );
    assert!(ok && out.contains("bcrt1p"), "{out}");
    verify_stream(&js).await.expect("the trail verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardian_with_the_wrong_passphrase_refuses_to_start() {
    let nats = Nats::start(Durability::Default).await;
    let _engine = Engine::start(&nats).await;
    let url = nats.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let guardian = Guardian::start(&url, "g1", dir.path(), "right");
    assert!(eventually(Duration::from_secs(20), || announced(&nats, &["g1"])).await);
    drop(guardian);
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args([
            "guardian",
            "run",
            "--id",
            "g1",
            "--nats-url",
            &url,
            "--data-dir",
        ])
        .arg(dir.path().join("g1"))
        .env("CUSTOS_GUARDIAN_PASSPHRASE", "wrong")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And without any passphrase it says how to give one.
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args([
            "guardian",
            "run",
            "--id",
            "g1",
            "--nats-url",
            &url,
            "--data-dir",
        ])
        .arg(dir.path().join("g1"))
        .env_remove("CUSTOS_GUARDIAN_PASSPHRASE")
        .env_remove("CUSTOS_GUARDIAN_PASSPHRASE_FILE")
        .output()
        .expect("runs");
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("CUSTOS_GUARDIAN_PASSPHRASE_FILE")
    );
}
