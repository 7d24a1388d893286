//! `custos nats`: provisioning of streams and consumers.

use std::process::ExitCode;

use custos_adapters::jetstream::{StreamSettings, provision};

#[derive(Debug, clap::Subcommand)]
pub enum NatsCommand {
    /// Create or update the streams and consumers (idempotent).
    Provision {
        #[arg(long, env = "CUSTOS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Stream replicas: 1 for a single server, 3 for a cluster.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Keep events this many days (0: forever).
        #[arg(long, default_value_t = 0)]
        retention_days: u64,
    },
}

pub async fn run(command: NatsCommand) -> anyhow::Result<ExitCode> {
    match command {
        NatsCommand::Provision {
            nats_url,
            replicas,
            retention_days,
        } => {
            let client = crate::connect(&nats_url).await?;
            let js = async_nats::jetstream::new(client);
            let done = provision(&js, StreamSettings::new(replicas, retention_days))
                .await
                .map_err(|e| anyhow::anyhow!("provisioning: {e}"))?;
            for p in done {
                println!(
                    "{} {}",
                    if p.created { "created" } else { "updated" },
                    p.what
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
