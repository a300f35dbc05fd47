#!/usr/bin/env bash
# Bursts (issue 9): a steady load, then a burst from many connections that ignore
# Retry-After, then the steady load again, against a release server whose buffer is
# bounded ([ingest] max_buffer_bytes). Checks and reports: 503s with Retry-After instead
# of growth, the server's peak RSS against a bound, every acknowledged event stored once,
# and throughput and ack latency back after the burst.
#   benches/run_burst.sh [RATE] [BURST_CLIENTS] [BURST_SECS]   # default 20000 200 60
NO_ANCHORS=1 source "$(dirname "$0")/common.sh"
RATE="${1:-20000}"
BURST_CLIENTS="${2:-200}"
BURST_SECS="${3:-60}"
MAX_BUFFER="${MAX_BUFFER:-256MiB}"
# The dedup index is memory of its own, about 21 bytes per id up to dedup_max_ids; a
# minute's burst brings ~15M ids. The RSS bound covers the buffer, requests in flight,
# flushes and compaction plus an index capped at 4M ids (~100 MB): past the cap the
# oldest ids leave early (counted in funnelhouse_dedup_evicted_total).
DEDUP_MAX_IDS="${DEDUP_MAX_IDS:-4000000}"
RSS_BOUND_MB="${RSS_BOUND_MB:-1024}"
DATA="$OUT/burst-data"
cat > "$OUT/burst.toml" <<TOML
[ingest]
max_buffer_bytes = "$MAX_BUFFER"
dedup_max_ids = $DEDUP_MAX_IDS
flush_bytes = "64MiB"
[http]
max_connections = 10000
TOML
FUNNELHOUSE_CONFIG="$OUT/burst.toml" start_server "$DATA"
echo "server $SERVER_PID at $URL, max_buffer_bytes $MAX_BUFFER, dedup_max_ids $DEDUP_MAX_IDS, RSS bound ${RSS_BOUND_MB} MB"
"$BIN/burst" --url "$URL" --pid "$SERVER_PID" --rate "$RATE" --burst-clients "$BURST_CLIENTS" \
  --burst-secs "$BURST_SECS" | tee "$OUT/burst.jsonl"
verdict=${PIPESTATUS[0]}
peak=$(grep -o '"peak_rss_mb":[0-9.]*' "$OUT/burst.jsonl" | cut -d: -f2 | sort -n | tail -1)
stop_server
echo "peak RSS ${peak} MB (bound ${RSS_BOUND_MB} MB)"
if [ "$verdict" != 0 ]; then echo "FAILED: acknowledged events missing or doubled, or a refusal without Retry-After" >&2; exit 1; fi
if [ "${peak%.*}" -gt "$RSS_BOUND_MB" ]; then echo "FAILED: RSS over the bound" >&2; exit 1; fi
echo "OK"
