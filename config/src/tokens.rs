//! The tokens file (`auth.tokens_file`): who may write which streams and who may query.
//!
//! ```yaml
//! tokens:
//!   loader:                       # the name logs and metrics use, and that grants can name
//!     sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//!     write: [events, "sensors.*"]
//!     query: false
//! ```
//!
//! A token is stored only as the SHA-256 of its text ([`token_sha256`], `arrowport token hash`). An
//! entry without `sha256` stands for a client certificate whose subject common name is the entry's name
//! (mutual TLS), and for nothing else.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ConfigError, Issue, error, key, locate};

/// The tokens file: entries keyed by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// Every identity, by name.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
}

/// One identity and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenEntry {
    /// The SHA-256 of the token, 64 hex digits. Absent: only a client certificate with this name as
    /// its subject common name authenticates as this entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Streams it may write: names or glob patterns (`*`, `?`, `[abc]`), e.g. `sensors.*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub write: Vec<String>,
    /// Whether it may read: Flight SQL queries and metadata, `DoGet`, the Flight listings, `GET /streams`.
    pub query: bool,
}

/// The SHA-256 of `token` as 64 lowercase hex digits: what a tokens file stores.
pub fn token_sha256(token: &[u8]) -> String {
    sha256(token).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl TokenEntry {
    /// The entry's `sha256` as bytes; `None` if it has none (or it is not 64 hex digits, which
    /// validation refuses).
    pub fn digest(&self) -> Option<[u8; 32]> {
        let hex = self.sha256.as_deref()?.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(digest)
    }
}

impl TokensFile {
    /// Parses and validates a tokens file's text; the error is the first problem. An empty document
    /// holds no tokens (and then every request is refused).
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::check_yaml(text).map_err(crate::first)
    }

    /// Parses and validates like [`TokensFile::from_yaml`], reporting every problem with its line.
    pub fn check_yaml(text: &str) -> Result<Self, Vec<ConfigError>> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let file: Self = error::parse_yaml(text).map_err(|error| vec![error])?;
        locate(text, file.issues())?;
        Ok(file)
    }

    fn issues(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        let mut hashes = BTreeMap::new();
        for (name, entry) in &self.tokens {
            let at = |field: &str| key(&["tokens", name, field]);
            if !is_valid_token_name(name) {
                issues.push(Issue::new(
                    key(&["tokens", name]),
                    "token names are 1-128 printable ASCII characters (a certificate's common name may be one)",
                ));
            }
            if let Some(hash) = &entry.sha256 {
                if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                    issues.push(Issue::new(
                        at("sha256"),
                        "must be the 64 hex digits of the token's SHA-256 (arrowport token hash prints it)",
                    ));
                } else if hashes.insert(hash.to_ascii_lowercase(), name).is_some() {
                    issues.push(Issue::new(at("sha256"), "the same token is listed under another name"));
                }
            }
            if entry.write.iter().any(|pattern| !is_valid_stream_pattern(pattern)) {
                issues.push(Issue::new(
                    at("write"),
                    "each entry is a stream name or a glob pattern of stream-name characters and * ? [ ] !",
                ));
            }
        }
        issues
    }
}

/// 1-128 printable ASCII characters, spaces included (a certificate's common name may hold them).
pub fn is_valid_token_name(name: &str) -> bool {
    (1..=128).contains(&name.len()) && name.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// A stream name, or a glob pattern over stream-name characters (`*`, `?`, `[...]`, `[!...]`).
pub fn is_valid_stream_pattern(pattern: &str) -> bool {
    (1..=128).contains(&pattern.len())
        && pattern.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-*?[]!".contains(&b))
        && glob::Pattern::new(pattern).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_hash_is_sha256_in_hex() {
        // SHA-256("test"), as `printf test | sha256sum` prints it.
        assert_eq!(token_sha256(b"test"), HASH);
        let entry = TokenEntry { sha256: Some(HASH.to_uppercase()), ..TokenEntry::default() };
        assert_eq!(entry.digest(), Some(sha256(b"test")));
        assert_eq!(TokenEntry::default().digest(), None);
    }

    #[test]
    fn parses_the_documented_example() {
        let text = format!(
            "tokens:\n  loader:\n    sha256: {HASH}\n    write: [events, 'sensors.*']\n  reader: {{query: true}}\n"
        );
        let file = TokensFile::from_yaml(&text).unwrap();
        assert_eq!(file.tokens["loader"].write, ["events", "sensors.*"]);
        assert!(!file.tokens["loader"].query);
        assert!(file.tokens["reader"].query && file.tokens["reader"].sha256.is_none());
        assert_eq!(TokensFile::from_yaml("").unwrap(), TokensFile::default());
    }

    #[test]
    fn every_problem_is_named_with_its_line() {
        let text = format!(
            "tokens:\n  a: {{sha256: nothex}}\n  b:\n    sha256: {HASH}\n    write: ['x/y']\n  c: {{sha256: {HASH}}}\n"
        );
        let problems: Vec<String> =
            TokensFile::check_yaml(&text).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].starts_with("tokens.a.sha256: must be the 64 hex digits") && problems[0].ends_with("(line 2)")
        );
        assert!(problems[1].starts_with("tokens.b.write: each entry") && problems[1].ends_with("(line 5)"));
        assert!(problems[2].starts_with("tokens.c.sha256: the same token") && problems[2].ends_with("(line 6)"));
        let unknown = TokensFile::from_yaml("tokens:\n  a: {token: plain}\n").unwrap_err();
        assert!(unknown.to_string().contains("token"), "{unknown}");
    }

    #[test]
    fn patterns_are_globs_over_stream_names() {
        for good in ["events", "sensors.*", "s?", "[ab]x", "*"] {
            assert!(is_valid_stream_pattern(good), "{good}");
        }
        for bad in ["", "a/b", "[", "a b", "x\"y"] {
            assert!(!is_valid_stream_pattern(bad), "{bad}");
        }
    }
}
