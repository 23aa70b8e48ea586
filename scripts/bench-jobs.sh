#!/usr/bin/env bash
# The job timeline's overhead: a process-heavy build (`make -j2` of a
# generated Makefile whose every target runs a shell and a program) timed
# directly, under `tollgate exec` with the timeline off, and under
# `tollgate exec` with it on, interleaved (direct off on direct off on ...);
# medians reported with the spread, as ratios, with the events the kernel
# sent and dropped. Needs root (the redirect).
#
#   scripts/bench-jobs.sh [--quick] [--rounds N] [--targets N]
#
# Two agents run side by side (own pin directories, exec cgroups and
# sockets), identical but for redirect.job_timeline.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=5; targets=2000
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) rounds=3; targets=500; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-jobs: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench-jobs: needs root (the redirect loads eBPF programs)" >&2; exit 2; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
scripts/setup.sh >/dev/null
echo "bench-jobs: building the release binary"
cargo build --quiet --release -p tollgate-agent --bin tollgate
tollgate="$root/target/release/tollgate"

work=$(mktemp -d /tmp/tollgate-bench-jobs.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    for v in off on; do
        [ -f "$work/$v.toml" ] && "$tollgate" detach --config "$work/$v.toml" >/dev/null 2>&1 || true
        rmdir "/sys/fs/bpf/tollgate-bench-$v" 2>/dev/null || true
        cg=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/self/mounts)
        [ -n "$cg" ] && rmdir "$cg"/tollgate-bench-$v.exec/exec-* "$cg/tollgate-bench-$v.exec" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The build: every target runs `sh -c` with two programs.
mkdir -p "$work/build"
{
    printf 'all:'
    for i in $(seq "$targets"); do printf ' t%d' "$i"; done
    printf '\n'
    for i in $(seq "$targets"); do printf 't%d:\n\t@/bin/true && /bin/echo %d > /dev/null\n' "$i" "$i"; done
} > "$work/build/Makefile"

for v in off on; do
    timeline=false; [ $v = on ] && timeline=true
    cat > "$work/$v.toml" <<TOML
[agent]
control_socket = "$work/$v-control.sock"
approvals_socket = "$work/$v-approvals.sock"
approvals_store = "$work/$v-approvals.redb"
recording_dir = "$work/$v-recordings"

[redirect]
port = $(free_port)
pin_dir = "/sys/fs/bpf/tollgate-bench-$v"
exec_cgroup = "tollgate-bench-$v.exec"
exec_socket = "$work/$v-exec.sock"
job_timeline = $timeline

[[target]]
name = "unused"
address = "192.0.2.1"
ports = [5432]
protocol = "postgres"
TOML
    "$tollgate" run --config "$work/$v.toml" 2>"$work/$v.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q 'tollgate ready' "$work/$v.log" && break; sleep 0.1; done
    grep -q 'tollgate ready' "$work/$v.log" || { cat "$work/$v.log"; echo "bench-jobs: agent $v did not start" >&2; exit 1; }
done

run_once() {
    local start end
    start=$(date +%s%N)
    case "$1" in
        direct) make -s -j2 -B -C "$work/build" >/dev/null ;;
        *) "$tollgate" exec --config "$work/$1.toml" -- make -s -j2 -B -C "$work/build" >/dev/null ;;
    esac
    end=$(date +%s%N)
    echo $(( (end - start) / 1000000 ))
}

declare -A times
echo "bench-jobs: $rounds rounds of make -j2 over $targets targets (about $((targets * 2)) programs each)"
for r in $(seq "$rounds"); do
    for c in direct off on; do
        ms=$(run_once "$c")
        times[$c]="${times[$c]:-} $ms"
        printf '  round %d %-6s %6d ms\n' "$r" "$c" "$ms"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR==1{lo=$1} {hi=$1} END {print lo "-" hi}'; }
m_direct=$(echo "${times[direct]}" | median)
m_off=$(echo "${times[off]}" | median)
m_on=$(echo "${times[on]}" | median)
status=$("$tollgate" status --json --config "$work/on.toml")
events=$(echo "$status" | python3 -c 'import json,sys; j=json.load(sys.stdin)["redirect"]["jobs"]; print(j["events_sent"], j["events_dropped_in_kernel"], j["events_dropped_by_agent"])')
read -r sent dropped_kernel dropped_agent <<<"$events"
echo
printf '%-34s %8s  %s\n' "configuration" "median" "spread (ms)"
printf '%-34s %6d ms  %s\n' "direct" "$m_direct" "$(echo "${times[direct]}" | spread)"
printf '%-34s %6d ms  %s\n' "tollgate exec, timeline off" "$m_off" "$(echo "${times[off]}" | spread)"
printf '%-34s %6d ms  %s\n' "tollgate exec, timeline on" "$m_on" "$(echo "${times[on]}" | spread)"
python3 - "$m_direct" "$m_off" "$m_on" <<'PY'
import sys
d, off, on = (float(x) for x in sys.argv[1:])
print(f"timeline on / off:    {on / off:.3f}x the time")
print(f"timeline on / direct: {on / d:.3f}x the time")
PY
echo "kernel events sent: $sent; dropped in the kernel: $dropped_kernel; dropped by the agent: $dropped_agent"
jobs=$("$tollgate" jobs list --json --config "$work/on.toml" | python3 -c 'import json,sys; l=json.load(sys.stdin); print(len(l), sum(j["commands"] for j in l))')
echo "job recordings (timeline on): $jobs commands recorded (jobs, commands)"
