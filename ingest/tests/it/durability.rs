//! Restart behaviour: WAL replay, torn and zero-filled tails, damage before the tail and
//! its salvage, dedup across restarts, uncommitted files.
//!
//! A "crash" here is a copy of the data dir taken while the server runs: exactly what
//! the disk holds at that moment (every acknowledged write is fsynced). The real kill -9
//! test of the binary lives in the workspace's own integration tests.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use funnelhouse_schemas::batch_memory_size;
use serde_json::Value;

use crate::support::{TestServer, committed_rows, config, event, wait_until};

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn batch(prefix: &str, n: usize) -> Value {
    Value::Array((0..n).map(|i| event(&format!("{prefix}-{i}"))).collect())
}

fn ids(rows: &[crate::support::Row]) -> Vec<String> {
    let mut ids: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
    ids.sort();
    ids
}

/// The WAL's segments (not its spares: retired segments kept for reuse).
fn wal_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| funnelhouse_storage::wal::segment_number(p).is_some())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn acknowledged_events_are_replayed_once_after_a_crash() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("before-flush", 50)).await;
    server.store.flush().await.unwrap();
    server.post_json(&batch("after-flush", 30)).await;
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());

    let restarted =
        TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
    let rows = restarted.rows();
    assert_eq!(rows.len(), 80, "every acknowledged event, none twice");
    assert_eq!(ids(&rows), ids(&server.rows()));
    // Replayed events are duplicates of what was stored, so a resend is not stored again.
    let reply = restarted.post_json(&batch("after-flush", 30)).await;
    assert_eq!(reply.json["duplicates"], 30);
    let tmp = restarted.stop().await;
    assert!(tmp.is_none());
    assert_eq!(
        committed_rows(crashed.path()).len(),
        80,
        "graceful stop flushed the live buffer"
    );
    assert!(
        wal_segments(crashed.path())
            .iter()
            .all(|p| fs::metadata(p).unwrap().len() == 0)
    );
}

#[tokio::test]
async fn a_torn_wal_tail_is_cut_at_the_last_valid_record() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("r1", 10)).await;
    server.post_json(&batch("r2", 10)).await;
    server.post_json(&batch("r3", 10)).await;
    for (cut, expect) in [(1usize, 20usize), (200, 20), (0, 30)] {
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(&server.dir, crashed.path());
        let segment = wal_segments(crashed.path()).pop().unwrap();
        let len = fs::metadata(&segment).unwrap().len();
        if cut > 0 {
            let f = fs::OpenOptions::new().write(true).open(&segment).unwrap();
            f.set_len(len - cut as u64).unwrap();
        }
        let restarted =
            TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
        let rows = restarted.rows();
        assert_eq!(rows.len(), expect, "cut {cut} bytes");
        assert!(rows.iter().all(|r| !r.event_id.starts_with("r3")) || expect == 30);
        // The cut segment was truncated to its valid prefix, so the next start agrees.
        drop(restarted);
    }
}

#[tokio::test]
async fn a_corrupt_last_record_is_a_tail_and_is_cut() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("c1", 5)).await;
    server.post_json(&batch("c2", 5)).await;
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());
    let segment = wal_segments(crashed.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    fs::write(&segment, bytes).unwrap();
    let restarted =
        TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
    let got = ids(&restarted.rows());
    assert_eq!(got.len(), 5);
    assert!(got.iter().all(|id| id.starts_with("c1-")));
}

/// What a power loss can leave on ext4/XFS: the file grew but its last blocks are zeros.
#[tokio::test]
async fn a_zero_filled_wal_tail_is_cut_and_the_server_starts() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("z1", 10)).await;
    server.post_json(&batch("z2", 10)).await;
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());
    let segment = wal_segments(crashed.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&segment, bytes).unwrap();
    let restarted =
        TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
    assert_eq!(restarted.rows().len(), 20, "every acknowledged event");
}

/// A bad record with good ones after it is damage, not a tail: the store refuses to
/// start and names the segment and offset; `wal::check` reports it, and `wal::salvage`
/// keeps every readable record, after which the store starts.
#[tokio::test]
async fn damage_before_the_wal_tail_stops_start_up_until_salvaged() {
    let server = TestServer::start(config()).await;
    for prefix in ["d1", "d2", "d3"] {
        server.post_json(&batch(prefix, 5)).await;
    }
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());
    let segment = wal_segments(crashed.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    let seq = funnelhouse_storage::wal::segment_number(&segment).unwrap();
    let second = funnelhouse_storage::wal::scan_segment(seq, &bytes).records[1].0;
    bytes[second + 20] ^= 0xff;
    fs::write(&segment, bytes).unwrap();

    let refused =
        funnelhouse_storage::EventStore::open(crashed.path(), &config(), Default::default());
    let message = refused.err().expect("damage refuses start-up").to_string();
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(
        message.contains(name)
            && message.contains(&format!("byte offset {second}"))
            && message.contains("wal salvage"),
        "{message}"
    );
    let wal_dir = crashed.path().join("wal");
    let report = funnelhouse_storage::wal::check(&wal_dir).unwrap();
    let damaged: Vec<_> = report.iter().filter(|r| r.damage.is_some()).collect();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0].damage.as_ref().unwrap().records_after, 1);
    assert_eq!((damaged[0].records, damaged[0].events), (2, 10));

    assert_eq!(
        funnelhouse_storage::wal::salvage(&wal_dir).unwrap().len(),
        1
    );
    let mut kept = segment.clone().into_os_string();
    kept.push(".damaged");
    assert!(Path::new(&kept).exists(), "the original is kept");
    let restarted =
        TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
    let got = ids(&restarted.rows());
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|id| !id.starts_with("d2-")), "{got:?}");
}

#[tokio::test]
async fn dedup_survives_a_graceful_restart_and_a_crash() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("flushed", 20)).await;
    server.store.flush().await.unwrap();
    server.post_json(&batch("in-wal", 20)).await;
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());
    let dir = server.dir.clone();
    let keep = server.stop().await;

    for restart_dir in [dir.as_path(), crashed.path()] {
        let restarted =
            TestServer::start_with(config(), Default::default(), Some(restart_dir)).await;
        let reply = restarted.post_json(&batch("flushed", 20)).await;
        assert_eq!(reply.json["duplicates"], 20, "{}", reply.json);
        let reply = restarted.post_json(&batch("in-wal", 20)).await;
        assert_eq!(reply.json["duplicates"], 20, "{}", reply.json);
        assert_eq!(restarted.rows().len(), 40);
        restarted.stop().await;
    }
    drop(keep);
}

/// Requests reach the WAL writer encoded and built into batches; of one with some
/// duplicates (earlier ids and a repeat within it) only the new events go into the WAL
/// record and the live buffer, and every duplicate is counted.
#[tokio::test]
async fn only_the_new_events_of_a_request_with_duplicates_are_stored() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("id", 10)).await;
    let mut mixed = batch("id", 15);
    let mixed_events = mixed.as_array_mut().unwrap();
    mixed_events.drain(..5);
    mixed_events.push(event("id-14"));
    mixed_events.push(event("id-3"));
    let reply = server.post_json(&mixed).await;
    assert_eq!(reply.json["accepted"], 5, "{}", reply.json);
    assert_eq!(reply.json["duplicates"], 7, "{}", reply.json);
    let mut expected: Vec<String> = (0..15).map(|i| format!("id-{i}")).collect();
    expected.sort();
    assert_eq!(ids(&server.rows()), expected, "the live buffer");
    let wal = funnelhouse_storage::wal::Wal::read_unflushed(&server.dir.join("wal"), 0).unwrap();
    let mut in_wal: Vec<String> = wal
        .iter()
        .flatten()
        .map(|e| e.event_id().to_string())
        .collect();
    in_wal.sort();
    assert_eq!(in_wal, expected, "the WAL records");
    // A resend of nothing new is answered without a record, and counted too.
    let reply = server.post_json(&mixed).await;
    assert_eq!(reply.json["duplicates"], 12, "{}", reply.json);
    assert_eq!(
        server
            .store
            .metrics()
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        19
    );
}

/// A request large enough for a batch of its own, with a few or many duplicates: the live
/// buffer holds each of its new events once, in one batch (the slices around its
/// duplicates put back together) whose bytes it counts, and so do the flushed files.
#[tokio::test]
async fn large_requests_with_few_or_many_duplicates_store_only_their_new_events() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("old", 400)).await;
    let mut expected = ids(&server.rows());
    // 3 resent ids (first, middle, last), then 75 (every fourth).
    for (round, resent) in [vec![0, 150, 299], (0..300).step_by(4).collect()]
        .into_iter()
        .enumerate()
    {
        let mut events: Vec<Value> = (0..300)
            .map(|i| event(&format!("new{round}-{i}")))
            .collect();
        for &i in &resent {
            events[i] = event(&format!("old-{i}"));
        }
        let reply = server.post_json(&Value::Array(events.clone())).await;
        assert_eq!(reply.json["accepted"], 300 - resent.len(), "{}", reply.json);
        assert_eq!(reply.json["duplicates"], resent.len(), "{}", reply.json);
        expected.extend(
            (0..300)
                .filter(|i| !resent.contains(i))
                .map(|i| format!("new{round}-{i}")),
        );
        expected.sort();
        assert_eq!(
            ids(&server.rows()),
            expected,
            "round {round}: the live buffer"
        );
    }
    let batches = server.store.snapshot().batches;
    assert_eq!(batches.len(), 3, "each request's new rows in one batch");
    let held: usize = batches.iter().map(batch_memory_size).sum();
    assert_eq!(
        server.store.metrics().buffer_bytes.load(Relaxed) as usize,
        held
    );
    server.store.flush().await.unwrap();
    assert_eq!(
        ids(&committed_rows(&server.dir)),
        expected,
        "the flushed files"
    );
}

#[tokio::test]
async fn files_of_an_uncommitted_flush_are_removed_and_their_events_replayed() {
    let server = TestServer::start(config()).await;
    server.post_json(&batch("committed", 10)).await;
    server.store.flush().await.unwrap();
    server.post_json(&batch("pending", 10)).await;
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&server.dir, crashed.path());
    // A crash after a flush wrote its Parquet file but before the manifest commit
    // leaves a file no manifest names (here: a copy of a committed one).
    let committed = funnelhouse_storage::Manifest::load(crashed.path())
        .unwrap()
        .files[0]
        .path
        .clone();
    let orphan = crashed
        .path()
        .join(&committed)
        .with_file_name("f99999999999999999999-orphan.parquet");
    fs::copy(crashed.path().join(&committed), &orphan).unwrap();
    let restarted =
        TestServer::start_with(config(), Default::default(), Some(crashed.path())).await;
    assert!(!orphan.exists());
    assert_eq!(restarted.rows().len(), 20);
    let tmp = restarted.stop().await;
    drop(tmp);
    let mut stored = ids(&committed_rows(crashed.path()));
    stored.dedup();
    assert_eq!(stored.len(), 20);
    assert_eq!(committed_rows(crashed.path()).len(), 20);
}

#[tokio::test]
async fn a_long_replay_is_flushed_a_segment_at_a_time() {
    use funnelhouse_schemas::units::ByteSize;
    use funnelhouse_storage::wal::{Wal, encode_events};
    use funnelhouse_storage::{IngestConfig, Manifest, OsDisk};
    use std::sync::Arc;
    // What a server killed while its flushes lagged leaves: three unflushed WAL segments.
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, _) = Wal::open(&dir.path().join("wal"), 0, Arc::new(OsDisk), |_, _| {}).unwrap();
    let mut sent = Vec::new();
    for segment in 0..3 {
        for record in 0..2 {
            let events: Vec<funnelhouse_schemas::Event> = (0..20)
                .map(|i| {
                    funnelhouse_schemas::Event::from(funnelhouse_schemas::EventRef {
                        event_id: &format!("s{segment}-r{record}-{i}"),
                        event: "scan",
                        user_id: &format!("u{i}"),
                        campaign: "parcel-lottery",
                        channel: "jd",
                        ts: 1_794_000_000_000_000,
                        received_at: funnelhouse_schemas::time::now_micros(),
                        properties: None,
                    })
                })
                .collect();
            let mut payload = Vec::new();
            encode_events(events.iter(), &mut payload);
            wal.append(&payload).unwrap();
            sent.extend(events.iter().map(|e| e.event_id().to_string()));
        }
        wal.rotate().unwrap();
    }
    drop(wal);

    // Any held bytes are a flush's worth: each segment end seals what came before it.
    let cfg = IngestConfig {
        flush_bytes: ByteSize(1),
        compact_min_files: 100,
        ..config()
    };
    let restarted = TestServer::start_with(cfg, Default::default(), Some(dir.path())).await;
    wait_until("the replay's flushes commit", || {
        Manifest::load(dir.path()).unwrap().files.len() == 3
    })
    .await;
    let manifest = Manifest::load(dir.path()).unwrap();
    let mut names: Vec<&str> = manifest
        .files
        .iter()
        .map(|f| f.path.rsplit('/').next().unwrap())
        .collect();
    names.sort();
    assert!(names[0].starts_with("f00000000000000000001"), "{names:?}");
    assert!(names[1].starts_with("f00000000000000000002"), "{names:?}");
    assert_eq!(
        manifest.files.iter().map(|f| f.rows).collect::<Vec<_>>(),
        vec![40, 40, 40]
    );
    sent.sort();
    assert_eq!(ids(&restarted.rows()), sent, "every replayed event once");
    restarted.stop().await;
    assert_eq!(ids(&committed_rows(dir.path())), sent);
}
