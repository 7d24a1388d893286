//! The change service: takes administrative change requests on
//! [`subjects::REQ_CHANGE`], checks them against the verified trail (wallets,
//! freezes, the directory), decides them under the active policy (the
//! meta-policy) and records them. A freeze is recorded as applied at once;
//! anything else waits for the ballot box, where the approval completing the
//! quorum applies it; a key ceremony, once approved, is applied by the
//! ceremony step ([`crate::wallets::CeremonyStep`]) when it succeeded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use custos_adapters::jetstream::StepConsumer;
use custos_engine::change::{self as machine, request_hash};
use custos_engine::policy::{
    self, Duty, Inputs, Policy, PriceSnapshot, Request, VelocityState, render_errors,
};
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::policy::PolicyOutcome;
use custos_schemas::{
    Actor, AggregateKind, AppendReply, ContentType, EventType, Outcome, Payload, Proposal,
    RequestContext, Target, subjects,
};
use futures::StreamExt;

use crate::Shutdown;
use crate::policy_step::Prices;
use crate::remote::Appender;
use crate::trail::{Trail, TrailView};

/// The consumer of the approval step for change workflows: asks approvers when
/// a change's decision needs them, tells them how it ended.
pub fn approvals_consumer() -> StepConsumer {
    StepConsumer {
        name: "change-approvals",
        filters: [
            EventType::PolicyEvaluated,
            EventType::TransactionApproved,
            EventType::TransactionRejected,
        ]
        .iter()
        .map(|e| subjects::event_type_filter(AggregateKind::Change, e.as_str()))
        .collect(),
        max_deliver: 5,
        ack_wait: Duration::from_secs(30),
    }
}

/// The event applying `change` as version `expected_version + 1` of its workflow.
pub fn applied(workflow_id: &str, expected_version: u64, actor: Actor, change: Change) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Change,
        workflow_id: workflow_id.to_string(),
        expected_version,
        event_type: machine::effect(&change),
        causation_id: None,
        actor,
        target: target(workflow_id),
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::ChangeApplied(change),
    }
}

pub(crate) fn target(workflow_id: &str) -> Target {
    Target {
        kind: "change".into(),
        id: workflow_id.to_string(),
        amount: None,
        currency: None,
    }
}

/// The policy that decides now: the one the trail last activated. The
/// configured policy serves until the trail names one; a version applied
/// through a change is loaded from its recorded document. A version known by
/// neither decides nothing (fail closed).
#[derive(Debug)]
pub struct ActivePolicy {
    configured: Arc<Policy>,
    applied: Mutex<Option<Arc<Policy>>>,
}

impl ActivePolicy {
    pub fn new(configured: Policy) -> Self {
        ActivePolicy {
            configured: Arc::new(configured),
            applied: Mutex::new(None),
        }
    }

    pub fn get(&self, view: &TrailView) -> Result<Arc<Policy>, String> {
        let Some((version, _)) = &view.active_policy else {
            return Ok(self.configured.clone());
        };
        if self.configured.version() == version {
            return Ok(self.configured.clone());
        }
        let mut applied = self
            .applied
            .lock()
            .map_err(|_| "policy cache poisoned".to_string())?;
        if let Some(p) = applied.as_ref().filter(|p| p.version() == version) {
            return Ok(p.clone());
        }
        let document = match &view.admin.applied_policy {
            Some((v, document)) if v == version => document,
            _ => {
                return Err(format!(
                    "the active policy {version} is neither configured nor recorded in the trail"
                ));
            }
        };
        let parsed = Policy::parse(document)
            .map_err(|e| format!("the active policy does not parse: {}", render_errors(&e)))?;
        if parsed.version() != version {
            return Err(format!(
                "the recorded policy document is not version {version}"
            ));
        }
        let parsed = Arc::new(parsed);
        *applied = Some(parsed.clone());
        Ok(parsed)
    }
}

/// A refusal, naming the field when one is at fault.
type Refusal = (Option<String>, String);

fn refused(field: &str, reason: impl Into<String>) -> Refusal {
    (Some(field.to_string()), reason.into())
}

/// What to record for `request` on the trail as `view` has it at `now`: the
/// workflow id and its first events. `Ok((id, []))` when that request is
/// already recorded (a retry).
pub fn prepare(
    view: &TrailView,
    active: &ActivePolicy,
    prices: &PriceSnapshot,
    request: &ChangeRequest,
    now: i64,
) -> Result<(String, Vec<Proposal>), Refusal> {
    request
        .validate_shape()
        .map_err(|e| (Some(e.field), e.reason))?;
    let workflow_id = format!("change-{}", request.request_id);
    let hash = request_hash(request);
    if let Some(existing) = view.change(&workflow_id) {
        return match existing.request_hash.as_deref() == Some(hash.as_str()) {
            true => Ok((workflow_id, Vec::new())),
            false => Err(refused(
                "requestId",
                "already used for another change request",
            )),
        };
    }
    let admin = &view.admin;
    match &request.change {
        Change::PolicyApply {
            name,
            version,
            document,
        } => {
            let parsed = Policy::parse(document)
                .map_err(|e| refused("change.document", render_errors(&e)))?;
            if parsed.version() != version {
                return Err(refused(
                    "change.version",
                    format!("the document's version is {}", parsed.version()),
                ));
            }
            if parsed.name != *name {
                return Err(refused(
                    "change.name",
                    format!("the document is named {}", parsed.name),
                ));
            }
        }
        Change::WhitelistAdd { wallet, address } | Change::WhitelistRemove { wallet, address } => {
            let w = view
                .ledger
                .wallet(wallet)
                .ok_or_else(|| refused("change.wallet", format!("no wallet {wallet}")))?;
            let chain = custos_engine::chains::chain(&w.chain)
                .ok_or_else(|| refused("change.wallet", format!("unknown chain {}", w.chain)))?;
            chain
                .validate_address(address)
                .map_err(|e| refused("change.address", e))?;
        }
        Change::Freeze { .. } => {
            if !view.directory.may(&request.initiator, Duty::Administer) {
                return Err(refused(
                    "initiator",
                    format!("{} is not an active administrator", request.initiator),
                ));
            }
        }
        Change::Unfreeze { wallet } => {
            let frozen = match wallet {
                Some(w) => admin.freeze.wallets.contains_key(w),
                None => admin.freeze.everything.is_some(),
            };
            if !frozen {
                return Err(refused("change.wallet", "nothing of that scope is frozen"));
            }
        }
        // Unknown users and roles, taken ids, separation of duties: checked on
        // a copy of the directory, exactly as every replica will apply it.
        change @ (Change::UserAdd(_)
        | Change::UserDeactivate { .. }
        | Change::RoleCreate { .. }
        | Change::RoleAssign { .. }
        | Change::RoleRevoke { .. }) => {
            machine::directory_after(&view.directory, change)
                .map_err(|e| refused(&format!("change.{}", e.field), e.reason))?;
        }
        // Names, guardians and thresholds against the wallet as recorded; the
        // coordinator checks again when the ceremony starts.
        change @ (Change::WalletCreate { .. }
        | Change::KeyRotation { .. }
        | Change::GuardianAdd { .. }
        | Change::GuardianRemove { .. }
        | Change::ThresholdChange { .. }
        | Change::ShareRepair { .. }) => {
            let wallet = change.wallet().and_then(|w| view.ledger.wallet(w));
            crate::wallets::check_ceremony(wallet, change)
                .map_err(|e| (Some(e.field), e.reason))?;
        }
        // Checked as signers will check the replacement; decided below.
        Change::FeeBump {
            workflow,
            replaces,
            unsigned,
        } => {
            crate::fee_bump::bump_request(view, &request.initiator, workflow, replaces, unsigned)
                .map_err(|(field, reason)| (Some(field), reason))?;
        }
    }
    let mut proposals = vec![Proposal {
        aggregate_kind: AggregateKind::Change,
        workflow_id: workflow_id.clone(),
        expected_version: 0,
        event_type: EventType::ChangeRequested,
        causation_id: None,
        actor: Actor {
            user_id: request.initiator.clone(),
            email: view
                .directory
                .user(&request.initiator)
                .map(|u| u.email.clone()),
            role: Some("administrator".into()),
        },
        target: target(&workflow_id),
        context: RequestContext::default(),
        result: Outcome::Pending,
        metadata: Default::default(),
        payload: Payload::ChangeRequested {
            request: request.clone(),
            request_hash: hash,
        },
    }];
    let allowed = match &request.change {
        // An emergency: in effect at once, audited as the administrator's act.
        Change::Freeze { .. } => true,
        change => {
            let policy = active.get(view).map_err(|e| (None, e))?;
            let decision_request = match change {
                Change::FeeBump {
                    workflow,
                    replaces,
                    unsigned,
                } => crate::fee_bump::bump_request(
                    view,
                    &request.initiator,
                    workflow,
                    replaces,
                    unsigned,
                )
                .map_err(|(field, reason)| (Some(field), reason))?,
                _ => Request {
                    wallet: change.wallet().map(str::to_string),
                    ..Request::action(machine::action(change), &request.initiator, false)
                },
            };
            let decision = policy::evaluate(
                &policy,
                &decision_request,
                &Inputs {
                    directory: &view.directory,
                    prices,
                    velocity: &VelocityState::new(policy.currency),
                    address_book: &admin.address_book,
                    freeze: &admin.freeze,
                    now,
                },
            );
            let (result, allowed) = match decision.outcome {
                PolicyOutcome::Allow => (Outcome::Success, true),
                PolicyOutcome::RequireApprovals => (Outcome::Pending, false),
                PolicyOutcome::Block => (Outcome::Denied, false),
            };
            proposals.push(Proposal {
                aggregate_kind: AggregateKind::Change,
                workflow_id: workflow_id.clone(),
                expected_version: 1,
                event_type: EventType::PolicyEvaluated,
                causation_id: None,
                actor: Actor::system("policy"),
                target: target(&workflow_id),
                context: RequestContext::default(),
                result,
                metadata: Default::default(),
                payload: Payload::PolicyEvaluated(decision),
            });
            allowed
        }
    };
    // An allowed key ceremony or fee bump is applied by its step once it ran.
    if allowed && !request.change.applied_by_a_step() {
        let actor = match request.change {
            Change::Freeze { .. } => proposals[0].actor.clone(),
            _ => Actor::system("change"),
        };
        let version = proposals.len() as u64;
        proposals.push(applied(
            &workflow_id,
            version,
            actor,
            request.change.clone(),
        ));
    }
    Ok((workflow_id, proposals))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Records one request and answers it.
pub async fn submit<A: Appender>(
    trail: &Trail,
    ledger: &A,
    active: &ActivePolicy,
    prices: &Prices,
    request: &ChangeRequest,
) -> ChangeReply {
    let refuse = |(field, reason): Refusal| ChangeReply::Refused { field, reason };
    let now = now_ms();
    let prices = match prices.snapshot(now) {
        Ok(p) => p,
        Err(e) => return refuse((None, e)),
    };
    let prepared = match trail
        .read(|view| prepare(view, active, &prices, request, now))
        .await
    {
        Ok(Ok(p)) => p,
        Ok(Err(r)) => return refuse(r),
        Err(e) => return refuse((None, e)),
    };
    let (workflow_id, proposals) = prepared;
    if proposals.is_empty() {
        return ChangeReply::Accepted { workflow_id };
    }
    match ledger.append(proposals).await {
        AppendReply::Appended { .. } => ChangeReply::Accepted { workflow_id },
        AppendReply::Conflict { .. } => refuse((
            Some("requestId".into()),
            "a request with this id is being recorded; retry to see it".into(),
        )),
        AppendReply::Refused { reason } | AppendReply::Unavailable { reason } => {
            refuse((None, reason))
        }
    }
}

/// Serves [`subjects::REQ_CHANGE`] (JSON or MessagePack, answered in kind)
/// until `shutdown`. `configured` decides until the trail activates another
/// policy; `prices` value what a change moves (a fee bump's added fee).
pub async fn serve<A: Appender>(
    client: Client,
    trail: Trail,
    ledger: A,
    configured: Policy,
    prices: Prices,
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let mut requests = client
        .queue_subscribe(subjects::REQ_CHANGE, subjects::CHANGE_QUEUE.into())
        .await?;
    let active = Arc::new(ActivePolicy::new(configured));
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            msg = requests.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let header = crate::header(msg.headers.as_ref(), subjects::headers::CONTENT_TYPE);
        let decoded = ContentType::from_header(header.as_deref());
        let content_type = decoded.clone().unwrap_or(ContentType::Json);
        let (client, trail, ledger, active, prices) = (
            client.clone(),
            trail.clone(),
            ledger.clone(),
            active.clone(),
            prices.clone(),
        );
        tokio::spawn(async move {
            let reply = match decoded.and_then(|ct| ct.decode::<ChangeRequest>(&msg.payload)) {
                Ok(request) => submit(&trail, &ledger, &active, &prices, &request).await,
                Err(e) => ChangeReply::Refused {
                    field: e.field.clone(),
                    reason: e.to_string(),
                },
            };
            if let Err(e) = client
                .publish(reply_to, content_type.encode(&reply).into())
                .await
            {
                tracing::warn!(error = %e, "could not answer a change request");
            }
        });
    }
    Ok(())
}
