//! What an attacker (or a broken producer) sends: every case gets a clear refusal, writes nothing, and a
//! legitimate request right after it succeeds.

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow_flight::FlightData;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_ipc::CompressionType;
use arrowport_config::Config;
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Code;

use crate::flight::{channel, put, put_messages, sql_query};
use crate::support::*;

/// Where a record batch message's header and body lie in an IPC stream: the first message after the
/// schema.
fn batch_message(stream: &[u8]) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let mut at = 0;
    loop {
        assert_eq!(stream[at..at + 4], [0xFF; 4], "continuation marker");
        let len = i32::from_le_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
        let header = at + 8..at + 8 + len;
        let message = arrow_ipc::root_as_message(&stream[header.clone()]).unwrap();
        let body = header.end..header.end + message.bodyLength() as usize;
        if message.header_type() == arrow_ipc::MessageHeader::RecordBatch {
            return (header, body);
        }
        at = body.end;
    }
}

/// The `(offset, length)` of every buffer a batch message's header lists, and where in the header
/// each buffer's 16-byte entry lies.
fn buffers(header: &[u8]) -> Vec<(usize, usize, usize)> {
    let message = arrow_ipc::root_as_message(header).unwrap();
    let buffers = message.header_as_record_batch().unwrap().buffers().unwrap();
    let entries = buffers.bytes().as_ptr() as usize - header.as_ptr() as usize;
    buffers.iter().enumerate().map(|(i, b)| (entries + 16 * i, b.offset() as usize, b.length() as usize)).collect()
}

/// A zstd-compressed stream whose first non-empty buffer claims to decompress to 1 TiB: about 500 bytes
/// that arrow-ipc alone would answer with a 1 TiB allocation and an abort.
fn compression_bomb() -> Vec<u8> {
    let mut stream = ipc_stream(&[batch(0, 10)], Some(CompressionType::ZSTD));
    let (header, body) = batch_message(&stream);
    let (_, offset, _) = buffers(&stream[header]).into_iter().find(|(_, _, length)| *length >= 8).unwrap();
    let prefix = body.start + offset;
    stream[prefix..prefix + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_refused_over_http_and_flight() {
    let server = TestServer::start().await;
    let bomb = compression_bomb();
    assert!(bomb.len() < 1000, "{} bytes", bomb.len());
    let response = server.ingest_with("bomb", bomb, &[("content-type", STREAM_TYPE)]).await;
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (413, "batch_too_large"));

    // The same buffer over Flight: the batch message's body, patched the same way.
    let mut messages = flight_messages("bomb", CompressionType::ZSTD);
    let last = messages.last_mut().unwrap();
    let (_, offset, _) = buffers(&last.data_header).into_iter().find(|(_, _, length)| *length >= 8).unwrap();
    let mut body = last.data_body.to_vec();
    body[offset..offset + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
    last.data_body = body.into();
    let status = put(&server, messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "batch_too_large");

    assert_eq!(server.count("bomb"), None, "nothing was written");
    server.ingest_ok("bomb", ipc_stream(&[batch(0, 10)], Some(CompressionType::ZSTD))).await;
    put(&server, flight_messages("bomb", CompressionType::ZSTD)).await.unwrap();
    assert_eq!(server.count("bomb"), Some(20));
    server.stop().await;
}

/// A DoPut of ten compressed rows for `stream`.
fn flight_messages(stream: &str, compression: CompressionType) -> Vec<FlightData> {
    let options = arrow_ipc::writer::IpcWriteOptions::default().try_with_compression(Some(compression)).unwrap();
    let encoder = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_options(options)
        .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_path(vec![stream.to_owned()])))
        .build(futures::stream::iter([Ok(batch(0, 10))]));
    futures::executor::block_on(encoder.try_collect()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_outside_the_body_is_400_not_a_panic() {
    let server = TestServer::start().await;
    let mut stream = ipc_stream(&[batch(0, 100)], None);
    let (header, _) = batch_message(&stream);
    let (entry, _, _) = buffers(&stream[header.clone()])[1];
    // The buffer's length (the entry's second i64), patched to 1 GiB.
    let length = header.start + entry + 8;
    stream[length..length + 8].copy_from_slice(&(1i64 << 30).to_le_bytes());
    let response = server.ingest_with("outside", stream, &[("content-type", STREAM_TYPE)]).await;
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (400, "invalid_ipc"));
    assert_eq!(server.count("outside"), None);
    assert!(server.metrics().await.contains("arrowport_panics_total 0"), "no handler panicked");
    server.ingest_ok("outside", ipc_stream(&[batch(0, 100)], None)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_408_after_the_idle_timeout() {
    let mut config = Config::default();
    config.limits.idle_timeout_seconds = 1;
    let server = TestServer::with_config(config).await;
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "POST /ingest/stalled HTTP/1.1\r\nHost: {address}\r\nContent-Type: {STREAM_TYPE}\r\n\
         Content-Length: 100000\r\n\r\nabc"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"idle_timeout""#), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(server.count("stalled"), None);
    server.ingest_ok("stalled", ipc_stream(&[batch(0, 10)], None)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_body_being_received_holds_its_room_in_the_budget_and_one_too_large_is_never_buffered() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(arrowport_config::ByteSize::mib(4));
    let server = TestServer::with_config(config).await;
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let inflight = || async { metric(&server.metrics().await, "arrowport_inflight_bytes").unwrap() };
    // A batch of about 1.6 MB, sent all but its last bytes: its body's room is taken before it arrives.
    let body = ipc_stream(&[batch(0, 100_000)], None);
    let (head, tail) = body.split_at(body.len() - 100);
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let request = format!(
        "POST /ingest/receiving HTTP/1.1\r\nHost: {address}\r\nContent-Type: {STREAM_TYPE}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    socket.write_all(head).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while inflight().await < 1_000_000.0 {
        assert!(Instant::now() < deadline, "the body's room was never taken: {}", inflight().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    socket.write_all(tail).await.unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(server.count("receiving"), Some(100_000));
    assert_eq!(inflight().await, 0.0);
    // A body larger than the whole budget is read past unbuffered, and refused once it is in.
    let body = ipc_stream(&[batch(0, 400_000)], None);
    let response = server.ingest("receiving", body).await;
    assert_eq!(response.status(), 413);
    assert!(response.text().await.unwrap().contains("batch_too_large"));
    assert_eq!(server.count("receiving"), Some(100_000));
    server.stop().await;
}

/// A DoPut that sends its schema and one batch for `stream`, then nothing while the returned sender
/// lives; the task ends with the status the call failed with.
async fn stalled_do_put(
    server: &TestServer,
    stream: &str,
) -> (mpsc::Sender<FlightData>, tokio::task::JoinHandle<tonic::Status>) {
    do_put_sending(server, put_messages(stream, &[batch(0, 10)])).await
}

/// A DoPut that sends `first`, then what comes through the returned sender; the task ends with the
/// status the call failed with.
async fn do_put_sending(
    server: &TestServer,
    first: Vec<FlightData>,
) -> (mpsc::Sender<FlightData>, tokio::task::JoinHandle<tonic::Status>) {
    let (tx, rx) = mpsc::channel(4);
    for message in first {
        tx.send(message).await.unwrap();
    }
    let mut client = arrow_flight::FlightClient::new(channel(server).await);
    let call = tokio::spawn(async move {
        let messages = futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|m| (Ok(m), rx)) });
        let outcome = match client.do_put(messages).await {
            Ok(replies) => replies.try_collect::<Vec<_>>().await.map(|_| ()),
            Err(error) => Err(error),
        };
        match outcome {
            Err(arrow_flight::error::FlightError::Tonic(status)) => *status,
            other => panic!("the call should fail with a status: {other:?}"),
        }
    });
    (tx, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_do_put_is_deadline_exceeded_after_the_idle_timeout() {
    let mut config = Config::default();
    config.limits.idle_timeout_seconds = 1;
    let server = TestServer::with_config(config).await;
    let started = Instant::now();
    let (tx, call) = stalled_do_put(&server, "stalled").await;
    let status = call.await.unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);
    assert_eq!(server.count("stalled"), None, "the stalled call's batch was rolled back");
    // A call that never sends its first message, and one that ends without any.
    let (silent, call) = do_put_sending(&server, Vec::new()).await;
    let status = call.await.unwrap();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    assert_eq!(code_of(&status), "idle_timeout");
    drop(silent);
    let (empty, call) = do_put_sending(&server, Vec::new()).await;
    drop(empty);
    let status = call.await.unwrap();
    assert_eq!((status.code(), code_of(&status).as_str()), (Code::InvalidArgument, "invalid_request"), "{status}");
    put(&server, put_messages("stalled", &[batch(0, 10)])).await.unwrap();
    server.stop().await;
}

/// The `x-arrowport-code` a failed call carries.
fn code_of(status: &tonic::Status) -> String {
    let code = status.metadata().get(arrowport_api::ERROR_CODE_METADATA).map(|value| value.to_str().unwrap());
    code.unwrap_or_default().to_owned()
}

/// Stops the server once one request is in flight; the stop must not wait past the shutdown deadline.
async fn stop_with_one_request_open(server: TestServer) -> std::sync::Arc<arrowport::app::App> {
    wait_until("the request is in flight", Duration::from_secs(10), || async {
        metric(&server.metrics().await, "arrowport_inflight_requests ") == Some(1.0)
    })
    .await;
    let state = server.app.clone();
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after {:?}", started.elapsed());
    state
}

fn has_table(state: &arrowport::app::App, table: &str) -> bool {
    let count = state.database().with_connection(|c| {
        c.query_row("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table], |r| r.get::<_, i64>(0))
    });
    count.unwrap() > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_rolls_back_a_stalled_upload_at_its_deadline() {
    let mut config = Config::default();
    config.limits.shutdown_timeout_seconds = 1;
    let server = TestServer::with_config(config).await;
    let stream = ipc_stream(&[batch(0, 10)], None);
    let (tx, upload) = spawn_upload(&server, "stalled");
    tx.send(Ok(Bytes::copy_from_slice(&stream[..stream.len() - 8]))).await.unwrap();
    let state = stop_with_one_request_open(server).await;
    let (status, code) = error_code(upload.await.unwrap()).await;
    assert_eq!((status, code.as_str()), (503, "shutting_down"));
    drop(tx);
    assert!(!has_table(&state, "stalled"), "nothing of the upload was written");
}

/// Statements that would read the server's files, list or reach what is not a stream table.
const FORBIDDEN: &[&str] = &[
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_csv('/etc/passwd', header = false)",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM duckdb_views()",
    "SELECT * FROM duckdb_views",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM arrowport_scratch.main.ingest_0",
    "SELECT (SELECT count(*) FROM arrowport_scratch.main.ingest_0) AS n",
    "WITH v AS (SELECT * FROM arrowport_scratch.main.ingest_0) SELECT * FROM v",
    "SHOW ALL TABLES",
    "SELECT * FROM query_table('events')",
    // A CTE's name covers only its own query: elsewhere the name is the catalog's.
    "SELECT * FROM duckdb_columns, (WITH duckdb_columns AS (SELECT 1) SELECT 1) s",
    "WITH a AS (SELECT * FROM duckdb_views), duckdb_views AS (SELECT 1) SELECT * FROM a",
    "WITH duckdb_views AS (SELECT * FROM duckdb_views) SELECT * FROM duckdb_views",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_reads_no_files_and_no_other_catalog() {
    let server = TestServer::start().await;
    server.ingest_ok("events", ipc_stream(&[batch(0, 100)], None)).await;
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    for statement in FORBIDDEN {
        let error = sql_query(&mut sql, statement).await.unwrap_err();
        assert!(error.contains("InvalidArgument") || error.contains("invalid argument"), "{statement}: {error}");
        assert!(!error.contains("root:"), "{statement} leaked a file: {error}");
    }
    // What a client may do still works: tables, CTEs, computed rows, DESCRIBE.
    for (statement, rows) in [
        ("SELECT count(*) FROM events", 1),
        ("WITH e AS (SELECT id FROM main.events WHERE id < 10) SELECT * FROM e", 10),
        ("WITH e AS (SELECT id FROM events), f AS (SELECT * FROM e WHERE id < 5) SELECT * FROM f", 5),
        ("SELECT * FROM (WITH e AS (SELECT id FROM events) SELECT * FROM (SELECT * FROM e) x) y", 100),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) SELECT * FROM r", 4),
        ("SELECT * FROM range(3)", 3),
        ("DESCRIBE events", 3),
    ] {
        assert_eq!(sql_query(&mut sql, statement).await.unwrap().num_rows(), rows, "{statement}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_upload_cannot_be_listed_or_scanned_and_commits_exactly_its_rows() {
    let server = TestServer::start().await;
    // A chunk of rows or more streams into DuckDB at once: the upload's scan view exists from here.
    let stream = ipc_stream(&[batch(0, 150_000), batch(150_000, 1000)], None);
    let (_, first_body) = batch_message(&stream);
    let split = first_body.end;
    let (tx, upload) = spawn_upload(&server, "live");
    tx.send(Ok(Bytes::copy_from_slice(&stream[..split]))).await.unwrap();
    let views = || {
        server.app.database().with_connection(|c| {
            c.query_row(
                "SELECT string_agg(database_name || '.' || schema_name || '.' || view_name, ',') FROM duckdb_views() \
                 WHERE NOT internal",
                [],
                |r| r.get::<_, Option<String>>(0),
            )
        })
    };
    let mut view = None;
    wait_until("the upload's scan view exists", Duration::from_secs(20), || {
        view = views().unwrap();
        std::future::ready(view.is_some())
    })
    .await;
    let view = view.unwrap();
    assert!(view.starts_with("arrowport_scratch.main.ingest_"), "{view}");

    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    for statement in [
        "SELECT view_name FROM duckdb_views()".to_owned(),
        "SELECT * FROM information_schema.views".to_owned(),
        format!("SELECT count(*) FROM {view}"),
        format!("SELECT * FROM {view} LIMIT 1"),
    ] {
        let error = sql_query(&mut sql, &statement).await.unwrap_err();
        assert!(error.contains("InvalidArgument") || error.contains("invalid argument"), "{statement}: {error}");
    }

    tx.send(Ok(Bytes::copy_from_slice(&stream[split..]))).await.unwrap();
    drop(tx);
    let response = upload.await.unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(report["rows"], 151_000);
    assert_eq!(server.count("live"), Some(151_000));
    let ids: i64 = server.scalar("SELECT sum(id)::BIGINT FROM live");
    assert_eq!(ids, (0..151_000).sum::<i64>(), "exactly its rows, none stolen or doubled");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_budget_is_never_retryable() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(arrowport_config::ByteSize::mib(1));
    let server = TestServer::with_config(config).await;
    // 100,000 rows of 16 int64 columns: 12.8 MB, more than the whole 1 MiB budget.
    let columns: Vec<(String, arrow::array::ArrayRef)> = (0..16)
        .map(|i| (format!("c{i}"), std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(0..100_000)) as _))
        .collect();
    let wide = RecordBatch::try_from_iter(columns).unwrap();
    for _ in 0..3 {
        let (status, code) =
            error_code(server.ingest("wide", ipc_stream(std::slice::from_ref(&wide), None)).await).await;
        assert_eq!((status, code.as_str()), (413, "batch_too_large"));
    }
    assert_eq!(server.count("wide"), None);
    server.ingest_ok("wide", ipc_stream(&[wide.slice(0, 1000)], None)).await;
    server.stop().await;
}

async fn boom() -> &'static str {
    panic!("a bug")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_answers_500_json_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    // No real handler can be made to panic (that is the point); a route that does, behind the same layer.
    let app = axum::Router::new()
        .route("/boom", axum::routing::get(boom))
        .route("/fine", axum::routing::get(|| async { "fine" }))
        .layer(arrowport::transport::catch_panics(&server.app, arrowport::transport::http::panicked));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for _ in 0..2 {
        let (status, code) = error_code(server.client.get(format!("{url}/boom")).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (500, "internal"));
    }
    assert_eq!(server.client.get(format!("{url}/fine")).send().await.unwrap().text().await.unwrap(), "fine");
    assert_eq!(metric(&server.metrics().await, "arrowport_panics_total "), Some(2.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_put_buffer_outside_its_body_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut messages = put_messages("outside", &[batch(0, 100)]);
    let last = messages.last_mut().unwrap();
    let mut header = last.data_header.to_vec();
    let (entry, _, _) = buffers(&header)[1];
    header[entry + 8..entry + 16].copy_from_slice(&(1i64 << 30).to_le_bytes());
    last.data_header = header.into();
    let status = put(&server, messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "invalid_ipc");
    assert_eq!(server.count("outside"), None);
    put(&server, put_messages("outside", &[batch(0, 100)])).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_rolls_back_a_stalled_do_put_at_its_deadline() {
    let mut config = Config::default();
    config.limits.shutdown_timeout_seconds = 1;
    let server = TestServer::with_config(config).await;
    let (tx, call) = stalled_do_put(&server, "stalled").await;
    let state = stop_with_one_request_open(server).await;
    let status = call.await.unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    drop(tx);
    assert!(!has_table(&state, "stalled"), "nothing of the call was written");
}
