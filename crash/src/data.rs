//! The rows producers send: every row names its request (`producer`, `request`) and its place in it
//! (`row_no`), and carries values derived from those three, so the checker can tell which requests are
//! in the table, whether each is whole and once, and whether any row came back altered.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// The stream (and table) every producer writes to: one table, so small requests of all producers meet
/// in group commits.
pub const STREAM: &str = "crash";

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("producer", DataType::Int32, false),
        Field::new("request", DataType::Int64, false),
        Field::new("row_no", DataType::Int32, false),
        Field::new("value", DataType::Int64, false),
        Field::new("note", DataType::Utf8, false),
    ]))
}

/// `value` of a row, and the same as SQL over the table's columns (checked by the checker).
pub fn value(producer: i32, request: i64, row_no: i32) -> i64 {
    request * 1_000_003 + i64::from(row_no) * 7 + i64::from(producer) * 13
}
pub const VALUE_SQL: &str = "request * 1000003 + row_no * 7 + producer * 13";

/// `note` of a row, and the same as SQL.
pub fn note(producer: i32, request: i64, row_no: i32) -> String {
    format!("p{producer}-r{request}-{row_no}")
}
pub const NOTE_SQL: &str = "concat('p', producer, '-r', request, '-', row_no)";

/// Rows `first..first + rows` of request `request` of producer `producer`.
pub fn batch(producer: i32, request: i64, first: i32, rows: i32) -> RecordBatch {
    let range = first..first + rows;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from_value(producer, rows as usize)),
        Arc::new(Int64Array::from_value(request, rows as usize)),
        Arc::new(Int32Array::from_iter_values(range.clone())),
        Arc::new(Int64Array::from_iter_values(range.clone().map(|r| value(producer, request, r)))),
        Arc::new(StringArray::from_iter_values(range.map(|r| note(producer, request, r)))),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the schema")
}

/// A whole request of `rows` rows, cut into batches of at most `batch_rows`.
pub fn request_batches(producer: i32, request: i64, rows: i32, batch_rows: i32) -> Vec<RecordBatch> {
    (0..rows)
        .step_by(batch_rows as usize)
        .map(|first| batch(producer, request, first, batch_rows.min(rows - first)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_cut_into_batches_that_number_its_rows_in_order() {
        let batches = request_batches(3, 9, 25, 10);
        assert_eq!(batches.iter().map(RecordBatch::num_rows).collect::<Vec<_>>(), [10, 10, 5]);
        let last = batches[2].column(2).as_any().downcast_ref::<Int32Array>().unwrap();
        assert_eq!(last.values().to_vec(), [20, 21, 22, 23, 24]);
        let notes = batches[2].column(4).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(notes.value(0), "p3-r9-20");
        assert_eq!(value(3, 9, 20), 9 * 1_000_003 + 140 + 39);
    }
}
