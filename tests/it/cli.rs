//! The CLI as a person uses it: serve (logs, config precedence, SIGTERM, one process per
//! data dir), import, gen, compact.

use std::process::Output;

use arrow::array::RecordBatch;
use funnelhouse_schemas::{Event, EventRef, events_to_batch};

use crate::support::{Server, event_line, funnelhouse, serve_on_loopback, stored_ids, write_file};

fn run(args: &[&str]) -> Output {
    funnelhouse().args(args).output().expect("run funnelhouse")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn serve_logs_where_it_listens_and_flushes_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    let log = server.log_text();
    assert!(log.contains("listening on http://127.0.0.1:"), "{log}");
    assert!(
        log.contains(&format!("data in {}", data.display())),
        "{log}"
    );
    let body: String = (0..100)
        .map(|i| event_line(&format!("t{i}")) + "\n")
        .collect();
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events", server.url))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let status = server.terminate();
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        stored_ids(&data).len(),
        100,
        "SIGTERM flushed the live buffer to Parquet"
    );
}

#[tokio::test]
async fn flags_beat_environment_beat_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "f.toml",
        &format!("data_dir = \"{}/from-file\"\n", dir.path().display()),
    );
    let start = |env_dir: Option<&str>, flag_dir: Option<&str>| {
        let mut cmd = serve_on_loopback();
        cmd.args(["--config", cfg.to_str().unwrap()]);
        if let Some(d) = env_dir {
            cmd.env("FUNNELHOUSE_DATA_DIR", dir.path().join(d));
        }
        if let Some(d) = flag_dir {
            cmd.arg("--data-dir").arg(dir.path().join(d));
        }
        Server::spawn(cmd)
    };
    for (env_dir, flag_dir, expected) in [
        (None, None, "from-file"),
        (Some("from-env"), None, "from-env"),
        (Some("from-env"), Some("from-flag"), "from-flag"),
    ] {
        let server = start(env_dir, flag_dir).await;
        let expected = dir.path().join(expected);
        assert!(
            server
                .log_text()
                .contains(&format!("data in {}", expected.display())),
            "{}",
            server.log_text()
        );
        assert_eq!(server.terminate().code(), Some(0));
    }
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "funnelhouse.toml",
        "[ingest]\nmax_request_byte = \"1MiB\"\n",
    );
    let out = run(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let msg = text(&out);
    assert!(
        msg.contains("max_request_byte") && msg.contains("funnelhouse.toml"),
        "{msg}"
    );
    let cfg = write_file(dir.path(), "bad.toml", "http_addr = \"localhost\"\n");
    let msg = text(&run(&["serve", "--config", cfg.to_str().unwrap()]));
    assert!(
        msg.contains("http_addr") && msg.contains("bad.toml"),
        "{msg}"
    );
}

fn sample_events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::from(EventRef {
                event_id: &format!("{prefix}{i}"),
                event: "view",
                user_id: &format!("u{i}"),
                campaign: "parcel-lottery",
                channel: "tmall",
                ts: 1_794_391_200_000_000 + i as i64,
                received_at: 0,
                properties: Some(format!(r#"{{"n":{i}}}"#).as_str()),
            })
        })
        .collect()
}

#[tokio::test]
async fn import_reads_ndjson_csv_and_parquet_and_exits_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    let ndjson = write_file(
        dir.path(),
        "events.ndjson",
        &format!(
            "{}\n{}\n\n{{\"event\":\"scan\"}}\n",
            event_line("n1"),
            event_line("n2")
        ),
    );
    let csv = write_file(
        dir.path(),
        "events.csv",
        "event_id,event,user_id,campaign,channel,ts,properties\n\
         c1,scan,u1,parcel-lottery,jd,2026-11-11T10:00:00Z,\"{\"\"card\"\":\"\"A3\"\"}\"\n\
         c2,view,u1,parcel-lottery,jd,1794391200000,\n",
    );
    let batch: RecordBatch = events_to_batch(&sample_events("p", 300));
    let parquet_dir = tempfile::tempdir().unwrap();
    let meta = funnelhouse_storage::parquet_file::write_sorted_file(
        &funnelhouse_storage::disk::OsDisk,
        parquet_dir.path(),
        &batch,
        "x",
        "p",
    )
    .unwrap();
    let parquet = parquet_dir.path().join(&meta.path);

    let import = |file: &std::path::Path| {
        run(&[
            "import",
            "--server",
            &server.url,
            "--batch-size",
            "64",
            file.to_str().unwrap(),
        ])
    };
    let out = import(&ndjson);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("accepted 2, duplicates 0, rejected 1"),
        "{msg}"
    );
    assert!(
        msg.contains("events.ndjson:4: user_id: missing"),
        "points at the line: {msg}"
    );

    let out = import(&csv);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("accepted 2, duplicates 0, rejected 0"),
        "{}",
        text(&out)
    );

    let out = import(&parquet);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("accepted 300, duplicates 0, rejected 0"),
        "{}",
        text(&out)
    );
    let again = import(&parquet);
    assert!(
        text(&again).contains("accepted 0, duplicates 300, rejected 0"),
        "{}",
        text(&again)
    );

    let missing = run(&["import", "--server", &server.url, "/nonexistent.ndjson"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing).contains("/nonexistent.ndjson"),
        "{}",
        text(&missing)
    );

    assert_eq!(server.terminate().code(), Some(0));
    let mut ids = stored_ids(&data);
    ids.sort();
    assert_eq!(ids.len(), 304);
    assert!(ids.contains(&"c2".to_string()) && ids.contains(&"p299".to_string()));

    let unreachable = run(&[
        "import",
        "--server",
        "http://127.0.0.1:9",
        ndjson.to_str().unwrap(),
    ]);
    assert_eq!(unreachable.status.code(), Some(2), "{}", text(&unreachable));
}

#[tokio::test]
async fn import_waits_out_503_back_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(
        dir.path(),
        "small.toml",
        "[ingest]\nmax_request_bytes = \"64KiB\"\nmax_buffer_bytes = \"512KiB\"\nflush_interval = \"200ms\"\n",
    );
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--config", cfg.to_str().unwrap()]).await;
    let lines: String = (0..20_000)
        .map(|i| event_line(&format!("bp{i}")) + "\n")
        .collect();
    let file = write_file(dir.path(), "many.ndjson", &lines);
    let out = run(&[
        "import",
        "--server",
        &server.url,
        "--batch-size",
        "200",
        "--concurrency",
        "8",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("accepted 20000, duplicates 0, rejected 0"),
        "{}",
        text(&out)
    );
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("funnelhouse_requests_overloaded_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused > 0, "the server pushed back at least once");
    assert_eq!(server.terminate().code(), Some(0));
    assert_eq!(stored_ids(&data).len(), 20_000);
}

#[tokio::test]
async fn gen_writes_a_campaign_funnel_to_a_file_or_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("gen.ndjson");
    let out = run(&[
        "gen",
        "--events",
        "5000",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("generated"),
        "progress and summary on stderr"
    );
    let body = std::fs::read_to_string(&out_file).unwrap();
    let events: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 5000);
    let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
    assert!(
        count("package") > count("scan")
            && count("scan") > count("view")
            && count("view") > count("draw")
    );
    let channels: std::collections::HashSet<&str> = events
        .iter()
        .map(|e| e["channel"].as_str().unwrap())
        .collect();
    assert!(channels.len() >= 4);
    // Some events are sent twice (the same event_id).
    let resent = |events: &[serde_json::Value]| {
        let ids: std::collections::HashSet<&str> = events
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        ids.len() < events.len()
    };
    assert!(resent(&events));
    let same = run(&["gen", "--events", "5000", "--out", "-"]);
    assert_eq!(
        String::from_utf8(same.stdout).unwrap(),
        body,
        "the same seed gives the same events"
    );
    // --short and --medium: the same variety in shorter lines.
    let mean = |text: &str| text.lines().map(str::len).sum::<usize>() / text.lines().count();
    let long_mean = mean(&body);
    let generate = |flag: &str| {
        let out = run(&["gen", "--events", "5000", flag, "--out", "-"]);
        assert!(out.status.success(), "{}", text(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (mean(&text), events)
    };
    let (short_mean, short) = generate("--short");
    assert!(
        (150..220).contains(&short_mean) && short_mean + 60 < long_mean,
        "short lines average {short_mean} bytes, the default {long_mean}"
    );
    assert!(
        short.iter().any(|e| e["ts"].is_i64()),
        "epoch ms timestamps"
    );
    assert!(short.iter().any(|e| e["event"] == "draw"));
    assert!(resent(&short));
    // --medium: counter ids, each step's telling properties, lines between the two.
    let (medium_mean, medium) = generate("--medium");
    assert!(
        (185..230).contains(&medium_mean)
            && short_mean + 10 < medium_mean
            && medium_mean + 40 < long_mean,
        "medium lines average {medium_mean} bytes, short {short_mean}, the default {long_mean}"
    );
    assert!(
        medium.iter().all(|e| {
            let user = e["user_id"].as_str().unwrap();
            user.starts_with('u') && e["event_id"].as_str().unwrap().starts_with(user)
        }),
        "counter user ids, `<user_id>-<n>` event ids"
    );
    let has = |event: &str, key: &str| {
        medium
            .iter()
            .any(|e| e["event"] == event && !e["properties"][key].is_null())
    };
    assert!(
        has("package", "order_id")
            && has("scan", "wechat")
            && has("view", "scroll")
            && has("draw", "prize")
    );
    assert!(resent(&medium));
    let both = run(&["gen", "--events", "5000", "--short", "--medium"]);
    assert!(
        !both.status.success() && text(&both).contains("cannot be used with"),
        "--short and --medium conflict: {}",
        text(&both)
    );

    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    let out = run(&["gen", "--events", "3000", "--server", &server.url]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server.terminate().code(), Some(0));
    let stored = stored_ids(&data);
    let unique: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len());
    assert!(
        stored.len() >= 2900 && stored.len() <= 3000,
        "{}",
        stored.len()
    );

    let compact = run(&["compact", "--data-dir", data.to_str().unwrap()]);
    assert!(compact.status.success(), "{}", text(&compact));
    assert!(text(&compact).contains("compacted"), "{}", text(&compact));
    assert_eq!(stored_ids(&data).len(), stored.len());
}

#[tokio::test]
async fn sql_and_funnel_commands_print_tables_from_a_server_or_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    let lines = [
        event_line("s1").replace("u-s1", "alice"),
        event_line("s2").replace("u-s2", "bob"),
        event_line("v1")
            .replace("u-v1", "alice")
            .replace("\"scan\"", "\"view\"")
            .replace("10:00:00Z", "10:30:00Z"),
    ];
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events", server.url))
        .header("content-type", "application/x-ndjson")
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sql = "SELECT user_id, count(*) AS n FROM events GROUP BY user_id ORDER BY user_id";
    let funnel_args = [
        "funnel",
        "--campaign",
        "parcel-lottery",
        "--steps",
        "scan,view",
        "--window",
        "1h",
        "--breakdown",
        "channel",
    ];
    let check = |sql_out: &Output, funnel_out: &Output| {
        let s = text(sql_out);
        assert!(sql_out.status.success(), "{s}");
        assert!(
            s.contains("user_id | n") && s.contains("alice   | 2") && s.contains("(2 rows)"),
            "{s}"
        );
        let f = text(funnel_out);
        assert!(funnel_out.status.success(), "{f}");
        assert!(
            f.contains("scan | 2") && f.contains("view | 1") && f.contains("50.0%"),
            "{f}"
        );
        assert!(f.contains("by channel") && f.contains("jd"), "{f}");
    };
    let mut with_server = funnel_args.to_vec();
    with_server.extend(["--server", &server.url]);
    check(
        &run(&["sql", sql, "--server", &server.url]),
        &run(&with_server),
    );
    let bad = run(&["sql", "DROP TABLE events", "--server", &server.url]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("read-only"), "{}", text(&bad));
    // Offline: the data dir as it is on disk (a WAL not yet flushed included), then after SIGTERM.
    let data_arg = data.to_str().unwrap();
    let mut offline = funnel_args.to_vec();
    offline.extend(["--data-dir", data_arg]);
    check(&run(&["sql", sql, "--data-dir", data_arg]), &run(&offline));
    assert_eq!(server.terminate().code(), Some(0));
    check(&run(&["sql", sql, "--data-dir", data_arg]), &run(&offline));
}

#[tokio::test]
async fn sql_and_funnel_send_a_read_token_from_the_flag_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "f.toml", "[auth]\nread_tokens = [\"rt_cli\"]\n");
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    )
    .await;
    let sql = ["sql", "SELECT 40 + 2 AS answer", "--server", &server.url];
    let without = run(&sql);
    assert_eq!(without.status.code(), Some(2));
    assert!(text(&without).contains("--token"), "{}", text(&without));
    let flag = run(&[&sql[..], &["--token", "rt_cli"]].concat());
    assert!(
        flag.status.success() && text(&flag).contains("42"),
        "{}",
        text(&flag)
    );
    let env = funnelhouse()
        .args([
            "funnel",
            "--campaign",
            "c",
            "--steps",
            "scan",
            "--server",
            &server.url,
        ])
        .env("FUNNELHOUSE_TOKEN", "rt_cli")
        .output()
        .unwrap();
    assert!(env.status.success(), "{}", text(&env));
    let wrong = run(&[&sql[..], &["--token", "rt_other"]].concat());
    assert_eq!(wrong.status.code(), Some(2));
}

#[tokio::test]
async fn serve_demo_shows_a_moving_campaign_and_its_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--demo"]).await;
    assert!(
        data.join("demo.toml").exists(),
        "the demo config is written to the data dir"
    );
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{}{path}", server.url));
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let list = get("/v1/campaigns").await;
    assert_eq!(list["campaigns"][0]["name"], "parcel-lottery", "{list}");
    let first = get("/v1/campaigns/parcel-lottery/funnel").await;
    let users = |f: &serde_json::Value| f["total"]["counts"][0].as_u64().unwrap();
    assert!(users(&first) > 1_000, "three days of history: {first}");
    assert!(
        first["groups"][0]["targets"][0].as_u64().is_some(),
        "{first}"
    );
    assert!(first["elapsed"].as_f64().unwrap() > 0.0);
    // Live users keep arriving.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = get("/v1/campaigns/parcel-lottery/funnel").await;
        if users(&now) > users(&first) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no live events: {now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let page = http.get(format!("{}/", server.url)).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("/assets/echarts.min.js")
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn a_public_address_without_keys_refuses_to_start_unless_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let refused = run(&["serve", "--http-addr", "0.0.0.0:0", "--data-dir", data]);
    assert_eq!(refused.status.code(), Some(2));
    let msg = text(&refused);
    assert!(
        msg.contains("http_addr") && msg.contains("open = true"),
        "{msg}"
    );
    assert!(!dir.path().join("data").exists(), "nothing started");
}

/// One process per data dir: a second `serve` or a `compact` exits 2 naming the pid
/// that holds it; once that server stops, compaction runs.
#[tokio::test]
async fn a_second_process_on_a_data_dir_exits_2_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let holder = format!("data dir in use (pid {})", server.pid());
    let compact = run(&["compact", "--data-dir", data]);
    assert_eq!(compact.status.code(), Some(2), "{}", text(&compact));
    assert!(text(&compact).contains(&holder), "{}", text(&compact));
    let second = run(&[
        "serve",
        "--http-addr",
        "127.0.0.1:0",
        "--pg-addr",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ]);
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    assert!(text(&second).contains(&holder), "{}", text(&second));
    assert_eq!(server.terminate().code(), Some(0));
    let compact = run(&["compact", "--data-dir", data]);
    assert_eq!(compact.status.code(), Some(0), "{}", text(&compact));
}

/// Damage before the WAL's tail: `serve` refuses naming it, `wal check` reports it and
/// exits 1, `wal salvage` keeps every readable record, and then the server starts with
/// the events of the records that were readable.
#[tokio::test]
async fn wal_check_and_salvage_get_past_damage_before_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    for prefix in ["w1", "w2", "w3"] {
        let body: Vec<String> = (0..4)
            .map(|i| event_line(&format!("{prefix}-{i}")))
            .collect();
        let r = http
            .post(format!("{}/v1/events", server.url))
            .header("Content-Type", "application/x-ndjson")
            .body(body.join("\n"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    server.kill9();
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .collect();
    assert_eq!(segments.len(), 1);
    let segment = segments.pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let seq = funnelhouse_storage::wal::segment_number(&segment).unwrap();
    let second = funnelhouse_storage::wal::scan_segment(seq, &bytes).records[1].0;
    bytes[second + 12] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();

    let refused = run(&[
        "serve",
        "--http-addr",
        "127.0.0.1:0",
        "--pg-addr",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused).contains("wal salvage"), "{}", text(&refused));
    let check = run(&["wal", "check", "--data-dir", data]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains(&format!(
            "DAMAGED: unreadable record at byte offset {second}"
        )),
        "{}",
        text(&check)
    );
    let salvage = run(&["wal", "salvage", "--data-dir", data]);
    assert_eq!(salvage.status.code(), Some(0), "{}", text(&salvage));
    let check = run(&["wal", "check", "--data-dir", data]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));

    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(server.terminate().code(), Some(0));
    let mut ids = stored_ids(dir.path());
    ids.sort();
    let expected: Vec<String> = ["w1", "w3"]
        .iter()
        .flat_map(|p| (0..4).map(move |i| format!("{p}-{i}")))
        .collect();
    assert_eq!(ids, expected);

    // A mistyped data dir is named as such, not as a missing LOCK file or an empty WAL.
    let missing = dir.path().join("no-such-dir");
    for command in ["check", "salvage"] {
        let out = run(&["wal", command, "--data-dir", missing.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let said = text(&out);
        assert!(
            said.contains(&format!("no data dir at {}", missing.display()))
                && said.contains("--data-dir"),
            "{said}"
        );
        assert!(!missing.exists(), "wal {command} made the data dir");
    }
}

#[tokio::test]
async fn a_small_memory_limit_turns_transparent_huge_pages_off() {
    let dir = tempfile::tempdir().unwrap();
    let small = write_file(
        dir.path(),
        "small.toml",
        "[query]\nmemory_limit = \"128MiB\"\n",
    );
    let thp = |server: &Server| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
        line.map(|l| l.split_whitespace().nth(1).unwrap().to_string())
    };
    let server = Server::start(
        &dir.path().join("a"),
        &["--config", small.to_str().unwrap()],
    )
    .await;
    let limited = thp(&server);
    assert!(server.terminate().success());
    let server = Server::start(&dir.path().join("b"), &[]).await;
    let default = thp(&server);
    assert!(server.terminate().success());
    // Kernels before 5.0 do not report it.
    if let (Some(limited), Some(default)) = (limited, default) {
        assert_eq!((limited.as_str(), default.as_str()), ("0", "1"));
    }
}
