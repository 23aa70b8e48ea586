#!/usr/bin/env bash
# Tollgate's demo on an embedded default: a throwaway PostgreSQL standing in
# for a remote production database, the agent with the shipped demo policy
# (policies/demo.toml), and psql governed through the transparent eBPF
# redirect (`tollgate exec`): psql is given the database's own address, never
# the proxy's. It shows an allowed query whose customers' e-mail addresses
# come back masked, a denied DROP and a denied read of a protected table
# with the rule that refused them, `policy explain`, the same policy on a
# throwaway MariaDB through the `mariadb` client, a psql with no password
# logging in as a role whose password only the agent holds (brokered
# credentials), an SSH host reached by ssh with a key only the agent holds
# (one command allowed, one refused), a DELETE held until a second user
# approves it, the
# session's identity, the tamper-evident recordings, the live status,
# metrics, and what happens when the agent dies (fail closed).
#
# Idempotent; installs what it needs (scripts/setup.sh) and leaves nothing
# running, attached or on disk when it ends. The redirect needs root; run as
# another user, the demo shows the explicit-listener mode instead.
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
# `tollgate` and `psql` by name, as a user would type them.
mkdir -p "$root/target/demo-bin"
ln -sf "$tollgate" "$root/target/demo-bin/tollgate"
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
export PATH="$root/target/demo-bin:$pgbin:$PATH"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
governed=0
[ "$(id -u)" -eq 0 ] && [ -e /sys/kernel/btf/vmlinux ] && governed=1

work=$(mktemp -d /tmp/tollgate-demo.XXXXXX)
db_addr=198.18.0.80
agent_pid=""
run_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
    if [ -f "$work/tollgate.toml" ] && [ $governed -eq 1 ]; then
        tollgate detach --config "$work/tollgate.toml" >/dev/null 2>&1 || true
        cg=$(awk -F'"' '$1 ~ /^cgroup_path/ {print $2}' "$work/paths" 2>/dev/null || true)
        [ -n "$cg" ] && rmdir "$cg"/exec-* "$cg" 2>/dev/null || true
        ip addr del "$db_addr/32" dev lo 2>/dev/null || true
    fi
    [ -f "$work/pg/data/postmaster.pid" ] && run_pg pg_ctl -D "$work/pg/data" -m fast stop >/dev/null 2>&1 || true
    [ -f "$work/ssh/sshd.pid" ] && kill "$(cat "$work/ssh/sshd.pid")" 2>/dev/null || true
    if [ -f "$work/my/mariadbd.pid" ]; then
        kill "$(cat "$work/my/mariadbd.pid")" 2>/dev/null || true
        for _ in $(seq 100); do [ -f "$work/my/mariadbd.pid" ] || break; sleep 0.1; done
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step "Starting a throwaway PostgreSQL (standing in for a production database)"
mkdir -p "$work/pg"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" && chmod 755 "$work"
pg_port=$(free_port)
listen="127.0.0.1"
if [ $governed -eq 1 ]; then
    # A non-loopback address on lo: it looks remote to clients, yet no
    # packet leaves this machine.
    ip addr add "$db_addr/32" dev lo 2>/dev/null || true
    listen="127.0.0.1,$db_addr"
fi
run_pg initdb -D "$work/pg/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
printf 'host all all 0.0.0.0/0 trust\n' >> "$work/pg/data/pg_hba.conf"
# One role needs its password (SCRAM); only the agent will hold it.
sed -i '1i host all reporter 0.0.0.0/0 scram-sha-256' "$work/pg/data/pg_hba.conf"
( umask 077; head -c 18 /dev/urandom | base64 > "$work/reporter.password" )
run_pg pg_ctl -D "$work/pg/data" -l "$work/pg/server.log" -w \
    -o "-p $pg_port -c listen_addresses=$listen -k $work/pg" start >/dev/null
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres <<'SQL'
create table customers (id int primary key, name text, email text);
insert into customers values (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'alan@example.com'),
    (3, 'Grace Hopper', 'grace@example.com');
create table secrets (id int, api_key text);
insert into secrets values (1, 'sk_live_demo');
SQL
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v pw="$(cat "$work/reporter.password")" \
    <<<"create role reporter login password :'pw'; grant select on customers to reporter;"

step "Starting a throwaway MariaDB (a second production database, MySQL protocol)"
my_port=$(free_port)
my_listen=127.0.0.1
[ $governed -eq 1 ] && my_listen=$db_addr
mkdir -p "$work/my"
my_user=()
if [ "$(id -u)" -eq 0 ]; then chown mysql: "$work/my"; my_user=(--user=mysql); fi
mariadb-install-db --no-defaults --datadir="$work/my/data" "${my_user[@]}" \
    --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve >/dev/null 2>&1
/usr/sbin/mariadbd --no-defaults --datadir="$work/my/data" --socket="$work/my/sock" \
    --pid-file="$work/my/mariadbd.pid" --port="$my_port" --bind-address="$my_listen" "${my_user[@]}" \
    --skip-name-resolve --innodb-buffer-pool-size=16M --performance-schema=OFF 2>"$work/my/server.log" &
for _ in $(seq 100); do mariadb-admin --no-defaults --socket="$work/my/sock" -u root ping >/dev/null 2>&1 && break; sleep 0.1; done
mariadb --no-defaults --socket="$work/my/sock" -u root <<'SQL'
create database shop;
create user demo@'%';
grant all on shop.* to demo@'%';
use shop;
create table customers (id int primary key, name text, email text);
insert into customers values (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'alan@example.com');
create table secrets (id int, api_key text);
insert into secrets values (1, 'sk_live_demo');
SQL
echo "MariaDB on $my_listen:$my_port"

step "Starting a throwaway OpenSSH server (a production host); only the agent holds its key"
ssh_port=$(free_port)
mkdir -p "$work/ssh/secrets" && chmod 700 "$work/ssh/secrets"
ssh-keygen -q -t ed25519 -N '' -C demo-host -f "$work/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -C tollgate-demo -f "$work/ssh/secrets/agent_key"
mv "$work/ssh/secrets/agent_key.pub" "$work/ssh/authorized_keys"
ssh_listen=127.0.0.1
[ $governed -eq 1 ] && ssh_listen=$db_addr
ssh_user=$(id -un)
cat > "$work/ssh/sshd_config" <<CONF
ListenAddress $ssh_listen:$ssh_port
HostKey $work/ssh/host_key
AuthorizedKeysFile $work/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $work/ssh/sshd.pid
CONF
mkdir -p /run/sshd 2>/dev/null || true
/usr/sbin/sshd -f "$work/ssh/sshd_config" -E "$work/ssh/sshd.log"
for _ in $(seq 100); do [ -f "$work/ssh/sshd.pid" ] && break; sleep 0.1; done
echo "[$ssh_listen]:$ssh_port $(cut -d' ' -f1,2 "$work/ssh/host_key.pub")" > "$work/ssh/known_hosts"
echo "sshd on $ssh_listen:$ssh_port; its only authorized key is in $work/ssh/secrets (root-only)"

metrics_port=$(free_port)
ssh_target="
[[target]]
name = \"demo-ssh\"
address = \"$ssh_listen\"
ports = [$ssh_port]
protocol = \"ssh\"
ssh_known_hosts = \"$work/ssh/known_hosts\"
[[target.credential]]
user = \"$ssh_user\"
ssh_key_file = \"$work/ssh/secrets/agent_key\"
"
if [ $governed -eq 1 ]; then
    echo "PostgreSQL on $db_addr:$pg_port"
    step "Starting the Tollgate agent with the transparent redirect"
    cat > "$work/tollgate.toml" <<TOML
[agent]
control_socket = "$work/control.sock"
approvals_socket = "$work/approvals.sock"
approvals_store = "$work/approvals.redb"
metrics_listen = "127.0.0.1:$metrics_port"
policy_paths = ["$root/policies/demo.toml"]
recording_dir = "$work/recordings"
tls_dir = "$work/tls"

[redirect]
port = $(free_port)
pin_dir = "/sys/fs/bpf/tollgate-demo"
exec_cgroup = "tollgate-demo.exec"
exec_socket = "$work/exec.sock"

[[target]]
name = "demo-db"
address = "$db_addr"
ports = [$pg_port]
protocol = "postgres"
client_credentials = "pass"

# nobody's sessions log in as reporter with a password only the agent holds
[[target.credential]]
user = "reporter"
password_file = "$work/reporter.password"
match = { users = ["nobody"] }

[[target]]
name = "demo-mysql"
address = "$db_addr"
ports = [$my_port]
protocol = "mysql"
$ssh_target
TOML
else
    echo "PostgreSQL on 127.0.0.1:$pg_port"
    step "Not root: starting the agent with an explicit listener (the redirect needs root)"
    proxy_port=$(free_port)
    my_proxy_port=$(free_port)
    ssh_proxy_port=$(free_port)
    cat > "$work/tollgate.toml" <<TOML
[agent]
control_socket = "$work/control.sock"
approvals_socket = "$work/approvals.sock"
approvals_store = "$work/approvals.redb"
metrics_listen = "127.0.0.1:$metrics_port"
policy_paths = ["$root/policies/demo.toml"]
recording_dir = "$work/recordings"
tls_dir = "$work/tls"

[[target]]
name = "demo-db"
address = "127.0.0.1"
ports = [$pg_port]
protocol = "postgres"

[[listener]]
listen = "127.0.0.1:$proxy_port"
target = "demo-db"

[[target]]
name = "demo-mysql"
address = "127.0.0.1"
ports = [$my_port]
protocol = "mysql"

[[listener]]
listen = "127.0.0.1:$my_proxy_port"
target = "demo-mysql"
$ssh_target
[[listener]]
listen = "127.0.0.1:$ssh_proxy_port"
target = "demo-ssh"
TOML
fi
cat "$work/tollgate.toml"
show tollgate config check --config "$work/tollgate.toml"
tollgate run --config "$work/tollgate.toml" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do grep -q 'tollgate ready' "$work/agent.log" 2>/dev/null && break; sleep 0.1; done
grep -q 'tollgate ready' "$work/agent.log" || { cat "$work/agent.log"; echo "demo: the agent did not start" >&2; exit 1; }
export TOLLGATE_CONFIG="$work/tollgate.toml"
if [ $governed -eq 1 ]; then
    cg=$(tollgate status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["redirect"]["exec_cgroup"])')
    echo "cgroup_path = \"$cg\"" > "$work/paths"
    host=$db_addr; port=$pg_port; my_port_seen=$my_port; run=(tollgate exec --)
    step "psql under 'tollgate exec', given the database's own address"
else
    host=127.0.0.1; port=$proxy_port; my_port_seen=$my_proxy_port; run=()
    step "psql through the listener"
fi
echo "(customers' e-mail addresses are masked by rule mask-customer-email; the table itself is unchanged)"
show "${run[@]}" psql -X -h "$host" -p "$port" -U postgres -d postgres \
    -c "select id, name, email from customers order by id"

step "A DROP and a read of the protected table: refused, with the rule's name"
show "${run[@]}" psql -X -h "$host" -p "$port" -U postgres -d postgres -c "drop table customers" || true
show "${run[@]}" psql -X -h "$host" -p "$port" -U postgres -d postgres -c "select * from secrets" || true
if [ $governed -eq 1 ]; then
    echo "(the database is on this host, so its port on loopback is governed as demo-db too)"
    show "${run[@]}" psql -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "drop table customers" || true
fi
show "${run[@]}" psql -X -h "$host" -p "$port" -U postgres -d postgres -Atc "select count(*) || ' customers still there' from customers"

step "Why: tollgate policy explain"
show tollgate policy explain --target demo-db --identity 'user = "root", uid = 0' "drop table customers"
show tollgate policy explain --target demo-db --identity 'user = "root", uid = 0' "select id, name, email from customers order by id"

step "The agent logged who opened each session and every decision"
for _ in $(seq 50); do [ "$(grep -c 'session closed' "$work/agent.log")" -ge 4 ] && break; sleep 0.1; done
grep -E 'session (started|closed)|statement' "$work/agent.log" | sed 's/^/  /'

step "Every session is recorded: tollgate recordings list, show, verify"
# Each governed job's recording closes a moment after its last process.
for _ in $(seq 50); do
    tollgate jobs list --json | python3 -c 'import json,sys; sys.exit(any(not j["complete"] for j in json.load(sys.stdin)))' && break
    sleep 0.1
done
show tollgate recordings list
denied_id=$(tollgate recordings list --denied --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
show tollgate recordings show "$denied_id"
masked_id=$(tollgate recordings list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
show tollgate recordings show "$masked_id"
show tollgate recordings verify --all

step "The same policy on MariaDB: the mariadb client, masked and refused alike"
show "${run[@]}" mariadb --no-defaults --skip-ssl -h "$host" -P "$my_port_seen" -u demo shop \
    -e "select id, name, email from customers order by id"
show "${run[@]}" mariadb --no-defaults --skip-ssl -h "$host" -P "$my_port_seen" -u demo shop \
    -e "select * from secrets" || true
for _ in $(seq 50); do
    my_session=$(tollgate recordings list --json | python3 -c 'import json,sys; l=[r for r in json.load(sys.stdin) if r.get("protocol") == "mysql" and r.get("denied") and r.get("complete")]; print(l[-1]["id"] if l else "")')
    [ -n "$my_session" ] && break
    sleep 0.1
done
[ -n "$my_session" ] && show tollgate recordings show "$my_session"

if [ $governed -eq 1 ] && id nobody >/dev/null 2>&1; then
    step "Brokered credentials: the job holds no password, the agent logs in for it"
    as_nobody="cd / && exec setpriv --reuid=65534 --regid=65534 --clear-groups"
    echo "(the role reporter needs a password, and nobody's psql has none:)"
    show sh -c "$as_nobody psql -X -w -h $host -p $port -U reporter -d postgres -c 'select current_user'" || true
    echo "(governed, the same user's psql logs in as reporter; the agent holds the password in a root-only file:)"
    show tollgate exec -- sh -c "$as_nobody psql -X -w -h $host -p $port -U postgres -d postgres -c 'select current_user'"
    for _ in $(seq 50); do grep -q 'logged in by the agent' "$work/agent.log" && break; sleep 0.1; done
    grep 'logged in by the agent' "$work/agent.log" | tail -1 | sed 's/^/  /'
fi

step "SSH: ssh reaches the host with no key of its own; one command allowed, one refused"
# What scripts/install.sh appends to /etc/ssh/ssh_known_hosts: clients trust
# the agent's host CA for the SSH targets.
show tollgate ssh known-hosts
ssh_known="$work/ssh/client_known_hosts"
tollgate ssh known-hosts > "$ssh_known"
ssh_port_seen=$ssh_port
if [ $governed -eq 0 ]; then
    ssh_port_seen=$ssh_proxy_port
    sed "s/\[$ssh_listen\]:$ssh_port/[127.0.0.1]:$ssh_proxy_port/" "$ssh_known" > "$ssh_known.listener"
    ssh_known="$ssh_known.listener"
fi
ssh_cmd=(ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$ssh_known"
         -o GlobalKnownHostsFile=/dev/null -p "$ssh_port_seen" "$ssh_user@$ssh_listen")
[ $governed -eq 0 ] && ssh_cmd[-1]="$ssh_user@127.0.0.1"
if [ $governed -eq 1 ]; then
    echo "(not governed, this ssh has no key the host accepts, even trusting any host key:)"
    show ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        -o LogLevel=ERROR -p "$ssh_port" "$ssh_user@$ssh_listen" hostname || true
    echo "(governed, the same command line runs; the agent logs in with the key it holds:)"
fi
show "${run[@]}" "${ssh_cmd[@]}" hostname
echo "(a command outside the demo host's list is refused before the host sees it:)"
show "${run[@]}" "${ssh_cmd[@]}" 'rm -rf /srv/app' || true
ssh_session=""
for _ in $(seq 50); do
    ssh_session=$(tollgate recordings list --json | python3 -c 'import json,sys; l=[r for r in json.load(sys.stdin) if r.get("protocol") == "ssh" and r.get("denied") and r.get("complete")]; print(l[-1]["id"] if l else "")')
    [ -n "$ssh_session" ] && break
    sleep 0.1
done
[ -n "$ssh_session" ] && show tollgate recordings show "$ssh_session"

if [ $governed -eq 1 ] && id daemon >/dev/null 2>&1; then
    step "A DELETE needs a second person: held until the reviewer 'daemon' approves it"
    # The reviewer is another Unix user in the rule's approver group; it
    # reaches the agent through the reviewer socket.
    chmod 755 "$work"
    review() { runuser -u daemon -- tollgate approvals "$@" --socket "$work/approvals.sock"; }
    "${run[@]}" psql -X -h "$host" -p "$port" -U postgres -d postgres \
        -c "delete from customers where id = 3" >"$work/held.out" 2>&1 &
    held_pid=$!
    request=""
    for _ in $(seq 100); do
        request=$(review list --json | python3 -c 'import json,sys; l=json.load(sys.stdin); print(l[0]["id"] if l else "")')
        [ -n "$request" ] && break
        sleep 0.1
    done
    [ -n "$request" ] || { cat "$work/held.out"; echo "demo: the DELETE was not held" >&2; exit 1; }
    echo "(psql is waiting; a reviewer lists what waits, in a second terminal:)"
    show runuser -u daemon -- tollgate approvals list --socket "$work/approvals.sock"
    echo "(the requester cannot approve its own statement:)"
    show tollgate approvals approve "$request" --socket "$work/approvals.sock" || true
    show runuser -u daemon -- tollgate approvals approve "$request" --reason "Grace Hopper asked to be forgotten" --socket "$work/approvals.sock"
    wait "$held_pid"
    echo "(what the held psql printed:)"
    sed 's/^/  /' "$work/held.out"
    held_session=$(review show "$request" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["context"]["session"])')
    for _ in $(seq 50); do tollgate recordings show "$held_session" 2>/dev/null | grep -q 'session closed\|closed' && break; sleep 0.1; done
    show tollgate recordings show "$held_session"
fi

if [ $governed -eq 1 ]; then
    step "The job timeline: every command, connection and statement of one governed job, in order"
    show tollgate exec -- sh -c "psql -X -h $host -p $port -U postgres -d postgres -Atc 'select count(*) from customers'; psql -X -h $host -p $port -U postgres -d postgres -c 'drop table customers'; timeout 1 bash -c ': </dev/tcp/192.0.2.10/443'; echo done" || true
    job=""
    for _ in $(seq 50); do
        job=$(tollgate jobs list --json | python3 -c 'import json,sys; l=[j for j in json.load(sys.stdin) if j["sessions"] >= 2 and j["complete"]]; print(l[-1]["job"] if l else "")')
        [ -n "$job" ] && break
        sleep 0.1
    done
    [ -n "$job" ] || { tollgate jobs list; echo "demo: the job's recording did not close" >&2; exit 1; }
    echo "(what it did, in order, is the demo's last step: tollgate jobs show)"
fi

step "A session in progress, as 'tollgate status' shows it"
"${run[@]}" psql -X -q -h "$host" -p "$port" -U postgres -d postgres -c "select pg_sleep(2)" >/dev/null &
sleep 0.8
show tollgate status
wait $!

step "Prometheus metrics (http://127.0.0.1:$metrics_port/metrics)"
python3 - "$metrics_port" <<'PY' | grep -E '^tollgate_(connections_total|sessions_closed_total|statements_total|masked_values_total|redirect_connects_total|identity_lookup_seconds|review_)'
import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics").read().decode())
PY

if [ $governed -eq 1 ]; then
    step "The agent is killed: governed connections fail closed, they never bypass it"
    kill -KILL "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
    mkdir -p "$cg/demo-after-kill"
    show sh -c "echo \$\$ > $cg/demo-after-kill/cgroup.procs; exec psql -X -h $host -p $port -U postgres -d postgres -c 'select 1'" || true
    rmdir "$cg/demo-after-kill" 2>/dev/null || true
    step "Lifting enforcement: tollgate detach"
    show tollgate detach
    step "What the demo's governed commands did: the job timeline (tollgate jobs list, jobs show)"
    echo "(every 'tollgate exec' above is a job; the recordings outlive the agent)"
    show tollgate jobs list
    show tollgate jobs show "$job"
else
    step "Stopping the agent (SIGTERM drains open sessions first)"
    kill -TERM "$agent_pid"; wait "$agent_pid"; agent_pid=""
fi
echo
echo "Demo finished; everything it started has been stopped and removed."
