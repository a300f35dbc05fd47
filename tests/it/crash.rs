//! kill -9 at random moments under load from several clients, at least 20 times; then
//! every acknowledged event_id is stored exactly once and nothing that was never sent is.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::{Server, event_line, stored_ids, write_file};

const KILLS: usize = 22;
const CLIENTS: usize = 4;

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

    for round in 0..KILLS {
        let server = Server::start(&data, &["--config", config.to_str().unwrap()]).await;
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
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
        server.kill9();
        for c in clients {
            c.await.unwrap();
        }
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
        acked_before_kill.windows(2).filter(|w| w[1] > w[0]).count() >= KILLS / 2,
        "most rounds acknowledged writes before their kill: {acked_before_kill:?}"
    );
}
