//! `custos bench`: measurements against a real nats-server started for the run,
//! each printed as a ratio to a limit measured in the same run on the same server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use custos_adapters::jetstream::{Batching, StreamSettings, provision};
use custos_adapters::nats_server::{Durability, NatsServer};
use custos_engine::chain::Verifier;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, ContentType, EventType, IntakeReply, Outcome, Payload,
    Proposal, RequestContext, Target, TransferRequest, WalletDescriptor, subjects,
};
use custos_workers::Shutdown;
use custos_workers::ledger::{LedgerConfig, LedgerHandle};
use sha2::{Digest, Sha256};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark: audit (append + verify), intake, policy, dkg, signing,
    /// approvals, e2e (request to broadcast on a real node), or all.
    #[arg(default_value = "all", value_parser = ["all", "audit", "intake", "policy", "dkg", "signing", "approvals", "e2e"])]
    which: String,
    /// Server profiles to measure: both, durable or default.
    #[arg(long, default_value = "both", value_parser = ["both", "durable", "default"])]
    profile: String,
    /// Events appended per measurement.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Intake requests per measurement.
    #[arg(long, default_value_t = 5_000)]
    requests: u64,
    /// Key ceremonies per configuration (dkg).
    #[arg(long, default_value_t = 10)]
    ceremonies: usize,
    /// Policy decisions timed.
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    /// Concurrent writers (appenders, or upstream publishers for intake).
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Transfers requested per second (e2e), at a steady pace.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Seconds to keep requesting at `rate` (e2e).
    #[arg(long, default_value_t = 60)]
    duration: u32,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    if args.which == "dkg" {
        return dkg(args.ceremonies).await;
    }
    if args.which == "signing" {
        return signing(args.ceremonies).await;
    }
    if args.which == "approvals" {
        return approvals(args.concurrency).await;
    }
    if args.which == "e2e" {
        return e2e(args.rate, args.duration).await;
    }
    if args.which == "all" || args.which == "policy" {
        policy(args.decisions)?;
        if args.which == "policy" {
            return Ok(std::process::ExitCode::SUCCESS);
        }
    }
    let profiles: Vec<Durability> = match args.profile.as_str() {
        "durable" => vec![Durability::Always],
        "default" => vec![Durability::Default],
        _ => vec![Durability::Default, Durability::Always],
    };
    println!(
        "custos bench {} (events {}, requests {}, concurrency {})",
        args.which, args.events, args.requests, args.concurrency
    );
    for durability in profiles {
        let name = match durability {
            Durability::Always => "durable (sync_interval: always)",
            Durability::Default => "server default",
        };
        println!("\n== profile: {name}");
        // What `custos up` picks for each profile.
        let batching = crate::up::batching_for(durability);
        let bench = BenchEngine::start(durability, batching).await?;
        let (js, client, ledger) = (&bench.js, &bench.client, &bench.ledger);
        if args.which == "all" || args.which == "audit" {
            audit(js, ledger, args.events, args.concurrency).await?;
        }
        if args.which == "all" || args.which == "intake" {
            intake(client, ledger, args.requests, args.concurrency).await?;
        }
        bench.stop().await;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A nats-server in a temporary directory, provisioned, with the engine running
/// in this process: what every benchmark measures against.
struct BenchEngine {
    dir: std::path::PathBuf,
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    ledger: LedgerHandle,
    /// The engine process's replica of the trail.
    trail: custos_workers::trail::Trail,
    trigger: custos_workers::ShutdownTrigger,
    engine: tokio::task::JoinHandle<Result<(), custos_workers::ledger::LedgerError>>,
}

impl BenchEngine {
    async fn start(durability: Durability, batching: Batching) -> anyhow::Result<Self> {
        let dir = tempdir()?;
        let server = NatsServer::start(&dir.join("nats"), 0, durability).await?;
        let client = crate::connect(&server.url()).await?;
        let js = jetstream::new(client.clone());
        provision(&js, StreamSettings::default())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (trigger, shutdown) = Shutdown::new();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let config = LedgerConfig {
            batching,
            ..LedgerConfig::new(key)
        };
        // The process's replica, which the steps a benchmark runs share.
        let trail = custos_workers::trail::Trail::follow(js.clone(), shutdown.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        let engine = tokio::spawn(custos_workers::engine::run(
            client.clone(),
            trail.clone(),
            config,
            shutdown,
            Some(ready_tx),
        ));
        let ledger = ready.await?;
        Ok(BenchEngine {
            dir,
            server,
            client,
            js,
            ledger,
            trail,
            trigger,
            engine,
        })
    }

    async fn stop(self) {
        self.trigger.trigger();
        let _ = self.engine.await;
        drop(self.server);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("custos-bench-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A proposal whose sealed body is about `size` bytes: a system alert on its own
/// aggregate, padded through its summary.
fn proposal(i: u64, pad: usize) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::System,
        workflow_id: format!("bench-{i}"),
        expected_version: 0,
        event_type: EventType::AlertRaised,
        causation_id: None,
        actor: Actor::system("bench"),
        target: Target {
            kind: "bench".into(),
            id: i.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::Alert {
            severity: "info".into(),
            summary: "x".repeat(pad),
        },
    }
}

async fn audit(
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    events: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    // Size of one sealed event, to give the raw publish the same payloads.
    let mut probe = custos_engine::ledger::Ledger::default();
    let body_len = probe
        .seal(vec![proposal(0, 40)], 0)
        .map(|s| s[0].body.len())
        .unwrap_or(300);

    // Limit: raw pipelined JetStream publish of the same sizes to the same server.
    js.create_stream(stream::Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw.>".into()],
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let payload = bytes::Bytes::from(vec![b'x'; body_len]);
    let started = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..events {
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("raw-{i}"));
        inflight.push_back(
            js.send_publish(format!("bench.raw.{}", i % 1000), msg)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        if inflight.len() >= 4_096
            && let Some(f) = inflight.pop_front()
        {
            f.await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    for f in inflight {
        f.await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let raw_rate = events as f64 / started.elapsed().as_secs_f64();
    let atomic_rate = raw_atomic_batches(js, body_len, events).await?;

    // Audit append: sealed, chained, sequence-checked, acknowledged to each writer.
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (ledger, next) = (ledger.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i > events {
                    return failures;
                }
                if !matches!(
                    ledger.append(vec![proposal(i, 40)]).await,
                    AppendReply::Appended { .. }
                ) {
                    failures += 1;
                }
            }
        }));
    }
    let mut failures = 0;
    for t in tasks {
        failures += t.await?;
    }
    let append_rate = events as f64 / started.elapsed().as_secs_f64();
    println!(
        "raw atomic batch  {atomic_rate:>10.0} msg/s (256 per batch, the ledger's headers, no ledger)  ratio to raw {:.2}",
        atomic_rate / raw_rate
    );
    println!(
        "audit append      {append_rate:>10.0} events/s  raw pipelined publish {raw_rate:>10.0} msg/s ({body_len} B)  ratio {:.2} (target >= 0.5){}",
        append_rate / raw_rate,
        if failures > 0 {
            format!("  FAILURES {failures}")
        } else {
            String::new()
        }
    );

    // Verify, end to end from the stream, and in memory; against raw SHA-256 of the same bytes.
    let mut records = Vec::new();
    let started = Instant::now();
    let verified =
        crate::audit::verify_stream(js, Verifier::new(subjects::EVENTS_STREAM, vec![])).await?;
    let stream_secs = started.elapsed().as_secs_f64();
    let verified = verified.map_err(|b| anyhow::anyhow!("verify failed: {b}"))?;
    custos_adapters::jetstream::read_events(js, 1, None, |e| {
        records.push(e);
        Ok(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let bytes: usize = records.iter().map(|r| r.body.len() + r.subject.len()).sum();
    let started = Instant::now();
    for r in &records {
        let mut h = Sha256::new();
        h.update(&r.subject);
        h.update(&r.body);
        std::hint::black_box(h.finalize());
    }
    let sha_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut v = Verifier::new(subjects::EVENTS_STREAM, vec![]);
    for r in &records {
        v.push(r.link()).map_err(|b| anyhow::anyhow!("{b}"))?;
    }
    let memory_secs = started.elapsed().as_secs_f64();
    let n = records.len() as f64;
    let mb = bytes as f64 / 1e6;
    println!(
        "audit verify      in memory {:>10.0} events/s ({:.0} MB/s)  raw SHA-256 {:>10.0} events/s ({:.0} MB/s)  ratio {:.2} (target >= 0.5)",
        n / memory_secs,
        mb / memory_secs,
        n / sha_secs,
        mb / sha_secs,
        sha_secs / memory_secs
    );
    println!(
        "audit verify      from the stream {:>10.0} events/s ({} events, {} checkpoints)  ratio to raw SHA-256 {:.2}",
        verified.events as f64 / stream_secs,
        verified.events,
        verified.checkpoints,
        sha_secs / stream_secs
    );
    Ok(())
}

/// The server's side of the ledger's appends alone: atomic batches of 256 with the
/// same headers and sizes, pipelined like the ledger pipelines them.
async fn raw_atomic_batches(
    js: &jetstream::Context,
    body_len: usize,
    events: u64,
) -> anyhow::Result<f64> {
    let stream = js
        .create_stream(stream::Config {
            name: "BENCH_ATOMIC".into(),
            subjects: vec!["bench.atomic.>".into()],
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut last = stream.cached_info().state.last_sequence;
    let client = js.client();
    let mut publisher = custos_adapters::jetstream::EventPublisher::new(client)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = bytes::Bytes::from(vec![b'x'; body_len]);
    let hash = "0".repeat(64);
    let started = Instant::now();
    let (mut sent, mut inflight, mut acked) = (0u64, 0usize, 0u64);
    while acked < events {
        while sent < events && inflight < 32 {
            let n = (events - sent).min(256);
            let batch: Vec<_> = (0..n)
                .map(|i| custos_adapters::jetstream::OutgoingEvent {
                    subject: format!("bench.atomic.{}", (sent + i) % 1000),
                    msg_id: format!("atomic-{}", sent + i),
                    body: body.clone(),
                    prev_hash: hash.clone(),
                    hash: hash.clone(),
                })
                .collect();
            publisher
                .publish(last, &batch, custos_adapters::jetstream::Batching::Atomic)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            last += n;
            sent += n;
            inflight += 1;
        }
        let Some((_, ack)) = publisher.next_ack().await else {
            anyhow::bail!("acks stopped")
        };
        if let Some(e) = ack.error {
            anyhow::bail!("atomic batch refused: {}", e.description);
        }
        inflight -= 1;
        acked = ack.seq - stream.cached_info().state.last_sequence;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

async fn intake(
    client: &async_nats::Client,
    ledger: &LedgerHandle,
    requests: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let wallet = WalletDescriptor {
        name: "bench-wallet".into(),
        model: "hd".into(),
        chain: "evm-31337".into(),
        address: "0x1111111111111111111111111111111111111111".into(),
        threshold: None,
        guardians: Vec::new(),
        group_key: None,
        transcript: None,
    };
    let reply = ledger
        .append(vec![Proposal {
            aggregate_kind: AggregateKind::Wallet,
            workflow_id: wallet.name.clone(),
            expected_version: 0,
            event_type: EventType::WalletCreated,
            causation_id: None,
            actor: Actor::system("bench"),
            target: Target {
                kind: "wallet".into(),
                id: wallet.name.clone(),
                amount: None,
                currency: None,
            },
            context: RequestContext::default(),
            result: Outcome::Success,
            metadata: Default::default(),
            payload: Payload::WalletCreated(wallet),
        }])
        .await;
    anyhow::ensure!(
        matches!(reply, AppendReply::Appended { .. }),
        "creating the bench wallet: {reply:?}"
    );
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i > requests {
                    return latencies;
                }
                let request = TransferRequest {
                    request_id: format!("bench-{i}"),
                    wallet: "bench-wallet".into(),
                    asset: "ETH".into(),
                    destination: "0x2222222222222222222222222222222222222222".into(),
                    amount: "0.5".into(),
                    memo: None,
                    initiator: "bench".into(),
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(subjects::headers::CONTENT_TYPE, ContentType::JSON);
                let t = Instant::now();
                let ok = match client
                    .request_with_headers(
                        subjects::REQ_TRANSFER,
                        headers,
                        ContentType::Json.encode(&request).into(),
                    )
                    .await
                {
                    Ok(msg) => matches!(
                        ContentType::Json.decode::<IntakeReply>(&msg.payload),
                        Ok(IntakeReply::Accepted { .. })
                    ),
                    Err(_) => false,
                };
                latencies.push((t.elapsed(), ok));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed();
    let failed = all.iter().filter(|(_, ok)| !ok).count();
    let mut latencies: Vec<Duration> = all.into_iter().map(|(d, _)| d).collect();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "intake            {:>10.0} requests/s at {concurrency} publishers  p50 {:.2} ms  p99 {:.2} ms{}",
        requests as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        if failed > 0 {
            format!("  FAILED {failed}")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Policy decision latency: a 200-rule policy with velocity state, on one core.
fn policy(decisions: usize) -> anyhow::Result<()> {
    let origin = Instant::now();
    let r = custos_engine::policy::bench::run_benchmark(decisions, || origin.elapsed())
        .map_err(|e| anyhow::anyhow!("policy benchmark: {e}"))?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "\n== policy decisions ({} rules, {} velocity entries, {} decisions)",
        r.rules, r.velocity_entries, r.iterations
    );
    println!(
        "policy decision   p50 {:.1} us  p90 {:.1} us  p99 {:.1} us ({:.2} of the 50 us limit)  max {:.1} us  {:.0} decisions/s on one core",
        us(r.p50),
        us(r.p90),
        us(r.p99),
        us(r.p99) / 50.0,
        us(r.max),
        r.decisions_per_sec
    );
    Ok(())
}

/// Wallet creation by DKG among guardian processes over NATS (durable profile),
/// against the same DKG computed in one process.
async fn dkg(ceremonies: usize) -> anyhow::Result<std::process::ExitCode> {
    let ceremonies = ceremonies.max(1);
    println!(
        "custos bench dkg ({ceremonies} ceremonies per configuration, guardians as separate processes)"
    );
    let bench = BenchEngine::start(Durability::Always, Batching::Atomic).await?;
    let ledger = &bench.ledger;
    let guardians = start_guardians(&bench, 5).await?;
    let made = Ceremonies::start(&bench).await?;
    for (t, n) in [(2u16, 3u16), (3, 5)] {
        let mut compute = Vec::new();
        for c in 0..ceremonies {
            let t0 = Instant::now();
            custos_custody::sim::run_dkg(&format!("compute-{c}"), t, n, &mut rand::rngs::OsRng)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            compute.push(t0.elapsed());
        }
        let mut over_nats = Vec::new();
        for c in 0..ceremonies {
            let t0 = Instant::now();
            made.frost_wallet(ledger, &format!("bench-{t}of{n}-{c}"), t, n)
                .await?;
            over_nats.push(t0.elapsed());
        }
        compute.sort();
        over_nats.sort();
        let median = |v: &[Duration]| v[v.len() / 2];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "dkg {t}-of-{n}         wallet created over NATS p50 {:.1} ms max {:.1} ms   in-process compute p50 {:.2} ms   ratio {:.0}x",
            ms(median(&over_nats)),
            ms(over_nats[over_nats.len() - 1]),
            ms(median(&compute)),
            median(&over_nats).as_secs_f64() / median(&compute).as_secs_f64()
        );
    }
    drop(guardians);
    bench.stop().await;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Starts guardians `g1`..`gN` as processes of this binary and waits until each
/// has announced itself.
async fn start_guardians(
    bench: &BenchEngine,
    count: u16,
) -> anyhow::Result<Vec<tokio::process::Child>> {
    let exe = std::env::current_exe()?;
    let url = bench.server.url();
    let mut guardians = Vec::new();
    for i in 1..=count {
        guardians.push(
            tokio::process::Command::new(&exe)
                .args([
                    "guardian",
                    "run",
                    "--id",
                    &format!("g{i}"),
                    "--nats-url",
                    &url,
                    "--data-dir",
                ])
                .arg(bench.dir.join(format!("g{i}")))
                .env(
                    "CUSTOS_GUARDIAN_PASSPHRASE",
                    format!("bench-passphrase-g{i}"),
                )
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let bucket = bench
        .js
        .get_key_value(subjects::GUARDIANS_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let mut live = 0;
        for i in 1..=count {
            if matches!(bucket.get(format!("g{i}")).await, Ok(Some(_))) {
                live += 1;
            }
        }
        if live == count {
            return Ok(guardians);
        }
        // Poll until every guardian has announced itself.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the guardians did not announce themselves within 30 s")
}

/// Threshold signing ceremonies by guardian processes over NATS (durable
/// profile), 2-of-3 and 3-of-5: from the coordinator's start (commitments
/// from its stock, one request per guardian, which checks the trail and signs,
/// aggregation, BIP-340 check) to the signed
/// transaction, against the same signing computed in one process; then
/// signatures/s with many ceremonies in flight.
async fn signing(count: usize) -> anyhow::Result<std::process::ExitCode> {
    use futures::StreamExt;
    let count = count.max(2);
    println!(
        "custos bench signing ({count} signings per configuration, guardians as separate processes)"
    );
    let bench = BenchEngine::start(Durability::Always, Batching::Atomic).await?;
    let guardians = start_guardians(&bench, 5).await?;
    let (js, client, ledger) = (&bench.js, &bench.client, &bench.ledger);
    let made = Ceremonies::start(&bench).await?;
    let mut wallets = Vec::new();
    for (t, n) in [(2u16, 3u16), (3, 5)] {
        wallets.push((
            t,
            n,
            made.frost_wallet(ledger, &format!("bench-{t}of{n}"), t, n)
                .await?,
        ));
    }
    let (trigger, shutdown) = Shutdown::new();
    let trail = workflow_setup(&bench, Vec::new(), &shutdown).await?;
    let step = Arc::new(
        custos_workers::signing::SignStep::new(client.clone(), trail)
            .map_err(anyhow::Error::msg)?,
    );
    for (t, n, wallet) in wallets {
        // One ceremony first: each guardian decrypts its share once (argon2id).
        let warm = built_transfers(client, js, ledger, &wallet, "warm", 1).await?;
        ceremony(&step, &warm[0]).await?;
        let ids = built_transfers(client, js, ledger, &wallet, "seq", count).await?;
        let mut over_nats = Vec::with_capacity(count);
        for id in &ids {
            let t0 = Instant::now();
            ceremony(&step, id).await?;
            over_nats.push(t0.elapsed());
        }
        let ids = built_transfers(client, js, ledger, &wallet, "par", count * 4).await?;
        let t0 = Instant::now();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(ids.iter())
            .map(|id| ceremony(&step, id))
            .buffer_unordered(16)
            .collect()
            .await;
        let in_flight = t0.elapsed();
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        let compute = signing_compute(t, n, count)?;
        over_nats.sort();
        let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "signing {t}-of-{n}   ceremony over NATS p50 {:.2} ms p99 {:.2} ms   compute p50 {:.2} ms   ratio p50 {:.1}x (target <= 3x)   16 in flight: {:.0} signatures/s",
            ms(pct(&over_nats, 50)),
            ms(pct(&over_nats, 99)),
            ms(compute),
            pct(&over_nats, 50).as_secs_f64() / compute.as_secs_f64(),
            (count * 4) as f64 / in_flight.as_secs_f64()
        );
    }
    trigger.trigger();
    drop(guardians);
    bench.stop().await;
    Ok(std::process::ExitCode::SUCCESS)
}

fn record(kind: AggregateKind, id: &str, event_type: EventType, payload: Payload) -> Proposal {
    Proposal::first(kind, id, event_type, Actor::system("bench"), payload)
}

async fn ceremony(step: &custos_workers::signing::SignStep, id: &str) -> anyhow::Result<()> {
    match step.ceremony(id).await.map_err(anyhow::Error::msg)? {
        custos_workers::signing::Ceremony::Signed { .. } => Ok(()),
        other => anyhow::bail!("{id} not signed: {other:?}"),
    }
}

/// `count` allowed transfers of `wallet`, each with its transaction recorded
/// (spending a made-up output of the wallet): ready for the guardians.
async fn built_transfers(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    wallet: &WalletDescriptor,
    tag: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    use custos_custody::spend::{FeePolicy, SpendRequest};
    use custos_schemas::chain::SpentOutput;
    let script = custos_workers::signing::wallet_script(wallet).map_err(anyhow::Error::msg)?;
    let dest_script =
        custos_custody::spend::script_pubkey_for_address(&wallet.chain, FOREIGN_DESTINATION)?;
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let request = TransferRequest {
            request_id: format!("{}-{tag}-{i}", wallet.name),
            wallet: wallet.name.clone(),
            asset: "LTC".into(),
            destination: FOREIGN_DESTINATION.into(),
            amount: "1".into(),
            memo: None,
            initiator: "bench".into(),
        };
        let reply = client
            .request(
                subjects::REQ_TRANSFER,
                ContentType::MsgPack.encode(&request).into(),
            )
            .await?;
        let IntakeReply::Accepted { workflow_id, .. } =
            ContentType::MsgPack.decode(&reply.payload)?
        else {
            anyhow::bail!("intake refused the transfer");
        };
        ids.push(workflow_id);
    }
    for id in &ids {
        let decided =
            subjects::event_subject(AggregateKind::Tx, id, EventType::PolicyEvaluated.as_str());
        let started = Instant::now();
        while !recorded(js, &decided).await {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "no policy decision for {id}"
            );
            // Poll the stream: the policy step's answer is an event, not a reply.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unsigned = custos_custody::spend::build_spend(&SpendRequest {
            chain: &wallet.chain,
            wallet_script: &script,
            utxos: &[SpentOutput {
                txid: hex::encode(Sha256::digest(id.as_bytes())),
                vout: 0,
                value: 500_000_000,
                script_pubkey: hex::encode(&script),
            }],
            destination: &dest_script,
            amount: 100_000_000,
            fee_rate: Some(2),
            fees: FeePolicy::for_chain(&wallet.chain)?,
        })?;
        let mut built = record(
            AggregateKind::Tx,
            id,
            EventType::TransactionBuilt,
            Payload::TransactionBuilt(unsigned),
        );
        built.expected_version = 2;
        let reply = ledger.append(vec![built]).await;
        anyhow::ensure!(
            matches!(reply, AppendReply::Appended { .. }),
            "recording the transaction of {id}: {reply:?}"
        );
    }
    Ok(ids)
}

/// Median of `count` in-process t-of-n signings (commitments, shares,
/// aggregation with share verification, BIP-340 check), all signers summed.
fn signing_compute(t: u16, n: u16, count: usize) -> anyhow::Result<Duration> {
    let group = custos_custody::sim::run_dkg("bench-compute", t, n, &mut rand::rngs::OsRng)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let public = group
        .public_key_package()
        .ok_or_else(|| anyhow::anyhow!("no public key package"))?;
    // Tweaked once, as guardians and the coordinator keep them.
    let tweaked: Vec<_> = (1..=t)
        .filter_map(|i| group.key_package(i))
        .map(|k| (k, custos_custody::sign::TweakedKey::new(k)))
        .collect();
    let signers: Vec<_> = tweaked.iter().map(|(k, t)| (*k, t)).collect();
    let key = custos_custody::sign::AggregationKey::new(public);
    let mut compute = Vec::with_capacity(count);
    for i in 0..count {
        let sighash =
            custos_custody::sign::Sighash::from_recomputed(Sha256::digest(i.to_le_bytes()).into());
        let t0 = Instant::now();
        custos_custody::sim::run_prepared_signing(&signers, &key, &sighash, &mut rand::rngs::OsRng)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        compute.push(t0.elapsed());
    }
    compute.sort();
    Ok(compute[compute.len() / 2])
}

/// Whether an event is stored under `subject`.
async fn recorded(js: &jetstream::Context, subject: &str) -> bool {
    let Ok(stream) = js.get_stream(subjects::EVENTS_STREAM).await else {
        return false;
    };
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .is_ok()
}

/// Votes through the ballot box (verified trail replica, judging, durable
/// append) with `approvers` approvers voting at once: each of `approvers / 2`
/// transfers needs two approvals, so half the votes complete a quorum and move
/// their workflow on. Latency from the vote cast to it being recorded (and, for
/// the completing ones, the workflow advanced), against a bare durable append
/// in the same run.
async fn approvals(approvers: usize) -> anyhow::Result<std::process::ExitCode> {
    use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
    use custos_workers::approvals::{Ballot, BallotBox, Receipt};
    use futures::StreamExt;
    let approvers = approvers.max(2) & !1;
    println!("custos bench approvals ({approvers} approvers voting at once, durable profile)");
    let bench = BenchEngine::start(Durability::Always, Batching::Atomic).await?;
    let (client, ledger) = (&bench.client, &bench.ledger);
    let mut extra = vec![
        record(
            AggregateKind::Wallet,
            "bench",
            EventType::WalletCreated,
            Payload::WalletCreated(WalletDescriptor {
                name: "bench".into(),
                model: "frost".into(),
                chain: "ltc-regtest".into(),
                // Any valid regtest address: nothing is signed here.
                address: "rltc1qqypqxpq9qcrsszg2pvxq6rs0zqg3yyc5mr2hsl".into(),
                threshold: Some(2),
                guardians: Vec::new(),
                group_key: None,
                transcript: None,
            }),
        ),
        bench_user("erp".into(), "initiator", Vec::new()),
    ];
    for a in 0..approvers {
        extra.push(bench_user(
            format!("approver-{a}"),
            "approver",
            vec!["approvers".into()],
        ));
    }
    let (trigger, shutdown) = Shutdown::new();
    let trail = workflow_setup(&bench, extra, &shutdown).await?;
    let ballots = Arc::new(custos_workers::approvals::ballot_box::TrailBallotBox::new(
        trail.clone(),
        ledger.clone(),
    ));
    // 20 LTC at EUR 80: above EUR 1,000, two approvals from `approvers`.
    let mut workflows = Vec::new();
    for i in 0..approvers / 2 {
        let request = TransferRequest {
            request_id: format!("bench-approve-{i}"),
            wallet: "bench".into(),
            asset: "LTC".into(),
            destination: FOREIGN_DESTINATION.into(),
            amount: "20".into(),
            memo: None,
            initiator: "erp".into(),
        };
        let reply = client
            .request(
                subjects::REQ_TRANSFER,
                ContentType::MsgPack.encode(&request).into(),
            )
            .await?;
        let workflow_id = match ContentType::MsgPack.decode(&reply.payload)? {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => anyhow::bail!("intake refused the transfer: {other:?}"),
        };
        workflows.push(workflow_id);
    }
    let mut notices = Vec::new();
    for id in &workflows {
        let started = Instant::now();
        loop {
            match ballots.notice(id).await {
                Ok(n) if !n.missing.is_empty() => {
                    notices.push(n);
                    break;
                }
                _ => {
                    anyhow::ensure!(
                        started.elapsed() < Duration::from_secs(60),
                        "{id} does not await approvals"
                    );
                    // Poll the replica until the policy's decision is in it.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    let ballot = |a: usize| {
        let notice = &notices[a / 2];
        Ballot {
            workflow_id: notice.workflow_id.clone(),
            user_id: format!("approver-{a}"),
            vote: ApprovalVote {
                vote: Vote::Approve,
                request_hash: notice.request_hash.clone(),
                policy_version: notice.policy_version.clone(),
                channel: ApprovalChannel::Email,
                mfa: MfaMethod::Totp,
                comment: None,
            },
            masked_ip: Some("127.0.0.***".into()),
            user_agent: None,
        }
    };
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<(Duration, bool)>> = futures::stream::iter(0..approvers)
        .map(|a| {
            let (ballots, ballot) = (ballots.clone(), ballot(a));
            async move {
                let t = Instant::now();
                match ballots.cast(ballot).await {
                    Ok(Receipt::Recorded { quorum_reached }) => Ok((t.elapsed(), quorum_reached)),
                    other => anyhow::bail!("approver-{a}: {other:?}"),
                }
            }
        })
        .buffer_unordered(approvers)
        .collect()
        .await;
    let wall = t0.elapsed();
    let results = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let completed = results.iter().filter(|(_, q)| *q).count();
    anyhow::ensure!(
        completed == approvers / 2,
        "{completed} quorums reached, expected {}",
        approvers / 2
    );
    let mut all: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    let mut advanced: Vec<Duration> = results
        .iter()
        .filter(|(_, q)| *q)
        .map(|(d, _)| *d)
        .collect();
    all.sort();
    advanced.sort();
    // The limit: one bare durable append of one event, sequentially.
    let mut bare = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let reply = ledger
            .append(vec![record(
                AggregateKind::System,
                &format!("bench-bare-{i}"),
                EventType::AlertRaised,
                Payload::None,
            )])
            .await;
        anyhow::ensure!(matches!(reply, AppendReply::Appended { .. }), "{reply:?}");
        bare.push(t.elapsed());
    }
    bare.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "approvals  vote recorded p50 {:.1} ms p99 {:.1} ms; quorum reached -> workflow advanced p50 {:.1} ms p99 {:.1} ms; {:.0} votes/s   bare durable append p50 {:.2} ms (ratio p50 {:.1}x)",
        ms(pct(&all, 50)),
        ms(pct(&all, 99)),
        ms(pct(&advanced, 50)),
        ms(pct(&advanced, 99)),
        approvers as f64 / wall.as_secs_f64(),
        ms(pct(&bare, 50)),
        pct(&all, 50).as_secs_f64() / pct(&bare, 50).as_secs_f64()
    );
    trigger.trigger();
    bench.stop().await;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Auto-approved transfers end to end in the durable profile: intake, policy,
/// build on a real litecoind (regtest), signing by a 2-of-3 wallet's three
/// guardian processes, broadcast to the node. Requests arrive at a steady
/// `rate` for `duration` seconds (open loop: a slow engine does not slow the
/// arrivals); the latency is from each request to its `TRANSACTION_BROADCAST`,
/// and the FROST compute-only signing limit is measured in the same run.
async fn e2e(rate: u32, duration: u32) -> anyhow::Result<std::process::ExitCode> {
    use futures::StreamExt;
    let rate = rate.clamp(1, 2_000);
    let duration = duration.clamp(1, 600);
    let count = (rate * duration) as usize;
    println!(
        "custos bench e2e ({rate} transfers/s for {duration} s, FROST 2-of-3, guardian processes, litecoind regtest)"
    );
    let bench = BenchEngine::start(Durability::Always, Batching::Atomic).await?;
    let guardians = start_guardians(&bench, 3).await?;
    let (js, client, ledger) = (&bench.js, &bench.client, &bench.ledger);
    let node =
        custos_adapters::regtest::RegtestNode::start(&bench.dir.join("litecoind"), 0).await?;
    let wallet = Ceremonies::start(&bench)
        .await?
        .frost_wallet(ledger, "bench", 2, 3)
        .await?;
    let (trigger, shutdown) = Shutdown::new();
    let trail = workflow_setup(&bench, Vec::new(), &shutdown).await?;
    // One coin per transfer (the warm-up's included): transfers in flight
    // never share coins.
    const WARM_UP: usize = 20;
    node.fund_many(&wallet.address, 100_000, count + WARM_UP)
        .await?;
    node.mine(1).await?;
    // A custody node runs without a wallet; a loaded one would examine (and
    // for its own addresses record) every transfer entering the mempool.
    node.close_wallet().await?;
    let nodes = || {
        custos_workers::chain_steps::ChainNodes::new([(
            "ltc-regtest".to_string(),
            node.rpc.clone(),
        )])
    };
    let build = custos_workers::chain_steps::BuildStep::new(trail.clone(), nodes(), ledger.clone())
        .map_err(anyhow::Error::msg)?;
    run_step(js, ledger, build, &shutdown);
    let sign = custos_workers::signing::SignStep::new(client.clone(), trail.clone())
        .map_err(anyhow::Error::msg)?;
    run_step(js, ledger, sign, &shutdown);
    let broadcast = custos_workers::chain_steps::BroadcastStep::new(nodes(), ledger.clone(), 3)
        .map_err(anyhow::Error::msg)?;
    run_step(js, ledger, broadcast, &shutdown);

    let mut broadcasts = client
        .subscribe(subjects::event_type_filter(
            AggregateKind::Tx,
            EventType::TransactionBroadcast.as_str(),
        ))
        .await?;
    let mut failures = client
        .subscribe(subjects::event_type_filter(
            AggregateKind::Tx,
            EventType::TransactionFailed.as_str(),
        ))
        .await?;
    // Submits request `i`; answers its workflow id and when it was sent.
    let submit = {
        let client = client.clone();
        move |i: usize| {
            let client = client.clone();
            async move {
                let request = TransferRequest {
                    request_id: format!("bench-e2e-{i}"),
                    wallet: "bench".into(),
                    asset: "LTC".into(),
                    destination: FOREIGN_DESTINATION.into(),
                    amount: "0.0005".into(),
                    memo: None,
                    initiator: "bench".into(),
                };
                let sent = Instant::now();
                let reply = client
                    .request(
                        subjects::REQ_TRANSFER,
                        ContentType::MsgPack.encode(&request).into(),
                    )
                    .await?;
                match ContentType::MsgPack.decode(&reply.payload)? {
                    IntakeReply::Accepted { workflow_id, .. } => Ok((workflow_id, sent)),
                    other => anyhow::bail!("intake: {other:?}"),
                }
            }
        }
    };
    // Waits until each of `ids` is broadcast; answers when each was.
    async fn broadcast_times(
        broadcasts: &mut async_nats::Subscriber,
        failures: &mut async_nats::Subscriber,
        mut pending: usize,
        deadline: Instant,
    ) -> anyhow::Result<std::collections::HashMap<String, Instant>> {
        let mut seen = std::collections::HashMap::new();
        while pending > 0 {
            let msg = tokio::select! {
                m = broadcasts.next() => m,
                f = failures.next() => {
                    let reason = f
                        .and_then(|m| codec_event(&m.payload))
                        .unwrap_or_default();
                    anyhow::bail!("a transfer failed: {reason}");
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    anyhow::bail!("{pending} transfers not broadcast in time")
                }
            };
            let Some(msg) = msg else {
                anyhow::bail!("the event subscription ended")
            };
            let id = msg.subject.split('.').nth(3).unwrap_or_default();
            if seen.insert(id.to_string(), Instant::now()).is_none() {
                pending -= 1;
            }
        }
        Ok(seen)
    }
    // Warm-up, not timed: the guardians decrypt their shares and fill their
    // nonce pools, the steps open their connections.
    for i in 0..WARM_UP {
        submit(count + i).await?;
    }
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    broadcast_times(&mut broadcasts, &mut failures, WARM_UP, warm_deadline).await?;

    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let arrivals = tokio::spawn({
        let submit = submit.clone();
        async move {
            let mut sent = Vec::with_capacity(count);
            for i in 0..count {
                tokio::time::sleep_until((started + period * i as u32).into()).await;
                sent.push(tokio::spawn(submit(i)));
            }
            sent
        }
    });
    let deadline = started + Duration::from_secs(u64::from(duration) + 600);
    let done = broadcast_times(&mut broadcasts, &mut failures, count, deadline).await?;
    let mut sent = std::collections::HashMap::with_capacity(count);
    for task in arrivals.await? {
        let (id, at) = task.await??;
        sent.insert(id, at);
    }
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(id, at)| done.get(id).map(|d| d.saturating_duration_since(*at)))
        .collect();
    anyhow::ensure!(
        latencies.len() == count,
        "{} of {count} transfers matched",
        latencies.len()
    );
    let last = done.values().max().copied().unwrap_or(started);
    let wall = last.duration_since(started);
    latencies.sort();
    // Broadcasts per whole second of the run: the lowest after the first
    // second and before arrivals stop says whether the rate was sustained.
    let mut per_second = vec![0u32; (wall.as_secs() + 1) as usize];
    for at in done.values() {
        if let Some(n) =
            per_second.get_mut(at.saturating_duration_since(started).as_secs() as usize)
        {
            *n += 1;
        }
    }
    let steady = per_second
        .get(
            1..(duration as usize)
                .saturating_sub(1)
                .max(2)
                .min(per_second.len()),
        )
        .and_then(|s| s.iter().min().copied())
        .unwrap_or(0);
    println!(
        "e2e        broadcasts in each second: {}",
        per_second
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Where the time goes: the gap before each step's event, p50 and p99.
    let mut gaps: BTreeMapSteps = Default::default();
    let mut previous: std::collections::HashMap<String, i64> = Default::default();
    for e in crate::tx::read_decoded(js, Some(format!("{}.tx.>", subjects::EVENTS_PREFIX))).await? {
        if let Some(prev) = previous.insert(e.workflow_id.clone(), e.timestamp) {
            gaps.entry(e.event_type.as_str())
                .or_default()
                .push(e.timestamp - prev);
        }
    }
    let steps: Vec<String> = gaps
        .iter_mut()
        .map(|(step, v)| {
            v.sort();
            format!("{step} {}/{} ms", v[v.len() / 2], v[v.len() * 99 / 100])
        })
        .collect();
    println!(
        "e2e        wait before each event (p50/p99): {}",
        steps.join(", ")
    );
    let compute = signing_compute(2, 3, 50)?;
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let achieved = count as f64 / wall.as_secs_f64();
    println!(
        "e2e        {count} transfers at {rate}/s: {achieved:.1} workflows/s, slowest second {steady}/s (target >= 300 for 60 s); request -> broadcast p50 {:.0} ms p90 {:.0} ms p99 {:.0} ms max {:.0} ms (target p99 < 250)   FROST compute limit {:.0} signings/s on one core (ratio {:.3})",
        ms(pct(&latencies, 50)),
        ms(pct(&latencies, 90)),
        ms(pct(&latencies, 99)),
        ms(latencies[count - 1]),
        1.0 / compute.as_secs_f64(),
        achieved * compute.as_secs_f64()
    );
    trigger.trigger();
    drop(guardians);
    drop(node);
    bench.stop().await;
    Ok(std::process::ExitCode::SUCCESS)
}

type BTreeMapSteps = std::collections::BTreeMap<&'static str, Vec<i64>>;

/// A failure's reason, from a stored event's body.
fn codec_event(body: &[u8]) -> Option<String> {
    let event: custos_schemas::Event = custos_schemas::codec::from_msgpack(body).ok()?;
    match event.payload {
        Payload::StepFailed { step, reason } => Some(format!("{step}: {reason}")),
        _ => event.metadata.get("reason").cloned(),
    }
}

/// Records the default policy as active, the `bench` initiator and `extra`,
/// then starts the policy step (LTC at EUR 80) until `shutdown` on the
/// engine's replica of the trail, which it returns for the other steps.
async fn workflow_setup(
    bench: &BenchEngine,
    extra: Vec<Proposal>,
    shutdown: &Shutdown,
) -> anyhow::Result<custos_workers::trail::Trail> {
    let (js, ledger) = (&bench.js, &bench.ledger);
    let policy = custos_engine::policy::default_policy()
        .map_err(|e| anyhow::anyhow!(custos_engine::policy::render_errors(&e)))?;
    let mut proposals = vec![
        record(
            AggregateKind::Policy,
            "active",
            EventType::PolicyCreated,
            Payload::PolicyActivated {
                name: policy.name.clone(),
                version: policy.version().to_string(),
            },
        ),
        bench_user("bench".into(), "initiator", Vec::new()),
    ];
    proposals.extend(extra);
    let reply = ledger.append(proposals).await;
    anyhow::ensure!(
        matches!(reply, AppendReply::Appended { .. }),
        "bootstrap: {reply:?}"
    );
    let mut prices = custos_workers::policy_step::PriceTable::default();
    prices
        .quotes
        .entry("LTC".into())
        .or_default()
        .insert("EUR".into(), "80".into());
    // One replica for the process's steps, as `custos up` runs them.
    let trail = bench.trail.clone();
    let step = custos_workers::policy_step::PolicyStep::on_trail(
        js.clone(),
        trail.clone(),
        policy,
        custos_workers::policy_step::Prices::Table(Arc::new(prices)),
    )
    .await
    .map_err(anyhow::Error::msg)?;
    run_step(js, ledger, step, shutdown);
    Ok(trail)
}

fn run_step(
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    step: impl custos_workers::runtime::Step,
    shutdown: &Shutdown,
) {
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        step,
        shutdown.clone(),
    ));
}

fn bench_user(id: String, role: &str, groups: Vec<String>) -> Proposal {
    record(
        AggregateKind::User,
        &id.clone(),
        EventType::UserCreated,
        Payload::UserCreated(custos_schemas::UserRecord {
            email: format!("{id}@example.com"),
            name: id.clone(),
            id,
            slack_user_id: None,
            roles: vec![role.into()],
            groups,
            mfa_enrolled: true,
        }),
    )
}

/// Where bench transfers pay: a regtest Taproot address no wallet on the node
/// owns, as a payee's would be.
const FOREIGN_DESTINATION: &str =
    "rltc1pqurswpc8qurswpc8qurswpc8qurswpc8qurswpc8qurswpc8qursz7c3hy";

/// Benches make their wallets as an operator would: a change request to the
/// change service's code, under a policy of their own that allows wallet
/// creation outright (active until a bench activates its transfer policy),
/// run by the engine's key ceremony step among the guardian processes.
const CEREMONY_POLICY: &str = r#"
version = 1
name = "bench-ceremonies"
description = "Benchmarks: wallet creation needs no approval."
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
administrators = "Nothing here needs approvals."

[[rule]]
name = "wallet-creation"
description = "Wallets are created at once."
actions = ["wallet-create"]
outcome = "allow"
"#;

/// Where benches ask for wallets.
struct Ceremonies {
    trail: custos_workers::trail::Trail,
    policy: custos_workers::change::ActivePolicy,
}

impl Ceremonies {
    /// Activates the ceremony policy and records the operator.
    async fn start(bench: &BenchEngine) -> anyhow::Result<Self> {
        let ledger = &bench.ledger;
        let policy = custos_engine::policy::Policy::parse(CEREMONY_POLICY)
            .map_err(|e| anyhow::anyhow!(custos_engine::policy::render_errors(&e)))?;
        let reply = ledger
            .append(vec![
                record(
                    AggregateKind::Policy,
                    "bench-ceremonies",
                    EventType::PolicyCreated,
                    Payload::PolicyActivated {
                        name: policy.name.clone(),
                        version: policy.version().to_string(),
                    },
                ),
                bench_user("operator".into(), "initiator", Vec::new()),
            ])
            .await;
        anyhow::ensure!(
            matches!(reply, AppendReply::Appended { .. }),
            "ceremony policy: {reply:?}"
        );
        Ok(Ceremonies {
            trail: bench.trail.clone(),
            policy: custos_workers::change::ActivePolicy::new(policy),
        })
    }

    /// A FROST `threshold`-of-`n` wallet of guardians g1..gN on ltc-regtest.
    async fn frost_wallet(
        &self,
        ledger: &LedgerHandle,
        name: &str,
        threshold: u16,
        n: u16,
    ) -> anyhow::Result<WalletDescriptor> {
        let request = custos_schemas::change::ChangeRequest {
            request_id: format!("bench-{name}"),
            initiator: "operator".into(),
            change: custos_schemas::change::Change::WalletCreate {
                name: name.into(),
                model: "frost".into(),
                chain: "ltc-regtest".into(),
                threshold,
                guardians: (1..=n).map(|i| format!("g{i}")).collect(),
            },
        };
        let workflow_id = match custos_workers::change::submit(
            &self.trail,
            ledger,
            &self.policy,
            &custos_workers::policy_step::Prices::Table(Default::default()),
            &request,
        )
        .await
        {
            custos_schemas::change::ChangeReply::Accepted { workflow_id } => workflow_id,
            other => anyhow::bail!("wallet request refused: {other:?}"),
        };
        let started = Instant::now();
        loop {
            let (wallet, failed) = self
                .trail
                .read(|v| {
                    let failed = v
                        .change(&workflow_id)
                        .filter(|c| c.stage.is_terminal())
                        .and_then(|c| c.reason.clone());
                    (v.ledger.wallet(name).cloned(), failed)
                })
                .await
                .map_err(anyhow::Error::msg)?;
            if let Some(w) = wallet {
                return Ok(w);
            }
            if let Some(reason) = failed {
                anyhow::bail!("wallet creation failed: {reason}");
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "wallet {name} not created within 120 s"
            );
            // Poll the replica: the ceremony step records the wallet there.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
