//! The dedup index on the writer thread: per 500-event group, insert every id, record
//! the group, expire past the cap; at a steady 4M ids held. Reports ids/s.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use funnelhouse_ingest::dedup::{DedupIndex, id_hash};

fn dedup(c: &mut Criterion) {
    const HELD: usize = 4_000_000;
    const GROUP: usize = 500;
    let mut idx = DedupIndex::new(Duration::from_secs(86_400), HELD);
    let mut next = 0u64;
    let mut group = |idx: &mut DedupIndex| {
        for _ in 0..GROUP {
            idx.insert(id_hash(&format!("evt-{next:012}")));
            next += 1;
        }
        idx.record(next as i64, GROUP);
        idx.expire(next as i64);
    };
    while idx.len() < HELD {
        group(&mut idx);
    }
    let mut g = c.benchmark_group("dedup_index");
    g.throughput(Throughput::Elements(GROUP as u64));
    g.bench_function("insert_record_expire_500_at_4M", |b| {
        b.iter(|| group(&mut idx))
    });
    g.finish();
    println!(
        "dedup index: {:.1} bytes per id at {} ids",
        idx.heap_bytes() as f64 / idx.len() as f64,
        idx.len()
    );
}

criterion_group!(benches, dedup);
criterion_main!(benches);
