//! The EVM side of the chain steps (`chain_steps` dispatches here by the
//! wallet's chain family):
//!
//! - build: the transfer's EIP-1559 transaction with a nonce allocated per
//!   wallet (under the build step's per-wallet lock, from the node's pending
//!   nonce and every nonce the trail records as held), gas from the node within
//!   the chain's cap, fees from the node's fee history with a floor and caps;
//! - [`check`]: what the HD signer (and the coordinator before asking it)
//!   verifies on its own trail replica before it signs;
//! - confirmation: receipts at the required depth on the canonical chain; a
//!   reverted receipt fails the transfer with the reason; a reorg that drops
//!   the transaction leaves it waiting (and it is sent again).

use std::collections::{BTreeMap, BTreeSet};

use custos_adapters::evm::{EvmRpc, RpcError};
use custos_custody::evm::{self as evm_tx, CheckedTransfer, Expectation, GasPolicy, Wei};
use custos_engine::chains::Family;
use custos_engine::transfer::{Stage, Transfer};
use custos_schemas::chain::{Confirmation, UnsignedTransaction};
use custos_schemas::{Decimal, TransferRequest, WalletDescriptor};

use crate::runtime::StepError;
use crate::trail::TrailView;

/// The wallet model whose keys an HD signer holds.
pub const HD_MODEL: &str = "hd";

/// One node client per EVM chain id (`evm-31337`, `evm-1`, ...).
#[derive(Debug, Clone, Default)]
pub struct EvmNodes(BTreeMap<String, EvmRpc>);

impl EvmNodes {
    pub fn new(nodes: impl IntoIterator<Item = (String, EvmRpc)>) -> Self {
        EvmNodes(nodes.into_iter().collect())
    }

    pub fn get(&self, chain: &str) -> Result<&EvmRpc, StepError> {
        self.0
            .get(chain)
            .ok_or_else(|| StepError::Permanent(format!("no node is configured for {chain}")))
    }
}

/// Whether `chain` is an EVM chain Custos knows.
pub fn is_evm(chain: &str) -> bool {
    custos_engine::chains::chain(chain).is_some_and(|c| matches!(c.family, Family::Evm { .. }))
}

fn step_error(context: &str, e: RpcError) -> StepError {
    if e.is_transient() {
        StepError::Transient(format!("{context}: {e}"))
    } else {
        StepError::Permanent(format!("{context}: {e}"))
    }
}

/// What an allowed EVM transfer commits its wallet to.
#[derive(Debug, Clone)]
pub struct EvmTerms {
    pub wallet: WalletDescriptor,
    pub destination: String,
    pub value: Wei,
    pub gas: GasPolicy,
}

impl EvmTerms {
    pub fn expectation(&self) -> Expectation<'_> {
        Expectation {
            chain: &self.wallet.chain,
            wallet: &self.wallet.address,
            destination: &self.destination,
            value: self.value,
            gas: self.gas,
        }
    }
}

/// The terms of `request` as the trail's wallet directory makes them: an HD
/// wallet on an EVM chain, the amount in wei, the chain's gas caps.
pub fn evm_terms(view: &TrailView, request: &TransferRequest) -> Result<EvmTerms, String> {
    let wallet = view
        .ledger
        .wallet(&request.wallet)
        .ok_or_else(|| format!("wallet {} is not in the trail", request.wallet))?
        .clone();
    let chain = custos_engine::chains::chain(&wallet.chain)
        .filter(|c| matches!(c.family, Family::Evm { .. }))
        .ok_or_else(|| format!("wallet {} is not on an EVM chain", wallet.name))?;
    if wallet.model != HD_MODEL {
        return Err(format!(
            "wallet {} is a {} wallet: EVM transfers are signed by HD wallets",
            wallet.name, wallet.model
        ));
    }
    if request.asset != chain.native_asset {
        return Err(format!(
            "asset: {} is not {}'s native asset {}",
            request.asset, chain.id, chain.native_asset
        ));
    }
    let value = Decimal::parse(&request.amount)
        .and_then(|d| d.to_base_units(chain.decimals))
        .map(Wei::from)
        .map_err(|e| format!("amount: {e}"))?;
    let gas = GasPolicy::for_chain(&wallet.chain).map_err(|e| e.to_string())?;
    Ok(EvmTerms {
        wallet,
        destination: request.destination.clone(),
        value,
        gas,
    })
}

/// Whether a transfer's nonce is taken: its transaction is recorded and may
/// still be (or has been) mined. A transfer that failed before it was
/// broadcast frees its nonce for the next build.
fn holds_nonce(t: &Transfer) -> bool {
    matches!(
        t.stage,
        Stage::Built | Stage::Signed | Stage::Broadcast | Stage::Confirmed
    ) || (t.stage == Stage::Failed && t.txid.is_some())
}

/// Nonces held by transfers of `wallet`, with the workflow holding each,
/// except `workflow_id`'s own.
pub fn held_nonces(view: &TrailView, wallet: &str, except: &str) -> BTreeMap<u64, String> {
    view.ledger
        .transfers()
        .filter(|(id, t)| {
            *id != except
                && holds_nonce(t)
                && t.request.as_ref().is_some_and(|r| r.wallet == wallet)
        })
        .filter_map(|(id, t)| match &t.unsigned {
            Some(UnsignedTransaction::Evm { nonce, .. }) => Some((*nonce, id.to_string())),
            _ => None,
        })
        .collect()
}

/// The nonce the next build takes: the lowest at or above the node's pending
/// nonce that no recorded transaction holds (a nonce freed by a failed build is
/// reused, so that no gap stalls the wallet's later transactions).
pub fn allocate_nonce(pending: u64, held: &BTreeSet<u64>) -> u64 {
    (pending..).find(|n| !held.contains(n)).unwrap_or(pending)
}

/// Every check an HD signer makes before it signs `workflow_id`, on its
/// verified replica at `now`: the workflow checks guardians make, an HD
/// wallet on an EVM chain, the recorded transaction rebuilt from the approved
/// request and within the gas caps, and its nonce held by no other transfer.
pub fn check(
    view: &TrailView,
    workflow_id: &str,
    now: i64,
) -> Result<(WalletDescriptor, CheckedTransfer), String> {
    let (request, unsigned) = crate::signing::workflow_allows(view, workflow_id, now)?;
    let terms = evm_terms(view, request)?;
    let expect = terms.expectation();
    let checked = crate::signing::recorded_transaction(
        view,
        workflow_id,
        &request.initiator,
        unsigned,
        now,
        || evm_tx::check(unsigned, &expect),
        |replaced| evm_tx::check_replacement(unsigned, replaced, &expect),
    )?;
    if let Some(other) = held_nonces(view, &terms.wallet.name, workflow_id).get(&checked.tx.nonce) {
        return Err(format!(
            "nonce {} is already used by transfer {other}",
            checked.tx.nonce
        ));
    }
    Ok((terms.wallet, checked))
}

/// One EVM build, as the trail has it.
pub(crate) struct Job {
    terms: EvmTerms,
    held: BTreeSet<u64>,
}

/// The build of `workflow_id` with its version, or `None` when it is not
/// waiting to be built.
pub(crate) fn job(view: &TrailView, workflow_id: &str) -> Option<(u64, Result<Job, String>)> {
    let t = view
        .transfer(workflow_id)
        .filter(|t| t.stage == Stage::ReadyToSign)?;
    let job = || {
        let request = t.request.as_ref().ok_or("the workflow has no request")?;
        let terms = evm_terms(view, request)?;
        let held = held_nonces(view, &terms.wallet.name, workflow_id)
            .into_keys()
            .collect();
        Ok(Job { terms, held })
    };
    Some((t.version, job()))
}

/// How many recent blocks the fee outlook reads.
const FEE_HISTORY_BLOCKS: u64 = 10;

/// Builds the transaction of `job` from what the node says now.
pub(crate) async fn build(nodes: &EvmNodes, job: &Job) -> Result<UnsignedTransaction, StepError> {
    let terms = &job.terms;
    let wallet = &terms.wallet;
    let node = nodes.get(&wallet.chain)?;
    let value = u128::try_from(terms.value)
        .map_err(|_| StepError::Permanent("amount: too large".into()))?;
    let pending = node
        .pending_nonce(&wallet.address)
        .await
        .map_err(|e| step_error("eth_getTransactionCount", e))?;
    let nonce = allocate_nonce(pending, &job.held);
    let gas_limit = node
        .estimate_gas(&wallet.address, &terms.destination, value)
        .await
        .map_err(|e| step_error("the node refuses the transfer (eth_estimateGas)", e))?;
    if gas_limit > terms.gas.max_gas_limit {
        return Err(StepError::Permanent(format!(
            "the transfer needs {gas_limit} gas, above the cap of {}",
            terms.gas.max_gas_limit
        )));
    }
    let (max_fee, tip) = suggested_fees(node, &terms.gas).await?;
    let balance = node
        .balance(&wallet.address)
        .await
        .map_err(|e| step_error("eth_getBalance", e))?;
    let needed = value + u128::from(gas_limit) * max_fee;
    if balance < needed {
        return Err(StepError::Permanent(format!(
            "insufficient funds: wallet {} holds {balance} wei, the transfer needs {needed} wei ({value} wei and gas at up to {max_fee} wei per gas)",
            wallet.name
        )));
    }
    let narrow =
        |v: u128| u64::try_from(v).map_err(|_| StepError::Permanent("fee too large".into()));
    evm_tx::build(
        &evm_tx::TransferRequest {
            chain: &wallet.chain,
            from: &wallet.address,
            to: &terms.destination,
            value: terms.value,
            nonce,
            gas_limit,
            max_fee_per_gas: narrow(max_fee)?,
            max_priority_fee_per_gas: narrow(tip)?,
        },
        &terms.gas,
    )
    .map_err(|e| {
        StepError::Permanent(format!(
            "the built transaction would not pass the signer's check: {e}"
        ))
    })
}

/// The fees a transaction should offer now, within `gas`'s caps: the tip the
/// node suggests (its recent median, else the floor) and a max fee with room
/// for the base fee to double before it is mined. `(max_fee, tip)`, wei per gas.
pub(crate) async fn suggested_fees(
    node: &EvmRpc,
    gas: &GasPolicy,
) -> Result<(u128, u128), StepError> {
    let outlook = node
        .fee_outlook(FEE_HISTORY_BLOCKS)
        .await
        .map_err(|e| step_error("eth_feeHistory", e))?;
    let suggested = match node.max_priority_fee().await {
        Ok(tip) => tip,
        Err(e) if e.is_transient() => return Err(step_error("eth_maxPriorityFeePerGas", e)),
        // Not every node has the call: the recent median tip, else the floor.
        Err(_) => outlook.recent_tip.unwrap_or(0),
    };
    let tip = suggested.clamp(
        u128::from(gas.min_priority_fee),
        u128::from(gas.max_priority_fee),
    );
    let base = outlook.next_base_fee;
    let cap = u128::from(gas.max_fee_per_gas);
    if base + tip > cap {
        return Err(StepError::Permanent(format!(
            "the base fee ({base} wei) and tip ({tip} wei) exceed the cap of {cap} wei per gas"
        )));
    }
    Ok(((2 * base + tip).min(cap), tip))
}

/// Where a broadcast EVM transaction stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not mined, not deep enough, or its block left the canonical chain.
    Pending,
    Confirmed(Confirmation),
    /// Mined, but the execution reverted (its nonce and gas are spent).
    Reverted(String),
}

/// The transaction's status on `node`: confirmed once its receipt's block is
/// canonical and `required` deep. A transaction the node no longer knows (a
/// reorg dropped it, or the node restarted without it) is sent again from
/// `resend`, the recorded signed transaction, when it is the one on the
/// network (not one a fee bump replaced).
pub async fn status(
    node: &EvmRpc,
    chain: &str,
    txid: &str,
    resend: Option<&str>,
    required: u64,
) -> Result<Status, String> {
    let Some(receipt) = node.receipt(txid).await.map_err(|e| e.to_string())? else {
        if let Some(raw_tx) = resend
            && !node
                .has_transaction(txid)
                .await
                .map_err(|e| e.to_string())?
        {
            node.send_raw_transaction(raw_tx, txid)
                .await
                .map_err(|e| format!("sending {txid} again: {e}"))?;
        }
        return Ok(Status::Pending);
    };
    let canonical = node
        .block_hash(receipt.block_number)
        .await
        .map_err(|e| e.to_string())?;
    if canonical.as_deref() != Some(receipt.block_hash.as_str()) {
        return Ok(Status::Pending);
    }
    if !receipt.success {
        return Ok(Status::Reverted(format!(
            "transaction {txid} reverted in block {} ({} gas used)",
            receipt.block_number, receipt.gas_used
        )));
    }
    let head = node.block_number().await.map_err(|e| e.to_string())?;
    let confirmations = (head + 1).saturating_sub(receipt.block_number);
    if confirmations < required {
        return Ok(Status::Pending);
    }
    Ok(Status::Confirmed(Confirmation {
        chain: chain.to_string(),
        txid: txid.to_string(),
        block_hash: receipt.block_hash,
        block_height: receipt.block_number,
        confirmations,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_fill_gaps_above_the_pending_one() {
        let held = BTreeSet::from([3, 4, 6]);
        assert_eq!(allocate_nonce(3, &held), 5);
        assert_eq!(allocate_nonce(0, &held), 0);
        assert_eq!(allocate_nonce(7, &held), 7);
        assert_eq!(allocate_nonce(4, &BTreeSet::new()), 4);
    }
}
