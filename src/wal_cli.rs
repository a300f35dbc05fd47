//! `funnelhouse wal check` / `wal salvage`: what the WAL holds, and a way past damage.

use clap::Subcommand;
use funnelhouse_storage::fsutil::DataDirLock;
use funnelhouse_storage::wal::{self, SegmentReport};

use crate::config::Config;
use crate::error::CliError;

#[derive(Subcommand)]
pub enum WalCommand {
    /// Report each WAL segment: readable records and events, and any damage (exit 1 when
    /// a segment has damage before its tail, which stops `serve`).
    Check,
    /// Rewrite each damaged segment with every readable record, keeping the original as
    /// `<segment>.damaged` (offline: stop the server first).
    Salvage,
}

pub fn run(command: WalCommand, cfg: &Config) -> Result<std::process::ExitCode, CliError> {
    // A missing data dir made salvage fail on `data/LOCK` and check report an empty WAL,
    // neither naming the dir. Other errors (a denied permission) keep their own reason.
    let missing = match std::fs::metadata(&cfg.data_dir) {
        Ok(meta) => !meta.is_dir(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    if missing {
        return Err(CliError::Io(format!(
            "no data dir at {}: pass --data-dir (or set data_dir in the config) to the \
             directory the server writes",
            cfg.data_dir.display()
        )));
    }
    let dir = cfg.data_dir.join("wal");
    match command {
        WalCommand::Check => {
            let reports = wal::check(&dir)?;
            let mut damaged = 0;
            for r in &reports {
                let verdict = match &r.damage {
                    None => "ok".to_string(),
                    Some(d) if d.records_after == 0 => format!(
                        "tail cut at start-up: byte {} onwards ({})",
                        d.offset, d.reason
                    ),
                    Some(d) => {
                        damaged += 1;
                        format!("DAMAGED: {d}; run `funnelhouse wal salvage`")
                    }
                };
                println!("{}: {verdict}", summary(r));
            }
            println!(
                "{}, {damaged} with damage before the tail",
                segments(reports.len())
            );
            Ok(std::process::ExitCode::from(if damaged > 0 {
                1
            } else {
                0
            }))
        }
        WalCommand::Salvage => {
            let _lock = DataDirLock::acquire(&cfg.data_dir)?;
            let rewritten = wal::salvage(&dir)?;
            for r in &rewritten {
                println!(
                    "{}: kept every readable record; the original is {}.damaged",
                    summary(r),
                    r.path.display()
                );
            }
            println!("{} salvaged", segments(rewritten.len()));
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn summary(r: &SegmentReport) -> String {
    format!(
        "{} ({} bytes): {} readable records, {} events",
        r.path.display(),
        r.bytes,
        r.records,
        r.events
    )
}

/// "1 segment", "2 segments".
fn segments(n: usize) -> String {
    format!("{n} segment{}", if n == 1 { "" } else { "s" })
}
