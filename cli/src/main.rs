//! `custos`: one binary for the engine, its operators and its auditors.

mod admin;
mod audit;
mod bench;
mod config;
mod demo;
mod guardian;
mod keys;
mod nats;
mod policy;
mod services;
mod signer;
mod started;
mod tx;
mod up;
mod wallet;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "custos",
    version,
    about = "Custos: an enterprise custody engine on NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where clients find the server.
#[derive(Debug, clap::Args)]
struct Conn {
    /// NATS server URL.
    #[arg(
        long,
        env = "CUSTOS_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine (with an embedded nats-server unless --nats-url is given).
    Up(up::UpArgs),
    /// NATS administration.
    Nats {
        #[command(subcommand)]
        command: nats::NatsCommand,
    },
    /// A guardian process holding key shares.
    Guardian {
        #[command(subcommand)]
        command: guardian::GuardianCommand,
    },
    /// An HD signer process holding HD wallets' seeds.
    Signer {
        #[command(subcommand)]
        command: signer::SignerCommand,
    },
    /// Wallets: create (a key ceremony), show, list.
    Wallet {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: wallet::WalletCommand,
    },
    /// Policies: validate, show, diff, simulate, apply.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Freeze a wallet's signing (or every wallet's) at once: an administrator's emergency.
    Freeze {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        args: admin::FreezeArgs,
    },
    /// Ask to lift a freeze (needs the active policy's quorum).
    Unfreeze {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        args: admin::UnfreezeArgs,
    },
    /// Wallet destination whitelists: add, remove (each needs the policy's quorum).
    Whitelist {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: admin::WhitelistCommand,
    },
    /// Directory users: add, deactivate (each needs the policy's quorum).
    User {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: admin::UserCommand,
    },
    /// Roles: create, assign, revoke (each needs the policy's quorum).
    Role {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: admin::RoleCommand,
    },
    /// Administrative change workflows: show.
    Change {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: admin::ChangeCommand,
    },
    /// Transfers: submit, show, list.
    Tx {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: tx::TxCommand,
    },
    /// The audit trail: tail, export, verify, checkpoint.
    Audit {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Benchmarks against real servers started for the run; see BENCHMARKS.md.
    Bench(bench::BenchArgs),
}

/// The data directory used when none is given.
fn default_data_dir() -> PathBuf {
    PathBuf::from(".custos")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUSTOS_LOG")
                .unwrap_or_else(|_| "warn,custos=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Nats { command } => nats::run(command).await,
            Command::Tx { conn, command } => tx::run(&conn.nats_url, command).await,
            Command::Guardian { command } => guardian::run(command).await,
            Command::Signer { command } => signer::run(command).await,
            Command::Policy { command } => policy::run(command).await,
            Command::Freeze { conn, args } => admin::freeze(&conn.nats_url, args).await,
            Command::Unfreeze { conn, args } => admin::unfreeze(&conn.nats_url, args).await,
            Command::Whitelist { conn, command } => admin::whitelist(&conn.nats_url, command).await,
            Command::User { conn, command } => admin::user(&conn.nats_url, command).await,
            Command::Role { conn, command } => admin::role(&conn.nats_url, command).await,
            Command::Change { conn, command } => admin::change(&conn.nats_url, command).await,
            Command::Wallet { conn, command } => wallet::run(&conn.nats_url, command).await,
            Command::Audit { conn, command } => audit::run(&conn.nats_url, command).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to NATS with a clear error.
async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("custos-cli")
        .connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to NATS at {url}: {e} (is `custos up` running? set --nats-url or CUSTOS_NATS_URL)"))
}
