//! The ledger's state, pure: the chain head, every aggregate's version and (for
//! transfers) its workflow state, and the wallet directory. The ledger writer (in
//! `workers`) is the only process that seals events; it rebuilds this state by
//! replaying the stream and then extends the chain from memory, so appends never
//! wait on a read.

use std::collections::HashMap;

use custos_schemas::{
    AggregateKind, Event, EventType, Payload, Proposal, SCHEMA_VERSION, WalletDescriptor, codec,
    subjects, validate_token,
};

use crate::chain::{self, ChainHash, Link};
use crate::change::{self, ChangeState};
use crate::transfer::{self, Transfer};

/// One aggregate's position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AggregateState {
    pub version: u64,
    /// Stream sequence of the aggregate's first event.
    pub first_seq: u64,
    pub last_event: Option<EventType>,
    /// The workflow state, for transfers.
    pub transfer: Option<Transfer>,
    /// The workflow state, for administrative changes.
    pub change: Option<ChangeState>,
    /// A workflow whose first events aged out (retention): its version is known,
    /// its state is not, so nothing more is appended to it.
    pub partial: bool,
}

/// An event ready to publish: its place in the stream and its chain hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub subject: String,
    pub msg_id: String,
    pub body: Vec<u8>,
    pub prev_hash: ChainHash,
    pub hash: ChainHash,
    pub event: Event,
}

/// Why proposals were not sealed. Nothing is sealed when any one fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{workflow_id}: expected version {expected}, the aggregate is at {actual}")]
    Conflict {
        workflow_id: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0}")]
    Refused(String),
}

/// Why a stored event could not be replayed: the trail is broken or holds an
/// event the rules forbid. The ledger then refuses to extend it (fail closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {seq}: {reason}")]
pub struct ReplayError {
    pub seq: u64,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Ledger {
    head: ChainHash,
    last_seq: u64,
    last_timestamp: i64,
    /// Replay started after aged-out events.
    resumed: bool,
    /// Boxed: the map outgrows its table every so often, and moving tens of
    /// thousands of whole states then stalls every replica at once.
    aggregates: HashMap<(AggregateKind, String), Box<AggregateState>>,
    wallets: HashMap<String, WalletDescriptor>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            head: ChainHash::GENESIS,
            last_seq: 0,
            last_timestamp: 0,
            resumed: false,
            aggregates: HashMap::new(),
            wallets: HashMap::new(),
        }
    }
}

impl Ledger {
    /// A ledger for a trail whose events before `first_seq` aged out: replay
    /// continues from `first_seq`, linked to `prev` (which a later signed
    /// checkpoint must vouch for; the writer checks that with a verifier).
    pub fn resume(first_seq: u64, prev: ChainHash) -> Self {
        Ledger {
            head: prev,
            last_seq: first_seq.saturating_sub(1),
            resumed: true,
            ..Ledger::default()
        }
    }

    pub fn head(&self) -> ChainHash {
        self.head
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn aggregate(&self, kind: AggregateKind, id: &str) -> Option<&AggregateState> {
        self.aggregates.get(&(kind, id.to_string())).map(|a| &**a)
    }

    pub fn version(&self, kind: AggregateKind, id: &str) -> u64 {
        self.aggregate(kind, id).map_or(0, |a| a.version)
    }

    /// Every transfer workflow the ledger holds whole, by id.
    pub fn transfers(&self) -> impl Iterator<Item = (&str, &Transfer)> {
        self.aggregates
            .iter()
            .filter(|((kind, _), a)| *kind == AggregateKind::Tx && !a.partial)
            .filter_map(|((_, id), a)| a.transfer.as_ref().map(|t| (id.as_str(), t)))
    }

    /// Every change workflow the ledger holds whole, by id.
    pub fn changes(&self) -> impl Iterator<Item = (&str, &ChangeState)> {
        self.aggregates
            .iter()
            .filter(|((kind, _), a)| *kind == AggregateKind::Change && !a.partial)
            .filter_map(|((_, id), a)| a.change.as_ref().map(|c| (id.as_str(), c)))
    }

    pub fn wallet(&self, name: &str) -> Option<&WalletDescriptor> {
        self.wallets.get(name)
    }

    /// Replays one stored event, checking that it extends the chain; the event,
    /// decoded.
    pub fn replay(&mut self, l: Link<'_>) -> Result<Event, ReplayError> {
        let fail = |reason: String| ReplayError { seq: l.seq, reason };
        let hash = chain::check_link(&self.head, self.last_seq, l)
            .map_err(|kind| fail(chain::Break { seq: l.seq, kind }.to_string()))?;
        let event: Event =
            codec::from_msgpack(l.body).map_err(|e| fail(format!("undecodable event: {e}")))?;
        let subject = subjects::event_subject(
            event.aggregate_kind,
            &event.workflow_id,
            event.event_type.as_str(),
        );
        if subject != l.subject {
            return Err(fail(format!(
                "event {} is filed under {}, it belongs under {subject}",
                event.id, l.subject
            )));
        }
        let key = (event.aggregate_kind, event.workflow_id.clone());
        // First seen mid-history: its beginning aged out.
        let unseen = || match self.resumed && event.version > 1 {
            true => AggregateState {
                // Only a workflow needs its whole history to take another event.
                partial: is_workflow(event.aggregate_kind),
                version: event.version - 1,
                ..AggregateState::default()
            },
            false => AggregateState::default(),
        };
        self.check_roster_change(&event).map_err(fail)?;
        let mut next = match self.aggregates.get(&key) {
            Some(state) => advance(state, &event),
            None => advance(&unseen(), &event),
        }
        .map_err(fail)?;
        if event.version == 1 {
            next.first_seq = l.seq;
        }
        self.note_wallet(&event);
        self.aggregates.insert(key, Box::new(next));
        self.head = hash;
        self.last_seq = l.seq;
        self.last_timestamp = self.last_timestamp.max(event.timestamp);
        Ok(event)
    }

    /// Seals proposals into events at the next stream sequences, all or none.
    /// `now_ms` is the writer's clock; timestamps never go backwards.
    pub fn seal(
        &mut self,
        proposals: Vec<Proposal>,
        now_ms: i64,
    ) -> Result<Vec<Sealed>, SealError> {
        let timestamp = now_ms.max(self.last_timestamp);
        let mut touched: HashMap<(AggregateKind, String), AggregateState> = HashMap::new();
        let unseen = AggregateState::default();
        let mut events = Vec::with_capacity(proposals.len());
        for p in proposals {
            validate_token("workflowId", &p.workflow_id)
                .map_err(|e| SealError::Refused(e.to_string()))?;
            let key = (p.aggregate_kind, p.workflow_id.clone());
            let current = touched
                .get(&key)
                .or_else(|| self.aggregates.get(&key).map(|a| &**a))
                .unwrap_or(&unseen);
            if current.partial {
                return Err(SealError::Refused(format!(
                    "{}: its earlier events aged out of the trail; nothing more is recorded for it",
                    p.workflow_id
                )));
            }
            if current.version != p.expected_version {
                return Err(SealError::Conflict {
                    workflow_id: p.workflow_id,
                    expected: p.expected_version,
                    actual: current.version,
                });
            }
            let version = current.version + 1;
            let event = Event {
                schema_version: SCHEMA_VERSION,
                id: Event::message_id(p.aggregate_kind, &p.workflow_id, version),
                timestamp,
                event_type: p.event_type,
                aggregate_kind: p.aggregate_kind,
                workflow_id: p.workflow_id,
                version,
                causation_id: p.causation_id,
                actor: p.actor,
                target: p.target,
                context: p.context,
                result: p.result,
                metadata: p.metadata,
                payload: p.payload,
            };
            self.check_roster_change(&event)
                .map_err(|e| SealError::Refused(format!("{}: {e}", event.workflow_id)))?;
            let next = advance(current, &event)
                .map_err(|e| SealError::Refused(format!("{}: {e}", event.workflow_id)))?;
            touched.insert(key, next);
            events.push(event);
        }
        let mut sealed = Vec::with_capacity(events.len());
        for event in events {
            let seq = self.last_seq + 1;
            let subject = subjects::event_subject(
                event.aggregate_kind,
                &event.workflow_id,
                event.event_type.as_str(),
            );
            let body = codec::to_msgpack(&event);
            let hash = chain::link(&self.head, seq, &subject, &body);
            if event.version == 1
                && let Some(state) =
                    touched.get_mut(&(event.aggregate_kind, event.workflow_id.clone()))
            {
                state.first_seq = seq;
            }
            self.note_wallet(&event);
            sealed.push(Sealed {
                seq,
                subject,
                msg_id: event.id.clone(),
                body,
                prev_hash: self.head,
                hash,
                event,
            });
            self.head = hash;
            self.last_seq = seq;
        }
        self.aggregates.extend(
            touched
                .into_iter()
                .map(|(key, state)| (key, Box::new(state))),
        );
        self.last_timestamp = timestamp;
        Ok(sealed)
    }

    fn note_wallet(&mut self, event: &Event) {
        if let Payload::WalletCreated(w)
        | Payload::GuardianChanged { wallet: w, .. }
        | Payload::ThresholdChanged { wallet: w, .. } = &event.payload
        {
            self.wallets.insert(w.name.clone(), w.clone());
        }
    }

    /// A guardian or threshold change replaces a recorded wallet's roster or
    /// threshold, never its key: signing reads both from here, and funds sit at
    /// the address.
    fn check_roster_change(&self, event: &Event) -> Result<(), String> {
        let w = match &event.payload {
            Payload::GuardianChanged { wallet: w, .. } => {
                if !matches!(
                    event.event_type,
                    EventType::GuardianAdded
                        | EventType::GuardianRemoved
                        | EventType::ShareRepaired
                ) || event.aggregate_kind != AggregateKind::Wallet
                    || w.name != event.workflow_id
                {
                    return Err(format!(
                        "a guardian change of wallet {} belongs to aggregate wallet.{} as GUARDIAN_ADDED, GUARDIAN_REMOVED or SHARE_REPAIRED",
                        w.name, w.name
                    ));
                }
                // A repaired share is the guardian's own again: nothing else changes.
                if event.event_type == EventType::ShareRepaired
                    && self.wallets.get(&w.name).is_some_and(|old| old != w)
                {
                    return Err(format!(
                        "a share repair keeps wallet {} exactly as recorded",
                        w.name
                    ));
                }
                w
            }
            Payload::ThresholdChanged {
                wallet: w,
                threshold,
                ..
            } => {
                if event.event_type != EventType::ThresholdModified
                    || event.aggregate_kind != AggregateKind::Wallet
                    || w.name != event.workflow_id
                    || w.threshold != Some(*threshold)
                {
                    return Err(format!(
                        "a threshold change of wallet {} belongs to aggregate wallet.{} as THRESHOLD_MODIFIED, with the wallet's new threshold",
                        w.name, w.name
                    ));
                }
                if let Some(old) = self.wallets.get(&w.name)
                    && old.guardians != w.guardians
                {
                    return Err(format!(
                        "a threshold change keeps wallet {}'s guardians",
                        w.name
                    ));
                }
                w
            }
            _ => return Ok(()),
        };
        let Some(old) = self.wallets.get(&w.name) else {
            return Err(format!("no wallet {} to change the guardians of", w.name));
        };
        if (&old.model, &old.chain, &old.address, &old.group_key)
            != (&w.model, &w.chain, &w.address, &w.group_key)
        {
            return Err(format!(
                "a guardian change keeps wallet {}'s model, chain, address and group key",
                w.name
            ));
        }
        let n = w.guardians.len();
        if w.threshold.is_none_or(|t| t < 2 || usize::from(t) > n) {
            return Err(format!(
                "threshold {:?} of {n} guardians (needs 2 <= threshold <= guardians)",
                w.threshold
            ));
        }
        Ok(())
    }
}

/// The aggregate's next state after `event`, or why the event is not allowed.
/// Takes the state by reference: a workflow's machine makes its next state
/// from the current one, so copying it first would copy every transfer twice
/// per event, in every replica.
fn advance(state: &AggregateState, event: &Event) -> Result<AggregateState, String> {
    if event.version != state.version + 1 {
        return Err(format!(
            "version {} does not follow {}",
            event.version, state.version
        ));
    }
    let workflow = |kind| event.aggregate_kind == kind && !state.partial;
    let transfer = match workflow(AggregateKind::Tx) {
        true => {
            let current = state.transfer.as_ref();
            let (next, _commands) = transfer::apply(current.unwrap_or(&Transfer::default()), event)
                .map_err(|e| e.to_string())?;
            Some(next)
        }
        false => state.transfer.clone(),
    };
    let change = match workflow(AggregateKind::Change) {
        true => {
            let current = state.change.as_ref();
            Some(
                change::apply(current.unwrap_or(&ChangeState::default()), event)
                    .map_err(|e| e.to_string())?,
            )
        }
        false => state.change.clone(),
    };
    // An applied change binds everyone: only its approved workflow may record it.
    if matches!(event.payload, Payload::ChangeApplied(_))
        && event.aggregate_kind != AggregateKind::Change
    {
        return Err("a change is applied only by its change workflow".into());
    }
    if let Payload::WalletCreated(w) = &event.payload
        && (event.event_type != EventType::WalletCreated
            || event.aggregate_kind != AggregateKind::Wallet
            || w.name != event.workflow_id
            || event.version != 1)
    {
        return Err(format!(
            "wallet {} must be created as the first event of aggregate wallet.{}",
            w.name, w.name
        ));
    }
    Ok(AggregateState {
        version: event.version,
        first_seq: state.first_seq,
        last_event: Some(event.event_type),
        transfer,
        change,
        partial: state.partial,
    })
}

/// Aggregates with a state machine: they need their whole history.
fn is_workflow(kind: AggregateKind) -> bool {
    matches!(kind, AggregateKind::Tx | AggregateKind::Change)
}
