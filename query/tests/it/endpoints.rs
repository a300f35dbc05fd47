//! The query endpoints over real HTTP: SQL formats, read-only errors, freshness (an
//! event posted is seen within 1 s), the funnel endpoints, and a flush racing queries.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::TestServer;

fn event(id: &str, user: &str, event: &str, channel: &str, ts: &str) -> Value {
    json!({"event_id": id, "event": event, "user_id": user, "campaign": "parcel-lottery",
           "channel": channel, "ts": ts, "properties": {"card": "A3", "n": 1}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_answers_in_json_csv_and_arrow() {
    let server = TestServer::start().await;
    server
        .post_events(&json!([
            event("e1", "u1", "scan", "jd", "2026-11-11T10:00:00.123456Z"),
            event("e2", "u2", "view", "", "2026-11-11T11:00:00Z"),
        ]))
        .await;
    let sql = "SELECT event_id, ts, channel, 1.5 AS f, CAST(NULL AS BIGINT) AS n, count(*) OVER () AS c \
               FROM events ORDER BY event_id";
    let json = server.sql_json(sql).await;
    assert_eq!(json["row_count"], 2);
    assert_eq!(
        json["columns"],
        json!([{"name": "event_id", "type": "text"}, {"name": "ts", "type": "timestamptz"},
               {"name": "channel", "type": "text"}, {"name": "f", "type": "double precision"},
               {"name": "n", "type": "bigint"}, {"name": "c", "type": "bigint"}])
    );
    assert_eq!(
        json["rows"][0],
        json!(["e1", "2026-11-11T10:00:00.123456Z", "jd", 1.5, null, 2])
    );

    let (status, csv, ct) = server.sql(sql, "csv").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/csv"));
    assert_eq!(csv.lines().next(), Some("event_id,ts,channel,f,n,c"));
    assert_eq!(
        csv.lines().nth(2),
        Some("e2,2026-11-11T11:00:00.000000Z,,1.5,,2")
    );

    let resp = server
        .http
        .post(format!("{}/v1/sql", server.url))
        .header("accept", "application/vnd.apache.arrow.stream")
        .header("content-type", "text/plain")
        .body("SELECT user_id FROM events ORDER BY user_id")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes.to_vec()), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 2);
}

/// `curl -d '{"sql": ...}'` says form-urlencoded: a body that parses as `{"sql"}` is taken
/// as one whatever the Content-Type, and anything else is the SQL text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_body_is_json_whatever_the_content_type() {
    let server = TestServer::start().await;
    for (content_type, body) in [
        (
            "application/x-www-form-urlencoded",
            r#"{"sql": "SELECT 41 + 1 AS n"}"#,
        ),
        ("text/plain", r#"{"sql": "SELECT 41 + 1 AS n"}"#),
        ("text/plain", "SELECT 41 + 1 AS n"),
        ("application/x-www-form-urlencoded", "SELECT 41 + 1 AS n"),
    ] {
        let resp = server
            .http
            .post(format!("{}/v1/sql", server.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{content_type}: {body}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            json["rows"],
            serde_json::json!([[42]]),
            "{content_type}: {body}"
        );
    }
    let resp = server
        .http
        .post(format!("{}/v1/sql", server.url))
        .header("content-type", "application/json")
        .body(r#"{"query": "SELECT 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert!(json["error"].as_str().unwrap().contains("sql"), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_only_and_errors_are_400_with_the_reason() {
    let server = TestServer::start().await;
    for (sql, needle) in [
        ("CREATE TABLE t AS SELECT 1", "read-only"),
        ("INSERT INTO events SELECT * FROM events", "read-only"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "read-only"),
        ("DROP TABLE events", "read-only"),
        ("SET datafusion.execution.batch_size = 1", "read-only"),
        ("SELEC 1", "SELEC"),
        ("SELECT nope FROM events", "nope"),
    ] {
        let (status, body, _) = server.sql(sql, "json").await;
        assert_eq!(status, 400, "{sql}: {body}");
        let error = serde_json::from_str::<Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(error.contains(needle), "{sql}: {error}");
    }
    let (status, body, _) = server.sql("SELECT 1", "xml").await;
    assert_eq!(status, 400);
    assert!(body.contains("format"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_event_is_visible_to_sql_and_funnels_within_a_second() {
    let server = TestServer::start().await;
    let posted = Instant::now();
    server
        .post_events(&json!([event(
            "fresh",
            "u-fresh",
            "scan",
            "jd",
            "2026-11-11T10:00:00Z"
        )]))
        .await;
    loop {
        let json = server
            .sql_json("SELECT count(*) AS n FROM events WHERE event_id = 'fresh'")
            .await;
        if json["rows"][0][0] == 1 {
            break;
        }
        assert!(
            posted.elapsed() < Duration::from_secs(1),
            "not visible within 1 s"
        );
    }
    let funnel = server
        .get_json("/v1/funnel?campaign=parcel-lottery&steps=scan,view&window=24h")
        .await;
    assert_eq!(funnel["total"]["counts"], json!([1, 0]));
    assert!(posted.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funnel_endpoints_over_http() {
    let server = TestServer::start().await;
    server
        .post_events(&json!([
            event("1", "u1", "scan", "jd", "2026-11-11T10:00:00Z"),
            event("2", "u1", "view", "jd", "2026-11-11T10:05:00Z"),
            event("3", "u2", "scan", "tmall", "2026-11-11T10:00:00Z"),
        ]))
        .await;
    server.store.flush().await.unwrap();
    server
        .post_events(&json!([event(
            "4",
            "u2",
            "view",
            "tmall",
            "2026-11-11T12:00:00Z"
        )]))
        .await;

    let get = |q: &str| {
        let url = format!("{}/v1/funnel{q}", server.url);
        let http = server.http.clone();
        async move {
            let resp = http.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, r) =
        get("?campaign=parcel-lottery&steps=scan,view&window=1h&breakdown=channel").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["total"]["counts"], json!([2, 1]));
    assert_eq!(r["groups"][0]["value"], "jd");
    assert!(r["as_of"].as_str().unwrap().ends_with('Z'));
    // breakdown=event names `event` twice in the scan unless aliased; `_` is a
    // dashboard's cache-buster and is ignored.
    let (status, r) =
        get("?campaign=parcel-lottery&steps=scan,view&window=1h&breakdown=event&_=1732").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["groups"],
        json!([{"value": "scan", "counts": [2, 1],
        "conversion": [1.0, 0.5], "step_conversion": [1.0, 0.5], "pending": [0, 0],
        "median_seconds": [0.0, 300.0]}])
    );

    let post = server
        .http
        .post(format!("{}/v1/funnel", server.url))
        .json(&json!({"campaign": "parcel-lottery", "steps": ["scan", {"event": "view", "where": {"n": 1}}],
                      "window": 10800}))
        .send()
        .await
        .unwrap();
    let r: Value = post.json().await.unwrap();
    assert_eq!(r["total"]["counts"], json!([2, 2]), "{r}");
    assert_eq!(
        r["total"]["median_seconds"],
        json!([0.0, 300.0]),
        "lower median of 300 s and 7200 s"
    );

    let (status, r) =
        get("/trend?campaign=parcel-lottery&steps=scan,view&window=3h&interval=1h").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["buckets"][0]["counts"], json!([2, 2]));

    for (q, field) in [
        ("?steps=scan", "campaign"),
        ("?campaign=parcel-lottery", "steps"),
        ("?campaign=parcel-lottery&steps=scan&window=soon", "window"),
        ("?campaign=parcel-lottery&steps=scan&from=yesterday", "from"),
        (
            "?campaign=parcel-lottery&steps=scan&breakdown=colour",
            "breakdown",
        ),
        ("?campaign=parcel-lottery&steps=scan&colour=red", "colour"),
    ] {
        let (status, r) = get(q).await;
        assert_eq!(status, 400, "{q}");
        assert!(r["error"].as_str().unwrap().starts_with(field), "{q}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_racing_queries_never_drops_or_doubles_a_row() {
    let server = TestServer::start().await;
    let mut expected = 0;
    for round in 0..20 {
        let batch: Vec<Value> = (0..50)
            .map(|i| {
                event(
                    &format!("r{round}-{i}"),
                    &format!("u{i}"),
                    "scan",
                    "jd",
                    "2026-11-11T10:00:00Z",
                )
            })
            .collect();
        server.post_events(&Value::Array(batch)).await;
        expected += 50;
        let flush = {
            let store = std::sync::Arc::clone(&server.store);
            tokio::spawn(async move { store.flush().await.unwrap() })
        };
        loop {
            let json = server
                .sql_json("SELECT count(*), count(DISTINCT event_id) FROM events")
                .await;
            assert_eq!(
                json["rows"][0],
                json!([expected, expected]),
                "round {round}"
            );
            if flush.is_finished() {
                break;
            }
        }
        flush.await.unwrap();
        let json = server.sql_json("SELECT count(*) FROM events").await;
        assert_eq!(json["rows"][0][0], expected);
    }
}

/// A query past `[query] timeout` is cancelled and answered 504 naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_the_timeout_is_a_504_naming_the_limit() {
    let engine = funnelhouse_query::QueryEngine::new(
        std::sync::Arc::new(funnelhouse_query::StaticSource(
            funnelhouse_storage::Snapshot::default(),
        )),
        std::path::Path::new("."),
        &funnelhouse_query::QueryOptions {
            timeout: Duration::from_millis(300),
            ..Default::default()
        },
        std::sync::Arc::default(),
    )
    .unwrap();
    let started = Instant::now();
    let err = engine
        .sql("SELECT count(*) FROM generate_series(1, 10000000000)")
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.status(), axum::http::StatusCode::GATEWAY_TIMEOUT);
    assert!(err.to_string().contains("query.timeout"), "{err}");
}

/// A funnel past the timeout is cancelled with its plan: 504, and its scan and folds
/// stop and let go of every reservation well before the funnel would have finished
/// (detached, they would hold memory until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_funnel_past_the_timeout_stops_its_plan() {
    let events: Vec<_> = (0..1_000_000)
        .map(|i| {
            crate::support::ev(
                &format!("t{i}"),
                &format!("u{}", i % 100_000),
                "scan",
                "jd",
                i,
                None,
            )
        })
        .collect();
    let spec = crate::support::funnel_spec(&[("campaign", "c"), ("steps", "scan")]);
    let engine = |timeout| {
        let opts = funnelhouse_query::QueryOptions {
            timeout,
            ..Default::default()
        };
        crate::support::engine_over_layout(&events, &[crate::support::LIVE], opts)
    };
    let (uncancelled, _dir) = engine(Duration::from_secs(60));
    let started = Instant::now();
    funnelhouse_query::funnel::funnel(&uncancelled, &spec)
        .await
        .unwrap();
    let whole = started.elapsed();

    let (cancelled, _dir) = engine(Duration::from_millis(10));
    let pool = std::sync::Arc::clone(&cancelled.context().runtime_env().memory_pool);
    let started = Instant::now();
    let err = funnelhouse_query::funnel::funnel(&cancelled, &spec)
        .await
        .unwrap_err();
    assert_eq!(
        err.status(),
        axum::http::StatusCode::GATEWAY_TIMEOUT,
        "{err}"
    );
    while pool.reserved() > 0 && started.elapsed() < 2 * whole {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        pool.reserved(),
        0,
        "still reserved {:?} after the timeout",
        started.elapsed()
    );
    assert!(
        started.elapsed() < whole / 2,
        "stopped {:?} after the start, the whole funnel takes {whole:?}",
        started.elapsed()
    );
}

/// A result past `max_result_rows` stops there and says so (JSON `"truncated": true`, a
/// `funnelhouse-truncated` header for every format), and the query stops at once rather
/// than building ten billion rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_stop_at_max_result_rows_and_say_so() {
    let opts = funnelhouse_query::QueryOptions {
        max_result_rows: 1000,
        ..Default::default()
    };
    let server = TestServer::start_with_options(opts).await;
    let post = |sql: &str, format: &str| {
        server
            .http
            .post(format!("{}/v1/sql?format={format}", server.url))
            .json(&json!({ "sql": sql }))
            .send()
    };
    let huge = "SELECT * FROM generate_series(1, 10000000000)";
    let resp = post(huge, "json").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["funnelhouse-truncated"], "true");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["truncated"], true);
    assert_eq!(body["row_count"], 1000);
    assert_eq!(body["rows"].as_array().unwrap().len(), 1000);

    let resp = post(huge, "csv").await.unwrap();
    assert_eq!(resp.headers()["funnelhouse-truncated"], "true");
    assert_eq!(
        resp.text().await.unwrap().lines().count(),
        1001,
        "header + 1000 rows"
    );

    let resp = post("SELECT * FROM generate_series(1, 1000)", "json")
        .await
        .unwrap();
    assert!(resp.headers().get("funnelhouse-truncated").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["row_count"], 1000);
    assert!(
        body.get("truncated").is_none(),
        "exactly at the cap is complete"
    );
}

/// Work DataFusion does not account itself counts against `[query] memory_limit` too:
/// a SQL result being built (past the limit: 503 naming it) and the funnel's rows, which
/// spill to disk past it and still give the exact answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_count_against_memory_limit_and_funnel_rows_spill() {
    let opts = funnelhouse_query::QueryOptions {
        memory_limit: 256 * 1024,
        ..Default::default()
    };
    let server = TestServer::start_with_options(opts).await;
    let (status, body, _) = server
        .sql("SELECT * FROM generate_series(1, 300000)", "json")
        .await;
    assert_eq!(status, 503);
    assert!(body.contains("query.memory_limit"), "{body}");
    let small = server
        .sql_json("SELECT * FROM generate_series(1, 1000)")
        .await;
    assert_eq!(small["row_count"], 1000, "small results still fit");

    // Each of the two fold partitions holds more rows (56 bytes each) than the whole pool.
    let events: Vec<Value> = (0..12_000)
        .map(|i| json!({"event_id": format!("m{i}"), "event": "scan", "user_id": format!("u{i}"), "campaign": "c"}))
        .collect();
    server.post_events(&json!(events)).await;
    let resp = server
        .http
        .get(format!("{}/v1/funnel?campaign=c&steps=scan", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["total"]["counts"], json!([12_000]), "{report}");
    let spec = crate::support::funnel_spec(&[("campaign", "c"), ("steps", "scan")]);
    let plan = funnelhouse_query::funnel::explain_analyze(&server.engine, &spec)
        .await
        .unwrap();
    assert!(
        crate::support::spill_count(&plan) > 0,
        "the funnel rows were spilled:\n{plan}"
    );
}

/// The rendered body is what counts against `memory_limit`, not only the Arrow batches
/// it came from: a timestamp is 8 bytes in Arrow and about 32 as JSON text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_body_counts_against_memory_limit() {
    let opts = funnelhouse_query::QueryOptions {
        memory_limit: 32 << 20,
        max_result_rows: 10_000_000,
        ..Default::default()
    };
    let server = TestServer::start_with_options(opts).await;
    // 2M rows: 16 MB as Arrow (under the limit), about 64 MB as JSON (over it).
    let sql = "SELECT to_timestamp_micros(value) AS ts FROM generate_series(1, 2000000)";
    let (status, body, _) = server.sql(sql, "json").await;
    assert_eq!(status, 503, "{}", &body[..body.len().min(300)]);
    assert!(body.contains("query.memory_limit"), "{body}");
    // The refused query's stream lets go of its share when the server drops it, which may
    // be just after the 503 went out.
    let pool = std::sync::Arc::clone(&server.engine.context().runtime_env().memory_pool);
    // Its aborted tasks may still run a moment (and grow again) after a reading of 0:
    // wait for 0 through 200 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut free_since = Instant::now();
    while Instant::now() < deadline {
        if pool.reserved() > 0 {
            free_since = Instant::now();
        } else if free_since.elapsed() >= Duration::from_millis(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reserved_before = pool.reserved();
    let (status, body, _) = server
        .sql(&format!("{sql} ORDER BY ts LIMIT 200000"), "csv")
        .await;
    assert_eq!(
        status,
        200,
        "{} (pool reserved before it: {reserved_before} bytes)",
        &body[..body.len().min(300)]
    );
    assert_eq!(body.lines().count(), 200_001, "header + rows");
    assert_eq!(body.lines().nth(1), Some("1970-01-01T00:00:00.000001Z"));
}
