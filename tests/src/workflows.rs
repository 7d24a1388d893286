//! What transfer tests start from: a policy recorded as active, the initiator
//! `erp`, and the policy step deciding with fixed prices; the change service
//! on the same policy and prices for tests that need it (fee bumps).

use custos_engine::policy::Policy;
use custos_schemas::{AggregateKind, EventType, Payload, UserRecord};
use custos_workers::Shutdown;
use custos_workers::policy_step::{PolicyStep, PriceTable, Prices};
use custos_workers::trail::Trail;

use crate::{Engine, Nats, append_ok, record};

/// `policy` recorded as active, the initiator `erp`, and the policy step
/// running until `shutdown` with LTC at EUR 80 (up to 12.5 LTC allowed
/// outright by the default policy) and ETH at EUR 3,000.
pub async fn policy_and_initiator(
    nats: &Nats,
    engine: &Engine,
    policy: Policy,
    shutdown: Shutdown,
) {
    append_ok(
        &engine.ledger,
        vec![
            record(
                AggregateKind::Policy,
                "active",
                EventType::PolicyCreated,
                Payload::PolicyActivated {
                    name: policy.name.clone(),
                    version: policy.version().to_string(),
                },
            ),
            record(
                AggregateKind::User,
                "erp",
                EventType::UserCreated,
                Payload::UserCreated(UserRecord {
                    id: "erp".into(),
                    name: "ERP".into(),
                    email: "erp@example.com".into(),
                    slack_user_id: None,
                    roles: vec!["initiator".into()],
                    groups: vec![],
                    mfa_enrolled: false,
                }),
            ),
        ],
    )
    .await;
    let js = nats.js().await;
    let step = PolicyStep::new(js.clone(), policy, prices())
        .await
        .expect("policy step");
    tokio::spawn(custos_workers::runtime::run(
        js,
        engine.ledger.clone(),
        step,
        shutdown,
    ));
}

/// LTC at EUR 80, ETH at EUR 3,000.
pub fn prices() -> PriceTable {
    let mut prices = PriceTable::default();
    for (asset, eur) in [("LTC", "80"), ("ETH", "3000")] {
        prices
            .quotes
            .entry(asset.into())
            .or_default()
            .insert("EUR".into(), eur.into());
    }
    prices
}

/// The change service deciding under `policy` with [`prices`] until `shutdown`.
pub async fn change_service(nats: &Nats, engine: &Engine, policy: Policy, shutdown: Shutdown) {
    let trail = Trail::follow(nats.js().await, shutdown.clone())
        .await
        .expect("trail");
    tokio::spawn(custos_workers::change::serve(
        engine.client.clone(),
        trail,
        engine.ledger.clone(),
        policy,
        Prices::Table(std::sync::Arc::new(prices())),
        shutdown,
    ));
}
