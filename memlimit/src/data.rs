//! Lineitem-like data (TPC-H's widest table, with its column types), generated deterministically.
//! Copied from `bench/src/data.rs`, with a column count: a table of `columns` cycles through the 16
//! lineitem columns (`l_partkey`, then `l_partkey_1`, ...), since DuckDB's memory needs grow with the
//! width of the table.

use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Decimal128Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

const SHIP_MODES: [&str; 7] = ["AIR", "FOB", "MAIL", "RAIL", "REG AIR", "SHIP", "TRUCK"];
const INSTRUCTIONS: [&str; 4] = ["COLLECT COD", "DELIVER IN PERSON", "NONE", "TAKE BACK RETURN"];
const WORDS: [&str; 8] = ["furiously", "carefully", "regular", "ideas", "deposits", "sleep", "quickly", "final"];

fn lineitem_schema() -> SchemaRef {
    let money = DataType::Decimal128(15, 2);
    Arc::new(Schema::new(vec![
        Field::new("l_orderkey", DataType::Int64, false),
        Field::new("l_partkey", DataType::Int64, false),
        Field::new("l_suppkey", DataType::Int64, false),
        Field::new("l_linenumber", DataType::Int32, false),
        Field::new("l_quantity", money.clone(), false),
        Field::new("l_extendedprice", money.clone(), false),
        Field::new("l_discount", money.clone(), false),
        Field::new("l_tax", money, false),
        Field::new("l_returnflag", DataType::Utf8, false),
        Field::new("l_linestatus", DataType::Utf8, false),
        Field::new("l_shipdate", DataType::Date32, false),
        Field::new("l_commitdate", DataType::Date32, false),
        Field::new("l_receiptdate", DataType::Date32, false),
        Field::new("l_shipinstruct", DataType::Utf8, false),
        Field::new("l_shipmode", DataType::Utf8, false),
        Field::new("l_comment", DataType::Utf8, false),
    ]))
}

/// Rows `start..start + rows` of the 16 lineitem columns.
fn lineitem_batch(start: u64, rows: usize) -> RecordBatch {
    let keys = |m: u64| {
        Int64Array::from_iter_values((start..start + rows as u64).map(move |i| (mix(i, m) % 2_000_000) as i64))
    };
    let money = |m: u64, max: u64| {
        Decimal128Array::from_iter_values((start..start + rows as u64).map(move |i| (mix(i, m) % max) as i128))
            .with_precision_and_scale(15, 2)
            .expect("valid decimal precision")
    };
    let pick = |m: u64, options: &'static [&'static str]| {
        StringArray::from_iter_values(
            (start..start + rows as u64).map(move |i| options[(mix(i, m) % options.len() as u64) as usize]),
        )
    };
    let dates = |m: u64| {
        Date32Array::from_iter_values((start..start + rows as u64).map(move |i| 8_000 + (mix(i, m) % 2_500) as i32))
    };
    let comments = StringArray::from_iter_values((start..start + rows as u64).map(|i| {
        let h = mix(i, 99);
        format!(
            "{} {} {} {}",
            WORDS[(h % 8) as usize],
            WORDS[(h >> 8) as usize % 8],
            WORDS[(h >> 16) as usize % 8],
            i % 1000
        )
    }));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values((start..start + rows as u64).map(|i| (i / 4) as i64))),
        Arc::new(keys(1)),
        Arc::new(keys(2)),
        Arc::new(Int32Array::from_iter_values((start..start + rows as u64).map(|i| (i % 4 + 1) as i32))),
        Arc::new(money(3, 5_000)),
        Arc::new(money(4, 10_000_000)),
        Arc::new(money(5, 11)),
        Arc::new(money(6, 9)),
        Arc::new(pick(7, &["A", "N", "R"])),
        Arc::new(pick(8, &["F", "O"])),
        Arc::new(dates(9)),
        Arc::new(dates(10)),
        Arc::new(dates(11)),
        Arc::new(pick(12, &INSTRUCTIONS)),
        Arc::new(pick(13, &SHIP_MODES)),
        Arc::new(comments),
    ];
    RecordBatch::try_new(lineitem_schema(), columns).expect("columns match the schema")
}

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

/// A cheap deterministic hash (splitmix64).
fn mix(i: u64, salt: u64) -> u64 {
    let mut z = i.wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
