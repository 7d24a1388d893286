//! Administrative change requests: applying a policy, editing a wallet's
//! destination whitelist, freezing and unfreezing, administering the directory's
//! users and roles, and the key ceremonies (creating a wallet, rotating its
//! shares, changing its guardians or threshold, repairing a lost share). Each is
//! a workflow decided by the active policy (the meta-policy) and approved
//! through the same ballot box as transfers; a freeze alone takes effect at
//! once (an emergency). A key ceremony runs only once its change is approved,
//! and every guardian checks that approval on its own replica of the trail.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::UserRecord;
use crate::ids::validate_token;
use crate::request::FieldError;

/// Longest policy document accepted, in bytes.
pub const MAX_POLICY_DOCUMENT_LEN: usize = 256 * 1024;
/// Longest whitelisted address or freeze reason accepted, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// Most roles, groups or duties one change names.
pub const MAX_LIST_LEN: usize = 32;

/// What an administrator asks to change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Change {
    /// Make this policy document (TOML) the active policy. `version` is the
    /// engine's hash of the parsed document: what every later decision records.
    PolicyApply {
        name: String,
        version: String,
        document: String,
    },
    /// Add `address` to the whitelist of `wallet` (on the wallet's chain).
    WhitelistAdd {
        wallet: String,
        address: String,
    },
    WhitelistRemove {
        wallet: String,
        address: String,
    },
    /// Stop every signing of `wallet`, or of every wallet when `None`. Takes
    /// effect immediately, by any administrator.
    Freeze {
        #[serde(default)]
        wallet: Option<String>,
        reason: String,
    },
    /// Lift a freeze; needs the quorum the active policy demands.
    Unfreeze {
        #[serde(default)]
        wallet: Option<String>,
    },
    /// Add a user to the directory with their roles and groups (`USER_CREATED`).
    UserAdd(UserRecord),
    /// Deactivate a user for good: they no longer initiate or approve, and
    /// approvals they gave to requests still in flight stop counting
    /// (`USER_DEACTIVATED`).
    UserDeactivate {
        user: String,
    },
    /// Create a role bundling `duties` (duty names, e.g. `initiate`), which
    /// must not conflict (`ROLE_CREATED`).
    RoleCreate {
        name: String,
        duties: Vec<String>,
    },
    /// Give `user` the role, unless it breaks separation of duties (`ROLE_ASSIGNED`).
    RoleAssign {
        user: String,
        role: String,
    },
    /// Take the role from `user` (`PERMISSION_CHANGED`).
    RoleRevoke {
        user: String,
        role: String,
    },
    /// Create wallet `name` by a key ceremony among `guardians` (FROST DKG,
    /// `threshold` of them sign) on `chain` (`WALLET_CREATED`).
    WalletCreate {
        name: String,
        model: String,
        chain: String,
        threshold: u16,
        guardians: Vec<String>,
    },
    /// Refresh every guardian's share of `wallet`: same key and address, old
    /// shares no longer combine with new ones (`KEY_ROTATION_CEREMONY`).
    KeyRotation {
        wallet: String,
    },
    /// Add `guardian` to `wallet`: `helpers` (by default the first
    /// threshold-many guardians) compute its share (`GUARDIAN_ADDED`).
    GuardianAdd {
        wallet: String,
        guardian: String,
        #[serde(default)]
        helpers: Vec<String>,
    },
    /// Remove `guardian` from `wallet`: the others refresh among themselves
    /// (`GUARDIAN_REMOVED`).
    GuardianRemove {
        wallet: String,
        guardian: String,
    },
    /// Redistribute `wallet`'s shares among the same guardians under a new
    /// threshold, same key and address (`THRESHOLD_MODIFIED`).
    ThresholdChange {
        wallet: String,
        threshold: u16,
    },
    /// Rebuild the share `guardian` lost, under its own index, from
    /// threshold-many `helpers` without the key ever existing (`SHARE_REPAIRED`).
    ShareRepair {
        wallet: String,
        guardian: String,
        #[serde(default)]
        helpers: Vec<String>,
    },
    /// Replace the stuck transaction `replaces` of transfer `workflow` by
    /// `unsigned`: the same payment at a higher fee (the fee-bump worker asks,
    /// on behalf of the transfer's initiator). Decided as a `fee-bump` whose
    /// amount is the fee it adds; once approved, the worker records the
    /// replacement with the change's `CHANGE_APPLIED`.
    FeeBump {
        workflow: String,
        replaces: String,
        unsigned: crate::chain::UnsignedTransaction,
    },
}

impl Change {
    /// The wallet it concerns, if one.
    pub fn wallet(&self) -> Option<&str> {
        match self {
            Change::PolicyApply { .. }
            | Change::UserAdd(_)
            | Change::UserDeactivate { .. }
            | Change::RoleCreate { .. }
            | Change::RoleAssign { .. }
            | Change::RoleRevoke { .. } => None,
            Change::WhitelistAdd { wallet, .. }
            | Change::WhitelistRemove { wallet, .. }
            | Change::KeyRotation { wallet }
            | Change::GuardianAdd { wallet, .. }
            | Change::GuardianRemove { wallet, .. }
            | Change::ThresholdChange { wallet, .. }
            | Change::ShareRepair { wallet, .. }
            | Change::WalletCreate { name: wallet, .. } => Some(wallet),
            Change::Freeze { wallet, .. } | Change::Unfreeze { wallet } => wallet.as_deref(),
            // The transfer names its wallet; the change service looks it up.
            Change::FeeBump { .. } => None,
        }
    }

    /// Whether applying it is a key ceremony among guardians (run once the
    /// change is approved, recorded with the wallet event it makes).
    pub fn is_ceremony(&self) -> bool {
        matches!(
            self,
            Change::WalletCreate { .. }
                | Change::KeyRotation { .. }
                | Change::GuardianAdd { .. }
                | Change::GuardianRemove { .. }
                | Change::ThresholdChange { .. }
                | Change::ShareRepair { .. }
        )
    }

    /// Whether a step applies it once it is approved, recording its own
    /// event with the change's `CHANGE_APPLIED` (a key ceremony, a fee bump),
    /// rather than the approval completing the quorum.
    pub fn applied_by_a_step(&self) -> bool {
        self.is_ceremony() || matches!(self, Change::FeeBump { .. })
    }

    /// A line for approvers and the audit trail.
    pub fn describe(&self) -> String {
        let scope = |w: &Option<String>| match w {
            Some(w) => format!("wallet {w}"),
            None => "every wallet".to_string(),
        };
        match self {
            Change::PolicyApply { name, version, .. } => {
                format!("apply policy {name} (version {version})")
            }
            Change::WhitelistAdd { wallet, address } => {
                format!("whitelist {address} for wallet {wallet}")
            }
            Change::WhitelistRemove { wallet, address } => {
                format!("remove {address} from the whitelist of wallet {wallet}")
            }
            Change::Freeze { wallet, reason } => format!("freeze {}: {reason}", scope(wallet)),
            Change::Unfreeze { wallet } => format!("unfreeze {}", scope(wallet)),
            Change::UserAdd(r) => {
                let list = |items: &[String]| match items.is_empty() {
                    true => "none".to_string(),
                    false => items.join(", "),
                };
                format!(
                    "add user {} ({} <{}>), roles: {}, groups: {}",
                    r.id,
                    r.name,
                    r.email,
                    list(&r.roles),
                    list(&r.groups)
                )
            }
            Change::UserDeactivate { user } => format!("deactivate user {user}"),
            Change::RoleCreate { name, duties } => {
                format!("create role {name} with duties {}", duties.join(", "))
            }
            Change::RoleAssign { user, role } => format!("assign role {role} to {user}"),
            Change::RoleRevoke { user, role } => format!("revoke role {role} from {user}"),
            Change::WalletCreate {
                name,
                model,
                chain,
                threshold,
                guardians,
            } => format!(
                "create {model} wallet {name} on {chain}: {threshold}-of-{} among {}",
                guardians.len(),
                guardians.join(", ")
            ),
            Change::KeyRotation { wallet } => format!("rotate the key shares of wallet {wallet}"),
            Change::GuardianAdd {
                wallet, guardian, ..
            } => format!("add guardian {guardian} to wallet {wallet}"),
            Change::GuardianRemove { wallet, guardian } => {
                format!("remove guardian {guardian} from wallet {wallet}")
            }
            Change::ThresholdChange { wallet, threshold } => {
                format!("change the threshold of wallet {wallet} to {threshold}")
            }
            Change::ShareRepair {
                wallet, guardian, ..
            } => format!("repair the lost share of guardian {guardian} of wallet {wallet}"),
            Change::FeeBump {
                workflow,
                replaces,
                unsigned,
            } => format!(
                "replace transaction {replaces} of transfer {workflow} by one paying at most {} in fees (base units of {})",
                unsigned.max_fee(),
                unsigned.chain()
            ),
        }
    }
}

/// A change request, published to [`crate::subjects::REQ_CHANGE`] (JSON or
/// MessagePack). Retrying with the same `requestId` returns the same workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeRequest {
    /// Idempotency key: A-Z, a-z, 0-9, '-', '_' (1 to 128).
    pub request_id: String,
    /// Directory user id of the administrator asking.
    pub initiator: String,
    pub change: Change,
}

impl ChangeRequest {
    /// Checks every field's shape; the error names the field.
    pub fn validate_shape(&self) -> Result<(), FieldError> {
        validate_token("requestId", &self.request_id)?;
        validate_token("initiator", &self.initiator)?;
        let text = |field: &str, value: &str, max: usize| {
            if value.trim().is_empty() {
                return Err(FieldError::new(field, "must not be empty"));
            }
            if value.len() > max {
                return Err(FieldError::new(
                    field,
                    format!("is longer than {max} bytes"),
                ));
            }
            Ok(())
        };
        match &self.change {
            Change::PolicyApply {
                name,
                version,
                document,
            } => {
                text("change.name", name, MAX_TEXT_LEN)?;
                text("change.document", document, MAX_POLICY_DOCUMENT_LEN)?;
                if version.len() != 64 || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(FieldError::new(
                        "change.version",
                        "must be 64 hex digits (SHA-256)",
                    ));
                }
            }
            Change::WhitelistAdd { wallet, address }
            | Change::WhitelistRemove { wallet, address } => {
                validate_token("change.wallet", wallet)?;
                text("change.address", address, MAX_TEXT_LEN)?;
                if address.chars().any(|c| !c.is_ascii_alphanumeric()) {
                    return Err(FieldError::new(
                        "change.address",
                        "must be letters and digits",
                    ));
                }
            }
            Change::Freeze { wallet, reason } => {
                if let Some(w) = wallet {
                    validate_token("change.wallet", w)?;
                }
                text("change.reason", reason, MAX_TEXT_LEN)?;
            }
            Change::Unfreeze { wallet } => {
                if let Some(w) = wallet {
                    validate_token("change.wallet", w)?;
                }
            }
            Change::UserAdd(r) => {
                validate_token("change.id", &r.id)?;
                text("change.name", &r.name, MAX_TEXT_LEN)?;
                text("change.email", &r.email, MAX_TEXT_LEN)?;
                if let Some(slack) = &r.slack_user_id {
                    validate_token("change.slackUserId", slack)?;
                }
                tokens("change.roles", &r.roles, false)?;
                tokens("change.groups", &r.groups, false)?;
            }
            Change::UserDeactivate { user } => validate_token("change.user", user)?,
            Change::RoleCreate { name, duties } => {
                validate_token("change.name", name)?;
                tokens("change.duties", duties, true)?;
            }
            Change::RoleAssign { user, role } | Change::RoleRevoke { user, role } => {
                validate_token("change.user", user)?;
                validate_token("change.role", role)?;
            }
            Change::WalletCreate {
                name,
                model,
                chain,
                guardians,
                ..
            } => {
                validate_token("change.name", name)?;
                validate_token("change.model", model)?;
                validate_token("change.chain", chain)?;
                tokens("change.guardians", guardians, true)?;
            }
            Change::KeyRotation { wallet } | Change::ThresholdChange { wallet, .. } => {
                validate_token("change.wallet", wallet)?;
            }
            Change::GuardianRemove { wallet, guardian } => {
                validate_token("change.wallet", wallet)?;
                validate_token("change.guardian", guardian)?;
            }
            Change::GuardianAdd {
                wallet,
                guardian,
                helpers,
            }
            | Change::ShareRepair {
                wallet,
                guardian,
                helpers,
            } => {
                validate_token("change.wallet", wallet)?;
                validate_token("change.guardian", guardian)?;
                tokens("change.helpers", helpers, false)?;
            }
            Change::FeeBump {
                workflow,
                replaces,
                unsigned,
            } => {
                validate_token("change.workflow", workflow)?;
                validate_token("change.replaces", replaces)?;
                validate_token("change.unsigned.chain", unsigned.chain())?;
            }
        }
        Ok(())
    }
}

/// A list of at most [`MAX_LIST_LEN`] tokens; `required`: not empty.
fn tokens(field: &'static str, items: &[String], required: bool) -> Result<(), FieldError> {
    if required && items.is_empty() {
        return Err(FieldError::new(field, "must name at least one"));
    }
    if items.len() > MAX_LIST_LEN {
        return Err(FieldError::new(
            field,
            format!("names more than {MAX_LIST_LEN}"),
        ));
    }
    for item in items {
        validate_token(field, item)?;
    }
    Ok(())
}

/// The answer to a change request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum ChangeReply {
    /// Recorded as workflow `workflow_id` (a freeze: already in effect).
    Accepted { workflow_id: String },
    /// Not recorded; `field` names what was wrong, when one field was.
    Refused {
        #[serde(default)]
        field: Option<String>,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ContentType;

    fn request(change: Change) -> ChangeRequest {
        ChangeRequest {
            request_id: "r-1".into(),
            initiator: "alice".into(),
            change,
        }
    }

    /// A user whose email is blank.
    fn user() -> UserRecord {
        UserRecord {
            id: "bob".into(),
            name: "Bob".into(),
            email: " ".into(),
            slack_user_id: None,
            roles: Vec::new(),
            groups: Vec::new(),
            mfa_enrolled: false,
        }
    }

    #[test]
    fn round_trips_in_both_encodings() {
        let changes = [
            Change::Freeze {
                wallet: Some("treasury".into()),
                reason: "incident 42".into(),
            },
            Change::UserAdd(UserRecord {
                email: "bob@example.com".into(),
                roles: vec!["initiator".into()],
                ..user()
            }),
            Change::RoleCreate {
                name: "treasurer".into(),
                duties: vec!["initiate".into(), "approve".into()],
            },
        ];
        for r in changes.map(request) {
            for ct in [ContentType::Json, ContentType::MsgPack] {
                assert_eq!(ct.decode::<ChangeRequest>(&ct.encode(&r)), Ok(r.clone()));
            }
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                request(Change::WhitelistAdd {
                    wallet: "t".into(),
                    address: "bc1 q".into(),
                }),
                "change.address",
            ),
            (
                request(Change::PolicyApply {
                    name: "p".into(),
                    version: "xyz".into(),
                    document: "version = 1".into(),
                }),
                "change.version",
            ),
            (
                request(Change::Freeze {
                    wallet: None,
                    reason: " ".into(),
                }),
                "change.reason",
            ),
            (
                request(Change::Unfreeze {
                    wallet: Some("no spaces".into()),
                }),
                "change.wallet",
            ),
            (request(Change::UserAdd(user())), "change.email"),
            (
                request(Change::UserAdd(UserRecord {
                    email: "bob@example.com".into(),
                    roles: vec!["initiator".into(), "not a role".into()],
                    ..user()
                })),
                "change.roles",
            ),
            (
                request(Change::UserDeactivate { user: "".into() }),
                "change.user",
            ),
            (
                request(Change::RoleCreate {
                    name: "treasurer".into(),
                    duties: Vec::new(),
                }),
                "change.duties",
            ),
            (
                request(Change::RoleAssign {
                    user: "bob".into(),
                    role: "a/b".into(),
                }),
                "change.role",
            ),
        ];
        for (r, field) in cases {
            let e = r.validate_shape().expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
