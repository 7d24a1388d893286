//! Email and chat approval links end to end: a real SMTP server captures the mail,
//! headless Chromium follows the link, a real nats-server holds the links and the
//! second factors, and the ledger records the MFA events. The ballot box is a
//! recording stand-in: what it received is what a link cast.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use custos_adapters::mail::Mailer;
use custos_adapters::nats_server::Durability;
use custos_engine::mfa::{self, TotpSecret};
use custos_schemas::approval::{ApprovalChannel, ApprovalNotice, MfaMethod, Vote};
use custos_schemas::{Actor, Event, EventType, Outcome, TransferRequest, UserRecord};
use custos_tests::browser::Browser;
use custos_tests::smtp::SmtpCapture;
use custos_tests::webhook::WebhookReceiver;
use custos_tests::*;
use custos_workers::approvals::links::{
    ChatWebhookNotifier, Clock, EmailNotifier, LinkIssuer, LinkSettings, MfaKey, WebhookUrl,
    links_router,
};
use custos_workers::approvals::{ApprovalLinks, Ballot, BallotBox, BallotError, Notifier, Receipt};
use custos_workers::ledger::LedgerHandle;
use futures::future::BoxFuture;

/// A ballot box that records what it is given.
#[derive(Default)]
struct Recording {
    users: HashMap<String, UserRecord>,
    notices: Mutex<HashMap<String, ApprovalNotice>>,
    ballots: Mutex<Vec<Ballot>>,
    /// Workflows whose ballots are refused with this reason.
    refuse: Mutex<HashMap<String, String>>,
}

impl Recording {
    fn ballots(&self) -> Vec<Ballot> {
        self.ballots.lock().expect("lock").clone()
    }
}

impl BallotBox for Recording {
    fn cast(&self, ballot: Ballot) -> BoxFuture<'_, Result<Receipt, BallotError>> {
        Box::pin(async move {
            if let Some(reason) = self.refuse.lock().expect("lock").get(&ballot.workflow_id) {
                return Err(BallotError::Refused(reason.clone()));
            }
            let mut ballots = self.ballots.lock().expect("lock");
            ballots.push(ballot);
            Ok(Receipt::Recorded {
                quorum_reached: false,
            })
        })
    }

    fn notice<'a>(
        &'a self,
        workflow_id: &'a str,
    ) -> BoxFuture<'a, Result<ApprovalNotice, BallotError>> {
        Box::pin(async move {
            self.notices
                .lock()
                .expect("lock")
                .get(workflow_id)
                .cloned()
                .ok_or_else(|| BallotError::UnknownWorkflow(workflow_id.into()))
        })
    }

    fn user<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async move { self.users.get(user_id).cloned() })
    }

    fn user_by_slack_id<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<UserRecord>> {
        Box::pin(async { None })
    }
}

fn user(id: &str) -> UserRecord {
    UserRecord {
        id: id.into(),
        name: format!("{}{}", id[..1].to_uppercase(), &id[1..]),
        email: format!("{id}@example.com"),
        slack_user_id: None,
        roles: vec!["approver".into()],
        groups: vec!["treasury-managers".into()],
        mfa_enrolled: true,
    }
}

fn notice(workflow_id: &str) -> ApprovalNotice {
    ApprovalNotice {
        workflow_id: workflow_id.into(),
        request: TransferRequest {
            request_id: format!("up-{workflow_id}"),
            wallet: "treasury".into(),
            asset: "LTC".into(),
            destination: "rltc1qdestination".into(),
            amount: "12.5".into(),
            memo: Some("<b>quarterly</b> settlement".into()),
            initiator: "carol".into(),
        },
        request_hash: format!("{:064x}", workflow_id.len()),
        policy_version: "default-v3".into(),
        chain: "ltc-regtest".into(),
        fiat_value: Some(custos_schemas::policy::FiatValue {
            currency: "EUR".into(),
            amount: "1250.00".into(),
        }),
        whitelisted: Some(false),
        explanation: "Rule large-transfers: needs 2 approvals from treasury-managers".into(),
        approved_by: vec!["dave".into()],
        missing: vec!["treasury-managers: 1 of 2".into()],
        expires_at: None,
        step_up_required: true,
    }
}

/// Everything a test needs: servers, the issuer under test, its clock, and the
/// approvers' authenticators.
struct Setup {
    nats: Nats,
    _engine: Engine,
    ballots: Arc<Recording>,
    issuer: LinkIssuer<LedgerHandle>,
    base_url: String,
    offset_ms: Arc<AtomicI64>,
    secrets: HashMap<String, TotpSecret>,
    _server: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start() -> Setup {
        let nats = Nats::start(Durability::Default).await;
        let engine = Engine::start(&nats).await;
        let mut recording = Recording::default();
        for id in ["alice", "bob"] {
            recording.users.insert(id.into(), user(id));
        }
        for wf in ["tx-1", "tx-2", "tx-3", "tx-refused"] {
            recording
                .notices
                .lock()
                .expect("lock")
                .insert(wf.into(), notice(wf));
        }
        recording
            .refuse
            .lock()
            .expect("lock")
            .insert("tx-refused".into(), "the request moved on".into());
        let ballots = Arc::new(recording);
        let offset_ms = Arc::new(AtomicI64::new(0));
        let offset = Arc::clone(&offset_ms);
        let system = custos_workers::approvals::links::system_clock();
        let clock: Clock = Arc::new(move || system() + offset.load(Ordering::SeqCst));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        // `localhost`, not the IP: passkeys need a domain as RP ID (and
        // http://localhost is a secure context).
        let base_url = format!(
            "http://localhost:{}",
            listener.local_addr().expect("addr").port()
        );
        let mut settings = LinkSettings::new(base_url.clone());
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
        let mut secrets = HashMap::new();
        for id in ["alice", "bob"] {
            let uri = issuer
                .enrol_totp(&user(id), Actor::system("test-admin"))
                .await
                .expect("enrol");
            assert!(uri.starts_with(&format!("otpauth://totp/Custos:{id}%40example.com?secret=")));
            let secret = uri
                .split(['?', '&'])
                .find_map(|p| p.strip_prefix("secret="))
                .expect("secret in URI");
            secrets.insert(
                id.to_string(),
                TotpSecret::from_base32(secret).expect("base32"),
            );
        }
        Setup {
            nats,
            _engine: engine,
            ballots,
            issuer,
            base_url,
            offset_ms,
            secrets,
            _server: server,
        }
    }

    fn now_secs(&self) -> u64 {
        let ms = custos_workers::approvals::links::system_clock()()
            + self.offset_ms.load(Ordering::SeqCst);
        u64::try_from(ms / 1000).expect("positive time")
    }

    /// The code `id`'s authenticator shows now.
    fn code(&self, id: &str) -> String {
        mfa::code_at(&self.secrets[id], self.now_secs())
    }

    /// A code that is not `id`'s now (nor in the drift window).
    fn wrong_code(&self, id: &str) -> String {
        let s = &self.secrets[id];
        let now = self.now_secs();
        let window: Vec<String> = [now - 30, now, now + 30]
            .iter()
            .map(|t| mfa::code_at(s, *t))
            .collect();
        (0..)
            .map(|n: u32| format!("{:06}", n * 7919 % 1_000_000))
            .find(|c| !window.contains(c))
            .expect("a wrong code")
    }

    fn advance(&self, by: Duration) {
        self.offset_ms.fetch_add(
            i64::try_from(by.as_millis()).expect("duration"),
            Ordering::SeqCst,
        );
    }

    async fn link(&self, to: &str, workflow: &str) -> String {
        self.issuer
            .link_for(&user(to), &notice(workflow))
            .await
            .expect("link")
    }

    async fn events(&self, event_type: EventType) -> Vec<Event> {
        all_events(&self.nats.js().await)
            .await
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| e.event_type == event_type)
            .collect()
    }
}

/// A page as a plain HTTP client sees it.
struct Page {
    status: u16,
    body: String,
    headers: reqwest::header::HeaderMap,
}

impl Page {
    fn csrf(&self) -> String {
        let start = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("csrf field")
            + 19;
        let end = self.body[start..].find('"').expect("end of csrf") + start;
        self.body[start..end].to_string()
    }

    fn cookie(&self) -> String {
        let set = self.headers["set-cookie"].to_str().expect("cookie");
        set.split(';').next().expect("cookie pair").to_string()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn open(link: &str) -> Page {
    let r = http().get(link).send().await.expect("GET");
    Page {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.expect("body"),
    }
}

/// Opens the link and posts an answer from its page, as a browser would.
async fn answer(link: &str, decision: &str, code: &str) -> Page {
    let page = open(link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    post(link, Some(&page.cookie()), &page.csrf(), decision, code).await
}

async fn post(link: &str, cookie: Option<&str>, csrf: &str, decision: &str, code: &str) -> Page {
    let mut request = http()
        .post(link)
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    let r = request
        .body(format!(
            "csrf={csrf}&decision={decision}&code={code}&comment=ok"
        ))
        .send()
        .await
        .expect("POST");
    Page {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.expect("body"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emailed_link_shows_the_request_and_approves_only_with_the_right_code() {
    let s = Setup::start().await;
    let smtp = SmtpCapture::start().await;
    let mailer = Mailer::from_url(&smtp.url(), "Custos <custos@example.com>").expect("mailer");
    let email = EmailNotifier::new(Arc::new(s.issuer.clone()), mailer);
    assert_eq!(email.channel(), ApprovalChannel::Email);
    email
        .ask(&user("alice"), &notice("tx-1"))
        .await
        .expect("mail sent");

    let mail = smtp.wait_for(1).await.remove(0);
    assert!(mail.header("To").expect("To").contains("alice@example.com"));
    assert!(
        mail.header("Subject")
            .expect("Subject")
            .contains("12.5 LTC")
    );
    let body = mail.body();
    let prefix = format!("{}/approve/", s.base_url);
    let start = body.find(&prefix).expect("link in the mail");
    let link: String = body[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert_eq!(link.len(), prefix.len() + 43, "{link}");
    assert!(body.contains("Opening the link records nothing"));

    let browser = Browser::start().await;
    browser.goto(&link).await;
    let text = browser.text().await;
    for shown in [
        "tx-1",
        "12.5 LTC",
        "rltc1qdestination",
        "treasury (ltc-regtest)",
        "1250.00 EUR",
        "NOT in the address book",
        "<b>quarterly</b> settlement",
        "needs 2 approvals from treasury-managers",
        "dave",
        "treasury-managers: 1 of 2",
        "default-v3",
    ] {
        assert!(text.contains(shown), "page lacks {shown:?}:\n{text}");
    }
    assert!(s.ballots.ballots().is_empty(), "viewing cast a vote");

    browser.click("#approve").await;
    browser.type_into("#code", &s.wrong_code("alice")).await;
    browser.click("#submit").await;
    let text = browser.text_with("Wrong authenticator code").await;
    assert!(text.contains("Wrong authenticator code"), "{text}");
    assert!(s.ballots.ballots().is_empty());
    let failures = s.events(EventType::LoginFailure).await;
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].target.id, "alice");
    assert_eq!(failures[0].metadata["reason"], "wrong code");
    assert_eq!(failures[0].metadata["workflowId"], "tx-1");
    assert_eq!(
        failures[0].context.ip_address.as_deref(),
        Some("127.0.0.***")
    );

    browser.goto(&link).await;
    browser.click("#approve").await;
    browser.type_into("#code", &s.code("alice")).await;
    browser.type_into("#comment", "checked the invoice").await;
    browser.click("#submit").await;
    let text = browser.text_with("Your approval of tx-1 is recorded").await;
    assert!(text.contains("Your approval of tx-1 is recorded"), "{text}");

    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1);
    let b = &ballots[0];
    assert_eq!(
        (b.workflow_id.as_str(), b.user_id.as_str()),
        ("tx-1", "alice")
    );
    assert_eq!(b.vote.vote, Vote::Approve);
    assert_eq!(b.vote.request_hash, notice("tx-1").request_hash);
    assert_eq!(b.vote.policy_version, "default-v3");
    assert_eq!(b.vote.channel, ApprovalChannel::Email);
    assert_eq!(b.vote.mfa, MfaMethod::Totp);
    assert_eq!(b.vote.comment.as_deref(), Some("checked the invoice"));
    assert_eq!(b.masked_ip.as_deref(), Some("127.0.0.***"));
    assert!(
        b.user_agent
            .as_deref()
            .is_some_and(|ua| ua.contains("Chrome")),
        "{:?}",
        b.user_agent
    );
    let verified = s.events(EventType::MfaVerified).await;
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0].target.id, "alice");
    assert_eq!(verified[0].metadata["channel"], "email");
    assert_eq!(s.events(EventType::MfaConfigured).await.len(), 2);

    // The link is spent: opening it again says so and casts nothing.
    browser.goto(&link).await;
    let text = browser.text().await;
    assert!(text.contains("already used"), "{text}");
    assert_eq!(s.ballots.ballots().len(), 1);
    verify_stream(&s.nats.js().await)
        .await
        .expect("chain intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_carry_security_headers_and_escape_the_request() {
    let s = Setup::start().await;
    let page = open(&s.link("alice", "tx-1").await).await;
    assert_eq!(page.status, 200);
    let h = |k: &str| page.headers[k].to_str().expect("header").to_string();
    assert!(h("content-security-policy").contains("default-src 'none'"));
    assert!(h("content-security-policy").contains("frame-ancestors 'none'"));
    assert_eq!(h("x-frame-options"), "DENY");
    assert_eq!(h("referrer-policy"), "same-origin");
    assert_eq!(h("cache-control"), "no-store");
    assert!(h("set-cookie").contains("HttpOnly") && h("set-cookie").contains("SameSite=Strict"));
    assert!(page.body.contains("&lt;b&gt;quarterly&lt;/b&gt;"));
    assert!(!page.body.contains("<b>quarterly"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_reused_foreign_and_tampered_links_are_refused() {
    let s = Setup::start().await;

    // Expired.
    let link = s.link("alice", "tx-1").await;
    s.advance(Duration::from_secs(3601));
    let page = open(&link).await;
    assert_eq!(page.status, 410);
    assert!(page.body.contains("expired"), "{}", page.body);

    // Reused: the second answer finds the link spent.
    let link = s.link("alice", "tx-1").await;
    let page = open(&link).await;
    let first = post(
        &link,
        Some(&page.cookie()),
        &page.csrf(),
        "reject",
        &s.code("alice"),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.body.contains("Your rejection of tx-1 is recorded"));
    s.advance(Duration::from_secs(30));
    let again = post(
        &link,
        Some(&page.cookie()),
        &page.csrf(),
        "approve",
        &s.code("alice"),
    )
    .await;
    assert_eq!(again.status, 410);
    assert!(again.body.contains("already used"));
    assert_eq!(s.ballots.ballots().len(), 1);
    assert_eq!(s.ballots.ballots()[0].vote.vote, Vote::Reject);

    // Bob's link answered with Alice's code: refused, recorded against Bob.
    let bobs = s.link("bob", "tx-2").await;
    let page = answer(&bobs, "approve", &s.code("alice")).await;
    assert_eq!(page.status, 401, "{}", page.body);
    assert!(page.body.contains("Wrong authenticator code"));
    let failures = s.events(EventType::LoginFailure).await;
    assert!(
        failures.iter().any(|e| e.target.id == "bob"),
        "{failures:?}"
    );
    assert_eq!(s.ballots.ballots().len(), 1);

    // Tampered or junk tokens: unknown, never a panic.
    let tampered = {
        let mut chars: Vec<char> = bobs.chars().collect();
        let i = chars.len() - 10;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        chars.into_iter().collect::<String>()
    };
    let junk = format!("{}/approve/", s.base_url);
    for bad in [
        tampered,
        format!("{junk}short"),
        format!("{junk}{}", "A".repeat(2000)),
        format!("{junk}%F0%9F%92%A5%00"),
        format!("{junk}....."),
    ] {
        let page = open(&bad).await;
        assert_eq!(page.status, 404, "{bad}");
        assert!(page.body.contains("Unknown approval link"), "{}", page.body);
        let posted = post(&bad, None, "x.y", "approve", &s.code("bob")).await;
        assert!(matches!(posted.status, 403 | 404), "{}", posted.status);
    }
    // Bob's real link still works with Bob's code.
    let page = answer(&bobs, "approve", &s.code("bob")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(s.ballots.ballots().len(), 2);
    assert_eq!(s.ballots.ballots()[1].user_id, "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_codes_lock_the_approver_out_for_a_while() {
    let s = Setup::start().await;
    let link = s.link("alice", "tx-1").await;
    for _ in 0..5 {
        let page = answer(&link, "approve", &s.wrong_code("alice")).await;
        assert_eq!(page.status, 401, "{}", page.body);
    }
    let locked = answer(&link, "approve", &s.code("alice")).await;
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert!(
        locked.body.contains("locked for 15 more minute(s)"),
        "{}",
        locked.body
    );
    assert!(s.ballots.ballots().is_empty());
    let failures = s.events(EventType::LoginFailure).await;
    assert_eq!(failures.len(), 6);
    assert!(failures[5].metadata["reason"].contains("locked"));

    // The lockout is the approver's, not the link's: another link is locked too.
    let other = s.link("alice", "tx-2").await;
    assert_eq!(
        answer(&other, "approve", &s.code("alice")).await.status,
        429
    );

    s.advance(Duration::from_secs(15 * 60 + 1));
    let page = answer(&link, "approve", &s.code("alice")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(s.ballots.ballots().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_counts_once_and_forms_must_come_from_the_page() {
    let s = Setup::start().await;
    let first = s.link("alice", "tx-1").await;
    let second = s.link("alice", "tx-2").await;
    let code = s.code("alice");
    assert_eq!(answer(&first, "approve", &code).await.status, 200);
    let replay = answer(&second, "approve", &code).await;
    assert_eq!(replay.status, 401);
    assert!(replay.body.contains("already used"), "{}", replay.body);

    // No cookie, a forged CSRF token, another link's token, a foreign origin.
    let page = open(&second).await;
    assert_eq!(
        post(&second, None, &page.csrf(), "approve", "000000")
            .await
            .status,
        403
    );
    assert_eq!(
        post(&second, Some("custos_csrf=a.b"), "a.b", "approve", "000000")
            .await
            .status,
        403
    );
    let third = s.link("alice", "tx-3").await;
    let other_page = open(&third).await;
    let cross = post(
        &second,
        Some(&other_page.cookie()),
        &other_page.csrf(),
        "approve",
        "000000",
    )
    .await;
    assert_eq!(cross.status, 403, "a token for one link works on another");
    let foreign = http()
        .post(&second)
        .header("origin", "https://evil.example")
        .header("cookie", page.cookie())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}&decision=approve&code=000000", page.csrf()))
        .send()
        .await
        .expect("POST");
    assert_eq!(foreign.status().as_u16(), 403);
    let cross_site = http()
        .post(&second)
        .header("sec-fetch-site", "cross-site")
        .header("cookie", page.cookie())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}&decision=approve&code=000000", page.csrf()))
        .send()
        .await
        .expect("POST");
    assert_eq!(cross_site.status().as_u16(), 403);
    // None of those reached the second factor.
    assert_eq!(s.events(EventType::LoginFailure).await.len(), 1);
    // No decision: refused before anything is spent.
    s.advance(Duration::from_secs(30));
    let undecided = answer(&second, "maybe", &s.code("alice")).await;
    assert_eq!(undecided.status, 400);
    assert_eq!(s.ballots.ballots().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_approvers_refusals_and_unenrolled_users() {
    let s = Setup::start().await;
    let bobs = s.link("bob", "tx-1").await;
    s.issuer.deactivate("bob").await.expect("deactivate");
    let page = open(&bobs).await;
    assert_eq!(page.status, 403);
    assert!(page.body.contains("deactivated"), "{}", page.body);
    assert!(
        s.issuer
            .link_for(&user("bob"), &notice("tx-2"))
            .await
            .is_err()
    );

    let refused = s.link("alice", "tx-refused").await;
    let page = answer(&refused, "approve", &s.code("alice")).await;
    assert_eq!(page.status, 409);
    assert!(page.body.contains("the request moved on"), "{}", page.body);
    assert!(s.ballots.ballots().is_empty());

    let err = s
        .issuer
        .link_for(&user("zoe"), &notice("tx-1"))
        .await
        .expect_err("not enrolled");
    assert!(err.reason.contains("no second factor"), "{err}");

    // A request that changed since the link was sent is not shown as answerable.
    let changed = s.link("alice", "tx-2").await;
    s.ballots
        .notices
        .lock()
        .expect("lock")
        .entry("tx-2".into())
        .and_modify(|n| {
            n.request.amount = "99".into();
            n.request_hash = format!("{:064x}", 99);
        });
    let page = open(&changed).await;
    assert_eq!(page.status, 409);
    assert!(page.body.contains("changed"), "{}", page.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_webhook_receives_the_link_and_the_link_answers_as_a_chat_link() {
    let s = Setup::start().await;
    let hook = WebhookReceiver::start().await;
    let chat = ChatWebhookNotifier::new(
        Arc::new(s.issuer.for_channel(ApprovalChannel::ChatLink)),
        WebhookUrl::new(hook.url()).expect("url"),
    )
    .expect("notifier");
    assert!(!format!("{chat:?}").contains("secret-part"));
    chat.ask(&user("alice"), &notice("tx-1"))
        .await
        .expect("posted");
    chat.conclude(&user("alice"), &notice("tx-1"), "approved")
        .await
        .expect("posted");

    let posts = hook.posts();
    assert_eq!(posts.len(), 2, "{posts:?}");
    let text = posts[0]["text"].as_str().expect("text");
    assert!(text.contains("12.5 LTC from wallet treasury"), "{text}");
    assert!(text.contains("Alice"), "{text}");
    let start = text
        .find(&format!("{}/approve/", s.base_url))
        .expect("link");
    let link: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert!(
        posts[1]["text"]
            .as_str()
            .expect("text")
            .contains("tx-1 ended: approved")
    );

    let page = answer(&link, "approve", &s.code("alice")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1);
    assert_eq!(ballots[0].vote.channel, ApprovalChannel::ChatLink);
    assert_eq!(ballots[0].vote.mfa, MfaMethod::Totp);

    // A webhook that refuses is an error naming the status, not the URL.
    let broken = ChatWebhookNotifier::new(
        Arc::new(s.issuer.for_channel(ApprovalChannel::ChatLink)),
        WebhookUrl::new(format!("{}/nowhere", s.base_url)).expect("url"),
    )
    .expect("notifier");
    let err = broken
        .ask(&user("alice"), &notice("tx-2"))
        .await
        .expect_err("refused");
    assert!(
        err.reason.contains("405") || err.reason.contains("404"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_is_enrolled_on_its_link_and_approves_in_chromium() {
    let s = Setup::start().await;
    let browser = Browser::start().await;
    let authenticator = browser.add_virtual_authenticator().await;

    // Enrolment: the operator's one-time link; the page creates the passkey.
    let enrol = s
        .issuer
        .passkey_enrolment_link(&user("alice"))
        .await
        .expect("enrolment link");
    assert!(
        enrol.starts_with(&format!("{}/enrol/", s.base_url)),
        "{enrol}"
    );
    browser.goto(&enrol).await;
    assert!(browser.text().await.contains("create the passkey"));
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
    let configured: Vec<Event> = s
        .events(EventType::MfaConfigured)
        .await
        .into_iter()
        .filter(|e| e.metadata.get("method").map(String::as_str) == Some("webauthn"))
        .collect();
    // The link's issue (pending, with the token's hash) and the passkey.
    assert_eq!(configured.len(), 2, "{configured:#?}");
    assert_eq!(
        configured[0].metadata.get("stage").map(String::as_str),
        Some("link-issued")
    );
    let configured = &configured[1..];
    let c = &configured[0];
    assert_eq!(
        (c.target.id.as_str(), c.result),
        ("alice", Outcome::Success)
    );
    assert_eq!(
        c.metadata.get("publicKey").map(String::len),
        Some(130),
        "the public key (SEC1, hex) is recorded, nothing secret: {c:#?}"
    );
    // The link was single use.
    browser.goto(&enrol).await;
    assert!(browser.text().await.contains("already used"));

    // Approval: the page offers the passkey; using it records the vote with
    // MFA method webauthn.
    let link = s.link("alice", "tx-1").await;
    browser.goto(&link).await;
    assert!(browser.text().await.contains("Approve with passkey"));
    browser.click("#passkey-approve").await;
    let text = browser.text_with("Your approval of tx-1 is recorded").await;
    assert!(text.contains("Your approval of tx-1 is recorded"), "{text}");
    let ballots = s.ballots.ballots();
    assert_eq!(ballots.len(), 1, "{ballots:#?}");
    assert_eq!(
        (
            ballots[0].user_id.as_str(),
            ballots[0].vote.vote,
            ballots[0].vote.mfa
        ),
        ("alice", Vote::Approve, MfaMethod::Webauthn)
    );
    let verified: Vec<Event> = s
        .events(EventType::MfaVerified)
        .await
        .into_iter()
        .filter(|e| e.metadata.get("method").map(String::as_str) == Some("webauthn"))
        .collect();
    assert_eq!(verified.len(), 1, "{verified:#?}");

    // An approver without a passkey (bob) is offered only the code.
    let bob = s.link("bob", "tx-2").await;
    browser.goto(&bob).await;
    assert!(!browser.text().await.contains("Approve with passkey"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkeys_need_a_domain_not_an_ip_address() {
    let s = Setup::start().await;
    let nats_js = s.nats.js().await;
    let issuer = LinkIssuer::new(
        &nats_js,
        s.ballots.clone(),
        s._engine.ledger.clone(),
        &MfaKey::generate(),
        LinkSettings::new("http://127.0.0.1:8080"),
        custos_workers::approvals::links::system_clock(),
    )
    .await
    .expect("issuer");
    let e = issuer
        .passkey_enrolment_link(&user("alice"))
        .await
        .expect_err("an IP address cannot be an RP ID");
    assert!(e.to_string().contains("IP address"), "{e}");
}
