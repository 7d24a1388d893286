//! The directory: users, groups and roles, with separation of duties. A value
//! built by folding the directory's events (`USER_CREATED`, `USER_DEACTIVATED`,
//! `ROLE_CREATED`, `ROLE_ASSIGNED`, `PERMISSION_CHANGED`); each operation here is
//! the pure check-and-apply of one such event, and fails with the field at fault.

use std::collections::{BTreeMap, BTreeSet};

use custos_schemas::{FieldError, validate_token};

/// What a role lets its holders do. Roles are named bundles of duties; the
/// six built-in roles hold one duty each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Duty {
    /// Start transfers, wallet creation or import, whitelist changes.
    Initiate,
    /// Approve requests (in the groups the policy names).
    Approve,
    /// Run the execution steps (signing and broadcast) once allowed.
    Execute,
    /// Start administrative actions: guardians, keys, thresholds, policies, users, roles.
    Administer,
    /// Read the audit trail; nothing else.
    Audit,
    /// Operate a guardian (hold a key share).
    OperateGuardian,
}

impl Duty {
    pub const ALL: [Duty; 6] = [
        Duty::Initiate,
        Duty::Approve,
        Duty::Execute,
        Duty::Administer,
        Duty::Audit,
        Duty::OperateGuardian,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Duty::Initiate => "initiate",
            Duty::Approve => "approve",
            Duty::Execute => "execute",
            Duty::Administer => "administer",
            Duty::Audit => "audit",
            Duty::OperateGuardian => "operate-guardian",
        }
    }

    pub fn parse(s: &str) -> Option<Duty> {
        Duty::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Separation of duties: pairs one person must never hold together.
    /// Auditors are independent of everything they audit; whoever holds a key
    /// share neither starts, approves nor administers what it signs.
    pub fn conflicts_with(self, other: Duty) -> bool {
        use Duty::*;
        let pair = |a: Duty, b: Duty| (self == a && other == b) || (self == b && other == a);
        (self != other && (self == Audit || other == Audit))
            || pair(OperateGuardian, Initiate)
            || pair(OperateGuardian, Approve)
            || pair(OperateGuardian, Administer)
    }
}

/// The built-in roles, by name, and the duty each carries.
pub const BUILT_IN_ROLES: [(&str, Duty); 6] = [
    ("initiator", Duty::Initiate),
    ("approver", Duty::Approve),
    ("executor", Duty::Execute),
    ("administrator", Duty::Administer),
    ("auditor", Duty::Audit),
    ("guardian-operator", Duty::OperateGuardian),
];

/// A person or system account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub name: String,
    pub email: String,
    pub slack_user_id: Option<String>,
    pub roles: BTreeSet<String>,
    pub groups: BTreeSet<String>,
    pub mfa_enrolled: bool,
    /// A deactivated user can neither initiate nor approve, including approvals
    /// already given for requests still in flight.
    pub active: bool,
}

/// What `add_user` needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewUser {
    pub id: String,
    pub name: String,
    pub email: String,
    pub slack_user_id: Option<String>,
    pub mfa_enrolled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub duties: BTreeSet<Duty>,
    pub built_in: bool,
}

/// Users, groups and roles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    users: BTreeMap<String, User>,
    groups: BTreeMap<String, Group>,
    roles: BTreeMap<String, Role>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new()
    }
}

fn err(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(field, reason)
}

impl Directory {
    /// An empty directory with the built-in roles.
    pub fn new() -> Self {
        let roles = BUILT_IN_ROLES
            .iter()
            .map(|(name, duty)| {
                let role = Role {
                    name: (*name).to_string(),
                    duties: BTreeSet::from([*duty]),
                    built_in: true,
                };
                ((*name).to_string(), role)
            })
            .collect();
        Directory {
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            roles,
        }
    }

    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.get(id)
    }

    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// Active members of a group.
    pub fn active_members<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a User> + 'a {
        self.users
            .values()
            .filter(move |u| u.active && u.groups.contains(group))
    }

    /// Every duty a user holds through their roles (none for unknown users).
    pub fn duties(&self, user: &str) -> BTreeSet<Duty> {
        self.users
            .get(user)
            .map(|u| self.duties_of_roles(u.roles.iter().map(String::as_str)))
            .unwrap_or_default()
    }

    /// Whether `user` exists, is active and holds `duty`.
    pub fn may(&self, user: &str, duty: Duty) -> bool {
        self.users.get(user).is_some_and(|u| {
            u.active
                && u.roles
                    .iter()
                    .filter_map(|r| self.roles.get(r))
                    .any(|r| r.duties.contains(&duty))
        })
    }

    /// Whether `user`'s approval counts for `group` now: active, a member, and
    /// holding the approve duty.
    pub fn may_approve_for(&self, user: &str, group: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.groups.contains(group))
            && self.may(user, Duty::Approve)
    }

    fn duties_of_roles<'a>(&self, roles: impl Iterator<Item = &'a str>) -> BTreeSet<Duty> {
        roles
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.duties.iter().copied())
            .collect()
    }

    /// `USER_CREATED`.
    pub fn add_user(&mut self, new: NewUser) -> Result<(), FieldError> {
        validate_token("id", &new.id)?;
        if self.users.contains_key(&new.id) {
            return Err(err("id", format!("user {:?} already exists", new.id)));
        }
        let name = new.name.trim();
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(err(
                "name",
                "must be 1 to 200 characters without control characters",
            ));
        }
        validate_email(&new.email)?;
        if self
            .users
            .values()
            .any(|u| u.email.eq_ignore_ascii_case(&new.email))
        {
            return Err(err("email", format!("{} is already used", new.email)));
        }
        if let Some(slack) = &new.slack_user_id {
            let ok = slack.len() >= 2
                && slack.len() <= 32
                && matches!(slack.as_bytes()[0], b'U' | b'W')
                && slack
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            if !ok {
                return Err(err(
                    "slackUserId",
                    format!("{slack:?} is not a Slack user id like \"U024BE7LH\""),
                ));
            }
            if self
                .users
                .values()
                .any(|u| u.slack_user_id.as_deref() == Some(slack))
            {
                return Err(err("slackUserId", format!("{slack} is already used")));
            }
        }
        self.users.insert(
            new.id.clone(),
            User {
                id: new.id,
                name: name.to_string(),
                email: new.email,
                slack_user_id: new.slack_user_id,
                roles: BTreeSet::new(),
                groups: BTreeSet::new(),
                mfa_enrolled: new.mfa_enrolled,
                active: true,
            },
        );
        Ok(())
    }

    fn user_mut(&mut self, id: &str) -> Result<&mut User, FieldError> {
        self.users
            .get_mut(id)
            .ok_or_else(|| err("user", format!("no user {id:?}")))
    }

    /// `USER_DEACTIVATED`. Final: ids are never reused.
    pub fn deactivate(&mut self, id: &str) -> Result<(), FieldError> {
        let user = self.user_mut(id)?;
        if !user.active {
            return Err(err("user", format!("{id} is already deactivated")));
        }
        user.active = false;
        Ok(())
    }

    /// `MFA_CONFIGURED`.
    pub fn set_mfa_enrolled(&mut self, id: &str, enrolled: bool) -> Result<(), FieldError> {
        self.user_mut(id)?.mfa_enrolled = enrolled;
        Ok(())
    }

    /// Creates a group that policies can name.
    pub fn create_group(&mut self, name: &str, description: &str) -> Result<(), FieldError> {
        validate_token("group", name)?;
        if self.groups.contains_key(name) {
            return Err(err("group", format!("group {name:?} already exists")));
        }
        self.groups.insert(
            name.to_string(),
            Group {
                name: name.to_string(),
                description: description.to_string(),
            },
        );
        Ok(())
    }

    /// `PERMISSION_CHANGED`: puts an active user into a group.
    pub fn add_to_group(&mut self, user: &str, group: &str) -> Result<(), FieldError> {
        if !self.groups.contains_key(group) {
            return Err(err("group", format!("no group {group:?}")));
        }
        let u = self.user_mut(user)?;
        if !u.active {
            return Err(err("user", format!("{user} is deactivated")));
        }
        if !u.groups.insert(group.to_string()) {
            return Err(err("group", format!("{user} is already in {group}")));
        }
        Ok(())
    }

    /// `PERMISSION_CHANGED`: takes a user out of a group.
    pub fn remove_from_group(&mut self, user: &str, group: &str) -> Result<(), FieldError> {
        let u = self.user_mut(user)?;
        if !u.groups.remove(group) {
            return Err(err("group", format!("{user} is not in {group:?}")));
        }
        Ok(())
    }

    /// `ROLE_CREATED`: a custom role bundling duties that do not conflict.
    pub fn create_role(&mut self, name: &str, duties: &[Duty]) -> Result<(), FieldError> {
        validate_token("role", name)?;
        if self.roles.contains_key(name) {
            return Err(err("role", format!("role {name:?} already exists")));
        }
        if duties.is_empty() {
            return Err(err("duties", "a role needs at least one duty"));
        }
        for (i, a) in duties.iter().enumerate() {
            if let Some(b) = duties[i + 1..].iter().find(|b| a.conflicts_with(**b)) {
                return Err(err(
                    "duties",
                    format!(
                        "{} and {} must not be held together (separation of duties)",
                        a.as_str(),
                        b.as_str()
                    ),
                ));
            }
        }
        self.roles.insert(
            name.to_string(),
            Role {
                name: name.to_string(),
                duties: duties.iter().copied().collect(),
                built_in: false,
            },
        );
        Ok(())
    }

    /// Adds a recorded user with their roles and groups (groups are created
    /// on first use).
    pub fn add_record(&mut self, r: &custos_schemas::UserRecord) -> Result<(), FieldError> {
        self.add_user(NewUser {
            id: r.id.clone(),
            name: r.name.clone(),
            email: r.email.clone(),
            slack_user_id: r.slack_user_id.clone(),
            mfa_enrolled: r.mfa_enrolled,
        })?;
        for role in &r.roles {
            self.assign_role(&r.id, role)?;
        }
        for group in &r.groups {
            if self.group(group).is_none() {
                self.create_group(group, "")?;
            }
            self.add_to_group(&r.id, group)?;
        }
        Ok(())
    }

    /// Folds one directory event (`USER_CREATED`, `USER_DEACTIVATED`, and the
    /// user and role changes an approved change workflow applies: `ROLE_CREATED`,
    /// `ROLE_ASSIGNED`, `PERMISSION_CHANGED` as well); other events leave the
    /// directory as it is. An applied change that no longer applies (say, two
    /// approved requests adding the same id) changes nothing.
    pub fn apply(&mut self, event: &custos_schemas::Event) -> Result<(), FieldError> {
        use custos_schemas::{AggregateKind, EventType, Payload};
        match (event.event_type, &event.payload) {
            (_, Payload::ChangeApplied(change))
                if event.aggregate_kind == AggregateKind::Change =>
            {
                if let Some(next) = crate::change::directory_after(self, change)? {
                    *self = next;
                }
                Ok(())
            }
            (EventType::UserCreated, Payload::UserCreated(r)) => self.add_record(r),
            (EventType::UserDeactivated, _) => self.deactivate(&event.workflow_id),
            _ => Ok(()),
        }
    }

    /// `ROLE_ASSIGNED`, refused when it would break separation of duties.
    pub fn assign_role(&mut self, user: &str, role: &str) -> Result<(), FieldError> {
        let new_duties = match self.roles.get(role) {
            Some(r) => r.duties.clone(),
            None => return Err(err("role", format!("no role {role:?}"))),
        };
        let u = self
            .users
            .get(user)
            .ok_or_else(|| err("user", format!("no user {user:?}")))?;
        if !u.active {
            return Err(err("user", format!("{user} is deactivated")));
        }
        if u.roles.contains(role) {
            return Err(err("role", format!("{user} already holds {role}")));
        }
        for held_role in &u.roles {
            let Some(held) = self.roles.get(held_role) else {
                continue;
            };
            for a in &held.duties {
                if let Some(b) = new_duties.iter().find(|b| a.conflicts_with(**b)) {
                    return Err(err(
                        "role",
                        format!(
                            "{user} holds {held_role} ({}), which must not be combined with {role} ({}): separation of duties",
                            a.as_str(),
                            b.as_str()
                        ),
                    ));
                }
            }
        }
        self.user_mut(user)?.roles.insert(role.to_string());
        Ok(())
    }

    /// `PERMISSION_CHANGED`: revokes a role.
    pub fn revoke_role(&mut self, user: &str, role: &str) -> Result<(), FieldError> {
        let u = self.user_mut(user)?;
        if !u.roles.remove(role) {
            return Err(err("role", format!("{user} does not hold {role:?}")));
        }
        Ok(())
    }
}

fn validate_email(email: &str) -> Result<(), FieldError> {
    let ok = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        });
    if ok {
        Ok(())
    } else {
        Err(err("email", format!("{email:?} is not an email address")))
    }
}
