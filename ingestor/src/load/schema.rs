//! Which Arrow types Arrowport loads, and how an incoming schema meets an existing table.

use arrowport_config::SchemaPolicy;

use arrow::datatypes::{DataType, Field, IntervalUnit, Schema};

use crate::error::IngestError;

/// A column as DuckDB names and types it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub sql_type: String,
}

impl Column {
    pub fn new(name: impl Into<String>, sql_type: impl Into<String>) -> Self {
        Self { name: name.into(), sql_type: sql_type.into() }
    }
}

/// What loading one request needs done to the table before the data goes in.
#[derive(Debug, PartialEq, Eq)]
pub enum TablePlan {
    /// The table does not exist: create it with these columns.
    Create(Vec<Column>),
    /// The table has every incoming column with the same type.
    Append,
    /// Add these columns (policy `evolve`), then append.
    AddColumns(Vec<Column>),
    /// Drop the table and create it anew with these columns (Flight SQL ingest, `if_exists: REPLACE`).
    Replace(Vec<Column>),
}

/// What a load may do to its table besides appending. Streams always use the default; Flight SQL bulk
/// ingest sets it from the client's table definition options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableMode {
    /// Create the table if it does not exist (otherwise that is an error).
    pub create: bool,
    pub if_exists: IfExists,
}

impl Default for TableMode {
    fn default() -> Self {
        Self { create: true, if_exists: IfExists::Append }
    }
}

/// What a load does to a table that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IfExists {
    Append,
    Fail,
    Replace,
}

impl TablePlan {
    pub fn changes_table(&self) -> bool {
        !matches!(self, Self::Append)
    }
}

/// Rejects columns whose Arrow type Arrowport does not load, naming each one.
pub fn check_supported(schema: &Schema) -> Result<(), IngestError> {
    let unsupported: Vec<String> = schema
        .fields()
        .iter()
        .filter_map(|field| field_part(field).map(|t| format!("{} ({t})", field.name())))
        .collect();
    if unsupported.is_empty() {
        Ok(())
    } else {
        Err(IngestError::UnsupportedType(format!(
            "column(s) with an Arrow type DuckDB cannot store: {}",
            unsupported.join(", ")
        )))
    }
}

/// The first unsupported type inside `data_type`, if any.
fn unsupported_part(data_type: &DataType) -> Option<String> {
    use DataType::*;
    match data_type {
        Boolean | Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float32 | Float64 | Utf8
        | LargeUtf8 | Utf8View | Binary | LargeBinary | BinaryView | FixedSizeBinary(_) | Date32 | Date64
        | Time32(_) | Time64(_) | Duration(_) => None,
        // Names and timezones reach DuckDB as C strings (the Arrow C data interface).
        Timestamp(_, Some(zone)) if zone.contains('\0') => Some("Timestamp with a NUL byte in its timezone".to_owned()),
        Timestamp(_, _) => None,
        Interval(IntervalUnit::YearMonth | IntervalUnit::MonthDayNano) => None,
        // DuckDB 1.5 reads day-time intervals as one 64-bit millisecond count: wrong values, so refuse.
        Interval(IntervalUnit::DayTime) => {
            Some("Interval(DayTime); send month_day_nano intervals or durations".to_owned())
        }
        Decimal32(p, _) | Decimal64(p, _) | Decimal128(p, _) if *p <= 38 => None,
        List(child) | LargeList(child) | FixedSizeList(child, _) => field_part(child),
        Struct(fields) if !fields.is_empty() => fields.iter().find_map(|f| field_part(f)),
        Map(entries, _) => field_part(entries),
        Dictionary(key, value) if key.is_integer() => unsupported_part(value),
        // DuckDB's Arrow scan has no half floats; the producer knows best how to widen them.
        Float16 => Some("Float16; cast it to float32".to_owned()),
        other => Some(other.to_string()),
    }
}

fn field_part(field: &Field) -> Option<String> {
    if field.name().contains('\0') {
        return Some("a NUL byte in a field's name".to_owned());
    }
    unsupported_part(field.data_type())
}

/// Compares incoming columns with the table's (`None`: no table yet). Names match case-insensitively,
/// as DuckDB resolves them; types must be equal.
pub fn plan(
    table: &str,
    existing: Option<&[Column]>,
    incoming: &[Column],
    policy: SchemaPolicy,
    mode: TableMode,
) -> Result<TablePlan, IngestError> {
    if let Some(duplicate) = first_duplicate(incoming) {
        return Err(IngestError::SchemaMismatch(format!(
            "column {duplicate:?} appears more than once (names are case-insensitive)"
        )));
    }
    let existing = match (existing, mode.if_exists) {
        (None, _) if mode.create => return Ok(TablePlan::Create(incoming.to_vec())),
        (None, _) => return Err(IngestError::TableNotFound(table.to_owned())),
        (Some(_), IfExists::Fail) => return Err(IngestError::TableExists(table.to_owned())),
        (Some(_), IfExists::Replace) => return Ok(TablePlan::Replace(incoming.to_vec())),
        (Some(existing), IfExists::Append) => existing,
    };
    let mut mismatched = Vec::new();
    let mut missing = Vec::new();
    for column in incoming {
        match existing.iter().find(|c| c.name.eq_ignore_ascii_case(&column.name)) {
            Some(have) if have.sql_type.eq_ignore_ascii_case(&column.sql_type) => {}
            Some(have) => mismatched
                .push(format!("{} is {} in the table but {} in the data", column.name, have.sql_type, column.sql_type)),
            None => missing.push(column.clone()),
        }
    }
    if !mismatched.is_empty() {
        return Err(IngestError::SchemaMismatch(format!("incompatible column type(s): {}", mismatched.join("; "))));
    }
    match (missing.is_empty(), policy) {
        (true, _) => Ok(TablePlan::Append),
        (false, SchemaPolicy::Evolve) => Ok(TablePlan::AddColumns(missing)),
        (false, SchemaPolicy::Reject) => Err(IngestError::SchemaMismatch(format!(
            "column(s) not in the table: {} (the stream's schema_policy is reject)",
            missing.iter().map(|c| format!("{} {}", c.name, c.sql_type)).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn first_duplicate(columns: &[Column]) -> Option<&str> {
    columns.iter().enumerate().find_map(|(i, c)| {
        columns[..i].iter().any(|earlier| earlier.name.eq_ignore_ascii_case(&c.name)).then_some(c.name.as_str())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::{Fields, TimeUnit, UnionFields, UnionMode};

    use super::*;

    fn cols(spec: &[(&str, &str)]) -> Vec<Column> {
        spec.iter().map(|(n, t)| Column::new(*n, *t)).collect()
    }

    #[test]
    fn no_table_means_create() {
        let incoming = cols(&[("a", "INTEGER")]);
        assert_eq!(
            plan("t", None, &incoming, SchemaPolicy::Reject, TableMode::default()).unwrap(),
            TablePlan::Create(incoming)
        );
    }

    #[test]
    fn subset_with_same_types_appends() {
        let table = cols(&[("a", "INTEGER"), ("b", "VARCHAR")]);
        let incoming = cols(&[("B", "varchar")]);
        assert_eq!(
            plan("t", Some(&table), &incoming, SchemaPolicy::Reject, TableMode::default()).unwrap(),
            TablePlan::Append
        );
    }

    #[test]
    fn unknown_column_is_rejected_by_name_or_added_by_evolve() {
        let table = cols(&[("a", "INTEGER")]);
        let incoming = cols(&[("a", "INTEGER"), ("extra", "DOUBLE")]);
        let err = plan("t", Some(&table), &incoming, SchemaPolicy::Reject, TableMode::default()).unwrap_err();
        assert!(err.to_string().contains("extra DOUBLE"), "{err}");
        assert_eq!(
            plan("t", Some(&table), &incoming, SchemaPolicy::Evolve, TableMode::default()).unwrap(),
            TablePlan::AddColumns(cols(&[("extra", "DOUBLE")]))
        );
    }

    #[test]
    fn type_change_is_rejected_even_with_evolve() {
        let table = cols(&[("a", "INTEGER")]);
        let err = plan("t", Some(&table), &cols(&[("a", "VARCHAR")]), SchemaPolicy::Evolve, TableMode::default())
            .unwrap_err();
        assert!(err.to_string().contains("a is INTEGER in the table but VARCHAR in the data"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let err =
            plan("t", None, &cols(&[("a", "INTEGER"), ("A", "INTEGER")]), SchemaPolicy::Evolve, TableMode::default())
                .unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
    }

    #[test]
    fn common_types_are_supported() {
        let item = Arc::new(Field::new("item", DataType::Int32, true));
        let schema = Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())), true),
            Field::new("l", DataType::LargeList(item.clone()), true),
            Field::new("s", DataType::Struct(Fields::from(vec![Field::new("x", DataType::Utf8View, true)])), true),
            Field::new("d", DataType::Dictionary(Box::new(DataType::Int16), Box::new(DataType::Utf8)), true),
            Field::new("i", DataType::Interval(IntervalUnit::MonthDayNano), true),
            Field::new("dec", DataType::Decimal128(38, 4), true),
        ]);
        check_supported(&schema).unwrap();
    }

    #[test]
    fn unsupported_types_are_named() {
        let union = DataType::Union(UnionFields::empty(), UnionMode::Dense);
        let schema = Schema::new(vec![
            Field::new("ok", DataType::Int32, true),
            Field::new("u", union, true),
            Field::new("wide", DataType::Decimal256(60, 2), true),
            Field::new("half", DataType::List(Arc::new(Field::new("item", DataType::Float16, true))), true),
            Field::new("day_time", DataType::Interval(IntervalUnit::DayTime), true),
            // Names and timezones go to DuckDB as C strings: a NUL byte in one must be refused, not panic.
            Field::new("nul\0name", DataType::Int64, true),
            Field::new("zone", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC\0".into())), true),
            Field::new("nested", DataType::Struct(vec![Field::new("a\0", DataType::Int8, true)].into()), true),
        ]);
        let message = check_supported(&schema).unwrap_err().to_string();
        assert!(message.contains("nul\0name (a NUL byte in a field's name)"), "{message}");
        assert!(message.contains("zone (Timestamp with a NUL byte in its timezone)"), "{message}");
        assert!(message.contains("nested (a NUL byte in a field's name)"), "{message}");
        assert!(message.contains("u (Union"), "{message}");
        assert!(message.contains("wide (Decimal256(60, 2))"), "{message}");
        assert!(message.contains("half (Float16; cast it to float32)"), "{message}");
        assert!(message.contains("day_time (Interval(DayTime)"), "{message}");
        assert!(!message.contains("ok"), "{message}");
    }

    #[test]
    fn table_modes_for_flight_sql_ingest() {
        let table = cols(&[("a", "INTEGER")]);
        let incoming = cols(&[("b", "VARCHAR")]);
        let mode = |create, if_exists| TableMode { create, if_exists };
        let missing = plan("t", None, &incoming, SchemaPolicy::Reject, mode(false, IfExists::Append));
        assert!(matches!(missing, Err(IngestError::TableNotFound(t)) if t == "t"));
        let exists = plan("t", Some(&table), &incoming, SchemaPolicy::Reject, mode(true, IfExists::Fail));
        assert!(matches!(exists, Err(IngestError::TableExists(_))));
        let replace = plan("t", Some(&table), &incoming, SchemaPolicy::Reject, mode(true, IfExists::Replace));
        assert_eq!(replace.unwrap(), TablePlan::Replace(incoming));
    }
}
