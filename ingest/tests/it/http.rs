//! The HTTP surface: encodings, size limits one byte under and over, status codes,
//! auth, back-pressure, and the health endpoints.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use funnelhouse_ingest::{CollectorState, router};
use funnelhouse_schemas::AuthConfig;
use funnelhouse_schemas::units::ByteSize;
use funnelhouse_storage::IngestConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use crate::support::{TestServer, config, event, gzip};

/// An NDJSON body of exactly `len` bytes: events, then padding inside the last event's properties.
fn ndjson_of_len(len: usize) -> String {
    let mut body = String::new();
    let mut i = 0;
    while body.len() + 400 < len {
        body.push_str(&event(&format!("pad-{i}")).to_string());
        body.push('\n');
        i += 1;
    }
    let mut last = event("last");
    last["properties"] = json!({ "p": "" });
    let base = last.to_string().len();
    last["properties"]["p"] = json!("x".repeat(len - body.len() - base));
    body.push_str(&last.to_string());
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn gzip_bodies_are_accepted_in_every_format() {
    let server = TestServer::start(config()).await;
    let array = json!([event("g1"), event("g2")]).to_string();
    let ndjson = format!("{}\n{}\n", event("g3"), event("g4"));
    for (body, ct) in [
        (array, "application/json"),
        (ndjson, "application/x-ndjson"),
    ] {
        let req = server
            .post_to("/v1/events")
            .header("content-type", ct)
            .header("content-encoding", "gzip")
            .body(gzip(body.as_bytes()));
        let reply = server.request(req).await;
        assert_eq!(
            reply.json,
            json!({"accepted": 2, "duplicates": 0, "rejected": [], "rejected_count": 0})
        );
    }
    let garbage = server
        .request(
            server
                .post_to("/v1/events")
                .header("content-encoding", "gzip")
                .body("nope"),
        )
        .await;
    assert_eq!(garbage.status, 400);
    assert!(garbage.json["error"].as_str().unwrap().contains("gzip"));
    assert_eq!(server.rows().len(), 4);
}

#[tokio::test]
async fn max_request_bytes_one_byte_under_and_over() {
    let limit = 64 * 1024;
    let cfg = IngestConfig {
        max_request_bytes: ByteSize(limit),
        max_event_bytes: ByteSize(limit),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let at_limit = ndjson_of_len(limit);
    let reply = server.post(at_limit.clone(), "application/x-ndjson").await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert!(reply.json["rejected"].as_array().unwrap().is_empty());
    let stored = server.rows().len();

    let over = ndjson_of_len(limit + 1).replace("pad-", "big-");
    let reply = server.post(over.clone(), "application/x-ndjson").await;
    assert_eq!(reply.status, 413, "{}", reply.json);
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("max_request_bytes")
    );

    // The limit applies after decompression.
    let gz = |body: &str| {
        server
            .post_to("/v1/events")
            .header("content-type", "application/x-ndjson")
            .header("content-encoding", "gzip")
            .body(gzip(body.as_bytes()))
    };
    assert_eq!(server.request(gz(&over)).await.status, 413);
    assert_eq!(
        server.rows().len(),
        stored,
        "nothing of a 413 request is stored"
    );
    let reply = server
        .request(gz(&at_limit
            .replace("pad-", "gzp-")
            .replace("\"last\"", "\"gzl\"")))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.json);
}

#[tokio::test]
async fn max_event_bytes_one_byte_under_and_over() {
    let cfg = IngestConfig {
        max_event_bytes: ByteSize(1000),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let sized = |id: &str, len: usize| {
        let mut e = event(id);
        e["properties"] = json!({ "p": "" });
        let base = e.to_string().len();
        e["properties"]["p"] = json!("x".repeat(len - base));
        assert_eq!(e.to_string().len(), len);
        e
    };
    let reply = server
        .post_json(&json!([sized("at", 1000), sized("over", 1001)]))
        .await;
    assert_eq!(reply.json["accepted"], 1, "{}", reply.json);
    assert_eq!(reply.json["rejected"][0]["index"], 1);
    let error = reply.json["rejected"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("max_event_bytes: event is 1001 bytes, the limit is 1000"),
        "{error}"
    );
}

#[tokio::test]
async fn unsupported_content_type_and_encoding_are_415() {
    let server = TestServer::start(config()).await;
    let post = |ct: &str, ce: &str| {
        let mut req = server
            .post_to("/v1/events")
            .header("content-type", ct)
            .body(event("x").to_string());
        if !ce.is_empty() {
            req = req.header("content-encoding", ce);
        }
        req
    };
    for (ct, ce) in [
        ("application/xml", ""),
        ("application/json", "br"),
        ("multipart/form-data", ""),
    ] {
        let reply = server.request(post(ct, ce)).await;
        assert_eq!(reply.status, 415, "{ct} {ce}");
        assert!(reply.json["error"].is_string());
    }
    // text/plain (sendBeacon) and a charset parameter are JSON.
    assert_eq!(
        server.request(post("text/plain", "")).await.json["accepted"],
        1
    );
    assert_eq!(
        server
            .request(post("application/json; charset=utf-8", ""))
            .await
            .json["duplicates"],
        1
    );
    assert_eq!(server.rows().len(), 1);
}

#[tokio::test]
async fn write_keys_are_required_exactly_when_configured() {
    let auth = AuthConfig {
        write_keys: vec!["wk_live_1".into()],
        ..Default::default()
    };
    let server = TestServer::start_with(config(), auth, None).await;
    let url = format!("{}/v1/events", server.url);
    let body = event("k").to_string();
    let none = server
        .request(server.http.post(&url).body(body.clone()))
        .await;
    assert_eq!(none.status, 401);
    assert!(none.json["error"].as_str().unwrap().contains("write key"));
    let wrong = server
        .request(
            server
                .http
                .post(&url)
                .bearer_auth("wk_other")
                .body(body.clone()),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert!(server.rows().is_empty());
    let bearer = server
        .request(
            server
                .http
                .post(&url)
                .bearer_auth("wk_live_1")
                .body(body.clone()),
        )
        .await;
    assert_eq!(bearer.json["accepted"], 1);
    let basic = server
        .request(
            server
                .http
                .post(&url)
                .basic_auth("wk_live_1", Some(""))
                .body(event("k2").to_string()),
        )
        .await;
    assert_eq!(basic.json["accepted"], 1);
}

#[tokio::test]
async fn duplicates_within_a_batch_and_across_requests_are_counted_not_stored() {
    let server = TestServer::start(config()).await;
    let mut first = event("d1");
    first["user_id"] = json!("first");
    let mut second = event("d1");
    second["user_id"] = json!("second");
    let reply = server.post_json(&json!([first, second, event("d2")])).await;
    assert_eq!(
        reply.json,
        json!({"accepted": 2, "duplicates": 1, "rejected": [], "rejected_count": 0})
    );
    let reply = server.post_json(&json!([event("d2"), event("d3")])).await;
    assert_eq!(
        reply.json,
        json!({"accepted": 1, "duplicates": 1, "rejected": [], "rejected_count": 0})
    );
    let rows = server.rows();
    assert_eq!(rows.len(), 3);
    let d1 = rows.iter().find(|r| r.event_id == "d1").unwrap();
    assert_eq!(d1.user_id, "first", "the first one received wins");
}

#[tokio::test]
async fn concurrent_senders_of_the_same_ids_store_each_once() {
    let server = Arc::new(TestServer::start(config()).await);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let server = Arc::clone(&server);
        tasks.push(tokio::spawn(async move {
            let batch: Vec<Value> = (0..200).map(|i| event(&format!("same-{i}"))).collect();
            let reply = server.post_json(&Value::Array(batch)).await;
            (
                reply.json["accepted"].as_u64().unwrap(),
                reply.json["duplicates"].as_u64().unwrap(),
            )
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        let (a, d) = t.await.unwrap();
        assert_eq!(a + d, 200);
        accepted += a;
    }
    assert_eq!(accepted, 200);
    assert_eq!(server.rows().len(), 200);
}

#[tokio::test]
async fn past_max_buffer_bytes_the_collector_answers_503_with_retry_after() {
    let cfg = IngestConfig {
        max_request_bytes: ByteSize(64 * 1024),
        max_buffer_bytes: ByteSize(256 * 1024),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let mut refused = None;
    for round in 0..200 {
        let batch: Vec<Value> = (0..100)
            .map(|i| event(&format!("bp-{round}-{i}")))
            .collect();
        let reply = server.post_json(&Value::Array(batch)).await;
        if reply.status != 200 {
            refused = Some((round, reply));
            break;
        }
    }
    let (round, reply) = refused.expect("the buffer bound must be reached");
    assert_eq!(reply.status, 503, "{}", reply.json);
    assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    assert!(
        reply.json["error"]
            .as_str()
            .unwrap()
            .contains("max_buffer_bytes")
    );
    assert_eq!(
        server.rows().len(),
        round * 100,
        "nothing of the refused request is stored"
    );
    // Refused by its declared size before the body is read: a client that has sent only
    // its headers gets the 503 at once.
    let mut conn = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_exact(&mut head),
    )
    .await
    .expect("answered without the body")
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 503");
    // A client that sends its whole body reads the 503 too, and the connection is
    // still good for the next request: the refused body was read and dropped, not
    // left unread to reset the connection.
    let mut conn = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = format!("[{}]", vec![r#"{"event":"x"}"#; 3500].join(","));
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut replies = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&replies).contains("\r\n\r\nok") {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            replies.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let replies = String::from_utf8_lossy(&replies);
    assert!(read.is_ok(), "no answer to the second request: {replies}");
    assert!(replies.starts_with("HTTP/1.1 503"), "{replies}");
    assert!(replies.contains("HTTP/1.1 200"), "{replies}");
    // Once the buffer is flushed, writes are accepted again.
    server.store.flush().await.unwrap();
    let reply = server.post_json(&json!([event("after-flush")])).await;
    assert_eq!(reply.status, 200);
}

async fn oneshot(app: axum::Router, uri: &str) -> (StatusCode, String) {
    let resp = app
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_is_up_at_once_and_ready_only_with_a_store() {
    let state = CollectorState::new(config(), AuthConfig::default());
    let app = router(state.clone());
    assert_eq!(oneshot(app.clone(), "/healthz").await.0, StatusCode::OK);
    let (status, body) = oneshot(app.clone(), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("WAL"), "{body}");
    let resp = app
        .clone()
        .oneshot(
            Request::post("/v1/events")
                .body(Body::from(event("x").to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));

    let server = TestServer::start(config()).await;
    server
        .post_json(&json!([event("m1"), event("m1"), {"event": "x"}]))
        .await;
    let metrics = server
        .request(server.http.get(format!("{}/metrics", server.url)))
        .await;
    let text = metrics.json.as_str().unwrap().to_string();
    for line in [
        "funnelhouse_events_accepted_total 1",
        "funnelhouse_events_duplicates_total 1",
        "funnelhouse_events_rejected_total 1",
        "funnelhouse_wal_fsync_seconds_count 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert_eq!(
        server
            .request(server.http.get(format!("{}/readyz", server.url)))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let state = CollectorState::new(config(), AuthConfig::default());
    let app = funnelhouse_ingest::collector::with_json_fallbacks(router(state));
    let (status, body) = oneshot(app.clone(), "/v1/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("/v1/nope"),
        "{json}"
    );
    let (status, body) = oneshot(app, "/v1/events").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .starts_with("GET is not allowed"),
        "{json}"
    );
}

#[tokio::test]
async fn a_flood_of_bad_lines_gets_a_small_answer_with_the_full_count() {
    let server = TestServer::start(config()).await;
    let body = "{}\n".repeat(5_000);
    let reply = server.post(body, "application/x-ndjson").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json["rejected_count"], 5_000);
    let listed = reply.json["rejected"].as_array().unwrap();
    assert_eq!(listed.len(), 100);
    assert_eq!(listed[99]["index"], 99);
}

/// While flushes to Parquet fail, /readyz answers 503 with the reason; once a retried
/// flush commits it is 200 again, and nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_flushes_fail_and_200_once_they_commit() {
    let server = TestServer::start(config()).await;
    assert_eq!(server.post_json(&json!([event("r1")])).await.status, 200);
    // A file where the flush wants the event's partition directory.
    let blocker = server.dir.join("events").join("date=2026-11-11");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();
    let store = std::sync::Arc::clone(&server.store);
    let flush = tokio::spawn(async move { store.flush().await });
    let readyz = || server.request(server.http.get(format!("{}/readyz", server.url)));
    let mut failing = None;
    for _ in 0..100 {
        let r = readyz().await;
        if r.status == 503 {
            failing = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let failing = failing.expect("/readyz never reported the failing flush");
    assert!(
        failing.json["error"].as_str().unwrap().contains("flushes"),
        "{}",
        failing.json
    );
    assert!(failing.headers.contains_key("retry-after"));
    std::fs::remove_file(&blocker).unwrap();
    flush.await.unwrap().unwrap();
    assert_eq!(readyz().await.status, 200);
    assert_eq!(server.rows().len(), 1);
}
