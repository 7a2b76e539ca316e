//! Tokens on the client side: `arrowport token hash` (what a tokens file stores), and the token the
//! `ingest` and `streams` commands send (`--token-file`, or `ARROWPORT_TOKEN`).

use std::io::Read;
use std::path::PathBuf;

use arrowport_config::token_sha256;

use super::Error;

/// The environment variable holding the token, when no `--token-file` is given.
pub const TOKEN_ENV: &str = "ARROWPORT_TOKEN";

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print the SHA-256 of the token read from stdin (surrounding whitespace removed), for the `sha256`
    /// of a tokens file entry. The token itself is never written anywhere.
    Hash,
}

/// The token a client command sends, as `Authorization: Bearer TOKEN` (HTTP) or `authorization`
/// metadata (Flight).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// File holding the token to send (surrounding whitespace removed) [default: the ARROWPORT_TOKEN
    /// environment variable, if set]
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token, if one is given: the file's, else `ARROWPORT_TOKEN`'s.
    pub fn token(&self) -> Result<Option<String>, Error> {
        let (token, source) = match &self.token_file {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|error| Error::Input { file: file.display().to_string(), message: error.to_string() })?;
                (text, file.display().to_string())
            }
            None => match std::env::var(TOKEN_ENV) {
                Ok(text) => (text, TOKEN_ENV.to_owned()),
                Err(_) => return Ok(None),
            },
        };
        let token = token.trim();
        if token.is_empty() || token.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(Error::Token { origin: source });
        }
        Ok(Some(token.to_owned()))
    }
}

pub fn run(command: TokenCommand) -> Result<(), Error> {
    match command {
        TokenCommand::Hash => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|error| Error::Input { file: "-".to_owned(), message: error.to_string() })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(Error::Token { origin: "stdin".to_owned() });
            }
            println!("{}", token_sha256(token.as_bytes()));
            Ok(())
        }
    }
}
