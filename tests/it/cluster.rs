//! A Ballista scheduler and two executors, processes of this binary on loopback, give the
//! same SQL and funnel answers as the engine in this process over the same committed
//! files (`[query] ballista`), local or on a shared bucket.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::ArrayRef;
use arrow::compute::concat_batches;
use datafusion::physical_plan::displayable;
use funnelhouse_query::funnel::{funnel_at, trend_at};
use funnelhouse_query::limits::{ResultLimits, with_limits};
use funnelhouse_query::{FunnelRequest, QueryEngine, QueryError, QueryOptions, StaticSource};
use funnelhouse_storage::Snapshot;

use crate::shared::{S3Server, serve, storage_toml, with_credentials};
use crate::support::{Server, funnelhouse, run_ok, write_file};

/// A cluster process and its log so far, killed when dropped.
struct Node(Child, Arc<Mutex<Vec<String>>>);

impl Node {
    fn log_text(&self) -> String {
        self.1.lock().unwrap().join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd`; return once its log has a line with `wait_for`, and the rest of that line.
fn start(mut cmd: Command, wait_for: &str) -> (Node, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn funnelhouse");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = wait_for.to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Shown with the test's output when it fails.
            eprintln!("{line}");
            if let Some(i) = line.find(&needle) {
                let _ = tx.send(Ok(line[i + needle.len()..].to_string()));
            }
            lines.lock().unwrap().push(line);
        }
        let _ = tx.send(Err(()));
    });
    let rest = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(rest)) => rest,
        Ok(Err(())) => panic!("{cmd:?} exited: {}", log.lock().unwrap().join("\n")),
        Err(_) => panic!("{cmd:?}: no {wait_for:?} in a minute"),
    };
    (Node(child, log), rest)
}

/// A scheduler and two executors on loopback, stopped when dropped.
struct Cluster {
    /// `df://HOST:PORT`
    scheduler: String,
    work_dirs: Vec<PathBuf>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn scheduler(&self) -> &Node {
        &self.nodes[0]
    }

    /// Executors keep their work in `dir`; `with` sets up each process's command (a
    /// config, its credentials).
    fn start(dir: &Path, with: impl Fn(Command) -> Command) -> Cluster {
        let mut scheduler = with(funnelhouse());
        scheduler.args(["scheduler", "--bind", "127.0.0.1:0"]);
        let (node, rest) = start(scheduler, "Ballista scheduler listening on ");
        let addr = rest.split_whitespace().next().unwrap();
        let scheduler = format!("df://{addr}");
        let mut nodes = vec![node];
        let mut work_dirs = Vec::new();
        for i in 0..2 {
            let work = dir.join(format!("executor-{i}"));
            let mut executor = with(funnelhouse());
            executor
                .args(["executor", "--scheduler", &scheduler])
                .args(["--bind", "127.0.0.1:0", "--concurrent-tasks", "2"])
                .arg("--work-dir")
                .arg(&work);
            nodes.push(start(executor, "Ballista executor on ").0);
            work_dirs.push(work);
        }
        Cluster {
            scheduler,
            work_dirs,
            nodes,
        }
    }
}

fn engine(data: &Path, opts: QueryOptions) -> QueryEngine {
    let snapshot = Snapshot::read(data).unwrap();
    assert!(snapshot.batches.is_empty(), "everything committed");
    QueryEngine::new(
        Arc::new(StaticSource(snapshot)),
        data,
        &opts,
        Arc::default(),
    )
    .unwrap()
}

/// The answer's columns (batch boundaries differ between engines).
async fn sql_columns(engine: &QueryEngine, sql: &str) -> Vec<ArrayRef> {
    let result = engine
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let batch = concat_batches(&result.schema, &result.batches).unwrap();
    batch.columns().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_funnels_on_a_scheduler_with_two_executors_match_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]).await;
    run_ok(&["gen", "--events", "20000", "--server", &server.url]);
    assert_eq!(server.terminate().code(), Some(0), "flushed on SIGTERM");

    let nodes = Cluster::start(dir.path(), |cmd| cmd);
    let scheduler = nodes.scheduler.clone();

    let opts = QueryOptions {
        target_partitions: 4,
        ..QueryOptions::default()
    };
    let local = engine(&data, opts.clone());
    let cluster = engine(
        &data,
        QueryOptions {
            distribute: Some(funnelhouse_cluster::distribute(&scheduler).unwrap()),
            ..opts
        },
    );
    assert!(cluster.is_distributed() && !local.is_distributed());

    for sql in [
        "SELECT count(*) AS n, count(DISTINCT event_id) AS ids, count(DISTINCT user_id) AS users FROM events",
        "SELECT channel, event, count(*) AS n FROM events GROUP BY channel, event ORDER BY channel, event",
        "SELECT campaign, level, count(*) AS users FROM (SELECT campaign, user_id, \
           window_funnel(86400000000, ts, event = 'package', event = 'scan', event = 'view', event = 'draw') AS level \
           FROM events GROUP BY campaign, user_id) GROUP BY campaign, level ORDER BY campaign, level",
        "SELECT * FROM funnel('parcel-lottery', 'package,scan,view,draw', '24h', 'channel') ORDER BY value NULLS FIRST, step",
    ] {
        let here = sql_columns(&local, sql).await;
        assert!(here[0].null_count() < here[0].len(), "{sql}: {here:?}");
        assert_eq!(sql_columns(&cluster, sql).await, here, "{sql}");
    }

    // The Postgres wire's session (result limits on top of the engine's planner) runs on
    // the cluster too.
    let limits = ResultLimits {
        timeout: Duration::from_secs(60),
        max_rows: 1_000_000,
    };
    let pg = with_limits(cluster.context(), limits);
    let sql = "SELECT channel, event, count(*) AS n FROM events GROUP BY channel, event ORDER BY channel, event";
    let df = pg.sql(sql).await.unwrap();
    let plan = df.clone().create_physical_plan().await.unwrap();
    let shown = displayable(plan.as_ref()).indent(true).to_string();
    assert!(shown.contains("DistributedQueryExec"), "{shown}");
    let batches = df.collect().await.unwrap();
    let there = concat_batches(&batches[0].schema(), &batches).unwrap();
    assert_eq!(there.columns(), sql_columns(&local, sql).await.as_slice());

    // Reports as of the same moment (on a cluster "now" is the newest commit's time).
    let as_of = cluster.as_of_now();
    let written = std::fs::metadata(data.join("manifest.json"))
        .unwrap()
        .modified()
        .unwrap();
    let written = written
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        as_of <= written && written - as_of < 60_000_000,
        "as_of {as_of} is the newest commit's time (manifest written at {written})"
    );
    // Mid-week of the generated events (gen starts 2026-11-01 and spreads users over 7
    // days), where many chains are still open: pending counts depend on as_of.
    let mid_week = 1_793_836_800_000_000; // 2026-11-05T00:00:00Z
    for request in [
        serde_json::json!({"campaign": "parcel-lottery", "steps": ["package", "scan", "view", "draw"], "window": "24h", "breakdown": "channel"}),
        serde_json::json!({"campaign": "parcel-lottery", "steps": ["scan", "view"], "window": "1h"}),
    ] {
        let spec = serde_json::from_value::<FunnelRequest>(request)
            .unwrap()
            .into_spec()
            .unwrap();
        for as_of in [mid_week, as_of] {
            let here = funnel_at(&local, &spec, as_of, false).await.unwrap();
            assert!(here.total.counts[0] > 100, "{:?}", here.total.counts);
            let there = funnel_at(&cluster, &spec, as_of, false).await.unwrap();
            assert_eq!(
                serde_json::to_value(&there).unwrap(),
                serde_json::to_value(&here).unwrap()
            );
            let mut trend_spec = spec.clone();
            trend_spec.interval_secs = Some(86_400);
            let here = trend_at(&local, &trend_spec, as_of, false).await.unwrap();
            let there = trend_at(&cluster, &trend_spec, as_of, false).await.unwrap();
            assert_eq!(
                serde_json::to_value(&there).unwrap(),
                serde_json::to_value(&here).unwrap()
            );
        }
        let pending = funnel_at(&local, &spec, mid_week, false).await.unwrap();
        assert!(
            pending.total.pending.iter().any(|&p| p > 0),
            "as_of mid-week leaves chains open: {:?}",
            pending.total.pending
        );
        // "Now" on the cluster is the newest commit's time.
        let there = funnelhouse_query::funnel::funnel(&cluster, &spec)
            .await
            .unwrap();
        let here = funnel_at(&local, &spec, as_of, false).await.unwrap();
        assert_eq!(
            serde_json::to_value(&there).unwrap(),
            serde_json::to_value(&here).unwrap()
        );
    }

    // The CLI with `[query] ballista` in its config runs there too.
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, format!("[query]\nballista = \"{scheduler}\"\n")).unwrap();
    let sql = "SELECT count(*) AS n FROM events WHERE event = 'draw'";
    let data_dir = data.to_str().unwrap();
    let run = |extra: &[&str]| run_ok(&[extra, &["sql", "--data-dir", data_dir, sql]].concat());
    let there = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(there, run(&[]));
    for work in &nodes.work_dirs {
        let shuffles = std::fs::read_dir(work).unwrap();
        assert!(
            shuffles.count() > 0,
            "{} has job data: the executor ran tasks",
            work.display()
        );
    }

    // A query that ends early (here at its timeout) has its job cancelled on the cluster.
    let impatient = engine(
        &data,
        QueryOptions {
            target_partitions: 4,
            timeout: Duration::from_secs(1),
            distribute: Some(funnelhouse_cluster::distribute(&scheduler).unwrap()),
            ..QueryOptions::default()
        },
    );
    let endless = "SELECT count(*) FROM events a JOIN events b ON a.channel = b.channel \
                   JOIN events c ON b.channel = c.channel";
    let err = impatient.sql(endless).await.unwrap_err();
    assert!(matches!(err, QueryError::Timeout(_)), "{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes
        .scheduler()
        .log_text()
        .contains("Received cancellation request for job")
    {
        assert!(
            Instant::now() < deadline,
            "the scheduler was not asked to cancel the job:\n{}",
            nodes.scheduler().log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The answers a server gives to a few SQL queries and a funnel report (less its `as_of`).
async fn http_answers(server: &Server) -> Vec<serde_json::Value> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for sql in [
        "SELECT count(*) AS n, count(DISTINCT event_id) AS ids, count(DISTINCT user_id) AS users FROM events",
        "SELECT channel, event, count(*) AS n FROM events GROUP BY channel, event ORDER BY channel, event",
        "SELECT * FROM funnel('parcel-lottery', 'package,scan,view,draw', '24h', 'channel') ORDER BY value NULLS FIRST, step",
    ] {
        let resp = (http.post(format!("{}/v1/sql", server.url)))
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{sql}: {}", resp.text().await.unwrap());
        out.push(resp.json::<serde_json::Value>().await.unwrap()["rows"].take());
    }
    let url = format!(
        "{}/v1/funnel?campaign=parcel-lottery&steps=package,scan,view,draw&window=24h&breakdown=channel",
        server.url
    );
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let mut report: serde_json::Value = resp.json().await.unwrap();
    report.as_object_mut().unwrap().remove("as_of");
    out.push(report);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shared_storage_executors_read_every_file_from_the_bucket() {
    let s3 = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_toml(&s3.endpoint);
    let cluster_config = write_file(dir.path(), "cluster.toml", &storage);
    let cluster = Cluster::start(dir.path(), |mut cmd| {
        cmd.arg("--config").arg(&cluster_config);
        with_credentials(cmd)
    });
    let flush = "[ingest]\nflush_interval = \"1s\"\n\n";
    let in_process = write_file(dir.path(), "in-process.toml", &format!("{flush}{storage}"));
    let on_cluster = write_file(
        dir.path(),
        "on-cluster.toml",
        &format!(
            "{flush}{storage}\n[query]\nballista = \"{}\"\n",
            cluster.scheduler
        ),
    );
    let data = dir.path().join("data");
    let node = |config: &Path| Server::spawn(with_credentials(serve(config, &data)));

    // Generated events, flushed, and published on SIGTERM; the answers in process.
    let server = node(&in_process).await;
    run_ok(&["gen", "--events", "5000", "--server", &server.url]);
    let here = http_answers(&server).await;
    assert!(server.terminate().success());

    // The same node on the cluster: the executors read its files from the bucket (the
    // node's own files travel by their object keys, not its local paths).
    let server = node(&on_cluster).await;
    let gets = |s3: &S3Server| s3.requests().get("GET").copied().unwrap_or(0);
    let before = gets(&s3);
    assert_eq!(http_answers(&server).await, here);
    let objects = s3.objects();
    let parquet = objects.iter().filter(|k| k.ends_with(".parquet")).count();
    assert!(parquet > 0, "{objects:?}");
    assert!(
        gets(&s3) - before >= parquet as u64,
        "the executors read the {parquet} Parquet objects: {:?}",
        s3.requests()
    );

    // New events: the cluster counts them once flushed and uploaded (the query waits for
    // the upload of a file committed a moment ago), and never fails meanwhile.
    let n = here[0][0][0].as_i64().unwrap();
    let events: Vec<serde_json::Value> = (0..10)
        .map(|i| serde_json::json!({"event_id": format!("late-{i}"), "event": "scan", "user_id": "late",
                                    "campaign": "parcel-lottery", "channel": "jd", "ts": "2026-11-20T10:00:00Z"}))
        .collect();
    let http = reqwest::Client::new();
    let resp = (http.post(format!("{}/v1/events", server.url)))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let resp = (http.post(format!("{}/v1/sql", server.url)))
            .json(&serde_json::json!({"sql": "SELECT count(*) FROM events"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let body: serde_json::Value = resp.json().await.unwrap();
        if body["rows"][0][0].as_i64() == Some(n + 10) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{body}; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.terminate().success());
}
