//! What the coordinator and the guardians say to each other during a key
//! ceremony, over `custos.guardian.<id>.ceremony` (request/reply, MessagePack).
//!
//! The coordinator only relays: every guardian-to-guardian message is a
//! [`SignedMessage`] its receivers verify, and round-2 shares are sealed to their
//! recipient, so a coordinator can drop or delay a ceremony but neither read a
//! share nor forge a guardian's word.

use custos_custody::identity::{GuardianPublic, SignedMessage};
use custos_custody::seal::Sealed;
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

/// The coordinator's requests. A guardian's first message of a ceremony names
/// the approved change workflow that asks for it (`change`); the guardian
/// takes part only if its own replica of the trail shows that change approved
/// and asking for exactly this ceremony.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GuardianRequest {
    /// Start a DKG: draw a polynomial, answer with the signed round-1 package.
    DkgStart {
        ceremony_id: String,
        /// The approved change workflow that asks for it.
        change: String,
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
        change: String,
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
    /// Start adding a guardian: a helper answers with its repair deltas sealed
    /// to the other helpers; any other member answers with none and waits to
    /// admit the newcomer.
    RepairStart {
        ceremony_id: String,
        change: String,
        wallet: String,
        joining: Joining,
    },
    /// The deltas sealed to this helper: answer with its sigma and the wallet's
    /// public key package, sealed to the newcomer ([`RepairSigma`]).
    RepairCombine {
        ceremony_id: String,
        deltas: Vec<SignedMessage>,
    },
    /// To the newcomer: every helper's sigma. It keeps its share (pending) and
    /// answers with its signed result: group key, digest, its verifying share.
    RepairFinish {
        ceremony_id: String,
        change: String,
        wallet: String,
        joining: Joining,
        sigmas: Vec<SignedMessage>,
    },
    /// To the wallet's members: the newcomer's signed result. Each adds its
    /// verifying share to the public key package (pending) and answers with its
    /// signed group key and digest, refusing a result that differs.
    RepairAdmit {
        ceremony_id: String,
        result: SignedMessage,
    },
    /// Start changing the wallet's threshold (verifiable redistribution: same
    /// group key, same guardians): deal this guardian's Lagrange-weighted share
    /// to every member under `min_signers`; answer with the signed dealing
    /// (public commitments) and the sub-shares sealed to each other member.
    ReshareStart {
        ceremony_id: String,
        change: String,
        wallet: String,
        min_signers: u16,
        roster: Vec<RosterEntry>,
    },
    /// Every member's signed dealing and the sub-shares sealed to this
    /// guardian: verify them (naming a bad dealer), keep the new share
    /// (pending) and answer with the signed group key and transcript.
    ReshareFinalize {
        ceremony_id: String,
        dealings: Vec<SignedMessage>,
        shares: Vec<SignedMessage>,
    },
    /// The ceremony is recorded in the trail: the pending share becomes the
    /// wallet's (replacing the old one after a rotation). A guardian the recorded
    /// roster no longer lists forgets its share instead.
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
            | GuardianRequest::RepairStart { ceremony_id, .. }
            | GuardianRequest::RepairCombine { ceremony_id, .. }
            | GuardianRequest::RepairFinish { ceremony_id, .. }
            | GuardianRequest::RepairAdmit { ceremony_id, .. }
            | GuardianRequest::ReshareStart { ceremony_id, .. }
            | GuardianRequest::ReshareFinalize { ceremony_id, .. }
            | GuardianRequest::Commit { ceremony_id, .. }
            | GuardianRequest::Abort { ceremony_id } => ceremony_id,
        }
    }
}

/// Who takes part in adding a guardian.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joining {
    /// The wallet's guardians and the newcomer.
    pub roster: Vec<RosterEntry>,
    /// FROST indices of the members that compute the newcomer's share.
    pub helpers: Vec<u16>,
    /// The newcomer's FROST index.
    pub newcomer: u16,
}

/// What a helper sends the newcomer (sealed sigma, public package in the clear:
/// it holds no secret), signed as one round-2 message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairSigma {
    pub sigma: Sealed,
    pub public_key_package: Vec<u8>,
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
    /// A redistribution dealer's signed dealing (broadcast) and its sub-shares,
    /// each sealed to its recipient.
    Dealt {
        dealing: SignedMessage,
        shares: Vec<SignedMessage>,
    },
    /// Payload: the 33-byte group verifying key, then a 32-byte digest (the DKG
    /// transcript, or the new public key package); a newcomer's adds its 33-byte
    /// verifying share.
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
