#!/usr/bin/env bash
# Ballista benchmark (not part of the test suite).
#   benches/run_ballista.sh [EVENTS]        default: 10000000
# Over the data dir benches/run_funnel.sh made for EVENTS (made here if missing): the
# 4-step, 24 h channel funnel of parcel-lottery and a SQL aggregate, in process and on a
# scheduler with 1 and then 2 executors (processes of the release binary, 2 task slots
# each, on this machine): best of 3 wall-clock seconds, and whether the funnel's counts
# equal the in-process ones (as_of aside: on a cluster it is the newest commit's time).
# Results: benches/out/ballista-*.json and a table on stdout.
N="${1:-10000000}"
NO_ANCHORS=1
source "$(dirname "$0")/common.sh"
funnel_data "$N"
FUNNEL=(funnel --data-dir "$DATA" --campaign parcel-lottery --steps package,scan,view,draw
  --window 24h --breakdown channel --json)
SQL="SELECT channel, count(*) AS events, count(DISTINCT user_id) AS users FROM events WHERE campaign = 'parcel-lottery' GROUP BY channel ORDER BY channel"

# best_of3 NAME CMD...: the fastest of three runs, in seconds; output in $OUT/NAME.out
best_of3() {
  local name=$1 best="" t0 t1 secs
  shift
  for _ in 1 2 3; do
    t0=$(date +%s.%N)
    "$@" > "$OUT/$name.out"
    t1=$(date +%s.%N)
    secs=$(awk "BEGIN{printf \"%.2f\", $t1 - $t0}")
    if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; fi
  done
  echo "$best"
}

PIDS=()
stop_cluster() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap stop_cluster EXIT

local_funnel=$(best_of3 ballista-local-funnel "$BIN/funnelhouse" "${FUNNEL[@]}")
local_sql=$(best_of3 ballista-local-sql "$BIN/funnelhouse" sql --data-dir "$DATA" "$SQL")
echo "{\"where\": \"in process\", \"events\": $N, \"funnel_s\": $local_funnel, \"sql_s\": $local_sql}" \
  | tee "$OUT/ballista-0-$N.json"

for E in 1 2; do
  LOG="$OUT/ballista-scheduler.log"
  FUNNELHOUSE_LOG=info "$BIN/funnelhouse" scheduler --bind 127.0.0.1:0 2> "$LOG" &
  PIDS+=($!)
  ADDR=""
  for _ in $(seq 1 100); do
    ADDR=$(grep -o 'listening on [0-9.:]*' "$LOG" | head -1 | sed 's/listening on //') || true
    [ -n "$ADDR" ] && break
    sleep 0.1
  done
  [ -n "$ADDR" ] || { echo "scheduler did not start; see $LOG" >&2; exit 1; }
  for i in $(seq 1 "$E"); do
    FUNNELHOUSE_LOG=warn "$BIN/funnelhouse" executor --scheduler "df://$ADDR" --bind 127.0.0.1:0 \
      --concurrent-tasks 2 --work-dir "$OUT/ballista-work-$i" 2> "$OUT/ballista-executor-$i.log" &
    PIDS+=($!)
  done
  printf '[query]\nballista = "df://%s"\n' "$ADDR" > "$OUT/ballista.toml"
  # Executors register within a heartbeat; the first query waits for them.
  "$BIN/funnelhouse" --config "$OUT/ballista.toml" sql --data-dir "$DATA" "SELECT 1" > /dev/null
  funnel=$(best_of3 "ballista-$E-funnel" "$BIN/funnelhouse" --config "$OUT/ballista.toml" "${FUNNEL[@]}")
  sql=$(best_of3 "ballista-$E-sql" "$BIN/funnelhouse" --config "$OUT/ballista.toml" sql --data-dir "$DATA" "$SQL")
  same_funnel=$("$(command -v python3)" -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:]); [x.pop('as_of') for x in (a,b)]; print(a==b)" \
    "$OUT/ballista-local-funnel.out" "$OUT/ballista-$E-funnel.out")
  same_sql=$(cmp -s "$OUT/ballista-local-sql.out" "$OUT/ballista-$E-sql.out" && echo True || echo False)
  echo "{\"where\": \"$E executor(s)\", \"events\": $N, \"funnel_s\": $funnel, \"sql_s\": $sql, \"same_funnel\": \"$same_funnel\", \"same_sql\": \"$same_sql\"}" \
    | tee "$OUT/ballista-$E-$N.json"
  stop_cluster
done

python3 - "$OUT" "$N" <<'PY'
import json, sys
out, n = sys.argv[1], sys.argv[2]
print("\n| events | where | funnel s | SQL s | same funnel / SQL |")
print("|---|---|---|---|---|")
for e in (0, 1, 2):
    r = json.load(open(f"{out}/ballista-{e}-{n}.json"))
    same = f"{r['same_funnel']} / {r['same_sql']}" if e else "-"
    print(f"| {int(n):,} | {r['where']} | {r['funnel_s']} | {r['sql_s']} | {same} |")
PY
