//! A guardian's side of threshold signing: it is never a signing oracle. Before
//! it commits to nonces, and again before it releases a share, it checks the
//! workflow in its own verified replica of the trail ([`signing::check`]) and
//! recomputes every sighash from the recorded transaction; it signs a package
//! only if its message is one of those. Nonces live in memory only (drawn
//! ahead into a pool), once; the session's id, claimed in round 1 in the
//! guardian's session log ([`SessionLog`]), is on disk before any share leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use custos_custody::frost::SigningPackage;
use custos_custody::sign::{self, Preprocessed, Sighash, Signer};
use custos_schemas::validate_token;
use rand::rngs::OsRng;

use crate::guardian::{GuardianConfig, Share, load_share};
use crate::session_log::{Durable, SessionLog};
use crate::signing::{self, SignReply, SignRequest};
use crate::trail::Trail;

/// Committed sessions not signed within this are forgotten (their nonces too).
const SESSION_TTL: Duration = Duration::from_secs(120);
/// Nonces kept drawn ahead per wallet (FROST preprocessing): a commitment then
/// costs no curve arithmetic while the coordinator waits.
const NONCE_POOL: usize = 8;

struct Prepared {
    workflow_id: String,
    wallet: String,
    sighashes: Vec<Sighash>,
    started: Instant,
    /// The session's claim being written: awaited before any share leaves.
    claim: Durable,
}

/// Nonces drawn for one share of a wallet (a rotation makes another share).
struct Pool {
    share: Arc<Share>,
    nonces: Vec<Preprocessed>,
}

#[derive(Default)]
struct State {
    signer: Signer,
    prepared: HashMap<String, Prepared>,
    /// Decrypted shares by wallet: argon2id runs once per wallet, not per signing.
    shares: HashMap<String, Arc<Share>>,
    pools: HashMap<String, Pool>,
    /// Each wallet's Taproot script, for the share and chain it was made from.
    scripts: HashMap<String, (Arc<Share>, String, Vec<u8>)>,
}

impl State {
    /// Forgets sessions committed too long ago, and drops their nonces.
    fn expire(&mut self) {
        let State {
            signer, prepared, ..
        } = self;
        prepared.retain(|session_id, p| {
            let live = p.started.elapsed() < SESSION_TTL;
            if !live {
                for i in 0..p.sighashes.len() {
                    signer.discard(&input_session(session_id, i));
                }
            }
            live
        });
    }

    /// Drawn nonces for `share` of `wallet`, or none if they were drawn for
    /// another share.
    fn take_nonces(&mut self, wallet: &str, share: &Arc<Share>) -> Option<Preprocessed> {
        let pool = self.pools.get_mut(wallet)?;
        if !Arc::ptr_eq(&pool.share, share) {
            self.pools.remove(wallet);
            return None;
        }
        pool.nonces.pop()
    }
}

/// A checked workflow: its wallet, the sighashes to sign, and the share.
type Checked = (String, Vec<Sighash>, Arc<Share>);

/// The signer's session of input `i` of a signing session.
fn input_session(session_id: &str, i: usize) -> String {
    format!("{session_id}/{i}")
}

pub(crate) struct SignService {
    config: Arc<GuardianConfig>,
    trail: Trail,
    state: Arc<Mutex<State>>,
    /// Held while a share is decrypted.
    decrypting: Mutex<()>,
    sessions: SessionLog,
}

fn refused(reason: impl std::fmt::Display) -> SignReply {
    SignReply::Refused {
        reason: reason.to_string(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl SignService {
    pub(crate) fn new(config: Arc<GuardianConfig>, trail: Trail) -> Result<Self, String> {
        let sessions = SessionLog::open(&config.data_dir)?;
        Ok(SignService {
            config,
            trail,
            state: Arc::new(Mutex::new(State::default())),
            decrypting: Mutex::new(()),
            sessions,
        })
    }

    /// A rotation replaced the wallet's share: forget the decrypted one.
    pub(crate) fn forget_share(&self, wallet: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.shares.remove(wallet);
            s.pools.remove(wallet);
            s.scripts.remove(wallet);
        }
    }

    /// Tops the wallet's nonce pool up off the request's path.
    fn refill(&self, wallet: String, share: Arc<Share>) {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || {
            let missing = match state.lock() {
                Ok(s) => match s.pools.get(&wallet) {
                    Some(p) if Arc::ptr_eq(&p.share, &share) => {
                        NONCE_POOL.saturating_sub(p.nonces.len())
                    }
                    _ => NONCE_POOL,
                },
                Err(_) => return,
            };
            let drawn: Vec<Preprocessed> = (0..missing)
                .map(|_| sign::preprocess(&share.key, &mut OsRng))
                .collect();
            let Ok(mut s) = state.lock() else { return };
            // The share may have been replaced meanwhile: then these are not for it.
            if s.shares
                .get(&wallet)
                .is_some_and(|cur| Arc::ptr_eq(cur, &share))
            {
                let pool = s.pools.entry(wallet).or_insert_with(|| Pool {
                    share: share.clone(),
                    nonces: Vec::new(),
                });
                if Arc::ptr_eq(&pool.share, &share) {
                    pool.nonces.extend(drawn);
                    pool.nonces.truncate(NONCE_POOL);
                }
            }
        });
    }

    pub(crate) async fn handle(&self, request: SignRequest) -> SignReply {
        match request {
            SignRequest::Commit {
                session_id,
                workflow_id,
            } => self
                .commit(&session_id, &workflow_id)
                .await
                .unwrap_or_else(refused),
            SignRequest::Share {
                session_id,
                packages,
            } => self
                .share(&session_id, &packages)
                .await
                .unwrap_or_else(refused),
        }
    }

    fn wallet_share(&self, wallet: &str) -> Result<Arc<Share>, String> {
        let cached = || -> Result<Option<Arc<Share>>, String> {
            let state = self.state.lock().map_err(|_| "poisoned")?;
            Ok(state.shares.get(wallet).cloned())
        };
        if let Some(s) = cached()? {
            return Ok(s);
        }
        tokio::task::block_in_place(|| {
            // One decryption at a time: the signings that arrive together
            // after a start wait for it instead of each running argon2id
            // (64 MiB) at once, which starved the machine.
            let _decrypting = self.decrypting.lock().map_err(|_| "poisoned")?;
            if let Some(s) = cached()? {
                return Ok(s);
            }
            let share = Arc::new(load_share(&self.config, wallet)?);
            self.state
                .lock()
                .map_err(|_| "poisoned")?
                .shares
                .insert(wallet.to_string(), share.clone());
            Ok(share)
        })
    }

    /// Runs every check on the replica; the sighashes this guardian would sign.
    /// `catch_up`: the replica must hold the whole stream as of the call
    /// (before a commitment); a re-check moments later reads it as it is.
    async fn checked(&self, workflow_id: &str, catch_up: bool) -> Result<Checked, String> {
        if !catch_up {
            return self.check_now(workflow_id)?.1;
        }
        // The checks run while the replica catches up (a round trip to the
        // server for the stream's end, asked first): they stand if the replica
        // was then already at least where catching up brought it, else they
        // run again on the caught-up replica.
        let (caught_up, now) = tokio::join!(
            biased;
            self.trail.read(|view| view.ledger.last_seq()),
            async { self.check_now(workflow_id) },
        );
        let caught_up = caught_up?;
        match now? {
            (seen, checked) if seen >= caught_up => checked,
            _ => self.check_now(workflow_id)?.1,
        }
    }

    /// Every check on the replica as it is now, and the stream sequence it was at.
    fn check_now(&self, workflow_id: &str) -> Result<(u64, Result<Checked, String>), String> {
        let wallet = self.trail.read_current(|view| {
            view.transfer(workflow_id)
                .and_then(|t| t.request.as_ref())
                .map(|r| r.wallet.clone())
        })?;
        let Some(wallet) = wallet else {
            return Ok((
                0,
                Err(format!("workflow {workflow_id} is not in the trail")),
            ));
        };
        let share = match self.wallet_share(&wallet) {
            Ok(s) => s,
            Err(e) => return Ok((0, Err(e))),
        };
        let me = *share.key.identifier();
        let (seq, found) = self.trail.read_current(|view| {
            let found = view.ledger.wallet(&wallet).map(|w| {
                let script = self.wallet_script(&wallet, &share, &w.chain);
                let index = w
                    .guardians
                    .iter()
                    .find(|g| g.id == self.config.id)
                    .map(|g| g.index);
                (
                    script.and_then(|s| signing::check(view, workflow_id, &s, now_ms())),
                    w.group_key.clone(),
                    index,
                )
            });
            (view.ledger.last_seq(), found)
        })?;
        let checked = (|| {
            let (checked, recorded_key, my_index) =
                found.ok_or_else(|| format!("wallet {wallet} is not in the trail"))?;
            if recorded_key.as_deref() != Some(share.group_key_hex.as_str()) {
                return Err(format!(
                    "my share of {wallet} is not of the key the trail records"
                ));
            }
            if my_index.and_then(|i| custos_custody::Identifier::try_from(i).ok()) != Some(me) {
                return Err(format!(
                    "the trail does not list me as a guardian of {wallet}"
                ));
            }
            let (_, checked) = checked?;
            let sighashes = checked.sighashes().map_err(|e| e.to_string())?;
            Ok((wallet.clone(), sighashes, share.clone()))
        })();
        Ok((seq, checked))
    }

    /// The wallet's Taproot script from this guardian's share (the tweak is
    /// computed once per share and chain).
    fn wallet_script(
        &self,
        wallet: &str,
        share: &Arc<Share>,
        chain: &str,
    ) -> Result<Vec<u8>, String> {
        let cached = self.state.lock().ok().and_then(|s| {
            s.scripts
                .get(wallet)
                .filter(|(of, on, _)| Arc::ptr_eq(of, share) && on == chain)
                .map(|(_, _, script)| script.clone())
        });
        if let Some(script) = cached {
            return Ok(script);
        }
        let script = custos_custody::address::wallet(share.public.verifying_key(), chain)
            .map(|t| t.script_pubkey.to_vec())
            .map_err(|e| e.to_string())?;
        if let Ok(mut s) = self.state.lock() {
            s.scripts.insert(
                wallet.to_string(),
                (share.clone(), chain.to_string(), script.clone()),
            );
        }
        Ok(script)
    }

    async fn commit(&self, session_id: &str, workflow_id: &str) -> Result<SignReply, String> {
        validate_token("sessionId", session_id).map_err(|e| e.to_string())?;
        validate_token("workflowId", workflow_id).map_err(|e| e.to_string())?;
        // A replay is refused before any work.
        if self.sessions.claimed(session_id) {
            return Err(format!("session {session_id} was already consumed"));
        }
        // Checks that fail claim nothing: the id may be used again.
        let (wallet, sighashes, share) = self.checked(workflow_id, true).await?;
        let mut commitments = Vec::with_capacity(sighashes.len());
        {
            let mut state = self.state.lock().map_err(|_| "poisoned")?;
            state.expire();
            if state.prepared.contains_key(session_id) {
                return Err(format!("session {session_id} is already open"));
            }
            // The claim is written while the commitments travel and round 2
            // comes; round 2 waits for it before any share leaves, so this id
            // never signs again, even after a restart. Claiming is the final
            // test that the id is new. Nonces lost in a crash signed nothing.
            let claim = self.sessions.claim(session_id)?;
            for i in 0..sighashes.len() {
                let nonces = state
                    .take_nonces(&wallet, &share)
                    .unwrap_or_else(|| sign::preprocess(&share.key, &mut OsRng));
                let c = state
                    .signer
                    .commit_preprocessed(&input_session(session_id, i), nonces)
                    .map_err(|e| e.to_string())?;
                commitments.push(c.serialize().map_err(|e| e.to_string())?);
            }
            state.prepared.insert(
                session_id.to_string(),
                Prepared {
                    workflow_id: workflow_id.to_string(),
                    wallet: wallet.clone(),
                    sighashes,
                    started: Instant::now(),
                    claim,
                },
            );
        }
        let reply = SignReply::Committed {
            identifier: share.key.identifier().serialize(),
            commitments,
            public_key_package: share.public_bytes.clone(),
        };
        self.refill(wallet, share);
        Ok(reply)
    }

    async fn share(&self, session_id: &str, packages: &[Vec<u8>]) -> Result<SignReply, String> {
        validate_token("sessionId", session_id).map_err(|e| e.to_string())?;
        let prepared = {
            let mut state = self.state.lock().map_err(|_| "poisoned")?;
            state.expire();
            state.prepared.remove(session_id)
        }
        .ok_or_else(|| format!("no open session {session_id} (unknown, expired or consumed)"))?;
        // The session's nonces are used now or never.
        let discard = || {
            if let Ok(mut s) = self.state.lock() {
                for i in 0..prepared.sighashes.len() {
                    s.signer.discard(&input_session(session_id, i));
                }
            }
        };
        // Check again: approvals, users and the policy may have changed since the commit.
        let checked = self
            .checked(&prepared.workflow_id, false)
            .await
            .and_then(|c| {
                if c.0 != prepared.wallet || c.1 != prepared.sighashes {
                    return Err("the recorded transaction changed since the commitment".into());
                }
                if packages.len() != c.1.len() {
                    return Err(format!(
                        "{} packages for {} inputs",
                        packages.len(),
                        c.1.len()
                    ));
                }
                Ok(c)
            });
        let (_, sighashes, share) = match checked {
            Ok(c) => c,
            Err(e) => {
                discard();
                return Err(e);
            }
        };
        let (shares, first_error) = {
            let mut state = self.state.lock().map_err(|_| "poisoned")?;
            let mut shares = Vec::with_capacity(packages.len());
            let mut first_error = None;
            let members = share.public.verifying_shares();
            // Every input's session is consumed, even after a refusal.
            for (i, (bytes, sighash)) in packages.iter().zip(&sighashes).enumerate() {
                let input = input_session(session_id, i);
                let package = SigningPackage::deserialize(bytes)
                    .map_err(|e| format!("package {i}: {e}"))
                    .and_then(|p| {
                        // A stranger's commitment makes a share no signature can use.
                        match p
                            .signing_commitments()
                            .keys()
                            .find(|id| !members.contains_key(id))
                        {
                            Some(stranger) => Err(format!(
                                "package {i}: signer {} is not a guardian of {}",
                                hex::encode(stranger.serialize()),
                                prepared.wallet
                            )),
                            None => Ok(p),
                        }
                    });
                let result = match package {
                    Ok(p) => state
                        .signer
                        .sign(&input, &share.tweaked, &p, sighash)
                        .map(|s| s.serialize())
                        .map_err(|e| format!("input {i}: {e}")),
                    Err(e) => {
                        state.signer.discard(&input);
                        Err(e)
                    }
                };
                match result {
                    Ok(s) => shares.push(s),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            (shares, first_error)
        };
        if let Some(e) = first_error {
            return Err(e);
        }
        // The shares leave only once the session's claim is on disk.
        match prepared.claim.await {
            Ok(Ok(())) => Ok(SignReply::Shares { shares }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the session log writer stopped".into()),
        }
    }
}
