//! `atoll node --config node.toml`: run an edge node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use atoll_edge_node::{EdgeNode, NodeConfig, Routes};
use atoll_runtime::{Deployment, Runtime, RuntimeConfig};
use tokio::net::TcpListener;

use crate::bundler;

/// How long in-flight requests get to finish after SIGTERM/SIGINT.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Arguments of `atoll node`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    #[command(subcommand)]
    action: Option<NodeAction>,
    /// The node's configuration file.
    #[arg(long, value_name = "FILE", default_value = "node.toml")]
    config: PathBuf,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(clap::Subcommand)]
enum NodeAction {
    /// Show a running node's isolates and counters (from its admin listener).
    Status {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

/// Runs `atoll node` or one of its actions.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    match &args.action {
        Some(NodeAction::Status { admin }) => crate::node_status::print(admin),
        None => run_node(args),
    }
}

/// Runs an edge node until SIGTERM/SIGINT.
fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    crate::logging::init(args.log_format == "json");
    // Everything is validated and built before anything listens: a bad
    // config or script leaves no half-started node behind.
    let config = NodeConfig::load(&args.config)?;
    let config_dir = args
        .config
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut deployments = HashMap::new();
    for s in &config.scripts {
        let root = bundler::project_root(&s.entry, &config_dir);
        let built = bundler::build(&s.entry, &root)
            .with_context(|| format!("building script {:?} ({})", s.name, s.entry.display()))?;
        deployments.insert(
            s.name.clone(),
            Arc::new(Deployment::new(
                s.name.clone(),
                Arc::new(built.bundle),
                s.vars.clone(),
                s.limits,
            )),
        );
    }
    let mut routes = Routes::new();
    for r in &config.routes {
        let deployment = deployments
            .get(&r.script)
            .with_context(|| format!("route to unknown script {:?}", r.script))?;
        routes.add(r.host.clone(), &r.path_prefix, deployment.clone())?;
    }

    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    tokio_rt.block_on(async move {
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr} (is another server using it?)"))?;
            listeners.push(l);
        }
        let admin = TcpListener::bind(config.admin)
            .await
            .with_context(|| format!("admin listener on {} (set [admin] addr)", config.admin))?;
        let mut runtime_config = RuntimeConfig::default();
        if let Some(t) = config.threads {
            runtime_config.threads = t;
        }
        if let Some(p) = config.pool_per_thread {
            runtime_config.pool_per_thread = p;
        }
        let runtime = Arc::new(Runtime::start(runtime_config)?);
        let node = EdgeNode::with_limits(runtime, routes, config.server);

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for l in listeners {
            println!("atoll node: listening on http://{}", l.local_addr()?);
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            servers.push(tokio::spawn(node.clone().serve(
                l,
                shutdown,
                DRAIN_DEADLINE,
            )));
        }
        println!("atoll node: admin on http://{}", admin.local_addr()?);
        let mut stop = stop_rx.clone();
        let admin_task = tokio::spawn(atoll_edge_node::serve_admin(
            node.clone(),
            admin,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        tracing::info!(
            scripts = config.scripts.len(),
            routes = config.routes.len(),
            "node started"
        );
        crate::signals::shutdown().await;
        let _ = stop_tx.send(true);
        for s in servers {
            s.await.context("a listener task failed")??;
        }
        admin_task.await.context("the admin task failed")??;
        println!("atoll node: stopped");
        Ok(())
    })
}
