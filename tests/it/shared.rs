//! `[storage] url`: two collectors on one bucket and prefix of a real S3-compatible server
//! (s3s-fs over HTTP on 127.0.0.1, started by the test), each writing its own objects and
//! each querying both nodes' committed files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Server, funnelhouse, serve_command, write_file};

const ACCESS_KEY: &str = "fh-test-access";
const SECRET_KEY: &str = "fh-test-secret";
const BUCKET: &str = "fh-events";

/// s3s-fs on 127.0.0.1:0 serving `root` (each folder a bucket); stopped with the test.
pub(crate) struct S3Server {
    pub(crate) endpoint: String,
    root: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
    /// Requests served, by kind (LIST, GET, PUT, POST, DELETE, HEAD).
    requests: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl S3Server {
    pub(crate) async fn start() -> S3Server {
        Self::start_on("127.0.0.1:0").await
    }

    async fn start_on(addr: &str) -> S3Server {
        use hyper_util::rt::TokioIo;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(BTreeMap::new()));
        let counts = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let service = service.clone();
                let counts = Arc::clone(&counts);
                let counted = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let listing = req.uri().query().is_some_and(|q| q.contains("list-type"));
                        let kind = if listing {
                            "LIST"
                        } else {
                            req.method().as_str()
                        };
                        *counts.lock().unwrap().entry(kind.to_string()).or_insert(0) += 1;
                        hyper::service::Service::call(&service, req)
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), counted)
                        .await;
                });
            }
        });
        S3Server {
            endpoint,
            root,
            task,
            requests,
        }
    }

    pub(crate) fn requests(&self) -> BTreeMap<String, u64> {
        self.requests.lock().unwrap().clone()
    }

    /// Keys of the objects under the bucket, e.g. `test/events/date=.../n…-f….parquet`.
    pub(crate) fn objects(&self) -> Vec<String> {
        let bucket = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        let mut stack = vec![bucket.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let key = path.strip_prefix(&bucket).unwrap().to_string_lossy();
                    // s3s-fs keeps its own bookkeeping next to the objects.
                    if !key.contains(".upload") && !key.ends_with(".metadata.json") {
                        out.push(key.into_owned());
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A collector on the shared bucket, flushing every second.
async fn node(s3: &S3Server, dir: &Path, config_dir: &Path, name: &str) -> Server {
    Server::spawn(node_command(&s3.endpoint, dir, config_dir, name)).await
}

fn node_command(
    endpoint: &str,
    dir: &Path,
    config_dir: &Path,
    name: &str,
) -> std::process::Command {
    let config = write_file(
        config_dir,
        &format!("{name}.toml"),
        &format!(
            "[ingest]\nflush_interval = \"1s\"\ncompact_min_files = 3\n\n{}",
            storage_toml(endpoint)
        ),
    );
    with_credentials(serve(&config, dir))
}

/// The `[storage]` section for the test bucket behind `endpoint`.
pub(crate) fn storage_toml(endpoint: &str) -> String {
    format!(
        "[storage]\nurl = \"s3://{BUCKET}/test\"\nendpoint = \"{endpoint}\"\nallow_http = true\n"
    )
}

/// `cmd` with the test bucket's credentials in its environment (and no others).
pub(crate) fn with_credentials(mut cmd: std::process::Command) -> std::process::Command {
    cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
    cmd
}

/// `funnelhouse serve` on free ports with `config` over `dir`.
pub(crate) fn serve(config: &Path, dir: &Path) -> std::process::Command {
    let mut cmd = serve_command(dir);
    cmd.arg("--config").arg(config);
    cmd
}

async fn post(server: &Server, events: &[Value]) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events", server.url))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
}

fn events(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"event_id": format!("{prefix}-{i}"), "event": "scan", "user_id": format!("u-{prefix}-{}", i % 7),
                   "campaign": "parcel-lottery", "channel": "jd", "ts": "2026-11-20T10:00:00Z"})
        })
        .collect()
}

/// `count(*)` and `count(DISTINCT event_id)` of the node's `events` table.
async fn counts(server: &Server) -> (i64, i64) {
    let resp: Value = reqwest::Client::new()
        .post(format!("{}/v1/sql", server.url))
        .json(&json!({"sql": "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = &resp["rows"][0];
    (row[0].as_i64().unwrap(), row[1].as_i64().unwrap())
}

/// Poll until the node counts `want`, or fail after `within`; how long it took.
async fn wait_for_counts(server: &Server, want: (i64, i64), within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = counts(server).await;
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "counts {got:?}, want {want:?} within {within:?}; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_id(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("node_id")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_bucket_see_each_others_committed_files() {
    let s3 = S3Server::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b): (PathBuf, PathBuf) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = node(&s3, &dir_a, tmp.path(), "a").await;
    let b = node(&s3, &dir_b, tmp.path(), "b").await;
    let (id_a, id_b) = (node_id(&dir_a), node_id(&dir_b));
    assert_ne!(id_a, id_b);

    // Three flushes on each node (so A compacts), and one event_id sent to both.
    for round in 0..3 {
        post(&a, &events(&format!("a{round}"), 40)).await;
        post(&b, &events(&format!("b{round}"), 25)).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    post(&a, &events("both", 1)).await;
    post(&b, &events("both", 1)).await;
    let want = (3 * 40 + 3 * 25 + 2, 3 * 40 + 3 * 25 + 1);
    // Each node sees its own events at once and the other's committed files once they
    // are flushed (1 s), published and read (every 5 s): well within 10 s of the flush.
    let took_a = wait_for_counts(&a, want, Duration::from_secs(12)).await;
    let took_b = wait_for_counts(&b, want, Duration::from_secs(12)).await;
    eprintln!("other node's events visible after {took_a:?} (A) and {took_b:?} (B)");

    // Each node's objects carry its id; each has its list of committed files.
    let objects = s3.objects();
    let parquet: Vec<&String> = objects.iter().filter(|k| k.ends_with(".parquet")).collect();
    assert!(
        parquet
            .iter()
            .all(|k| k.starts_with("test/events/date=2026-11-20/")),
        "{objects:?}"
    );
    for id in [&id_a, &id_b] {
        assert!(
            parquet.iter().any(|k| k.contains(&format!("/{id}-"))),
            "{id}: {objects:?}"
        );
        assert!(
            objects.contains(&format!("test/nodes/{id}.json")),
            "{objects:?}"
        );
    }
    assert!(
        parquet
            .iter()
            .all(|k| k.contains(&format!("/{id_a}-")) || k.contains(&format!("/{id_b}-")))
    );

    // A's three flushed files are compacted into one, whose object replaces theirs in
    // A's list; B keeps counting the same rows.
    let list_a = s3
        .root
        .path()
        .join(BUCKET)
        .join(format!("test/nodes/{id_a}.json"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&list_a)
        .unwrap()
        .contains(&format!("/{id_a}-c"))
    {
        assert!(
            Instant::now() < deadline,
            "no compacted file in A's list:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once B has read A's new list (every 5 s), it counts each row once still.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(counts(&b).await, want, "after A's compaction");
    eprintln!("requests so far: {:?}", s3.requests());

    // Idle, each of the two nodes lists the node lists every 5 s.
    let before = s3.requests();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle: BTreeMap<String, u64> = s3
        .requests()
        .into_iter()
        .map(|(k, n)| {
            let d = n - before.get(&k).copied().unwrap_or(0);
            (k, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    eprintln!("requests in 10 s idle with two nodes: {idle:?}");
    assert!(idle.get("LIST").copied().unwrap_or(0) <= 6, "{idle:?}");

    // A restarted node lists the shared files before it is ready: no waiting.
    assert!(a.terminate().success());
    let a = node(&s3, &dir_a, tmp.path(), "a").await;
    assert_eq!(counts(&a).await, want, "right after /readyz");
    assert_eq!(node_id(&dir_a), id_a, "the node id is kept in the data dir");

    // A node stopped gracefully has published its last flush; the other still reads it.
    post(&b, &events("last", 3)).await;
    assert!(b.terminate().success());
    let want = (want.0 + 3, want.1 + 3);
    wait_for_counts(&a, want, Duration::from_secs(12)).await;

    // Offline, B's data dir with its config reads A's committed files from the bucket too.
    let out = with_credentials(funnelhouse())
        .args([
            "sql",
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events",
        ])
        .arg("--config")
        .arg(tmp.path().join("b.toml"))
        .arg("--data-dir")
        .arg(&dir_b)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.contains('|') && !l.contains('n'))
        .unwrap_or_default();
    let numbers: Vec<i64> = row.split('|').map(|v| v.trim().parse().unwrap()).collect();
    assert_eq!(numbers, [want.0, want.1], "{text}");
    assert!(a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_acknowledged_while_object_storage_is_down_and_published_once_it_is_back() {
    // A port nothing listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let a = Server::spawn_unready(node_command(
        &format!("http://{addr}"),
        &dir,
        tmp.path(),
        "a",
    ))
    .await;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = http
            .post(format!("{}/v1/events", a.url))
            .json(&events("down", 5))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not accepting while the store is down: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = http.get(format!("{}/readyz", a.url)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body = ready.text().await.unwrap();
    assert!(body.contains("listing the other nodes' files"), "{body}");
    assert_eq!(counts(&a).await, (5, 5), "its own events are queryable");

    // The store comes up: the node becomes ready and publishes what it flushed meanwhile.
    let s3 = S3Server::start_on(&addr.to_string()).await;
    a.wait_ready().await;
    // Its publisher backs off to 30 s between attempts while the store is down.
    let deadline = Instant::now() + Duration::from_secs(60);
    let list = s3
        .root
        .path()
        .join(BUCKET)
        .join(format!("test/nodes/{}.json", node_id(&dir)));
    while !std::fs::read_to_string(&list).is_ok_and(|l| l.matches("\"rows\":5").count() == 1) {
        assert!(Instant::now() < deadline, "not published: {}", a.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.terminate().success());
}

#[tokio::test]
async fn a_storage_url_that_is_not_s3_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_file(
        tmp.path(),
        "bad.toml",
        "[storage]\nurl = \"gs://bucket/prefix\"\n",
    );
    let out = serve(&config, &tmp.path().join("data")).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("storage.url: \"gs://bucket/prefix\" is not an s3:// URL"),
        "{stderr}"
    );
}
