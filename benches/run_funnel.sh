#!/usr/bin/env bash
# Funnel benchmark (not part of the test suite).
#   benches/run_funnel.sh [EVENTS...]        default: 10000000 50000000
# For each size: `funnelhouse gen` posts the events to a release server, which flushes
# them to Parquet on SIGTERM; `funnelhouse compact` merges small files; then the
# 4-step, 24 h channel funnel of parcel-lottery runs through our engine
# (`funnelhouse funnel`, offline on the data dir, peak RSS via /usr/bin/time) and the
# same funnel in ClickHouse (chdb) and DuckDB over the same Parquet files.
# Results: benches/out/funnel-*.json and a table on stdout.
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10000000 50000000)
source "$(dirname "$0")/common.sh"
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }

for N in "${SIZES[@]}"; do
  DATA="$OUT/funnel-data-$N"
  if [ ! -f "$DATA/manifest.json" ]; then
    start_server "$DATA"
    FUNNELHOUSE_LOG=info "$BIN/funnelhouse" gen --events "$N" --server "$URL" --batch-size 2000
    stop_server
    "$BIN/funnelhouse" compact --data-dir "$DATA"
  fi
  STEPS=package,scan,view,draw
  best=""
  for run in 1 2 3; do
    /usr/bin/time -f '%e %M' -o "$OUT/funnel-time-$N.txt" \
      "$BIN/funnelhouse" funnel --data-dir "$DATA" --campaign parcel-lottery --steps "$STEPS" --window 24h \
      --breakdown channel --json > "$OUT/funnel-ours-$N.json"
    read -r secs rss_kb < "$OUT/funnel-time-$N.txt"
    if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; best_rss=$rss_kb; fi
  done
  echo "{\"engine\": \"funnelhouse\", \"events\": $N, \"seconds\": $best, \"peak_rss_mb\": $((best_rss / 1024))}" \
    | tee "$OUT/funnel-ours-time-$N.json"
  "$VENV/bin/python" benches/anchors_funnel.py "$DATA/events/*/*.parquet" parcel-lottery 3 | tee "$OUT/funnel-anchors-$N.json"
done

"$VENV/bin/python" - "$OUT" "${SIZES[@]}" <<'PY'
import json, sys
out, sizes = sys.argv[1], sys.argv[2:]
print("\n| events | funnelhouse s | peak RSS MB | chdb s | duckdb s | ratio to faster anchor | counts (ours / chdb / duckdb) |")
print("|---|---|---|---|---|---|---|")
for n in sizes:
    ours = json.load(open(f"{out}/funnel-ours-time-{n}.json"))
    report = json.load(open(f"{out}/funnel-ours-{n}.json"))
    anchors = {a["engine"]: a for a in map(json.loads, open(f"{out}/funnel-anchors-{n}.json"))}
    best = min(a["seconds"] for a in anchors.values())
    print(f"| {int(n):,} | {ours['seconds']:.2f} | {ours['peak_rss_mb']} | {anchors['chdb']['seconds']:.2f} | "
          f"{anchors['duckdb']['seconds']:.2f} | {ours['seconds'] / best:.2f} | "
          f"{report['total']['counts']} / {anchors['chdb']['counts']} / {anchors['duckdb']['counts']} |")
PY
