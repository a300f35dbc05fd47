//! Faults below the WAL and the Parquet writer, through `FaultDisk`: EIO and ENOSPC on
//! write, fsync, cut, rename and directory fsync, and power loss. The rules checked: no
//! fsync, no ack; nothing of a refused request appears later; after a power loss every
//! acknowledged event is present once.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use funnelhouse_schemas::AuthConfig;
use funnelhouse_schemas::time::now_micros;
use funnelhouse_schemas::units::ByteSize;
use funnelhouse_schemas::{Event, EventRef};
use funnelhouse_storage::disk::{DiskOp, Errno, Fault, PowerLoss};
use funnelhouse_storage::{EventStore, FaultDisk, IngestConfig, OsDisk, StorageError};

use crate::support::{TestServer, committed_rows, config, event, store_rows};

fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            Event::from(EventRef {
                event_id: &format!("{prefix}-{i}"),
                event: "scan",
                user_id: &format!("u-{}", i % 7),
                campaign: "parcel-lottery",
                channel: "jd",
                ts: 1_794_000_000_000_000 + i as i64 * 1_000_000,
                received_at: now_micros(),
                properties: Some(format!("{{\"i\":{i}}}").as_str()),
            })
        })
        .collect()
}

async fn open(
    disk: Arc<dyn funnelhouse_storage::Disk>,
    dir: &Path,
    cfg: &IngestConfig,
) -> Arc<EventStore> {
    let (dir, cfg) = (dir.to_path_buf(), cfg.clone());
    let metrics = Arc::default();
    let (store, _) =
        tokio::task::spawn_blocking(move || EventStore::open_on(disk, &dir, &cfg, metrics))
            .await
            .unwrap()
            .unwrap();
    Arc::new(store)
}

/// Event ids stored on `dir`, each with how often, after a restart on the real disk.
async fn stored_after_restart(dir: &Path, cfg: &IngestConfig) -> HashMap<String, usize> {
    let store = open(Arc::new(OsDisk), dir, cfg).await;
    let mut counts = HashMap::new();
    for row in store_rows(&store, dir) {
        *counts.entry(row.event_id).or_insert(0) += 1;
    }
    store.shutdown().await.unwrap();
    counts
}

fn ids(counts: &HashMap<String, usize>) -> BTreeSet<String> {
    counts.keys().cloned().collect()
}

/// Each way a WAL append can fail, down to an fsync that reached the disk but reported
/// EIO followed by a cut that fails too: the request is refused, the next one is
/// acknowledged in a new segment, and after a crash only the acknowledged ones are there.
#[tokio::test]
async fn a_failed_wal_append_is_refused_and_never_replayed() {
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        (
            "write EIO",
            vec![Fault::new(DiskOp::Write, "wal", Errno::Io)],
        ),
        (
            "write ENOSPC after the bytes landed",
            vec![Fault::new(DiskOp::Write, "wal", Errno::NoSpace).after_effect()],
        ),
        (
            "fsync EIO",
            vec![Fault::new(DiskOp::Sync, "wal", Errno::Io)],
        ),
        (
            "fsync EIO after the data reached the disk, and the cut fails",
            vec![
                Fault::new(DiskOp::Sync, "wal", Errno::Io).after_effect(),
                Fault::new(DiskOp::SetLen, "wal", Errno::Io),
            ],
        ),
        (
            "fsync fails, the cut fails, and the new segment's first fsync fails too",
            vec![
                Fault::new(DiskOp::Sync, "wal", Errno::Io)
                    .after_effect()
                    .times(2),
                Fault::new(DiskOp::SetLen, "wal", Errno::Io),
            ],
        ),
    ];
    for (case, faults) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let disk = FaultDisk::new();
        let cfg = config();
        let store = open(Arc::new(disk.clone()), tmp.path(), &cfg).await;
        store.write(events("a", 5), now_micros()).await.unwrap();
        let planned: usize = faults.iter().map(|f| f.times).sum();
        for f in faults {
            disk.inject(f);
        }
        let mut refused = 0;
        for round in 0..planned {
            match store
                .write(events(&format!("b{round}"), 5), now_micros())
                .await
            {
                Err(StorageError::Wal(_)) => refused += 1,
                other => panic!("{case}: a failed append must be refused, got {other:?}"),
            }
            if disk.injected() >= planned {
                break;
            }
        }
        assert!(refused >= 1, "{case}");
        store
            .write(events("c", 5), 3)
            .await
            .unwrap_or_else(|e| panic!("{case}: writes resume by themselves: {e}"));
        // A crash: every later operation fails, written bytes stay.
        disk.halt();
        let _ = store.shutdown().await;
        let stored = stored_after_restart(tmp.path(), &cfg).await;
        let expected: BTreeSet<String> = events("a", 5)
            .into_iter()
            .chain(events("c", 5))
            .map(|e| e.event_id().to_string())
            .collect();
        assert_eq!(ids(&stored), expected, "{case}");
        assert!(stored.values().all(|&n| n == 1), "{case}: {stored:?}");
    }
}

/// A full disk is a 503 with Retry-After over HTTP, names the cause, and stores nothing;
/// writes resume on their own once space is back.
#[tokio::test]
async fn a_full_disk_answers_503_and_writes_resume_when_space_comes_back() {
    let disk = FaultDisk::new();
    let server = TestServer::start_on(
        Arc::new(disk.clone()),
        config(),
        AuthConfig::default(),
        None,
        |s| s,
    )
    .await;
    assert_eq!(server.post_json(&event("before")).await.status, 200);
    disk.inject(Fault::new(DiskOp::Write, "wal", Errno::NoSpace).times(3));
    for i in 0..3 {
        let reply = server.post_json(&event(&format!("full-{i}"))).await;
        assert_eq!(reply.status, 503, "{}", reply.json);
        assert!(reply.headers.contains_key("retry-after"));
        let error = reply.json["error"].as_str().unwrap();
        assert!(error.contains("No space left on device"), "{error}");
    }
    assert_eq!(server.post_json(&event("after")).await.status, 200);
    let dir = server.dir.clone();
    let tmp = server.stop().await;
    let stored: BTreeSet<String> = committed_rows(&dir)
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    assert_eq!(stored, BTreeSet::from(["before".into(), "after".into()]));
    drop(tmp);
}

/// Faults on each durable step of a flush (Parquet write and fsync, ids file, manifest
/// rename, directory fsync) fail that attempt; the retry commits every row once.
#[tokio::test]
async fn a_flush_that_fails_at_any_step_is_retried_and_stores_each_row_once() {
    let steps = [
        Fault::new(DiskOp::Write, "events", Errno::NoSpace),
        Fault::new(DiskOp::Sync, "events", Errno::Io),
        Fault::new(DiskOp::Write, "dedup", Errno::Io),
        Fault::new(DiskOp::Rename, "manifest.json", Errno::Io).after_effect(),
        Fault::new(DiskOp::SyncDir, "events", Errno::Io),
    ];
    for fault in steps {
        let case = format!("{:?} on {}", fault.op, fault.path_part);
        let tmp = tempfile::tempdir().unwrap();
        let disk = FaultDisk::new();
        let cfg = config();
        let store = open(Arc::new(disk.clone()), tmp.path(), &cfg).await;
        store.write(events("a", 50), now_micros()).await.unwrap();
        disk.inject(fault);
        store.flush().await.unwrap();
        assert_eq!(disk.injected(), 1, "{case}: the fault was hit");
        store.write(events("b", 50), now_micros()).await.unwrap();
        store.shutdown().await.unwrap();
        let rows = committed_rows(tmp.path());
        assert_eq!(rows.len(), 100, "{case}");
        let stored = stored_after_restart(tmp.path(), &cfg).await;
        assert_eq!(stored.len(), 100, "{case}");
        assert!(stored.values().all(|&n| n == 1), "{case}");
    }
}

/// Power loss at random moments under concurrent writers, with flushes and compaction
/// running: after each, every acknowledged event is present exactly once and nothing
/// that was refused appears. Rounds alternate dropping and zero-filling what no fsync
/// covered, and keep going on the same data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_power_loss_every_acknowledged_event_is_present_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = IngestConfig {
        flush_bytes: ByteSize(48 * 1024),
        compact_min_files: 3,
        ..config()
    };
    let mut acked = BTreeSet::new();
    let mut spares_reused = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..12 {
        let disk = FaultDisk::new();
        let store = open(Arc::new(disk.clone()), tmp.path(), &cfg).await;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let mut batch = events(&format!("r{round}-w{w}-{i}"), 20);
                        // Resends of an earlier batch: acked as duplicates, stored once.
                        if i > 0 && i % 5 == 0 {
                            batch.extend(events(&format!("r{round}-w{w}-{}", i - 1), 3));
                        }
                        let ids: Vec<String> =
                            batch.iter().map(|e| e.event_id().to_string()).collect();
                        match store.write(batch, now_micros()).await {
                            Ok(_) => acked.extend(ids),
                            Err(_) => return acked,
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(20 + rand(200))).await;
        let mode = if round % 2 == 0 {
            PowerLoss::Drop
        } else {
            PowerLoss::ZeroFill
        };
        disk.power_loss(mode);
        spares_reused += disk.reused();
        for w in writers {
            acked.extend(w.await.unwrap());
        }
        let _ = store.shutdown().await;
        drop(store);
        let stored = stored_after_restart(tmp.path(), &cfg).await;
        let doubled: Vec<_> = stored.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            doubled.is_empty(),
            "round {round} ({mode:?}): doubled {doubled:?}"
        );
        let lost: Vec<_> = acked
            .iter()
            .filter(|id| !stored.contains_key(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round} ({mode:?}): lost {} acked, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        let unacked: Vec<_> = stored.keys().filter(|id| !acked.contains(*id)).collect();
        assert!(
            unacked.is_empty(),
            "round {round} ({mode:?}): refused but stored {unacked:?}"
        );
    }
    assert!(
        acked.len() > 1000,
        "the rounds wrote something: {}",
        acked.len()
    );
    assert!(spares_reused > 0, "the rounds rewrote flushed WAL segments");
}
