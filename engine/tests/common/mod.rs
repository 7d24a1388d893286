//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use custos_engine::chain::{self, Break, ChainHash, Link, Verified, Verifier};
use custos_engine::ledger::{Ledger, Sealed};
use custos_schemas::{
    Actor, AggregateKind, Checkpoint, EventType, Outcome, Payload, Proposal, RequestContext,
    Target, TransferRequest, WalletDescriptor,
};
use ed25519_dalek::SigningKey;

pub const STREAM: &str = "CUSTOS_EVENTS";

/// A deterministic audit key.
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The policy decision a `POLICY_EVALUATED` event with `result` carries.
pub fn decision_for(result: Outcome) -> Payload {
    use custos_schemas::policy::{PolicyDecision, PolicyOutcome};
    let outcome = match result {
        Outcome::Success => PolicyOutcome::Allow,
        Outcome::Pending => PolicyOutcome::RequireApprovals,
        Outcome::Denied | Outcome::Failure => PolicyOutcome::Block,
    };
    Payload::PolicyEvaluated(PolicyDecision {
        outcome,
        policy_version: "00".repeat(32),
        action: "transfer".into(),
        initiator: "alice".into(),
        wallet: Some("w".into()),
        evaluated_at: 0,
        fiat_value: None,
        approvals: Vec::new(),
        expires_at: None,
        delay_ms: 0,
        matched_rules: Vec::new(),
        explanation: format!("test decision: {}", outcome.as_str()),
    })
}

/// A proposal with a plain envelope. A `POLICY_EVALUATED` proposal given
/// `Payload::None` gets the decision matching its result (see [`decision_for`]).
pub fn proposal(
    kind: AggregateKind,
    id: &str,
    expected_version: u64,
    event_type: EventType,
    result: Outcome,
    payload: Payload,
) -> Proposal {
    Proposal {
        aggregate_kind: kind,
        workflow_id: id.to_string(),
        expected_version,
        event_type,
        causation_id: None,
        actor: Actor::system("tests"),
        target: Target {
            kind: kind.as_str().into(),
            id: id.into(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result,
        payload: match (event_type, payload) {
            (EventType::PolicyEvaluated, Payload::None) => decision_for(result),
            (_, payload) => payload,
        },
        metadata: BTreeMap::new(),
    }
}

/// A simple event on an aggregate without a state machine.
pub fn simple(
    kind: AggregateKind,
    id: &str,
    expected_version: u64,
    event_type: EventType,
) -> Proposal {
    proposal(
        kind,
        id,
        expected_version,
        event_type,
        Outcome::Success,
        Payload::None,
    )
}

pub fn wallet_created(name: &str, chain: &str, address: &str) -> Proposal {
    proposal(
        AggregateKind::Wallet,
        name,
        0,
        EventType::WalletCreated,
        Outcome::Success,
        Payload::WalletCreated(WalletDescriptor {
            name: name.into(),
            model: "frost".into(),
            chain: chain.into(),
            address: address.into(),
            threshold: None,
            guardians: Vec::new(),
            group_key: None,
            transcript: None,
        }),
    )
}

pub fn checkpoint_proposal(id: &str, expected_version: u64, cp: Checkpoint) -> Proposal {
    proposal(
        AggregateKind::Audit,
        id,
        expected_version,
        EventType::AuditCheckpoint,
        Outcome::Success,
        Payload::Checkpoint(cp),
    )
}

/// A regtest Litecoin segwit v1 address with a 32-byte program of `byte`.
pub fn rltc_address(byte: u8) -> String {
    segwit_address("rltc", byte)
}

pub fn segwit_address(hrp: &str, byte: u8) -> String {
    let hrp = bech32::Hrp::parse(hrp).expect("valid hrp");
    bech32::segwit::encode(hrp, bech32::segwit::VERSION_1, &[byte; 32]).expect("encodable")
}

pub fn transfer_request(
    request_id: &str,
    wallet: &str,
    asset: &str,
    destination: &str,
    amount: &str,
) -> TransferRequest {
    TransferRequest {
        request_id: request_id.into(),
        wallet: wallet.into(),
        asset: asset.into(),
        destination: destination.into(),
        amount: amount.into(),
        memo: None,
        initiator: "alice".into(),
    }
}

/// The TRANSACTION_CREATED proposal of a transfer workflow.
pub fn tx_created(id: &str) -> Proposal {
    let request = transfer_request(&format!("req-{id}"), "w", "LTC", &rltc_address(7), "1.5");
    let request_hash = custos_engine::intake::request_hash(&request);
    proposal(
        AggregateKind::Tx,
        id,
        0,
        EventType::TransactionCreated,
        Outcome::Pending,
        Payload::TransferRequested {
            request,
            request_hash,
        },
    )
}

/// The happy path of a transfer after creation: the proposal at `expected_version`
/// (policy allowed, built, signed, broadcast, confirmed for 1..=5).
pub fn tx_step(id: &str, expected_version: u64) -> Proposal {
    let event_type = match expected_version {
        0 => return tx_created(id),
        1 => EventType::PolicyEvaluated,
        2 => EventType::TransactionBuilt,
        3 => EventType::TransactionSigned,
        4 => EventType::TransactionBroadcast,
        _ => EventType::TransactionConfirmed,
    };
    proposal(
        AggregateKind::Tx,
        id,
        expected_version,
        event_type,
        Outcome::Success,
        step_payload(id, event_type, Outcome::Success),
    )
}

/// The txid every test transfer signs, broadcasts and confirms.
pub const TEST_TXID: &str = "abababababababababababababababababababababababababababababababab";

/// A payload the transfer machine accepts for `event_type` on workflow `id` (whose
/// request is [`tx_created`]'s): votes bound to its request hash and the test
/// decision's policy version, a placeholder transaction, [`TEST_TXID`].
pub fn step_payload(id: &str, event_type: EventType, result: Outcome) -> Payload {
    use custos_schemas::approval::{ApprovalChannel, ApprovalVote, MfaMethod, Vote};
    use custos_schemas::chain::{Confirmation, SignedTransaction, UnsignedTransaction};
    let chain = "ltc-regtest".to_string();
    let vote = |vote| {
        let Payload::TransferRequested { request_hash, .. } = tx_created(id).payload else {
            unreachable!("tx_created carries the request")
        };
        Payload::ApprovalVote(ApprovalVote {
            vote,
            request_hash,
            policy_version: "00".repeat(32),
            channel: ApprovalChannel::Email,
            mfa: MfaMethod::Totp,
            comment: None,
        })
    };
    match event_type {
        EventType::TransactionCreated => tx_created(id).payload,
        EventType::PolicyEvaluated => decision_for(result),
        EventType::TransactionApproved => vote(Vote::Approve),
        EventType::TransactionRejected => vote(Vote::Reject),
        EventType::TransactionBuilt => Payload::TransactionBuilt(UnsignedTransaction::Bitcoin {
            chain,
            unsigned_tx: "02000000000000000000".into(),
            spent: Vec::new(),
            fee: 0,
            fee_rate: 1,
            change_vout: None,
        }),
        EventType::TransactionSigned => Payload::TransactionSigned(SignedTransaction {
            chain,
            txid: TEST_TXID.into(),
            raw_tx: "02000000000000000000".into(),
            signers: vec!["g1".into(), "g2".into()],
        }),
        EventType::TransactionBroadcast => Payload::TransactionBroadcast {
            chain,
            txid: TEST_TXID.into(),
        },
        EventType::TransactionConfirmed => Payload::TransactionConfirmed(Confirmation {
            chain,
            txid: TEST_TXID.into(),
            block_hash: "cd".repeat(32),
            block_height: 102,
            confirmations: 1,
        }),
        _ => Payload::None,
    }
}

/// A sealed event as it sits in the stream: seq, subject, body and its chain headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    pub body: Vec<u8>,
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

impl Stored {
    pub fn link(&self) -> Link<'_> {
        Link {
            seq: self.seq,
            subject: &self.subject,
            body: &self.body,
            prev_hash: self.prev_hash.as_deref(),
            hash: self.hash.as_deref(),
        }
    }

    /// A new stored event at `seq` following `prev`, with correctly computed hashes.
    pub fn forge(prev: &ChainHash, seq: u64, subject: &str, body: Vec<u8>) -> Stored {
        let hash = chain::link(prev, seq, subject, &body);
        Stored {
            seq,
            subject: subject.into(),
            body,
            prev_hash: Some(prev.to_hex()),
            hash: Some(hash.to_hex()),
        }
    }
}

impl From<&Sealed> for Stored {
    fn from(s: &Sealed) -> Self {
        Stored {
            seq: s.seq,
            subject: s.subject.clone(),
            body: s.body.clone(),
            prev_hash: Some(s.prev_hash.to_hex()),
            hash: Some(s.hash.to_hex()),
        }
    }
}

pub fn stored(sealed: &[Sealed]) -> Vec<Stored> {
    sealed.iter().map(Stored::from).collect()
}

/// Verifies a trail with no trusted keys and no external checkpoints.
pub fn verify(trail: &[Stored]) -> Result<Verified, Break> {
    verify_with(Verifier::new(STREAM, Vec::new()), trail)
}

pub fn verify_with(mut verifier: Verifier, trail: &[Stored]) -> Result<Verified, Break> {
    for s in trail {
        verifier.push(s.link())?;
    }
    verifier.finish()
}

/// A ledger holding `n` sealed events over several aggregates (users, policies, a
/// wallet, transfer workflows), sealed one or a few at a time.
pub fn sample_chain(n: usize) -> (Ledger, Vec<Sealed>) {
    let mut ledger = Ledger::default();
    let mut all = Vec::new();
    let mut i = 0usize;
    while all.len() < n {
        let p = match i % 6 {
            0 => {
                let id = format!("user-{}", i % 4);
                simple(
                    AggregateKind::User,
                    &id,
                    ledger.version(AggregateKind::User, &id),
                    EventType::UserCreated,
                )
            }
            1 => {
                let id = format!("tx-{}", i / 30);
                let v = ledger.version(AggregateKind::Tx, &id);
                if v >= 5 {
                    simple(
                        AggregateKind::System,
                        "ops",
                        ledger.version(AggregateKind::System, "ops"),
                        EventType::AlertRaised,
                    )
                } else {
                    tx_step(&id, v)
                }
            }
            2 if ledger.wallet(&format!("w{}", i / 12)).is_none() => {
                let name = format!("w{}", i / 12);
                wallet_created(&name, "ltc-regtest", &rltc_address(1))
            }
            3 => {
                let mut p = proposal(
                    AggregateKind::Policy,
                    "limits",
                    ledger.version(AggregateKind::Policy, "limits"),
                    EventType::SpendingLimitChanged,
                    Outcome::Success,
                    Payload::Alert {
                        severity: "info".into(),
                        summary: format!("limit {i}"),
                    },
                );
                p.metadata.insert("n".into(), i.to_string());
                p
            }
            _ => simple(
                AggregateKind::Auth,
                "alice",
                ledger.version(AggregateKind::Auth, "alice"),
                EventType::LoginSuccess,
            ),
        };
        let sealed = ledger
            .seal(vec![p], 1_700_000_000_000 + i as i64)
            .expect("sample proposals seal");
        all.extend(sealed);
        i += 1;
    }
    all.truncate(n);
    (ledger, all)
}
