#!/usr/bin/env bash
# Funnel benchmark (not part of the test suite).
#   benches/run_funnel.sh [EVENTS...]        default: 10000000 50000000
# For each size: `funnelhouse gen` posts the events to a release server, which flushes
# them to Parquet on SIGTERM; `funnelhouse compact` merges small files; then the
# 4-step, 24 h channel funnel of parcel-lottery runs through our engine
# (`funnelhouse funnel`, offline on the data dir, peak RSS via /usr/bin/time), again
# with `[query] memory_limit = "128MiB"` (CLI, and the RSS it adds to a server), and the
# same funnel in ClickHouse (chdb) and DuckDB over the same Parquet files.
# Results: benches/out/funnel-*.json and a table on stdout.
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10000000 50000000)
source "$(dirname "$0")/common.sh"
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }

for N in "${SIZES[@]}"; do
  funnel_data "$N"
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
  # Under memory_limit = 128MiB: the same answer (the fold spills), and how much the
  # funnel adds to a running server's RSS (VmHWM after it minus VmRSS before).
  printf '[query]\nmemory_limit = "128MiB"\n' > "$OUT/funnel-128mib.toml"
  /usr/bin/time -f '%e %M' -o "$OUT/funnel-time-128-$N.txt" \
    "$BIN/funnelhouse" --config "$OUT/funnel-128mib.toml" funnel --data-dir "$DATA" --campaign parcel-lottery \
    --steps "$STEPS" --window 24h --breakdown channel --json > "$OUT/funnel-ours-128-$N.json"
  read -r secs128 rss128_kb < "$OUT/funnel-time-128-$N.txt"
  CONFIG="$OUT/funnel-128mib.toml" KEEP=1 start_server "$DATA"
  before=$(awk '/VmRSS/{print int($2/1024)}' "/proc/$SERVER_PID/status")
  curl -sf "$URL/v1/funnel?campaign=parcel-lottery&steps=$STEPS&window=24h&breakdown=channel" \
    -o "$OUT/funnel-server-128-$N.json"
  peak=$(awk '/VmHWM/{print int($2/1024)}' "/proc/$SERVER_PID/status")
  stop_server
  "$BIN/funnelhouse" --config "$OUT/funnel-128mib.toml" funnel --data-dir "$DATA" --campaign parcel-lottery \
    --steps "$STEPS" --window 24h --breakdown channel --explain | grep -o 'FunnelFoldExec.*' \
    | grep -o 'spill_count=[0-9]*, spilled_bytes=[^,]*' > "$OUT/funnel-spills-$N.txt" || true
  same=$("$VENV/bin/python" -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); [x.pop('as_of') for x in (a,b)]; print(a==b)" \
    "$OUT/funnel-ours-$N.json" "$OUT/funnel-ours-128-$N.json")
  echo "{\"engine\": \"funnelhouse 128MiB\", \"events\": $N, \"seconds\": $secs128, \"peak_rss_mb\": $((rss128_kb / 1024)), \"server_rss_added_mb\": $((peak - before)), \"same_answer\": \"$same\", \"spills\": \"$(cat "$OUT/funnel-spills-$N.txt")\"}" \
    | tee "$OUT/funnel-ours-128-time-$N.json"
  "$VENV/bin/python" benches/anchors_funnel.py "$DATA/events/*/*.parquet" parcel-lottery 3 | tee "$OUT/funnel-anchors-$N.json"
done

"$VENV/bin/python" - "$OUT" "${SIZES[@]}" <<'PY'
import json, sys
out, sizes = sys.argv[1], sys.argv[2:]
print("\n| events | funnelhouse s | peak RSS MB | 128MiB: s / peak RSS MB / server RSS added MB / same answer / spills | chdb s | duckdb s | ratio to faster anchor | counts (ours / chdb / duckdb) |")
print("|---|---|---|---|---|---|---|---|")
for n in sizes:
    ours = json.load(open(f"{out}/funnel-ours-time-{n}.json"))
    lim = json.load(open(f"{out}/funnel-ours-128-time-{n}.json"))
    report = json.load(open(f"{out}/funnel-ours-{n}.json"))
    anchors = {a["engine"]: a for a in map(json.loads, open(f"{out}/funnel-anchors-{n}.json"))}
    best = min(a["seconds"] for a in anchors.values())
    print(f"| {int(n):,} | {ours['seconds']:.2f} | {ours['peak_rss_mb']} | "
          f"{lim['seconds']} / {lim['peak_rss_mb']} / {lim['server_rss_added_mb']} / {lim['same_answer']} / {lim['spills']} | "
          f"{anchors['chdb']['seconds']:.2f} | "
          f"{anchors['duckdb']['seconds']:.2f} | {ours['seconds'] / best:.2f} | "
          f"{report['total']['counts']} / {anchors['chdb']['counts']} / {anchors['duckdb']['counts']} |")
PY
