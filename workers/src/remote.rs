//! Appends from other processes: a request/reply service in front of the ledger
//! writer, and the client that workers outside `custos up` use. Both sides speak
//! [`AppendRequest`] / [`AppendReply`].

use std::time::Duration;

use async_nats::{Client, Subscriber};
use custos_schemas::{AppendReply, AppendRequest, ContentType, Proposal, subjects};
use futures::StreamExt;

use crate::Shutdown;
use crate::ledger::LedgerHandle;

/// Whatever can append proposals to the ledger: the in-process handle or the
/// remote client. Workers are written against this.
pub trait Appender: Clone + Send + Sync + 'static {
    fn append(&self, proposals: Vec<Proposal>) -> impl Future<Output = AppendReply> + Send;
}

impl Appender for LedgerHandle {
    fn append(&self, proposals: Vec<Proposal>) -> impl Future<Output = AppendReply> + Send {
        LedgerHandle::append(self, proposals)
    }
}

/// Joins the queue group serving [`subjects::LEDGER_APPEND`].
pub async fn subscribe(client: &Client) -> Result<Subscriber, async_nats::Error> {
    Ok(client
        .queue_subscribe(subjects::LEDGER_APPEND, subjects::LEDGER_QUEUE.into())
        .await?)
}

/// Serves appends from `requests` (from [`subscribe`]) until `shutdown`.
pub async fn serve(
    mut requests: Subscriber,
    client: Client,
    ledger: LedgerHandle,
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            msg = requests.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let (client, ledger) = (client.clone(), ledger.clone());
        tokio::spawn(async move {
            let content_type = crate::header(msg.headers.as_ref(), subjects::headers::CONTENT_TYPE);
            let (ct, reply) = match ContentType::from_header(content_type.as_deref()) {
                Err(e) => (
                    ContentType::Json,
                    AppendReply::Refused {
                        reason: e.to_string(),
                    },
                ),
                Ok(ct) => match ct.decode::<AppendRequest>(&msg.payload) {
                    Err(e) => (
                        ct,
                        AppendReply::Refused {
                            reason: e.to_string(),
                        },
                    ),
                    Ok(req) => (ct, ledger.append(req.proposals).await),
                },
            };
            if let Err(e) = client.publish(reply_to, ct.encode(&reply).into()).await {
                tracing::warn!(error = %e, "could not send an append reply");
            }
        });
    }
    Ok(())
}

/// Appends through [`subjects::LEDGER_APPEND`] from another process.
#[derive(Debug, Clone)]
pub struct RemoteLedger {
    client: Client,
    timeout: Duration,
}

impl RemoteLedger {
    pub fn new(client: Client) -> Self {
        RemoteLedger {
            client,
            timeout: Duration::from_secs(30),
        }
    }
}

impl Appender for RemoteLedger {
    async fn append(&self, proposals: Vec<Proposal>) -> AppendReply {
        let body = ContentType::MsgPack.encode(&AppendRequest { proposals });
        let request = self.client.request(subjects::LEDGER_APPEND, body.into());
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(msg)) => ContentType::MsgPack
                .decode(&msg.payload)
                .unwrap_or_else(|e| AppendReply::Unavailable {
                    reason: format!("unreadable reply from the ledger: {e}"),
                }),
            Ok(Err(e)) => AppendReply::Unavailable {
                reason: format!("ledger unreachable: {e}"),
            },
            Err(_) => AppendReply::Unavailable {
                reason: "the ledger did not answer in time".into(),
            },
        }
    }
}
