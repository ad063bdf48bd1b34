//! Which deployment serves which host and path.
//!
//! A route is a host pattern (exact `api.example.com`, wildcard
//! `*.example.com`, or any host) plus a path prefix. The most specific
//! matching route wins: an exact host beats a wildcard, a longer wildcard
//! suffix beats a shorter one, any wildcard beats "any host"; between equal
//! hosts the longest path prefix wins.

use std::collections::HashMap;
use std::sync::Arc;

use atoll_runtime::Deployment;

/// Which hosts a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this host name (lowercase, no port).
    Exact(String),
    /// Any host ending in `.{suffix}` (not `suffix` itself), from `*.suffix`.
    Wildcard(String),
    /// Every host.
    Any,
}

impl HostPattern {
    /// Parses `name`, `*.suffix` or `*`.
    pub fn parse(pattern: &str) -> Result<HostPattern, RouteError> {
        let p = pattern.trim().to_ascii_lowercase();
        if p == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = p.strip_prefix("*.") {
            if suffix.is_empty()
                || suffix.contains(['*', '/', ':'])
                || suffix.ends_with('.')
                || !suffix.is_ascii()
            {
                return Err(RouteError::BadHost(pattern.to_string()));
            }
            return Ok(HostPattern::Wildcard(suffix.to_string()));
        }
        // A port, a trailing dot or a non-ASCII name could never match:
        // lookups strip ports and trailing dots, and hosts arrive as punycode.
        if p.is_empty() || p.contains(['*', '/', ':']) || p.ends_with('.') || !p.is_ascii() {
            return Err(RouteError::BadHost(pattern.to_string()));
        }
        Ok(HostPattern::Exact(p))
    }

    /// Whether `host` (lowercase, no port) matches.
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            HostPattern::Any => true,
        }
    }

    /// Higher is more specific.
    pub(crate) fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(_) => (2, 0),
            HostPattern::Wildcard(suffix) => (1, suffix.len()),
            HostPattern::Any => (0, 0),
        }
    }
}

/// A route that cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The host pattern is not `name`, `*.suffix` or `*`.
    #[error(
        "invalid host pattern {0:?}: use a name, *.suffix or * (ASCII, without port or trailing dot)"
    )]
    BadHost(String),
    /// The path prefix does not start with `/`.
    #[error("invalid path prefix {0:?}: it must start with /")]
    BadPath(String),
}

/// Parses a route as written in configs and on the command line:
/// `host`, `*.suffix` or `*`, optionally followed by a path prefix
/// (`api.example.com/v2`). Returns the host pattern and the normalized prefix.
pub fn parse_route(raw: &str) -> Result<(HostPattern, String), RouteError> {
    let (host, prefix) = match raw.find('/') {
        Some(i) => (&raw[..i], &raw[i..]),
        None => (raw, "/"),
    };
    Ok((HostPattern::parse(host)?, normalize_prefix(prefix)))
}

/// `/api/` → `/api`; `` or `/` → `/`.
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() { "/" } else { trimmed }.to_string()
}

#[derive(Clone)]
struct Route {
    /// Starts with `/`, no trailing `/` except for the root prefix itself.
    path_prefix: String,
    deployment: Arc<Deployment>,
}

/// The routes of one host pattern, longest path prefix first: the first
/// whose prefix matches a path is the most specific.
#[derive(Default, Clone)]
struct ByPrefix(Vec<Route>);

impl ByPrefix {
    /// Adds `route`, replacing one with the same prefix.
    fn add(&mut self, route: Route) {
        self.0.retain(|r| r.path_prefix != route.path_prefix);
        let at = self
            .0
            .partition_point(|r| r.path_prefix.len() >= route.path_prefix.len());
        self.0.insert(at, route);
    }

    fn lookup(&self, path: &str) -> Option<&Arc<Deployment>> {
        self.0
            .iter()
            .find(|r| prefix_matches(&r.path_prefix, path))
            .map(|r| &r.deployment)
    }
}

/// The route table, swapped as a whole when anything changes. Indexed by
/// host, so a lookup costs the same with ten routes or ten thousand: one
/// probe for the exact host, one per label of the host for wildcards.
#[derive(Default, Clone)]
pub struct Routes {
    /// By host name.
    exact: HashMap<String, ByPrefix>,
    /// By the suffix after `*.`.
    wildcard: HashMap<String, ByPrefix>,
    any: ByPrefix,
}

impl Routes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes requests matching `host` and `path_prefix` to `deployment`.
    /// A later route with the same host and prefix replaces the earlier one.
    pub fn add(
        &mut self,
        host: HostPattern,
        path_prefix: &str,
        deployment: Arc<Deployment>,
    ) -> Result<(), RouteError> {
        if !path_prefix.starts_with('/') {
            return Err(RouteError::BadPath(path_prefix.to_string()));
        }
        let routes = match host {
            HostPattern::Exact(h) => self.exact.entry(h).or_default(),
            HostPattern::Wildcard(suffix) => self.wildcard.entry(suffix).or_default(),
            HostPattern::Any => &mut self.any,
        };
        routes.add(Route {
            path_prefix: normalize_prefix(path_prefix),
            deployment,
        });
        Ok(())
    }

    /// The deployment for a request to `host` (which may carry a port) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Deployment>> {
        let host = lowercase(strip_port(host));
        let host = host.trim_end_matches('.');
        let path = path.split(['?', '#']).next().unwrap_or("/");
        self.lookup_plain(host, path)
    }

    /// [`Routes::lookup`] for a host already in the form it normalizes to
    /// (lowercase, no port, no trailing dot) and a path without query.
    pub fn lookup_plain(&self, host: &str, path: &str) -> Option<&Arc<Deployment>> {
        // From the most specific pattern down: the exact host, then
        // wildcards by longest suffix, then any host. Within a pattern, the
        // longest matching prefix.
        self.host_patterns(host)
            .find_map(|routes| routes.lookup(path))
    }

    /// The deployments of the most specific host pattern matching `host`,
    /// whatever the path: what a request to `host` will most likely need.
    pub fn for_host(&self, host: &str) -> Vec<Arc<Deployment>> {
        let host = lowercase(strip_port(host));
        let host = host.trim_end_matches('.');
        let Some(best) = self.host_patterns(host).find(|r| !r.0.is_empty()) else {
            return Vec::new();
        };
        let mut out: Vec<Arc<Deployment>> = Vec::new();
        for r in &best.0 {
            if !out.iter().any(|d| Arc::ptr_eq(d, &r.deployment)) {
                out.push(r.deployment.clone());
            }
        }
        out
    }

    /// The route lists whose host pattern matches `host` (lowercase, no
    /// port), most specific first.
    fn host_patterns<'s, 'h>(
        &'s self,
        host: &'h str,
    ) -> impl Iterator<Item = &'s ByPrefix> + use<'s, 'h> {
        // `*.suffix` matches hosts with at least one label before `.suffix`:
        // the suffixes after each dot not at the very start, longest first.
        // Found by a byte scan (`match_indices` costs several times more),
        // skipped when there are no wildcard routes.
        let wildcards = (!self.wildcard.is_empty())
            .then(|| {
                host.bytes()
                    .enumerate()
                    .filter(|&(i, b)| b == b'.' && i > 0)
                    .filter_map(|(i, _)| self.wildcard.get(&host[i + 1..]))
            })
            .into_iter()
            .flatten();
        self.exact
            .get(host)
            .into_iter()
            .chain(wildcards)
            .chain(std::iter::once(&self.any))
    }

    /// Every deployment routed to.
    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .chain(std::iter::once(&self.any))
            .flat_map(|r| r.0.iter().map(|r| &r.deployment))
    }
}

/// `host` in ASCII lowercase, copied only if it has capitals (clients
/// almost always send it lowercase already).
fn lowercase(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase().into()
    } else {
        host.into()
    }
}

/// `/api` matches `/api` and `/api/x`, not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    // A byte search: the char-aware rsplit costs more on this hot path.
    match host.bytes().rposition(|b| b == b':') {
        Some(i) if host.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use atoll_protocol::{Bundle, Module, ModuleKind};
    use atoll_runtime::Limits;

    use super::*;

    fn dep(name: &str) -> Arc<Deployment> {
        let mut modules = BTreeMap::new();
        modules.insert(
            "file:///w.js".to_string(),
            Module {
                kind: ModuleKind::Js,
                code: String::new(),
                source_map: None,
            },
        );
        let bundle = Bundle::new("file:///w.js".into(), modules).expect("bundle");
        Arc::new(Deployment::new(
            name,
            Arc::new(bundle),
            BTreeMap::new(),
            Limits::default(),
        ))
    }

    fn who(routes: &Routes, host: &str, path: &str) -> Option<String> {
        routes.lookup(host, path).map(|d| d.tenant.clone())
    }

    #[test]
    fn strips_ports_from_names_and_ipv6() {
        assert_eq!(strip_port("a.example.com:8787"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
    }

    #[test]
    fn most_specific_route_wins() {
        let mut r = Routes::new();
        r.add(HostPattern::Any, "/", dep("any")).expect("route");
        r.add(
            HostPattern::parse("*.example.com").expect("pattern"),
            "/",
            dep("wild"),
        )
        .expect("route");
        r.add(
            HostPattern::parse("*.eu.example.com").expect("pattern"),
            "/",
            dep("eu"),
        )
        .expect("route");
        r.add(
            HostPattern::parse("api.example.com").expect("pattern"),
            "/",
            dep("api"),
        )
        .expect("route");
        r.add(
            HostPattern::parse("api.example.com").expect("pattern"),
            "/v2/",
            dep("api-v2"),
        )
        .expect("route");
        r.add(
            HostPattern::parse("*.example.com").expect("pattern"),
            "/static",
            dep("static"),
        )
        .expect("route");

        assert_eq!(who(&r, "api.example.com", "/").as_deref(), Some("api"));
        assert_eq!(
            who(&r, "API.Example.com:443", "/v2").as_deref(),
            Some("api-v2")
        );
        assert_eq!(
            who(&r, "api.example.com", "/v2/users?x=1").as_deref(),
            Some("api-v2")
        );
        assert_eq!(who(&r, "api.example.com", "/v2x").as_deref(), Some("api"));
        // An exact host beats a wildcard even with a longer wildcard path.
        assert_eq!(
            who(&r, "api.example.com", "/static/a.css").as_deref(),
            Some("api")
        );
        assert_eq!(
            who(&r, "www.example.com", "/static/a.css").as_deref(),
            Some("static")
        );
        assert_eq!(who(&r, "www.example.com", "/").as_deref(), Some("wild"));
        assert_eq!(who(&r, "a.eu.example.com", "/").as_deref(), Some("eu"));
        // `*.example.com` does not match the apex.
        assert_eq!(who(&r, "example.com", "/").as_deref(), Some("any"));
        assert_eq!(who(&r, "other.org", "/x").as_deref(), Some("any"));

        // Warming by SNI picks the scripts of the most specific host, any path.
        let warm = |host: &str| -> Vec<String> {
            let mut t: Vec<_> = r.for_host(host).iter().map(|d| d.tenant.clone()).collect();
            t.sort();
            t
        };
        assert_eq!(warm("api.example.com"), ["api", "api-v2"]);
        assert_eq!(warm("www.example.com"), ["static", "wild"]);
        assert_eq!(warm("a.eu.example.com"), ["eu"]);
        assert_eq!(warm("other.org"), ["any"]);
        assert!(Routes::new().for_host("api.example.com").is_empty());
    }

    /// What the indexed lookup must answer: of all routes whose host
    /// pattern and path prefix match, the one with the most specific host,
    /// then the longest prefix.
    fn lookup_by_scan(
        routes: &[(HostPattern, &str, String)],
        host: &str,
        path: &str,
    ) -> Option<String> {
        let host = strip_port(host).to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let path = path.split(['?', '#']).next().unwrap_or("/");
        routes
            .iter()
            .map(|(h, p, t)| (h, normalize_prefix(p), t))
            .filter(|(h, p, _)| h.matches(host) && prefix_matches(p, path))
            .max_by_key(|(h, p, _)| (h.rank(), p.len()))
            .map(|(_, _, t)| t.clone())
    }

    #[test]
    fn indexed_lookup_agrees_with_a_scan_of_every_route() {
        let patterns = [
            "*",
            "a.test",
            "b.a.test",
            "*.a.test",
            "*.b.a.test",
            "*.test",
            "x.b.a.test",
            "*.example.com",
            "api.example.com",
            "*.eu.example.com",
        ];
        let prefixes = ["/", "/v2", "/v2/deep", "/static"];
        let mut table = Vec::new();
        let mut r = Routes::new();
        // Every other (pattern, prefix) pair, so some hosts lack some prefixes.
        for (i, pattern) in patterns.iter().enumerate() {
            for (j, prefix) in prefixes.iter().enumerate() {
                if (i + j) % 2 == 1 {
                    continue;
                }
                let tenant = format!("{pattern}{prefix}");
                let host = HostPattern::parse(pattern).expect("pattern");
                r.add(host.clone(), prefix, dep(&tenant)).expect("route");
                table.push((host, *prefix, tenant));
            }
        }
        let hosts = [
            "a.test",
            "b.a.test",
            "x.b.a.test",
            "y.x.b.a.test",
            "c.a.test",
            "test",
            "z.test",
            ".a.test",
            "a..test",
            "A.TEST.",
            "a.test:8080",
            "api.example.com",
            "w.eu.example.com",
            "eu.example.com",
            "example.com",
            "other.org",
            "localhost",
        ];
        let paths = [
            "/",
            "/v2",
            "/v2/",
            "/v2/deep/x",
            "/v2x",
            "/static/a.css",
            "/other?q=1",
        ];
        for host in hosts {
            for path in paths {
                assert_eq!(
                    who(&r, host, path),
                    lookup_by_scan(&table, host, path),
                    "{host}{path}"
                );
            }
        }
    }

    #[test]
    fn a_later_route_replaces_one_with_the_same_host_and_prefix() {
        let mut r = Routes::new();
        let host = HostPattern::parse("a.test").expect("pattern");
        r.add(host.clone(), "/v2/", dep("old")).expect("route");
        r.add(host.clone(), "/", dep("root")).expect("route");
        r.add(host, "/v2", dep("new")).expect("route");
        assert_eq!(who(&r, "a.test", "/v2/x").as_deref(), Some("new"));
        assert_eq!(who(&r, "a.test", "/x").as_deref(), Some("root"));
        assert_eq!(r.deployments().count(), 2);
    }

    #[test]
    fn unmatched_and_invalid_routes() {
        let mut r = Routes::new();
        r.add(
            HostPattern::parse("a.test").expect("pattern"),
            "/only",
            dep("a"),
        )
        .expect("route");
        assert_eq!(who(&r, "a.test", "/"), None);
        assert_eq!(who(&r, "b.test", "/only"), None);
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("").is_err());
        assert!(HostPattern::parse("a.test:8080").is_err());
        assert!(HostPattern::parse("a.test.").is_err());
        assert!(HostPattern::parse("*.bücher.test").is_err());
        assert_eq!(
            parse_route("API.test/v2/").expect("route"),
            (HostPattern::Exact("api.test".into()), "/v2".to_string())
        );
        assert!(r.add(HostPattern::Any, "nope", dep("x")).is_err());
    }
}
