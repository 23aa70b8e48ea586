#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for a while (see
# docs/fuzzing.md). Needs what scripts/setup.sh installs (the nightly
# toolchain and cargo-fuzz).
#
#   scripts/fuzz.sh                      every target, 300 s each
#   scripts/fuzz.sh 15                   every target, 15 s each
#   scripts/fuzz.sh 60 frontend analyze  those targets, 60 s each
#
# Prints, per target, the executions run and their rate, and the path of any
# input that failed. Exit status: 0 when no target failed, 1 when one did,
# 2 on a usage or build error.
#
# The checked-in seeds in fuzz/corpus/TARGET are read, never written: what a
# run learns goes to target/fuzz/corpus/TARGET (kept between runs), failing
# inputs to target/fuzz/artifacts/TARGET, logs to target/fuzz/logs.
#
# Environment: FUZZ_SANITIZER (default address; none, leak, ...),
# FUZZ_PROFILE (release by default; dev builds unoptimised, much faster to
# build and slower to run, for short runs such as scripts/test.sh's),
# FUZZ_TIMEOUT (seconds one input may take before it counts as a hang,
# default 20), FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: error: %s\n' "$*" >&2; exit 2; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

seconds=${1:-300}
case $seconds in
    ''|*[!0-9]*|0) die "SECONDS_PER_TARGET must be a positive whole number, not '$seconds'; usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" ;;
esac
[ $# -gt 0 ] && shift

cargo +nightly fuzz --version >/dev/null 2>&1 \
    || die "cargo-fuzz or the nightly toolchain is missing; run scripts/setup.sh"

sanitizer=${FUZZ_SANITIZER:-address}
profile=()
case ${FUZZ_PROFILE:-release} in
    release) ;;
    dev) profile=(--dev) ;;
    *) die "FUZZ_PROFILE must be release or dev, not '${FUZZ_PROFILE}'" ;;
esac
timeout=${FUZZ_TIMEOUT:-20}
out=$root/target/fuzz
fuzz() { (cd "$root/fuzz" && cargo +nightly fuzz "$@"); }

mapfile -t known < <(fuzz list)
if [ $# -gt 0 ]; then
    targets=("$@")
    for t in "${targets[@]}"; do
        printf '%s\n' "${known[@]}" | grep -qx -- "$t" \
            || die "no fuzz target '$t'; the targets are: ${known[*]}"
    done
else
    targets=("${known[@]}")
fi

say "building ${#targets[@]} target(s) (sanitizer: $sanitizer)"
start=$SECONDS
if [ ${#targets[@]} -eq ${#known[@]} ]; then
    fuzz build "${profile[@]}" --sanitizer "$sanitizer" --target-dir "$out" || die "the fuzz build failed"
else
    for t in "${targets[@]}"; do
        fuzz build "${profile[@]}" --sanitizer "$sanitizer" --target-dir "$out" "$t" || die "the fuzz build of $t failed"
    done
fi
say "built in $((SECONDS - start)) s"

mkdir -p "$out/logs"
failed=()
summary=()
for t in "${targets[@]}"; do
    corpus=$out/corpus/$t
    artifacts=$out/artifacts/$t
    log=$out/logs/$t.log
    mkdir -p "$corpus" "$artifacts"
    say "running $t for $seconds s"
    status=0
    # shellcheck disable=SC2086
    fuzz run "${profile[@]}" --sanitizer "$sanitizer" --target-dir "$out" "$t" "$corpus" "$root/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
    line=$(printf '%-10s %10s runs %7s exec/s' "$t" "${runs:-?}" "${rate:-?}")
    if [ $status -ne 0 ] || [ -n "$crash" ]; then
        failed+=("$t")
        line="$line  FAILED (exit $status)${crash:+: $crash}; log: $log"
        grep -E '^(thread .* panicked|==[0-9]+==ERROR|SUMMARY:|ALARM:)' "$log" | head -n 5 | sed 's/^/fuzz:   /' >&2 || true
    fi
    summary+=("$line")
    say "$line"
done

say "summary ($seconds s per target, $((SECONDS - start)) s in all):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    say "failed: ${failed[*]}; reproduce with: (cd fuzz && cargo +nightly fuzz run --sanitizer $sanitizer --target-dir $out TARGET INPUT)"
    exit 1
fi
