//! Taproot spends from a FROST 2-of-3 wallet against a real litecoind regtest
//! node: fund, scan, build, the guardians' check, threshold signing,
//! libbitcoinconsensus, broadcast, confirmations, idempotent rebroadcast,
//! insufficient funds, a node that is down, and a reorg.

mod chain_support;

use chain_support::{CHAIN, Wallet, build, sign_as_guardians, utxos};
use custos_adapters::bitcoind::{Bitcoind, RpcError};
use custos_custody::spend::{self, CheckedSpend, FeePolicy, SpendError, script_pubkey_for_address};
use custos_schemas::chain::{SignedTransaction, UnsignedTransaction};
use custos_tests::litecoind::Litecoind;

fn consensus_verify(c: &CheckedSpend, signed: &SignedTransaction) {
    let raw = hex::decode(&signed.raw_tx).expect("hex");
    let utxos: Vec<bitcoinconsensus::Utxo> = c
        .spent
        .iter()
        .map(|o| bitcoinconsensus::Utxo {
            script_pubkey: o.script_pubkey.as_ptr(),
            script_pubkey_len: o.script_pubkey.len() as u32,
            value: o.value as i64,
        })
        .collect();
    let flags = bitcoinconsensus::VERIFY_ALL_PRE_TAPROOT | bitcoinconsensus::VERIFY_TAPROOT;
    for (i, o) in c.spent.iter().enumerate() {
        bitcoinconsensus::verify_with_flags(
            &o.script_pubkey,
            o.value,
            &raw,
            Some(&utxos),
            i,
            flags,
        )
        .unwrap_or_else(|e| panic!("input {i} rejected by libbitcoinconsensus: {e:?}"));
    }
}

async fn received(rpc: &Bitcoind, address: &str) -> u64 {
    let coins: f64 = rpc
        .call("getreceivedbyaddress", serde_json::json!([address, 1]))
        .await
        .expect("getreceivedbyaddress");
    (coins * 1e8).round() as u64
}

#[tokio::test]
async fn frost_wallet_spends_confirm_on_litecoind() {
    let node = Litecoind::start().await;
    let rpc = &node.rpc;
    let w = Wallet::new("bitcoin-e2e");
    node.fund(&w.taproot.address, 1.0).await;
    node.fund(&w.taproot.address, 0.5).await;
    // Unconfirmed coins are not offered.
    assert!(utxos(rpc, &w).await.is_empty());
    node.mine(1).await;
    let coins = utxos(rpc, &w).await;
    assert_eq!(coins.len(), 2, "{coins:?}");
    assert_eq!(coins.iter().map(|c| c.value).sum::<u64>(), 150_000_000);

    let dest_address = rpc.get_new_address(Some("bech32")).await.expect("address");
    let destination = script_pubkey_for_address(CHAIN, &dest_address).expect("script");
    let amount = 120_000_000;
    // Regtest has no fee history: the builder falls back to the floor.
    assert_eq!(rpc.estimate_smart_fee(2).await.expect("estimate"), None);
    let unsigned = build(rpc, &w, &destination, amount).await.expect("build");
    let UnsignedTransaction::Bitcoin {
        fee, change_vout, ..
    } = &unsigned
    else {
        panic!("a Bitcoin transaction")
    };
    assert_eq!(*change_vout, Some(1));

    let (checked, signed) = sign_as_guardians(&w, &unsigned, &destination, amount);
    consensus_verify(&checked, &signed);

    let txid = rpc
        .send_raw_transaction(&signed.raw_tx)
        .await
        .expect("broadcast");
    assert_eq!(txid, signed.txid);
    // In the mempool: rebroadcast is a success with the same txid.
    assert_eq!(
        rpc.send_raw_transaction(&signed.raw_tx)
            .await
            .expect("rebroadcast"),
        txid
    );
    let pending = rpc
        .get_raw_transaction(&txid)
        .await
        .expect("getrawtransaction")
        .expect("known");
    assert_eq!((pending.confirmations, pending.block_hash), (0, None));
    // The node's weight agrees with the vsize the fee was set for.
    let decoded: serde_json::Value = rpc
        .call("decoderawtransaction", serde_json::json!([signed.raw_tx]))
        .await
        .expect("decode");
    assert_eq!(decoded["vsize"].as_u64(), Some(checked.vsize));
    assert_eq!(
        decoded["vin"][0]["sequence"].as_u64(),
        Some(u64::from(spend::RBF_SEQUENCE))
    );
    assert_eq!(
        *fee,
        checked.vsize * FeePolicy::for_chain(CHAIN).expect("fees").min_rate
    );

    let mined = node.mine(1).await;
    let confirmed = rpc
        .get_raw_transaction(&txid)
        .await
        .expect("getrawtransaction")
        .expect("known");
    assert_eq!(confirmed.confirmations, 1);
    assert_eq!(confirmed.block_hash.as_deref(), Some(mined[0].as_str()));
    assert_eq!(received(rpc, &dest_address).await, amount);
    // Already in the chain: still a success with the same txid.
    assert_eq!(
        rpc.send_raw_transaction(&signed.raw_tx)
            .await
            .expect("rebroadcast"),
        txid
    );

    // The change came back to the wallet.
    let change = utxos(rpc, &w).await;
    assert_eq!(change.len(), 1);
    assert_eq!(
        (change[0].txid.as_str(), change[0].vout),
        (txid.as_str(), 1)
    );
    assert_eq!(change[0].value, 150_000_000 - amount - fee);

    // A second spend sits in the mempool: its coin is no longer offered, though
    // scantxoutset (confirmed outputs only) still lists it.
    let small = 10_000_000;
    let unsigned = build(rpc, &w, &destination, small).await.expect("build");
    let (_, second) = sign_as_guardians(&w, &unsigned, &destination, small);
    rpc.send_raw_transaction(&second.raw_tx)
        .await
        .expect("broadcast");
    assert_eq!(
        rpc.scan_addresses(&[&w.taproot.address])
            .await
            .expect("scan")
            .len(),
        1
    );
    assert!(utxos(rpc, &w).await.is_empty());
    assert!(matches!(
        build(rpc, &w, &destination, small).await,
        Err(SpendError::InsufficientFunds { available: 0, .. })
    ));
}

#[tokio::test]
async fn insufficient_funds_name_what_is_needed_and_available() {
    let node = Litecoind::start().await;
    let w = Wallet::new("bitcoin-poor");
    node.fund(&w.taproot.address, 0.001).await;
    node.mine(1).await;
    let destination = script_pubkey_for_address(
        CHAIN,
        &node
            .rpc
            .get_new_address(Some("bech32"))
            .await
            .expect("address"),
    )
    .expect("script");
    let err = build(&node.rpc, &w, &destination, 1_000_000)
        .await
        .expect_err("too poor");
    match &err {
        SpendError::InsufficientFunds {
            needed,
            available,
            amount,
            fee,
        } => {
            assert_eq!(*available, 100_000);
            assert_eq!(*amount, 1_000_000);
            assert_eq!(*needed, amount + fee);
        }
        other => panic!("{other}"),
    }
    let shown = err.to_string();
    assert!(
        shown.contains("needed") && shown.contains("100000 sat available"),
        "{shown}"
    );
    // The destination of another network is refused before anything is built.
    assert!(
        script_pubkey_for_address(CHAIN, "ltc1qw508d6qejxtdg4y5r3zarvary0c5xw7kgmn4n9").is_err()
    );
}

#[tokio::test]
async fn a_node_that_is_down_is_reported_as_such_and_comes_back() {
    let mut node = Litecoind::start().await;
    let height = node.rpc.get_block_count().await.expect("height");
    node.stop().await;
    for err in [
        node.rpc
            .get_block_count()
            .await
            .map(drop)
            .expect_err("down"),
        node.rpc
            .send_raw_transaction("00")
            .await
            .map(drop)
            .expect_err("down"),
    ] {
        assert!(matches!(err, RpcError::NodeDown { .. }), "{err:?}");
        assert!(err.is_transient());
    }
    node.restart().await;
    assert_eq!(node.rpc.get_block_count().await.expect("height"), height);
    // The node wallet is back too.
    node.mine(1).await;

    // A wrong password and a refused transaction are not transient.
    let wrong = Bitcoind::new(node.rpc.url(), "custos", "wrong").expect("client");
    let err = wrong.get_block_count().await.expect_err("unauthorized");
    assert!(matches!(err, RpcError::Unauthorized { .. }), "{err:?}");
    assert!(!err.is_transient());
    let err = node
        .rpc
        .send_raw_transaction("0200")
        .await
        .expect_err("garbage");
    assert!(matches!(err, RpcError::Rpc { code: -22, .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(!format!("{:?}", node.rpc).contains("regtest-only"));
}

#[tokio::test]
async fn a_reorg_takes_confirmations_back_to_zero() {
    let node = Litecoind::start().await;
    let rpc = &node.rpc;
    let w = Wallet::new("bitcoin-reorg");
    node.fund(&w.taproot.address, 0.2).await;
    node.mine(1).await;
    let dest_address = rpc.get_new_address(Some("bech32")).await.expect("address");
    let destination = script_pubkey_for_address(CHAIN, &dest_address).expect("script");
    let unsigned = build(rpc, &w, &destination, 5_000_000)
        .await
        .expect("build");
    let (_, signed) = sign_as_guardians(&w, &unsigned, &destination, 5_000_000);
    let txid = rpc
        .send_raw_transaction(&signed.raw_tx)
        .await
        .expect("broadcast");
    let block = node.mine(1).await.remove(0);
    node.mine(1).await;
    let tx = rpc
        .get_raw_transaction(&txid)
        .await
        .expect("rpc")
        .expect("known");
    assert_eq!(tx.confirmations, 2);
    assert_eq!(tx.block_hash.as_deref(), Some(block.as_str()));

    rpc.invalidate_block(&block).await.expect("invalidateblock");
    let tx = rpc
        .get_raw_transaction(&txid)
        .await
        .expect("rpc")
        .expect("known");
    assert_eq!((tx.confirmations, tx.block_hash), (0, None));
    assert_eq!(
        rpc.get_block_header(&block)
            .await
            .expect("header")
            .confirmations,
        -1
    );
    // Back in the mempool, so a rebroadcast still succeeds.
    assert_eq!(
        rpc.send_raw_transaction(&signed.raw_tx)
            .await
            .expect("rebroadcast"),
        txid
    );

    rpc.reconsider_block(&block).await.expect("reconsiderblock");
    let tx = rpc
        .get_raw_transaction(&txid)
        .await
        .expect("rpc")
        .expect("known");
    assert_eq!(tx.confirmations, 2);
    let tip = rpc.get_block_count().await.expect("height");
    let header = rpc
        .get_block_header(&rpc.get_block_hash(tip).await.expect("hash"))
        .await
        .expect("header");
    assert_eq!(header.confirmations, 1);
    assert!(header.previous_block_hash.is_some());
}
