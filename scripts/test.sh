#!/usr/bin/env bash
# Runs Tollgate's whole test suite on this machine, installing what it needs
# first (scripts/setup.sh). Idempotent; safe to run repeatedly.
#
#   scripts/test.sh          setup, formatting, lints, unit and end-to-end tests
set -euo pipefail
cd "$(dirname "$0")/.."

# A fresh login shell may not have cargo on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

scripts/setup.sh

echo "test: cargo fmt --check"
cargo fmt --all -- --check

echo "test: cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "test: cargo test"
cargo test --workspace --locked
