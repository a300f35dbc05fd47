//! What lands on disk: partitioned, sorted, zstd Parquet files with statistics, WAL
//! segments removed after their flush, compaction of small files with late duplicates.

use std::fs::File;
use std::time::Duration;

use funnelhouse_schemas::units::ByteSize;
use funnelhouse_storage::{IngestConfig, Manifest, Partitioning};
use parquet::basic::Compression;
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use serde_json::{Value, json};

use crate::support::{TestServer, committed_rows, config, event, wait_until};

fn at(id: &str, user: &str, ts: &str) -> Value {
    let mut e = event(id);
    e["user_id"] = json!(user);
    e["ts"] = json!(ts);
    e
}

#[tokio::test]
async fn flush_writes_sorted_zstd_parquet_by_day_and_removes_the_wal() {
    let server = TestServer::start(config()).await;
    let events = json!([
        at("a", "u2", "2026-11-11T10:00:00Z"),
        at("b", "u1", "2026-11-11T12:00:00Z"),
        at("c", "u1", "2026-11-11T09:00:00Z"),
        at("late", "u9", "2026-10-01T23:59:59.999999Z"),
        at("d", "u1", "2026-11-12T00:00:00Z"),
    ]);
    assert_eq!(server.post_json(&events).await.json["accepted"], 5);
    let before = server.rows();
    server.store.flush().await.unwrap();
    let manifest = Manifest::load(&server.dir).unwrap();
    let mut partitions: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.partition.as_str())
        .collect();
    partitions.sort();
    assert_eq!(
        partitions,
        ["date=2026-10-01", "date=2026-11-11", "date=2026-11-12"]
    );
    let after = server.rows();
    assert_eq!(after.len(), 5);
    for row in &before {
        assert!(after.contains(row), "round trip of {row:?}");
    }
    let nov11 = manifest
        .files
        .iter()
        .find(|f| f.partition == "date=2026-11-11")
        .unwrap();
    assert!(nov11.path.starts_with("events/date=2026-11-11/") && nov11.path.ends_with(".parquet"));
    // The contract's "zstd, page/row-group statistics", for every column.
    let reader = SerializedFileReader::new_with_options(
        File::open(server.dir.join(&nov11.path)).unwrap(),
        ReadOptionsBuilder::new().with_page_index().build(),
    )
    .unwrap();
    let rg = reader.metadata().row_group(0);
    let page_stats = &reader.metadata().column_index().expect("a page index")[0];
    let columns = funnelhouse_schemas::event_schema().fields().len();
    assert_eq!(rg.num_columns(), columns);
    assert_eq!(page_stats.len(), columns);
    for (c, pages) in rg.columns().iter().zip(page_stats) {
        let name = c.column_path().string();
        assert!(matches!(c.compression(), Compression::ZSTD(_)), "{name}");
        let stats = c
            .statistics()
            .unwrap_or_else(|| panic!("{name}: no statistics"));
        assert!(stats.min_bytes_opt().is_some(), "{name}: row-group min");
        assert!(stats.max_bytes_opt().is_some(), "{name}: row-group max");
        assert!(
            !matches!(pages, ColumnIndexMetaData::NONE),
            "{name}: page statistics"
        );
    }
    let sorting = rg.sorting_columns().expect("declared sort order");
    assert_eq!(
        sorting.iter().map(|s| s.column_idx).collect::<Vec<_>>(),
        [3, 2, 5]
    );
    let ids: Vec<String> = crate::support::committed_rows(&server.dir)
        .into_iter()
        .filter(|r| r.ts >= 1_794_355_200_000_000 && r.ts < 1_794_441_600_000_000)
        .map(|r| r.event_id)
        .collect();
    assert_eq!(
        ids,
        ["c", "b", "a"],
        "sorted by campaign, user_id, ts as declared"
    );
    let wal: Vec<_> = std::fs::read_dir(server.dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let segments = wal
        .iter()
        .filter(|p| funnelhouse_storage::wal::segment_number(p).is_some());
    let wal_bytes: u64 = segments.map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(wal_bytes, 0, "flushed segments are retired");
    assert!(
        wal.iter()
            .filter(|p| p.extension().is_some_and(|x| x == "spare"))
            .count()
            <= 2,
        "at most two retired segments are kept as spares: {wal:?}"
    );
}

#[tokio::test]
async fn hour_partitioning_adds_an_hour_folder() {
    let cfg = IngestConfig {
        partition: Partitioning::Hour,
        ..config()
    };
    let server = TestServer::start(cfg).await;
    server
        .post_json(&json!([
            at("h", "u", "2026-11-11T10:59:59Z"),
            at("i", "u", "2026-11-11T11:00:00Z")
        ]))
        .await;
    server.store.flush().await.unwrap();
    let mut parts: Vec<String> = Manifest::load(&server.dir)
        .unwrap()
        .files
        .into_iter()
        .map(|f| f.partition)
        .collect();
    parts.sort();
    assert_eq!(
        parts,
        ["date=2026-11-11/hour=10", "date=2026-11-11/hour=11"]
    );
}

#[tokio::test]
async fn the_live_buffer_flushes_by_age_on_its_own() {
    let cfg = IngestConfig {
        flush_interval: Duration::from_millis(200),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    server.post_json(&json!([event("aged")])).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Manifest::load(&server.dir).unwrap().files.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no flush by age");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.rows().len(), 1);
}

#[tokio::test]
async fn small_files_are_compacted_and_late_duplicates_dropped() {
    let cfg = IngestConfig {
        dedup_window: Duration::from_secs(1),
        compact_min_files: 4,
        ..config()
    };
    let server = TestServer::start(cfg).await;
    for round in 0..3 {
        let batch: Vec<Value> = (0..10)
            .map(|i| {
                at(
                    &format!("r{round}-{i}"),
                    &format!("u{i}"),
                    "2026-11-11T10:00:00Z",
                )
            })
            .collect();
        server.post_json(&Value::Array(batch)).await;
        server.store.flush().await.unwrap();
    }
    assert_eq!(Manifest::load(&server.dir).unwrap().files.len(), 3);
    // After the dedup window a resend is stored again (same ts, same partition)...
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reply = server
        .post_json(&json!([at("r0-0", "u0", "2026-11-11T10:00:00Z")]))
        .await;
    assert_eq!(reply.json["accepted"], 1, "{}", reply.json);
    assert_eq!(server.rows().len(), 31);
    // ...until the fourth small file triggers compaction of the partition.
    server.store.flush().await.unwrap();
    wait_until("the partition is compacted", || {
        Manifest::load(&server.dir).unwrap().files.len() == 1
    })
    .await;
    let manifest = Manifest::load(&server.dir).unwrap();
    assert_eq!(manifest.files.len(), 1, "{:?}", manifest.files);
    assert!(manifest.files[0].path.contains("/c-"));
    assert_eq!(server.rows().len(), 30);
    let rows = committed_rows(&server.dir);
    assert_eq!(rows.len(), 30);
    let mut ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 30);
}

/// A late duplicate of an event that sits in a big (already compacted) file is dropped
/// when the small files holding it are compacted; the big file is only read past them.
#[tokio::test]
async fn compaction_drops_late_duplicates_of_events_in_big_files() {
    let cfg = IngestConfig {
        dedup_window: Duration::from_secs(1),
        compact_min_files: 2,
        compact_small_bytes: ByteSize(8 * 1024),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let ts = "2026-11-11T10:00:00Z";
    let big: Vec<Value> = (0..3000)
        .map(|i| at(&format!("big-{i}"), &format!("u{i}"), ts))
        .collect();
    server.post_json(&Value::Array(big)).await;
    server.store.flush().await.unwrap();
    let first = Manifest::load(&server.dir).unwrap().files;
    assert!(
        first[0].bytes >= 8 * 1024,
        "the first file is big: {first:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past the dedup window, "big-7" is sent again and stored in a small file.
    for round in 0..2 {
        let mut small: Vec<Value> = (0..5)
            .map(|i| at(&format!("small-{round}-{i}"), "s", ts))
            .collect();
        if round == 1 {
            small.push(at("big-7", "u7", ts));
        }
        let reply = server.post_json(&Value::Array(small)).await;
        assert_eq!(reply.json["duplicates"], 0, "{}", reply.json);
        server.store.flush().await.unwrap();
    }
    wait_until("the small files are compacted", || {
        let files = Manifest::load(&server.dir).unwrap().files;
        files.len() == 2 && files.iter().all(|f| f.path.contains("/c-"))
    })
    .await;
    let rows = committed_rows(&server.dir);
    assert_eq!(
        rows.len(),
        3010,
        "the late duplicate is dropped, the rest kept"
    );
    assert_eq!(rows.iter().filter(|r| r.event_id == "big-7").count(), 1);
}

/// Every file a flush wrote is checked once, however big: a late duplicate cannot hide
/// in two big files.
#[tokio::test]
async fn compaction_drops_late_duplicates_that_sit_in_two_big_files() {
    let cfg = IngestConfig {
        dedup_window: Duration::ZERO,
        compact_small_bytes: ByteSize(1024),
        ..config()
    };
    let server = TestServer::start(cfg).await;
    let ts = "2026-11-11T10:00:00Z";
    let ids = |range: std::ops::Range<usize>| -> Value {
        range
            .map(|i| at(&format!("d-{i}"), &format!("u{i}"), ts))
            .collect()
    };
    server.post_json(&ids(0..500)).await;
    server.store.flush().await.unwrap();
    // Resent past the (zero) dedup window, together with new events.
    let reply = server.post_json(&ids(400..900)).await;
    assert_eq!(reply.json["accepted"], 500, "{}", reply.json);
    server.store.flush().await.unwrap();
    wait_until("both flush files are compacted", || {
        let files = Manifest::load(&server.dir).unwrap().files;
        files.iter().all(|f| f.path.contains("/c-"))
    })
    .await;
    let files = Manifest::load(&server.dir).unwrap().files;
    assert!(
        files.iter().all(|f| f.bytes >= 1024),
        "big files: {files:?}"
    );
    let rows = committed_rows(&server.dir);
    let distinct: std::collections::HashSet<&str> =
        rows.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!((rows.len(), distinct.len()), (900, 900));
}

#[tokio::test]
async fn offline_compaction_merges_every_partition_with_small_files() {
    let server = TestServer::start(config()).await;
    for round in 0..3 {
        server
            .post_json(&json!([at(
                &format!("o{round}"),
                "u",
                "2026-11-11T10:00:00Z"
            )]))
            .await;
        server.store.flush().await.unwrap();
    }
    let dir = server.dir.clone();
    let keep = server.stop().await;
    let outcome = funnelhouse_storage::compact_data_dir(&dir, &config()).unwrap();
    assert_eq!(
        (outcome.partitions, outcome.files_in, outcome.rows_out),
        (1, 3, 3)
    );
    let manifest = Manifest::load(&dir).unwrap();
    assert_eq!(manifest.files.len(), 1);
    let on_disk = walk_parquet(&dir.join("events"));
    assert_eq!(on_disk, 1, "replaced files are deleted");
    drop(keep);
}

/// One writer per data dir: a second store or an offline compaction is refused with an
/// error that says what to do, until the first store shuts down.
#[tokio::test]
async fn a_data_dir_in_use_is_refused_until_its_store_stops() {
    let server = TestServer::start(config()).await;
    let dir = server.dir.clone();
    let second = funnelhouse_storage::EventStore::open(&dir, &config(), Default::default());
    let message = second.err().expect("a second store is refused").to_string();
    assert!(
        message.contains(&format!("data dir in use (pid {})", std::process::id()))
            && message.contains("--data-dir"),
        "{message}"
    );
    let compaction = funnelhouse_storage::compact_data_dir(&dir, &config());
    assert!(compaction.is_err(), "offline compaction is refused too");
    let keep = server.stop().await;
    funnelhouse_storage::compact_data_dir(&dir, &config()).expect("free after shutdown");
    drop(keep);
}

/// A flush whose clean-up fails after its manifest commit (here a WAL segment that
/// cannot be removed) is done: it is not retried, which would store every row twice.
#[tokio::test]
async fn a_cleanup_failure_after_the_commit_does_not_store_the_flush_twice() {
    let server = TestServer::start(config()).await;
    // A "segment" that is a non-empty directory: removing it fails.
    let stuck = server.dir.join("wal").join(format!("{:020}.wal", 0));
    std::fs::create_dir_all(stuck.join("x")).unwrap();
    let events: Vec<Value> = (0..5)
        .map(|i| at(&format!("c{i}"), "u", "2026-11-11T10:00:00Z"))
        .collect();
    assert_eq!(server.post_json(&json!(events)).await.json["accepted"], 5);
    tokio::time::timeout(Duration::from_secs(10), server.store.flush())
        .await
        .expect("the flush is not retried forever")
        .unwrap();
    assert_eq!(committed_rows(&server.dir).len(), 5, "each row stored once");
    assert_eq!(server.rows().len(), 5);
    std::fs::remove_dir_all(&stuck).unwrap();
}

fn walk_parquet(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            if p.is_dir() {
                walk_parquet(&p)
            } else {
                usize::from(p.extension().is_some_and(|e| e == "parquet"))
            }
        })
        .sum()
}
