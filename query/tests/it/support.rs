//! Shared fixtures: the collector and query routers over one store on 127.0.0.1:0, and
//! engines over fixed in-memory event sets.

use std::sync::Arc;

use funnelhouse_ingest::CollectorState;
use funnelhouse_query::{QueryEngine, QueryOptions, QueryState, SnapshotSource, StaticSource};
use funnelhouse_schemas::{Event, EventRef, events_to_batch};
use funnelhouse_storage::parquet_file::write_partitioned;
use funnelhouse_storage::{EventStore, IngestConfig, OsDisk, Partitioning, Snapshot};
use serde_json::Value;

pub struct TestServer {
    pub url: String,
    pub store: Arc<EventStore>,
    pub http: reqwest::Client,
    pub engine: QueryEngine,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(QueryState::default()).await
    }

    /// With campaigns, alerts or read tokens set in `query`.
    pub async fn start_with(query: QueryState) -> TestServer {
        Self::start_with_config(query, Self::no_timed_flush(), QueryOptions::default()).await
    }

    /// With query limits set in `opts`.
    pub async fn start_with_options(opts: QueryOptions) -> TestServer {
        Self::start_with_config(QueryState::default(), Self::no_timed_flush(), opts).await
    }

    /// Tests flush when they mean to.
    fn no_timed_flush() -> IngestConfig {
        IngestConfig {
            flush_interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        }
    }

    pub async fn start_with_config(
        query: QueryState,
        cfg: IngestConfig,
        opts: QueryOptions,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let c = cfg.clone();
        let (store, _) =
            tokio::task::spawn_blocking(move || EventStore::open(&path, &c, Arc::default()))
                .await
                .unwrap()
                .unwrap();
        let store = Arc::new(store);
        let source: Arc<dyn SnapshotSource> = Arc::clone(&store) as Arc<dyn SnapshotSource>;
        let engine = QueryEngine::new(source, dir.path(), &opts, Arc::default()).unwrap();
        let ingest = CollectorState::new(cfg, Default::default());
        ingest.store.set(Arc::clone(&store)).ok().unwrap();
        query.engine.set(engine.clone()).ok().unwrap();
        let app = funnelhouse_ingest::router(ingest).merge(funnelhouse_query::router(query));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestServer {
            url,
            store,
            http: reqwest::Client::new(),
            engine,
            _dir: dir,
        }
    }

    pub async fn post_events(&self, events: &Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/v1/events", self.url))
            .json(events)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// GET `path` (with its query string), as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await;
        resp.unwrap().json().await.unwrap()
    }

    /// POST /v1/sql with a JSON body; (status, body text, content type).
    pub async fn sql(&self, sql: &str, format: &str) -> (u16, String, String) {
        let resp = self
            .http
            .post(format!("{}/v1/sql?format={format}", self.url))
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, resp.text().await.unwrap(), ct)
    }

    pub async fn sql_json(&self, sql: &str) -> Value {
        let (status, body, _) = self.sql(sql, "json").await;
        assert_eq!(status, 200, "{sql}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// An engine over exactly these events, held in memory.
pub fn engine_over(events: &[Event]) -> QueryEngine {
    engine_over_layout(events, &[LIVE], QueryOptions::default()).0
}

/// Where [`engine_over_layout`] keeps an event: in one of two Parquet files or in the
/// live buffer.
pub const FILE_A: u8 = 0;
pub const FILE_B: u8 = 1;
pub const LIVE: u8 = 2;

/// An engine over these events, event i kept where `places[i % places.len()]` says,
/// with `opts` (two partitions). The files live in the returned directory.
pub fn engine_over_layout(
    events: &[Event],
    places: &[u8],
    opts: QueryOptions,
) -> (QueryEngine, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let kept = |place: u8| -> Vec<Event> {
        (events.iter().enumerate())
            .filter(|(i, _)| places[i % places.len()] == place)
            .map(|(_, e)| e.clone())
            .collect()
    };
    let mut files = Vec::new();
    for place in [FILE_A, FILE_B] {
        let batch = events_to_batch(&kept(place));
        files.extend(
            write_partitioned(
                &OsDisk,
                dir.path(),
                &[batch],
                Partitioning::Day,
                &format!("f{place}"),
                1,
            )
            .unwrap(),
        );
    }
    let snapshot = Snapshot {
        files: Arc::new(files),
        batches: vec![events_to_batch(&kept(LIVE))],
        batches_pushed: 1,
        ..Default::default()
    };
    let opts = QueryOptions {
        target_partitions: 2,
        ..opts
    };
    let engine = QueryEngine::new(
        Arc::new(StaticSource(snapshot)),
        dir.path(),
        &opts,
        Arc::default(),
    )
    .unwrap();
    (engine, dir)
}

/// A funnel question from query parameters, as `GET /v1/funnel` takes them.
pub fn funnel_spec(params: &[(&str, &str)]) -> funnelhouse_query::funnel::FunnelSpec {
    let params = (params.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    funnelhouse_query::funnel::FunnelRequest::from_query(&params)
        .unwrap()
        .into_spec()
        .unwrap()
}

/// The spills of the funnel fold in a plan printed with its metrics.
pub fn spill_count(plan: &str) -> u64 {
    plan.lines()
        .filter(|l| l.contains("FunnelFoldExec"))
        .flat_map(|l| l.split(['[', ',', ']']))
        .filter_map(|m| m.trim().strip_prefix("spill_count="))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

pub fn ev(id: &str, user: &str, event: &str, channel: &str, ts: i64, props: Option<&str>) -> Event {
    Event::from(EventRef {
        event_id: id,
        event,
        user_id: user,
        campaign: "c",
        channel,
        ts,
        received_at: 0,
        properties: props,
    })
}
