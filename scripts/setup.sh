#!/usr/bin/env bash
# Prepares a fresh Debian machine to build, test and demo Tollgate.
# Idempotent: a second run does nothing and prints one line per check.
#
#   scripts/setup.sh            install what is missing, then check the kernel
#   scripts/setup.sh --check    only report, change nothing
set -euo pipefail

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $*"; fi
}

# --- Debian packages -------------------------------------------------------
# postgresql: throwaway servers for tests and the demo; mariadb: the MySQL
# protocol (mariadb-test: its plugin that asks for a password in clear);
# pgbouncer: the benchmark baseline; sysbench: the MySQL benchmark;
# openssl: certificates for TLS MariaDB servers in the tests; iproute2: test addresses;
# libclang-dev: pg_query's build; build-essential/pkg-config: C parts of crates;
# python3/pip: psycopg for the driver tests; chromium and chromium-driver:
# the reviewers' web page in a real headless browser; btrfs-progs: an
# executable on a btrfs subvolume in the identity tests; openssh-server and
# openssh-client: SSH hosts and clients for SSH targets (git over SSH too);
# rsync: rsync over SSH in the SSH tests; time: the CPU a build used in
# scripts/bench-jobs.sh.
packages=(postgresql postgresql-client mariadb-server mariadb-client mariadb-test pgbouncer sysbench openssl
          iproute2 libclang-dev clang build-essential pkg-config ca-certificates curl
          python3 python3-pip chromium chromium-driver btrfs-progs openssh-server openssh-client rsync time)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    say "debian packages: present"
elif [ $check_only -eq 1 ]; then
    say "debian packages: missing ${missing[*]}"
else
    say "debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    # Packaged servers must not start system-wide instances we do not use.
    policy_rc=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy_rc" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy_rc" >/dev/null
        as_root chmod +x "$policy_rc"
        created_policy=1
    fi
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $created_policy -eq 1 ] && as_root rm -f "$policy_rc"
fi

# --- Python packages for the end-to-end tests --------------------------------
# psycopg 3 and asyncpg (which speaks the extended protocol only, with its own
# pipelining of executemany); mysql-connector-python (server-side prepared
# statements, binary rows) and PyMySQL (text protocol, multi-statements) for
# MySQL targets; prometheus-client, whose parser checks the agent's /metrics
# as a scraper reads it; moto's S3 server (with boto3 to read back what the
# agent uploaded) for recordings to object storage.
for driver in "psycopg:psycopg[binary]" "asyncpg:asyncpg" "mysql.connector:mysql-connector-python" \
        "pymysql:PyMySQL" "prometheus_client:prometheus-client" "moto.server:moto[server]"; do
    module=${driver%%:*}
    package=${driver#*:}
    if python3 -c "import $module" >/dev/null 2>&1; then
        say "$module (python): present"
    elif [ $check_only -eq 1 ]; then
        say "$module (python): missing"
    else
        say "$module (python): installing"
        python3 -m pip install --quiet --disable-pip-version-check "$package" 2>/dev/null \
            || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$package"
    fi
done

# --- Rust toolchains ---------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust with rustup first"
command -v rustup >/dev/null 2>&1 || die "rustup not found; the eBPF build needs the nightly toolchain via rustup"

if ! rustup toolchain list | grep -q '^nightly'; then
    [ $check_only -eq 1 ] && say "nightly toolchain: missing" || { say "nightly toolchain: installing"; rustup toolchain install nightly --profile minimal; }
fi
if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "nightly rust-src: present"
elif [ $check_only -eq 1 ]; then
    say "nightly rust-src: missing"
else
    say "nightly rust-src: installing"
    rustup component add rust-src --toolchain nightly
fi

# bpf-linker links against the nightly toolchain's own LLVM, so no system LLVM
# of the matching major version is needed.
if command -v bpf-linker >/dev/null 2>&1; then
    say "bpf-linker: present ($(rustup run nightly bpf-linker --version 2>&1 | head -n1))"
elif [ $check_only -eq 1 ]; then
    say "bpf-linker: missing"
else
    nightly_lib="$(rustc +nightly --print sysroot)/lib"
    libllvm=$(ls "$nightly_lib"/libLLVM.so.*-rust-* 2>/dev/null | head -n1 || true)
    [ -n "$libllvm" ] || die "no libLLVM in $nightly_lib; reinstall the nightly toolchain"
    major=$(basename "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')
    prefix="${CARGO_HOME:-$HOME/.cargo}/llvm-prefix-$major"
    mkdir -p "$prefix/lib"
    ln -sf "$libllvm" "$prefix/lib/libLLVM.so"
    say "bpf-linker: building against LLVM $major from the nightly toolchain (a few minutes)"
    LLVM_PREFIX="$prefix" LD_LIBRARY_PATH="$nightly_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        cargo install --locked bpf-linker --no-default-features --features "llvm-$major" >/dev/null
fi

# cargo-fuzz runs the fuzz targets in fuzz/ (scripts/fuzz.sh, and briefly
# scripts/test.sh) on the nightly toolchain; libFuzzer itself is built by the
# targets' libfuzzer-sys dependency with the C++ compiler above.
if command -v cargo-fuzz >/dev/null 2>&1; then
    say "cargo-fuzz: present ($(cargo fuzz --version 2>&1 | head -n1))"
elif [ $check_only -eq 1 ]; then
    say "cargo-fuzz: missing"
else
    say "cargo-fuzz: installing (a minute or two)"
    cargo install --locked cargo-fuzz >/dev/null
fi

# --- Kernel features -----------------------------------------------------------
# These only disable the transparent redirect; explicit listeners always work.
kernel_ok=1
if [ ! -e /sys/kernel/btf/vmlinux ]; then
    say "kernel: no BTF (/sys/kernel/btf/vmlinux); transparent redirect disabled"; kernel_ok=0
fi
cgroup2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
if [ -z "$cgroup2" ]; then
    say "kernel: no cgroup v2 mount; transparent redirect disabled"; kernel_ok=0
fi
bpffs=$(awk '$9 == "bpf" { print $5; exit }' /proc/self/mountinfo)
if [ -z "$bpffs" ]; then
    # mode=0700: without it the kernel makes the mount 1777 and any user
    # could squat the agent's pin directories.
    if [ $check_only -eq 0 ] && [ "$(id -u)" -eq 0 ] && mkdir -p /sys/fs/bpf && mount -t bpf -o mode=0700 bpf /sys/fs/bpf 2>/dev/null; then
        bpffs=/sys/fs/bpf
        say "kernel: mounted bpffs at /sys/fs/bpf (mode 0700)"
    else
        say "kernel: bpffs not mounted; pinning (fail-closed across agent restarts) disabled until it is"
        kernel_ok=0
    fi
fi
if [ -n "$bpffs" ] && [ -n "$(find "$bpffs" -maxdepth 0 -perm -0002 2>/dev/null)" ]; then
    say "warning: bpffs at $bpffs is writable by every user (mode $(stat -c %a "$bpffs")); the agent refuses pin directories other users made, so another user can keep it from starting; mount bpffs with -o mode=0700 at boot (its fstab entry or mount unit)"
fi
if [ "$(id -u)" -ne 0 ]; then
    say "kernel: not root; loading eBPF needs root or CAP_BPF+CAP_NET_ADMIN (explicit listeners still work)"
    kernel_ok=0
fi
[ $kernel_ok -eq 1 ] && say "kernel: BTF, cgroup v2 at $cgroup2, bpffs at $bpffs"
exit 0
