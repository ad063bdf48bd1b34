//! DNS for handlers' fetches: hickory with its cache, and the address
//! policy applied to every answer, so a name that points into a private
//! network (DNS rebinding included) is refused at the address the
//! connection would actually use.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use deno_fetch::dns::{Resolve, Resolving};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hyper_util::client::legacy::connect::dns::Name;

use super::{Allowance, OutboundConfig, OutboundError, refusal};

/// Resolves with hickory, then drops addresses the policy refuses.
#[derive(Debug)]
pub(crate) struct GuardedResolver {
    dns: TokioResolver,
    allowance: Arc<Allowance>,
}

impl GuardedResolver {
    pub(crate) fn new(config: &OutboundConfig) -> Result<GuardedResolver, OutboundError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| OutboundError::Dns(e.to_string()))?
        } else {
            let servers: Vec<NameServerConfig> = config
                .nameservers
                .iter()
                .flat_map(|addr| {
                    [
                        NameServerConfig::new(*addr, Protocol::Udp),
                        NameServerConfig::new(*addr, Protocol::Tcp),
                    ]
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioConnectionProvider::default(),
            )
        };
        builder.options_mut().cache_size = 4096;
        Ok(GuardedResolver {
            dns: builder.build(),
            allowance: Arc::new(config.allow.clone()),
        })
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let dns = self.dns.clone();
        let allowance = self.allowance.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let answer = dns.lookup_ip(host.as_str()).await.map_err(|e| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("could not resolve {host}: {e}"),
                )
            })?;
            let mut allowed = Vec::new();
            let mut refused = None;
            for ip in answer.iter() {
                match allowance.check(Some(&host), ip) {
                    Ok(()) => allowed.push(SocketAddr::new(ip, 0)),
                    Err(blocked) => refused = Some((ip, blocked)),
                }
            }
            if allowed.is_empty() {
                return Err(match refused {
                    Some((ip, blocked)) => {
                        io::Error::new(io::ErrorKind::PermissionDenied, refusal(&host, ip, blocked))
                    }
                    None => {
                        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no addresses"))
                    }
                });
            }
            Ok(allowed.into_iter())
        })
    }
}
