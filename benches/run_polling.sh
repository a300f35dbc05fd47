#!/usr/bin/env bash
# Cheap polling (issue 8): a campaign of EVENTS events, ~1,000 new events/s arriving,
# 20 dashboards polling the campaign funnel every 2 s. Ingest ack latency with and
# without the pollers, poll latency, a live-vs-scan check, and memory per tracked user
# (server RSS with the live funnel built minus RSS of the same server and data without
# a campaign funnel, each after one warm scan of the funnel, over the users it holds).
#   benches/run_polling.sh [EVENTS] [SECONDS]     # default 10,000,000 and 60 per phase
NO_ANCHORS=1 source "$(dirname "$0")/common.sh"
N="${1:-10000000}"
SECS="${2:-60}"
DATA="$OUT/poll-data-$N"
CAMPAIGN=parcel-lottery
STEPS='["package", "scan", "view", "draw"]'
if [ ! -f "$DATA/manifest.json" ]; then
  start_server "$DATA"
  FUNNELHOUSE_LOG=info "$BIN/funnelhouse" gen --events "$N" --campaigns 1 --server "$URL" --batch-size 2000
  stop_server
  "$BIN/funnelhouse" compact --data-dir "$DATA"
fi
rss_mb() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$SERVER_PID/status"; }
scan_once() {
  curl -sf -X POST "$URL/v1/funnel" -H 'Content-Type: application/json' \
    -d "{\"campaign\": \"$CAMPAIGN\", \"steps\": $STEPS, \"window\": \"24h\", \"to\": \"2100-01-01T00:00:00Z\", \"breakdown\": \"channel\"}" \
    -o /dev/null -w '%{time_total}'
}

# Baseline: no campaign funnel configured.
printf '' > "$OUT/poll-none.toml"
FUNNELHOUSE_CONFIG="$OUT/poll-none.toml" KEEP=1 start_server "$DATA"
sleep 10
base_rss=$(rss_mb)
stop_server

printf '[[campaigns]]\nname = "%s"\n[campaigns.funnel]\nsteps = %s\nwindow = "24h"\n' "$CAMPAIGN" "$STEPS" > "$OUT/poll.toml"
FUNNELHOUSE_CONFIG="$OUT/poll.toml" KEEP=1 start_server "$DATA"
for _ in $(seq 1 600); do grep -q 'live funnel built' "$DATA.log" && break; sleep 0.5; done
built=$(grep 'live funnel built' "$DATA.log" | tail -1)
users=$(echo "$built" | grep -o 'users=[0-9]*' | cut -d= -f2)
echo "$built"
sleep 10
live_rss=$(rss_mb)
scan_s=$(scan_once)
echo "{\"baseline_rss_mb\": $base_rss, \"live_rss_mb\": $live_rss, \"users\": $users, \"bytes_per_user\": $(( (live_rss - base_rss) * 1048576 / users )), \"scan_s\": $scan_s}" \
  | tee "$OUT/polling-memory-$N.json"
python3 benches/poll_load.py "$URL" "$SERVER_PID" "$CAMPAIGN" "$SECS" | tee "$OUT/polling-$N.json"
stop_server
