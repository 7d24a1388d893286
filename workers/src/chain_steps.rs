//! Steps that talk to Bitcoin-family nodes. The broadcast step takes each
//! `TRANSACTION_SIGNED` and sends the recorded transaction, then appends
//! `TRANSACTION_BROADCAST` with the txid.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use custos_adapters::bitcoind::{Bitcoind, RpcError};
use custos_adapters::jetstream::{StepConsumer, workflow_consumer};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Event, EventType, Outcome, Payload, Proposal, Target,
};

use crate::remote::Appender;
use crate::runtime::{Step, StepError};

/// One node client per chain id (`ltc-regtest`, `btc-mainnet`, ...).
#[derive(Debug, Clone, Default)]
pub struct ChainNodes(BTreeMap<String, Bitcoind>);

impl ChainNodes {
    pub fn new(nodes: impl IntoIterator<Item = (String, Bitcoind)>) -> Self {
        ChainNodes(nodes.into_iter().collect())
    }

    fn get(&self, chain: &str) -> Result<&Bitcoind, StepError> {
        self.0
            .get(chain)
            .ok_or_else(|| StepError::Permanent(format!("no node is configured for {chain}")))
    }
}

/// A node that is down or busy is retried (the runtime naks with backoff);
/// anything else is the node's verdict.
fn step_error(context: &str, e: RpcError) -> StepError {
    if e.is_transient() {
        StepError::Transient(format!("{context}: {e}"))
    } else {
        StepError::Permanent(format!("{context}: {e}"))
    }
}

/// The broadcast step.
#[derive(Debug, Clone)]
pub struct BroadcastStep<A> {
    nodes: ChainNodes,
    ledger: A,
    consumer: StepConsumer,
    /// Consecutive transient failures per workflow before an alert is raised.
    alert_after: u32,
    failures: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl<A: Appender> BroadcastStep<A> {
    /// `alert_after`: how many consecutive failures to reach a node make an
    /// `ALERT_RAISED` (once per workflow) while the broadcast keeps retrying.
    pub fn new(nodes: ChainNodes, ledger: A, alert_after: u32) -> Result<Self, String> {
        let consumer = workflow_consumer("broadcast")
            .ok_or("no consumer definition for the broadcast step")?;
        Ok(BroadcastStep {
            nodes,
            ledger,
            consumer,
            alert_after: alert_after.max(1),
            failures: Arc::default(),
        })
    }

    /// Counts a failure to reach the node and raises the alert when the count
    /// reaches the threshold. The alert has its own aggregate per workflow, so a
    /// redelivery that raises it again is a harmless conflict.
    async fn node_unreachable(&self, event: &Event, chain: &str, reason: &str) {
        let count = {
            let Ok(mut failures) = self.failures.lock() else {
                return;
            };
            let n = failures.entry(event.workflow_id.clone()).or_default();
            *n += 1;
            *n
        };
        if count != self.alert_after {
            return;
        }
        let alert = Proposal {
            aggregate_kind: AggregateKind::System,
            workflow_id: format!("broadcast-unreachable-{}", event.workflow_id),
            expected_version: 0,
            event_type: EventType::AlertRaised,
            causation_id: Some(event.id.clone()),
            actor: Actor::system("broadcast"),
            target: Target {
                kind: "transaction".into(),
                id: event.workflow_id.clone(),
                amount: None,
                currency: None,
            },
            context: Default::default(),
            result: Outcome::Failure,
            metadata: Default::default(),
            payload: Payload::Alert {
                severity: "high".into(),
                summary: format!(
                    "broadcast of {} has failed {count} times: the {chain} node is unreachable ({reason})",
                    event.workflow_id
                ),
            },
        };
        match self.ledger.append(vec![alert]).await {
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => {}
            other => {
                tracing::warn!(workflow = %event.workflow_id, reply = ?other, "alert not recorded")
            }
        }
    }
}

impl<A: Appender> Step for BroadcastStep<A> {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let Payload::TransactionSigned(signed) = &event.payload else {
            return Err(StepError::Permanent(
                "payload is not the signed transaction".into(),
            ));
        };
        let node = self.nodes.get(&signed.chain)?;
        // Idempotent at the node: a transaction it already has counts as sent.
        let txid = match node.send_raw_transaction(&signed.raw_tx).await {
            Ok(txid) => txid,
            Err(e) => {
                let err = step_error("sendrawtransaction", e);
                if let StepError::Transient(reason) = &err {
                    self.node_unreachable(event, &signed.chain, reason).await;
                }
                return Err(err);
            }
        };
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&event.workflow_id);
        }
        if txid != signed.txid {
            return Err(StepError::Permanent(format!(
                "the node reports txid {txid}, the signed transaction's is {}",
                signed.txid
            )));
        }
        Ok(vec![Proposal {
            aggregate_kind: AggregateKind::Tx,
            workflow_id: event.workflow_id.clone(),
            expected_version: event.version,
            event_type: EventType::TransactionBroadcast,
            causation_id: Some(event.id.clone()),
            actor: Actor::system("broadcast"),
            target: event.target.clone(),
            context: Default::default(),
            result: Outcome::Success,
            metadata: Default::default(),
            payload: Payload::TransactionBroadcast {
                chain: signed.chain.clone(),
                txid,
            },
        }])
    }
}
