//! kill -9 at random moments under load from several clients (30 times here;
//! `scripts/crash_loop.sh` runs the same test with 1,000), each kill followed at random
//! by a torn or zero-filled WAL tail (the bytes of a write in flight, or the zeros a
//! power loss leaves); then every acknowledged event_id is stored exactly once, nothing
//! that was never sent is, and each restart's replay time and the server's RSS stay
//! bounded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::{Server, event_line, stored_ids, write_file};

/// Kills per run: `FUNNELHOUSE_CRASH_KILLS`, default 30.
fn kills() -> usize {
    std::env::var("FUNNELHOUSE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}
const CLIENTS: usize = 4;
/// Sanity bounds, far above what a healthy run shows (printed at the end).
const MAX_REPLAY: Duration = Duration::from_secs(20);
const MAX_RSS_MB: u64 = 1024;
/// On top of [`MAX_RSS_MB`]: the dedup index, which by contract holds every id of the
/// window (~21 bytes each at rest, up to 31 while its table doubles). Every event of
/// this test is in the window, so the 1,000-kill loop's ~30 M ids are ~1 GB of index by
/// design, not a leak.
const DEDUP_BYTES_PER_ID: u64 = 34;

fn rss_mb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// CPU ticks per thread name of `pid` (summed over threads of one name): which parts of
/// the server were busy, for the report of the round with the peak RSS.
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ...": utime and stime are fields 14 and 15.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let name = head.split_once(" (").map_or("", |(_, n)| n).to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += ticks,
            None => out.push((name, ticks)),
        }
    }
    out.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    out
}

/// After a kill: leave the newest WAL segment as a crash or power loss might, beyond
/// its last fsynced record (which holds everything acknowledged).
fn tear_wal_tail(data: &std::path::Path, rng: &mut impl Rng) {
    let Some(segment) = std::fs::read_dir(data.join("wal"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .max()
    else {
        return;
    };
    let tail: Vec<u8> = match rng.random_range(0..3) {
        // A record whose write was cut: a plausible header, part of its payload.
        0 => {
            let mut t = 4000u32.to_le_bytes().to_vec();
            t.extend((0..rng.random_range(4..300)).map(|_| rng.random::<u8>()));
            t
        }
        // Blocks the file grew by whose data never landed.
        1 => vec![0; rng.random_range(1..8192)],
        _ => return,
    };
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(segment)
        .unwrap();
    std::io::Write::write_all(&mut f, &tail).unwrap();
}

#[derive(Default)]
struct Ledger {
    sent: HashSet<String>,
    acked: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_and_doubles_nothing_acknowledged() {
    let seed: u64 = rand::random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // Frequent flushes and compactions, so kills also land in the middle of those.
    let config = write_file(
        dir.path(),
        "funnelhouse.toml",
        "[ingest]\nflush_interval = \"150ms\"\ncompact_min_files = 3\n",
    );
    let data = dir.path().join("data");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let http = reqwest::Client::new();
    let mut acked_before_kill = Vec::new();
    let (mut max_replay, mut max_rss, mut max_rss_round) = (Duration::ZERO, 0, 0);
    // What the round with the peak RSS started with (replayed events, dedup ids), which
    // threads were busy in it, and its last log lines.
    let mut max_rss_report = String::new();
    let kills = kills();

    for round in 0..kills {
        let started = std::time::Instant::now();
        let server = Server::start(&data, &["--config", config.to_str().unwrap()]).await;
        max_replay = max_replay.max(started.elapsed());
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let url = format!("{}/v1/events", server.url);
            let ledger = Arc::clone(&ledger);
            let http = http.clone();
            clients.push(tokio::spawn(async move {
                for batch in 0.. {
                    // New ids, plus a resend of some already-acknowledged ones (dedup after restarts).
                    let mut ids: Vec<String> = (0..50)
                        .map(|i| format!("r{round}-c{client}-b{batch}-{i}"))
                        .collect();
                    {
                        let l = ledger.lock().unwrap();
                        ids.extend(l.acked.iter().take(5).cloned());
                    }
                    let body: String = ids.iter().map(|id| event_line(id) + "\n").collect();
                    ledger.lock().unwrap().sent.extend(ids.iter().cloned());
                    let resp = http
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                    let Ok(resp) = resp else { return };
                    if resp.status() != 200 {
                        continue;
                    }
                    let Ok(json) = resp.json::<serde_json::Value>().await else {
                        return;
                    };
                    let counted =
                        json["accepted"].as_u64().unwrap() + json["duplicates"].as_u64().unwrap();
                    assert_eq!(counted as usize, ids.len(), "{json}");
                    ledger.lock().unwrap().acked.extend(ids);
                }
            }));
        }
        // RSS sampled through the round, not once: a short peak (a flush, a replay's
        // aftermath) counts too.
        let until = tokio::time::Instant::now() + Duration::from_millis(rng.random_range(50..600));
        let mut rss = 0;
        loop {
            rss = rss.max(rss_mb(server.pid()));
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(20))).await;
        }
        if rss > max_rss {
            (max_rss, max_rss_round) = (rss, round + 1);
            let log = server.log_text();
            let lines: Vec<&str> = log.lines().collect();
            max_rss_report = format!(
                "start-up: {}; busy threads (CPU ticks): {:?}; last log lines: {:?}",
                lines
                    .iter()
                    .find(|l| l.contains("ready: WAL replayed"))
                    .unwrap_or(&""),
                thread_ticks(server.pid())
                    .into_iter()
                    .take(6)
                    .collect::<Vec<_>>(),
                &lines[lines.len().saturating_sub(3)..]
            );
        }
        if round % 100 == 99 {
            let acked = ledger.lock().unwrap().acked.len();
            eprintln!(
                "round {}: {acked} acknowledged, RSS up to {rss} MB",
                round + 1
            );
        }
        server.kill9();
        for c in clients {
            c.await.unwrap();
        }
        tear_wal_tail(&data, &mut rng);
        acked_before_kill.push(ledger.lock().unwrap().acked.len());
    }

    // One last start replays the WAL; a graceful stop flushes everything to Parquet.
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]).await;
    let status = server.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");

    let ledger = ledger.lock().unwrap();
    let stored = stored_ids(&data);
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event_id is stored twice");
    let missing: Vec<&String> = ledger
        .acked
        .iter()
        .filter(|id| !unique.contains(id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost (seed {seed}): {missing:?}"
    );
    let unknown: Vec<&&String> = unique
        .iter()
        .filter(|id| !ledger.sent.contains(**id))
        .take(5)
        .collect();
    assert!(unknown.is_empty(), "stored but never sent: {unknown:?}");
    assert!(
        ledger.acked.len() > 1000,
        "the load was real: {acked_before_kill:?}"
    );
    assert!(
        acked_before_kill.windows(2).filter(|w| w[1] > w[0]).count() >= kills / 2,
        "most rounds acknowledged writes before their kill: {acked_before_kill:?}"
    );
    eprintln!(
        "{kills} kills: {} acknowledged, {} stored, 0 lost, 0 doubled; slowest start (replay) {max_replay:?}, peak RSS {max_rss} MB (round {max_rss_round}; {max_rss_report})",
        ledger.acked.len(),
        stored.len()
    );
    assert!(max_replay < MAX_REPLAY, "replay took {max_replay:?}");
    let rss_bound = MAX_RSS_MB + ledger.acked.len() as u64 * DEDUP_BYTES_PER_ID / (1 << 20);
    assert!(
        max_rss < rss_bound,
        "RSS reached {max_rss} MB (bound {rss_bound} MB)"
    );
}
