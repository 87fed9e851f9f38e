//! Optional TLS termination with rustls (ring provider), for a relay on a plain VM without a
//! load balancer in front. ALPN offers HTTP/2 and HTTP/1.1.
//!
//! The certificate and key are re-read when their files change (checked every ten seconds,
//! e.g. after a certbot or cert-manager renewal); a pair that fails to load keeps the old one
//! in use and is logged. New handshakes pick up the new pair; open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read certificate chain {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("failed to read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// The acceptor and what keeps its certificate fresh.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    certificate: Arc<ReloadingCertificate>,
}

impl Tls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(ReloadingCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(load_pair(&provider, cert_file, key_file)?)),
            provider: Arc::clone(&provider),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }

    /// Reloads the pair when its files change, until `stop`.
    pub async fn watch(&self, stop: CancellationToken) {
        let certificate = &self.certificate;
        let mut seen = certificate.fingerprint();
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = certificate.fingerprint();
            if now == seen {
                continue;
            }
            seen = now;
            match load_pair(
                &certificate.provider,
                &certificate.cert_file,
                &certificate.key_file,
            ) {
                Ok(pair) => {
                    *certificate
                        .current
                        .write()
                        .unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
                    tracing::info!(cert = %certificate.cert_file.display(), "TLS certificate reloaded");
                }
                Err(err) => {
                    tracing::error!(error = %err, "TLS certificate reload failed; keeping the old one")
                }
            }
        }
    }
}

#[derive(Debug)]
struct ReloadingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl ReloadingCertificate {
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let mut hasher = Sha256::new();
        hasher.update(std::fs::read(&self.cert_file).ok()?);
        hasher.update(std::fs::read(&self.key_file).ok()?);
        Some(hasher.finalize().into())
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

fn load_pair(
    provider: &CryptoProvider,
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, TlsError> {
    let cert_error = |reason: String| TlsError::Certificate {
        path: cert_file.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|err| cert_error(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| cert_error(err.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key_error = |reason: String| TlsError::Key {
        path: key_file.to_owned(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|err| key_error(err.to_string()))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| key_error(err.to_string()))?;
    Ok(CertifiedKey::new(chain, key))
}
