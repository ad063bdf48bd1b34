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
    let _log = crate::logging::init(args.log_format == "json");
    // Everything is validated and built before anything listens: a bad
    // config or script leaves no half-started node behind.
    let config = NodeConfig::load(&args.config)?;
    let config_dir = match args.config.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
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

    crate::server_runtime()?.block_on(async move {
        let tls = if config.listen.iter().any(|l| l.tls) {
            let mut certs = config.certificates.clone();
            if certs.is_empty() {
                let dir = std::path::absolute(config_dir.join(".atoll"))
                    .context("locating the config directory")?;
                let mut hosts = vec!["localhost".to_string()];
                hosts.extend(config.routes.iter().filter_map(|r| match &r.host {
                    atoll_edge_node::HostPattern::Exact(h) => Some(h.clone()),
                    atoll_edge_node::HostPattern::Wildcard(s) => Some(format!("*.{s}")),
                    atoll_edge_node::HostPattern::Any => None,
                }));
                let spec = atoll_edge_node::self_signed(&hosts, &dir)?;
                println!(
                    "atoll node: no [[certificates]] configured; generated a self-signed certificate for development: {}",
                    spec.cert.display()
                );
                certs.push(spec);
            }
            Some(atoll_edge_node::tls_acceptor(&certs)?)
        } else {
            None
        };
        let mut listeners = Vec::new();
        for l in &config.listen {
            let listener = TcpListener::bind(l.addr)
                .await
                .with_context(|| format!("listening on {} (is another server using it?)", l.addr))?;
            listeners.push((listener, l.tls));
        }
        let admin = TcpListener::bind(config.admin)
            .await
            .with_context(|| format!("admin listener on {} (set [admin] addr)", config.admin))?;
        let mut runtime_config = RuntimeConfig {
            // Pooled isolates must have the heap most scripts use, or the
            // pool is never used.
            default_heap_bytes: config.default_limits.heap_bytes,
            ..RuntimeConfig::default()
        };
        if let Some(t) = config.threads {
            runtime_config.threads = t;
        }
        runtime_config.outbound = config.outbound.clone();
        if let Some(b) = config.isolate_memory_bytes {
            runtime_config.memory_budget_bytes = b;
        }
        if let Some(p) = config.pool_per_thread {
            runtime_config.pool_per_thread = p;
        }
        let runtime = Arc::new(Runtime::start(runtime_config)?);
        let node = EdgeNode::with_limits(runtime, routes, config.server);

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for (l, is_tls) in listeners {
            let scheme = if is_tls { "https" } else { "http" };
            println!("atoll node: listening on {scheme}://{}", l.local_addr()?);
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let acceptor = if is_tls { tls.clone() } else { None };
            servers.push(tokio::spawn(node.clone().serve(
                l,
                acceptor,
                shutdown,
                DRAIN_DEADLINE,
            )));
        }
        println!("atoll node: admin on http://{}", admin.local_addr()?);
        // The admin listener outlives the drain: load balancers and
        // operators see /readyz answer 503 meanwhile, not a refused
        // connection.
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(atoll_edge_node::serve_admin(
            node.clone(),
            admin,
            async move {
                let _ = admin_stopped.await;
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
        let _ = admin_stop.send(());
        admin_task.await.context("the admin task failed")??;
        println!("atoll node: stopped");
        Ok(())
    })
}
