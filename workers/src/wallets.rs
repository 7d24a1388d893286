//! Key ceremonies, coordinator side: creating a FROST wallet (DKG), rotating
//! its shares, adding, removing or repairing a guardian, changing its
//! threshold. Each runs only for an approved change workflow
//! ([`custos_schemas::change::Change`]), and every guardian checks that
//! approval on its own replica of the trail before it takes part. The
//! coordinator picks the guardians' registered keys, relays the signed rounds
//! between them, checks that every guardian computed the same result, and only
//! then records the wallet event together with the applied change, in one
//! atomic append. A ceremony that fails leaves nothing half-made: guardians
//! drop their pending shares, and the change workflow ends with an alert
//! naming the reason.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use custos_adapters::jetstream::StepConsumer;
use custos_custody::identity::{Inbox, SignedMessage};
use custos_custody::{address, frost};
use custos_engine::change::Stage as ChangeStage;
use custos_schemas::change::Change;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, FieldError, Outcome, Payload, Proposal,
    RequestContext, Target, WalletDescriptor, WalletGuardian, codec, subjects,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::ceremony::{Announcement, GuardianReply, GuardianRequest, Joining, RosterEntry, rounds};
use crate::remote::Appender;
use crate::runtime::{Step, StepError};
use crate::trail::{Trail, TrailView};

/// A guardian whose last heartbeat is older than this is not live.
pub const LIVENESS: Duration = Duration::from_secs(10);
/// How long one ceremony round may take per guardian.
const ROUND_TIMEOUT: Duration = Duration::from_secs(15);

/// An approved change that asks for a key ceremony which has not run yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    pub workflow_id: String,
    /// The change workflow's version: what its outcome is recorded after.
    pub version: u64,
    pub initiator: String,
    pub change: Change,
}

impl Approved {
    /// The change workflow `workflow_id` on the trail, if it is an approved
    /// key ceremony still to run.
    pub fn find(view: &TrailView, workflow_id: &str) -> Option<Approved> {
        let state = view.change(workflow_id)?;
        let request = state.request.as_ref()?;
        (state.stage == ChangeStage::Approved && request.change.is_ceremony()).then(|| Approved {
            workflow_id: workflow_id.to_string(),
            version: state.version,
            initiator: request.initiator.clone(),
            change: request.change.clone(),
        })
    }
}

/// How a key ceremony ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum CeremonyOutcome {
    /// Recorded: the wallet as it now is.
    #[serde(rename_all = "camelCase")]
    Recorded { wallet: WalletDescriptor },
    #[serde(rename_all = "camelCase")]
    Failed { reason: String },
}

/// Whether `change` makes sense for the wallet as recorded (`None`: no wallet
/// of that name): names, model, chain, guardians, what remains of the
/// threshold. What the change service checks before recording a request and
/// the coordinator again before the ceremony starts; the error names the
/// request's field at fault.
pub fn check_ceremony(
    recorded: Option<&WalletDescriptor>,
    change: &Change,
) -> Result<(), FieldError> {
    let bad = |field: &str, reason: String| Err(FieldError::new(field, reason));
    let unique = |items: &[String]| {
        let mut sorted = items.to_vec();
        sorted.sort();
        sorted.dedup();
        sorted.len() == items.len()
    };
    if let Change::WalletCreate {
        name,
        model,
        chain,
        threshold,
        guardians,
    } = change
    {
        if recorded.is_some() {
            return bad(
                "change.name",
                format!("a wallet named {name} already exists"),
            );
        }
        // An HD wallet's seed is made by one signer process, for an EVM chain.
        if model == "hd" {
            if !crate::evm_steps::is_evm(chain) {
                return bad(
                    "change.chain",
                    format!("{chain} is not an EVM chain (HD wallets are for evm-<chain id>)"),
                );
            }
            if guardians.len() != 1 || *threshold != 1 {
                return bad(
                    "change.guardians",
                    "an HD wallet names its one signer (e.g. s1) with threshold 1".into(),
                );
            }
            return Ok(());
        }
        if model != "frost" {
            return bad(
                "change.model",
                format!("{model:?} is not available yet; use frost or hd"),
            );
        }
        address::hrp_for(chain).map_err(|e| FieldError::new("change.chain", e.to_string()))?;
        if !unique(guardians) {
            return bad("change.guardians", "a guardian is listed twice".into());
        }
        let n = guardians.len();
        if *threshold < 2 || usize::from(*threshold) > n {
            return bad(
                "change.threshold",
                format!("{threshold} of {n} guardians (needs 2 <= threshold <= guardians)"),
            );
        }
        return Ok(());
    }
    let name = change.wallet().unwrap_or_default();
    let Some(wallet) = recorded else {
        return bad("change.wallet", format!("no wallet {name}"));
    };
    if wallet.model != "frost" {
        return bad(
            "change.wallet",
            format!("wallet {name} is not a FROST wallet"),
        );
    }
    let guards = |g: &str| wallet.guardians.iter().any(|w| w.id == g);
    let threshold = wallet.threshold.unwrap_or(0);
    let n = wallet.guardians.len();
    let helpers_ok = |helpers: &[String], except: Option<&str>| {
        if let Some(h) = helpers
            .iter()
            .find(|h| !guards(h) || Some(h.as_str()) == except)
        {
            return bad(
                "change.helpers",
                format!("{h} is not a guardian of wallet {name} that may help"),
            );
        }
        if !unique(helpers) {
            return bad("change.helpers", "a guardian is listed twice".into());
        }
        if !helpers.is_empty() && helpers.len() < usize::from(threshold) {
            return bad(
                "change.helpers",
                format!("{} helpers, the threshold is {threshold}", helpers.len()),
            );
        }
        Ok(())
    };
    match change {
        Change::GuardianRemove { guardian, .. } => {
            if !guards(guardian) {
                return bad(
                    "change.guardian",
                    format!("{guardian} is not a guardian of wallet {name}"),
                );
            }
            if threshold < 2 || usize::from(threshold) > n - 1 {
                return bad(
                    "change.guardian",
                    format!(
                        "removing {guardian} would leave {} guardians for a threshold of {threshold} (needs 2 <= threshold <= guardians)",
                        n - 1
                    ),
                );
            }
        }
        Change::GuardianAdd {
            guardian, helpers, ..
        } => {
            if guards(guardian) {
                return bad(
                    "change.guardian",
                    format!("{guardian} already guards wallet {name}"),
                );
            }
            helpers_ok(helpers, None)?;
        }
        Change::ShareRepair {
            guardian, helpers, ..
        } => {
            if !guards(guardian) {
                return bad(
                    "change.guardian",
                    format!("{guardian} is not a guardian of wallet {name}"),
                );
            }
            if n - 1 < usize::from(threshold) {
                return bad(
                    "change.guardian",
                    format!(
                        "the other {} guardians are fewer than the threshold {threshold}",
                        n - 1
                    ),
                );
            }
            helpers_ok(helpers, Some(guardian))?;
        }
        Change::ThresholdChange { threshold: t, .. } => {
            if *t < 2 || usize::from(*t) > n {
                return bad(
                    "change.threshold",
                    format!("{t} of {n} guardians (needs 2 <= threshold <= guardians)"),
                );
            }
            if *t == threshold {
                return bad(
                    "change.threshold",
                    format!("wallet {name} already has threshold {t}"),
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// The step that runs key ceremonies: it takes the change events that may
/// approve a change (an outright decision, the approval completing a quorum)
/// and runs the ceremony of an approved one. Its outcome is appended by the
/// ceremony itself, as the guardians' commit must follow the record.
#[derive(Debug)]
pub struct CeremonyStep<A> {
    client: Client,
    trail: Trail,
    ledger: A,
    /// Changes whose ceremony runs here now (a redelivery waits for it).
    running: Arc<Mutex<HashSet<String>>>,
}

impl<A: Appender> CeremonyStep<A> {
    pub fn new(client: Client, trail: Trail, ledger: A) -> Self {
        CeremonyStep {
            client,
            trail,
            ledger,
            running: Arc::default(),
        }
    }
}

impl<A: Appender> Step for CeremonyStep<A> {
    fn consumer(&self) -> StepConsumer {
        StepConsumer {
            name: "key-ceremonies",
            filters: [EventType::PolicyEvaluated, EventType::TransactionApproved]
                .iter()
                .map(|e| subjects::event_type_filter(AggregateKind::Change, e.as_str()))
                .collect(),
            max_deliver: 5,
            // A ceremony's rounds may each take ROUND_TIMEOUT.
            ack_wait: Duration::from_secs(120),
        }
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        if event.result != Outcome::Success {
            return Ok(Vec::new());
        }
        let id = &event.workflow_id;
        let approved = self
            .trail
            .read(|view| Approved::find(view, id))
            .await
            .map_err(StepError::Transient)?;
        let Some(approved) = approved else {
            return Ok(Vec::new());
        };
        let fresh = self
            .running
            .lock()
            .map_err(|_| StepError::Transient("ceremony registry poisoned".into()))?
            .insert(id.clone());
        if !fresh {
            return Err(StepError::Transient(format!(
                "the ceremony of {id} is running"
            )));
        }
        let outcome = run(&self.client, &self.ledger, &self.trail, &approved).await;
        if let Ok(mut running) = self.running.lock() {
            running.remove(id);
        }
        if let CeremonyOutcome::Failed { reason } = outcome {
            tracing::warn!(change = %id, reason, "key ceremony failed");
        }
        Ok(Vec::new())
    }
}

/// Runs the key ceremony `approved` asks for and records its outcome: the
/// wallet event with the applied change, or an alert ending the change.
pub async fn run<A: Appender>(
    client: &Client,
    ledger: &A,
    trail: &Trail,
    approved: &Approved,
) -> CeremonyOutcome {
    let name = approved.change.wallet().unwrap_or_default().to_string();
    let (prefix, what) = match &approved.change {
        Change::WalletCreate { .. } => ("dkg", "key ceremony"),
        Change::KeyRotation { .. } => ("rot", "key rotation"),
        Change::GuardianRemove { .. } => ("rm", "guardian removal"),
        Change::GuardianAdd { .. } => ("add", "guardian addition"),
        Change::ThresholdChange { .. } => ("thr", "threshold change"),
        _ => ("rep", "share repair"),
    };
    let mut nonce = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ceremony_id = format!("{prefix}-{name}-{}", hex::encode(nonce));
    let ceremony = Ceremony {
        client,
        id: &ceremony_id,
        change: &approved.workflow_id,
        wallet: &name,
    };
    let result = async {
        let (recorded, version) = trail
            .read(|v| {
                (
                    v.ledger.wallet(&name).cloned(),
                    v.ledger.version(AggregateKind::Wallet, &name),
                )
            })
            .await?;
        check_ceremony(recorded.as_ref(), &approved.change).map_err(|e| e.to_string())?;
        let (told, wallet, event_type, payload) = match (&approved.change, recorded) {
            (
                Change::WalletCreate {
                    model,
                    chain,
                    guardians,
                    ..
                },
                _,
            ) if model == "hd" => {
                let signer = guardians.first().ok_or("no signer named")?;
                let made = crate::hd_signer::create_wallet(client, signer, &name, chain).await?;
                let payload = Payload::WalletCreated(made.wallet.clone());
                (Vec::new(), made.wallet, EventType::WalletCreated, payload)
            }
            (Change::WalletCreate { .. }, _) => {
                let (told, wallet) = ceremony.create(&approved.change).await?;
                let payload = Payload::WalletCreated(wallet.clone());
                (told, wallet, EventType::WalletCreated, payload)
            }
            (_, Some(wallet)) => ceremony.lifecycle(&approved.change, &wallet).await?,
            (_, None) => return Err(format!("no wallet {name}")),
        };
        let recorded = record(
            ledger, trail, &ceremony, approved, version, event_type, payload,
        )
        .await;
        ceremony.finish(&told, recorded.is_ok()).await;
        recorded.map(|()| wallet)
    }
    .await;
    match result {
        Ok(wallet) => CeremonyOutcome::Recorded { wallet },
        Err(reason) => {
            let reason = format!("{what} failed: {reason}");
            let alert = ceremony_failed(approved, &name, &reason);
            if let AppendReply::Refused { reason: why } | AppendReply::Unavailable { reason: why } =
                ledger.append(vec![alert]).await
            {
                tracing::warn!(reason = why, "could not record a failed key ceremony");
            }
            CeremonyOutcome::Failed { reason }
        }
    }
}

/// Appends the wallet event and the applied change in one atomic append. An
/// answer that is not final may hide a stored event: the trail decides, so
/// that guardians never drop the shares of a recorded wallet.
async fn record<A: Appender>(
    ledger: &A,
    trail: &Trail,
    ceremony: &Ceremony<'_>,
    approved: &Approved,
    wallet_version: u64,
    event_type: EventType,
    payload: Payload,
) -> Result<(), String> {
    let event = wallet_event(
        ceremony,
        &approved.initiator,
        wallet_version,
        event_type,
        payload,
    );
    let applied = crate::change::applied(
        &approved.workflow_id,
        approved.version,
        Actor::system("key-ceremonies"),
        approved.change.clone(),
    );
    match ledger.append(vec![event, applied]).await {
        AppendReply::Appended { .. } => Ok(()),
        other => match trail.read(|v| v.ceremonies.contains_key(ceremony.id)).await {
            Ok(true) => Ok(()),
            _ => Err(format!("the outcome could not be recorded: {other:?}")),
        },
    }
}

/// The alert that ends a change whose ceremony failed.
fn ceremony_failed(approved: &Approved, wallet: &str, reason: &str) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Change,
        workflow_id: approved.workflow_id.clone(),
        expected_version: approved.version,
        event_type: EventType::AlertRaised,
        causation_id: None,
        actor: Actor::system("key-ceremonies"),
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
            summary: format!("wallet {wallet}: {reason}"),
        },
    }
}

/// One ceremony's identity: what every guardian request names.
struct Ceremony<'a> {
    client: &'a Client,
    id: &'a str,
    /// The approved change workflow.
    change: &'a str,
    wallet: &'a str,
}

/// What a ceremony made: who is told the outcome, the wallet as recorded
/// after, and the wallet event.
type Made = (Vec<String>, WalletDescriptor, EventType, Payload);

impl Ceremony<'_> {
    /// The DKG among the change's guardians: who took part, and the wallet.
    async fn create(&self, change: &Change) -> Result<(Vec<String>, WalletDescriptor), String> {
        let Change::WalletCreate {
            name,
            model,
            chain,
            threshold,
            guardians,
        } = change
        else {
            return Err("not a wallet creation".into());
        };
        let roster = roster(self.client, guardians).await?;
        let told = ids(&roster);
        let result = async {
            let (group_key, transcript) = self.run_dkg(*threshold, &roster).await?;
            let taproot = address::wallet(&group_key, chain).map_err(|e| e.to_string())?;
            let wallet = WalletDescriptor {
                name: name.clone(),
                model: model.clone(),
                chain: chain.clone(),
                address: taproot.address,
                threshold: Some(*threshold),
                guardians: descriptor_guardians(&roster),
                group_key: Some(hex::encode(
                    group_key.serialize().map_err(|e| e.to_string())?,
                )),
                transcript: Some(hex::encode(transcript)),
            };
            Ok(wallet)
        }
        .await;
        match result {
            Ok(wallet) => Ok((told, wallet)),
            Err(reason) => {
                self.finish(&told, false).await;
                Err(reason)
            }
        }
    }

    /// A ceremony on a recorded wallet; guardians are told to abort on failure.
    async fn lifecycle(&self, change: &Change, wallet: &WalletDescriptor) -> Result<Made, String> {
        let plan = self.plan(change, wallet).await?;
        let result = async {
            let digest = match change {
                Change::GuardianAdd { .. } | Change::ShareRepair { .. } => {
                    self.run_repair(&plan).await?
                }
                Change::ThresholdChange { .. } => self.run_reshare(&plan).await?,
                _ => self.run_refresh(&plan.roster, wallet).await?,
            };
            let public_digest = hex::encode(digest);
            let ceremony_id = self.id.to_string();
            let payload = match change {
                Change::KeyRotation { .. } => Payload::KeyCeremony {
                    wallet: self.wallet.to_string(),
                    ceremony_id,
                    public_digest,
                },
                Change::GuardianRemove { guardian, .. }
                | Change::GuardianAdd { guardian, .. }
                | Change::ShareRepair { guardian, .. } => Payload::GuardianChanged {
                    guardian: guardian.clone(),
                    ceremony_id,
                    public_digest,
                    wallet: plan.wallet.clone(),
                },
                Change::ThresholdChange { threshold, .. } => Payload::ThresholdChanged {
                    threshold: *threshold,
                    ceremony_id,
                    transcript: public_digest,
                    wallet: plan.wallet.clone(),
                },
                _ => return Err("not a key ceremony on a wallet".into()),
            };
            Ok(payload)
        }
        .await;
        match result {
            Ok(payload) => Ok((plan.told, plan.wallet, plan.event_type, payload)),
            Err(reason) => {
                self.finish(&plan.told, false).await;
                Err(reason)
            }
        }
    }

    /// Who runs the ceremony with which keys, and the wallet it leaves.
    async fn plan(&self, change: &Change, wallet: &WalletDescriptor) -> Result<Plan, String> {
        let mut next = wallet.clone();
        let all = |roster: Vec<RosterEntry>, next: WalletDescriptor, event_type| Plan {
            told: ids(&roster),
            roster,
            wallet: next,
            event_type,
            helpers: Vec::new(),
        };
        let threshold = usize::from(wallet.threshold.unwrap_or(0));
        let helper_indices = |roster: &[RosterEntry], helpers: &[String], except: &str| {
            let eligible = roster.iter().filter(|e| e.guardian.id != except);
            match helpers.is_empty() {
                true => eligible.take(threshold).map(|e| e.index).collect(),
                false => eligible
                    .filter(|e| helpers.contains(&e.guardian.id))
                    .map(|e| e.index)
                    .collect(),
            }
        };
        match change {
            Change::KeyRotation { .. } => {
                let roster = pinned_roster(self.client, &wallet.guardians).await?;
                Ok(all(roster, next, EventType::KeyRotationCeremony))
            }
            Change::GuardianRemove { guardian, .. } => {
                // The removed guardian need not be live: it takes no part.
                next.guardians.retain(|g| g.id != *guardian);
                let roster = pinned_roster(self.client, &next.guardians).await?;
                let mut plan = all(roster, next, EventType::GuardianRemoved);
                plan.told.push(guardian.clone());
                Ok(plan)
            }
            Change::GuardianAdd {
                guardian, helpers, ..
            } => {
                let mut roster = pinned_roster(self.client, &wallet.guardians).await?;
                let index = roster
                    .iter()
                    .map(|e| e.index)
                    .max()
                    .unwrap_or(0)
                    .checked_add(1)
                    .ok_or("too many guardians")?;
                let mut newcomer = self::roster(self.client, std::slice::from_ref(guardian))
                    .await?
                    .pop()
                    .ok_or(format!("guardian {guardian} is unknown"))?;
                newcomer.index = index;
                let helpers = helper_indices(&roster, helpers, guardian);
                next.guardians
                    .extend(descriptor_guardians(std::slice::from_ref(&newcomer)));
                roster.push(newcomer);
                let mut plan = all(roster, next, EventType::GuardianAdded);
                plan.helpers = helpers;
                Ok(plan)
            }
            Change::ShareRepair {
                guardian, helpers, ..
            } => {
                // The guardian whose share is repaired goes last, as a newcomer
                // does, under its own index and recorded keys.
                let mut guardians = wallet.guardians.clone();
                let at = guardians
                    .iter()
                    .position(|g| g.id == *guardian)
                    .ok_or(format!("{guardian} is not a guardian of the wallet"))?;
                let lost = guardians.remove(at);
                guardians.push(lost);
                let roster = pinned_roster(self.client, &guardians).await?;
                let helpers = helper_indices(&roster, helpers, guardian);
                let mut plan = all(roster, next, EventType::ShareRepaired);
                plan.helpers = helpers;
                Ok(plan)
            }
            Change::ThresholdChange { threshold, .. } => {
                let roster = pinned_roster(self.client, &wallet.guardians).await?;
                next.threshold = Some(*threshold);
                Ok(all(roster, next, EventType::ThresholdModified))
            }
            _ => Err("not a key ceremony on a wallet".into()),
        }
    }

    /// Tells the guardians to keep (commit) or drop (abort) what the ceremony made.
    async fn finish(&self, guardians: &[String], commit: bool) {
        for guardian in guardians {
            let request = match commit {
                true => GuardianRequest::Commit {
                    ceremony_id: self.id.into(),
                    wallet: self.wallet.into(),
                },
                false => GuardianRequest::Abort {
                    ceremony_id: self.id.into(),
                },
            };
            if let Err(err) = ask(self.client, guardian, &request).await {
                tracing::warn!(guardian = %guardian, error = %err, commit, "guardian did not confirm the end of a ceremony");
            }
        }
    }
}

/// What a lifecycle ceremony will do, checked before it starts.
struct Plan {
    /// Guardians that run the ceremony (the newcomer of an addition, or the
    /// guardian whose share is repaired, last).
    roster: Vec<RosterEntry>,
    /// Guardians told to commit or abort: the roster and a removed guardian.
    told: Vec<String>,
    /// The wallet as recorded when the ceremony succeeds.
    wallet: WalletDescriptor,
    event_type: EventType,
    /// Indices of the helpers, for an addition or a repair.
    helpers: Vec<u16>,
}

fn ids(roster: &[RosterEntry]) -> Vec<String> {
    roster.iter().map(|e| e.guardian.id.clone()).collect()
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

impl Ceremony<'_> {
    /// The three rounds; returns the group key and transcript every guardian agreed on.
    async fn run_dkg(
        &self,
        threshold: u16,
        roster: &[RosterEntry],
    ) -> Result<(frost::VerifyingKey, [u8; 32]), String> {
        let (client, ceremony_id, id) = (self.client, self.id, self.id.to_string());
        let unexpected = |what: &str| format!("a guardian answered {what} with something else");
        // Round 1: packages.
        let replies = ask_all(client, roster, |_| GuardianRequest::DkgStart {
            ceremony_id: id.clone(),
            change: self.change.to_string(),
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

impl Ceremony<'_> {
    /// The refresh rounds; returns the digest of the new public key package that
    /// every guardian signed, after checking the group key did not change.
    async fn run_refresh(
        &self,
        roster: &[RosterEntry],
        wallet: &WalletDescriptor,
    ) -> Result<[u8; 32], String> {
        let (client, ceremony_id, id) = (self.client, self.id, self.id.to_string());
        let replies = ask_all(client, roster, |_| GuardianRequest::RefreshStart {
            ceremony_id: id.clone(),
            change: self.change.to_string(),
            wallet: self.wallet.to_string(),
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
}

fn same_group_key(key: &frost::VerifyingKey, wallet: &WalletDescriptor) -> Result<(), String> {
    let recorded = wallet.group_key.as_deref().unwrap_or_default();
    if hex::encode(key.serialize().map_err(|e| e.to_string())?) != recorded {
        return Err("the guardians' group key differs from the wallet's".into());
    }
    Ok(())
}

impl Ceremony<'_> {
    /// The repair rounds that give the plan's last guardian its share (a newcomer,
    /// or a guardian that lost its share, under its own index): deltas among the
    /// helpers, their sigmas to it, then every member admits its verifying share.
    /// Returns the digest every member signed.
    async fn run_repair(&self, plan: &Plan) -> Result<[u8; 32], String> {
        let (client, ceremony_id, id) = (self.client, self.id, self.id.to_string());
        let (newcomer, members) = plan.roster.split_last().ok_or("an empty roster")?;
        let joining = Joining {
            roster: plan.roster.clone(),
            helpers: plan.helpers.clone(),
            newcomer: newcomer.index,
        };
        let replies = ask_all(client, members, |_| GuardianRequest::RepairStart {
            ceremony_id: id.clone(),
            change: self.change.to_string(),
            wallet: self.wallet.to_string(),
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
                change: self.change.to_string(),
                wallet: self.wallet.to_string(),
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
    async fn run_reshare(&self, plan: &Plan) -> Result<[u8; 32], String> {
        let (client, ceremony_id, id) = (self.client, self.id, self.id.to_string());
        let min_signers = plan.wallet.threshold.ok_or("the wallet has no threshold")?;
        let replies = ask_all(client, &plan.roster, |_| GuardianRequest::ReshareStart {
            ceremony_id: id.clone(),
            change: self.change.to_string(),
            wallet: self.wallet.to_string(),
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
        let (key, transcript) =
            agreed_result(ceremony_id, &plan.roster, replies, "ReshareFinalize")?;
        same_group_key(&key, &plan.wallet)?;
        Ok(transcript)
    }
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

/// A key ceremony's event on its wallet, caused by the ceremony and naming
/// the change that approved it.
fn wallet_event(
    ceremony: &Ceremony<'_>,
    initiator: &str,
    expected_version: u64,
    event_type: EventType,
    payload: Payload,
) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Wallet,
        workflow_id: ceremony.wallet.to_string(),
        expected_version,
        event_type,
        causation_id: Some(ceremony.id.to_string()),
        actor: Actor {
            user_id: initiator.to_string(),
            email: None,
            role: Some("administrator".into()),
        },
        target: Target {
            kind: "wallet".into(),
            id: ceremony.wallet.to_string(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: [
            ("ceremonyId".to_string(), ceremony.id.to_string()),
            ("change".to_string(), ceremony.change.to_string()),
        ]
        .into(),
        payload,
    }
}
