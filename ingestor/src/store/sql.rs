//! SQL text built from names. Every identifier goes through [`ident`], whatever validated it before.

/// Quotes an identifier for DuckDB: `a"b` becomes `"a""b"`.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"catalog"."schema"."name"`.
pub fn qualified(catalog: &str, schema: &str, name: &str) -> String {
    format!("{}.{}.{}", ident(catalog), ident(schema), ident(name))
}

/// `"a", "b", "c"`.
pub fn ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(ident).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_hostile_names() {
        assert_eq!(ident(r#"x"; DROP TABLE t; --"#), r#""x""; DROP TABLE t; --""#);
        assert_eq!(qualified("db", "main", "t"), r#""db"."main"."t""#);
        assert_eq!(ident_list(["a", "b"]), r#""a", "b""#);
    }
}
