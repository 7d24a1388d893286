//! Subject names, stream names and header keys: the one place they are spelled.

use crate::event::AggregateKind;

/// The event stream: system of record and audit trail.
pub const EVENTS_STREAM: &str = "CUSTOS_EVENTS";
/// Prefix of every event subject: `custos.evt.<aggregate kind>.<aggregate id>.<EVENT_TYPE>`.
pub const EVENTS_PREFIX: &str = "custos.evt";
/// Wildcard covering every event subject.
pub const EVENTS_ALL: &str = "custos.evt.>";
/// Dead letters, one subject per step: `custos.dlq.<step>`.
pub const DLQ_STREAM: &str = "CUSTOS_DLQ";
pub const DLQ_PREFIX: &str = "custos.dlq";
/// Upstream transfer requests (request/reply). The only subject upstream may publish to.
pub const REQ_TRANSFER: &str = "custos.req.transfer";
/// Queue group shared by intake instances.
pub const INTAKE_QUEUE: &str = "custos-intake";
/// Appends from processes outside the ledger writer (request/reply).
pub const LEDGER_APPEND: &str = "custos.ledger.append";
pub const LEDGER_QUEUE: &str = "custos-ledger";

/// Balance questions from operators (request/reply, JSON `{"wallet": NAME}`),
/// answered from the wallet's chain node.
pub const REQ_WALLET_BALANCE: &str = "custos.req.wallet.balance";
/// Administrative change requests (policy apply, whitelist, freeze, unfreeze,
/// users and roles, key ceremonies), request/reply.
pub const REQ_CHANGE: &str = "custos.req.change";
/// Requests for a user's one-time MFA enrolment link (request/reply, JSON
/// `EnrolmentRequest`), served by the approval service.
pub const REQ_MFA_ENROL: &str = "custos.req.mfa.enrol";
/// Queue group of the enrolment service.
pub const ENROL_QUEUE: &str = "custos-mfa-enrol";
/// Queue group of the change service.
pub const CHANGE_QUEUE: &str = "custos-change";
/// Key-value bucket holding the ledger writer's lease.
pub const LEDGER_LEASE_BUCKET: &str = "CUSTOS_LEDGER";
/// Key-value bucket where guardians announce their public keys and liveness.
pub const GUARDIANS_BUCKET: &str = "CUSTOS_GUARDIANS";
/// Key-value bucket of one-time approval links, keyed by the SHA-256 of the token.
pub const APPROVAL_LINKS_BUCKET: &str = "CUSTOS_APPROVAL_LINKS";
/// Key-value bucket of approvers' second factors: sealed TOTP secrets, replay and
/// lockout state.
pub const MFA_BUCKET: &str = "CUSTOS_MFA";

/// Ceremony requests to one guardian: `custos.guardian.<id>.<op>`. Only that
/// guardian may subscribe.
pub fn guardian_subject(guardian_id: &str, op: &str) -> String {
    format!("custos.guardian.{guardian_id}.{op}")
}

/// Subject of one event.
pub fn event_subject(kind: AggregateKind, aggregate_id: &str, event_type: &str) -> String {
    format!(
        "{EVENTS_PREFIX}.{}.{aggregate_id}.{event_type}",
        kind.as_str()
    )
}

/// Filter matching every event of one aggregate.
pub fn aggregate_filter(kind: AggregateKind, aggregate_id: &str) -> String {
    format!("{EVENTS_PREFIX}.{}.{aggregate_id}.*", kind.as_str())
}

/// Filter matching one event type across all aggregates of a kind.
pub fn event_type_filter(kind: AggregateKind, event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.{}.*.{event_type}", kind.as_str())
}

/// Dead-letter subject of a step.
pub fn dlq_subject(step: &str) -> String {
    format!("{DLQ_PREFIX}.{step}")
}

/// Header keys Custos writes or reads.
pub mod headers {
    /// `application/msgpack` (default) or `application/json`.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Hash of the previous event in the chain (hex).
    pub const PREV_HASH: &str = "Custos-Prev-Hash";
    /// Hash of this event (hex).
    pub const HASH: &str = "Custos-Hash";
    /// Reason a message was dead-lettered.
    pub const DLQ_REASON: &str = "Custos-Dlq-Reason";
    /// Stream sequence of the dead-lettered message.
    pub const DLQ_STREAM_SEQ: &str = "Custos-Dlq-Stream-Seq";
    /// Subject of the dead-lettered message.
    pub const DLQ_SUBJECT: &str = "Custos-Dlq-Subject";
}
