//! Architecture invariants checked mechanically: the engine, the wire types and
//! the custody core do no IO, take no clock and no ambient randomness.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

/// Crates that mean IO, a runtime or a clock. (`getrandom` is not listed: cargo's
/// feature unification reaches it through `rand_core` when the binary uses `rand`;
/// the source check below forbids calling it.)
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-nats",
    "mio",
    "socket2",
    "hyper",
    "reqwest",
    "sqlx",
    "lettre",
    "slack-morphism",
    "axum",
    "chrono",
    "time",
];

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// The target triple this machine builds for, from `rustc -vV`.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("host triple")
        .to_string()
}

/// Normal (non-dev) dependencies of `package`, transitively, from `cargo metadata`.
fn dependencies_of(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Only the host's dependencies: crates for other targets (wasm) are never
    // downloaded by a build, so an offline resolve of them would fail.
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or(""), n))
        .collect();
    let root = names
        .iter()
        .find(|(_, n)| **n == package)
        .map(|(id, _)| *id)
        .expect("package in metadata");
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap_or("");
            if normal && seen.insert(names[dep_id].to_string()) {
                todo.push(dep_id);
            }
        }
    }
    seen
}

#[test]
fn pure_crates_depend_on_no_io_crate() {
    for package in ["custos-engine", "custos-schemas", "custos-custody"] {
        let deps = dependencies_of(package);
        let bad: Vec<&&str> = FORBIDDEN.iter().filter(|f| deps.contains(**f)).collect();
        assert!(
            bad.is_empty(),
            "{package} must do no IO, yet depends on {bad:?}"
        );
    }
}

#[test]
fn pure_crates_take_no_clock_file_network_or_rng() {
    const BANNED: &[&str] = &[
        "std::fs",
        "std::net::TcpStream",
        "std::net::UdpSocket",
        "SystemTime",
        "Instant::now",
        "thread_rng",
        "OsRng",
        "getrandom",
        "std::process",
        "std::env",
    ];
    let mut files = Vec::new();
    for dir in ["engine/src", "schemas/src", "custody/src"] {
        rust_files(&workspace_root().join(dir), &mut files);
    }
    assert!(files.len() > 10, "the source walk found only {files:?}");
    // TOTP verification is pure too: the caller passes the time and the secret.
    assert!(
        files.iter().any(|p| p.ends_with("engine/src/mfa.rs")),
        "the source walk missed engine/src/mfa.rs"
    );
    for path in files {
        let text = std::fs::read_to_string(&path).expect("source");
        for banned in BANNED {
            assert!(
                !text.contains(banned),
                "{}: uses {banned}; the pure core takes these as arguments",
                path.display()
            );
        }
    }
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
