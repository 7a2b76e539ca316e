//! `/metrics` after known traffic: exact values, and the README's metrics table as the specification.

use std::collections::BTreeMap;

use arrow::array::{Int32Array, RecordBatch};
use arrow_ipc::CompressionType;
use arrowport_config::Config;

use crate::flight::{put, put_messages};
use crate::support::{
    STREAM_TYPE, SlotHolder, TestServer, batch, ipc_stream, metric, one_load_slot, readme_path, wait_until,
};

/// `name → type` of every metric family the README's metrics table specifies.
fn specified() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let table = readme.split("<!-- metrics-spec").nth(1).expect("the metrics table marker");
    table
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells.get(2)?.to_string()))
        })
        .collect()
}

/// `name → type` of every family `/metrics` exposes (`# TYPE` names counters without `_total`).
fn exposed(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| {
            let (name, kind) = rest.split_once(' ').unwrap();
            let name = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            (name, kind.to_owned())
        })
        .collect()
}

fn value(text: &str, sample: &str) -> f64 {
    metric(text, &format!("{sample} ")).unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_specifies_every_metric_exposed() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(arrowport_config::ByteSize(64 << 10));
    one_load_slot(&mut config);
    let server = TestServer::with_config(config).await;
    // Traffic first, of every kind: families with labels only appear once they have a series.
    server.ingest_ok("spec", ipc_stream(&[batch(0, 10)], None)).await;
    // A retry of a committed request is answered from its receipt.
    for _ in 0..2 {
        let keyed = ipc_stream(&[batch(50, 1)], None);
        let headers = [("content-type", STREAM_TYPE), ("idempotency-key", "spec-1")];
        assert_eq!(server.ingest_with("spec", keyed, &headers).await.status(), 200);
    }
    // Two small requests queued behind another load are committed together.
    let holder = SlotHolder::take(&server).await;
    let small = (0..2).map(|i| server.ingest_ok("spec", ipc_stream(&[batch(100 + i, 1)], None)));
    let release = async {
        wait_until("both requests in flight", std::time::Duration::from_secs(30), || async {
            metric(&server.metrics().await, "arrowport_inflight_requests ") == Some(3.0)
        })
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        holder.release().await
    };
    tokio::join!(futures::future::join_all(small), release);
    let budget = server.app.loader().budget();
    let held = budget.try_reserve(budget.capacity()).unwrap();
    assert_eq!(server.ingest("spec", ipc_stream(&[batch(0, 10)], None)).await.status(), 503);
    drop(held);
    let mismatch = ipc_stream(
        &[RecordBatch::try_from_iter([("id", std::sync::Arc::new(Int32Array::from(vec![1])) as _)]).unwrap()],
        None,
    );
    assert_eq!(server.ingest("spec", mismatch).await.status(), 422);
    server.app.checkpoint().await.unwrap();
    // The journal's families come from a server with the journal on: its second request is journaled.
    let mut config = Config::default();
    config.journal.enabled = true;
    let journaling = TestServer::with_config(config).await;
    for first in [0, 10] {
        journaling.ingest_ok("spec", ipc_stream(&[batch(first, 10)], None)).await;
    }
    let journal_text = journaling.metrics().await;
    assert_eq!(value(&journal_text, r#"arrowport_journaled_requests_total{stream="spec",protocol="http"}"#), 1.0);
    journaling.stop().await;
    let text = server.metrics().await;
    let (specified, mut exposed) = (specified(), exposed(&text));
    exposed.extend(self::exposed(&journal_text));
    let missing: Vec<_> = specified.iter().filter(|(name, kind)| exposed.get(*name) != Some(kind)).collect();
    let undocumented: Vec<_> = exposed.iter().filter(|(name, kind)| specified.get(*name) != Some(kind)).collect();
    assert!(missing.is_empty(), "specified in the README but not exposed (or of another type): {missing:?}\n{text}");
    assert!(undocumented.is_empty(), "exposed but not in the README's metrics table: {undocumented:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_known_traffic_are_exact() {
    let server = TestServer::start().await;
    // HTTP: two commits (one zstd-compressed), one garbage body, one schema mismatch.
    let bodies = [
        ipc_stream(&[batch(0, 300)], None),
        ipc_stream(&[batch(300, 100), batch(400, 100)], Some(CompressionType::ZSTD)),
    ];
    let mut decoded = 0;
    for body in &bodies {
        decoded += server.ingest_ok("web", body.clone()).await.bytes_decoded;
    }
    let garbage = b"not arrow at all".to_vec();
    let mismatch = ipc_stream(
        &[RecordBatch::try_from_iter([("id", std::sync::Arc::new(Int32Array::from(vec![1, 2])) as _)]).unwrap()],
        None,
    );
    for body in [&garbage, &mismatch] {
        let response = server.ingest_with("web", body.clone(), &[("content-type", STREAM_TYPE)]).await;
        assert!(response.status().is_client_error());
    }
    // Flight: one DoPut of two batches, committed once.
    let messages = put_messages("wings", &[batch(0, 60), batch(60, 40)]);
    let flight_wire: usize =
        messages.iter().map(|m| m.data_header.len() + m.data_body.len() + m.app_metadata.len()).sum();
    let acks = put(&server, messages).await.unwrap();
    assert_eq!(acks.len(), 1);
    server.app.checkpoint().await.unwrap();

    let text = server.metrics().await;
    let http = r#"stream="web",protocol="http""#;
    let flight = r#"stream="wings",protocol="flight""#;
    let wire: usize = bodies.iter().chain([&garbage, &mismatch]).map(Vec::len).sum();
    let committed_wire: usize = bodies.iter().map(Vec::len).sum();
    let expected = [
        (format!("arrowport_rows_total{{{http}}}"), 500.0),
        (format!("arrowport_batches_total{{{http}}}"), 3.0),
        (format!("arrowport_requests_total{{{http},outcome=\"ok\"}}"), 2.0),
        (format!("arrowport_requests_total{{{http},outcome=\"invalid_ipc\"}}"), 1.0),
        (format!("arrowport_requests_total{{{http},outcome=\"schema_mismatch\"}}"), 1.0),
        (format!("arrowport_schema_mismatches_total{{{http}}}"), 1.0),
        (format!("arrowport_received_bytes_total{{{http}}}"), wire as f64),
        (format!("arrowport_decoded_bytes_total{{{http}}}"), decoded as f64),
        (format!("arrowport_compression_ratio{{{http}}}"), decoded as f64 / committed_wire as f64),
        (format!("arrowport_request_duration_seconds_count{{{http}}}"), 4.0),
        (format!("arrowport_commit_duration_seconds_count{{{http}}}"), 2.0),
        (format!("arrowport_rows_total{{{flight}}}"), 100.0),
        (format!("arrowport_batches_total{{{flight}}}"), 2.0),
        (format!("arrowport_requests_total{{{flight},outcome=\"ok\"}}"), 1.0),
        (format!("arrowport_received_bytes_total{{{flight}}}"), flight_wire as f64),
        (format!("arrowport_commit_duration_seconds_count{{{flight}}}"), 1.0),
        ("arrowport_inflight_requests".to_owned(), 0.0),
        ("arrowport_inflight_bytes".to_owned(), 0.0),
        ("arrowport_memory_budget_bytes".to_owned(), (512u64 << 20) as f64),
        (r#"arrowport_checkpoints_total{outcome="ok"}"#.to_owned(), 1.0),
        ("arrowport_checkpoint_duration_seconds_count".to_owned(), 1.0),
        ("arrowport_config_generation".to_owned(), 1.0),
        ("arrowport_config_reloads_total".to_owned(), 0.0),
        ("arrowport_config_reload_failures_total".to_owned(), 0.0),
    ];
    if !crate::support::on_ducklake() {
        // The checkpoint folded the write-ahead log into the file (a lake's catalog keeps its own).
        assert_eq!(value(&text, "arrowport_wal_file_bytes"), 0.0);
    }
    for (sample, want) in expected {
        let got = value(&text, &sample);
        assert!((got - want).abs() <= want.abs() * 1e-9, "{sample}: {got}, expected {want}\n{text}");
    }
    let file_bytes = server.app.database().sizes().data_bytes;
    assert!(file_bytes > 0);
    assert_eq!(value(&text, "arrowport_database_file_bytes"), file_bytes as f64);
    let resident = value(&text, "arrowport_process_resident_memory_bytes");
    assert!(resident > 10e6, "resident memory {resident}");
    assert!(value(&text, "arrowport_duckdb_memory_bytes") >= 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_counted() {
    let server = TestServer::start().await;
    let budget = server.app.loader().budget();
    let _held = budget.try_reserve(budget.capacity()).unwrap();
    let response = server.ingest("big", ipc_stream(&[batch(0, 1000)], None)).await;
    assert_eq!(response.status(), 503);
    let status = put(&server, put_messages("big", &[batch(0, 1000)])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let text = server.metrics().await;
    assert_eq!(value(&text, r#"arrowport_overloaded_requests_total{stream="big",protocol="http"}"#), 1.0);
    assert_eq!(value(&text, r#"arrowport_overloaded_requests_total{stream="big",protocol="flight"}"#), 1.0);
    assert_eq!(value(&text, r#"arrowport_requests_total{stream="big",protocol="http",outcome="overloaded"}"#), 1.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_run_every_interval() {
    let mut config = Config::default();
    config.duckdb.checkpoint_interval_seconds = 1;
    let server = TestServer::with_config(config).await;
    server.ingest_ok("ticks", ipc_stream(&[batch(0, 10)], None)).await;
    let mut checkpoints = 0.0;
    for _ in 0..50 {
        checkpoints = metric(&server.metrics().await, r#"arrowport_checkpoints_total{outcome="ok"} "#).unwrap_or(0.0);
        if checkpoints >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(checkpoints >= 2.0, "two periodic checkpoints within 5 s, saw {checkpoints}");
    server.stop().await;
}
