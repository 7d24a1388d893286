//! A local anvil (Foundry's EVM node) as a child process: what `custos up` runs
//! when no EVM node is configured and anvil is installed, and what tests start
//! on free loopback ports. Its dev accounts (the well-known test mnemonic) hold
//! ether to fund Custos wallets from. Killed in `Drop`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::evm::{EvmRpc, RpcError};
use crate::nats_server::free_port;

/// Where `scripts/install-deps` puts the npm package's binary, under `$HOME`.
const NPM_BINARY: &str = ".cache/custos/npm/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil";
/// The chain id anvil uses by default (`evm-31337` in Custos).
pub const CHAIN_ID: u64 = 31_337;
/// The first dev account (funded with 10,000 ether; public test key).
pub const DEV_ACCOUNT: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";

#[derive(Debug, thiserror::Error)]
pub enum AnvilError {
    #[error("could not start {binary} ({source}); run scripts/install-deps or set CUSTOS_ANVIL")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("anvil did not answer within 30 s: {last}")]
    NotReady { last: String },
    #[error("anvil exited before answering: {status}")]
    Exited { status: String },
    #[error("anvil: {0}")]
    Rpc(#[from] RpcError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The anvil binary to run: `CUSTOS_ANVIL`, or where install-deps puts it.
pub fn binary() -> String {
    std::env::var("CUSTOS_ANVIL").unwrap_or_else(|_| {
        std::env::var("HOME")
            .map(|home| format!("{home}/{NPM_BINARY}"))
            .unwrap_or_else(|_| "anvil".into())
    })
}

/// Whether an anvil binary is installed.
pub fn installed() -> bool {
    Path::new(&binary()).exists()
}

/// An anvil node owned by this process.
#[derive(Debug)]
pub struct AnvilNode {
    child: Option<Child>,
    binary: String,
    pub port: u16,
    pub rpc: EvmRpc,
    /// The chain state taken at [`AnvilNode::stop`], loaded again at restart
    /// (anvil keeps its chain in memory).
    saved: Option<Value>,
}

impl AnvilNode {
    /// The running node's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts anvil on `port` (0 picks a free one) with automine, and waits
    /// until it answers `eth_chainId`.
    pub async fn start(port: u16) -> Result<AnvilNode, AnvilError> {
        let port = if port == 0 { free_port()? } else { port };
        let rpc = EvmRpc::new(&format!("http://127.0.0.1:{port}"))?;
        let mut node = AnvilNode {
            child: None,
            binary: binary(),
            port,
            rpc,
            saved: None,
        };
        node.spawn().await?;
        Ok(node)
    }

    async fn spawn(&mut self) -> Result<(), AnvilError> {
        let child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--chain-id", &CHAIN_ID.to_string(), "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| AnvilError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let last = match self.rpc.chain_id().await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(AnvilError::Exited {
                    status: status.to_string(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(AnvilError::NotReady {
                    last: last.to_string(),
                });
            }
            // Poll until it answers (~0.16 s).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the node, keeping its chain state for [`AnvilNode::restart`].
    pub async fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.saved = self.rpc.call("anvil_dumpState", json!([])).await.ok();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped node again on the same port, with the chain it had.
    pub async fn restart(&mut self) -> Result<(), AnvilError> {
        self.stop().await;
        self.spawn().await?;
        if let Some(state) = self.saved.take() {
            let _: Value = self.rpc.call("anvil_loadState", json!([state])).await?;
        }
        Ok(())
    }

    /// Pays `wei` from the first dev account to `address`; returns the txid
    /// (mined at once under automine).
    pub async fn fund(&self, address: &str, wei: u128) -> Result<String, AnvilError> {
        Ok(self
            .rpc
            .call(
                "eth_sendTransaction",
                json!([{"from": DEV_ACCOUNT, "to": address, "value": format!("{wei:#x}")}]),
            )
            .await?)
    }

    /// Mines `n` blocks.
    pub async fn mine(&self, n: u64) -> Result<(), AnvilError> {
        let _: Value = self
            .rpc
            .call("anvil_mine", json!([format!("{n:#x}")]))
            .await?;
        Ok(())
    }

    /// Turns automine on or off (off: transactions wait in the mempool for
    /// [`AnvilNode::mine`]).
    pub async fn set_automine(&self, on: bool) -> Result<(), AnvilError> {
        let _: Value = self.rpc.call("evm_setAutomine", json!([on])).await?;
        Ok(())
    }

    /// A snapshot id to [`AnvilNode::revert`] to (a reorg, as far as the
    /// chain's followers can tell).
    pub async fn snapshot(&self) -> Result<String, AnvilError> {
        Ok(self.rpc.call("evm_snapshot", json!([])).await?)
    }

    pub async fn revert(&self, snapshot: &str) -> Result<bool, AnvilError> {
        Ok(self.rpc.call("evm_revert", json!([snapshot])).await?)
    }
}

impl Drop for AnvilNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
