//! Retries with an idempotency key: a committed key is answered from its receipt and never written
//! twice; a key in use waits for nobody and is refused; a failed request leaves no receipt.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow_flight::{FlightClient, PutResult};
use arrowport_api::{Ack, IngestReport};
use arrowport_config::Config;
use futures::TryStreamExt;

use crate::flight::{channel, put_messages};
use crate::support::{
    STREAM_TYPE, SlotHolder, TestServer, batch, error_code, ipc_stream, metric, one_load_slot, wait_until,
};

async fn ingest_keyed(server: &TestServer, stream: &str, key: &str, rows: usize) -> reqwest::Response {
    let body = ipc_stream(&[batch(0, rows)], None);
    server.ingest_with(stream, body, &[("content-type", STREAM_TYPE), ("idempotency-key", key)]).await
}

async fn report(response: reqwest::Response) -> (IngestReport, Option<String>) {
    assert_eq!(response.status(), 200);
    let replayed = response.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_owned());
    (response.json().await.unwrap(), replayed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_committed_request_is_answered_not_written_again() {
    let server = TestServer::start().await;
    let (first, replayed) = report(ingest_keyed(&server, "orders", "order-batch-1", 100).await).await;
    assert_eq!((first.rows, first.replayed, replayed), (100, false, None));
    let (retry, replayed) = report(ingest_keyed(&server, "orders", "order-batch-1", 100).await).await;
    assert_eq!((retry.rows, retry.batches, retry.bytes_decoded), (first.rows, first.batches, first.bytes_decoded));
    assert!(retry.replayed);
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(server.count("orders"), Some(100), "written once");
    // The key is the stream's: the same key on another stream is another request.
    report(ingest_keyed(&server, "returns", "order-batch-1", 7).await).await;
    assert_eq!(server.count("returns"), Some(7));
    // Without a key, the same body is written again, as before.
    server.ingest_ok("orders", ipc_stream(&[batch(0, 100)], None)).await;
    assert_eq!(server.count("orders"), Some(200));
    let metrics = server.metrics().await;
    assert!(metrics.contains(r#"arrowport_replayed_requests_total{stream="orders",protocol="http"} 1"#), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_keyed_requests_committed_together_each_keep_their_receipt() {
    let mut config = Config::default();
    one_load_slot(&mut config);
    let server = TestServer::with_config(config).await;
    // The only load slot is taken: the keyed requests queue and commit as one group once it is free.
    let holder = SlotHolder::take(&server).await;
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    let sends = keys.iter().enumerate().map(|(i, key)| {
        let (server, answered) = (&server, &answered);
        async move {
            let response = ingest_keyed(server, "events", key, 10 + i).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            response.status()
        }
    });
    let release = holder.release_once_queued(&server, 8, &answered);
    let (statuses, _) = tokio::join!(futures::future::join_all(sends), release);
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    let grouped =
        metric(&server.metrics().await, r#"arrowport_grouped_requests_total{stream="events",protocol="http"}"#);
    assert!(grouped.is_some_and(|n| n >= 2.0), "the keyed requests were committed together: {grouped:?}");
    let total: i64 = (0..8).map(|i| 10 + i).sum::<usize>() as i64;
    assert_eq!(server.count("events"), Some(total));
    for (i, key) in keys.iter().enumerate() {
        let (retry, _) = report(ingest_keyed(&server, "events", key, 10 + i).await).await;
        assert_eq!((retry.rows, retry.replayed), (10 + i as u64, true), "{key}");
    }
    assert_eq!(server.count("events"), Some(total));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_use_is_refused_until_its_request_is_answered() {
    let server = TestServer::start().await;
    // The first request is held open: its last bytes are not sent yet.
    let mut body = ipc_stream(&[batch(0, 5)], None);
    let end = body.split_off(body.len() - 8);
    let (rest, received) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    rest.send(Ok(body)).await.unwrap();
    let held = server
        .client
        .post(format!("{}/ingest/held", server.url))
        .header("content-type", STREAM_TYPE)
        .header("idempotency-key", "same")
        .body(reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(received)));
    let held = tokio::spawn(async move { held.send().await.unwrap() });
    wait_until("the first request is in flight", Duration::from_secs(10), || async {
        metric(&server.metrics().await, "arrowport_inflight_requests ") == Some(1.0)
    })
    .await;
    let (status, code) = error_code(ingest_keyed(&server, "held", "same", 5).await).await;
    assert_eq!((status, code.as_str()), (409, "request_in_progress"));
    rest.send(Ok(end)).await.unwrap();
    drop(rest);
    assert_eq!(held.await.unwrap().status(), 200);
    let (retry, _) = report(ingest_keyed(&server, "held", "same", 5).await).await;
    assert!(retry.replayed);
    assert_eq!(server.count("held"), Some(5));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_leaves_no_receipt_and_bad_keys_are_refused() {
    let server = TestServer::start().await;
    server.ingest_ok("strict", ipc_stream(&[batch(0, 3)], None)).await;
    // A column the table lacks: refused, and the key stays unused.
    let extra = RecordBatch::try_from_iter([
        ("id", Arc::new(Int64Array::from(vec![7])) as ArrayRef),
        ("surprise", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
    ])
    .unwrap();
    let headers = [("content-type", STREAM_TYPE), ("idempotency-key", "retry-me")];
    let response = server.ingest_with("strict", ipc_stream(&[extra], None), &headers).await;
    let (status, code) = error_code(response).await;
    assert_eq!((status, code.as_str()), (422, "schema_mismatch"));
    let response = server.ingest_with("strict", ipc_stream(&[batch(10, 3)], None), &headers).await;
    let (fixed, _) = report(response).await;
    assert!(!fixed.replayed, "the failed attempt left no receipt");
    assert_eq!(server.count("strict"), Some(6));
    for key in ["", &"k".repeat(256), "has space", "naïve"] {
        let (status, code) = error_code(ingest_keyed(&server, "strict", key, 1).await).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{key:?}");
    }
    assert_eq!(server.count("strict"), Some(6));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_expire_after_their_window() {
    let server = TestServer::with_config(Config::default()).await;
    report(ingest_keyed(&server, "short", "k", 4).await).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let left = server.app.loader().prune_receipts(Duration::from_millis(10)).await.unwrap();
    assert_eq!(left, 0);
    let (again, _) = report(ingest_keyed(&server, "short", "k", 4).await).await;
    assert!(!again.replayed, "an expired key is a new request");
    assert_eq!(server.count("short"), Some(8));
    server.stop().await;
}

/// A DoPut whose call carries `key`.
async fn put_keyed(server: &TestServer, key: &str, messages: Vec<arrow_flight::FlightData>) -> Vec<Ack> {
    let mut client = FlightClient::new(channel(server).await);
    client.add_header("idempotency-key", key).unwrap();
    let results: Vec<PutResult> =
        client.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await.unwrap().try_collect().await.unwrap();
    results.iter().map(|r| serde_json::from_slice(&r.app_metadata).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flight_producer_retrying_with_its_key_resumes_after_its_committed_batches() {
    let server = TestServer::start().await;
    let batches: Vec<_> = (0..5).map(|i| batch(i * 10, 10)).collect();
    // The first call got three batches (request ids 0, 1, 2) committed, then "failed".
    let acks = put_keyed(&server, "producer-7", put_messages("metrics", &batches[..3])).await;
    assert_eq!(acks.last().unwrap().request_id, Some(2));
    // The retry resends everything: only request ids 3 and 4 are new.
    let acks = put_keyed(&server, "producer-7", put_messages("metrics", &batches)).await;
    let last = acks.last().unwrap();
    assert_eq!((last.rows_total, last.request_id), (20, Some(4)));
    assert_eq!(server.count("metrics"), Some(50));
    let distinct: i64 = server.scalar("SELECT count(DISTINCT id) FROM metrics");
    assert_eq!(distinct, 50, "no batch twice");
    // A retry with nothing new is acknowledged with the position, and writes nothing.
    let acks = put_keyed(&server, "producer-7", put_messages("metrics", &batches)).await;
    assert_eq!(acks.last().map(|a| (a.rows_total, a.request_id)), Some((0, Some(4))));
    assert_eq!(server.count("metrics"), Some(50));
    server.stop().await;
}
