//! Which deployment serves which host.

use std::collections::HashMap;
use std::sync::Arc;

use atoll_runtime::Deployment;

/// Host → deployment table, swapped as a whole when anything changes.
#[derive(Default, Clone)]
pub struct Routes {
    by_host: HashMap<String, Arc<Deployment>>,
    fallback: Option<Arc<Deployment>>,
}

impl Routes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `host` (exact, case-insensitive, without port) from `deployment`.
    pub fn insert_host(&mut self, host: &str, deployment: Arc<Deployment>) {
        self.by_host.insert(host.to_ascii_lowercase(), deployment);
    }

    /// Serves every host that has no route of its own from `deployment`.
    pub fn set_fallback(&mut self, deployment: Arc<Deployment>) {
        self.fallback = Some(deployment);
    }

    /// The deployment for a request to `host` (which may carry a port).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Deployment>> {
        let name = strip_port(host).to_ascii_lowercase();
        self.by_host.get(&name).or(self.fallback.as_ref())
    }

    /// Every deployment routed to.
    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.by_host.values().chain(self.fallback.iter())
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn strips_ports_from_names_and_ipv6() {
        assert_eq!(strip_port("a.example.com:8787"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("127.0.0.1:1"), "127.0.0.1");
    }
}
