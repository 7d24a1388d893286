//! A litecoind regtest node for tests: the adapter's [`RegtestNode`] in a
//! temporary directory on free ports, with test-shaped helpers (amounts in
//! coins, panics instead of errors). Killed in `Drop`.

use custos_adapters::regtest::RegtestNode;
use tempfile::TempDir;

/// A regtest node owned by this test.
#[derive(Debug)]
pub struct Litecoind {
    node: RegtestNode,
    pub dir: TempDir,
}

impl std::ops::Deref for Litecoind {
    type Target = RegtestNode;

    fn deref(&self) -> &RegtestNode {
        &self.node
    }
}

impl Litecoind {
    /// Starts a node with a wallet holding spendable block rewards.
    pub async fn start() -> Litecoind {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = RegtestNode::start(dir.path(), 0)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Litecoind { node, dir }
    }

    /// Stops the node cleanly and waits for the process to exit.
    pub async fn stop(&mut self) {
        self.node.stop().await;
    }

    /// Starts the stopped node again on the same ports and datadir.
    pub async fn restart(&mut self) {
        self.node
            .restart()
            .await
            .unwrap_or_else(|e| panic!("restarting litecoind: {e}"));
    }

    /// Pays `coins` (LTC) from the node wallet to `address`; returns the txid.
    pub async fn fund(&self, address: &str, coins: f64) -> String {
        self.node
            .fund(address, (coins * 1e8).round() as u64)
            .await
            .unwrap_or_else(|e| panic!("funding {address}: {e}"))
    }

    /// Mines `n` blocks; returns their hashes.
    pub async fn mine(&self, n: u32) -> Vec<String> {
        self.node
            .mine(n)
            .await
            .unwrap_or_else(|e| panic!("mining: {e}"))
    }
}
