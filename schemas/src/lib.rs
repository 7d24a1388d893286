//! Versioned wire types of Custos: the event envelope and audit taxonomy, upstream
//! requests and their replies, subject names and header keys, and the codecs.
//!
//! This crate does no IO: it only describes bytes. Everything a non-Rust publisher
//! needs is also exported as JSON Schema (see [`json_schemas`]).

pub mod approval;
pub mod chain;
pub mod change;
pub mod codec;
pub mod event;
pub mod ids;
pub mod ledger;
pub mod policy;
pub mod request;
pub mod subjects;

pub use codec::{ContentType, DecodeError};
pub use event::{
    Actor, AggregateKind, Checkpoint, Event, EventType, Outcome, Payload, RequestContext, Target,
    UserRecord, WalletDescriptor, WalletGuardian,
};
pub use ids::{IdError, validate_token};
pub use ledger::{AppendReply, AppendRequest, Proposal};
pub use request::{Decimal, FieldError, IntakeError, IntakeReply, TransferRequest};

/// Version of every envelope this build writes; readers accept this version only
/// and name it in the error otherwise.
pub const SCHEMA_VERSION: u16 = 1;

/// JSON Schemas of every upstream-facing message, by file name. `schemas/json/`
/// holds these, generated; a test fails when the files drift from the types.
pub fn json_schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(T)).unwrap_or(serde_json::Value::Null)
    }
    vec![
        ("transfer-request.json", schema::<TransferRequest>()),
        ("intake-reply.json", schema::<IntakeReply>()),
        ("event.json", schema::<Event>()),
        ("checkpoint.json", schema::<Checkpoint>()),
        ("append-request.json", schema::<AppendRequest>()),
        ("append-reply.json", schema::<AppendReply>()),
        ("policy-decision.json", schema::<policy::PolicyDecision>()),
        ("approval-vote.json", schema::<approval::ApprovalVote>()),
        ("approval-notice.json", schema::<approval::ApprovalNotice>()),
        ("change-request.json", schema::<change::ChangeRequest>()),
        ("change-reply.json", schema::<change::ChangeReply>()),
        (
            "enrolment-request.json",
            schema::<approval::EnrolmentRequest>(),
        ),
        ("enrolment-reply.json", schema::<approval::EnrolmentReply>()),
    ]
}
