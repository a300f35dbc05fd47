//! The processes of a Ballista cluster of ours (`funnelhouse scheduler`, `funnelhouse
//! executor`) and the session that sends an engine's queries to it (`[query] ballista`).
//! Each carries our codecs; the scheduler plans with the session config its client sent,
//! so `target_partitions` and the Parquet options are the client's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ballista_core::RuntimeProducer;
use ballista_core::config::BALLISTA_CLIENT_PULL;
use ballista_core::extension::{SessionConfigExt, SessionStateExt};
use ballista_core::utils::default_session_builder;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use ballista_scheduler::scheduler_server::SessionBuilder;
use datafusion::error::Result as DfResult;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use funnelhouse_query::Distribute;
use funnelhouse_storage::SharedReader;

use crate::cancel::CancellingPlanner;
use crate::codec::{LogicalCodec, PhysicalCodec};
use crate::error::{ClusterError, Result};

/// Serve a scheduler on `listener` until the process ends; executors and clients reach
/// it at the listener's address. It plans over `shared` too (the shared object store of
/// `[storage] url`): DataFusion looks a file scan's object store up while planning it.
pub async fn run_scheduler(
    listener: tokio::net::TcpListener,
    shared: Option<SharedReader>,
) -> Result<()> {
    let addr = listener.local_addr()?;
    let session_builder = shared.map(|shared| -> SessionBuilder {
        Arc::new(move |config| {
            let state = default_session_builder(config)?;
            register_shared(state.runtime_env(), &shared)?;
            Ok(state)
        })
    });
    let config = SchedulerConfig {
        override_session_builder: session_builder,
        bind_host: addr.ip().to_string(),
        bind_port: addr.port(),
        external_host: addr.ip().to_string(),
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        ..SchedulerConfig::default()
    };
    config.validate()?;
    let cluster = BallistaCluster::new_from_config(&config).await?;
    let scheduler =
        create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, Arc::new(config)).await?;
    start_grpc_service_with_listener(listener, scheduler).await?;
    Ok(())
}

/// Where an executor listens and whom it serves.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's `host:port`.
    pub scheduler: SocketAddr,
    /// Shuffle data is served (Arrow Flight) on this address; others must reach it.
    pub bind: SocketAddr,
    /// The executor's own gRPC port (the scheduler's calls to it).
    pub grpc_port: u16,
    /// Tasks run at once; 0: the number of cores.
    pub concurrent_tasks: usize,
    /// Where shuffle files go; created if missing.
    pub work_dir: PathBuf,
    /// The shared object store of `[storage] url`, where other nodes' files are.
    pub shared: Option<SharedReader>,
}

/// Run an executor until the process ends or its scheduler stops it.
pub async fn run_executor(opts: ExecutorOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let work_dir = (opts.work_dir.to_str())
        .ok_or_else(|| ClusterError::Config("the work dir must be valid UTF-8".into()))?;
    let config = ExecutorProcessConfig {
        bind_host: opts.bind.ip().to_string(),
        // Bound to all interfaces: the scheduler then uses the address it sees.
        external_host: (!opts.bind.ip().is_unspecified()).then(|| opts.bind.ip().to_string()),
        port: opts.bind.port(),
        grpc_port: opts.grpc_port,
        scheduler_host: opts.scheduler.ip().to_string(),
        scheduler_port: opts.scheduler.port(),
        // Started together with its scheduler: wait for it rather than fail at once.
        scheduler_connect_timeout_seconds: 30,
        vcores: opts.concurrent_tasks,
        work_dir: Some(work_dir.to_string()),
        print_thread_info: false,
        override_runtime_producer: Some(runtime_producer(&opts)),
        override_logical_codec: Some(Arc::new(LogicalCodec::default())),
        override_physical_codec: Some(Arc::new(PhysicalCodec::default())),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config)).await?;
    Ok(())
}

/// Ballista's runtime for each session (spill files in the work dir), which also reads
/// the shared object store.
fn runtime_producer(opts: &ExecutorOptions) -> RuntimeProducer {
    let (work_dir, shared) = (opts.work_dir.clone(), opts.shared.clone());
    Arc::new(move |_config| {
        let runtime = RuntimeEnvBuilder::new()
            .with_temp_file_path(&work_dir)
            .build()?;
        if let Some(shared) = &shared {
            register_shared(&runtime, shared)?;
        }
        Ok(Arc::new(runtime))
    })
}

fn register_shared(runtime: &RuntimeEnv, shared: &SharedReader) -> DfResult<()> {
    let url = ObjectStoreUrl::parse(&shared.url)?;
    runtime.register_object_store(url.as_ref(), Arc::clone(&shared.store));
    Ok(())
}

/// The engine's session turned into a client of the scheduler at `scheduler`
/// (`df://host:port` or `host:port`): its SQL and funnels are planned by the scheduler
/// and run on its executors.
pub fn distribute(scheduler: &str) -> Result<Distribute> {
    let host_port = scheduler.strip_prefix("df://").unwrap_or(scheduler);
    let port = host_port
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    if !matches!(port, Some((host, Ok(_))) if !host.is_empty() && !host.contains('/')) {
        return Err(ClusterError::Config(format!(
            "{scheduler:?} is not df://HOST:PORT (the scheduler's address)"
        )));
    }
    let url = format!("http://{host_port}");
    Ok(Distribute(Arc::new(move |state| {
        let config = (state.config().clone())
            .with_ballista_logical_extension_codec(Arc::new(LogicalCodec::default()))
            .with_ballista_physical_extension_codec(Arc::new(PhysicalCodec::default()));
        let state = SessionStateBuilder::new_from_existing(state)
            .with_config(config)
            .build();
        let mut state = state.upgrade_for_ballista(url.clone())?;
        // Pull mode learns a job's id as the scheduler takes it (push mode only with
        // the job's first status change, which a long stage delays), so a query that
        // ends early can cancel its job; it polls the job's status every 50 ms.
        (state.config_mut().options_mut()).set(BALLISTA_CLIENT_PULL, "true")?;
        let planner = CancellingPlanner {
            inner: Arc::clone(state.query_planner()),
            scheduler: url.clone(),
        };
        Ok(SessionStateBuilder::new_from_existing(state)
            .with_query_planner(Arc::new(planner))
            .build())
    })))
}
