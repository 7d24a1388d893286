//! `custos audit`: tail, export, verify and checkpoint the hash-chained trail.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use custos_adapters::jetstream::{StoredEvent, read_events};
use custos_engine::chain::{Link, Verified, Verifier};
use custos_schemas::{Checkpoint, Event, EventType, codec, subjects};
use futures::StreamExt;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print the latest events (and keep following with --follow).
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: u64,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Export the trail (or a filtered part of it) as JSON lines or CSV.
    Export {
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        /// From this time (RFC 3339, e.g. 2026-11-24T00:00:00Z, or ms since the epoch).
        #[arg(long)]
        since: Option<String>,
        /// Until this time (exclusive).
        #[arg(long)]
        until: Option<String>,
        /// Only this event type, e.g. TRANSACTION_CREATED.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events by this user id.
        #[arg(long)]
        actor: Option<String>,
        /// Output file; `-` for standard output.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify the chain of the live stream or of an unfiltered JSON-lines export.
    /// Exits non-zero and names the first broken sequence.
    Verify {
        /// Verify this export instead of the live stream.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The export starts after events that aged out (retention): follow it from
        /// its first event; a signed checkpoint in it must vouch for that start.
        #[arg(long)]
        aged_out: bool,
        /// A checkpoint exported earlier: the trail must still contain its prefix.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Trusted audit public key (hex, or a file holding it). Defaults to the data
        /// directory's audit-key.pub when present.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, env = "CUSTOS_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Export the latest signed checkpoint, to keep outside the cluster.
    Checkpoint {
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn run(nats_url: &str, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            file,
            aged_out,
            checkpoint,
            key,
            data_dir,
        } => {
            verify(
                nats_url,
                file.map(|f| (f, aged_out)),
                checkpoint,
                key,
                data_dir,
            )
            .await
        }
        AuditCommand::Tail { lines, follow } => {
            let js = jetstream::new(crate::connect(nats_url).await?);
            tail(&js, lines, follow).await?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            format,
            since,
            until,
            event_type,
            actor,
            out,
        } => {
            let js = jetstream::new(crate::connect(nats_url).await?);
            let filter = ExportFilter {
                since: since.as_deref().map(parse_time).transpose()?,
                until: until.as_deref().map(parse_time).transpose()?,
                event_type: event_type
                    .as_deref()
                    .map(|t| {
                        EventType::parse(t)
                            .ok_or_else(|| anyhow::anyhow!("--type: unknown event type {t:?}"))
                    })
                    .transpose()?,
                actor,
            };
            let count = export(&js, &format, &filter, &out).await?;
            eprintln!("exported {count} events");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoint { out } => {
            let js = jetstream::new(crate::connect(nats_url).await?);
            let stream = js
                .get_stream(subjects::EVENTS_STREAM)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let subject = subjects::event_subject(
                custos_schemas::AggregateKind::Audit,
                "chain",
                EventType::AuditCheckpoint.as_str(),
            );
            let msg = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "no checkpoint yet ({e}); the ledger writes one every 1,000 events or 10 s"
                    )
                })?;
            let event: Event = codec::from_msgpack(&msg.payload)?;
            let custos_schemas::Payload::Checkpoint(cp) = event.payload else {
                anyhow::bail!("the latest checkpoint event carries no checkpoint");
            };
            std::fs::write(&out, serde_json::to_string_pretty(&cp)? + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "checkpoint of seq {} head {} written to {}",
                cp.sequence,
                cp.head_hash,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn verify(
    nats_url: &str,
    file: Option<(PathBuf, bool)>,
    checkpoint: Option<PathBuf>,
    key: Option<String>,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let mut trusted = Vec::new();
    let mut checkpoint = checkpoint
        .map(|path| -> anyhow::Result<Checkpoint> {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a checkpoint", path.display()))
        })
        .transpose()?;
    if let Some(k) = key {
        trusted.push(crate::keys::parse_public_key(&k)?);
    } else {
        let pub_path =
            crate::keys::audit_pub_path(&data_dir.unwrap_or_else(crate::default_data_dir));
        if pub_path.exists() {
            trusted.push(crate::keys::parse_public_key(&pub_path.to_string_lossy())?);
        } else if let Some(cp) = &checkpoint {
            // The auditor's own copy of a checkpoint vouches for its key.
            trusted.push(crate::keys::parse_public_key(&cp.public_key)?);
        }
    }
    if trusted.is_empty() {
        eprintln!(
            "warning: no trusted audit key (--key); checkpoints are checked against their own keys only"
        );
    }
    let mut verifier = Verifier::new(subjects::EVENTS_STREAM, trusted);
    if checkpoint.is_none() {
        eprintln!(
            "note: without --checkpoint, a trail cut after its last checkpoint cannot be told from a complete one"
        );
    }
    if let Some(cp) = checkpoint.take()
        && let Err(b) = verifier.expect_checkpoint(cp)
    {
        println!("BROKEN: {b}");
        return Ok(ExitCode::FAILURE);
    }
    let result = match file {
        Some((path, aged_out)) => verify_file(&path, aged_out, verifier)?,
        None => {
            let js = jetstream::new(crate::connect(nats_url).await?);
            verify_stream(&js, verifier).await?
        }
    };
    Ok(match result {
        Ok(v) => {
            println!(
                "OK: {} events verified up to seq {}, head {}, {} checkpoint(s) verified",
                v.events,
                v.last_seq,
                v.head.to_hex(),
                v.checkpoints
            );
            ExitCode::SUCCESS
        }
        Err(b) => {
            println!("BROKEN: {b}");
            ExitCode::FAILURE
        }
    })
}

/// Verifies the live stream in order.
pub async fn verify_stream(
    js: &jetstream::Context,
    verifier: Verifier,
) -> anyhow::Result<Result<Verified, custos_engine::chain::Break>> {
    custos_adapters::jetstream::verify_events(js, verifier)
        .await
        .map_err(|e| anyhow::anyhow!("reading the event stream: {e}"))
}

/// Verifies a JSON-lines export: each line's event is re-encoded canonically and
/// must reproduce its recorded hash at its recorded place.
fn verify_file(
    path: &PathBuf,
    aged_out: bool,
    mut verifier: Verifier,
) -> anyhow::Result<Result<Verified, custos_engine::chain::Break>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut first = true;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record =
            ExportRecord::parse(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        let body = codec::to_msgpack(&record.event);
        let link = Link {
            seq: record.seq,
            subject: &record.subject,
            body: &body,
            prev_hash: Some(&record.prev_hash),
            hash: Some(&record.hash),
        };
        // An export of a trail whose first events aged out starts later; only on
        // request, since from a file alone that cannot be told from a cut.
        if first
            && aged_out
            && record.seq > 1
            && let Err(b) = verifier.resume_at(link)
        {
            return Ok(Err(b));
        }
        first = false;
        if let Err(b) = verifier.push(link) {
            return Ok(Err(b));
        }
        if !record.time_matches {
            let kind = custos_engine::chain::BreakKind::Modified;
            return Ok(Err(custos_engine::chain::Break {
                seq: record.seq,
                kind,
            }));
        }
    }
    Ok(verifier.finish())
}

/// One line of a JSON-lines export: the event in the published audit shape plus
/// its place in the chain.
struct ExportRecord {
    seq: u64,
    subject: String,
    prev_hash: String,
    hash: String,
    event: Event,
    time_matches: bool,
}

/// Fields an export adds around the event.
const CHAIN_FIELDS: [&str; 5] = ["seq", "subject", "prevHash", "hash", "time"];

impl ExportRecord {
    fn to_json(stored: &StoredEvent, event: &Event) -> anyhow::Result<Value> {
        let mut map = match serde_json::to_value(event)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        map.insert("seq".into(), stored.seq.into());
        map.insert("subject".into(), stored.subject.clone().into());
        map.insert("time".into(), format_ms(event.timestamp).into());
        map.insert(
            "prevHash".into(),
            stored.prev_hash.clone().unwrap_or_default().into(),
        );
        map.insert(
            "hash".into(),
            stored.hash.clone().unwrap_or_default().into(),
        );
        Ok(Value::Object(map))
    }

    fn parse(line: &str) -> anyhow::Result<Self> {
        let Value::Object(mut map) = serde_json::from_str(line)? else {
            anyhow::bail!("not a JSON object");
        };
        let mut take = |k: &str| {
            map.remove(k)
                .ok_or_else(|| anyhow::anyhow!("missing field {k}"))
        };
        let seq = take("seq")?.as_u64().context("seq: not a number")?;
        let text = |v: Value, k: &str| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{k}: not a string"))
        };
        let subject = text(take("subject")?, "subject")?;
        let prev_hash = text(take("prevHash")?, "prevHash")?;
        let hash = text(take("hash")?, "hash")?;
        let time = map.remove("time");
        for k in CHAIN_FIELDS {
            map.remove(k);
        }
        let event: Event = serde_json::from_value(Value::Object(map)).context("event")?;
        // `time` is a readable copy of `timestamp`; a forged one counts as a modification.
        let time_matches =
            time.as_ref().and_then(Value::as_str) == Some(format_ms(event.timestamp).as_str());
        Ok(ExportRecord {
            seq,
            subject,
            prev_hash,
            hash,
            event,
            time_matches,
        })
    }
}

struct ExportFilter {
    since: Option<i64>,
    until: Option<i64>,
    event_type: Option<EventType>,
    actor: Option<String>,
}

impl ExportFilter {
    fn keeps(&self, e: &Event) -> bool {
        self.since.is_none_or(|t| e.timestamp >= t)
            && self.until.is_none_or(|t| e.timestamp < t)
            && self.event_type.is_none_or(|t| e.event_type == t)
            && self.actor.as_deref().is_none_or(|a| e.actor.user_id == a)
    }
}

const CSV_HEADER: &str = "seq,time,id,eventType,workflowId,version,actorUserId,actorEmail,actorRole,targetType,targetId,targetAmount,targetCurrency,ipAddress,userAgent,sessionId,result,metadata,payload,prevHash,hash";

async fn export(
    js: &jetstream::Context,
    format: &str,
    filter: &ExportFilter,
    out: &PathBuf,
) -> anyhow::Result<u64> {
    let mut writer: Box<dyn Write> = if out.as_os_str() == "-" {
        Box::new(std::io::BufWriter::new(std::io::stdout()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
        ))
    };
    if format == "csv" {
        writeln!(writer, "{CSV_HEADER}")?;
    }
    let mut count = 0;
    let mut failure: Option<anyhow::Error> = None;
    read_events(js, 1, None, |stored| {
        if failure.is_some() {
            return Ok(());
        }
        let written = (|| -> anyhow::Result<bool> {
            let event: Event =
                codec::from_msgpack(&stored.body).with_context(|| format!("seq {}", stored.seq))?;
            if !filter.keeps(&event) {
                return Ok(false);
            }
            if format == "csv" {
                writeln!(writer, "{}", csv_row(&stored, &event)?)?;
            } else {
                writeln!(writer, "{}", ExportRecord::to_json(&stored, &event)?)?;
            }
            Ok(true)
        })();
        match written {
            Ok(true) => count += 1,
            Ok(false) => {}
            Err(e) => failure = Some(e),
        }
        Ok(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading the event stream: {e}"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    writer.flush()?;
    Ok(count)
}

fn csv_row(stored: &StoredEvent, e: &Event) -> anyhow::Result<String> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let result = serde_json::to_value(e.result)?
        .as_str()
        .unwrap_or_default()
        .to_string();
    let fields = [
        stored.seq.to_string(),
        format_ms(e.timestamp),
        e.id.clone(),
        e.event_type.as_str().to_string(),
        e.workflow_id.clone(),
        e.version.to_string(),
        e.actor.user_id.clone(),
        opt(&e.actor.email),
        opt(&e.actor.role),
        e.target.kind.clone(),
        e.target.id.clone(),
        opt(&e.target.amount),
        opt(&e.target.currency),
        opt(&e.context.ip_address),
        opt(&e.context.user_agent),
        opt(&e.context.session_id),
        result,
        serde_json::to_string(&e.metadata)?,
        serde_json::to_string(&e.payload)?,
        stored.prev_hash.clone().unwrap_or_default(),
        stored.hash.clone().unwrap_or_default(),
    ];
    Ok(fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(","))
}

/// RFC 4180 quoting; a leading `=`, `+`, `-` or `@` is prefixed with `'` so a
/// spreadsheet never runs a value as a formula.
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

async fn tail(js: &jetstream::Context, lines: u64, follow: bool) -> anyhow::Result<()> {
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let last = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .last_sequence;
    if lines == 0 && !follow {
        return Ok(());
    }
    let start = last.saturating_sub(lines.saturating_sub(1)).max(1);
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if last == 0 && !follow {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        match codec::from_msgpack::<Event>(&msg.payload) {
            Ok(e) => println!(
                "{seq:>8} {} {:<24} {:<8} {:<32} {:<20} {:?}",
                format_ms(e.timestamp),
                e.event_type.as_str(),
                e.aggregate_kind.as_str(),
                e.workflow_id,
                e.actor.user_id,
                e.result
            ),
            Err(err) => println!("{seq:>8} undecodable event on {}: {err}", msg.subject),
        }
        if !follow && pending == 0 {
            break;
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn format_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// RFC 3339 or milliseconds since the epoch.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339).with_context(|| {
        format!("{s:?}: expected RFC 3339 (2026-11-24T00:00:00Z) or ms since the epoch")
    })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}
