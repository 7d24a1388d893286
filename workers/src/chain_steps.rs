//! Steps that talk to the chains' nodes (Bitcoin-family here, EVM in
//! [`crate::evm_steps`], chosen by the wallet's chain):
//!
//! - the build step turns a transfer that may go on (`ReadyToSign` in the trail)
//!   into the unsigned transaction guardians will sign (`TRANSACTION_BUILT`);
//! - the broadcast step sends each `TRANSACTION_SIGNED` transaction and appends
//!   `TRANSACTION_BROADCAST` with the txid;
//! - the confirmation watcher polls the nodes for broadcast transactions and
//!   appends `TRANSACTION_CONFIRMED` once they are buried deep enough. It polls
//!   rather than consuming `TRANSACTION_BROADCAST`: waiting for blocks takes far
//!   longer than a consumer's few redeliveries allow.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custos_adapters::bitcoind::{Bitcoind, RpcError, ScannedUtxo};
use custos_adapters::jetstream::{StepConsumer, workflow_consumer};
use custos_custody::spend::{
    self, Expectation, FeePolicy, SpendError, SpendRequest, build_spend, check_spend,
};
use custos_engine::chains::Family;
use custos_engine::transfer::Stage;
use custos_schemas::chain::{Confirmation, SpentOutput, UnsignedTransaction};
use custos_schemas::{
    Actor, AggregateKind, AppendReply, Decimal, Event, EventType, Outcome, Payload, Proposal,
    Target, TransferRequest, WalletDescriptor,
};

use crate::Shutdown;
use crate::evm_steps::{self, EvmNodes, is_evm};
use crate::remote::Appender;
use crate::runtime::{Step, StepError};
use crate::signing::wallet_script;
use crate::trail::{Outpoint, Trail, TrailView};

/// One node client per chain id (`ltc-regtest`, `btc-mainnet`, ...), and the
/// EVM chains' nodes.
#[derive(Debug, Clone, Default)]
pub struct ChainNodes(BTreeMap<String, Bitcoind>, EvmNodes);

impl ChainNodes {
    pub fn new(nodes: impl IntoIterator<Item = (String, Bitcoind)>) -> Self {
        ChainNodes(nodes.into_iter().collect(), EvmNodes::default())
    }

    /// With these EVM nodes too.
    pub fn with_evm(self, evm: EvmNodes) -> Self {
        ChainNodes(self.0, evm)
    }

    pub(crate) fn get(&self, chain: &str) -> Result<&Bitcoind, StepError> {
        self.0
            .get(chain)
            .ok_or_else(|| StepError::Permanent(format!("no node is configured for {chain}")))
    }

    pub(crate) fn evm(&self) -> &EvmNodes {
        &self.1
    }
}

/// A node that is down or busy is retried (the runtime naks with backoff);
/// anything else is the node's verdict.
fn step_error(context: &str, e: RpcError) -> StepError {
    if e.is_transient() {
        StepError::Transient(format!("{context}: {e}"))
    } else {
        StepError::Permanent(format!("{context}: {e}"))
    }
}

/// How many blocks ahead the fee estimate aims to confirm within.
const FEE_TARGET_BLOCKS: u32 = 2;

/// What an allowed transfer commits its wallet to on chain: the destination's
/// script, the amount in base units and the chain's fee limits. The build step
/// builds exactly this; a guardian checks the recorded transaction against it.
#[derive(Debug, Clone)]
pub struct SpendTerms {
    pub wallet: WalletDescriptor,
    pub destination: Vec<u8>,
    /// Base units (satoshi).
    pub amount: u64,
    pub fees: FeePolicy,
}

impl SpendTerms {
    /// What `check_spend` holds a transaction of the wallet whose Taproot script
    /// is `wallet_script` to.
    pub fn expectation<'a>(&'a self, wallet_script: &'a [u8]) -> Expectation<'a> {
        Expectation {
            chain: &self.wallet.chain,
            wallet_script,
            destination: &self.destination,
            amount: self.amount,
            fees: self.fees,
        }
    }
}

/// The terms of `request` as the trail's wallet directory makes them.
pub fn spend_terms(view: &TrailView, request: &TransferRequest) -> Result<SpendTerms, String> {
    let wallet = view
        .ledger
        .wallet(&request.wallet)
        .ok_or_else(|| format!("wallet {} is not in the trail", request.wallet))?
        .clone();
    let chain = custos_engine::chains::chain(&wallet.chain)
        .ok_or_else(|| format!("unknown chain {}", wallet.chain))?;
    if !matches!(chain.family, Family::Bitcoin { .. }) {
        return Err(format!(
            "wallet {} is on {}, not a Bitcoin-family chain",
            wallet.name, wallet.chain
        ));
    }
    let amount = Decimal::parse(&request.amount)
        .and_then(|d| d.to_base_units(chain.decimals))
        .and_then(|a| u64::try_from(a).map_err(|_| "is too large".into()))
        .map_err(|e| format!("amount: {e}"))?;
    let destination = spend::script_pubkey_for_address(&wallet.chain, &request.destination)
        .map_err(|e| e.to_string())?;
    let fees = FeePolicy::for_chain(&wallet.chain).map_err(|e| e.to_string())?;
    Ok(SpendTerms {
        wallet,
        destination,
        amount,
        fees,
    })
}

/// A proposal on a transfer workflow at `version`, caused by `event`.
fn next_event(
    event: &Event,
    version: u64,
    step: &str,
    event_type: EventType,
    result: Outcome,
    payload: Payload,
) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::Tx,
        workflow_id: event.workflow_id.clone(),
        expected_version: version,
        event_type,
        causation_id: Some(event.id.clone()),
        actor: Actor::system(step),
        target: event.target.clone(),
        context: Default::default(),
        result,
        metadata: Default::default(),
        payload,
    }
}

fn failed(event: &Event, version: u64, reason: String) -> Proposal {
    next_event(
        event,
        version,
        "build",
        EventType::TransactionFailed,
        Outcome::Failure,
        Payload::StepFailed {
            step: "build".into(),
            reason,
        },
    )
}

/// One build, as the trail has it.
struct Job {
    terms: SpendTerms,
    script: Vec<u8>,
}

/// The build of `workflow_id` with its version, or `None` when it is not
/// waiting to be built.
fn job(view: &TrailView, workflow_id: &str) -> Option<(u64, Result<Job, String>)> {
    let t = view
        .transfer(workflow_id)
        .filter(|t| t.stage == Stage::ReadyToSign)?;
    let job = || {
        let request = t.request.as_ref().ok_or("the workflow has no request")?;
        let terms = spend_terms(view, request)?;
        let script = wallet_script(&terms.wallet)?;
        // Coins are found by the recorded address: it must be the group key's.
        let recorded = spend::script_pubkey_for_address(&terms.wallet.chain, &terms.wallet.address)
            .map_err(|e| e.to_string())?;
        if recorded != script {
            return Err(format!(
                "wallet {}'s recorded address is not its group key's",
                terms.wallet.name
            ));
        }
        Ok(Job { terms, script })
    };
    Some((t.version, job()))
}

/// The build step: turns a transfer that may go on into its unsigned
/// transaction.
#[derive(Debug, Clone)]
pub struct BuildStep<A> {
    trail: Trail,
    nodes: ChainNodes,
    ledger: A,
    consumer: StepConsumer,
    /// One lock per wallet: a Bitcoin-family build holds it while it chooses
    /// coins, an EVM build until its `TRANSACTION_BUILT` is in the trail.
    locks: Locks,
    /// One per chain: a node runs one `scantxoutset` at a time and refuses a
    /// second, so builds of different wallets take turns scanning.
    scans: Locks,
    /// Each wallet's last scan, and when. A scan reads the node's whole coin
    /// set; coins taken since are reserved in the trail and the chosen ones are
    /// checked against the mempool, so a recent scan serves the next builds.
    scanned: Arc<Mutex<HashMap<String, Scan>>>,
    /// Each chain's last fee estimate, and when: estimates move with blocks,
    /// not with every build.
    fee_rates: Arc<Mutex<HashMap<String, FeeEstimate>>>,
    /// Coins of each wallet chosen by builds of this step whose
    /// `TRANSACTION_BUILT` the replica may not show yet: reserved as the
    /// trail's are, so a Bitcoin-family build holds the wallet's lock only while
    /// it chooses coins, not while its event is written.
    choosing: Arc<Mutex<HashMap<String, Outpoints>>>,
}

/// A wallet's last scan: the chain tip it was made at, when that tip was last
/// seen to be the node's, and what was found (largest first, as `build_spend`
/// takes them, each with its outpoint). A scan reads the node's confirmed coin
/// set, which changes only with blocks.
#[derive(Debug)]
struct Scan {
    tip: String,
    checked: std::time::Instant,
    coins: Coins,
}
type Coins = Arc<ScannedCoins>;

#[derive(Debug)]
struct ScannedCoins {
    coins: Vec<(Outpoint, ScannedUtxo)>,
    /// Every coin before this position was held at the wallet's last build:
    /// builds take the largest coins, so held ones gather at the front, and
    /// walking past them all again on every build would cost more than the
    /// build. A coin there freed since (its transfer failed, or a build let
    /// it go) waits for the next check of the tip, which walks from the start.
    held_before: std::sync::atomic::AtomicUsize,
}

/// When a chain's fee rate was estimated, and the estimate.
type FeeEstimate = (std::time::Instant, Option<u64>);

/// Transaction outputs by txid and index.
type Outpoints = BTreeSet<Outpoint>;

/// How long a wallet's scan serves builds before the node's tip is asked
/// again, and how long a fee estimate is reused (a block interval is far
/// longer).
const SCAN_REUSE: std::time::Duration = std::time::Duration::from_secs(2);

type Locks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// The lock named `key`, made on first use.
fn named_lock(locks: &Locks, key: &str) -> Arc<tokio::sync::Mutex<()>> {
    // The map only ever gains entries: a panic while it was locked cannot have
    // left it inconsistent.
    let mut locks = locks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    locks.entry(key.to_string()).or_default().clone()
}

impl<A: Appender> BuildStep<A> {
    pub fn new(trail: Trail, nodes: ChainNodes, ledger: A) -> Result<Self, String> {
        let consumer =
            workflow_consumer("build").ok_or("no consumer definition for the build step")?;
        Ok(BuildStep {
            trail,
            nodes,
            ledger,
            consumer,
            locks: Arc::default(),
            scans: Arc::default(),
            scanned: Arc::default(),
            fee_rates: Arc::default(),
            choosing: Arc::default(),
        })
    }

    /// The chain's fee estimate, at most [`SCAN_REUSE`] old.
    async fn fee_rate(&self, node: &Bitcoind, chain: &str) -> Result<Option<u64>, StepError> {
        let cached = self
            .fee_rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(chain)
            .filter(|(at, _)| at.elapsed() < SCAN_REUSE)
            .map(|(_, rate)| *rate);
        if let Some(rate) = cached {
            return Ok(rate);
        }
        let rate = node
            .estimate_smart_fee(FEE_TARGET_BLOCKS)
            .await
            .map_err(|e| step_error("estimatesmartfee", e))?;
        self.fee_rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(chain.to_string(), (std::time::Instant::now(), rate));
        Ok(rate)
    }

    /// Reserves (`hold`) or releases coins chosen for a build of `wallet`.
    fn choose(&self, wallet: &str, coins: &Outpoints, hold: bool) {
        let mut choosing = self
            .choosing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = choosing.entry(wallet.to_string()).or_default();
        match hold {
            true => held.extend(coins.iter().cloned()),
            false => held.retain(|c| !coins.contains(c)),
        }
    }

    /// The wallet's coins on the node: from its last scan while the node's tip
    /// is the one it was made at (asked at most every [`SCAN_REUSE`]), else,
    /// or when `fresh`, from a new scan. Scanning reads the node's whole coin
    /// set and builds of the wallet wait for it, so it is done once per block,
    /// not on a timer.
    async fn coins(
        &self,
        node: &Bitcoind,
        wallet: &WalletDescriptor,
        fresh: bool,
    ) -> Result<Coins, StepError> {
        let scans = || {
            self.scanned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let last = scans().get(&wallet.address).filter(|_| !fresh).map(|s| {
            (
                s.checked.elapsed() < SCAN_REUSE,
                s.tip.clone(),
                s.coins.clone(),
            )
        });
        if let Some((true, _, coins)) = &last {
            return Ok(coins.clone());
        }
        // The tip is read before the scan: a block found meanwhile only makes
        // the next check scan again.
        let tip = node
            .get_best_block_hash()
            .await
            .map_err(|e| step_error("getbestblockhash", e))?;
        if let Some((_, scanned_at, coins)) = last
            && scanned_at == tip
        {
            // Coins let go since the last check (a transfer failed) are
            // walked to again.
            coins.held_before.store(0, Ordering::Relaxed);
            if let Some(s) = scans().get_mut(&wallet.address) {
                s.checked = std::time::Instant::now();
            }
            return Ok(coins);
        }
        let mut coins: Vec<(Outpoint, ScannedUtxo)> = {
            let scan = named_lock(&self.scans, &wallet.chain);
            let _scanning = scan.lock().await;
            node.scan_addresses(&[&wallet.address])
                .await
                .map_err(|e| step_error("scantxoutset", e))?
        }
        .into_iter()
        .map(|u| ((u.txid.clone(), u.vout), u))
        .collect();
        coins.sort_by(|(a, u), (b, v)| v.value.cmp(&u.value).then_with(|| a.cmp(b)));
        let coins = Arc::new(ScannedCoins {
            coins,
            held_before: Default::default(),
        });
        scans().insert(
            wallet.address.clone(),
            Scan {
                tip,
                checked: std::time::Instant::now(),
                coins: coins.clone(),
            },
        );
        Ok(coins)
    }

    /// The unsigned transaction from the wallet's confirmed coins that are not
    /// reserved, checked as guardians will. Which chosen coins the mempool
    /// already spends is asked afterwards ([`Self::spent_in_mempool`]), outside
    /// the wallet's lock.
    async fn build(
        &self,
        job: &Job,
        excluded: &Outpoints,
    ) -> Result<UnsignedTransaction, StepError> {
        match self.build_from(job, excluded, false).await {
            // Not enough in a reused scan: new coins may have arrived since.
            Err(StepError::Permanent(_)) => self.build_from(job, excluded, true).await,
            built => built,
        }
    }

    async fn build_from(
        &self,
        job: &Job,
        excluded: &Outpoints,
        fresh: bool,
    ) -> Result<UnsignedTransaction, StepError> {
        let wallet = &job.terms.wallet;
        let node = self.nodes.get(&wallet.chain)?;
        let scanned = self.coins(node, wallet, fresh).await?;
        // `build_spend` takes the largest coins first and stops once they
        // cover the amount and the fee, which the fee cap bounds: the largest
        // free coins covering amount and cap are all it could take. Only when
        // they do not suffice does it get every free coin, for the same result
        // (or the same refusal) as from all.
        let enough = job.terms.amount.saturating_add(job.terms.fees.max_fee);
        let free = |limit: Option<u64>| self.free_coins(&wallet.name, &scanned, excluded, limit);
        let (utxos, held, cut) = free(Some(enough))?;
        match self.build_with(job, node, &utxos, held).await {
            Err(_) if cut => {
                let (utxos, held, _) = free(None)?;
                self.build_with(job, node, &utxos, held).await
            }
            built => built,
        }
    }

    /// The scanned coins that no transfer in flight, no build of this step
    /// and no `excluded` holds, largest first, until they add up to `limit`;
    /// with the value of those held, and whether free coins were left out.
    fn free_coins(
        &self,
        wallet: &str,
        scanned: &ScannedCoins,
        excluded: &Outpoints,
        limit: Option<u64>,
    ) -> Result<(Vec<SpentOutput>, u64, bool), StepError> {
        // Read with the replica held: a coin leaves `choosing` only once its
        // `TRANSACTION_BUILT` is in the replica, so it is seen in one or the other.
        self.trail
            .read_current(|view| {
                let choosing = self
                    .choosing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let chosen = choosing.get(wallet);
                let (mut held, mut total) = (0u64, 0u64);
                let mut utxos = Vec::new();
                // Only a bounded walk skips the front: one for every free coin
                // starts at the first.
                let start = match limit {
                    Some(_) => scanned.held_before.load(Ordering::Relaxed),
                    None => 0,
                };
                let mut held_before = start;
                for (outpoint, u) in scanned.coins.iter().skip(start) {
                    if view.coins_in_flight.contains(outpoint)
                        || excluded.contains(outpoint)
                        || chosen.is_some_and(|c| c.contains(outpoint))
                    {
                        held = held.saturating_add(u.value);
                        if utxos.is_empty() {
                            held_before += 1;
                        }
                        continue;
                    }
                    if limit.is_some_and(|l| total >= l) || utxos.len() == spend::MAX_INPUTS {
                        scanned.held_before.store(held_before, Ordering::Relaxed);
                        return (utxos, held, true);
                    }
                    total = total.saturating_add(u.value);
                    utxos.push(SpentOutput {
                        txid: u.txid.clone(),
                        vout: u.vout,
                        value: u.value,
                        script_pubkey: u.script_pubkey.clone(),
                    });
                }
                if limit.is_some() {
                    scanned.held_before.store(held_before, Ordering::Relaxed);
                }
                (utxos, held, false)
            })
            .map_err(StepError::Transient)
    }

    async fn build_with(
        &self,
        job: &Job,
        node: &Bitcoind,
        utxos: &[SpentOutput],
        held: u64,
    ) -> Result<UnsignedTransaction, StepError> {
        let wallet = &job.terms.wallet;
        let fee_rate = self.fee_rate(node, &wallet.chain).await?;
        let unsigned = build_spend(&SpendRequest {
            chain: &wallet.chain,
            wallet_script: &job.script,
            utxos,
            destination: &job.terms.destination,
            amount: job.terms.amount,
            fee_rate,
            fees: job.terms.fees,
        })
        .map_err(|e| match e {
            SpendError::InsufficientFunds { .. } if held > 0 => StepError::Permanent(format!(
                "{e} (another {held} sat of the wallet are spent by transfers in flight)"
            )),
            e => StepError::Permanent(e.to_string()),
        })?;
        check_spend(&unsigned, &job.terms.expectation(&job.script)).map_err(|e| {
            StepError::Permanent(format!(
                "the built transaction would not pass the guardians' check: {e}"
            ))
        })?;
        Ok(unsigned)
    }

    /// The chosen coins a transaction in the node's mempool already spends
    /// (one call per chosen coin, not one per coin of the wallet).
    async fn spent_in_mempool(
        &self,
        chain: &str,
        coins: &Outpoints,
    ) -> Result<Outpoints, StepError> {
        let node = self.nodes.get(chain)?;
        let mut gone = Outpoints::new();
        for (txid, vout) in coins {
            let unspent = node
                .get_tx_out(txid, *vout, true)
                .await
                .map_err(|e| step_error("gettxout", e))?
                .is_some();
            if !unspent {
                gone.insert((txid.clone(), *vout));
            }
        }
        Ok(gone)
    }

    /// A Bitcoin-family build: coins are chosen under the wallet's lock and
    /// held in memory, then checked against the mempool without it; a coin
    /// spent there is left out and the choice made again. The version read and
    /// the transaction, with the coins it holds.
    async fn build_bitcoin(
        &self,
        id: &str,
        wallet: &str,
    ) -> Result<Option<(u64, Result<UnsignedTransaction, StepError>, Outpoints)>, StepError> {
        let lock = named_lock(&self.locks, wallet);
        let mut excluded = Outpoints::new();
        loop {
            let building = lock.lock().await;
            let job = self
                .trail
                .read_current(|view| job(view, id))
                .map_err(StepError::Transient)?;
            let Some((version, job)) = job else {
                return Ok(None);
            };
            let built = match job {
                Ok(job) => self.build(&job, &excluded).await,
                Err(reason) => Err(StepError::Permanent(reason)),
            };
            let Ok(UnsignedTransaction::Bitcoin { chain, spent, .. }) = &built else {
                return Ok(Some((version, built, Outpoints::new())));
            };
            let chosen: Outpoints = spent.iter().map(|s| (s.txid.clone(), s.vout)).collect();
            self.choose(wallet, &chosen, true);
            drop(building);
            let gone = match self.spent_in_mempool(chain, &chosen).await {
                Ok(gone) => gone,
                Err(e) => {
                    self.choose(wallet, &chosen, false);
                    return Err(e);
                }
            };
            if gone.is_empty() {
                return Ok(Some((version, built, chosen)));
            }
            self.choose(wallet, &chosen, false);
            excluded.extend(gone);
        }
    }
}

impl<A: Appender> Step for BuildStep<A> {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    /// Builds from what the trail says, never from the event: the event only
    /// names the workflow (a vote that left it pending names it too).
    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let id = &event.workflow_id;
        let wallet = self
            .trail
            .read(|view| {
                view.transfer(id)
                    .filter(|t| t.stage == Stage::ReadyToSign)
                    .and_then(|t| t.request.as_ref())
                    .map(|r| {
                        let evm = view
                            .ledger
                            .wallet(&r.wallet)
                            .is_some_and(|w| is_evm(&w.chain));
                        (r.wallet.clone(), evm)
                    })
            })
            .await
            .map_err(StepError::Transient)?;
        let Some((wallet, evm)) = wallet else {
            return Ok(Vec::new());
        };
        // An EVM build keeps its wallet's lock until its event is in the
        // replica, so every nonce taken before is recorded there, also across
        // a restart of this step.
        let lock = named_lock(&self.locks, &wallet);
        let (building, version, built, chosen) = if evm {
            let building = lock.lock().await;
            let job = self
                .trail
                .read_current(|view| evm_steps::job(view, id))
                .map_err(StepError::Transient)?;
            let Some((version, job)) = job else {
                return Ok(Vec::new());
            };
            let built = match job {
                Ok(job) => evm_steps::build(&self.nodes.1, &job).await,
                Err(reason) => Err(StepError::Permanent(reason)),
            };
            (Some(building), version, built, Outpoints::new())
        } else {
            match self.build_bitcoin(id, &wallet).await? {
                Some((version, built, chosen)) => (None, version, built, chosen),
                None => return Ok(Vec::new()),
            }
        };
        let unsigned = match built {
            Ok(unsigned) => unsigned,
            Err(StepError::Permanent(reason)) => return Ok(vec![failed(event, version, reason)]),
            Err(e) => return Err(e),
        };
        // Appended here rather than by the runtime: the held coins (or an EVM
        // build's lock) are let go only once the event is in the replica.
        let proposal = next_event(
            event,
            version,
            "build",
            EventType::TransactionBuilt,
            Outcome::Success,
            Payload::TransactionBuilt(unsigned),
        );
        let outcome = match self.ledger.append(vec![proposal]).await {
            AppendReply::Appended { sequences } => {
                let seq = sequences.iter().copied().max().unwrap_or_default();
                self.trail
                    .wait_until(seq)
                    .await
                    .map(|()| Vec::new())
                    .map_err(StepError::Transient)
            }
            // Conflict: another build of this workflow won; nothing more to do.
            AppendReply::Conflict { .. } => Ok(Vec::new()),
            AppendReply::Refused { reason } => Ok(vec![failed(event, version, reason)]),
            AppendReply::Unavailable { reason } => Err(StepError::Transient(reason)),
        };
        // Recorded (the replica reserves them now) or not (they are free).
        self.choose(&wallet, &chosen, false);
        drop(building);
        outcome
    }
}

/// How deep a transaction must be buried before it counts as confirmed.
#[derive(Debug, Clone, Default)]
pub struct Confirmations(BTreeMap<String, u64>);

impl Confirmations {
    /// Depths per chain id that replace the defaults.
    pub fn new(depths: impl IntoIterator<Item = (String, u64)>) -> Self {
        Confirmations(depths.into_iter().collect())
    }

    /// As configured, else 1 on regtest chains and anvil's dev chain (blocks
    /// come on demand) and 6 elsewhere; never less than 1, which would count
    /// the mempool.
    pub fn required(&self, chain: &str) -> u64 {
        let local = chain.ends_with("-regtest") || chain == "evm-31337";
        let default = if local { 1 } else { 6 };
        self.0.get(chain).copied().unwrap_or(default).max(1)
    }
}

/// A broadcast transfer waiting for its confirmation.
struct Waiting {
    workflow_id: String,
    version: u64,
    chain: String,
    /// Every transaction that may confirm it (a fee bump's and those it
    /// replaced), see [`crate::fee_bump::awaiting`].
    candidates: Vec<crate::fee_bump::Candidate>,
    target: Target,
}

/// Polls the nodes for every transfer in `Broadcast` and appends
/// `TRANSACTION_CONFIRMED` once its transaction is deep enough. A reorg before
/// then only lowers the count, so the transfer keeps waiting.
#[derive(Debug, Clone)]
pub struct ConfirmWatcher<A> {
    trail: Trail,
    nodes: ChainNodes,
    ledger: A,
    depth: Confirmations,
    /// Bitcoin-family transactions (by workflow and txid) found unconfirmed,
    /// with the chain tip they were asked after: nothing about them changes
    /// until the tip does, so they are not asked again until then. Without
    /// this every pass asked the node once per transfer in flight.
    pending_at: Arc<Mutex<HashMap<(String, String), String>>>,
}

impl<A: Appender> ConfirmWatcher<A> {
    pub fn new(trail: Trail, nodes: ChainNodes, ledger: A, depth: Confirmations) -> Self {
        ConfirmWatcher {
            trail,
            nodes,
            ledger,
            depth,
            pending_at: Arc::default(),
        }
    }

    fn pending_at(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.pending_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Polls every `poll_every` until `shutdown`.
    pub async fn run(self, poll_every: Duration, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(poll_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            self.poll().await;
        }
    }

    /// One pass; returns the workflows it recorded as confirmed.
    pub async fn poll(&self) -> Vec<String> {
        let waiting = self
            .trail
            .read(|view| {
                view.on_network()
                    .filter_map(|(id, t)| {
                        let request = t.request.as_ref();
                        let candidates = crate::fee_bump::awaiting(t);
                        Some(Waiting {
                            workflow_id: id.to_string(),
                            version: t.version,
                            chain: candidates.first()?.chain.clone(),
                            candidates,
                            target: Target {
                                kind: "transaction".into(),
                                id: id.to_string(),
                                amount: request.map(|r| r.amount.clone()),
                                currency: request.map(|r| r.asset.clone()),
                            },
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        let waiting = match waiting {
            Ok(w) => w,
            Err(reason) => {
                tracing::warn!(%reason, "confirmations: the trail cannot be read");
                return Vec::new();
            }
        };
        // Each Bitcoin-family chain's tip, read before any transaction is
        // asked about: what is found pending is pending as of that tip.
        let mut tips: BTreeMap<String, Option<String>> = BTreeMap::new();
        for w in waiting.iter().filter(|w| !is_evm(&w.chain)) {
            if !tips.contains_key(&w.chain) {
                let tip = match self.nodes.get(&w.chain) {
                    Ok(node) => node.get_best_block_hash().await.ok(),
                    Err(_) => None,
                };
                tips.insert(w.chain.clone(), tip);
            }
        }
        let in_flight: std::collections::HashSet<&str> =
            waiting.iter().map(|w| w.workflow_id.as_str()).collect();
        self.pending_at()
            .retain(|(workflow, _), _| in_flight.contains(workflow.as_str()));
        let mut confirmed = Vec::new();
        for w in waiting {
            let mut status = Ok(evm_steps::Status::Pending);
            let tip = tips.get(&w.chain).cloned().flatten();
            for c in &w.candidates {
                let key = (w.workflow_id.clone(), c.txid.clone());
                status = if is_evm(&w.chain) {
                    self.evm_status(&w, c).await
                } else if tip.is_some() && self.pending_at().get(&key) == tip.as_ref() {
                    Ok(evm_steps::Status::Pending)
                } else {
                    let found = self.confirmation(&w, c).await;
                    if let (Ok(None), Some(tip)) = (&found, &tip) {
                        self.pending_at().insert(key, tip.clone());
                    }
                    found
                        .map(|c| c.map_or(evm_steps::Status::Pending, evm_steps::Status::Confirmed))
                };
                if !matches!(status, Ok(evm_steps::Status::Pending)) {
                    break;
                }
            }
            let (event_type, result, payload) = match status {
                Ok(evm_steps::Status::Confirmed(c)) => (
                    EventType::TransactionConfirmed,
                    Outcome::Success,
                    Payload::TransactionConfirmed(c),
                ),
                Ok(evm_steps::Status::Reverted(reason)) => (
                    EventType::TransactionFailed,
                    Outcome::Failure,
                    Payload::StepFailed {
                        step: "confirmation".into(),
                        reason,
                    },
                ),
                Ok(evm_steps::Status::Pending) => continue,
                Err(reason) => {
                    tracing::warn!(workflow = %w.workflow_id, %reason, "confirmation not known");
                    continue;
                }
            };
            let confirmed_now = event_type == EventType::TransactionConfirmed;
            let proposal = Proposal {
                aggregate_kind: AggregateKind::Tx,
                workflow_id: w.workflow_id.clone(),
                expected_version: w.version,
                event_type,
                causation_id: Some(Event::message_id(
                    AggregateKind::Tx,
                    &w.workflow_id,
                    w.version,
                )),
                actor: Actor::system("confirmation"),
                target: w.target,
                context: Default::default(),
                result,
                metadata: Default::default(),
                payload,
            };
            match self.ledger.append(vec![proposal]).await {
                AppendReply::Appended { .. } if confirmed_now => confirmed.push(w.workflow_id),
                AppendReply::Appended { .. } => {}
                // Another watcher recorded it, or the workflow moved on.
                AppendReply::Conflict { .. } => {}
                other => {
                    tracing::warn!(workflow = %w.workflow_id, reply = ?other, "confirmation not recorded")
                }
            }
        }
        confirmed
    }

    async fn evm_status(
        &self,
        w: &Waiting,
        c: &crate::fee_bump::Candidate,
    ) -> Result<evm_steps::Status, String> {
        let node = self.nodes.1.get(&w.chain).map_err(|e| e.to_string())?;
        evm_steps::status(
            node,
            &w.chain,
            &c.txid,
            c.resend.as_deref(),
            self.depth.required(&w.chain),
        )
        .await
    }

    /// Where the transaction is buried, once at the required depth.
    async fn confirmation(
        &self,
        w: &Waiting,
        c: &crate::fee_bump::Candidate,
    ) -> Result<Option<Confirmation>, String> {
        let node = self.nodes.get(&w.chain).map_err(|e| e.to_string())?;
        let Some(tx) = node
            .get_raw_transaction(&c.txid)
            .await
            .map_err(|e| e.to_string())?
        else {
            // A replaced transaction leaves the mempool: only the one on the
            // network must be known.
            return match c.resend {
                Some(_) => Err(format!(
                    "the {} node does not know transaction {}",
                    w.chain, c.txid
                )),
                None => Ok(None),
            };
        };
        let required = self.depth.required(&w.chain);
        let Some(block_hash) = tx.block_hash.filter(|_| tx.confirmations >= required) else {
            return Ok(None);
        };
        let header = node
            .get_block_header(&block_hash)
            .await
            .map_err(|e| e.to_string())?;
        // The block may have left the best chain between the two calls (-1).
        let Ok(confirmations) = u64::try_from(header.confirmations) else {
            return Ok(None);
        };
        if confirmations < required {
            return Ok(None);
        }
        Ok(Some(Confirmation {
            chain: w.chain.clone(),
            txid: c.txid.clone(),
            block_hash,
            block_height: header.height,
            confirmations,
        }))
    }
}

/// The broadcast step.
#[derive(Debug, Clone)]
pub struct BroadcastStep<A> {
    nodes: ChainNodes,
    ledger: A,
    consumer: StepConsumer,
    /// Consecutive transient failures per workflow before an alert is raised.
    alert_after: u32,
    failures: Arc<Mutex<BTreeMap<String, u32>>>,
}

impl<A: Appender> BroadcastStep<A> {
    /// `alert_after`: how many consecutive failures to reach a node make an
    /// `ALERT_RAISED` (once per workflow) while the broadcast keeps retrying.
    pub fn new(nodes: ChainNodes, ledger: A, alert_after: u32) -> Result<Self, String> {
        let consumer = workflow_consumer("broadcast")
            .ok_or("no consumer definition for the broadcast step")?;
        Ok(BroadcastStep {
            nodes,
            ledger,
            consumer,
            alert_after: alert_after.max(1),
            failures: Arc::default(),
        })
    }

    /// Counts a failure to reach the node and raises the alert when the count
    /// reaches the threshold. The alert has its own aggregate per workflow, so a
    /// redelivery that raises it again is a harmless conflict.
    async fn node_unreachable(&self, event: &Event, chain: &str, reason: &str) {
        let count = {
            let Ok(mut failures) = self.failures.lock() else {
                return;
            };
            let n = failures.entry(event.workflow_id.clone()).or_default();
            *n += 1;
            *n
        };
        if count != self.alert_after {
            return;
        }
        let alert = crate::runtime::transfer_alert(
            "broadcast",
            format!("broadcast-unreachable-{}", event.workflow_id),
            &event.workflow_id,
            Some(event.id.clone()),
            format!(
                "broadcast of {} has failed {count} times: the {chain} node is unreachable ({reason})",
                event.workflow_id
            ),
        );
        match self.ledger.append(vec![alert]).await {
            AppendReply::Appended { .. } | AppendReply::Conflict { .. } => {}
            other => {
                tracing::warn!(workflow = %event.workflow_id, reply = ?other, "alert not recorded")
            }
        }
    }
}

impl<A: Appender> Step for BroadcastStep<A> {
    fn consumer(&self) -> StepConsumer {
        self.consumer.clone()
    }

    async fn handle(&self, event: &Event) -> Result<Vec<Proposal>, StepError> {
        let Payload::TransactionSigned(signed) = &event.payload else {
            return Err(StepError::Permanent(
                "payload is not the signed transaction".into(),
            ));
        };
        // Idempotent at the node: a transaction it already has counts as sent.
        let sent = if is_evm(&signed.chain) {
            let node = self.nodes.1.get(&signed.chain)?;
            node.send_raw_transaction(&signed.raw_tx, &signed.txid)
                .await
        } else {
            let node = self.nodes.get(&signed.chain)?;
            node.send_raw_transaction(&signed.raw_tx).await
        };
        let txid = match sent {
            Ok(txid) => txid,
            Err(e) => {
                let err = step_error("sendrawtransaction", e);
                if let StepError::Transient(reason) = &err {
                    self.node_unreachable(event, &signed.chain, reason).await;
                }
                return Err(err);
            }
        };
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&event.workflow_id);
        }
        if txid != signed.txid {
            return Err(StepError::Permanent(format!(
                "the node reports txid {txid}, the signed transaction's is {}",
                signed.txid
            )));
        }
        Ok(vec![next_event(
            event,
            event.version,
            "broadcast",
            EventType::TransactionBroadcast,
            Outcome::Success,
            Payload::TransactionBroadcast {
                chain: signed.chain.clone(),
                txid,
            },
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_depths() {
        let default = Confirmations::default();
        assert_eq!(default.required("ltc-regtest"), 1);
        assert_eq!(default.required("btc-mainnet"), 6);
        assert_eq!(default.required("ltc-testnet"), 6);
        assert_eq!(default.required("evm-31337"), 1);
        assert_eq!(default.required("evm-1"), 6);
        let set = Confirmations::new([("btc-mainnet".to_string(), 3), ("ltc-regtest".into(), 0)]);
        assert_eq!(set.required("btc-mainnet"), 3);
        assert_eq!(set.required("ltc-regtest"), 1, "never the mempool");
        assert_eq!(set.required("ltc-mainnet"), 6);
    }
}
