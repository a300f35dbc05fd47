//! Burst benchmark driver: a steady load, then a burst from many connections, then the
//! steady load again, against a running server. Every event carries a unique event_id;
//! at the end the server's `events` table must hold exactly the events it acknowledged.
//! One JSON line per phase (offered and acknowledged rates, 503s and whether they
//! carried Retry-After, ack latency, the server's peak RSS), then a verdict line.
//!
//!     burst --url http://127.0.0.1:8080 --pid 1234 --rate 20000 --burst-clients 200

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Server base URL.
    #[arg(long)]
    url: String,
    /// Server pid, for its RSS (from /proc).
    #[arg(long)]
    pid: u32,
    /// Steady load, events/s, before and after the burst.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Connections in the steady phases.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Connections in the burst; each sends as fast as the server answers and ignores
    /// Retry-After (a hostile burst), so the offered load is what the clients can push.
    #[arg(long, default_value_t = 200)]
    burst_clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 20)]
    steady_secs: u64,
    #[arg(long, default_value_t = 60)]
    burst_secs: u64,
}

/// What one phase saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    acked_requests: AtomicU64,
    acked_events: AtomicU64,
    refused: AtomicU64,
    refused_with_retry_after: AtomicU64,
    other: AtomicU64,
    latencies_us: std::sync::Mutex<Vec<u64>>,
}

/// An NDJSON body of `n` events with ids `{tag}-{n0}..`, varied like campaign traffic.
fn body(tag: &str, first: u64, n: usize) -> bytes::Bytes {
    const CHANNELS: [&str; 6] = ["jd", "tmall", "douyin", "offline", "wechat", "pdd"];
    const STEPS: [&str; 4] = ["delivered", "scan", "landing", "draw"];
    let now = 1_794_000_000_000i64;
    let mut out = String::with_capacity(n * 200);
    for i in 0..n as u64 {
        let k = first + i;
        let user = k / 3;
        out.push_str(&format!(
            "{{\"event_id\":\"{tag}-{k}\",\"event\":\"{}\",\"user_id\":\"u-{user}\",\"campaign\":\"burst-{}\",\"channel\":\"{}\",\"ts\":{},\"properties\":{{\"card\":\"A{}\",\"n\":{}}}}}\n",
            STEPS[(k % 4) as usize],
            user % 3,
            CHANNELS[(user % 6) as usize],
            now + (k as i64 % 86_400_000),
            k % 97,
            k % 13,
        ));
    }
    bytes::Bytes::from(out)
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn phase(
    args: &Args,
    http: &reqwest::Client,
    name: &str,
    clients: usize,
    secs: u64,
    rate: Option<f64>,
) -> serde_json::Value {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/v1/events", args.url.trim_end_matches('/'));
    let interval = rate.map(|r| Duration::from_secs_f64(args.batch as f64 * clients as f64 / r));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, tally, stop, url) = (
            http.clone(),
            Arc::clone(&tally),
            Arc::clone(&stop),
            url.clone(),
        );
        let (tag, batch, name) = (format!("{name}-{c}"), args.batch, name.to_string());
        tasks.push(tokio::spawn(async move {
            let mut ticker = interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut next = 0u64;
            // A refused body is sent again as it was, so every id is acked at most once.
            let mut pending = body(&tag, next, batch);
            while !stop.load(Relaxed) {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let sent = Instant::now();
                tally.requests.fetch_add(1, Relaxed);
                let resp = http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(pending.clone())
                    .send()
                    .await;
                let resp = match resp {
                    Ok(resp) => resp,
                    Err(e) => {
                        // Say what the first few were; the count says how many.
                        if tally.other.fetch_add(1, Relaxed) < 3 {
                            eprintln!("{name}: {e:?}");
                        }
                        continue;
                    }
                };
                let status = resp.status().as_u16();
                let retry_after = resp.headers().contains_key("retry-after");
                let json: serde_json::Value = resp.json().await.unwrap_or_default();
                match status {
                    200 => {
                        let us = sent.elapsed().as_micros() as u64;
                        tally.latencies_us.lock().unwrap().push(us);
                        tally.acked_requests.fetch_add(1, Relaxed);
                        tally
                            .acked_events
                            .fetch_add(json["accepted"].as_u64().unwrap_or(0), Relaxed);
                        next += batch as u64;
                        pending = body(&tag, next, batch);
                    }
                    429 | 503 => {
                        tally.refused.fetch_add(1, Relaxed);
                        if retry_after {
                            tally.refused_with_retry_after.fetch_add(1, Relaxed);
                        }
                        if rate.is_some() {
                            // Steady clients honour Retry-After (1 s) like real SDKs.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    _ => {
                        eprintln!("{name}: unexpected {status}: {json}");
                        tally.other.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    let mut peak_rss: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(secs) {
        peak_rss = peak_rss.max(rss_mb(args.pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    peak_rss = peak_rss.max(rss_mb(args.pid));
    let elapsed = started.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1e3)
    };
    let requests = tally.requests.load(Relaxed);
    serde_json::json!({
        "phase": name,
        "seconds": elapsed,
        "clients": clients,
        "offered_events_per_sec": (requests * args.batch as u64) as f64 / elapsed,
        "acked_events_per_sec": tally.acked_events.load(Relaxed) as f64 / elapsed,
        "acked_events": tally.acked_events.load(Relaxed),
        "requests": requests,
        "refused_503_429": tally.refused.load(Relaxed),
        "refused_with_retry_after": tally.refused_with_retry_after.load(Relaxed),
        "other_errors": tally.other.load(Relaxed),
        "ack_p50_ms": pct(0.5),
        "ack_p99_ms": pct(0.99),
        "peak_rss_mb": peak_rss,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.burst_clients)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut acked = 0;
    let mut lines = Vec::new();
    for (name, clients, secs, rate) in [
        ("before", args.clients, args.steady_secs, Some(args.rate)),
        ("burst", args.burst_clients, args.burst_secs, None),
        ("after", args.clients, args.steady_secs, Some(args.rate)),
    ] {
        let line = phase(&args, &http, name, clients, secs, rate).await;
        println!("{line}");
        acked += line["acked_events"].as_u64().unwrap();
        lines.push(line);
    }
    let sql = format!("{}/v1/sql", args.url.trim_end_matches('/'));
    let query = "SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events WHERE campaign LIKE 'burst-%'";
    let resp: serde_json::Value = http
        .post(&sql)
        .json(&serde_json::json!({ "sql": query }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (stored, distinct) = (
        resp["rows"][0][0].as_u64().unwrap(),
        resp["rows"][0][1].as_u64().unwrap(),
    );
    let refused: u64 = lines
        .iter()
        .map(|l| l["refused_503_429"].as_u64().unwrap())
        .sum();
    let with_retry: u64 = lines
        .iter()
        .map(|l| l["refused_with_retry_after"].as_u64().unwrap())
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "acked_events": acked, "stored_rows": stored, "stored_distinct_ids": distinct,
            "every_ack_stored_once": stored == acked && distinct == acked,
            "every_refusal_has_retry_after": refused == with_retry,
        })
    );
    if stored != acked || distinct != acked || refused != with_retry {
        std::process::exit(1);
    }
}
