//! The dedup index on the writer thread: per 500-event group, warm the index for the
//! ids, insert every id, record the group, expire past the cap; at a steady 4M ids held.
//! Reports ids/s. Then the slowest group while the index grows from empty past 16M ids
//! (the table doubles on the way): that group's ack waits for it.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use funnelhouse_storage::dedup::{DedupIndex, id_hash};

fn dedup(c: &mut Criterion) {
    const HELD: usize = 4_000_000;
    const GROUP: usize = 500;
    let mut idx = DedupIndex::new(Duration::from_secs(86_400), HELD);
    let mut next = 0u64;
    let mut hashes = Vec::with_capacity(GROUP);
    let mut group = |idx: &mut DedupIndex| {
        // As the writer thread does: a request's hashes come computed, their slots are
        // warmed, then they are inserted.
        hashes.clear();
        hashes.extend((next..next + GROUP as u64).map(|i| id_hash(&format!("evt-{i:012}"))));
        next += GROUP as u64;
        idx.warm(&hashes);
        for &h in &hashes {
            idx.insert(h);
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
    slowest_group_while_growing();
}

fn slowest_group_while_growing() {
    const IDS: u64 = 16_000_000;
    let mut idx = DedupIndex::new(Duration::from_secs(86_400), 100_000_000);
    let (mut worst, mut at) = (Duration::ZERO, 0);
    let started = std::time::Instant::now();
    for first in (0..IDS).step_by(500) {
        let t = std::time::Instant::now();
        for i in first..first + 500 {
            idx.insert(id_hash(&format!("grow-{i:012}")));
        }
        idx.record(first as i64, 500);
        if t.elapsed() > worst {
            (worst, at) = (t.elapsed(), first);
        }
    }
    println!(
        "dedup index grown to {IDS} ids in {:.1} s: slowest 500-id group {worst:.2?} (at {at} ids)",
        started.elapsed().as_secs_f64()
    );
}

criterion_group!(benches, dedup);
criterion_main!(benches);
