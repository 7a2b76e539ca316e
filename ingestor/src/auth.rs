//! Access control: who a request is (a bearer token, or a client certificate's name) and what it may do.
//!
//! Both transports take the `authorization` header (HTTP) or metadata (gRPC) of every call to
//! [`Access::authenticate`] before they read a byte of its body, and check the grant the call needs with
//! [`Identity::may_write`] or [`Identity::may_query`]. Tokens are known only by their SHA-256: the
//! presented token is hashed and compared with every entry's digest in constant time, so neither the
//! token nor the time a comparison takes tells anything about the stored ones.

use std::sync::Arc;

use arrowport_config::TokensFile;
use arrowport_config::tokens::sha256;
use base64::Engine;
use subtle::ConstantTimeEq;

/// The tokens in force, or none: access control off, everyone may do everything.
#[derive(Debug, Default)]
pub struct Access {
    entries: Option<Vec<Arc<Grant>>>,
}

/// One tokens file entry: its name and what it may do.
#[derive(Debug)]
pub struct Grant {
    pub name: String,
    digest: Option<[u8; 32]>,
    write: Vec<glob::Pattern>,
    query: bool,
}

/// Who a request is.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Access control is off.
    Anyone,
    /// The entry its token or client certificate names.
    Named(Arc<Grant>),
}

/// The name of the client certificate a TLS connection presented (its subject's common name), put
/// into each request's extensions by the accept loop.
#[derive(Debug, Clone)]
pub struct PeerName(pub Arc<str>);

/// Why a request was refused: the `reason` label of `arrowport_auth_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` and no client certificate that names an entry.
    Missing,
    /// A token that is in no entry, or an `authorization` that is neither `Bearer` nor `Basic`.
    Invalid,
    /// A valid token that may not write the stream.
    StreamNotGranted,
    /// A valid token without the query grant.
    QueryNotGranted,
}

impl Refusal {
    pub const ALL: [Self; 4] = [Self::Missing, Self::Invalid, Self::StreamNotGranted, Self::QueryNotGranted];

    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::StreamNotGranted => "stream_not_granted",
            Self::QueryNotGranted => "query_not_granted",
        }
    }

    /// Whether the caller is unknown (401 / `UNAUTHENTICATED`) rather than known but not allowed.
    pub fn unauthenticated(self) -> bool {
        matches!(self, Self::Missing | Self::Invalid)
    }
}

impl Access {
    /// Access control with the entries of `file` (an empty file refuses every request).
    pub fn from_file(file: &TokensFile) -> Self {
        let entries = file
            .tokens
            .iter()
            .map(|(name, entry)| {
                Arc::new(Grant {
                    name: name.clone(),
                    digest: entry.digest(),
                    // Validated patterns; one that still does not compile grants nothing.
                    write: entry.write.iter().filter_map(|pattern| glob::Pattern::new(pattern).ok()).collect(),
                    query: entry.query,
                })
            })
            .collect();
        Self { entries: Some(entries) }
    }

    /// Whether access control is on.
    pub fn enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// How many entries are in force.
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Who presents `authorization` (`Bearer TOKEN`, or `Basic` with the token as the password) on a
    /// connection whose client certificate, if any, is named `peer`. A token decides when there is one;
    /// otherwise the certificate's name must be an entry's.
    pub fn authenticate(&self, authorization: Option<&[u8]>, peer: Option<&str>) -> Result<Identity, Refusal> {
        let Some(entries) = &self.entries else {
            return Ok(Identity::Anyone);
        };
        match authorization {
            Some(value) => {
                let token = presented_token(value).ok_or(Refusal::Invalid)?;
                let digest = sha256(&token);
                // Every entry is compared, whichever matches: the time taken says nothing about which.
                let mut found = None;
                for entry in entries {
                    let stored = entry.digest.unwrap_or([0; 32]);
                    let matches = stored.ct_eq(&digest) & u8::from(entry.digest.is_some()).ct_eq(&1);
                    if bool::from(matches) {
                        found = Some(entry);
                    }
                }
                found.map(|entry| Identity::Named(entry.clone())).ok_or(Refusal::Invalid)
            }
            None => {
                let peer = peer.ok_or(Refusal::Missing)?;
                let entry = entries.iter().find(|entry| entry.name == peer).ok_or(Refusal::Missing)?;
                Ok(Identity::Named(entry.clone()))
            }
        }
    }
}

/// The token of an `authorization` value: `Bearer TOKEN`, or `Basic base64(user:TOKEN)` (the user name is
/// not checked: Flight SQL clients such as ADBC send a user name and password, and the password is the
/// token). Schemes are case-insensitive.
fn presented_token(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        let password = decoded[colon + 1..].to_vec();
        return (!password.is_empty()).then_some(password);
    }
    None
}

/// The `Bearer` form of the token an `authorization` value carries: what a Flight `Handshake` answers, so
/// that a client that authenticated with a user name and password sends the token from then on.
pub fn bearer_of(authorization: &[u8]) -> Option<String> {
    let token = String::from_utf8(presented_token(authorization)?).ok()?;
    Some(format!("Bearer {token}"))
}

impl Identity {
    /// The entry's name, for logs and metrics (`None` with access control off).
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Anyone => None,
            Self::Named(grant) => Some(&grant.name),
        }
    }

    /// Whether it may write `stream`: one of its own `write` patterns matches, or the stream's `writers`
    /// name it.
    pub fn may_write(&self, stream: &str, writers: &[String]) -> Result<(), Refusal> {
        match self {
            Self::Anyone => Ok(()),
            Self::Named(grant) => {
                let granted = grant.write.iter().any(|pattern| pattern.matches(stream))
                    || writers.iter().any(|writer| *writer == grant.name);
                if granted { Ok(()) } else { Err(Refusal::StreamNotGranted) }
            }
        }
    }

    /// Whether it may read (queries, table reads, listings).
    pub fn may_query(&self) -> Result<(), Refusal> {
        match self {
            Self::Anyone => Ok(()),
            Self::Named(grant) if grant.query => Ok(()),
            Self::Named(_) => Err(Refusal::QueryNotGranted),
        }
    }
}

#[cfg(test)]
mod tests {
    use arrowport_config::token_sha256;

    use super::*;

    fn access() -> Access {
        let text = format!(
            "tokens:\n  loader:\n    sha256: {}\n    write: [events, 'sensors.*']\n  reader:\n    sha256: {}\n    query: true\n  \
             cert-only: {{write: [certs]}}\n",
            token_sha256(b"loader-secret"),
            token_sha256(b"reader-secret"),
        );
        Access::from_file(&TokensFile::from_yaml(&text).unwrap())
    }

    fn name(identity: Result<Identity, Refusal>) -> Result<String, Refusal> {
        identity.map(|identity| identity.name().unwrap().to_owned())
    }

    #[test]
    fn bearer_and_basic_tokens_name_their_entry() {
        let access = access();
        assert_eq!(name(access.authenticate(Some(b"Bearer loader-secret"), None)), Ok("loader".to_owned()));
        assert_eq!(name(access.authenticate(Some(b"bearer  reader-secret "), None)), Ok("reader".to_owned()));
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("anyone:reader-secret"));
        assert_eq!(name(access.authenticate(Some(basic.as_bytes()), None)), Ok("reader".to_owned()));
        assert_eq!(bearer_of(basic.as_bytes()).as_deref(), Some("Bearer reader-secret"));
    }

    #[test]
    fn refusals_say_why() {
        let access = access();
        assert_eq!(name(access.authenticate(None, None)), Err(Refusal::Missing));
        assert_eq!(name(access.authenticate(Some(b"Bearer wrong"), None)), Err(Refusal::Invalid));
        assert_eq!(name(access.authenticate(Some(b"Token loader-secret"), None)), Err(Refusal::Invalid));
        assert_eq!(name(access.authenticate(Some(b"Bearer "), None)), Err(Refusal::Invalid));
        assert_eq!(name(access.authenticate(Some(b"Basic !!!"), None)), Err(Refusal::Invalid));
    }

    #[test]
    fn a_certificate_names_an_entry_when_no_token_is_sent() {
        let access = access();
        assert_eq!(name(access.authenticate(None, Some("cert-only"))), Ok("cert-only".to_owned()));
        assert_eq!(name(access.authenticate(None, Some("stranger"))), Err(Refusal::Missing));
        // A token decides over the certificate.
        assert_eq!(
            name(access.authenticate(Some(b"Bearer reader-secret"), Some("cert-only"))),
            Ok("reader".to_owned())
        );
    }

    #[test]
    fn grants_match_names_patterns_and_writers() {
        let access = access();
        let loader = access.authenticate(Some(b"Bearer loader-secret"), None).unwrap();
        assert_eq!(loader.may_write("events", &[]), Ok(()));
        assert_eq!(loader.may_write("sensors.v2", &[]), Ok(()));
        assert_eq!(loader.may_write("sensorsv2", &[]), Err(Refusal::StreamNotGranted));
        assert_eq!(loader.may_write("orders", &[]), Err(Refusal::StreamNotGranted));
        assert_eq!(loader.may_write("orders", &["loader".to_owned()]), Ok(()));
        assert_eq!(loader.may_query(), Err(Refusal::QueryNotGranted));
        let reader = access.authenticate(Some(b"Bearer reader-secret"), None).unwrap();
        assert_eq!((reader.may_query(), reader.may_write("events", &[])), (Ok(()), Err(Refusal::StreamNotGranted)));
    }

    #[test]
    fn without_tokens_everyone_may_do_everything() {
        let open = Access::default();
        let anyone = open.authenticate(None, None).unwrap();
        assert_eq!((anyone.may_write("x", &[]), anyone.may_query()), (Ok(()), Ok(())));
        let closed = Access::from_file(&TokensFile::default());
        assert_eq!(name(closed.authenticate(Some(b"Bearer x"), None)), Err(Refusal::Invalid));
    }
}
