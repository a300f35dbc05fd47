//! `funnelhouse gen`: synthetic campaign events for demos, tests and benchmarks.
//!
//! Users of several campaigns arrive through six channels with channel-specific drop-off
//! along package -> scan -> view -> draw, shaped like real traffic: user ids are counters,
//! UUIDs (Segment anonymousIds) or WeChat openids; event ids are `<user_id>-<n>` as the
//! browser SDK makes them (so a retried send repeats its id) or UUIDs as server SDKs
//! send them; timestamps are RFC 3339 in UTC or +08:00, with or without milliseconds,
//! and 10% epoch milliseconds; properties differ by step (order numbers, a nested
//! device object, URLs, numbers, booleans, nulls). Some events arrive late (old
//! ts), some are sent twice (same event_id), and some are unrelated app events (opens,
//! shares, logins). `--short` keeps that variety in ~185-byte lines (counter users, few
//! properties); `--medium` keeps it in ~200-byte lines (counter users, each step's telling
//! properties) and matches the ingest issue's realistic set by its Parquet bytes. Output
//! is NDJSON to a file / stdout, or posted straight to a server.

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
    #[arg(long, default_value_t = 0.01)]
    duplicates: f64,
    /// Fraction of events that are unrelated app events (app_open, share, login).
    #[arg(long, default_value_t = 0.02)]
    unrelated: f64,
    /// Fraction of users whose events carry a ts days before --start (late arrivals).
    #[arg(long, default_value_t = 0.01)]
    late: f64,
    /// Short lines (~185 bytes): counter user ids, `<user_id>-<n>` event ids and one or two
    /// properties per step, with the same campaigns, channels, timestamp formats, late
    /// users, duplicates and unrelated events. The issue's realistic set, by its DuckDB
    /// rate, has lines about this long; the default lines average ~280 bytes.
    #[arg(long)]
    short: bool,
    /// Medium lines (~200 bytes): counter user ids, `<user_id>-<n>` event ids and each
    /// step's telling properties (an order id, a WeChat version, a duration and scroll
    /// depth, a prize and amount), with the same campaigns, channels, timestamp formats,
    /// late users, duplicates and unrelated events. The issue's realistic set, by its
    /// Parquet size, is about as varied (benches/README.md).
    #[arg(long, conflicts_with = "short")]
    medium: bool,
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
            unrelated: 0.0,
            late: 0.0,
            short: false,
            medium: false,
            seed: 7,
            out: None,
            server: None,
            batch_size: 500,
        }
    }
}

/// Channel name, weight of users, and the probability of each next step (scan, view, draw).
const CHANNELS: [(&str, u32, [f64; 3]); 6] = [
    ("jd", 28, [0.45, 0.80, 0.55]),
    ("tmall", 22, [0.40, 0.75, 0.50]),
    ("douyin", 18, [0.30, 0.55, 0.60]),
    ("offline", 12, [0.20, 0.85, 0.40]),
    ("wechat", 12, [0.50, 0.65, 0.45]),
    ("", 8, [0.35, 0.70, 0.50]),
];
const STEPS: [&str; 4] = ["package", "scan", "view", "draw"];
const CARDS: [&str; 4] = ["A1", "A2", "A3", "B1"];
const PRIZES: [&str; 4] = ["none", "coupon", "silver", "gold"];
const CARRIERS: [&str; 4] = ["sf-express", "jd-logistics", "zto", "yto"];
const CITIES: [&str; 6] = [
    "Shanghai", "Beijing", "Shenzhen", "Hangzhou", "Chengdu", "Wuhan",
];
/// (os, versions, model)
const DEVICES: [(&str, [&str; 3], &str); 3] = [
    ("iOS", ["17.4", "17.6.1", "18.1"], "iPhone15,2"),
    ("Android", ["13", "14", "12"], "Redmi Note 12"),
    ("HarmonyOS", ["4.0", "4.2", "3.1"], "HUAWEI Mate 60"),
];
const UNRELATED: [&str; 4] = ["app_open", "share", "login", "coupon_view"];

/// The kind of lines: `--short`, `--medium` or neither (clap refuses both).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lines {
    Default,
    Medium,
    Short,
}

/// Generates one user's events at a time.
pub struct Generator {
    rng: SmallRng,
    args: GenArgs,
    lines: Lines,
    start: i64,
    next_user: u64,
}

impl Generator {
    pub fn new(args: GenArgs) -> Result<Self, CliError> {
        let start = parse_rfc3339(&args.start)
            .ok_or_else(|| CliError::Config(format!("--start {:?} is not RFC 3339", args.start)))?;
        let lines = match (args.short, args.medium) {
            (true, _) => Lines::Short,
            (_, true) => Lines::Medium,
            _ => Lines::Default,
        };
        Ok(Self {
            rng: SmallRng::seed_from_u64(args.seed),
            args,
            lines,
            start,
            next_user: 0,
        })
    }

    /// The NDJSON lines of the next user (1..=4 funnel events, plus unrelated events and
    /// duplicates).
    pub fn next_user(&mut self, out: &mut Vec<String>) {
        let user = self.next_user;
        self.next_user += 1;
        let rng = &mut self.rng;
        let lines = self.lines;
        // The short and medium lines keep to the ids the browser SDK makes.
        let counters = lines != Lines::Default;
        let user_id = match rng.random_range(0..20) {
            n if counters || n < 14 => format!("u{user:08}"),
            14..18 => uuid(rng),
            _ => format!("oX{}", random_text(rng, 26)),
        };
        // Server-side SDKs send a UUID per event; the browser SDK sends device + counter.
        let uuid_ids = rng.random_bool(0.1) && !counters;
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
        let (os, versions, model) = DEVICES[rng.random_range(0..DEVICES.len())];
        let os_version = versions[rng.random_range(0..versions.len())];
        let mut n = 0;
        let mut push = |rng: &mut SmallRng,
                        out: &mut Vec<String>,
                        name: &str,
                        ts: i64,
                        props: String| {
            let event_id = if uuid_ids {
                uuid(rng)
            } else {
                format!("{user_id}-{n}")
            };
            n += 1;
            let line = format!(
                r#"{{"event_id":"{event_id}","event":"{name}","user_id":"{user_id}","campaign":"{campaign}","channel":"{channel}","ts":{},"properties":{props}}}"#,
                timestamp(rng, ts)
            );
            if rng.random_bool(self.args.duplicates.clamp(0.0, 1.0)) {
                out.push(line.clone());
            }
            out.push(line);
        };
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
                _ if lines == Lines::Short => short_properties(rng, name, card),
                _ if lines == Lines::Medium => medium_properties(rng, name, card, os),
                "package" => format!(
                    r#"{{"card":"{card}","order_id":"{}","carrier":"{}","city":"{}","items":{}}}"#,
                    order_id(rng),
                    CARRIERS[rng.random_range(0..CARRIERS.len())],
                    CITIES[rng.random_range(0..CITIES.len())],
                    rng.random_range(1..6),
                ),
                "scan" => format!(
                    r#"{{"card":"{card}","qr":"https://fh.example/s/{campaign}/{channel}?c={card}","device":{{"os":"{os}","os_version":"{os_version}","model":"{model}"}},"wechat":"{}"}}"#,
                    wechat_version(rng),
                ),
                "view" => format!(
                    r#"{{"page":"lottery","url":"https://fh.example/{campaign}/lottery?utm_source={channel}&utm_medium=qr","referrer":"{}",{},"first_visit":{}}}"#,
                    [
                        "",
                        "https://m.jd.com/",
                        "https://www.douyin.com/",
                        "https://servicewechat.com/"
                    ][rng.random_range(0..4)],
                    duration_and_scroll(rng),
                    rng.random_bool(0.8),
                ),
                _ => {
                    let (prize, amount) = prize_and_amount(rng);
                    format!(
                        r#"{{"prize":"{prize}","amount":{amount},"win":{},"attempt":{}}}"#,
                        prize != "none",
                        rng.random_range(1..4),
                    )
                }
            };
            push(rng, out, name, ts, props);
            while rng.random_bool(self.args.unrelated.clamp(0.0, 0.9)) {
                let name = UNRELATED[rng.random_range(0..UNRELATED.len())];
                let props = match name {
                    "app_open" => format!(
                        r#"{{"version":"3.{}.{}","cold_start":{}}}"#,
                        rng.random_range(0..9),
                        rng.random_range(0..20),
                        rng.random_bool(0.3)
                    ),
                    "share" => format!(
                        r#"{{"target":"{}"}}"#,
                        ["wechat", "moments", "weibo", "qq"][rng.random_range(0..4)]
                    ),
                    "login" => format!(
                        r#"{{"method":"{}"}}"#,
                        ["sms", "wechat", "password"][rng.random_range(0..3)]
                    ),
                    _ => r#"{}"#.to_string(),
                };
                let at = ts + rng.random_range(-600_000_000..600_000_000);
                push(rng, out, name, at, props);
            }
        }
    }
}

/// One or two small properties of a funnel step, for `--short`.
fn short_properties(rng: &mut SmallRng, step: &str, card: &str) -> String {
    match step {
        "package" => format!(
            r#"{{"card":"{card}","carrier":"{}"}}"#,
            CARRIERS[rng.random_range(0..CARRIERS.len())]
        ),
        "scan" => format!(
            r#"{{"card":"{card}","os":"{}"}}"#,
            DEVICES[rng.random_range(0..DEVICES.len())].0
        ),
        "view" => format!(
            r#"{{"page":"lottery","duration_ms":{}}}"#,
            rng.random_range(200..60_000)
        ),
        _ => format!(
            r#"{{"prize":"{}"}}"#,
            PRIZES[rng.random_range(0..PRIZES.len())]
        ),
    }
}

/// Each step's most telling properties in ~50 bytes, for `--medium`.
fn medium_properties(rng: &mut SmallRng, step: &str, card: &str, os: &str) -> String {
    match step {
        "package" => format!(
            r#"{{"card":"{card}","order_id":"{}","items":{}}}"#,
            order_id(rng),
            rng.random_range(1..6),
        ),
        "scan" => format!(
            r#"{{"card":"{card}","os":"{os}","wechat":"{}"}}"#,
            wechat_version(rng),
        ),
        "view" => format!(r#"{{"page":"lottery",{}}}"#, duration_and_scroll(rng)),
        _ => {
            let (prize, amount) = prize_and_amount(rng);
            format!(
                r#"{{"prize":"{prize}","amount":{amount},"win":{}}}"#,
                prize != "none"
            )
        }
    }
}

// The properties the default and `--medium` lines share. Each is drawn where the
// default lines drew it before, so the same seed still gives the same default lines.

/// A 12-character order number: the shop's prefix and ten digits.
fn order_id(rng: &mut SmallRng) -> String {
    format!(
        "{}{:010}",
        ["JD", "TM", "DY", "WX"][rng.random_range(0..4)],
        rng.random_range(0..10_000_000_000u64)
    )
}

fn wechat_version(rng: &mut SmallRng) -> String {
    format!("8.0.{}", rng.random_range(30..54))
}

/// A page view's `"duration_ms":..,"scroll":..` members.
fn duration_and_scroll(rng: &mut SmallRng) -> String {
    format!(
        r#""duration_ms":{},"scroll":{:.2}"#,
        rng.random_range(200..90_000),
        rng.random_range(0.0..1.0)
    )
}

/// A draw's prize and its amount as JSON (`null` for no prize).
fn prize_and_amount(rng: &mut SmallRng) -> (&'static str, String) {
    let prize = PRIZES[rng.random_range(0..PRIZES.len())];
    let amount = match prize {
        "none" => "null".to_string(),
        _ => format!("{}", [5, 10, 20, 50, 100][rng.random_range(0..5)]),
    };
    (prize, amount)
}

/// A timestamp as clients send them: mostly RFC 3339 (UTC or China time, with or
/// without milliseconds), 10% epoch milliseconds.
fn timestamp(rng: &mut SmallRng, micros: i64) -> String {
    let millis = micros.div_euclid(1000);
    match rng.random_range(0..10) {
        0 => millis.to_string(),
        1..4 => {
            let text = format_micros((millis + 8 * 3_600_000) * 1000);
            // 2026-11-01T08:00:00.123000Z -> 2026-11-01T08:00:00.123+08:00
            format!("\"{}+08:00\"", &text[..23])
        }
        4..6 => format!("\"{}Z\"", &format_micros(millis * 1000)[..19]),
        _ => format!("\"{}Z\"", &format_micros(millis * 1000)[..23]),
    }
}

/// A version 4 UUID from the seeded generator (so the same seed gives the same ids).
fn uuid(rng: &mut SmallRng) -> String {
    uuid::Builder::from_random_bytes(rng.random())
        .into_uuid()
        .to_string()
}

fn random_text(rng: &mut SmallRng, len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
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
