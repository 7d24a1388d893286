//! A Bitcoin Core JSON-RPC client (also Litecoin Core and other forks of it):
//! the calls Custos needs to find a wallet's coins, broadcast, and follow
//! confirmations. Amounts come back as integer satoshi.
//!
//! Plain HTTP only (no TLS backend is compiled in): talk to a node on loopback or
//! through a tunnel, as Core's RPC itself is not meant to be exposed.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No answer: connection refused or reset, or timed out.
    #[error("node at {url} is down or unreachable: {reason}")]
    NodeDown { url: String, reason: String },
    #[error("node at {url} refused the RPC credentials")]
    Unauthorized { url: String },
    /// The node answered with a JSON-RPC error.
    #[error("{method}: RPC error {code}: {message}")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    #[error("{method}: HTTP {status}: {body}")]
    Http {
        method: String,
        status: u16,
        body: String,
    },
    /// The answer did not have the expected shape.
    #[error("{method}: unexpected answer: {reason}")]
    Decode { method: String, reason: String },
}

/// Core's "verify rejected"/"already in chain" codes and warm-up code.
const RPC_IN_WARMUP: i64 = -28;
const RPC_VERIFY_REJECTED: i64 = -26;
const RPC_VERIFY_ALREADY_IN_CHAIN: i64 = -27;
const RPC_INVALID_ADDRESS_OR_KEY: i64 = -5;

impl RpcError {
    /// Worth retrying later: the node is down, busy, still starting, or already
    /// scanning.
    pub fn is_transient(&self) -> bool {
        match self {
            RpcError::NodeDown { .. } => true,
            // Core answers a full RPC work queue with a 500 and this text.
            RpcError::Http { status, body, .. } => {
                *status == 503 || body.contains("Work queue depth exceeded")
            }
            RpcError::Rpc { code, message, .. } => {
                *code == RPC_IN_WARMUP || message.contains("Scan already in progress")
            }
            RpcError::Unauthorized { .. } | RpcError::Decode { .. } => false,
        }
    }
}

/// A JSON-RPC client for one node (and, for wallet calls, its default wallet).
#[derive(Clone)]
pub struct Bitcoind {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
    next_id: Arc<AtomicU64>,
}

impl fmt::Debug for Bitcoind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bitcoind")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

fn sat_from_coins(coins: f64) -> Option<u64> {
    // Amounts have 8 decimals and at most ~8.4e15 satoshi: exact in an f64 once
    // rounded.
    let sat = (coins * 1e8).round();
    (sat.is_finite() && sat >= 0.0 && sat < 2f64.powi(53)).then_some(sat as u64)
}

fn sat<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let coins = f64::deserialize(d)?;
    sat_from_coins(coins)
        .ok_or_else(|| serde::de::Error::custom(format!("{coins} is not an amount")))
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockchainInfo {
    /// `main`, `test`, `regtest`.
    pub chain: String,
    pub blocks: u64,
    pub headers: u64,
    #[serde(rename = "bestblockhash")]
    pub best_block_hash: String,
    #[serde(rename = "initialblockdownload")]
    pub initial_block_download: bool,
}

/// An unspent output found by `scantxoutset` (confirmed outputs only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ScannedUtxo {
    pub txid: String,
    pub vout: u32,
    #[serde(rename = "scriptPubKey")]
    pub script_pubkey: String,
    /// Satoshi.
    #[serde(rename = "amount", deserialize_with = "sat")]
    pub value: u64,
    pub height: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct ScanResult {
    success: bool,
    unspents: Vec<ScannedUtxo>,
}

/// An unspent output as `gettxout` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TxOutInfo {
    #[serde(rename = "bestblock")]
    pub best_block: String,
    /// 0 while in the mempool.
    pub confirmations: u64,
    /// Satoshi.
    #[serde(deserialize_with = "sat")]
    pub value: u64,
    pub coinbase: bool,
}

/// A transaction as `getrawtransaction` (verbose) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RawTransaction {
    pub txid: String,
    pub hex: String,
    /// 0 (absent) while unconfirmed, or when its block left the best chain.
    #[serde(default)]
    pub confirmations: u64,
    #[serde(rename = "blockhash", default)]
    pub block_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockHeader {
    pub hash: String,
    pub height: u64,
    /// -1 when the block is not on the best chain.
    pub confirmations: i64,
    #[serde(rename = "previousblockhash", default)]
    pub previous_block_hash: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Response {
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<RpcErrorBody>,
}

#[derive(Debug, Deserialize)]
struct RpcErrorBody {
    code: i64,
    message: String,
}

#[derive(Debug, Deserialize)]
struct FeeEstimate {
    #[serde(rename = "feerate")]
    fee_rate: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Decoded {
    txid: String,
}

impl Bitcoind {
    /// A client for `url` (e.g. `http://127.0.0.1:19443`) with RPC basic auth.
    pub fn new(url: &str, user: &str, password: &str) -> Result<Bitcoind, RpcError> {
        Self::with_timeout(url, user, password, Duration::from_secs(60))
    }

    /// With a limit on each call (a mainnet `scantxoutset` can take minutes).
    pub fn with_timeout(
        url: &str,
        user: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<Bitcoind, RpcError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .map_err(|e| RpcError::NodeDown {
                url: url.to_owned(),
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(Bitcoind {
            http,
            url: url.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Any RPC, decoded into `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "1.0", "id": id, "method": method, "params": params});
        let down = |e: reqwest::Error| RpcError::NodeDown {
            url: self.url.clone(),
            reason: e.to_string(),
        };
        let resp = self
            .http
            .post(&self.url)
            .basic_auth(&self.user, Some(&self.password))
            .json(&body)
            .send()
            .await
            .map_err(down)?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(RpcError::Unauthorized {
                url: self.url.clone(),
            });
        }
        let bytes = resp.bytes().await.map_err(down)?;
        // Core answers RPC errors with HTTP 500 (or 404) and a JSON body.
        let Ok(parsed) = serde_json::from_slice::<Response>(&bytes) else {
            let text = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            return Err(if status.is_success() {
                RpcError::Decode {
                    method: method.to_owned(),
                    reason: format!("not a JSON-RPC answer: {text}"),
                }
            } else {
                RpcError::Http {
                    method: method.to_owned(),
                    status: status.as_u16(),
                    body: text,
                }
            });
        };
        if let Some(e) = parsed.error {
            return Err(RpcError::Rpc {
                method: method.to_owned(),
                code: e.code,
                message: e.message,
            });
        }
        serde_json::from_value(parsed.result).map_err(|e| RpcError::Decode {
            method: method.to_owned(),
            reason: e.to_string(),
        })
    }

    pub async fn get_blockchain_info(&self) -> Result<BlockchainInfo, RpcError> {
        self.call("getblockchaininfo", json!([])).await
    }

    pub async fn get_block_count(&self) -> Result<u64, RpcError> {
        self.call("getblockcount", json!([])).await
    }

    /// The hash of the tip of the node's best chain.
    pub async fn get_best_block_hash(&self) -> Result<String, RpcError> {
        self.call("getbestblockhash", json!([])).await
    }

    pub async fn get_block_hash(&self, height: u64) -> Result<String, RpcError> {
        self.call("getblockhash", json!([height])).await
    }

    pub async fn get_block_header(&self, hash: &str) -> Result<BlockHeader, RpcError> {
        self.call("getblockheader", json!([hash, true])).await
    }

    /// The node's fee estimate for confirmation within `target` blocks, in
    /// sat/vB rounded up; `None` when it has no estimate (too little data).
    pub async fn estimate_smart_fee(&self, target: u32) -> Result<Option<u64>, RpcError> {
        let e: FeeEstimate = self.call("estimatesmartfee", json!([target])).await?;
        // feerate is in coins per 1,000 vB.
        Ok(e.fee_rate
            .and_then(sat_from_coins)
            .map(|per_kvb| per_kvb.div_ceil(1000)))
    }

    /// Confirmed unspent outputs of `addresses` (`scantxoutset` with `addr(..)`
    /// descriptors). Mempool spends are not seen: check with [`Self::get_tx_out`].
    pub async fn scan_addresses(&self, addresses: &[&str]) -> Result<Vec<ScannedUtxo>, RpcError> {
        let descriptors: Vec<Value> = addresses
            .iter()
            .map(|a| json!({ "desc": format!("addr({a})") }))
            .collect();
        let r: ScanResult = self
            .call("scantxoutset", json!(["start", descriptors]))
            .await?;
        if !r.success {
            return Err(RpcError::Decode {
                method: "scantxoutset".into(),
                reason: "the scan did not complete".into(),
            });
        }
        Ok(r.unspents)
    }

    /// The output if it is unspent; with `include_mempool`, an output already
    /// spent by a mempool transaction counts as spent.
    pub async fn get_tx_out(
        &self,
        txid: &str,
        vout: u32,
        include_mempool: bool,
    ) -> Result<Option<TxOutInfo>, RpcError> {
        self.call("gettxout", json!([txid, vout, include_mempool]))
            .await
    }

    /// Broadcasts; returns the txid. Idempotent: a transaction the node already
    /// has (in its mempool or in the chain) counts as sent.
    pub async fn send_raw_transaction(&self, hex: &str) -> Result<String, RpcError> {
        match self.call("sendrawtransaction", json!([hex])).await {
            Ok(txid) => Ok(txid),
            Err(RpcError::Rpc { code, message, .. })
                if code == RPC_VERIFY_ALREADY_IN_CHAIN
                    || (code == RPC_VERIFY_REJECTED && message.contains("already")) =>
            {
                let d: Decoded = self.call("decoderawtransaction", json!([hex])).await?;
                Ok(d.txid)
            }
            Err(e) => Err(e),
        }
    }

    /// The transaction and where it is buried (`-txindex=1`, or in the mempool);
    /// `None` if the node does not know it.
    pub async fn get_raw_transaction(
        &self,
        txid: &str,
    ) -> Result<Option<RawTransaction>, RpcError> {
        match self.call("getrawtransaction", json!([txid, true])).await {
            Ok(tx) => Ok(Some(tx)),
            Err(RpcError::Rpc { code, .. }) if code == RPC_INVALID_ADDRESS_OR_KEY => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Regtest: mines `n` blocks to `address`; returns their hashes.
    pub async fn generate_to_address(
        &self,
        n: u32,
        address: &str,
    ) -> Result<Vec<String>, RpcError> {
        self.call("generatetoaddress", json!([n, address])).await
    }

    /// A new address of the node's wallet (`address_type` e.g. `bech32`).
    pub async fn get_new_address(&self, address_type: Option<&str>) -> Result<String, RpcError> {
        match address_type {
            Some(t) => self.call("getnewaddress", json!(["", t])).await,
            None => self.call("getnewaddress", json!([])).await,
        }
    }

    /// Pays `sat` satoshi from the node's wallet; returns the txid.
    pub async fn send_to_address(&self, address: &str, sat: u64) -> Result<String, RpcError> {
        // The shortest decimal that round-trips sat / 1e8 has at most 8 decimals,
        // which is what the node parses.
        let coins =
            serde_json::Number::from_f64(sat as f64 / 1e8).ok_or_else(|| RpcError::Decode {
                method: "sendtoaddress".into(),
                reason: format!("{sat} sat is not an amount"),
            })?;
        self.call("sendtoaddress", json!([address, coins])).await
    }

    /// Marks a block invalid (reorganizes away from it).
    pub async fn invalidate_block(&self, hash: &str) -> Result<(), RpcError> {
        self.call::<Value>("invalidateblock", json!([hash]))
            .await
            .map(drop)
    }

    pub async fn reconsider_block(&self, hash: &str) -> Result<(), RpcError> {
        self.call::<Value>("reconsiderblock", json!([hash]))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_exact_satoshi() {
        assert_eq!(sat_from_coins(0.1), Some(10_000_000));
        assert_eq!(sat_from_coins(50.0000141), Some(5_000_001_410));
        assert_eq!(sat_from_coins(84_000_000.0), Some(8_400_000_000_000_000));
        assert_eq!(sat_from_coins(-0.5), None);
        assert_eq!(sat_from_coins(f64::NAN), None);
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = Bitcoind::new("http://127.0.0.1:1", "u", "hunter2").expect("client");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
