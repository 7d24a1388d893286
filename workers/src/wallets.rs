//! Wallet creation: the coordinator side of the FROST DKG ceremony. It picks the
//! guardians' registered keys, relays the signed rounds between them, checks that
//! every guardian computed the same group key and transcript, and only then
//! records `WALLET_CREATED` with the Taproot address. A ceremony that fails
//! leaves no wallet: guardians drop their pending shares, and the failure is
//! recorded as an alert naming the reason.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use custos_custody::identity::{Inbox, SignedMessage};
use custos_custody::{address, frost};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, ContentType, EventType, Outcome, Payload, Proposal,
    RequestContext, Target, WalletDescriptor, WalletGuardian, codec, subjects, validate_token,
};
use futures::StreamExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::Shutdown;
use crate::ceremony::{Announcement, GuardianReply, GuardianRequest, Joining, RosterEntry, rounds};
use crate::remote::Appender;

/// A guardian whose last heartbeat is older than this is not live.
pub const LIVENESS: Duration = Duration::from_secs(10);
/// How long one ceremony round may take per guardian.
const ROUND_TIMEOUT: Duration = Duration::from_secs(15);

/// A request to create a wallet, sent to [`subjects::REQ_WALLET_CREATE`] (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWallet {
    pub name: String,
    /// Only `frost` for now.
    pub model: String,
    pub threshold: u16,
    pub guardians: Vec<String>,
    pub chain: String,
    /// Directory user id of the operator.
    pub initiator: String,
}

/// The answer: the wallet, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum CreateWalletReply {
    #[serde(rename_all = "camelCase")]
    Created { wallet: WalletDescriptor },
    #[serde(rename_all = "camelCase")]
    Failed { reason: String },
}

/// Serves wallet creation requests until `shutdown`.
pub async fn serve<A: Appender>(
    client: Client,
    ledger: A,
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let queue = subjects::WALLET_QUEUE.to_string();
    let mut creates = client
        .queue_subscribe(subjects::REQ_WALLET_CREATE, queue.clone())
        .await?;
    let mut rotations = client
        .queue_subscribe(subjects::REQ_WALLET_ROTATE, queue)
        .await?;
    loop {
        let (msg, rotation) = tokio::select! {
            _ = shutdown.wait() => break,
            msg = creates.next() => match msg { Some(m) => (m, false), None => break },
            msg = rotations.next() => match msg { Some(m) => (m, true), None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (client, ledger) = (client.clone(), ledger.clone());
        tokio::spawn(async move {
            let reply = if rotation {
                match ContentType::Json.decode::<RotateWallet>(&msg.payload) {
                    Ok(request) => rotate(&client, &ledger, request).await,
                    Err(e) => CreateWalletReply::Failed {
                        reason: e.to_string(),
                    },
                }
            } else {
                match ContentType::Json.decode::<CreateWallet>(&msg.payload) {
                    Ok(request) => create(&client, &ledger, request).await,
                    Err(e) => CreateWalletReply::Failed {
                        reason: e.to_string(),
                    },
                }
            };
            if let Err(e) = client
                .publish(reply_to, ContentType::Json.encode(&reply).into())
                .await
            {
                tracing::warn!(error = %e, "could not answer a wallet request");
            }
        });
    }
    Ok(())
}

/// A request to rotate a wallet's key shares or change its guardians, sent to
/// [`subjects::REQ_WALLET_ROTATE`]: every one is a refresh or repair on the
/// same group key, among the guardian processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateWallet {
    pub name: String,
    pub initiator: String,
    /// A guardian change instead of a plain rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<GuardianChange>,
}

/// A change of a FROST wallet's guardians (the threshold stays) or of its
/// threshold (the guardians stay).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum GuardianChange {
    /// A refresh among the others: its share no longer combines with theirs.
    Remove { guardian: String },
    /// A repair with a new identifier by `helpers` (by default the first
    /// threshold-many guardians).
    Add {
        guardian: String,
        #[serde(default)]
        helpers: Vec<String>,
    },
    /// A verifiable redistribution of the shares among the same guardians
    /// under a new threshold (`2 <= threshold <= guardians`).
    Threshold { threshold: u16 },
}

/// What a lifecycle ceremony will do, checked before it starts.
struct Plan {
    /// Guardians that run the ceremony (the newcomer of an addition last).
    roster: Vec<RosterEntry>,
    /// Guardians told to commit or abort: the roster and a removed guardian.
    told: Vec<String>,
    /// The wallet as recorded when the ceremony succeeds.
    wallet: WalletDescriptor,
    event_type: EventType,
    /// Indices of the helpers, for an addition.
    helpers: Vec<u16>,
}

/// Rotates every guardian's share of a FROST wallet (refresh: same group key and
/// address, old shares no longer combine with new ones) or changes its
/// guardians or its threshold. Recorded (`KEY_ROTATION_CEREMONY`,
/// `GUARDIAN_REMOVED`, `GUARDIAN_ADDED`, `THRESHOLD_MODIFIED`) once every guardian signed the same result; only then do
/// guardians commit. Bad input is refused without recording anything.
pub async fn rotate<A: Appender>(
    client: &Client,
    ledger: &A,
    request: RotateWallet,
) -> CreateWalletReply {
    let (what, prefix) = match &request.change {
        None => ("key rotation", "rot"),
        Some(GuardianChange::Remove { .. }) => ("guardian removal", "rm"),
        Some(GuardianChange::Add { .. }) => ("guardian addition", "add"),
        Some(GuardianChange::Threshold { .. }) => ("threshold change", "thr"),
    };
    let (wallet, version, newcomer) = match checked_wallet(client, &request).await {
        Ok(w) => w,
        Err(reason) => return CreateWalletReply::Failed { reason },
    };
    let mut nonce = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ceremony_id = format!("{prefix}-{}-{}", request.name, hex::encode(nonce));
    let result = async {
        let plan = plan(client, &request, &wallet, newcomer).await?;
        let outcome = async {
            let digest = match &request.change {
                Some(GuardianChange::Add { .. }) => {
                    run_repair(client, &ceremony_id, &request.name, &plan).await?
                }
                Some(GuardianChange::Threshold { .. }) => {
                    run_reshare(client, &ceremony_id, &request.name, &plan).await?
                }
                _ => {
                    run_refresh(client, &ceremony_id, &request.name, &plan.roster, &wallet).await?
                }
            };
            let public_digest = hex::encode(digest);
            let payload = match &request.change {
                None => Payload::KeyCeremony {
                    wallet: request.name.clone(),
                    ceremony_id: ceremony_id.clone(),
                    public_digest,
                },
                Some(
                    GuardianChange::Remove { guardian } | GuardianChange::Add { guardian, .. },
                ) => Payload::GuardianChanged {
                    guardian: guardian.clone(),
                    ceremony_id: ceremony_id.clone(),
                    public_digest,
                    wallet: plan.wallet.clone(),
                },
                Some(GuardianChange::Threshold { threshold }) => Payload::ThresholdChanged {
                    threshold: *threshold,
                    ceremony_id: ceremony_id.clone(),
                    transcript: public_digest,
                    wallet: plan.wallet.clone(),
                },
            };
            let event = wallet_event(
                &request.name,
                &request.initiator,
                &ceremony_id,
                version,
                plan.event_type,
                payload,
            );
            match ledger.append(vec![event]).await {
                AppendReply::Appended { .. } => Ok(()),
                _ if recorded(client, &request.name, &ceremony_id).await => Ok(()),
                other => Err(format!("the {what} could not be recorded: {other:?}")),
            }
        }
        .await;
        finish(
            client,
            &plan.told,
            &ceremony_id,
            &request.name,
            outcome.is_ok(),
        )
        .await;
        outcome.map(|()| plan.wallet)
    }
    .await;
    match result {
        Ok(wallet) => CreateWalletReply::Created { wallet },
        Err(reason) => {
            failed(
                ledger,
                &request.name,
                &request.initiator,
                &ceremony_id,
                what,
                reason,
            )
            .await
        }
    }
}

/// The recorded wallet, its version and the guardian to add (as registered),
/// once the request is known to make sense for it (names, guardians, what
/// remains of the threshold).
async fn checked_wallet(
    client: &Client,
    request: &RotateWallet,
) -> Result<(WalletDescriptor, u64, Option<RosterEntry>), String> {
    validate_token("name", &request.name).map_err(|e| e.to_string())?;
    validate_token("initiator", &request.initiator).map_err(|e| e.to_string())?;
    let (wallet, version) = recorded_wallet(client, &request.name).await?;
    let guards = |g: &str| wallet.guardians.iter().any(|w| w.id == g);
    let threshold = wallet.threshold.unwrap_or(0);
    let mut newcomer = None;
    match &request.change {
        None => {}
        Some(GuardianChange::Remove { guardian }) => {
            validate_token("guardian", guardian).map_err(|e| e.to_string())?;
            if !guards(guardian) {
                return Err(format!(
                    "guardian: {guardian} is not a guardian of wallet {}",
                    wallet.name
                ));
            }
            let left = wallet.guardians.len() - 1;
            if threshold < 2 || usize::from(threshold) > left {
                return Err(format!(
                    "guardian: removing {guardian} would leave {left} guardians for a threshold of {threshold} (needs 2 <= threshold <= guardians)"
                ));
            }
        }
        Some(GuardianChange::Add { guardian, helpers }) => {
            validate_token("guardian", guardian).map_err(|e| e.to_string())?;
            if guards(guardian) {
                return Err(format!(
                    "guardian: {guardian} already guards wallet {}",
                    wallet.name
                ));
            }
            let mut unique = helpers.clone();
            unique.sort();
            unique.dedup();
            if let Some(h) = helpers.iter().find(|h| !guards(h)) {
                return Err(format!(
                    "helpers: {h} is not a guardian of wallet {}",
                    wallet.name
                ));
            }
            if unique.len() != helpers.len() {
                return Err("helpers: a guardian is listed twice".into());
            }
            if !helpers.is_empty() && helpers.len() < usize::from(threshold) {
                return Err(format!(
                    "helpers: {} helpers, the threshold is {threshold}",
                    helpers.len()
                ));
            }
            newcomer = roster(client, std::slice::from_ref(guardian))
                .await
                .map_err(|e| format!("guardian: {e}"))?
                .pop();
        }
        Some(GuardianChange::Threshold { threshold: t }) => {
            let n = wallet.guardians.len();
            if *t < 2 || usize::from(*t) > n {
                return Err(format!(
                    "threshold: {t} of {n} guardians (needs 2 <= threshold <= guardians)"
                ));
            }
            if *t == threshold {
                return Err(format!(
                    "threshold: wallet {} already has threshold {t}",
                    wallet.name
                ));
            }
        }
    }
    Ok((wallet, version, newcomer))
}

/// Who runs the ceremony with which keys, and the wallet it leaves.
async fn plan(
    client: &Client,
    request: &RotateWallet,
    wallet: &WalletDescriptor,
    newcomer: Option<RosterEntry>,
) -> Result<Plan, String> {
    let mut next = wallet.clone();
    match &request.change {
        None => {
            let roster = pinned_roster(client, &wallet.guardians).await?;
            Ok(Plan {
                told: ids(&roster),
                roster,
                wallet: next,
                event_type: EventType::KeyRotationCeremony,
                helpers: Vec::new(),
            })
        }
        Some(GuardianChange::Remove { guardian }) => {
            // The removed guardian need not be live: it takes no part.
            next.guardians.retain(|g| g.id != *guardian);
            let roster = pinned_roster(client, &next.guardians).await?;
            let mut told = ids(&roster);
            told.push(guardian.clone());
            Ok(Plan {
                roster,
                told,
                wallet: next,
                event_type: EventType::GuardianRemoved,
                helpers: Vec::new(),
            })
        }
        Some(GuardianChange::Add { guardian, helpers }) => {
            let mut roster = pinned_roster(client, &wallet.guardians).await?;
            let index = roster
                .iter()
                .map(|e| e.index)
                .max()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or("too many guardians")?;
            let mut newcomer = newcomer.ok_or(format!("guardian {guardian} is unknown"))?;
            newcomer.index = index;
            let threshold = usize::from(wallet.threshold.unwrap_or(0));
            let helpers: Vec<u16> = if helpers.is_empty() {
                roster.iter().take(threshold).map(|e| e.index).collect()
            } else {
                roster
                    .iter()
                    .filter(|e| helpers.contains(&e.guardian.id))
                    .map(|e| e.index)
                    .collect()
            };
            next.guardians
                .extend(descriptor_guardians(std::slice::from_ref(&newcomer)));
            roster.push(newcomer);
            Ok(Plan {
                told: ids(&roster),
                roster,
                wallet: next,
                event_type: EventType::GuardianAdded,
                helpers,
            })
        }
        Some(GuardianChange::Threshold { threshold }) => {
            let roster = pinned_roster(client, &wallet.guardians).await?;
            next.threshold = Some(*threshold);
            Ok(Plan {
                told: ids(&roster),
                roster,
                wallet: next,
                event_type: EventType::ThresholdModified,
                helpers: Vec::new(),
            })
        }
    }
}

fn ids(roster: &[RosterEntry]) -> Vec<String> {
    roster.iter().map(|e| e.guardian.id.clone()).collect()
}

/// Tells the guardians to keep (commit) or drop (abort) what the ceremony made.
async fn finish(
    client: &Client,
    guardians: &[String],
    ceremony_id: &str,
    wallet: &str,
    commit: bool,
) {
    for guardian in guardians {
        let request = if commit {
            GuardianRequest::Commit {
                ceremony_id: ceremony_id.into(),
                wallet: wallet.into(),
            }
        } else {
            GuardianRequest::Abort {
                ceremony_id: ceremony_id.into(),
            }
        };
        if let Err(err) = ask(client, guardian, &request).await {
            tracing::warn!(guardian = %guardian, error = %err, commit, "guardian did not confirm the end of a ceremony");
        }
    }
}

/// The wallet as recorded, and its aggregate's version.
async fn recorded_wallet(client: &Client, name: &str) -> Result<(WalletDescriptor, u64), String> {
    let js = async_nats::jetstream::new(client.clone());
    let mut wallet = None;
    let mut version = 0;
    custos_adapters::jetstream::read_events(
        &js,
        1,
        Some(subjects::aggregate_filter(AggregateKind::Wallet, name)),
        |stored| {
            if let Ok(event) = codec::from_msgpack::<custos_schemas::Event>(&stored.body) {
                version = event.version;
                if let Payload::WalletCreated(w)
                | Payload::GuardianChanged { wallet: w, .. }
                | Payload::ThresholdChanged { wallet: w, .. } = event.payload
                {
                    wallet = Some(w);
                }
            }
            Ok(())
        },
    )
    .await
    .map_err(|e| format!("reading the trail: {e}"))?;
    let wallet = wallet.ok_or_else(|| format!("no wallet {name}"))?;
    if wallet.model != "frost" {
        return Err(format!("wallet {name} is not a FROST wallet"));
    }
    Ok((wallet, version))
}

/// Guardians with the keys recorded with the wallet; each must be live and
/// still announce those very keys.
async fn pinned_roster(
    client: &Client,
    guardians: &[WalletGuardian],
) -> Result<Vec<RosterEntry>, String> {
    let ids: Vec<String> = guardians.iter().map(|g| g.id.clone()).collect();
    let live = roster(client, &ids).await?;
    let mut pinned = Vec::new();
    for (g, entry) in guardians.iter().zip(live) {
        if hex::encode(entry.guardian.signing_key) != g.signing_key
            || hex::encode(entry.guardian.encryption_key) != g.encryption_key
        {
            return Err(format!(
                "guardian {} announces keys other than those recorded with the wallet",
                g.id
            ));
        }
        pinned.push(RosterEntry {
            index: g.index,
            guardian: entry.guardian,
        });
    }
    Ok(pinned)
}

/// Runs one DKG ceremony and records the wallet.
pub async fn create<A: Appender>(
    client: &Client,
    ledger: &A,
    request: CreateWallet,
) -> CreateWalletReply {
    if let Err(reason) = check(&request) {
        return CreateWalletReply::Failed { reason };
    }
    let mut nonce = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ceremony_id = format!("dkg-{}-{}", request.name, hex::encode(nonce));
    match ceremony(client, ledger, &request, &ceremony_id).await {
        Ok(wallet) => CreateWalletReply::Created { wallet },
        Err(reason) => {
            failed(
                ledger,
                &request.name,
                &request.initiator,
                &ceremony_id,
                "key ceremony",
                reason,
            )
            .await
        }
    }
}

/// Runs the ceremony and records the wallet; on failure the guardians are told
/// to drop what they hold of it.
async fn ceremony<A: Appender>(
    client: &Client,
    ledger: &A,
    request: &CreateWallet,
    ceremony_id: &str,
) -> Result<WalletDescriptor, String> {
    if wallet_exists(client, &request.name).await? {
        return Err(format!("a wallet named {} already exists", request.name));
    }
    let roster = roster(client, &request.guardians).await?;
    let recorded = async {
        let (group_key, transcript) =
            run_dkg(client, ceremony_id, request.threshold, &roster).await?;
        let wallet = describe(request, &roster, &group_key, &transcript)?;
        match ledger
            .append(vec![wallet_created(request, ceremony_id, wallet.clone())])
            .await
        {
            AppendReply::Appended { .. } => Ok(wallet),
            // An answer that is not final may hide a stored event: the trail decides,
            // so that guardians never drop the shares of a recorded wallet.
            _ if recorded(client, &request.name, ceremony_id).await => Ok(wallet),
            AppendReply::Conflict { .. } => {
                Err(format!("a wallet named {} already exists", request.name))
            }
            other => Err(format!("the wallet could not be recorded: {other:?}")),
        }
    }
    .await;
    finish(
        client,
        &ids(&roster),
        ceremony_id,
        &request.name,
        recorded.is_ok(),
    )
    .await;
    recorded
}

/// Whether the trail already holds a wallet of this name (checked again, race
/// free, by the ledger when the wallet is recorded).
async fn wallet_exists(client: &Client, name: &str) -> Result<bool, String> {
    let js = async_nats::jetstream::new(client.clone());
    let filter = subjects::aggregate_filter(AggregateKind::Wallet, name);
    let found = custos_adapters::jetstream::read_events(&js, 1, Some(filter), |_| Ok(()))
        .await
        .map_err(|e| format!("reading the trail: {e}"))?;
    Ok(found > 0)
}

/// Whether the trail holds an event of wallet `name` caused by `ceremony_id`.
async fn recorded(client: &Client, name: &str, ceremony_id: &str) -> bool {
    let js = async_nats::jetstream::new(client.clone());
    let mut found = false;
    let filter = subjects::aggregate_filter(AggregateKind::Wallet, name);
    let read = custos_adapters::jetstream::read_events(&js, 1, Some(filter), |stored| {
        if let Ok(e) = codec::from_msgpack::<custos_schemas::Event>(&stored.body) {
            found |= e.causation_id.as_deref() == Some(ceremony_id);
        }
        Ok(())
    })
    .await;
    read.is_ok() && found
}

/// Records a failed ceremony as an alert and answers with the reason.
async fn failed<A: Appender>(
    ledger: &A,
    wallet: &str,
    initiator: &str,
    ceremony_id: &str,
    what: &str,
    reason: String,
) -> CreateWalletReply {
    let _ = ledger
        .append(vec![ceremony_failed(
            wallet,
            initiator,
            ceremony_id,
            &reason,
        )])
        .await;
    CreateWalletReply::Failed {
        reason: format!("{what} failed: {reason}"),
    }
}

/// The alert recorded when a ceremony fails.
fn ceremony_failed(wallet: &str, initiator: &str, ceremony_id: &str, reason: &str) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::System,
        workflow_id: ceremony_id.to_string(),
        expected_version: 0,
        event_type: EventType::AlertRaised,
        causation_id: None,
        actor: Actor {
            user_id: initiator.to_string(),
            email: None,
            role: Some("administrator".into()),
        },
        target: Target {
            kind: "wallet".into(),
            id: wallet.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Failure,
        metadata: Default::default(),
        payload: Payload::Alert {
            severity: "warning".into(),
            summary: format!("key ceremony for wallet {wallet} failed: {reason}"),
        },
    }
}

fn check(r: &CreateWallet) -> Result<(), String> {
    validate_token("name", &r.name).map_err(|e| e.to_string())?;
    validate_token("initiator", &r.initiator).map_err(|e| e.to_string())?;
    if r.model != "frost" {
        return Err(format!(
            "model: {:?} is not available yet; use frost",
            r.model
        ));
    }
    address::hrp_for(&r.chain).map_err(|e| format!("chain: {e}"))?;
    for g in &r.guardians {
        validate_token("guardians", g).map_err(|e| e.to_string())?;
    }
    let mut unique = r.guardians.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != r.guardians.len() {
        return Err("guardians: a guardian is listed twice".into());
    }
    let n = r.guardians.len();
    if r.threshold < 2 || usize::from(r.threshold) > n {
        return Err(format!(
            "threshold: {} of {n} guardians (needs 2 <= threshold <= guardians)",
            r.threshold
        ));
    }
    Ok(())
}

/// The registered keys of live guardians, in the order asked (FROST identifiers 1..n).
async fn roster(client: &Client, ids: &[String]) -> Result<Vec<RosterEntry>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js
        .get_key_value(subjects::GUARDIANS_BUCKET)
        .await
        .map_err(|e| format!("guardians bucket: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut roster = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let entry = bucket
            .get(id)
            .await
            .map_err(|e| format!("guardians bucket: {e}"))?;
        let Some(bytes) = entry else {
            return Err(format!(
                "guardian {id} has never announced itself (is `custos guardian run --id {id}` running?)"
            ));
        };
        let a: Announcement = serde_json::from_slice(&bytes)
            .map_err(|e| format!("guardian {id}: unreadable announcement: {e}"))?;
        if a.guardian.id != *id {
            return Err(format!(
                "guardian {id}: its announcement names {}",
                a.guardian.id
            ));
        }
        if now - a.seen_ms > LIVENESS.as_millis() as i64 {
            return Err(format!(
                "guardian {id} is not live (last seen {} s ago)",
                (now - a.seen_ms) / 1000
            ));
        }
        let index = u16::try_from(i + 1).map_err(|_| "too many guardians".to_string())?;
        roster.push(RosterEntry {
            index,
            guardian: a.guardian,
        });
    }
    Ok(roster)
}

/// Sends one request to a guardian and waits for its answer.
async fn ask(
    client: &Client,
    guardian: &str,
    request: &GuardianRequest,
) -> Result<GuardianReply, String> {
    let subject = subjects::guardian_subject(guardian, "ceremony");
    let answer = tokio::time::timeout(
        ROUND_TIMEOUT,
        client.request(subject, codec::to_msgpack(request).into()),
    )
    .await;
    match answer {
        Err(_) => Err(format!(
            "guardian {guardian} did not answer within {} s",
            ROUND_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("guardian {guardian} unreachable: {e}")),
        Ok(Ok(msg)) => match codec::from_msgpack::<GuardianReply>(&msg.payload) {
            Ok(GuardianReply::Refused { reason }) => {
                Err(format!("guardian {guardian} refused: {reason}"))
            }
            Ok(reply) => Ok(reply),
            Err(e) => Err(format!("guardian {guardian} answered garbage: {e}")),
        },
    }
}

/// Asks every guardian at once; fails naming the first that fails.
async fn ask_all(
    client: &Client,
    roster: &[RosterEntry],
    request: impl Fn(&RosterEntry) -> GuardianRequest,
) -> Result<Vec<GuardianReply>, String> {
    let asks = roster.iter().map(|e| {
        let request = request(e);
        async move { ask(client, &e.guardian.id, &request).await }
    });
    futures::future::join_all(asks).await.into_iter().collect()
}

/// The three rounds; returns the group key and transcript every guardian agreed on.
async fn run_dkg(
    client: &Client,
    ceremony_id: &str,
    threshold: u16,
    roster: &[RosterEntry],
) -> Result<(frost::VerifyingKey, [u8; 32]), String> {
    let id = ceremony_id.to_string();
    let unexpected = |what: &str| format!("a guardian answered {what} with something else");
    // Round 1: packages.
    let replies = ask_all(client, roster, |_| GuardianRequest::DkgStart {
        ceremony_id: id.clone(),
        min_signers: threshold,
        roster: roster.to_vec(),
    })
    .await?;
    let packages = signed_packages(replies, "DkgStart")?;
    // Round 2: echoes and sealed shares.
    let replies = ask_all(client, roster, |_| GuardianRequest::DkgShares {
        ceremony_id: id.clone(),
        packages: packages.clone(),
    })
    .await?;
    let mut echoes = Vec::new();
    let mut shares: BTreeMap<String, Vec<SignedMessage>> = BTreeMap::new();
    for r in replies {
        let GuardianReply::Shares {
            echo,
            shares: sealed,
        } = r
        else {
            return Err(unexpected("DkgShares"));
        };
        echoes.push(echo);
        by_recipient(&mut shares, sealed);
    }
    // Round 3: finalize; each guardian gets the shares addressed to it.
    let replies = ask_all(client, roster, |e| GuardianRequest::DkgFinalize {
        ceremony_id: id.clone(),
        echoes: echoes.clone(),
        shares: shares.get(&e.guardian.id).cloned().unwrap_or_default(),
    })
    .await?;
    agreed_result(ceremony_id, roster, replies, "DkgFinalize")
}

/// The signed round-1 packages of every guardian.
fn signed_packages(replies: Vec<GuardianReply>, round: &str) -> Result<Vec<SignedMessage>, String> {
    replies
        .into_iter()
        .map(|r| match r {
            GuardianReply::Package { message } => Ok(message),
            _ => Err(format!("a guardian answered {round} with something else")),
        })
        .collect()
}

/// Every guardian's sealed messages, filed under their recipients.
fn sealed_by_recipient(
    replies: Vec<GuardianReply>,
    round: &str,
) -> Result<BTreeMap<String, Vec<SignedMessage>>, String> {
    let mut filed = BTreeMap::new();
    for r in replies {
        let GuardianReply::Sealed { shares } = r else {
            return Err(format!("a guardian answered {round} with something else"));
        };
        by_recipient(&mut filed, shares);
    }
    Ok(filed)
}

/// Files point-to-point messages under the guardian they are addressed to.
fn by_recipient(into: &mut BTreeMap<String, Vec<SignedMessage>>, messages: Vec<SignedMessage>) {
    for m in messages {
        into.entry(m.recipient.clone().unwrap_or_default())
            .or_default()
            .push(m);
    }
}

/// The group key and digest that every guardian signed in the last round; names
/// a guardian that signed something else.
fn agreed_result(
    ceremony_id: &str,
    roster: &[RosterEntry],
    replies: Vec<GuardianReply>,
    round: &str,
) -> Result<(frost::VerifyingKey, [u8; 32]), String> {
    let publics: Vec<_> = roster.iter().map(|e| e.guardian.clone()).collect();
    let mut inbox = Inbox::new(ceremony_id, "coordinator", &publics).map_err(|e| e.to_string())?;
    inbox.advance_to(rounds::RESULT);
    let mut agreed: Option<Vec<u8>> = None;
    for r in replies {
        let GuardianReply::Result { message } = r else {
            return Err(format!("a guardian answered {round} with something else"));
        };
        let payload = inbox.accept(&message).map_err(|e| e.to_string())?.to_vec();
        match &agreed {
            None => agreed = Some(payload),
            Some(first) if *first != payload => {
                return Err(format!(
                    "guardian {} computed a different group key or digest",
                    message.sender
                ));
            }
            Some(_) => {}
        }
    }
    let payload = agreed.ok_or("no guardian answered")?;
    if payload.len() != 33 + 32 {
        return Err("a guardian's result has the wrong length".into());
    }
    let key =
        frost::VerifyingKey::deserialize(&payload[..33]).map_err(|e| format!("group key: {e}"))?;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&payload[33..]);
    Ok((key, digest))
}

/// The refresh rounds; returns the digest of the new public key package that
/// every guardian signed, after checking the group key did not change.
async fn run_refresh(
    client: &Client,
    ceremony_id: &str,
    wallet_name: &str,
    roster: &[RosterEntry],
    wallet: &WalletDescriptor,
) -> Result<[u8; 32], String> {
    let id = ceremony_id.to_string();
    let replies = ask_all(client, roster, |_| GuardianRequest::RefreshStart {
        ceremony_id: id.clone(),
        wallet: wallet_name.to_string(),
        roster: roster.to_vec(),
    })
    .await?;
    let packages = signed_packages(replies, "RefreshStart")?;
    let replies = ask_all(client, roster, |_| GuardianRequest::RefreshShares {
        ceremony_id: id.clone(),
        packages: packages.clone(),
    })
    .await?;
    let shares = sealed_by_recipient(replies, "RefreshShares")?;
    let replies = ask_all(client, roster, |e| GuardianRequest::RefreshFinalize {
        ceremony_id: id.clone(),
        shares: shares.get(&e.guardian.id).cloned().unwrap_or_default(),
    })
    .await?;
    let (key, digest) = agreed_result(ceremony_id, roster, replies, "RefreshFinalize")?;
    same_group_key(&key, wallet)?;
    Ok(digest)
}

fn same_group_key(key: &frost::VerifyingKey, wallet: &WalletDescriptor) -> Result<(), String> {
    let recorded = wallet.group_key.as_deref().unwrap_or_default();
    if hex::encode(key.serialize().map_err(|e| e.to_string())?) != recorded {
        return Err("the guardians' group key differs from the wallet's".into());
    }
    Ok(())
}

/// The repair rounds that add the plan's newcomer (last in its roster): deltas
/// among the helpers, their sigmas to the newcomer, then every member admits
/// the newcomer's verifying share. Returns the digest every member signed.
async fn run_repair(
    client: &Client,
    ceremony_id: &str,
    wallet_name: &str,
    plan: &Plan,
) -> Result<[u8; 32], String> {
    let id = ceremony_id.to_string();
    let (newcomer, members) = plan.roster.split_last().ok_or("an empty roster")?;
    let joining = Joining {
        roster: plan.roster.clone(),
        helpers: plan.helpers.clone(),
        newcomer: newcomer.index,
    };
    let replies = ask_all(client, members, |_| GuardianRequest::RepairStart {
        ceremony_id: id.clone(),
        wallet: wallet_name.to_string(),
        joining: joining.clone(),
    })
    .await?;
    let deltas = sealed_by_recipient(replies, "RepairStart")?;
    let helpers: Vec<RosterEntry> = members
        .iter()
        .filter(|e| plan.helpers.contains(&e.index))
        .cloned()
        .collect();
    let replies = ask_all(client, &helpers, |e| GuardianRequest::RepairCombine {
        ceremony_id: id.clone(),
        deltas: deltas.get(&e.guardian.id).cloned().unwrap_or_default(),
    })
    .await?;
    let sigmas = sealed_by_recipient(replies, "RepairCombine")?;
    let reply = ask(
        client,
        &newcomer.guardian.id,
        &GuardianRequest::RepairFinish {
            ceremony_id: id.clone(),
            joining,
            sigmas: sigmas
                .get(&newcomer.guardian.id)
                .cloned()
                .unwrap_or_default(),
        },
    )
    .await?;
    let GuardianReply::Result { message } = reply else {
        return Err("the newcomer answered RepairFinish with something else".into());
    };
    // Each member checks the newcomer's signed result against its own package.
    let replies = ask_all(client, members, |_| GuardianRequest::RepairAdmit {
        ceremony_id: id.clone(),
        result: message.clone(),
    })
    .await?;
    let (key, digest) = agreed_result(ceremony_id, members, replies, "RepairAdmit")?;
    same_group_key(&key, &plan.wallet)?;
    Ok(digest)
}

/// The redistribution rounds that change the threshold: every member deals
/// its weighted share (signed public commitments, sub-shares sealed to each
/// member), then every member verifies what it received, keeps its new share
/// (pending) and signs the group key and the transcript. Returns the
/// transcript every member signed, after checking the group key did not change.
async fn run_reshare(
    client: &Client,
    ceremony_id: &str,
    wallet_name: &str,
    plan: &Plan,
) -> Result<[u8; 32], String> {
    let id = ceremony_id.to_string();
    let min_signers = plan.wallet.threshold.ok_or("the wallet has no threshold")?;
    let replies = ask_all(client, &plan.roster, |_| GuardianRequest::ReshareStart {
        ceremony_id: id.clone(),
        wallet: wallet_name.to_string(),
        min_signers,
        roster: plan.roster.clone(),
    })
    .await?;
    let mut dealings = Vec::new();
    let mut shares: BTreeMap<String, Vec<SignedMessage>> = BTreeMap::new();
    for r in replies {
        let GuardianReply::Dealt {
            dealing,
            shares: sealed,
        } = r
        else {
            return Err("a guardian answered ReshareStart with something else".into());
        };
        dealings.push(dealing);
        by_recipient(&mut shares, sealed);
    }
    let replies = ask_all(client, &plan.roster, |e| GuardianRequest::ReshareFinalize {
        ceremony_id: id.clone(),
        dealings: dealings.clone(),
        shares: shares.get(&e.guardian.id).cloned().unwrap_or_default(),
    })
    .await?;
    let (key, transcript) = agreed_result(ceremony_id, &plan.roster, replies, "ReshareFinalize")?;
    same_group_key(&key, &plan.wallet)?;
    Ok(transcript)
}

fn describe(
    r: &CreateWallet,
    roster: &[RosterEntry],
    group_key: &frost::VerifyingKey,
    transcript: &[u8; 32],
) -> Result<WalletDescriptor, String> {
    let taproot = address::wallet(group_key, &r.chain).map_err(|e| e.to_string())?;
    Ok(WalletDescriptor {
        name: r.name.clone(),
        model: r.model.clone(),
        chain: r.chain.clone(),
        address: taproot.address,
        threshold: Some(r.threshold),
        guardians: descriptor_guardians(roster),
        group_key: Some(hex::encode(
            group_key.serialize().map_err(|e| e.to_string())?,
        )),
        transcript: Some(hex::encode(transcript)),
    })
}

/// The roster as the wallet descriptor records it.
fn descriptor_guardians(roster: &[RosterEntry]) -> Vec<WalletGuardian> {
    roster
        .iter()
        .map(|e| WalletGuardian {
            id: e.guardian.id.clone(),
            index: e.index,
            signing_key: hex::encode(e.guardian.signing_key),
            encryption_key: hex::encode(e.guardian.encryption_key),
        })
        .collect()
}

fn wallet_created(r: &CreateWallet, ceremony_id: &str, wallet: WalletDescriptor) -> Proposal {
    wallet_event(
        &r.name,
        &r.initiator,
        ceremony_id,
        0,
        EventType::WalletCreated,
        Payload::WalletCreated(wallet),
    )
}

/// A key ceremony's event on wallet `name`, caused by the ceremony.
fn wallet_event(
    name: &str,
    initiator: &str,
    ceremony_id: &str,
    expected_version: u64,
    event_type: EventType,
    payload: Payload,
) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Wallet,
        workflow_id: name.to_string(),
        expected_version,
        event_type,
        causation_id: Some(ceremony_id.to_string()),
        actor: Actor {
            user_id: initiator.to_string(),
            email: None,
            role: Some("administrator".into()),
        },
        target: Target {
            kind: "wallet".into(),
            id: name.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: [("ceremonyId".to_string(), ceremony_id.to_string())].into(),
        payload,
    }
}
