//! The policy engine: whether an action is blocked, allowed, or needs business
//! approvals and from whom, decided before any signing ceremony begins.
//!
//! Pure and deterministic: the policy, the directory, prices, velocity state,
//! the address book, freezes and the time all arrive as arguments, so guardians
//! re-run [`evaluate`] on the recorded inputs and check the decision.
//!
//! - [`Policy::parse`] reads a TOML policy file (see `default.toml` for the
//!   format) and validates it; [`Policy::version`] is the hash every decision records.
//! - [`Directory`] holds users, groups and roles with separation of duties.
//! - [`evaluate`] applies every rule for the action: any block wins; the
//!   required approvals are the union of what every triggered rule demands;
//!   anything no rule matched is denied; a freeze blocks every transfer and
//!   signing; a missing or stale price fails closed.
//! - [`approvals_satisfied`] tells whether the approvals given so far meet a
//!   decision: distinct, active, eligible approvers, never the initiator unless
//!   the rule allows it, AND/OR per rule, within the expiry; a requirement's
//!   escalation group counts from its decision's time plus the escalation delay
//!   ([`escalations_due`] tells the approval worker whom to ask and when).
//! - [`judge_vote`] judges one vote; a requirement with `mfa = "webauthn"`
//!   refuses votes of its approvers not confirmed with a passkey.
//!
//! The approval count is independent of the wallet's cryptographic threshold: a
//! FROST 2-of-3 wallet under "4 approvals from treasury-managers" needs 4
//! distinct approvals before the ceremony starts.

mod approvals;
pub mod bench;
pub mod directory;
mod evaluate;
pub mod fiat;
mod model;
mod parse;
pub mod state;

pub use approvals::{
    Approval, ApprovalStatus, AwaitsApprovals, DueEscalation, PASSKEY_REQUIRED, VoteVerdict,
    approvals_of, approvals_satisfied, awaiting, escalates_at, escalations_due, judge_vote,
    may_approve, passkey_required,
};
pub use directory::{Directory, Duty, NewUser, Role, User};
pub use evaluate::{Inputs, evaluate};
pub use fiat::{Currency, PriceSnapshot};
pub use model::{
    AmountRange, ApprovalSpec, Conditions, Destination, Policy, Rule, RuleOutcome, TimeWindow,
    Velocity, Weekday,
};
pub use parse::FORMAT_VERSION;
pub use state::{AddressBook, FreezeState, Scope, VelocityState, WindowTotals};

use custos_schemas::{Decimal, FieldError, TransferRequest, WalletDescriptor};

/// The policy every fresh installation runs (`custos up` with no configuration).
pub const DEFAULT_POLICY_TOML: &str = include_str!("default.toml");

/// The embedded default policy, parsed.
pub fn default_policy() -> Result<Policy, Vec<PolicyError>> {
    Policy::parse(DEFAULT_POLICY_TOML)
}

macro_rules! actions {
    ($($(#[$m:meta])* $variant:ident = $name:literal, $duty:ident, $signs:literal;)*) => {
        /// What a request asks to do.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        pub enum ActionKind {
            $($(#[$m])* #[serde(rename = $name)] $variant,)*
        }

        impl ActionKind {
            pub const ALL: [ActionKind; [$($name),*].len()] = [$(ActionKind::$variant,)*];

            /// The name policy files and decisions use.
            pub const fn as_str(self) -> &'static str {
                match self { $(ActionKind::$variant => $name,)* }
            }

            pub fn parse(s: &str) -> Option<ActionKind> {
                match s { $($name => Some(ActionKind::$variant),)* _ => None }
            }

            /// The duty an initiator needs to start it.
            pub const fn initiator_duty(self) -> Duty {
                match self { $(ActionKind::$variant => Duty::$duty,)* }
            }

            /// Whether its request moves funds: it names wallet, chain, asset,
            /// amount and destination (a transfer; a fee bump, whose amount is
            /// the fee it adds).
            pub const fn moves_funds(self) -> bool {
                matches!(self, ActionKind::Transfer | ActionKind::FeeBump)
            }

            /// Whether it runs a signing ceremony with a wallet's key (frozen by a freeze).
            pub const fn signs(self) -> bool {
                match self { $(ActionKind::$variant => $signs,)* }
            }

            pub(crate) const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

actions! {
    Transfer = "transfer", Initiate, true;
    WalletCreate = "wallet-create", Initiate, false;
    WalletImport = "wallet-import", Initiate, false;
    GuardianAdd = "guardian-add", Administer, true;
    GuardianRemove = "guardian-remove", Administer, true;
    KeyRotation = "key-rotation", Administer, true;
    ThresholdChange = "threshold-change", Administer, true;
    PolicyChange = "policy-change", Administer, false;
    WhitelistChange = "whitelist-change", Initiate, false;
    UserAdmin = "user-admin", Administer, false;
    RoleAdmin = "role-admin", Administer, false;
    /// Replacing a stuck transaction by one paying a higher fee; its amount is
    /// the fee the replacement adds.
    FeeBump = "fee-bump", Initiate, true;
}

/// A request for a decision. Transfers carry wallet, chain, asset, amount and
/// destination; other actions carry what applies (a wallet for key operations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub action: ActionKind,
    /// Directory id of the initiator.
    pub initiator: String,
    /// Whether the initiator confirmed MFA when initiating.
    pub mfa_verified: bool,
    pub wallet: Option<String>,
    pub chain: Option<String>,
    pub asset: Option<String>,
    pub amount: Option<Decimal>,
    pub destination: Option<String>,
}

impl Request {
    /// An action other than a transfer.
    pub fn action(action: ActionKind, initiator: &str, mfa_verified: bool) -> Request {
        Request {
            action,
            initiator: initiator.to_string(),
            mfa_verified,
            wallet: None,
            chain: None,
            asset: None,
            amount: None,
            destination: None,
        }
    }

    /// The policy request of an admitted transfer request on `wallet`.
    pub fn transfer(
        request: &TransferRequest,
        wallet: &WalletDescriptor,
        mfa_verified: bool,
    ) -> Result<Request, FieldError> {
        let amount = request.validate_shape()?;
        if wallet.name != request.wallet {
            return Err(FieldError::new(
                "wallet",
                format!(
                    "request names {}, descriptor is {}",
                    request.wallet, wallet.name
                ),
            ));
        }
        Ok(Request {
            action: ActionKind::Transfer,
            initiator: request.initiator.clone(),
            mfa_verified,
            wallet: Some(wallet.name.clone()),
            chain: Some(wallet.chain.clone()),
            asset: Some(request.asset.clone()),
            amount: Some(amount),
            destination: Some(request.destination.clone()),
        })
    }
}

/// A problem in a policy file: where (line and column, 1-based, when known),
/// which field (a path such as `rule[2].approvals.groups[0].group`), and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", line.map(|l| match column { Some(c) => format!("line {l}, column {c}: "), None => format!("line {l}: ") }).unwrap_or_default(), field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct PolicyError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn semantic(line: Option<usize>, field: String, message: String) -> Self {
        PolicyError {
            line,
            column: None,
            field: Some(field),
            message,
        }
    }
}

/// Every error of a failed parse, one per line.
pub fn render_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
