//! A guardian process: holds its identity and key shares encrypted at rest,
//! announces itself and its liveness in the guardians bucket, and answers key
//! ceremonies on its own subject only. The cryptography is `custos_custody`'s;
//! this is the IO around it (NATS, files, the clock, the OS RNG).

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use custos_custody::dkg::{self, Ceremony, DkgRound1, DkgRound2, Echo};
use custos_custody::frost::keys::repairable::{Delta, Sigma};
use custos_custody::frost::keys::{KeyPackage, PublicKeyPackage, VerifyingShare};
use custos_custody::identity::{GuardianKeys, GuardianPublic, Inbox, SignedMessage};
use custos_custody::lifecycle::{self, RefreshRound1, RefreshRound2};
use custos_custody::reshare::{self, Dealing, Redistribution, SubShare};
use custos_custody::seal::Sealed;
use custos_custody::sign::TweakedKey;
use custos_custody::{Identifier, frost, store};
use custos_schemas::{codec, subjects, validate_token};
use futures::StreamExt;
use rand::rngs::OsRng;
use zeroize::Zeroizing;

use custos_adapters::files::write_private;

use crate::Shutdown;
use crate::ceremony::{
    Announcement, GuardianReply, GuardianRequest, Joining, RepairSigma, RosterEntry, rounds,
};
use crate::guardian_gate;
use crate::guardian_sign::SignService;
use crate::signing::{SignReply, SignRequest};
use crate::trail::Trail;

/// How often a guardian announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A ceremony not finished within this is forgotten.
const CEREMONY_TTL: Duration = Duration::from_secs(120);

/// Where and who.
#[derive(Debug)]
pub struct GuardianConfig {
    pub id: String,
    pub data_dir: PathBuf,
    /// Unlocks the identity and the shares. Never logged, never an argument.
    pub passphrase: Zeroizing<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuardianError {
    #[error("guardian id: {0}")]
    Id(#[from] custos_schemas::IdError),
    #[error("{path}: {reason}")]
    Store { path: PathBuf, reason: String },
    #[error("NATS: {0}")]
    Nats(#[from] async_nats::Error),
}

enum Stage {
    Round1(DkgRound1),
    Round2(DkgRound2),
    Refresh1(RefreshRound1, Box<Share>),
    Refresh2(RefreshRound2, Box<Share>),
    /// A repair helper holding its own delta until the others' arrive.
    Repair1 {
        own: Delta,
        helpers: BTreeSet<Identifier>,
        newcomer: Identifier,
        share: Box<Share>,
    },
    /// A member waiting for the newcomer's verifying share.
    Admit(Identifier, Box<Share>),
    /// A redistribution dealer (and new member) holding its own dealing and
    /// the sub-share it dealt itself until the others' arrive.
    Reshare {
        params: Box<Redistribution>,
        own: Box<(Dealing, SubShare)>,
    },
    /// Finished; the share is pending until the ceremony is recorded.
    Done,
}

/// A wallet's share as a guardian holds it.
pub(crate) struct Share {
    pub(crate) key: KeyPackage,
    /// `key` with the Taproot tweak: what round 2 signs with.
    pub(crate) tweaked: TweakedKey,
    pub(crate) public: PublicKeyPackage,
    /// `public` serialized, and its group key in hex, made once when the share
    /// is loaded: every signing sends the one and checks the other, and
    /// serializing a point costs a field inversion.
    pub(crate) public_bytes: Vec<u8>,
    pub(crate) group_key_hex: String,
}

struct Session {
    ceremony: Ceremony,
    inbox: Inbox,
    stage: Stage,
    started: Instant,
}

/// Runs the guardian until `shutdown`. Needs tokio's multi-threaded runtime
/// (ceremony steps run on a blocking section of it).
pub async fn run(
    client: Client,
    config: GuardianConfig,
    mut shutdown: Shutdown,
) -> Result<(), GuardianError> {
    validate_token("id", &config.id)?;
    for dir in ["shares", "ceremonies"] {
        std::fs::create_dir_all(config.data_dir.join(dir)).map_err(|e| GuardianError::Store {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        })?;
    }
    let keys = load_or_create_identity(&config)?;
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js
        .get_key_value(subjects::GUARDIANS_BUCKET)
        .await
        .map_err(|e| GuardianError::Nats(e.into()))?;
    let mut requests = client
        .subscribe(subjects::guardian_subject(&config.id, "ceremony"))
        .await
        .map_err(|e| GuardianError::Nats(e.into()))?;
    let mut sign_requests = client
        .subscribe(subjects::guardian_subject(&config.id, "sign"))
        .await
        .map_err(|e| GuardianError::Nats(e.into()))?;
    let config = Arc::new(config);
    let trail = Trail::follow(js.clone(), shutdown.clone())
        .await
        .map_err(|reason| GuardianError::Store {
            path: config.data_dir.clone(),
            reason,
        })?;
    let signing = Arc::new(
        SignService::new(config.clone(), trail.clone()).map_err(|reason| GuardianError::Store {
            path: config.data_dir.clone(),
            reason,
        })?,
    );
    finish_missed_commits(&trail, &config).await;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut sessions: HashMap<String, Session> = HashMap::new();
    tracing::info!(guardian = %config.id, "guardian up");
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = heartbeat.tick() => {
                let announcement = Announcement { guardian: keys.public(), seen_ms: now_ms() };
                if let Err(e) = bucket.put(&config.id, serde_json::to_vec(&announcement).unwrap_or_default().into()).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                sessions.retain(|_, s| s.started.elapsed() < CEREMONY_TTL);
            }
            msg = sign_requests.next() => {
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply.clone() else { continue };
                let (client, signing, id) = (client.clone(), signing.clone(), config.id.clone());
                // Each signing checks the trail (async): its own task.
                tokio::spawn(async move {
                    let reply = match codec::from_msgpack::<SignRequest>(&msg.payload) {
                        Ok(request) => signing.handle(request).await,
                        Err(e) => SignReply::Refused { reason: format!("undecodable request: {e}") },
                    };
                    if let SignReply::Refused { reason } = &reply {
                        tracing::warn!(guardian = %id, reason, "signing request refused");
                    }
                    if let Err(e) = client.publish(reply_to, codec::to_msgpack(&reply).into()).await {
                        tracing::warn!(error = %e, "could not answer the coordinator");
                    }
                });
            }
            msg = requests.next() => {
                let Some(msg) = msg else { break };
                let Some(reply_to) = msg.reply.clone() else { continue };
                let reply = match codec::from_msgpack::<GuardianRequest>(&msg.payload) {
                    // Ceremony steps hash passphrases (argon2id) and do curve arithmetic:
                    // off the async threads, so heartbeats keep going.
                    Ok(request) => match gate(&trail, &request, &config.id).await {
                        Err(reason) => refused(reason),
                        Ok(()) => {
                            let mut unlisted = false;
                            let committed = match &request {
                                GuardianRequest::Commit { wallet, .. } => Some(wallet.clone()),
                                _ => None,
                            };
                            if let Some(wallet) = &committed {
                                signing.forget_share(wallet);
                                unlisted = not_a_guardian(&trail, wallet, &config.id).await;
                            }
                            let reply = tokio::task::block_in_place(|| handle(&keys, &config, &mut sessions, request, unlisted));
                            // Again once the new share is in place: a signing
                            // in between may have loaded the old one.
                            if let Some(wallet) = &committed {
                                signing.forget_share(wallet);
                            }
                            reply
                        }
                    },
                    Err(e) => GuardianReply::Refused { reason: format!("undecodable request: {e}") },
                };
                if let GuardianReply::Refused { reason } = &reply {
                    tracing::warn!(guardian = %config.id, reason, "ceremony request refused");
                }
                if let Err(e) = client.publish(reply_to, codec::to_msgpack(&reply).into()).await {
                    tracing::warn!(error = %e, "could not answer the coordinator");
                }
            }
        }
    }
    Ok(())
}

/// Whether the trail lets guardian `me` act on `request` now: a ceremony's
/// first message needs its approved change, a commit a recorded ceremony, and
/// an abort one that is not recorded (see [`guardian_gate`]).
async fn gate(trail: &Trail, request: &GuardianRequest, me: &str) -> Result<(), String> {
    trail
        .read(|view| match request {
            GuardianRequest::Commit {
                ceremony_id,
                wallet,
            } => guardian_gate::check_commit(view, ceremony_id, wallet),
            GuardianRequest::Abort { ceremony_id } => guardian_gate::check_abort(view, ceremony_id),
            _ => guardian_gate::check_ceremony_request(view, request, me, now_ms()),
        })
        .await?
}

/// Commits the shares of ceremonies the trail records but whose commit this
/// guardian never received (it was down when the coordinator sent it).
async fn finish_missed_commits(trail: &Trail, config: &GuardianConfig) {
    let Ok(entries) = std::fs::read_dir(config.data_dir.join("shares")) else {
        return;
    };
    let pending: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("pending-")?
                    .strip_suffix(".share")?
                    .to_string(),
            )
        })
        .collect();
    let recorded = trail
        .read(|view| {
            pending
                .iter()
                .filter_map(|id| view.ceremonies.get(id).map(|w| (id.clone(), w.clone())))
                .collect::<Vec<_>>()
        })
        .await;
    for (ceremony_id, wallet) in recorded.unwrap_or_default() {
        match commit_share(config, &ceremony_id, &wallet) {
            Ok(()) => {
                tracing::info!(guardian = %config.id, ceremony = %ceremony_id, wallet = %wallet, "committed a recorded ceremony missed while down")
            }
            Err(e) => {
                tracing::warn!(guardian = %config.id, ceremony = %ceremony_id, error = %e, "could not commit a recorded ceremony")
            }
        }
    }
}

/// Whether the trail records wallet `wallet` without guardian `me`: only then
/// does a commit make this guardian forget its share (no coordinator can).
async fn not_a_guardian(trail: &Trail, wallet: &str, me: &str) -> bool {
    let listed = trail
        .read(|view| {
            view.ledger
                .wallet(wallet)
                .map(|w| w.guardians.iter().any(|g| g.id == me))
        })
        .await;
    matches!(listed, Ok(Some(false)))
}

fn refused(reason: impl std::fmt::Display) -> GuardianReply {
    GuardianReply::Refused {
        reason: reason.to_string(),
    }
}

fn handle(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    request: GuardianRequest,
    unlisted: bool,
) -> GuardianReply {
    let ceremony_id = request.ceremony_id().to_string();
    if let Err(e) = validate_token("ceremonyId", &ceremony_id) {
        return refused(e);
    }
    match request {
        GuardianRequest::DkgStart {
            min_signers,
            roster,
            ..
        } => {
            if let Err(reason) = first_use(config, sessions, &ceremony_id) {
                return refused(reason);
            }
            let publics: Vec<GuardianPublic> = roster.iter().map(|e| e.guardian.clone()).collect();
            let ceremony = match Ceremony::new(
                &ceremony_id,
                min_signers,
                roster
                    .into_iter()
                    .map(|RosterEntry { index, guardian }| (index, guardian)),
            ) {
                Ok(c) => c,
                Err(e) => return refused(e),
            };
            let inbox = match Inbox::new(&ceremony_id, keys.id(), &publics) {
                Ok(i) => i,
                Err(e) => return refused(e),
            };
            match dkg::start(ceremony.clone(), keys, &mut OsRng) {
                Ok((state, package)) => match package.serialize() {
                    Ok(bytes) => {
                        let message =
                            keys.sign_message(&ceremony_id, None, rounds::PACKAGES, bytes);
                        sessions.insert(
                            ceremony_id,
                            Session {
                                ceremony,
                                inbox,
                                stage: Stage::Round1(state),
                                started: Instant::now(),
                            },
                        );
                        GuardianReply::Package { message }
                    }
                    Err(e) => refused(e),
                },
                Err(e) => refused(e),
            }
        }
        GuardianRequest::DkgShares { packages, .. } => {
            let Some(session) = sessions.get_mut(&ceremony_id) else {
                return refused(format!("no ceremony {ceremony_id} in progress here"));
            };
            let Stage::Round1(_) = session.stage else {
                return refused("round-2 shares were already produced for this ceremony");
            };
            let received = match read_packages(session, keys.id(), &packages) {
                Ok(r) => r,
                Err(reason) => return refused(reason),
            };
            session.inbox.advance_to(rounds::SHARES);
            let Stage::Round1(state) = std::mem::replace(&mut session.stage, Stage::Done) else {
                return refused("internal: stage changed");
            };
            match state.round2(&received, keys, &mut OsRng) {
                Ok((next, echo, sealed)) => {
                    session.stage = Stage::Round2(next);
                    let echo =
                        keys.sign_message(&ceremony_id, None, rounds::ECHOES, echo.to_bytes());
                    let shares = sealed
                        .into_iter()
                        .map(|(to, s)| {
                            keys.sign_message(
                                &ceremony_id,
                                Some(&session.ceremony.name(&to)),
                                rounds::SHARES,
                                codec::to_msgpack(&s),
                            )
                        })
                        .collect();
                    GuardianReply::Shares { echo, shares }
                }
                Err(e) => {
                    sessions.remove(&ceremony_id);
                    refused(e)
                }
            }
        }
        GuardianRequest::DkgFinalize { echoes, shares, .. } => {
            let Some(session) = sessions.get_mut(&ceremony_id) else {
                return refused(format!("no ceremony {ceremony_id} in progress here"));
            };
            let (sealed, echoes) = match read_round2(session, keys.id(), &shares, &echoes) {
                Ok(v) => v,
                Err(reason) => return refused(reason),
            };
            let Stage::Round2(state) = std::mem::replace(&mut session.stage, Stage::Done) else {
                return refused("this ceremony is not waiting for its final round");
            };
            let output = match state.finalize(&echoes, &sealed, keys) {
                Ok(o) => o,
                Err(e) => {
                    sessions.remove(&ceremony_id);
                    return refused(e);
                }
            };
            let group_key = match output.public_key_package.verifying_key().serialize() {
                Ok(k) => k,
                Err(e) => return refused(e),
            };
            if let Err(e) = save_share(
                config,
                &pending_path(config, &ceremony_id),
                &ceremony_id,
                &output.key_package,
                &output.public_key_package,
            ) {
                sessions.remove(&ceremony_id);
                return refused(e);
            }
            let mut payload = group_key;
            payload.extend_from_slice(&output.transcript);
            GuardianReply::Result {
                message: keys.sign_message(&ceremony_id, None, rounds::RESULT, payload),
            }
        }
        GuardianRequest::Commit { wallet, .. } => {
            if let Err(e) = validate_token("wallet", &wallet) {
                return refused(e);
            }
            sessions.remove(&ceremony_id);
            let done = if unlisted {
                forget_share(config, &ceremony_id, &wallet)
            } else {
                commit_share(config, &ceremony_id, &wallet)
            };
            match done {
                Ok(()) => GuardianReply::Done,
                Err(e) => refused(e),
            }
        }
        GuardianRequest::RefreshStart { wallet, roster, .. } => {
            refresh_start(keys, config, sessions, &ceremony_id, &wallet, roster)
        }
        GuardianRequest::RefreshShares { packages, .. } => {
            refresh_shares(keys, sessions, &ceremony_id, &packages)
        }
        GuardianRequest::RefreshFinalize { shares, .. } => {
            refresh_finalize(keys, config, sessions, &ceremony_id, &shares)
        }
        GuardianRequest::RepairStart {
            wallet, joining, ..
        } => repair_start(keys, config, sessions, &ceremony_id, &wallet, joining),
        GuardianRequest::RepairCombine { deltas, .. } => {
            repair_combine(keys, sessions, &ceremony_id, &deltas)
        }
        GuardianRequest::RepairFinish {
            joining, sigmas, ..
        } => repair_finish(keys, config, sessions, &ceremony_id, joining, &sigmas),
        GuardianRequest::RepairAdmit { result, .. } => {
            repair_admit(keys, config, sessions, &ceremony_id, &result)
        }
        GuardianRequest::ReshareStart {
            wallet,
            min_signers,
            roster,
            ..
        } => reshare_start(
            keys,
            config,
            sessions,
            &ceremony_id,
            &wallet,
            min_signers,
            roster,
        ),
        GuardianRequest::ReshareFinalize {
            dealings, shares, ..
        } => reshare_finalize(keys, config, sessions, &ceremony_id, &dealings, &shares),
        GuardianRequest::Abort { .. } => {
            sessions.remove(&ceremony_id);
            let _ = std::fs::remove_file(pending_path(config, &ceremony_id));
            GuardianReply::Done
        }
    }
}

/// Checks every other member's signed round-1 package (DKG or refresh).
fn read_packages(
    session: &mut Session,
    me: &str,
    packages: &[SignedMessage],
) -> Result<BTreeMap<Identifier, frost::keys::dkg::round1::Package>, String> {
    let mut received = BTreeMap::new();
    for m in packages.iter().filter(|m| m.sender != me) {
        let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
        let (Some(from), Ok(package)) = (
            session.ceremony.identifier_of(&m.sender),
            frost::keys::dkg::round1::Package::deserialize(payload),
        ) else {
            return Err(format!("malformed round-1 package from {}", m.sender));
        };
        received.insert(from, package);
    }
    Ok(received)
}

/// Marks a ceremony id as used: it is never started again, also after a restart.
fn first_use(
    config: &GuardianConfig,
    sessions: &HashMap<String, Session>,
    ceremony_id: &str,
) -> Result<(), String> {
    let marker = config.data_dir.join("ceremonies").join(ceremony_id);
    if sessions.contains_key(ceremony_id) || write_private(&marker, b"").is_err() {
        return Err(format!(
            "ceremony {ceremony_id} was already started here (replay)"
        ));
    }
    Ok(())
}

/// A session for a roster, with the inbox that checks its members' messages.
fn session(
    ceremony_id: &str,
    me: &str,
    min_signers: u16,
    roster: Vec<RosterEntry>,
    stage: Stage,
) -> Result<Session, String> {
    let publics: Vec<GuardianPublic> = roster.iter().map(|e| e.guardian.clone()).collect();
    let ceremony = Ceremony::new(
        ceremony_id,
        min_signers,
        roster
            .into_iter()
            .map(|RosterEntry { index, guardian }| (index, guardian)),
    )
    .map_err(|e| e.to_string())?;
    let inbox = Inbox::new(ceremony_id, me, &publics).map_err(|e| e.to_string())?;
    Ok(Session {
        ceremony,
        inbox,
        stage,
        started: Instant::now(),
    })
}

fn refresh_start(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    wallet: &str,
    roster: Vec<RosterEntry>,
) -> GuardianReply {
    if let Err(e) = validate_token("wallet", wallet) {
        return refused(e);
    }
    let share = match load_share(config, wallet) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    let Some(threshold) = share.public.min_signers() else {
        return refused("the wallet's public key package has no threshold");
    };
    let participants: BTreeSet<Identifier> =
        share.public.verifying_shares().keys().copied().collect();
    let roster_ids: BTreeSet<Identifier> = roster
        .iter()
        .filter_map(|e| Identifier::try_from(e.index).ok())
        .collect();
    // Fewer than the wallet's guardians removes the others (checked against
    // the threshold by the lifecycle step); it takes effect once recorded.
    if !roster_ids.is_subset(&participants) {
        return refused("the roster names someone who is not a guardian of the wallet");
    }
    if let Err(reason) = first_use(config, sessions, ceremony_id) {
        return refused(reason);
    }
    let me = *share.key.identifier();
    let (state, package) =
        match lifecycle::refresh_start(&share.public, &roster_ids, me, &mut OsRng) {
            Ok(v) => v,
            Err(e) => return refused(e),
        };
    let bytes = match package.serialize() {
        Ok(b) => b,
        Err(e) => return refused(e),
    };
    match session(
        ceremony_id,
        keys.id(),
        threshold,
        roster,
        Stage::Refresh1(state, Box::new(share)),
    ) {
        Ok(s) => {
            sessions.insert(ceremony_id.to_string(), s);
            GuardianReply::Package {
                message: keys.sign_message(ceremony_id, None, rounds::PACKAGES, bytes),
            }
        }
        Err(reason) => refused(reason),
    }
}

fn refresh_shares(
    keys: &GuardianKeys,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    packages: &[SignedMessage],
) -> GuardianReply {
    let Some(session) = sessions.get_mut(ceremony_id) else {
        return refused(format!("no ceremony {ceremony_id} in progress here"));
    };
    let received = match read_packages(session, keys.id(), packages) {
        Ok(r) => r,
        Err(reason) => return refused(reason),
    };
    session.inbox.advance_to(rounds::SHARES);
    let Stage::Refresh1(state, share) = std::mem::replace(&mut session.stage, Stage::Done) else {
        return refused("this ceremony is not waiting for refresh packages");
    };
    let (next, outgoing) = match state.round2(&received) {
        Ok(v) => v,
        Err(e) => {
            sessions.remove(ceremony_id);
            return refused(e);
        }
    };
    let mut shares = Vec::new();
    for (to, package) in outgoing {
        let Some(recipient) = session.ceremony.members.get(&to) else {
            return refused("a refresh package for a non-member");
        };
        let sealed = package
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|b| {
                seal_to(
                    keys,
                    recipient,
                    &Zeroizing::new(b),
                    ceremony_id,
                    lifecycle::PURPOSE_REFRESH_ROUND2,
                )
            });
        match sealed {
            Ok(sealed) => shares.push(keys.sign_message(
                ceremony_id,
                Some(&recipient.id),
                rounds::SHARES,
                codec::to_msgpack(&sealed),
            )),
            Err(e) => return refused(e),
        }
    }
    session.stage = Stage::Refresh2(next, share);
    GuardianReply::Sealed { shares }
}

fn refresh_finalize(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    shares: &[SignedMessage],
) -> GuardianReply {
    let Some(session) = sessions.get_mut(ceremony_id) else {
        return refused(format!("no ceremony {ceremony_id} in progress here"));
    };
    let mut received = BTreeMap::new();
    for m in shares {
        let opened = open_signed(keys, session, m, lifecycle::PURPOSE_REFRESH_ROUND2).and_then(
            |(from, plain)| {
                frost::keys::dkg::round2::Package::deserialize(&plain)
                    .map(|p| (from, p))
                    .map_err(|e| format!("refresh share from {}: {e}", m.sender))
            },
        );
        match opened {
            Ok((from, package)) => {
                received.insert(from, package);
            }
            Err(e) => return refused(e),
        }
    }
    session.inbox.advance_to(rounds::RESULT);
    let Stage::Refresh2(state, share) = std::mem::replace(&mut session.stage, Stage::Done) else {
        return refused("this ceremony is not waiting for its final round");
    };
    let result = state
        .finish(&received, &share.public, &share.key)
        .map_err(|e| e.to_string())
        .and_then(|(key, public)| {
            let digest = lifecycle::public_digest(&public).map_err(|e| e.to_string())?;
            let group = public
                .verifying_key()
                .serialize()
                .map_err(|e| e.to_string())?;
            save_share(
                config,
                &pending_path(config, ceremony_id),
                ceremony_id,
                &key,
                &public,
            )?;
            Ok((group, digest))
        });
    match result {
        Ok((mut payload, digest)) => {
            payload.extend_from_slice(&digest);
            GuardianReply::Result {
                message: keys.sign_message(ceremony_id, None, rounds::RESULT, payload),
            }
        }
        Err(reason) => {
            sessions.remove(ceremony_id);
            refused(reason)
        }
    }
}

/// Seals a secret value from this guardian to a ceremony member.
fn seal_to(
    keys: &GuardianKeys,
    recipient: &GuardianPublic,
    secret: &[u8],
    ceremony_id: &str,
    purpose: &str,
) -> Result<Sealed, String> {
    keys.seal_to(recipient, secret, ceremony_id, purpose, &mut OsRng)
        .map_err(|e| e.to_string())
}

/// Checks a signed message sealed to this guardian and opens it: the sender's
/// identifier and the plaintext.
fn open_signed(
    keys: &GuardianKeys,
    session: &mut Session,
    m: &SignedMessage,
    purpose: &str,
) -> Result<(Identifier, Zeroizing<Vec<u8>>), String> {
    let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
    let from = session
        .ceremony
        .identifier_of(&m.sender)
        .ok_or_else(|| format!("{purpose} from {}, not a member", m.sender))?;
    let plain = codec::from_msgpack::<Sealed>(payload)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            keys.open(&s, &session.ceremony.id, &m.sender, purpose)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{purpose} from {}: {e}", m.sender))?;
    Ok((from, plain))
}

/// FROST identifiers from roster indices.
fn identifiers(indices: &[u16]) -> Result<BTreeSet<Identifier>, String> {
    indices
        .iter()
        .map(|i| Identifier::try_from(*i).map_err(|_| format!("identifier {i} is zero")))
        .collect()
}

/// A member of the wallet starts adding `newcomer`: a helper computes the
/// repair deltas (its own kept, the others' sealed to them); a member that does
/// not help just waits to admit the newcomer's verifying share.
fn repair_start(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    wallet: &str,
    joining: Joining,
) -> GuardianReply {
    let Joining {
        roster,
        helpers,
        newcomer,
    } = joining;
    let started = (|| {
        validate_token("wallet", wallet).map_err(|e| e.to_string())?;
        let share = load_share(config, wallet)?;
        let threshold = share
            .public
            .min_signers()
            .ok_or("the wallet's public key package has no threshold")?;
        let members: BTreeSet<Identifier> =
            share.public.verifying_shares().keys().copied().collect();
        let newcomer = Identifier::try_from(newcomer).map_err(|e| e.to_string())?;
        let helpers = identifiers(&helpers)?;
        // A member's own identifier: its lost share is repaired (the gate
        // checked that the approved change asks for exactly that).
        let mut expected = members.clone();
        expected.insert(newcomer);
        if helpers.contains(&newcomer) {
            return Err("the guardian given a share cannot help compute it".to_string());
        }
        let roster_ids = identifiers(&roster.iter().map(|e| e.index).collect::<Vec<_>>())?;
        if roster_ids != expected {
            return Err("the roster does not name the wallet's guardians and the newcomer".into());
        }
        if !helpers.is_subset(&members) {
            return Err("a helper is not a guardian of the wallet".into());
        }
        first_use(config, sessions, ceremony_id)?;
        let me = *share.key.identifier();
        let mut session = session(ceremony_id, keys.id(), threshold, roster, Stage::Done)?;
        let mut sealed = Vec::new();
        session.stage = if helpers.contains(&me) {
            let list: Vec<Identifier> = helpers.iter().copied().collect();
            let mut deltas = lifecycle::repair_help(&list, &share.key, newcomer, &mut OsRng)
                .map_err(|e| e.to_string())?;
            let own = deltas.remove(&me).ok_or("no delta of my own")?;
            for (to, delta) in deltas {
                let recipient = session
                    .ceremony
                    .members
                    .get(&to)
                    .ok_or("a repair delta for a non-member")?;
                let s = seal_to(
                    keys,
                    recipient,
                    &Zeroizing::new(delta.serialize()),
                    ceremony_id,
                    lifecycle::PURPOSE_REPAIR_DELTA,
                )?;
                sealed.push(keys.sign_message(
                    ceremony_id,
                    Some(&recipient.id),
                    rounds::SHARES,
                    codec::to_msgpack(&s),
                ));
            }
            Stage::Repair1 {
                own,
                helpers,
                newcomer,
                share: Box::new(share),
            }
        } else {
            Stage::Admit(newcomer, Box::new(share))
        };
        sessions.insert(ceremony_id.to_string(), session);
        Ok(sealed)
    })();
    match started {
        Ok(shares) => GuardianReply::Sealed { shares },
        Err(reason) => refused(reason),
    }
}

/// A helper combines every helper's delta into its sigma for the newcomer.
fn repair_combine(
    keys: &GuardianKeys,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    deltas: &[SignedMessage],
) -> GuardianReply {
    let Some(session) = sessions.get_mut(ceremony_id) else {
        return refused(format!("no ceremony {ceremony_id} in progress here"));
    };
    let Stage::Repair1 {
        own,
        helpers,
        newcomer,
        share,
    } = std::mem::replace(&mut session.stage, Stage::Done)
    else {
        return refused("this ceremony is not waiting for repair deltas");
    };
    let combined = (|| {
        let mut received = vec![own];
        let mut from = BTreeSet::new();
        for m in deltas {
            let (sender, plain) = open_signed(keys, session, m, lifecycle::PURPOSE_REPAIR_DELTA)?;
            if !helpers.contains(&sender) || !from.insert(sender) {
                return Err(format!("an unexpected repair delta from {}", m.sender));
            }
            received.push(Delta::deserialize(&plain).map_err(|e| e.to_string())?);
        }
        if received.len() != helpers.len() {
            return Err(format!(
                "{} repair deltas for {} helpers",
                received.len(),
                helpers.len()
            ));
        }
        let sigma = Zeroizing::new(lifecycle::repair_combine(&received).serialize());
        let recipient = session
            .ceremony
            .members
            .get(&newcomer)
            .ok_or("the newcomer is not in the roster")?;
        let payload = RepairSigma {
            sigma: seal_to(
                keys,
                recipient,
                &sigma,
                ceremony_id,
                lifecycle::PURPOSE_REPAIR_SIGMA,
            )?,
            public_key_package: share.public_bytes.clone(),
        };
        Ok(keys.sign_message(
            ceremony_id,
            Some(&recipient.id),
            rounds::SHARES,
            codec::to_msgpack(&payload),
        ))
    })();
    match combined {
        Ok(message) => {
            session.stage = Stage::Admit(newcomer, share);
            GuardianReply::Sealed {
                shares: vec![message],
            }
        }
        Err(reason) => {
            sessions.remove(ceremony_id);
            refused(reason)
        }
    }
}

/// The newcomer computes its share from the helpers' sigmas and keeps it
/// (pending); its signed result carries its verifying share for the members.
fn repair_finish(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    joining: Joining,
    sigmas: &[SignedMessage],
) -> GuardianReply {
    let Joining {
        roster,
        helpers,
        newcomer,
    } = joining;
    let finished = (|| {
        let me = Identifier::try_from(newcomer).map_err(|e| e.to_string())?;
        let helpers = identifiers(&helpers)?;
        first_use(config, sessions, ceremony_id)?;
        // The threshold arrives with the public key package; the roster only
        // authenticates the helpers here.
        let n = u16::try_from(helpers.len()).map_err(|_| "too many helpers")?;
        let mut session = session(ceremony_id, keys.id(), n, roster, Stage::Done)?;
        if session.ceremony.members.get(&me) != Some(&keys.public()) {
            return Err(format!(
                "the roster does not name me as identifier {newcomer}"
            ));
        }
        let mut received = Vec::new();
        let mut from = BTreeSet::new();
        let mut public: Option<Vec<u8>> = None;
        for m in sigmas {
            let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
            let sender = session.ceremony.identifier_of(&m.sender);
            if !sender.is_some_and(|s| helpers.contains(&s) && from.insert(s)) {
                return Err(format!("an unexpected sigma from {}", m.sender));
            }
            let RepairSigma {
                sigma,
                public_key_package,
            } = codec::from_msgpack(payload)
                .map_err(|e| format!("malformed sigma from {}: {e}", m.sender))?;
            if public.get_or_insert_with(|| public_key_package.clone()) != &public_key_package {
                return Err(format!(
                    "helper {} sent another public key package",
                    m.sender
                ));
            }
            let plain = keys
                .open(
                    &sigma,
                    ceremony_id,
                    &m.sender,
                    lifecycle::PURPOSE_REPAIR_SIGMA,
                )
                .map_err(|e| format!("sigma from {}: {e}", m.sender))?;
            received.push(Sigma::deserialize(&plain).map_err(|e| e.to_string())?);
        }
        if from.len() != helpers.len() {
            return Err(format!(
                "{} sigmas for {} helpers",
                from.len(),
                helpers.len()
            ));
        }
        let public = PublicKeyPackage::deserialize(&public.unwrap_or_default())
            .map_err(|e| format!("public key package: {e}"))?;
        let (key, public) =
            lifecycle::repair_finish(&received, me, &public).map_err(|e| e.to_string())?;
        let mut payload = public
            .verifying_key()
            .serialize()
            .map_err(|e| e.to_string())?;
        payload.extend_from_slice(&lifecycle::public_digest(&public).map_err(|e| e.to_string())?);
        payload.extend(
            key.verifying_share()
                .serialize()
                .map_err(|e| e.to_string())?,
        );
        save_share(
            config,
            &pending_path(config, ceremony_id),
            ceremony_id,
            &key,
            &public,
        )?;
        sessions.insert(ceremony_id.to_string(), session);
        Ok(keys.sign_message(ceremony_id, None, rounds::RESULT, payload))
    })();
    match finished {
        Ok(message) => GuardianReply::Result { message },
        Err(reason) => refused(reason),
    }
}

/// A member adds the newcomer's verifying share to its public key package
/// (pending), refusing a newcomer whose group key or package differs.
fn repair_admit(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    result: &SignedMessage,
) -> GuardianReply {
    let Some(session) = sessions.get_mut(ceremony_id) else {
        return refused(format!("no ceremony {ceremony_id} in progress here"));
    };
    let Stage::Admit(newcomer, share) = std::mem::replace(&mut session.stage, Stage::Done) else {
        return refused("this ceremony is not waiting for the newcomer");
    };
    session.inbox.advance_to(rounds::RESULT);
    let admitted = (|| {
        let payload = session.inbox.accept(result).map_err(|e| e.to_string())?;
        if session.ceremony.identifier_of(&result.sender) != Some(newcomer) {
            return Err(format!("a result from {}, not the newcomer", result.sender));
        }
        let (Some(group), Some(digest), Some(verifying)) =
            (payload.get(..33), payload.get(33..65), payload.get(65..))
        else {
            return Err("the newcomer's result is too short".to_string());
        };
        let mine = share
            .public
            .verifying_key()
            .serialize()
            .map_err(|e| e.to_string())?;
        if group != mine.as_slice() {
            return Err("the newcomer computed another group key".into());
        }
        let verifying = VerifyingShare::deserialize(verifying).map_err(|e| e.to_string())?;
        // A repaired share must be the very one the wallet recorded.
        if share
            .public
            .verifying_shares()
            .get(&newcomer)
            .is_some_and(|recorded| *recorded != verifying)
        {
            return Err("the repaired share is not the one the wallet recorded".into());
        }
        let public = lifecycle::with_member(&share.public, newcomer, verifying);
        let own = lifecycle::public_digest(&public).map_err(|e| e.to_string())?;
        if digest != own.as_slice() {
            return Err("the newcomer's public key package differs from mine".into());
        }
        save_share(
            config,
            &pending_path(config, ceremony_id),
            ceremony_id,
            &share.key,
            &public,
        )?;
        let mut payload = mine;
        payload.extend_from_slice(&own);
        Ok(keys.sign_message(ceremony_id, None, rounds::RESULT, payload))
    })();
    match admitted {
        Ok(message) => GuardianReply::Result { message },
        Err(reason) => {
            sessions.remove(ceremony_id);
            refused(reason)
        }
    }
}

/// A member starts changing the wallet's threshold: it deals its
/// Lagrange-weighted share to every member under the new threshold (the
/// dealing broadcast, each other member's sub-share sealed to it).
fn reshare_start(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    wallet: &str,
    min_signers: u16,
    roster: Vec<RosterEntry>,
) -> GuardianReply {
    let started = (|| {
        validate_token("wallet", wallet).map_err(|e| e.to_string())?;
        let share = load_share(config, wallet)?;
        let members: BTreeSet<Identifier> =
            share.public.verifying_shares().keys().copied().collect();
        let roster_ids = identifiers(&roster.iter().map(|e| e.index).collect::<Vec<_>>())?;
        if roster_ids != members {
            return Err("the roster does not name the wallet's guardians".to_string());
        }
        let params = Redistribution::new(
            ceremony_id,
            share.public.clone(),
            members.clone(),
            min_signers,
            members,
        )
        .map_err(|e| e.to_string())?;
        first_use(config, sessions, ceremony_id)?;
        let mut session = session(ceremony_id, keys.id(), min_signers, roster, Stage::Done)?;
        let me = *share.key.identifier();
        let (dealing, mut subs) =
            reshare::deal(&params, &share.key, &mut OsRng).map_err(|e| e.to_string())?;
        let own = subs.remove(&me).ok_or("no sub-share of my own")?;
        let mut sealed = Vec::new();
        for (to, sub) in &subs {
            let recipient = session
                .ceremony
                .members
                .get(to)
                .ok_or("a sub-share for a non-member")?;
            let s = reshare::seal_sub_share(keys, recipient, ceremony_id, sub, &mut OsRng)
                .map_err(|e| e.to_string())?;
            sealed.push(keys.sign_message(
                ceremony_id,
                Some(&recipient.id),
                rounds::SHARES,
                codec::to_msgpack(&s),
            ));
        }
        let broadcast = keys.sign_message(
            ceremony_id,
            None,
            rounds::PACKAGES,
            codec::to_msgpack(&dealing),
        );
        session.stage = Stage::Reshare {
            params: Box::new(params),
            own: Box::new((dealing, own)),
        };
        sessions.insert(ceremony_id.to_string(), session);
        Ok((broadcast, sealed))
    })();
    match started {
        Ok((dealing, shares)) => GuardianReply::Dealt { dealing, shares },
        Err(reason) => refused(reason),
    }
}

/// A member checks every dealing and the sub-shares sealed to it (naming a
/// bad dealer), keeps its new share (pending) and signs the group key and the
/// redistribution transcript.
fn reshare_finalize(
    keys: &GuardianKeys,
    config: &GuardianConfig,
    sessions: &mut HashMap<String, Session>,
    ceremony_id: &str,
    dealings: &[SignedMessage],
    shares: &[SignedMessage],
) -> GuardianReply {
    let Some(session) = sessions.get_mut(ceremony_id) else {
        return refused(format!("no ceremony {ceremony_id} in progress here"));
    };
    let Stage::Reshare { params, own } = std::mem::replace(&mut session.stage, Stage::Done) else {
        return refused("this ceremony is not waiting for dealings");
    };
    let (own_dealing, own_sub) = *own;
    let finished = (|| {
        let me = own_dealing.dealer;
        let mut received = BTreeMap::from([(me, own_dealing)]);
        for m in dealings.iter().filter(|m| m.sender != keys.id()) {
            let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
            let from = session.ceremony.identifier_of(&m.sender);
            let dealing: Dealing = codec::from_msgpack(payload)
                .map_err(|e| format!("malformed dealing from {}: {e}", m.sender))?;
            if from != Some(dealing.dealer) || received.contains_key(&dealing.dealer) {
                return Err(format!("an unexpected dealing from {}", m.sender));
            }
            reshare::verify_dealing(&params, &dealing)
                .map_err(|e| format!("dealing from {}: {e}", m.sender))?;
            received.insert(dealing.dealer, dealing);
        }
        session.inbox.advance_to(rounds::SHARES);
        let mut subs = BTreeMap::from([(me, own_sub)]);
        for m in shares {
            let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
            let from = session
                .ceremony
                .identifier_of(&m.sender)
                .ok_or_else(|| format!("a sub-share from {}, not a member", m.sender))?;
            let sealed: Sealed = codec::from_msgpack(payload)
                .map_err(|e| format!("malformed sub-share from {}: {e}", m.sender))?;
            let sub = reshare::open_sub_share(keys, &sealed, ceremony_id, &m.sender, from)
                .map_err(|e| format!("guardian {}: {e}", m.sender))?;
            if subs.insert(from, sub).is_some() {
                return Err(format!("two sub-shares from {}", m.sender));
            }
        }
        session.inbox.advance_to(rounds::RESULT);
        let (key, public) =
            reshare::combine(&params, &me, &received, &subs).map_err(|e| e.to_string())?;
        let transcript = reshare::transcript(&params, &received).map_err(|e| e.to_string())?;
        save_share(
            config,
            &pending_path(config, ceremony_id),
            ceremony_id,
            &key,
            &public,
        )?;
        let mut payload = public
            .verifying_key()
            .serialize()
            .map_err(|e| e.to_string())?;
        payload.extend_from_slice(&transcript);
        Ok(keys.sign_message(ceremony_id, None, rounds::RESULT, payload))
    })();
    match finished {
        Ok(message) => GuardianReply::Result { message },
        Err(reason) => {
            sessions.remove(ceremony_id);
            refused(reason)
        }
    }
}

type Round2Inputs = (BTreeMap<Identifier, Sealed>, BTreeMap<Identifier, Echo>);

/// Checks the shares addressed to this guardian and every other member's echo.
fn read_round2(
    session: &mut Session,
    me: &str,
    shares: &[SignedMessage],
    echoes: &[SignedMessage],
) -> Result<Round2Inputs, String> {
    let mut sealed = BTreeMap::new();
    for m in shares {
        let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
        let from = session
            .ceremony
            .identifier_of(&m.sender)
            .ok_or_else(|| format!("share from {}, not a member", m.sender))?;
        let s: Sealed = codec::from_msgpack(payload)
            .map_err(|e| format!("malformed share from {}: {e}", m.sender))?;
        sealed.insert(from, s);
    }
    session.inbox.advance_to(rounds::ECHOES);
    let mut received = BTreeMap::new();
    for m in echoes.iter().filter(|m| m.sender != me) {
        let payload = session.inbox.accept(m).map_err(|e| e.to_string())?;
        let from = session
            .ceremony
            .identifier_of(&m.sender)
            .ok_or_else(|| format!("echo from {}, not a member", m.sender))?;
        let echo =
            Echo::from_bytes(payload).ok_or_else(|| format!("malformed echo from {}", m.sender))?;
        received.insert(from, echo);
    }
    session.inbox.advance_to(rounds::RESULT);
    Ok((sealed, received))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn identity_path(config: &GuardianConfig) -> PathBuf {
    config.data_dir.join("identity.key")
}

fn pending_path(config: &GuardianConfig, ceremony_id: &str) -> PathBuf {
    config
        .data_dir
        .join("shares")
        .join(format!("pending-{ceremony_id}.share"))
}

fn share_path(config: &GuardianConfig, wallet: &str) -> PathBuf {
    config
        .data_dir
        .join("shares")
        .join(format!("{wallet}.share"))
}

/// Names the ceremony a wallet's share file is bound to (its associated data).
fn ceremony_path(config: &GuardianConfig, wallet: &str) -> PathBuf {
    config
        .data_dir
        .join("shares")
        .join(format!("{wallet}.ceremony"))
}

/// The wallet's current share, decrypted. A commit interrupted between its two
/// renames left the new share beside the staged marker: finish it.
pub(crate) fn load_share(config: &GuardianConfig, wallet: &str) -> Result<Share, String> {
    let missing = |e: std::io::Error| format!("no share for wallet {wallet} here: {e}");
    let marker = ceremony_path(config, wallet);
    let staged = marker.with_extension("ceremony.new");
    let file = std::fs::read(share_path(config, wallet)).map_err(missing)?;
    let open = |ceremony: &str| {
        store::open_secret(
            &file,
            config.passphrase.as_bytes(),
            &config.id,
            ceremony.trim(),
        )
    };
    let ceremony = std::fs::read_to_string(&marker).map_err(missing)?;
    let plain = match open(&ceremony) {
        Ok(p) => p,
        Err(first) => {
            let Ok(interrupted) = std::fs::read_to_string(&staged) else {
                return Err(first.to_string());
            };
            let plain = open(&interrupted).map_err(|_| first.to_string())?;
            std::fs::rename(&staged, &marker).map_err(|e| format!("{}: {e}", marker.display()))?;
            plain
        }
    };
    let len = plain
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or("share file too short")? as usize;
    let (key, public) = plain
        .get(4..)
        .and_then(|rest| (rest.len() >= len).then(|| rest.split_at(len)))
        .ok_or("share file too short")?;
    let key = KeyPackage::deserialize(key).map_err(|e| format!("share file: {e}"))?;
    let public = PublicKeyPackage::deserialize(public).map_err(|e| format!("share file: {e}"))?;
    // Serialized again rather than kept from the file: every guardian must
    // report the package in the encoding of the code it runs now.
    let public_bytes = public.serialize().map_err(|e| format!("share file: {e}"))?;
    let group_key_hex = public
        .verifying_key()
        .serialize()
        .map(hex::encode)
        .map_err(|e| format!("share file: {e}"))?;
    Ok(Share {
        tweaked: TweakedKey::new(&key),
        key,
        public,
        public_bytes,
        group_key_hex,
    })
}

/// Makes a ceremony's pending share the wallet's (replacing the previous one
/// after a rotation), then records which ceremony it is bound to.
fn commit_share(config: &GuardianConfig, ceremony_id: &str, wallet: &str) -> Result<(), String> {
    let pending = pending_path(config, ceremony_id);
    if !pending.exists() {
        return Err(format!("no pending share for ceremony {ceremony_id}"));
    }
    let marker = ceremony_path(config, wallet);
    let staged = marker.with_extension("ceremony.new");
    let _ = std::fs::remove_file(&staged);
    write_private(&staged, ceremony_id.as_bytes())
        .map_err(|e| format!("{}: {e}", staged.display()))?;
    std::fs::rename(&pending, share_path(config, wallet))
        .map_err(|e| format!("{}: {e}", pending.display()))?;
    std::fs::rename(&staged, &marker).map_err(|e| format!("{}: {e}", marker.display()))
}

/// Drops this guardian's share of a wallet whose recorded roster no longer
/// lists it (and anything a ceremony left pending).
fn forget_share(config: &GuardianConfig, ceremony_id: &str, wallet: &str) -> Result<(), String> {
    let _ = std::fs::remove_file(pending_path(config, ceremony_id));
    for path in [share_path(config, wallet), ceremony_path(config, wallet)] {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {e}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Loads the guardian's identity, creating it on first start.
fn load_or_create_identity(config: &GuardianConfig) -> Result<GuardianKeys, GuardianError> {
    let path = identity_path(config);
    let err = |reason: String| GuardianError::Store {
        path: path.clone(),
        reason,
    };
    if path.exists() {
        let file = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
        let secret = store::open_secret(&file, config.passphrase.as_bytes(), &config.id, IDENTITY)
            .map_err(|e| err(e.to_string()))?;
        if secret.len() != 64 {
            return Err(err("identity file holds the wrong number of bytes".into()));
        }
        let mut signing = Zeroizing::new([0u8; 32]);
        let mut encryption = Zeroizing::new([0u8; 32]);
        signing.copy_from_slice(&secret[..32]);
        encryption.copy_from_slice(&secret[32..]);
        return Ok(GuardianKeys::from_secrets(
            &config.id,
            &signing,
            &encryption,
        ));
    }
    let keys = GuardianKeys::generate(&config.id, &mut OsRng);
    let (signing, encryption) = keys.to_secrets();
    let mut secret = Zeroizing::new(Vec::with_capacity(64));
    secret.extend_from_slice(signing.as_ref());
    secret.extend_from_slice(encryption.as_ref());
    let file = store::seal_secret(
        &secret,
        config.passphrase.as_bytes(),
        &config.id,
        IDENTITY,
        &mut OsRng,
    )
    .map_err(|e| err(e.to_string()))?;
    write_private(&path, &file).map_err(|e| err(e.to_string()))?;
    Ok(keys)
}

/// What the identity file is bound to, in place of a wallet id.
const IDENTITY: &str = "guardian-identity";

/// Writes a DKG output (key package and public key package) encrypted, bound to
/// this guardian and the ceremony (which `WALLET_CREATED` records).
fn save_share(
    config: &GuardianConfig,
    path: &Path,
    ceremony_id: &str,
    key_package: &KeyPackage,
    public_key_package: &PublicKeyPackage,
) -> Result<(), String> {
    let key = Zeroizing::new(key_package.serialize().map_err(|e| e.to_string())?);
    let public = public_key_package.serialize().map_err(|e| e.to_string())?;
    let mut plain = Zeroizing::new(Vec::with_capacity(key.len() + public.len() + 8));
    plain.extend_from_slice(&(key.len() as u32).to_be_bytes());
    plain.extend_from_slice(&key);
    plain.extend_from_slice(&public);
    let file = store::seal_secret(
        &plain,
        config.passphrase.as_bytes(),
        &config.id,
        ceremony_id,
        &mut OsRng,
    )
    .map_err(|e| e.to_string())?;
    write_private(path, &file).map_err(|e| format!("{}: {e}", path.display()))
}
