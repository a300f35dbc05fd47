#!/usr/bin/env bash
# Run the whole Funnelhouse test suite on a fresh machine: installs what is missing,
# then builds and runs every test of the workspace (unit, integration, crash) and
# checks the workspace lints with clippy.
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

cargo build --workspace --tests --bins
cargo nextest run --workspace --no-fail-fast "$@"
# The lints denied in [workspace.lints] (dbg_macro, todo, clone_on_ref_ptr) and the
# default clippy set; warnings fail the run.
cargo clippy --workspace --all-targets -- -D warnings
