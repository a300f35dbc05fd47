#!/usr/bin/env bash
# Interleaved A/B of durable ingest between two server binaries (not part of the test suite).
#   benches/ab_ingest.sh OLD_BINARY NEW_BINARY [ROUNDS] [EVENTS]    default 3 rounds, 2,000,000 events
# Each round runs OLD then NEW, each a fresh server on a fresh data dir taking EVENTS
# events of benches/out/events.ndjson (written by run_ingest.sh, or generated here when
# missing or shorter) from 8 clients (CLIENTS=N for N) posting 500-event batches; with
# RATE=N the clients offer N events/s (the half-load latency run). Prints events/s and p99
# from the load tool, the server's CPU seconds (user + sys, final flush included), the
# time from the load's end to the server's exit (the flushes still queued, then the last
# one) with the rate until all events are in Parquet (events over load time plus that),
# and its mean WAL fsync time (from /metrics). This VM's speed drifts by 25% within
# minutes (benches/README.md): compare pairs and medians, not single runs. NEW is usually
# this checkout's build (made at the start); build OLD in another worktree and copy its
# binary out, then `touch` the files this checkout changes: cargo keeps the other
# worktree's artifacts for sources older than them, and the A/B becomes an A/A.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: benches/ab_ingest.sh OLD_BINARY NEW_BINARY [ROUNDS] [EVENTS]" >&2; exit 2; }
OLD="$(realpath "$1")"
NEW="$(realpath "$2")"
ROUNDS="${3:-3}"
EVENTS="${4:-2000000}"
NO_ANCHORS=1 source "$(dirname "$0")/common.sh"
# A file left by a smaller run would cap every load below EVENTS: make one that is not.
if [ ! -f "$OUT/events.ndjson" ] || [ "$(wc -l < "$OUT/events.ndjson")" -lt "$EVENTS" ]; then
  "$BIN/funnelhouse" gen --events "$EVENTS" --out "$OUT/events.ndjson"
fi
for round in $(seq 1 "$ROUNDS"); do
  for name in old new; do
    if [ "$name" = old ]; then server=$OLD; else server=$NEW; fi
    SERVER_BIN=$server start_server "$OUT/data-ab"
    trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
    json=$("$BIN/load" --url "$URL" --file "$OUT/events.ndjson" --batch 500 --clients "${CLIENTS:-8}" \
      --limit "$EVENTS" ${RATE:+--rate "$RATE"})
    report=$(grep -oE '"events_per_sec":[0-9]+|"p99_ms":[0-9.]+' <<< "$json" | tr '\n' ' ')
    load_s=$(grep -oE '"seconds":[0-9.]+' <<< "$json" | cut -d: -f2)
    sent=$(grep -oE '"events":[0-9]+' <<< "$json" | cut -d: -f2)
    # The flusher works on from here: the time until the server has exited counts.
    load_end=$(date +%s.%N)
    fsync=$(curl -sf "$URL/metrics" | awk '/^funnelhouse_wal_fsync_seconds_sum/ {s=$2} /^funnelhouse_wal_fsync_seconds_count/ {n=$2}
      END {if (n > 0) printf "fsync_mean_ms=%.3f fsyncs=%d", 1000 * s / n, n}')
    stop_server "$load_end"
    parquet=$(awk -v n="$sent" -v l="$load_s" -v f="$STOP_SECONDS" \
      'BEGIN {printf "flush_s=%.2f to_parquet=%d", f, n / (l + f)}')
    echo "$name round $round: $report cpu_s=$SERVER_CPU_S $parquet $fsync"
  done
done
