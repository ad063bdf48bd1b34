//! The `atoll` command line.

mod bundler;
mod dev;
mod logging;
mod node;
mod node_status;
mod signals;

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
    /// Run an edge node from a config file.
    Node(node::NodeArgs),
}

/// Runs the CLI with the process arguments.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Node(args) => node::run(args),
    }
}
