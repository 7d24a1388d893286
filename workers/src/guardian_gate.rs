//! What a guardian checks, on its own replica of the trail, before it takes
//! part in a key ceremony: the change workflow the coordinator names is
//! approved (by the policy active now, with approvals that satisfy it, from an
//! active initiator) and asks for exactly this ceremony: the same wallet,
//! threshold and guardians, with the keys recorded for them; and the wallet is
//! not frozen. A coordinator can therefore never run a ceremony nobody
//! approved, nor a different one.
//! It also decides what a commit or an abort may do with a pending share.

use custos_engine::change::Stage;
use custos_schemas::WalletGuardian;
use custos_schemas::change::Change;

use crate::ceremony::{GuardianRequest, Joining, RosterEntry};
use crate::trail::TrailView;

/// Whether guardian `me` may take part in `request`, as the trail has it at
/// `now`. Only a ceremony's first message to a guardian names its change;
/// later rounds belong to a session that passed this check.
pub fn check_ceremony_request(
    view: &TrailView,
    request: &GuardianRequest,
    me: &str,
    now: i64,
) -> Result<(), String> {
    use GuardianRequest as R;
    let id = match request {
        R::DkgStart { change, .. }
        | R::RefreshStart { change, .. }
        | R::RepairStart { change, .. }
        | R::RepairFinish { change, .. }
        | R::ReshareStart { change, .. } => change,
        _ => return Ok(()),
    };
    let state = view
        .change(id)
        .ok_or_else(|| format!("change {id} is not in the trail"))?;
    let asked = state
        .request
        .as_ref()
        .ok_or_else(|| format!("change {id} has no request"))?;
    if state.stage != Stage::Approved {
        return Err(format!(
            "change {id} is {:?}, not approved and waiting for its ceremony",
            state.stage
        ));
    }
    view.cleared(state, &asked.initiator, now)
        .map_err(|e| format!("change {id}: {e}"))?;
    let other = || format!("the ceremony is not the one change {id} approved");
    if let (
        R::DkgStart {
            min_signers,
            roster,
            ..
        },
        Change::WalletCreate {
            name,
            threshold,
            guardians,
            ..
        },
    ) = (request, &asked.change)
    {
        let in_order = roster
            .iter()
            .enumerate()
            .all(|(i, e)| usize::from(e.index) == i + 1);
        let ids: Vec<&String> = roster.iter().map(|e| &e.guardian.id).collect();
        if min_signers != threshold
            || !in_order
            || ids != guardians.iter().collect::<Vec<_>>()
            || !guardians.iter().any(|g| g == me)
        {
            return Err(other());
        }
        if view.ledger.wallet(name).is_some() {
            return Err(format!("wallet {name} already exists"));
        }
        return Ok(());
    }
    let wallet_name = match request {
        R::RefreshStart { wallet, .. }
        | R::RepairStart { wallet, .. }
        | R::RepairFinish { wallet, .. }
        | R::ReshareStart { wallet, .. } => wallet,
        _ => return Err(other()),
    };
    if asked.change.wallet() != Some(wallet_name.as_str()) {
        return Err(other());
    }
    let wallet = view
        .ledger
        .wallet(wallet_name)
        .ok_or_else(|| format!("no wallet {wallet_name}"))?;
    // A freeze stops every use of the wallet's key, also a change approved
    // before it.
    view.admin.freeze.may_sign(wallet_name)?;
    let recorded = &wallet.guardians;
    let without = |gone: &str| -> Vec<WalletGuardian> {
        recorded.iter().filter(|g| g.id != gone).cloned().collect()
    };
    let fits = match (request, &asked.change) {
        (R::RefreshStart { roster, .. }, Change::KeyRotation { .. }) => {
            same_guardians(roster, recorded)
        }
        (R::RefreshStart { roster, .. }, Change::GuardianRemove { guardian, .. }) => {
            same_guardians(roster, &without(guardian))
        }
        (
            R::ReshareStart {
                min_signers,
                roster,
                ..
            },
            Change::ThresholdChange { threshold, .. },
        ) => min_signers == threshold && same_guardians(roster, recorded),
        (
            R::RepairStart { joining, .. } | R::RepairFinish { joining, .. },
            Change::GuardianAdd { guardian, .. },
        ) => {
            let finishing = matches!(request, R::RepairFinish { .. });
            joins(joining, guardian, recorded)
                && recorded.iter().all(|g| g.index != joining.newcomer)
                && (!finishing || guardian == me)
        }
        (
            R::RepairStart { joining, .. } | R::RepairFinish { joining, .. },
            Change::ShareRepair { guardian, .. },
        ) => {
            let finishing = matches!(request, R::RepairFinish { .. });
            let lost = recorded.iter().find(|g| g.id == *guardian);
            joins(joining, guardian, &without(guardian))
                && lost.is_some_and(|g| {
                    g.index == joining.newcomer
                        && joining.roster.last().is_some_and(|e| {
                            same_guardians(std::slice::from_ref(e), std::slice::from_ref(g))
                        })
                })
                && !joining.helpers.contains(&joining.newcomer)
                && (!finishing || guardian == me)
        }
        _ => false,
    };
    match fits {
        true => Ok(()),
        false => Err(other()),
    }
}

/// Whether `joining` gives `guardian` (last in its roster) a share from
/// `members`, the others as recorded.
fn joins(joining: &Joining, guardian: &str, members: &[WalletGuardian]) -> bool {
    let Some((newcomer, others)) = joining.roster.split_last() else {
        return false;
    };
    newcomer.guardian.id == guardian
        && newcomer.index == joining.newcomer
        && same_guardians(others, members)
        && joining
            .helpers
            .iter()
            .all(|h| members.iter().any(|m| m.index == *h))
}

/// Whether the roster names exactly the recorded guardians, each under its
/// recorded index and keys.
fn same_guardians(roster: &[RosterEntry], recorded: &[WalletGuardian]) -> bool {
    roster.len() == recorded.len()
        && roster.iter().all(|e| {
            recorded.iter().any(|g| {
                g.id == e.guardian.id
                    && g.index == e.index
                    && g.signing_key == hex::encode(e.guardian.signing_key)
                    && g.encryption_key == hex::encode(e.guardian.encryption_key)
            })
        })
}

/// What a commit of `ceremony_id` for `wallet` may do: only a ceremony the
/// trail records for that wallet becomes a share.
pub fn check_commit(view: &TrailView, ceremony_id: &str, wallet: &str) -> Result<(), String> {
    match view.ceremonies.get(ceremony_id) {
        Some(w) if w == wallet => Ok(()),
        Some(w) => Err(format!("ceremony {ceremony_id} is recorded for wallet {w}")),
        None => Err(format!(
            "the trail does not record ceremony {ceremony_id}: nothing to commit"
        )),
    }
}

/// What an abort of `ceremony_id` may do: a ceremony the trail records is
/// never dropped (its share is the wallet's).
pub fn check_abort(view: &TrailView, ceremony_id: &str) -> Result<(), String> {
    match view.ceremonies.get(ceremony_id) {
        Some(w) => Err(format!(
            "ceremony {ceremony_id} is recorded for wallet {w}: it is committed, not aborted"
        )),
        None => Ok(()),
    }
}
