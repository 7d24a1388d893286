//! A litecoind regtest node (Bitcoin Core 0.21 code, Taproot active from block 0)
//! on free loopback ports in a temporary datadir, with a node wallet holding
//! mature coins to fund Custos wallets from. Killed in `Drop`.
//!
//! The node runs in the foreground as our child (not `-daemon`) so that it is
//! ours to stop by PID.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use custos_adapters::bitcoind::{Bitcoind, RpcError};
use custos_adapters::nats_server::free_port;
use tempfile::TempDir;

pub const DEFAULT_BINARY: &str = "/usr/lib/litecoin/litecoind";
const USER: &str = "custos";
const PASSWORD: &str = "regtest-only";
const WALLET: &str = "node";

/// A regtest node owned by this test.
#[derive(Debug)]
pub struct Litecoind {
    child: Option<Child>,
    binary: String,
    pub dir: TempDir,
    pub rpc_port: u16,
    pub p2p_port: u16,
    pub rpc: Bitcoind,
    /// Where `mine` sends block rewards (the node wallet's).
    mining_address: String,
}

impl Litecoind {
    /// Starts a node, creates its wallet and mines 101 blocks so the wallet can
    /// spend its first reward.
    pub async fn start() -> Litecoind {
        let binary = std::env::var("CUSTOS_LITECOIND").unwrap_or_else(|_| DEFAULT_BINARY.into());
        let dir = tempfile::tempdir().expect("temp dir");
        let rpc_port = free_port().expect("free port");
        let p2p_port = free_port().expect("free port");
        let rpc = Bitcoind::new(&format!("http://127.0.0.1:{rpc_port}"), USER, PASSWORD)
            .expect("rpc client");
        let mut node = Litecoind {
            child: None,
            binary,
            dir,
            rpc_port,
            p2p_port,
            rpc,
            mining_address: String::new(),
        };
        node.spawn().await;
        let _: serde_json::Value = node
            .rpc
            .call("createwallet", serde_json::json!([WALLET]))
            .await
            .expect("createwallet");
        node.mining_address = node
            .rpc
            .get_new_address(Some("bech32"))
            .await
            .expect("getnewaddress");
        node.mine(101).await;
        node
    }

    /// The exact command of `/work/shared/notes/test-infrastructure.md` in the
    /// foreground, plus `-txindex=1` for `getrawtransaction` of any transaction.
    async fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .arg("-regtest")
            .arg(format!("-datadir={}", self.dir.path().display()))
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
                "-printtoconsole=0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/install-deps or set CUSTOS_LITECOIND",
                    self.binary
                )
            });
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = match self.rpc.get_blockchain_info().await {
                Ok(_) => return,
                Err(e) => e,
            };
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "litecoind exited with {status} before answering: {last}\n{}",
                    self.debug_log_tail()
                );
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "litecoind not ready after 30 s: {last}\n{}",
                    self.debug_log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn debug_log_tail(&self) -> String {
        let log = self.dir.path().join("regtest/debug.log");
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the stopped node again on the same ports and datadir.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
        let _: serde_json::Value = self
            .rpc
            .call("loadwallet", serde_json::json!([WALLET]))
            .await
            .expect("loadwallet");
    }

    /// Pays `coins` (LTC) from the node wallet to `address`; returns the txid.
    pub async fn fund(&self, address: &str, coins: f64) -> String {
        self.rpc
            .send_to_address(address, (coins * 1e8).round() as u64)
            .await
            .expect("sendtoaddress")
    }

    /// Mines `n` blocks; returns their hashes.
    pub async fn mine(&self, n: u32) -> Vec<String> {
        self.rpc
            .generate_to_address(n, &self.mining_address)
            .await
            .expect("generatetoaddress")
    }
}

impl Drop for Litecoind {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
