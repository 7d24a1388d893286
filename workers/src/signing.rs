//! Threshold signing of an approved, built transfer over NATS.
//!
//! The coordinator (the signing step) picks `threshold` live guardians, builds
//! each input's signing package from commitments they handed out ahead (FROST
//! preprocessing, kept in a stock per guardian and wallet), asks each once for
//! its shares, aggregates, and appends `TRANSACTION_SIGNED`. It is trusted with nothing: every guardian
//! checks the workflow in its own verified replica of the trail ([`check`]) and
//! signs only the sighashes it recomputed from the recorded transaction. A
//! guardian that times out or answers with an invalid share is named in an alert
//! and replaced, while enough guardians are live.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use async_nats::jetstream;
use custos_adapters::jetstream::{StepConsumer, workflow_consumer};
use custos_custody::frost::keys::PublicKeyPackage;
use custos_custody::frost::round1::SigningCommitments;
use custos_custody::frost::round2::SignatureShare;
use custos_custody::frost::{Identifier, SigningPackage, VerifyingKey};
use custos_custody::sign::{self, AggregateError, AggregationKey};
use custos_custody::spend::{self, CheckedSpend};
use custos_engine::change::Stage as ChangeStage;
use custos_engine::policy::{ApprovalStatus, approvals_of, approvals_satisfied};
use custos_engine::transfer::Stage;
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::change::Change;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, Outcome, Payload, Proposal, Target,
    TransferRequest, WalletDescriptor, codec, subjects,
};
use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::ceremony::Announcement;
use crate::runtime::{Step, StepError};
use crate::trail::{Trail, TrailView};

/// What the coordinator asks a guardian, on `custos.guardian.<id>.sign`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SignRequest {
    /// Draw `count` fresh nonces for `wallet` and hand out their commitments
    /// ahead of any signing (FROST preprocessing): nothing is checked or
    /// signed yet, and no workflow is bound to them.
    Preprocess { wallet: String, count: u16 },
    /// Check the workflow and sign each input's package (serialized
    /// `SigningPackage`s, in input order) with the nonces of the commitment it
    /// carries for this guardian. `session_id` names the attempt: it signs at
    /// most once.
    Sign {
        session_id: String,
        workflow_id: String,
        packages: Vec<Vec<u8>>,
    },
}

/// A guardian's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SignReply {
    Preprocessed {
        /// Serialized FROST identifier.
        identifier: Vec<u8>,
        /// Serialized `SigningCommitments`, each usable by one package.
        commitments: Vec<Vec<u8>>,
        /// The guardian's public key package for the wallet (serialized): what
        /// the coordinator checks shares against.
        public_key_package: Vec<u8>,
    },
    Shares {
        /// Serialized `SignatureShare`s, one per input.
        shares: Vec<Vec<u8>>,
    },
    /// A package carries a commitment of this guardian it no longer holds
    /// nonces for (it restarted, or they expired): ask for fresh ones.
    Stale {
        reason: String,
    },
    Refused {
        reason: String,
    },
}

/// How many commitments one [`SignRequest::Preprocess`] may ask for.
pub const MAX_PREPROCESS: u16 = 64;
/// How long a guardian keeps the nonces of a commitment it handed out.
pub const COMMITMENT_TTL: Duration = Duration::from_secs(600);

/// Every check a guardian makes before it signs `workflow_id` for the
/// wallet whose Taproot script is `wallet_script`, on its verified replica of
/// the trail at `now`. Returns the checked transaction, whose sighashes the
/// guardian then computes itself.
pub fn check(
    view: &TrailView,
    workflow_id: &str,
    wallet_script: &[u8],
    now: i64,
) -> Result<(WalletDescriptor, CheckedSpend), String> {
    let (request, unsigned) = workflow_allows(view, workflow_id, now)?;
    let terms = crate::chain_steps::spend_terms(view, request)?;
    let expect = terms.expectation(wallet_script);
    let checked = recorded_transaction(
        view,
        workflow_id,
        &request.initiator,
        unsigned,
        now,
        || spend::check_spend(unsigned, &expect),
        |replaced| spend::check_replacement(unsigned, replaced, &expect),
    )?;
    Ok((terms.wallet, checked))
}

/// The checks of [`check`] that do not depend on the chain or the wallet model
/// (every signer makes them): built, decided under the active policy, approvals
/// satisfied and the time delay passed, initiator active, wallet not frozen.
/// Returns the request and the recorded transaction.
pub fn workflow_allows<'a>(
    view: &'a TrailView,
    workflow_id: &str,
    now: i64,
) -> Result<(&'a TransferRequest, &'a UnsignedTransaction), String> {
    let t = view
        .transfer(workflow_id)
        .ok_or_else(|| format!("workflow {workflow_id} is not in the trail"))?;
    if t.stage != Stage::Built {
        return Err(format!(
            "workflow {workflow_id} is {:?}, not built and waiting for signatures",
            t.stage
        ));
    }
    let (Some(request), Some(decision), Some(unsigned)) = (&t.request, &t.decision, &t.unsigned)
    else {
        return Err("the workflow lacks its request, decision or transaction".into());
    };
    // A freeze stops every signing, whatever was decided before it.
    view.admin.freeze.may_sign(&request.wallet)?;
    if decision.action != "transfer" || decision.wallet.as_deref() != Some(request.wallet.as_str())
    {
        return Err("the policy decision does not allow this transfer".into());
    }
    // Decided under the policy active now, by an active initiator, approvals
    // satisfied and any time delay passed: as for every approved workflow.
    view.cleared(t, &request.initiator, now)?;
    Ok((request, unsigned))
}

/// The recorded transaction `unsigned` of `workflow_id` as the chain
/// family's check (`first`) finds it; a fee bump is held to the transaction
/// it replaces as well (`replacement`), and to its approved change
/// ([`bump_approved`]).
pub fn recorded_transaction<T, E: std::fmt::Display>(
    view: &TrailView,
    workflow_id: &str,
    initiator: &str,
    unsigned: &UnsignedTransaction,
    now: i64,
    first: impl FnOnce() -> Result<T, E>,
    replacement: impl FnOnce(&UnsignedTransaction) -> Result<T, E>,
) -> Result<T, String> {
    let Some(replaced) = view.transfer(workflow_id).and_then(|t| t.replaces()) else {
        return first()
            .map_err(|e| format!("the recorded transaction is not the approved transfer: {e}"));
    };
    let checked = replacement(&replaced.unsigned).map_err(|e| {
        format!(
            "the recorded replacement is not a fee bump of {}: {e}",
            replaced.txid
        )
    })?;
    bump_approved(view, workflow_id, &replaced.txid, unsigned, initiator, now)?;
    Ok(checked)
}

/// A fee bump's own check, after the replacement is found to be one: the
/// fee-bump change asking for exactly this replacement of `replaces` was
/// applied, and its decision and approvals clear it now.
pub fn bump_approved(
    view: &TrailView,
    workflow_id: &str,
    replaces: &str,
    unsigned: &UnsignedTransaction,
    initiator: &str,
    now: i64,
) -> Result<(), String> {
    let asked = |c: &Change| {
        matches!(c, Change::FeeBump { workflow, replaces: r, unsigned: u }
            if workflow == workflow_id && r == replaces && u == unsigned)
    };
    let (_, change) = view
        .ledger
        .changes()
        .find(|(_, c)| {
            c.stage == ChangeStage::Applied && c.request.as_ref().is_some_and(|r| asked(&r.change))
        })
        .ok_or("no approved fee-bump change asked for this replacement")?;
    view.cleared(change, initiator, now)
        .map_err(|e| format!("the fee bump's change: {e}"))
}

/// The wallet's Taproot script from its recorded group key.
pub fn wallet_script(wallet: &WalletDescriptor) -> Result<Vec<u8>, String> {
    // Computing the tweak costs curve arithmetic; every build and signing
    // asks, so each (key, chain) is computed once per process.
    type Scripts = Mutex<HashMap<(String, String), Vec<u8>>>;
    static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(Mutex::default);
    let group_key = wallet
        .group_key
        .as_deref()
        .ok_or_else(|| format!("wallet {} has no readable group key", wallet.name))?;
    let memo = (group_key.to_string(), wallet.chain.clone());
    if let Some(script) = SCRIPTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&memo)
    {
        return Ok(script.clone());
    }
    let key = hex::decode(group_key)
        .ok()
        .and_then(|b| VerifyingKey::deserialize(&b).ok())
        .ok_or_else(|| format!("wallet {} has no readable group key", wallet.name))?;
    let script = custos_custody::address::wallet(&key, &wallet.chain)
        .map(|w| w.script_pubkey.to_vec())
        .map_err(|e| e.to_string())?;
    SCRIPTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(memo, script.clone());
    Ok(script)
}

/// Guardians whose heartbeat is older than this are not asked.
const LIVE: Duration = Duration::from_secs(15);
/// How long a guardian may take to answer one request.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// Commitments first asked of a guardian for a wallet. Each top-up asks
/// twice the one before, up to [`MAX_PREPROCESS`]: a wallet that signs once
/// in a while leaves a few outstanding nonces with its guardians, a busy one
/// gets batches of 64.
const FIRST_BATCH: u16 = 4;
/// Commitments are used only while well inside the guardian's keeping time.
const FRESH: Duration = Duration::from_secs(COMMITMENT_TTL.as_secs() / 2);

/// Commitments a guardian handed out ahead for a wallet, not yet used.
#[derive(Debug)]
struct Held {
    identifier: Identifier,
    public_key_package: Vec<u8>,
    commitments: VecDeque<(Instant, SigningCommitments)>,
    /// How many the last request asked for; the stock is topped up once it
    /// falls below half of it.
    batch: u16,
    /// A top-up is on its way.
    refilling: bool,
}

impl Held {
    /// `n` fresh commitments, if the stock has them.
    fn take(&mut self, n: usize) -> Option<Taken> {
        while self
            .commitments
            .front()
            .is_some_and(|(at, _)| at.elapsed() >= FRESH)
        {
            self.commitments.pop_front();
        }
        (self.commitments.len() >= n).then(|| Taken {
            identifier: self.identifier,
            commitments: self.commitments.drain(..n).map(|(_, c)| c).collect(),
            public_key_package: self.public_key_package.clone(),
            stocked: true,
        })
    }
}

/// A guardian's commitments for one signing, one per input, with its
/// identifier and public key package.
struct Taken {
    identifier: Identifier,
    commitments: Vec<SigningCommitments>,
    public_key_package: Vec<u8>,
    /// From the stock, rather than handed out for this signing.
    stocked: bool,
}

/// The guardians' commitments by (guardian, wallet).
type Stock = Arc<Mutex<HashMap<(String, String), Held>>>;

/// Why an attempt did not sign.
enum Failure {
    /// The guardians to blame, and why.
    Blamed(Vec<(String, String)>),
    /// These guardians no longer held the nonces of their commitments, or
    /// their stock was of a key since rotated: it is dropped, and another
    /// attempt gets fresh ones.
    Stale(Vec<String>),
}

/// The signing step (coordinator).
#[derive(Debug, Clone)]
pub struct SignStep {
    client: Client,
    js: jetstream::Context,
    trail: Trail,
    consumer: StepConsumer,
    /// Live guardians as last read, and when: heartbeats come every 2 s.
    live: Arc<Mutex<Option<LiveReading>>>,
    /// Commitments handed out ahead: a signing asks each guardian once.
    stock: Stock,
}

type LiveReading = (Instant, BTreeSet<String>);

/// How long a reading of the guardians' heartbeats is reused.
const LIVENESS_REUSE: Duration = Duration::from_secs(1);

impl SignStep {
    pub fn new(client: Client, trail: Trail) -> Result<Self, String> {
        Ok(SignStep {
            js: jetstream::new(client.clone()),
            client,
            trail,
            consumer: workflow_consumer("signing")
                .ok_or("no consumer definition for the signing step")?,
            live: Arc::new(Mutex::new(None)),
            stock: Stock::default(),
        })
    }

    /// Guardians with a recent heartbeat.
    async fn live(&self) -> BTreeSet<String> {
        if let Ok(cached) = self.live.lock()
            && let Some((at, live)) = cached.as_ref()
            && at.elapsed() < LIVENESS_REUSE
        {
            return live.clone();
        }
        let live = self.read_live().await;
        if let Ok(mut cached) = self.live.lock() {
            *cached = Some((Instant::now(), live.clone()));
        }
        live
    }

    async fn read_live(&self) -> BTreeSet<String> {
        let mut live = BTreeSet::new();
        let Ok(bucket) = self.js.get_key_value(subjects::GUARDIANS_BUCKET).await else {
            return live;
        };
        let now = now_ms();
        let Ok(keys) = bucket.keys().await else {
            return live;
        };
        use futures::StreamExt;
        let keys: Vec<String> = keys.filter_map(|k| async { k.ok() }).collect().await;
        for k in keys {
            if let Ok(Some(v)) = bucket.get(&k).await
                && let Ok(a) = serde_json::from_slice::<Announcement>(&v)
                && now - a.seen_ms < LIVE.as_millis() as i64
            {
                live.insert(k);
            }
        }
        live
    }

    async fn ask(&self, guardian: &str, request: &SignRequest) -> Result<SignReply, String> {
        let subject = subjects::guardian_subject(guardian, "sign");
        let body = codec::to_msgpack(request);
        match tokio::time::timeout(ROUND_TIMEOUT, self.client.request(subject, body.into())).await {
            Err(_) => Err(format!("{guardian} did not answer in time")),
            Ok(Err(e)) => Err(format!("{guardian} unreachable: {e}")),
            Ok(Ok(msg)) => codec::from_msgpack(&msg.payload)
                .map_err(|e| format!("{guardian} answered unreadably: {e}")),
        }
    }

    /// Asks `guardian` (of `index`) to hand out `count` commitments for `wallet`.
    async fn preprocess(
        &self,
        guardian: &str,
        index: u16,
        wallet: &str,
        count: usize,
    ) -> Result<Held, String> {
        let mut held: Option<Held> = None;
        // Every answer holds exactly what was asked, so this ends.
        loop {
            let have = held.as_ref().map_or(0, |h| h.commitments.len());
            if have >= count {
                break;
            }
            let asked =
                u16::try_from(count - have).map_or(MAX_PREPROCESS, |m| m.min(MAX_PREPROCESS));
            let request = SignRequest::Preprocess {
                wallet: wallet.to_string(),
                count: asked,
            };
            let reply = self.ask(guardian, &request).await?;
            let fresh = read_commitments(guardian, index, reply, asked)?;
            match &mut held {
                Some(h) if h.public_key_package == fresh.public_key_package => {
                    h.commitments.extend(fresh.commitments)
                }
                Some(_) => {
                    return Err(format!("{guardian} answered with two public key packages"));
                }
                None => held = Some(fresh),
            }
        }
        held.ok_or_else(|| format!("no commitments asked of {guardian}"))
    }

    /// `inputs` commitments of `guardian` for `wallet`: from the stock, or
    /// asked for now when it is short. The stock is topped up off the
    /// signing's path when it runs low.
    async fn commitments(
        &self,
        guardian: &str,
        index: u16,
        wallet: &str,
        inputs: usize,
    ) -> Result<Taken, String> {
        let key = (guardian.to_string(), wallet.to_string());
        let stocked = {
            let mut stock = self.stock.lock().map_err(|_| "stock poisoned")?;
            // A guardian's index can change with a new roster: its stock of
            // before is of no use.
            if stock
                .get(&key)
                .is_some_and(|held| Identifier::try_from(index).ok() != Some(held.identifier))
            {
                stock.remove(&key);
            }
            stock.get_mut(&key).and_then(|held| held.take(inputs))
        };
        let taken = match stocked {
            Some(taken) => taken,
            None => {
                let count = inputs.max(usize::from(FIRST_BATCH));
                let mut fresh = self.preprocess(guardian, index, wallet, count).await?;
                let mut taken = fresh
                    .take(inputs)
                    .ok_or_else(|| format!("{guardian} handed out too few commitments"))?;
                taken.stocked = false;
                self.restock(&key, fresh);
                taken
            }
        };
        self.top_up(key, index);
        Ok(taken)
    }

    /// Adds commitments just handed out to the stock (a guardian answering
    /// with another key replaces what was held of it).
    fn restock(&self, key: &(String, String), fresh: Held) {
        let Ok(mut stock) = self.stock.lock() else {
            return;
        };
        match stock.get_mut(key) {
            Some(held)
                if held.identifier == fresh.identifier
                    && held.public_key_package == fresh.public_key_package =>
            {
                held.commitments.extend(fresh.commitments);
                held.batch = held.batch.max(fresh.batch);
            }
            _ => {
                stock.insert(key.clone(), fresh);
            }
        }
    }

    /// Forgets the stock of `guardians` for `wallet`.
    fn drop_stock(&self, guardians: &[String], wallet: &str) {
        if let Ok(mut stock) = self.stock.lock() {
            for g in guardians {
                stock.remove(&(g.clone(), wallet.to_string()));
            }
        }
    }

    /// Asks for a batch of commitments in the background once the stock of
    /// `key` runs low.
    fn top_up(&self, key: (String, String), index: u16) {
        let count = {
            let Ok(mut stock) = self.stock.lock() else {
                return;
            };
            match stock.get_mut(&key) {
                Some(held)
                    if !held.refilling && held.commitments.len() < usize::from(held.batch / 2) =>
                {
                    held.refilling = true;
                    held.batch = (held.batch * 2).min(MAX_PREPROCESS);
                    usize::from(held.batch)
                }
                _ => return,
            }
        };
        let step = self.clone();
        tokio::spawn(async move {
            let (guardian, wallet) = &key;
            let fresh = step.preprocess(guardian, index, wallet, count).await;
            match fresh {
                Ok(fresh) => step.restock(&key, fresh),
                Err(reason) => tracing::debug!(%guardian, %reason, "commitments not topped up"),
            }
            if let Ok(mut stock) = step.stock.lock()
                && let Some(held) = stock.get_mut(&key)
            {
                held.refilling = false;
            }
        });
    }

    /// One attempt with `signers`: the signatures, or why not.
    async fn attempt(
        &self,
        workflow_id: &str,
        wallet: &str,
        signers: &[(String, u16)],
        checked: &CheckedSpend,
        group_key: &str,
    ) -> Result<Vec<sign::Aggregated>, Failure> {
        let coordinator = |e: String| Failure::Blamed(vec![("coordinator".to_string(), e)]);
        let session_id = format!("{workflow_id}-{}", hex::encode(rand::random::<[u8; 8]>()));
        let sighashes = checked
            .sighashes()
            .map_err(|e| coordinator(e.to_string()))?;
        let stocked = join_all(
            signers
                .iter()
                .map(|(g, index)| self.commitments(g, *index, wallet, sighashes.len())),
        )
        .await;
        let mut blamed = Vec::new();
        let mut commitments: Vec<BTreeMap<Identifier, SigningCommitments>> =
            vec![BTreeMap::new(); sighashes.len()];
        let mut packages_by_guardian: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut ids: BTreeMap<Identifier, String> = BTreeMap::new();
        let mut from_stock = Vec::new();
        for ((g, _), taken) in signers.iter().zip(stocked) {
            match taken {
                Ok(taken) => {
                    for (i, c) in taken.commitments.into_iter().enumerate() {
                        commitments[i].insert(taken.identifier, c);
                    }
                    packages_by_guardian.insert(g.clone(), taken.public_key_package);
                    ids.insert(taken.identifier, g.clone());
                    if taken.stocked {
                        from_stock.push(g.clone());
                    }
                }
                Err(reason) => blamed.push((g.clone(), reason)),
            }
        }
        if !blamed.is_empty() {
            return Err(Failure::Blamed(blamed));
        }
        let public = match agreed_public_package(&packages_by_guardian, group_key) {
            Ok(public) => public,
            // A key rotation since some of the stock was handed out: ask
            // those guardians again before blaming anyone.
            Err(_) if !from_stock.is_empty() => {
                self.drop_stock(&from_stock, wallet);
                return Err(Failure::Stale(from_stock));
            }
            Err(blamed) => return Err(Failure::Blamed(blamed)),
        };
        let packages: Vec<SigningPackage> = commitments
            .into_iter()
            .zip(&sighashes)
            .map(|(c, h)| sign::signing_package(c, h))
            .collect();
        let mut serialized = Vec::with_capacity(packages.len());
        for p in &packages {
            serialized.push(p.serialize().map_err(|e| coordinator(e.to_string()))?);
        }
        let share = SignRequest::Sign {
            session_id,
            workflow_id: workflow_id.to_string(),
            packages: serialized,
        };
        let replies = join_all(signers.iter().map(|(g, _)| self.ask(g, &share))).await;
        let mut shares: Vec<BTreeMap<Identifier, SignatureShare>> =
            vec![BTreeMap::new(); packages.len()];
        let mut stale = Vec::new();
        for ((g, index), reply) in signers.iter().zip(replies) {
            if let Ok(SignReply::Stale { reason }) = &reply {
                tracing::info!(guardian = %g, %reason, "commitments dropped as stale");
                stale.push(g.clone());
                continue;
            }
            match reply.and_then(|r| read_shares(g, r, packages.len())) {
                Ok(ss) => {
                    let Ok(id) = Identifier::try_from(*index) else {
                        blamed.push((g.clone(), "invalid identifier".into()));
                        continue;
                    };
                    for (i, s) in ss.into_iter().enumerate() {
                        shares[i].insert(id, s);
                    }
                }
                Err(reason) => blamed.push((g.clone(), reason)),
            }
        }
        if !blamed.is_empty() {
            return Err(Failure::Blamed(blamed));
        }
        if !stale.is_empty() {
            self.drop_stock(&stale, wallet);
            return Err(Failure::Stale(stale));
        }
        let mut signatures = Vec::with_capacity(packages.len());
        for (package, shares) in packages.iter().zip(&shares) {
            match sign::aggregate(package, shares, &public.aggregation) {
                Ok(sig) => signatures.push(sig),
                Err(AggregateError::InvalidShares { culprits }) => {
                    return Err(Failure::Blamed(
                        culprits
                            .iter()
                            .map(|c| {
                                let who = ids.get(c).cloned().unwrap_or_else(|| "unknown".into());
                                (who, "sent an invalid signature share".to_string())
                            })
                            .collect(),
                    ));
                }
                Err(e) => return Err(coordinator(e.to_string())),
            }
        }
        Ok(signatures)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn read_commitments(
    guardian: &str,
    index: u16,
    reply: SignReply,
    asked: u16,
) -> Result<Held, String> {
    match reply {
        SignReply::Preprocessed {
            identifier,
            commitments,
            public_key_package,
        } => {
            let id = Identifier::deserialize(&identifier)
                .map_err(|e| format!("{guardian}: bad identifier: {e}"))?;
            if Identifier::try_from(index).ok() != Some(id) {
                return Err(format!("{guardian} answered with another identifier"));
            }
            if commitments.len() != usize::from(asked) {
                return Err(format!(
                    "{guardian} handed out {} commitments, {asked} were asked",
                    commitments.len()
                ));
            }
            let now = Instant::now();
            let commitments = commitments
                .iter()
                .map(|c| SigningCommitments::deserialize(c).map(|c| (now, c)))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{guardian}: bad commitment: {e}"))?;
            Ok(Held {
                identifier: id,
                public_key_package,
                commitments,
                batch: asked,
                refilling: false,
            })
        }
        SignReply::Refused { reason } => Err(format!("{guardian} refused: {reason}")),
        SignReply::Shares { .. } | SignReply::Stale { .. } => {
            Err(format!("{guardian} answered out of turn"))
        }
    }
}

fn read_shares(
    guardian: &str,
    reply: SignReply,
    inputs: usize,
) -> Result<Vec<SignatureShare>, String> {
    match reply {
        SignReply::Shares { shares } if shares.len() == inputs => shares
            .iter()
            .map(|s| SignatureShare::deserialize(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{guardian}: bad signature share: {e}")),
        SignReply::Shares { shares } => Err(format!(
            "{guardian} sent {} shares for {inputs} inputs",
            shares.len()
        )),
        SignReply::Refused { reason } | SignReply::Stale { reason } => {
            Err(format!("{guardian} refused: {reason}"))
        }
        SignReply::Preprocessed { .. } => Err(format!("{guardian} answered out of turn")),
    }
}

/// A public key package as read once: the group key it is of (hex), and the
/// key to aggregate with.
struct PackageKeys {
    group_key: String,
    aggregation: AggregationKey,
}

/// The public key package every signer reported, which must be the wallet's.
fn agreed_public_package(
    by_guardian: &BTreeMap<String, Vec<u8>>,
    group_key: &str,
) -> Result<Arc<PackageKeys>, Vec<(String, String)>> {
    let mut counts: BTreeMap<&Vec<u8>, usize> = BTreeMap::new();
    for p in by_guardian.values() {
        *counts.entry(p).or_default() += 1;
    }
    let majority = counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(p, _)| p.clone())
        .unwrap_or_default();
    let odd: Vec<(String, String)> = by_guardian
        .iter()
        .filter(|(_, p)| **p != majority)
        .map(|(g, _)| (g.clone(), "reported another public key package".to_string()))
        .collect();
    if !odd.is_empty() {
        return Err(odd);
    }
    // Read and tweaked once per package: every signing of a wallet gets the same.
    type Keys = Mutex<HashMap<Vec<u8>, Arc<PackageKeys>>>;
    static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(Mutex::default);
    let known = KEYS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&majority)
        .cloned();
    let keys = match known {
        Some(keys) => keys,
        None => {
            let public = PublicKeyPackage::deserialize(&majority).map_err(|e| {
                vec![(
                    "guardians".to_string(),
                    format!("unreadable public key package: {e}"),
                )]
            })?;
            let group = public
                .verifying_key()
                .serialize()
                .map(hex::encode)
                .unwrap_or_default();
            let keys = Arc::new(PackageKeys {
                group_key: group,
                aggregation: AggregationKey::new(&public),
            });
            KEYS.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(majority, keys.clone());
            keys
        }
    };
    if keys.group_key != group_key {
        return Err(by_guardian
            .keys()
            .map(|g| (g.clone(), "holds a share of another key".to_string()))
            .collect());
    }
    Ok(keys)
}

fn alert(workflow_id: &str, summary: String) -> Proposal {
    let id = format!("signing-{}", hex::encode(rand::random::<[u8; 8]>()));
    crate::runtime::transfer_alert("signing", id, workflow_id, None, summary)
}

/// How one signing ceremony ended.
#[derive(Debug)]
pub enum Ceremony {
    /// Signed; `version` is the workflow's version it was signed at.
    Signed {
        signed: custos_schemas::chain::SignedTransaction,
        version: u64,
        /// Guardians excluded on the way, and why.
        excluded: Vec<(String, String)>,
    },
    /// Not signable: the checks failed, or too few guardians could sign.
    Failed {
        reason: String,
        version: u64,
        excluded: Vec<(String, String)>,
    },
    /// Not built (yet), or signed already.
    NotPending,
    /// Approved with a time delay that has not passed: signing starts at
    /// `until` (ms since the epoch), from [`sign_when_due`].
    Delayed { until: i64 },
}

/// When a built transfer's policy time delay ends, if it has not yet.
fn delayed_until(view: &TrailView, workflow_id: &str, now: i64) -> Option<i64> {
    let t = view.transfer(workflow_id)?;
    let decision = t.decision.as_ref().filter(|d| d.delay_ms > 0)?;
    if t.stage != Stage::Built {
        return None;
    }
    match approvals_satisfied(decision, &approvals_of(t), &view.directory, now) {
        ApprovalStatus::Satisfied { sign_after, .. } if sign_after > now => Some(sign_after),
        _ => None,
    }
}

/// Signs, every `every`, the built transfers whose policy time delay has passed
/// (the signing step leaves them waiting), until `shutdown`.
pub async fn sign_when_due<A: crate::remote::Appender>(
    step: SignStep,
    appender: A,
    every: Duration,
    mut shutdown: crate::Shutdown,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let due = step.trail.read(|view| {
            view.ledger
                .transfers()
                .filter(|(_, t)| {
                    t.stage == Stage::Built && t.decision.as_ref().is_some_and(|d| d.delay_ms > 0)
                })
                .filter(|(id, _)| delayed_until(view, id, now).is_none())
                .map(|(id, _)| id.to_string())
                .collect::<Vec<_>>()
        });
        let due = match due.await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "delayed signings skipped");
                continue;
            }
        };
        for id in due {
            let proposals = match step.ceremony(&id).await {
                Ok(ceremony) => step.record(&id, None, Target::default(), ceremony),
                Err(e) => {
                    tracing::warn!(workflow = %id, error = %e, "delayed signing not started");
                    continue;
                }
            };
            if let AppendReply::Refused { reason } | AppendReply::Unavailable { reason } =
                appender.append(proposals).await
            {
                tracing::warn!(workflow = %id, %reason, "delayed signing not recorded");
            }
        }
    }
}

impl SignStep {
    /// Runs the signing ceremony of a built workflow: the guardians' own checks
    /// first (a request they would refuse fails here with the reason), then
    /// attempts with live guardians, replacing any that fail, until signed or
    /// fewer than the threshold remain.
    pub async fn ceremony(&self, workflow_id: &str) -> Result<Ceremony, String> {
        let now = now_ms();
        // A built transfer the replica already holds (it follows the stream
        // live) has its decision and votes there too: no round trip to the
        // server for the stream's end. Guardians check the delay themselves.
        let delayed = |view: &TrailView| {
            view.transfer(workflow_id)
                .is_some_and(|t| t.stage == Stage::Built)
                .then(|| delayed_until(view, workflow_id, now))
        };
        let delayed = match self.trail.read_current(delayed)? {
            Some(until) => until,
            None => {
                self.trail
                    .read(|view| delayed_until(view, workflow_id, now))
                    .await?
            }
        };
        if let Some(until) = delayed {
            return Ok(Ceremony::Delayed { until });
        }
        // HD wallets are signed by the signer holding their seed, not by guardians.
        if crate::hd_signer::is_hd(&self.trail, workflow_id).await? {
            return crate::hd_signer::ceremony(&self.client, &self.trail, workflow_id, now).await;
        }
        let prepare = |view: &TrailView| {
            let t = view.transfer(workflow_id)?;
            if t.stage != Stage::Built {
                return None;
            }
            let wallet = t
                .request
                .as_ref()
                .and_then(|r| view.ledger.wallet(&r.wallet))
                .cloned();
            Some(
                wallet
                    .ok_or_else(|| "the wallet is not in the trail".to_string())
                    .and_then(|w| wallet_script(&w))
                    .and_then(|script| check(view, workflow_id, &script, now))
                    .map_err(|reason| (reason, t.version))
                    .map(|c| (c, t.version)),
            )
        };
        // The replica has usually seen the recorded transaction already (it
        // follows the stream live); only if not, wait for the stream's end.
        let checked = match self.trail.read_current(prepare)? {
            Some(c) => Some(c),
            None => self.trail.read(prepare).await?,
        };
        let ((wallet, checked), version) = match checked {
            None => return Ok(Ceremony::NotPending),
            Some(Ok(c)) => c,
            Some(Err((reason, version))) => {
                return Ok(Ceremony::Failed {
                    reason,
                    version,
                    excluded: Vec::new(),
                });
            }
        };
        let threshold = usize::from(wallet.threshold.unwrap_or(0));
        let group_key = wallet.group_key.clone().unwrap_or_default();
        let live = self.live().await;
        // Live guardians first, in the wallet's order; the others as a last resort.
        let mut candidates: Vec<(String, u16)> = wallet
            .guardians
            .iter()
            .filter(|g| live.contains(&g.id))
            .chain(wallet.guardians.iter().filter(|g| !live.contains(&g.id)))
            .map(|g| (g.id.clone(), g.index))
            .collect();
        let mut excluded = Vec::new();
        let mut stale: BTreeMap<String, usize> = BTreeMap::new();
        while candidates.len() >= threshold && threshold > 0 {
            let signers: Vec<(String, u16)> = candidates[..threshold].to_vec();
            match self
                .attempt(workflow_id, &wallet.name, &signers, &checked, &group_key)
                .await
            {
                Ok(signatures) => {
                    let names = signers.iter().map(|(g, _)| g.clone()).collect();
                    let signed = checked
                        .finalize(&wallet.chain, &signatures, names)
                        .map_err(|e| e.to_string())?;
                    return Ok(Ceremony::Signed {
                        signed,
                        version,
                        excluded,
                    });
                }
                Err(Failure::Stale(guardians)) => {
                    // Twice stale in one ceremony, the second time on
                    // commitments it had just handed out: not a restart.
                    let mut out = Vec::new();
                    for g in guardians {
                        let times = stale.entry(g.clone()).or_insert(0);
                        *times += 1;
                        if *times >= 2 {
                            out.push((
                                g,
                                "held no nonces for commitments it had just handed out".to_string(),
                            ));
                        }
                    }
                    candidates.retain(|(g, _)| !out.iter().any(|(o, _)| o == g));
                    excluded.extend(out);
                }
                Err(Failure::Blamed(blamed)) => {
                    let fatal = blamed
                        .iter()
                        .any(|(g, _)| g == "coordinator" || g == "guardians");
                    let out: BTreeSet<String> = blamed.iter().map(|(g, _)| g.clone()).collect();
                    let before = candidates.len();
                    candidates.retain(|(g, _)| !out.contains(g));
                    excluded.extend(blamed);
                    // A blame that excludes nobody would only repeat.
                    if fatal || candidates.len() == before {
                        break;
                    }
                }
            }
        }
        // Guardians that only did not answer (restarting, a network cut) may be
        // back soon, and one without its share yet may not have received the
        // key ceremony's commit yet (it follows the record): retry later
        // rather than fail the transfer.
        if !excluded.is_empty()
            && excluded.iter().all(|(_, reason)| {
                reason.contains("unreachable")
                    || reason.contains("did not answer")
                    || reason.contains("no share for wallet")
            })
        {
            return Err(format!(
                "fewer than {threshold} guardians answered: {}",
                excluded
                    .iter()
                    .map(|(_, reason)| reason.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(Ceremony::Failed {
            reason: format!(
                "fewer than {threshold} guardians could sign ({} left after exclusions)",
                candidates.len()
            ),
            version,
            excluded,
        })
    }
}

impl Step for SignStep {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let ceremony = self
            .ceremony(&event.workflow_id)
            .await
            .map_err(StepError::Transient)?;
        Ok(self.record(
            &event.workflow_id,
            Some(event.id.clone()),
            event.target.clone(),
            ceremony,
        ))
    }
}

impl SignStep {
    /// What a ceremony's outcome records: the signed transaction or the
    /// failure, after an alert for each guardian excluded on the way.
    fn record(
        &self,
        id: &str,
        causation: Option<String>,
        target: Target,
        ceremony: Ceremony,
    ) -> Vec<Proposal> {
        let next = |event_type, result, payload, version| Proposal {
            aggregate_kind: AggregateKind::Tx,
            workflow_id: id.to_string(),
            expected_version: version,
            event_type,
            causation_id: causation.clone(),
            actor: Actor::system("signing"),
            target: target.clone(),
            context: Default::default(),
            result,
            metadata: Default::default(),
            payload,
        };
        let (next, excluded) = match ceremony {
            Ceremony::NotPending | Ceremony::Delayed { .. } => return Vec::new(),
            Ceremony::Signed {
                signed,
                version,
                excluded,
            } => (
                next(
                    EventType::TransactionSigned,
                    Outcome::Success,
                    Payload::TransactionSigned(signed),
                    version,
                ),
                excluded,
            ),
            Ceremony::Failed {
                reason,
                version,
                excluded,
            } => (
                next(
                    EventType::TransactionFailed,
                    Outcome::Failure,
                    Payload::StepFailed {
                        step: "signing".into(),
                        reason,
                    },
                    version,
                ),
                excluded,
            ),
        };
        let mut proposals: Vec<Proposal> = excluded
            .iter()
            .map(|(guardian, reason)| {
                tracing::warn!(workflow = %id, %guardian, %reason, "guardian excluded");
                alert(
                    id,
                    format!("signing {id}: guardian {guardian} excluded: {reason}"),
                )
            })
            .collect();
        proposals.push(next);
        proposals
    }
}
