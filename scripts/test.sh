#!/usr/bin/env bash
# Runs Tollgate's whole test suite on this machine, installing what it needs
# first (scripts/setup.sh). Idempotent; safe to run repeatedly.
#
#   scripts/test.sh          setup, formatting, lints, unit and end-to-end tests,
#                            then each fuzz target for 12 s (TOLLGATE_FUZZ_SECONDS)
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
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

echo "test: cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "test: cargo test"
cargo test --workspace --locked

# Every parser of untrusted input, briefly (docs/fuzzing.md): 12 s per fuzz
# target, about 5 minutes in all when the agent changed and must be rebuilt
# with the sanitizer (2 busy cores), under 2 when it did not; the first build
# on a fresh machine takes far longer. scripts/fuzz.sh alone runs longer.
echo "test: fuzz targets (scripts/fuzz.sh ${TOLLGATE_FUZZ_SECONDS:-12})"
scripts/fuzz.sh "${TOLLGATE_FUZZ_SECONDS:-12}"
