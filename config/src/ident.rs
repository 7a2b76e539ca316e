//! Names users give us. They are validated here and still always quoted before reaching SQL.

/// Maximum length of stream and table names.
const MAX_NAME_LEN: usize = 128;

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`: safe in URLs, file names and Flight paths.
pub fn is_valid_stream_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `[A-Za-z_][A-Za-z0-9_]{0,127}`: a plain SQL identifier.
pub fn is_valid_table_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        for ok in ["a", "lineitem", "sensors.v2", "_x-1", "9lives"] {
            assert!(is_valid_stream_name(ok), "{ok}");
        }
        let too_long = "a".repeat(129);
        for bad in ["", ".hidden", "-x", "a b", "x\"; DROP TABLE t; --", "ü", too_long.as_str()] {
            assert!(!is_valid_stream_name(bad), "{bad}");
        }
    }

    #[test]
    fn table_names() {
        assert!(is_valid_table_name("sensor_readings"));
        for bad in ["", "9x", "a.b", "a-b", "t\""] {
            assert!(!is_valid_table_name(bad), "{bad}");
        }
    }
}
