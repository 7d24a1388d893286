//! The JSON Schemas in `schemas/json/` are generated from the wire types. This test
//! fails when they drift; `CUSTOS_BLESS=1 cargo test -p custos-schemas --test
//! json_schemas` writes them anew.

use std::path::PathBuf;

#[test]
fn json_schemas_match_the_wire_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let bless = std::env::var_os("CUSTOS_BLESS").is_some();
    let mut stale = Vec::new();
    for (name, schema) in custos_schemas::json_schemas() {
        assert!(!schema.is_null(), "{name}: schema did not serialize");
        let text = serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n";
        let path = dir.join(name);
        if bless {
            std::fs::write(&path, &text).expect("write schema");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "JSON Schemas out of date: {stale:?}; run `CUSTOS_BLESS=1 cargo test -p custos-schemas --test json_schemas` and commit schemas/json/"
    );
}

#[test]
fn transfer_request_schema_rejects_unknown_fields_and_requires_every_field() {
    let (_, schema) = custos_schemas::json_schemas()
        .into_iter()
        .find(|(n, _)| *n == "transfer-request.json")
        .expect("schema");
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    let required: Vec<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for field in [
        "requestId",
        "wallet",
        "asset",
        "destination",
        "amount",
        "initiator",
    ] {
        assert!(required.contains(&field), "{field} must be required");
    }
    assert_eq!(
        schema["properties"]["amount"]["type"],
        serde_json::json!("string")
    );
}
