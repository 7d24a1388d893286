//! Approval notices on the engine's own output: the channel of a single-machine
//! trial (no SMTP, Slack or chat configured). Each approver's one-time link is
//! printed for the operator to hand over; approving still needs the approver's
//! second factor on the page.

use std::sync::Arc;

use custos_schemas::UserRecord;
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice};
use futures::future::BoxFuture;

use super::{ApprovalLinks, EnrolmentNotice, Notifier, NotifyError};

pub struct ConsoleNotifier {
    links: Arc<dyn ApprovalLinks>,
}

impl std::fmt::Debug for ConsoleNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleNotifier").finish_non_exhaustive()
    }
}

impl ConsoleNotifier {
    pub fn new(links: Arc<dyn ApprovalLinks>) -> Self {
        ConsoleNotifier { links }
    }
}

fn summary(notice: &ApprovalNotice) -> String {
    let r = &notice.request;
    let fiat = notice
        .fiat_value
        .as_ref()
        .map(|f| format!(" ({} {})", f.currency, f.amount))
        .unwrap_or_default();
    format!(
        "{} {}{} from {} to {}",
        r.amount, r.asset, fiat, r.wallet, r.destination
    )
}

impl Notifier for ConsoleNotifier {
    fn channel(&self) -> ApprovalChannel {
        ApprovalChannel::Email
    }

    fn ask<'a>(
        &'a self,
        to: &'a UserRecord,
        notice: &'a ApprovalNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            let link = self.links.link_for(to, notice).await?;
            println!(
                "approval   {} needs {}: {}\n           {} ({}) may answer at {link}",
                notice.workflow_id,
                notice.missing.join("; "),
                summary(notice),
                to.name,
                to.id
            );
            Ok(())
        })
    }

    /// Printed for the operator of a single-machine trial to hand over (as
    /// approval links are): configure email or Slack so they never see it.
    fn enrol<'a>(
        &'a self,
        to: &'a UserRecord,
        enrolment: &'a EnrolmentNotice,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async move {
            println!(
                "enrolment  {} ({}) sets up their {} at {} (one-time, for them only; asked by {})",
                to.name,
                to.id,
                super::links::enrolment_what(enrolment.method),
                enrolment.url.as_str(),
                enrolment.requested_by
            );
            Ok(())
        })
    }

    /// A printed line cannot be updated; the trail shows how it ended.
    fn conclude<'a>(
        &'a self,
        _to: &'a UserRecord,
        _notice: &'a ApprovalNotice,
        _outcome: &'a str,
    ) -> BoxFuture<'a, Result<(), NotifyError>> {
        Box::pin(async { Ok(()) })
    }
}
