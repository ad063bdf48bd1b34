//! End-to-end tests: real `atoll` processes, real HTTP clients.

mod harness;

mod dev_handlers;
mod dev_http;
mod dev_isolation;
mod dev_limits;
mod dev_reload;
mod dev_streaming;
mod node_config;
mod node_lifecycle;
mod node_outbound;
