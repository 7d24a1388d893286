//! Whole ceremonies run in process, every message through the real envelope
//! ([`SignedMessage`] + [`Inbox`]) and every point-to-point payload sealed: used by
//! the tests and to measure the compute of a ceremony (the caller times it).

use std::collections::BTreeMap;

use frost_secp256k1_tr::Identifier;
use frost_secp256k1_tr::keys::dkg::round1;
use frost_secp256k1_tr::keys::{KeyPackage, PublicKeyPackage};
use rand_core::{CryptoRng, RngCore};

use crate::dkg::{self, Ceremony, DkgOutput, Echo};
use crate::identity::{GuardianKeys, Inbox, SignedMessage};
use crate::seal::Sealed;
use crate::sign::{self, Sighash, Signer};

/// A failed simulated ceremony, with the underlying reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SimError(pub String);

fn e(x: impl std::fmt::Display) -> SimError {
    SimError(x.to_string())
}

/// A wallet made by a simulated DKG: the roster, each guardian's identity keys and
/// its DKG output.
#[derive(Debug)]
pub struct Group {
    pub ceremony: Ceremony,
    pub keys: BTreeMap<Identifier, GuardianKeys>,
    pub outputs: BTreeMap<Identifier, DkgOutput>,
}

impl Group {
    pub fn public_key_package(&self) -> Option<&PublicKeyPackage> {
        self.outputs.values().next().map(|o| &o.public_key_package)
    }

    pub fn key_package(&self, index: u16) -> Option<&KeyPackage> {
        let id = Identifier::try_from(index).ok()?;
        self.outputs.get(&id).map(|o| &o.key_package)
    }
}

const ROUND_PACKAGE: u32 = 1;
const ROUND_ECHO: u32 = 2;
const ROUND_SEALED: u32 = 3;

/// Runs a `min_signers`-of-`n` DKG among guardians `g1..gn` (identifiers 1..n).
pub fn run_dkg(
    ceremony_id: &str,
    min_signers: u16,
    n: u16,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Group, SimError> {
    let mut keys = BTreeMap::new();
    for i in 1..=n {
        keys.insert(i, GuardianKeys::generate(&format!("g{i}"), rng));
    }
    let ceremony = Ceremony::new(
        ceremony_id,
        min_signers,
        keys.iter().map(|(i, k)| (*i, k.public())),
    )
    .map_err(e)?;
    let directory: Vec<_> = ceremony.members.values().cloned().collect();
    let keys: BTreeMap<Identifier, GuardianKeys> = keys
        .into_values()
        .map(|k| ceremony.identifier_of(k.id()).map(|id| (id, k)))
        .collect::<Option<_>>()
        .ok_or_else(|| SimError("roster lost a guardian".into()))?;
    let mut inboxes = BTreeMap::new();
    for (id, k) in &keys {
        inboxes.insert(*id, Inbox::new(ceremony_id, k.id(), &directory).map_err(e)?);
    }

    // Round 1: broadcast packages.
    let mut states = BTreeMap::new();
    let mut wire: Vec<(Identifier, SignedMessage)> = Vec::new();
    for (id, k) in &keys {
        let (state, pkg) = dkg::start(ceremony.clone(), k, rng).map_err(e)?;
        states.insert(*id, state);
        let bytes = pkg.serialize().map_err(e)?;
        wire.push((*id, k.sign_message(ceremony_id, None, ROUND_PACKAGE, bytes)));
    }
    let mut round2_states = BTreeMap::new();
    let mut echo_wire = Vec::new();
    let mut sealed_wire = Vec::new();
    for (me, state) in states {
        let inbox = inboxes
            .get_mut(&me)
            .ok_or_else(|| SimError("inbox".into()))?;
        let mut received = BTreeMap::new();
        for (from, msg) in wire.iter().filter(|(f, _)| *f != me) {
            let payload = inbox.accept(msg).map_err(e)?;
            received.insert(*from, round1::Package::deserialize(payload).map_err(e)?);
        }
        inbox.advance_to(ROUND_ECHO);
        let k = &keys[&me];
        let (next, echo, sealed) = state.round2(&received, k, rng).map_err(e)?;
        round2_states.insert(me, next);
        echo_wire.push((
            me,
            k.sign_message(ceremony_id, None, ROUND_ECHO, echo.to_bytes()),
        ));
        for (to, s) in sealed {
            let to_name = ceremony.name(&to);
            sealed_wire.push((
                me,
                to,
                k.sign_message(ceremony_id, Some(&to_name), ROUND_SEALED, s.to_bytes()),
            ));
        }
    }
    let mut outputs = BTreeMap::new();
    for (me, state) in round2_states {
        let inbox = inboxes
            .get_mut(&me)
            .ok_or_else(|| SimError("inbox".into()))?;
        let mut echoes = BTreeMap::new();
        for (from, msg) in echo_wire.iter().filter(|(f, _)| *f != me) {
            let payload = inbox.accept(msg).map_err(e)?;
            echoes.insert(
                *from,
                Echo::from_bytes(payload).ok_or_else(|| SimError("malformed echo".into()))?,
            );
        }
        inbox.advance_to(ROUND_SEALED);
        let mut sealed = BTreeMap::new();
        for (from, _, msg) in sealed_wire.iter().filter(|(_, to, _)| *to == me) {
            let payload = inbox.accept(msg).map_err(e)?;
            sealed.insert(
                *from,
                Sealed::from_bytes(payload).ok_or_else(|| SimError("malformed sealed".into()))?,
            );
        }
        outputs.insert(me, state.finalize(&echoes, &sealed, &keys[&me]).map_err(e)?);
    }
    Ok(Group {
        ceremony,
        keys,
        outputs,
    })
}

/// Signs `sighash` with the given key packages (one guardian each, each with its own
/// [`Signer`]) and aggregates; returns the signature as the coordinator gets it
/// (its 64 BIP-340 bytes: [`sign::Aggregated::signature`]).
pub fn run_signing(
    signers: &[&KeyPackage],
    public: &PublicKeyPackage,
    sighash: &Sighash,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<sign::Aggregated, SimError> {
    let tweaked: Vec<sign::TweakedKey> = signers.iter().map(|k| sign::TweakedKey::new(k)).collect();
    let prepared: Vec<(&KeyPackage, &sign::TweakedKey)> =
        signers.iter().copied().zip(&tweaked).collect();
    run_prepared_signing(&prepared, &sign::AggregationKey::new(public), sighash, rng)
}

/// [`run_signing`] with the keys as guardians and the coordinator keep them,
/// tweaked once: the computation of one signing.
pub fn run_prepared_signing(
    signers: &[(&KeyPackage, &sign::TweakedKey)],
    key: &sign::AggregationKey,
    sighash: &Sighash,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<sign::Aggregated, SimError> {
    let mut guardians: Vec<Signer<()>> = signers.iter().map(|_| Signer::new(1)).collect();
    let mut commitments = BTreeMap::new();
    for (g, (kp, _)) in guardians.iter_mut().zip(signers) {
        let nonces = sign::preprocess(kp, rng);
        commitments.insert(*kp.identifier(), *nonces.commitments());
        g.hand_out(nonces, (), 0).map_err(e)?;
    }
    let package = sign::signing_package(commitments, sighash);
    let mut shares = BTreeMap::new();
    for (g, (kp, tweaked)) in guardians.iter_mut().zip(signers) {
        let ((), nonces) = g.take(&package, kp.identifier()).map_err(e)?;
        shares.insert(
            *kp.identifier(),
            sign::round2(nonces, tweaked, &package, sighash).map_err(e)?,
        );
    }
    sign::aggregate(&package, &shares, key).map_err(e)
}
