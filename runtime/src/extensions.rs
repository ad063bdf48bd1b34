//! The extension list every isolate is built from.
//!
//! Shared verbatim by `build.rs` (which evaluates it into the snapshot) and
//! the runtime (which boots isolates from that snapshot): the two lists must
//! be identical, op for op, or the snapshot does not match.

use std::sync::Arc;

/// Checks each outgoing fetch request before it is sent.
pub type RequestCheck =
    fn(&mut http::Request<deno_fetch::ReqBody>) -> Result<(), deno_error::JsErrorBox>;

/// Deno's web platform extensions plus Atoll's handler API, in dependency order.
pub fn extensions(check_fetch: Option<RequestCheck>) -> Vec<deno_core::Extension> {
    vec![
        deno_webidl::deno_webidl::init(),
        deno_web::deno_web::init(
            Arc::new(deno_web::BlobStore::default()),
            None,
            false,
            deno_web::InMemoryBroadcastChannel::default(),
        ),
        deno_crypto::deno_crypto::init(None),
        deno_fetch::deno_fetch::init(deno_fetch::Options {
            user_agent: concat!("Atoll/", env!("CARGO_PKG_VERSION")).to_string(),
            request_builder_hook: check_fetch,
            ..Default::default()
        }),
        atoll_js_api::deno_net::init(),
        atoll_js_api::atoll_api::init(),
    ]
}
