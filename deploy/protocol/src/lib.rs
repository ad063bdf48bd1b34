//! Atoll's wire formats: the code bundle every node runs.
//!
//! A bundle is the already-transpiled module graph of one script. It is
//! immutable and content-addressed: its id is the SHA-256 of its canonical
//! encoding, so a node can verify what it was given before running it.

mod bundle;

pub use bundle::{Bundle, BundleError, Module, ModuleKind};
