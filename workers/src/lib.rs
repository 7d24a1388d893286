//! Thin IO shells around the engine: the ledger writer, request intake, the
//! remote append service, and the runtime that drives workflow steps.

pub mod approvals;
pub mod ceremony;
pub mod chain_steps;
pub mod change;
pub mod engine;
pub mod evm_steps;
pub mod fee_bump;
pub mod guardian;
pub mod guardian_gate;
mod guardian_sign;
pub mod hd_signer;
pub mod intake;
pub mod lease;
pub mod ledger;
pub mod policy_step;
pub mod remote;
pub mod runtime;
mod session_log;
pub mod signing;
pub mod trail;
pub mod wallets;

use tokio::sync::watch;

/// A header's value, if the message has it.
pub(crate) fn header(headers: Option<&async_nats::HeaderMap>, key: &str) -> Option<String> {
    headers
        .and_then(|h| h.get(key))
        .map(|v| v.as_str().to_string())
}

/// A shutdown signal shared by every task of a process.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers a [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}
