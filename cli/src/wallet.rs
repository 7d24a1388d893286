//! `custos wallet`: create (a key ceremony among guardians), rotate, remove,
//! add or repair a guardian, set the threshold (key ceremonies on the same
//! key), each asked for as a change the policy decides; show, balance, list.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use custos_engine::change::Stage;
use custos_schemas::change::Change;
use custos_schemas::{AggregateKind, Payload, WalletDescriptor, subjects};

use crate::admin::Requester;

#[derive(Debug, clap::Subcommand)]
pub enum WalletCommand {
    /// Ask to create a wallet: for `frost`, a DKG among the guardians once the
    /// policy allows it (the key never exists anywhere).
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
        #[command(flatten)]
        requester: Requester,
        #[arg(long)]
        json: bool,
    },
    /// Ask to rotate a FROST wallet's key shares: same key and address, new shares.
    Rotate {
        name: String,
        #[command(flatten)]
        requester: Requester,
    },
    /// Ask to remove a guardian of a FROST wallet: the others refresh their
    /// shares among themselves (same key and address, same threshold); its
    /// share no longer combines with theirs.
    RemoveGuardian {
        name: String,
        #[arg(long)]
        guardian: String,
        #[command(flatten)]
        requester: Requester,
    },
    /// Ask to add a guardian to a FROST wallet (also to replace one, then
    /// remove the old): threshold-many helpers compute its share without the
    /// key ever existing; same key, address and threshold.
    AddGuardian {
        name: String,
        #[arg(long)]
        guardian: String,
        /// Comma-separated helpers (default: the first threshold-many guardians).
        #[arg(long, value_delimiter = ',')]
        helpers: Vec<String>,
        #[command(flatten)]
        requester: Requester,
    },
    /// Ask to repair the share a guardian lost (its data is gone, its
    /// identity is not): threshold-many helpers rebuild it under its own
    /// index, checked against the wallet's recorded public shares.
    RepairShare {
        name: String,
        #[arg(long)]
        guardian: String,
        /// Comma-separated helpers (default: the first threshold-many others).
        #[arg(long, value_delimiter = ',')]
        helpers: Vec<String>,
        #[command(flatten)]
        requester: Requester,
    },
    /// Ask to change a FROST wallet's threshold: the guardians redistribute
    /// their shares verifiably under the new threshold (same key, address and
    /// guardians; 2 <= threshold <= guardians).
    SetThreshold {
        name: String,
        #[arg(long)]
        threshold: u16,
        #[command(flatten)]
        requester: Requester,
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
            requester,
            json,
        } => {
            let change = Change::WalletCreate {
                name,
                model,
                chain,
                threshold,
                guardians,
            };
            ceremony(&client, requester, change, json).await
        }
        WalletCommand::Rotate { name, requester } => {
            ceremony(
                &client,
                requester,
                Change::KeyRotation { wallet: name },
                false,
            )
            .await
        }
        WalletCommand::RemoveGuardian {
            name,
            guardian,
            requester,
        } => {
            let change = Change::GuardianRemove {
                wallet: name,
                guardian,
            };
            ceremony(&client, requester, change, false).await
        }
        WalletCommand::AddGuardian {
            name,
            guardian,
            helpers,
            requester,
        } => {
            let change = Change::GuardianAdd {
                wallet: name,
                guardian,
                helpers,
            };
            ceremony(&client, requester, change, false).await
        }
        WalletCommand::RepairShare {
            name,
            guardian,
            helpers,
            requester,
        } => {
            let change = Change::ShareRepair {
                wallet: name,
                guardian,
                helpers,
            };
            ceremony(&client, requester, change, false).await
        }
        WalletCommand::SetThreshold {
            name,
            threshold,
            requester,
        } => {
            let change = Change::ThresholdChange {
                wallet: name,
                threshold,
            };
            ceremony(&client, requester, change, false).await
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
            } else if let Some(wei) = answer["wei"].as_str() {
                println!(
                    "{name}  {} {} ({wei} wei, {} at {})",
                    answer["amount"].as_str().unwrap_or_default(),
                    answer["asset"].as_str().unwrap_or_default(),
                    answer["chain"].as_str().unwrap_or_default(),
                    answer["address"].as_str().unwrap_or_default()
                );
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

/// Asks for a key ceremony through the change workflow. Allowed outright, it
/// runs at once and the wallet is printed as recorded after it; awaiting
/// approvals, it runs once they are given (`custos change show ID`).
async fn ceremony(
    client: &async_nats::Client,
    requester: Requester,
    change: Change,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let name = change.wallet().unwrap_or_default().to_string();
    let Some(workflow) = crate::admin::submit(client, requester, change, json).await? else {
        return Ok(ExitCode::FAILURE);
    };
    let workflow = workflow.settled(client).await?;
    if workflow.state.stage != Stage::Applied {
        match json {
            true => eprintln!("change {} is {:?}", workflow.id, workflow.state.stage),
            false => workflow.print_next(),
        }
        return Ok(match workflow.state.stage {
            Stage::AwaitingApprovals => ExitCode::SUCCESS,
            _ => ExitCode::FAILURE,
        });
    }
    let wallets = wallets(client, Some(&name)).await?;
    let wallet = wallets.get(&name).with_context(|| {
        format!(
            "change {} is applied but no wallet {name} is recorded",
            workflow.id
        )
    })?;
    print_wallet(wallet, json)?;
    Ok(ExitCode::SUCCESS)
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
