#!/usr/bin/env bash
# Scan links under load: a release server with one campaign, N scans from 1, 8 and 32
# loopback connections; latency of the 302 and a check that every scan was stored once.
#   benches/run_scan_links.sh [N]     # default 20,000 per run
NO_ANCHORS=1 source "$(dirname "$0")/common.sh"
N="${1:-20000}"
printf '[[campaigns]]\nname = "parcel-lottery"\nlanding_url = "https://shop.example/lottery"\n' > "$OUT/scan.toml"
export FUNNELHOUSE_CONFIG="$OUT/scan.toml"
for C in 1 8 32; do
  start_server "$OUT/scan-data"
  python3 benches/scan_load.py "$URL" "$N" "$C"
  stop_server
done
