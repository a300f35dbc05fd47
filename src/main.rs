//! `funnelhouse`: the command line. Only parsing and wiring live here; the work is done
//! by the `funnelhouse-schemas`, `funnelhouse-storage`, `funnelhouse-ingest`,
//! `funnelhouse-query` and `funnelhouse-cluster` crates.

mod cluster_cli;
mod config;
mod demo;
mod error;
mod generate;
mod import;
mod query_cli;
mod serve;
mod wal_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::error::CliError;

/// Ingest frees events on another thread than the one that decoded them, and the
/// funnel fold allocates many row buckets: mimalloc handles both far better than the
/// system allocator (measured in benches/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the `mi_option_t` enum of the mimalloc v3 that Cargo.lock
/// pins (libmimalloc-sys 0.1.49, `include/mimalloc.h`; its Rust bindings leave it out).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

/// The server keeps the memory it has freed instead of giving it back to the kernel a
/// second later (mimalloc's default): ingest frees each live batch after its flush and
/// allocates the next ones at once, so every purge came back as fresh pages the kernel
/// zeroed, 2 MiB at a time (`clear_page_erms` was 29% of the server's CPU in a load;
/// benches/README.md). The live buffer and the query memory pool bound what is kept.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides, as mimalloc documents.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; -1 is its documented "never".
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[derive(Parser)]
#[command(
    name = "funnelhouse",
    version,
    about = "Event tracking and funnel analytics: collector, storage and queries"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// Config file (TOML); defaults apply without one.
    #[arg(long, global = true, env = "FUNNELHOUSE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long, global = true, env = "FUNNELHOUSE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, global = true, env = "FUNNELHOUSE_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Postgres wire listen address [default: 127.0.0.1:5433].
    #[arg(long, global = true, env = "FUNNELHOUSE_PG_ADDR")]
    pg_addr: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector, the query server, the Postgres wire and the dashboard.
    Serve(serve::ServeArgs),
    /// Post events from NDJSON, CSV or Parquet files to a running server.
    Import(import::ImportArgs),
    /// Generate synthetic campaign events (NDJSON to a file, or straight to a server).
    Gen(generate::GenArgs),
    /// Run read-only SQL over all events and print a table.
    Sql(query_cli::SqlArgs),
    /// Compute a funnel (counts, conversion, pending, medians; optional breakdown).
    Funnel(query_cli::FunnelArgs),
    /// Merge small Parquet files and drop late duplicates (offline: stop the server first).
    Compact,
    /// Inspect the write-ahead log, or salvage a damaged one.
    #[command(subcommand)]
    Wal(wal_cli::WalCommand),
    /// Run a Ballista scheduler that runs SQL and funnels on its executors (reads the
    /// config's `[storage]`).
    Scheduler(cluster_cli::SchedulerArgs),
    /// Run a Ballista executor for a scheduler (reads the config's `[storage]`, never
    /// locks the data dir).
    Executor(cluster_cli::ExecutorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let overrides = Overrides {
        data_dir: cli.global.data_dir,
        http_addr: cli.global.http_addr,
        pg_addr: cli.global.pg_addr,
    };
    let result =
        Config::load(cli.global.config.as_deref(), overrides).and_then(|cfg| run(cli.command, cfg));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Below this `memory_limit` the process does without transparent huge pages (Linux).
#[cfg(target_os = "linux")]
const HUGE_PAGES_FROM: usize = 1 << 30;

fn run(command: Command, cfg: Config) -> Result<ExitCode, CliError> {
    #[cfg(target_os = "linux")]
    if cfg.query.memory_limit.0 < HUGE_PAGES_FROM {
        // A 2 MiB page the allocator touches at all counts whole in the RSS: under a
        // 128 MiB pool that was ~100 MB more at the peak of a 10M-event funnel. A small
        // memory_limit asks for a tight RSS more than for the few percent huge pages save.
        // SAFETY: prctl with these arguments only sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Io(format!("cannot start the runtime: {e}")))?;
    match command {
        Command::Serve(args) => {
            funnelhouse_storage::parquet_file::keep_c_heap();
            keep_freed_memory();
            // Queries get their own worker threads, so a heavy scan never delays the
            // ingest handlers that acknowledge events.
            let queries = tokio::runtime::Builder::new_multi_thread()
                .thread_name("query")
                .enable_all()
                .build()
                .map_err(|e| CliError::Io(format!("cannot start the query runtime: {e}")))?;
            let served = runtime.block_on(serve::serve(cfg, args, queries.handle().clone()));
            queries.shutdown_background();
            served.map(|()| ExitCode::SUCCESS)
        }
        Command::Import(args) => runtime.block_on(import::run(args, &cfg)),
        Command::Gen(args) => runtime
            .block_on(generate::run(args, &cfg))
            .map(|()| ExitCode::SUCCESS),
        Command::Sql(args) => runtime
            .block_on(query_cli::sql(args, &cfg))
            .map(|()| ExitCode::SUCCESS),
        Command::Funnel(args) => runtime
            .block_on(query_cli::funnel(args, &cfg))
            .map(|()| ExitCode::SUCCESS),
        Command::Compact => {
            let outcome = funnelhouse_storage::compact_data_dir(&cfg.data_dir, &cfg.ingest)?;
            println!(
                "compacted {} partitions: {} files, {} rows in, {} rows out ({} late duplicates dropped)",
                outcome.partitions,
                outcome.files_in,
                outcome.rows_in,
                outcome.rows_out,
                outcome.rows_in - outcome.rows_out
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Wal(command) => wal_cli::run(command, &cfg),
        Command::Scheduler(args) => runtime
            .block_on(cluster_cli::scheduler(args, &cfg))
            .map(|()| ExitCode::SUCCESS),
        Command::Executor(args) => runtime
            .block_on(cluster_cli::executor(args, &cfg))
            .map(|()| ExitCode::SUCCESS),
    }
}

fn init_tracing() {
    use std::io::IsTerminal;
    // Ballista's client logs each job it submits and polls at info: noise in `funnelhouse
    // sql` and in a server's log, so only its warnings by default.
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FUNNELHOUSE_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,ballista_core::execution_plans=warn")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index is mimalloc's purge delay: its default is 1000 ms in v3, and no
    /// neighbouring option has that default.
    #[test]
    fn purge_delay_option_index_is_mimallocs() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads one integer option of the allocator.
            assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        }
    }
}
