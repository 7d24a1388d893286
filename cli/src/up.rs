//! `custos up`: the engine on embedded defaults, or against a given NATS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use custos_adapters::jetstream::{Batching, StreamSettings, provision};
use custos_adapters::nats_server::{Durability, NatsServer};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, EventType, Outcome, Payload, Proposal, RequestContext,
    Target,
};
use custos_workers::Shutdown;
use custos_workers::ledger::LedgerConfig;
use custos_workers::policy_step::{PolicyStep, PriceTable, Prices};
use custos_workers::trail::Trail;

use crate::services;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the embedded server's JetStream data and the audit key live.
    #[arg(long, env = "CUSTOS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Use this NATS server instead of starting one.
    #[arg(long, env = "CUSTOS_NATS_URL")]
    nats_url: Option<String>,
    /// Client port of the embedded server.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// `durable` (fsync before every ack; the default for a system of record) or
    /// `default` (the server's own setting: faster, loses the last writes on an OS crash).
    #[arg(long, default_value = "durable", value_parser = ["durable", "default"])]
    profile: String,
    /// Replicas of the streams: 3 on a 3-node cluster.
    #[arg(long, env = "CUSTOS_STREAM_REPLICAS", default_value_t = 1)]
    stream_replicas: usize,
    /// How the ledger sends appends: `atomic` batches (one fsync per batch, right
    /// for a server with `sync_interval: always`), `pipelined` (cheaper when the
    /// server does not fsync every write), or `auto` (pipelined only for the
    /// embedded server in the `default` profile).
    #[arg(long, default_value = "auto", value_parser = ["auto", "atomic", "pipelined"])]
    batching: String,
    /// Local guardian processes to start (g1, g2, ...), for trying Custos on one
    /// machine; 0 in a deployment, where each guardian runs on its own host.
    #[arg(long, default_value_t = 3)]
    local_guardians: u16,
    /// Users to import into the directory at start (TOML `[[user]]`); users
    /// already recorded are left as they are (changes go through administration).
    #[arg(long, env = "CUSTOS_DIRECTORY_FILE")]
    directory: Option<PathBuf>,
    /// Price table for the policy's fiat conditions (TOML: `[LTC]` then `EUR = "80"`).
    /// Without one, rules that need a fiat value block (fail closed).
    #[arg(long, env = "CUSTOS_PRICES_FILE")]
    prices: Option<PathBuf>,
    /// A price feed (HTTP GET, JSON shaped like the price table) read every
    /// `--price-feed-every-secs`; replaces `--prices`. Readings older than the
    /// policy's `max_price_age` count as missing (fail closed).
    #[arg(long, env = "CUSTOS_PRICE_FEED_URL")]
    price_feed: Option<String>,
    #[arg(long, default_value_t = 30)]
    price_feed_every_secs: u64,
    /// Keep events this many days (0: forever).
    #[arg(long, env = "CUSTOS_RETENTION_DAYS", default_value_t = 0)]
    retention_days: u64,
    /// Where approval pages and the Slack interactivity endpoint are served.
    #[arg(long, env = "CUSTOS_HTTP_ADDR", default_value = "127.0.0.1:8780")]
    http_addr: std::net::SocketAddr,
    /// Base URL of approval links as approvers reach it (behind a proxy).
    #[arg(long, env = "CUSTOS_PUBLIC_URL")]
    public_url: Option<String>,
    /// A Bitcoin-family node's JSON-RPC URL, credentials in the user info
    /// (`http://user:pass@host:port`). Without one, a local litecoind in regtest
    /// is started when installed.
    #[arg(long, env = "CUSTOS_BTC_RPC")]
    btc_rpc: Option<String>,
    /// The chain that node serves (`btc`, `btc-testnet`, `btc-regtest`, `ltc`, `ltc-regtest`, ...).
    #[arg(long, env = "CUSTOS_BTC_NETWORK", default_value = "ltc-regtest")]
    btc_network: String,
    /// An EVM node's JSON-RPC URL. Without one, a local anvil is started when
    /// installed.
    #[arg(long, env = "CUSTOS_EVM_RPC")]
    evm_rpc: Option<String>,
    /// The EIP-155 chain id that node serves (checked at start).
    #[arg(long, env = "CUSTOS_EVM_CHAIN_ID", default_value_t = 31_337)]
    evm_chain_id: u64,
    /// Do not start the local HD signer process (s1).
    #[arg(long)]
    no_local_signer: bool,
    /// Approvers who have not answered a request are asked again this often (seconds).
    #[arg(long, env = "CUSTOS_APPROVAL_REMINDER_SECS", default_value_t = 3600)]
    approval_reminder_secs: u64,
    /// Do not start a local regtest node or anvil when none is configured.
    #[arg(long)]
    no_local_node: bool,
    /// Walk a transfer through once on the local regtest chain: wallet, funding,
    /// request, two approvals on their web links with TOTP, guardians, node,
    /// confirmation. Needs the local node and the local guardians.
    #[arg(long)]
    demo: bool,
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    // Registered before anything starts, so Ctrl-C always stops cleanly.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    // Service managers stop with SIGTERM: the same clean stop as Ctrl-C.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let data_dir = args.data_dir.unwrap_or_else(crate::default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // Declared before every child, so dropped (the record removed) after them.
    let started = crate::started::Started::claim(&data_dir)?;
    let durability = if args.profile == "durable" {
        Durability::Always
    } else {
        Durability::Default
    };
    let (_server, url, embedded) = match args.nats_url {
        Some(url) => (None, url, false),
        None => {
            let server =
                NatsServer::start(&data_dir.join("nats"), args.nats_port, durability).await?;
            started.record("nats-server", server.pid())?;
            let url = server.url();
            (Some(server), url, true)
        }
    };
    let client = crate::connect(&url).await?;
    let js = async_nats::jetstream::new(client.clone());
    provision(
        &js,
        StreamSettings::new(args.stream_replicas, args.retention_days),
    )
    .await
    .map_err(|e| anyhow::anyhow!("provisioning JetStream: {e}"))?;
    let audit_key = crate::keys::load_or_create_audit_key(&data_dir)?;
    let public = hex::encode(audit_key.verifying_key().as_bytes());

    let (trigger, shutdown) = Shutdown::new();
    let batching = match (args.batching.as_str(), embedded) {
        ("pipelined", _) => Batching::Pipelined,
        ("auto", true) => batching_for(durability),
        _ => Batching::Atomic,
    };
    // With retention, a checkpoint at least four times per retention period, so
    // that a quiet trail always keeps a signed head.
    if args.retention_days > 0 {
        eprintln!(
            "warning: events older than {} days age out, and with them wallets, users and policies recorded before then; export the trail to keep it",
            args.retention_days
        );
    }
    let idle_checkpoint = (args.retention_days > 0)
        .then(|| Duration::from_secs(args.retention_days.saturating_mul(86_400) / 4));
    let config = LedgerConfig {
        batching,
        idle_checkpoint,
        ..LedgerConfig::new(audit_key)
    };
    // One replica of the trail serves every step of this process.
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut engine = tokio::spawn(custos_workers::engine::run(
        client.clone(),
        trail.clone(),
        config,
        shutdown.clone(),
        Some(ready_tx),
    ));
    let ledger = ready.await.context("the engine did not start")?;
    let policy = custos_engine::policy::default_policy().map_err(|e| {
        anyhow::anyhow!(
            "the default policy: {}",
            custos_engine::policy::render_errors(&e)
        )
    })?;
    bootstrap(&ledger, &policy, args.directory.as_deref()).await?;
    let prices = match &args.prices {
        Some(path) => crate::config::prices(path)?,
        None => PriceTable::default(),
    };
    let (policy_name, policy_version) = (policy.name.clone(), policy.version().to_string());
    let configured = policy.clone();
    prices.snapshot(0).map_err(anyhow::Error::msg)?;
    let prices = match &args.price_feed {
        Some(url) => {
            let reading = Arc::new(std::sync::Mutex::new(None));
            tokio::spawn(custos_workers::policy_step::follow_price_feed(
                url.clone(),
                Duration::from_secs(args.price_feed_every_secs.max(1)),
                reading.clone(),
                shutdown.clone(),
            ));
            Prices::Feed(reading)
        }
        None => Prices::Table(Arc::new(prices)),
    };
    let step = PolicyStep::on_trail(js.clone(), trail.clone(), policy, prices.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let _policy_step = tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        step,
        shutdown.clone(),
    ));
    let approvals = services::approvals(
        &js,
        &ledger,
        &trail,
        &data_dir,
        services::ApprovalSettings {
            http_addr: args.http_addr,
            public_url: args.public_url.clone(),
            channels: services::Channels::from_env(),
            remind_every: Duration::from_secs(args.approval_reminder_secs.max(1)),
        },
        &shutdown,
    )
    .await?;
    services::changes(&client, &ledger, &trail, configured, prices, &shutdown);
    services::signing(&client, &js, &ledger, &trail, &shutdown)?;
    let node = match &args.btc_rpc {
        Some(url) => Some(services::remote_node(url, &args.btc_network)?),
        None if !args.no_local_node && custos_adapters::regtest::installed() => {
            Some(services::BitcoinNode::Local(
                custos_adapters::regtest::RegtestNode::start(&data_dir.join("litecoind"), 0)
                    .await
                    .context("starting the local litecoind (regtest)")?,
            ))
        }
        None => None,
    };
    let evm = match &args.evm_rpc {
        Some(url) => Some(services::remote_evm(url, args.evm_chain_id).await?),
        None if !args.no_local_node && custos_adapters::anvil::installed() => {
            Some(services::EvmNode::Local(
                custos_adapters::anvil::AnvilNode::start(0)
                    .await
                    .context("starting the local anvil")?,
            ))
        }
        None => None,
    };
    if let Some(services::BitcoinNode::Local(n)) = &node {
        started.record("litecoind", n.pid())?;
    }
    if let Some(services::EvmNode::Local(n)) = &evm {
        started.record("anvil", n.pid())?;
    }
    if node.is_some() || evm.is_some() {
        services::chain(
            &client,
            &js,
            &ledger,
            &trail,
            node.as_ref(),
            evm.as_ref(),
            &shutdown,
        )?;
    }
    println!("Custos is up.");
    if embedded {
        println!(
            "  NATS        {url}  (embedded nats-server, JetStream in {}, profile {})",
            data_dir.join("nats").display(),
            args.profile
        );
    } else {
        println!("  NATS        {url}");
    }
    println!(
        "  Audit key   {public}  ({})",
        crate::keys::audit_pub_path(&data_dir).display()
    );
    println!(
        "  Intake      request/reply on {}",
        custos_schemas::subjects::REQ_TRANSFER
    );
    let guardians = start_local_guardians(&data_dir, &url, args.local_guardians)?;
    for (i, guardian) in guardians.iter().enumerate() {
        started.record(&format!("guardian g{}", i + 1), guardian.id())?;
    }
    let _signer = if args.no_local_signer {
        None
    } else {
        let signer = start_local_signer(&data_dir, &url)?;
        started.record(&format!("HD signer {LOCAL_SIGNER}"), signer.id())?;
        println!(
            "  HD signer   {LOCAL_SIGNER} (local process, seeds in {})",
            data_dir.join("signers").display()
        );
        Some(signer)
    };
    if !guardians.is_empty() {
        println!(
            "  Guardians   {} (local processes, data in {})",
            (1..=guardians.len())
                .map(|i| format!("g{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            data_dir.join("guardians").display()
        );
        println!(
            "  Wallet      custos wallet create --threshold 2 --guardians g1,g2,g3 --chain ltc-regtest --name treasury"
        );
    }
    println!(
        "  Approvals   {} on {}  (approval pages{})",
        approvals.channels.join(", "),
        approvals.base_url,
        if approvals.channels.contains(&"slack") {
            ", POST /slack/interactions"
        } else {
            ""
        }
    );
    match &node {
        Some(services::BitcoinNode::Local(n)) => println!(
            "  Chain       ltc-regtest: local litecoind (RPC 127.0.0.1:{}, data in {})",
            n.rpc_port,
            n.data_dir.display()
        ),
        Some(services::BitcoinNode::Remote { chain, rpc }) => {
            println!("  Chain       {chain}: {}", rpc.url())
        }
        None => println!(
            "  Chain       none: transfers are signed but not broadcast (--btc-rpc, or install litecoind)"
        ),
    }
    match &evm {
        Some(services::EvmNode::Local(n)) => println!(
            "  EVM         evm-{}: local anvil (RPC 127.0.0.1:{}, chain kept in memory)",
            custos_adapters::anvil::CHAIN_ID,
            n.port
        ),
        Some(services::EvmNode::Remote { chain, rpc }) => {
            println!("  EVM         {chain}: {}", rpc.shown())
        }
        None => println!(
            "  EVM         none (--evm-rpc URL --evm-chain-id ID, or scripts/install-deps for anvil)"
        ),
    }
    println!(
        "  Policy      {} (version {})",
        policy_name,
        &policy_version[..12]
    );
    println!("  Try         custos tx submit --wallet treasury --asset LTC --to ADDR --amount 1");
    println!("              custos tx show ID; custos audit verify");
    println!("Ctrl-C stops it.");
    if args.demo {
        match &node {
            Some(services::BitcoinNode::Local(local)) if args.local_guardians >= 3 => {
                if let Err(e) =
                    crate::demo::run(&client, &js, &trail, &approvals.issuer, local).await
                {
                    eprintln!("demo: {e:#}");
                }
            }
            _ => eprintln!("demo: needs the local regtest node and three local guardians"),
        }
    }

    let stopped = tokio::select! {
        _ = interrupt.recv() => None,
        _ = terminate.recv() => None,
        result = &mut engine => Some(result),
    };
    let result = match stopped {
        Some(result) => result,
        None => {
            println!("Stopping...");
            trigger.trigger();
            engine.await
        }
    };
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(anyhow::anyhow!("engine task failed: {e}")),
    }
}

/// The append batching that suits a server profile.
pub fn batching_for(durability: Durability) -> Batching {
    match durability {
        Durability::Always => Batching::Atomic,
        Durability::Default => Batching::Pipelined,
    }
}

/// Starts `count` guardian processes, each with its own data directory and a
/// passphrase file created once. They stop with `custos up` (killed on drop, and
/// Ctrl-C reaches them too). Local guardians keep their passphrase on the same
/// disk as their shares: for trying Custos, not for holding real funds.
fn start_local_guardians(
    data_dir: &std::path::Path,
    nats_url: &str,
    count: u16,
) -> anyhow::Result<Vec<tokio::process::Child>> {
    let exe = std::env::current_exe().context("locating the custos binary")?;
    let mut children = Vec::new();
    for i in 1..=count {
        let id = format!("g{i}");
        let dir = data_dir.join("guardians").join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let secrets = data_dir.join("guardian-passphrases");
        std::fs::create_dir_all(&secrets)?;
        let passphrase = secrets.join(&id);
        if !passphrase.exists() {
            let mut bytes = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
            crate::keys::write_private(&passphrase, &hex::encode(bytes))?;
        }
        let child = tokio::process::Command::new(&exe)
            .args([
                "guardian",
                "run",
                "--id",
                &id,
                "--nats-url",
                nats_url,
                "--data-dir",
            ])
            .arg(&dir)
            .env("CUSTOS_GUARDIAN_PASSPHRASE_FILE", &passphrase)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting guardian {id}"))?;
        children.push(child);
    }
    Ok(children)
}

/// The local HD signer's id.
const LOCAL_SIGNER: &str = "s1";

/// Starts the local HD signer process, with its data directory and a
/// passphrase file created once (like the local guardians: for trying Custos,
/// not for holding real funds). Killed on drop.
fn start_local_signer(
    data_dir: &std::path::Path,
    nats_url: &str,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("locating the custos binary")?;
    let dir = data_dir.join("signers").join(LOCAL_SIGNER);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let passphrase = data_dir.join("signer-passphrase");
    if !passphrase.exists() {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        crate::keys::write_private(&passphrase, &hex::encode(bytes))?;
    }
    tokio::process::Command::new(&exe)
        .args([
            "signer",
            "run",
            "--id",
            LOCAL_SIGNER,
            "--nats-url",
            nats_url,
            "--data-dir",
        ])
        .arg(&dir)
        .env("CUSTOS_SIGNER_PASSPHRASE_FILE", &passphrase)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the HD signer {LOCAL_SIGNER}"))
}

/// Records the active policy (the default) the first time, and imports the
/// directory file's users that are not recorded yet.
async fn bootstrap(
    ledger: &custos_workers::ledger::LedgerHandle,
    policy: &custos_engine::policy::Policy,
    directory: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let record =
        |kind: AggregateKind, id: &str, event_type: EventType, payload: Payload| Proposal {
            aggregate_kind: kind,
            workflow_id: id.to_string(),
            expected_version: 0,
            event_type,
            causation_id: None,
            actor: Actor::system("bootstrap"),
            target: Target {
                kind: kind.as_str().into(),
                id: id.to_string(),
                amount: None,
                currency: None,
            },
            context: RequestContext::default(),
            result: Outcome::Success,
            metadata: Default::default(),
            payload,
        };
    let mut proposals = vec![record(
        AggregateKind::Policy,
        "active",
        EventType::PolicyCreated,
        Payload::PolicyActivated {
            name: policy.name.clone(),
            version: policy.version().to_string(),
        },
    )];
    if let Some(path) = directory {
        let mut check = custos_engine::policy::Directory::new();
        for user in crate::config::users(path)? {
            check
                .add_record(&user)
                .map_err(|e| anyhow::anyhow!("{}: user {}: {e}", path.display(), user.id))?;
            let id = user.id.clone();
            proposals.push(record(
                AggregateKind::User,
                &id,
                EventType::UserCreated,
                Payload::UserCreated(user),
            ));
        }
    }
    // One at a time: an entry already recorded conflicts and is left alone.
    for proposal in proposals {
        let what = format!(
            "{}.{}",
            proposal.aggregate_kind.as_str(),
            proposal.workflow_id
        );
        match ledger.append(vec![proposal]).await {
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => {}
            other => anyhow::bail!("recording {what}: {other:?}"),
        }
    }
    Ok(())
}
