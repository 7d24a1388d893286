//! `custos tx`: submit a transfer like an upstream system would, and look at
//! workflows (a fold of their events).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use custos_adapters::jetstream::read_events;
use custos_engine::transfer::{self, Stage, Transfer};
use custos_schemas::approval::ApprovalEscalation;
use custos_schemas::{
    AggregateKind, ContentType, Event, IntakeReply, Payload, TransferRequest, codec, subjects,
};
use rand::RngCore;

#[derive(Debug, clap::Subcommand)]
pub enum TxCommand {
    /// Submit a transfer request (as upstream systems do, over NATS request/reply).
    Submit {
        #[arg(long)]
        wallet: String,
        #[arg(long)]
        asset: String,
        #[arg(long)]
        to: String,
        /// Decimal amount in the asset's units, e.g. 0.015.
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        #[arg(long)]
        memo: Option<String>,
        /// Directory user id of the initiator.
        #[arg(long, env = "CUSTOS_USER", default_value = "cli")]
        initiator: String,
        /// Idempotency key; submitting again with it returns the same workflow.
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one workflow: its stage and history.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List transfer workflows.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(nats_url: &str, command: TxCommand) -> anyhow::Result<ExitCode> {
    let client = crate::connect(nats_url).await?;
    match command {
        TxCommand::Submit {
            wallet,
            asset,
            to,
            amount,
            memo,
            initiator,
            request_id,
            json,
        } => {
            let request_id = request_id.unwrap_or_else(|| {
                let mut bytes = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut bytes);
                format!("cli-{}", hex::encode(bytes))
            });
            let request = TransferRequest {
                request_id,
                wallet,
                asset,
                destination: to,
                amount,
                memo,
                initiator,
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(subjects::headers::CONTENT_TYPE, ContentType::JSON);
            let body = ContentType::Json.encode(&request);
            let reply = tokio::time::timeout(
                Duration::from_secs(30),
                client.request_with_headers(subjects::REQ_TRANSFER, headers, body.into()),
            )
            .await
            .context("no answer from intake within 30 s")?
            .map_err(|e| anyhow::anyhow!("intake request failed: {e} (is `custos up` running?)"))?;
            let reply: IntakeReply = ContentType::Json
                .decode(&reply.payload)
                .map_err(|e| anyhow::anyhow!("unreadable intake reply: {e}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            }
            Ok(match reply {
                IntakeReply::Accepted {
                    workflow_id,
                    duplicate,
                } => {
                    if !json {
                        println!(
                            "{workflow_id}{}",
                            if duplicate {
                                " (already submitted)"
                            } else {
                                ""
                            }
                        );
                    }
                    ExitCode::SUCCESS
                }
                IntakeReply::Rejected(e) => {
                    if !json {
                        eprintln!(
                            "rejected: {}{}",
                            e.field.map(|f| format!("{f}: ")).unwrap_or_default(),
                            e.reason
                        );
                    }
                    ExitCode::FAILURE
                }
                IntakeReply::Unavailable { reason } => {
                    if !json {
                        eprintln!(
                            "not recorded, retry with --request-id {}: {reason}",
                            request.request_id
                        );
                    }
                    ExitCode::FAILURE
                }
            })
        }
        TxCommand::Show { id, json } => {
            custos_schemas::validate_token("id", &id)?;
            let js = async_nats::jetstream::new(client);
            let events = read_decoded(
                &js,
                Some(subjects::aggregate_filter(AggregateKind::Tx, &id)),
            )
            .await?;
            if events.is_empty() {
                anyhow::bail!("no transfer workflow {id}");
            }
            let (state, _) = transfer::fold(events.iter())
                .map_err(|e| anyhow::anyhow!("workflow {id} does not replay: {e}"))?;
            let missing = match state.stage {
                Stage::AwaitingApprovals => missing_approvals(&js, &id).await?,
                _ => Vec::new(),
            };
            let escalations = escalations(&js, &id, &state).await?;
            if json {
                let mut shown = summary(&id, &state, &events);
                shown["approvalsMissing"] = serde_json::json!(missing);
                shown["escalations"] = serde_json::json!(
                    escalations
                        .iter()
                        .map(|(at, e)| serde_json::json!({
                            "time": crate::audit::format_ms(*at),
                            "rule": e.rule,
                            "group": e.group,
                            "countsFrom": crate::audit::format_ms(e.counts_from),
                            "notified": e.notified,
                        }))
                        .collect::<Vec<_>>()
                );
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print_show(&id, &state, &events);
                for (at, e) in &escalations {
                    println!(
                        "escalated  {} rule {} to {} (counts from {}; asked: {})",
                        crate::audit::format_ms(*at),
                        e.rule,
                        e.group,
                        crate::audit::format_ms(e.counts_from),
                        if e.notified.is_empty() {
                            "nobody".to_string()
                        } else {
                            e.notified.join(", ")
                        }
                    );
                }
                for m in &missing {
                    println!("missing    {m}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TxCommand::List { json } => {
            let js = async_nats::jetstream::new(client);
            let events =
                read_decoded(&js, Some(format!("{}.tx.>", subjects::EVENTS_PREFIX))).await?;
            let mut by_workflow: BTreeMap<String, Vec<Event>> = BTreeMap::new();
            for e in events {
                by_workflow
                    .entry(e.workflow_id.clone())
                    .or_default()
                    .push(e);
            }
            let mut rows = Vec::new();
            for (id, events) in &by_workflow {
                match transfer::fold(events.iter()) {
                    Ok((state, _)) => rows.push(summary(id, &state, events)),
                    Err(e) => eprintln!("{id}: does not replay: {e}"),
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<28} {:<18} {:>20} {:<6} {:<12} DESTINATION",
                    "WORKFLOW", "STAGE", "AMOUNT", "ASSET", "WALLET"
                );
                for r in &rows {
                    let s = |k: &str| {
                        r.pointer(k)
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_string()
                    };
                    println!(
                        "{:<28} {:<18} {:>20} {:<6} {:<12} {}",
                        s("/workflowId"),
                        s("/stage"),
                        s("/request/amount"),
                        s("/request/asset"),
                        s("/request/wallet"),
                        s("/request/destination")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads and decodes events (optionally filtered) in stream order.
pub async fn read_decoded(
    js: &async_nats::jetstream::Context,
    filter: Option<String>,
) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut bad = None;
    read_events(js, 1, filter, |stored| {
        match codec::from_msgpack::<Event>(&stored.body) {
            Ok(e) => events.push(e),
            Err(e) => bad = Some(format!("seq {}: {e}", stored.seq)),
        }
        Ok(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("reading the event stream: {e}"))?;
    if let Some(bad) = bad {
        anyhow::bail!("undecodable event at {bad}; run `custos audit verify`");
    }
    Ok(events)
}

/// The recorded escalations of a workflow's approval requirements (each on
/// its own system aggregate), with when they were recorded.
async fn escalations(
    js: &async_nats::jetstream::Context,
    id: &str,
    state: &Transfer,
) -> anyhow::Result<Vec<(i64, ApprovalEscalation)>> {
    let mut out = Vec::new();
    let requirements = state.decision.iter().flat_map(|d| d.approvals.iter());
    for (i, _) in requirements
        .enumerate()
        .filter(|(_, r)| r.escalation.is_some())
    {
        let aggregate = ApprovalEscalation::aggregate_id(id, u32::try_from(i)?);
        let filter = subjects::aggregate_filter(AggregateKind::System, &aggregate);
        for e in read_decoded(js, Some(filter)).await? {
            if let Payload::ApprovalEscalated(escalation) = e.payload {
                out.push((e.timestamp, escalation));
            }
        }
    }
    Ok(out)
}

/// What a workflow awaiting approvals still lacks, judged as the ballot box
/// judges: on a verified replica of the trail (directory as it is now).
async fn missing_approvals(
    js: &async_nats::jetstream::Context,
    id: &str,
) -> anyhow::Result<Vec<String>> {
    let (trigger, shutdown) = custos_workers::Shutdown::new();
    let trail = custos_workers::trail::Trail::follow(js.clone(), shutdown)
        .await
        .map_err(anyhow::Error::msg)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let notice = trail
        .read(|view| custos_workers::approvals::ballot_box::notice(view, id, now))
        .await
        .map_err(anyhow::Error::msg)?;
    trigger.trigger();
    Ok(notice.map(|n| n.missing).unwrap_or_default())
}

/// Which step a workflow waits on, in words.
fn waiting_for(stage: Stage) -> Option<&'static str> {
    match stage {
        Stage::AwaitingPolicy => Some("policy step"),
        Stage::AwaitingApprovals => Some("approvals"),
        Stage::ReadyToSign => Some("build step"),
        Stage::Built => Some("guardians' signatures"),
        Stage::Signed => Some("broadcast step"),
        Stage::Broadcast => Some("confirmations"),
        _ => None,
    }
}

fn summary(id: &str, state: &Transfer, events: &[Event]) -> serde_json::Value {
    serde_json::json!({
        "workflowId": id,
        "stage": state.stage,
        "waitingFor": waiting_for(state.stage),
        "version": state.version,
        "request": state.request,
        "requestHash": state.request_hash,
        "approvals": state.votes.iter().map(|v| serde_json::json!({
            "user": v.user,
            "at": crate::audit::format_ms(v.at),
            "vote": v.vote.vote,
            "channel": v.vote.channel,
            "mfa": v.vote.mfa,
        })).collect::<Vec<_>>(),
        "approvalsRequired": state.decision.as_ref().map(|d| &d.approvals),
        "unsignedTransaction": state.unsigned,
        "txid": state.txid,
        "confirmation": state.confirmation,
        "reason": state.reason,
        "policyDecision": state.decision,
        "createdAt": events.first().map(|e| crate::audit::format_ms(e.timestamp)),
        "events": events.iter().map(|e| serde_json::json!({
            "version": e.version,
            "time": crate::audit::format_ms(e.timestamp),
            "eventType": e.event_type,
            "actor": e.actor.user_id,
            "result": e.result,
        })).collect::<Vec<_>>(),
    })
}

fn print_show(id: &str, state: &Transfer, events: &[Event]) {
    println!("workflow   {id}");
    print!("stage      {:?}", state.stage);
    match waiting_for(state.stage) {
        Some(w) => println!(" (waiting for the {w})"),
        None => println!(),
    }
    if let Some(r) = &state.request {
        println!(
            "transfer   {} {} from wallet {} to {}",
            r.amount, r.asset, r.wallet, r.destination
        );
        println!("initiator  {}   request id {}", r.initiator, r.request_id);
    }
    if let Some(d) = &state.decision {
        println!(
            "policy     {} (version {})",
            d.explanation,
            &d.policy_version[..12.min(d.policy_version.len())]
        );
    }
    if let Some(reason) = &state.reason {
        println!("reason     {reason}");
    }
    for v in &state.votes {
        println!(
            "vote       {} {:?} via {} (MFA {:?})",
            v.user,
            v.vote.vote,
            v.vote.channel.as_str(),
            v.vote.mfa
        );
    }
    if let Some(txid) = &state.txid {
        match &state.confirmation {
            Some(c) => println!(
                "chain      txid {txid}, {} confirmation(s) in block {} at height {}",
                c.confirmations, c.block_hash, c.block_height
            ),
            None => println!("chain      txid {txid}, waiting for confirmations"),
        }
    }
    println!("history");
    for e in events {
        println!(
            "  v{:<3} {}  {:<24} {:<20} {:?}",
            e.version,
            crate::audit::format_ms(e.timestamp),
            e.event_type.as_str(),
            e.actor.user_id,
            e.result
        );
    }
}
