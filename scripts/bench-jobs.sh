#!/usr/bin/env bash
# The job timeline's overhead: builds timed directly, under `tollgate exec`
# with the timeline off, and under `tollgate exec` with it on, interleaved
# (direct off on direct off on ...); medians reported with the spread, as
# ratios, with the CPU the build and the agent used and the events the
# kernel sent and dropped. Needs root (the redirect). Two workloads:
#
#   programs  make -j2 of a generated Makefile whose every target runs a
#             shell and two tiny programs: nothing but process starts, the
#             worst case for the timeline (about six events per target)
#   compile   make -j2 of generated C sources, each compiled with cc -O1
#             and linked: a build as a CI job runs one
#
#   scripts/bench-jobs.sh [--quick] [--rounds N] [--targets N] [--sources N]
#                         [--workload programs|compile|both]
#
# Two agents run side by side (own pin directories, exec cgroups and
# sockets), identical but for redirect.job_timeline.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=5; targets=2000; sources=300; workload=both
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) rounds=3; targets=500; sources=100; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        --sources) sources="$2"; shift 2 ;;
        --workload) workload="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-jobs: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$workload" in programs|compile|both) ;; *) echo "bench-jobs: --workload is programs, compile or both" >&2; exit 2 ;; esac
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

# programs: every target runs `sh -c` with two programs.
mkdir -p "$work/programs"
{
    printf 'all:'
    for i in $(seq "$targets"); do printf ' t%d' "$i"; done
    printf '\n'
    for i in $(seq "$targets"); do printf 't%d:\n\t@/bin/true && /bin/echo %d > /dev/null\n' "$i" "$i"; done
} > "$work/programs/Makefile"

# compile: C sources compiled and linked (make's built-in rules).
mkdir -p "$work/compile"
for i in $(seq "$sources"); do
    cat > "$work/compile/s$i.c" <<C
#include <stdio.h>
#include <string.h>
int f$i(const char *text) {
    int sum = 0;
    for (size_t k = 0; k < strlen(text); k++) sum = sum * 31 + text[k] + $i;
    return sum;
}
C
done
{
    printf 'objects :='
    for i in $(seq "$sources"); do printf ' s%d.o' "$i"; done
    printf '\nCFLAGS := -O1\nlib.so: $(objects)\n\t$(CC) -shared -o $@ $(objects)\n'
    printf '%%.o: %%.c\n\t$(CC) $(CFLAGS) -fPIC -c -o $@ $<\n'
} > "$work/compile/Makefile"

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

declare -A agent_pid=([off]="${pids[0]}" [on]="${pids[1]}")
# CPU milliseconds (user + system) a process has used so far.
cpu_ms() {
    awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000 / hz)}' "/proc/$1/stat"
}

# Prints "WALL_MS BUILD_CPU_MS AGENT_CPU_MS" for one build (configuration
# $1, workload $2): the build's
# CPU is every process of it (user and system time, the kernel's
# tracepoint programs included); the agent's is the agent serving it.
run_once() {
    local start end agent_before=0 agent_after=0 usage
    [ "$1" = direct ] || agent_before=$(cpu_ms "${agent_pid[$1]}")
    start=$(date +%s%N)
    case "$1" in
        direct) usage=$(/usr/bin/time -f '%U %S' make -s -j2 -B -C "$work/$2" 2>&1 >/dev/null) ;;
        *) usage=$(/usr/bin/time -f '%U %S' "$tollgate" exec --config "$work/$1.toml" -- make -s -j2 -B -C "$work/$2" 2>&1 >/dev/null) ;;
    esac
    end=$(date +%s%N)
    [ "$1" = direct ] || agent_after=$(cpu_ms "${agent_pid[$1]}")
    build_cpu=$(echo "$usage" | tail -1 | awk '{print int(($1 + $2) * 1000)}')
    echo "$(( (end - start) / 1000000 )) $build_cpu $(( agent_after - agent_before ))"
}

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR==1{lo=$1} {hi=$1} END {print lo "-" hi}'; }

# Runs the rounds of one workload and prints its report.
measure() {
    local w=$1 r c ms build agent
    local -A times=() build_cpu=() agent_cpu=()
    local sent_before
    sent_before=$(events_sent)
    echo
    case "$w" in
        programs) echo "bench-jobs: programs: $rounds rounds of make -j2 over $targets targets (about $((targets * 2)) programs each)" ;;
        compile) echo "bench-jobs: compile: $rounds rounds of make -j2 compiling $sources C sources with cc -O1 and linking them" ;;
    esac
    make -s -j2 -B -C "$work/$w" >/dev/null # warm the page cache
    for r in $(seq "$rounds"); do
        for c in direct off on; do
            read -r ms build agent <<<"$(run_once "$c" "$w")"
            times[$c]="${times[$c]:-} $ms"
            build_cpu[$c]="${build_cpu[$c]:-} $build"
            agent_cpu[$c]="${agent_cpu[$c]:-} $agent"
            printf '  round %d %-6s %6d ms  (build CPU %5d ms, agent CPU %4d ms)\n' "$r" "$c" "$ms" "$build" "$agent"
        done
    done
    echo
    printf '%-34s %8s  %-14s %10s %10s\n' "$w: configuration" "median" "spread (ms)" "build CPU" "agent CPU"
    for c in direct off on; do
        printf '%-34s %6d ms  %-14s %7d ms %7d ms\n' "$(label "$c")" "$(echo "${times[$c]}" | median)" \
            "$(echo "${times[$c]}" | spread)" "$(echo "${build_cpu[$c]}" | median)" "$(echo "${agent_cpu[$c]}" | median)"
    done
    python3 - "${times[direct]}" "${times[off]}" "${times[on]}" <<'PY'
import statistics, sys
direct, off, on = ([float(x) for x in arg.split()] for arg in sys.argv[1:])
med = statistics.median
print(f"timeline on / off:    {med(on) / med(off):.3f}x the time (medians)")
print(f"timeline on / direct: {med(on) / med(direct):.3f}x the time (medians)")
# Rounds run interleaved, so a round's on and off saw the same machine.
paired = sorted(a / b for a, b in zip(on, off))
print(f"on / off round by round: median {med(paired):.3f}x, range {paired[0]:.3f}-{paired[-1]:.3f}")
noise = sorted(a / b for a, b in zip(off, direct))
print(f"off / direct round by round (no timeline either way: the noise): median {med(noise):.3f}x, range {noise[0]:.3f}-{noise[-1]:.3f}")
PY
    echo "kernel events sent: $(( $(events_sent) - sent_before ))"
}

label() {
    case "$1" in
        direct) echo "direct" ;;
        off) echo "tollgate exec, timeline off" ;;
        on) echo "tollgate exec, timeline on" ;;
    esac
}

jobs_status() {
    "$tollgate" status --json --config "$work/on.toml" | python3 -c 'import json,sys; j=json.load(sys.stdin)["redirect"]["jobs"]; print(j["events_sent"], j["events_dropped_in_kernel"], j["events_dropped_by_agent"])'
}
events_sent() { jobs_status | awk '{print $1}'; }

case "$workload" in
    both) measure programs; measure compile ;;
    *) measure "$workload" ;;
esac

read -r sent dropped_kernel dropped_agent <<<"$(jobs_status)"
echo
echo "kernel events sent in all: $sent; dropped in the kernel: $dropped_kernel; dropped by the agent: $dropped_agent"
jobs=$("$tollgate" jobs list --json --config "$work/on.toml" | python3 -c 'import json,sys; l=json.load(sys.stdin); print(len(l), sum(j["commands"] for j in l))')
echo "job recordings (timeline on): $jobs commands recorded (jobs, commands)"
