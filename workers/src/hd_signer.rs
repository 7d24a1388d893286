//! The HD signer: a process holding HD wallets' seeds (BIP-39/32, sealed at
//! rest with the keystore's argon2id + AEAD), answering on
//! `custos.signer.<id>.create` and `custos.signer.<id>.sign`.
//!
//! It is never a signing oracle: asked to sign a workflow, it checks it on its
//! own verified trail replica as guardians do ([`crate::signing::workflow_allows`])
//! plus the EVM checks ([`crate::evm_steps::check`]), requires the wallet to be
//! recorded (`WALLET_CREATED`, model `hd`) with this signer, the address and
//! key of its own seed, rebuilds the transaction from the approved request and
//! signs that. Signatures are deterministic (RFC 6979): asking twice gives the
//! same transaction.
//!
//! The coordinator side is [`ceremony`] (called by the signing step for HD
//! wallets); wallet creation calls [`create_wallet`] and records the
//! descriptor it returns.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::Client;
use custos_adapters::files::write_private;
use custos_custody::hd::{EthAccount, Mnemonic, Seed};
use custos_schemas::chain::SignedTransaction;
use custos_schemas::{WalletDescriptor, WalletGuardian, codec, validate_token};
use futures::StreamExt;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Shutdown;
use crate::evm_steps::{self, HD_MODEL};
use crate::signing::Ceremony;
use crate::trail::{Trail, TrailView};

/// The subject of signer `id`'s operation `op` (`create`, `sign`).
pub fn signer_subject(id: &str, op: &str) -> String {
    format!("custos.signer.{id}.{op}")
}

/// What is asked of a signer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SignerRequest {
    /// Make a seed for wallet `wallet` on `chain` (again the same one if asked
    /// again before the wallet is recorded).
    Create { wallet: String, chain: String },
    /// Sign the built transfer `workflow_id`.
    Sign { workflow_id: String },
}

/// A signer's answers. Nothing secret: addresses, public keys, signatures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SignerReply {
    Created {
        /// EIP-55 address of `m/44'/60'/0'/0/0`.
        address: String,
        /// Its compressed public key, hex.
        public_key: String,
        /// The extended public key of `m/44'/60'/0'`.
        xpub: String,
    },
    Signed(SignedTransaction),
    Refused {
        reason: String,
    },
}

/// A signer process's identity and storage.
pub struct SignerConfig {
    pub id: String,
    pub data_dir: PathBuf,
    /// Unlocks the seeds. Never logged, never an argument.
    pub passphrase: Zeroizing<String>,
}

impl fmt::Debug for SignerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerConfig")
            .field("id", &self.id)
            .field("data_dir", &self.data_dir)
            .field("passphrase", &"<redacted>")
            .finish()
    }
}

/// How long the coordinator waits for the signer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Service {
    config: SignerConfig,
    trail: Trail,
    /// Opened accounts by wallet: argon2id runs once per wallet, not per
    /// signature. Keys zeroize when dropped.
    accounts: Mutex<HashMap<String, Arc<EthAccount>>>,
}

impl Service {
    fn seed_path(&self, wallet: &str) -> PathBuf {
        self.config
            .data_dir
            .join("wallets")
            .join(format!("{wallet}.seed"))
    }

    fn open_seed(&self, wallet: &str) -> Result<Seed, String> {
        let path = self.seed_path(wallet);
        let file = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Seed::open(
            &file,
            self.config.passphrase.as_bytes(),
            &self.config.id,
            wallet,
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The wallet's seed, made (and fsynced) on the first request.
    fn create(&self, wallet: &str, chain: &str) -> Result<SignerReply, String> {
        validate_token("wallet", wallet).map_err(|e| e.to_string())?;
        if !evm_steps::is_evm(chain) {
            return Err(format!("chain: {chain} is not an EVM chain Custos knows"));
        }
        let recorded = self
            .trail
            .read_current(|view| view.ledger.wallet(wallet).is_some())?;
        if recorded {
            return Err(format!("wallet: {wallet} already exists"));
        }
        let path = self.seed_path(wallet);
        let seed = if path.exists() {
            self.open_seed(wallet)?
        } else {
            let seed = Mnemonic::generate(&mut OsRng)
                .map_err(|e| e.to_string())?
                .to_seed("");
            let file = seed
                .seal(
                    self.config.passphrase.as_bytes(),
                    &self.config.id,
                    wallet,
                    &mut OsRng,
                )
                .map_err(|e| e.to_string())?;
            match write_private(&path, &file) {
                Ok(()) => sync_dir(path.parent().unwrap_or(Path::new("."))),
                // Another request for the same wallet was first: use its seed.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return self.create(wallet, chain);
                }
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
            seed
        };
        let account = seed.ethereum_account(0).map_err(|e| e.to_string())?;
        Ok(SignerReply::Created {
            address: account.checksummed(),
            public_key: account.public_key_hex(),
            xpub: seed.ethereum_xpub().map_err(|e| e.to_string())?,
        })
    }

    fn account(&self, wallet: &str) -> Result<Arc<EthAccount>, String> {
        if let Some(a) = self.accounts.lock().map_err(|_| "poisoned")?.get(wallet) {
            return Ok(a.clone());
        }
        let seed = tokio::task::block_in_place(|| self.open_seed(wallet))?;
        let account = Arc::new(seed.ethereum_account(0).map_err(|e| e.to_string())?);
        self.accounts
            .lock()
            .map_err(|_| "poisoned")?
            .insert(wallet.to_string(), account.clone());
        Ok(account)
    }

    async fn sign(&self, workflow_id: &str) -> Result<SignerReply, String> {
        validate_token("workflowId", workflow_id).map_err(|e| e.to_string())?;
        let now = now_ms();
        let (wallet, checked) = self
            .trail
            .read(|view| evm_steps::check(view, workflow_id, now))
            .await??;
        if signer_of(&wallet) != Some(self.config.id.as_str()) {
            return Err(format!(
                "the trail does not name me ({}) as wallet {}'s signer",
                self.config.id, wallet.name
            ));
        }
        let account = self.account(&wallet.name)?;
        if !account.checksummed().eq_ignore_ascii_case(&wallet.address)
            || wallet.group_key.as_deref() != Some(account.public_key_hex().as_str())
        {
            return Err(format!(
                "my seed for {} is not of the address and key the trail records",
                wallet.name
            ));
        }
        checked
            .sign(account.signing_key(), vec![self.config.id.clone()])
            .map(SignerReply::Signed)
            .map_err(|e| e.to_string())
    }
}

/// Makes a new directory entry (the seed file) durable.
fn sync_dir(dir: &Path) {
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not sync the directory");
    }
}

/// The signer recorded for an HD wallet: its one roster entry.
fn signer_of(wallet: &WalletDescriptor) -> Option<&str> {
    match wallet.guardians.as_slice() {
        [only] if wallet.model == HD_MODEL => Some(only.id.as_str()),
        _ => None,
    }
}

/// Runs the signer until `shutdown`. Needs tokio's multi-threaded runtime
/// (opening a seed runs argon2id on a blocking section of it).
pub async fn run(client: Client, config: SignerConfig, shutdown: Shutdown) -> Result<(), String> {
    validate_token("id", &config.id).map_err(|e| e.to_string())?;
    let wallets = config.data_dir.join("wallets");
    std::fs::create_dir_all(&wallets).map_err(|e| format!("{}: {e}", wallets.display()))?;
    let js = async_nats::jetstream::new(client.clone());
    let trail = Trail::follow(js, shutdown.clone()).await?;
    let mut creates = client
        .subscribe(signer_subject(&config.id, "create"))
        .await
        .map_err(|e| e.to_string())?;
    let mut signs = client
        .subscribe(signer_subject(&config.id, "sign"))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(signer = %config.id, "HD signer up");
    let service = Arc::new(Service {
        config,
        trail,
        accounts: Mutex::new(HashMap::new()),
    });
    let mut shutdown = shutdown;
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            m = creates.next() => m,
            m = signs.next() => m,
        };
        let Some(msg) = msg else { break };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (client, service) = (client.clone(), service.clone());
        tokio::spawn(async move {
            let reply = match codec::from_msgpack::<SignerRequest>(&msg.payload) {
                Ok(SignerRequest::Create { wallet, chain }) => {
                    tokio::task::block_in_place(|| service.create(&wallet, &chain))
                }
                Ok(SignerRequest::Sign { workflow_id }) => service.sign(&workflow_id).await,
                Err(e) => Err(format!("undecodable request: {e}")),
            }
            .unwrap_or_else(|reason| SignerReply::Refused { reason });
            if let SignerReply::Refused { reason } = &reply {
                tracing::warn!(signer = %service.config.id, %reason, "request refused");
            }
            if let Err(e) = client
                .publish(reply_to, codec::to_msgpack(&reply).into())
                .await
            {
                tracing::warn!(error = %e, "could not answer");
            }
        });
    }
    Ok(())
}

async fn ask(
    client: &Client,
    signer: &str,
    request: &SignerRequest,
) -> Result<SignerReply, String> {
    let op = match request {
        SignerRequest::Create { .. } => "create",
        SignerRequest::Sign { .. } => "sign",
    };
    let body = codec::to_msgpack(request);
    match tokio::time::timeout(
        ANSWER_TIMEOUT,
        client.request(signer_subject(signer, op), body.into()),
    )
    .await
    {
        Err(_) => Err(format!("signer {signer} did not answer in time")),
        Ok(Err(e)) => Err(format!("signer {signer} unreachable: {e}")),
        Ok(Ok(msg)) => codec::from_msgpack(&msg.payload)
            .map_err(|e| format!("signer {signer} answered unreadably: {e}")),
    }
}

/// An HD wallet made by a signer, not yet recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedHdWallet {
    /// What `WALLET_CREATED` records: model `hd`, the address, the address
    /// key as `group_key`, and the signer as the one roster entry.
    pub wallet: WalletDescriptor,
    /// The account's extended public key (`m/44'/60'/0'`), for watch-only use.
    pub xpub: String,
}

/// Asks signer `signer_id` for a new HD wallet `name` on EVM chain `chain`.
/// The wallet can sign only once the caller has recorded `WALLET_CREATED`
/// with the returned descriptor; asking again before that answers the same
/// address.
pub async fn create_wallet(
    client: &Client,
    signer_id: &str,
    name: &str,
    chain: &str,
) -> Result<CreatedHdWallet, String> {
    validate_token("signer", signer_id).map_err(|e| e.to_string())?;
    validate_token("name", name).map_err(|e| e.to_string())?;
    if !evm_steps::is_evm(chain) {
        return Err(format!(
            "chain: {chain} is not an EVM chain (HD wallets are for evm-<chain id>)"
        ));
    }
    let request = SignerRequest::Create {
        wallet: name.to_string(),
        chain: chain.to_string(),
    };
    match ask(client, signer_id, &request).await? {
        SignerReply::Created {
            address,
            public_key,
            xpub,
        } => Ok(CreatedHdWallet {
            wallet: WalletDescriptor {
                name: name.to_string(),
                model: HD_MODEL.to_string(),
                chain: chain.to_string(),
                address,
                threshold: None,
                guardians: vec![WalletGuardian {
                    id: signer_id.to_string(),
                    index: 0,
                    signing_key: String::new(),
                    encryption_key: String::new(),
                }],
                group_key: Some(public_key),
                transcript: None,
            },
            xpub,
        }),
        SignerReply::Refused { reason } => Err(format!("signer {signer_id} refused: {reason}")),
        SignerReply::Signed(_) => Err(format!("signer {signer_id} answered out of turn")),
    }
}

/// Whether `workflow_id` spends from an HD wallet.
pub async fn is_hd(trail: &Trail, workflow_id: &str) -> Result<bool, String> {
    let model = |view: &TrailView| {
        let request = view.transfer(workflow_id)?.request.as_ref()?;
        view.ledger
            .wallet(&request.wallet)
            .map(|w| w.model == HD_MODEL)
    };
    match trail.read_current(model)? {
        Some(hd) => Ok(hd),
        None => Ok(trail.read(model).await?.unwrap_or(false)),
    }
}

/// The signing step's side for an HD wallet: its own checks first (a request
/// the signer would refuse fails here with the reason), then the signer's
/// signature, verified against the checked transaction.
pub async fn ceremony(
    client: &Client,
    trail: &Trail,
    workflow_id: &str,
    now: i64,
) -> Result<Ceremony, String> {
    let prepare = |view: &TrailView| {
        let t = view.transfer(workflow_id)?;
        if t.stage != custos_engine::transfer::Stage::Built {
            return None;
        }
        Some(
            evm_steps::check(view, workflow_id, now)
                .map(|c| (c, t.version))
                .map_err(|reason| (reason, t.version)),
        )
    };
    let checked = match trail.read_current(prepare)? {
        Some(c) => Some(c),
        None => trail.read(prepare).await?,
    };
    let ((wallet, checked), version) = match checked {
        None => return Ok(Ceremony::NotPending),
        Some(Ok(c)) => c,
        Some(Err((reason, version))) => {
            return Ok(Ceremony::Failed {
                reason,
                version,
                excluded: Vec::new(),
            });
        }
    };
    let failed = |reason: String, excluded| Ceremony::Failed {
        reason,
        version,
        excluded,
    };
    let Some(signer) = signer_of(&wallet) else {
        return Ok(failed(
            format!("wallet {} records no HD signer", wallet.name),
            Vec::new(),
        ));
    };
    // Not answering (a restart, a network cut) is retried by the step's backoff.
    let request = SignerRequest::Sign {
        workflow_id: workflow_id.to_string(),
    };
    match ask(client, signer, &request).await? {
        SignerReply::Signed(signed) => match checked.verify_signed(&signed) {
            Ok(()) => Ok(Ceremony::Signed {
                signed,
                version,
                excluded: Vec::new(),
            }),
            Err(e) => {
                let reason = format!("answered a transaction that is not the checked one: {e}");
                Ok(failed(
                    format!("signer {signer} {reason}"),
                    vec![(signer.to_string(), reason)],
                ))
            }
        },
        SignerReply::Refused { reason } => Ok(failed(
            format!("signer {signer} refused: {reason}"),
            Vec::new(),
        )),
        SignerReply::Created { .. } => Ok(failed(
            format!("signer {signer} answered out of turn"),
            Vec::new(),
        )),
    }
}
