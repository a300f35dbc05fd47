//! Hand-made funnels with numbers worked out by hand.

use funnelhouse_query::funnel::{self, FunnelRequest};
use funnelhouse_schemas::Event;
use funnelhouse_schemas::time::{now_micros, parse_rfc3339};
use serde_json::{Value, json};

use crate::support::{engine_over, ev};

const MIN: i64 = 60_000_000;
const HOUR: i64 = 60 * MIN;

fn t0() -> i64 {
    parse_rfc3339("2026-11-11T00:00:00Z").unwrap()
}

async fn report(events: &[Event], req: Value) -> Value {
    let engine = engine_over(events);
    let mut req = req;
    req["campaign"] = json!("c");
    let spec = serde_json::from_value::<FunnelRequest>(req)
        .unwrap()
        .into_spec()
        .unwrap();
    serde_json::to_value(funnel::funnel(&engine, &spec).await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_rates_and_medians_of_a_small_campaign() {
    let t = t0();
    let events = [
        ev("1", "u1", "scan", "jd", t, None),
        ev("2", "u1", "view", "jd", t + 10 * MIN, None),
        ev("3", "u1", "draw", "jd", t + 20 * MIN, None),
        ev("4", "u2", "scan", "jd", t, None),
        ev("5", "u2", "view", "jd", t + 30 * HOUR, None), // outside the 24 h window
        ev("6", "u3", "view", "tmall", t, None),          // view before scan does not count
        ev("7", "u3", "scan", "tmall", t + MIN, None),
        ev("8", "u4", "scan", "tmall", t, None),
        ev("9", "u4", "draw", "tmall", t + MIN, None), // skipping view stops at level 1
        ev("10", "u5", "scan", "tmall", t, None),
        ev("11", "u5", "view", "tmall", t + 2 * MIN, None),
    ];
    let r = report(
        &events,
        json!({"steps": ["scan", "view", "draw"], "window": "24h"}),
    )
    .await;
    let total = &r["total"];
    assert_eq!(total["counts"], json!([5, 2, 1]));
    assert_eq!(total["conversion"], json!([1.0, 0.4, 0.2]));
    assert_eq!(total["step_conversion"], json!([1.0, 0.4, 0.5]));
    // Step 2 durations 600 s and 120 s: the lower median is 120 s.
    assert_eq!(total["median_seconds"], json!([0.0, 120.0, 1200.0]));
    assert_eq!(
        total["pending"],
        json!([0, 0, 0]),
        "all windows closed long ago"
    );
    assert_eq!(r["window_seconds"], 86400);
    assert_eq!(r["steps"], json!(["scan", "view", "draw"]));
    assert!(r["groups"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_is_inclusive_to_the_microsecond_and_equal_timestamps_chain() {
    let t = t0();
    let events = [
        ev("a1", "at-w", "scan", "", t, None),
        ev("a2", "at-w", "view", "", t + HOUR, None),
        ev("b1", "past-w", "scan", "", t, None),
        ev("b2", "past-w", "view", "", t + HOUR + 1, None),
        ev("c1", "same-ts", "scan", "", t, None),
        ev("c2", "same-ts", "view", "", t, None),
    ];
    let r = report(&events, json!({"steps": ["scan", "view"], "window": 3600})).await;
    assert_eq!(r["total"]["counts"], json!([3, 2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_and_to_bound_only_the_first_step() {
    let t = t0();
    let events = [
        ev("1", "early", "scan", "", t - MIN, None), // first step before `from`
        ev("2", "early", "view", "", t + MIN, None),
        ev("3", "inside", "scan", "", t + 50 * MIN, None),
        ev("4", "inside", "view", "", t + 70 * MIN, None), // after `to`, within the window
        ev("5", "late", "scan", "", t + HOUR, None),       // first step at `to`: excluded
    ];
    let r = report(
        &events,
        json!({"steps": ["scan", "view"], "window": "1h", "from": "2026-11-11T00:00:00Z", "to": "2026-11-11T01:00:00Z"}),
    )
    .await;
    assert_eq!(r["total"]["counts"], json!([1, 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdown_attributes_each_user_to_one_channel() {
    let t = t0();
    let events = [
        // The deepest chain starts at the tmall scan: the user counts for tmall only.
        ev("1", "u1", "scan", "jd", t, None),
        ev("2", "u1", "scan", "tmall", t + HOUR, None),
        ev("3", "u1", "view", "douyin", t + 90 * MIN, None),
        // Two equally deep chains from the same ts: the smaller event_id wins ("a" < "b").
        ev("b", "u2", "scan", "jd", t, None),
        ev("a", "u2", "scan", "offline", t, None),
        ev("c", "u3", "scan", "jd", t, None),
    ];
    let r = report(
        &events,
        json!({"steps": ["scan", "view"], "window": "1h", "breakdown": "channel"}),
    )
    .await;
    let groups: Vec<(String, Value)> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["value"].as_str().unwrap().to_string(),
                g["counts"].clone(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("jd".into(), json!([1, 0])),
            ("offline".into(), json!([1, 0])),
            ("tmall".into(), json!([1, 1]))
        ],
        "sorted by first-step count, then value"
    );
    assert_eq!(r["total"]["counts"], json!([3, 1]));
    assert_eq!(r["breakdown"], "channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_event_id_counts_once() {
    let t = t0();
    let events = [
        ev("same", "u1", "view", "", t, None),
        ev("same", "u1", "view", "", t, None),
    ];
    let r = report(&events, json!({"steps": ["view", "view"]})).await;
    assert_eq!(r["total"]["counts"], json!([1, 0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_filters_match_by_json_type_and_breakdowns_use_json_text() {
    let t = t0();
    let events = [
        ev(
            "1",
            "gold",
            "draw",
            "",
            t,
            Some(r#"{"prize":"gold","n":5}"#),
        ),
        ev(
            "2",
            "five",
            "draw",
            "",
            t,
            Some(r#"{"prize":"silver","n":5.0}"#),
        ),
        ev(
            "3",
            "text5",
            "draw",
            "",
            t,
            Some(r#"{"prize":"silver","n":"5"}"#),
        ),
        ev("4", "none", "draw", "", t, None),
        ev(
            "5",
            "list",
            "draw",
            "",
            t,
            Some(r#"{"prize":["a",1],"n":null}"#),
        ),
    ];
    let steps = |filter: Value| json!({"steps": [{"event": "draw", "where": filter}]});
    assert_eq!(
        report(&events, steps(json!({"prize": "gold"}))).await["total"]["counts"],
        json!([1])
    );
    assert_eq!(
        report(&events, steps(json!({"n": 5}))).await["total"]["counts"],
        json!([2]),
        "5 equals 5.0"
    );
    assert_eq!(
        report(&events, steps(json!({"n": "5"}))).await["total"]["counts"],
        json!([1])
    );
    assert_eq!(
        report(&events, steps(json!({"missing": true}))).await["total"]["counts"],
        json!([0])
    );
    let mut by_prize = steps(json!({}));
    by_prize["breakdown"] = json!("properties.prize");
    let r = report(&events, by_prize).await;
    let mut values: Vec<&str> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["value"].as_str().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, ["", "[\"a\",1]", "gold", "silver"]);
    for bad in [
        json!({"prize": null}),
        json!({"prize": [1]}),
        json!({"prize": {"a": 1}}),
    ] {
        let req = json!({"campaign": "c", "steps": [{"event": "draw", "where": bad}]});
        let err = serde_json::from_value::<FunnelRequest>(req)
            .unwrap()
            .into_spec()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("steps[0].where.prize: "), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_counts_users_whose_window_is_still_open() {
    let now = now_micros();
    let events = [
        ev("1", "fresh", "scan", "", now - MIN, None),
        ev("2", "stale", "scan", "", now - 2 * HOUR, None),
        ev("3", "done", "scan", "", now - MIN, None),
        ev("4", "done", "view", "", now, None),
    ];
    let r = report(&events, json!({"steps": ["scan", "view"], "window": "1h"})).await;
    assert_eq!(r["total"]["counts"], json!([3, 1]));
    assert_eq!(r["total"]["pending"], json!([0, 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trend_buckets_run_without_gaps_and_sum_to_the_total() {
    let t = t0();
    let events = [
        ev("1", "u1", "scan", "jd", t + 10 * MIN, None),
        ev("2", "u1", "view", "jd", t + 70 * MIN, None),
        ev("3", "u2", "scan", "tmall", t + 3 * HOUR + MIN, None),
    ];
    let engine = engine_over(&events);
    let req = json!({"campaign": "c", "steps": ["scan", "view"], "window": "24h", "interval": "1h", "breakdown": "channel"});
    let spec = serde_json::from_value::<FunnelRequest>(req)
        .unwrap()
        .into_spec()
        .unwrap();
    let r = serde_json::to_value(funnel::trend(&engine, &spec).await.unwrap()).unwrap();
    assert_eq!(r["interval_seconds"], 3600);
    let buckets = r["buckets"].as_array().unwrap();
    let starts: Vec<&str> = buckets
        .iter()
        .map(|b| b["start"].as_str().unwrap())
        .collect();
    assert_eq!(
        starts,
        [
            "2026-11-11T00:00:00.000000Z",
            "2026-11-11T01:00:00.000000Z",
            "2026-11-11T02:00:00.000000Z",
            "2026-11-11T03:00:00.000000Z"
        ]
    );
    let counts: Vec<&Value> = buckets.iter().map(|b| &b["counts"]).collect();
    assert_eq!(
        counts,
        [
            &json!([1, 1]),
            &json!([0, 0]),
            &json!([0, 0]),
            &json!([1, 0])
        ]
    );
    assert_eq!(
        buckets[3]["groups"],
        json!([{"value": "tmall", "counts": [1, 0]}])
    );

    let req = json!({"campaign": "c", "steps": ["scan"], "interval": "1h",
                     "from": "2026-11-10T22:30:00Z", "to": "2026-11-11T02:00:00Z"});
    let spec = serde_json::from_value::<FunnelRequest>(req)
        .unwrap()
        .into_spec()
        .unwrap();
    let r = serde_json::to_value(funnel::trend(&engine, &spec).await.unwrap()).unwrap();
    let starts: Vec<&str> = r["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["start"].as_str().unwrap())
        .collect();
    assert_eq!(
        starts.first(),
        Some(&"2026-11-10T22:00:00.000000Z"),
        "from the bucket holding `from`"
    );
    assert_eq!(
        starts.last(),
        Some(&"2026-11-11T01:00:00.000000Z"),
        "to the one before `to`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_funnel_in_sql() {
    let t = t0();
    let events = [
        ev("1", "u1", "scan", "jd", t, None),
        ev("2", "u1", "view", "jd", t + MIN, None),
        ev("3", "u2", "scan", "jd", t, None),
        ev("4", "u2", "view", "jd", t + 2 * HOUR, None),
        ev("5", "u3", "view", "jd", t, None),
    ];
    let engine = engine_over(&events);
    let result = engine
        .sql_rendered(
            "SELECT user_id, window_funnel(3600, ts, event = 'scan', event = 'view') AS level \
             FROM events GROUP BY user_id ORDER BY user_id",
            funnelhouse_query::OutputFormat::Json,
        )
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&result.body).unwrap();
    assert_eq!(json["rows"], json!([["u1", 2], ["u2", 1], ["u3", 0]]));
    let err = engine
        .sql("SELECT window_funnel(3600, ts) FROM events")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("window_funnel"), "{err}");
}

/// `funnel(...)` in SQL gives the numbers of `/v1/funnel`, one row per (value, step)
/// with NULL for the total, and `EXPLAIN` shows the funnel's own plan nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_funnel_table_function_agrees_with_the_report_and_explains_its_plan() {
    let t = t0();
    let events = [
        ev("1", "u1", "scan", "jd", t, None),
        ev("2", "u1", "view", "jd", t + MIN, None),
        ev("3", "u2", "scan", "tmall", t, None),
        ev("4", "u3", "scan", "jd", t, None),
        ev("5", "u3", "view", "jd", t + 3 * MIN, None),
    ];
    let engine = engine_over(&events);
    let render = |sql: &'static str| {
        let engine = engine.clone();
        async move {
            let result = engine
                .sql_rendered(sql, funnelhouse_query::OutputFormat::Json)
                .await
                .unwrap();
            serde_json::from_slice::<Value>(&result.body).unwrap()
        }
    };
    let json = render(
        "SELECT value, step, users, pending, median_seconds \
         FROM funnel('c', 'scan,view', '24h', 'channel') ORDER BY value NULLS FIRST, step",
    )
    .await;
    let report = report(
        &events,
        json!({"steps": ["scan", "view"], "window": "24h", "breakdown": "channel"}),
    )
    .await;
    let mut expected = Vec::new();
    let mut rows_of = |value: Value, stats: &Value| {
        for step in 0..2 {
            expected.push(json!([
                value.clone(),
                step,
                stats["counts"][step],
                stats["pending"][step],
                stats["median_seconds"][step]
            ]));
        }
    };
    rows_of(Value::Null, &report["total"]);
    let mut groups = report["groups"].as_array().unwrap().clone();
    groups.sort_by_key(|g| g["value"].as_str().unwrap().to_string());
    for g in &groups {
        rows_of(g["value"].clone(), g);
    }
    assert_eq!(json["rows"], json!(expected), "{json}");
    assert_eq!(report["total"]["counts"], json!([3, 2]));

    let plan = render("EXPLAIN SELECT * FROM funnel('c', 'scan,view', '24h')").await;
    let text = plan.to_string();
    assert!(
        text.contains("FunnelMergeExec") && text.contains("FunnelFoldExec"),
        "{text}"
    );
    let err = engine
        .sql("SELECT * FROM funnel('c')")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("funnel(campaign, steps, window"), "{err}");
}
