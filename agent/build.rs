//! Builds the kernel programs (`agent-ebpf`, a workspace of its own, for
//! `bpfel-unknown-none` with the nightly toolchain and `-Z build-std=core`)
//! and leaves the object at `OUT_DIR/tollgate-ebpf`, where `redirect/`
//! embeds it.
//!
//! This does what aya-build does, but keeps the nested build's output to
//! itself unless it fails: aya-build turns every line into a cargo warning,
//! which cargo then replays on every build of this crate. Needs what
//! `scripts/setup.sh` installs: the nightly `rust-src` component and
//! `bpf-linker`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    if let Err(e) = build() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or("agent/ has no parent directory")?;
    let ebpf_dir = root.join("agent-ebpf");
    for watched in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/Cargo.lock",
        "common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let target_dir = out_dir.join("ebpf-target");
    // aya-ebpf reads the host architecture from this cfg (for pt_regs layouts).
    let arch = env("CARGO_CFG_TARGET_ARCH")?;
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{arch}\"");
    let output = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // The outer build's compiler and wrappers (clippy) must not leak in.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .output()
        .map_err(|e| {
            format!("cannot run rustup to build the eBPF programs ({e}); run scripts/setup.sh")
        })?;
    if !output.status.success() {
        return Err(format!(
            "building the eBPF programs in {} failed:\n{}\nrun scripts/setup.sh to install the nightly rust-src component and bpf-linker",
            ebpf_dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let object = target_dir.join("bpfel-unknown-none/release/tollgate-ebpf");
    std::fs::copy(&object, out_dir.join("tollgate-ebpf"))
        .map_err(|e| format!("cannot copy {}: {e}", object.display()))?;
    Ok(())
}
