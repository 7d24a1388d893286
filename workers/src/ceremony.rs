//! What the coordinator and the guardians say to each other during a key
//! ceremony, over `custos.guardian.<id>.ceremony` (request/reply, MessagePack).
//!
//! The coordinator only relays: every guardian-to-guardian message is a
//! [`SignedMessage`] its receivers verify, and round-2 shares are sealed to their
//! recipient, so a coordinator can drop or delay a ceremony but neither read a
//! share nor forge a guardian's word.

use custos_custody::identity::{GuardianPublic, SignedMessage};
use serde::{Deserialize, Serialize};

/// Rounds of the DKG envelope; each sender speaks once per round.
pub mod rounds {
    /// Round-1 packages (broadcast).
    pub const PACKAGES: u32 = 1;
    /// Round-2 shares, sealed to each recipient.
    pub const SHARES: u32 = 2;
    /// Echoes of the round-1 broadcast (broadcast).
    pub const ECHOES: u32 = 3;
    /// The group key and transcript each guardian computed.
    pub const RESULT: u32 = 4;
}

/// One member of a ceremony roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// FROST identifier, from 1.
    pub index: u16,
    pub guardian: GuardianPublic,
}

/// The coordinator's requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GuardianRequest {
    /// Start a DKG: draw a polynomial, answer with the signed round-1 package.
    DkgStart {
        ceremony_id: String,
        min_signers: u16,
        roster: Vec<RosterEntry>,
    },
    /// Every member's signed round-1 package: answer with the echo and the shares
    /// sealed to each other member.
    DkgShares {
        ceremony_id: String,
        packages: Vec<SignedMessage>,
    },
    /// Every member's echo and the shares sealed to this guardian: verify, keep the
    /// key share (pending), answer with the signed group key and transcript.
    DkgFinalize {
        ceremony_id: String,
        echoes: Vec<SignedMessage>,
        shares: Vec<SignedMessage>,
    },
    /// Start rotating the wallet's shares (refresh: same group key, new shares):
    /// answer with the signed round-1 package.
    RefreshStart {
        ceremony_id: String,
        wallet: String,
        roster: Vec<RosterEntry>,
    },
    /// Every member's signed refresh round-1 package: answer with the round-2
    /// packages sealed to each other member.
    RefreshShares {
        ceremony_id: String,
        packages: Vec<SignedMessage>,
    },
    /// The packages sealed to this guardian: keep the new share (pending) and
    /// answer with the signed group key and public key package digest.
    RefreshFinalize {
        ceremony_id: String,
        shares: Vec<SignedMessage>,
    },
    /// The ceremony is recorded in the trail: the pending share becomes the
    /// wallet's (replacing the old one after a rotation).
    Commit { ceremony_id: String, wallet: String },
    /// The ceremony failed: forget it and its pending share.
    Abort { ceremony_id: String },
}

impl GuardianRequest {
    pub fn ceremony_id(&self) -> &str {
        match self {
            GuardianRequest::DkgStart { ceremony_id, .. }
            | GuardianRequest::DkgShares { ceremony_id, .. }
            | GuardianRequest::DkgFinalize { ceremony_id, .. }
            | GuardianRequest::RefreshStart { ceremony_id, .. }
            | GuardianRequest::RefreshShares { ceremony_id, .. }
            | GuardianRequest::RefreshFinalize { ceremony_id, .. }
            | GuardianRequest::Commit { ceremony_id, .. }
            | GuardianRequest::Abort { ceremony_id } => ceremony_id,
        }
    }
}

/// A guardian's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GuardianReply {
    Package {
        message: SignedMessage,
    },
    Shares {
        echo: SignedMessage,
        shares: Vec<SignedMessage>,
    },
    /// Refresh round-2 packages, each sealed to its recipient.
    Sealed {
        shares: Vec<SignedMessage>,
    },
    /// Payload: the 33-byte group verifying key, then a 32-byte digest (the DKG
    /// transcript, or the refreshed public key package).
    Result {
        message: SignedMessage,
    },
    Done,
    /// Refused, with the reason (naming the culprit where there is one).
    Refused {
        reason: String,
    },
}

/// A guardian's announcement in the [`custos_schemas::subjects::GUARDIANS_BUCKET`]
/// bucket: its public keys and when it was last alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Announcement {
    pub guardian: GuardianPublic,
    /// Milliseconds since the epoch of this heartbeat.
    pub seen_ms: i64,
}
