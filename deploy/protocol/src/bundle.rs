//! The bundle format: module graph, transpiled code, source maps, content hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bundle format version; bump on any incompatible change.
const FORMAT_VERSION: u32 = 1;
/// Upper bound on a bundle's encoded size, checked before parsing.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

/// What a module's code is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    /// An ES module (JavaScript, or TypeScript already stripped of types).
    Js,
    /// A JSON module (`import data from "./x.json" with { type: "json" }`).
    Json,
}

/// One module of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    /// JS or JSON.
    pub kind: ModuleKind,
    /// Code as it will be evaluated.
    pub code: String,
    /// Source map from `code` back to the original source, if transpiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_map: Option<String>,
}

/// An immutable, content-addressed module graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Format version.
    pub version: u32,
    /// Specifier of the entry module; a key of `modules`.
    pub entry: String,
    /// Every module of the graph by its absolute specifier
    /// (`file:///…` as seen by the handler).
    pub modules: BTreeMap<String, Module>,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("bundle is {0} bytes; the limit is {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// Not a bundle at all.
    #[error("bundle is malformed: {0}")]
    Malformed(String),
    /// A version this node does not understand.
    #[error(
        "bundle format version {0} is not supported (this node reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    /// The entry module is missing.
    #[error("bundle entry {0:?} is not one of its modules")]
    MissingEntry(String),
    /// The content does not match the id it was announced with.
    #[error("bundle hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// The id it was announced with.
        expected: String,
        /// The id of the bytes received.
        actual: String,
    },
}

impl Bundle {
    /// A bundle of `modules` whose entry is `entry`.
    pub fn new(entry: String, modules: BTreeMap<String, Module>) -> Result<Self, BundleError> {
        let bundle = Bundle {
            version: FORMAT_VERSION,
            entry,
            modules,
        };
        bundle.validate()?;
        Ok(bundle)
    }

    fn validate(&self) -> Result<(), BundleError> {
        if self.version != FORMAT_VERSION {
            return Err(BundleError::Version(self.version));
        }
        if !self.modules.contains_key(&self.entry) {
            return Err(BundleError::MissingEntry(self.entry.clone()));
        }
        Ok(())
    }

    /// Canonical encoding (JSON with sorted module keys).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates an encoded bundle.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(bytes.len()));
        }
        let bundle: Bundle =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        bundle.validate()?;
        Ok(bundle)
    }

    /// Parses an encoded bundle and checks it against the id it was announced with.
    pub fn decode_verified(bytes: &[u8], expected_id: &str) -> Result<Self, BundleError> {
        let actual = content_id(bytes);
        if actual != expected_id {
            return Err(BundleError::HashMismatch {
                expected: expected_id.to_string(),
                actual,
            });
        }
        Self::decode(bytes)
    }

    /// The bundle's content id: hex SHA-256 of its canonical encoding.
    pub fn id(&self) -> String {
        content_id(&self.encode())
    }
}

fn content_id(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        let mut modules = BTreeMap::new();
        modules.insert(
            "file:///main.js".to_string(),
            Module {
                kind: ModuleKind::Js,
                code: "export default {}".into(),
                source_map: None,
            },
        );
        Bundle::new("file:///main.js".into(), modules).expect("valid bundle")
    }

    #[test]
    fn round_trips_and_verifies_its_id() {
        let b = sample();
        let bytes = b.encode();
        let back = Bundle::decode_verified(&bytes, &b.id()).expect("verifies");
        assert_eq!(back, b);
    }

    #[test]
    fn refuses_tampered_bytes() {
        let b = sample();
        let id = b.id();
        let tampered = String::from_utf8(b.encode())
            .expect("utf8")
            .replace("export default {}", "export default {x}");
        let err = Bundle::decode_verified(tampered.as_bytes(), &id).expect_err("must refuse");
        assert!(matches!(err, BundleError::HashMismatch { .. }));
    }

    #[test]
    fn refuses_missing_entry_and_garbage() {
        let err = Bundle::new("file:///nope.js".into(), BTreeMap::new()).expect_err("no entry");
        assert!(err.to_string().contains("nope.js"));
        assert!(matches!(
            Bundle::decode(b"{not json"),
            Err(BundleError::Malformed(_))
        ));
    }
}
