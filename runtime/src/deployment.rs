//! What a tenant runs: a bundle plus its vars and limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use atoll_protocol::Bundle;
use sha2::{Digest, Sha256};

use crate::limits::Limits;

/// One deployed version of a tenant's script. Immutable: a new version, new
/// vars or new limits make a new `Deployment`, which gets a fresh isolate.
#[derive(Debug)]
pub struct Deployment {
    /// Tenant (script) name.
    pub tenant: String,
    /// Identifies this exact bundle + vars + limits.
    pub version: String,
    /// The code.
    pub bundle: Arc<Bundle>,
    /// Plain-text bindings handed to the handler as `env`.
    pub vars: BTreeMap<String, String>,
    /// Limits for this tenant.
    pub limits: Limits,
    /// Creation order within this process; newer deployments win.
    pub(crate) generation: u64,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Deployment {
    /// A deployment of `bundle` for `tenant`; its version is derived from the content.
    pub fn new(
        tenant: impl Into<String>,
        bundle: Arc<Bundle>,
        vars: BTreeMap<String, String>,
        limits: Limits,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(bundle.id().as_bytes());
        for (k, v) in &vars {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        h.update(format!("{limits:?}").as_bytes());
        let digest = h.finalize();
        Deployment {
            tenant: tenant.into(),
            version: hex::encode(&digest[..8]),
            bundle,
            vars,
            limits,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The `env` object as JSON.
    pub(crate) fn env_json(&self) -> String {
        serde_json::to_string(&self.vars).unwrap_or_else(|_| "{}".into())
    }
}
