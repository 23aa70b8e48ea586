#!/usr/bin/env bash
# Tollgate's demo on an embedded default: a throwaway PostgreSQL, the agent in
# front of it, and a psql session through the agent, with the identity of the
# process behind the session, the live status table and the metrics.
#
# Idempotent; installs what it needs (scripts/setup.sh) and leaves nothing
# running or on disk when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi

bold=$(tput bold 2>/dev/null || true); plain=$(tput sgr0 2>/dev/null || true)
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
show() {
    local line="" arg
    for arg in "$@"; do
        case "$arg" in *[[:space:]]*) line+=" '$arg'" ;; *) line+=" $arg" ;; esac
    done
    printf '%s$%s%s\n' "$bold" "$line" "$plain"
    "$@"
}

step "Preparing this machine (scripts/setup.sh)"
scripts/setup.sh
cargo build --quiet -p tollgate-agent --bin tollgate
tollgate="$root/target/debug/tollgate"

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/tollgate-demo.XXXXXX)
agent_pid=""
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
    [ -f "$work/pg/data/postmaster.pid" ] && run_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: use Debian's postgres account then.
run_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

step "Starting a throwaway PostgreSQL"
mkdir -p "$work/pg"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" && chmod 755 "$work"
pg_port=$(free_port)
run_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
run_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $work/pg" start >/dev/null
echo "PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port"
"$pgbin/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres <<'SQL'
create table customers (id int primary key, name text, email text);
insert into customers values (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'alan@example.com');
SQL

step "Starting the Tollgate agent with an explicit listener"
proxy_port=$(free_port)
metrics_port=$(free_port)
cat > "$work/tollgate.toml" <<TOML
[agent]
control_socket = "$work/control.sock"
metrics_listen = "127.0.0.1:$metrics_port"

[[target]]
name = "demo-db"
address = "127.0.0.1"
ports = [$pg_port]
protocol = "postgres"

[[listener]]
listen = "127.0.0.1:$proxy_port"
target = "demo-db"
TOML
cat "$work/tollgate.toml"
show "$tollgate" config check --config "$work/tollgate.toml"
"$tollgate" run --config "$work/tollgate.toml" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do grep -q 'tollgate ready' "$work/agent.log" 2>/dev/null && break; sleep 0.1; done
grep -q 'tollgate ready' "$work/agent.log" || { cat "$work/agent.log"; echo "demo: the agent did not start" >&2; exit 1; }

step "A psql session through the agent (port $proxy_port)"
show "$pgbin/psql" -X -h 127.0.0.1 -p "$proxy_port" -U postgres -d postgres \
    -c "select id, name, email from customers order by id"

step "The agent logged who opened that session"
for _ in $(seq 50); do grep -q 'session closed' "$work/agent.log" && break; sleep 0.1; done
grep 'session' "$work/agent.log" | sed 's/^/  /'

step "A session in progress, as 'tollgate status' shows it"
"$pgbin/psql" -X -q -h 127.0.0.1 -p "$proxy_port" -U postgres -d postgres -c "select pg_sleep(2)" >/dev/null &
sleep 0.7
show "$tollgate" status --config "$work/tollgate.toml"
wait $!

step "Prometheus metrics (http://127.0.0.1:$metrics_port/metrics)"
python3 - "$metrics_port" <<'PY' | grep -E '^tollgate_(connections_total|bytes_total|sessions_closed_total|identity_lookup_seconds)'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode())
PY

step "Stopping the agent (SIGTERM drains open sessions first)"
kill -TERM "$agent_pid"; wait "$agent_pid"; agent_pid=""
tail -n 2 "$work/agent.log" | sed 's/^/  /'
echo
echo "Demo finished; everything it started has been stopped and removed."
