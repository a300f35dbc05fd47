# Shared set-up of the benchmark scripts (sourced, not run):
# a release build, the Python venv with the anchors, and a server on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benches/out
mkdir -p "$OUT"
# --workspace, not -p: another package set changes feature unification and rebuilds DataFusion.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/funnelhouse-target}"
cargo build --release --workspace --bins
BIN="$CARGO_TARGET_DIR/release"
VENV=benches/.venv
# The anchors (DuckDB, chdb) and pyarrow (benches/storage_bytes.py) in a venv; scripts
# without anchors skip it (NO_ANCHORS=1).
if [ -z "${NO_ANCHORS:-}" ]; then
  if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
  "$VENV/bin/pip" install -q duckdb chdb pyarrow
fi

# start_server DATA_DIR -> sets SERVER_PID and URL (a fresh data dir unless KEEP=1,
# log in DATA_DIR.log at level $FUNNELHOUSE_LOG (default info), config file $CONFIG if set,
# binary $SERVER_BIN if set). It first writes back what earlier steps left in the page
# cache (the generated file, an anchor's unsynced Parquet, a removed data dir): written
# back during the run, it delayed the WAL's fsyncs by up to 40 ms (benches/README.md,
# session 35).
start_server() {
  [ -n "${KEEP:-}" ] || rm -rf "$1"
  sync
  local server="${SERVER_BIN:-$BIN/funnelhouse}"
  FUNNELHOUSE_LOG=${FUNNELHOUSE_LOG:-info} "$server" ${CONFIG:+--config "$CONFIG"} serve --data-dir "$1" \
    --http-addr 127.0.0.1:0 --pg-addr 127.0.0.1:0 2> "$1.log" &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    URL=$(grep -o 'listening on http://[0-9.:]*' "$1.log" 2>/dev/null | head -1 | sed 's/listening on //') || true
    if [ -n "${URL:-}" ] && curl -sf "$URL/readyz" >/dev/null; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$server exited; see $1.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "server did not start; see $1.log" >&2
  exit 1
}

# stop_server [SINCE]: SIGTERM (flushes the live buffer) and wait for the exit; sets
# SERVER_CPU_S (the server's user + sys seconds, read until it exits) and STOP_SECONDS
# (from SINCE, a `date +%s.%N` time, default now, to the exit).
stop_server() {
  local since=${1:-$(date +%s.%N)} c
  kill -TERM "$SERVER_PID"
  SERVER_CPU_S=""
  while kill -0 "$SERVER_PID" 2>/dev/null; do
    c=$(awk '{print ($14 + $15) / 100}' "/proc/$SERVER_PID/stat" 2>/dev/null) && [ -n "$c" ] && SERVER_CPU_S=$c
    sleep 0.01
  done
  STOP_SECONDS=$(awk -v a="$since" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
  wait "$SERVER_PID"
}

# funnel_data N -> sets DATA: a data dir of N generated events, posted to a server,
# flushed and compacted (made once, kept in $OUT).
funnel_data() {
  DATA="$OUT/funnel-data-$1"
  if [ ! -f "$DATA/manifest.json" ]; then
    start_server "$DATA"
    FUNNELHOUSE_LOG=info "$BIN/funnelhouse" gen --events "$1" --server "$URL" --batch-size 2000
    stop_server
    "$BIN/funnelhouse" compact --data-dir "$DATA"
  fi
}
