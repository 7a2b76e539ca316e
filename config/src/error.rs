use serde::de::DeserializeOwned;

/// A configuration problem, naming the key (and the line, where the parser knows it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid YAML for the expected shape (unknown key, wrong type, ...).
    #[error("{message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Parse { message: String, line: Option<u64> },
    /// The YAML parsed but a value is not acceptable; `key` is its dotted path.
    #[error("{key}: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid { key: String, message: String, line: Option<u64> },
    /// Rendering a config back to YAML failed.
    #[error("cannot render YAML: {0}")]
    Render(String),
}

pub(crate) fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let message = first_line(&e.to_string());
        // Name the line unless the parser's own message already does.
        let line = e.location().map(|l| l.line()).filter(|line| !message.contains(&format!("line {line} ")));
        ConfigError::Parse { message, line }
    })
}

/// serde-saphyr appends a source snippet after the first line; the first line says what is wrong.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or(text).trim();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}
