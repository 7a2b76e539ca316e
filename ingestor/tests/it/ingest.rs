//! Data that should land: formats, compression, routing, schema policies, concurrency.

use std::io::Write;

use arrow_ipc::CompressionType;
use arrowport_config::Config;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_lands_in_a_table_named_after_it() {
    let server = TestServer::start().await;
    let report = server.ingest_ok("orders", ipc_stream(&[batch(0, 1000), batch(1000, 500)], None)).await;
    assert_eq!((report.stream.as_str(), report.table.as_str()), ("orders", "orders"));
    assert_eq!((report.rows, report.batches), (1500, 2));
    assert!(report.bytes_received > 0 && report.bytes_decoded > 0);
    assert_eq!(server.count("orders"), Some(1500));
    assert_eq!(server.scalar::<i64>("SELECT sum(id) FROM orders"), (0..1500).sum::<i64>());
    assert_eq!(server.scalar::<i64>("SELECT count(*) FROM orders WHERE name IS NULL"), 1000 / 7 + 1 + 500 / 7 + 1);
    // A second request appends.
    server.ingest_ok("orders", ipc_stream(&[batch(1500, 10)], None)).await;
    assert_eq!(server.count("orders"), Some(1510));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipc_file_format_is_accepted() {
    let server = TestServer::start().await;
    let body = ipc_file(&[batch(0, 100), batch(100, 100)]);
    let response = server.ingest_with("files", body.clone(), &[("content-type", FILE_TYPE)]).await;
    assert_eq!(response.status(), 200);
    // Without a content type the format is recognised by its magic.
    assert_eq!(server.ingest_with("files", body, &[]).await.status(), 200);
    assert_eq!(server.count("files"), Some(400));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_land() {
    let server = TestServer::start().await;
    let data = [batch(0, 5000)];
    let plain = ipc_stream(&data, None);
    let ipc_zstd = ipc_stream(&data, Some(CompressionType::ZSTD));
    let ipc_lz4 = ipc_stream(&data, Some(CompressionType::LZ4_FRAME));
    let body_zstd = zstd::encode_all(plain.as_slice(), 3).unwrap();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&plain).unwrap();
    let body_gzip = gzip.finish().unwrap();
    let mut lz4 = lz4_flex::frame::FrameEncoder::new(Vec::new());
    lz4.write_all(&plain).unwrap();
    let body_lz4 = lz4.finish().unwrap();

    for (name, body, encoding) in [
        ("ipc_zstd", ipc_zstd, None),
        ("ipc_lz4", ipc_lz4, None),
        ("body_zstd", body_zstd, Some("zstd")),
        ("body_gzip", body_gzip, Some("gzip")),
        ("body_lz4", body_lz4, Some("lz4")),
    ] {
        let wire = body.len() as u64;
        let mut headers = vec![("content-type", STREAM_TYPE)];
        headers.extend(encoding.map(|e| ("content-encoding", e)));
        let response = server.ingest_with(name, body, &headers).await;
        assert_eq!(response.status(), 200, "{name}: {}", response.text().await.unwrap());
        let report: arrowport_api::IngestReport = response.json().await.unwrap();
        assert_eq!(report.rows, 5000, "{name}");
        assert_eq!(report.bytes_received, wire, "{name}");
        assert!(report.bytes_decoded > wire, "{name}: compressed data decodes to more bytes");
        assert_eq!(server.scalar::<i64>(&format!("SELECT sum(id) FROM {name}")), (0..5000).sum::<i64>(), "{name}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_route_and_chunk_size() {
    let config = Config::from_yaml("streams:\n  sensors: {target_table: sensor_readings, chunk_size: 100}\n").unwrap();
    let server = TestServer::with_config(config).await;
    let report = server.ingest_ok("sensors", ipc_stream(&[batch(0, 1050)], None)).await;
    assert_eq!(report.table, "sensor_readings");
    // 1050 rows in chunks of at most 100.
    assert_eq!((report.rows, report.batches), (1050, 11));
    assert_eq!(server.count("sensor_readings"), Some(1050));
    assert_eq!(server.count("sensors"), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_match_by_name_and_missing_ones_are_null() {
    let server = TestServer::start().await;
    server.ingest_ok("by_name", ipc_stream(&[batch(0, 10)], None)).await;
    // Same columns in another order, and a subset.
    let reordered = batch(10, 10).project(&[2, 0, 1]).unwrap();
    server.ingest_ok("by_name", ipc_stream(&[reordered], None)).await;
    let subset = batch(20, 10).project(&[0]).unwrap();
    server.ingest_ok("by_name", ipc_stream(&[subset], None)).await;
    assert_eq!(server.count("by_name"), Some(30));
    assert_eq!(server.scalar::<f64>("SELECT sum(price) FROM by_name WHERE id BETWEEN 10 AND 19"), 11.25);
    assert_eq!(server.scalar::<i64>("SELECT count(*) FROM by_name WHERE id >= 20 AND price IS NULL"), 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolve_adds_columns_and_reject_refuses() {
    let config = Config::from_yaml("streams:\n  evolving: {schema_policy: evolve}\n").unwrap();
    let server = TestServer::with_config(config).await;
    let narrow = batch(0, 10).project(&[0, 1]).unwrap();
    server.ingest_ok("evolving", ipc_stream(std::slice::from_ref(&narrow), None)).await;
    server.ingest_ok("rejecting", ipc_stream(&[narrow], None)).await;
    let wide = ipc_stream(&[batch(10, 10)], None);
    server.ingest_ok("evolving", wide.clone()).await;
    assert_eq!(server.scalar::<i64>("SELECT count(price) FROM evolving"), 10);
    let (status, code) = error_code(server.ingest("rejecting", wide).await).await;
    assert_eq!((status, code.as_str()), (422, "schema_mismatch"));
    assert_eq!(server.count("rejecting"), Some(10));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_to_one_table_all_land() {
    let server = TestServer::start().await;
    let requests = (0..32).map(|i| {
        let body = ipc_stream(&[batch(i * 1000, 1000)], None);
        let server = &server;
        async move { server.ingest_ok("shared", body).await.rows }
    });
    let rows: u64 = futures::future::join_all(requests).await.into_iter().sum();
    assert_eq!(rows, 32_000);
    assert_eq!(server.count("shared"), Some(32_000));
    assert_eq!(server.scalar::<i64>("SELECT count(DISTINCT id) FROM shared"), 32_000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_share_commits_and_each_is_answered_after_its_rows_are_committed() {
    let mut config = Config::default();
    one_load_slot(&mut config);
    let server = TestServer::with_config(config).await;
    // While another load holds the only slot, eight small requests arrive and queue for a group commit.
    let holder = SlotHolder::take(&server).await;
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let requests = (0..8).map(|i| {
        let (server, answered) = (&server, &answered);
        let (start, rows) = (i * 1000, i as usize + 1);
        async move {
            let report = server.ingest_ok("small", ipc_stream(&[batch(start, rows)], None)).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Answered only after its commit: its rows are visible the moment the answer arrives.
            let sql = format!("SELECT count(*) FROM small WHERE id >= {start} AND id < {start} + 1000");
            (report.rows, server.scalar::<i64>(&sql))
        }
    });
    let release = holder.release_once_queued(&server, 8, &answered);
    let (answers, holder_status) = tokio::join!(futures::future::join_all(requests), release);
    assert_eq!(holder_status, 200);
    for (i, (rows, visible)) in answers.into_iter().enumerate() {
        assert_eq!((rows, visible), (i as u64 + 1, i as i64 + 1), "request {i}");
    }
    assert_eq!(server.count("small"), Some(36));
    let grouped =
        metric(&server.metrics().await, r#"arrowport_grouped_requests_total{stream="small",protocol="http"}"#);
    assert!(grouped.is_some_and(|n| n >= 2.0), "small requests were committed together: {grouped:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_to_new_tables() {
    let server = TestServer::start().await;
    let requests = (0..16).map(|i| {
        let body = ipc_stream(&[batch(0, 100)], None);
        let server = &server;
        let stream = format!("table_{}", i % 4);
        async move { server.ingest_ok(&stream, body).await.rows }
    });
    futures::future::join_all(requests).await;
    for i in 0..4 {
        assert_eq!(server.count(&format!("table_{i}")), Some(400));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rows_and_requests() {
    let server = TestServer::start().await;
    server.ingest_ok("metered", ipc_stream(&[batch(0, 300)], None)).await;
    server.ingest_ok("metered", ipc_stream(&[batch(0, 200)], None)).await;
    let _ = server.ingest_with("metered", b"garbage".to_vec(), &[("content-type", STREAM_TYPE)]).await;
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"arrowport_rows_total{stream="metered",protocol="http"}"#), Some(500.0), "{text}");
    assert_eq!(metric(&text, r#"arrowport_batches_total{stream="metered",protocol="http"}"#), Some(2.0));
    assert_eq!(metric(&text, r#"arrowport_requests_total{stream="metered",protocol="http",outcome="ok"}"#), Some(2.0));
    assert_eq!(
        metric(&text, r#"arrowport_requests_total{stream="metered",protocol="http",outcome="invalid_ipc"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, r#"arrowport_request_duration_seconds_count{stream="metered",protocol="http"}"#),
        Some(3.0)
    );
    assert!(text.contains("arrowport_received_bytes_total"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let server = TestServer::start().await;
    for path in ["healthz", "readyz"] {
        let response = server.client.get(format!("{}/{path}", server.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_extensions_load_at_start_or_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_yaml("duckdb_extensions: [parquet]\n").unwrap();
    config.db_path = dir.path().join("ext.duckdb");
    let state = arrowport::app::App::open(&config).expect("parquet is built in");
    // duckdb_extensions() would list the extension directory, a file access the server refuses itself;
    // the extension's functions show that it is loaded.
    let loaded: bool = state
        .database()
        .with_connection(|c| {
            c.query_row("SELECT count(*) > 0 FROM duckdb_functions() WHERE function_name = 'read_parquet'", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    assert!(loaded);
    drop(state);
    config.duckdb_extensions = vec!["no_such_extension".into()];
    config.db_path = dir.path().join("ext2.duckdb");
    let message = arrowport::app::App::open(&config).err().expect("an unknown extension fails the start").to_string();
    assert!(message.contains("no_such_extension") && message.contains("does not download"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_settings_reach_the_database() {
    let mut config = Config::default();
    config.duckdb.checkpoint_threshold = arrowport_config::ByteSize::mib(32);
    config.duckdb.memory_limit = Some(arrowport_config::ByteSize::mib(512));
    let server = TestServer::with_config(config).await;
    let setting = |name: &str| server.scalar::<String>(&format!("SELECT current_setting('{name}')::VARCHAR"));
    assert_eq!(setting("checkpoint_threshold"), "32.0 MiB");
    assert_eq!(setting("memory_limit"), "512.0 MiB");
    assert_eq!(metric(&server.metrics().await, "arrowport_duckdb_memory_limit_bytes"), Some((512u64 << 20) as f64));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdbs_default_memory_limit_leaves_room_for_the_memory_budget() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(arrowport_config::ByteSize::gib(1));
    let server = TestServer::with_config(config).await;
    let available = arrowport::sizing::available().expect("memory is readable on Linux").bytes;
    let expected = arrowport::sizing::default_duckdb_limit(available, 1 << 30);
    assert!(expected < available / 100 * 80, "the budget is taken out unless the floor applies");
    let limit: bool = server.scalar(&format!("SELECT current_setting('memory_limit') = format_bytes({expected})"));
    assert!(limit, "DuckDB's memory_limit is not {expected} bytes");
    assert_eq!(metric(&server.metrics().await, "arrowport_duckdb_memory_limit_bytes"), Some(expected as f64));
    server.stop().await;
}
