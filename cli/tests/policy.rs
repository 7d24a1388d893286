//! `custos policy validate|diff|simulate` on files, as an administrator uses them.

use std::path::Path;
use std::process::Command;

fn custos(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_custos"))
        .args(args)
        .output()
        .expect("custos runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const DEFAULT: &str = include_str!("../../engine/src/policy/default.toml");

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().to_string()
}

#[test]
fn validate_names_the_line_and_field() {
    let dir = tempfile::tempdir().expect("dir");
    let good = write(dir.path(), "good.toml", DEFAULT);
    let (ok, out) = custos(&["policy", "validate", &good]);
    assert!(ok && out.contains("valid, 6 rules"), "{out}");
    let bad = write(
        dir.path(),
        "bad.toml",
        &DEFAULT.replace("outcome = \"allow\"", "outcome = \"allow\"\nlimit = 5"),
    );
    let (ok, out) = custos(&["policy", "validate", &bad]);
    assert!(
        !ok && out.contains("limit") && out.contains("line"),
        "{out}"
    );
}

#[test]
fn diff_shows_what_changes() {
    let dir = tempfile::tempdir().expect("dir");
    let same = write(
        dir.path(),
        "same.toml",
        &format!("# reformatted\n{DEFAULT}"),
    );
    let (ok, out) = custos(&["policy", "diff", &same]);
    assert!(
        ok && out.contains("no change"),
        "comments do not change the version: {out}"
    );
    let changed = write(
        dir.path(),
        "changed.toml",
        &DEFAULT.replace("count = 4", "count = 3"),
    );
    let (ok, out) = custos(&["policy", "diff", &changed]);
    assert!(
        ok && out.contains("~ rule transfers-above-10000") && !out.contains("no change"),
        "{out}"
    );
}

#[test]
fn simulate_decides_and_explains() {
    let dir = tempfile::tempdir().expect("dir");
    let policy = write(dir.path(), "p.toml", DEFAULT);
    let users = write(
        dir.path(),
        "users.toml",
        "[[user]]\nid = \"erp\"\nname = \"ERP\"\nemail = \"erp@example.com\"\nroles = [\"initiator\"]\n",
    );
    let request = |amount: &str| {
        write(
            dir.path(),
            &format!("req-{amount}.json"),
            &format!(
                r#"{{"requestId":"r","wallet":"treasury","asset":"LTC","destination":"rltc1qxyz","amount":"{amount}","initiator":"erp"}}"#
            ),
        )
    };
    let simulate = |amount: &str, extra: &[&str]| {
        let req = request(amount);
        let mut args = vec![
            "policy",
            "simulate",
            policy.as_str(),
            "--request",
            req.as_str(),
            "--chain",
            "ltc-regtest",
        ];
        args.extend_from_slice(extra);
        custos(&args)
    };
    let with = ["--directory", users.as_str(), "--price", "LTC=EUR:80"];
    // 200 LTC at EUR 80 = EUR 16,000: four treasury managers, whatever the wallet's key threshold.
    let (ok, out) = simulate("200", &with);
    assert!(ok, "{out}");
    let decision: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(decision["outcome"], "requireApprovals");
    assert_eq!(
        decision["approvals"][0]["groups"][0]["group"],
        "treasury-managers"
    );
    assert_eq!(decision["approvals"][0]["groups"][0]["count"], 4);
    // EUR 800: allowed outright.
    let (_, out) = simulate("10", &with);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["outcome"],
        "allow",
        "{out}"
    );
    // No price: fail closed, and say so.
    let (_, out) = simulate("10", &["--directory", users.as_str()]);
    let decision: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(decision["outcome"], "block");
    assert!(
        decision["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains("price"),
        "{out}"
    );
    // An initiator the directory does not know is blocked.
    let (_, out) = simulate("10", &["--price", "LTC=EUR:80"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["outcome"],
        "block",
        "{out}"
    );
}
