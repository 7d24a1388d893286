//! The state a decision reads besides the policy and the directory, all passed in:
//! recent transfers for velocity limits, the address book of whitelists, and
//! freezes. Each is a plain value the caller folds from recorded events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::ActionKind;
use super::fiat::Currency;

/// Who a velocity limit counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Transfers out of the same wallet.
    Wallet,
    /// Transfers started by the same initiator.
    Initiator,
}

impl Scope {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Wallet => "wallet",
            Scope::Initiator => "initiator",
        }
    }
}

/// Count and fiat total of transfers inside a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowTotals {
    pub count: u64,
    /// Micro-units of the state's currency.
    pub amount_micros: u128,
}

/// Recent transfers (time, wallet, initiator, fiat value), indexed per wallet and
/// per initiator, each kept in time order. Windows are `(now - window, now]`;
/// transfers dated after `now` are counted too (never understate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VelocityState {
    currency: Currency,
    by_wallet: BTreeMap<String, VecDeque<(i64, u128)>>,
    by_initiator: BTreeMap<String, VecDeque<(i64, u128)>>,
}

fn insert_sorted(entries: &mut VecDeque<(i64, u128)>, at: i64, micros: u128) {
    // Transfers almost always arrive in time order: search from the back.
    let pos = entries
        .iter()
        .rposition(|(t, _)| *t <= at)
        .map_or(0, |p| p + 1);
    entries.insert(pos, (at, micros));
}

impl VelocityState {
    /// Empty state counting fiat values in `currency` (the policy's).
    pub fn new(currency: Currency) -> Self {
        VelocityState {
            currency,
            by_wallet: BTreeMap::new(),
            by_initiator: BTreeMap::new(),
        }
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// Records a transfer that went ahead, valued at `fiat_micros` (micro-units of
    /// [`VelocityState::currency`]).
    pub fn record(&mut self, at: i64, wallet: &str, initiator: &str, fiat_micros: u128) {
        insert_sorted(
            self.by_wallet.entry(wallet.to_string()).or_default(),
            at,
            fiat_micros,
        );
        insert_sorted(
            self.by_initiator.entry(initiator.to_string()).or_default(),
            at,
            fiat_micros,
        );
    }

    /// Forgets transfers at or before `now - horizon_ms` (use the policy's longest
    /// window, [`super::Policy::longest_window_ms`]).
    pub fn prune(&mut self, now: i64, horizon_ms: u64) {
        let cutoff = now.saturating_sub(i64::try_from(horizon_ms).unwrap_or(i64::MAX));
        for map in [&mut self.by_wallet, &mut self.by_initiator] {
            map.retain(|_, entries| {
                while entries.front().is_some_and(|(t, _)| *t <= cutoff) {
                    entries.pop_front();
                }
                !entries.is_empty()
            });
        }
    }

    /// Transfers of `key` (a wallet or an initiator) in `(now - window_ms, now]`
    /// and later.
    pub fn window(&self, scope: Scope, key: &str, now: i64, window_ms: u64) -> WindowTotals {
        let map = match scope {
            Scope::Wallet => &self.by_wallet,
            Scope::Initiator => &self.by_initiator,
        };
        let cutoff = now.saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
        let mut totals = WindowTotals::default();
        if let Some(entries) = map.get(key) {
            for (t, micros) in entries.iter().rev() {
                if *t <= cutoff {
                    break;
                }
                totals.count += 1;
                totals.amount_micros = totals.amount_micros.saturating_add(*micros);
            }
        }
        totals
    }

    /// Number of transfers held.
    pub fn len(&self) -> usize {
        self.by_wallet.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_wallet.is_empty()
    }
}

/// Named whitelists of destinations. Entries are per chain; addresses compare
/// case-insensitively (segwit and EVM addresses are).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressBook {
    lists: BTreeMap<String, BTreeSet<(String, String)>>,
}

impl AddressBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `address` on `chain` to the whitelist `list`.
    pub fn add(&mut self, list: &str, chain: &str, address: &str) {
        self.lists
            .entry(list.to_string())
            .or_default()
            .insert((chain.to_string(), address.to_ascii_lowercase()));
    }

    pub fn remove(&mut self, list: &str, chain: &str, address: &str) -> bool {
        self.lists
            .get_mut(list)
            .is_some_and(|l| l.remove(&(chain.to_string(), address.to_ascii_lowercase())))
    }

    /// Whether `address` on `chain` is on `list` (an unknown list is empty).
    pub fn contains(&self, list: &str, chain: &str, address: &str) -> bool {
        self.lists.get(list).is_some_and(|l| {
            let key = (chain.to_string(), address.to_ascii_lowercase());
            l.contains(&key)
        })
    }
}

/// Emergency freezes. A freeze blocks every transfer and every signing ceremony
/// (transfers, key rotation, threshold changes, guardian changes) of the frozen
/// wallet, or of every wallet; administration (policies, users, whitelists)
/// stays possible so the cause can be fixed. Lifting one is the caller's
/// workflow (it needs a quorum).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FreezeState {
    /// Why everything is frozen, when it is.
    pub everything: Option<String>,
    /// Frozen wallets and why.
    pub wallets: BTreeMap<String, String>,
}

impl FreezeState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn freeze_everything(&mut self, reason: &str) {
        self.everything = Some(reason.to_string());
    }

    pub fn freeze_wallet(&mut self, wallet: &str, reason: &str) {
        self.wallets.insert(wallet.to_string(), reason.to_string());
    }

    pub fn unfreeze_everything(&mut self) {
        self.everything = None;
    }

    pub fn unfreeze_wallet(&mut self, wallet: &str) -> bool {
        self.wallets.remove(wallet).is_some()
    }

    /// Whether signing with `wallet`'s key is frozen, and why. Guardians check
    /// this before every ceremony.
    pub fn may_sign(&self, wallet: &str) -> Result<(), String> {
        if let Some(reason) = &self.everything {
            return Err(format!("everything is frozen: {reason}"));
        }
        match self.wallets.get(wallet) {
            Some(reason) => Err(format!("wallet {wallet} is frozen: {reason}")),
            None => Ok(()),
        }
    }

    /// Why `action` on `wallet` is frozen, if it is.
    pub fn blocks(&self, action: ActionKind, wallet: Option<&str>) -> Option<String> {
        if !action.signs() {
            return None;
        }
        if let Some(reason) = &self.everything {
            return Some(format!("everything is frozen: {reason}"));
        }
        match wallet {
            Some(w) => self.may_sign(w).err(),
            // A signing action that names no wallet cannot be shown unfrozen.
            None if !self.wallets.is_empty() => {
                Some("wallets are frozen and the request names no wallet".into())
            }
            None => None,
        }
    }
}
