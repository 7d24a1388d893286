//! `custos policy`: validate, show, diff and simulate policy files, and apply
//! one (a change workflow that needs the quorum the active policy demands).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use custos_engine::policy::{
    self, AddressBook, Currency, Directory, FreezeState, Inputs, Policy, PriceSnapshot, Request,
    VelocityState,
};
use custos_schemas::{TransferRequest, WalletDescriptor};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file; errors name the line and field. Exits non-zero on any.
    Validate { file: PathBuf },
    /// Print the active policy (the embedded default until another is applied) and its version.
    Show,
    /// What a policy file changes against the active policy, rule by rule.
    Diff { file: PathBuf },
    /// Dry-run a transfer request against a policy file: the decision and why.
    Simulate {
        file: PathBuf,
        /// A transfer request as upstream sends it (JSON).
        #[arg(long)]
        request: PathBuf,
        /// The chain of the request's wallet, e.g. ltc-regtest.
        #[arg(long)]
        chain: String,
        /// Users for the dry run (TOML: [[user]] id, name, email, roles, groups, mfa).
        #[arg(long)]
        directory: Option<PathBuf>,
        /// A price, e.g. LTC=EUR:80 (repeatable); missing prices fail closed.
        #[arg(long = "price")]
        prices: Vec<String>,
        /// The initiator confirmed MFA.
        #[arg(long)]
        mfa: bool,
    },
    /// Ask to make a policy file the active policy: validated here first, then
    /// sent as a change request that needs the active policy's quorum.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        requester: crate::admin::Requester,
        /// NATS server URL.
        #[arg(long, env = "CUSTOS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
    },
}

pub async fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Apply {
            file,
            requester,
            nats_url,
        } => {
            let (document, policy) = match read(&file) {
                Ok(read) => read,
                Err(errors) => {
                    eprintln!("{errors}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let change = custos_schemas::change::Change::PolicyApply {
                name: policy.name.clone(),
                version: policy.version().to_string(),
                document,
            };
            crate::admin::request(&nats_url, requester, change).await
        }
        PolicyCommand::Validate { file } => match load(&file) {
            Ok(p) => {
                println!(
                    "{}: valid, {} rules, version {}",
                    file.display(),
                    p.rules.len(),
                    p.version()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Show => {
            let active = active()?;
            println!(
                "# active policy {} (version {})",
                active.name,
                active.version()
            );
            print!("{}", policy::DEFAULT_POLICY_TOML);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { file } => {
            let (old, new) = (active()?, load(&file).map_err(anyhow::Error::msg)?);
            print!("{}", diff(&old, &new));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Simulate {
            file,
            request,
            chain,
            directory,
            prices,
            mfa,
        } => {
            let policy = load(&file).map_err(anyhow::Error::msg)?;
            let text = std::fs::read_to_string(&request)
                .with_context(|| format!("reading {}", request.display()))?;
            let transfer: TransferRequest = custos_schemas::ContentType::Json
                .decode(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: {e}", request.display()))?;
            let wallet = WalletDescriptor {
                name: transfer.wallet.clone(),
                model: "frost".into(),
                chain,
                address: String::new(),
                threshold: None,
                guardians: Vec::new(),
                group_key: None,
                transcript: None,
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let request =
                Request::transfer(&transfer, &wallet, mfa).map_err(|e| anyhow::anyhow!("{e}"))?;
            let directory = match directory {
                Some(path) => load_directory(&path)?,
                None => Directory::new(),
            };
            let snapshot = price_snapshot(&prices, now)?;
            let decision = policy::evaluate(
                &policy,
                &request,
                &Inputs {
                    directory: &directory,
                    prices: &snapshot,
                    velocity: &VelocityState::new(policy.currency),
                    address_book: &AddressBook::new(),
                    freeze: &FreezeState::new(),
                    now,
                },
            );
            println!("{}", serde_json::to_string_pretty(&decision)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The policy in force. Policy changes are not applied yet, so it is the default.
fn active() -> anyhow::Result<Policy> {
    policy::default_policy()
        .map_err(|e| anyhow::anyhow!("the embedded default policy: {}", policy::render_errors(&e)))
}

fn load(path: &Path) -> Result<Policy, String> {
    read(path).map(|(_, policy)| policy)
}

/// The file's text and the policy it holds; errors name the file, line and field.
fn read(path: &Path) -> Result<(String, Policy), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let policy = Policy::parse(&text).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}:{e}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    Ok((text, policy))
}

/// Rule-level differences, by rule name, then the settings.
fn diff(old: &Policy, new: &Policy) -> String {
    let rules = |p: &Policy| -> BTreeMap<String, String> {
        p.rules
            .iter()
            .map(|r| (r.name.clone(), serde_json::to_string(r).unwrap_or_default()))
            .collect()
    };
    let (before, after) = (rules(old), rules(new));
    let mut out = format!("version {} -> {}\n", old.version(), new.version());
    if old.version() == new.version() {
        out.push_str("no change\n");
        return out;
    }
    for (name, rule) in &after {
        match before.get(name) {
            None => out.push_str(&format!("+ rule {name}\n")),
            Some(previous) if previous != rule => out.push_str(&format!("~ rule {name}\n")),
            Some(_) => {}
        }
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        out.push_str(&format!("- rule {name}\n"));
    }
    let settings = |p: &Policy| {
        (
            p.currency,
            p.max_price_age_ms,
            p.approval_expiry_ms,
            serde_json::to_string(&p.groups).unwrap_or_default(),
        )
    };
    if settings(old) != settings(new) {
        out.push_str("~ settings (currency, price age, approval expiry or groups)\n");
    }
    let order = |p: &Policy| p.rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    if before.keys().eq(after.keys()) && order(old) != order(new) {
        out.push_str("~ rule order (explanations follow rule order)\n");
    }
    out
}

fn load_directory(path: &Path) -> anyhow::Result<Directory> {
    let mut directory = Directory::new();
    for user in crate::config::users(path)? {
        directory
            .add_record(&user)
            .map_err(|e| anyhow::anyhow!("{}: user {}: {e}", path.display(), user.id))?;
    }
    Ok(directory)
}

/// `ASSET=CUR:PRICE` flags as a snapshot taken now.
fn price_snapshot(flags: &[String], now: i64) -> anyhow::Result<PriceSnapshot> {
    let mut snapshot = PriceSnapshot::new();
    for flag in flags {
        let (asset, quote) = flag
            .split_once('=')
            .context("--price: expected ASSET=CUR:PRICE, e.g. LTC=EUR:80")?;
        let (cur, price) = quote
            .split_once(':')
            .context("--price: expected ASSET=CUR:PRICE, e.g. LTC=EUR:80")?;
        let cur =
            Currency::parse(cur).with_context(|| format!("--price: unknown currency {cur:?}"))?;
        snapshot
            .insert(asset, cur, price, now)
            .map_err(|e| anyhow::anyhow!("--price {flag}: {e}"))?;
    }
    Ok(snapshot)
}
