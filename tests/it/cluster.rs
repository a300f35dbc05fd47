//! A Ballista scheduler and two executors, processes of this binary on loopback, give the
//! same SQL and funnel answers as the engine in this process over the same committed
//! files (`[query] ballista`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::ArrayRef;
use arrow::compute::concat_batches;
use funnelhouse_query::funnel::{funnel_at, trend_at};
use funnelhouse_query::{FunnelRequest, QueryEngine, QueryOptions, StaticSource};
use funnelhouse_storage::Snapshot;

use crate::support::{Server, funnelhouse, run_ok};

/// A cluster process, killed when dropped.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `funnelhouse ARGS`; with `wait_for`, return once its log has a line with it,
/// and the rest of that line.
fn start(args: &[&str], wait_for: &str) -> (Node, String) {
    let mut child = funnelhouse()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn funnelhouse");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = wait_for.to_string();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find(&needle) {
                let _ = tx.send(Ok(line[i + needle.len()..].to_string()));
            }
            log.push(line);
        }
        let _ = tx.send(Err(log.join("\n")));
    });
    let rest = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(rest)) => rest,
        Ok(Err(log)) => panic!("funnelhouse {args:?} exited: {log}"),
        Err(_) => panic!("funnelhouse {args:?}: no {wait_for:?} in a minute"),
    };
    (Node(child), rest)
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

    let (_scheduler, rest) = start(
        &["scheduler", "--bind", "127.0.0.1:0"],
        "Ballista scheduler listening on ",
    );
    let addr = rest.split_whitespace().next().unwrap().to_string();
    let scheduler = format!("df://{addr}");
    let mut executors = Vec::new();
    for i in 0..2 {
        let work = dir.path().join(format!("executor-{i}"));
        let args = [
            "executor",
            "--scheduler",
            &scheduler,
            "--bind",
            "127.0.0.1:0",
            "--concurrent-tasks",
            "2",
            "--work-dir",
            work.to_str().unwrap(),
        ];
        executors.push(start(&args, "Ballista executor on ").0);
    }

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
    for i in 0..2 {
        let shuffles = std::fs::read_dir(dir.path().join(format!("executor-{i}"))).unwrap();
        assert!(
            shuffles.count() > 0,
            "executor {i} ran tasks (its work dir has job data)"
        );
    }
    drop(executors);
}
