//! The JavaScript API every Atoll handler sees.
//!
//! `js/bootstrap.js` builds the global scope from Deno's web extensions and
//! the module-worker / service-worker dispatch; the ops in [`bridge`] carry
//! requests in and responses out. The whole extension is evaluated once into
//! the runtime's startup snapshot.

pub mod bridge;
mod header_list;
mod ops;

pub use bridge::{
    BodyChunks, ChunkSource, FailureKind, FetchLimits, HandlerError, HandlerResult, HostBridge,
    HostHandle, IncomingRequest, LogLine, LogSink, OutgoingBody, OutgoingResponse, RequestBody,
    RequestId, Responder, Stage, StartGate,
};

deno_core::extension!(
    atoll_api,
    deps = [deno_webidl, deno_web, deno_crypto, deno_fetch],
    ops = [
        ops::op_atoll_next_request,
        ops::op_atoll_request_body,
        ops::op_atoll_request_headers,
        ops::op_atoll_common_request_headers,
        ops::op_atoll_respond,
        ops::op_atoll_respond_text,
        ops::op_atoll_respond_text_typed,
        ops::op_atoll_respond_stream,
        ops::op_atoll_respond_resource,
        ops::op_atoll_body_try_write,
        ops::op_atoll_body_write,
        ops::op_atoll_body_try_close,
        ops::op_atoll_body_close,
        ops::op_atoll_respond_error,
        ops::op_atoll_request_done,
        ops::op_atoll_log,
        ops::op_atoll_boot_done,
        ops::op_atoll_fetch_begin,
        ops::op_atoll_fetch_end,
        ops::op_atoll_fetch_response_limit,
    ],
    esm_entry_point = "ext:atoll_api/bootstrap.js",
    esm = [dir "js", "bootstrap.js"],
    lazy_loaded_esm = [dir "js", "fast_calls.js"],
    docs = "Atoll's handler API: global scope, fetch dispatch and host bridge ops.",
);

// deno_fetch loads `ext:deno_net/02_tls.js` for `Deno.createHttpClient`;
// this stand-in refuses instead of pulling in Deno's socket extension.
deno_core::extension!(
    deno_net,
    lazy_loaded_js = [dir "js/deno_net", "02_tls.js"],
    docs = "Stand-in for Deno's deno_net: no custom TLS clients.",
);
