//! `custos signer run`: one HD signer process (the seeds of HD wallets).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use custos_workers::Shutdown;
use custos_workers::hd_signer::{self, SignerConfig};
use zeroize::Zeroizing;

#[derive(Debug, clap::Subcommand)]
pub enum SignerCommand {
    /// Run an HD signer. Its passphrase comes from CUSTOS_SIGNER_PASSPHRASE_FILE
    /// (preferred) or CUSTOS_SIGNER_PASSPHRASE, never from an argument.
    Run {
        #[arg(long)]
        id: String,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, env = "CUSTOS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
    },
}

pub async fn run(command: SignerCommand) -> anyhow::Result<ExitCode> {
    let SignerCommand::Run {
        id,
        data_dir,
        nats_url,
    } = command;
    let passphrase = passphrase()?;
    let client = crate::connect(&nats_url).await?;
    let (trigger, shutdown) = Shutdown::new();
    let config = SignerConfig {
        id,
        data_dir,
        passphrase,
    };
    let mut task = tokio::spawn(hd_signer::run(client, config, shutdown));
    let stopped = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        result = &mut task => Some(result),
    };
    let result = match stopped {
        Some(result) => result,
        None => {
            trigger.trigger();
            task.await
        }
    };
    match result {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(anyhow::anyhow!("signer: {e}")),
        Err(e) => Err(anyhow::anyhow!("signer task failed: {e}")),
    }
}

fn passphrase() -> anyhow::Result<Zeroizing<String>> {
    if let Ok(path) = std::env::var("CUSTOS_SIGNER_PASSPHRASE_FILE") {
        let text = Zeroizing::new(
            std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?,
        );
        let trimmed = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
        anyhow::ensure!(!trimmed.is_empty(), "{path}: empty passphrase");
        return Ok(trimmed);
    }
    match std::env::var("CUSTOS_SIGNER_PASSPHRASE") {
        Ok(p) if !p.is_empty() => Ok(Zeroizing::new(p)),
        _ => anyhow::bail!(
            "set CUSTOS_SIGNER_PASSPHRASE_FILE (or CUSTOS_SIGNER_PASSPHRASE) to the signer's passphrase"
        ),
    }
}
