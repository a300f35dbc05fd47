#!/usr/bin/env bash
# Run the whole Funnelhouse test suite on a fresh machine: installs what is missing
# (cargo-nextest; Debian's chromium, postgresql-client and a CJK font; the Python clients into
# tests/clients/.venv; playwright-core into tests/clients/node_modules), then builds and
# runs every test of the workspace (unit, integration, crash), the real-client tests
# (Segment SDKs, psql, psycopg, headless Chromium), clippy and rustfmt.
set -euo pipefail
cd "$(dirname "$0")/.."

# A shared target dir keeps rebuilds cheap; override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/funnelhouse-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
  exit 2
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi

# Real clients the tests drive: Debian packages, then Python and npm packages by name.
missing=()
command -v psql >/dev/null || missing+=(postgresql-client)
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# Chinese channel names in the dashboard screenshots.
fc-list :lang=zh 2>/dev/null | grep -q . || missing+=(fonts-wqy-microhei)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' first" >&2
    exit 2
  fi
  echo "installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
venv=tests/clients/.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/clients/requirements.txt
(cd tests/clients && npm ci --no-audit --no-fund --loglevel=error)

cargo build --workspace --tests --bins
cargo nextest run --workspace --no-fail-fast "$@"
FUNNELHOUSE_BIN="$CARGO_TARGET_DIR/debug/funnelhouse" \
  FUNNELHOUSE_TEST_OUTPUT="$CARGO_TARGET_DIR/test-output" \
  "$venv/bin/python" -m pytest tests/clients -q -p no:cacheprovider
# The lints denied in [workspace.lints] (dbg_macro, todo, clone_on_ref_ptr) and the
# default clippy set; warnings fail the run.
cargo clippy --workspace --all-targets -- -D warnings
# Formatting as rustfmt has it.
cargo fmt --all -- --check
