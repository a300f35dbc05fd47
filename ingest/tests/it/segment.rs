//! Segment-compatible ingest: every route and alias, the field mapping, write keys in
//! each place SDKs put them, text/plain and gzip bodies, retried batches, and CORS.

use funnelhouse_ingest::HttpConfig;
use funnelhouse_schemas::AuthConfig;
use funnelhouse_schemas::time::{format_micros, now_micros};
use serde_json::json;

use crate::support::{Row, TestServer, config, gzip};

fn row<'a>(rows: &'a [Row], event_id: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.event_id == event_id)
        .unwrap_or_else(|| panic!("{event_id} not stored: {rows:?}"))
}

#[tokio::test]
async fn a_batch_is_mapped_field_by_field_and_a_retry_is_stored_once() {
    let server = TestServer::start(config()).await;
    // The device clock is 10 s behind the server's (and the event 60 s old by it).
    let device_now = now_micros() - 10_000_000;
    let device_ts = device_now - 60_000_000;
    let body = json!({
        "sentAt": format_micros(device_now),
        "context": {"campaign": {"name": "parcel-lottery", "source": "tmall"}},
        "batch": [
            {"type": "track", "messageId": "m-1", "userId": "u-1", "anonymousId": "a-1",
             "event": "Lottery Drawn!", "channel": "server",
             "properties": {"prize": "gold", "n": 3},
             "context": {"campaign": {"source": "jd"}},
             "timestamp": format_micros(device_ts)},
            {"type": "page", "messageId": "m-2", "anonymousId": "a-2", "name": "Landing",
             "properties": {"campaign": "other", "channel": "douyin"},
             "context": {"campaign": {"source": null}}},
            {"type": "identify", "messageId": "m-3", "userId": "u-3", "traits": {"plan": "vip"}},
            {"type": "track", "messageId": "m-4", "userId": "u-4", "event": "scan",
             "context": {"campaign": null}, "properties": {}}
        ]
    });
    let url = format!("{}/v1/batch", server.url);
    let first = server.request(server.http.post(&url).json(&body)).await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["success"], true);
    assert_eq!(first.json["accepted"], 4, "{}", first.json);

    let rows = server.rows();
    let track = row(&rows, "m-1");
    assert_eq!(track.event, "Lottery Drawn!", "names are kept as sent");
    assert_eq!(track.user_id, "u-1", "userId wins over anonymousId");
    assert_eq!(track.campaign, "parcel-lottery", "from the batch context");
    assert_eq!(
        track.channel, "jd",
        "the item's context wins; its own channel is ignored"
    );
    // ts moves by received_at - sentAt.
    assert_eq!(track.ts - device_ts, track.received_at - device_now);
    assert_eq!(
        track.properties.as_deref(),
        Some(r#"{"n":3,"prize":"gold"}"#)
    );

    let page = row(&rows, "m-2");
    assert_eq!(
        (page.event.as_str(), page.user_id.as_str()),
        ("view", "a-2")
    );
    assert_eq!(
        page.campaign, "other",
        "properties.campaign wins over the context"
    );
    assert_eq!(page.channel, "tmall", "the batch's context.campaign.source");
    assert_eq!(
        page.properties.as_deref(),
        Some(r#"{"name":"Landing","campaign":"other","channel":"douyin"}"#)
    );
    let identify = row(&rows, "m-3");
    assert_eq!(identify.event, "$identify");
    assert_eq!(identify.properties.as_deref(), Some(r#"{"plan":"vip"}"#));
    // A null in the item's context counts as absent: the batch's context applies.
    let null_context = row(&rows, "m-4");
    assert_eq!(
        (
            null_context.campaign.as_str(),
            null_context.channel.as_str()
        ),
        ("parcel-lottery", "tmall")
    );

    // An SDK retrying the same batch (same messageIds) after a lost answer.
    let retry = server.request(server.http.post(&url).json(&body)).await;
    assert_eq!(retry.status, 200);
    assert_eq!(
        (
            retry.json["accepted"].clone(),
            retry.json["duplicates"].clone()
        ),
        (json!(0), json!(4))
    );
    assert_eq!(server.rows().len(), 4);

    // No campaign anywhere: stored with campaign "" (SDKs never read per-item errors).
    let bare = server
        .request(server.post_to("/v1/track").json(&json!({
            "event": "scan", "anonymousId": "a-9", "messageId": "m-9"
        })))
        .await;
    assert_eq!(bare.json["accepted"], 1);
    let rows = server.rows();
    let bare = row(&rows, "m-9");
    assert_eq!((bare.campaign.as_str(), bare.channel.as_str()), ("", ""));
}

#[tokio::test]
async fn every_route_and_one_letter_alias_maps_its_type() {
    let server = TestServer::start(config()).await;
    let cases = [
        ("track", "t", json!({"event": "draw"}), "draw"),
        ("page", "p", json!({"name": "Home"}), "view"),
        ("screen", "s", json!({"name": "Main"}), "view"),
        ("identify", "i", json!({"traits": {"a": 1}}), "$identify"),
        ("group", "g", json!({"groupId": "g-1"}), "$group"),
        ("alias", "a", json!({"previousId": "old"}), "$alias"),
    ];
    for (long, short, fields, stored) in cases {
        for path in [long, short] {
            let mut msg = fields.clone();
            msg["userId"] = json!("u");
            msg["messageId"] = json!(format!("{path}-1"));
            let reply = server
                .request(server.post_to(&format!("/v1/{path}")).json(&msg))
                .await;
            assert_eq!(reply.status, 200, "/v1/{path}: {}", reply.json);
            assert_eq!(reply.json["accepted"], 1, "/v1/{path}: {}", reply.json);
            let rows = server.rows();
            assert_eq!(row(&rows, &format!("{path}-1")).event, stored, "/v1/{path}");
        }
    }
    let import = server
        .request(server.post_to("/v1/import").json(&json!({
            "batch": [{"type": "track", "event": "e", "userId": "u", "messageId": "imp-1"}]
        })))
        .await;
    assert_eq!(import.json["accepted"], 1);
    let group = server.rows();
    assert_eq!(
        row(&group, "g-1").properties.as_deref(),
        Some(r#"{"groupId":"g-1"}"#)
    );
}

#[tokio::test]
async fn analytics_next_text_plain_and_gzip_bodies_are_taken() {
    let server = TestServer::start(config()).await;
    let body = json!({"batch": [{"type": "track", "event": "scan", "anonymousId": "a", "messageId": "tp-1"}]});
    let plain = server
        .request(
            server
                .post_to("/v1/b")
                .header("content-type", "text/plain;charset=UTF-8")
                .body(body.to_string()),
        )
        .await;
    assert_eq!(plain.json["accepted"], 1, "{}", plain.json);
    let mut gz_body = body.clone();
    gz_body["batch"][0]["messageId"] = json!("gz-1");
    let gz = server
        .request(
            server
                .post_to("/v1/batch")
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(gzip(gz_body.to_string().as_bytes())),
        )
        .await;
    assert_eq!(gz.json["accepted"], 1, "{}", gz.json);
    let bad = server
        .request(
            server
                .post_to("/v1/batch")
                .header("content-type", "application/json")
                .body("{\"batch\": [}"),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json["error"].as_str().unwrap().contains("JSON"),
        "{}",
        bad.json
    );
}

#[tokio::test]
async fn the_write_key_may_be_basic_user_bearer_or_write_key_in_the_body() {
    let auth = AuthConfig {
        write_keys: vec!["wk_live_1".into()],
        ..Default::default()
    };
    let server = TestServer::start_with(config(), auth, None).await;
    let url = format!("{}/v1/batch", server.url);
    let batch = |id: &str, key: Option<&str>| {
        let mut b =
            json!({"batch": [{"type": "track", "event": "e", "userId": "u", "messageId": id}]});
        if let Some(k) = key {
            b["writeKey"] = json!(k);
        }
        b
    };
    let none = server
        .request(server.http.post(&url).json(&batch("n", None)))
        .await;
    assert_eq!(none.status, 401, "{}", none.json);
    let wrong = server
        .request(server.http.post(&url).json(&batch("w", Some("wk_other"))))
        .await;
    assert_eq!(wrong.status, 401);
    assert!(server.rows().is_empty(), "a refused request stores nothing");

    let basic = server
        .request(
            server
                .http
                .post(&url)
                .basic_auth("wk_live_1", Some(""))
                .json(&batch("b", None)),
        )
        .await;
    let bearer = server
        .request(
            server
                .http
                .post(&url)
                .bearer_auth("wk_live_1")
                .json(&batch("t", None)),
        )
        .await;
    let in_body = server
        .request(server.http.post(&url).json(&batch("k", Some("wk_live_1"))))
        .await;
    let single = server
        .request(server.post_to("/v1/track").json(&json!({
            "event": "e", "userId": "u", "messageId": "s", "writeKey": "wk_live_1"
        })))
        .await;
    for reply in [&basic, &bearer, &in_body, &single] {
        assert_eq!(reply.status, 200, "{}", reply.json);
    }
    assert_eq!(server.rows().len(), 4);
}

#[tokio::test]
async fn bad_items_are_rejected_by_index_and_the_rest_stored() {
    let server = TestServer::start(config()).await;
    let long = "x".repeat(65);
    let reply = server
        .request(server.post_to("/v1/batch").json(&json!({"batch": [
            {"type": "track", "event": "ok", "userId": "u", "messageId": "ok-1"},
            {"type": "track", "event": "no user"},
            {"type": "launch", "userId": "u"},
            {"type": "track", "event": long, "userId": "u"},
            {"type": "track", "event": "e", "userId": "u", "timestamp": "yesterday"}
        ]})))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json["accepted"], 1);
    let errors: Vec<(u64, String)> = reply.json["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let fields: Vec<(u64, &str)> = errors
        .iter()
        .map(|(i, e)| (*i, e.split(':').next().unwrap()))
        .collect();
    assert_eq!(
        fields,
        [(1, "userId"), (2, "type"), (3, "event"), (4, "timestamp")],
        "{errors:?}"
    );
    let metrics = server
        .request(server.http.get(format!("{}/metrics", server.url)))
        .await;
    assert!(
        metrics
            .json
            .as_str()
            .unwrap()
            .contains("funnelhouse_segment_long_names_dropped_total 1"),
        "{}",
        metrics.json
    );
}

async fn preflight(server: &TestServer, path: &str, origin: &str) -> reqwest::Response {
    server
        .http
        .request(reqwest::Method::OPTIONS, format!("{}{path}", server.url))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn ingest_routes_answer_cors_preflights() {
    let server = TestServer::start(config()).await;
    for path in ["/v1/events", "/v1/batch", "/v1/t"] {
        let resp = preflight(&server, path, "https://landing.example").await;
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "*", "{path}");
        let allowed = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(
            allowed.contains("content-type") && allowed.contains("authorization"),
            "{allowed}"
        );
    }
    let post = server
        .post_to("/v1/events")
        .header("origin", "https://landing.example")
        .json(&crate::support::event("cors-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn cors_origins_narrows_who_may_post() {
    let http = HttpConfig {
        cors_origins: vec!["https://shop.example".into()],
        ..Default::default()
    };
    let server =
        TestServer::start_state(config(), AuthConfig::default(), None, |s| s.with_http(http)).await;
    let allowed = preflight(&server, "/v1/events", "https://shop.example").await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let other = preflight(&server, "/v1/events", "https://evil.example").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_browser_sdk_is_served() {
    let server = TestServer::start(config()).await;
    let resp = server
        .http
        .get(format!("{}/sdk.js", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/javascript")
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("global.funnelhouse = funnelhouse"));
}
