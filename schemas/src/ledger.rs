//! Appends: what a writer proposes and what the ledger answers. Only the ledger
//! writer stamps versions, timestamps and hashes; a proposal carries the version
//! its author saw, so two writers can never both advance the same aggregate.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{Actor, AggregateKind, EventType, Outcome, Payload, RequestContext, Target};

/// One event a writer wants recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proposal {
    pub aggregate_kind: AggregateKind,
    pub workflow_id: String,
    /// The aggregate's version the writer based this on; 0 for a new aggregate.
    pub expected_version: u64,
    pub event_type: EventType,
    #[serde(default)]
    pub causation_id: Option<String>,
    pub actor: Actor,
    pub target: Target,
    #[serde(default)]
    pub context: RequestContext,
    pub result: Outcome,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub payload: Payload,
}

impl Proposal {
    /// The first event of aggregate `id`, succeeded, by `actor`, with nothing
    /// else set: how benchmarks and tests record their fixtures.
    pub fn first(
        aggregate_kind: AggregateKind,
        id: &str,
        event_type: EventType,
        actor: Actor,
        payload: Payload,
    ) -> Self {
        Proposal {
            aggregate_kind,
            workflow_id: id.into(),
            expected_version: 0,
            event_type,
            causation_id: None,
            actor,
            target: Target::default(),
            context: RequestContext::default(),
            result: Outcome::Success,
            metadata: BTreeMap::new(),
            payload,
        }
    }
}

/// Body of a request to [`crate::subjects::LEDGER_APPEND`]: appended all or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendRequest {
    pub proposals: Vec<Proposal>,
}

/// The ledger's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum AppendReply {
    /// Durably stored at these stream sequences.
    #[serde(rename_all = "camelCase")]
    Appended { sequences: Vec<u64> },
    /// The aggregate moved on (or never existed): nothing was written.
    #[serde(rename_all = "camelCase")]
    Conflict {
        workflow_id: String,
        expected_version: u64,
        actual_version: u64,
    },
    /// The workflow's state machine does not allow this event now; nothing was written.
    #[serde(rename_all = "camelCase")]
    Refused { reason: String },
    /// Not recorded (server down, ledger resyncing); safe to retry unchanged.
    #[serde(rename_all = "camelCase")]
    Unavailable { reason: String },
}
