//! Operator files: the directory to import at first start, and the price table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use custos_schemas::UserRecord;
use custos_workers::policy_step::PriceTable;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default, rename = "user")]
    users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    id: String,
    name: String,
    email: String,
    #[serde(default)]
    slack_user_id: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    mfa: bool,
}

/// Users from a TOML file: `[[user]]` with id, name, email, roles, groups, mfa.
pub fn users(path: &Path) -> anyhow::Result<Vec<UserRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: DirectoryFile =
        toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok(file
        .users
        .into_iter()
        .map(|u| UserRecord {
            id: u.id,
            name: u.name,
            email: u.email,
            slack_user_id: u.slack_user_id,
            roles: u.roles,
            groups: u.groups,
            mfa_enrolled: u.mfa,
        })
        .collect())
}

/// A price table from TOML: `[LTC]` then `EUR = "80"`.
pub fn prices(path: &Path) -> anyhow::Result<PriceTable> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let quotes: BTreeMap<String, BTreeMap<String, String>> =
        toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let table = PriceTable { quotes };
    table
        .snapshot(0)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(table)
}
