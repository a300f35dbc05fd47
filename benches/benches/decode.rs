//! Decode + validate + JSON -> Arrow of one 500-event NDJSON batch, the collector's
//! per-request CPU work. Reports events/s (and MB/s in the `bytes` group). The batch is
//! built in, or the first 500 lines of the NDJSON file in `DECODE_BENCH_NDJSON` (e.g.
//! `funnelhouse gen` output, whose strings are longer).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use funnelhouse_schemas::{BodyFormat, DecodeContext, decode_body, events_to_batch};

fn batch(n: usize) -> String {
    let mut body = String::new();
    for i in 0..n {
        let user = i / 3;
        body.push_str(&format!(
            r#"{{"event_id":"u{user:08}-{i}","event":"scan","user_id":"u{user:08}","campaign":"parcel-lottery","channel":"jd","ts":"2026-11-11T10:{:02}:{:02}.123Z","properties":{{"card":"A3"}}}}"#,
            i % 60,
            (i * 7) % 60
        ));
        body.push('\n');
    }
    body
}

fn decode(c: &mut Criterion) {
    let body = match std::env::var("DECODE_BENCH_NDJSON") {
        Ok(path) => {
            let text = std::fs::read_to_string(&path).expect("DECODE_BENCH_NDJSON is readable");
            let lines: Vec<&str> = text.lines().take(500).collect();
            assert_eq!(lines.len(), 500, "{path}: at least 500 lines");
            lines.join("\n") + "\n"
        }
        Err(_) => batch(500),
    };
    let ctx = DecodeContext::new(1_794_391_200_000_000);
    for (name, throughput) in [
        ("events", Throughput::Elements(500)),
        ("bytes", Throughput::Bytes(body.len() as u64)),
    ] {
        let mut group = c.benchmark_group(format!("decode_validate_500/{name}"));
        group.throughput(throughput);
        group.bench_function("ndjson", |b| {
            b.iter(|| {
                let decoded = decode_body(body.as_bytes(), BodyFormat::Ndjson, &ctx).unwrap();
                assert_eq!(decoded.events.len(), 500);
                events_to_batch(&decoded.events)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
