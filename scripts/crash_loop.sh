#!/usr/bin/env bash
# The kill -9 crash loop at full length (not part of the test command, which runs 30
# kills): the real server (release build) under load from 4 clients, killed at random
# moments N times, each kill followed at random by a torn or zero-filled WAL tail; then
# 0 lost, 0 doubled, and the slowest start (WAL replay) and peak RSS are printed.
#   scripts/crash_loop.sh [N]     # default 1000
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/funnelhouse-target}"
# --workspace, not -p: another package set changes feature unification and rebuilds DataFusion.
cargo build --release --workspace --bins
FUNNELHOUSE_BIN="$CARGO_TARGET_DIR/release/funnelhouse" FUNNELHOUSE_CRASH_KILLS="${1:-1000}" \
  cargo nextest run --workspace --no-capture -E 'test(kill_9_under_load)'
