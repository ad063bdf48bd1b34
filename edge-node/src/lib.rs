//! Atoll's edge node: the HTTP server in front of the isolate runtime.
//!
//! Accepts HTTP/1.1 and HTTP/2 connections, maps each request's host and path to a
//! tenant deployment, streams bodies both ways between hyper and the
//! runtime, and logs one line per request. Routes can be replaced while
//! the node runs; requests in flight keep the deployment they started with.

mod admin;
mod body;
mod config;
mod drain;
mod head_deadline;
mod linger;
mod metrics;
mod routes;
mod server;
mod tls;

pub use admin::serve_admin;
pub use body::ResponseBody;
pub use config::{ConfigError, ListenConfig, NodeConfig, RouteConfig, ScriptConfig};
pub use metrics::Metrics;
pub use routes::{HostPattern, RouteError, Routes, parse_route};
pub use server::{EdgeNode, Handling, ServerLimits};
pub use tls::{CertSpec, TlsError, acceptor as tls_acceptor, self_signed};
