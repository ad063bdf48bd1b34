//! `node.toml`: listeners, default limits, scripts and routes of a node.
//!
//! Parsing is strict (unknown keys are errors) and every error names the
//! file, line, column and key, so a node never starts half-configured.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use atoll_runtime::{Allowance, Limits, OutboundConfig};
use serde::Deserialize;
use toml::Spanned;

use crate::routes::{HostPattern, parse_route};
use crate::server::ServerLimits;
use crate::tls::CertSpec;

/// Port of the admin listener when the config has no `[admin]`.
pub const DEFAULT_ADMIN_PORT: u16 = 9901;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Syntax or type error, or a value that makes no sense.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    threads: Option<usize>,
    pool_per_thread: Option<usize>,
    isolate_memory_mb: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    addr: Spanned<String>,
    #[serde(default)]
    tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateSection {
    hosts: Spanned<Vec<String>>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundSection {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    nameservers: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    addr: Spanned<String>,
}

/// Limits as written in the file; unset fields inherit.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    cpu_ms: Option<Spanned<u64>>,
    wall_ms: Option<Spanned<u64>>,
    heap_mb: Option<Spanned<u64>>,
    max_concurrent: Option<Spanned<u64>>,
    max_queued: Option<Spanned<u64>>,
    subrequests: Option<Spanned<u64>>,
    fetch_concurrency: Option<Spanned<u64>>,
    fetch_response_mb: Option<Spanned<u64>>,
    max_body_mb: Option<Spanned<u64>>,
    max_header_kb: Option<Spanned<u64>>,
    head_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptSection {
    name: Spanned<String>,
    entry: Spanned<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    limits: LimitsSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteSection {
    pattern: Spanned<String>,
    script: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    listen: Vec<ListenSection>,
    admin: Option<AdminSection>,
    #[serde(default)]
    outbound: OutboundSection,
    #[serde(default)]
    certificates: Vec<CertificateSection>,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    scripts: Vec<ScriptSection>,
    #[serde(default)]
    routes: Vec<RouteSection>,
}

/// One listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenConfig {
    /// Address to bind.
    pub addr: SocketAddr,
    /// HTTPS (with `certificates`, or a generated self-signed one) or plain HTTP.
    pub tls: bool,
}

/// One script of the node.
#[derive(Debug, Clone)]
pub struct ScriptConfig {
    /// Tenant name.
    pub name: String,
    /// Entry module, resolved against the config file's directory.
    pub entry: PathBuf,
    /// Plain-text bindings (`env.KEY`).
    pub vars: BTreeMap<String, String>,
    /// Limits (defaults merged with the script's overrides).
    pub limits: Limits,
}

/// One route of the node.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Host pattern.
    pub host: HostPattern,
    /// Path prefix (starts with `/`).
    pub path_prefix: String,
    /// Name of the script it serves.
    pub script: String,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Listeners.
    pub listen: Vec<ListenConfig>,
    /// Certificates for HTTPS listeners, chosen by SNI.
    pub certificates: Vec<CertSpec>,
    /// The operator's listener (loopback by default).
    pub admin: SocketAddr,
    /// Worker threads (default: one per core).
    pub threads: Option<usize>,
    /// Pre-booted isolates per worker thread.
    pub pool_per_thread: Option<usize>,
    /// Memory all tenant isolates may hold before idle ones are evicted.
    pub isolate_memory_bytes: Option<usize>,
    /// How handlers' `fetch()` reaches the network.
    pub outbound: OutboundConfig,
    /// Server-side request limits.
    pub server: ServerLimits,
    /// Limits of scripts that set none of their own.
    pub default_limits: Limits,
    /// Scripts by name, in file order.
    pub scripts: Vec<ScriptConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
}

impl NodeConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base)
    }

    /// Validates config `text` (read from `path`, entries relative to `base`).
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<NodeConfig, ConfigError> {
        let invalid = |span: std::ops::Range<usize>, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let file: File = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            match key_at(text, span.start) {
                Some(key) if !message.contains(&key) => invalid(span, format!("{key}: {message}")),
                _ => invalid(span, message),
            }
        })?;

        if file.listen.is_empty() {
            return Err(invalid(
                0..0,
                "listen: at least one [[listen]] with an addr is required".into(),
            ));
        }
        let mut listen = Vec::new();
        for l in &file.listen {
            let addr = l.addr.get_ref().parse::<SocketAddr>().map_err(|e| {
                invalid(
                    l.addr.span(),
                    format!(
                        "listen.addr: {:?} is not an address like 127.0.0.1:8080 ({e})",
                        l.addr.get_ref()
                    ),
                )
            })?;
            listen.push(ListenConfig { addr, tls: l.tls });
        }

        let mut certificates = Vec::new();
        for c in &file.certificates {
            if c.hosts.get_ref().is_empty() {
                return Err(invalid(
                    c.hosts.span(),
                    "certificates.hosts: name at least one host (or *.suffix)".into(),
                ));
            }
            for host in c.hosts.get_ref() {
                HostPattern::parse(host)
                    .map_err(|e| invalid(c.hosts.span(), format!("certificates.hosts: {e}")))?;
            }
            for (key, value) in [("certificates.cert", &c.cert), ("certificates.key", &c.key)] {
                if !base.join(value.get_ref()).is_file() {
                    return Err(invalid(
                        value.span(),
                        format!(
                            "{key}: {} does not exist",
                            base.join(value.get_ref()).display()
                        ),
                    ));
                }
            }
            if !file.listen.iter().any(|l| l.tls) {
                return Err(invalid(
                    c.cert.span(),
                    "certificates: no [[listen]] has tls = true, so this certificate would be unused"
                        .into(),
                ));
            }
            certificates.push(CertSpec {
                hosts: c.hosts.get_ref().clone(),
                cert: base.join(c.cert.get_ref()),
                key: base.join(c.key.get_ref()),
            });
        }

        let admin = match &file.admin {
            None => SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
            Some(a) => a.addr.get_ref().parse::<SocketAddr>().map_err(|e| {
                invalid(
                    a.addr.span(),
                    format!(
                        "admin.addr: {:?} is not an address like 127.0.0.1:9901 ({e})",
                        a.addr.get_ref()
                    ),
                )
            })?,
        };

        let isolate_memory_bytes = file
            .node
            .isolate_memory_mb
            .as_ref()
            .map(|v| {
                mebibytes(
                    v,
                    "node.isolate_memory_mb",
                    1,
                    MAX_ISOLATE_MEMORY_MB,
                    &invalid,
                )
            })
            .transpose()?;
        let allow_entries: Vec<&str> = file
            .outbound
            .allow
            .iter()
            .map(|a| a.get_ref().as_str())
            .collect();
        let allow = Allowance::parse(&allow_entries).map_err(|e| {
            invalid(
                file.outbound.allow[e.index].span(),
                format!("outbound.allow: {e}"),
            )
        })?;
        let mut nameservers = Vec::new();
        for ns in &file.outbound.nameservers {
            let addr = ns
                .get_ref()
                .parse::<SocketAddr>()
                .or_else(|_| {
                    ns.get_ref()
                        .parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    invalid(
                        ns.span(),
                        format!(
                            "outbound.nameservers: {:?} is not an address like 1.1.1.1 or 127.0.0.1:5353",
                            ns.get_ref()
                        ),
                    )
                })?;
            nameservers.push(addr);
        }
        let outbound = OutboundConfig { allow, nameservers };
        let defaults = merge_limits(&Limits::default(), &file.limits, &invalid)?;
        let mut server = ServerLimits::default();
        if let Some(mb) = &file.limits.max_body_mb {
            server.max_body_bytes =
                mebibytes(mb, "limits.max_body_mb", 1, MAX_BODY_MB, &invalid)? as u64;
        }
        if let Some(kb) = &file.limits.max_header_kb {
            let n = *kb.get_ref();
            if !(1..=MAX_HEADER_KB).contains(&n) {
                return Err(invalid(
                    kb.span(),
                    format!(
                        "limits.max_header_kb: {n} is out of range; use 1 to {MAX_HEADER_KB} (KiB)"
                    ),
                ));
            }
            // In range, so it fits any usize.
            server.max_header_bytes = (n * 1024) as usize;
        }
        if let Some(ms) = &file.limits.head_timeout_ms {
            server.header_read_timeout =
                Duration::from_millis(positive(ms, "limits.head_timeout_ms", &invalid)?);
        }

        let mut names = HashSet::new();
        let mut scripts = Vec::new();
        for s in &file.scripts {
            let name = s.name.get_ref().clone();
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(invalid(
                    s.name.span(),
                    format!("scripts.name: {name:?} is empty or used twice"),
                ));
            }
            if let Some(ms) = &s.limits.head_timeout_ms {
                return Err(invalid(
                    ms.span(),
                    "scripts.limits.head_timeout_ms: the head timeout is node-wide; set it in [limits]"
                        .into(),
                ));
            }
            if let Some(kb) = &s.limits.max_header_kb {
                return Err(invalid(
                    kb.span(),
                    "scripts.limits.max_header_kb: the header limit is node-wide; set it in [limits]"
                        .into(),
                ));
            }
            if let Some(mb) = &s.limits.max_body_mb {
                return Err(invalid(
                    mb.span(),
                    "scripts.limits.max_body_mb: the body limit is node-wide; set it in [limits]"
                        .into(),
                ));
            }
            let entry = base.join(s.entry.get_ref());
            if !entry.is_file() {
                return Err(invalid(
                    s.entry.span(),
                    format!("scripts.entry: {} does not exist", entry.display()),
                ));
            }
            scripts.push(ScriptConfig {
                name,
                entry,
                vars: s.vars.clone(),
                limits: merge_limits(&defaults, &s.limits, &|span, msg: String| {
                    invalid(span, format!("scripts.{msg}"))
                })?,
            });
        }

        let mut routes = Vec::new();
        for r in &file.routes {
            let raw = r.pattern.get_ref();
            let (host, prefix) = parse_route(raw)
                .map_err(|e| invalid(r.pattern.span(), format!("routes.pattern: {e}")))?;
            if routes
                .iter()
                .any(|x: &RouteConfig| x.host == host && x.path_prefix == prefix)
            {
                return Err(invalid(
                    r.pattern.span(),
                    format!("routes.pattern: {raw:?} is routed twice"),
                ));
            }
            if !names.contains(r.script.get_ref()) {
                return Err(invalid(
                    r.script.span(),
                    format!("routes.script: no script is named {:?}", r.script.get_ref()),
                ));
            }
            routes.push(RouteConfig {
                host,
                path_prefix: prefix,
                script: r.script.get_ref().clone(),
            });
        }

        Ok(NodeConfig {
            listen,
            certificates,
            admin,
            threads: file.node.threads,
            pool_per_thread: file.node.pool_per_thread,
            isolate_memory_bytes,
            outbound,
            server,
            default_limits: defaults,
            scripts,
            routes,
        })
    }
}

fn positive<E>(
    v: &Spanned<u64>,
    key: &str,
    invalid: &impl Fn(std::ops::Range<usize>, String) -> E,
) -> Result<u64, E> {
    if *v.get_ref() == 0 {
        return Err(invalid(v.span(), format!("{key}: must be greater than 0")));
    }
    Ok(*v.get_ref())
}

/// `v` as a count, if `min <= v <= MAX_CONCURRENCY`.
fn bounded<E>(
    v: &Spanned<u64>,
    key: &str,
    min: u64,
    invalid: &impl Fn(std::ops::Range<usize>, String) -> E,
) -> Result<usize, E> {
    let n = *v.get_ref();
    if !(min..=MAX_CONCURRENCY).contains(&n) {
        return Err(invalid(
            v.span(),
            format!("{key}: {n} is out of range; use {min} to {MAX_CONCURRENCY}"),
        ));
    }
    Ok(n as usize)
}

/// Smallest heap an isolate can boot the runtime's snapshot into.
const MIN_HEAP_MB: u64 = 16;
/// Largest heap one isolate may ask for.
const MAX_HEAP_MB: u64 = 4096;
/// Largest isolate memory budget of a node.
const MAX_ISOLATE_MEMORY_MB: u64 = 1024 * 1024;
/// Largest concurrency or queue limit of one isolate.
const MAX_CONCURRENCY: u64 = 100_000;
/// Largest request body limit.
const MAX_BODY_MB: u64 = 16 * 1024;

/// Largest request head `limits.max_header_kb` may allow, in KiB: hyper
/// buffers a whole head in memory per connection.
const MAX_HEADER_KB: u64 = 1024;

/// `v` MiB in bytes, if `min <= v <= max`.
fn mebibytes<E>(
    v: &Spanned<u64>,
    key: &str,
    min: u64,
    max: u64,
    invalid: &impl Fn(std::ops::Range<usize>, String) -> E,
) -> Result<usize, E> {
    let mb = *v.get_ref();
    if !(min..=max).contains(&mb) {
        return Err(invalid(
            v.span(),
            format!("{key}: {mb} is out of range; use {min} to {max} (MiB)"),
        ));
    }
    usize::try_from(mb * 1024 * 1024).map_err(|_| {
        invalid(
            v.span(),
            format!("{key}: {mb} MiB does not fit this machine"),
        )
    })
}

fn merge_limits<E>(
    base: &Limits,
    section: &LimitsSection,
    invalid: &impl Fn(std::ops::Range<usize>, String) -> E,
) -> Result<Limits, E> {
    let mut l = *base;
    if let Some(v) = &section.cpu_ms {
        l.cpu_per_request = Duration::from_millis(positive(v, "limits.cpu_ms", invalid)?);
    }
    if let Some(v) = &section.wall_ms {
        l.wall_per_request = Duration::from_millis(positive(v, "limits.wall_ms", invalid)?);
    }
    if let Some(v) = &section.heap_mb {
        l.heap_bytes = mebibytes(v, "limits.heap_mb", MIN_HEAP_MB, MAX_HEAP_MB, invalid)?;
    }
    if let Some(v) = &section.max_concurrent {
        l.max_concurrent = bounded(v, "limits.max_concurrent", 1, invalid)?;
    }
    if let Some(v) = &section.max_queued {
        l.max_queued = bounded(v, "limits.max_queued", 0, invalid)?;
    }
    if let Some(v) = &section.subrequests {
        l.fetch.subrequests = bounded(v, "limits.subrequests", 0, invalid)?;
    }
    if let Some(v) = &section.fetch_concurrency {
        l.fetch.concurrent = bounded(v, "limits.fetch_concurrency", 1, invalid)?;
    }
    if let Some(v) = &section.fetch_response_mb {
        l.fetch.response_bytes =
            mebibytes(v, "limits.fetch_response_mb", 1, MAX_BODY_MB, invalid)? as u64;
    }
    Ok(l)
}

/// The dotted key (`limits.cpu_ms`) whose value sits at `offset`, found
/// from the `key =` on that line and the nearest `[table]` header above.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = std::env::temp_dir();
        std::fs::write(dir.join("atoll-config-test-entry.js"), "export default {}").expect("write");
        NodeConfig::parse(text, Path::new("node.toml"), &dir)
    }

    #[test]
    fn a_full_config_validates_and_merges_limits() {
        let c = parse(
            r#"
[node]
threads = 2
isolate_memory_mb = 256

[[listen]]
addr = "127.0.0.1:8080"

[limits]
cpu_ms = 20
max_body_mb = 5
max_header_kb = 16
max_concurrent = 8

[[scripts]]
name = "api"
entry = "atoll-config-test-entry.js"
vars = { GREETING = "hi" }
limits = { cpu_ms = 100, heap_mb = 64, max_queued = 0 }

[[routes]]
pattern = "*.example.com/api"
script = "api"
"#,
        )
        .expect("valid");
        assert_eq!(c.threads, Some(2));
        assert_eq!(c.server.max_body_bytes, 5 * 1024 * 1024);
        assert_eq!(c.server.max_header_bytes, 16 * 1024);
        let s = &c.scripts[0];
        assert_eq!(s.limits.cpu_per_request, Duration::from_millis(100));
        assert_eq!(s.limits.heap_bytes, 64 * 1024 * 1024);
        assert_eq!((s.limits.max_concurrent, s.limits.max_queued), (8, 0));
        assert_eq!(c.isolate_memory_bytes, Some(256 * 1024 * 1024));
        assert_eq!(s.vars["GREETING"], "hi");
        assert_eq!(
            c.routes[0].host,
            HostPattern::Wildcard("example.com".into())
        );
        assert_eq!(c.routes[0].path_prefix, "/api");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let cases = [
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[limits]\ncpu_ms = \"fast\"\n",
                4,
                "limits.cpu_ms: invalid type",
            ),
            ("[[listen]]\naddr = \"nope\"\n", 2, "listen.addr"),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\nbogus = 1\n",
                3,
                "unknown field `bogus`",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[[routes]]\npattern = \"a.test\"\nscript = \"missing\"\n",
                5,
                "routes.script",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[[scripts]]\nname = \"a\"\nentry = \"nowhere.js\"\n",
                5,
                "scripts.entry",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[limits]\nheap_mb = 0\n",
                4,
                "limits.heap_mb",
            ),
            ("[node]\nthreads = 1\n", 1, "at least one [[listen]]"),
            (
                "[node]\nisolate_memory_mb = 0\n[[listen]]\naddr = \"127.0.0.1:1\"\n",
                2,
                "node.isolate_memory_mb",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[outbound]\nallow = [\"127.0.0.1\",\n  \"*.corp\"]\n",
                5,
                "outbound.allow",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[outbound]\nnameservers = [\"dns.example\"]\n",
                4,
                "outbound.nameservers",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[limits]\nmax_header_kb = 0\n",
                4,
                "limits.max_header_kb: 0 is out of range",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[[scripts]]\nname = \"a\"\nentry = \"x.js\"\nlimits = { max_header_kb = 8 }\n",
                6,
                "node-wide",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[limits]\nmax_concurrent = 0\n",
                4,
                "limits.max_concurrent",
            ),
            (
                "[[listen]]\naddr = \"127.0.0.1:1\"\n[[routes]]\npattern = \"a.*.b\"\nscript = \"x\"\n",
                4,
                "routes.pattern",
            ),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.starts_with(&format!("node.toml:{line}:")), "{e}");
            assert!(e.contains(needle), "{e}");
        }
    }
}
