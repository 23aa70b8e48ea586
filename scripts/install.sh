#!/usr/bin/env bash
# Installs Tollgate on a runner host: the binary, a configuration skeleton,
# the shipped policies, a systemd unit for the agent, for each service to
# govern (a CI runner, an AI agent's service) a drop-in that makes the
# service start only once its cgroup is governed, and, when the
# configuration has SSH targets, their @cert-authority lines in
# /etc/ssh/ssh_known_hosts.
#
#   scripts/install.sh [--govern-service NAME.service]... [--prefix DIR]
#                      [--binary PATH] [--root DIR] [--no-start]
#
#   --govern-service   a systemd service whose processes are governed (its
#                      cgroup system.slice/NAME is attached); repeatable
#   --prefix           where the binary goes (default /usr/local)
#   --binary           install this binary instead of building a release one
#   --root             install under DIR instead of / (packaging, tests)
#   --no-start         do not enable and start the agent
#
# Idempotent: an existing /etc/tollgate/tollgate.toml is never overwritten;
# the SSH lines are replaced.
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
root=""
binary=""
start=1
services=()
while [ $# -gt 0 ]; do
    case "$1" in
        --govern-service) services+=("$2"); shift 2 ;;
        --prefix) prefix="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        --root) root="${2%/}"; shift 2 ;;
        --no-start) start=0; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for s in "${services[@]}"; do
    case "$s" in
        *.service) ;;
        *) echo "install: --govern-service takes a unit name ending in .service, got \"$s\"" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    scripts/setup.sh
    cargo build --release --locked -p tollgate-agent --bin tollgate
    binary=target/release/tollgate
fi
[ -x "$binary" ] || { echo "install: $binary is not an executable" >&2; exit 1; }

bin="$prefix/bin/tollgate"
etc=/etc/tollgate
install -D -m 0755 "$binary" "$root$bin"
echo "install: $root$bin"

install -d -m 0755 "$root$prefix/share/doc/tollgate"
install -m 0644 README.md docs/*.md "$root$prefix/share/doc/tollgate/"

install -d -m 0755 "$root$etc/policies"
for f in policies/*.toml; do
    install -m 0644 "$f" "$root$etc/policies/$(basename "$f")"
done
echo "install: $root$etc/policies/ (shipped policies and their tests)"

config="$root$etc/tollgate.toml"
if [ -e "$config" ]; then
    echo "install: keeping the existing $config"
else
    {
        sed "s|@POLICIES@|$etc/policies|" packaging/tollgate.toml
        for s in "${services[@]}"; do
            printf '\n[[cgroup]]\n# The cgroup systemd gives %s.\npath = "system.slice/%s"\nunlisted = "pass"\n' "$s" "$s"
        done
    } > "$config"
    chmod 0644 "$config"
    echo "install: $config (edit the targets, then: tollgate config check)"
fi

units="$root/etc/systemd/system"
install -d -m 0755 "$units"
before=""
[ ${#services[@]} -gt 0 ] && before="Before=${services[*]}"
sed -e "s|@BIN@|$bin|g" -e "s|@CONFIG@|$etc/tollgate.toml|g" -e "s|@BEFORE@|$before|" -e "s|@PREFIX@|$prefix|g" \
    packaging/tollgate.service > "$units/tollgate.service"
echo "install: $units/tollgate.service"
for s in "${services[@]}"; do
    install -d -m 0755 "$units/$s.d"
    sed -e "s|@BIN@|$bin|g" -e "s|@CONFIG@|$etc/tollgate.toml|g" \
        packaging/governed-service.conf > "$units/$s.d/tollgate.conf"
    echo "install: $units/$s.d/tollgate.conf (governs $s)"
done

# Any user may create directories in a bpffs mounted without mode= (1777);
# the agent refuses pin directories it does not own, which stops it starting.
bpffs=$(awk '$9 == "bpf" { print $5; exit }' /proc/self/mountinfo)
if [ -z "$root" ] && [ -n "$bpffs" ] && [ -n "$(find "$bpffs" -maxdepth 0 -perm -0002 2>/dev/null)" ]; then
    echo "install: warning: bpffs at $bpffs is writable by every user (mode $(stat -c %a "$bpffs")); another user could make the agent's pin directory first and keep it from starting; mount bpffs with -o mode=0700 at boot (its fstab entry or mount unit)" >&2
fi

# SSH targets: clients on this host trust the agent's SSH host CA for them
# (one @cert-authority line per target, kept between markers so a rerun
# replaces them). Rerun after adding an SSH target.
if grep -qE '^[[:space:]]*protocol[[:space:]]*=[[:space:]]*"ssh"' "$config"; then
    known="$root/etc/ssh/ssh_known_hosts"
    lines=$("$root$bin" ssh known-hosts --config "$config")
    mkdir -p "$(dirname "$known")"
    touch "$known"
    sed -i '/^# tollgate: begin$/,/^# tollgate: end$/d' "$known"
    printf '# tollgate: begin\n%s\n# tollgate: end\n' "$lines" >> "$known"
    chmod 0644 "$known"
    echo "install: $known (@cert-authority lines for the SSH targets)"
fi

if [ -z "$root" ] && [ $start -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now tollgate.service
    for s in "${services[@]}"; do
        systemctl try-restart "$s" || true
    done
    echo "install: tollgate.service enabled and started; see: tollgate status"
else
    echo "install: not starting anything; when ready: systemctl daemon-reload && systemctl enable --now tollgate.service"
fi
