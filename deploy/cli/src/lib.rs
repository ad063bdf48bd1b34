//! The `atoll` command line.

mod bundler;
mod dev;

use clap::{Parser, Subcommand};

/// Atoll: an edge runtime for JavaScript and TypeScript fetch handlers.
#[derive(Parser)]
#[command(name = "atoll", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve handlers locally, reloading when their files change.
    Dev(dev::DevArgs),
}

/// Runs the CLI with the process arguments.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args),
    }
}
