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
# target, built unoptimised and without a sanitizer so that the build stays
# short (a panic is still caught); scripts/fuzz.sh alone runs longer, with
# AddressSanitizer and optimisation.
echo "test: fuzz targets (scripts/fuzz.sh ${TOLLGATE_FUZZ_SECONDS:-12}, dev profile)"
FUZZ_PROFILE=dev FUZZ_SANITIZER=none scripts/fuzz.sh "${TOLLGATE_FUZZ_SECONDS:-12}"
