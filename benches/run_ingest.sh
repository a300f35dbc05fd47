#!/usr/bin/env bash
# End-to-end ingest benchmark (not part of the test suite).
#   benches/run_ingest.sh [EVENTS]          default 2000000
# 1. `funnelhouse gen` writes EVENTS realistic events as NDJSON (see benches/README.md);
# 2. anchors: DuckDB and ClickHouse (chdb) convert that file to zstd Parquet;
# 3. peak: a release server on loopback takes the file from 8 clients posting 500-event
#    NDJSON batches with durable acks; SIGTERM flushes; Parquet bytes per stored event;
# 4. connections: the same with 1, 4, 16 and 64 clients (a fresh server each);
# 5. half load: a fresh server offered half the peak rate, for ack latency percentiles;
#    then the same with a probe measuring ack -> visible in SQL (its queries cost CPU, so
#    it runs apart from the ack latency run).
# Results: benches/out/ingest-*.json and a table on stdout.
EVENTS="${1:-2000000}"
source "$(dirname "$0")/common.sh"

"$BIN/funnelhouse" gen --events "$EVENTS" --out "$OUT/events.ndjson"
"$VENV/bin/python" benches/anchors_ingest.py "$OUT/events.ndjson" "$OUT" | tee "$OUT/ingest-anchors.json"

# load_run NAME ARGS...: a fresh server takes the file; the report is $OUT/ingest-NAME.json.
load_run() {
  local name=$1
  shift
  start_server "$OUT/data-$name"
  "$BIN/load" --url "$URL" --file "$OUT/events.ndjson" --batch 500 "$@" | tee "$OUT/ingest-$name.json"
  stop_server
}

load_run peak --clients 8
"$VENV/bin/python" - "$OUT/data-peak" > "$OUT/ingest-storage.json" <<'PY'
import json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "manifest.json")))
rows = sum(f["rows"] for f in m["files"])
size = sum(os.path.getsize(os.path.join(d, f["path"])) for f in m["files"])
print(json.dumps({"stored_events": rows, "files": len(m["files"]), "parquet_bytes": size, "bytes_per_event": size / rows}))
PY
cat "$OUT/ingest-storage.json"
for c in 1 4 16 64; do load_run "clients-$c" --clients "$c"; done

PEAK=$("$VENV/bin/python" -c "import json;print(json.load(open('$OUT/ingest-peak.json'))['events_per_sec'])")
HALF=$("$VENV/bin/python" -c "print($PEAK / 2)")
load_run half --clients 8 --rate "$HALF"
load_run visible --clients 8 --rate "$HALF" --probe-visible

"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
anchors = [json.loads(l) for l in open(f"{out}/ingest-anchors.json")]
load = lambda name: json.load(open(f"{out}/ingest-{name}.json"))
peak, half, visible, storage = load("peak"), load("half"), load("visible"), load("storage")
best = max(a["events_per_sec"] for a in anchors)
print(f"\n| what | events/s | MB/s | p50 ms | p99 ms | bytes/event |")
print(f"|---|---|---|---|---|---|")
for a in anchors:
    print(f"| {a['engine']} NDJSON->zstd Parquet | {a['events_per_sec']:,.0f} | | | | {a['bytes_per_event']:.1f} |")
print(f"| funnelhouse durable ingest, peak (8 clients) | {peak['events_per_sec']:,.0f} | {peak['mb_per_sec']:.1f} | {peak['p50_ms']:.1f} | {peak['p99_ms']:.1f} | {storage['bytes_per_event']:.1f} |")
for c in [1, 4, 16, 64]:
    r = load(f"clients-{c}")
    print(f"| funnelhouse, {c} clients | {r['events_per_sec']:,.0f} | {r['mb_per_sec']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | |")
print(f"| funnelhouse at half of peak | {half['events_per_sec']:,.0f} | {half['mb_per_sec']:.1f} | {half['p50_ms']:.1f} | {half['p99_ms']:.1f} | |")
print(f"\nratio peak / faster anchor: {peak['events_per_sec'] / best:.2f} (target >= 1.0)")
print(f"p99 at half load: {half['p99_ms']:.1f} ms (target < 25)")
print(f"ack -> visible in SQL at half load: p50 {visible.get('visible_p50_ms', float('nan')):.1f} ms, "
      f"p99 {visible.get('visible_p99_ms', float('nan')):.1f} ms ({visible.get('visible_probes', 0)} probes)")
print(f"Parquet bytes/event: {storage['bytes_per_event']:.1f} (target <= 20)")
PY
