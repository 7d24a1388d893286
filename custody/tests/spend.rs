//! Spends: address decoding, the deterministic builder, every refusal of the
//! guardians' check, and a signed spend accepted by libbitcoinconsensus.

mod support;

use custos_custody::address;
use custos_custody::spend::{
    self, CheckedSpend, Expectation, FeePolicy, SpendError, SpendRequest, build_spend, check_spend,
    script_pubkey_for_address,
};
use custos_custody::taproot::{Transaction, TxOut};
use custos_custody::{sign, sim};
use custos_schemas::chain::{SpentOutput, UnsignedTransaction};
use proptest::prelude::*;
use support::{dkg, kp, rng};

const WALLET: [u8; 34] = {
    let mut s = [0x51; 34];
    s[1] = 0x20;
    s
};

fn dest() -> Vec<u8> {
    address::p2tr_script_pubkey(&[0x42; 32]).to_vec()
}

fn fees() -> FeePolicy {
    FeePolicy::for_chain("ltc-regtest").expect("known chain")
}

fn utxo(tag: u8, vout: u32, value: u64) -> SpentOutput {
    SpentOutput {
        txid: hex::encode([tag; 32]),
        vout,
        value,
        script_pubkey: hex::encode(WALLET),
    }
}

fn request<'a>(utxos: &'a [SpentOutput], destination: &'a [u8], amount: u64) -> SpendRequest<'a> {
    SpendRequest {
        chain: "ltc-regtest",
        wallet_script: &WALLET,
        utxos,
        destination,
        amount,
        fee_rate: Some(10),
        fees: fees(),
    }
}

fn expectation(destination: &[u8], amount: u64) -> Expectation<'_> {
    Expectation {
        chain: "ltc-regtest",
        wallet_script: &WALLET,
        destination,
        amount,
        fees: fees(),
    }
}

fn parts(u: &UnsignedTransaction) -> (Transaction, Vec<SpentOutput>, u64, Option<u32>) {
    let UnsignedTransaction::Bitcoin {
        unsigned_tx,
        spent,
        fee,
        change_vout,
        ..
    } = u
    else {
        panic!("a Bitcoin transaction")
    };
    (
        Transaction::parse(&hex::decode(unsigned_tx).expect("hex")).expect("parses"),
        spent.clone(),
        *fee,
        *change_vout,
    )
}

fn with(
    u: &UnsignedTransaction,
    edit: impl FnOnce(&mut Transaction, &mut Vec<SpentOutput>, &mut u64, &mut Option<u32>),
) -> UnsignedTransaction {
    let (mut tx, mut spent, mut fee, mut change) = parts(u);
    edit(&mut tx, &mut spent, &mut fee, &mut change);
    UnsignedTransaction::Bitcoin {
        chain: "ltc-regtest".into(),
        unsigned_tx: hex::encode(tx.serialize()),
        spent,
        fee,
        fee_rate: 10,
        change_vout: change,
    }
}

fn refusal(u: &UnsignedTransaction, e: &Expectation<'_>) -> String {
    match check_spend(u, e) {
        Err(err) => err.to_string(),
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

#[test]
fn addresses_map_to_scripts_per_network() {
    // BIP-173 / BIP-350 vectors.
    assert_eq!(
        hex::encode(
            script_pubkey_for_address("btc-mainnet", "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4")
                .unwrap()
        ),
        "0014751e76e8199196d454941c45d1b3a323f1433bd6"
    );
    assert_eq!(
        hex::encode(
            script_pubkey_for_address(
                "btc-testnet",
                "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7"
            )
            .unwrap()
        ),
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262"
    );
    assert_eq!(
        hex::encode(
            script_pubkey_for_address(
                "bc",
                "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"
            )
            .unwrap()
        ),
        "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    );
    // The wallet's own rltc1p address comes back as its script.
    let output = [9u8; 32];
    let a = address::p2tr_address("rltc", &output).unwrap();
    assert_eq!(
        script_pubkey_for_address("ltc-regtest", &a).unwrap(),
        address::p2tr_script_pubkey(&output).to_vec()
    );
    let err = |chain: &str, a: &str| script_pubkey_for_address(chain, a).unwrap_err().to_string();
    assert!(err("ltc-mainnet", &a).contains("network \"rltc\""));
    assert!(
        err("btc-mainnet", "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5")
            .contains("not a segwit address")
    );
    // v1 with a bech32 (not bech32m) checksum.
    assert!(
        err(
            "btc-mainnet",
            "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7k7grplx"
        )
        .contains("not a segwit address")
    );
    // Witness version 16: valid, but nobody's rules secure it yet.
    assert!(err("btc-mainnet", "BC1SW50QGDZ25J").contains("witness version 16"));
    assert!(err("btc-mainnet", "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2").contains("not a segwit"));
    assert!(matches!(
        script_pubkey_for_address("evm-1", &a),
        Err(SpendError::Chain(_))
    ));
}

#[test]
fn builder_is_deterministic_and_pays_change_back() {
    let utxos = vec![utxo(1, 0, 40_000), utxo(2, 1, 100_000), utxo(3, 0, 70_000)];
    let d = dest();
    let u = build_spend(&request(&utxos, &d, 120_000)).unwrap();
    let mut shuffled = utxos.clone();
    shuffled.reverse();
    assert_eq!(build_spend(&request(&shuffled, &d, 120_000)).unwrap(), u);
    let (tx, spent, fee, change) = parts(&u);
    // Largest first: 100k then 70k.
    assert_eq!(spent, vec![utxos[1].clone(), utxos[2].clone()]);
    assert_eq!(tx.version, 2);
    assert_eq!(tx.lock_time, 0);
    assert!(tx.inputs.iter().all(|i| i.sequence == spend::RBF_SEQUENCE));
    assert_eq!(tx.outputs[0].script_pubkey, d);
    assert_eq!(tx.outputs[0].value, 120_000);
    assert_eq!(change, Some(1));
    assert_eq!(tx.outputs[1].script_pubkey, WALLET);
    assert_eq!(fee, 10 * tx.keypath_vsize());
    assert_eq!(170_000 - 120_000 - fee, tx.outputs[1].value);
    let checked = check_spend(&u, &expectation(&d, 120_000)).unwrap();
    assert_eq!(checked.fee, fee);
    assert_eq!(checked.txid, tx.txid());
}

#[test]
fn dust_change_goes_to_the_fee_and_rates_are_clamped() {
    let d = dest();
    let utxos = vec![utxo(1, 0, 100_000)];
    // One input, one P2TR output: 111 vB at 10 sat/vB; the 2,890 sat left is
    // below Litecoin's P2TR dust threshold (3,300).
    let one_out = 100_000 - 1_110 - 2_890;
    let u = build_spend(&request(&utxos, &d, one_out)).unwrap();
    let (tx, _, fee, change) = parts(&u);
    assert_eq!(tx.keypath_vsize(), 111);
    assert_eq!((tx.outputs.len(), change, fee), (1, None, 4_000));
    check_spend(&u, &expectation(&d, one_out)).unwrap();

    let mut r = request(&utxos, &d, 50_000);
    r.fee_rate = Some(100_000);
    let UnsignedTransaction::Bitcoin { fee_rate, .. } = build_spend(&r).unwrap() else {
        panic!("a Bitcoin transaction")
    };
    assert_eq!(fee_rate, fees().max_rate);
    r.fee_rate = None;
    let UnsignedTransaction::Bitcoin { fee_rate, .. } = build_spend(&r).unwrap() else {
        panic!("a Bitcoin transaction")
    };
    assert_eq!(fee_rate, fees().min_rate);
}

#[test]
fn builder_refusals_name_the_reason() {
    let d = dest();
    let utxos = vec![utxo(1, 0, 40_000), utxo(2, 0, 10_000)];
    match build_spend(&request(&utxos, &d, 49_000)).unwrap_err() {
        SpendError::InsufficientFunds {
            needed,
            available,
            amount,
            fee,
        } => {
            assert_eq!(available, 50_000);
            assert_eq!(amount, 49_000);
            assert_eq!(needed, 49_000 + fee);
        }
        other => panic!("{other}"),
    }
    let err = |r: SpendRequest<'_>| build_spend(&r).unwrap_err().to_string();
    assert!(err(request(&utxos, &d, 1_000)).contains("below the dust threshold"));
    assert!(err(request(&utxos, &WALLET, 20_000)).contains("is the wallet itself"));
    let twice = vec![utxo(1, 0, 40_000), utxo(1, 0, 40_000)];
    assert!(err(request(&twice, &d, 20_000)).contains("listed twice"));
    let mut foreign = utxos.clone();
    foreign[1].script_pubkey = hex::encode(&d);
    assert!(err(request(&foreign, &d, 20_000)).contains("utxos[1].scriptPubKey"));
    let mut bad_txid = utxos.clone();
    bad_txid[0].txid = "zz".into();
    assert!(err(request(&bad_txid, &d, 20_000)).contains("utxos[0].txid"));
    let mut r = request(&utxos, &d, 20_000);
    r.wallet_script = &d[..33];
    assert!(err(r).contains("wallet script"));
}

/// Each tampering a coordinator could try, and the refusal it meets.
#[test]
fn check_refuses_every_deviation_from_the_approval() {
    let d = dest();
    let utxos = vec![utxo(1, 0, 100_000), utxo(2, 5, 70_000)];
    let u = build_spend(&request(&utxos, &d, 120_000)).unwrap();
    let e = expectation(&d, 120_000);
    check_spend(&u, &e).unwrap();
    let thief = address::p2tr_script_pubkey(&[0x66; 32]).to_vec();

    type Edit = Box<dyn Fn(&mut Transaction, &mut Vec<SpentOutput>, &mut u64, &mut Option<u32>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "the approved amount is 120000",
            Box::new(|tx, _, fee, _| {
                tx.outputs[0].value -= 1;
                *fee += 1;
            }),
        ),
        (
            "neither the destination nor the wallet",
            Box::new(move |tx, _, _, _| tx.outputs[1].script_pubkey = thief.clone()),
        ),
        (
            "0 outputs pay the destination",
            Box::new(|tx, _, _, c| {
                tx.outputs[0].script_pubkey = WALLET.to_vec();
                tx.outputs.remove(1);
                *c = Some(0);
            }),
        ),
        (
            "more than one change output",
            Box::new(|tx, _, _, _| {
                let half = tx.outputs[1].value / 2;
                tx.outputs[1].value -= half;
                tx.outputs.push(TxOut {
                    value: half,
                    script_pubkey: WALLET.to_vec(),
                });
            }),
        ),
        ("recorded change output", Box::new(|_, _, _, c| *c = None)),
        ("the recorded fee is", Box::new(|_, _, fee, _| *fee += 1)),
        (
            "outputs (",
            Box::new(|tx, _, _, _| tx.outputs[1].value += 1_000_000),
        ),
        (
            "2 spent outputs recorded for 1 inputs",
            Box::new(|tx, _, _, _| {
                tx.inputs.pop();
            }),
        ),
        (
            "the input spends another outpoint",
            Box::new(|_, spent, _, _| spent[1].vout = 6),
        ),
        (
            "the input spends another outpoint",
            Box::new(|_, spent, _, _| spent.swap(0, 1)),
        ),
        (
            "not the wallet's",
            Box::new(|_, spent, _, _| spent[0].script_pubkey = hex::encode(dest())),
        ),
        (
            "already spent by an earlier input",
            Box::new(|tx, spent, _, _| {
                tx.inputs[1] = tx.inputs[0].clone();
                spent[1] = spent[0].clone();
            }),
        ),
        ("only version 2", Box::new(|tx, _, _, _| tx.version = 1)),
        (
            "lock time 0",
            Box::new(|tx, _, _, _| tx.lock_time = 800_000),
        ),
        (
            "spent[0].txid",
            Box::new(|_, spent, _, _| spent[0].txid = "00".into()),
        ),
    ];
    for (expected, edit) in cases {
        let tampered = with(&u, |tx, s, f, c| edit(tx, s, f, c));
        let why = refusal(&tampered, &e);
        assert!(why.contains(expected), "expected {expected:?}, got {why:?}");
    }

    // Change burnt as fee: above the top rate (200 sat/vB here) though below
    // the absolute cap.
    let rich = [utxo(7, 0, 900_000)];
    let big = build_spend(&request(&rich, &d, 120_000)).unwrap();
    let burnt = with(&big, |tx, _, fee, _| {
        *fee += tx.outputs[1].value - 1;
        tx.outputs[1].value = 1;
    });
    let why = refusal(&burnt, &e);
    assert!(
        why.contains("exceeds the cap of") && why.contains("for 154 vB"),
        "{why}"
    );

    // A second payment to the destination, funded from the change.
    let small = build_spend(&request(&utxos, &d, 20_000)).unwrap();
    let twice = with(&small, |tx, _, _, _| {
        tx.outputs[1].value -= 20_000;
        let extra = tx.outputs[0].clone();
        tx.outputs.push(extra);
    });
    assert!(refusal(&twice, &expectation(&d, 20_000)).contains("2 outputs pay the destination"));

    // Lying about a spent amount: the recorded fee no longer adds up, and if
    // the liar adjusts it, BIP-341 commits to the amount (the signature will not
    // verify on chain), so the guardian's own sighash differs.
    let honest = check_spend(&u, &e).unwrap();
    let lied = with(&u, |_, spent, fee, _| {
        spent[0].value += 10;
        *fee += 10;
    });
    let lied = check_spend(&lied, &e).unwrap();
    assert_ne!(lied.sighash(0).unwrap(), honest.sighash(0).unwrap());

    // Another chain, another approval, a malformed transaction.
    let mut other_chain = e;
    other_chain.chain = "btc-regtest";
    assert!(refusal(&u, &other_chain).contains("the approval for btc-regtest"));
    assert!(refusal(&u, &expectation(&d, 120_001)).contains("approved amount is 120001"));
    let mut strict = e;
    strict.fees.max_fee = 100;
    assert!(refusal(&u, &strict).contains("exceeds the cap of 100 sat"));
    let UnsignedTransaction::Bitcoin {
        spent,
        fee,
        change_vout,
        ..
    } = &u
    else {
        panic!("a Bitcoin transaction")
    };
    let garbage = UnsignedTransaction::Bitcoin {
        chain: "ltc-regtest".into(),
        unsigned_tx: "0200".into(),
        spent: spent.clone(),
        fee: *fee,
        fee_rate: 10,
        change_vout: *change_vout,
    };
    assert!(refusal(&garbage, &e).contains("malformed transaction"));
}

fn consensus_verify(raw: &[u8], spent: &[TxOut]) -> Result<(), String> {
    let utxos: Vec<bitcoinconsensus::Utxo> = spent
        .iter()
        .map(|o| bitcoinconsensus::Utxo {
            script_pubkey: o.script_pubkey.as_ptr(),
            script_pubkey_len: o.script_pubkey.len() as u32,
            value: o.value as i64,
        })
        .collect();
    let flags = bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT;
    for (i, o) in spent.iter().enumerate() {
        bitcoinconsensus::verify_with_flags(&o.script_pubkey, o.value, raw, Some(&utxos), i, flags)
            .map_err(|e| format!("input {i}: {e:?}"))?;
    }
    Ok(())
}

#[test]
fn a_checked_spend_signed_by_a_quorum_passes_consensus() {
    let g = dkg(2, 3, 41);
    let pkp = g.public_key_package().unwrap();
    let w = address::wallet(pkp.verifying_key(), "ltc-regtest").unwrap();
    let mut utxos = vec![utxo(1, 0, 60_000), utxo(2, 1, 90_000)];
    for u in &mut utxos {
        u.script_pubkey = hex::encode(w.script_pubkey);
    }
    let d = dest();
    let mut r = request(&utxos, &d, 120_000);
    r.wallet_script = &w.script_pubkey;
    let u = build_spend(&r).unwrap();
    let mut e = expectation(&d, 120_000);
    e.wallet_script = &w.script_pubkey;
    let checked: CheckedSpend = check_spend(&u, &e).unwrap();
    let quorum = [kp(&g, 1), kp(&g, 3)];
    let sigs: Vec<sign::Aggregated> = checked
        .sighashes()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, h)| sim::run_signing(&quorum, pkp, h, &mut rng(i as u64)).unwrap())
        .collect();
    let signed = checked
        .finalize("ltc-regtest", &sigs, vec!["g1".into(), "g3".into()])
        .unwrap();
    assert_eq!(signed.txid, checked.txid);
    let raw = hex::decode(&signed.raw_tx).unwrap();
    consensus_verify(&raw, &checked.spent).unwrap();
    // The fee is exact for the signed size.
    assert_eq!(
        checked.vsize,
        (4 * checked.tx.serialize().len() as u64
            + (raw.len() - checked.tx.serialize().len()) as u64)
            .div_ceil(4)
    );
    // What finalize says about the first input, which must be refused.
    let refusal = |sigs: &[sign::Aggregated], why: &str| {
        let refused = checked
            .finalize("ltc-regtest", sigs, vec![])
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("signatures[0]") && refused.contains(why),
            "{refused}"
        );
    };
    // Signatures swapped between inputs are refused before broadcast.
    refusal(&[sigs[1].clone(), sigs[0].clone()], "sighash");
    assert!(checked.finalize("ltc-regtest", &sigs[..1], vec![]).is_err());
    // So is a valid signature of the right sighash under another wallet's key.
    let other = dkg(2, 3, 42);
    let other_quorum = [kp(&other, 1), kp(&other, 2)];
    let sighashes = checked.sighashes().unwrap();
    let foreign = sim::run_signing(
        &other_quorum,
        other.public_key_package().unwrap(),
        &sighashes[0],
        &mut rng(7),
    )
    .unwrap();
    refusal(&[foreign, sigs[1].clone()], "another key");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the coins, a built spend passes the guardians' check, pays
    /// exactly the amount, and pays at least the chosen rate.
    #[test]
    fn built_spends_pass_the_check(
        values in proptest::collection::vec(1_000u64..5_000_000, 1..12),
        amount in 3_300u64..10_000_000,
        rate in 1u64..400,
    ) {
        let utxos: Vec<SpentOutput> = values
            .iter()
            .enumerate()
            .map(|(i, v)| utxo(i as u8, i as u32, *v))
            .collect();
        let d = dest();
        let mut r = request(&utxos, &d, amount);
        r.fee_rate = Some(rate);
        match build_spend(&r) {
            Ok(u) => {
                let c = check_spend(&u, &expectation(&d, amount)).unwrap();
                prop_assert!(c.fee >= rate.min(fees().max_rate) * c.vsize);
                prop_assert_eq!(c.tx.outputs[0].value, amount);
            }
            Err(SpendError::InsufficientFunds { needed, available, .. }) => {
                prop_assert!(needed > available);
                prop_assert_eq!(available, values.iter().sum::<u64>());
            }
            Err(other) => prop_assert!(false, "{}", other),
        }
    }

    /// Any single changed byte of a recorded transaction is refused or changes
    /// what the guardian signs; it never panics.
    #[test]
    fn tampered_bytes_never_slip_through(i in 0usize..400, flip in 1u8..=255) {
        let utxos = vec![utxo(1, 0, 100_000), utxo(2, 5, 70_000)];
        let d = dest();
        let u = build_spend(&request(&utxos, &d, 120_000)).unwrap();
        let honest = check_spend(&u, &expectation(&d, 120_000)).unwrap();
        let UnsignedTransaction::Bitcoin { unsigned_tx, spent, fee, change_vout, .. } = &u else {
            panic!("a Bitcoin transaction")
        };
        let mut raw = hex::decode(unsigned_tx).unwrap();
        let i = i % raw.len();
        raw[i] ^= flip;
        let tampered = UnsignedTransaction::Bitcoin {
            chain: "ltc-regtest".into(),
            unsigned_tx: hex::encode(raw),
            spent: spent.clone(),
            fee: *fee,
            fee_rate: 10,
            change_vout: *change_vout,
        };
        if let Ok(c) = check_spend(&tampered, &expectation(&d, 120_000)) {
            // Only the sequences may change without a refusal; the sighash then
            // differs, so the honest signature cannot be reused.
            prop_assert_ne!(c.sighash(0).unwrap(), honest.sighash(0).unwrap());
        }
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Transaction::parse(&bytes);
    }
}
