//! The administrative commands end to end against `custos up`: `policy apply`,
//! `change show`, `freeze`, `user` and `role`, run as an administrator would.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_adapters::nats_server::free_port;

const DEFAULT: &str = include_str!("../../engine/src/policy/default.toml");

/// `erp` initiates; `erin`, `frank` and `grace` administer and approve for
/// `administrators`; `alice` approves transfers only.
const DIRECTORY: &str = r#"
[[user]]
id = "erp"
name = "ERP"
email = "erp@example.invalid"
roles = ["initiator"]

[[user]]
id = "alice"
name = "Alice"
email = "alice@example.invalid"
roles = ["approver"]
groups = ["approvers"]

[[user]]
id = "erin"
name = "Erin"
email = "erin@example.invalid"
roles = ["administrator", "approver"]
groups = ["administrators"]

[[user]]
id = "frank"
name = "Frank"
email = "frank@example.invalid"
roles = ["administrator", "approver"]
groups = ["administrators"]

[[user]]
id = "grace"
name = "Grace"
email = "grace@example.invalid"
roles = ["administrator", "approver"]
groups = ["administrators"]
"#;

struct Up {
    child: Child,
    url: String,
}

impl Up {
    /// Starts a light `custos up` (no node, no local guardians) on `dir`.
    fn start(dir: &Path) -> Up {
        let port = free_port().expect("port");
        let http = free_port().expect("port");
        let directory = dir.join("directory.toml");
        std::fs::write(&directory, DIRECTORY).expect("directory file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_custos"))
            .args(["up", "--profile", "default", "--no-local-node"])
            .args(["--local-guardians", "0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--nats-port", &port.to_string()])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .arg("--directory")
            .arg(&directory)
            .env_remove("CUSTOS_NATS_URL")
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
        std::thread::spawn(move || for _ in lines {});
        Up {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }

    /// Runs `custos ARGS` against this engine: success and both outputs together.
    fn custos(&self, args: &[&str]) -> (bool, String) {
        support::custos(&self.url, args)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        support::stop(&mut self.child);
    }
}

#[test]
fn policy_apply_awaits_administrators_and_refusals_name_the_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up = Up::start(dir.path());

    let changed = dir.path().join("changed.toml");
    std::fs::write(&changed, DEFAULT.replace("count = 4", "count = 3")).expect("write");
    let changed = changed.to_string_lossy().to_string();
    let (ok, out) = up.custos(&["policy", "apply", &changed, "--initiator", "erin"]);
    assert!(ok, "{out}");
    let id = out.lines().next().unwrap_or_default().to_string();
    assert!(id.starts_with("change-cli-"), "{out}");
    assert!(
        out.contains("awaiting approvals: administrators: 0 of 2")
            && out.contains("who may approve: frank, grace"),
        "{out}"
    );

    let (ok, out) = up.custos(&["change", "show", &id, "--json"]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["stage"], "awaiting_approvals", "{out}");
    assert_eq!(
        shown["missing"],
        serde_json::json!(["administrators: 0 of 2 (rule administration)"])
    );
    assert_eq!(shown["votes"], serde_json::json!([]));
    let (ok, out) = up.custos(&["change", "show", &id]);
    assert!(
        ok && out.contains("AwaitingApprovals") && out.contains("administrators: 0 of 2"),
        "{out}"
    );

    // A bad file is refused with its line and field, and nothing is requested.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        DEFAULT.replace("outcome = \"allow\"", "outcome = \"allow\"\nlimit = 5"),
    )
    .expect("write");
    let bad = bad.to_string_lossy().to_string();
    let (ok, out) = up.custos(&[
        "policy",
        "apply",
        &bad,
        "--initiator",
        "erin",
        "--request-id",
        "bad-1",
    ]);
    assert!(
        !ok && out.contains(&bad) && out.contains("line") && out.contains("limit"),
        "{out}"
    );
    let (ok, out) = up.custos(&["change", "show", "change-bad-1"]);
    assert!(!ok && out.contains("no change workflow"), "{out}");

    // Only an administrator freezes.
    let (ok, out) = up.custos(&["freeze", "--wallet", "treasury", "--initiator", "alice"]);
    assert!(
        !ok && out.contains("refused: initiator: alice is not an active administrator"),
        "{out}"
    );
}

#[test]
fn user_and_role_changes_await_administrators_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up = Up::start(dir.path());

    let (ok, out) = up.custos(&[
        "user",
        "add",
        "--id",
        "bob",
        "--name",
        "Bob",
        "--email",
        "bob@example.invalid",
        "--slack-id",
        "U024BE7LH",
        "--role",
        "initiator",
        "--initiator",
        "erin",
    ]);
    assert!(ok, "{out}");
    let id = out.lines().next().unwrap_or_default().to_string();
    assert!(id.starts_with("change-cli-"), "{out}");
    assert!(
        out.contains("add user bob (Bob <bob@example.invalid>), roles: initiator")
            && out.contains("awaiting approvals: administrators: 0 of 2")
            && out.contains("who may approve: frank, grace"),
        "{out}"
    );
    let (ok, out) = up.custos(&["change", "show", &id, "--json"]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["stage"], "awaiting_approvals", "{out}");
    assert_eq!(shown["decision"]["action"], "user-admin", "{out}");

    // Separation of duties: an approver never audits.
    let (ok, out) = up.custos(&[
        "role",
        "assign",
        "--user",
        "alice",
        "--role",
        "auditor",
        "--initiator",
        "erin",
    ]);
    assert!(
        !ok && out.contains("refused: change.role: alice holds approver")
            && out.contains("separation of duties"),
        "{out}"
    );
    let (ok, out) = up.custos(&["user", "deactivate", "nobody", "--initiator", "erin"]);
    assert!(
        !ok && out.contains("refused: change.user: no user \"nobody\""),
        "{out}"
    );
    let (ok, out) = up.custos(&[
        "role",
        "create",
        "treasurer",
        "--duty",
        "initiate",
        "--duty",
        "approve",
        "--initiator",
        "erin",
    ]);
    assert!(
        ok && out.contains("create role treasurer with duties initiate, approve")
            && out.contains("who may approve: frank, grace"),
        "{out}"
    );
}

#[test]
fn only_an_active_administrator_may_send_an_enrolment_link() {
    let dir = tempfile::tempdir().expect("temp dir");
    let up = Up::start(dir.path());
    let (ok, out) = up.custos(&["user", "enrol", "erin", "--initiator", "alice"]);
    assert!(
        !ok && out.contains(
            "refused: initiator: alice is not an administrator: only an active administrator may issue enrolment links"
        ),
        "{out}"
    );
    let (ok, out) = up.custos(&[
        "user",
        "enrol",
        "nobody",
        "--method",
        "passkey",
        "--initiator",
        "erin",
    ]);
    assert!(
        !ok && out.contains("refused: user: no user \"nobody\" in the directory"),
        "{out}"
    );
    // No channel configured: the console gets it (a single-machine trial);
    // the operator's own output names where it went, never the link.
    let (ok, out) = up.custos(&["user", "enrol", "alice", "--initiator", "erin"]);
    assert!(
        ok && out.contains("totp enrolment link for alice issued")
            && out.contains("sent to alice by console")
            && !out.contains("/enrol/"),
        "{out}"
    );
}
