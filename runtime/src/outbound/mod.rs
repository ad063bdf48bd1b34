//! Outbound `fetch()` from handlers: one node-wide HTTP client whose DNS
//! goes through hickory and whose every connection is checked against the
//! address policy, plus the permissions isolates run with.

mod policy;
mod resolver;

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use deno_error::JsErrorBox;
use deno_permissions::{
    Permissions, PermissionsContainer, PermissionsOptions, RuntimePermissionDescriptorParser,
};

pub use policy::{Allowance, BadAllowance, Blocked, classify};

/// How handlers reach the network.
#[derive(Debug, Clone, Default)]
pub struct OutboundConfig {
    /// Private hosts and networks handlers may reach anyway (for development).
    pub allow: Allowance,
    /// DNS servers to ask; empty means those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

/// The outbound client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The system's resolver configuration is unusable.
    #[error(
        "cannot read the DNS configuration (/etc/resolv.conf): {0}; set nameservers in the node config"
    )]
    Dns(String),
    /// The HTTP client could not be built.
    #[error("cannot create the outbound HTTP client: {0}")]
    Client(String),
}

/// The node-wide client handlers' `fetch()` uses, shared by every isolate
/// so connections are pooled across tenants.
pub(crate) fn client(config: &OutboundConfig) -> Result<deno_fetch::Client, OutboundError> {
    let resolver = resolver::GuardedResolver::new(config)?;
    deno_fetch::create_http_client(
        concat!("Atoll/", env!("CARGO_PKG_VERSION")),
        deno_fetch::CreateHttpClientOptions {
            dns_resolver: deno_fetch::dns::Resolver::custom(Arc::new(resolver)),
            // Web PKI roots (deno_tls' default when none are given).
            root_cert_store: None,
            ..Default::default()
        },
    )
    .map_err(|e| OutboundError::Client(e.to_string()))
}

thread_local! {
    /// The allowance of the runtime whose worker runs on this thread; read
    /// by [`check_request`], which deno_fetch calls without any context.
    static ALLOWANCE: RefCell<Arc<Allowance>> = RefCell::new(Arc::new(Allowance::default()));
}

/// Installs `allowance` for the isolates on the calling worker thread.
pub(crate) fn install_on_thread(allowance: Arc<Allowance>) {
    ALLOWANCE.with(|a| *a.borrow_mut() = allowance);
}

/// Runs on every request deno_fetch is about to send (each redirect hop
/// too). Names are checked when they resolve; an IP literal never reaches
/// the resolver, so it is checked here.
pub(crate) fn check_request(
    request: &mut http::Request<deno_fetch::ReqBody>,
) -> Result<(), JsErrorBox> {
    let uri = request.uri();
    let Some(host) = uri.host() else {
        return Err(JsErrorBox::type_error("fetch() needs a URL with a host"));
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        ALLOWANCE
            .with(|a| a.borrow().check(None, ip))
            .map_err(|blocked| JsErrorBox::type_error(refusal(host, ip, blocked)))?;
    }
    Ok(())
}

/// The message a refused fetch rejects with.
pub(crate) fn refusal(host: &str, ip: IpAddr, blocked: Blocked) -> String {
    let target = if host.trim_matches(['[', ']']) == ip.to_string() {
        format!("{ip}")
    } else {
        format!("{host} ({ip})")
    };
    format!(
        "fetch() to {target} was refused: it is {}, which workers may not reach",
        blocked.describe()
    )
}

/// Permissions of every isolate: network through `fetch()` only (the
/// client above guards it), no files, environment, subprocesses or FFI.
pub(crate) fn isolate_permissions() -> PermissionsContainer {
    let parser = Arc::new(RuntimePermissionDescriptorParser::new(
        sys_traits::impls::RealSys,
    ));
    let permissions = Permissions::from_options(
        parser.as_ref(),
        &PermissionsOptions {
            allow_net: Some(Vec::new()),
            prompt: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|_| Permissions::none_without_prompt());
    PermissionsContainer::new(parser, permissions)
}
