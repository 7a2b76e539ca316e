//! TLS on the listening port(s), with rustls: one port for HTTP/1.1, HTTP/2 and gRPC (ALPN `h2` and
//! `http/1.1`), optional mutual TLS, and certificates re-read when their files change.
//!
//! A watcher compares the files' contents (certificate, key, client CA) every [`WATCH_INTERVAL`] (as the
//! config reload does, which sees cert-manager's Secret volume swaps) and puts a new server config in
//! force for the handshakes that follow. Connections already open keep theirs. A new certificate that
//! does not load, whose key does not match it, or that is outside its validity period, or a client CA
//! that does not load, is refused with an error in the log, and the old config stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrowport_config::TlsConfig;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::auth::PeerName;

/// How often the certificate files are compared with the ones in force.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Why TLS could not be set up, or a new certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: the certificate is valid only from {not_before} to {not_after} (Unix seconds); now is {now}", path.display())]
    NotValidNow { path: PathBuf, not_before: i64, not_after: i64, now: i64 },
    #[error("{0}")]
    Config(String),
}

/// The TLS side of the listener: the server config handshakes use, and the failures counter.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    handshake_failures: Counter,
}

impl Tls {
    /// Loads the certificate, key and client CA of `config` and starts watching their files; metrics go
    /// to `app`'s registry.
    pub fn start(config: &TlsConfig, app: &Arc<App>) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let metrics = &app.telemetry().metrics;
        let (server, not_after) = server_config(config, &provider)?;
        metrics.tls_certificate_expiry.set(not_after);
        let current = Arc::new(RwLock::new(Arc::new(server)));
        let watch = Watch {
            config: config.clone(),
            seen: contents(config),
            current: current.clone(),
            provider,
            reloads: metrics.tls_certificate_reloads.clone(),
            failures: metrics.tls_certificate_reload_failures.clone(),
            expiry: metrics.tls_certificate_expiry.clone(),
        };
        tokio::spawn(watch.run());
        Ok(Self { current, handshake_failures: metrics.tls_handshake_failures.clone() })
    }

    /// Runs the TLS handshake on `socket`, within `timeout`: the encrypted stream and the client
    /// certificate's name, if it presented one. A failed handshake is counted and logged at debug level
    /// (scanners and wrong certificates are routine).
    pub async fn accept(
        &self,
        socket: tokio::net::TcpStream,
        timeout: Duration,
    ) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Option<PeerName>)> {
        let acceptor = TlsAcceptor::from(self.current.read().expect("TLS config lock poisoned").clone());
        match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => {
                let peer = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).and_then(common_name);
                Some((stream, peer.map(|name| PeerName(name.into()))))
            }
            Ok(Err(error)) => {
                self.handshake_failures.inc();
                tracing::debug!(%error, "TLS handshake failed.");
                None
            }
            Err(_) => {
                self.handshake_failures.inc();
                tracing::debug!("TLS handshake timed out.");
                None
            }
        }
    }
}

/// The server config of `config`'s files, and its certificate's expiry (Unix seconds).
fn server_config(config: &TlsConfig, provider: &Arc<CryptoProvider>) -> Result<(ServerConfig, i64), TlsError> {
    let (key, not_after) = load(&config.cert, &config.key, provider)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let builder = match &config.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates(path)? {
                roots.add(certificate).map_err(|error| invalid(path, error))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|error| invalid(path, error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((server, not_after))
}

/// Watches the certificate, key and client CA files.
struct Watch {
    config: TlsConfig,
    seen: Vec<Option<Vec<u8>>>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    provider: Arc<CryptoProvider>,
    reloads: Counter,
    failures: Counter,
    expiry: Gauge,
}

impl Watch {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = contents(&self.config);
            if now == self.seen {
                continue;
            }
            self.seen = now;
            match server_config(&self.config, &self.provider) {
                Ok((server, not_after)) => {
                    *self.current.write().expect("TLS config lock poisoned") = Arc::new(server);
                    self.expiry.set(not_after);
                    self.reloads.inc();
                    tracing::info!(cert = %self.config.cert.display(), not_after, "Reloaded the TLS certificate and client CA.");
                }
                Err(error) => {
                    self.failures.inc();
                    tracing::error!(%error, "Refused the new TLS files; the previous certificate and client CA stay in force.");
                }
            }
        }
    }
}

/// The files' bytes (`None` for one that cannot be read: a Secret volume mid-swap is read again later).
fn contents(config: &TlsConfig) -> Vec<Option<Vec<u8>>> {
    [Some(&config.cert), Some(&config.key), config.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| std::fs::read(path).ok())
        .collect()
}

/// The certificate chain and key, checked against each other and the clock; with the certificate's
/// expiry (Unix seconds).
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<(CertifiedKey, i64), TlsError> {
    let chain = read_certificates(cert)?;
    let first = chain.first().ok_or_else(|| invalid(cert, "no PEM certificate in the file"))?;
    let (not_before, not_after) = validity(first).ok_or_else(|| invalid(cert, "not an X.509 certificate"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs() as i64);
    if now < not_before || now > not_after {
        return Err(TlsError::NotValidNow { path: cert.to_owned(), not_before, not_after, now });
    }
    let bytes = std::fs::read(key).map_err(|error| TlsError::Read { path: key.to_owned(), error })?;
    let private = PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| invalid(key, error))?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|error| invalid(key, error))?;
    Ok((certified, not_after))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error })?;
    let chain = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| invalid(path, e))?;
    if chain.is_empty() {
        return Err(invalid(path, "no PEM certificate in the file"));
    }
    Ok(chain)
}

fn invalid(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid { path: path.to_owned(), message: error.to_string() }
}

/// A certificate's validity period, in Unix seconds.
fn validity(certificate: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let validity = parsed.validity();
    Some((validity.not_before.timestamp(), validity.not_after.timestamp()))
}

/// The subject common name of a (client) certificate.
fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(name)
}
