//! Intake admission: accepted, duplicate, and every reason to refuse, each naming
//! its field; every proposal intake makes can be sealed.

mod common;

use common::*;
use custos_engine::intake::{self, Admission};
use custos_engine::ledger::Ledger;
use custos_schemas::{
    AggregateKind, ContentType, DecodeError, EventType, IntakeError, Outcome, Payload,
    RequestContext, TransferRequest,
};
use proptest::prelude::*;

const ETH_WALLET_ADDR: &str = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
const ETH_DEST: &str = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359";

fn ledger() -> Ledger {
    let mut l = Ledger::default();
    l.seal(
        vec![
            wallet_created("ltc-w", "ltc-regtest", &rltc_address(1)),
            wallet_created("eth-w", "evm-31337", ETH_WALLET_ADDR),
            wallet_created("doge-w", "doge-mainnet", "D123"),
        ],
        1_000,
    )
    .expect("wallets");
    l
}

fn ltc(request_id: &str, amount: &str) -> TransferRequest {
    transfer_request(request_id, "ltc-w", "LTC", &rltc_address(7), amount)
}

fn eth(request_id: &str, destination: &str, amount: &str) -> TransferRequest {
    transfer_request(request_id, "eth-w", "ETH", destination, amount)
}

fn ctx() -> RequestContext {
    RequestContext {
        ip_address: Some("10.0.0.***".into()),
        user_agent: Some("tests".into()),
        session_id: None,
    }
}

fn admit(l: &Ledger, r: &TransferRequest) -> Admission {
    intake::admit(l, Ok(r.clone()), ctx())
}

/// Asserts a rejection naming `field`, with a well-formed REQUEST_REJECTED proposal
/// that the ledger accepts; returns the reason.
fn assert_rejected(l: &Ledger, r: &TransferRequest, field: &str) -> String {
    match admit(l, r) {
        Admission::Reject { error, proposal } => {
            assert_eq!(error.field.as_deref(), Some(field), "{r:?}: {error:?}");
            assert!(!error.reason.is_empty());
            assert_eq!(proposal.aggregate_kind, AggregateKind::Intake);
            assert_eq!(proposal.event_type, EventType::RequestRejected);
            assert_eq!(proposal.result, Outcome::Denied);
            assert_eq!(proposal.context, ctx());
            let Payload::RequestRejected {
                field: f, reason, ..
            } = &proposal.payload
            else {
                panic!("payload {:?}", proposal.payload);
            };
            assert_eq!((f.as_deref(), reason), (Some(field), &error.reason));
            let mut l = l.clone();
            l.seal(vec![proposal], 2_000)
                .expect("rejection proposals seal");
            error.reason
        }
        other => panic!("{r:?} for field {field}: expected a rejection, got {other:?}"),
    }
}

fn assert_created(l: &Ledger, r: &TransferRequest) -> (String, custos_schemas::Proposal) {
    match admit(l, r) {
        Admission::Create {
            workflow_id,
            proposal,
        } => (workflow_id, proposal),
        other => panic!("{r:?}: expected Create, got {other:?}"),
    }
}

#[test]
fn valid_request_is_accepted() {
    let l = ledger();
    let r = ltc("req-1", "0.015");
    let (wf, p) = assert_created(&l, &r);
    assert_eq!(wf, intake::workflow_id(&r));
    assert!(wf.starts_with("tx-") && wf.len() == 27, "{wf}");
    assert_eq!(p.aggregate_kind, AggregateKind::Tx);
    assert_eq!(p.workflow_id, wf);
    assert_eq!(p.expected_version, 0);
    assert_eq!(p.event_type, EventType::TransactionCreated);
    assert_eq!(p.causation_id.as_deref(), Some("req-1"));
    assert_eq!(p.actor.user_id, "alice");
    assert_eq!(
        (p.target.amount.as_deref(), p.target.currency.as_deref()),
        (Some("0.015"), Some("LTC"))
    );
    assert_eq!(p.context, ctx());
    assert_eq!(
        p.payload,
        Payload::TransferRequested {
            request: r.clone(),
            request_hash: intake::request_hash(&r)
        }
    );
    // And it starts the workflow.
    let mut l = l;
    l.seal(vec![p], 2_000).expect("seals");
    let t = l
        .aggregate(AggregateKind::Tx, &wf)
        .and_then(|a| a.transfer.clone())
        .expect("transfer");
    assert_eq!(t.request, Some(r));
}

#[test]
fn valid_variants_are_accepted() {
    let l = ledger();
    let ok = [
        ltc("a1", "1"),
        ltc("a2", "0.00000001"),
        ltc("a3", "0.123456780"), // trailing zeros do not count as decimals
        ltc("a4", "999999999999.99999999"),
        ltc("a5", "0001.5"),
        transfer_request("a6", "ltc-w", "LTC", &segwit_v0_rltc(), "2"),
        eth("e1", ETH_DEST, "1.000000000000000001"),
        eth("e2", &ETH_DEST.to_ascii_lowercase(), "3"),
        eth(
            "e3",
            &format!("0x{}", ETH_DEST[2..].to_ascii_uppercase()),
            "3",
        ),
        TransferRequest {
            memo: Some("invoice 42 ✓".into()),
            ..ltc("a7", "1")
        },
    ];
    for r in ok {
        assert_created(&l, &r);
    }
}

fn segwit_v0_rltc() -> String {
    let hrp = bech32::Hrp::parse("rltc").expect("hrp");
    bech32::segwit::encode(hrp, bech32::segwit::VERSION_0, &[3u8; 20]).expect("encodes")
}

#[test]
fn same_request_again_is_a_duplicate() {
    let mut l = ledger();
    let r = ltc("req-1", "0.5");
    let (wf, p) = assert_created(&l, &r);
    l.seal(vec![p], 2_000).expect("seals");
    assert_eq!(
        admit(&l, &r),
        Admission::Duplicate {
            workflow_id: wf.clone()
        }
    );
    // Also after the workflow moved on.
    l.seal(vec![tx_step(&wf, 1)], 3_000).expect("policy");
    assert_eq!(admit(&l, &r), Admission::Duplicate { workflow_id: wf });
}

#[test]
fn reused_request_id_with_another_request_is_refused() {
    let mut l = ledger();
    let r = ltc("req-1", "0.5");
    let (wf, p) = assert_created(&l, &r);
    l.seal(vec![p], 2_000).expect("seals");
    for changed in [
        ltc("req-1", "0.6"),
        ltc("req-1", "0.50"),
        TransferRequest {
            memo: Some("m".into()),
            ..r.clone()
        },
        transfer_request("req-1", "ltc-w", "LTC", &rltc_address(8), "0.5"),
    ] {
        assert_eq!(intake::workflow_id(&changed), wf);
        let reason = assert_rejected(&l, &changed, "requestId");
        assert!(reason.contains("different request"), "{reason}");
        let Admission::Reject { proposal, .. } = admit(&l, &changed) else {
            unreachable!()
        };
        assert_eq!(proposal.workflow_id, "req-1");
        assert_eq!(proposal.causation_id.as_deref(), Some("req-1"));
    }
    // Even an otherwise invalid one (no wallet) is refused as a reuse, not created.
    let mut other = ltc("req-1", "0.5");
    other.wallet = "nope".into();
    assert_rejected(&l, &other, "requestId");
}

#[test]
fn request_ids_are_scoped_by_initiator() {
    let mut l = ledger();
    let r = ltc("req-1", "0.5");
    let (wf, p) = assert_created(&l, &r);
    l.seal(vec![p], 2_000).expect("seals");
    let bob = TransferRequest {
        initiator: "bob".into(),
        ..r.clone()
    };
    let (wf_bob, _) = assert_created(&l, &bob);
    assert_ne!(wf, wf_bob);
    // Deterministic.
    assert_eq!(intake::workflow_id(&bob), intake::workflow_id(&bob.clone()));
    assert_eq!(intake::request_hash(&r), intake::request_hash(&r.clone()));
    assert_ne!(intake::request_hash(&r), intake::request_hash(&bob));
}

#[test]
fn wallet_problems_name_the_wallet() {
    let l = ledger();
    let reason = assert_rejected(
        &l,
        &transfer_request("r", "missing", "LTC", &rltc_address(7), "1"),
        "wallet",
    );
    assert!(reason.contains("missing"), "{reason}");
    assert_rejected(
        &l,
        &transfer_request("r", "doge-w", "DOGE", "D123", "1"),
        "wallet",
    );
    // An empty ledger knows no wallet.
    assert_rejected(&Ledger::default(), &ltc("r", "1"), "wallet");
}

#[test]
fn wrong_asset_names_the_asset() {
    let l = ledger();
    assert_rejected(
        &l,
        &transfer_request("r", "ltc-w", "ETH", &rltc_address(7), "1"),
        "asset",
    );
    assert_rejected(
        &l,
        &transfer_request("r", "ltc-w", "ltc", &rltc_address(7), "1"),
        "asset",
    );
    assert_rejected(
        &l,
        &transfer_request("r", "eth-w", "LTC", ETH_DEST, "1"),
        "asset",
    );
    assert_rejected(
        &l,
        &transfer_request("r", "ltc-w", "", &rltc_address(7), "1"),
        "asset",
    );
    assert_rejected(
        &l,
        &transfer_request("r", "ltc-w", "L-C", &rltc_address(7), "1"),
        "asset",
    );
}

#[test]
fn bad_amounts_name_the_amount() {
    let l = ledger();
    for amount in [
        "0.123456789", // 9 decimals on an 8-decimal chain
        "1.000000001",
        "-1",
        "-0.5",
        "0",
        "0.0",
        "0.00000000",
        "1000000000000", // 13 integer digits: absurd
        "99999999999999999999",
        "1e5",
        "1.",
        ".5",
        "",
        " 1",
        "1,5",
        "+1",
        "NaN",
        "0x10",
    ] {
        assert_rejected(&l, &ltc("r", amount), "amount");
    }
    assert_rejected(&l, &eth("r", ETH_DEST, "0.0000000000000000001"), "amount");
}

#[test]
fn bad_destinations_name_the_destination() {
    let l = ledger();
    let mut bad_checksum = rltc_address(7);
    let last = bad_checksum.pop().expect("nonempty");
    bad_checksum.push(if last == 'q' { 'p' } else { 'q' });
    let ltc_cases = [
        "notanaddress".to_string(),
        bad_checksum,
        segwit_address("ltc", 7),  // mainnet
        segwit_address("tltc", 7), // testnet
        segwit_address("bcrt", 7), // bitcoin regtest
        ETH_DEST.to_string(),
        rltc_address(1), // the wallet's own address
        "rltc-1abc".into(),
        String::new(),
        "a".repeat(129),
    ];
    for d in ltc_cases {
        assert_rejected(
            &l,
            &transfer_request("r", "ltc-w", "LTC", &d, "1"),
            "destination",
        );
    }
    let mut bad_eip55 = ETH_DEST.to_string();
    bad_eip55.replace_range(3..4, "b"); // 0xfB... -> 0xfb...
    let eth_cases = [
        bad_eip55,
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD".to_string(),
        ETH_DEST[2..].to_string(),
        format!("{ETH_DEST}00"),
        ETH_DEST[..40].to_string(),
        "0xZZ6916095ca1df60bb79ce92ce3ea74c37c5d359".into(),
        rltc_address(7),
        ETH_WALLET_ADDR.to_string(),
    ];
    for d in eth_cases {
        assert_rejected(&l, &eth("r", &d, "1"), "destination");
    }
}

#[test]
fn shape_problems_name_their_field() {
    let l = ledger();
    let base = ltc("r", "1");
    assert_rejected(
        &l,
        &TransferRequest {
            request_id: "a.b".into(),
            ..base.clone()
        },
        "requestId",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            request_id: String::new(),
            ..base.clone()
        },
        "requestId",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            request_id: "x".repeat(129),
            ..base.clone()
        },
        "requestId",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            wallet: "w*".into(),
            ..base.clone()
        },
        "wallet",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            initiator: "a b".into(),
            ..base.clone()
        },
        "initiator",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            memo: Some("x".repeat(257)),
            ..base.clone()
        },
        "memo",
    );
    assert_rejected(
        &l,
        &TransferRequest {
            memo: Some("a\nb".into()),
            ..base.clone()
        },
        "memo",
    );
    // An unusable request id files the rejection under "malformed".
    let Admission::Reject { proposal, .. } = admit(
        &l,
        &TransferRequest {
            request_id: "a.b".into(),
            ..base.clone()
        },
    ) else {
        panic!("rejected");
    };
    assert_eq!(
        (proposal.workflow_id.as_str(), proposal.causation_id.clone()),
        ("malformed", None)
    );
    // An unusable initiator is not recorded as the actor.
    let Admission::Reject { proposal, .. } = admit(
        &l,
        &TransferRequest {
            initiator: "a b".into(),
            ..base
        },
    ) else {
        panic!("rejected");
    };
    assert_eq!(proposal.actor.user_id, "unknown");
    assert_eq!(proposal.workflow_id, "r");
}

#[test]
fn decode_errors_pass_their_field_through() {
    let l = ledger();
    let err = DecodeError {
        field: Some("amount".into()),
        reason: "invalid type: integer `5`, expected a string".into(),
    };
    match intake::admit(&l, Err(err.clone()), ctx()) {
        Admission::Reject { error, proposal } => {
            assert_eq!(
                error,
                IntakeError {
                    field: err.field.clone(),
                    reason: err.reason.clone()
                }
            );
            assert_eq!(proposal.workflow_id, "malformed");
            assert_eq!(proposal.actor.user_id, "unknown");
            assert_eq!(
                proposal.payload,
                Payload::RequestRejected {
                    request_id: None,
                    field: err.field,
                    reason: err.reason
                }
            );
        }
        other => panic!("{other:?}"),
    }
    let no_field = DecodeError {
        field: None,
        reason: "trailing bytes".into(),
    };
    assert!(matches!(
        intake::admit(&l, Err(no_field), ctx()),
        Admission::Reject {
            error: IntakeError { field: None, .. },
            ..
        }
    ));
    // Through the real decoder.
    let decoded = ContentType::Json.decode::<TransferRequest>(
        br#"{"requestId":"r","wallet":"ltc-w","asset":"LTC","destination":"d","amount":"1","initiator":"i","fee":"1"}"#,
    );
    let decoder_field = decoded.as_ref().err().and_then(|e| e.field.clone());
    assert!(
        decoder_field.as_deref().is_some_and(|f| f.contains("fee")),
        "{decoded:?}"
    );
    let Admission::Reject { error, .. } = intake::admit(&l, decoded, ctx()) else {
        panic!("rejected")
    };
    assert_eq!(error.field, decoder_field);
    let decoded = ContentType::Json.decode::<TransferRequest>(br#"{"requestId":"r","wallet":"w","asset":"A","destination":"d","amount":5,"initiator":"i"}"#);
    let Admission::Reject { error, .. } = intake::admit(&l, decoded, ctx()) else {
        panic!("rejected")
    };
    assert_eq!(error.field.as_deref(), Some("amount"));
}

/// An unknown field is named once (not `fee.fee`), and intake passes it on.
#[test]
fn unknown_field_is_named_once() {
    let decoded = ContentType::Json.decode::<TransferRequest>(
        br#"{"requestId":"r","wallet":"ltc-w","asset":"LTC","destination":"d","amount":"1","initiator":"i","fee":"1"}"#,
    );
    let Admission::Reject { error, .. } = intake::admit(&ledger(), decoded, ctx()) else {
        panic!("rejected")
    };
    assert_eq!(error.field.as_deref(), Some("fee"));
}

#[test]
fn repeated_rejections_follow_the_intake_version() {
    let mut l = ledger();
    let bad = ltc("req-x", "0");
    for v in 0..3u64 {
        let Admission::Reject { proposal, .. } = admit(&l, &bad) else {
            panic!("rejected")
        };
        assert_eq!(proposal.expected_version, v);
        l.seal(vec![proposal], 2_000).expect("seals");
    }
    assert_eq!(l.version(AggregateKind::Intake, "req-x"), 3);
    // Rejections do not create the workflow: the request can still be fixed.
    assert_created(&l, &ltc("req-x", "1"));
}

/// Engine bug (intake.rs, own-address check `request.destination == wallet.address`):
/// EVM addresses are case-insensitive, so the all-lowercase spelling of the
/// wallet's own (checksummed) address passes the check and a transfer to itself is
/// admitted.
#[test]
fn own_address_in_another_case_is_refused() {
    let l = ledger();
    assert_rejected(
        &l,
        &eth("r", &ETH_WALLET_ADDR.to_ascii_lowercase(), "1"),
        "destination",
    );
}

/// Engine bug (chains.rs, `validate_address`: `found.as_str() != hrp`): an all-uppercase
/// bech32 address is valid (BIP-173) but its HRP compares as "RLTC" and the address
/// is refused as belonging to another network.
#[test]
fn uppercase_segwit_address_is_accepted() {
    let l = ledger();
    let upper = rltc_address(7).to_ascii_uppercase();
    assert!(matches!(
        admit(&l, &transfer_request("r", "ltc-w", "LTC", &upper, "1")),
        Admission::Create { .. }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn admit_never_panics_and_its_proposals_seal(
        request_id in "[A-Za-z0-9._-]{0,6}",
        wallet in prop_oneof![Just("ltc-w".to_string()), Just("eth-w".to_string()), "[a-z*-]{0,5}"],
        asset in prop_oneof![Just("LTC".to_string()), Just("ETH".to_string()), "[A-Z]{0,4}"],
        destination in prop_oneof![Just(rltc_address(7)), Just(ETH_DEST.to_string()), "[0-9a-zA-Z]{0,45}"],
        amount in prop_oneof!["[0-9]{1,14}(\\.[0-9]{0,20})?", "[-+0-9.,e ]{0,8}"],
        memo in proptest::option::of("\\PC{0,10}"),
    ) {
        let l = ledger();
        let r = TransferRequest { request_id, wallet, asset, destination, amount, memo, initiator: "alice".into() };
        let mut sealer = l.clone();
        match admit(&l, &r) {
            Admission::Create { workflow_id, proposal } => {
                prop_assert_eq!(&workflow_id, &intake::workflow_id(&r));
                prop_assert!(r.validate_shape().is_ok());
                prop_assert!(sealer.seal(vec![proposal], 1).is_ok());
                prop_assert_eq!(admit(&sealer, &r), Admission::Duplicate { workflow_id });
            }
            Admission::Reject { error, proposal } => {
                prop_assert!(error.field.is_some());
                prop_assert!(sealer.seal(vec![proposal], 1).is_ok());
            }
            Admission::Duplicate { .. } => prop_assert!(false, "nothing was sealed yet"),
        }
    }
}
