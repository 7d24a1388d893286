//! An anvil node for tests: the adapter's [`AnvilNode`] on a free loopback
//! port, with test-shaped helpers (panics instead of errors). Killed in `Drop`.

use custos_adapters::anvil::AnvilNode;

/// One ether in wei.
pub const ETHER: u128 = 1_000_000_000_000_000_000;

/// An anvil node owned by this test.
#[derive(Debug)]
pub struct Anvil {
    node: AnvilNode,
}

impl std::ops::Deref for Anvil {
    type Target = AnvilNode;

    fn deref(&self) -> &AnvilNode {
        &self.node
    }
}

impl Anvil {
    pub async fn start() -> Anvil {
        let node = AnvilNode::start(0).await.unwrap_or_else(|e| panic!("{e}"));
        Anvil { node }
    }

    /// Pays `wei` from the first dev account; returns the txid.
    /// Waits until it is mined (under automine).
    pub async fn fund(&self, address: &str, wei: u128) -> String {
        let hash = self
            .node
            .fund(address, wei)
            .await
            .unwrap_or_else(|e| panic!("funding {address}: {e}"));
        self.receipt(&hash).await;
        hash
    }

    /// The receipt of `hash` once the node has one: anvil mines an
    /// automined transaction just after answering, not before.
    pub async fn receipt(&self, hash: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let receipt: serde_json::Value = self
                .node
                .rpc
                .call("eth_getTransactionReceipt", serde_json::json!([hash]))
                .await
                .unwrap_or_else(|e| panic!("receipt of {hash}: {e}"));
            if !receipt.is_null() {
                return receipt;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no receipt for {hash}"
            );
            // Poll: the node mines it in the background.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn mine(&self, n: u64) {
        self.node
            .mine(n)
            .await
            .unwrap_or_else(|e| panic!("mining: {e}"))
    }

    pub async fn balance(&self, address: &str) -> u128 {
        self.node
            .rpc
            .balance(address)
            .await
            .unwrap_or_else(|e| panic!("balance of {address}: {e}"))
    }

    /// Stops the node, keeping its chain for [`Anvil::restart`].
    pub async fn stop(&mut self) {
        self.node.stop().await;
    }

    pub async fn restart(&mut self) {
        self.node
            .restart()
            .await
            .unwrap_or_else(|e| panic!("restarting anvil: {e}"));
    }
}
