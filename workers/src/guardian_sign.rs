//! A guardian's side of threshold signing: it is never a signing oracle. Before
//! it commits to nonces, and again before it releases a share, it checks the
//! workflow in its own verified replica of the trail ([`signing::check`]) and
//! recomputes every sighash from the recorded transaction; it signs a package
//! only if its message is one of those. Nonces live in memory only, once; a
//! "session consumed" marker is on disk (fsync) before any share leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use custos_custody::frost::SigningPackage;
use custos_custody::sign::{Sighash, Signer};
use custos_schemas::validate_token;
use rand::rngs::OsRng;

use custos_adapters::files::write_private;

use crate::guardian::{GuardianConfig, Share, load_share};
use crate::signing::{self, SignReply, SignRequest};
use crate::trail::Trail;

/// Committed sessions not signed within this are forgotten (their nonces too).
const SESSION_TTL: Duration = Duration::from_secs(120);

struct Prepared {
    workflow_id: String,
    wallet: String,
    sighashes: Vec<Sighash>,
    started: Instant,
}

#[derive(Default)]
struct State {
    signer: Signer,
    prepared: HashMap<String, Prepared>,
    /// Decrypted shares by wallet: argon2id runs once per wallet, not per signing.
    shares: HashMap<String, Arc<Share>>,
}

pub(crate) struct SignService {
    config: Arc<GuardianConfig>,
    trail: Trail,
    state: Mutex<State>,
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
        std::fs::create_dir_all(config.data_dir.join("sessions"))
            .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
        Ok(SignService {
            config,
            trail,
            state: Mutex::new(State::default()),
        })
    }

    /// A rotation replaced the wallet's share: forget the decrypted one.
    pub(crate) fn forget_share(&self, wallet: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.shares.remove(wallet);
        }
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

    fn marker(&self, session_id: &str) -> std::path::PathBuf {
        self.config.data_dir.join("sessions").join(session_id)
    }

    fn wallet_share(&self, wallet: &str) -> Result<Arc<Share>, String> {
        if let Some(s) = self
            .state
            .lock()
            .map_err(|_| "poisoned")?
            .shares
            .get(wallet)
        {
            return Ok(s.clone());
        }
        let share = Arc::new(tokio::task::block_in_place(|| {
            load_share(&self.config, wallet)
        })?);
        self.state
            .lock()
            .map_err(|_| "poisoned")?
            .shares
            .insert(wallet.to_string(), share.clone());
        Ok(share)
    }

    /// Runs every check on the replica; the sighashes this guardian would sign.
    /// `catch_up`: first wait until the replica holds the whole stream (before a
    /// commitment); a re-check moments later reads the replica as it is.
    async fn checked(
        &self,
        workflow_id: &str,
        catch_up: bool,
    ) -> Result<(String, Vec<Sighash>, Arc<Share>), String> {
        let wallet_of = |view: &crate::trail::TrailView| {
            view.transfer(workflow_id)
                .and_then(|t| t.request.as_ref())
                .map(|r| r.wallet.clone())
        };
        let wallet = if catch_up {
            self.trail.read(wallet_of).await?
        } else {
            self.trail.read_current(wallet_of)?
        }
        .ok_or_else(|| format!("workflow {workflow_id} is not in the trail"))?;
        let share = self.wallet_share(&wallet)?;
        let me = *share.key.identifier();
        let group_key = share.public.verifying_key();
        let (checked, recorded_key, my_index) = self
            .trail
            .read_current(|view| {
                let w = view.ledger.wallet(&wallet)?;
                let script = custos_custody::address::wallet(group_key, &w.chain)
                    .map(|t| t.script_pubkey.to_vec())
                    .map_err(|e| e.to_string());
                let index = w
                    .guardians
                    .iter()
                    .find(|g| g.id == self.config.id)
                    .map(|g| g.index);
                Some((
                    script.and_then(|s| signing::check(view, workflow_id, &s, now_ms())),
                    w.group_key.clone(),
                    index,
                ))
            })?
            .ok_or_else(|| format!("wallet {wallet} is not in the trail"))?;
        let mine = group_key.serialize().map(hex::encode).ok();
        if recorded_key.is_none() || recorded_key != mine {
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
        Ok((wallet, sighashes, share))
    }

    async fn commit(&self, session_id: &str, workflow_id: &str) -> Result<SignReply, String> {
        validate_token("sessionId", session_id).map_err(|e| e.to_string())?;
        validate_token("workflowId", workflow_id).map_err(|e| e.to_string())?;
        if self.marker(session_id).exists() {
            return Err(format!("session {session_id} was already consumed"));
        }
        let (wallet, sighashes, share) = self.checked(workflow_id, true).await?;
        let mut state = self.state.lock().map_err(|_| "poisoned")?;
        state
            .prepared
            .retain(|_, p| p.started.elapsed() < SESSION_TTL);
        if state.prepared.contains_key(session_id) {
            return Err(format!("session {session_id} is already open"));
        }
        let mut commitments = Vec::with_capacity(sighashes.len());
        for i in 0..sighashes.len() {
            let c = state
                .signer
                .commit(&format!("{session_id}/{i}"), &share.key, &mut OsRng)
                .map_err(|e| e.to_string())?;
            commitments.push(c.serialize().map_err(|e| e.to_string())?);
        }
        state.prepared.insert(
            session_id.to_string(),
            Prepared {
                workflow_id: workflow_id.to_string(),
                wallet,
                sighashes,
                started: Instant::now(),
            },
        );
        Ok(SignReply::Committed {
            identifier: share.key.identifier().serialize(),
            commitments,
            public_key_package: share.public.serialize().map_err(|e| e.to_string())?,
        })
    }

    async fn share(&self, session_id: &str, packages: &[Vec<u8>]) -> Result<SignReply, String> {
        validate_token("sessionId", session_id).map_err(|e| e.to_string())?;
        let prepared = self
            .state
            .lock()
            .map_err(|_| "poisoned")?
            .prepared
            .remove(session_id)
            .ok_or_else(|| format!("no open session {session_id} (unknown or consumed)"))?;
        // The session's nonces are used now or never: consumed on disk first.
        let marker = self.marker(session_id);
        tokio::task::block_in_place(|| write_private(&marker, prepared.workflow_id.as_bytes()))
            .map_err(|e| format!("{}: {e}", marker.display()))?;
        let discard = || {
            if let Ok(mut s) = self.state.lock() {
                for i in 0..prepared.sighashes.len() {
                    s.signer.discard(&format!("{session_id}/{i}"));
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
        let mut state = self.state.lock().map_err(|_| "poisoned")?;
        let mut shares = Vec::with_capacity(packages.len());
        let mut first_error = None;
        // Every input's session is consumed, even after a refusal.
        for (i, (bytes, sighash)) in packages.iter().zip(&sighashes).enumerate() {
            let result = SigningPackage::deserialize(bytes)
                .map_err(|e| format!("package {i}: {e}"))
                .and_then(|p| {
                    state
                        .signer
                        .sign(&format!("{session_id}/{i}"), &share.key, &p, sighash)
                        .map_err(|e| format!("input {i}: {e}"))
                })
                .map(|s| s.serialize());
            match result {
                Ok(s) => shares.push(s),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(SignReply::Shares { shares }),
        }
    }
}
