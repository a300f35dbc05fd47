//! `funnelhouse serve`: bind, open the store (WAL replay), serve until SIGTERM / Ctrl-C,
//! then finish in-flight requests, flush the live buffer and exit 0.

use std::sync::Arc;

use std::sync::OnceLock;

use funnelhouse_ingest::{CollectorState, EventStore, Metrics};
use funnelhouse_query::{QueryEngine, QueryOptions, QueryState, SnapshotSource};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::error::CliError;

pub async fn serve(cfg: Config) -> Result<(), CliError> {
    let metrics = Arc::new(Metrics::default());
    let state = CollectorState::new(cfg.ingest.clone(), cfg.auth.clone(), Arc::clone(&metrics));
    let query_state = QueryState {
        engine: Arc::new(OnceLock::new()),
        read_tokens: Arc::new(cfg.auth.read_tokens.clone()),
    };
    let app = funnelhouse_ingest::router(state.clone())
        .merge(funnelhouse_query::router(query_state.clone()));

    let listener = TcpListener::bind(&cfg.http_addr).await.map_err(|e| {
        CliError::Io(format!(
            "http_addr {}: cannot bind: {e} (pick another with --http-addr)",
            cfg.http_addr
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    let data_dir = std::path::absolute(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
    tracing::info!("listening on http://{addr}");
    tracing::info!("data in {}", data_dir.display());

    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .into_future(),
    );

    let ingest = cfg.ingest.clone();
    let dir = cfg.data_dir.clone();
    let store_metrics = Arc::clone(&metrics);
    let opened =
        tokio::task::spawn_blocking(move || EventStore::open(&dir, &ingest, store_metrics))
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
        "ready: WAL replayed"
    );
    let store = Arc::new(store);
    let source: Arc<dyn SnapshotSource> = Arc::clone(&store) as Arc<dyn SnapshotSource>;
    let engine = QueryEngine::new(source, &cfg.data_dir, &query_options(&cfg), metrics)
        .map_err(|e| CliError::Query(e.to_string()))?;
    let _ = query_state.engine.set(engine);
    let _ = state.store.set(Arc::clone(&store));

    let served = server
        .await
        .map_err(|e| CliError::Io(format!("server task failed: {e}")))?;
    tracing::info!("stopped accepting requests; flushing the live buffer");
    store.shutdown().await?;
    served.map_err(|e| CliError::Io(format!("http server: {e}")))?;
    tracing::info!("flushed; bye");
    Ok(())
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
        ..QueryOptions::default()
    }
}
