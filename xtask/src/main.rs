//! Developer tasks: `cargo xtask <task>`.

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
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Root => {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .ok_or_else(|| anyhow::anyhow!("xtask has no parent directory"))?;
            println!("{}", root.display());
        }
    }
    Ok(())
}
