//! An Ethereum JSON-RPC client: the calls Custos needs to build EIP-1559
//! transfers (nonce, gas, fees), broadcast them idempotently and follow their
//! receipts. Quantities come back as integers (wei, gas, block numbers); the
//! errors are the Bitcoin-family client's ([`RpcError`]), with the same idea of
//! what is worth retrying.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use crate::bitcoind::RpcError;

/// A JSON-RPC client for one EVM node.
#[derive(Clone)]
pub struct EvmRpc {
    http: reqwest::Client,
    url: String,
    /// Scheme, host and port: what errors and `Debug` show, as a hosted node's
    /// URL often carries an API key in its path or query.
    shown: String,
    next_id: Arc<AtomicU64>,
}

impl fmt::Debug for EvmRpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EvmRpc").field("node", &self.shown).finish()
    }
}

/// A `0x`-prefixed hex quantity as an integer.
pub fn quantity(method: &str, v: &Value) -> Result<u128, RpcError> {
    let decode = |reason: String| RpcError::Decode {
        method: method.to_owned(),
        reason,
    };
    let s = v
        .as_str()
        .ok_or_else(|| decode(format!("expected a hex quantity, got {v}")))?;
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| decode(format!("{s} is not 0x-prefixed")))?;
    u128::from_str_radix(if digits.is_empty() { "0" } else { digits }, 16)
        .map_err(|e| decode(format!("{s}: {e}")))
}

fn narrow(method: &str, v: u128) -> Result<u64, RpcError> {
    u64::try_from(v).map_err(|_| RpcError::Decode {
        method: method.to_owned(),
        reason: format!("{v} does not fit in 64 bits"),
    })
}

/// A mined transaction's receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub transaction_hash: String,
    pub block_hash: String,
    pub block_number: u64,
    /// `false`: the transaction reverted (its nonce and gas are spent anyway).
    pub success: bool,
    pub gas_used: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawReceipt {
    transaction_hash: String,
    block_hash: String,
    block_number: Value,
    status: Value,
    gas_used: Value,
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

/// What `eth_feeHistory` says about the next block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeOutlook {
    /// The base fee of the next block, wei per gas.
    pub next_base_fee: u128,
    /// The median tip paid in recent blocks (`None` when they were empty).
    pub recent_tip: Option<u128>,
}

impl EvmRpc {
    /// A client for `url` (e.g. `http://127.0.0.1:8545`).
    pub fn new(url: &str) -> Result<EvmRpc, RpcError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| RpcError::NodeDown {
                url: url.to_owned(),
                reason: format!("HTTP client: {e}"),
            })?;
        let shown = url::Url::parse(url)
            .ok()
            .and_then(|u| {
                let host = u.host_str()?.to_string();
                Some(match u.port() {
                    Some(p) => format!("{}://{host}:{p}", u.scheme()),
                    None => format!("{}://{host}", u.scheme()),
                })
            })
            .unwrap_or_else(|| "<unparsable URL>".into());
        Ok(EvmRpc {
            http,
            shown,
            url: url.trim_end_matches('/').to_owned(),
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Scheme, host and port (never the path, which may hold an API key).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Any RPC, decoded into `T` (`null` decodes into an `Option`).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        params: Value,
    ) -> Result<T, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let down = |e: reqwest::Error| RpcError::NodeDown {
            url: self.shown.clone(),
            // Without the URL: it may carry an API key.
            reason: e.without_url().to_string(),
        };
        let resp = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(down)?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(RpcError::Unauthorized {
                url: self.shown.clone(),
            });
        }
        let bytes = resp.bytes().await.map_err(down)?;
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
                    // Rate limits (429) are as transient as a busy node.
                    status: if status.as_u16() == 429 {
                        503
                    } else {
                        status.as_u16()
                    },
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

    async fn quantity(&self, method: &str, params: Value) -> Result<u128, RpcError> {
        let v: Value = self.call(method, params).await?;
        quantity(method, &v)
    }

    pub async fn chain_id(&self) -> Result<u64, RpcError> {
        let id = self.quantity("eth_chainId", json!([])).await?;
        narrow("eth_chainId", id)
    }

    pub async fn block_number(&self) -> Result<u64, RpcError> {
        let n = self.quantity("eth_blockNumber", json!([])).await?;
        narrow("eth_blockNumber", n)
    }

    /// Wei at `address` in the latest block.
    pub async fn balance(&self, address: &str) -> Result<u128, RpcError> {
        self.quantity("eth_getBalance", json!([address, "latest"]))
            .await
    }

    /// The next nonce counting the node's pending transactions.
    pub async fn pending_nonce(&self, address: &str) -> Result<u64, RpcError> {
        let n = self
            .quantity("eth_getTransactionCount", json!([address, "pending"]))
            .await?;
        narrow("eth_getTransactionCount", n)
    }

    /// The gas a value transfer would use now (the node runs it).
    pub async fn estimate_gas(&self, from: &str, to: &str, value: u128) -> Result<u64, RpcError> {
        let g = self
            .quantity(
                "eth_estimateGas",
                json!([{"from": from, "to": to, "value": format!("{value:#x}")}]),
            )
            .await?;
        narrow("eth_estimateGas", g)
    }

    /// The node's suggested tip, wei per gas.
    pub async fn max_priority_fee(&self) -> Result<u128, RpcError> {
        self.quantity("eth_maxPriorityFeePerGas", json!([])).await
    }

    /// The next block's base fee and the median tip of the last `blocks`.
    pub async fn fee_outlook(&self, blocks: u64) -> Result<FeeOutlook, RpcError> {
        const METHOD: &str = "eth_feeHistory";
        let v: Value = self
            .call(
                METHOD,
                json!([format!("{:#x}", blocks.max(1)), "latest", [50]]),
            )
            .await?;
        let next_base_fee = v["baseFeePerGas"]
            .as_array()
            .and_then(|a| a.last())
            .ok_or_else(|| RpcError::Decode {
                method: METHOD.into(),
                reason: "no baseFeePerGas".into(),
            })
            .and_then(|b| quantity(METHOD, b))?;
        let mut tips = Vec::new();
        for r in v["reward"].as_array().into_iter().flatten() {
            if let Some(t) = r.as_array().and_then(|a| a.first()) {
                tips.push(quantity(METHOD, t)?);
            }
        }
        tips.sort_unstable();
        Ok(FeeOutlook {
            next_base_fee,
            recent_tip: tips.get(tips.len() / 2).copied(),
        })
    }

    /// Broadcasts `raw` (0x-hex EIP-2718), whose hash is `txid`. Idempotent: a
    /// transaction the node already has (pending or mined) counts as sent.
    pub async fn send_raw_transaction(&self, raw: &str, txid: &str) -> Result<String, RpcError> {
        match self
            .call::<String>("eth_sendRawTransaction", json!([raw]))
            .await
        {
            Ok(hash) => Ok(hash),
            Err(RpcError::Rpc { code, message, .. }) => {
                // Nodes word this differently ("already known", "known
                // transaction", "nonce too low" once it is mined): ask.
                if self.has_transaction(txid).await? {
                    return Ok(txid.to_string());
                }
                Err(RpcError::Rpc {
                    method: "eth_sendRawTransaction".into(),
                    code,
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the node knows the transaction (pending or mined).
    pub async fn has_transaction(&self, txid: &str) -> Result<bool, RpcError> {
        let tx: Option<Value> = self.call("eth_getTransactionByHash", json!([txid])).await?;
        Ok(tx.is_some())
    }

    /// The receipt once mined on the node's canonical chain.
    pub async fn receipt(&self, txid: &str) -> Result<Option<Receipt>, RpcError> {
        const METHOD: &str = "eth_getTransactionReceipt";
        let raw: Option<RawReceipt> = self.call(METHOD, json!([txid])).await?;
        let Some(r) = raw else {
            return Ok(None);
        };
        Ok(Some(Receipt {
            transaction_hash: r.transaction_hash,
            block_hash: r.block_hash,
            block_number: narrow(METHOD, quantity(METHOD, &r.block_number)?)?,
            success: quantity(METHOD, &r.status)? == 1,
            gas_used: narrow(METHOD, quantity(METHOD, &r.gas_used)?)?,
        }))
    }

    /// The hash of the canonical block at `number`, if there is one yet: a
    /// receipt's block hash that differs means a reorg.
    pub async fn block_hash(&self, number: u64) -> Result<Option<String>, RpcError> {
        let block: Option<Value> = self
            .call(
                "eth_getBlockByNumber",
                json!([format!("{number:#x}"), false]),
            )
            .await?;
        Ok(block.and_then(|b| b["hash"].as_str().map(str::to_string)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity("m", &json!("0x0")), Ok(0));
        assert_eq!(quantity("m", &json!("0x")), Ok(0));
        assert_eq!(quantity("m", &json!("0x7a69")), Ok(31_337));
        assert!(quantity("m", &json!("7a69")).is_err());
        assert!(quantity("m", &json!(12)).is_err());
        assert!(quantity("m", &json!("0xzz")).is_err());
    }

    #[test]
    fn debug_shows_the_host_only() {
        let c = EvmRpc::new("https://node.example.com:443/v3/secret-key").expect("client");
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret-key"), "{shown}");
        assert!(shown.contains("node.example.com"), "{shown}");
    }
}
