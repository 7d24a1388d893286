//! A guardian's side of threshold signing: it is never a signing oracle.
//!
//! It hands out commitments ahead of any signing (FROST preprocessing), bound
//! to no workflow; their nonces stay in its memory only, each for one
//! package. When asked to sign, it checks the workflow in its own verified
//! replica of the trail, caught up to the stream's end as of the request
//! ([`signing::check`]), recomputes every sighash from the recorded
//! transaction, and signs a package only if its message is one of those. The
//! attempt's id is claimed in the guardian's session log ([`SessionLog`]) and
//! is on disk before any share leaves.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use custos_custody::frost::SigningPackage;
use custos_custody::sign::{self, Preprocessed, Sighash, SignError, Signer};
use custos_schemas::validate_token;
use rand::rngs::OsRng;

use crate::guardian::{GuardianConfig, Share, load_share};
use crate::session_log::SessionLog;
use crate::signing::{self, COMMITMENT_TTL, MAX_PREPROCESS, SignReply, SignRequest};
use crate::trail::Trail;

/// Most nonces a guardian holds for commitments it handed out (about 400
/// bytes each: 26 MB); beyond it the oldest are dropped. A coordinator keeps
/// at most about 100 per wallet it signs for.
const OUTSTANDING: usize = 65_536;

/// What a handed-out commitment may sign for: the wallet, with the share its
/// nonces were drawn with (a rotation makes another share).
type Drawn = (String, Arc<Share>);

struct State {
    signer: Signer<Drawn>,
    /// Decrypted shares by wallet: argon2id runs once per wallet, not per signing.
    shares: std::collections::HashMap<String, Arc<Share>>,
    /// Each wallet's Taproot script, for the share and chain it was made from.
    scripts: std::collections::HashMap<String, (Arc<Share>, String, Vec<u8>)>,
}

impl State {
    /// The outstanding nonces, those older than their lifetime dropped.
    fn signer(&mut self) -> &mut Signer<Drawn> {
        self.signer
            .expire(since_start().saturating_sub(COMMITMENT_TTL.as_millis() as u64));
        &mut self.signer
    }
}

/// A checked workflow: its wallet, the sighashes to sign, and the share.
type Checked = (String, Vec<Sighash>, Arc<Share>);

pub(crate) struct SignService {
    config: Arc<GuardianConfig>,
    trail: Trail,
    state: Mutex<State>,
    /// Held while a share is decrypted.
    decrypting: Mutex<()>,
    sessions: SessionLog,
}

fn refused(reason: impl std::fmt::Display) -> SignReply {
    SignReply::Refused {
        reason: reason.to_string(),
    }
}

/// Wall-clock time in ms: what the trail's checks are judged at.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds on a monotonic clock: when commitments were handed out (a
/// wall clock set back would keep stale nonces).
fn since_start() -> u64 {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u64
}

impl SignService {
    pub(crate) fn new(config: Arc<GuardianConfig>, trail: Trail) -> Result<Self, String> {
        let sessions = SessionLog::open(&config.data_dir)?;
        Ok(SignService {
            config,
            trail,
            state: Mutex::new(State {
                signer: Signer::new(OUTSTANDING),
                shares: Default::default(),
                scripts: Default::default(),
            }),
            decrypting: Mutex::new(()),
            sessions,
        })
    }

    /// A rotation replaced the wallet's share: forget the decrypted one, and
    /// the nonces drawn with it.
    pub(crate) fn forget_share(&self, wallet: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.shares.remove(wallet);
            s.scripts.remove(wallet);
            s.signer().forget(|(w, _)| w == wallet);
        }
    }

    pub(crate) async fn handle(&self, request: SignRequest) -> SignReply {
        match request {
            SignRequest::Preprocess { wallet, count } => self
                .preprocess(&wallet, count)
                .await
                .unwrap_or_else(refused),
            SignRequest::Sign {
                session_id,
                workflow_id,
                packages,
            } => self
                .sign(&session_id, &workflow_id, &packages)
                .await
                .unwrap_or_else(|e| e),
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

    /// Hands out `count` commitments for `wallet`, its nonces kept in memory.
    async fn preprocess(&self, wallet: &str, count: u16) -> Result<SignReply, String> {
        validate_token("wallet", wallet).map_err(|e| e.to_string())?;
        if !(1..=MAX_PREPROCESS).contains(&count) {
            return Err(format!(
                "count: {count} commitments asked, 1 to {MAX_PREPROCESS} are handed out at once"
            ));
        }
        let share = self.wallet_share(wallet)?;
        let drawing = share.clone();
        let drawn: Vec<Preprocessed> = tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|_| sign::preprocess(&drawing.key, &mut OsRng))
                .collect()
        })
        .await
        .map_err(|e| format!("drawing nonces: {e}"))?;
        let mut commitments = Vec::with_capacity(drawn.len());
        {
            let mut state = self.state.lock().map_err(|_| "poisoned")?;
            let at = since_start();
            let signer = state.signer();
            for nonces in drawn {
                let handed = signer.hand_out(nonces, (wallet.to_string(), share.clone()), at);
                commitments.push(handed.map_err(|e| e.to_string())?);
            }
        }
        Ok(SignReply::Preprocessed {
            identifier: share.key.identifier().serialize(),
            commitments,
            public_key_package: share.public_bytes.clone(),
        })
    }

    /// Runs every check on the replica caught up to the stream's end as of
    /// the call; the sighashes this guardian would sign.
    async fn checked(&self, workflow_id: &str) -> Result<Checked, String> {
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

    /// Checks the workflow, then signs each input's package with the nonces
    /// of the commitment it carries for this guardian. Once the workflow and
    /// the packages check out, every commitment named is spent, whatever the
    /// answer.
    async fn sign(
        &self,
        session_id: &str,
        workflow_id: &str,
        packages: &[Vec<u8>],
    ) -> Result<SignReply, SignReply> {
        validate_token("sessionId", session_id).map_err(refused)?;
        validate_token("workflowId", workflow_id).map_err(refused)?;
        // A replay is refused before any work.
        if self.sessions.claimed(session_id) {
            return Err(refused(format!(
                "session {session_id} was already consumed"
            )));
        }
        let (wallet, sighashes, share) = self.checked(workflow_id).await.map_err(refused)?;
        if packages.len() != sighashes.len() {
            return Err(refused(format!(
                "{} packages for {} inputs",
                packages.len(),
                sighashes.len()
            )));
        }
        let packages = packages
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                SigningPackage::deserialize(bytes).map_err(|e| refused(format!("package {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let me = *share.key.identifier();
        let members = share.public.verifying_shares();
        // Every package's nonces are taken out before any is used: a refusal
        // from here on spends them all.
        let taken: Vec<_> = {
            let mut state = self.state.lock().map_err(|_| refused("poisoned"))?;
            let signer = state.signer();
            packages.iter().map(|p| signer.take(p, &me)).collect()
        };
        if let Some(Err(stale)) = taken
            .iter()
            .find(|t| matches!(t, Err(SignError::UnknownCommitment)))
        {
            return Err(SignReply::Stale {
                reason: stale.to_string(),
            });
        }
        let mut shares = Vec::with_capacity(packages.len());
        for (i, ((package, sighash), taken)) in
            packages.iter().zip(&sighashes).zip(taken).enumerate()
        {
            let ((for_wallet, drawn_with), nonces) =
                taken.map_err(|e| refused(format!("input {i}: {e}")))?;
            // Handed out for another wallet, or before a rotation replaced
            // the share: spent, and the coordinator asks for fresh ones.
            if for_wallet != wallet || !Arc::ptr_eq(&drawn_with, &share) {
                return Err(SignReply::Stale {
                    reason: format!(
                        "input {i}: the commitment was handed out for another wallet or share"
                    ),
                });
            }
            // A stranger's commitment makes a share no signature can use.
            if let Some(stranger) = package
                .signing_commitments()
                .keys()
                .find(|id| !members.contains_key(id))
            {
                return Err(refused(format!(
                    "package {i}: signer {} is not a guardian of {wallet}",
                    hex::encode(stranger.serialize())
                )));
            }
            let signed = sign::round2(nonces, &share.tweaked, package, sighash)
                .map_err(|e| refused(format!("input {i}: {e}")))?;
            shares.push(signed.serialize());
        }
        // Claiming is the final test that the id is new; the shares leave
        // only once the claim is on disk, so this id never signs again, even
        // after a restart.
        let claim = self.sessions.claim(session_id).map_err(refused)?;
        match claim.await {
            Ok(Ok(())) => Ok(SignReply::Shares { shares }),
            Ok(Err(e)) => Err(refused(e)),
            Err(_) => Err(refused("the session log writer stopped")),
        }
    }
}
