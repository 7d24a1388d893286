//! A local litecoind in regtest (Bitcoin Core 0.21 code, Taproot active from
//! block 0) as a child process: what `custos up` runs when no node is configured
//! and litecoind is installed, and what tests start on free loopback ports. Its
//! wallet holds mature coins to fund Custos wallets from. Stopped in `Drop`.
//!
//! The node runs in the foreground as our child (not `-daemon`), so that it is
//! ours to stop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bitcoind::{Bitcoind, RpcError};
use crate::nats_server::free_port;

/// Debian's binary (the `/usr/bin` wrapper writes `~/.litecoin/litecoin.conf`).
pub const DEFAULT_BINARY: &str = "/usr/lib/litecoin/litecoind";
/// Regtest-only credentials: the node listens on loopback only.
const USER: &str = "custos";
const PASSWORD: &str = "regtest-only";
const WALLET: &str = "node";

#[derive(Debug, thiserror::Error)]
pub enum RegtestError {
    #[error(
        "could not start {binary} ({source}); run scripts/install-deps or set CUSTOS_LITECOIND"
    )]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("litecoind did not answer within 30 s: {last}\n{log}")]
    NotReady { last: String, log: String },
    #[error("litecoind exited before answering: {status}\n{log}")]
    Exited { status: String, log: String },
    #[error("litecoind: {0}")]
    Rpc(#[from] RpcError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The litecoind binary to run: `CUSTOS_LITECOIND` or Debian's.
pub fn binary() -> String {
    std::env::var("CUSTOS_LITECOIND").unwrap_or_else(|_| DEFAULT_BINARY.into())
}

/// Whether a litecoind binary is installed.
pub fn installed() -> bool {
    Path::new(&binary()).exists()
}

/// A regtest node owned by this process.
#[derive(Debug)]
pub struct RegtestNode {
    child: Option<Child>,
    binary: String,
    pub data_dir: PathBuf,
    pub rpc_port: u16,
    pub p2p_port: u16,
    pub rpc: Bitcoind,
    /// Where `mine` sends block rewards (the node wallet's).
    mining_address: String,
}

impl RegtestNode {
    /// The running node's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a node storing under `data_dir` with RPC on `rpc_port` (0 picks a
    /// free one), loads or creates its wallet and mines until the wallet can
    /// spend block rewards. Restarting on the same directory keeps the chain.
    pub async fn start(data_dir: &Path, rpc_port: u16) -> Result<RegtestNode, RegtestError> {
        std::fs::create_dir_all(data_dir)?;
        let rpc_port = if rpc_port == 0 {
            free_port()?
        } else {
            rpc_port
        };
        let rpc = Bitcoind::new(&format!("http://127.0.0.1:{rpc_port}"), USER, PASSWORD)?;
        let mut node = RegtestNode {
            child: None,
            binary: binary(),
            data_dir: data_dir.to_path_buf(),
            rpc_port,
            p2p_port: free_port()?,
            rpc,
            mining_address: String::new(),
        };
        node.spawn().await?;
        node.open_wallet().await?;
        node.mining_address = node.rpc.get_new_address(Some("bech32")).await?;
        // Block rewards mature after 100 blocks: 120 leave 20 spendable ones.
        let height = node.rpc.get_block_count().await?;
        if height < 120 {
            node.mine(120 - height as u32).await?;
        }
        Ok(node)
    }

    /// The command of `test-infrastructure.md` in the foreground, plus
    /// `-txindex=1` for `getrawtransaction` of any transaction.
    async fn spawn(&mut self) -> Result<(), RegtestError> {
        let child = Command::new(&self.binary)
            .arg("-regtest")
            .arg(format!("-datadir={}", self.data_dir.display()))
            .arg(format!("-rpcport={}", self.rpc_port))
            .arg(format!("-port={}", self.p2p_port))
            .args([
                "-bind=127.0.0.1",
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
            ])
            .arg(format!("-rpcuser={USER}"))
            .arg(format!("-rpcpassword={PASSWORD}"))
            .args([
                "-fallbackfee=0.0001",
                // Without this MWEB activates at height 432 and mining fails.
                "-vbparams=mweb:4102444800:4102444800",
                "-txindex=1",
                // Litecoin Core refuses BIP-125 replacements unless asked:
                // fee bumps need them.
                "-mempoolreplacement=1",
                // Steps call in parallel; the default queue of 16 refuses bursts.
                "-rpcworkqueue=256",
                "-rpcthreads=8",
                "-printtoconsole=0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| RegtestError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), RegtestError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = match self.rpc.get_blockchain_info().await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(RegtestError::Exited {
                    status: status.to_string(),
                    log: self.debug_log_tail(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RegtestError::NotReady {
                    last: last.to_string(),
                    log: self.debug_log_tail(),
                });
            }
            // Poll until the RPC answers (warming up takes ~0.4 s).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loads the node wallet, creating it on the first start.
    async fn open_wallet(&self) -> Result<(), RegtestError> {
        let loaded: Result<serde_json::Value, RpcError> = self
            .rpc
            .call("loadwallet", serde_json::json!([WALLET]))
            .await;
        match loaded {
            Ok(_) => Ok(()),
            // -18: no such wallet yet; -35: already loaded.
            Err(RpcError::Rpc { code: -35, .. }) => Ok(()),
            Err(RpcError::Rpc { code: -18, .. }) => {
                let _: serde_json::Value = self
                    .rpc
                    .call("createwallet", serde_json::json!([WALLET]))
                    .await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn debug_log_tail(&self) -> String {
        let log = self.data_dir.join("regtest/debug.log");
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the node cleanly (RPC `stop`) and waits for the process to exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let asked: Result<serde_json::Value, RpcError> =
            self.rpc.call("stop", serde_json::json!([])).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while asked.is_ok() && tokio::time::Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            // Poll for the exit the node promised.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped node again on the same ports and directory.
    pub async fn restart(&mut self) -> Result<(), RegtestError> {
        self.stop().await;
        self.spawn().await?;
        self.open_wallet().await
    }

    /// A client of this node reached through `url` (a relay in front of it),
    /// with the node's credentials.
    pub fn client_via(&self, url: &str) -> Result<Bitcoind, RegtestError> {
        Ok(Bitcoind::new(url, USER, PASSWORD)?)
    }

    /// Unloads the node wallet once it has funded what it should: a node that
    /// custody reads from needs none (coins are found with `scantxoutset`), and
    /// a loaded wallet examines every transaction entering the mempool. Mining
    /// still works; `restart` loads the wallet again.
    pub async fn close_wallet(&self) -> Result<(), RegtestError> {
        let _: serde_json::Value = self
            .rpc
            .call("unloadwallet", serde_json::json!([WALLET]))
            .await?;
        Ok(())
    }

    /// Pays `satoshi` from the node wallet to `address`; returns the txid.
    pub async fn fund(&self, address: &str, satoshi: u64) -> Result<String, RegtestError> {
        Ok(self.rpc.send_to_address(address, satoshi).await?)
    }

    /// Pays `count` coins of `satoshi` each to `address` (many outputs to one
    /// address, which `sendmany` cannot express), up to 1,000 per transaction;
    /// returns the txids.
    pub async fn fund_many(
        &self,
        address: &str,
        satoshi: u64,
        count: usize,
    ) -> Result<Vec<String>, RegtestError> {
        #[derive(serde::Deserialize)]
        struct AddressInfo {
            #[serde(rename = "scriptPubKey")]
            script_pubkey: String,
        }
        #[derive(serde::Deserialize)]
        struct Hex {
            hex: String,
        }
        let info: AddressInfo = self
            .rpc
            .call("validateaddress", serde_json::json!([address]))
            .await?;
        let script = hex::decode(&info.script_pubkey).map_err(|e| RpcError::Decode {
            method: "validateaddress".into(),
            reason: e.to_string(),
        })?;
        let mut output = satoshi.to_le_bytes().to_vec();
        output.push(script.len() as u8);
        output.extend_from_slice(&script);
        let mut txids = Vec::new();
        let mut left = count;
        while left > 0 {
            let n = left.min(1_000);
            left -= n;
            // Version 2, no inputs (the wallet adds them), n outputs, locktime 0.
            let mut tx = vec![2, 0, 0, 0, 0];
            // The output count as a canonical CompactSize.
            if n < 0xfd {
                tx.push(n as u8);
            } else {
                tx.push(0xfd);
                tx.extend_from_slice(&(n as u16).to_le_bytes());
            }
            for _ in 0..n {
                tx.extend_from_slice(&output);
            }
            tx.extend_from_slice(&[0; 4]);
            let funded: Hex = self
                .rpc
                .call(
                    "fundrawtransaction",
                    serde_json::json!([hex::encode(&tx), {}, false]),
                )
                .await?;
            let signed: Hex = self
                .rpc
                .call(
                    "signrawtransactionwithwallet",
                    serde_json::json!([funded.hex]),
                )
                .await?;
            txids.push(self.rpc.send_raw_transaction(&signed.hex).await?);
        }
        Ok(txids)
    }

    /// Mines `n` blocks; returns their hashes.
    pub async fn mine(&self, n: u32) -> Result<Vec<String>, RegtestError> {
        Ok(self
            .rpc
            .generate_to_address(n, &self.mining_address)
            .await?)
    }
}

impl Drop for RegtestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
