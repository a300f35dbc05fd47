//! `funnelhouse serve`: bind HTTP and the Postgres wire, open the store (WAL replay),
//! serve until SIGTERM / Ctrl-C, then finish in-flight requests, flush the live buffer
//! and exit 0.

use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::OnceLock;

use funnelhouse_ingest::CollectorState;
use funnelhouse_query::{
    Alerts, QueryEngine, QueryMetrics, QueryOptions, QueryState, SnapshotSource,
};
use funnelhouse_storage::{EventStore, MetricsSource, OsDisk, StoreMetrics};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::CliError;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Add a demo campaign (config written to the data dir) with three days of history and
    /// live events trickling in, to see the dashboard move.
    #[arg(long)]
    demo: bool,
}

pub async fn serve(
    mut cfg: Config,
    args: ServeArgs,
    queries: tokio::runtime::Handle,
) -> Result<(), CliError> {
    let demo = if args.demo {
        let campaign = crate::demo::campaign(&cfg.data_dir)?;
        cfg.campaigns.retain(|c| c.name != campaign.name);
        cfg.campaigns.push(campaign.clone());
        Some(campaign)
    } else {
        None
    };
    let store_metrics = Arc::new(StoreMetrics::default());
    let query_metrics = Arc::new(QueryMetrics::default());
    let state = CollectorState::new(cfg.ingest.clone(), cfg.auth.clone())
        .with_exported_metrics(vec![
            Arc::clone(&store_metrics) as Arc<dyn MetricsSource>,
            Arc::clone(&query_metrics) as Arc<dyn MetricsSource>,
        ])
        .with_http(cfg.http.clone())
        .with_landing_pages(cfg.landing_pages());
    let campaigns = Arc::new(cfg.campaigns.clone());
    let alerts = Arc::new(Alerts::open(Arc::clone(&campaigns), &cfg.data_dir));
    let query_state = QueryState {
        engine: Arc::new(OnceLock::new()),
        read_tokens: Arc::new(cfg.auth.read_tokens.clone()),
        campaigns,
        alerts: Some(Arc::clone(&alerts)),
    };
    let app = funnelhouse_ingest::collector::with_json_fallbacks(
        funnelhouse_ingest::router(state.clone())
            .merge(funnelhouse_query::router(query_state.clone())),
    );

    let (listener, addr) = bind("http_addr", &cfg.http_addr).await?;
    let (pg_listener, pg_addr) = bind("pg_addr", &cfg.pg_addr).await?;
    let data_dir = std::path::absolute(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    tracing::info!("listening on http://{addr}");
    tracing::info!(
        "postgres wire on {pg_addr} (database funnelhouse; psql -h {} -p {} funnelhouse)",
        pg_addr.ip(),
        pg_addr.port()
    );
    tracing::info!("data in {}", data_dir.display());
    tracing::info!("dashboard at http://{addr}/");

    let limits = cfg.http.clone();
    let server = tokio::spawn(async move {
        funnelhouse_ingest::server::serve(listener, app, &limits, shutdown_signal()).await
    });

    let ingest = cfg.ingest.clone();
    let storage = cfg.storage.clone();
    let dir = cfg.data_dir.clone();
    if let Some(url) = &storage.url {
        tracing::info!(
            "Parquet also on {url} (shared object storage; WAL and dedup stay in the data dir)"
        );
    }
    let opened = tokio::task::spawn_blocking(move || {
        EventStore::open_with(Arc::new(OsDisk), &dir, &ingest, &storage, store_metrics)
    })
    .await
    .map_err(|e| CliError::Io(format!("store start-up panicked: {e}")))?;
    let (store, report) = match opened {
        Ok(x) => x,
        Err(e) => {
            server.abort();
            return Err(e.into());
        }
    };
    tracing::info!(
        files = report.files,
        stored_rows = report.stored_rows,
        replayed_events = report.replayed_events,
        wal_dropped_bytes = report.wal_dropped_bytes,
        dedup_ids = report.dedup_ids,
        node = store.node().unwrap_or("-"),
        "ready: WAL replayed"
    );
    let store = Arc::new(store);
    let source: Arc<dyn SnapshotSource> = Arc::clone(&store) as Arc<dyn SnapshotSource>;
    let opts = QueryOptions {
        runtime: Some(queries.clone()),
        shared: store.shared_reader(),
        ..query_options(&cfg)
    };
    let engine = QueryEngine::new(source, &cfg.data_dir, &opts, query_metrics)
        .map_err(|e| CliError::Query(e.to_string()))?;
    let pg_engine = engine.clone();
    let read_tokens = cfg.auth.read_tokens.clone();
    let pg = queries.spawn(async move {
        if let Err(e) = funnelhouse_query::serve_pg(pg_listener, &pg_engine, read_tokens).await {
            tracing::error!(error = %e, "postgres wire stopped");
        }
    });
    let demo_trickle = match &demo {
        Some(campaign) => {
            crate::demo::seed_history(&store, &cfg.data_dir, campaign).await?;
            Some(tokio::spawn(crate::demo::trickle(Arc::clone(&store))))
        }
        None => None,
    };
    let evaluator = queries.spawn(alerts.run(engine.clone()));
    // Each campaign's funnel is kept up to date so dashboards polling it cost no scan
    // (not on a cluster: its funnels read committed files only, see `funnel::partial`).
    let tracked = query_state.campaigns.iter().filter(|c| c.funnel.is_some());
    for campaign in tracked.filter(|_| !engine.is_distributed()) {
        let spec = campaign
            .spec(None, None, None)
            .map_err(|e| CliError::Query(e.to_string()))?;
        engine.live().track(spec);
    }
    let live = queries.spawn(funnelhouse_query::LiveFunnels::run(
        engine.clone(),
        LIVE_REFRESH
            .min(cfg.ingest.flush_interval / 2)
            .max(std::time::Duration::from_millis(50)),
    ));
    let _ = query_state.engine.set(engine);
    let _ = state.store.set(Arc::clone(&store));

    server
        .await
        .map_err(|e| CliError::Io(format!("server task failed: {e}")))?;
    pg.abort();
    evaluator.abort();
    live.abort();
    if let Some(t) = demo_trickle {
        t.abort();
    }
    tracing::info!("stopped accepting requests; flushing the live buffer");
    store.shutdown().await?;
    tracing::info!("flushed; bye");
    Ok(())
}

/// How often live campaign funnels take in new events between polls (at most half the
/// flush interval: a funnel that misses two flushes rebuilds).
const LIVE_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Bind `addr` (the config key `key`), with the address actually bound (port 0 picks one).
async fn bind(key: &str, addr: &str) -> Result<(TcpListener, SocketAddr), CliError> {
    let flag = key.replace('_', "-");
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        CliError::Io(format!(
            "{key} {addr}: cannot bind: {e} (pick another with --{flag})"
        ))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    Ok((listener, bound))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The `[query]` section as engine options.
pub fn query_options(cfg: &Config) -> QueryOptions {
    QueryOptions {
        timeout: cfg.query.timeout,
        memory_limit: cfg.query.memory_limit.0,
        max_result_rows: cfg.query.max_result_rows,
        // Checked when the config was loaded.
        distribute: cfg.query.distribute.clone(),
        ..QueryOptions::default()
    }
}
