//! Shared fixtures: a collector on 127.0.0.1:0 over a temporary data dir, and helpers
//! to post bodies and read back what was stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use funnelhouse_ingest::collector::with_json_fallbacks;
use funnelhouse_ingest::{CollectorState, router};
use funnelhouse_schemas::AuthConfig;
use funnelhouse_storage::parquet_file::read_file;
use funnelhouse_storage::{
    Disk, EventStore, IngestConfig, Manifest, MetricsSource, OsDisk, StoreMetrics,
};
use serde_json::Value;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub url: String,
    pub store: Arc<EventStore>,
    pub http: reqwest::Client,
    pub dir: PathBuf,
    server: JoinHandle<()>,
    _tmp: Option<tempfile::TempDir>,
}

/// What came back from a request.
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
}

impl TestServer {
    pub async fn start(cfg: IngestConfig) -> TestServer {
        Self::start_with(cfg, AuthConfig::default(), None).await
    }

    /// Start on `dir` (a restart) or a fresh temporary dir.
    pub async fn start_with(cfg: IngestConfig, auth: AuthConfig, dir: Option<&Path>) -> TestServer {
        Self::start_state(cfg, auth, dir, |state| state).await
    }

    /// Like [`start_with`], with the collector state adjusted (landing pages, `[http]`).
    pub async fn start_state(
        cfg: IngestConfig,
        auth: AuthConfig,
        dir: Option<&Path>,
        adjust: impl FnOnce(CollectorState) -> CollectorState,
    ) -> TestServer {
        Self::start_on(Arc::new(OsDisk), cfg, auth, dir, adjust).await
    }

    /// Like [`start_state`], with the store writing through `disk`.
    pub async fn start_on(
        disk: Arc<dyn Disk>,
        cfg: IngestConfig,
        auth: AuthConfig,
        dir: Option<&Path>,
        adjust: impl FnOnce(CollectorState) -> CollectorState,
    ) -> TestServer {
        let tmp = dir.is_none().then(|| tempfile::tempdir().unwrap());
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| tmp.as_ref().unwrap().path().to_path_buf());
        let metrics = Arc::new(StoreMetrics::default());
        let state = adjust(
            CollectorState::new(cfg.clone(), auth)
                .with_exported_metrics(vec![Arc::clone(&metrics) as Arc<dyn MetricsSource>]),
        );
        let (store, _) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || EventStore::open_on(disk, &dir, &cfg, metrics))
                .await
                .unwrap()
                .unwrap()
        };
        let store = Arc::new(store);
        state.store.set(Arc::clone(&store)).ok().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, with_json_fallbacks(router(state)))
                .await
                .unwrap()
        });
        TestServer {
            url,
            store,
            http: reqwest::Client::new(),
            dir,
            server,
            _tmp: tmp,
        }
    }

    pub async fn post(&self, body: impl Into<reqwest::Body>, content_type: &str) -> Reply {
        self.request(
            self.post_to("/v1/events")
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    /// A POST to `path` of this server, to finish and send with [`Self::request`].
    pub fn post_to(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub async fn post_json(&self, body: &Value) -> Reply {
        self.post(body.to_string(), "application/json").await
    }

    pub async fn request(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            json,
        }
    }

    /// Stop serving and flush (graceful), keeping the data dir for a restart.
    pub async fn stop(self) -> Option<tempfile::TempDir> {
        self.server.abort();
        self.store.shutdown().await.unwrap();
        self._tmp
    }

    /// Every stored row (committed files and live buffer), as the store sees it now.
    pub fn rows(&self) -> Vec<Row> {
        store_rows(&self.store, &self.dir)
    }
}

/// Every row `store` (on `dir`) holds now: committed files and live buffer.
pub fn store_rows(store: &EventStore, dir: &Path) -> Vec<Row> {
    let snap = store.snapshot();
    let mut rows = Vec::new();
    for f in snap.files.iter() {
        for b in read_file(&dir.join(&f.path), None).unwrap() {
            rows.extend(batch_rows(&b));
        }
    }
    for b in &snap.batches {
        rows.extend(batch_rows(b));
    }
    rows
}

/// One stored event, as plain values for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub event_id: String,
    pub event: String,
    pub user_id: String,
    pub campaign: String,
    pub channel: String,
    pub ts: i64,
    pub received_at: i64,
    pub properties: Option<String>,
}

pub fn batch_rows(b: &RecordBatch) -> Vec<Row> {
    let s = |i: usize| b.column(i).as_string_view();
    let t = |i: usize| {
        b.column(i)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
    };
    (0..b.num_rows())
        .map(|r| Row {
            event_id: s(0).value(r).to_string(),
            event: s(1).value(r).to_string(),
            user_id: s(2).value(r).to_string(),
            campaign: s(3).value(r).to_string(),
            channel: s(4).value(r).to_string(),
            ts: t(5).value(r),
            received_at: t(6).value(r),
            properties: (!s(7).is_null(r)).then(|| s(7).value(r).to_string()),
        })
        .collect()
}

/// Rows of the committed Parquet files of a data dir (no server running).
pub fn committed_rows(dir: &Path) -> Vec<Row> {
    let manifest = Manifest::load(dir).unwrap();
    manifest
        .files
        .iter()
        .flat_map(|f| read_file(&dir.join(&f.path), None).unwrap())
        .flat_map(|b| batch_rows(&b))
        .collect()
}

/// Wait (up to 20 s) until `done` holds: for work the store does in the background.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A valid event with the given id.
pub fn event(id: &str) -> Value {
    serde_json::json!({
        "event_id": id, "event": "scan", "user_id": "u-1", "campaign": "parcel-lottery",
        "channel": "jd", "ts": "2026-11-11T10:00:00.123Z", "properties": {"card": "A3"}
    })
}

/// A config for tests: defaults, with flushing only when asked.
pub fn config() -> IngestConfig {
    IngestConfig {
        flush_interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}
