//! The enrolment service: an operator (`custos user enrol`) asks for a user's
//! one-time MFA enrolment link ([`subjects::REQ_MFA_ENROL`]); the service checks
//! on the trail replica that the operator is an active administrator and the
//! user active, issues the link (recorded as `MFA_CONFIGURED` pending with the
//! token's hash) and hands it to the user on their channels. The operator is
//! told where it went, never the link: whoever holds it sets up the factor.

use std::sync::Arc;

use async_nats::Client;
use custos_engine::policy::Duty;
use custos_schemas::approval::{EnrolmentReply, EnrolmentRequest};
use custos_schemas::{
    Actor, ContentType, EventType, Outcome, RequestContext, UserRecord, subjects, validate_token,
};
use futures::StreamExt;

use super::links::{LinkIssuer, auth_event};
use super::{EnrolmentNotice, Notifier};
use crate::Shutdown;
use crate::remote::Appender;
use crate::trail::Trail;

/// Issues enrolment links and delivers them on every channel that can.
pub struct Enrolments<A> {
    trail: Trail,
    issuer: LinkIssuer<A>,
    /// The channels approvers are asked on, with the names operators see.
    channels: Vec<(&'static str, Arc<dyn Notifier>)>,
}

impl<A> std::fmt::Debug for Enrolments<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolments")
            .field(
                "channels",
                &self.channels.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A refused request: the field (when one is at fault) and why.
struct Refused {
    field: Option<&'static str>,
    reason: String,
}

fn refused(field: &'static str, reason: impl Into<String>) -> Refused {
    Refused {
        field: Some(field),
        reason: reason.into(),
    }
}

impl<A: Appender> Enrolments<A> {
    pub fn new(
        trail: Trail,
        issuer: LinkIssuer<A>,
        channels: Vec<(&'static str, Arc<dyn Notifier>)>,
    ) -> Self {
        Enrolments {
            trail,
            issuer,
            channels,
        }
    }

    /// Answers one request. Refusals of a well-formed request are recorded
    /// (`MFA_CONFIGURED` denied, with the reason).
    pub async fn handle(&self, request: &EnrolmentRequest) -> EnrolmentReply {
        for (field, value) in [
            ("requestedBy", &request.requested_by),
            ("user", &request.user),
        ] {
            if let Err(e) = validate_token(field, value) {
                return EnrolmentReply::Refused {
                    field: Some(field.into()),
                    reason: e.to_string(),
                };
            }
        }
        let (user, operator) = match self.authorize(request).await {
            Ok(found) => found,
            Err(r) => {
                self.audit_refusal(request, &r.reason).await;
                return EnrolmentReply::Refused {
                    field: r.field.map(str::to_string),
                    reason: r.reason,
                };
            }
        };
        let link = match self
            .issuer
            .enrolment_link(&user, request.method, &operator)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                return EnrolmentReply::Refused {
                    field: None,
                    reason: e.to_string(),
                };
            }
        };
        let notice = EnrolmentNotice {
            url: link.url,
            method: request.method,
            expires_at: link.expires_at,
            requested_by: operator.user_id.clone(),
        };
        let (mut sent, mut failed) = (Vec::new(), Vec::new());
        for (name, channel) in &self.channels {
            match channel.enrol(&user, &notice).await {
                Ok(()) => sent.push(name.to_string()),
                Err(e) => failed.push(format!("{name}: {}", e.reason)),
            }
        }
        EnrolmentReply::Issued {
            user: user.id,
            method: request.method,
            link_hash: link.link_hash,
            expires_at: link.expires_at,
            sent,
            failed,
        }
    }

    /// The user to enrol and the operator as an actor, once the trail shows
    /// an active administrator asking for an active user.
    async fn authorize(&self, request: &EnrolmentRequest) -> Result<(UserRecord, Actor), Refused> {
        self.trail
            .read(|view| {
                let d = &view.directory;
                let by = &request.requested_by;
                let operator = d
                    .user(by)
                    .ok_or_else(|| refused("requestedBy", format!("no user {by:?} in the directory")))?;
                if !operator.active {
                    return Err(refused("requestedBy", format!("{by} is deactivated")));
                }
                if !d.may(by, Duty::Administer) {
                    return Err(refused(
                        "requestedBy",
                        format!(
                            "{by} is not an administrator: only an active administrator may issue enrolment links"
                        ),
                    ));
                }
                let user = d.user(&request.user).ok_or_else(|| {
                    refused("user", format!("no user {:?} in the directory", request.user))
                })?;
                if !user.active {
                    return Err(refused("user", format!("{} is deactivated", request.user)));
                }
                Ok((
                    super::ballot_box::user_record(user),
                    Actor {
                        user_id: operator.id.clone(),
                        email: Some(operator.email.clone()),
                        role: Some("administrator".into()),
                    },
                ))
            })
            .await
            .map_err(|e| Refused {
                field: None,
                reason: format!("the trail replica is unavailable: {e}"),
            })?
    }

    async fn audit_refusal(&self, request: &EnrolmentRequest, reason: &str) {
        let target = UserRecord {
            id: request.user.clone(),
            name: String::new(),
            email: String::new(),
            slack_user_id: None,
            roles: Vec::new(),
            groups: Vec::new(),
            mfa_enrolled: false,
        };
        let mut event = auth_event(
            EventType::MfaConfigured,
            Outcome::Denied,
            &target,
            RequestContext::default(),
        );
        event.actor = Actor {
            user_id: request.requested_by.clone(),
            email: None,
            role: None,
        };
        let meta = &mut event.metadata;
        meta.insert("stage".into(), "link-refused".into());
        meta.insert("method".into(), request.method.as_str().into());
        meta.insert("reason".into(), reason.into());
        if let Err(e) = self.issuer.audit(event).await {
            tracing::warn!(error = %e, "a refused enrolment request was not recorded");
        }
    }
}

/// Subscribes to [`subjects::REQ_MFA_ENROL`] (JSON) and returns the loop that
/// answers until `shutdown`: once this returns, requests find a responder.
pub async fn serve<A: Appender + 'static>(
    client: Client,
    enrolments: Arc<Enrolments<A>>,
    mut shutdown: Shutdown,
) -> Result<impl Future<Output = ()> + Send + 'static, async_nats::Error> {
    let mut requests = client
        .queue_subscribe(subjects::REQ_MFA_ENROL, subjects::ENROL_QUEUE.into())
        .await?;
    Ok(async move {
        loop {
            let msg = tokio::select! {
                _ = shutdown.wait() => break,
                msg = requests.next() => match msg { Some(m) => m, None => break },
            };
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            let (client, enrolments) = (client.clone(), Arc::clone(&enrolments));
            tokio::spawn(async move {
                let reply = match ContentType::Json.decode::<EnrolmentRequest>(&msg.payload) {
                    Ok(request) => enrolments.handle(&request).await,
                    Err(e) => EnrolmentReply::Refused {
                        field: e.field.clone(),
                        reason: e.to_string(),
                    },
                };
                if let Err(e) = client
                    .publish(reply_to, ContentType::Json.encode(&reply).into())
                    .await
                {
                    tracing::warn!(error = %e, "could not answer an enrolment request");
                }
            });
        }
    })
}
