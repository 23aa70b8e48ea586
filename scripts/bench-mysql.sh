#!/usr/bin/env bash
# Tollgate's MySQL benchmark: sysbench against a throwaway MariaDB directly,
# through the agent's tcp relay and through the full MySQL path, measured in
# the same run and interleaved (direct relay full direct relay full ...),
# medians reported with the spread and as ratios.
#
#   scripts/bench-mysql.sh [--quick] [--rounds N] [--duration S] [--json FILE]
#
# Configurations:
#   direct  sysbench -> MariaDB
#   relay   sysbench -> tollgate listener, protocol tcp (no parsing)
#   full    sysbench -> tollgate listener, protocol mysql, a policy of 25
#           rules: every statement analysed at prepare, every execution
#           decided, every decision recorded
# Workloads (sysbench's own, server-side prepared statements as sysbench
# uses them by default): oltp_point_select and oltp_read_only, at 1 and 8
# threads, on 4 tables of 10,000 rows.
# scripts/bench.sh runs this after the PostgreSQL workloads.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=3; duration=10; json=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) rounds=2; duration=4; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --json) json="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-mysql: unknown option $1" >&2; exit 2 ;;
    esac
done

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
scripts/setup.sh >/dev/null
echo "bench-mysql: building the release binary"
cargo build --release --quiet -p tollgate-agent --bin tollgate
tollgate="$root/target/release/tollgate"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/tollgate-bench-mysql.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -f "$work/my/mariadbd.pid" ]; then
        kill "$(cat "$work/my/mariadbd.pid")" 2>/dev/null || true
        for _ in $(seq 100); do [ -f "$work/my/mariadbd.pid" ] || break; sleep 0.1; done
    fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "bench-mysql: starting a throwaway MariaDB"
my_port=$(free_port)
mkdir -p "$work/my"
my_user=()
if [ "$(id -u)" -eq 0 ]; then chown mysql: "$work/my"; chmod 755 "$work"; my_user=(--user=mysql); fi
mariadb-install-db --no-defaults --datadir="$work/my/data" "${my_user[@]}" \
    --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve >/dev/null 2>&1
/usr/sbin/mariadbd --no-defaults --datadir="$work/my/data" --socket="$work/my/sock" \
    --pid-file="$work/my/mariadbd.pid" --port="$my_port" --bind-address=127.0.0.1 "${my_user[@]}" \
    --skip-name-resolve --innodb-buffer-pool-size=256M --max-connections=500 \
    --performance-schema=OFF 2>"$work/my/server.log" &
for _ in $(seq 200); do mariadb-admin --no-defaults --socket="$work/my/sock" -u root ping >/dev/null 2>&1 && break; sleep 0.1; done
mariadb --no-defaults --socket="$work/my/sock" -u root <<'SQL'
create database sbtest;
create user sbtest@'%' identified by 'sbtest';
grant all on sbtest.* to sbtest@'%';
SQL
sb_common=(--mysql-host=127.0.0.1 --mysql-user=sbtest --mysql-password=sbtest --mysql-db=sbtest
           --tables=4 --table-size=10000)
sysbench oltp_read_only "${sb_common[@]}" --mysql-port="$my_port" prepare >/dev/null

# The same shape of policy as scripts/bench.sh: 25 rules, every one
# evaluated for every statement, none refusing sysbench's.
policy="$work/policy.toml"
{
    printf '[defaults]\naction = "allow"\n\n'
    printf '[[rule]]\nname = "reads"\naction = "allow"\n[rule.match]\nkinds = ["select"]\n\n'
    printf '[[rule]]\nname = "no-drop"\naction = "deny"\n[rule.match]\nkinds = ["drop", "truncate"]\n\n'
    printf '[[rule]]\nname = "no-unbounded-writes"\naction = "deny"\n[rule.match]\nflags = ["no_where"]\n\n'
    printf '[[rule]]\nname = "no-server-files"\naction = "deny"\n[rule.match]\nflags = ["server_file_access"]\n\n'
    for i in $(seq 1 21); do
        printf '[[rule]]\nname = "protect-table-%d"\naction = "deny"\n[rule.match]\ntables = ["secret_%d_*"]\n\n' "$i" "$i"
    done
} > "$policy"
"$tollgate" policy check "$policy" >/dev/null
relay_port=$(free_port); full_port=$(free_port)
cat > "$work/tollgate.toml" <<TOML
[agent]
control_socket = "$work/control.sock"
approvals_socket = "$work/approvals.sock"
approvals_store = "$work/approvals.redb"
recording_dir = "$work/recordings"
policy_paths = ["$policy"]
max_connections = 4096

[[target]]
name = "relay"
address = "127.0.0.1"
ports = [$my_port]
protocol = "tcp"

[[target]]
name = "full"
address = "localhost"
ports = [$my_port]
protocol = "mysql"

[[listener]]
listen = "127.0.0.1:$relay_port"
target = "relay"

[[listener]]
listen = "127.0.0.1:$full_port"
target = "full"
upstream = "127.0.0.1:$my_port"
TOML
"$tollgate" run --config "$work/tollgate.toml" --log-level warn 2>"$work/agent.log" & pids+=($!)
for _ in $(seq 100); do [ -S "$work/control.sock" ] && break; sleep 0.1; done
sleep 0.5

workloads=("point-select-1t|oltp_point_select|1" "point-select-8t|oltp_point_select|8"
           "read-only-1t|oltp_read_only|1" "read-only-8t|oltp_read_only|8")
configs=("direct|$my_port" "relay|$relay_port" "full|$full_port")
results="$work/results.tsv"
: > "$results"
echo "bench-mysql: $rounds rounds of ${duration}s per workload and configuration, interleaved"
for w in "${workloads[@]}"; do
    IFS='|' read -r name test threads <<<"$w"
    for round in $(seq 1 "$rounds"); do
        for c in "${configs[@]}"; do
            IFS='|' read -r cname port <<<"$c"
            out=$(sysbench "$test" "${sb_common[@]}" --mysql-port="$port" --threads="$threads" \
                --time="$duration" --report-interval=0 run 2>&1) || {
                echo "$out" >&2; echo "bench-mysql: $name on $cname failed" >&2; exit 1; }
            tps=$(awk '/transactions:/ {gsub(/[(]/, "", $3); print $3}' <<<"$out")
            qps=$(awk '/queries:/ && /per sec/ {gsub(/[(]/, "", $3); print $3}' <<<"$out")
            lat=$(awk '/avg:/ {print $2; exit}' <<<"$out")
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$cname" "$round" "$tps" "$qps" "$lat" >> "$results"
            printf '  %-16s %-7s round %s: %10s tps %12s qps  %8s ms\n' "$name" "$cname" "$round" "$tps" "$qps" "$lat"
        done
    done
done

rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/${pids[0]}/status" 2>/dev/null || echo 0)
python3 - "$results" "$json" "$rounds" "$duration" "$rss_kb" <<'PY'
import json, statistics, sys
path, out, rounds, duration, rss_kb = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
data = {}
for line in open(path):
    name, config, _, tps, qps, lat = line.rstrip("\n").split("\t")
    d = data.setdefault(name, {}).setdefault(config, {"tps": [], "qps": [], "lat": []})
    d["tps"].append(float(tps)); d["qps"].append(float(qps)); d["lat"].append(float(lat))
print()
print(f"MySQL (MariaDB), sysbench, {rounds} rounds of {duration}s, medians")
print("| workload | config | TPS (median) | spread | mean latency ms | vs direct | vs relay |")
print("|---|---|---|---|---|---|---|")
report = {}
for name, configs in data.items():
    med = {c: statistics.median(v["tps"]) for c, v in configs.items()}
    for c, v in configs.items():
        m = med[c]
        spread = (max(v["tps"]) - min(v["tps"])) / m * 100 if m else 0
        vd = m / med["direct"] if med.get("direct") else 0
        vr = m / med["relay"] if med.get("relay") else 0
        lat = statistics.median(v["lat"])
        print(f"| {name} | {c} | {m:.0f} | ±{spread:.1f}% | {lat:.2f} | {vd:.2f}x | {vr:.2f}x |")
        report.setdefault(name, {})[c] = {"tps_median": m, "tps": v["tps"], "latency_ms_median": lat,
                                          "vs_direct": vd, "vs_relay": vr}
print()
for name in ("point-select-8t", "read-only-8t"):
    c = data.get(name, {})
    if "full" in c and "relay" in c:
        ratio = statistics.median(c["full"]["tps"]) / statistics.median(c["relay"]["tps"])
        verdict = "meets" if ratio >= 0.95 else "misses"
        print(f"{name}: full path {ratio:.2f}x of the tcp relay ({verdict} the 0.95x target)")
print(f"agent RSS after the run: {int(rss_kb) // 1024} MiB")
if out:
    json.dump(report, open(out, "w"), indent=1)
PY
