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

/// Where the policy's prices come from.
#[derive(Debug, Clone)]
pub enum Prices {
    /// A configured table, stating the prices as of now.
    Table(Arc<PriceTable>),
    /// A feed's last reading, as of when it was read (so the policy's maximum
    /// price age applies; none yet: every price is missing, which fails closed).
    Feed(Arc<Mutex<Option<(i64, PriceTable)>>>),
}

impl Prices {
    pub(crate) fn snapshot(&self, now: i64) -> Result<PriceSnapshot, String> {
        match self {
            Prices::Table(t) => t.snapshot(now),
            Prices::Feed(reading) => {
                match reading.lock().map_err(|_| "price feed poisoned")?.as_ref() {
                    Some((at, table)) => table.snapshot(*at),
                    None => Ok(PriceSnapshot::new()),
                }
            }
        }
    }
}

/// Reads the price feed at `url` every `every` until `shutdown`: JSON shaped
/// like the price table, `{"LTC": {"EUR": "80", "USD": "86"}}`. A reading that
/// fails or does not parse leaves the last good one to age out.
pub async fn follow_price_feed(
    url: String,
    every: std::time::Duration,
    reading: Arc<Mutex<Option<(i64, PriceTable)>>>,
    mut shutdown: Shutdown,
) {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => {}
        }
        let fetched = async {
            let quotes = http
                .get(&url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| e.to_string())?
                .json::<BTreeMap<String, BTreeMap<String, String>>>()
                .await
                .map_err(|e| format!("not a price table: {e}"))?;
            let table = PriceTable { quotes };
            table.snapshot(0)?;
            Ok::<_, String>(table)
        };
        match fetched.await {
            Ok(table) => {
                let at = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                if let Ok(mut r) = reading.lock() {
                    *r = Some((at, table));
                }
            }
            Err(e) => tracing::warn!(%url, error = %e, "price feed not read"),
        }
    }
}

/// The policy step.
#[derive(Debug, Clone)]
pub struct PolicyStep {
    trail: Trail,
    /// Stops the step's own trail follower, if it has one, when the last
    /// clone of the step is gone.
    _follower: Option<Arc<ShutdownTrigger>>,
    policy: Arc<ActivePolicy>,
    prices: Prices,
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
        Self::with_prices(js, policy, Prices::Table(Arc::new(prices))).await
    }

    /// As [`PolicyStep::new`], with prices from `prices` (a table or a feed).
    pub async fn with_prices(
        js: jetstream::Context,
        policy: Policy,
        prices: Prices,
    ) -> Result<Self, String> {
        let (trigger, shutdown) = Shutdown::new();
        let trail = Trail::follow(js.clone(), shutdown).await?;
        let mut step = Self::on_trail(js, trail, policy, prices).await?;
        step._follower = Some(Arc::new(trigger));
        Ok(step)
    }

    /// As [`PolicyStep::with_prices`], deciding from `trail`, a replica the
    /// process follows for other steps too.
    pub async fn on_trail(
        js: jetstream::Context,
        trail: Trail,
        policy: Policy,
        prices: Prices,
    ) -> Result<Self, String> {
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
        Ok(PolicyStep {
            trail,
            _follower: None,
            policy: Arc::new(ActivePolicy::new(policy)),
            prices,
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
