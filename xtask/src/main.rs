//! Developer tasks: `cargo xtask <task>`.
//!
//! - `root`: print the workspace root.
//! - `build-ebpf [--release]`: build the kernel programs (`agent-ebpf`, its own
//!   workspace) for `bpfel-unknown-none` with the nightly toolchain and
//!   `-Z build-std=core`, and print the object's path.
//! - `check-ebpf [--release]`: build, then list the object's program and map
//!   sections and fail if an expected program or map is missing.
//! - `sql-visitor [--check]`: generate the parse-tree visitor of the
//!   statement analysis from `pg_query`'s message definitions.

mod elf;
mod sql_visitor;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer tasks for Tollgate")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Print the workspace root (used by scripts to find their way).
    Root,
    /// Build the eBPF programs in agent-ebpf/ and print the object's path.
    ///
    /// Runs `cargo +nightly build --target bpfel-unknown-none -Z build-std=core`
    /// in agent-ebpf/. Needs the nightly toolchain with rust-src and bpf-linker.
    BuildEbpf {
        /// Build with the release profile (the object the agent embeds).
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF programs, then list their program and map sections.
    ///
    /// Fails when an expected program or map is missing from the object.
    CheckEbpf {
        /// Check the release build.
        #[arg(long)]
        release: bool,
    },
    /// Generate agent/src/sql/visit.rs from pg_query's parse-tree messages.
    ///
    /// Run after upgrading pg_query; the tests fail while the file is stale.
    SqlVisitor {
        /// Fail if the committed file differs instead of writing it.
        #[arg(long)]
        check: bool,
    },
}

/// The kernel crate's package and binary name.
const EBPF_BIN: &str = "tollgate-ebpf";
/// The eBPF target triple.
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// (ELF section, program function) pairs the agent loads.
const EXPECTED_PROGRAMS: [(&str, &str); 5] = [
    ("cgroup/connect4", "tollgate_connect4"),
    ("cgroup/connect6", "tollgate_connect6"),
    ("sockops", "tollgate_sockops"),
    ("cgroup/sendmsg4", "tollgate_sendmsg4"),
    ("cgroup/sendmsg6", "tollgate_sendmsg6"),
];
/// Maps the agent opens by name.
const EXPECTED_MAPS: [&str; 6] = [
    "CONFIG",
    "TARGETS",
    "RESOLVERS",
    "PENDING",
    "ORIGINS",
    "STATS",
];

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Root => println!("{}", workspace_root()?.display()),
        Task::BuildEbpf { release } => {
            let object = build_ebpf(release)?;
            println!("{}", object.display());
        }
        Task::CheckEbpf { release } => {
            let object = build_ebpf(release)?;
            check_ebpf(&object)?;
        }
        Task::SqlVisitor { check } => sql_visitor::run(&workspace_root()?, check)?,
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Builds agent-ebpf and returns the path of the object.
fn build_ebpf(release: bool) -> Result<PathBuf> {
    let dir = workspace_root()?.join("agent-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir).args([
        "+nightly",
        "build",
        "--target",
        EBPF_TARGET,
        "-Z",
        "build-std=core",
    ]);
    if release {
        cmd.arg("--release");
    }
    // `cargo xtask` runs under the outer (stable) cargo, whose environment
    // would otherwise pick the toolchain, compiler and flags of the inner build,
    // and a target dir that moves the object away from agent-ebpf/target.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    eprintln!("xtask: building {EBPF_BIN} in {}", dir.display());
    let status = cmd.status().with_context(|| {
        format!(
            "cannot run cargo in {}; is rustup's cargo on PATH?",
            dir.display()
        )
    })?;
    if !status.success() {
        bail!(
            "building the eBPF programs failed ({status}); they need the nightly toolchain with \
             rust-src (`rustup component add rust-src --toolchain nightly`) and bpf-linker on PATH"
        );
    }
    let profile = if release { "release" } else { "debug" };
    let object = dir
        .join("target")
        .join(EBPF_TARGET)
        .join(profile)
        .join(EBPF_BIN);
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    Ok(object)
}

/// Lists the program and map sections of `object`; fails if an expected one
/// is missing.
fn check_ebpf(object: &Path) -> Result<()> {
    let data =
        std::fs::read(object).with_context(|| format!("cannot read {}", object.display()))?;
    let sections =
        elf::sections(&data).with_context(|| format!("cannot parse {}", object.display()))?;
    println!("{}", object.display());
    let mut missing = Vec::new();
    for section in &sections {
        let programs: Vec<_> = section
            .symbols
            .iter()
            .filter(|s| s.kind == 2 && s.binding == 1 && !s.name.starts_with("mem"))
            .collect();
        if section.executable && section.name != ".text" {
            for p in &programs {
                println!(
                    "  program {:<20} section {:<18} {} bytes",
                    p.name, section.name, p.size
                );
            }
        } else if section.name == "maps" {
            for m in section.symbols.iter().filter(|s| s.kind == 1) {
                println!("  map     {:<20} section {}", m.name, section.name);
            }
        } else if section.name == ".maps" {
            println!("  (BTF maps in .maps: {} bytes)", section.size);
        }
    }
    for (section_name, function) in EXPECTED_PROGRAMS {
        let found = sections
            .iter()
            .any(|s| s.name == section_name && s.symbols.iter().any(|sym| sym.name == function));
        if !found {
            missing.push(format!("program {function} in section {section_name}"));
        }
    }
    for map in EXPECTED_MAPS {
        let found = sections.iter().any(|s| {
            (s.name == "maps" || s.name == ".maps") && s.symbols.iter().any(|sym| sym.name == map)
        });
        if !found {
            missing.push(format!("map {map}"));
        }
    }
    if !sections.iter().any(|s| s.name == "license") {
        missing.push("license section".to_owned());
    }
    if !missing.is_empty() {
        bail!("{} lacks: {}", object.display(), missing.join(", "));
    }
    println!(
        "ok: {} programs, {} maps present",
        EXPECTED_PROGRAMS.len(),
        EXPECTED_MAPS.len()
    );
    Ok(())
}
