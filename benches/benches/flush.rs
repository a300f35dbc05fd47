//! One flush of the live buffer to Parquet on one thread, as the flusher does it under
//! load: sort by (day, campaign, user_id, ts), then encode and compress a zstd file per
//! day partition, fsync and rename (into a temporary dir under `$TMPDIR`; removing the
//! files after each flush is timed too). Reports events/s. The events come from the
//! NDJSON file in `FLUSH_BENCH_NDJSON` (e.g. `funnelhouse gen --events 400000 --out
//! f.ndjson`, about one default-sized flush), in batches of 4,000 events (or
//! `FLUSH_BENCH_GROUP`) as group commits append them (at 8 clients the server's batches
//! hold ~1,200); without it, from a small built-in mix. Uses mimalloc and keeps the C heap
//! like the server, so page faults on fresh memory count as they do there. Prints the
//! Parquet bytes per event first.

use std::time::Duration;

use arrow::array::RecordBatch;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use funnelhouse_schemas::{BodyFormat, DecodeContext, decode_body, events_to_batch};
use funnelhouse_storage::parquet_file::{keep_c_heap, write_partitioned};
use funnelhouse_storage::{OsDisk, Partitioning};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per live-buffer batch unless `FLUSH_BENCH_GROUP` says otherwise.
const GROUP: usize = 4_000;

fn ndjson() -> String {
    if let Ok(path) = std::env::var("FLUSH_BENCH_NDJSON") {
        return std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let mut body = String::new();
    for i in 0..200_000usize {
        let user = i / 3;
        let (event, props) = match i % 3 {
            0 => (
                "package",
                format!(r#"{{"order_id":"JD{:010}","items":{}}}"#, i * 7919, i % 5),
            ),
            1 => (
                "scan",
                format!(
                    r#"{{"card":"A{}","qr":"https://fh.example/s/c{}"}}"#,
                    i % 4,
                    i % 3
                ),
            ),
            _ => (
                "view",
                format!(r#"{{"page":"lottery","duration_ms":{}}}"#, i * 31 % 90_000),
            ),
        };
        body.push_str(&format!(
            r#"{{"event_id":"u{user:08}-{i}","event":"{event}","user_id":"u{user:08}","campaign":"campaign-{}","channel":"jd","ts":"2026-11-0{}T10:{:02}:{:02}.123Z","properties":{props}}}"#,
            user % 3,
            1 + user % 7,
            i % 60,
            (i * 7) % 60
        ));
        body.push('\n');
    }
    body
}

fn batches() -> Vec<RecordBatch> {
    let text = ndjson();
    let ctx = DecodeContext::new(1_794_391_200_000_000);
    let lines: Vec<&str> = text.lines().collect();
    let group = std::env::var("FLUSH_BENCH_GROUP").map_or(GROUP, |g| g.parse().expect("a count"));
    lines
        .chunks(group)
        .map(|chunk| {
            let body = chunk.join("\n");
            let decoded = decode_body(body.as_bytes(), BodyFormat::Ndjson, &ctx).unwrap();
            assert!(
                decoded.rejected.is_empty(),
                "{:?}",
                decoded.rejected.first()
            );
            events_to_batch(&decoded.events)
        })
        .collect()
}

fn flush(c: &mut Criterion) {
    keep_c_heap();
    let batches = batches();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let dir = tempfile::tempdir().unwrap();
    let files =
        write_partitioned(&OsDisk, dir.path(), &batches, Partitioning::Day, "f", 1).unwrap();
    let bytes: u64 = files.iter().map(|f| f.bytes).sum();
    println!(
        "flush: {rows} rows in {} files, {:.1} Parquet bytes per event",
        files.len(),
        bytes as f64 / rows as f64
    );
    for f in &files {
        std::fs::remove_file(dir.path().join(&f.path)).unwrap();
    }
    let mut g = c.benchmark_group("flush");
    g.throughput(Throughput::Elements(rows as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function(format!("write_partitioned_{rows}_rows_1_thread"), |b| {
        b.iter(|| {
            let files = write_partitioned(&OsDisk, dir.path(), &batches, Partitioning::Day, "f", 1)
                .unwrap();
            for f in &files {
                std::fs::remove_file(dir.path().join(&f.path)).unwrap();
            }
            files.len()
        })
    });
    g.finish();
}

criterion_group!(benches, flush);
criterion_main!(benches);
