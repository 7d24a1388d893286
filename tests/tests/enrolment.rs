//! MFA enrolment links and passkey-only approvals end to end: a real
//! nats-server and engine, the policy step under [`POLICY`], the real ballot box
//! on a followed trail, the enrolment service answering over NATS, links mailed
//! through a real SMTP server, and headless Chromium on the pages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use custos_adapters::mail::Mailer;
use custos_adapters::nats_server::Durability;
use custos_engine::mfa::{self, TotpSecret};
use custos_engine::policy::Policy;
use custos_engine::transfer::Stage;
use custos_schemas::approval::{EnrolMethod, EnrolmentReply, EnrolmentRequest, MfaMethod, Vote};
use custos_schemas::{
    Actor, AggregateKind, ContentType, Event, EventType, IntakeReply, Outcome, Payload, Proposal,
    RequestContext, Target, UserRecord, subjects,
};
use custos_tests::browser::Browser;
use custos_tests::smtp::SmtpCapture;
use custos_tests::*;
use custos_workers::approvals::ballot_box::TrailBallotBox;
use custos_workers::approvals::enrolment::{self, Enrolments};
use custos_workers::approvals::links::{
    Clock, EmailNotifier, LinkIssuer, LinkSettings, MfaKey, links_router, system_clock,
};
use custos_workers::approvals::{ApprovalLinks, BallotBox, Notifier};
use custos_workers::ledger::LedgerHandle;
use custos_workers::policy_step::{PolicyStep, PriceTable};
use custos_workers::trail::Trail;
use custos_workers::{Shutdown, ShutdownTrigger};
use serde_json::json;

/// At EUR 80 per LTC: 20 LTC needs one treasury manager (any second factor),
/// 2,000 LTC one treasury manager with a passkey.
const POLICY: &str = r#"
version = 1
name = "enrolment-test"
currency = "EUR"
max_price_age = "5m"
approval_expiry = "24h"

[groups]
treasury-managers = "Approve large transfers."
administrators = "Approve administration."

[[rule]]
name = "small"
actions = ["transfer"]
amount = { at_most = "1000" }
outcome = "allow"

[[rule]]
name = "large"
actions = ["transfer"]
amount = { above = "1000", at_most = "100000" }
outcome = "require-approvals"
approvals = { groups = [{ group = "treasury-managers", count = 1 }] }

[[rule]]
name = "huge"
actions = ["transfer"]
amount = { above = "100000" }
outcome = "require-approvals"
approvals = { groups = [{ group = "treasury-managers", count = 1 }], mfa = "webauthn" }

[[rule]]
name = "administration"
actions = [
    "wallet-create",
    "wallet-import",
    "guardian-add",
    "guardian-remove",
    "key-rotation",
    "threshold-change",
    "policy-change",
    "whitelist-change",
    "user-admin",
    "role-admin",
]
outcome = "require-approvals"
approvals = { groups = [{ group = "administrators", count = 2 }] }
"#;

const WAIT: Duration = Duration::from_secs(30);

fn record(id: &str, roles: &[&str], groups: &[&str]) -> UserRecord {
    UserRecord {
        id: id.into(),
        name: id.to_uppercase(),
        email: format!("{id}@example.com"),
        slack_user_id: None,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        mfa_enrolled: false,
    }
}

fn created(user: UserRecord) -> Proposal {
    Proposal {
        aggregate_kind: AggregateKind::User,
        workflow_id: user.id.clone(),
        expected_version: 0,
        event_type: EventType::UserCreated,
        causation_id: None,
        actor: Actor::system("bootstrap"),
        target: Target {
            kind: "user".into(),
            id: user.id.clone(),
            amount: None,
            currency: None,
        },
        context: RequestContext::default(),
        result: Outcome::Success,
        metadata: Default::default(),
        payload: Payload::UserCreated(user),
    }
}

/// Servers, engine, policy step, trail, ballot box, link issuer (on a clock
/// the test can move), the pages, and the enrolment service mailing links.
/// Directory: `erp` initiates; `admin1` administers; `tm1`, `tm2` are
/// treasury managers; `bob` approves but does not administer.
struct Setup {
    nats: Nats,
    engine: Engine,
    trail: Trail,
    ballots: Arc<TrailBallotBox<LedgerHandle>>,
    issuer: LinkIssuer<LedgerHandle>,
    smtp: SmtpCapture,
    offset_ms: Arc<AtomicI64>,
    trigger: ShutdownTrigger,
    _server: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start() -> Setup {
        let nats = Nats::start(Durability::Default).await;
        let engine = Engine::start(&nats).await;
        append_ok(
            &engine.ledger,
            vec![wallet_created(
                "treasury",
                "ltc-regtest",
                &taproot_address("rltc", [1; 32]),
            )],
        )
        .await;
        append_ok(
            &engine.ledger,
            vec![
                created(record("erp", &["initiator"], &[])),
                created(record("admin1", &["administrator"], &[])),
                created(record("tm1", &["approver"], &["treasury-managers"])),
                created(record("tm2", &["approver"], &["treasury-managers"])),
                created(record("bob", &["approver"], &["treasury-managers"])),
            ],
        )
        .await;
        let mut prices = PriceTable::default();
        prices
            .quotes
            .entry("LTC".into())
            .or_default()
            .insert("EUR".into(), "80".into());
        let step = PolicyStep::new(
            nats.js().await,
            Policy::parse(POLICY).expect("policy"),
            prices,
        )
        .await
        .expect("policy step");
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(custos_workers::runtime::run(
            nats.js().await,
            engine.ledger.clone(),
            step,
            shutdown.clone(),
        ));
        let trail = Trail::follow(nats.js().await, shutdown.clone())
            .await
            .expect("trail");
        let ballots = Arc::new(TrailBallotBox::new(trail.clone(), engine.ledger.clone()));
        let offset_ms = Arc::new(AtomicI64::new(0));
        let offset = Arc::clone(&offset_ms);
        let system = system_clock();
        let clock: Clock = Arc::new(move || system() + offset.load(Ordering::SeqCst));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        // `localhost`: passkeys need a domain as RP ID.
        let base_url = format!(
            "http://localhost:{}",
            listener.local_addr().expect("addr").port()
        );
        let mut settings = LinkSettings::new(base_url);
        settings.link_ttl = Duration::from_secs(3600);
        let issuer = LinkIssuer::new(
            &nats.js().await,
            ballots.clone(),
            engine.ledger.clone(),
            &MfaKey::generate(),
            settings,
            clock,
        )
        .await
        .expect("issuer");
        let app = links_router(issuer.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        let smtp = SmtpCapture::start().await;
        let mailer = Mailer::from_url(&smtp.url(), "Custos <custos@example.com>").expect("mailer");
        let email: Arc<dyn Notifier> = Arc::new(EmailNotifier::new(
            Arc::new(issuer.clone()) as Arc<dyn ApprovalLinks>,
            mailer,
        ));
        let service = Arc::new(Enrolments::new(
            trail.clone(),
            issuer.clone(),
            vec![("email", email)],
        ));
        tokio::spawn(
            enrolment::serve(engine.client.clone(), service, shutdown)
                .await
                .expect("the enrolment service subscribes"),
        );
        Setup {
            nats,
            engine,
            trail,
            ballots,
            issuer,
            smtp,
            offset_ms,
            trigger,
            _server: server,
        }
    }

    fn now_secs(&self) -> u64 {
        let ms = system_clock()() + self.offset_ms.load(Ordering::SeqCst);
        u64::try_from(ms / 1000).expect("positive time")
    }

    fn advance(&self, by: Duration) {
        self.offset_ms.fetch_add(
            i64::try_from(by.as_millis()).expect("duration"),
            Ordering::SeqCst,
        );
    }

    /// What `custos user enrol USER --method M --initiator BY` sends.
    async fn enrol(&self, user: &str, method: EnrolMethod, by: &str) -> EnrolmentReply {
        let request = EnrolmentRequest {
            user: user.into(),
            method,
            requested_by: by.into(),
        };
        let reply = tokio::time::timeout(
            WAIT,
            self.engine.client.request(
                subjects::REQ_MFA_ENROL,
                ContentType::Json.encode(&request).into(),
            ),
        )
        .await
        .expect("the enrolment service answers")
        .expect("request");
        ContentType::Json.decode(&reply.payload).expect("reply")
    }

    /// The `n`th mail's link (mails counted from 1), for `user`.
    async fn mailed_link(&self, n: usize, user: &str, path: &str) -> String {
        let mails = self.smtp.wait_for(n).await;
        let mail = &mails[n - 1];
        assert_eq!(
            mail.header("To")
                .map(|t| t.contains(&format!("{user}@example.com"))),
            Some(true),
            "{mail:?}"
        );
        let body = mail.body();
        let start = body.find(path).expect("a link in the mail");
        let end = body[..start].rfind("http").expect("link start");
        body[end..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect()
    }

    /// Submits a transfer of `amount` LTC by `erp`; waits until it awaits approvals.
    async fn transfer(&self, request_id: &str, amount: &str) -> String {
        let body = json!({
            "requestId": request_id,
            "wallet": "treasury",
            "asset": "LTC",
            "destination": taproot_address("rltc", [9; 32]),
            "amount": amount,
            "initiator": "erp",
        });
        let id = match submit_json(&self.engine.client, &body).await {
            IntakeReply::Accepted { workflow_id, .. } => workflow_id,
            other => panic!("intake refused {request_id}: {other:?}"),
        };
        let awaiting = eventually(WAIT, || async {
            self.stage(&id).await == Some(Stage::AwaitingApprovals)
        })
        .await;
        assert!(awaiting, "{id} should await approvals");
        id
    }

    async fn stage(&self, id: &str) -> Option<Stage> {
        self.trail
            .read(|view| view.transfer(id).map(|t| t.stage))
            .await
            .expect("trail")
    }

    /// A fresh approval link of `user` for workflow `id`.
    async fn approval_link(&self, user: &str, id: &str) -> String {
        let notice = self.ballots.notice(id).await.expect("notice");
        let to = self.ballots.user(user).await.expect("user");
        self.issuer.link_for(&to, &notice).await.expect("link")
    }

    async fn events(&self, event_type: EventType) -> Vec<Event> {
        all_events(&self.nats.js().await)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.event_type == event_type)
            .collect()
    }

    async fn finish(self) {
        self.trigger.trigger();
        let verified = verify_stream(&self.nats.js().await).await;
        assert!(verified.is_ok(), "the trail verifies: {verified:?}");
        self.engine.stop().await;
    }
}

fn stage_of(e: &Event) -> Option<&str> {
    e.metadata.get("stage").map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_enrols_an_authenticator_app_the_user_confirms_and_approves_with() {
    let s = Setup::start().await;

    // Only an active administrator may ask; the refusal names why and is audited.
    let refused = s.enrol("tm1", EnrolMethod::Totp, "bob").await;
    assert_eq!(
        refused,
        EnrolmentReply::Refused {
            field: Some("requestedBy".into()),
            reason: "bob is not an administrator: only an active administrator may issue enrolment links".into(),
        }
    );
    let unknown = s.enrol("nobody", EnrolMethod::Totp, "admin1").await;
    assert!(
        matches!(&unknown, EnrolmentReply::Refused { field: Some(f), reason } if f == "user" && reason.contains("no user \"nobody\"")),
        "{unknown:?}"
    );

    let issued = s.enrol("tm1", EnrolMethod::Totp, "admin1").await;
    let EnrolmentReply::Issued {
        sent, link_hash, ..
    } = &issued
    else {
        panic!("not issued: {issued:?}");
    };
    assert_eq!(sent, &vec!["email".to_string()], "{issued:?}");
    let link = s.mailed_link(1, "tm1", "/enrol/").await;
    // The trail records who asked, for whom, the method and the token's hash,
    // never the token.
    let configured = s.events(EventType::MfaConfigured).await;
    let denied: Vec<&Event> = configured
        .iter()
        .filter(|e| e.result == Outcome::Denied)
        .collect();
    assert_eq!(denied.len(), 2, "{configured:#?}");
    assert_eq!(
        (
            denied[0].actor.user_id.as_str(),
            denied[0].target.id.as_str(),
            stage_of(denied[0])
        ),
        ("bob", "tm1", Some("link-refused"))
    );
    let issue = configured
        .iter()
        .find(|e| stage_of(e) == Some("link-issued"))
        .expect("the issue is recorded");
    assert_eq!(
        (
            issue.actor.user_id.as_str(),
            issue.target.id.as_str(),
            issue.result
        ),
        ("admin1", "tm1", Outcome::Pending)
    );
    assert_eq!(
        issue.metadata.get("method").map(String::as_str),
        Some("totp")
    );
    assert_eq!(issue.metadata.get("linkHash"), Some(link_hash));
    let token = link.rsplit('/').next().expect("token");
    let stream = all_events(&s.nats.js().await).await;
    assert!(
        stream
            .iter()
            .all(|(_, e)| !format!("{e:?}").contains(token)),
        "the token never reaches the trail"
    );

    // The page shows the secret once; a code confirms it.
    let browser = Browser::start().await;
    browser.goto(&link).await;
    let text = browser.text().await;
    let secret = text
        .split(['?', '&', ' ', '\n'])
        .find_map(|p| p.strip_prefix("secret="))
        .unwrap_or_else(|| panic!("no secret on the page: {text}"));
    let secret = TotpSecret::from_base32(secret).expect("base32 secret");
    // Before confirming, nothing is active: no approval link can be minted.
    let id = s.transfer("up-large", "20").await;
    let to = s.ballots.user("tm1").await.expect("tm1");
    let notice = s.ballots.notice(&id).await.expect("notice");
    assert!(
        s.issuer.link_for(&to, &notice).await.is_err(),
        "tm1 has no second factor until the code confirms it"
    );
    let wrong = (0..)
        .map(|n: u32| format!("{:06}", n * 7919 % 1_000_000))
        .find(|c| {
            let now = s.now_secs();
            ![now - 30, now, now + 30]
                .iter()
                .any(|t| mfa::code_at(&secret, *t) == *c)
        })
        .expect("a wrong code");
    browser.type_into("#code", &wrong).await;
    browser.click("#confirm").await;
    let text = browser.text_with("Wrong code").await;
    assert!(text.contains("Wrong code (1 of 5 tries)"), "{text}");
    browser
        .type_into("#code", &mfa::code_at(&secret, s.now_secs()))
        .await;
    browser.click("#confirm").await;
    let text = browser.text_with("authenticator app is enrolled").await;
    assert!(
        text.contains("Your authenticator app is enrolled"),
        "{text}"
    );
    let done: Vec<Event> = s
        .events(EventType::MfaConfigured)
        .await
        .into_iter()
        .filter(|e| e.result == Outcome::Success)
        .collect();
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!(
        (
            done[0].target.id.as_str(),
            done[0].metadata.get("requestedBy").map(String::as_str)
        ),
        ("tm1", Some("admin1"))
    );
    // Reused: refused.
    browser.goto(&link).await;
    assert!(browser.text().await.contains("already used"));

    // The new app approves; the code that confirmed it is spent, so the
    // next one is used.
    s.advance(Duration::from_secs(30));
    browser.goto(&s.approval_link("tm1", &id).await).await;
    browser.click("#approve").await;
    browser
        .type_into("#code", &mfa::code_at(&secret, s.now_secs()))
        .await;
    browser.click("#submit").await;
    let text = browser.text_with("is recorded").await;
    assert!(
        text.contains(&format!("Your approval of {id} is recorded")),
        "{text}"
    );
    let approved = eventually(WAIT, || async {
        s.stage(&id).await != Some(Stage::AwaitingApprovals)
    })
    .await;
    assert!(approved, "one treasury manager's approval completes {id}");

    // An enrolment link that expired is refused (and one opened is not shown twice).
    let _ = s.enrol("tm2", EnrolMethod::Totp, "admin1").await;
    let expired = s.mailed_link(2, "tm2", "/enrol/").await;
    let _ = s.enrol("bob", EnrolMethod::Totp, "admin1").await;
    let opened = s.mailed_link(3, "bob", "/enrol/").await;
    browser.goto(&opened).await;
    assert!(browser.text().await.contains("secret="));
    browser.goto(&opened).await;
    assert!(
        browser
            .text()
            .await
            .contains("its secret is shown only once"),
        "{}",
        browser.text().await
    );
    s.advance(Duration::from_secs(2 * 3600));
    browser.goto(&expired).await;
    assert!(
        browser
            .text()
            .await
            .contains("This enrolment link has expired")
    );
    drop(browser);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_only_rule_refuses_the_code_and_counts_the_passkey() {
    let s = Setup::start().await;
    let browser = Browser::start().await;
    let authenticator = browser.add_virtual_authenticator().await;
    // tm1 has an authenticator app (enrolled in process) and, through the
    // operator's link, a passkey.
    let tm1 = s.ballots.user("tm1").await.expect("tm1");
    let uri = s
        .issuer
        .enrol_totp(&tm1, Actor::system("test-admin"))
        .await
        .expect("totp");
    let secret = uri
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("secret="))
        .map(|b| TotpSecret::from_base32(b).expect("base32"))
        .expect("secret");
    let issued = s.enrol("tm1", EnrolMethod::Passkey, "admin1").await;
    assert!(
        matches!(issued, EnrolmentReply::Issued { .. }),
        "{issued:?}"
    );
    browser
        .goto(&s.mailed_link(1, "tm1", "/enrol/").await)
        .await;
    browser.click("#create").await;
    let text = browser.text_with("Your passkey is enrolled").await;
    assert!(text.contains("Your passkey is enrolled"), "{text}");
    assert_eq!(
        browser
            .authenticator_credentials(&authenticator)
            .await
            .len(),
        1
    );

    let id = s.transfer("up-huge", "2000").await;
    let notice = s.ballots.notice(&id).await.expect("notice");
    assert!(
        notice.step_up_required,
        "passkey-only approvals never happen in place"
    );
    assert!(
        notice
            .missing
            .iter()
            .any(|m| m.contains("passkey required")),
        "{notice:?}"
    );

    // The code is refused by the ballot box, saying why, and audited.
    browser.goto(&s.approval_link("tm1", &id).await).await;
    let text = browser.text().await;
    assert!(text.contains("a passkey is required"), "{text}");
    browser.click("#approve").await;
    browser
        .type_into("#code", &mfa::code_at(&secret, s.now_secs()))
        .await;
    browser.click("#submit").await;
    let text = browser.text_with("did not count").await;
    assert!(
        text.contains("rule huge requires a passkey (mfa = \"webauthn\")"),
        "{text}"
    );
    let refusals: Vec<Event> = s
        .events(EventType::ApprovalRefused)
        .await
        .into_iter()
        .filter(|e| e.target.id == id)
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!(s.stage(&id).await, Some(Stage::AwaitingApprovals));

    // The passkey counts and completes the request.
    browser.goto(&s.approval_link("tm1", &id).await).await;
    browser.click("#passkey-approve").await;
    let text = browser.text_with("is recorded").await;
    assert!(
        text.contains(&format!("Your approval of {id} is recorded")),
        "{text}"
    );
    let votes = s
        .trail
        .read(|view| view.transfer(&id).map(|t| t.votes.clone()))
        .await
        .expect("trail")
        .expect("transfer");
    assert_eq!(votes.len(), 1, "{votes:#?}");
    assert_eq!(
        (
            votes[0].user.as_str(),
            votes[0].vote.vote,
            votes[0].vote.mfa
        ),
        ("tm1", Vote::Approve, MfaMethod::Webauthn)
    );
    assert_ne!(s.stage(&id).await, Some(Stage::AwaitingApprovals));
    drop(browser);
    s.finish().await;
}
