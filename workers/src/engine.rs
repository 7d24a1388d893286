//! Everything `custos up` runs in one process, as one testable function.

use async_nats::Client;

use crate::ledger::{self, LedgerConfig, LedgerError, LedgerHandle};
use crate::{Shutdown, intake, remote, wallets};

/// Runs the ledger writer, intake, the remote append service and the wallet
/// (key ceremony) service until `shutdown`
/// or until the ledger writer stops (a broken trail stops everything: fail closed).
/// `ready` receives the in-process ledger handle once the tasks run.
pub async fn run(
    client: Client,
    config: LedgerConfig,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<LedgerHandle>>,
) -> Result<(), LedgerError> {
    let (handle, jobs) = ledger::channel();
    let writer = tokio::spawn(ledger::run(client.clone(), config, jobs, shutdown.clone()));
    let intake = tokio::spawn(intake::serve(
        client.clone(),
        handle.clone(),
        shutdown.clone(),
    ));
    let appends = tokio::spawn(remote::serve(
        client.clone(),
        handle.clone(),
        shutdown.clone(),
    ));
    let wallets = tokio::spawn(wallets::serve(client, handle.clone(), shutdown));
    if let Some(ready) = ready {
        let _ = ready.send(handle);
    }
    let result = match writer.await {
        Ok(r) => r,
        Err(e) => Err(LedgerError::Nats(
            format!("ledger writer task failed: {e}").into(),
        )),
    };
    intake.abort();
    appends.abort();
    wallets.abort();
    result
}
