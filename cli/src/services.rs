//! The workflow services `custos up` runs next to the ledger: approvals (the
//! ballot box, the channels and the web pages they open), signing, and the
//! chain steps, each a thin shell over `custos_workers`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use custos_adapters::anvil::AnvilNode;
use custos_adapters::bitcoind::Bitcoind;
use custos_adapters::evm::EvmRpc;
use custos_adapters::mail::Mailer;
use custos_adapters::regtest::RegtestNode;
use custos_adapters::slack::{SLACK_API_URL, SlackApi};
use custos_schemas::approval::ApprovalChannel;
use custos_workers::Shutdown;
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::console::ConsoleNotifier;
use custos_workers::approvals::enrolment::{self, Enrolments};
use custos_workers::approvals::links::{
    ChatWebhookNotifier, EmailNotifier, LinkIssuer, LinkSettings, MfaKey, WebhookUrl, links_router,
    system_clock,
};
use custos_workers::approvals::slack::{
    SlackInteractions, SlackNotifier, SlackSecrets, slack_router,
};
use custos_workers::approvals::step::{ApprovalStep, escalate, expire, remind};
use custos_workers::approvals::{ApprovalLinks, BallotBox, Notifier};
use custos_workers::chain_steps::{
    BroadcastStep, BuildStep, ChainNodes, ConfirmWatcher, Confirmations,
};
use custos_workers::evm_steps::EvmNodes;
use custos_workers::fee_bump::{BumpAfter, FeeBumper};
use custos_workers::ledger::LedgerHandle;
use custos_workers::signing::SignStep;
use custos_workers::trail::Trail;

/// Where the approval pages are served and how approvers are reached.
#[derive(Debug, Clone)]
pub struct ApprovalSettings {
    pub http_addr: SocketAddr,
    /// The base URL links carry (default: `http://` + the bound address).
    pub public_url: Option<String>,
    pub channels: Channels,
    /// Approvers who have not answered are asked again this often.
    pub remind_every: Duration,
}

/// Where approvers are reached, from the environment (secrets never come from
/// arguments).
#[derive(Debug, Clone, Default)]
pub struct Channels {
    /// `CUSTOS_SMTP_URL`, e.g. `smtps://user:pass@mail.example.com`.
    pub smtp_url: Option<String>,
    /// `CUSTOS_SMTP_FROM`.
    pub smtp_from: Option<String>,
    /// `CUSTOS_CHAT_WEBHOOK_URL`: an incoming webhook (Teams, Mattermost, Google Chat).
    pub chat_webhook: Option<String>,
    /// `CUSTOS_SLACK_API_URL` (tests point it at an emulator).
    pub slack_api_url: Option<String>,
}

impl Channels {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Channels {
            smtp_url: var("CUSTOS_SMTP_URL"),
            smtp_from: var("CUSTOS_SMTP_FROM"),
            chat_webhook: var("CUSTOS_CHAT_WEBHOOK_URL"),
            slack_api_url: var("CUSTOS_SLACK_API_URL"),
        }
    }
}

/// What the approval services expose.
pub struct Approvals {
    pub base_url: String,
    /// The channels approvers are asked on, by name.
    pub channels: Vec<&'static str>,
    pub issuer: LinkIssuer<LedgerHandle>,
}

/// The MFA sealing key, created once next to the audit key.
fn mfa_key(data_dir: &Path) -> anyhow::Result<MfaKey> {
    let path = data_dir.join("mfa.key");
    if path.exists() {
        let hex_key = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let bytes: [u8; 32] = hex::decode(hex_key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{} does not hold a 32-byte hex key", path.display()))?;
        return Ok(MfaKey::from_bytes(bytes));
    }
    let key = MfaKey::generate();
    crate::keys::write_private(&path, &hex::encode(key.expose_bytes()))?;
    Ok(key)
}

/// Starts the ballot box, the approval step with every configured channel, the
/// expiry sweep and the web server for approval pages and Slack interactions.
pub async fn approvals(
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    trail: &Trail,
    data_dir: &Path,
    settings: ApprovalSettings,
    shutdown: &Shutdown,
) -> anyhow::Result<Approvals> {
    let ApprovalSettings {
        http_addr,
        public_url,
        channels,
        remind_every,
    } = settings;
    let ballots: Arc<dyn BallotBox> = Arc::new(TrailBallotBox::new(trail.clone(), ledger.clone()));
    let listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("listening on {http_addr} (--http-addr)"))?;
    let bound = listener.local_addr()?;
    let base_url = public_url.unwrap_or_else(|| format!("http://{bound}"));
    let issuer = LinkIssuer::new(
        js,
        ballots.clone(),
        ledger.clone(),
        &mfa_key(data_dir)?,
        LinkSettings::new(&base_url),
        system_clock(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("approval links: {e}"))?;
    let links: Arc<dyn ApprovalLinks> = Arc::new(issuer.clone());
    let mut notifiers: Vec<Arc<dyn Notifier>> = Vec::new();
    let mut names = Vec::new();
    let mut router = links_router(issuer.clone());
    if let Some(url) = &channels.smtp_url {
        let from = channels.smtp_from.as_deref().unwrap_or("custos@localhost");
        let mailer = Mailer::from_url(url, from).map_err(|e| anyhow::anyhow!("SMTP: {e}"))?;
        notifiers.push(Arc::new(EmailNotifier::new(links.clone(), mailer)));
        names.push("email");
    }
    if let Some(url) = &channels.chat_webhook {
        let chat: Arc<dyn ApprovalLinks> = Arc::new(issuer.for_channel(ApprovalChannel::ChatLink));
        let url = WebhookUrl::new(url.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        notifiers.push(Arc::new(
            ChatWebhookNotifier::new(chat, url).map_err(|e| anyhow::anyhow!("{e}"))?,
        ));
        names.push("chat link");
    }
    if let Ok(secrets) = SlackSecrets::from_env() {
        let api_url = channels.slack_api_url.as_deref().unwrap_or(SLACK_API_URL);
        let api = Arc::new(
            SlackApi::new(secrets.bot_token(), api_url).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        notifiers.push(Arc::new(SlackNotifier::new(api.clone(), links.clone())));
        router = router.merge(slack_router(SlackInteractions::new(
            ballots.clone(),
            api,
            &secrets,
        )));
        names.push("slack");
    }
    if notifiers.is_empty() {
        notifiers.push(Arc::new(ConsoleNotifier::new(links)));
        names.push("console (links printed here)");
    }
    // Operators' `custos user enrol` requests: links go to the users on the
    // same channels (those that reach them alone).
    let enrolments = Arc::new(Enrolments::new(
        trail.clone(),
        issuer.clone(),
        names
            .iter()
            .copied()
            .zip(notifiers.iter().cloned())
            .collect(),
    ));
    tokio::spawn(
        enrolment::serve(js.client(), enrolments, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("the MFA enrolment service: {e}"))?,
    );
    // The same channels ask for transfers and for administrative changes, and
    // remind those who have not answered.
    tokio::spawn(remind(
        trail.clone(),
        notifiers.clone(),
        remind_every,
        shutdown.clone(),
    ));
    // Requirements still unmet after their escalation delay: asked of their
    // second group (checked as often as expiries).
    tokio::spawn(escalate(
        trail.clone(),
        ledger.clone(),
        notifiers.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    let changes = ApprovalStep::changes(trail.clone(), notifiers.clone());
    let step = ApprovalStep::new(trail.clone(), notifiers).map_err(anyhow::Error::msg)?;
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        step,
        shutdown.clone(),
    ));
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        changes,
        shutdown.clone(),
    ));
    tokio::spawn(expire(
        trail.clone(),
        ledger.clone(),
        Duration::from_secs(5),
        shutdown.clone(),
    ));
    let mut stop = shutdown.clone();
    tokio::spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.wait().await })
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the approval web server stopped");
        }
    });
    Ok(Approvals {
        base_url,
        channels: names,
        issuer,
    })
}

/// Starts the service that records change requests (policy apply, whitelist,
/// freeze, key ceremonies, fee bumps) under `configured` until the trail
/// activates another, valuing fee bumps with `prices`.
pub fn changes(
    client: &async_nats::Client,
    ledger: &LedgerHandle,
    trail: &Trail,
    configured: custos_engine::policy::Policy,
    prices: custos_workers::policy_step::Prices,
    shutdown: &Shutdown,
) {
    let (client, trail, ledger, shutdown) = (
        client.clone(),
        trail.clone(),
        ledger.clone(),
        shutdown.clone(),
    );
    tokio::spawn(async move {
        if let Err(e) =
            custos_workers::change::serve(client, trail, ledger, configured, prices, shutdown).await
        {
            tracing::error!(error = %e, "the change request service stopped");
        }
    });
}

/// Starts the signing coordinator, and the sweep that signs transfers once
/// their policy time delay has passed.
pub fn signing(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    trail: &Trail,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let step = SignStep::new(client.clone(), trail.clone()).map_err(anyhow::Error::msg)?;
    tokio::spawn(custos_workers::signing::sign_when_due(
        step.clone(),
        ledger.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    ));
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        step,
        shutdown.clone(),
    ));
    Ok(())
}

/// Starts the chain steps for the Bitcoin-family `node` and the `evm` node:
/// building transactions (from the node's coins, or with the wallet's next
/// nonce), broadcasting signed ones, watching for confirmations, replacing
/// stuck transactions by fee bumps, and answering balance questions.
pub fn chain(
    client: &async_nats::Client,
    js: &jetstream::Context,
    ledger: &LedgerHandle,
    trail: &Trail,
    node: Option<&BitcoinNode>,
    evm: Option<&EvmNode>,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let nodes = || {
        ChainNodes::new(node.map(|n| (n.chain().to_string(), n.rpc().clone()))).with_evm(
            EvmNodes::new(evm.map(|e| (e.chain().to_string(), e.rpc().clone()))),
        )
    };
    let build =
        BuildStep::new(trail.clone(), nodes(), ledger.clone()).map_err(anyhow::Error::msg)?;
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        build,
        shutdown.clone(),
    ));
    // An alert once a node has refused a broadcast this many times in a row.
    let broadcast = BroadcastStep::new(nodes(), ledger.clone(), 3).map_err(anyhow::Error::msg)?;
    tokio::spawn(custos_workers::runtime::run(
        js.clone(),
        ledger.clone(),
        broadcast,
        shutdown.clone(),
    ));
    if node.is_some() || evm.is_some() {
        let balances = balances(
            client.clone(),
            trail.clone(),
            BalanceNodes {
                bitcoin: node.map(|n| (n.chain().to_string(), n.rpc().clone())),
                evm: evm.map(|e| (e.chain(), e.rpc().clone())),
            },
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = balances.await {
                tracing::error!(error = %e, "the balance service stopped");
            }
        });
    }
    let watcher = ConfirmWatcher::new(
        trail.clone(),
        nodes(),
        ledger.clone(),
        Confirmations::default(),
    );
    tokio::spawn(watcher.run(Duration::from_secs(1), shutdown.clone()));
    // Stuck transactions are replaced after their chain's default wait.
    // Each bump is a change the policy decides (approvals where it says so).
    let bumper = FeeBumper::new(
        client.clone(),
        trail.clone(),
        nodes(),
        ledger.clone(),
        BumpAfter::default(),
    );
    tokio::spawn(bumper.run(Duration::from_secs(5), shutdown.clone()));
    Ok(())
}

/// The nodes the balance service asks, each with its chain id.
pub struct BalanceNodes {
    pub bitcoin: Option<(String, Bitcoind)>,
    pub evm: Option<(String, EvmRpc)>,
}

/// Answers balance questions ([`subjects::REQ_WALLET_BALANCE`]) from the
/// wallet's chain's node: a Bitcoin-family wallet's confirmed coins at its
/// recorded address, an EVM wallet's balance in wei at the latest block.
pub async fn balances(
    client: async_nats::Client,
    trail: Trail,
    nodes: BalanceNodes,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut requests = client
        .subscribe(custos_schemas::subjects::REQ_WALLET_BALANCE)
        .await?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            m = requests.next() => match m { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let answer = balance(&trail, &nodes, &msg.payload).await;
        let body = serde_json::to_vec(&match answer {
            Ok(b) => b,
            Err(e) => serde_json::json!({ "error": e }),
        })
        .unwrap_or_default();
        if let Err(e) = client.publish(reply_to, body.into()).await {
            tracing::warn!(error = %e, "could not answer a balance question");
        }
    }
    Ok(())
}

async fn balance(
    trail: &Trail,
    nodes: &BalanceNodes,
    request: &[u8],
) -> Result<serde_json::Value, String> {
    let name = serde_json::from_slice::<serde_json::Value>(request)
        .ok()
        .and_then(|v| v["wallet"].as_str().map(str::to_string))
        .ok_or("wallet: expected {\"wallet\": NAME}")?;
    let wallet = trail
        .read(|v| v.ledger.wallet(&name).cloned())
        .await?
        .ok_or_else(|| format!("wallet: no wallet {name}"))?;
    if let Some((chain, node)) = nodes.bitcoin.as_ref().filter(|(c, _)| *c == wallet.chain) {
        let coins = node
            .scan_addresses(&[&wallet.address])
            .await
            .map_err(|e| e.to_string())?;
        let confirmed: u64 = coins.iter().map(|c| c.value).sum();
        return Ok(serde_json::json!({
            "wallet": name,
            "chain": chain,
            "address": wallet.address,
            "confirmedSat": confirmed,
            "coins": coins.len(),
        }));
    }
    if let Some((chain, node)) = nodes.evm.as_ref().filter(|(c, _)| *c == wallet.chain) {
        let spec = custos_engine::chains::chain(chain)
            .ok_or_else(|| format!("chain {chain} is not known"))?;
        let wei = node
            .balance(&wallet.address)
            .await
            .map_err(|e| e.to_string())?;
        // Wei as a decimal string: JSON numbers lose precision above 2^53.
        return Ok(serde_json::json!({
            "wallet": name,
            "chain": chain,
            "address": wallet.address,
            "wei": wei.to_string(),
            "asset": spec.native_asset,
            "amount": base_units_to_decimal(wei, spec.decimals),
        }));
    }
    let served: Vec<&str> = [
        nodes.bitcoin.as_ref().map(|(c, _)| c.as_str()),
        nodes.evm.as_ref().map(|(c, _)| c.as_str()),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(format!(
        "wallet: {name} is on {}, this engine's nodes serve {}",
        wallet.chain,
        served.join(" and ")
    ))
}

/// `units / 10^decimals` as a plain decimal string without trailing zeros.
fn base_units_to_decimal(units: u128, decimals: u8) -> String {
    let digits = format!("{units:0>width$}", width = usize::from(decimals) + 1);
    let (int, frac) = digits.split_at(digits.len() - usize::from(decimals));
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    }
}

/// A Bitcoin-family node: given (`--btc-rpc`), or a local regtest litecoind.
pub enum BitcoinNode {
    Remote { chain: String, rpc: Bitcoind },
    Local(RegtestNode),
}

impl BitcoinNode {
    pub fn chain(&self) -> &str {
        match self {
            BitcoinNode::Remote { chain, .. } => chain,
            BitcoinNode::Local(_) => "ltc-regtest",
        }
    }

    pub fn rpc(&self) -> &Bitcoind {
        match self {
            BitcoinNode::Remote { rpc, .. } => rpc,
            BitcoinNode::Local(node) => &node.rpc,
        }
    }
}

/// The node behind `--btc-rpc URL` (credentials in the URL's user info).
pub fn remote_node(url: &str, chain: &str) -> anyhow::Result<BitcoinNode> {
    let parsed = url::Url::parse(url).with_context(|| "--btc-rpc is not a URL".to_string())?;
    custos_engine::chains::chain(chain)
        .with_context(|| format!("--btc-network: unknown chain {chain}"))?;
    let user = parsed.username().to_string();
    let password = parsed.password().unwrap_or_default().to_string();
    let mut bare = parsed.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let rpc = Bitcoind::new(bare.as_str().trim_end_matches('/'), &user, &password)
        .map_err(|e| anyhow::anyhow!("--btc-rpc: {e}"))?;
    Ok(BitcoinNode::Remote {
        chain: chain.to_string(),
        rpc,
    })
}

/// An EVM node: given (`--evm-rpc`), or a local anvil.
pub enum EvmNode {
    Remote { chain: String, rpc: EvmRpc },
    Local(AnvilNode),
}

impl EvmNode {
    pub fn chain(&self) -> String {
        match self {
            EvmNode::Remote { chain, .. } => chain.clone(),
            EvmNode::Local(_) => format!("evm-{}", custos_adapters::anvil::CHAIN_ID),
        }
    }

    pub fn rpc(&self) -> &EvmRpc {
        match self {
            EvmNode::Remote { rpc, .. } => rpc,
            EvmNode::Local(node) => &node.rpc,
        }
    }
}

/// The node behind `--evm-rpc URL`, which must serve chain `chain_id` (a node
/// on another chain would get transactions signed for the wrong one refused,
/// or worse, replayed: checked at start).
pub async fn remote_evm(url: &str, chain_id: u64) -> anyhow::Result<EvmNode> {
    url::Url::parse(url).with_context(|| "--evm-rpc is not a URL".to_string())?;
    let chain = format!("evm-{chain_id}");
    custos_engine::chains::chain(&chain)
        .with_context(|| format!("--evm-chain-id: Custos does not know chain {chain_id}"))?;
    let rpc = EvmRpc::new(url).map_err(|e| anyhow::anyhow!("--evm-rpc: {e}"))?;
    let served = rpc
        .chain_id()
        .await
        .map_err(|e| anyhow::anyhow!("--evm-rpc: {e}"))?;
    anyhow::ensure!(
        served == chain_id,
        "--evm-rpc serves chain id {served}, not --evm-chain-id {chain_id}"
    );
    Ok(EvmNode::Remote { chain, rpc })
}

#[cfg(test)]
mod tests {
    use super::base_units_to_decimal;

    #[test]
    fn base_units_read_as_decimals() {
        assert_eq!(base_units_to_decimal(0, 18), "0");
        assert_eq!(base_units_to_decimal(1, 18), "0.000000000000000001");
        assert_eq!(base_units_to_decimal(1_500_000_000_000_000_000, 18), "1.5");
        assert_eq!(base_units_to_decimal(2_000_000_000_000_000_000, 18), "2");
        assert_eq!(base_units_to_decimal(123_456_789, 8), "1.23456789");
        assert_eq!(base_units_to_decimal(7, 0), "7");
    }
}
