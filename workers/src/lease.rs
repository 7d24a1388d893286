//! The ledger writer's lease: at most one ledger writer extends the chain at a
//! time. Others stand by and take over when the holder stops or stops renewing.
//! (The stream's expected-sequence checks stay as the backstop: a writer that
//! lost its lease unnoticed is refused, never forks the chain.)

use std::time::{Duration, Instant};

use custos_adapters::jetstream::LEASE_TTL;

use async_nats::jetstream::{self, kv};
use custos_schemas::subjects;

use crate::Shutdown;

/// How often the holder renews it (well within the bucket's `LEASE_TTL`).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
const KEY: &str = "writer";

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    holder: String,
    revision: u64,
    renewed: Instant,
}

impl Lease {
    /// Waits until this writer holds the lease; `None` if `shutdown` comes first.
    pub async fn acquire(
        js: &jetstream::Context,
        holder: &str,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Lease>, async_nats::Error> {
        let kv = js.get_key_value(subjects::LEDGER_LEASE_BUCKET).await?;
        let mut announced = false;
        loop {
            match kv.create(KEY, holder.to_string().into()).await {
                Ok(revision) => {
                    tracing::info!(holder, "ledger writer lease acquired");
                    return Ok(Some(Lease {
                        kv,
                        holder: holder.to_string(),
                        revision,
                        renewed: Instant::now(),
                    }));
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if !announced {
                        tracing::warn!(
                            holder,
                            "another ledger writer holds the lease; standing by"
                        );
                        announced = true;
                    }
                    tokio::select! {
                        _ = shutdown.wait() => return Ok(None),
                        _ = tokio::time::sleep(RENEW_EVERY) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Renews the lease. `Err` means it is lost: someone else holds it now, or
    /// it could not be renewed for longer than it lives (a standby may have it).
    /// A renewal that merely failed (the server restarting) is retried later.
    pub async fn renew(&mut self) -> Result<(), String> {
        match self
            .kv
            .update(KEY, self.holder.clone().into(), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.renewed = Instant::now();
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(format!("the ledger writer lease was taken over: {e}"))
            }
            // Give up well before the entry expires: a standby may take it then.
            Err(e) if self.renewed.elapsed() >= LEASE_TTL.saturating_sub(RENEW_EVERY * 2) => {
                Err(format!(
                    "the ledger writer lease could not be renewed for {} s: {e}",
                    self.renewed.elapsed().as_secs()
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not renew the ledger writer lease; retrying");
                Ok(())
            }
        }
    }

    /// Gives the lease up so that a standby takes over at once.
    pub async fn release(self) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(KEY, Some(self.revision))
            .await
        {
            tracing::warn!(error = %e, "could not release the ledger writer lease; it expires by itself");
        }
    }
}

/// A lease renewed by its own task, so that no amount of work in the writer can
/// starve the renewal. The writer checks [`KeptLease::lost`] before it publishes.
#[derive(Debug)]
pub struct KeptLease {
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Hands the lease to a task that renews it every [`RENEW_EVERY`].
    pub fn keep(mut self) -> KeptLease {
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let flag = lost.clone();
        let task = tokio::spawn(async move {
            let mut timer = tokio::time::interval(RENEW_EVERY);
            timer.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => {
                        self.release().await;
                        return;
                    }
                    _ = timer.tick() => {
                        if let Err(reason) = self.renew().await {
                            tracing::error!(reason, "ledger writer lease lost");
                            flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                    }
                }
            }
        });
        KeptLease { lost, stop, task }
    }
}

impl KeptLease {
    /// Whether the lease is gone: the writer must not publish anything more.
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops renewing and gives the lease up.
    pub async fn release(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
