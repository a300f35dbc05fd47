#!/usr/bin/env bash
# Fuzz the decoders and parsers that take outside input, each for a set time (not in CI).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Targets (fuzz/fuzz_targets): native_decode, plain_event, segment_decode, gzip_body, wal_segment,
# funnel_request. Each starts from its committed seed corpus (fuzz/corpus/<target>) and
# writes what it learns to fuzz/work/<target>; a crash is saved under fuzz/artifacts/ and
# stops the script with exit 1. Needs the nightly toolchain and cargo-fuzz (installed
# here when missing). FUZZ_SANITIZER=none builds faster; the default is address.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(native_decode plain_event segment_decode gzip_body wal_segment funnel_request)
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
sanitizer=${FUZZ_SANITIZER:-address}
cargo +nightly fuzz build -s "$sanitizer"
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t"
    echo "== $t: ${secs}s"
    cargo +nightly fuzz run -s "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)|ERROR|panicked|SUMMARY|Test unit written' || true
    if ls "fuzz/artifacts/$t"/crash-* >/dev/null 2>&1; then
        echo "$t: crash found, see fuzz/artifacts/$t" >&2
        exit 1
    fi
done
