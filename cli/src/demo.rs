//! `custos up --demo`: the quick start's walk-through on the local regtest chain.
//! It plays the people, never the system: an operator asks for a FROST 2-of-3
//! wallet, two administrators approve it on their links, the guardian
//! processes check that approval and run the DKG, the node's wallet funds it, the
//! ERP system requests a transfer that the default policy sends for two
//! approvals, two approvers answer on their one-time web links with their
//! authenticator codes (real HTTP to the real pages), the guardians check the
//! trail and sign, the node accepts and mines it, and the trail verifies.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_nats::jetstream;
use custos_adapters::regtest::RegtestNode;
use custos_engine::transfer::Stage;
use custos_schemas::change::{Change, ChangeReply, ChangeRequest};
use custos_schemas::{
    Actor, ContentType, IntakeReply, TransferRequest, WalletDescriptor, subjects,
};
use custos_workers::approvals::ApprovalLinks;
use custos_workers::approvals::links::LinkIssuer;
use custos_workers::ceremony::Announcement;
use custos_workers::ledger::LedgerHandle;
use custos_workers::trail::Trail;

const WALLET: &str = "treasury";
const APPROVERS: [&str; 2] = ["alice", "bob"];
const ADMINISTRATORS: [&str; 2] = ["erin", "frank"];

fn step(what: &str) {
    println!("demo       {what}");
}

/// Runs the walk-through; every step is recorded in the trail as it would be
/// for real users.
pub async fn run(
    client: &async_nats::Client,
    js: &jetstream::Context,
    trail: &Trail,
    issuer: &LinkIssuer<LedgerHandle>,
    node: &RegtestNode,
) -> anyhow::Result<()> {
    wait_for_guardians(js).await?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let wallet = match trail
        .read(|v| v.ledger.wallet(WALLET).cloned())
        .await
        .map_err(anyhow::Error::msg)?
    {
        Some(w) => w,
        None => {
            create_wallet(client, trail, issuer, &http).await?;
            wait_wallet(trail).await?
        }
    };
    step(&format!("wallet treasury receives at {}", wallet.address));
    node.fund(&wallet.address, 40 * 100_000_000).await?;
    node.mine(1).await?;
    step("the node's wallet paid 40 LTC to it; one block mined");

    // Each approver enrols an authenticator (their phone, in real life).
    let secrets = enrol(trail, issuer, &APPROVERS, "approver").await?;
    step("alice and bob enrolled their authenticators (MFA_CONFIGURED)");

    let destination = node.rpc.get_new_address(Some("bech32")).await?;
    let request = TransferRequest {
        request_id: format!("demo-{}", now_ms()),
        wallet: WALLET.into(),
        asset: "LTC".into(),
        destination: destination.clone(),
        amount: "20".into(),
        memo: Some("quick start".into()),
        initiator: "erp".into(),
    };
    let reply = client
        .request(
            subjects::REQ_TRANSFER,
            ContentType::MsgPack.encode(&request).into(),
        )
        .await?;
    let IntakeReply::Accepted { workflow_id, .. } = ContentType::MsgPack.decode(&reply.payload)?
    else {
        anyhow::bail!("intake refused the demo transfer");
    };
    step(&format!(
        "the ERP system requests 20 LTC to {destination}: workflow {workflow_id}"
    ));
    wait_stage(trail, &workflow_id, Stage::AwaitingApprovals).await?;
    let notice = trail
        .read(|v| custos_workers::approvals::ballot_box::notice(v, &workflow_id, now_ms()))
        .await
        .map_err(anyhow::Error::msg)?
        .context("no approval notice")?;
    step(&format!("policy: {}", notice.explanation));

    for (user, secret) in &secrets {
        let link = issuer.link_for(user, &notice).await?;
        approve_on_page(&http, &link, secret).await?;
        step(&format!(
            "{} opened the link, typed the authenticator code and approved",
            user.id
        ));
    }
    wait_stage(trail, &workflow_id, Stage::Broadcast).await?;
    let txid = trail
        .read(|v| v.transfer(&workflow_id).and_then(|t| t.txid.clone()))
        .await
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    step(&format!(
        "two guardians checked the trail and signed; the node accepted txid {txid}"
    ));
    node.mine(1).await?;
    wait_stage(trail, &workflow_id, Stage::Confirmed).await?;
    step("mined and confirmed (TRANSACTION_CONFIRMED)");
    step(&format!(
        "see it: custos tx show {workflow_id}; custos audit verify"
    ));
    Ok(())
}

/// The operator at the command line (`cli`) asks for wallet treasury; the
/// default policy sends it to two administrators, who approve on their links.
async fn create_wallet(
    client: &async_nats::Client,
    trail: &Trail,
    issuer: &LinkIssuer<LedgerHandle>,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    let request = ChangeRequest {
        request_id: format!("demo-wallet-{}", now_ms()),
        initiator: "cli".into(),
        change: Change::WalletCreate {
            name: WALLET.into(),
            model: "frost".into(),
            chain: "ltc-regtest".into(),
            threshold: 2,
            guardians: vec!["g1".into(), "g2".into(), "g3".into()],
        },
    };
    step("an operator asks for wallet treasury: FROST 2-of-3 among guardians g1, g2, g3");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subjects::headers::CONTENT_TYPE, ContentType::JSON);
    let reply = client
        .request_with_headers(
            subjects::REQ_CHANGE,
            headers,
            ContentType::Json.encode(&request).into(),
        )
        .await?;
    let workflow_id = match ContentType::Json.decode::<ChangeReply>(&reply.payload)? {
        ChangeReply::Accepted { workflow_id } => workflow_id,
        ChangeReply::Refused { field, reason } => {
            anyhow::bail!("the wallet request was refused: {field:?} {reason}")
        }
    };
    let notice = trail
        .read(|v| custos_workers::approvals::ballot_box::notice(v, &workflow_id, now_ms()))
        .await
        .map_err(anyhow::Error::msg)?
        .context("no approval notice for the wallet request")?;
    step(&format!("policy: {}", notice.explanation));
    for (user, secret) in enrol(trail, issuer, &ADMINISTRATORS, "administrator").await? {
        let link = issuer.link_for(&user, &notice).await?;
        approve_on_page(http, &link, &secret).await?;
        step(&format!("{} approved the wallet on their link", user.id));
    }
    step("approved: the guardians check the approval on their own replicas and run the DKG");
    Ok(())
}

/// Waits until the trail records wallet treasury (or its change failed).
async fn wait_wallet(trail: &Trail) -> anyhow::Result<WalletDescriptor> {
    let started = Instant::now();
    loop {
        let wallet = trail
            .read(|v| v.ledger.wallet(WALLET).cloned())
            .await
            .map_err(anyhow::Error::msg)?;
        if let Some(w) = wallet {
            step(&format!(
                "WALLET_CREATED: every guardian signed the same group key and transcript {}",
                w.transcript.as_deref().unwrap_or_default()
            ));
            return Ok(w);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "wallet treasury was not created within 120 s (see `custos change list` and the alerts)"
        );
        // Poll the replica; the trail is the only source of truth here.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each user enrols an authenticator (their phone, in real life): their
/// directory record and TOTP secret.
async fn enrol(
    trail: &Trail,
    issuer: &LinkIssuer<LedgerHandle>,
    ids: &[&str],
    role: &str,
) -> anyhow::Result<Vec<(custos_schemas::UserRecord, custos_engine::mfa::TotpSecret)>> {
    let mut secrets = Vec::new();
    for id in ids {
        let email = trail
            .read(|v| v.directory.user(id).map(|u| u.email.clone()))
            .await
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("the demo directory has no {id}"))?;
        let record = custos_schemas::UserRecord {
            id: id.to_string(),
            name: id.to_string(),
            email,
            slack_user_id: None,
            roles: vec![role.into()],
            groups: Vec::new(),
            mfa_enrolled: true,
        };
        let uri = issuer
            .enrol_totp(&record, Actor::system("demo"))
            .await
            .map_err(|e| anyhow::anyhow!("enrolling {id}: {e}"))?;
        let secret = uri
            .split("secret=")
            .nth(1)
            .and_then(|s| s.split('&').next())
            .context("the enrolment URI has no secret")?;
        secrets.push((
            record,
            custos_engine::mfa::TotpSecret::from_base32(secret)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ));
    }
    Ok(secrets)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Waits until the three local guardians have announced themselves since the
/// demo started (an earlier run's announcements do not count).
async fn wait_for_guardians(js: &jetstream::Context) -> anyhow::Result<()> {
    let bucket = js
        .get_key_value(subjects::GUARDIANS_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let since = now_ms();
    loop {
        let mut live = 0;
        for id in ["g1", "g2", "g3"] {
            let fresh = match bucket.get(id).await {
                Ok(Some(v)) => {
                    serde_json::from_slice::<Announcement>(&v).is_ok_and(|a| a.seen_ms >= since)
                }
                _ => false,
            };
            live += usize::from(fresh);
        }
        if live == 3 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the local guardians did not start"
        );
        // Poll until each guardian has announced itself.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_stage(trail: &Trail, workflow_id: &str, want: Stage) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let (stage, reason) = trail
            .read(|v| {
                v.transfer(workflow_id)
                    .map(|t| (t.stage, t.reason.clone()))
                    .unwrap_or((Stage::New, None))
            })
            .await
            .map_err(anyhow::Error::msg)?;
        if stage == want {
            return Ok(());
        }
        if stage.is_terminal() {
            anyhow::bail!(
                "workflow {workflow_id} ended {stage:?}: {}",
                reason.unwrap_or_default()
            );
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "workflow {workflow_id} is still {stage:?}, waiting for {want:?}"
        );
        // Poll the replica; the trail is the only source of truth here.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a browser does on the approval page: load it (which never votes), then
/// post the form with the CSRF token, the decision and the current code.
async fn approve_on_page(
    http: &reqwest::Client,
    link: &str,
    secret: &custos_engine::mfa::TotpSecret,
) -> anyhow::Result<()> {
    let page = http.get(link).send().await?;
    let cookie = page
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';')
                .next()
                .filter(|c| c.starts_with("custos_csrf="))
        })
        .map(str::to_string)
        .context("the approval page set no CSRF cookie")?;
    let html = page.text().await?;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("the approval page has no CSRF field")?
        .to_string();
    let secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let code = custos_engine::mfa::code_at(secret, secs);
    let answer = http
        .post(link)
        .header(reqwest::header::COOKIE, cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("decision", "approve"),
            ("code", code.as_str()),
            ("comment", "quick start"),
        ])
        .send()
        .await?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "the approval page answered {status}: {}",
        body.chars().take(400).collect::<String>()
    );
    Ok(())
}
