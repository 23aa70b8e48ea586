#!/usr/bin/env bash
# Tollgate's benchmark: pgbench against a throwaway PostgreSQL directly,
# through pgbouncer (session mode) and through Tollgate in two
# configurations, measured in the same run and interleaved (A B C D A B C D
# ...), medians reported with the spread.
#
#   scripts/bench.sh [--quick] [--rounds N] [--json FILE]
#
# Configurations:
#   direct     pgbench -> PostgreSQL
#   pgbouncer  pgbench -> pgbouncer (session pooling) -> PostgreSQL
#   relay      pgbench -> tollgate, target protocol tcp (no parsing, recording on)
#   full       pgbench -> tollgate, protocol postgres, a policy of 24 rules,
#              every statement analysed, decided and recorded
# Workloads: select-only at 1 and 8 clients, simple protocol (a new literal
# in every statement: no cache can hide the analysis), and with --full
# (default unless --quick) extended and prepared modes and connection churn.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=3; duration=10; quick=0; json=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; rounds=2; duration=5; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --json) json="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench: unknown option $1" >&2; exit 2 ;;
    esac
done

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
scripts/setup.sh >/dev/null
echo "bench: building the release binary"
cargo build --release --quiet -p tollgate-agent --bin tollgate
tollgate="$root/target/release/tollgate"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

work=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -f "$work/pg/data/postmaster.pid" ] && as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] && chmod 755 "$work"
mkdir -p "$work/pg" "$work/bouncer"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" "$work/bouncer"

pg_port=$(free_port); bouncer_port=$(free_port); relay_port=$(free_port); full_port=$(free_port)
as_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -o \
    "-p $pg_port -c listen_addresses=127.0.0.1 -k $work/pg -c max_connections=200 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off" \
    start >/dev/null
"$pgbin/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1

cat > "$work/bouncer/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = trust
auth_file = $work/bouncer/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 20
unix_socket_dir =
logfile = $work/bouncer/log
INI
echo '"postgres" ""' > "$work/bouncer/users.txt"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/bouncer"/*
as_pg pgbouncer -q "$work/bouncer/pgbouncer.ini" & pids+=($!)

# A realistic policy: 24 rules, none matching pgbench's statements except the
# allow rule, so every rule is evaluated for every statement.
policy="$work/policy.toml"
{
    printf '[defaults]\naction = "allow"\n\n'
    printf '[[rule]]\nname = "reads"\naction = "allow"\n[rule.match]\nkinds = ["select"]\n\n'
    printf '[[rule]]\nname = "no-drop"\naction = "deny"\n[rule.match]\nkinds = ["drop", "truncate"]\n\n'
    printf '[[rule]]\nname = "no-unbounded-writes"\naction = "deny"\n[rule.match]\nflags = ["no_where"]\n\n'
    printf '[[rule]]\nname = "no-server-files"\naction = "deny"\n[rule.match]\nflags = ["server_file_access", "copy_program"]\n\n'
    for i in $(seq 1 20); do
        printf '[[rule]]\nname = "protect-table-%d"\naction = "deny"\n[rule.match]\ntables = ["secret_%d_*"]\n\n' "$i" "$i"
    done
} > "$policy"
"$tollgate" policy check "$policy" >/dev/null
cat > "$work/tollgate.toml" <<TOML
[agent]
control_socket = "$work/control.sock"
recording_dir = "$work/recordings"
policy_paths = ["$policy"]
max_connections = 4096

[[target]]
name = "relay"
address = "127.0.0.1"
ports = [$pg_port]
protocol = "tcp"

[[target]]
name = "full"
address = "localhost"
ports = [$pg_port]
protocol = "postgres"

[[listener]]
listen = "127.0.0.1:$relay_port"
target = "relay"

[[listener]]
listen = "127.0.0.1:$full_port"
target = "full"
upstream = "127.0.0.1:$pg_port"
TOML
"$tollgate" run --config "$work/tollgate.toml" --log-level warn 2>"$work/agent.log" & pids+=($!)
agent_pid=$!
sleep 1.5

workloads=("select-1c-simple|-S -c 1 -j 1 -M simple" "select-8c-simple|-S -c 8 -j 2 -M simple")
if [ $quick -eq 0 ]; then
    workloads+=("select-8c-extended|-S -c 8 -j 2 -M extended" "select-8c-prepared|-S -c 8 -j 2 -M prepared"
                "tpcb-8c|-c 8 -j 2 -M simple" "select-1c-connect|-S -c 1 -j 1 -C -M simple")
fi
configs=("direct|$pg_port" "pgbouncer|$bouncer_port" "relay|$relay_port" "full|$full_port")

results="$work/results.tsv"
: > "$results"
for w in "${workloads[@]}"; do
    name=${w%%|*}; args=${w#*|}
    for r in $(seq 1 "$rounds"); do
        for c in "${configs[@]}"; do
            cname=${c%%|*}; port=${c#*|}
            # shellcheck disable=SC2086
            out=$("$pgbin/pgbench" -n $args -T "$duration" -h 127.0.0.1 -p "$port" -U postgres -r postgres 2>&1 || true)
            tps=$(echo "$out" | awk -F'= ' '/^tps/ {split($2,a," "); print a[1]; exit}')
            lat=$(echo "$out" | awk -F'= ' '/^latency average/ {split($2,a," "); print a[1]; exit}')
            failed=$(echo "$out" | awk -F': ' '/number of failed transactions/ {split($2,a," "); print a[1]; exit}')
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$cname" "$r" "${tps:-0}" "${lat:-0}" "${failed:-?}" >> "$results"
            printf 'bench: %-20s %-10s round %s: %10s tps %8s ms\n' "$name" "$cname" "$r" "${tps:-?}" "${lat:-?}"
        done
    done
done
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status" 2>/dev/null || echo 0)

python3 - "$results" "$rss_kb" "$json" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = {}
for w, c, r, tps, lat, failed in rows:
    d = data.setdefault(w, {}).setdefault(c, {"tps": [], "lat": [], "failed": []})
    d["tps"].append(float(tps)); d["lat"].append(float(lat)); d["failed"].append(failed)
print()
print("| workload | config | TPS (median) | spread | mean latency ms | vs direct | vs pgbouncer |")
print("|---|---|---:|---:|---:|---:|---:|")
summary = {}
for w, cs in data.items():
    med = {c: statistics.median(v["tps"]) for c, v in cs.items()}
    for c, v in cs.items():
        m = med[c]
        spread = (max(v["tps"]) - min(v["tps"])) / m * 100 if m else 0
        lat = statistics.median(v["lat"])
        vd = m / med["direct"] if med.get("direct") else 0
        vb = m / med["pgbouncer"] if med.get("pgbouncer") else 0
        print(f"| {w} | {c} | {m:,.0f} | ±{spread:.1f}% | {lat:.3f} | {vd:.2f}x | {vb:.2f}x |")
        summary.setdefault(w, {})[c] = {"tps_median": m, "tps_all": v["tps"], "latency_ms_median": lat,
                                        "vs_direct": vd, "vs_pgbouncer": vb, "failed": v["failed"]}
print()
print(f"agent peak RSS: {int(sys.argv[2]) / 1024:.1f} MiB")
if sys.argv[3]:
    json.dump({"results": summary, "agent_peak_rss_kib": int(sys.argv[2])}, open(sys.argv[3], "w"), indent=2)
PY
