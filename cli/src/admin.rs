//! `custos freeze|unfreeze|whitelist|user|role|change` (and `policy apply`,
//! which sends through here): administrative change requests, sent to the change service
//! like an administrator's console would, and change workflows as the trail
//! has them; `custos user enrol` asks the approval service for a user's MFA
//! enrolment link.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use custos_engine::change::{self as machine, ChangeState, Stage};
use custos_engine::policy::{
    ApprovalStatus, Directory, approvals_of, approvals_satisfied, may_approve,
};
use custos_schemas::approval::{EnrolMethod, EnrolmentReply, EnrolmentRequest};
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::{AggregateKind, ContentType, Event, UserRecord, subjects};
use rand::RngCore;

/// Who asks, and under which idempotency key.
#[derive(Debug, clap::Args)]
pub struct Requester {
    /// Directory user id of who asks: an administrator (an initiator for
    /// whitelist changes, as the policy's duties say).
    #[arg(long, env = "CUSTOS_USER")]
    pub initiator: String,
    /// Idempotency key; asking again with it returns the same workflow.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct FreezeArgs {
    /// The wallet to freeze; every wallet when left out.
    #[arg(long)]
    wallet: Option<String>,
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    requester: Requester,
}

#[derive(Debug, clap::Args)]
pub struct UnfreezeArgs {
    /// The wallet to unfreeze; the freeze of every wallet when left out.
    #[arg(long)]
    wallet: Option<String>,
    #[command(flatten)]
    requester: Requester,
}

#[derive(Debug, clap::Subcommand)]
pub enum WhitelistCommand {
    /// Ask to add a destination to a wallet's whitelist (needs the policy's quorum).
    Add(WhitelistArgs),
    /// Ask to remove a destination from a wallet's whitelist.
    Remove(WhitelistArgs),
}

#[derive(Debug, clap::Args)]
pub struct WhitelistArgs {
    #[arg(long)]
    wallet: String,
    #[arg(long)]
    address: String,
    #[command(flatten)]
    requester: Requester,
}

#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Ask to add a user to the directory (needs the policy's quorum).
    Add(UserAddArgs),
    /// Ask to deactivate a user for good: they no longer initiate or approve,
    /// and their approvals of requests still in flight stop counting.
    Deactivate {
        /// The user's directory id.
        id: String,
        #[command(flatten)]
        requester: Requester,
    },
    /// Send a user a one-time link to set up (or replace) their second factor.
    /// The link goes to them on their channels; you see only where it went.
    Enrol {
        /// The user's directory id.
        user: String,
        #[arg(long, value_enum, default_value_t = EnrolMethodArg::Totp)]
        method: EnrolMethodArg,
        /// Directory id of who asks: an active administrator.
        #[arg(long, env = "CUSTOS_USER")]
        initiator: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EnrolMethodArg {
    /// An authenticator app (TOTP), confirmed with a code on the page.
    Totp,
    /// A passkey (WebAuthn), created on the page.
    Passkey,
}

#[derive(Debug, clap::Args)]
pub struct UserAddArgs {
    /// Directory id: A-Z, a-z, 0-9, '-', '_'.
    #[arg(long)]
    id: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    email: String,
    /// Slack user id, like U024BE7LH (for approvals in Slack).
    #[arg(long)]
    slack_id: Option<String>,
    /// A role to give (repeat for more); refused if two break separation of duties.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// A group to join (repeat for more); created on first use.
    #[arg(long = "group")]
    groups: Vec<String>,
    #[command(flatten)]
    requester: Requester,
}

#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Ask to create a role bundling duties that do not conflict.
    Create {
        name: String,
        /// A duty: initiate, approve, execute, administer, audit or
        /// operate-guardian (repeat for more).
        #[arg(long = "duty", required = true)]
        duties: Vec<String>,
        #[command(flatten)]
        requester: Requester,
    },
    /// Ask to give a user a role (refused if it breaks separation of duties).
    Assign(RoleArgs),
    /// Ask to take a role from a user.
    Revoke(RoleArgs),
}

#[derive(Debug, clap::Args)]
pub struct RoleArgs {
    #[arg(long)]
    user: String,
    #[arg(long)]
    role: String,
    #[command(flatten)]
    requester: Requester,
}

#[derive(Debug, clap::Subcommand)]
pub enum ChangeCommand {
    /// One change workflow: its stage, decision, votes and what is missing.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn freeze(nats_url: &str, args: FreezeArgs) -> anyhow::Result<ExitCode> {
    let reason = args
        .reason
        .unwrap_or_else(|| format!("emergency freeze by {}", args.requester.initiator));
    let change = Change::Freeze {
        wallet: args.wallet,
        reason,
    };
    request(nats_url, args.requester, change).await
}

pub async fn unfreeze(nats_url: &str, args: UnfreezeArgs) -> anyhow::Result<ExitCode> {
    let change = Change::Unfreeze {
        wallet: args.wallet,
    };
    request(nats_url, args.requester, change).await
}

pub async fn whitelist(nats_url: &str, command: WhitelistCommand) -> anyhow::Result<ExitCode> {
    let (args, add) = match command {
        WhitelistCommand::Add(a) => (a, true),
        WhitelistCommand::Remove(a) => (a, false),
    };
    let (wallet, address) = (args.wallet, args.address);
    let change = match add {
        true => Change::WhitelistAdd { wallet, address },
        false => Change::WhitelistRemove { wallet, address },
    };
    request(nats_url, args.requester, change).await
}

pub async fn user(nats_url: &str, command: UserCommand) -> anyhow::Result<ExitCode> {
    let (requester, change) = match command {
        UserCommand::Enrol {
            user,
            method,
            initiator,
        } => return enrol(nats_url, user, method, initiator).await,
        UserCommand::Add(a) => (
            a.requester,
            // MFA is enrolled later, by the user.
            Change::UserAdd(UserRecord {
                id: a.id,
                name: a.name,
                email: a.email,
                slack_user_id: a.slack_id,
                roles: a.roles,
                groups: a.groups,
                mfa_enrolled: false,
            }),
        ),
        UserCommand::Deactivate { id, requester } => {
            (requester, Change::UserDeactivate { user: id })
        }
    };
    request(nats_url, requester, change).await
}

/// Asks `custos up` for `user`'s enrolment link and prints where it was sent.
async fn enrol(
    nats_url: &str,
    user: String,
    method: EnrolMethodArg,
    initiator: String,
) -> anyhow::Result<ExitCode> {
    let request = EnrolmentRequest {
        user,
        method: match method {
            EnrolMethodArg::Totp => EnrolMethod::Totp,
            EnrolMethodArg::Passkey => EnrolMethod::Passkey,
        },
        requested_by: initiator,
    };
    // The service checks the same; refusing here sends nothing for a typo.
    for (field, value) in [
        ("user", &request.user),
        ("initiator", &request.requested_by),
    ] {
        if let Err(e) = custos_schemas::validate_token(field, value) {
            eprintln!("refused: {e}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let client = crate::connect(nats_url).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(
            subjects::REQ_MFA_ENROL,
            ContentType::Json.encode(&request).into(),
        ),
    )
    .await
    .context("no answer from the enrolment service within 30 s")?
    .map_err(|e| anyhow::anyhow!("enrolment request failed: {e} (is `custos up` running?)"))?;
    let reply: EnrolmentReply = ContentType::Json
        .decode(&reply.payload)
        .map_err(|e| anyhow::anyhow!("unreadable enrolment reply: {e}"))?;
    match reply {
        EnrolmentReply::Refused { field, reason } => {
            let field = match field.as_deref() {
                Some("requestedBy") => "initiator: ".to_string(),
                Some(f) => format!("{f}: "),
                None => String::new(),
            };
            eprintln!("refused: {field}{reason}");
            Ok(ExitCode::FAILURE)
        }
        EnrolmentReply::Issued {
            user,
            method,
            link_hash,
            expires_at,
            sent,
            failed,
        } => {
            println!(
                "{} enrolment link for {user} issued (recorded as link {}…), expires {}",
                method.as_str(),
                &link_hash[..16.min(link_hash.len())],
                crate::audit::format_ms(expires_at)
            );
            for f in &failed {
                println!("not sent: {f}");
            }
            if sent.is_empty() {
                eprintln!(
                    "refused: the link reached no channel of {user}; configure email or Slack for them and ask again"
                );
                return Ok(ExitCode::FAILURE);
            }
            println!("sent to {user} by {}", sent.join(", "));
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn role(nats_url: &str, command: RoleCommand) -> anyhow::Result<ExitCode> {
    let (requester, change) = match command {
        RoleCommand::Create {
            name,
            duties,
            requester,
        } => (requester, Change::RoleCreate { name, duties }),
        RoleCommand::Assign(a) => (
            a.requester,
            Change::RoleAssign {
                user: a.user,
                role: a.role,
            },
        ),
        RoleCommand::Revoke(a) => (
            a.requester,
            Change::RoleRevoke {
                user: a.user,
                role: a.role,
            },
        ),
    };
    request(nats_url, requester, change).await
}

pub async fn change(nats_url: &str, command: ChangeCommand) -> anyhow::Result<ExitCode> {
    let ChangeCommand::Show { id, json } = command;
    custos_schemas::validate_token("id", &id)?;
    let client = crate::connect(nats_url).await?;
    let Some(workflow) = Workflow::read(&client, &id).await? else {
        anyhow::bail!("no change workflow {id}");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&workflow.summary())?);
    } else {
        workflow.print();
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends `change` as `requester`; prints the workflow id and what happens next,
/// or the refusal (field and reason) with a failing exit.
pub async fn request(
    nats_url: &str,
    requester: Requester,
    change: Change,
) -> anyhow::Result<ExitCode> {
    let client = crate::connect(nats_url).await?;
    let Some(workflow) = submit(&client, requester, change, false).await? else {
        return Ok(ExitCode::FAILURE);
    };
    workflow.print_next();
    Ok(match workflow.state.stage {
        Stage::Rejected | Stage::Failed => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Sends `change` as `requester` and prints the workflow id and the change
/// (on stderr when stdout is for `json`); the workflow as the trail has it
/// once recorded, or `None` after printing the refusal (field and reason).
pub async fn submit(
    client: &async_nats::Client,
    requester: Requester,
    change: Change,
    json: bool,
) -> anyhow::Result<Option<Workflow>> {
    let request = ChangeRequest {
        request_id: requester.request_id.unwrap_or_else(|| {
            let mut bytes = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            format!("cli-{}", hex::encode(bytes))
        }),
        initiator: requester.initiator,
        change,
    };
    // The service checks the same; refusing here sends nothing for a typo.
    if let Err(e) = request.validate_shape() {
        eprintln!("refused: {}: {}", e.field, e.reason);
        return Ok(None);
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::headers::CONTENT_TYPE, ContentType::JSON);
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request_with_headers(
            subjects::REQ_CHANGE,
            headers,
            ContentType::Json.encode(&request).into(),
        ),
    )
    .await
    .context("no answer from the change service within 30 s")?
    .map_err(|e| {
        anyhow::anyhow!(
            "change request failed: {e} (is `custos up` running? retry with --request-id {})",
            request.request_id
        )
    })?;
    let reply: ChangeReply = ContentType::Json
        .decode(&reply.payload)
        .map_err(|e| anyhow::anyhow!("unreadable change reply: {e}"))?;
    let workflow_id = match reply {
        ChangeReply::Accepted { workflow_id } => workflow_id,
        ChangeReply::Refused { field, reason } => {
            eprintln!(
                "refused: {}{reason}",
                field.map(|f| format!("{f}: ")).unwrap_or_default()
            );
            return Ok(None);
        }
    };
    for line in [workflow_id.clone(), request.change.describe()] {
        match json {
            true => eprintln!("{line}"),
            false => println!("{line}"),
        }
    }
    // The service records a request's first events in one append before it
    // answers, so the trail already says what comes next.
    let workflow = Workflow::read(client, &workflow_id)
        .await?
        .with_context(|| format!("{workflow_id} was accepted but is not in the trail"))?;
    Ok(Some(workflow))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A change workflow folded from the trail, with the directory as it stands.
pub struct Workflow {
    pub id: String,
    pub state: ChangeState,
    events: Vec<Event>,
    directory: Directory,
}

impl Workflow {
    pub async fn read(client: &async_nats::Client, id: &str) -> anyhow::Result<Option<Workflow>> {
        let js = async_nats::jetstream::new(client.clone());
        let mut directory = Directory::new();
        let mut events = Vec::new();
        for e in crate::tx::read_decoded(&js, None).await? {
            if e.aggregate_kind == AggregateKind::Change && e.workflow_id == id {
                events.push(e);
            } else if let Err(err) = directory.apply(&e) {
                tracing::warn!(event = %e.id, error = %err, "directory event does not apply");
            }
        }
        if events.is_empty() {
            return Ok(None);
        }
        let state = events
            .iter()
            .try_fold(ChangeState::default(), |s, e| machine::apply(&s, e))
            .map_err(|e| anyhow::anyhow!("workflow {id} does not replay: {e}"))?;
        Ok(Some(Workflow {
            id: id.to_string(),
            state,
            events,
            directory,
        }))
    }

    /// What approvals still lack, as the policy counts them now.
    fn missing(&self) -> Vec<String> {
        let Some(decision) = &self.state.decision else {
            return Vec::new();
        };
        match approvals_satisfied(
            decision,
            &approvals_of(&self.state),
            &self.directory,
            now_ms(),
        ) {
            ApprovalStatus::Pending { missing } => missing,
            ApprovalStatus::Expired { .. } => vec!["the approvals expired".into()],
            ApprovalStatus::Blocked | ApprovalStatus::Satisfied { .. } => Vec::new(),
        }
    }

    /// Active users whose approval would count (never the initiator unless a
    /// rule allows it).
    fn eligible(&self) -> Vec<String> {
        let Some(decision) = &self.state.decision else {
            return Vec::new();
        };
        self.directory
            .users()
            .filter(|u| u.active && may_approve(decision, &self.directory, &u.id, now_ms()))
            .map(|u| u.id.clone())
            .collect()
    }

    /// Waits while the change is approved and its key ceremony runs.
    pub async fn settled(self, client: &async_nats::Client) -> anyhow::Result<Workflow> {
        let started = std::time::Instant::now();
        let mut workflow = self;
        while workflow.state.stage == Stage::Approved
            && workflow
                .state
                .request
                .as_ref()
                .is_some_and(|r| r.change.is_ceremony())
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(180),
                "change {} is approved but its key ceremony has not ended within 180 s; follow it with `custos change show {}`",
                workflow.id,
                workflow.id
            );
            // Poll the trail: the ceremony's outcome is recorded there.
            tokio::time::sleep(Duration::from_millis(200)).await;
            workflow = Workflow::read(client, &workflow.id)
                .await?
                .with_context(|| format!("{} left the trail", workflow.id))?;
        }
        Ok(workflow)
    }

    pub fn print_next(&self) {
        match self.state.stage {
            Stage::AwaitingApprovals => {
                println!("awaiting approvals: {}", self.missing().join("; "));
                let eligible = self.eligible();
                match eligible.is_empty() {
                    true => println!("no active user may approve it (see the directory)"),
                    false => println!("who may approve: {}", eligible.join(", ")),
                }
                println!("follow it with `custos change show {}`", self.id);
            }
            Stage::Applied => println!("applied"),
            Stage::Approved => println!("approved: the key ceremony runs now"),
            Stage::Failed => println!(
                "failed: {}",
                self.state.reason.as_deref().unwrap_or("no reason recorded")
            ),
            Stage::Rejected => println!(
                "rejected: {}",
                self.state.reason.as_deref().unwrap_or("no reason recorded")
            ),
            stage => println!("{stage:?}"),
        }
    }

    fn summary(&self) -> serde_json::Value {
        let request = self.state.request.as_ref();
        serde_json::json!({
            "workflowId": self.id,
            "stage": self.state.stage,
            "change": request.map(|r| r.change.describe()),
            "request": request,
            "requestHash": self.state.request_hash,
            "decision": self.state.decision,
            "votes": self.state.votes.iter().map(|v| serde_json::json!({
                "user": v.user,
                "at": crate::audit::format_ms(v.at),
                "vote": v.vote.vote,
                "channel": v.vote.channel,
                "mfa": v.vote.mfa,
            })).collect::<Vec<_>>(),
            "missing": self.missing(),
            "eligibleApprovers": self.eligible(),
            "reason": self.state.reason,
            "events": self.events.iter().map(|e| serde_json::json!({
                "version": e.version,
                "time": crate::audit::format_ms(e.timestamp),
                "eventType": e.event_type,
                "actor": e.actor.user_id,
                "result": e.result,
            })).collect::<Vec<_>>(),
        })
    }

    fn print(&self) {
        println!("workflow   {}", self.id);
        println!("stage      {:?}", self.state.stage);
        if let Some(r) = &self.state.request {
            println!("change     {}", r.change.describe());
            println!("initiator  {}   request id {}", r.initiator, r.request_id);
        }
        if let Some(d) = &self.state.decision {
            println!(
                "policy     {} (version {})",
                d.explanation,
                &d.policy_version[..12.min(d.policy_version.len())]
            );
        }
        for v in &self.state.votes {
            println!(
                "vote       {} {:?} via {} (MFA {:?})",
                v.user,
                v.vote.vote,
                v.vote.channel.as_str(),
                v.vote.mfa
            );
        }
        if self.state.stage == Stage::AwaitingApprovals {
            println!("missing    {}", self.missing().join("; "));
            println!("eligible   {}", self.eligible().join(", "));
        }
        if let Some(reason) = &self.state.reason {
            println!("reason     {reason}");
        }
        println!("history");
        for e in &self.events {
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
}
