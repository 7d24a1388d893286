//! The Slack Web API, over slack-morphism: post a message, update it, and answer
//! an interaction through its `response_url`. The API base URL is configurable so
//! tests talk to an emulator; the bot token never appears in `Debug` or logs.

use std::fmt;
use std::time::Duration;

use slack_morphism::prelude::{
    SlackApiChatPostMessageRequest, SlackApiChatUpdateRequest, SlackApiPostWebhookMessageRequest,
    SlackApiToken, SlackApiTokenValue, SlackChannelId, SlackClient, SlackClientHyperConnector,
    SlackClientHyperHttpsConnector, SlackMessageContent, SlackResponseUrl, SlackTs,
};
use url::{Host, Url};

/// Slack's own Web API.
pub const SLACK_API_URL: &str = "https://slack.com/api";

/// A Slack API call that has not answered by then is given up (the caller decides
/// whether to retry); an approval must never hang on Slack.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a posted message is, to update it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    /// The conversation id Slack answered (a DM `D…` when posted to a user id).
    pub channel: String,
    pub ts: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("Slack API URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("Slack bot token is empty")]
    EmptyToken,
    #[error("TLS root certificates: {0}")]
    Tls(String),
    #[error("Slack {call} failed: {reason}")]
    Call { call: &'static str, reason: String },
}

/// A Slack Web API client authenticated with a bot token.
pub struct SlackApi {
    client: SlackClient<SlackClientHyperHttpsConnector>,
    token: SlackApiToken,
    api_url: String,
}

impl fmt::Debug for SlackApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackApi")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl SlackApi {
    /// A client for the API at `api_url` (normally [`SLACK_API_URL`]). Plain HTTP is
    /// accepted only for a loopback host (an emulator): the bearer token would
    /// otherwise cross the network in clear.
    pub fn new(bot_token: &str, api_url: &str) -> Result<Self, SlackError> {
        if bot_token.is_empty() {
            return Err(SlackError::EmptyToken);
        }
        let url = check_url(api_url)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| SlackError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let api_url = url.as_str().trim_end_matches('/').to_string();
        let connector =
            SlackClientHyperConnector::with_connector(https).with_slack_api_url(&api_url);
        Ok(SlackApi {
            client: SlackClient::new(connector),
            token: SlackApiToken::new(SlackApiTokenValue(bot_token.to_string())),
            api_url,
        })
    }

    /// `chat.postMessage`; `channel` may be a user id (a DM from the app).
    pub async fn post_message(
        &self,
        channel: &str,
        content: SlackMessageContent,
    ) -> Result<MessageRef, SlackError> {
        let call = "chat.postMessage";
        let request = SlackApiChatPostMessageRequest::new(SlackChannelId(channel.into()), content);
        let session = self.client.open_session(&self.token);
        let reply = within(call, session.chat_post_message(&request)).await?;
        Ok(MessageRef {
            channel: reply.channel.0,
            ts: reply.ts.0,
        })
    }

    /// `chat.update` of a message this app posted.
    pub async fn update_message(
        &self,
        at: &MessageRef,
        content: SlackMessageContent,
    ) -> Result<(), SlackError> {
        let call = "chat.update";
        let request = SlackApiChatUpdateRequest::new(
            SlackChannelId(at.channel.clone()),
            content,
            SlackTs(at.ts.clone()),
        );
        let session = self.client.open_session(&self.token);
        within(call, session.chat_update(&request)).await?;
        Ok(())
    }

    /// Answers an interaction through its `response_url`: replaces the message
    /// that was clicked, or (`replace_original` false) adds a message only the
    /// clicking user sees. The caller decides which URLs it trusts.
    pub async fn respond(
        &self,
        response_url: &str,
        content: SlackMessageContent,
        replace_original: bool,
    ) -> Result<(), SlackError> {
        let call = "response_url";
        let url: Url = response_url.parse().map_err(|e| SlackError::Call {
            call,
            reason: format!("invalid response_url: {e}"),
        })?;
        let request =
            SlackApiPostWebhookMessageRequest::new(content).with_replace_original(replace_original);
        within(
            call,
            self.client
                .respond_to_event(&SlackResponseUrl(url), &request),
        )
        .await?;
        Ok(())
    }
}

fn check_url(api_url: &str) -> Result<Url, SlackError> {
    let invalid = |reason: &str| SlackError::InvalidUrl {
        url: api_url.to_string(),
        reason: reason.to_string(),
    };
    let url: Url = api_url
        .parse()
        .map_err(|e: url::ParseError| invalid(&e.to_string()))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(invalid("plain http only to a loopback host")),
        _ => Err(invalid("scheme must be https")),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

async fn within<T, E: fmt::Display>(
    call: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, SlackError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(SlackError::Call {
            call,
            reason: e.to_string(),
        }),
        Err(_) => Err(SlackError::Call {
            call,
            reason: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_the_token_is_redacted() {
        assert!(SlackApi::new("xoxb-secret", "http://127.0.0.1:9/api").is_ok());
        assert!(SlackApi::new("xoxb-secret", SLACK_API_URL).is_ok());
        for bad in [
            "http://slack.example/api",
            "ftp://127.0.0.1/api",
            "not a url",
        ] {
            assert!(
                matches!(
                    SlackApi::new("xoxb-secret", bad),
                    Err(SlackError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            SlackApi::new("", SLACK_API_URL),
            Err(SlackError::EmptyToken)
        ));
        let api = SlackApi::new("xoxb-secret", SLACK_API_URL).expect("client");
        let dbg = format!("{api:?}");
        assert!(
            !dbg.contains("xoxb-secret") && dbg.contains("<redacted>"),
            "{dbg}"
        );
    }
}
