//! `funnelhouse gen`: synthetic campaign events for demos, tests and benchmarks.
//!
//! Users of several campaigns arrive through channels with channel-specific drop-off
//! along package -> scan -> view -> draw; some events arrive late (old ts) and some are
//! sent twice (same event_id). Event ids are `<user_id>-<n>`, as the browser SDK makes
//! them (device id + counter), so a retried send repeats its id. Output is NDJSON to a
//! file / stdout, or posted straight to a server.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use funnelhouse_schemas::time::{format_micros, parse_rfc3339};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::config::Config;
use crate::error::CliError;
use crate::import::Poster;

#[derive(Args, Clone)]
pub struct GenArgs {
    /// About how many events to generate.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Number of campaigns (`parcel-lottery`, then `campaign-2`, ...).
    #[arg(long, default_value_t = 3)]
    campaigns: usize,
    /// First event time (RFC 3339).
    #[arg(long, default_value = "2026-11-01T00:00:00Z")]
    start: String,
    /// Days over which first steps spread.
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Fraction of events sent a second time with the same event_id.
    #[arg(long, default_value_t = 0.005)]
    duplicates: f64,
    /// Fraction of users whose events carry a ts days before --start (late arrivals).
    #[arg(long, default_value_t = 0.01)]
    late: f64,
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write NDJSON here (`-` for stdout).
    #[arg(long, conflicts_with = "server")]
    out: Option<PathBuf>,
    /// Post to this server instead (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    server: Option<String>,
    /// Events per request with --server.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
}

impl GenArgs {
    /// One campaign (`parcel-lottery`) over `days` from `start`, no late arrivals.
    pub fn demo(start: String, days: u32, events: usize) -> Self {
        Self {
            events,
            campaigns: 1,
            start,
            days,
            duplicates: 0.005,
            late: 0.0,
            seed: 7,
            out: None,
            server: None,
            batch_size: 500,
        }
    }
}

/// Channel name, weight of users, and the probability of each next step (scan, view, draw).
const CHANNELS: [(&str, u32, [f64; 3]); 5] = [
    ("jd", 30, [0.45, 0.80, 0.55]),
    ("tmall", 25, [0.40, 0.75, 0.50]),
    ("douyin", 20, [0.30, 0.55, 0.60]),
    ("offline", 15, [0.20, 0.85, 0.40]),
    ("", 10, [0.35, 0.70, 0.50]),
];
const STEPS: [&str; 4] = ["package", "scan", "view", "draw"];
const CARDS: [&str; 4] = ["A1", "A2", "A3", "B1"];
const PRIZES: [&str; 4] = ["none", "coupon", "silver", "gold"];

/// Generates one user's events at a time.
pub struct Generator {
    rng: SmallRng,
    args: GenArgs,
    start: i64,
    next_user: u64,
}

impl Generator {
    pub fn new(args: GenArgs) -> Result<Self, CliError> {
        let start = parse_rfc3339(&args.start)
            .ok_or_else(|| CliError::Config(format!("--start {:?} is not RFC 3339", args.start)))?;
        Ok(Self {
            rng: SmallRng::seed_from_u64(args.seed),
            args,
            start,
            next_user: 0,
        })
    }

    /// The NDJSON lines of the next user (1..=4 events, plus duplicates).
    pub fn next_user(&mut self, out: &mut Vec<String>) {
        let rng = &mut self.rng;
        let user = self.next_user;
        self.next_user += 1;
        let user_id = format!("u{user:08}");
        let campaign = match rng.random_range(0..self.args.campaigns.max(1)) {
            0 => "parcel-lottery".to_string(),
            n => format!("campaign-{}", n + 1),
        };
        let total: u32 = CHANNELS.iter().map(|c| c.1).sum();
        let mut pick = rng.random_range(0..total);
        let (channel, _, rates) = *CHANNELS
            .iter()
            .find(|c| {
                pick < c.1 || {
                    pick -= c.1;
                    false
                }
            })
            .expect("weights");
        let span = i64::from(self.args.days.max(1)) * 86_400_000_000;
        let mut ts = self.start + rng.random_range(0..span);
        if rng.random_bool(self.args.late.clamp(0.0, 1.0)) {
            ts -= rng.random_range(1..30) * 86_400_000_000;
        }
        let card = CARDS[rng.random_range(0..CARDS.len())];
        for (step, name) in STEPS.iter().enumerate() {
            if step > 0 {
                if !rng.random_bool(rates[step - 1]) {
                    break;
                }
                // Mostly minutes to hours; a tail beyond a 24 h window.
                let minutes = if rng.random_bool(0.05) {
                    rng.random_range(1440..4000)
                } else {
                    rng.random_range(0..240)
                };
                ts += minutes * 60_000_000 + rng.random_range(0..60_000_000);
            }
            let props = match *name {
                "package" | "scan" => format!(r#"{{"card":"{card}"}}"#),
                "draw" => format!(
                    r#"{{"prize":"{}"}}"#,
                    PRIZES[rng.random_range(0..PRIZES.len())]
                ),
                _ => r#"{"page":"lottery"}"#.to_string(),
            };
            let line = format!(
                r#"{{"event_id":"{user_id}-{step}","event":"{name}","user_id":"{user_id}","campaign":"{campaign}","channel":"{channel}","ts":"{}","properties":{props}}}"#,
                format_micros(ts)
            );
            if rng.random_bool(self.args.duplicates.clamp(0.0, 1.0)) {
                out.push(line.clone());
            }
            out.push(line);
        }
    }
}

pub async fn run(args: GenArgs, _cfg: &Config) -> Result<(), CliError> {
    let target = args.events;
    let mut generator = Generator::new(args.clone())?;
    let started = Instant::now();
    let mut produced = 0usize;
    let mut last_report = Instant::now();
    let mut lines = Vec::with_capacity(args.batch_size + 8);
    let report = |produced: usize, final_line: bool| {
        let rate = produced as f64 / started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "{} {produced} events ({rate:.0}/s)",
            if final_line {
                "generated"
            } else {
                "generating:"
            }
        );
    };
    match (&args.server, &args.out) {
        (Some(server), _) => {
            let poster = Poster::new(server, None)?;
            let mut inflight = tokio::task::JoinSet::new();
            while produced < target {
                lines.clear();
                while lines.len() < args.batch_size && produced + lines.len() < target {
                    generator.next_user(&mut lines);
                }
                produced += lines.len();
                let body = lines.join("\n");
                let poster = poster.clone();
                inflight.spawn(async move { poster.post(body).await });
                while inflight.len() >= 4 {
                    inflight
                        .join_next()
                        .await
                        .expect("tasks")
                        .map_err(|e| CliError::Delivery(e.to_string()))??;
                }
                if last_report.elapsed().as_secs() >= 1 {
                    last_report = Instant::now();
                    report(produced, false);
                }
            }
            while let Some(r) = inflight.join_next().await {
                r.map_err(|e| CliError::Delivery(e.to_string()))??;
            }
        }
        (None, out) => {
            let sink: Box<dyn Write> = match out.as_deref() {
                None => Box::new(std::io::stdout().lock()),
                Some(p) if p.as_os_str() == "-" => Box::new(std::io::stdout().lock()),
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .map_err(|e| CliError::Io(format!("{}: {e}", p.display())))?,
                ),
            };
            let mut w = BufWriter::with_capacity(1 << 20, sink);
            while produced < target {
                lines.clear();
                generator.next_user(&mut lines);
                for l in &lines {
                    writeln!(w, "{l}").map_err(|e| CliError::Io(format!("writing events: {e}")))?;
                }
                produced += lines.len();
                if produced % 4096 < lines.len() && last_report.elapsed().as_secs() >= 1 {
                    last_report = Instant::now();
                    report(produced, false);
                }
            }
            w.flush()
                .map_err(|e| CliError::Io(format!("writing events: {e}")))?;
        }
    }
    report(produced, true);
    Ok(())
}
