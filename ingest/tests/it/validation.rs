//! Every bad-input rule of the event table: the field and reason in the rejection, the
//! index in the batch, and the valid siblings still stored.

use serde_json::{Value, json};

use crate::support::{TestServer, config, event};

/// (what is wrong, the event, the start of the expected error)
fn bad_cases() -> Vec<(&'static str, Value, &'static str)> {
    let with = |key: &str, v: Value| {
        let mut e = event("bad");
        e[key] = v;
        e
    };
    let without = |key: &str| {
        let mut e = event("bad");
        e.as_object_mut().unwrap().remove(key);
        e
    };
    let s = |n: usize| Value::String("x".repeat(n));
    vec![
        ("user_id absent", without("user_id"), "user_id: missing"),
        (
            "user_id null",
            with("user_id", Value::Null),
            "user_id: missing",
        ),
        (
            "user_id number",
            with("user_id", json!(42)),
            "user_id: must be a string, got a number",
        ),
        (
            "user_id empty",
            with("user_id", s(0)),
            "user_id: must be 1..128 bytes, got 0",
        ),
        (
            "user_id 129 bytes",
            with("user_id", s(129)),
            "user_id: must be 1..128 bytes, got 129",
        ),
        ("event absent", without("event"), "event: missing"),
        (
            "event empty",
            with("event", s(0)),
            "event: must be 1..64 bytes, got 0",
        ),
        (
            "event 65 bytes",
            with("event", s(65)),
            "event: must be 1..64 bytes, got 65",
        ),
        (
            "event with a space",
            with("event", json!("scan now")),
            "event: only A-Z a-z 0-9 _ . : - are allowed",
        ),
        (
            "event with $",
            with("event", json!("$identify")),
            "event: names starting with '$' are reserved",
        ),
        (
            "event object",
            with("event", json!({})),
            "event: must be a string, got an object",
        ),
        ("campaign absent", without("campaign"), "campaign: missing"),
        (
            "campaign empty",
            with("campaign", s(0)),
            "campaign: must be 1..64 bytes, got 0",
        ),
        (
            "campaign 65 bytes",
            with("campaign", s(65)),
            "campaign: must be 1..64 bytes, got 65",
        ),
        (
            "channel 65 bytes",
            with("channel", s(65)),
            "channel: must be 0..64 bytes, got 65",
        ),
        (
            "channel boolean",
            with("channel", json!(true)),
            "channel: must be a string, got a boolean",
        ),
        (
            "event_id empty",
            with("event_id", s(0)),
            "event_id: must be 1..128 bytes, got 0",
        ),
        (
            "event_id 129 bytes",
            with("event_id", s(129)),
            "event_id: must be 1..128 bytes, got 129",
        ),
        (
            "event_id number",
            with("event_id", json!(7)),
            "event_id: must be a string",
        ),
        (
            "ts text",
            with("ts", json!("yesterday")),
            "ts: not RFC 3339 or epoch ms",
        ),
        (
            "ts without offset",
            with("ts", json!("2026-11-11T10:00:00")),
            "ts: not RFC 3339 or epoch ms",
        ),
        (
            "ts float",
            with("ts", json!(1.5)),
            "ts: not RFC 3339 or epoch ms",
        ),
        (
            "ts boolean",
            with("ts", json!(false)),
            "ts: not RFC 3339 or epoch ms",
        ),
        (
            "ts epoch seconds sent as ms",
            with("ts", json!(1_762_855_200)),
            "ts: 1970-01-21T09:40:55.200000Z is before 2000-01-01",
        ),
        (
            "ts before 2000",
            with("ts", json!("1999-12-31T23:59:59Z")),
            "ts: 1999-12-31T23:59:59.000000Z is before 2000-01-01",
        ),
        (
            "properties array",
            with("properties", json!([1])),
            "properties: must be a JSON object, got an array",
        ),
        (
            "properties string",
            with("properties", json!("{}")),
            "properties: must be a JSON object, got a string",
        ),
        (
            "properties over 16 KiB",
            with("properties", json!({ "k": "x".repeat(16384 - 8 + 1) })),
            "properties: 16385 bytes serialized, the limit is 16384",
        ),
        ("not an object", json!(42), "event: not a JSON object"),
        (
            "an array",
            json!([event("nested")]),
            "event: not a JSON object",
        ),
    ]
}

#[tokio::test]
async fn each_bad_event_is_rejected_by_field_and_its_siblings_are_stored() {
    let server = TestServer::start(config()).await;
    for (i, (what, bad, expected)) in bad_cases().into_iter().enumerate() {
        let before = format!("ok-{i}-a");
        let after = format!("ok-{i}-b");
        let reply = server
            .post_json(&json!([event(&before), bad, event(&after)]))
            .await;
        assert_eq!(reply.status, 200, "{what}: {}", reply.json);
        assert_eq!(reply.json["accepted"], 2, "{what}: {}", reply.json);
        let rejected = reply.json["rejected"].as_array().unwrap();
        assert_eq!(rejected.len(), 1, "{what}: {}", reply.json);
        assert_eq!(rejected[0]["index"], 1, "{what}");
        let error = rejected[0]["error"].as_str().unwrap();
        assert!(
            error.starts_with(expected),
            "{what}: got {error:?}, expected {expected:?}"
        );
        let ids: Vec<String> = server.rows().into_iter().map(|r| r.event_id).collect();
        assert!(
            ids.contains(&before) && ids.contains(&after),
            "{what}: siblings stored"
        );
        assert!(
            !ids.contains(&"bad".to_string()),
            "{what}: nothing of the bad event stored"
        );
    }
}

#[tokio::test]
async fn fields_exactly_at_their_limits_are_accepted() {
    let server = TestServer::start(config()).await;
    let mut e = event(&"i".repeat(128));
    e["user_id"] = json!("u".repeat(128));
    e["event"] = json!("e".repeat(64));
    e["campaign"] = json!("c".repeat(64));
    e["channel"] = json!("h".repeat(64));
    e["properties"] = json!({ "k": "x".repeat(16384 - 8) });
    assert_eq!(e["properties"].to_string().len(), 16384);
    let reply = server.post_json(&e).await;
    assert_eq!(
        reply.json,
        json!({"accepted": 1, "duplicates": 0, "rejected": [], "rejected_count": 0})
    );
    let row = &server.rows()[0];
    assert_eq!(row.properties.as_deref().map(str::len), Some(16384));
}

#[tokio::test]
async fn absent_and_null_fields_take_their_defaults() {
    let server = TestServer::start(config()).await;
    let reply = server
        .post_json(
            &json!({"event": "view", "user_id": "u", "campaign": "c", "channel": null, "ts": null,
                           "event_id": null, "properties": null, "extra": "ignored"}),
        )
        .await;
    assert_eq!(reply.json["accepted"], 1, "{}", reply.json);
    let row = &server.rows()[0];
    assert_eq!(row.channel, "");
    assert_eq!(row.ts, row.received_at, "absent ts is the receive time");
    assert_eq!(row.properties, None);
    let id = uuid::Uuid::parse_str(&row.event_id).expect("a server-assigned UUID");
    assert_eq!(id.get_version_num(), 7);
}

#[tokio::test]
async fn ts_offsets_and_epoch_ms_are_stored_as_utc_micros() {
    let server = TestServer::start(config()).await;
    let mut a = event("a");
    a["ts"] = json!("2026-11-11T18:00:00.5+08:00");
    let mut b = event("b");
    b["ts"] = json!(1_794_391_200_500_i64);
    let reply = server.post_json(&json!([a, b])).await;
    assert_eq!(reply.json["accepted"], 2);
    let rows = server.rows();
    let expected = 1_794_391_200_500_000_i64; // 2026-11-11T10:00:00.5Z
    assert!(rows.iter().all(|r| r.ts == expected), "{rows:?}");
}

#[tokio::test]
async fn max_future_rejects_ts_too_far_ahead() {
    let cfg = funnelhouse_storage::IngestConfig {
        max_future: Some(std::time::Duration::from_secs(3600)),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let now = chrono::Utc::now();
    let mut near = event("near");
    near["ts"] = json!((now + chrono::Duration::seconds(3600 - 30)).to_rfc3339());
    let mut far = event("far");
    far["ts"] = json!((now + chrono::Duration::seconds(3600 + 30)).to_rfc3339());
    let reply = server.post_json(&json!([near, far])).await;
    assert_eq!(reply.json["accepted"], 1);
    let error = reply.json["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("ts: ") && error.contains("max_future"),
        "{error}"
    );
}

#[tokio::test]
async fn envelope_sent_at_corrects_device_clock_skew() {
    let server = TestServer::start(config()).await;
    // The device clock is one hour ahead: its sent_at and ts both read an hour late.
    let device_now = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut e = event("skewed");
    e["ts"] = json!((device_now - chrono::Duration::minutes(5)).to_rfc3339());
    let reply = server
        .post_json(&json!({"sent_at": device_now.to_rfc3339(), "events": [e]}))
        .await;
    assert_eq!(reply.json["accepted"], 1, "{}", reply.json);
    let row = &server.rows()[0];
    let expected = row.received_at - 5 * 60 * 1_000_000;
    assert!(
        (row.ts - expected).abs() < 2_000_000,
        "ts corrected to about 5 min before receipt: {row:?}"
    );
}

#[tokio::test]
async fn ndjson_counts_non_blank_lines_and_rejects_non_objects() {
    let server = TestServer::start(config()).await;
    let body = format!("{}\n\n  \n[1,2]\nnot json\n{}\n", event("n0"), event("n3"));
    let reply = server.post(body, "application/x-ndjson").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json["accepted"], 2, "{}", reply.json);
    let rejected = reply.json["rejected"].as_array().unwrap();
    let indexes: Vec<i64> = rejected
        .iter()
        .map(|r| r["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2]);
    assert!(
        rejected
            .iter()
            .all(|r| r["error"].as_str().unwrap().starts_with("event: "))
    );
}

#[tokio::test]
async fn bodies_that_are_not_json_are_a_400_and_store_nothing() {
    let server = TestServer::start(config()).await;
    for body in [
        "[{\"event\": ",
        "{\"a\":",
        "hello",
        "",
        "{\"sent_at\": \"x\", \"events\": []}",
    ] {
        let reply = server.post(body, "application/json").await;
        assert_eq!(reply.status, 400, "{body:?}: {}", reply.json);
        assert!(reply.json["error"].is_string(), "{}", reply.json);
    }
    assert!(server.rows().is_empty());
}
