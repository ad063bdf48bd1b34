//! HTTPS: certificates chosen by SNI, ALPN for HTTP/2, and a self-signed
//! certificate for development when none is configured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::routes::HostPattern;

/// A certificate and the host names (exact or `*.suffix`) it serves.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Host names this certificate is chosen for.
    pub hosts: Vec<String>,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the key or configuration.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// A development certificate could not be made.
    #[error("generating a self-signed certificate failed: {0}")]
    Generate(String),
}

/// Picks the certificate for the ClientHello's server name: exact name,
/// then the longest matching wildcard, then the first certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(HostPattern, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        self.wildcard
            .iter()
            .filter(|(pattern, _)| pattern.matches(&name))
            .max_by_key(|(pattern, _)| pattern.rank())
            .map(|(_, k)| k.clone())
            .or_else(|| self.default.clone())
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        why: format!("cannot read: {e}"),
    })
}

fn load(
    spec: &CertSpec,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read_pem(&spec.cert)?.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: spec.cert.clone(),
                why: format!("not a PEM certificate chain: {e}"),
            })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: spec.cert.clone(),
            why: "contains no certificate".into(),
        });
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut read_pem(&spec.key)?.as_slice())
            .map_err(|e| TlsError::Pem {
                path: spec.key.clone(),
                why: format!("not a PEM private key: {e}"),
            })?
            .ok_or_else(|| TlsError::Pem {
                path: spec.key.clone(),
                why: "contains no private key".into(),
            })?;
    let signing = provider.key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(chain, signing);
    // A key that does not belong to the certificate would fail every
    // handshake while the node looks healthy: refuse it at start.
    certified.keys_match().map_err(|e| TlsError::Pem {
        path: spec.key.clone(),
        why: format!(
            "does not match the certificate {}: {e}",
            spec.cert.display()
        ),
    })?;
    Ok(Arc::new(certified))
}

/// A TLS acceptor serving `certs` by SNI, offering h2 and http/1.1.
pub fn acceptor(certs: &[CertSpec]) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut resolver = SniResolver {
        exact: HashMap::new(),
        wildcard: Vec::new(),
        default: None,
    };
    for spec in certs {
        let key = load(spec, &provider)?;
        if resolver.default.is_none() {
            resolver.default = Some(key.clone());
        }
        for host in &spec.hosts {
            match HostPattern::parse(host) {
                Ok(HostPattern::Exact(name)) => {
                    resolver.exact.insert(name, key.clone());
                }
                Ok(pattern @ HostPattern::Wildcard(_)) => {
                    resolver.wildcard.push((pattern, key.clone()))
                }
                // `*` or an unusable name: the first certificate is the
                // default for every name anyway.
                Ok(HostPattern::Any) | Err(_) => {}
            }
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Writes a self-signed certificate for `hosts` into `dir` (development
/// only) and returns its spec.
pub fn self_signed(hosts: &[String], dir: &Path) -> Result<CertSpec, TlsError> {
    let generated = rcgen::generate_simple_self_signed(hosts.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
    let cert = dir.join("dev-cert.pem");
    let key = dir.join("dev-key.pem");
    std::fs::write(&cert, generated.cert.pem())
        .and_then(|_| std::fs::write(&key, generated.signing_key.serialize_pem()))
        .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
    Ok(CertSpec {
        hosts: hosts.to_vec(),
        cert,
        key,
    })
}
