//! `custos wallet`: create (a key ceremony among guardians), rotate, remove or
//! add a guardian, set the threshold (key ceremonies on the same key), show,
//! list.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use custos_schemas::{AggregateKind, ContentType, Payload, WalletDescriptor, subjects};
use custos_workers::wallets::{CreateWallet, CreateWalletReply, GuardianChange, RotateWallet};

#[derive(Debug, clap::Subcommand)]
pub enum WalletCommand {
    /// Create a wallet: for `frost`, a DKG among the guardians; the key never exists anywhere.
    Create {
        #[arg(long, default_value = "frost")]
        model: String,
        #[arg(long)]
        threshold: u16,
        /// Comma-separated guardian ids, e.g. g1,g2,g3.
        #[arg(long, value_delimiter = ',')]
        guardians: Vec<String>,
        /// e.g. ltc-regtest, btc-mainnet.
        #[arg(long)]
        chain: String,
        #[arg(long)]
        name: String,
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
        #[arg(long)]
        json: bool,
    },
    /// Rotate a FROST wallet's key shares: same key and address, new shares.
    Rotate {
        name: String,
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
    },
    /// Remove a guardian of a FROST wallet: the others refresh their shares among
    /// themselves (same key and address, same threshold); its share no longer
    /// combines with theirs.
    RemoveGuardian {
        name: String,
        #[arg(long)]
        guardian: String,
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
    },
    /// Add a guardian to a FROST wallet (also to replace one, then remove the
    /// old): threshold-many helpers compute its share without the key ever
    /// existing; same key, address and threshold.
    AddGuardian {
        name: String,
        #[arg(long)]
        guardian: String,
        /// Comma-separated helpers (default: the first threshold-many guardians).
        #[arg(long, value_delimiter = ',')]
        helpers: Vec<String>,
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
    },
    /// Change a FROST wallet's threshold: the guardians redistribute their
    /// shares verifiably under the new threshold (same key, address and
    /// guardians; 2 <= threshold <= guardians).
    SetThreshold {
        name: String,
        #[arg(long)]
        threshold: u16,
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
    },
    /// Show a wallet: model, threshold, guardians, receive address.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// A wallet's confirmed balance, from its chain's node (through `custos up`).
    Balance {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List wallets.
    List,
}

pub async fn run(nats_url: &str, command: WalletCommand) -> anyhow::Result<ExitCode> {
    let client = crate::connect(nats_url).await?;
    match command {
        WalletCommand::Create {
            model,
            threshold,
            guardians,
            chain,
            name,
            initiator,
            json,
        } => {
            let request = CreateWallet {
                name,
                model,
                threshold,
                guardians,
                chain,
                initiator,
            };
            let reply = ask(
                &client,
                subjects::REQ_WALLET_CREATE,
                ContentType::Json.encode(&request),
            )
            .await?;
            Ok(match reply {
                CreateWalletReply::Created { wallet } => {
                    print_wallet(&wallet, json)?;
                    ExitCode::SUCCESS
                }
                CreateWalletReply::Failed { reason } => {
                    eprintln!("wallet not created: {reason}");
                    ExitCode::FAILURE
                }
            })
        }
        WalletCommand::Rotate { name, initiator } => {
            lifecycle(&client, name, initiator, None).await
        }
        WalletCommand::RemoveGuardian {
            name,
            guardian,
            initiator,
        } => {
            let change = GuardianChange::Remove { guardian };
            lifecycle(&client, name, initiator, Some(change)).await
        }
        WalletCommand::AddGuardian {
            name,
            guardian,
            helpers,
            initiator,
        } => {
            let change = GuardianChange::Add { guardian, helpers };
            lifecycle(&client, name, initiator, Some(change)).await
        }
        WalletCommand::SetThreshold {
            name,
            threshold,
            initiator,
        } => {
            let change = GuardianChange::Threshold { threshold };
            lifecycle(&client, name, initiator, Some(change)).await
        }
        WalletCommand::Show { name, json } => {
            custos_schemas::validate_token("name", &name)?;
            let wallets = wallets(&client, Some(&name)).await?;
            let wallet = wallets
                .get(&name)
                .with_context(|| format!("no wallet {name}"))?;
            print_wallet(wallet, json)?;
            Ok(ExitCode::SUCCESS)
        }
        WalletCommand::Balance { name, json } => {
            custos_schemas::validate_token("name", &name)?;
            let body = serde_json::to_vec(&serde_json::json!({ "wallet": name }))?;
            let reply = tokio::time::timeout(
                Duration::from_secs(30),
                client.request(subjects::REQ_WALLET_BALANCE, body.into()),
            )
            .await
            .context("no answer from the balance service within 30 s")?
            .map_err(|e| {
                anyhow::anyhow!("balance request failed: {e} (is `custos up` running with a node?)")
            })?;
            let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
                .map_err(|e| anyhow::anyhow!("unreadable reply: {e}"))?;
            if let Some(error) = answer["error"].as_str() {
                eprintln!("{error}");
                return Ok(ExitCode::FAILURE);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let sat = answer["confirmedSat"].as_u64().unwrap_or_default();
                println!(
                    "{name}  {}.{:08} ({} coins, {} at {})",
                    sat / 100_000_000,
                    sat % 100_000_000,
                    answer["coins"],
                    answer["chain"].as_str().unwrap_or_default(),
                    answer["address"].as_str().unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WalletCommand::List => {
            println!(
                "{:<20} {:<8} {:<9} {:<14} ADDRESS",
                "WALLET", "MODEL", "THRESHOLD", "CHAIN"
            );
            for w in wallets(&client, None).await?.values() {
                let threshold = w
                    .threshold
                    .map(|t| format!("{t}-of-{}", w.guardians.len()))
                    .unwrap_or_default();
                println!(
                    "{:<20} {:<8} {:<9} {:<14} {}",
                    w.name, w.model, threshold, w.chain, w.address
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a key ceremony on an existing wallet (rotation or a guardian change).
async fn lifecycle(
    client: &async_nats::Client,
    name: String,
    initiator: String,
    change: Option<GuardianChange>,
) -> anyhow::Result<ExitCode> {
    let done = match &change {
        None => "rotated the key shares of".to_string(),
        Some(GuardianChange::Remove { guardian }) => format!("removed guardian {guardian} from"),
        Some(GuardianChange::Add { guardian, .. }) => format!("added guardian {guardian} to"),
        Some(GuardianChange::Threshold { threshold }) => {
            format!("set threshold {threshold} on")
        }
    };
    let request = RotateWallet {
        name,
        initiator,
        change,
    };
    let reply = ask(
        client,
        subjects::REQ_WALLET_ROTATE,
        ContentType::Json.encode(&request),
    )
    .await?;
    Ok(match reply {
        CreateWalletReply::Created { wallet } => {
            println!(
                "{done} {} ({}-of-{}: {}; address unchanged: {})",
                wallet.name,
                wallet.threshold.unwrap_or(0),
                wallet.guardians.len(),
                wallet
                    .guardians
                    .iter()
                    .map(|g| g.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                wallet.address
            );
            ExitCode::SUCCESS
        }
        CreateWalletReply::Failed { reason } => {
            eprintln!("{reason}");
            ExitCode::FAILURE
        }
    })
}

/// Sends a request to the wallet service and reads its answer.
async fn ask(
    client: &async_nats::Client,
    subject: &'static str,
    body: Vec<u8>,
) -> anyhow::Result<CreateWalletReply> {
    let reply = tokio::time::timeout(
        Duration::from_secs(120),
        client.request(subject, body.into()),
    )
    .await
    .context("no answer from the wallet service within 120 s")?
    .map_err(|e| anyhow::anyhow!("wallet request failed: {e} (is `custos up` running?)"))?;
    ContentType::Json
        .decode(&reply.payload)
        .map_err(|e| anyhow::anyhow!("unreadable reply: {e}"))
}

/// Wallets recorded in the trail (one, or all), by name, as their last
/// creation, guardian or threshold change left them.
async fn wallets(
    client: &async_nats::Client,
    name: Option<&str>,
) -> anyhow::Result<BTreeMap<String, WalletDescriptor>> {
    let js = async_nats::jetstream::new(client.clone());
    let filter = subjects::aggregate_filter(AggregateKind::Wallet, name.unwrap_or("*"));
    let mut out = BTreeMap::new();
    for event in crate::tx::read_decoded(&js, Some(filter)).await? {
        if let Payload::WalletCreated(w)
        | Payload::GuardianChanged { wallet: w, .. }
        | Payload::ThresholdChanged { wallet: w, .. } = event.payload
        {
            out.insert(w.name.clone(), w);
        }
    }
    Ok(out)
}

fn print_wallet(w: &WalletDescriptor, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(w)?);
        return Ok(());
    }
    println!("wallet     {}", w.name);
    println!(
        "model      {}{}",
        w.model,
        w.threshold
            .map(|t| format!(" {t}-of-{}", w.guardians.len()))
            .unwrap_or_default()
    );
    println!("chain      {}", w.chain);
    println!("address    {}", w.address);
    if !w.guardians.is_empty() {
        println!(
            "guardians  {}",
            w.guardians
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(t) = &w.transcript {
        println!("ceremony   transcript {t}");
    }
    Ok(())
}
