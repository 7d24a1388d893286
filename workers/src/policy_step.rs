//! The policy step: takes each created transfer, evaluates the active policy on
//! it (the policy, directory, address book and freezes of its verified replica
//! of the trail, configured prices, velocity as recorded) and appends
//! `POLICY_EVALUATED` with the decision and its explanation. The engine's policy
//! module decides; this shell only gathers the inputs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use custos_adapters::jetstream::{StepConsumer, read_events, workflow_consumer};
use custos_engine::policy::{
    self, Currency, Inputs, Policy, PriceSnapshot, Request, VelocityState,
};
use custos_schemas::policy::PolicyOutcome;
use custos_schemas::{
    Actor, AggregateKind, Event, EventType, Outcome, Payload, Proposal, RequestContext, codec,
    subjects,
};

use crate::change::ActivePolicy;
use crate::runtime::{Step, StepError};
use crate::trail::Trail;
use crate::{Shutdown, ShutdownTrigger};

/// Configured prices: per asset, per currency, a decimal string. A configured
/// table states the prices as of now; a feed replaces it where one is set up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    pub quotes: BTreeMap<String, BTreeMap<String, String>>,
}

impl PriceTable {
    /// The table as a snapshot taken at `now`.
    pub fn snapshot(&self, now: i64) -> Result<PriceSnapshot, String> {
        let mut snapshot = PriceSnapshot::new();
        for (asset, quotes) in &self.quotes {
            for (currency, price) in quotes {
                let c = Currency::parse(currency)
                    .ok_or_else(|| format!("prices: unknown currency {currency:?} for {asset}"))?;
                snapshot
                    .insert(asset, c, price, now)
                    .map_err(|e| format!("prices: {asset} in {currency}: {e}"))?;
            }
        }
        Ok(snapshot)
    }
}

/// The policy step.
#[derive(Debug, Clone)]
pub struct PolicyStep {
    trail: Trail,
    /// Stops the step's trail follower when the last clone of the step is gone.
    _follower: Arc<ShutdownTrigger>,
    policy: Arc<ActivePolicy>,
    prices: Arc<PriceTable>,
    velocity: Arc<Mutex<VelocityState>>,
    consumer: StepConsumer,
}

impl PolicyStep {
    /// Builds the step, rebuilding velocity from the decisions already recorded
    /// and following its own replica of the trail. `policy` decides until the
    /// trail activates another one.
    pub async fn new(
        js: jetstream::Context,
        policy: Policy,
        prices: PriceTable,
    ) -> Result<Self, String> {
        prices.snapshot(0)?;
        let mut velocity = VelocityState::new(policy.currency);
        let filter =
            subjects::event_type_filter(AggregateKind::Tx, EventType::PolicyEvaluated.as_str());
        read_events(&js, 1, Some(filter), |stored| {
            if let Ok(Event {
                payload: Payload::PolicyEvaluated(d),
                ..
            }) = codec::from_msgpack::<Event>(&stored.body)
            {
                record(&mut velocity, &d);
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("reading past decisions: {e}"))?;
        let consumer =
            workflow_consumer("policy").ok_or("no consumer definition for the policy step")?;
        let (trigger, shutdown) = Shutdown::new();
        let trail = Trail::follow(js, shutdown).await?;
        Ok(PolicyStep {
            trail,
            _follower: Arc::new(trigger),
            policy: Arc::new(ActivePolicy::new(policy)),
            prices: Arc::new(prices),
            velocity: Arc::new(Mutex::new(velocity)),
            consumer,
        })
    }
}

/// A decision that lets the transfer go on counts towards velocity limits.
fn record(velocity: &mut VelocityState, d: &custos_schemas::policy::PolicyDecision) {
    if d.outcome == PolicyOutcome::Block {
        return;
    }
    let (Some(wallet), Some(fiat)) = (&d.wallet, &d.fiat_value) else {
        return;
    };
    if let Ok(micros) = policy::fiat::parse_micros(&fiat.amount) {
        velocity.record(d.evaluated_at, wallet, &d.initiator, u128::from(micros));
    }
}

impl Step for PolicyStep {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let Payload::TransferRequested { request, .. } = &event.payload else {
            return Err(StepError::Permanent("not a transfer request".into()));
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let prices = self.prices.snapshot(now).map_err(StepError::Permanent)?;
        let decision = self
            .trail
            .read(|view| {
                let wallet = view.ledger.wallet(&request.wallet).ok_or_else(|| {
                    StepError::Permanent(format!("wallet {} is not recorded", request.wallet))
                })?;
                let policy = self.policy.get(view).map_err(StepError::Transient)?;
                let request = Request::transfer(request, wallet, false)
                    .map_err(|e| StepError::Permanent(e.to_string()))?;
                let mut velocity = self
                    .velocity
                    .lock()
                    .map_err(|_| StepError::Transient("velocity state poisoned".into()))?;
                let inputs = Inputs {
                    directory: &view.directory,
                    prices: &prices,
                    velocity: &velocity,
                    address_book: &view.admin.address_book,
                    freeze: &view.admin.freeze,
                    now,
                };
                let decision = policy::evaluate(&policy, &request, &inputs);
                record(&mut velocity, &decision);
                Ok(decision)
            })
            .await
            .map_err(StepError::Transient)??;
        let result = match decision.outcome {
            PolicyOutcome::Allow => Outcome::Success,
            PolicyOutcome::RequireApprovals => Outcome::Pending,
            PolicyOutcome::Block => Outcome::Denied,
        };
        Ok(vec![Proposal {
            aggregate_kind: AggregateKind::Tx,
            workflow_id: event.workflow_id.clone(),
            expected_version: event.version,
            event_type: EventType::PolicyEvaluated,
            causation_id: Some(event.id.clone()),
            actor: Actor::system("policy"),
            target: event.target.clone(),
            context: RequestContext::default(),
            result,
            metadata: Default::default(),
            payload: Payload::PolicyEvaluated(decision),
        }])
    }
}
