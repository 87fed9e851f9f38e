//! Optional TLS termination with rustls (ring provider), for a relay on a plain VM without a
//! load balancer in front. ALPN offers HTTP/2 and HTTP/1.1.
//!
//! A certificate and a key are used only as a pair that belongs together (the key's public
//! key is the certificate's): a mismatch stops the relay at start. The files are re-read when
//! they change (checked every ten seconds, e.g. after a certbot or cert-manager renewal) and
//! on SIGHUP; a pair that fails to load or does not match keeps the old one in use, and is
//! logged at error once it has not settled for a few seconds (certbot writes the key and the
//! chain one after the other). New handshakes pick up the new pair; open connections keep
//! theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use crate::reload::{Reload, Swap};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read certificate chain {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("failed to read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "the certificate in {cert} does not belong to the private key in {key} (their public \
         keys differ): install the key that was issued with this certificate"
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS setup failed: {0}")]
    Setup(#[from] rustls::Error),
}

/// The acceptor and what keeps its certificate fresh.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// `tls.handshake_timeout_ms`.
    pub handshake_timeout: Duration,
    certificate: Arc<Swap<CertifiedKey>>,
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl Tls {
    pub fn load(
        cert_file: &Path,
        key_file: &Path,
        handshake_timeout: Duration,
    ) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(Swap::new(load_pair(&provider, cert_file, key_file)?));
        let resolver = Arc::new(Resolver(Arc::clone(&certificate)));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout,
            certificate,
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
        })
    }

    /// Reloads the pair when its files change (checked every ten seconds), until `stop`.
    pub async fn watch(&self, stop: CancellationToken) {
        let (provider, cert_file, key_file) = (
            Arc::clone(&self.provider),
            self.cert_file.clone(),
            self.key_file.clone(),
        );
        let reload = Reload {
            value: Arc::clone(&self.certificate),
            what: "TLS certificate",
            files: vec![self.cert_file.clone(), self.key_file.clone()],
            every: Duration::from_secs(10),
            load: Box::new(move || {
                load_pair(&provider, &cert_file, &key_file).map_err(|err| err.to_string())
            }),
        };
        reload.run(Some(crate::signal::hangups()), stop).await;
    }
}

/// Hands every new handshake the certificate current at that moment.
#[derive(Debug)]
struct Resolver(Arc<Swap<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Loads `cert_file` and `key_file` as the relay would and checks that they belong together;
/// returns how many certificates the chain holds. For `check-config`.
pub fn check_pair(cert_file: &Path, key_file: &Path) -> Result<usize, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    Ok(load_pair(&provider, cert_file, key_file)?.cert.len())
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
    // Also checks that the key's public key is the certificate's (when the key can tell).
    CertifiedKey::from_der(chain, key, provider).map_err(|err| match err {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
        },
        rustls::Error::General(reason) => key_error(reason),
        err => cert_error(err.to_string()),
    })
}
