//! `atoll dev`: build bundles locally and serve them from an in-process
//! edge node, rebuilding when a file of a module graph changes.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use atoll_edge_node::{EdgeNode, HostPattern, Routes, ServerLimits, parse_route};
use atoll_runtime::{Allowance, Deployment, Limits, Runtime, RuntimeConfig};
use notify::{RecursiveMode, Watcher};
use tokio::net::TcpListener;

use crate::bundler;

/// Arguments of `atoll dev`.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Entry modules: `ENTRY` serves every host; `ROUTE=ENTRY` serves the
    /// requests ROUTE matches: `host`, `*.suffix` or `*`, optionally followed
    /// by a path prefix (`api.local/v2`). The most specific route wins; each
    /// entry is its own tenant.
    #[arg(required = true, value_name = "[ROUTE=]ENTRY")]
    entries: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8787)]
    port: u16,
    /// A plain-text binding exposed to handlers as `env.KEY` (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    vars: Vec<String>,
    /// CPU time limit per request, in milliseconds.
    #[arg(long, default_value_t = 50)]
    cpu_ms: u64,
    /// Wall-clock limit per request, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    wall_ms: u64,
    /// Heap limit per isolate, in MiB.
    #[arg(long, default_value_t = 128)]
    heap_mb: usize,
    /// Largest request body accepted, in MiB (larger: 413).
    #[arg(long, default_value_t = 100)]
    max_body_mb: u64,
    /// Project root: imports may not leave it (default: the current
    /// directory if it holds the entry, else the entry's directory).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Let handlers' fetch() reach this private host, address or network
    /// (e.g. 127.0.0.1, 10.0.0.0/8, api.internal); repeatable.
    #[arg(long = "allow-outbound", value_name = "HOST|IP|CIDR")]
    allow_outbound: Vec<String>,
    /// Don't rebuild on file changes.
    #[arg(long)]
    no_watch: bool,
}

struct Entry {
    tenant: String,
    /// The route as given (`None`: every host).
    route: Option<String>,
    host: HostPattern,
    path_prefix: String,
    path: PathBuf,
    root: PathBuf,
}

struct Setup {
    entries: Vec<Entry>,
    vars: BTreeMap<String, String>,
    limits: Limits,
}

impl Setup {
    /// Builds every entry; returns the routes and the files to watch.
    fn build(&self) -> anyhow::Result<(Routes, Vec<PathBuf>)> {
        let mut routes = Routes::new();
        let mut files = Vec::new();
        for e in &self.entries {
            let built = bundler::build(&e.path, &e.root)
                .with_context(|| format!("building {}", e.path.display()))?;
            files.extend(built.files);
            let deployment = Arc::new(Deployment::new(
                e.tenant.clone(),
                Arc::new(built.bundle),
                self.vars.clone(),
                self.limits,
            ));
            routes.add(e.host.clone(), &e.path_prefix, deployment)?;
        }
        Ok((routes, files))
    }
}

fn parse_entries(args: &DevArgs) -> anyhow::Result<Vec<Entry>> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut out = Vec::new();
    let mut seen_fallback = false;
    for raw in &args.entries {
        let (route, path) = match raw.split_once('=') {
            Some((r, p)) if !r.is_empty() => (Some(r.to_string()), PathBuf::from(p)),
            _ => (None, PathBuf::from(raw)),
        };
        if route.is_none() {
            if seen_fallback {
                bail!("only one entry may serve every host; give the others a ROUTE= prefix");
            }
            seen_fallback = true;
        }
        let (host, path_prefix) = match &route {
            None => (HostPattern::Any, "/".to_string()),
            Some(r) => parse_route(r).with_context(|| format!("route {r:?}"))?,
        };
        let abs = if path.is_absolute() {
            path.clone()
        } else {
            cwd.join(&path)
        };
        if !abs.is_file() {
            bail!("entry {} does not exist or is not a file", path.display());
        }
        let root = match &args.root {
            Some(r) => r.clone(),
            None if abs.starts_with(&cwd) => cwd.clone(),
            None => abs
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| cwd.clone()),
        };
        let stem = abs
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "worker".into());
        let tenant = route.clone().unwrap_or(stem);
        out.push(Entry {
            tenant,
            route,
            host,
            path_prefix,
            path: abs,
            root,
        });
    }
    Ok(out)
}

fn parse_vars(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for v in raw {
        let Some((k, val)) = v.split_once('=') else {
            bail!("--var {v:?} must look like KEY=VALUE");
        };
        if k.is_empty() {
            bail!("--var {v:?} has an empty name");
        }
        vars.insert(k.to_string(), val.to_string());
    }
    Ok(vars)
}

/// Runs `atoll dev` until interrupted.
pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let _log = crate::logging::init(false);
    let setup = Setup {
        entries: parse_entries(&args)?,
        vars: parse_vars(&args.vars)?,
        limits: Limits {
            cpu_per_request: Duration::from_millis(args.cpu_ms),
            wall_per_request: Duration::from_millis(args.wall_ms),
            heap_bytes: args
                .heap_mb
                .checked_mul(1024 * 1024)
                .filter(|_| args.heap_mb >= 16)
                .context("--heap-mb must be at least 16 and fit in memory")?,
            ..Limits::default()
        },
    };
    let (routes, files) = setup.build()?;

    crate::server_runtime()?.block_on(async move {
        let mut config = RuntimeConfig {
            default_heap_bytes: setup.limits.heap_bytes,
            ..RuntimeConfig::default()
        };
        if let Some(t) = args.threads {
            config.threads = t;
        }
        config.outbound.allow = Allowance::parse(&args.allow_outbound)
            .map_err(|e| anyhow::anyhow!("--allow-outbound: {e}"))?;
        let runtime = Arc::new(Runtime::start(config)?);
        let node = EdgeNode::with_limits(
            runtime,
            routes,
            ServerLimits {
                max_body_bytes: args
                    .max_body_mb
                    .checked_mul(1024 * 1024)
                    .context("--max-body-mb is too large")?,
                ..ServerLimits::default()
            },
        );
        let addr = SocketAddr::new(args.host, args.port);
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("listening on {addr} (is another server using it? try --port)")
        })?;
        let local = listener.local_addr()?;
        println!("atoll dev: listening on http://{local}");
        for e in &setup.entries {
            let route = e.route.as_deref().unwrap_or("*");
            println!("  {route} -> {}", e.path.display());
        }
        if !args.no_watch {
            spawn_watcher(node.clone(), setup, files)?;
        }
        node.serve(
            listener,
            None,
            crate::signals::shutdown(),
            Duration::from_secs(10),
        )
        .await?;
        println!("atoll dev: stopped");
        Ok(())
    })
}

/// Watches the module graphs' files; rebuilds and swaps routes on change.
fn spawn_watcher(node: Arc<EdgeNode>, setup: Setup, files: Vec<PathBuf>) -> anyhow::Result<()> {
    let setup = Arc::new(setup);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let _ = tx.send(ev.paths);
        }
    })
    .context("starting the file watcher")?;
    let mut watched_dirs = HashSet::new();
    let mut graph: HashSet<PathBuf> = files.into_iter().collect();
    watch_dirs(&mut watcher, &graph, &mut watched_dirs);

    tokio::spawn(async move {
        let _keep = &watcher;
        while let Some(paths) = rx.recv().await {
            if !paths.iter().any(|p| graph.contains(p)) {
                continue;
            }
            // Editors write in bursts: wait for quiet, then rebuild once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            // Bundling is CPU work: keep it off the request-serving threads.
            let s = setup.clone();
            let built = match tokio::task::spawn_blocking(move || s.build()).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("the rebuild task failed: {e}");
                    continue;
                }
            };
            match built {
                Ok((routes, files)) => {
                    let count = files.len();
                    graph = files.into_iter().collect();
                    watch_dirs(&mut watcher, &graph, &mut watched_dirs);
                    node.set_routes(routes);
                    println!("atoll dev: reloaded ({count} modules)");
                    tracing::info!("reloaded ({count} modules)");
                }
                Err(e) => {
                    println!("atoll dev: reload failed, still serving the previous version: {e:#}");
                    tracing::error!("reload failed, still serving the previous version: {e:#}");
                }
            }
        }
    });
    Ok(())
}

fn watch_dirs(
    watcher: &mut notify::RecommendedWatcher,
    files: &HashSet<PathBuf>,
    watched: &mut HashSet<PathBuf>,
) {
    for f in files {
        if let Some(dir) = f.parent()
            && watched.insert(dir.to_path_buf())
            && let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive)
        {
            tracing::warn!("cannot watch {}: {e}", dir.display());
        }
    }
}
