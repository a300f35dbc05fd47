//! End-to-end ingest load: several loopback clients post NDJSON batches (500 events by
//! default) from a file to `/v1/events`, each waiting for its durable ack, and report
//! events/s, MB/s and ack latency percentiles as one JSON line. With `--probe-visible`
//! a further client posts one marker event every 50 ms and polls `/v1/sql` until it is
//! seen, for the ack -> visible in SQL latency under that load.
//!
//!     load --url http://127.0.0.1:8080 --file events.ndjson --clients 8 [--rate 200000]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Server base URL.
    #[arg(long)]
    url: String,
    /// NDJSON events to send.
    #[arg(long)]
    file: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Target events/s over all clients (paced); absent: as fast as acks allow.
    #[arg(long)]
    rate: Option<f64>,
    /// Send at most this many events.
    #[arg(long)]
    limit: Option<usize>,
    /// Also measure ack -> visible in SQL latency while the load runs.
    #[arg(long)]
    probe_visible: bool,
}

/// Post a marker event every 50 ms until `done`, each time polling SQL every 2 ms until
/// it is counted; the ack -> visible times.
async fn probe_visible(
    http: reqwest::Client,
    base: String,
    done: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut seen = Vec::new();
    let mut n = 0;
    while !done.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("visible-probe-{n}");
        let event = serde_json::json!({"event_id": id, "event": "probe", "user_id": "probe", "campaign": "probe"});
        let resp = http
            .post(format!("{base}/v1/events"))
            .json(&event)
            .send()
            .await
            .expect("probe post");
        if !resp.status().is_success() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let acked = Instant::now();
        // The ts bound keeps the poll to today's partition and the live buffer.
        let sql = format!(
            "SELECT count(*) AS n FROM events WHERE ts > now() - INTERVAL '1 minute' AND event_id = '{id}'"
        );
        loop {
            let json: serde_json::Value = http
                .post(format!("{base}/v1/sql"))
                .json(&serde_json::json!({ "sql": sql }))
                .send()
                .await
                .expect("probe query")
                .json()
                .await
                .unwrap_or_default();
            if json["rows"][0][0].as_u64() == Some(1) {
                seen.push(acked.elapsed());
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(30),
                "probe {id} never became visible: {json}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// The `p` quantile of sorted durations, in ms.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.file).expect("read the events file");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.limit.unwrap_or(usize::MAX))
        .collect();
    let bodies: Arc<Vec<(usize, bytes::Bytes)>> = Arc::new(
        lines
            .chunks(args.batch)
            .map(|c| (c.len(), bytes::Bytes::from(c.join("\n"))))
            .collect(),
    );
    let total_events: usize = bodies.iter().map(|b| b.0).sum();
    let total_bytes: usize = bodies.iter().map(|b| b.1.len()).sum();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/v1/events", args.url.trim_end_matches('/'));
    // Paced clients each send one batch per interval, so the offered load is steady.
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.batch as f64 * args.clients as f64 / r));
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let probe = args.probe_visible.then(|| {
        tokio::spawn(probe_visible(
            http.clone(),
            args.url.trim_end_matches('/').to_string(),
            Arc::clone(&done),
        ))
    });
    let mut tasks = Vec::new();
    let (start, clients) = (tokio::time::Instant::now(), args.clients);
    for client in 0..clients {
        let (http, next, bodies, url) = (
            http.clone(),
            Arc::clone(&next),
            Arc::clone(&bodies),
            url.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            // Each client's ticks are offset by its share of the interval from one start
            // and stay on that grid: after a stall a late tick fires once, then the next
            // ones keep their slots. In phase (and with `Delay`, which moved every client's
            // ticks to the end of a stall), every client's batch arrived at once.
            let mut ticker = interval.map(|i| {
                let phase = i.mul_f64(client as f64 / clients as f64);
                let mut t = tokio::time::interval_at(start + phase, i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                t
            });
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((n, body)) = bodies.get(i) else {
                    break;
                };
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                loop {
                    let sent = Instant::now();
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("post");
                    let status = resp.status();
                    let json: serde_json::Value = resp.json().await.unwrap_or_default();
                    if status.as_u16() == 503 || status.as_u16() == 429 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    assert!(status.is_success(), "{status}: {json}");
                    let counted = json["accepted"].as_u64().unwrap_or(0)
                        + json["duplicates"].as_u64().unwrap_or(0);
                    assert_eq!(
                        counted as usize + json["rejected"].as_array().map_or(0, Vec::len),
                        *n
                    );
                    latencies.push(sent.elapsed());
                    break;
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    latencies.sort();
    let mut report = serde_json::json!({
        "events": total_events, "requests": latencies.len(), "seconds": secs,
        "events_per_sec": total_events as f64 / secs, "mb_per_sec": total_bytes as f64 / secs / 1e6,
        "p50_ms": pct(&latencies, 0.50), "p99_ms": pct(&latencies, 0.99), "max_ms": pct(&latencies, 1.0),
        "clients": args.clients, "batch": args.batch, "offered_rate": args.rate,
    });
    if let Some(probe) = probe {
        let mut visible = probe.await.unwrap();
        visible.sort();
        if !visible.is_empty() {
            report["visible_probes"] = visible.len().into();
            report["visible_p50_ms"] = pct(&visible, 0.50).into();
            report["visible_p99_ms"] = pct(&visible, 0.99).into();
        }
    }
    println!("{report}");
}
