//! The `custos` binary's `tx` and `audit` commands end to end: a real nats-server,
//! the engine in this process, and the binary run as an operator or auditor would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use custos_adapters::nats_server::Durability;
use custos_engine::chain::{ChainHash, sign_checkpoint};
use custos_schemas::{Checkpoint, EventType, codec, subjects};
use custos_tests::*;
use custos_workers::ledger::LedgerConfig;
use serde_json::Value;

const WALLET: &str = "w";

/// What one run of the binary did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Asserts a zero exit and returns standard output.
    fn ok(&self) -> &str {
        assert!(self.success(), "expected success: {self:?}");
        &self.stdout
    }

    /// Asserts a failing exit (not a crash) and returns both outputs together.
    fn failed(&self) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit: {self:?}"
        );
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A server, the engine on it, a wallet, and a scratch directory the binary runs in
/// (so no `.custos` data directory of the developer's is picked up).
struct World {
    nats: Nats,
    _engine: Engine,
    dir: tempfile::TempDir,
    to: String,
    key_hex: String,
}

impl World {
    async fn start() -> World {
        Self::start_with(quiet_config()).await
    }

    async fn start_with(config: LedgerConfig) -> World {
        let nats = Nats::start(Durability::Default).await;
        let engine = Engine::start_with(&nats, config).await;
        append_ok(
            &engine.ledger,
            vec![wallet_created(
                WALLET,
                "ltc-regtest",
                &taproot_address("rltc", [1; 32]),
            )],
        )
        .await;
        World {
            nats,
            _engine: engine,
            dir: tempfile::tempdir().expect("temp dir"),
            to: taproot_address("rltc", [9; 32]),
            key_hex: hex::encode(audit_key().verifying_key().as_bytes()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `custos ARGS --nats-url URL`.
    async fn custos(&self, args: &[&str]) -> Out {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        cmd.args(args).arg("--nats-url").arg(self.nats.url());
        self.run(cmd).await
    }

    /// Runs `custos ARGS` with the server named by `CUSTOS_NATS_URL` only.
    async fn custos_env(&self, args: &[&str]) -> Out {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_custos"));
        cmd.args(args).env("CUSTOS_NATS_URL", self.nats.url());
        self.run(cmd).await
    }

    async fn run(&self, mut cmd: std::process::Command) -> Out {
        cmd.current_dir(self.dir.path())
            .env_remove("CUSTOS_DATA_DIR")
            .env_remove("CUSTOS_USER")
            .env("CUSTOS_LOG", "warn");
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("custos finishes within 60 s")
            .expect("custos runs");
        Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `custos tx submit` of `amount` to the usual destination.
    async fn submit(&self, request_id: &str, amount: &str, initiator: &str) -> Out {
        let amount = format!("--amount={amount}");
        self.custos(&[
            "tx",
            "submit",
            "--wallet",
            WALLET,
            "--asset",
            "LTC",
            "--to",
            &self.to,
            &amount,
            "--initiator",
            initiator,
            "--request-id",
            request_id,
        ])
        .await
    }

    /// Some accepted transfers (by alice and bob) and some refused ones; returns the
    /// accepted workflow ids.
    async fn populate(&self, accepted: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..accepted {
            let initiator = if i % 2 == 0 { "alice" } else { "bob" };
            let out = self
                .submit(&format!("ok-{i}"), &format!("0.{}", i + 1), initiator)
                .await;
            ids.push(out.ok().trim().to_string());
            if i == 1 {
                self.submit("bad-neg", "-1", "bob").await.failed();
            }
            if i == 3 {
                self.submit("bad-zero", "0", "carol").await.failed();
            }
        }
        ids
    }

    async fn last_seq(&self) -> u64 {
        let js = self.nats.js().await;
        let mut stream = js
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .expect("stream");
        stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence
    }
}

/// No checkpoint by time during a test: every checkpoint comes from `checkpoint_every`.
fn quiet_config() -> LedgerConfig {
    LedgerConfig {
        checkpoint_interval: Duration::from_secs(3600),
        ..LedgerConfig::new(audit_key())
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read export")
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write export");
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).expect("a JSON line")
}

fn seq_of(line: &str) -> u64 {
    json(line)["seq"].as_u64().expect("seq")
}

/// Asserts that verify failed and named `seq` as the break.
fn assert_broken_at(out: &Out, seq: u64, what: &str) -> String {
    let text = out.failed();
    assert!(
        text.contains("BROKEN") && text.contains(&format!("seq {seq}:")),
        "{what}: expected the break at seq {seq}, got: {text}"
    );
    text
}

/// RFC 4180 records (quoted fields may hold commas, quotes and newlines).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_submit_show_and_list() {
    let w = World::start().await;
    let first = w.submit("r-1", "1.5", "alice").await;
    let id = first.ok().trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{first:?}"
    );
    let created: Vec<_> = all_events(&w.nats.js().await)
        .await
        .into_iter()
        .filter(|(_, e)| e.event_type == EventType::TransactionCreated)
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].1.workflow_id, id);

    // The same request id again: the same workflow, said to be a duplicate.
    let again = w.submit("r-1", "1.5", "alice").await;
    assert_eq!(again.ok().trim(), format!("{id} (already submitted)"));

    // A bad amount: refused, naming the field, no workflow id printed.
    let bad = w.submit("r-bad", "-1", "alice").await;
    let text = bad.failed();
    assert!(text.contains("amount"), "{text}");
    assert!(!bad.stdout.contains(&id), "{bad:?}");

    // The same, machine-readable.
    let bad_json = w
        .custos(&[
            "tx",
            "submit",
            "--json",
            "--wallet",
            WALLET,
            "--asset",
            "LTC",
            "--to",
            &w.to,
            "--amount",
            "-2",
            "--request-id",
            "r-bad-2",
        ])
        .await;
    bad_json.failed();
    let reply = json(&bad_json.stdout);
    assert!(reply.to_string().contains("amount"), "{reply}");

    let show = w.custos(&["tx", "show", &id, "--json"]).await;
    let shown = json(show.ok());
    assert_eq!(shown["workflowId"], id.as_str());
    assert_eq!(shown["stage"], "awaiting_policy", "{shown}");
    assert_eq!(shown["waitingFor"], "policy step", "{shown}");
    assert_eq!(shown["request"]["amount"], "1.5", "{shown}");
    assert_eq!(shown["request"]["initiator"], "alice", "{shown}");
    assert_eq!(shown["events"].as_array().map(Vec::len), Some(1), "{shown}");

    // The human form says the same.
    let human = w.custos(&["tx", "show", &id]).await;
    let human = human.ok();
    assert!(
        human.contains("AwaitingPolicy") && human.contains("policy step"),
        "{human}"
    );

    let list = w.custos(&["tx", "list", "--json"]).await;
    let rows = json(list.ok());
    let rows = rows.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 1, "only the accepted transfer: {rows:?}");
    assert_eq!(rows[0]["workflowId"], id.as_str());
    assert_eq!(rows[0]["stage"], "awaiting_policy");

    // An unknown workflow is an error.
    w.custos(&["tx", "show", "no-such-workflow"]).await.failed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_live_stream_with_the_trusted_key() {
    let w = World::start_with(LedgerConfig {
        checkpoint_every: 5,
        ..quiet_config()
    })
    .await;
    w.populate(6).await;
    let events = all_events(&w.nats.js().await).await;
    let checkpoints = events
        .iter()
        .filter(|(_, e)| e.event_type == EventType::AuditCheckpoint)
        .count();
    assert!(checkpoints >= 1, "the engine wrote a checkpoint");

    let out = w.custos(&["audit", "verify", "--key", &w.key_hex]).await;
    let text = out.ok();
    assert!(text.starts_with("OK"), "{text}");
    let (last, _) = events.last().expect("events");
    assert!(
        text.contains(&format!(
            "{} events verified up to seq {last}",
            events.len()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{checkpoints} checkpoint(s) verified")),
        "{text}"
    );

    // The key may also be given as a file holding it.
    let key_file = w.path("audit-key.pub");
    std::fs::write(&key_file, format!("{}\n", w.key_hex)).expect("write key");
    let out = w
        .custos(&["audit", "verify", "--key", &key_file.to_string_lossy()])
        .await;
    assert!(out.ok().starts_with("OK"), "{out:?}");

    // Checkpoints signed by a key the auditor does not trust are refused.
    let other = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[7; 32])
            .verifying_key()
            .as_bytes(),
    );
    let out = w.custos(&["audit", "verify", "--key", &other]).await;
    let text = out.failed();
    assert!(text.contains("untrusted key"), "{text}");
}

/// Exports the trail to a JSON-lines file and checks it verifies.
async fn export_jsonl(w: &World, name: &str) -> (PathBuf, Vec<String>) {
    let path = w.path(name);
    let out = w
        .custos(&[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--out",
            &path.to_string_lossy(),
        ])
        .await;
    out.ok();
    let lines = read_lines(&path);
    assert!(
        out.stderr
            .contains(&format!("exported {} events", lines.len())),
        "{out:?}"
    );
    let verify = w
        .custos(&[
            "audit",
            "verify",
            "--file",
            &path.to_string_lossy(),
            "--key",
            &w.key_hex,
        ])
        .await;
    assert!(verify.ok().starts_with("OK"), "{verify:?}");
    (path, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_export_finds_tampering_and_names_the_sequence() {
    let w = World::start().await;
    w.populate(5).await;
    let (_, lines) = export_jsonl(&w, "trail.jsonl").await;
    assert_eq!(lines.len() as u64, w.last_seq().await);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(seq_of(line), i as u64 + 1, "export in stream order");
    }
    // A transfer's creation in the middle of the trail.
    let k = lines
        .iter()
        .enumerate()
        .skip(2)
        .find(|(_, l)| json(l)["eventType"] == "TRANSACTION_CREATED")
        .map(|(k, _)| k)
        .expect("a TRANSACTION_CREATED line");
    assert!(k + 2 < lines.len());
    let (seq_k, seq_next, last) = (
        seq_of(&lines[k]),
        seq_of(&lines[k + 1]),
        seq_of(&lines[lines.len() - 1]),
    );

    let verify = |name: &'static str, tampered: Vec<String>| {
        let w = &w;
        async move {
            let path = w.path(name);
            write_lines(&path, &tampered);
            w.custos(&[
                "audit",
                "verify",
                "--file",
                &path.to_string_lossy(),
                "--key",
                &w.key_hex,
            ])
            .await
        }
    };

    // (a) A modified amount.
    let mut modified = lines.clone();
    let mut v = json(&modified[k]);
    let amount = &mut v["payload"]["transferRequested"]["request"]["amount"];
    assert!(amount.is_string(), "{v}");
    *amount = "999".into();
    modified[k] = v.to_string();
    let text = assert_broken_at(&verify("a.jsonl", modified).await, seq_k, "modified amount");
    assert!(text.contains("modified"), "{text}");

    // (a') A modified envelope field: who did it.
    let mut modified = lines.clone();
    let mut v = json(&modified[k]);
    v["actor"]["userId"] = "mallory".into();
    modified[k] = v.to_string();
    assert_broken_at(&verify("a2.jsonl", modified).await, seq_k, "modified actor");

    // (a'') The readable time, which an auditor reads, is bound to the timestamp.
    let mut modified = lines.clone();
    let mut v = json(&modified[k]);
    v["time"] = "1999-01-01T00:00:00Z".into();
    modified[k] = v.to_string();
    assert_broken_at(&verify("a3.jsonl", modified).await, seq_k, "modified time");

    // (b) A deleted event: the next one names the gap.
    let mut deleted = lines.clone();
    deleted.remove(k);
    let text = assert_broken_at(&verify("b.jsonl", deleted).await, seq_next, "deleted");
    assert!(text.contains("missing"), "{text}");

    // (b') Deleted and renumbered to hide the gap.
    let mut renumbered: Vec<String> = lines.clone();
    renumbered.remove(k);
    for line in renumbered.iter_mut().skip(k) {
        let mut v = json(line);
        v["seq"] = (v["seq"].as_u64().expect("seq") - 1).into();
        *line = v.to_string();
    }
    assert_broken_at(&verify("b2.jsonl", renumbered).await, seq_k, "renumbered");

    // (c) A forged copy of another event inserted after line k, numbered to fit.
    let mut inserted = lines.clone();
    let mut forged = json(&lines[1]);
    forged["seq"] = (seq_k + 1).into();
    inserted.insert(k + 1, forged.to_string());
    let text = assert_broken_at(&verify("c.jsonl", inserted).await, seq_k + 1, "inserted");
    assert!(text.contains("inserted"), "{text}");

    // (c') ...or appended after the last event.
    let mut appended = lines.clone();
    let mut forged = json(&lines[k]);
    forged["seq"] = (last + 1).into();
    appended.push(forged.to_string());
    assert_broken_at(&verify("c2.jsonl", appended).await, last + 1, "appended");

    // (d) Two events swapped.
    let mut swapped = lines.clone();
    swapped.swap(k, k + 1);
    assert_broken_at(&verify("d.jsonl", swapped).await, seq_next, "swapped");

    // A line that is not an event at all is an error naming the line, not a pass.
    let mut garbage = lines.clone();
    garbage[k] = "{\"seq\": 1}".into();
    let out = verify("g.jsonl", garbage).await;
    let text = out.failed();
    assert!(text.contains(&format!(":{}", k + 1)), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_export_against_a_kept_checkpoint_detects_truncation() {
    let w = World::start_with(LedgerConfig {
        checkpoint_every: 5,
        ..quiet_config()
    })
    .await;
    w.populate(10).await;
    let cp_path = w.path("checkpoint.json");
    let out = w
        .custos(&["audit", "checkpoint", "--out", &cp_path.to_string_lossy()])
        .await;
    let text = out.ok().to_string();
    let cp: Checkpoint =
        serde_json::from_str(&std::fs::read_to_string(&cp_path).expect("checkpoint file"))
            .expect("a checkpoint");
    assert!(
        text.contains(&format!("checkpoint of seq {}", cp.sequence)),
        "{text}"
    );
    assert_eq!(cp.public_key, w.key_hex);
    assert!(cp.sequence > 5, "the latest checkpoint: {cp:?}");

    let (full, lines) = export_jsonl(&w, "trail.jsonl").await;
    assert!(seq_of(lines.last().expect("lines")) > cp.sequence);
    let cp_arg = cp_path.to_string_lossy().to_string();
    let verify = |file: PathBuf, checkpoint: String| {
        let w = &w;
        async move {
            w.custos(&[
                "audit",
                "verify",
                "--file",
                &file.to_string_lossy(),
                "--checkpoint",
                &checkpoint,
                "--key",
                &w.key_hex,
            ])
            .await
        }
    };

    // The whole trail contains the checkpoint's prefix; so does the live stream.
    let out = verify(full.clone(), cp_arg.clone()).await;
    assert!(out.ok().starts_with("OK"), "{out:?}");
    let live = w
        .custos(&[
            "audit",
            "verify",
            "--checkpoint",
            &cp_arg,
            "--key",
            &w.key_hex,
        ])
        .await;
    assert!(live.ok().starts_with("OK"), "{live:?}");

    // Ending exactly at the checkpoint's sequence is still whole.
    let upto = w.path("upto.jsonl");
    let kept: Vec<String> = lines
        .iter()
        .filter(|l| seq_of(l) <= cp.sequence)
        .cloned()
        .collect();
    write_lines(&upto, &kept);
    let out = verify(upto, cp_arg.clone()).await;
    assert!(out.ok().starts_with("OK"), "{out:?}");

    // One event fewer: truncated, and said so, with or without --key.
    let cut = w.path("cut.jsonl");
    let kept: Vec<String> = lines
        .iter()
        .filter(|l| seq_of(l) < cp.sequence)
        .cloned()
        .collect();
    write_lines(&cut, &kept);
    let out = verify(cut.clone(), cp_arg.clone()).await;
    let text = out.failed();
    assert!(
        text.contains("truncated") && text.contains(&format!("seq {}", cp.sequence)),
        "{text}"
    );
    let out = w
        .custos(&[
            "audit",
            "verify",
            "--file",
            &cut.to_string_lossy(),
            "--checkpoint",
            &cp_arg,
        ])
        .await;
    let text = out.failed();
    assert!(text.contains("truncated"), "{text}");

    // Without the kept checkpoint the cut trail looks whole: that is what it is for.
    let out = w
        .custos(&[
            "audit",
            "verify",
            "--file",
            &cut.to_string_lossy(),
            "--key",
            &w.key_hex,
        ])
        .await;
    assert!(out.ok().starts_with("OK"), "{out:?}");

    // A checkpoint signed by another key is refused when the trusted key is given.
    let head = ChainHash::from_hex(&cp.head_hash).expect("head hash");
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let foreign = sign_checkpoint(&other, subjects::EVENTS_STREAM, cp.sequence, &head);
    let foreign_path = w.path("foreign-checkpoint.json");
    std::fs::write(
        &foreign_path,
        serde_json::to_string_pretty(&foreign).expect("json"),
    )
    .expect("write");
    let out = verify(full.clone(), foreign_path.to_string_lossy().to_string()).await;
    let text = out.failed();
    assert!(text.contains("untrusted key"), "{text}");

    // A checkpoint of another history (right key, other head) does not match.
    let forged = sign_checkpoint(
        &audit_key(),
        subjects::EVENTS_STREAM,
        cp.sequence,
        &ChainHash([3; 32]),
    );
    let forged_path = w.path("forged-checkpoint.json");
    std::fs::write(
        &forged_path,
        serde_json::to_string_pretty(&forged).expect("json"),
    )
    .expect("write");
    let out = verify(full.clone(), forged_path.to_string_lossy().to_string()).await;
    assert_broken_at(&out, cp.sequence, "checkpoint of another history");

    // A checkpoint whose signature was edited is refused.
    let mut bad_sig = cp.clone();
    bad_sig.head_hash = forged.head_hash.clone();
    let bad_path = w.path("bad-sig.json");
    std::fs::write(
        &bad_path,
        serde_json::to_string_pretty(&bad_sig).expect("json"),
    )
    .expect("write");
    let text = verify(full, bad_path.to_string_lossy().to_string())
        .await
        .failed();
    assert!(text.contains("signature does not verify"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_csv_and_filters() {
    let w = World::start().await;
    w.populate(5).await;
    let events = all_events(&w.nats.js().await).await;

    let csv = w.path("trail.csv");
    let out = w
        .custos(&[
            "audit",
            "export",
            "--format",
            "csv",
            "--out",
            &csv.to_string_lossy(),
        ])
        .await;
    out.ok();
    assert!(
        out.stderr
            .contains(&format!("exported {} events", events.len())),
        "{out:?}"
    );
    let rows = parse_csv(&std::fs::read_to_string(&csv).expect("csv"));
    let header = &rows[0];
    assert_eq!(
        header[..4],
        ["seq", "time", "id", "eventType"].map(String::from)
    );
    assert_eq!(header.len(), 21);
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    assert_eq!(rows.len(), events.len() + 1, "a header and a row per event");
    for (row, (seq, event)) in rows[1..].iter().zip(&events) {
        assert_eq!(row.len(), header.len(), "{row:?}");
        assert_eq!(row[col("seq")], seq.to_string());
        assert_eq!(row[col("id")], event.id);
        assert_eq!(row[col("eventType")], event.event_type.as_str());
        assert_eq!(row[col("actorUserId")], event.actor.user_id);
        assert_eq!(row[col("hash")].len(), 64, "{row:?}");
    }
    // A refused amount of -1 cannot run as a spreadsheet formula.
    let refused = rows[1..]
        .iter()
        .find(|r| r[col("targetId")] == "bad-neg")
        .expect("the refused request's row");
    assert_eq!(refused[col("targetAmount")], "'-1");

    // --type keeps only that type.
    let created = events
        .iter()
        .filter(|(_, e)| e.event_type == EventType::TransactionCreated)
        .count();
    let typed = w.path("created.jsonl");
    w.custos(&[
        "audit",
        "export",
        "--type",
        "TRANSACTION_CREATED",
        "--out",
        &typed.to_string_lossy(),
    ])
    .await
    .ok();
    let lines = read_lines(&typed);
    assert_eq!(lines.len(), created);
    assert!(
        lines
            .iter()
            .all(|l| json(l)["eventType"] == "TRANSACTION_CREATED")
    );

    // --actor keeps only that user's events.
    let by_bob = events
        .iter()
        .filter(|(_, e)| e.actor.user_id == "bob")
        .count();
    assert!(by_bob >= 2, "bob made a transfer and a refused request");
    let bob = w.path("bob.csv");
    w.custos(&[
        "audit",
        "export",
        "--format",
        "csv",
        "--actor",
        "bob",
        "--out",
        &bob.to_string_lossy(),
    ])
    .await
    .ok();
    let rows = parse_csv(&std::fs::read_to_string(&bob).expect("csv"));
    assert_eq!(rows.len(), by_bob + 1);
    assert!(rows[1..].iter().all(|r| r[col("actorUserId")] == "bob"));

    // Both filters together.
    let both = w.path("both.jsonl");
    w.custos(&[
        "audit",
        "export",
        "--type",
        "TRANSACTION_CREATED",
        "--actor",
        "alice",
        "--out",
        &both.to_string_lossy(),
    ])
    .await
    .ok();
    let lines = read_lines(&both);
    assert_eq!(lines.len(), 3, "alice's three transfers: {lines:?}");

    // --since in the future: nothing; in the past: everything; --until in the past: nothing.
    let future = w.path("future.csv");
    let out = w
        .custos(&[
            "audit",
            "export",
            "--format",
            "csv",
            "--since",
            "2999-01-01T00:00:00Z",
            "--out",
            &future.to_string_lossy(),
        ])
        .await;
    out.ok();
    assert!(out.stderr.contains("exported 0 events"), "{out:?}");
    assert_eq!(
        parse_csv(&std::fs::read_to_string(&future).expect("csv")).len(),
        1
    );
    let past = w.path("past.jsonl");
    let out = w
        .custos(&[
            "audit",
            "export",
            "--since",
            "2000-01-01T00:00:00Z",
            "--out",
            &past.to_string_lossy(),
        ])
        .await;
    out.ok();
    assert_eq!(read_lines(&past).len(), events.len());
    let until = w.path("until.jsonl");
    let out = w
        .custos(&[
            "audit",
            "export",
            "--until",
            "946684800000",
            "--out",
            &until.to_string_lossy(),
        ])
        .await;
    out.ok();
    assert!(read_lines(&until).is_empty());

    // Bad filters are errors, not empty exports.
    let text = w
        .custos(&["audit", "export", "--type", "NOPE", "--out", "x.jsonl"])
        .await
        .failed();
    assert!(text.contains("--type"), "{text}");
    let text = w
        .custos(&[
            "audit",
            "export",
            "--since",
            "yesterday",
            "--out",
            "x.jsonl",
        ])
        .await
        .failed();
    assert!(text.contains("RFC 3339"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_live_names_an_event_a_foreign_publisher_inserted() {
    let w = World::start().await;
    w.populate(3).await;
    let before = w.last_seq().await;
    let out = w.custos(&["audit", "verify", "--key", &w.key_hex]).await;
    assert!(out.ok().starts_with("OK"), "{out:?}");

    // A well-formed event, published with plain core NATS past the ledger writer.
    let events = all_events(&w.nats.js().await).await;
    let (_, template) = events
        .iter()
        .find(|(_, e)| e.event_type == EventType::TransactionCreated)
        .expect("a created transfer");
    let mut forged = template.clone();
    forged.workflow_id = "forged".into();
    let client = w.nats.client().await;
    client
        .publish(
            "custos.evt.tx.forged.TRANSACTION_CREATED",
            codec::to_msgpack(&forged).into(),
        )
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    assert!(
        eventually(Duration::from_secs(5), || async {
            w.last_seq().await > before
        })
        .await,
        "the stream stored the foreign message"
    );
    let forged_seq = w.last_seq().await;
    assert_eq!(forged_seq, before + 1);

    let out = w.custos(&["audit", "verify", "--key", &w.key_hex]).await;
    let text = assert_broken_at(&out, forged_seq, "foreign publish");
    assert!(text.contains("no chain hash"), "{text}");
    // Exported, it fails the same way.
    let path = w.path("trail.jsonl");
    w.custos(&["audit", "export", "--out", &path.to_string_lossy()])
        .await
        .ok();
    let out = w
        .custos(&[
            "audit",
            "verify",
            "--file",
            &path.to_string_lossy(),
            "--key",
            &w.key_hex,
        ])
        .await;
    assert_broken_at(&out, forged_seq, "foreign publish, exported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_the_last_lines() {
    let w = World::start().await;
    w.populate(4).await;
    let last = w.last_seq().await;
    assert!(last > 3);
    // The server named by the environment only.
    let out = w.custos_env(&["audit", "tail", "-n", "3"]).await;
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|s| s.parse().ok())
                .expect("a sequence first")
        })
        .collect();
    assert_eq!(seqs, vec![last - 2, last - 1, last]);

    // More than there are: all of them.
    let out = w.custos(&["audit", "tail", "-n", "1000"]).await;
    assert_eq!(out.ok().lines().count() as u64, last, "{out:?}");
}
