//! `funnelhouse scheduler` and `funnelhouse executor`: a Ballista cluster from this
//! binary, with our tables, plan nodes and functions known to every process.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use funnelhouse_cluster::ExecutorOptions;
use funnelhouse_storage::{SharedReader, SharedStore};

use crate::config::Config;
use crate::error::CliError;

#[derive(Args)]
pub struct SchedulerArgs {
    /// Where executors and clients (`[query] ballista = "df://ADDR"`) reach the scheduler.
    #[arg(long, default_value = "127.0.0.1:50050")]
    bind: String,
}

#[derive(Args)]
pub struct ExecutorArgs {
    /// The scheduler, `df://HOST:PORT`.
    #[arg(long)]
    scheduler: String,
    /// Where this executor serves its shuffle data (Arrow Flight) to the others and to
    /// clients; its other port is picked free.
    #[arg(long, default_value = "127.0.0.1:50051")]
    bind: String,
    /// Tasks run at once [default: the number of cores].
    #[arg(long, default_value_t = 0)]
    concurrent_tasks: usize,
    /// Where shuffle and spill files go [default: a folder in the system temp dir].
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

pub async fn scheduler(args: SchedulerArgs, cfg: &Config) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .map_err(|e| CliError::Io(format!("cannot listen on {}: {e}", args.bind)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Io(e.to_string()))?;
    tracing::info!(
        "Ballista scheduler listening on {addr} (start executors with \
         `funnelhouse executor --scheduler df://{addr}`, and set [query] ballista = \"df://{addr}\")"
    );
    funnelhouse_cluster::run_scheduler(listener, shared_reader(cfg).await?)
        .await
        .map_err(|e| CliError::Io(format!("scheduler: {e}")))
}

pub async fn executor(args: ExecutorArgs, cfg: &Config) -> Result<(), CliError> {
    let scheduler = resolve(
        args.scheduler
            .strip_prefix("df://")
            .unwrap_or(&args.scheduler),
    )
    .await
    .map_err(|e| CliError::Config(format!("--scheduler {}: {e}", args.scheduler)))?;
    let mut bind = resolve(&args.bind)
        .await
        .map_err(|e| CliError::Config(format!("--bind {}: {e}", args.bind)))?;
    let [flight, grpc_port] = free_ports(bind)?;
    if bind.port() == 0 {
        bind.set_port(flight);
    }
    let shared = shared_reader(cfg).await?;
    let work_dir = (args.work_dir).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("funnelhouse-executor-{}", bind.port()))
    });
    tracing::info!(
        "Ballista executor on {bind} (gRPC on port {grpc_port}), scheduler {scheduler}, \
         work dir {}{}",
        work_dir.display(),
        match &shared {
            Some(s) => format!(", reading {}", s.url),
            None => String::new(),
        }
    );
    funnelhouse_cluster::run_executor(ExecutorOptions {
        scheduler,
        bind,
        grpc_port,
        concurrent_tasks: args.concurrent_tasks,
        work_dir,
        shared,
    })
    .await
    .map_err(|e| CliError::Io(format!("executor: {e}")))
}

/// The shared object store of the config's `[storage]`, when it has a url.
async fn shared_reader(cfg: &Config) -> Result<Option<SharedReader>, CliError> {
    if cfg.storage.url.is_none() {
        return Ok(None);
    }
    let storage = cfg.storage.clone();
    let connect = move || SharedStore::connect(&storage, "");
    let store = tokio::task::spawn_blocking(connect)
        .await
        .map_err(|e| CliError::Io(e.to_string()))??;
    Ok(Some(store.reader()))
}

async fn resolve(host_port: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("resolves to no address"))
}

/// Two different ports free now on `addr`'s interface (the executor binds them a moment
/// later).
fn free_ports(addr: SocketAddr) -> Result<[u16; 2], CliError> {
    let probe = || {
        std::net::TcpListener::bind((addr.ip(), 0))
            .map_err(|e| CliError::Io(format!("cannot find a free port on {}: {e}", addr.ip())))
    };
    // Both held at once, so they differ.
    let (a, b) = (probe()?, probe()?);
    let port = |l: &std::net::TcpListener| {
        (l.local_addr().map(|a| a.port())).map_err(|e| CliError::Io(format!("a probe port: {e}")))
    };
    Ok([port(&a)?, port(&b)?])
}
