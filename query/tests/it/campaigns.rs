//! Named campaign funnels: targets, attainment, bottleneck and pace over HTTP, and alert
//! rules firing, resolving, surviving a restart and calling their webhook.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use funnelhouse_query::{Alerts, CampaignConfig, QueryState};
use funnelhouse_schemas::time::{format_micros, now_micros};
use serde_json::{Value, json};

use crate::support::TestServer;

const MIN: i64 = 60_000_000;

fn campaign(toml_text: &str) -> CampaignConfig {
    let c: CampaignConfig = toml::from_str(toml_text).unwrap();
    c.validate().unwrap();
    c
}

/// `users` users of `channel` doing the first `depth` steps of scan, view, draw, `ago`
/// minutes ago.
fn users(prefix: &str, channel: &str, users: usize, depth: usize, ago: i64) -> Vec<Value> {
    let now = now_micros();
    (0..users)
        .flat_map(|u| {
            ["scan", "view", "draw"][..depth]
                .iter()
                .enumerate()
                .map(move |(i, step)| {
                    json!({"event_id": format!("{prefix}-{u}-{step}"), "event": step,
                       "user_id": format!("{prefix}-{u}"), "campaign": "c", "channel": channel,
                       "ts": format_micros(now - ago * MIN + i as i64 * 1_000_000)})
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn parcel(webhook: Option<&str>) -> CampaignConfig {
    let now = now_micros();
    let mut text = format!(
        r#"
name = "c"
start = "{}"
end = "{}"
[funnel]
steps = ["scan", "view", "draw"]
window = "1h"
[targets.jd]
scan = 10
view = 5
draw = 2
[targets.tmall]
scan = 4
[[alerts]]
step = "view"
min_step_conversion = 0.5
over = "1h"
min_users = 3
"#,
        format_micros(now - 24 * 60 * MIN),
        format_micros(now + 24 * 60 * MIN)
    );
    if let Some(url) = webhook {
        text.push_str(&format!("webhook = \"{url}\"\n"));
    }
    campaign(&text)
}

async fn server_with(campaigns: Vec<CampaignConfig>) -> TestServer {
    TestServer::start_with(QueryState {
        campaigns: Arc::new(campaigns),
        ..QueryState::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_funnel_has_targets_attainment_bottleneck_and_pace() {
    let server = server_with(vec![parcel(None)]).await;
    let mut events = users("j", "jd", 1, 3, 30);
    events.extend(users("j1", "jd", 1, 2, 30));
    events.extend(users("j2", "jd", 2, 1, 30));
    events.extend(users("t", "tmall", 2, 2, 30));
    events.extend(users("k", "京东", 1, 1, 30));
    server.post_events(&Value::Array(events)).await;

    let get = |path: String| {
        let http = server.http.clone();
        async move {
            let r = http.get(path).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, f) = get(format!("{}/v1/campaigns/c/funnel?_=123", server.url)).await;
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["breakdown"], "channel");
    let values: Vec<&str> = f["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["jd", "tmall", "京东"]);

    let jd = &f["groups"][0];
    assert_eq!(jd["counts"], json!([4, 2, 1]));
    assert_eq!(jd["targets"], json!([10, 5, 2]));
    assert_eq!(jd["attainment"], json!([0.4, 0.4, 0.5]));
    // Expected rates 50% and 40%, actual 50% and 50%: view falls short by 0, draw beats it.
    assert_eq!(jd["bottleneck"], 1);

    let tmall = &f["groups"][1];
    assert_eq!(tmall["targets"], json!([4, null, null]));
    assert_eq!(tmall["attainment"], json!([0.5, null, null]));
    assert_eq!(
        tmall["bottleneck"], 2,
        "without all targets: the lowest step conversion"
    );

    let kj = &f["groups"][2];
    assert_eq!(kj["targets"], json!([null, null, null]));
    assert_eq!(kj["bottleneck"], 1);

    // The total's targets sum the channels that have one.
    assert_eq!(f["total"]["counts"], json!([7, 4, 1]));
    assert_eq!(f["total"]["targets"], json!([14, 5, 2]));
    assert_eq!(f["total"]["bottleneck"], 2);
    let elapsed = f["elapsed"].as_f64().unwrap();
    assert!((0.49..0.51).contains(&elapsed), "{elapsed}");

    let (status, list) = get(format!("{}/v1/campaigns", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(list["campaigns"][0]["name"], "c");
    assert_eq!(list["campaigns"][0]["window"], 3600);
    assert_eq!(list["campaigns"][0]["alerts"][0]["min_users"], 3);

    let (status, e) = get(format!("{}/v1/campaigns/nope/funnel", server.url)).await;
    assert_eq!(status, 404, "{e}");
    assert!(e["error"].as_str().unwrap().contains("nope"));
    let (status, e) = get(format!("{}/v1/campaigns/c/funnel?window=1h", server.url)).await;
    assert_eq!(status, 400);
    assert!(e["error"].as_str().unwrap().starts_with("window"), "{e}");
}

/// A webhook receiver on 127.0.0.1 that refuses its first call (503), so delivery needs a retry.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(Mutex::new(0u32));
    let sink = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |Json(body): Json<Value>| {
            let sink = Arc::clone(&sink);
            let calls = Arc::clone(&calls);
            async move {
                let mut n = calls.lock().unwrap();
                *n += 1;
                if *n == 1 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                sink.lock().unwrap().push(body);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

async fn wait_for(received: &Arc<Mutex<Vec<Value>>>, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        if received.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    received.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_resolve_survive_a_restart_and_call_the_webhook() {
    let (hook, received) = webhook_receiver().await;
    let campaigns = Arc::new(vec![parcel(Some(&hook))]);
    let data_dir = tempfile::tempdir().unwrap();
    let alerts = Arc::new(Alerts::open(Arc::clone(&campaigns), data_dir.path()));
    let server = TestServer::start_with(QueryState {
        campaigns: Arc::clone(&campaigns),
        alerts: Some(Arc::clone(&alerts)),
        ..QueryState::default()
    })
    .await;
    // jd: 4 users started in the last hour, 1 viewed (25% < 50%): fires.
    // tmall: 2 started, none viewed, but 2 < min_users: does not fire.
    // douyin: 5 started two hours ago, outside `over`: does not fire.
    let mut events = users("j", "jd", 1, 2, 10);
    events.extend(users("j2", "jd", 3, 1, 10));
    events.extend(users("t", "tmall", 2, 1, 10));
    events.extend(users("d", "douyin", 5, 1, 120));
    server.post_events(&Value::Array(events)).await;

    let first = alerts.evaluate(&server.engine, now_micros()).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (first[0].status, first[0].alert.channel.as_str()),
        ("firing", "jd")
    );
    assert_eq!((first[0].alert.users, first[0].alert.observed), (4, 0.25));
    alerts.notify(first);

    let reply = server.get_json("/v1/campaigns/c/alerts").await;
    let firing = &reply["alerts"][0];
    assert_eq!(
        (
            firing["campaign"].as_str(),
            firing["channel"].as_str(),
            firing["step"].as_str()
        ),
        (Some("c"), Some("jd"), Some("view"))
    );
    assert_eq!(firing["threshold"], 0.5);
    let since = firing["since"].as_str().unwrap().to_string();

    // Still firing: no new transition, the same `since`.
    assert!(
        alerts
            .evaluate(&server.engine, now_micros())
            .await
            .is_empty()
    );
    // A restart reads the firing set back: no second "firing" webhook, `since` kept.
    let restarted = Alerts::open(Arc::clone(&campaigns), data_dir.path());
    assert!(
        restarted
            .evaluate(&server.engine, now_micros())
            .await
            .is_empty()
    );
    assert_eq!(restarted.firing("c")[0].since, since);

    // Three more jd users view: 4 of 4, resolved.
    server
        .post_events(&Value::Array(users("j2", "jd", 3, 2, 10)))
        .await;
    let resolved = restarted.evaluate(&server.engine, now_micros()).await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].status, "resolved");
    assert!(restarted.firing("c").is_empty());
    restarted.notify(resolved);

    // The receiver refused the first POST; the retry delivered it.
    let calls = wait_for(&received, 2).await;
    let statuses: Vec<&str> = calls
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2, "{calls:?}");
    assert!(
        statuses.contains(&"firing") && statuses.contains(&"resolved"),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c["channel"] == "jd" && c["step"] == "view")
    );
}

/// Read tokens guard the campaign routes and the dashboard; a browser opening `/` passes
/// its token as `?token=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_tokens_guard_campaigns_and_the_dashboard() {
    let server = TestServer::start_with(QueryState {
        campaigns: Arc::new(vec![parcel(None)]),
        read_tokens: Arc::new(vec!["rt_1".into()]),
        ..QueryState::default()
    })
    .await;
    let status = |path: &str, token: Option<&str>| {
        let mut req = server.http.get(format!("{}{path}", server.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for path in [
        "/v1/campaigns",
        "/v1/campaigns/c/funnel",
        "/v1/campaigns/c/alerts",
        "/",
    ] {
        assert_eq!(status(path, None).await, 401, "{path}");
        assert_eq!(status(path, Some("rt_2")).await, 401, "{path}");
        assert_eq!(status(path, Some("rt_1")).await, 200, "{path}");
    }
    assert_eq!(status("/?token=rt_1", None).await, 200);
    assert_eq!(status("/?token=nope", None).await, 401);
    // The scripts carry no data and load before the page knows its token.
    assert_eq!(status("/assets/dashboard.js", None).await, 200);
}
