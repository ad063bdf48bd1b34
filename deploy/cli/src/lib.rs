//! The `atoll` command line.

mod bundler;
mod dev;
mod logging;
mod metrics_text;
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

/// The async runtime of the serving commands: HTTP connections only (the
/// isolates run on the runtime's own worker threads), so two threads suffice.
fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs the CLI with the process arguments.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Node(args) => node::run(args),
    }
}
