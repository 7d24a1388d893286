//! Fee bumps: the replacement builders and the checks signers make on a
//! replacement (Bitcoin family: BIP-125 over exactly the same inputs; EVM: the
//! same nonce with both fees at least 10% higher), and every refusal of
//! something that is not a fee bump.

use custos_custody::address;
use custos_custody::evm::{self, GasPolicy, TRANSFER_GAS, Wei};
use custos_custody::spend::{
    self, Expectation, FeePolicy, SpendRequest, build_replacement, build_spend, check_replacement,
};
use custos_custody::taproot::Transaction;
use custos_schemas::chain::{SpentOutput, UnsignedTransaction};

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

fn utxo(tag: u8, value: u64) -> SpentOutput {
    SpentOutput {
        txid: hex::encode([tag; 32]),
        vout: 0,
        value,
        script_pubkey: hex::encode(WALLET),
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

/// A 1-input spend of 1,000,000 sat paying 400,000 at 2 sat/vB, with change.
fn original(destination: &[u8]) -> UnsignedTransaction {
    let utxos = [utxo(1, 1_000_000), utxo(2, 5_000)];
    build_spend(&SpendRequest {
        chain: "ltc-regtest",
        wallet_script: &WALLET,
        utxos: &utxos,
        destination,
        amount: 400_000,
        fee_rate: Some(2),
        fees: fees(),
    })
    .expect("builds")
}

fn fields(u: &UnsignedTransaction) -> (Transaction, Vec<SpentOutput>, u64, u64, Option<u32>) {
    let UnsignedTransaction::Bitcoin {
        unsigned_tx,
        spent,
        fee,
        fee_rate,
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
        *fee_rate,
        *change_vout,
    )
}

/// `u` with its transaction edited; the recorded fee follows the outputs.
fn edited(
    u: &UnsignedTransaction,
    edit: impl FnOnce(&mut Transaction, &mut Vec<SpentOutput>),
) -> UnsignedTransaction {
    let (mut tx, mut spent, _, rate, change) = fields(u);
    edit(&mut tx, &mut spent);
    let change = change.filter(|_| tx.outputs.len() > 1);
    let inputs: u64 = spent.iter().map(|s| s.value).sum();
    let outputs: u64 = tx.outputs.iter().map(|o| o.value).sum();
    UnsignedTransaction::Bitcoin {
        chain: "ltc-regtest".into(),
        unsigned_tx: hex::encode(tx.serialize()),
        spent,
        fee: inputs - outputs,
        fee_rate: rate,
        change_vout: change,
    }
}

fn refusal(
    replacement: &UnsignedTransaction,
    previous: &UnsignedTransaction,
    amount: u64,
) -> String {
    let d = dest();
    match check_replacement(replacement, previous, &expectation(&d, amount)) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("accepted: {c:?}"),
    }
}

#[test]
fn a_bitcoin_replacement_spends_the_same_inputs_for_a_higher_fee() {
    let d = dest();
    let old = original(&d);
    let (old_tx, old_spent, old_fee, old_rate, _) = fields(&old);
    let expect = expectation(&d, 400_000);
    let new = build_replacement(&old, 10, &expect).expect("bumped");
    let (new_tx, new_spent, new_fee, new_rate, change) = fields(&new);
    assert_eq!(new_rate, 10);
    assert_eq!(new_tx.inputs, old_tx.inputs, "exactly the same inputs");
    assert!(
        new_tx
            .inputs
            .iter()
            .all(|i| i.sequence == spend::RBF_SEQUENCE)
    );
    assert_eq!(new_spent, old_spent);
    assert_eq!(new_tx.outputs[0].value, 400_000);
    assert_eq!(new_tx.outputs[0].script_pubkey, d);
    assert_eq!(change, Some(1));
    assert_eq!(new_fee, 10 * new_tx.keypath_vsize());
    assert!(new_fee > old_fee);
    let checked = check_replacement(&new, &old, &expect).expect("a fee bump");
    assert_eq!(checked.fee, new_fee);
    assert_ne!(checked.txid, old_tx.txid());

    // A node estimate below what BIP-125 needs is raised to the least it
    // accepts: the old rate plus the incremental relay fee.
    let least = build_replacement(&old, 0, &expect).expect("bumped");
    let (least_tx, _, least_fee, least_rate, _) = fields(&least);
    assert_eq!(least_rate, old_rate + fees().incremental_rate());
    assert!(least_fee >= old_fee + fees().incremental_rate() * least_tx.keypath_vsize());
    check_replacement(&least, &old, &expect).expect("a fee bump");

    // A replacement can itself be replaced.
    let third = build_replacement(&new, 0, &expect).expect("bumped again");
    check_replacement(&third, &new, &expect).expect("a fee bump of the bump");
}

#[test]
fn bitcoin_replacements_that_are_not_fee_bumps_are_refused() {
    let d = dest();
    let old = original(&d);
    let expect = expectation(&d, 400_000);
    let new = build_replacement(&old, 10, &expect).expect("bumped");

    // Pays elsewhere: the change goes to another script.
    let elsewhere = edited(&new, |tx, _| {
        tx.outputs[1].script_pubkey = address::p2tr_script_pubkey(&[0x66; 32]).to_vec()
    });
    assert!(
        refusal(&elsewhere, &old, 400_000).contains("neither the destination nor the wallet"),
        "{}",
        refusal(&elsewhere, &old, 400_000)
    );
    // Pays the destination more (out of the change) than approved.
    let more = edited(&new, |tx, _| {
        tx.outputs[0].value += 1_000;
        tx.outputs[1].value -= 1_000;
    });
    assert!(refusal(&more, &old, 400_000).contains("approved amount is 400000"));
    // Another input (even the wallet's own) instead of the original's.
    let other_inputs = edited(&new, |tx, spent| {
        let extra = utxo(2, 5_000);
        tx.inputs[0].previous_output.txid = [2; 32];
        spent[0] = SpentOutput {
            value: 1_000_000,
            ..extra
        };
    });
    assert!(refusal(&other_inputs, &old, 400_000).contains("other inputs"));
    // The same fee (the original itself), or a lower one.
    assert!(refusal(&old, &old, 400_000).contains("BIP-125"));
    assert!(refusal(&old, &new, 400_000).contains("BIP-125"));
    // One sat more is not enough: the incremental relay fee is per vbyte.
    let (_, _, old_fee, _, _) = fields(&old);
    let barely = edited(&old, |tx, _| tx.outputs[1].value -= 1);
    let (_, _, barely_fee, _, _) = fields(&barely);
    assert_eq!(barely_fee, old_fee + 1);
    assert!(refusal(&barely, &old, 400_000).contains("BIP-125"));
    // A fee above the cap is refused as for any spend.
    let greedy = edited(&new, |tx, _| {
        tx.outputs.truncate(1);
    });
    assert!(refusal(&greedy, &old, 400_000).contains("exceeds the cap"));
    // A replaced transaction that was not the approved transfer taints its
    // replacement too.
    assert!(refusal(&new, &old, 300_000).contains("the replaced transaction"));
}

#[test]
fn bitcoin_bumps_stop_at_the_caps() {
    let d = dest();
    let old = original(&d);
    let expect = expectation(&d, 400_000);
    let at_cap = build_replacement(&old, u64::MAX, &expect).expect("clamped to the cap");
    let (_, _, _, rate, _) = fields(&at_cap);
    assert_eq!(rate, fees().max_rate);
    let err = build_replacement(&at_cap, 0, &expect).expect_err("nothing above the cap");
    assert!(err.to_string().contains("above the cap"), "{err}");

    // The change cannot pay for a bump: only dust above amount and fee.
    let utxos = [utxo(3, 400_000 + 3_600)];
    let tight = build_spend(&SpendRequest {
        chain: "ltc-regtest",
        wallet_script: &WALLET,
        utxos: &utxos,
        destination: &d,
        amount: 400_000,
        fee_rate: Some(20),
        fees: fees(),
    })
    .expect("builds without change");
    let err = build_replacement(&tight, 200, &expect).expect_err("cannot pay");
    assert!(err.to_string().contains("cannot pay"), "{err}");
}

const EVM_WALLET: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
const EVM_DEST: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
const GWEI: u64 = 1_000_000_000;

fn gas() -> GasPolicy {
    GasPolicy::for_chain("evm-31337").expect("known")
}

fn evm_expect(value: Wei, destination: &str) -> evm::Expectation<'_> {
    evm::Expectation {
        chain: "evm-31337",
        wallet: EVM_WALLET,
        destination,
        value,
        gas: gas(),
    }
}

fn evm_original(value: Wei) -> UnsignedTransaction {
    evm::build(
        &evm::TransferRequest {
            chain: "evm-31337",
            from: EVM_WALLET,
            to: EVM_DEST,
            value,
            nonce: 4,
            gas_limit: TRANSFER_GAS,
            max_fee_per_gas: 3 * GWEI,
            max_priority_fee_per_gas: GWEI,
        },
        &gas(),
    )
    .expect("builds")
}

fn with_evm(
    u: &UnsignedTransaction,
    edit: impl FnOnce(&mut UnsignedTransaction),
) -> UnsignedTransaction {
    let mut u = u.clone();
    edit(&mut u);
    u
}

fn evm_fees(u: &UnsignedTransaction) -> (u64, u64, u64) {
    match u {
        UnsignedTransaction::Evm {
            nonce,
            max_fee_per_gas,
            max_priority_fee_per_gas,
            ..
        } => (*nonce, *max_fee_per_gas, *max_priority_fee_per_gas),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_evm_replacement_keeps_the_nonce_and_raises_both_fees_by_ten_percent() {
    let value = Wei::from(10u64.pow(17));
    let old = evm_original(value);
    let expect = evm_expect(value, EVM_DEST);
    // The node suggests less than the old fees: each is raised by 10%.
    let new = evm::build_replacement(&old, 0, 0, &expect).expect("bumped");
    assert_eq!(
        evm_fees(&new),
        (4, 3 * GWEI + 3 * GWEI / 10, GWEI + GWEI / 10)
    );
    evm::check_replacement(&new, &old, &expect).expect("a fee bump");
    // The node suggests more: taken.
    let high = evm::build_replacement(&old, u128::from(50 * GWEI), u128::from(5 * GWEI), &expect)
        .expect("bumped");
    assert_eq!(evm_fees(&high), (4, 50 * GWEI, 5 * GWEI));
    let checked = evm::check_replacement(&high, &old, &expect).expect("a fee bump");
    assert_eq!(checked.tx.nonce, 4);
}

#[test]
fn evm_replacements_that_are_not_fee_bumps_are_refused() {
    let value = Wei::from(10u64.pow(17));
    let old = evm_original(value);
    let expect = evm_expect(value, EVM_DEST);
    let new = evm::build_replacement(&old, 0, 0, &expect).expect("bumped");
    let refusal = |u: &UnsignedTransaction| match evm::check_replacement(u, &old, &expect) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("accepted: {c:?}"),
    };
    let elsewhere = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm { to, .. } = u {
            *to = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC".into();
        }
    });
    assert!(
        refusal(&elsewhere).contains("the transaction pays"),
        "{}",
        refusal(&elsewhere)
    );
    let more = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm { value, .. } = u {
            *value = (10u128.pow(17) + 1).to_string();
        }
    });
    assert!(
        refusal(&more).contains("wei, the approval"),
        "{}",
        refusal(&more)
    );
    let other_nonce = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm { nonce, .. } = u {
            *nonce = 5;
        }
    });
    assert!(refusal(&other_nonce).contains("nonce 5"));
    let more_gas = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm { gas_limit, .. } = u {
            *gas_limit = TRANSFER_GAS + 1;
        }
    });
    assert!(refusal(&more_gas).contains("gas limit"));
    // Fees raised by less than 10%, each in turn.
    let small_fee = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm {
            max_fee_per_gas, ..
        } = u
        {
            *max_fee_per_gas = 3 * GWEI + 3 * GWEI / 10 - 1;
        }
    });
    assert!(
        refusal(&small_fee).contains("max fee per gas"),
        "{}",
        refusal(&small_fee)
    );
    let small_tip = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm {
            max_priority_fee_per_gas,
            ..
        } = u
        {
            *max_priority_fee_per_gas = GWEI + GWEI / 20;
        }
    });
    assert!(
        refusal(&small_tip).contains("priority fee"),
        "{}",
        refusal(&small_tip)
    );
    assert!(refusal(&old).contains("10%"));
    // Above the caps: refused by the check and never built.
    let over = with_evm(&new, |u| {
        if let UnsignedTransaction::Evm {
            max_fee_per_gas, ..
        } = u
        {
            *max_fee_per_gas = gas().max_fee_per_gas + 1;
        }
    });
    assert!(refusal(&over).contains("exceeds the cap"));
    let err = evm::build_replacement(&old, u128::from(gas().max_fee_per_gas) + 1, 0, &expect)
        .expect_err("above the cap");
    assert!(err.to_string().contains("above the cap"), "{err}");
}
