//! The real `arrowport` binary: defaults, precedence, graceful shutdown, `validate`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;

use crate::support::*;

fn rows_in(db: &Path, table: &str) -> i64 {
    let connection = duckdb::Connection::open(db).unwrap();
    connection.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| row.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_defaults_and_sigterm_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    // No config, no flags: only the port comes from the environment (8888 may be taken here).
    let mut server = Process::serve(dir.path(), &[], &[("ARROWPORT_PORT", "0")]);
    let response = reqwest::Client::new()
        .post(format!("{}/ingest/events", server.url))
        .header("content-type", STREAM_TYPE)
        .body(ipc_stream(&[batch(0, 1234)], None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    server.terminate();
    assert!(server.wait().success());
    let db = dir.path().join("arrowport.duckdb");
    assert_eq!(rows_in(&db, "events"), 1234);
    assert!(!dir.path().join("arrowport.duckdb.wal").exists(), "shutdown checkpoints the WAL away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_env_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        "db_path: from_file.duckdb\nport: 1\ncompression: {algorithm: zstd, level: 3}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("env-streams.yaml"), "streams:\n  from_env: {target_table: routed}\n").unwrap();
    let env = [
        ("ARROWPORT_CONFIG", "config.yaml"),
        ("ARROWPORT_DB", "from_env.duckdb"),
        ("ARROWPORT_PORT", "2"),
        ("ARROWPORT_COMPRESSION", "lz4"),
        ("ARROWPORT_STREAMS_PATH", "env-streams.yaml"),
    ];
    let mut server = Process::serve(dir.path(), &["--port", "0", "--host", "127.0.0.1"], &env);
    assert!(server.url.starts_with("http://127.0.0.1:"));
    let streams: arrowport_api::StreamsReport =
        reqwest::get(format!("{}/streams", server.url)).await.unwrap().json().await.unwrap();
    assert_eq!(streams.compression.algorithm.as_str(), "lz4", "ARROWPORT_COMPRESSION beats the file");
    assert_eq!(streams.compression.level, None, "a zstd level does not carry over to lz4");
    assert_eq!((streams.streams[0].stream.as_str(), streams.streams[0].table.as_str()), ("from_env", "routed"));
    server.terminate();
    assert!(server.wait().success());
    assert!(dir.path().join("from_env.duckdb").exists());
    assert!(!dir.path().join("from_file.duckdb").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_upload_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Process::serve(dir.path(), &["--port", "0", "--db", "inflight.duckdb"], &[]);
    let body = ipc_stream(&[batch(0, 10_000), batch(10_000, 10_000)], None);
    let (first, second) = body.split_at(body.len() / 2);
    let pieces = [first.to_vec(), second.to_vec()];
    // The first half goes out at once; the second only after SIGTERM has arrived.
    let stream = futures::stream::iter(pieces.into_iter().enumerate()).then(|(i, piece)| async move {
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, std::io::Error>(piece)
    });
    let upload = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}/ingest/late", server.url))
            .header("content-type", STREAM_TYPE)
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.terminate();
    assert_eq!(upload.await.unwrap().unwrap().status(), 200);
    assert!(server.wait().success());
    assert_eq!(rows_in(&dir.path().join("inflight.duckdb"), "late"), 20_000);
}

#[test]
fn validate_reports_problems_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&good, "streams:\n  a: {target_table: t}\n").unwrap();
    std::fs::write(&bad, "streams:\n  a:\n    chunk_sise: 5\n").unwrap();
    let run = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_arrowport")).arg("validate").arg("--config").arg(path).output().unwrap()
    };
    assert!(run(&good).status.success());
    let output = run(&bad);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chunk_sise") && stderr.contains("line 3"), "{stderr}");
}

/// SIGTERM while eight producers stream bodies that never end and a `DoPut` runs on: at the shutdown
/// deadline every open upload is rolled back and answered with a retryable error, the process exits 0
/// long before a pod's grace period would kill it, and what was acknowledged before is in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_every_upload_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), "limits: {shutdown_timeout_seconds: 2}\n").unwrap();
    let args = ["--config", "config.yaml", "--port", "0", "--db", "load.duckdb"];
    let mut server = Process::serve(dir.path(), &args, &[]);
    let client = reqwest::Client::new();
    // Something acknowledged before the stop.
    let done = client
        .post(format!("{}/ingest/done", server.url))
        .header("content-type", STREAM_TYPE)
        .body(ipc_stream(&[batch(0, 500)], None))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    // Eight producers streaming a batch every 100 ms, never ending their bodies.
    let streaming = (0..8).map(|producer| {
        let body = ipc_stream(&[batch(producer * 1_000_000, 100)], None);
        let (schema_and_batch, _end) = body.split_at(body.len() - 8);
        let first = schema_and_batch.to_vec();
        let more = ipc_stream(&[batch(producer * 1_000_000, 100)], None);
        let stream = futures::stream::unfold(0u32, move |sent| {
            let piece = if sent == 0 { first.clone() } else { batch_message(&more) };
            async move {
                if sent > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((Ok::<_, std::io::Error>(piece), sent + 1))
            }
        });
        client
            .post(format!("{}/ingest/streaming", server.url))
            .header("content-type", STREAM_TYPE)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
    });
    let uploads: Vec<_> = streaming.map(tokio::spawn).collect();
    // A DoPut that goes on sending too.
    let flight_url = server.url.clone();
    let put = tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(flight_url).unwrap().connect().await.unwrap();
        let mut flight = arrow_flight::FlightClient::new(channel);
        let messages = crate::flight::put_messages("long_put", &[batch(0, 100)]);
        let (schema, batch_message) = (messages[0].clone(), messages[1].clone());
        let endless = futures::stream::unfold(0u32, move |sent| {
            let message = if sent == 0 { schema.clone() } else { batch_message.clone() };
            async move {
                if sent > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((Ok(message), sent + 1))
            }
        });
        match flight.do_put(endless).await {
            Ok(results) => results.collect::<Vec<_>>().await.into_iter().find_map(Result::err),
            Err(error) => Some(error),
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopped_at = std::time::Instant::now();
    server.terminate();
    for upload in uploads {
        let (status, code) = error_code(upload.await.unwrap().unwrap()).await;
        assert_eq!((status, code.as_str()), (503, "shutting_down"));
    }
    let put_error = put.await.unwrap().expect("the DoPut ends with an error");
    assert!(
        put_error.to_string().contains("Unavailable") || put_error.to_string().contains("shutting down"),
        "{put_error}"
    );
    let status = server.wait();
    assert!(status.success(), "{status:?}");
    assert!(stopped_at.elapsed() < Duration::from_secs(10), "stopped after {:?}", stopped_at.elapsed());
    let db = dir.path().join("load.duckdb");
    assert_eq!(rows_in(&db, "done"), 500);
    let connection = duckdb::Connection::open(&db).unwrap();
    let mut rows = 0;
    for table in ["streaming", "long_put"] {
        let exists: bool = connection
            .query_row("SELECT count(*) > 0 FROM duckdb_tables() WHERE table_name = ?", [table], |r| r.get(0))
            .unwrap();
        if exists {
            rows += connection.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).unwrap();
        }
    }
    assert_eq!(rows, 0, "nothing of the rolled-back uploads is in the file");
}

/// The record-batch message of a one-batch IPC stream (its schema message and end marker cut off).
fn batch_message(stream: &[u8]) -> Vec<u8> {
    let schema_len = {
        // Continuation marker, then the length of the schema's flatbuffer, padded to 8.
        let length = u32::from_le_bytes(stream[4..8].try_into().unwrap()) as usize;
        8 + length
    };
    stream[schema_len..stream.len() - 8].to_vec()
}
