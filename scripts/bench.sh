#!/usr/bin/env bash
# Tollgate's benchmark: pgbench against a throwaway PostgreSQL directly,
# through pgbouncer (session mode) and through Tollgate in two
# configurations, measured in the same run and interleaved (A B C D A B C D
# ...), medians reported with the spread.
#
#   scripts/bench.sh [--quick] [--rounds N] [--json FILE] [--no-ebpf] [--only W,...] [--no-mysql]
#
# Configurations:
#   direct      pgbench -> PostgreSQL
#   pgbouncer   pgbench -> pgbouncer (session pooling) -> PostgreSQL
#   pgbouncer-unpooled  the same with server_lifetime = 0: a new server
#               connection for every client, as a proxy that lets the server
#               authenticate each client must open (connect-1c only)
#   relay       pgbench -> tollgate listener, protocol tcp (no parsing)
#   full        pgbench -> tollgate listener, protocol postgres, a policy of
#               25 rules, every statement analysed, decided and recorded
#   masked      the same on a target where a rule masks
#               pgbench_accounts.filler (the masked-* workloads only)
#   relay-ebpf, full-ebpf  the same through the eBPF redirect: pgbench runs
#               under `tollgate exec` and connects to a non-loopback address
#               (as root with a kernel that can; --no-ebpf skips them)
# Workloads: select-only at 1 and 8 clients, simple protocol (a new literal
# in every statement), a new connection per transaction (-C: connection
# set-up including the identity lookup), and without --quick extended and
# prepared modes, TPC-B-like at 8 clients, a 10,000-row result, and a query
# returning a masked column at 1 and 8 clients and through the extended
# protocol at 1 (direct, pgbouncer, full without masking and masked), and at
# 1 with the column under an alias, which takes the catalog lookup.
# Afterwards 500 idle sessions are opened through the full configuration
# and the agent's memory is reported. --only runs only the named workloads
# (not with --quick), e.g. --only masked-1c,masked-8c.
# Then the MySQL workloads run (scripts/bench-mysql.sh: sysbench against
# MariaDB directly, through the tcp relay and the full MySQL path) unless
# --no-mysql or --only is given.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rounds=3; duration=10; quick=0; json=""; ebpf=1; only_workloads=""; mysql=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; rounds=2; duration=4; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --json) json="$2"; shift 2 ;;
        --no-ebpf) ebpf=0; shift ;;
        --only) only_workloads="$2"; mysql=0; shift 2 ;;
        --no-mysql) mysql=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# Addresses for the eBPF path: not loopback, so the redirect applies as it
# would to a remote database, yet on `lo` so traffic stays on the host.
ebpf_tag=$(( $$ % 250 ))
ebpf_full_addr="198.18.251.$ebpf_tag"; ebpf_relay_addr="198.18.252.$ebpf_tag"
if [ $ebpf -eq 1 ] && { [ "$(id -u)" -ne 0 ] || [ ! -e /sys/kernel/btf/vmlinux ]; }; then
    echo "bench: skipping the eBPF configurations: they need root and a kernel with BTF"
    ebpf=0
fi
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # runuser does not pass the signal on: stop pgbouncer by its pid file.
    for pidfile in "$work/bouncer/pgbouncer.pid" "$work/bouncer/unpooled.pid"; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ $ebpf -eq 1 ]; then
        "$tollgate" detach --config "$work/tollgate.toml" >/dev/null 2>&1 || true
        [ -d "$cgroot/tollgate-bench-$$.exec" ] && find "$cgroot/tollgate-bench-$$.exec" -depth -type d -exec rmdir {} + 2>/dev/null || true
        ip addr del "$ebpf_full_addr/32" dev lo 2>/dev/null || true
        ip addr del "$ebpf_relay_addr/32" dev lo 2>/dev/null || true
    fi
    [ -f "$work/pg/data/postmaster.pid" ] && as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
cgroot=/sys/fs/cgroup
[ -e /sys/fs/cgroup/unified/cgroup.procs ] && cgroot=/sys/fs/cgroup/unified
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] && chmod 755 "$work"
mkdir -p "$work/pg" "$work/bouncer"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" "$work/bouncer"

pg_port=$(free_port); bouncer_port=$(free_port); relay_port=$(free_port); full_port=$(free_port)
masked_port=$(free_port); unpooled_port=$(free_port)
as_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
# The eBPF path reaches the server on a non-loopback address.
echo "host all all 0.0.0.0/0 trust" >> "$work/pg/data/pg_hba.conf"
listen="127.0.0.1"
if [ $ebpf -eq 1 ]; then
    ip addr add "$ebpf_full_addr/32" dev lo 2>/dev/null || true
    ip addr add "$ebpf_relay_addr/32" dev lo 2>/dev/null || true
    listen="127.0.0.1,$ebpf_full_addr,$ebpf_relay_addr"
fi
as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -o \
    "-p $pg_port -c listen_addresses=$listen -k $work/pg -c max_connections=600 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off" \
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
max_client_conn = 600
default_pool_size = 20
unix_socket_dir =
logfile = $work/bouncer/log
pidfile = $work/bouncer/pgbouncer.pid
INI
# The same pooler, its server connections used once: what connection
# set-up costs a proxy that cannot hand a client an open server connection.
sed -e "s/^listen_port = .*/listen_port = $unpooled_port/" \
    -e "s|^logfile = .*|logfile = $work/bouncer/unpooled.log|" \
    -e "s|^pidfile = .*|pidfile = $work/bouncer/unpooled.pid|" \
    "$work/bouncer/pgbouncer.ini" > "$work/bouncer/unpooled.ini"
echo "server_lifetime = 0" >> "$work/bouncer/unpooled.ini"
echo '"postgres" ""' > "$work/bouncer/users.txt"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/bouncer"/*
as_pg pgbouncer -q "$work/bouncer/pgbouncer.ini" & pids+=($!)
as_pg pgbouncer -q "$work/bouncer/unpooled.ini" & pids+=($!)

# A realistic policy: 25 rules, none matching pgbench's statements on the
# full targets except the allow rule, so every rule is evaluated for every
# statement; on the masked target a mask rule hides pgbench_accounts.filler.
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
    printf '[[rule]]\nname = "mask-filler"\naction = "mask"\nmask_columns = ["pgbench_accounts.filler"]\n[rule.match]\ntargets = ["masked"]\n\n'
} > "$policy"
"$tollgate" policy check "$policy" >/dev/null
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

[[target]]
name = "masked"
address = "localhost"
ports = [$pg_port]
protocol = "postgres"

[[listener]]
listen = "127.0.0.1:$masked_port"
target = "masked"
upstream = "127.0.0.1:$pg_port"
TOML
if [ $ebpf -eq 1 ]; then
    cat >> "$work/tollgate.toml" <<TOML

[[target]]
name = "relay-ebpf"
address = "$ebpf_relay_addr"
ports = [$pg_port]
protocol = "tcp"

[[target]]
name = "full-ebpf"
address = "$ebpf_full_addr"
ports = [$pg_port]
protocol = "postgres"

[redirect]
port = $(free_port)
pin_dir = "/sys/fs/bpf/tollgate-bench-$$"
exec_cgroup = "tollgate-bench-$$.exec"
exec_unlisted = "pass"
exec_socket = "$work/exec.sock"
TOML
fi
"$tollgate" run --config "$work/tollgate.toml" --log-level warn 2>"$work/agent.log" & pids+=($!)
agent_pid=$!
sleep 1.5

# The 10,000-row query: one statement returning 10,000 rows of
# pgbench_accounts, a new offset each time.
cat > "$work/large.sql" <<'SQL'
\set start random(1, 990000)
SELECT aid, bid, abalance, filler FROM pgbench_accounts WHERE aid BETWEEN :start AND :start + 9999;
SQL
chmod 644 "$work/large.sql"
# A point query returning the masked column (bpchar, redacted) and two
# unmasked ones: a plain query of one table, masked by the names of the
# server's fields with no lookup, and every row rewritten.
cat > "$work/masked.sql" <<'SQL'
\set aid random(1, 1000000)
SELECT aid, abalance, filler FROM pgbench_accounts WHERE aid = :aid;
SQL
chmod 644 "$work/masked.sql"
# The same with the masked column under an alias: the statement pays the
# catalog lookup in front of it.
cat > "$work/masked-alias.sql" <<'SQL'
\set aid random(1, 1000000)
SELECT aid, abalance, filler AS f FROM pgbench_accounts WHERE aid = :aid;
SQL
chmod 644 "$work/masked-alias.sql"
# name|pgbench arguments[|configurations; without a list, all but those that
# run only where listed: masked and pgbouncer-unpooled]
workloads=("select-1c-simple|-S -c 1 -j 1 -M simple" "select-8c-simple|-S -c 8 -j 2 -M simple"
           "connect-1c|-S -c 1 -j 1 -C -M simple|direct,pgbouncer,pgbouncer-unpooled,relay,full,relay-ebpf,full-ebpf")
if [ $quick -eq 0 ]; then
    workloads+=("select-8c-extended|-S -c 8 -j 2 -M extended" "select-8c-prepared|-S -c 8 -j 2 -M prepared"
                "tpcb-8c|-c 8 -j 2 -M simple" "large-result-4c|-f $work/large.sql -c 4 -j 2 -M simple"
                "masked-1c|-f $work/masked.sql -c 1 -j 1 -M simple|direct,pgbouncer,full,masked"
                "masked-8c|-f $work/masked.sql -c 8 -j 2 -M simple|direct,pgbouncer,full,masked"
                "masked-1c-extended|-f $work/masked.sql -c 1 -j 1 -M extended|direct,pgbouncer,full,masked"
                "masked-1c-alias|-f $work/masked-alias.sql -c 1 -j 1 -M simple|direct,full,masked")
fi
# name|host|port|command prefix
configs=("direct|127.0.0.1|$pg_port|" "pgbouncer|127.0.0.1|$bouncer_port|" "pgbouncer-unpooled|127.0.0.1|$unpooled_port|"
         "relay|127.0.0.1|$relay_port|" "full|127.0.0.1|$full_port|" "masked|127.0.0.1|$masked_port|")
if [ $ebpf -eq 1 ]; then
    configs+=("relay-ebpf|$ebpf_relay_addr|$pg_port|$tollgate exec --config $work/tollgate.toml --log-level warn --"
              "full-ebpf|$ebpf_full_addr|$pg_port|$tollgate exec --config $work/tollgate.toml --log-level warn --")
    # The redirect must work before anything is measured through it.
    if ! $tollgate exec --config "$work/tollgate.toml" --log-level warn -- \
        "$pgbin/psql" -h "$ebpf_full_addr" -p "$pg_port" -U postgres -Atc 'select 1' postgres >/dev/null; then
        echo "bench: the eBPF path does not work; see $work/agent.log" >&2
        cat "$work/agent.log" >&2
        exit 1
    fi
fi

results="$work/results.tsv"
: > "$results"
for w in "${workloads[@]}"; do
    IFS='|' read -r name args only <<< "$w"
    if [ -n "$only_workloads" ]; then
        case ",$only_workloads," in *",$name,"*) ;; *) continue ;; esac
    fi
    for r in $(seq 1 "$rounds"); do
        for c in "${configs[@]}"; do
            IFS='|' read -r cname host port prefix <<< "$c"
            if [ -n "$only" ]; then
                case ",$only," in *",$cname,"*) ;; *) continue ;; esac
            elif [ "$cname" = masked ] || [ "$cname" = pgbouncer-unpooled ]; then
                continue
            fi
            # shellcheck disable=SC2086
            out=$($prefix "$pgbin/pgbench" -n $args -T "$duration" -h "$host" -p "$port" -U postgres postgres 2>&1 || true)
            # Here-strings, not pipes: an awk that stops reading early must
            # not kill the run with SIGPIPE (pipefail, errexit).
            tps=$(awk -F'= ' '/^tps/ {split($2,a," "); print a[1]; exit}' <<< "$out")
            lat=$(awk -F'= ' '/^latency average/ {split($2,a," "); print a[1]; exit}' <<< "$out")
            conn=$(awk -F'= ' '/^average connection time/ {split($2,a," "); print a[1]; exit}' <<< "$out")
            failed=$(awk -F': ' '/number of failed transactions/ {split($2,a," "); print a[1]; exit}' <<< "$out")
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$cname" "$r" "${tps:-0}" "${lat:-0}" "${conn:-0}" "${failed:-?}" >> "$results"
            printf 'bench: %-18s %-10s round %s: %10s tps %8s ms%s\n' "$name" "$cname" "$r" "${tps:-?}" "${lat:-?}" "${conn:+ (connect $conn ms)}"
        done
    done
done
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$agent_pid/status" 2>/dev/null || echo 0)

# 500 idle sessions through the full configuration (through the redirect
# when it runs): each completes its start-up, then waits.
idle_host=127.0.0.1; idle_port=$full_port; idle_prefix=""
if [ $ebpf -eq 1 ]; then
    idle_host=$ebpf_full_addr; idle_port=$pg_port
    idle_prefix="$tollgate exec --config $work/tollgate.toml --log-level warn --"
fi
rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status")
# shellcheck disable=SC2086
idle=$($idle_prefix python3 - "$idle_host" "$idle_port" "$agent_pid" <<'PY'
import socket, struct, sys
host, port, agent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def startup():
    s = socket.create_connection((host, port))
    params = b"user\0postgres\0database\0postgres\0application_name\0idle\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    buf = b""
    while True:
        chunk = s.recv(8192)
        if not chunk:
            raise SystemExit("connection closed during start-up")
        buf += chunk
        # Walk complete messages; ReadyForQuery ('Z') ends the start-up.
        i = 0
        while len(buf) - i >= 5:
            kind, length = buf[i:i + 1], struct.unpack("!i", buf[i + 1:i + 5])[0]
            if len(buf) - i < 1 + length:
                break
            if kind == b"E":
                raise SystemExit("start-up failed: %r" % buf[i:i + 1 + length])
            if kind == b"Z":
                return s
            i += 1 + length
sessions = [startup() for _ in range(500)]
rss = [l.split()[1] for l in open(f"/proc/{agent}/status") if l.startswith("VmRSS")][0]
print(len(sessions), rss)
PY
) || idle="0 0"
read -r idle_sessions idle_rss_kb <<< "$idle"
echo "bench: $idle_sessions idle sessions: agent RSS $((idle_rss_kb / 1024)) MiB (before: $((rss_before / 1024)) MiB)"

python3 - "$results" "$rss_kb" "$json" "$idle_sessions" "$idle_rss_kb" "$rss_before" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = {}
for w, c, r, tps, lat, conn, failed in rows:
    d = data.setdefault(w, {}).setdefault(c, {"tps": [], "lat": [], "conn": [], "failed": []})
    d["tps"].append(float(tps)); d["lat"].append(float(lat)); d["conn"].append(float(conn))
    d["failed"].append(failed)
print()
print("| workload | config | TPS (median) | spread | mean latency ms | connect ms | vs direct | vs pgbouncer |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
summary = {}
for w, cs in data.items():
    med = {c: statistics.median(v["tps"]) for c, v in cs.items()}
    for c, v in cs.items():
        m = med[c]
        spread = (max(v["tps"]) - min(v["tps"])) / m * 100 if m else 0
        lat = statistics.median(v["lat"])
        conn = statistics.median(v["conn"])
        vd = m / med["direct"] if med.get("direct") else 0
        vb = m / med["pgbouncer"] if med.get("pgbouncer") else 0
        conn_text = f"{conn:.3f}" if conn else "-"
        ratio = lambda r: f"{r:.2f}x" if r else "-"
        print(f"| {w} | {c} | {m:,.0f} | ±{spread:.1f}% | {lat:.3f} | {conn_text} | {ratio(vd)} | {ratio(vb)} |")
        summary.setdefault(w, {})[c] = {"tps_median": m, "tps_all": v["tps"], "latency_ms_median": lat,
                                        "connect_ms_median": conn, "vs_direct": vd, "vs_pgbouncer": vb,
                                        "failed": v["failed"]}
print()
def added(workload, field, what, configs=("full", "full-ebpf")):
    """What a configuration adds over direct: the difference of the
    medians, and the median of the per-round differences (each round runs
    the configurations back to back, so pairing them cancels the machine's
    drift between rounds)."""
    cs = data.get(workload, {})
    if "direct" not in cs:
        return
    base = cs["direct"][field]
    for c in configs:
        if c in cs:
            mine = cs[c][field]
            of_medians = (statistics.median(mine) - statistics.median(base)) * 1000
            paired = statistics.median(m - b for m, b in zip(mine, base)) * 1000
            print(f"{what}, {c}: {of_medians:.0f} us (median of per-round differences: {paired:.0f} us)")
added("select-1c-simple", "lat", "added mean latency at 1 client")
added("connect-1c", "conn", "added connection set-up")
# pgbouncer answers a client's start-up itself and opens the server
# connection at the first query, so its connection time leaves out the
# server's new backend; the whole cycle (connect, one query, close)
# compares it with a proxy that relays the start-up.
added("connect-1c", "lat", "added time per connection (connect, query, close)",
      ("pgbouncer-unpooled", "full", "full-ebpf"))
for w in ("masked-1c", "masked-8c", "masked-1c-extended", "masked-1c-alias"):
    cs = data.get(w, {})
    if "masked" in cs and "full" in cs:
        m, f = statistics.median(cs["masked"]["tps"]), statistics.median(cs["full"]["tps"])
        lat = (statistics.median(cs["masked"]["lat"]) - statistics.median(cs["full"]["lat"])) * 1000
        print(f"{w}: masked {m / f:.2f}x of full without masking, {lat:.0f} us more mean latency")
eight = data.get("select-8c-simple", {})
if "pgbouncer" in eight:
    for c in ("full", "full-ebpf"):
        if c in eight:
            rounds = [f"{m / b:.2f}x" for m, b in zip(eight[c]["tps"], eight["pgbouncer"]["tps"]) if b]
            print(f"select-8c-simple, {c} vs pgbouncer per round: {', '.join(rounds)}")
idle_n, idle_rss, before = int(sys.argv[4] or 0), int(sys.argv[5] or 0), int(sys.argv[6] or 0)
print(f"agent peak RSS during the runs: {int(sys.argv[2]) / 1024:.1f} MiB")
print(f"agent RSS with {idle_n} idle sessions: {idle_rss / 1024:.1f} MiB (before opening them: {before / 1024:.1f} MiB)")
if sys.argv[3]:
    json.dump({"results": summary, "agent_peak_rss_kib": int(sys.argv[2]),
               "idle_sessions": idle_n, "idle_rss_kib": idle_rss, "rss_before_idle_kib": before},
              open(sys.argv[3], "w"), indent=2)
PY

if [ $mysql -eq 1 ]; then
    # The PostgreSQL side is stopped first, so that it takes no CPU.
    cleanup
    trap - EXIT
    mysql_args=(--rounds "$rounds" --duration "$duration")
    [ -n "$json" ] && mysql_args+=(--json "${json%.json}-mysql.json")
    echo
    scripts/bench-mysql.sh "${mysql_args[@]}"
fi
