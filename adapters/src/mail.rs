//! Outgoing mail over SMTP (lettre). The server is named by a URL in the style of
//! `CUSTOS_SMTP_URL`:
//!
//! - `smtps://user:pass@host:465`: TLS from the first byte;
//! - `smtp://user:pass@host:587?tls=required`: STARTTLS, refusing a server that
//!   does not offer it (no credentials ever go out in the clear);
//! - `smtp://host:25`: plain, for a relay on the same machine and for tests.
//!
//! The URL holds credentials: it is never kept, logged or shown; [`Mailer`]
//! remembers only a redacted form.

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailError {
    #[error("SMTP URL: {0}")]
    Url(String),
    #[error("mail address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("could not build the message: {0}")]
    Message(String),
    #[error("SMTP server {endpoint}: {reason}")]
    Send { endpoint: String, reason: String },
}

/// One message: a plain-text body, and an HTML one when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMail {
    pub to_name: String,
    pub to_address: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

/// Sends mail through one SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    endpoint: String,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("endpoint", &self.endpoint)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// A mailer for the server at `url` (see the module docs), sending as `from`
    /// (`Name <address>` or a bare address).
    pub fn from_url(url: &str, from: &str) -> Result<Self, MailError> {
        let endpoint = redact_url(url)?;
        let plain = url.starts_with("smtp://") && !url.contains("tls=");
        if plain && has_password(url) && !is_loopback(url) {
            return Err(MailError::Url(format!(
                "{endpoint}: credentials over plain SMTP to another machine; use smtps:// or ?tls=required"
            )));
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| MailError::Url(format!("{endpoint}: {e}")))?
            .build();
        let from = from.parse::<Mailbox>().map_err(|e| MailError::Address {
            address: from.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Mailer {
            transport,
            from,
            endpoint,
        })
    }

    /// Where mail goes, without credentials.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub async fn send(&self, mail: OutgoingMail) -> Result<(), MailError> {
        let to = Mailbox::new(
            Some(mail.to_name.clone()),
            mail.to_address
                .parse()
                .map_err(|e: lettre::address::AddressError| MailError::Address {
                    address: mail.to_address.clone(),
                    reason: e.to_string(),
                })?,
        );
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject);
        let message = match mail.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(mail.text, html)),
            None => builder.body(mail.text),
        }
        .map_err(|e| MailError::Message(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| MailError::Send {
                endpoint: self.endpoint.clone(),
                reason: e.to_string(),
            })
    }
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> Result<String, MailError> {
    let mut parsed = url::Url::parse(url).map_err(|e| MailError::Url(e.to_string()))?;
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return Err(MailError::Url("the URL cannot carry credentials".into()));
    }
    Ok(parsed.to_string())
}

fn has_password(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| u.password().is_some())
}

fn is_loopback(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        // `smtp` is not a special scheme to the URL standard: its IP hosts come
        // back as names.
        Some(url::Host::Domain(d)) => {
            d == "localhost"
                || d.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show() {
        let url = "smtps://ops:s3cr%40t@mail.example.com:465";
        let mailer = Mailer::from_url(url, "Custos <custos@example.com>").expect("mailer");
        for shown in [format!("{mailer:?}"), mailer.endpoint().to_string()] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(shown.contains("mail.example.com"), "{shown}");
        }
    }

    #[test]
    fn plain_smtp_with_credentials_only_on_this_machine() {
        let from = "custos@example.com";
        let err = Mailer::from_url("smtp://u:p@mail.example.com:25", from).expect_err("refused");
        assert!(!err.to_string().contains(":p@"), "{err}");
        Mailer::from_url("smtp://u:p@127.0.0.1:2525", from).expect("loopback");
        assert!(Mailer::from_url("smtp://mail.example.com:25?tls=required", from).is_ok());
        assert!(Mailer::from_url("smtp://127.0.0.1:2525", from).is_ok());
    }

    #[test]
    fn bad_urls_and_addresses_are_errors() {
        assert!(matches!(
            Mailer::from_url("not a url", "a@b.c"),
            Err(MailError::Url(_))
        ));
        assert!(matches!(
            Mailer::from_url("http://x", "a@b.c"),
            Err(MailError::Url(_))
        ));
        assert!(matches!(
            Mailer::from_url("smtp://127.0.0.1:25", "no address"),
            Err(MailError::Address { .. })
        ));
    }
}
