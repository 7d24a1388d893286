//! The event envelope: every fact Custos records, in the product's published audit
//! shape (`id`, `timestamp`, `eventType`, `actor`, `target`, `context`, `result`,
//! `metadata`; `hash` is the chain's and travels beside the event).

use std::collections::BTreeMap;
use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::request::TransferRequest;

/// One recorded fact. Its canonical encoding (MessagePack, fields in declaration
/// order, maps sorted, no floats) is what the audit chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    pub schema_version: u16,
    /// Message id: `<aggregate kind>.<aggregate id>.<version>`, unique and
    /// deterministic, so a retried append is deduplicated by the server.
    pub id: String,
    /// Occurred-at, milliseconds since the Unix epoch, UTC.
    pub timestamp: i64,
    pub event_type: EventType,
    pub aggregate_kind: AggregateKind,
    /// The workflow (or wallet, user, policy) this event belongs to.
    pub workflow_id: String,
    /// Position of this event in its aggregate's history, from 1.
    pub version: u64,
    /// Id of the event or request that caused this one.
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

impl Event {
    /// The deterministic message id of the event at `version` of an aggregate.
    pub fn message_id(kind: AggregateKind, workflow_id: &str, version: u64) -> String {
        format!("{}.{workflow_id}.{version}", kind.as_str())
    }
}

/// Kind of the aggregate an event belongs to; the second token of its subject.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AggregateKind {
    /// A transaction workflow.
    Tx,
    Wallet,
    User,
    Policy,
    /// Requests refused at intake, keyed by request id.
    Intake,
    /// The audit chain itself: checkpoints.
    Audit,
    /// Operational facts: failures, dead letters, alerts.
    System,
    /// Sign-ins and sessions.
    Auth,
    /// An administrative change request workflow (policy, whitelist, freeze).
    Change,
}

impl AggregateKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Tx => "tx",
            AggregateKind::Wallet => "wallet",
            AggregateKind::User => "user",
            AggregateKind::Policy => "policy",
            AggregateKind::Intake => "intake",
            AggregateKind::Audit => "audit",
            AggregateKind::System => "system",
            AggregateKind::Auth => "auth",
            AggregateKind::Change => "change",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub const ALL: [AggregateKind; 9] = [
        AggregateKind::Tx,
        AggregateKind::Wallet,
        AggregateKind::User,
        AggregateKind::Policy,
        AggregateKind::Intake,
        AggregateKind::Audit,
        AggregateKind::System,
        AggregateKind::Auth,
        AggregateKind::Change,
    ];
}

macro_rules! event_types {
    ($($(#[$m:meta])* $variant:ident = $name:literal,)*) => {
        /// The whole audit taxonomy. Names are the wire names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
        pub enum EventType {
            $($(#[$m])* #[serde(rename = $name)] $variant,)*
        }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// The wire name, also the last token of the event's subject.
            pub const fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name,)* }
            }

            pub fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(EventType::$variant),)* _ => None }
            }
        }
    };
}

event_types! {
    // Authentication.
    LoginSuccess = "LOGIN_SUCCESS",
    LoginFailure = "LOGIN_FAILURE",
    Logout = "LOGOUT",
    MfaConfigured = "MFA_CONFIGURED",
    MfaVerified = "MFA_VERIFIED",
    SessionTimeout = "SESSION_TIMEOUT",
    PasswordChanged = "PASSWORD_CHANGED",
    // Wallet operations.
    WalletCreated = "WALLET_CREATED",
    WalletImported = "WALLET_IMPORTED",
    GuardianAdded = "GUARDIAN_ADDED",
    GuardianRemoved = "GUARDIAN_REMOVED",
    KeyRotationCeremony = "KEY_ROTATION_CEREMONY",
    ThresholdModified = "THRESHOLD_MODIFIED",
    /// A guardian's lost share rebuilt under its own index by its co-guardians.
    ShareRepaired = "SHARE_REPAIRED",
    // Transactions.
    TransactionCreated = "TRANSACTION_CREATED",
    /// The policy engine's decision on a transaction (allow, block or approvals needed).
    PolicyEvaluated = "POLICY_EVALUATED",
    TransactionApproved = "TRANSACTION_APPROVED",
    TransactionRejected = "TRANSACTION_REJECTED",
    /// An approval that did not count (forged, stale, wrong approver, expired...).
    ApprovalRefused = "APPROVAL_REFUSED",
    /// Approvals still missing after a requirement's escalation delay: its
    /// second group was asked, and counts from then on.
    ApprovalEscalated = "APPROVAL_ESCALATED",
    /// The unsigned transaction chosen for an approved transfer, before signing.
    TransactionBuilt = "TRANSACTION_BUILT",
    TransactionSigned = "TRANSACTION_SIGNED",
    TransactionBroadcast = "TRANSACTION_BROADCAST",
    TransactionConfirmed = "TRANSACTION_CONFIRMED",
    TransactionFailed = "TRANSACTION_FAILED",
    // Policy management.
    PolicyCreated = "POLICY_CREATED",
    PolicyModified = "POLICY_MODIFIED",
    PolicyDeleted = "POLICY_DELETED",
    SpendingLimitChanged = "SPENDING_LIMIT_CHANGED",
    RoleAssigned = "ROLE_ASSIGNED",
    /// An administrative change was asked for (decided by the active policy next).
    ChangeRequested = "CHANGE_REQUESTED",
    /// An approved key-ceremony change took effect: the wallet event recorded
    /// with it in the same append says what the ceremony made.
    ChangeApplied = "CHANGE_APPLIED",
    WhitelistEntryAdded = "WHITELIST_ENTRY_ADDED",
    WhitelistEntryRemoved = "WHITELIST_ENTRY_REMOVED",
    /// An emergency freeze: signing stops for a wallet or for every wallet.
    FreezeApplied = "FREEZE_APPLIED",
    FreezeLifted = "FREEZE_LIFTED",
    // Administration.
    UserCreated = "USER_CREATED",
    UserDeactivated = "USER_DEACTIVATED",
    RoleCreated = "ROLE_CREATED",
    PermissionChanged = "PERMISSION_CHANGED",
    SettingsModified = "SETTINGS_MODIFIED",
    // Intake and operations.
    /// An upstream request refused at intake (bad field, unknown wallet, ...).
    RequestRejected = "REQUEST_REJECTED",
    /// A signed statement of the chain's head.
    AuditCheckpoint = "AUDIT_CHECKPOINT",
    /// A poison message moved to the dead-letter stream.
    MessageDeadLettered = "MESSAGE_DEAD_LETTERED",
    /// Something an on-call engineer must look at.
    AlertRaised = "ALERT_RAISED",
}

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Actor {
    pub user_id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
}

impl Actor {
    /// Custos itself (a worker acting on its own).
    pub fn system(component: &str) -> Self {
        Actor {
            user_id: format!("system:{component}"),
            email: None,
            role: Some("system".into()),
        }
    }
}

/// What it was done to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    /// Decimal string in the asset's units; never a float.
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
}

/// Where the request came from. Only a masked IP address is ever stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestContext {
    #[serde(default)]
    pub ip_address: Option<String>,
    #[serde(default)]
    pub user_agent: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
}

impl RequestContext {
    /// Masks an address before it is stored: the host part of IPv4 (`192.168.1.***`),
    /// all but the first three groups of IPv6 (`2001:db8:85a3:****`).
    pub fn mask_ip(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                format!("{a}.{b}.{c}.***")
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:****", s[0], s[1], s[2])
            }
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
    Pending,
}

/// Typed data of an event. Several event types share a shape; which shapes an
/// event type may carry is checked by the engine when it folds events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Payload {
    /// Nothing beyond the envelope (actor, target, context, metadata).
    None,
    /// A transfer workflow starts: the request exactly as accepted, and the hash of
    /// its canonical encoding (what approvals and guardians bind to).
    TransferRequested {
        request: TransferRequest,
        request_hash: String,
    },
    /// A request refused at intake.
    RequestRejected {
        request_id: Option<String>,
        field: Option<String>,
        reason: String,
    },
    /// A wallet became active.
    WalletCreated(WalletDescriptor),
    /// The policy engine's decision, with its explanation.
    PolicyEvaluated(crate::policy::PolicyDecision),
    /// An approver's answer (`TRANSACTION_APPROVED` / `TRANSACTION_REJECTED`).
    ApprovalVote(crate::approval::ApprovalVote),
    /// `APPROVAL_ESCALATED`: whom an unmet requirement was escalated to.
    ApprovalEscalated(crate::approval::ApprovalEscalation),
    /// The unsigned transaction chosen for an approved transfer
    /// (`TRANSACTION_BUILT`): what every guardian checks and signs, and nothing else.
    TransactionBuilt(crate::chain::UnsignedTransaction),
    /// `TRANSACTION_BUILT` for a broadcast transfer whose transaction is stuck:
    /// the transaction that replaces the one broadcast as `replaces` (the same
    /// inputs or nonce, the same payment, only a higher fee). Signers check it
    /// against the approval and against the transaction it replaces.
    TransactionReplacement {
        /// Txid of the broadcast transaction this one replaces.
        replaces: String,
        unsigned: crate::chain::UnsignedTransaction,
    },
    /// `TRANSACTION_SIGNED`: the complete transaction, ready to broadcast.
    TransactionSigned(crate::chain::SignedTransaction),
    /// `TRANSACTION_BROADCAST`: the node accepted it.
    TransactionBroadcast { chain: String, txid: String },
    /// `TRANSACTION_CONFIRMED`: buried under enough blocks.
    TransactionConfirmed(crate::chain::Confirmation),
    /// A policy became the active one.
    PolicyActivated { name: String, version: String },
    /// An administrative change workflow starts: the request exactly as
    /// accepted and the hash of its canonical encoding (what approvals bind to).
    ChangeRequested {
        request: crate::change::ChangeRequest,
        request_hash: String,
    },
    /// The approved change, taking effect (`POLICY_MODIFIED` with the policy
    /// document, whitelist entries, `FREEZE_APPLIED`, `FREEZE_LIFTED`).
    ChangeApplied(crate::change::Change),
    /// A user joined the directory.
    UserCreated(UserRecord),
    /// A step failed for good; the workflow ends or waits as its machine says.
    StepFailed { step: String, reason: String },
    /// A poison message left its consumer.
    DeadLettered {
        step: String,
        stream_sequence: u64,
        subject: String,
        deliveries: u64,
        reason: String,
    },
    /// An alert for the on-call route.
    Alert { severity: String, summary: String },
    /// A signed statement of the chain head.
    Checkpoint(Checkpoint),
    /// A key ceremony on an existing wallet (rotation, guardian changes): same
    /// group key and address; `public_digest` is the new public key package's.
    KeyCeremony {
        wallet: String,
        ceremony_id: String,
        public_digest: String,
    },
    /// `GUARDIAN_ADDED` / `GUARDIAN_REMOVED`: a key ceremony changed the wallet's
    /// guardians; `wallet` is its new descriptor (same group key and address),
    /// the roster signing reads from now on.
    GuardianChanged {
        /// The guardian added or removed.
        guardian: String,
        ceremony_id: String,
        /// The new public key package's digest, as every member computed it.
        public_digest: String,
        wallet: WalletDescriptor,
    },
    /// `THRESHOLD_MODIFIED`: a redistribution of the shares (verifiable, among
    /// the guardians) changed the wallet's threshold; `wallet` is its new
    /// descriptor (same guardians, group key and address), the threshold
    /// signing reads from now on.
    ThresholdChanged {
        /// The new threshold (also in `wallet`).
        threshold: u16,
        ceremony_id: String,
        /// The redistribution transcript (parameters and every dealing), as
        /// every guardian computed it.
        transcript: String,
        wallet: WalletDescriptor,
    },
}

/// A directory user as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserRecord {
    pub id: String,
    pub name: String,
    pub email: String,
    #[serde(default)]
    pub slack_user_id: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub mfa_enrolled: bool,
}

/// What intake and the workers need to know about a wallet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WalletDescriptor {
    pub name: String,
    /// Security model: `hd`, `shamir`, `frost` or `hardware`.
    pub model: String,
    /// Chain id as known to Custos, e.g. `ltc-regtest`, `evm-31337`.
    pub chain: String,
    /// Receive address.
    pub address: String,
    /// Signatures needed (threshold models).
    #[serde(default)]
    pub threshold: Option<u16>,
    /// Guardians holding shares, with their registered public keys.
    #[serde(default)]
    pub guardians: Vec<WalletGuardian>,
    /// Hex group public key (for FROST: the BIP-341 internal key, 33 bytes compressed).
    #[serde(default)]
    pub group_key: Option<String>,
    /// Hex hash of the key ceremony's transcript, identical at every guardian.
    #[serde(default)]
    pub transcript: Option<String>,
}

/// A guardian of a wallet, as registered when the wallet was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WalletGuardian {
    pub id: String,
    /// FROST identifier (1-based index).
    pub index: u16,
    /// Hex ed25519 key that verifies its ceremony messages.
    pub signing_key: String,
    /// Hex X25519 key that sealed payloads are addressed to.
    pub encryption_key: String,
}

/// A signed statement that the chain, up to and including stream sequence
/// `sequence`, ends in `head_hash`. Anyone holding it can detect a later
/// truncation or rewrite of that prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    pub stream: String,
    pub sequence: u64,
    /// Hex SHA-256.
    pub head_hash: String,
    /// Hex ed25519 public key of the audit key.
    pub public_key: String,
    /// Hex ed25519 signature over [`Checkpoint::signed_bytes`].
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes the audit key signs.
    pub fn signed_bytes(stream: &str, sequence: u64, head_hash: &str) -> Vec<u8> {
        format!("custos-checkpoint-v1\n{stream}\n{sequence}\n{head_hash}\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taxonomy_round_trips_its_names() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
            let json = serde_json::to_string(t).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert_eq!(EventType::parse("NOPE"), None);
    }

    #[test]
    fn ip_masking() {
        assert_eq!(
            RequestContext::mask_ip("192.168.1.77".parse().unwrap_or(IpAddr::from([0; 4]))),
            "192.168.1.***"
        );
        let v6: IpAddr = "2001:db8:85a3::8a2e:370:7334"
            .parse()
            .unwrap_or(IpAddr::from([0; 4]));
        assert_eq!(RequestContext::mask_ip(v6), "2001:db8:85a3:****");
    }

    #[test]
    fn aggregate_kinds_parse() {
        for k in AggregateKind::ALL {
            assert_eq!(AggregateKind::parse(k.as_str()), Some(k));
        }
    }
}
