//! Bad input is normal input: each case gets its status and JSON error, writes nothing, and the
//! server keeps serving.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrowport_config::{ByteSize, Config};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::support::*;

/// Sends `body` to a table that already holds 10 rows and checks the refusal left it at 10.
async fn refused(server: &TestServer, body: Vec<u8>, headers: &[(&str, &str)], expect: (u16, &str)) {
    let response = server.ingest_with("victim", body, headers).await;
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), expect);
    assert_eq!(server.count("victim"), Some(10), "nothing of a refused request may land");
}

async fn server_with_victim(config: Config) -> TestServer {
    let server = TestServer::with_config(config).await;
    server.ingest_ok("victim", ipc_stream(&[batch(0, 10)], None)).await;
    server
}

/// The server still takes good data.
async fn still_serving(server: &TestServer) {
    server.ingest_ok("victim", ipc_stream(&[batch(100, 1)], None)).await;
    assert_eq!(server.count("victim"), Some(11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_empty_bodies_are_400() {
    let server = server_with_victim(Config::default()).await;
    let stream = STREAM_TYPE;
    refused(&server, b"this is not arrow at all".to_vec(), &[("content-type", stream)], (400, "invalid_ipc")).await;
    let good = ipc_stream(&[batch(0, 1000), batch(1000, 1000)], None);
    for cut in [5, 200, good.len() / 2, good.len() - 9] {
        refused(&server, good[..cut].to_vec(), &[("content-type", stream)], (400, "invalid_ipc")).await;
    }
    refused(&server, Vec::new(), &[("content-type", stream)], (400, "empty_body")).await;
    let file = ipc_file(&[batch(0, 100)]);
    refused(&server, file[..file.len() - 3].to_vec(), &[("content-type", FILE_TYPE)], (400, "invalid_ipc")).await;
    refused(
        &server,
        b"garbage".to_vec(),
        &[("content-type", stream), ("content-encoding", "zstd")],
        (400, "invalid_encoding"),
    )
    .await;
    still_serving(&server).await;
    server.stop().await;
}

/// `bytes` as one zstd frame that declares a `window_log` window (no size pledged, so it is kept).
fn zstd_with_window(bytes: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    encoder.window_log(window_log).unwrap();
    encoder.long_distance_matching(true).unwrap();
    std::io::Write::write_all(&mut encoder, bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_decompresses_without_end_or_needs_a_huge_window_is_refused_at_once() {
    let server = server_with_victim(Config::default()).await;
    let zstd = [("content-type", FILE_TYPE), ("content-encoding", "zstd")];
    // 1 GiB of zeros after the file magic, ~40 KB compressed: refused as the padding runs past 64 bytes.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    std::io::Write::write_all(&mut encoder, b"ARROW1").unwrap();
    let zeros = vec![0u8; 1 << 20];
    (0..1024).for_each(|_| std::io::Write::write_all(&mut encoder, &zeros).unwrap());
    let endless = encoder.finish().unwrap();
    let response = server.ingest_with("victim", endless, &zstd).await;
    let status = response.status().as_u16();
    let message = response.text().await.unwrap();
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("padding after the IPC file's magic"), "{message}");
    assert_eq!(server.count("victim"), Some(10));
    // A frame that needs a 128 MiB window, which the decoder would allocate outside the memory budget.
    let body = ipc_stream(&[batch(0, 5)], None);
    let huge_window = zstd_with_window(&body, 27);
    let stream_zstd = [("content-type", STREAM_TYPE), ("content-encoding", "zstd")];
    refused(&server, huge_window, &stream_zstd, (400, "invalid_encoding")).await;
    // The largest window allowed (16 MiB, what levels up to 19 use) is fine.
    server.ingest_with("victim", zstd_with_window(&body, 24), &stream_zstd).await.error_for_status().unwrap();
    assert_eq!(server.count("victim"), Some(15));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_content_type_and_encoding_are_415() {
    let server = server_with_victim(Config::default()).await;
    let body = ipc_stream(&[batch(0, 5)], None);
    refused(&server, body.clone(), &[("content-type", "application/json")], (415, "unsupported_media_type")).await;
    refused(&server, body, &[("content-type", STREAM_TYPE), ("content-encoding", "br")], (415, "unsupported_encoding"))
        .await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_messages_are_413() {
    let mut config = Config::default();
    config.limits.max_body_bytes = ByteSize(256 * 1024);
    config.limits.max_message_bytes = ByteSize(32 * 1024);
    let server = server_with_victim(config).await;
    // Declared too large: refused before reading. Batches stay under the message limit.
    let batches: Vec<_> = (0..20).map(|i| batch(i * 600, 600)).collect();
    let big = ipc_stream(&batches, None);
    assert!(big.len() > 256 * 1024);
    refused(&server, big.clone(), &[("content-type", STREAM_TYPE)], (413, "body_too_large")).await;
    // Chunked (no length): refused once the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let response = server.ingest_with("victim", body, &[("content-type", STREAM_TYPE)]).await;
    assert_eq!(error_code(response).await, (413, "body_too_large".to_owned()));
    // One record batch larger than a message may be.
    refused(&server, ipc_stream(&[batch(0, 3000)], None), &[("content-type", STREAM_TYPE)], (413, "message_too_large"))
        .await;
    assert_eq!(server.count("victim"), Some(10));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_mismatch_is_422_and_counted() {
    let server = server_with_victim(Config::default()).await;
    let wrong_type = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]));
    let batch_wrong = RecordBatch::try_new(wrong_type, vec![Arc::new(StringArray::from(vec!["a"]))]).unwrap();
    refused(&server, ipc_stream(&[batch_wrong], None), &[("content-type", STREAM_TYPE)], (422, "schema_mismatch"))
        .await;
    let extra = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("surprise", DataType::Int64, true),
    ]));
    let batch_extra =
        RecordBatch::try_new(extra, vec![Arc::new(Int64Array::from(vec![1])), Arc::new(Int64Array::from(vec![2]))])
            .unwrap();
    let response = server.ingest("victim", ipc_stream(&[batch_extra], None)).await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("surprise"), "{body}");
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"arrowport_schema_mismatches_total{stream="victim",protocol="http"}"#), Some(2.0));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_type_is_422_and_creates_nothing() {
    let server = TestServer::start().await;
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Null, true)]));
    let batch = RecordBatch::try_new(schema, vec![arrow::array::new_null_array(&DataType::Null, 3)]).unwrap();
    let (status, code) = error_code(server.ingest("nulls", ipc_stream(&[batch], None)).await).await;
    assert_eq!((status, code.as_str()), (422, "unsupported_type"));
    assert_eq!(server.count("nulls"), None);
    // A NUL byte in a column's name cannot cross into DuckDB (a C string): refused the same way.
    let schema = Arc::new(Schema::new(vec![Field::new("a\0b", DataType::Int64, true)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).unwrap();
    let (status, code) = error_code(server.ingest("nul", ipc_stream(&[batch], None)).await).await;
    assert_eq!((status, code.as_str()), (422, "unsupported_type"));
    assert_eq!(server.count("nul"), None);
    assert!(server.metrics().await.contains("arrowport_panics_total 0"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_unknown_stream_names() {
    let server = server_with_victim(Config::default()).await;
    let body = ipc_stream(&[batch(0, 1)], None);
    let response = server.ingest("x%22%3B%20DROP%20TABLE%20victim%3B%20--", body.clone()).await;
    assert_eq!(error_code(response).await, (400, "invalid_stream_name".to_owned()));
    assert_eq!(server.count("victim"), Some(10));
    server.stop().await;

    let closed =
        TestServer::with_config(Config::from_yaml("auto_create: false\nstreams: {known: {}}\n").unwrap()).await;
    let response = closed.ingest("unknown", body.clone()).await;
    assert_eq!(error_code(response).await, (404, "unknown_stream".to_owned()));
    assert_eq!(closed.count("unknown"), None);
    closed.ingest_ok("known", body.clone()).await;
    closed.stop().await;

    // An unconfigured name that auto-routes to a configured stream's table is not a way around it.
    let config = Config::from_yaml("streams: {secure: {target_table: sensors_eu}}\n").unwrap();
    let guarded = TestServer::with_config(config).await;
    for alias in ["sensors.eu", "SENSORS-EU"] {
        let (status, code) = error_code(guarded.ingest(alias, body.clone()).await).await;
        assert_eq!((status, code.as_str()), (403, "permission_denied"), "{alias}");
    }
    assert_eq!(guarded.count("sensors_eu"), None);
    guarded.ingest_ok("secure", body).await;
    guarded.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_memory_budget_is_503_with_retry_after() {
    let server = TestServer::start().await;
    // Other requests hold the whole budget: this one may retry later.
    let budget = server.app.loader().budget();
    let held = budget.try_reserve(budget.capacity()).unwrap();
    let response = server.ingest("budget", ipc_stream(&[batch(0, 5000)], None)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(error_code(response).await, (503, "overloaded".to_owned()));
    assert_eq!(server.count("budget").unwrap_or(0), 0);
    drop(held);
    server.ingest_ok("budget", ipc_stream(&[batch(0, 10)], None)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_slow_uploads_hold_every_load_slot_the_next_is_503_not_a_wait_without_end() {
    let mut config = Config::from_yaml("streams: {slow: {chunk_size: 10}, next: {chunk_size: 10}}\n").unwrap();
    config.limits.max_concurrent_loads = 1;
    config.limits.idle_timeout_seconds = 2;
    let server = TestServer::with_config(config).await;
    // A slow producer: batches of a chunk or more stream into its session, which holds the only slot,
    // and a piece every 300 ms keeps it inside the idle timeout.
    let batches: Vec<_> = (0..16).map(|i| batch(i * 100, 100)).collect();
    let body = ipc_stream(&batches, None);
    let (tx, slow) = spawn_upload(&server, "slow");
    let pieces: Vec<Bytes> = body.chunks(body.len() / 16 + 1).map(Bytes::copy_from_slice).collect();
    let trickle = tokio::spawn(async move {
        for piece in pieces {
            tx.send(Ok(piece)).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    });
    wait_until("the slow upload holds the slot", std::time::Duration::from_secs(10), || async {
        server.app.loader().budget().used() > 0
    })
    .await;
    // Room is taken as a batch starts to arrive; its session starts once the batch is whole, with the
    // next piece or the one after.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let started = std::time::Instant::now();
    let response = server.ingest("next", ipc_stream(&[batch(0, 100)], None)).await;
    let retry_after = response.headers().get("retry-after").cloned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(retry_after.as_ref().map(|v| v.to_str().unwrap()), Some("1"), "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_concurrent_loads"), "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "refused after the idle timeout, {:?}",
        started.elapsed()
    );
    assert_eq!(server.count("next").unwrap_or(0), 0);
    trickle.await.unwrap();
    assert_eq!(slow.await.unwrap().status(), 200);
    assert_eq!(server.count("slow"), Some(1600));
    server.ingest_ok("next", ipc_stream(&[batch(0, 100)], None)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_whole_budget_is_413_not_503() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(ByteSize(16 * 1024));
    let server = TestServer::with_config(config).await;
    for _ in 0..2 {
        let response = server.ingest("budget", ipc_stream(&[batch(0, 5000)], None)).await;
        assert!(response.headers().get("retry-after").is_none(), "retrying cannot help");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "batch_too_large");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("16384") && message.contains("memory_budget_bytes"), "{message}");
    }
    assert_eq!(server.count("budget"), None);
    server.ingest_ok("budget", ipc_stream(&[batch(0, 10)], None)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_violations_are_409_and_write_nothing() {
    if crate::support::skip_on_ducklake(
        "constraint_violations_are_409_and_write_nothing",
        "DuckLake has no table constraints",
    ) {
        return;
    }
    let server = TestServer::start().await;
    let create = "CREATE TABLE keyed (id BIGINT PRIMARY KEY, name VARCHAR, price DOUBLE)";
    server.app.database().with_connection(|c| c.execute_batch(create)).unwrap();
    server.ingest_ok("keyed", ipc_stream(&[batch(0, 10)], None)).await;
    // Ids 5..15 clash with the table; a request small enough to share a group commit, and one large
    // enough to stream in a session of its own whose last batch clashes.
    let small = ipc_stream(&[batch(5, 10)], None);
    let large = ipc_stream(&[batch(1_000, 150_000), batch(9, 1)], None);
    for body in [small, large] {
        let (status, code) = error_code(server.ingest("keyed", body).await).await;
        assert_eq!((status, code.as_str()), (409, "constraint_violation"));
        assert_eq!(server.count("keyed"), Some(10), "nothing of a refused request may land");
    }
    server.ingest_ok("keyed", ipc_stream(&[batch(10, 5)], None)).await;
    assert_eq!(server.count("keyed"), Some(15));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_some_batches_rolls_everything_back() {
    let server = server_with_victim(Config::default()).await;
    // Valid batches stream in, then garbage: the batches already handed to DuckDB must not stay. Together
    // they are more than one chunk (122,880 rows), so they go to DuckDB as they arrive, not held back
    // as a small request.
    let mut body = ipc_stream(&[batch(0, 100_000), batch(100_000, 100_000)], None);
    body.truncate(body.len() - 8); // drop the end-of-stream marker
    body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x10, 0, 0, 0]);
    body.extend_from_slice(&[0xab; 64]);
    refused(&server, body, &[("content-type", STREAM_TYPE)], (400, "invalid_ipc")).await;
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_body_writes_nothing() {
    let server = server_with_victim(Config::default()).await;
    let body = ipc_stream(&[batch(0, 20_000), batch(20_000, 20_000)], None);
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /ingest/victim HTTP/1.1\r\nhost: {addr}\r\ncontent-type: {STREAM_TYPE}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&body[..body.len() * 3 / 4]).await.unwrap();
    socket.flush().await.unwrap();
    drop(socket);
    // Wait until the server has seen the request fail.
    let outcome = r#"arrowport_requests_total{stream="victim",protocol="http",outcome="body_read_error"}"#;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric(&server.metrics().await, outcome).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the aborted request was never counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(server.count("victim"), Some(10));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_arrives_slowly_is_not_silence() {
    let mut config = Config::default();
    config.limits.idle_timeout_seconds = 2;
    let server = TestServer::with_config(config).await;
    // One batch message of ~400 KB over ~3.6 s, a piece every 300 ms: longer than the idle timeout for the
    // message, never that long without a byte.
    let body = ipc_stream(&[batch(0, 20_000)], None);
    let pieces: Vec<Bytes> = body.chunks(body.len() / 12 + 1).map(Bytes::copy_from_slice).collect();
    let (tx, upload) = spawn_upload(&server, "slow");
    for piece in pieces {
        tx.send(Ok(piece)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    drop(tx);
    let response = upload.await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(server.count("slow"), Some(20_000));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_streams_in_pieces() {
    let server = TestServer::start().await;
    let body = ipc_stream(&[batch(0, 3000), batch(3000, 3000)], None);
    let mut pieces: Vec<Bytes> = body.chunks(1000).map(Bytes::copy_from_slice).collect();
    let last = pieces.pop().unwrap();
    let (tx, upload) = spawn_upload(&server, "slow");
    for piece in pieces {
        tx.send(Ok(piece)).await.unwrap();
        tokio::task::yield_now().await;
    }
    // The last piece is held back: the batches before it are decoded (and hold their share of the
    // memory budget) already, which a server that buffered the whole body would not have done.
    wait_until("the first batches are decoded", std::time::Duration::from_secs(20), || async {
        server.app.loader().budget().used() > 0
    })
    .await;
    tx.send(Ok(last)).await.unwrap();
    drop(tx);
    assert_eq!(upload.await.unwrap().status(), 200);
    assert_eq!(server.count("slow"), Some(6000));
    server.stop().await;
}
