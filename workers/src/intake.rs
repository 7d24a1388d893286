//! Request intake: upstream systems send a transfer request to
//! [`subjects::REQ_TRANSFER`] and get an [`IntakeReply`] once the outcome is
//! recorded. Bad bytes never reach further than a `REQUEST_REJECTED` event.

use async_nats::{Client, Subscriber};
use custos_schemas::{
    ContentType, IntakeError, IntakeReply, RequestContext, TransferRequest, subjects,
};
use futures::StreamExt;

use crate::Shutdown;
use crate::ledger::LedgerHandle;

/// Largest request accepted; anything bigger is refused before decoding.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Requests decoded and admitted at the same time.
const CONCURRENCY: usize = 1_024;

/// Joins the intake queue group: requests are taken from the moment it returns.
pub async fn subscribe(client: &Client) -> Result<Subscriber, async_nats::Error> {
    Ok(client
        .queue_subscribe(subjects::REQ_TRANSFER, subjects::INTAKE_QUEUE.into())
        .await?)
}

/// Serves intake from `requests` (from [`subscribe`]) until `shutdown`.
pub async fn serve(
    mut requests: Subscriber,
    client: Client,
    ledger: LedgerHandle,
    mut shutdown: Shutdown,
) -> Result<(), async_nats::Error> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    loop {
        let msg = tokio::select! {
            _ = shutdown.wait() => break,
            msg = requests.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::debug!("transfer request without a reply subject ignored");
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, ledger) = (client.clone(), ledger.clone());
        tokio::spawn(async move {
            let content_type = crate::header(msg.headers.as_ref(), subjects::headers::CONTENT_TYPE);
            let user_agent = crate::header(msg.headers.as_ref(), "User-Agent")
                .map(|v| v.chars().take(256).collect());
            let (reply_type, reply) =
                admit(&ledger, content_type.as_deref(), &msg.payload, user_agent).await;
            if let Err(e) = client
                .publish(reply_to, reply_type.encode(&reply).into())
                .await
            {
                tracing::warn!(error = %e, "could not send an intake reply");
            }
            drop(permit);
        });
    }
    Ok(())
}

/// Decodes and admits one request; the reply is encoded like the request (JSON
/// when the content type is unsupported, so that the error is readable).
pub async fn admit(
    ledger: &LedgerHandle,
    content_type: Option<&str>,
    payload: &[u8],
    user_agent: Option<String>,
) -> (ContentType, IntakeReply) {
    let context = RequestContext {
        ip_address: None,
        user_agent,
        session_id: None,
    };
    let content = match ContentType::from_header(content_type) {
        Ok(ct) => ct,
        Err(e) => {
            let reply = ledger.intake(Err(e), context).await;
            return (ContentType::Json, reply);
        }
    };
    if payload.len() > MAX_REQUEST_BYTES {
        let error = IntakeError {
            field: None,
            reason: format!(
                "request is {} bytes, at most {MAX_REQUEST_BYTES} are accepted",
                payload.len()
            ),
        };
        let reply = ledger
            .intake(
                Err(custos_schemas::DecodeError {
                    field: error.field,
                    reason: error.reason,
                }),
                context,
            )
            .await;
        return (content, reply);
    }
    let decoded = content.decode::<TransferRequest>(payload);
    (content, ledger.intake(decoded, context).await)
}
