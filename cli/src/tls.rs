//! TLS on the client side: an `https://` server is verified against the system's roots and, with
//! `--ca-file`, a CA of one's own (a cluster's cert-manager issuer); `--client-cert` and `--client-key`
//! present a client certificate to a server that wants one (mutual TLS). HTTP and Flight alike.

use std::path::{Path, PathBuf};

use super::Error;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM CA certificate(s) to trust for an https:// server, besides the system's
    #[arg(long, value_name = "FILE", env = "ARROWPORT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate to present (mutual TLS); needs --client-key
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// The files of [`TlsArgs`], read.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM CA certificates to trust.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsArgs {
    pub fn load(&self) -> Result<Tls, Error> {
        let ca = self.ca_file.as_deref().map(read).transpose()?;
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(Tls { ca, identity })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| Error::Input { file: path.display().to_string(), message: error.to_string() })
}

/// A TLS file that does not hold what it should.
pub fn invalid(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Input { file: what.to_owned(), message: format!("not a usable PEM file: {error}") }
}
