//! Admission of upstream transfer requests: decode errors, field checks, wallet,
//! asset, amount precision and address checks, and idempotency by request id.
//! Pure: the caller passes the ledger state and the request context.

use custos_schemas::{
    Actor, AggregateKind, DecodeError, EventType, IntakeError, Outcome, Payload, Proposal,
    RequestContext, Target, TransferRequest, codec, validate_token,
};
use sha2::{Digest, Sha256};

use crate::chains;
use crate::ledger::Ledger;

/// What intake does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start a workflow with this `TRANSACTION_CREATED` proposal.
    Create {
        workflow_id: String,
        proposal: Proposal,
    },
    /// The same request already created this workflow.
    Duplicate { workflow_id: String },
    /// Refuse it, and record why with this `REQUEST_REJECTED` proposal.
    Reject {
        error: IntakeError,
        proposal: Proposal,
    },
}

/// The transfer workflow's id for an upstream request: derived, so that the same
/// request id from the same initiator always names the same workflow, also after
/// a restart.
pub fn workflow_id(request: &TransferRequest) -> String {
    let mut h = Sha256::new();
    h.update(b"custos-workflow-v1\0");
    h.update(request.initiator.as_bytes());
    h.update([0]);
    h.update(request.request_id.as_bytes());
    format!("tx-{}", &hex::encode(h.finalize())[..24])
}

/// Hex SHA-256 of the request's canonical encoding.
pub fn request_hash(request: &TransferRequest) -> String {
    hex::encode(Sha256::digest(codec::to_msgpack(request)))
}

/// Decides on one request. `decoded` is the result of decoding the bytes.
pub fn admit(
    ledger: &Ledger,
    decoded: Result<TransferRequest, DecodeError>,
    context: RequestContext,
) -> Admission {
    let request = match decoded {
        Ok(r) => r,
        Err(e) => return reject(ledger, None, e.field, e.reason, context),
    };
    let decimal = match request.validate_shape() {
        Ok(d) => d,
        Err(e) => return reject(ledger, Some(&request), Some(e.field), e.reason, context),
    };
    let workflow_id = workflow_id(&request);
    let hash = request_hash(&request);
    if let Some(existing) = ledger.aggregate(AggregateKind::Tx, &workflow_id) {
        let same = existing
            .transfer
            .as_ref()
            .and_then(|t| t.request_hash.as_deref())
            == Some(hash.as_str());
        if same {
            return Admission::Duplicate { workflow_id };
        }
        let reason = "already used for a different request by this initiator".to_string();
        return reject(
            ledger,
            Some(&request),
            Some("requestId".into()),
            reason,
            context,
        );
    }
    let field_error = |field: &str, reason: String| Some((field.to_string(), reason));
    let problem = match ledger.wallet(&request.wallet) {
        None => field_error("wallet", format!("unknown wallet {:?}", request.wallet)),
        Some(wallet) => match chains::chain(&wallet.chain) {
            None => field_error(
                "wallet",
                format!(
                    "wallet is on chain {:?}, which this build does not support",
                    wallet.chain
                ),
            ),
            Some(chain) if chain.native_asset != request.asset => field_error(
                "asset",
                format!(
                    "wallet {} on {} holds {}, not {}",
                    wallet.name, chain.id, chain.native_asset, request.asset
                ),
            ),
            Some(chain) if decimal.significant_decimals() > chain.decimals => field_error(
                "amount",
                format!(
                    "{} has {} decimal places, {} has at most {}",
                    request.amount,
                    decimal.significant_decimals(),
                    chain.native_asset,
                    chain.decimals
                ),
            ),
            Some(chain) => match chain.validate_address(&request.destination) {
                Err(reason) => field_error("destination", reason),
                Ok(()) if chain.same_address(&request.destination, &wallet.address) => {
                    field_error("destination", "is the wallet's own address".into())
                }
                Ok(()) => None,
            },
        },
    };
    if let Some((field, reason)) = problem {
        return reject(ledger, Some(&request), Some(field), reason, context);
    }
    let proposal = Proposal {
        aggregate_kind: AggregateKind::Tx,
        workflow_id: workflow_id.clone(),
        expected_version: 0,
        event_type: EventType::TransactionCreated,
        causation_id: Some(request.request_id.clone()),
        actor: Actor {
            user_id: request.initiator.clone(),
            email: None,
            role: Some("initiator".into()),
        },
        target: Target {
            kind: "transaction".into(),
            id: workflow_id.clone(),
            amount: Some(request.amount.clone()),
            currency: Some(request.asset.clone()),
        },
        context,
        result: Outcome::Pending,
        metadata: Default::default(),
        payload: Payload::TransferRequested {
            request,
            request_hash: hash,
        },
    };
    Admission::Create {
        workflow_id,
        proposal,
    }
}

fn reject(
    ledger: &Ledger,
    request: Option<&TransferRequest>,
    field: Option<String>,
    reason: String,
    context: RequestContext,
) -> Admission {
    // Rejections are filed under the request id when it is usable as one.
    let request_id = request
        .map(|r| r.request_id.clone())
        .filter(|id| validate_token("requestId", id).is_ok());
    let aggregate_id = request_id.clone().unwrap_or_else(|| "malformed".into());
    let actor = match request.filter(|r| validate_token("initiator", &r.initiator).is_ok()) {
        Some(r) => Actor {
            user_id: r.initiator.clone(),
            email: None,
            role: Some("initiator".into()),
        },
        None => Actor {
            user_id: "unknown".into(),
            email: None,
            role: None,
        },
    };
    let proposal = Proposal {
        aggregate_kind: AggregateKind::Intake,
        workflow_id: aggregate_id.clone(),
        expected_version: ledger.version(AggregateKind::Intake, &aggregate_id),
        event_type: EventType::RequestRejected,
        causation_id: request_id.clone(),
        actor,
        target: Target {
            kind: "request".into(),
            id: aggregate_id,
            amount: request.map(|r| r.amount.clone()).filter(|a| a.len() <= 64),
            currency: request.map(|r| r.asset.clone()).filter(|a| a.len() <= 16),
        },
        context,
        result: Outcome::Denied,
        metadata: Default::default(),
        payload: Payload::RequestRejected {
            request_id,
            field: field.clone(),
            reason: reason.clone(),
        },
    };
    Admission::Reject {
        error: IntakeError { field, reason },
        proposal,
    }
}
