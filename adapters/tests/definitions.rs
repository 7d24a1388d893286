//! `nats/jetstream/` holds the stream and consumer definitions that `custos nats
//! provision` applies, as JSON for operators (and the `nats` CLI). They are
//! generated from the code; this test fails when they drift.
//! `CUSTOS_BLESS=1 cargo test -p custos-adapters --test definitions` rewrites them.

use std::path::PathBuf;

use custos_adapters::jetstream::{StreamSettings, dlq_stream, events_stream, workflow_consumers};

#[test]
fn jetstream_definitions_match_the_code() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nats/jetstream");
    let settings = StreamSettings::default();
    let mut files: Vec<(String, serde_json::Value)> = vec![
        (
            "stream-CUSTOS_EVENTS.json".into(),
            serde_json::to_value(events_stream(settings)).expect("json"),
        ),
        (
            "stream-CUSTOS_DLQ.json".into(),
            serde_json::to_value(dlq_stream(settings)).expect("json"),
        ),
    ];
    for step in workflow_consumers() {
        files.push((
            format!("consumer-CUSTOS_EVENTS-{}.json", step.name),
            serde_json::to_value(step.config()).expect("json"),
        ));
    }
    let bless = std::env::var_os("CUSTOS_BLESS").is_some();
    let mut stale = Vec::new();
    for (name, value) in files {
        let text = serde_json::to_string_pretty(&value).expect("json") + "\n";
        let path = dir.join(&name);
        if bless {
            std::fs::write(&path, &text).expect("write definition");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "nats/jetstream/ out of date: {stale:?}; run `CUSTOS_BLESS=1 cargo test -p custos-adapters --test definitions`"
    );
}

#[test]
fn the_event_stream_is_append_only() {
    let config = events_stream(StreamSettings::new(3, 0));
    assert!(config.deny_delete && config.deny_purge && config.allow_atomic_publish);
    assert_eq!(config.num_replicas, 3);
    assert_eq!(config.max_age, std::time::Duration::ZERO);
    assert_eq!(
        events_stream(StreamSettings::new(1, 30)).max_age,
        std::time::Duration::from_secs(30 * 86_400)
    );
}
