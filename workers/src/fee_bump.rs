//! Fee bumps for stuck transactions.
//!
//! A broadcast transfer whose transaction has waited longer than its chain's
//! [`BumpAfter`] without being mined gets a replacement, recorded as
//! `TRANSACTION_BUILT` with [`Payload::TransactionReplacement`]: for the
//! Bitcoin family the same inputs, payment and change script at a higher fee
//! rate (BIP-125, which every build signals); for EVM chains the same nonce
//! with both fees raised by at least 10%. Each stays within the chain's caps,
//! and signers check it against the approval and against the transaction it
//! replaces (`custody::spend::check_replacement`, `custody::evm::check_replacement`).
//! The replacement then goes through signing and broadcast like any build;
//! the confirmation watcher accepts whichever of the transactions is mined
//! ([`awaiting`]).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::Client;
use custos_custody::evm as evm_tx;
use custos_custody::spend;
use custos_engine::change::Stage as ChangeStage;
use custos_engine::policy::{self, ActionKind};
use custos_engine::transfer::{Stage, Transfer};
use custos_schemas::chain::UnsignedTransaction;
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, ContentType, Decimal, EventType, Outcome, Payload, Proposal,
    Target, subjects,
};

use crate::Shutdown;
use crate::chain_steps::{ChainNodes, spend_terms};
use crate::evm_steps::{self, evm_terms, is_evm};
use crate::remote::Appender;
use crate::runtime::StepError;
use crate::signing::wallet_script;
use crate::trail::{Trail, TrailView};

/// A transaction that may confirm a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub chain: String,
    pub txid: String,
    /// The signed transaction, to send again if a node lost it: only for the
    /// one on the network, never for one a replacement took the place of.
    pub resend: Option<String>,
}

/// The transactions that may confirm `t`, the one on the network first, then
/// those a fee bump replaced, newest first (a miner may have taken one before
/// it saw the replacement). Empty unless `t` is broadcast or replacing.
pub fn awaiting(t: &Transfer) -> Vec<Candidate> {
    let live = match t.stage {
        Stage::Broadcast => t.txid.as_ref().zip(t.signed.as_ref()),
        _ if t.replacing() => t.replaced.last().map(|r| (&r.txid, &r.signed)),
        _ => None,
    };
    let Some((txid, signed)) = live else {
        return Vec::new();
    };
    let mut candidates = vec![Candidate {
        chain: signed.chain.clone(),
        txid: txid.clone(),
        resend: Some(signed.raw_tx.clone()),
    }];
    for r in t.replaced.iter().rev().filter(|r| &r.txid != txid) {
        candidates.push(Candidate {
            chain: r.signed.chain.clone(),
            txid: r.txid.clone(),
            resend: None,
        });
    }
    candidates
}

/// How long a broadcast transaction may wait unmined before it is bumped,
/// per chain id.
#[derive(Debug, Clone, Default)]
pub struct BumpAfter(BTreeMap<String, Duration>);

impl BumpAfter {
    /// Waits per chain id that replace the defaults.
    pub fn new(waits: impl IntoIterator<Item = (String, Duration)>) -> Self {
        BumpAfter(waits.into_iter().collect())
    }

    /// As configured, else a few block intervals: 1 hour on Bitcoin, 20
    /// minutes on Litecoin, 5 minutes on EVM chains, 1 minute on local chains
    /// (blocks come on demand).
    pub fn wait(&self, chain: &str) -> Duration {
        if let Some(wait) = self.0.get(chain) {
            return *wait;
        }
        let minutes = if chain.ends_with("-regtest") || chain == "evm-31337" {
            1
        } else if chain.starts_with("btc-") {
            60
        } else if chain.starts_with("ltc-") {
            20
        } else {
            5
        };
        Duration::from_secs(60 * minutes)
    }
}

/// What a bump needs from the trail: the broadcast transaction and the terms
/// the approval set, per chain family.
enum Terms {
    Bitcoin {
        terms: crate::chain_steps::SpendTerms,
        script: Vec<u8>,
    },
    Evm(evm_steps::EvmTerms),
}

/// A broadcast transfer that waited long enough for a bump.
struct Stuck {
    workflow_id: String,
    /// Who asked for the transfer: the bump is asked on their behalf.
    initiator: String,
    chain: String,
    txid: String,
    unsigned: UnsignedTransaction,
    /// How many of its transactions were replaced before: names the alert of
    /// a bump that cannot be made, once per transaction.
    replaced: usize,
    terms: Result<Terms, String>,
}

fn terms(
    view: &TrailView,
    request: &custos_schemas::TransferRequest,
    chain: &str,
) -> Result<Terms, String> {
    if is_evm(chain) {
        evm_terms(view, request).map(Terms::Evm)
    } else {
        spend_terms(view, request).and_then(|terms| {
            let script = wallet_script(&terms.wallet)?;
            Ok(Terms::Bitcoin { terms, script })
        })
    }
}

/// The request id of the fee-bump change for transaction `txid` of `workflow_id`.
fn bump_request_id(workflow_id: &str, txid: &str) -> String {
    format!("fee-bump-{workflow_id}-{}", txid.get(..16).unwrap_or(txid))
}

/// Whether the fee-bump change for transaction `txid` of `workflow_id` was asked.
fn bump_asked(view: &TrailView, workflow_id: &str, txid: &str) -> bool {
    view.change(&format!("change-{}", bump_request_id(workflow_id, txid)))
        .is_some()
}

/// What the change service checks before it records a fee-bump change: the
/// transfer's transaction `replaces` is on the network, `unsigned` is a fee
/// bump of it within the approval, and `initiator` asked for the transfer.
/// The policy request deciding it, whose amount is the fee it adds.
pub fn bump_request(
    view: &TrailView,
    initiator: &str,
    workflow: &str,
    replaces: &str,
    unsigned: &UnsignedTransaction,
) -> Result<policy::Request, (String, String)> {
    let field = |f: &str, r: String| (f.to_string(), r);
    let t = view
        .transfer(workflow)
        .ok_or_else(|| field("change.workflow", format!("no transfer {workflow}")))?;
    let (Some(request), Some(current)) = (&t.request, &t.unsigned) else {
        return Err(field(
            "change.workflow",
            "the transfer has no transaction".into(),
        ));
    };
    if t.stage != Stage::Broadcast || t.txid.as_deref() != Some(replaces) {
        return Err(field(
            "change.replaces",
            format!("{replaces} is not the transaction {workflow} waits on"),
        ));
    }
    if request.initiator != initiator {
        return Err(field(
            "initiator",
            format!("{workflow} was asked for by {}", request.initiator),
        ));
    }
    let chain = current.chain();
    match terms(view, request, chain).map_err(|e| field("change.workflow", e))? {
        Terms::Bitcoin { terms, script } => {
            spend::check_replacement(unsigned, current, &terms.expectation(&script))
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Terms::Evm(terms) => evm_tx::check_replacement(unsigned, current, &terms.expectation())
            .map(drop)
            .map_err(|e| e.to_string()),
    }
    .map_err(|e| {
        field(
            "change.unsigned",
            format!("not a fee bump of {replaces}: {e}"),
        )
    })?;
    let decimals = custos_engine::chains::chain(chain)
        .map(|c| c.decimals)
        .ok_or_else(|| field("change.unsigned", format!("unknown chain {chain}")))?;
    let added = unsigned.max_fee().saturating_sub(current.max_fee());
    Ok(policy::Request {
        action: ActionKind::FeeBump,
        initiator: initiator.to_string(),
        mfa_verified: false,
        wallet: Some(request.wallet.clone()),
        chain: Some(chain.to_string()),
        asset: Some(request.asset.clone()),
        amount: Some(Decimal {
            units: added,
            scale: decimals,
        }),
        destination: Some(request.destination.clone()),
    })
}

/// Fee-bump changes approved and not yet applied: (change id, its version,
/// transfer, version of the transfer, what it replaces, the replacement),
/// the transfer's version `None` when it no longer waits on that transaction.
fn approved_bumps(view: &TrailView) -> Vec<ApprovedBump> {
    view.ledger
        .changes()
        .filter(|(_, c)| c.stage == ChangeStage::Approved)
        .filter_map(|(id, c)| match &c.request.as_ref()?.change {
            Change::FeeBump {
                workflow,
                replaces,
                unsigned,
            } => Some(ApprovedBump {
                change_id: id.to_string(),
                change_version: c.version,
                change: c.request.as_ref()?.change.clone(),
                transfer: view
                    .transfer(workflow)
                    .filter(|t| t.stage == Stage::Broadcast && t.txid.as_ref() == Some(replaces))
                    .map(|t| (t.version, target(workflow, t))),
                workflow: workflow.clone(),
                replaces: replaces.clone(),
                unsigned: unsigned.clone(),
            }),
            _ => None,
        })
        .collect()
}

struct ApprovedBump {
    change_id: String,
    change_version: u64,
    change: Change,
    workflow: String,
    /// The transfer's version and target, while it waits on `replaces`.
    transfer: Option<(u64, Target)>,
    replaces: String,
    unsigned: UnsignedTransaction,
}

fn target(workflow_id: &str, t: &Transfer) -> Target {
    Target {
        kind: "transaction".into(),
        id: workflow_id.to_string(),
        amount: t.request.as_ref().map(|r| r.amount.clone()),
        currency: t.request.as_ref().map(|r| r.asset.clone()),
    }
}

fn stuck(view: &TrailView, after: &BumpAfter, now: i64) -> Vec<Stuck> {
    view.on_network()
        .filter(|(_, t)| t.stage == Stage::Broadcast)
        .filter_map(|(id, t)| {
            let signed = t.signed.as_ref()?;
            let waited = now.saturating_sub(t.waiting_since?);
            let wait = i64::try_from(after.wait(&signed.chain).as_millis()).unwrap_or(i64::MAX);
            if waited < wait {
                return None;
            }
            let request = t.request.as_ref()?;
            let terms = terms(view, request, &signed.chain);
            // One fee-bump change per stuck transaction: once asked, the
            // change's own workflow (approvals, rejection) decides.
            if bump_asked(view, id, t.txid.as_ref()?) {
                return None;
            }
            Some(Stuck {
                workflow_id: id.to_string(),
                initiator: request.initiator.clone(),
                chain: signed.chain.clone(),
                txid: t.txid.clone()?,
                unsigned: t.unsigned.clone()?,
                replaced: t.replaced.len(),
                terms,
            })
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Replaces stuck transactions by fee bumps, each asked as a fee-bump change
/// that the active policy decides (approvals where it says so).
#[derive(Debug, Clone)]
pub struct FeeBumper<A> {
    client: Client,
    trail: Trail,
    nodes: ChainNodes,
    ledger: A,
    after: BumpAfter,
}

/// How many blocks ahead a bump's fee estimate aims to confirm within.
const BUMP_TARGET_BLOCKS: u32 = 1;

impl<A: Appender> FeeBumper<A> {
    /// Asks for changes on `client` (the change service on
    /// [`subjects::REQ_CHANGE`] decides them).
    pub fn new(
        client: Client,
        trail: Trail,
        nodes: ChainNodes,
        ledger: A,
        after: BumpAfter,
    ) -> Self {
        FeeBumper {
            client,
            trail,
            nodes,
            ledger,
            after,
        }
    }

    /// Looks for stuck transactions every `poll_every` until `shutdown`.
    pub async fn run(self, poll_every: Duration, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(poll_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            self.poll(now_ms()).await;
        }
    }

    /// One pass at `now` (ms since the epoch): asks for a fee bump of each
    /// stuck transaction, then records the replacement of each approved one.
    /// Returns the workflows whose replacement it recorded.
    pub async fn poll(&self, now: i64) -> Vec<String> {
        let stuck = match self.trail.read(|view| stuck(view, &self.after, now)).await {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(%reason, "fee bumps: the trail cannot be read");
                return Vec::new();
            }
        };
        for s in stuck {
            match self.replacement(&s).await {
                Ok(Some(replacement)) => self.ask(&s, replacement).await,
                // Mined (the watcher records it) or not decidable now.
                Ok(None) | Err(StepError::Transient(_)) => {}
                Err(StepError::Permanent(reason)) => self.cannot_bump(&s, &reason).await,
            }
        }
        let approved = match self.trail.read(approved_bumps).await {
            Ok(a) => a,
            Err(reason) => {
                tracing::warn!(%reason, "fee bumps: the trail cannot be read");
                return Vec::new();
            }
        };
        let mut bumped = Vec::new();
        for bump in approved {
            if self.apply(&bump).await {
                bumped.push(bump.workflow);
            }
        }
        bumped
    }

    /// Asks the change service for the bump of `s` by `replacement`.
    async fn ask(&self, s: &Stuck, replacement: UnsignedTransaction) {
        let request = ChangeRequest {
            request_id: bump_request_id(&s.workflow_id, &s.txid),
            initiator: s.initiator.clone(),
            change: Change::FeeBump {
                workflow: s.workflow_id.clone(),
                replaces: s.txid.clone(),
                unsigned: replacement,
            },
        };
        let reply = self
            .client
            .request(
                subjects::REQ_CHANGE,
                ContentType::MsgPack.encode(&request).into(),
            )
            .await
            .map_err(|e| e.to_string())
            .and_then(|m| {
                ContentType::MsgPack
                    .decode::<ChangeReply>(&m.payload)
                    .map_err(|e| e.to_string())
            });
        match reply {
            Ok(ChangeReply::Accepted { .. }) => {}
            Ok(ChangeReply::Refused { reason, .. }) => {
                self.cannot_bump(s, &format!("the change service refused it: {reason}"))
                    .await
            }
            // Asked again at the next pass.
            Err(e) => tracing::warn!(workflow = %s.workflow_id, error = %e, "fee bump not asked"),
        }
    }

    /// Records an approved bump: the replacement on its transfer and the
    /// change applied, in one append; or, when the transfer no longer waits on
    /// the replaced transaction, ends the change with an alert. Whether the
    /// replacement was recorded.
    async fn apply(&self, bump: &ApprovedBump) -> bool {
        let actor = Actor::system("fee-bump");
        let proposals = match &bump.transfer {
            Some((version, target)) => vec![
                Proposal {
                    aggregate_kind: AggregateKind::Tx,
                    workflow_id: bump.workflow.clone(),
                    expected_version: *version,
                    event_type: EventType::TransactionBuilt,
                    // Signers find the approved change that allows it by this.
                    causation_id: Some(bump.change_id.clone()),
                    actor: actor.clone(),
                    target: target.clone(),
                    context: Default::default(),
                    result: Outcome::Success,
                    metadata: Default::default(),
                    payload: Payload::TransactionReplacement {
                        replaces: bump.replaces.clone(),
                        unsigned: bump.unsigned.clone(),
                    },
                },
                crate::change::applied(
                    &bump.change_id,
                    bump.change_version,
                    actor,
                    bump.change.clone(),
                ),
            ],
            None => vec![Proposal {
                aggregate_kind: AggregateKind::Change,
                workflow_id: bump.change_id.clone(),
                expected_version: bump.change_version,
                event_type: EventType::AlertRaised,
                causation_id: None,
                actor,
                target: crate::change::target(&bump.change_id),
                context: Default::default(),
                result: Outcome::Failure,
                metadata: Default::default(),
                payload: Payload::Alert {
                    severity: "warning".into(),
                    summary: format!(
                        "transfer {} no longer waits on {}: the approved fee bump is not needed",
                        bump.workflow, bump.replaces
                    ),
                },
            }],
        };
        let recorded = bump.transfer.is_some();
        match self.ledger.append(proposals).await {
            AppendReply::Appended { .. } => recorded,
            // Confirmed, bumped or applied meanwhile.
            AppendReply::Conflict { .. } => false,
            other => {
                tracing::warn!(workflow = %bump.workflow, reply = ?other, "fee bump not recorded");
                false
            }
        }
    }

    /// The replacement of a stuck transaction, or `None` if it is mined after
    /// all.
    async fn replacement(&self, s: &Stuck) -> Result<Option<UnsignedTransaction>, StepError> {
        let terms = s
            .terms
            .as_ref()
            .map_err(|e| StepError::Permanent(e.clone()))?;
        let permanent = |e: String| StepError::Permanent(e);
        match terms {
            Terms::Bitcoin { terms, script } => {
                let node = self.nodes.get(&s.chain)?;
                let known = node
                    .get_raw_transaction(&s.txid)
                    .await
                    .map_err(|e| StepError::Transient(format!("getrawtransaction: {e}")))?;
                // Unknown to the node: the watcher reports it; nothing to replace.
                if known.is_none_or(|tx| tx.confirmations > 0) {
                    return Ok(None);
                }
                let rate = node
                    .estimate_smart_fee(BUMP_TARGET_BLOCKS)
                    .await
                    .map_err(|e| StepError::Transient(format!("estimatesmartfee: {e}")))?;
                spend::build_replacement(&s.unsigned, rate.unwrap_or(0), &terms.expectation(script))
                    .map(Some)
                    .map_err(|e| permanent(e.to_string()))
            }
            Terms::Evm(terms) => {
                let node = self.nodes.evm().get(&s.chain)?;
                let receipt = node
                    .receipt(&s.txid)
                    .await
                    .map_err(|e| StepError::Transient(format!("eth_getTransactionReceipt: {e}")))?;
                if receipt.is_some() {
                    return Ok(None);
                }
                let (max_fee, tip) = evm_steps::suggested_fees(node, &terms.gas).await?;
                evm_tx::build_replacement(&s.unsigned, max_fee, tip, &terms.expectation())
                    .map(Some)
                    .map_err(|e| permanent(e.to_string()))
            }
        }
    }

    /// Raises an alert (once per stuck transaction) that no bump can be made:
    /// the transaction stays as it is, for an operator to look at.
    async fn cannot_bump(&self, s: &Stuck, reason: &str) {
        tracing::warn!(workflow = %s.workflow_id, txid = %s.txid, %reason, "no fee bump");
        let alert = crate::runtime::transfer_alert(
            "fee-bump",
            format!("fee-bump-{}-{}", s.workflow_id, s.replaced),
            &s.workflow_id,
            None,
            format!(
                "transaction {} of {} is stuck and cannot be bumped: {reason}",
                s.txid, s.workflow_id
            ),
        );
        match self.ledger.append(vec![alert]).await {
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => {}
            other => {
                tracing::warn!(workflow = %s.workflow_id, reply = ?other, "alert not recorded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_per_chain() {
        let default = BumpAfter::default();
        assert_eq!(default.wait("ltc-regtest"), Duration::from_secs(60));
        assert_eq!(default.wait("evm-31337"), Duration::from_secs(60));
        assert_eq!(default.wait("btc-mainnet"), Duration::from_secs(3600));
        assert_eq!(default.wait("ltc-mainnet"), Duration::from_secs(1200));
        assert_eq!(default.wait("evm-1"), Duration::from_secs(300));
        let set = BumpAfter::new([("btc-mainnet".to_string(), Duration::from_secs(7))]);
        assert_eq!(set.wait("btc-mainnet"), Duration::from_secs(7));
        assert_eq!(set.wait("ltc-regtest"), Duration::from_secs(60));
    }
}
