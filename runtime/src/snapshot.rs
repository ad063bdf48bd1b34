//! The startup snapshot built by `build.rs`, embedded in the binary.

/// V8 startup snapshot holding the Web APIs and Atoll's handler API.
pub static SNAPSHOT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ATOLL_SNAPSHOT.bin"));

// `RESIDUAL_LAZY_JS` / `RESIDUAL_LAZY_ESM`: lazily loaded extension sources
// that the snapshot does not already contain.
include!(concat!(env!("OUT_DIR"), "/residual_sources.rs"));
