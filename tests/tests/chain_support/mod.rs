//! Shared by the Bitcoin-family tests: a FROST 2-of-3 wallet, its spendable
//! coins on the node, and signing as guardians do.

use std::collections::BTreeMap;

use custos_adapters::bitcoind::Bitcoind;
use custos_custody::address::{self, TaprootWallet};
use custos_custody::frost::keys::{KeyPackage, PublicKeyPackage};
use custos_custody::sign::{self, Signer};
use custos_custody::sim::{self, Group};
use custos_custody::spend::{
    CheckedSpend, Expectation, FeePolicy, SpendError, SpendRequest, build_spend, check_spend,
};
use custos_schemas::chain::{SignedTransaction, SpentOutput, UnsignedTransaction};

pub const CHAIN: &str = "ltc-regtest";

pub struct Wallet {
    pub group: Group,
    pub taproot: TaprootWallet,
}

impl Wallet {
    pub fn new(id: &str) -> Wallet {
        let group = sim::run_dkg(id, 2, 3, &mut rand::thread_rng()).expect("DKG");
        let vk = *group.public_key_package().expect("keys").verifying_key();
        let taproot = address::wallet(&vk, CHAIN).expect("address");
        assert!(taproot.address.starts_with("rltc1p"), "{}", taproot.address);
        Wallet { group, taproot }
    }

    pub fn public(&self) -> &PublicKeyPackage {
        self.group.public_key_package().expect("keys")
    }

    pub fn key(&self, i: u16) -> &KeyPackage {
        self.group.key_package(i).expect("guardian")
    }

    pub fn script(&self) -> &[u8] {
        &self.taproot.script_pubkey
    }
}

/// The wallet's spendable coins: confirmed, and not spent by a mempool
/// transaction.
pub async fn utxos(rpc: &Bitcoind, w: &Wallet) -> Vec<SpentOutput> {
    let mut out = Vec::new();
    for u in rpc
        .scan_addresses(&[&w.taproot.address])
        .await
        .expect("scan")
    {
        if rpc
            .get_tx_out(&u.txid, u.vout, true)
            .await
            .expect("gettxout")
            .is_some()
        {
            out.push(SpentOutput {
                txid: u.txid,
                vout: u.vout,
                value: u.value,
                script_pubkey: u.script_pubkey,
            });
        }
    }
    out
}

pub async fn build(
    rpc: &Bitcoind,
    w: &Wallet,
    destination: &[u8],
    amount: u64,
) -> Result<UnsignedTransaction, SpendError> {
    let coins = utxos(rpc, w).await;
    build_spend(&SpendRequest {
        chain: CHAIN,
        wallet_script: w.script(),
        utxos: &coins,
        destination,
        amount,
        fee_rate: rpc.estimate_smart_fee(2).await.expect("estimatesmartfee"),
        fees: FeePolicy::for_chain(CHAIN).expect("fees"),
    })
}

/// Guardians 1 and 3 each check the recorded transaction against the approval
/// and sign the sighashes they recompute; the coordinator aggregates.
pub fn sign_as_guardians(
    w: &Wallet,
    unsigned: &UnsignedTransaction,
    destination: &[u8],
    amount: u64,
) -> (CheckedSpend, SignedTransaction) {
    let expectation = Expectation {
        chain: CHAIN,
        wallet_script: w.script(),
        destination,
        amount,
        fees: FeePolicy::for_chain(CHAIN).expect("fees"),
    };
    let quorum = [1u16, 3];
    let checked: Vec<CheckedSpend> = quorum
        .iter()
        .map(|_| check_spend(unsigned, &expectation).expect("guardian check"))
        .collect();
    let mut signers: Vec<Signer<()>> = quorum.iter().map(|_| Signer::new(1)).collect();
    let mut rng = rand::thread_rng();
    let mut signatures = Vec::new();
    for input in 0..checked[0].tx.inputs.len() {
        let mut commitments = BTreeMap::new();
        for (s, i) in signers.iter_mut().zip(quorum) {
            let kp = w.key(i);
            let nonces = sign::preprocess(kp, &mut rng);
            commitments.insert(*kp.identifier(), *nonces.commitments());
            s.hand_out(nonces, (), 0).expect("handed out");
        }
        let coordinator_view = checked[0].sighash(input).expect("sighash");
        let package = sign::signing_package(commitments, &coordinator_view);
        let mut shares = BTreeMap::new();
        for ((s, i), c) in signers.iter_mut().zip(quorum).zip(&checked) {
            let kp = w.key(i);
            let mine = c.sighash(input).expect("own sighash");
            let ((), nonces) = s.take(&package, kp.identifier()).expect("outstanding");
            shares.insert(
                *kp.identifier(),
                sign::round2(nonces, &sign::TweakedKey::new(kp), &package, &mine).expect("share"),
            );
        }
        signatures.push(
            sign::aggregate(&package, &shares, &sign::AggregationKey::new(w.public()))
                .expect("aggregate"),
        );
    }
    let signed = checked[0]
        .finalize(CHAIN, &signatures, vec!["g1".into(), "g3".into()])
        .expect("finalize");
    (checked[0].clone(), signed)
}
