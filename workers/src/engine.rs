//! Everything `custos up` runs in one process, as one testable function.

use async_nats::Client;

use crate::ledger::{self, LedgerConfig, LedgerError, LedgerHandle};
use crate::trail::Trail;
use crate::{Shutdown, intake, remote, runtime, wallets};

/// Runs the ledger writer, intake, the remote append service and the key
/// ceremony step (approved wallet changes) until `shutdown`
/// or until the ledger writer stops (a broken trail stops everything: fail closed).
/// `trail` is the process's replica, shared with its other steps: each replica
/// decodes and folds every event. `ready` receives the in-process ledger handle
/// once the tasks run.
pub async fn run(
    client: Client,
    trail: Trail,
    config: LedgerConfig,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<LedgerHandle>>,
) -> Result<(), LedgerError> {
    // Subscribed (and the server told) before anyone is told the engine is
    // ready: a request sent right after must find a responder.
    let intake_requests = intake::subscribe(&client)
        .await
        .map_err(LedgerError::Nats)?;
    let append_requests = remote::subscribe(&client)
        .await
        .map_err(LedgerError::Nats)?;
    client
        .flush()
        .await
        .map_err(|e| LedgerError::Nats(e.into()))?;
    let (handle, jobs) = ledger::channel();
    let writer = tokio::spawn(ledger::run(client.clone(), config, jobs, shutdown.clone()));
    let intake = tokio::spawn(intake::serve(
        intake_requests,
        client.clone(),
        handle.clone(),
        shutdown.clone(),
    ));
    let appends = tokio::spawn(remote::serve(
        append_requests,
        client.clone(),
        handle.clone(),
        shutdown.clone(),
    ));
    let ceremonies = {
        let (client, ledger, shutdown) = (client.clone(), handle.clone(), shutdown.clone());
        tokio::spawn(async move {
            let js = async_nats::jetstream::new(client.clone());
            let step = wallets::CeremonyStep::new(client, trail, ledger.clone());
            if let Err(e) = runtime::run(js, ledger, step, shutdown).await {
                tracing::error!(error = %e, "the key ceremony step stopped");
            }
        })
    };
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
    ceremonies.abort();
    result
}
