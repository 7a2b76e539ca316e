//! Lineitem-like data (the benchmark's generator, `bench/src/data.rs`, shared as a module), with a
//! column count: a table of `columns` cycles through the 16 lineitem columns (`l_partkey`, then
//! `l_partkey_1`, ...), since DuckDB's memory needs grow with the width of the table.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};

#[path = "../../bench/src/data.rs"]
mod lineitem;

use lineitem::{batch as lineitem_batch, schema as lineitem_schema};

/// The lineitem columns of the table, cycled to `columns` (at least 1).
pub fn schema(columns: usize) -> SchemaRef {
    let base = lineitem_schema();
    let fields: Vec<Field> = (0..columns.max(1))
        .map(|i| {
            let field = base.field(i % base.fields().len());
            match i / base.fields().len() {
                0 => field.clone(),
                n => field.clone().with_name(format!("{}_{n}", field.name())),
            }
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Rows `start..start + rows` of a table of `columns` columns ([`schema`]).
pub fn batch(start: u64, rows: usize, columns: usize) -> RecordBatch {
    let base = lineitem_batch(start, rows);
    let arrays: Vec<ArrayRef> = (0..columns.max(1)).map(|i| base.column(i % base.num_columns()).clone()).collect();
    RecordBatch::try_new(schema(columns), arrays).expect("columns match the schema")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_tables_cycle_the_lineitem_columns_under_new_names() {
        let batch = batch(0, 10, 20);
        assert_eq!(batch.num_columns(), 20);
        assert_eq!(batch.schema().field(16).name(), "l_orderkey_1");
        assert_eq!(batch.schema().field(19).name(), "l_linenumber_1");
        assert_eq!(batch.column(17), batch.column(1));
        assert_eq!(super::batch(0, 10, 16).schema(), lineitem_schema());
    }
}
