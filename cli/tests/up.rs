//! `custos up` as a newcomer runs it: an embedded nats-server child, intake, the
//! audit trail; Ctrl-C stops it cleanly; running it again on the same data
//! directory resumes where it stopped.

mod support;

use support::custos;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_adapters::nats_server::free_port;

struct Up {
    child: Child,
    /// Every line `custos up` prints after it is up.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Up {
    /// Starts `custos up` (approval pages on a free port, plus `extra`) and
    /// waits until it says it is up.
    fn start(data_dir: &std::path::Path, port: u16, extra: &[&str]) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["up", "--data-dir"])
            .arg(data_dir)
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
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("custos up starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "custos up did not come up");
            match lines.next() {
                Some(Ok(line)) if line.starts_with("Custos is up") => break,
                Some(Ok(_)) => {}
                _ => panic!("custos up exited before it was up"),
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Up { child, lines: rx }
    }

    /// Waits for a printed line containing `text`; all lines read on the way.
    fn wait_for(&self, text: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?} within {limit:?}; saw:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// Sends Ctrl-C and waits for a clean exit.
    fn interrupt(mut self) -> std::process::ExitStatus {
        support::interrupt(&mut self.child, Duration::from_secs(30))
            .expect("custos up stops after Ctrl-C")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        support::stop(&mut self.child);
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn up_runs_the_engine_stops_on_ctrl_c_and_resumes_on_the_same_data() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let url = format!("nats://127.0.0.1:{port}");
    let submit = [
        "tx",
        "submit",
        "--wallet",
        "treasury",
        "--asset",
        "LTC",
        "--to",
        "rltc1qxyz",
        "--amount",
        "1",
        "--request-id",
        "first",
    ];

    let up = Up::start(dir.path(), port, &["--no-local-node"]);
    let (ok, out) = custos(&url, &submit);
    assert!(!ok && out.contains("wallet: unknown wallet"), "{out}");
    assert!(dir.path().join("audit-key").exists() && dir.path().join("audit-key.pub").exists());
    let status = up.interrupt();
    assert!(
        status.success(),
        "custos up exits cleanly on Ctrl-C: {status}"
    );
    assert!(
        port_is_free(port),
        "the embedded nats-server stopped with it"
    );

    // Again on the same data directory: the same key, the same trail, which verifies.
    let key = std::fs::read_to_string(dir.path().join("audit-key.pub")).expect("pub key");
    let up = Up::start(dir.path(), port, &["--no-local-node"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit-key.pub")).expect("pub key"),
        key
    );
    let (ok, out) = custos(&url, &submit);
    assert!(!ok, "{out}");
    let data_dir = dir.path().to_string_lossy().to_string();
    let (ok, out) = custos(&url, &["audit", "verify", "--data-dir", &data_dir]);
    assert!(ok && out.starts_with("OK:"), "{out}");
    assert!(up.interrupt().success());
}

/// SIGKILLs the processes still running when dropped.
struct Reap(Vec<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in self.0.iter().filter(|pid| running(**pid)) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// A `custos up` killed outright (SIGKILL) cannot stop the servers and
/// guardians it started; the next one on the same data directory stops them,
/// then starts its own on the same port.
#[test]
fn the_next_up_stops_what_a_killed_one_left_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let mut up = Up::start(dir.path(), port, &[]);
    // The banner's last line comes once everything is started.
    up.wait_for("Ctrl-C stops it.", Duration::from_secs(60));
    let recorded = std::fs::read_to_string(dir.path().join("up.pids")).expect("the record");
    let children: Vec<u32> = recorded
        .lines()
        .skip(1)
        .map(|line| {
            let pid = line.split(' ').next().expect("a pid");
            pid.parse().expect("a number")
        })
        .collect();
    // Whatever the outcome, none of them outlives the test.
    let _reap = Reap(children.clone());
    assert!(
        children.len() >= 5,
        "nats-server, three guardians and the HD signer at least: {recorded}"
    );
    // A second one on the same data directory while it runs: refused.
    let second = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(["up", "--data-dir"])
        .arg(dir.path())
        .args(["--nats-port", &free_port().expect("port").to_string()])
        .output()
        .expect("custos up runs");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && said.contains("custos up already runs on"),
        "{said}"
    );
    up.child.kill().expect("SIGKILL");
    up.child.wait().expect("reaped");
    assert!(
        children.iter().all(|pid| running(*pid)) && !port_is_free(port),
        "its children outlive it: {recorded}"
    );

    let again = Up::start(dir.path(), port, &[]);
    let still: Vec<&u32> = children.iter().filter(|pid| running(**pid)).collect();
    assert!(still.is_empty(), "left running: {still:?} of {recorded}");
    assert!(again.interrupt().success());
    assert!(port_is_free(port), "the embedded nats-server stopped");
    assert!(
        !dir.path().join("up.pids").exists(),
        "a clean stop leaves no record"
    );
}

/// The quick start's first step from the command line: a wallet is asked for
/// as a change, and the default policy sends it to two administrators; nothing
/// is created until they approve (the demo walks through their approvals).
#[test]
fn quick_start_wallet_creation_awaits_two_administrators() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let url = format!("nats://127.0.0.1:{port}");
    let up = Up::start(dir.path(), port, &["--no-local-node"]);
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
            "--initiator",
            "cli",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("create frost wallet treasury on ltc-regtest: 2-of-3 among g1, g2, g3")
            && out.contains("awaiting approvals: administrators: 0 of 2")
            && out.contains("who may approve: erin, frank, grace"),
        "{out}"
    );
    let id = out.lines().next().unwrap_or_default().to_string();
    let (ok, shown) = custos(&url, &["change", "show", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert!(ok && shown["stage"] == "awaiting_approvals", "{shown}");
    let (ok, out) = custos(&url, &["wallet", "show", "treasury"]);
    assert!(!ok && out.contains("no wallet treasury"), "{out}");
    assert!(up.interrupt().success());
}

/// The quick start's main command end to end: a FROST 2-of-3 wallet approved
/// by two administrators on their links and made by three guardian processes, funded on a real litecoind (regtest), a transfer
/// that needs two approvals, answered on the web links with TOTP, signed by two
/// guardians that each checked the trail, broadcast, mined and confirmed; the
/// destination's balance changes on the node and the audit trail verifies.
#[test]
fn demo_takes_a_transfer_from_request_to_confirmation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port().expect("port");
    let url = format!("nats://127.0.0.1:{port}");
    let up = Up::start(dir.path(), port, &["--demo"]);
    let seen = up.wait_for("mined and confirmed", Duration::from_secs(240));
    let text = seen.join("\n");
    for step in [
        "an operator asks for wallet treasury: FROST 2-of-3 among guardians g1, g2, g3",
        "requires 2 from administrators",
        "erin approved the wallet on their link",
        "frank approved the wallet on their link",
        "WALLET_CREATED: every guardian signed the same group key and transcript",
        "requires 2 from approvers",
        "alice opened the link, typed the authenticator code and approved",
        "bob opened the link, typed the authenticator code and approved",
        "two guardians checked the trail and signed; the node accepted txid",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    let id = text
        .split_whitespace()
        .find(|w| w.starts_with("tx-"))
        .map(|w| w.trim_end_matches(':').to_string())
        .expect("a workflow id");
    let (ok, out) = custos(&url, &["tx", "show", &id, "--json"]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["stage"], "confirmed", "{out}");
    assert_eq!(
        shown["approvals"].as_array().map(Vec::len),
        Some(2),
        "{out}"
    );
    let txid = shown["txid"].as_str().expect("txid");
    assert_eq!(shown["confirmation"]["txid"], txid);
    let events: Vec<&str> = shown["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["eventType"].as_str())
        .collect();
    assert_eq!(
        events,
        [
            "TRANSACTION_CREATED",
            "POLICY_EVALUATED",
            "TRANSACTION_APPROVED",
            "TRANSACTION_APPROVED",
            "TRANSACTION_BUILT",
            "TRANSACTION_SIGNED",
            "TRANSACTION_BROADCAST",
            "TRANSACTION_CONFIRMED"
        ]
    );
    // The node itself says the destination received the 20 LTC.
    let rpc_port = text
        .split("local litecoind (RPC 127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .expect("the node's RPC port");
    let destination = text
        .split("requests 20 LTC to ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .expect("the destination");
    let node = custos_adapters::bitcoind::Bitcoind::new(
        &format!("http://127.0.0.1:{rpc_port}"),
        "custos",
        "regtest-only",
    )
    .expect("rpc client");
    let received: f64 = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(node.call("getreceivedbyaddress", serde_json::json!([destination, 1])))
        .expect("getreceivedbyaddress");
    assert_eq!(received, 20.0);
    // And the wallet holds the change: 40 LTC funded, 20 paid, minus the fee.
    let (ok, out) = custos(&url, &["wallet", "balance", "treasury", "--json"]);
    assert!(ok, "{out}");
    let balance: serde_json::Value = serde_json::from_str(&out).expect("json");
    let sat = balance["confirmedSat"].as_u64().expect("confirmedSat");
    assert!((1_999_000_000..2_000_000_000).contains(&sat), "{out}");
    let key = dir.path().join("audit-key.pub");
    let (ok, out) = custos(&url, &["audit", "verify", "--key", &key.to_string_lossy()]);
    assert!(ok && out.contains("OK"), "{out}");
    assert!(up.interrupt().success());
}
