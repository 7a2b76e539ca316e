//! Every type in the mapping round-trips: values read back from DuckDB equal what was sent.

use std::sync::Arc;

use arrow::array::*;
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, concat};
use arrow::datatypes::*;

use crate::support::*;

/// One column per Arrow type, three rows each (with a null where the type allows it).
fn columns() -> Vec<(&'static str, ArrayRef)> {
    let day_ms = 86_400_000;
    let mut map = MapBuilder::new(None, StringBuilder::new(), Int64Builder::new());
    map.keys().append_value("a");
    map.values().append_value(1);
    map.append(true).unwrap();
    map.append(false).unwrap();
    map.keys().append_value("b");
    map.values().append_value(2);
    map.keys().append_value("c");
    map.values().append_value(3);
    map.append(true).unwrap();
    let item = |t: DataType| Arc::new(Field::new("item", t, true));
    let structs = StructArray::from(vec![
        (
            Arc::new(Field::new("a", DataType::Int32, true)),
            Arc::new(Int32Array::from(vec![Some(1), None, Some(3)])) as ArrayRef,
        ),
        (
            Arc::new(Field::new("b", DataType::Utf8, true)),
            Arc::new(StringArray::from(vec![Some("x"), Some("y"), None])) as ArrayRef,
        ),
    ]);
    let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![Some(vec![Some(1), None]), None, Some(vec![])]);
    let large_lists = LargeListArray::new(
        item(DataType::Utf8),
        OffsetBuffer::new(vec![0i64, 2, 2, 3].into()),
        Arc::new(StringArray::from(vec![Some("p"), None, Some("q")])),
        Some(vec![true, false, true].into()),
    );
    let fixed_lists = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
        vec![Some(vec![Some(1.0), Some(2.0)]), None, Some(vec![Some(3.5), None])],
        2,
    );
    let dictionary: DictionaryArray<Int32Type> = vec![Some("red"), None, Some("red")].into_iter().collect();
    vec![
        ("bool", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))),
        ("i8", Arc::new(Int8Array::from(vec![Some(i8::MIN), None, Some(i8::MAX)]))),
        ("i16", Arc::new(Int16Array::from(vec![Some(i16::MIN), None, Some(i16::MAX)]))),
        ("i32", Arc::new(Int32Array::from(vec![Some(i32::MIN), None, Some(i32::MAX)]))),
        ("i64", Arc::new(Int64Array::from(vec![Some(i64::MIN), None, Some(i64::MAX)]))),
        ("u8", Arc::new(UInt8Array::from(vec![Some(0), None, Some(u8::MAX)]))),
        ("u16", Arc::new(UInt16Array::from(vec![Some(0), None, Some(u16::MAX)]))),
        ("u32", Arc::new(UInt32Array::from(vec![Some(0), None, Some(u32::MAX)]))),
        ("u64", Arc::new(UInt64Array::from(vec![Some(0), None, Some(u64::MAX)]))),
        ("f32", Arc::new(Float32Array::from(vec![Some(1.5), None, Some(f32::MAX)]))),
        ("f64", Arc::new(Float64Array::from(vec![Some(0.1), None, Some(f64::MIN_POSITIVE)]))),
        (
            "dec15_2",
            Arc::new(
                Decimal128Array::from(vec![Some(12_345), None, Some(-1)]).with_precision_and_scale(15, 2).unwrap(),
            ),
        ),
        (
            "dec38_10",
            Arc::new(
                Decimal128Array::from(vec![Some(10i128.pow(37)), None, Some(-7)])
                    .with_precision_and_scale(38, 10)
                    .unwrap(),
            ),
        ),
        ("utf8", Arc::new(StringArray::from(vec![Some("héllo"), None, Some("")]))),
        ("large_utf8", Arc::new(LargeStringArray::from(vec![Some("a"), None, Some("b")]))),
        (
            "utf8_view",
            Arc::new(StringViewArray::from(vec![Some("short"), None, Some("a string longer than twelve bytes")])),
        ),
        ("binary", Arc::new(BinaryArray::from(vec![Some(&b"\x00\x01"[..]), None, Some(&b""[..])]))),
        ("large_binary", Arc::new(LargeBinaryArray::from(vec![Some(&b"\xff"[..]), None, Some(&b"z"[..])]))),
        (
            "binary_view",
            Arc::new(BinaryViewArray::from(vec![Some(&b"\x00"[..]), None, Some(&b"0123456789abcdef"[..])])),
        ),
        (
            "fixed_binary",
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    vec![Some(b"abcd"), None, Some(b"wxyz")].into_iter(),
                    4,
                )
                .unwrap(),
            ),
        ),
        ("date32", Arc::new(Date32Array::from(vec![Some(0), None, Some(19_000)]))),
        ("date64", Arc::new(Date64Array::from(vec![Some(0), None, Some(19_000 * day_ms)]))),
        ("time32_s", Arc::new(Time32SecondArray::from(vec![Some(0), None, Some(86_399)]))),
        ("time32_ms", Arc::new(Time32MillisecondArray::from(vec![Some(1), None, Some(86_399_999)]))),
        ("time64_us", Arc::new(Time64MicrosecondArray::from(vec![Some(1), None, Some(86_399_999_999)]))),
        ("time64_ns", Arc::new(Time64NanosecondArray::from(vec![Some(1_000), None, Some(86_399_999_999_000)]))),
        ("ts_s", Arc::new(TimestampSecondArray::from(vec![Some(0), None, Some(1_700_000_000)]))),
        ("ts_ms", Arc::new(TimestampMillisecondArray::from(vec![Some(1), None, Some(1_700_000_000_123)]))),
        ("ts_us", Arc::new(TimestampMicrosecondArray::from(vec![Some(1), None, Some(1_700_000_000_123_456)]))),
        ("ts_ns", Arc::new(TimestampNanosecondArray::from(vec![Some(1), None, Some(1_700_000_000_123_456_789)]))),
        (
            "ts_s_utc",
            Arc::new(TimestampSecondArray::from(vec![Some(0), None, Some(1_700_000_000)]).with_timezone("UTC")),
        ),
        (
            "ts_ms_tz",
            Arc::new(
                TimestampMillisecondArray::from(vec![Some(5), None, Some(1_700_000_000_123)]).with_timezone("+02:00"),
            ),
        ),
        (
            "ts_us_utc",
            Arc::new(
                TimestampMicrosecondArray::from(vec![Some(1), None, Some(1_700_000_000_123_456)]).with_timezone("UTC"),
            ),
        ),
        (
            "ts_ns_utc",
            Arc::new(
                TimestampNanosecondArray::from(vec![Some(1_000), None, Some(1_700_000_000_123_456_000)])
                    .with_timezone("UTC"),
            ),
        ),
        ("duration_s", Arc::new(DurationSecondArray::from(vec![Some(1), None, Some(3_600)]))),
        ("duration_ms", Arc::new(DurationMillisecondArray::from(vec![Some(1), None, Some(86_400_000)]))),
        ("duration_us", Arc::new(DurationMicrosecondArray::from(vec![Some(1), None, Some(-5)]))),
        ("duration_ns", Arc::new(DurationNanosecondArray::from(vec![Some(1_000), None, Some(7_000)]))),
        ("interval_ym", Arc::new(IntervalYearMonthArray::from(vec![Some(14), None, Some(-1)]))),
        (
            "interval_mdn",
            Arc::new(IntervalMonthDayNanoArray::from(vec![
                Some(IntervalMonthDayNano::new(1, 2, 3_000)),
                None,
                Some(IntervalMonthDayNano::new(0, 0, 0)),
            ])),
        ),
        ("list", Arc::new(lists)),
        ("large_list", Arc::new(large_lists)),
        ("fixed_list", Arc::new(fixed_lists)),
        ("struct", Arc::new(structs)),
        ("map", Arc::new(map.finish())),
        ("dictionary", Arc::new(dictionary)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_type_round_trips() {
    let server = TestServer::start().await;
    let mut columns = columns();
    if crate::support::on_ducklake() {
        // DuckLake cannot store fixed-size arrays: each such column alone is refused, naming the kind.
        let (fixed, rest): (Vec<_>, Vec<_>) =
            columns.into_iter().partition(|(_, array)| matches!(array.data_type(), DataType::FixedSizeList(..)));
        assert!(!fixed.is_empty());
        for (name, array) in fixed {
            let schema = Arc::new(Schema::new(vec![Field::new(name, array.data_type().clone(), true)]));
            let batch = RecordBatch::try_new(schema, vec![array]).unwrap();
            let response = server.ingest("fixed_size", ipc_stream(&[batch], None)).await;
            let (status, code) = error_code(response).await;
            assert_eq!((status, code.as_str()), (422, "unsupported_type"), "{name}");
        }
        columns = rest;
    }
    let mut fields = vec![Field::new("id", DataType::Int32, false)];
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(Int32Array::from(vec![0, 1, 2]))];
    for (name, array) in &columns {
        fields.push(Field::new(*name, array.data_type().clone(), true));
        arrays.push(array.clone());
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    server.ingest_ok("all_types", ipc_stream(&[batch], None)).await;

    let mut failures = Vec::new();
    for (name, sent) in &columns {
        let got = server.query_arrow(&format!("SELECT \"{name}\" FROM all_types ORDER BY id"));
        let got = concat(&got.iter().map(|b| b.column(0).as_ref()).collect::<Vec<_>>()).unwrap();
        if let Err(problem) = same_values(sent, &got) {
            failures.push(format!("{name}: {problem}"));
        }
    }
    assert!(failures.is_empty(), "types that did not round-trip:\n{}", failures.join("\n"));
    server.stop().await;
}

/// Compares logically: DuckDB answers in its own Arrow types (e.g. DATE as date32), so the answer is cast
/// back to the sent type; where that cast does not exist (DuckDB's one INTERVAL type comes back as
/// month-day-nano) the sent values are cast to the answer's type instead. Dictionaries compare by value.
fn same_values(sent: &ArrayRef, got: &ArrayRef) -> Result<(), String> {
    let sent = match sent.data_type() {
        DataType::Dictionary(_, value) => cast(sent, value).unwrap(),
        _ => sent.clone(),
    };
    let (left, right) = match cast(got, sent.data_type()) {
        Ok(back) => (sent.clone(), back),
        Err(_) => {
            let forward = cast(&sent, got.data_type())
                .map_err(|e| format!("{} and {} do not compare: {e}", sent.data_type(), got.data_type()))?;
            (forward, got.clone())
        }
    };
    if left.as_ref() == right.as_ref() { Ok(()) } else { Err(format!("sent {sent:?}\n  got {got:?}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_duckdb_would_misread_are_refused() {
    let server = TestServer::start().await;
    let day_time: ArrayRef = Arc::new(IntervalDayTimeArray::from(vec![IntervalDayTime::new(1, 500)]));
    let half: ArrayRef = Arc::new(Float16Array::from(vec![half::f16::from_f32(1.5)]));
    for (name, array) in [("day_time", day_time), ("half", half)] {
        let schema = Arc::new(Schema::new(vec![Field::new(name, array.data_type().clone(), true)]));
        let batch = RecordBatch::try_new(schema, vec![array]).unwrap();
        let (status, code) = error_code(server.ingest(name, ipc_stream(&[batch], None)).await).await;
        assert_eq!((status, code.as_str()), (422, "unsupported_type"), "{name}");
        assert_eq!(server.count(name), None);
    }
    server.stop().await;
}
