//! A verified replica of the audit trail, followed as it grows: the engine's
//! ledger fold (every link checked, every workflow's state machine re-run), the
//! directory and the active policy version. Guardians and the ballot box decide
//! from it, never from what a coordinator or a channel tells them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use custos_adapters::jetstream::{StoredEvent, TrailStart, trail_start};
use custos_engine::chain::ChainHash;
use custos_engine::change::{Admin, ChangeState};
use custos_engine::ledger::Ledger;
use custos_engine::policy::{
    ApprovalStatus, AwaitsApprovals, Directory, approvals_of, approvals_satisfied,
};
use custos_engine::transfer::{Stage, Transfer};
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::change::Change;
use custos_schemas::policy::PolicyOutcome;
use custos_schemas::{AggregateKind, EventType, Payload, subjects};
use futures::StreamExt;
use tokio::sync::watch;

use crate::Shutdown;

/// What the trail says, as of `ledger.last_seq()`.
#[derive(Debug, Clone, Default)]
pub struct TrailView {
    pub ledger: Ledger,
    pub directory: Directory,
    /// Version of the active policy, with the seq that activated it.
    pub active_policy: Option<(String, u64)>,
    /// Applied administrative changes: whitelists, freezes, policy documents.
    pub admin: Admin,
    /// Key ceremonies the trail records (their wallet events' causation), by
    /// ceremony id, with the wallet: what a guardian may commit.
    pub ceremonies: std::collections::BTreeMap<String, String>,
    /// Coins that transfers in flight spend, kept as events arrive so that a
    /// build need not walk every transfer.
    pub coins_in_flight: CoinsInFlight,
    /// Transfers whose transaction is on the network and not yet confirmed
    /// (broadcast, or being replaced by a fee bump), kept as events arrive so
    /// that the confirmation watcher and the fee bumper need not walk every
    /// transfer ever recorded.
    on_network: BTreeSet<String>,
    /// Set when the trail failed verification: nothing is decided from it after.
    pub broken: Option<String>,
}

impl TrailView {
    fn apply(&mut self, stored: &StoredEvent) -> Result<(), String> {
        let event = self
            .ledger
            .replay(stored.link())
            .map_err(|e| format!("seq {}: {}", e.seq, e.reason))?;
        if let Err(e) = self.directory.apply(&event) {
            tracing::warn!(event = %event.id, error = %e, "directory event does not apply");
        }
        match (event.event_type, &event.payload) {
            (
                EventType::PolicyCreated | EventType::PolicyModified,
                Payload::PolicyActivated { version, .. },
            )
            | (
                EventType::PolicyModified,
                Payload::ChangeApplied(Change::PolicyApply { version, .. }),
            ) => self.active_policy = Some((version.clone(), stored.seq)),
            _ => {}
        }
        if event.aggregate_kind == AggregateKind::Wallet
            && let Some(ceremony) = &event.causation_id
        {
            self.ceremonies
                .insert(ceremony.clone(), event.workflow_id.clone());
        }
        if event.aggregate_kind == AggregateKind::Tx {
            let transfer = self
                .ledger
                .aggregate(AggregateKind::Tx, &event.workflow_id)
                .and_then(|a| a.transfer.as_ref());
            self.coins_in_flight.update(&event.workflow_id, transfer);
            match transfer.is_some_and(|t| t.stage == Stage::Broadcast || t.replacing()) {
                true => self.on_network.insert(event.workflow_id.clone()),
                false => self.on_network.remove(&event.workflow_id),
            };
        }
        let ledger = &self.ledger;
        self.admin
            .apply(&event, |w| ledger.wallet(w).map(|d| d.chain.clone()));
        Ok(())
    }

    /// A change workflow's state, if the trail has it whole.
    pub fn change(&self, workflow_id: &str) -> Option<&ChangeState> {
        self.ledger
            .aggregate(AggregateKind::Change, workflow_id)
            .filter(|a| !a.partial)
            .and_then(|a| a.change.as_ref())
    }

    /// The workflow (transfer or change) `workflow_id` names, with its kind and
    /// version: what approvals are judged against.
    pub fn awaiting(
        &self,
        workflow_id: &str,
    ) -> Option<(AggregateKind, &dyn AwaitsApprovals, u64)> {
        if let Some(t) = self.transfer(workflow_id) {
            return Some((AggregateKind::Tx, t, t.version));
        }
        self.change(workflow_id)
            .map(|c| (AggregateKind::Change, c as &dyn AwaitsApprovals, c.version))
    }

    /// Whether a workflow's decision and recorded approvals let it proceed at
    /// `now`, as a guardian checks before it takes part: decided by the policy
    /// active now, initiated by an active user, approvals that satisfy the
    /// decision and any time delay passed. The error says what is missing.
    pub fn cleared(
        &self,
        workflow: &dyn AwaitsApprovals,
        initiator: &str,
        now: i64,
    ) -> Result<(), String> {
        let decision = workflow
            .decision()
            .ok_or("the workflow has no policy decision")?;
        if decision.outcome == PolicyOutcome::Block || decision.initiator != initiator {
            return Err("the policy decision does not allow it".into());
        }
        match &self.active_policy {
            Some((version, _)) if *version == decision.policy_version => {}
            _ => {
                return Err(
                    "the policy changed since the decision: the request must be evaluated again"
                        .into(),
                );
            }
        }
        if !self.directory.user(initiator).is_some_and(|u| u.active) {
            return Err(format!("the initiator {initiator} is not an active user"));
        }
        match approvals_satisfied(decision, &approvals_of(workflow), &self.directory, now) {
            ApprovalStatus::Satisfied { sign_after, .. } if now >= sign_after => Ok(()),
            ApprovalStatus::Satisfied { sign_after, .. } => Err(format!(
                "the policy's time delay runs until {sign_after} (ms since the epoch)"
            )),
            ApprovalStatus::Pending { missing } => Err(format!(
                "the recorded approvals do not satisfy the policy: {}",
                missing.join("; ")
            )),
            ApprovalStatus::Expired { .. } => Err("the approvals expired".into()),
            ApprovalStatus::Blocked => Err("the policy blocks it".into()),
        }
    }

    /// A transfer workflow's state, if the trail has it whole.
    pub fn transfer(&self, workflow_id: &str) -> Option<&Transfer> {
        self.ledger
            .aggregate(AggregateKind::Tx, workflow_id)
            .filter(|a| !a.partial)
            .and_then(|a| a.transfer.as_ref())
    }

    /// Every transfer whose transaction is on the network and not yet
    /// confirmed: broadcast, or being replaced by a fee bump.
    pub fn on_network(&self) -> impl Iterator<Item = (&str, &Transfer)> {
        self.on_network
            .iter()
            .filter_map(|id| Some((id.as_str(), self.transfer(id)?)))
    }
}

/// A Bitcoin-family coin: previous txid (as nodes display it) and output index.
pub type Outpoint = (String, u32);

/// Every outpoint spent by a transfer that is built, signed or broadcast and
/// not yet confirmed. An outpoint belongs to one script, so one index serves
/// every wallet. A transfer that failed holds nothing: spending its coins
/// again is what cancels a transaction it left signed.
#[derive(Debug, Clone, Default)]
pub struct CoinsInFlight {
    by_workflow: HashMap<String, Vec<Outpoint>>,
    /// How many transfers in flight spend each coin (normally one).
    holders: HashMap<Outpoint, u32>,
}

impl CoinsInFlight {
    /// Records what the transfer `workflow_id` now holds.
    fn update(&mut self, workflow_id: &str, transfer: Option<&Transfer>) {
        let held: Vec<Outpoint> = transfer
            .filter(|t| matches!(t.stage, Stage::Built | Stage::Signed | Stage::Broadcast))
            .and_then(|t| t.unsigned.as_ref())
            .map(|unsigned| match unsigned {
                UnsignedTransaction::Bitcoin { spent, .. } => {
                    spent.iter().map(|s| (s.txid.clone(), s.vout)).collect()
                }
                _ => Vec::new(),
            })
            .unwrap_or_default();
        for coin in self.by_workflow.remove(workflow_id).unwrap_or_default() {
            if let Some(n) = self.holders.get_mut(&coin) {
                *n -= 1;
                if *n == 0 {
                    self.holders.remove(&coin);
                }
            }
        }
        if !held.is_empty() {
            for coin in &held {
                *self.holders.entry(coin.clone()).or_default() += 1;
            }
            self.by_workflow.insert(workflow_id.to_string(), held);
        }
    }

    pub fn contains(&self, coin: &Outpoint) -> bool {
        self.holders.contains_key(coin)
    }
}

/// A followed trail. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Trail {
    js: jetstream::Context,
    view: Arc<RwLock<TrailView>>,
    seq: watch::Receiver<u64>,
    ends: Arc<Ends>,
}

/// Lookups of the stream's end, shared by concurrent readers: a reader uses
/// the first lookup that started after it arrived (so it sees every event
/// stored before its call), and readers that arrive during one lookup share
/// the next. A burst of readers costs two requests to the server, not one each.
#[derive(Debug, Default)]
struct Ends {
    /// The generation the next lookup takes.
    next: std::sync::atomic::AtomicU64,
    /// The last lookup's generation and the end it found.
    last: tokio::sync::Mutex<Option<(u64, u64)>>,
}

impl Ends {
    async fn end(&self, js: &jetstream::Context) -> Result<u64, String> {
        use std::sync::atomic::Ordering;
        let arrived = self.next.load(Ordering::SeqCst);
        let mut last = self.last.lock().await;
        if let Some((generation, end)) = *last
            && generation >= arrived
        {
            return Ok(end);
        }
        let generation = self.next.fetch_add(1, Ordering::SeqCst);
        let end = last_sequence(js).await?;
        *last = Some((generation, end));
        Ok(end)
    }
}

/// The sequence of the stream's last event (0 while it is empty), asked of
/// the stream's leader. A message get for the last message on any subject:
/// a stream info request answers the same, but the server marshals the
/// stream's whole configuration and state as JSON for it (8 % of the server's
/// time at 300 transfers/s, with every signing guardian asking).
async fn last_sequence(js: &jetstream::Context) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct Got {
        message: Stored,
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        seq: u64,
    }
    /// The server's code for "no message found".
    const NO_MESSAGE: u64 = 10037;
    let asked: jetstream::response::Response<Got> = js
        .request(
            format!("STREAM.MSG.GET.{}", subjects::EVENTS_STREAM),
            &serde_json::json!({ "last_by_subj": ">" }),
        )
        .await
        .map_err(|e| format!("reading the trail's end: {e}"))?;
    match asked {
        jetstream::response::Response::Ok(got) => Ok(got.message.seq),
        jetstream::response::Response::Err { error }
            if error.error_code() == jetstream::ErrorCode(NO_MESSAGE) =>
        {
            Ok(0)
        }
        jetstream::response::Response::Err { error } => {
            Err(format!("reading the trail's end: {error}"))
        }
    }
}

/// How long a reader waits for the replica to reach the stream's end.
const CATCH_UP: Duration = Duration::from_secs(10);

impl Trail {
    /// Starts following the events stream from where it starts until `shutdown`.
    pub async fn follow(js: jetstream::Context, mut shutdown: Shutdown) -> Result<Trail, String> {
        let err = |e: async_nats::Error| format!("following the trail: {e}");
        // After aged-out events, the replica resumes from the first event it is
        // delivered, linked to that event's recorded predecessor (the server's
        // retention decides where the trail starts, also if more aged out since).
        let from = match trail_start(&js).await.map_err(err)? {
            TrailStart::Genesis => 1,
            TrailStart::AgedOut(first) => first.seq,
            TrailStart::Empty { next_seq } => next_seq,
        };
        let mut resume = from > 1;
        let view = TrailView::default();
        let stream = js
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .map_err(|e| err(e.into()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: if from <= 1 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    }
                },
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.into()))?;
        let mut messages = consumer.messages().await.map_err(|e| err(e.into()))?;
        let view = Arc::new(RwLock::new(view));
        let (tx, rx) = watch::channel(from.saturating_sub(1));
        let follower = view.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = shutdown.wait() => break,
                    msg = messages.next() => msg,
                };
                let stored = match msg.map(|m| m.map_err(async_nats::Error::from)) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "trail follower: delivery error");
                        continue;
                    }
                    Some(Ok(m)) => match StoredEvent::from_message(&m) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "trail follower: unreadable message");
                            continue;
                        }
                    },
                };
                let Ok(mut view) = follower.write() else {
                    break;
                };
                if view.broken.is_some() {
                    continue;
                }
                if std::mem::take(&mut resume) {
                    match stored.prev_hash.as_deref().and_then(ChainHash::from_hex) {
                        Some(prev) => view.ledger = Ledger::resume(stored.seq, prev),
                        None => {
                            view.broken = Some(format!(
                                "seq {}: the first retained event has no predecessor hash",
                                stored.seq
                            ));
                            continue;
                        }
                    }
                }
                if let Err(reason) = view.apply(&stored) {
                    tracing::error!(%reason, "the trail does not verify: deciding nothing from it");
                    view.broken = Some(reason);
                    continue;
                }
                // Never hold the view while waking readers: they take the
                // watch's lock, then the view's.
                drop(view);
                let _ = tx.send(stored.seq);
            }
        });
        Ok(Trail {
            js,
            view,
            seq: rx,
            ends: Arc::default(),
        })
    }

    /// Runs `read` on the view as it is now, without waiting for the stream's
    /// end: for a second look moments after a [`Trail::read`].
    pub fn read_current<T>(&self, read: impl FnOnce(&TrailView) -> T) -> Result<T, String> {
        let view = self.view.read().map_err(|_| "trail replica poisoned")?;
        if let Some(broken) = &view.broken {
            return Err(format!("the audit trail does not verify ({broken})"));
        }
        Ok(read(&view))
    }

    /// Waits until the replica holds stream sequence `seq` (an append's own).
    pub async fn wait_until(&self, seq: u64) -> Result<(), String> {
        let mut at = self.seq.clone();
        tokio::time::timeout(CATCH_UP, at.wait_for(|s| *s >= seq))
            .await
            .map(|r| r.map(|_| ()))
            .map_err(|_| format!("the trail replica did not reach seq {seq}"))?
            .map_err(|_| "the trail follower stopped".to_string())
    }

    /// Runs `read` on the view once it holds every event stored before the call.
    /// Fails closed: a broken trail or a replica that cannot catch up decides nothing.
    pub async fn read<T>(&self, read: impl FnOnce(&TrailView) -> T) -> Result<T, String> {
        let end = self.ends.end(&self.js).await?;
        let mut seq = self.seq.clone();
        // The watch's guard is released here, before the view is locked.
        let reached = tokio::time::timeout(CATCH_UP, seq.wait_for(|s| *s >= end))
            .await
            .map(|r| r.map(|_| ()));
        let view = self.view.read().map_err(|_| "trail replica poisoned")?;
        if let Some(broken) = &view.broken {
            return Err(format!("the audit trail does not verify ({broken})"));
        }
        if !matches!(reached, Ok(Ok(_))) {
            return Err(format!(
                "the trail replica is at seq {} of {end}",
                view.ledger.last_seq()
            ));
        }
        Ok(read(&view))
    }
}
