//! The EVM path through the binary: `custos up` with its local anvil and HD
//! signer s1; an HD wallet asked for with `custos wallet create --model hd`,
//! approved by two administrators, funded from anvil's dev account; a small
//! transfer allowed by the default policy, signed by s1, broadcast and
//! confirmed; `custos tx show --json` gives the txid and confirmations and
//! `custos wallet balance` the wallet's wei.
//!
//! The administrators' approvals go to the ballot box the approval channels
//! hand them to (over `custos up`'s NATS, with the append service as the
//! ledger): the web links with TOTP in front of it are the demo test's.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_adapters::evm::EvmRpc;
use custos_adapters::nats_server::free_port;
use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
use custos_workers::Shutdown;
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::{Ballot, BallotBox, Receipt};
use custos_workers::remote::RemoteLedger;
use custos_workers::trail::Trail;
use serde_json::{Value, json};

/// Anvil's first dev account (funded, unlocked).
const DEV_ACCOUNT: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
const DESTINATION: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
const ETHER: u128 = 1_000_000_000_000_000_000;

struct Up {
    child: Child,
    url: String,
    /// The local anvil's JSON-RPC URL, as `custos up` printed it.
    anvil: String,
}

impl Up {
    fn start(dir: &std::path::Path) -> Up {
        let port = free_port().expect("port");
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["up", "--profile", "default", "--local-guardians", "0"])
            .arg("--data-dir")
            .arg(dir)
            .args(["--nats-port", &port.to_string()])
            .args(["--http-addr", "127.0.0.1:0"])
            .args([
                "--directory",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo/directory.toml"),
            ])
            .args([
                "--prices",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo/prices.toml"),
            ])
            .env_remove("CUSTOS_NATS_URL")
            .env_remove("CUSTOS_EVM_RPC")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("custos up starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut anvil, mut signer) = (None, false);
        loop {
            assert!(Instant::now() < deadline, "custos up did not come up");
            match lines.next() {
                Some(Ok(line)) if line.contains("local anvil (RPC ") => {
                    let rpc = line
                        .split("local anvil (RPC ")
                        .nth(1)
                        .and_then(|s| s.split(',').next())
                        .expect("the anvil RPC address");
                    anvil = Some(format!("http://{rpc}"));
                }
                Some(Ok(line)) if line.contains("EVM         none") => {
                    panic!("no anvil: {line} (run scripts/install-deps)")
                }
                Some(Ok(line)) if line.starts_with("  HD signer") => signer = true,
                Some(Ok(line)) if line.starts_with("Ctrl-C stops it") => break,
                Some(Ok(_)) => {}
                _ => panic!("custos up exited before it was up"),
            }
        }
        assert!(signer, "custos up starts the local HD signer s1");
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Up {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            anvil: anvil.expect("anvil"),
        }
    }

    /// Runs `custos ARGS` against this engine: success and both outputs together.
    fn custos(&self, args: &[&str]) -> (bool, String) {
        support::custos(&self.url, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let (ok, out) = self.custos(args);
        assert!(ok, "custos {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Polls `custos ARGS` until `done` holds for its JSON answer.
    fn until(&self, args: &[&str], what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (ok, out) = self.custos(args);
            if ok && let Ok(v) = serde_json::from_str::<Value>(&out) {
                if done(&v) {
                    return v;
                }
                assert!(Instant::now() < deadline, "{what}: {v}");
            } else {
                assert!(Instant::now() < deadline, "{what}: {out}");
            }
            // Poll: the engine moves the workflow on in the background.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        support::stop(&mut self.child);
    }
}

/// `erin` and `frank` approve `change_id` through the ballot box.
async fn administrators_approve(url: &str, change_id: &str) {
    let client = async_nats::connect(url).await.expect("nats");
    let (_stop, shutdown) = Shutdown::new();
    let trail = Trail::follow(async_nats::jetstream::new(client.clone()), shutdown)
        .await
        .expect("trail");
    let ballots = TrailBallotBox::new(trail, RemoteLedger::new(client));
    let notice = ballots.notice(change_id).await.expect("the change asks");
    for (user, quorum) in [("erin", false), ("frank", true)] {
        let receipt = ballots
            .cast(Ballot {
                workflow_id: change_id.into(),
                user_id: user.into(),
                vote: ApprovalVote {
                    vote: Vote::Approve,
                    request_hash: notice.request_hash.clone(),
                    policy_version: notice.policy_version.clone(),
                    channel: ApprovalChannel::Email,
                    mfa: MfaMethod::Totp,
                    comment: None,
                },
                masked_ip: None,
                user_agent: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{user}'s approval: {e}"));
        assert_eq!(
            receipt,
            Receipt::Recorded {
                quorum_reached: quorum
            }
        );
    }
}

/// Pays `wei` from anvil's dev account to `to` and waits for the receipt.
async fn fund(anvil: &str, to: &str, wei: u128) {
    let rpc = EvmRpc::new(anvil).expect("rpc");
    let hash: String = rpc
        .call(
            "eth_sendTransaction",
            json!([{"from": DEV_ACCOUNT, "to": to, "value": format!("{wei:#x}")}]),
        )
        .await
        .expect("funding");
    let deadline = Instant::now() + Duration::from_secs(20);
    while rpc.receipt(&hash).await.expect("rpc").is_none() {
        assert!(Instant::now() < deadline, "no receipt for {hash}");
        // Poll: anvil mines just after answering.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hd_wallet_made_and_paid_from_through_custos_up_on_anvil() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up = Up::start(dir.path());

    let (ok, out) = up.custos(&[
        "wallet",
        "create",
        "--model",
        "hd",
        "--chain",
        "evm-31337",
        "--guardians",
        "s1",
        "--threshold",
        "1",
        "--name",
        "hot",
        "--initiator",
        "cli",
    ]);
    assert!(
        ok && out.contains("awaiting approvals: administrators: 0 of 2"),
        "{out}"
    );
    let change_id = out.lines().next().unwrap_or_default().to_string();
    administrators_approve(&up.url, &change_id).await;
    let wallet = up.until(
        &["wallet", "show", "hot", "--json"],
        "wallet hot made",
        |w| w["address"].is_string(),
    );
    assert_eq!(wallet["model"], "hd", "{wallet}");
    let address = wallet["address"].as_str().expect("address").to_string();
    assert!(address.starts_with("0x") && address.len() == 42, "{wallet}");

    fund(&up.anvil, &address, ETHER).await;
    let balance = up.json(&["wallet", "balance", "hot", "--json"]);
    assert_eq!(balance["wei"], ETHER.to_string(), "{balance}");
    assert_eq!(balance["asset"], "ETH", "{balance}");
    assert_eq!(balance["amount"], "1", "{balance}");

    // 0.01 ETH at EUR 3,000: EUR 30, allowed without approvals.
    let (ok, out) = up.custos(&[
        "tx",
        "submit",
        "--wallet",
        "hot",
        "--asset",
        "ETH",
        "--to",
        DESTINATION,
        "--amount",
        "0.01",
        "--initiator",
        "erp",
        "--request-id",
        "evm-1",
    ]);
    assert!(ok, "{out}");
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("tx-"))
        .expect("a workflow id")
        .to_string();
    let shown = up.until(&["tx", "show", &id, "--json"], "transfer confirmed", |t| {
        t["stage"] == "confirmed" || t["stage"] == "failed" || t["stage"] == "rejected"
    });
    assert_eq!(shown["stage"], "confirmed", "{shown}");
    let txid = shown["txid"].as_str().expect("txid");
    assert!(txid.starts_with("0x") && txid.len() == 66, "{shown}");
    assert_eq!(shown["confirmation"]["txid"], txid, "{shown}");
    assert!(
        shown["confirmation"]["confirmations"].as_u64() >= Some(1),
        "{shown}"
    );

    // The node says the destination was paid, and the wallet's balance is
    // what is left after the amount and the gas.
    let rpc = EvmRpc::new(&up.anvil).expect("rpc");
    let receipt = rpc.receipt(txid).await.expect("rpc").expect("mined");
    assert!(receipt.success);
    let balance = up.json(&["wallet", "balance", "hot", "--json"]);
    let wei: u128 = balance["wei"]
        .as_str()
        .and_then(|w| w.parse().ok())
        .expect("wei");
    assert_eq!(
        wei,
        rpc.balance(&address).await.expect("balance"),
        "{balance}"
    );
    assert!(
        wei < ETHER - ETHER / 100 && wei > ETHER - ETHER / 50,
        "{balance}"
    );
    let (ok, out) = up.custos(&["wallet", "balance", "hot"]);
    assert!(
        ok && out.contains(" ETH (")
            && out.contains(&format!("{wei} wei"))
            && out.contains(&address),
        "{out}"
    );
}
