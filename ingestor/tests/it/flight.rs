//! Arrow Flight and Flight SQL on the server's one port, with arrow-flight's own Rust clients.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandStatementIngest, TableDefinitionOptions, TableExistsOption, TableNotExistOption};
use arrow_flight::{FlightClient, FlightData, FlightDescriptor, PutResult, Ticket};
use arrowport_api::Ack;
use arrowport_config::{Config, FlushPolicy, StreamConfig};
use futures::{StreamExt, TryStreamExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{SlotHolder, TestServer, batch, ipc_stream, metric, one_load_slot, schema};

pub async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.url.clone()).unwrap().connect().await.unwrap()
}

async fn client(server: &TestServer) -> FlightClient {
    FlightClient::new(channel(server).await)
}

/// A DoPut for `stream`: the schema message carries the descriptor, each batch its `request_id`.
pub fn put_messages(stream: &str, batches: &[RecordBatch]) -> Vec<FlightData> {
    let mut messages = arrow_flight::utils::batches_to_flight_data(&batches[0].schema(), batches.to_vec()).unwrap();
    messages[0].flight_descriptor = Some(FlightDescriptor::new_path(vec![stream.to_owned()]));
    for (i, message) in messages.iter_mut().skip(1).enumerate() {
        message.app_metadata = format!(r#"{{"request_id": {i}}}"#).into();
    }
    messages
}

/// Sends `messages` as one DoPut and returns the acks, or the status the call ended with.
pub async fn put(server: &TestServer, messages: Vec<FlightData>) -> Result<Vec<Ack>, tonic::Status> {
    let mut client = client(server).await;
    let replies = client.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await;
    let replies: Result<Vec<PutResult>, FlightError> = match replies {
        Ok(stream) => stream.try_collect().await,
        Err(error) => Err(error),
    };
    match replies {
        Ok(results) => Ok(results.iter().map(|r| serde_json::from_slice(&r.app_metadata).unwrap()).collect()),
        Err(FlightError::Tonic(status)) => Err(*status),
        Err(other) => panic!("not a gRPC status: {other}"),
    }
}

fn flushing_config(stream: &str, flush: FlushPolicy) -> Config {
    let mut config = Config::default();
    config.streams.insert(stream.to_owned(), StreamConfig { flush: Some(flush), ..StreamConfig::default() });
    config
}

#[tokio::test]
async fn do_put_acks_every_commit_with_the_highest_committed_request_id() {
    let flush = FlushPolicy { rows: 100, ..FlushPolicy::default() };
    let server = TestServer::with_config(flushing_config("events", flush)).await;
    let batches: Vec<RecordBatch> = (0..10).map(|i| batch(i * 50, 50)).collect();
    let acks = put(&server, put_messages("events", &batches)).await.unwrap();
    let summary: Vec<(u64, u64, Option<u64>)> =
        acks.iter().map(|a| (a.rows_committed, a.rows_total, a.request_id)).collect();
    assert_eq!(
        summary,
        [(100, 100, Some(1)), (100, 200, Some(3)), (100, 300, Some(5)), (100, 400, Some(7)), (100, 500, Some(9))]
    );
    assert_eq!(server.count("events"), Some(500));
    let ids: i64 = server.scalar("SELECT sum(id) FROM events");
    assert_eq!(ids, (0..500).sum::<i64>());
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"arrowport_rows_total{stream="events",protocol="flight"}"#), Some(500.0));
    assert_eq!(metric(&text, r#"arrowport_requests_total{stream="events",protocol="flight",outcome="ok"}"#), Some(1.0));
    server.stop().await;
}

/// A stream whose batches of `chunk_size` rows or more each get a load session of their own (as large
/// batches do), committing every `flush_rows`.
fn session_config(stream: &str, chunk_size: usize, flush_rows: u64) -> Config {
    let flush = FlushPolicy { rows: flush_rows, ..FlushPolicy::default() };
    let mut config = flushing_config(stream, flush);
    config.streams.get_mut(stream).unwrap().chunk_size = Some(chunk_size);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_do_put_acks_each_commit_with_its_own_rows_and_bytes() {
    let server = TestServer::with_config(session_config("long", 100, 200)).await;
    let batches: Vec<RecordBatch> = (0..10).map(|i| batch(i * 100, 100)).collect();
    let messages = put_messages("long", &batches);
    let wire: usize = messages.iter().map(|m| m.data_header.len() + m.data_body.len() + m.app_metadata.len()).sum();
    let acks = put(&server, messages).await.unwrap();
    let summary: Vec<(u64, u64, u64, Option<u64>)> =
        acks.iter().map(|a| (a.rows_committed, a.batches_committed, a.rows_total, a.request_id)).collect();
    let expected: Vec<_> = (1..=5).map(|i| (200, 2, i * 200, Some(i * 2 - 1))).collect();
    assert_eq!(summary, expected);
    assert_eq!(server.count("long"), Some(1000));
    assert_eq!(server.scalar::<i64>("SELECT sum(id) FROM long"), (0..1000).sum::<i64>());
    // The commits' wire bytes add up to everything the call sent, its schema message included.
    let report = server.streams_report().await;
    let long = report.streams.iter().find(|s| s.stream == "long").unwrap();
    assert_eq!(long.stats.bytes_received, wire as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_mid_call_ends_it_and_rolls_back_what_came_after() {
    if crate::support::skip_on_ducklake(
        "a_commit_that_fails_mid_call_ends_it_and_rolls_back_what_came_after",
        "DuckLake has no table constraints",
    ) {
        return;
    }
    let server = TestServer::with_config(session_config("checked", 100, 100)).await;
    let create = "CREATE TABLE checked (id BIGINT CHECK (id < 150), name VARCHAR, price DOUBLE)";
    server.app.database().with_connection(|c| c.execute_batch(create)).unwrap();
    // The second commit breaks the constraint; the batches behind it are valid but were not committed yet.
    let batches = [batch(0, 100), batch(100, 100), batch(-100, 100), batch(-200, 100), batch(-300, 100)];
    let status = put(&server, put_messages("checked", &batches)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "constraint_violation");
    assert_eq!(server.count("checked"), Some(100), "only the first commit stays");
    assert_eq!(server.scalar::<i64>("SELECT min(id) FROM checked"), 0);
    assert_eq!(put(&server, put_messages("checked", &[batch(-100, 100)])).await.unwrap()[0].rows_total, 100);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_do_puts_share_commits_and_each_is_acked_after_its_rows_are_committed() {
    let mut config = Config::default();
    one_load_slot(&mut config);
    let server = TestServer::with_config(config).await;
    // While another load holds the only slot, six one-batch calls arrive and queue for a group commit.
    let holder = SlotHolder::take(&server).await;
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let calls = (0..6).map(|i| {
        let (server, answered) = (&server, &answered);
        let (start, rows) = (i * 1000, i as u64 + 1);
        async move {
            let acks = put(server, put_messages("small", &[batch(start, rows as usize)])).await.unwrap();
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Acked only after its commit: its rows are visible the moment the ack arrives.
            let sql = format!("SELECT count(*) FROM small WHERE id >= {start} AND id < {start} + 1000");
            (rows, acks, server.scalar::<i64>(&sql))
        }
    });
    let release = holder.release_once_queued(&server, 6, &answered);
    let (answers, holder_status) = tokio::join!(futures::future::join_all(calls), release);
    assert_eq!(holder_status, 200);
    for (rows, acks, visible) in answers {
        let ack = Ack { rows_committed: rows, batches_committed: 1, rows_total: rows, request_id: Some(0) };
        assert_eq!((acks, visible), (vec![ack], rows as i64));
    }
    assert_eq!(server.count("small"), Some(21));
    let grouped =
        metric(&server.metrics().await, r#"arrowport_grouped_requests_total{stream="small",protocol="flight"}"#);
    assert!(grouped.is_some_and(|n| n >= 2.0), "small calls were committed together: {grouped:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_quiet_do_put_commits_when_its_interval_passes() {
    let flush = FlushPolicy { interval_seconds: 1, ..FlushPolicy::default() };
    let server = TestServer::with_config(flushing_config("slow", flush)).await;
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<FlightData, FlightError>>();
    for message in put_messages("slow", &[batch(0, 10)]) {
        tx.unbounded_send(Ok(message)).unwrap();
    }
    let mut client = client(&server).await;
    let mut acks = client.do_put(rx).await.unwrap();
    // The call is still open, yet the rows are committed and acknowledged within the interval.
    let first = tokio::time::timeout(Duration::from_secs(5), acks.next()).await.expect("an ack within 5 s");
    let ack: Ack = serde_json::from_slice(&first.unwrap().unwrap().app_metadata).unwrap();
    assert_eq!((ack.rows_committed, ack.rows_total, ack.request_id), (10, 10, Some(0)));
    assert_eq!(server.count("slow"), Some(10));
    drop(tx);
    assert!(acks.next().await.is_none(), "nothing left to commit at the end");
    server.stop().await;
}

#[tokio::test]
async fn a_schema_change_mid_stream_is_invalid_and_rolls_back() {
    let server = TestServer::start().await;
    let first = batch(0, 10);
    let other =
        RecordBatch::try_from_iter([("x", std::sync::Arc::new(arrow::array::Int32Array::from(vec![1])) as _)]).unwrap();
    let mut messages = put_messages("events", &[first]);
    messages.extend(arrow_flight::utils::batches_to_flight_data(&other.schema(), vec![other]).unwrap());
    let status = put(&server, messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("schema changed"), "{status}");
    assert_eq!(server.count("events"), None, "the table created by the call was rolled back with it");
    assert_eq!(put(&server, put_messages("events", &[batch(0, 3)])).await.unwrap()[0].rows_total, 3);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_that_does_not_fit_the_table_fails_its_precondition() {
    let server = TestServer::start().await;
    server.ingest_ok("events", ipc_stream(&[batch(0, 5)], None)).await;
    let wrong = RecordBatch::try_from_iter([(
        "id",
        std::sync::Arc::new(arrow::array::StringArray::from(vec!["not a number"])) as _,
    )])
    .unwrap();
    let status = put(&server, put_messages("events", &[wrong])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "schema_mismatch");
    assert_eq!(server.count("events"), Some(5));
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"arrowport_schema_mismatches_total{stream="events",protocol="flight"}"#), Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn a_batch_that_breaks_a_table_constraint_fails_its_precondition() {
    if crate::support::skip_on_ducklake(
        "a_batch_that_breaks_a_table_constraint_fails_its_precondition",
        "DuckLake has no table constraints",
    ) {
        return;
    }
    let server = TestServer::start().await;
    let create = "CREATE TABLE checked (id BIGINT CHECK (id < 100), name VARCHAR, price DOUBLE)";
    server.app.database().with_connection(|c| c.execute_batch(create)).unwrap();
    let status = put(&server, put_messages("checked", &[batch(0, 50), batch(95, 10)])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "constraint_violation");
    assert!(status.message().contains("CHECK constraint failed"), "{status}");
    assert_eq!(server.count("checked"), Some(0));
    server.stop().await;
}

#[tokio::test]
async fn garbage_flight_data_is_invalid_and_the_server_keeps_serving() {
    let server = TestServer::start().await;
    let mut messages = put_messages("events", &[batch(0, 5)]);
    messages[1].data_header = b"definitely not a flatbuffer".to_vec().into();
    let status = put(&server, messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    // A body that is cut short: the batch header promises more bytes than the body has.
    let mut messages = put_messages("events", &[batch(0, 5)]);
    let body = messages[1].data_body.clone();
    messages[1].data_body = body.slice(..body.len() / 2);
    let status = put(&server, messages).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert_eq!(server.count("events"), None);
    // A PATH descriptor must name exactly one stream.
    let mut messages = put_messages("events", &[batch(0, 5)]);
    messages[0].flight_descriptor = Some(FlightDescriptor::new_path(vec!["a".into(), "b".into()]));
    assert_eq!(put(&server, messages).await.unwrap_err().code(), Code::InvalidArgument);
    let hostile = put(&server, put_messages("x\"; DROP TABLE t; --", &[batch(0, 5)])).await.unwrap_err();
    assert_eq!(hostile.code(), Code::InvalidArgument);
    assert_eq!(put(&server, put_messages("events", &[batch(0, 5)])).await.unwrap()[0].rows_total, 5);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_writes_nothing() {
    let server = TestServer::start().await;
    let url = server.url.clone();
    // The producer runs on its own runtime; shutting that down closes its connection without ending the
    // stream, as a crashed or killed process would. (Awaiting it keeps the test's runtime, which runs the
    // server, free.)
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            let (tx, rx) = futures::channel::mpsc::unbounded::<Result<FlightData, FlightError>>();
            for message in put_messages("events", &[batch(0, 100), batch(100, 100)]) {
                tx.unbounded_send(Ok(message)).unwrap();
            }
            let _acks = FlightClient::new(channel).do_put(rx).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::mem::forget(tx);
        });
        runtime.shutdown_background();
    })
    .await
    .unwrap();
    // The server notices the broken connection and rolls back.
    for _ in 0..50 {
        if metric(&server.metrics().await, "arrowport_inflight_requests ") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.count("events"), None);
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, r#"arrowport_requests_total{stream="events",protocol="flight",outcome="body_read_error"}"#),
        Some(1.0)
    );
    assert_eq!(put(&server, put_messages("events", &[batch(0, 5)])).await.unwrap()[0].rows_total, 5);
    server.stop().await;
}

#[tokio::test]
async fn unknown_streams_are_not_found_when_auto_create_is_off() {
    let server = TestServer::with_config(Config { auto_create: false, ..Config::default() }).await;
    let status = put(&server, put_messages("events", &[batch(0, 5)])).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    let status = client(&server).await.get_flight_info(FlightDescriptor::new_path(vec!["events".into()])).await;
    assert!(matches!(status, Err(FlightError::Tonic(s)) if s.code() == Code::NotFound));
    server.stop().await;
}

#[tokio::test]
async fn an_exhausted_memory_budget_is_resource_exhausted() {
    let server = TestServer::start().await;
    let budget = server.app.loader().budget();
    let held = budget.try_reserve(budget.capacity()).unwrap();
    let status = put(&server, put_messages("events", &[batch(0, 1000)])).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert_eq!(server.count("events"), None);
    drop(held);
    put(&server, put_messages("events", &[batch(0, 1000)])).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_batch_larger_than_the_whole_budget_is_invalid_argument() {
    let mut config = Config::default();
    config.limits.memory_budget_bytes = Some(arrowport_config::ByteSize(16 * 1024));
    let server = TestServer::with_config(config).await;
    let status = put(&server, put_messages("events", &[batch(0, 1000)])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert_eq!(status.metadata().get("x-arrowport-code").unwrap(), "batch_too_large");
    assert_eq!(server.count("events"), None);
    put(&server, put_messages("events", &[batch(0, 10)])).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn streams_are_listed_described_and_read_back() {
    let server = TestServer::start().await;
    let sent = [batch(0, 300), batch(300, 200)];
    put(&server, put_messages("events", &sent)).await.unwrap();
    let mut client = client(&server).await;
    let flights: Vec<_> = client.list_flights(vec![]).await.unwrap().try_collect().await.unwrap();
    let actions: Vec<_> = client.list_actions().await.unwrap().try_collect().await.unwrap();
    assert!(actions.is_empty(), "no actions are implemented, so none are advertised: {actions:?}");
    let events = flights.iter().find(|f| f.flight_descriptor.as_ref().unwrap().path == ["events"]).unwrap();
    assert_eq!(events.total_records, 500);
    let descriptor = FlightDescriptor::new_path(vec!["events".into()]);
    let info = client.get_flight_info(descriptor.clone()).await.unwrap();
    let names_and_types = |s: &arrow::datatypes::Schema| -> Vec<(String, arrow::datatypes::DataType)> {
        s.fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect()
    };
    assert_eq!(names_and_types(&info.clone().try_decode_schema().unwrap()), names_and_types(&schema()));
    let described = client.get_schema(descriptor).await.unwrap();
    assert_eq!(described.fields().len(), 3);
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    assert_eq!(ticket, Ticket::new("events"));
    let got: Vec<RecordBatch> = client.do_get(ticket).await.unwrap().try_collect().await.unwrap();
    // Scan order is not row order (a lake reads its Parquet files in any order): compare by id.
    let got = sorted_by_id(&concat_batches(&got[0].schema(), &got).unwrap());
    let sent = concat_batches(&sent[0].schema(), &sent).unwrap();
    assert_eq!(got.num_rows(), 500);
    for name in ["id", "name", "price"] {
        assert_eq!(got.column_by_name(name).unwrap().as_ref(), sent.column_by_name(name).unwrap().as_ref(), "{name}");
    }
    let missing = client.do_get(Ticket::new("nothing_here")).await.map(|_| ());
    assert!(matches!(missing, Err(FlightError::Tonic(s)) if s.code() == Code::NotFound));
    server.stop().await;
}

fn sorted_by_id(batch: &RecordBatch) -> RecordBatch {
    let order = arrow::compute::sort_to_indices(batch.column_by_name("id").unwrap(), None, None).unwrap();
    arrow::compute::take_record_batch(batch, &order).unwrap()
}

fn ingest_command(
    table: &str,
    if_not_exist: TableNotExistOption,
    if_exists: TableExistsOption,
) -> CommandStatementIngest {
    CommandStatementIngest {
        table_definition_options: Some(TableDefinitionOptions {
            if_not_exist: if_not_exist.into(),
            if_exists: if_exists.into(),
        }),
        table: table.to_owned(),
        ..CommandStatementIngest::default()
    }
}

async fn sql_ingest(
    sql: &mut FlightSqlServiceClient<Channel>,
    command: CommandStatementIngest,
    batches: Vec<RecordBatch>,
) -> Result<i64, Code> {
    let stream = futures::stream::iter(batches.into_iter().map(Ok));
    sql.execute_ingest(command, stream).await.map_err(|e| match e {
        FlightError::Tonic(status) => status.code(),
        other => panic!("{other}"),
    })
}

pub async fn sql_query(sql: &mut FlightSqlServiceClient<Channel>, query: &str) -> Result<RecordBatch, String> {
    let info = sql.execute(query.to_owned(), None).await.map_err(|e| e.to_string())?;
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let batches: Vec<RecordBatch> =
        sql.do_get(ticket).await.map_err(|e| e.to_string())?.try_collect().await.map_err(|e| e.to_string())?;
    let schema = info.try_decode_schema().unwrap();
    assert_eq!(batches.first().map_or(schema.fields(), |b| b.schema_ref().fields()), schema.fields());
    Ok(concat_batches(&std::sync::Arc::new(schema), &batches).unwrap())
}

#[tokio::test]
async fn flight_sql_bulk_ingest_honours_every_table_option() {
    use TableExistsOption::{Append, Fail, Replace};
    use TableNotExistOption::{Create, Fail as Refuse};
    let server = TestServer::start().await;
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    assert_eq!(
        sql_ingest(&mut sql, ingest_command("people", Refuse, Append), vec![batch(0, 3)]).await,
        Err(Code::NotFound)
    );
    assert_eq!(server.count("people"), None);
    assert_eq!(sql_ingest(&mut sql, ingest_command("people", Create, Fail), vec![batch(0, 3)]).await, Ok(3));
    assert_eq!(
        sql_ingest(&mut sql, ingest_command("people", Create, Fail), vec![batch(0, 3)]).await,
        Err(Code::AlreadyExists)
    );
    assert_eq!(sql_ingest(&mut sql, ingest_command("people", Refuse, Append), vec![batch(3, 4)]).await, Ok(4));
    assert_eq!(server.count("people"), Some(7));
    let other =
        RecordBatch::try_from_iter([("x", std::sync::Arc::new(arrow::array::Int32Array::from(vec![1, 2])) as _)])
            .unwrap();
    assert_eq!(sql_ingest(&mut sql, ingest_command("people", Create, Replace), vec![other]).await, Ok(2));
    assert_eq!(server.scalar::<i64>("SELECT sum(x) FROM people"), 3);
    let mut temporary = ingest_command("people", Create, Append);
    temporary.temporary = true;
    assert_eq!(sql_ingest(&mut sql, temporary, vec![batch(0, 1)]).await, Err(Code::InvalidArgument));
    let mut elsewhere = ingest_command("people", Create, Append);
    elsewhere.schema = Some("other".into());
    assert_eq!(sql_ingest(&mut sql, elsewhere, vec![batch(0, 1)]).await, Err(Code::InvalidArgument));
    assert_eq!(server.count("people"), Some(2));
    let text = server.metrics().await;
    assert_eq!(metric(&text, r#"arrowport_rows_total{stream="people",protocol="flightsql"}"#), Some(9.0));
    server.stop().await;
}

#[tokio::test]
async fn flight_sql_queries_read_and_can_never_write() {
    let server = TestServer::start().await;
    server.ingest_ok("events", ipc_stream(&[batch(0, 100)], None)).await;
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    let result =
        sql_query(&mut sql, "SELECT count(*) AS n, sum(id) AS total FROM events -- trailing comment").await.unwrap();
    assert_eq!(result.num_rows(), 1);
    let n = result.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap().value(0);
    assert_eq!(n, 100);
    let all = sql_query(&mut sql, "SELECT * FROM events ORDER BY id").await.unwrap();
    assert_eq!(all.num_rows(), 100);
    for statement in [
        "DROP TABLE events",
        "INSERT INTO events (id) VALUES (1)",
        "DELETE FROM events",
        "COPY events TO 'stolen.csv'",
        "SET threads = 1",
        "ATTACH ':memory:' AS other",
        "SELECT 1; DROP TABLE events",
        "SELECT * FROM no_such_table",
        "this is not sql",
    ] {
        let error = sql_query(&mut sql, statement).await.unwrap_err();
        assert!(error.contains("InvalidArgument") || error.contains("invalid argument"), "{statement}: {error}");
    }
    assert_eq!(server.count("events"), Some(100));
    server.stop().await;
}

#[tokio::test]
async fn a_query_past_its_time_limit_is_cancelled() {
    let mut config = Config::default();
    config.limits.query_timeout_seconds = 1;
    let server = TestServer::with_config(config).await;
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    let started = std::time::Instant::now();
    let error = sql_query(&mut sql, "SELECT sum(i * i) FROM range(100000000000) t(i)").await.unwrap_err();
    assert!(error.to_lowercase().contains("deadline") || error.contains("cancelled"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(sql_query(&mut sql, "SELECT 42 AS answer").await.unwrap().num_rows(), 1);
    server.stop().await;
}

#[tokio::test]
async fn flight_sql_metadata_lists_the_tables() {
    let server = TestServer::start().await;
    server.ingest_ok("events", ipc_stream(&[batch(0, 10)], None)).await;
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    let info = sql
        .get_tables(arrow_flight::sql::CommandGetTables { include_schema: true, ..Default::default() })
        .await
        .unwrap();
    let batches: Vec<RecordBatch> =
        sql.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap().try_collect().await.unwrap();
    let tables = concat_batches(&batches[0].schema(), &batches).unwrap();
    let names = tables.column_by_name("table_name").unwrap();
    let names = names.as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
    assert_eq!(names.iter().collect::<Vec<_>>(), [Some("events")]);
    let info = sql.get_sql_info(vec![arrow_flight::sql::SqlInfo::FlightSqlServerName]).await.unwrap();
    let batches: Vec<RecordBatch> =
        sql.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap().try_collect().await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    let catalogs = sql.get_catalogs().await.unwrap();
    let batches: Vec<RecordBatch> =
        sql.do_get(catalogs.endpoint[0].ticket.clone().unwrap()).await.unwrap().try_collect().await.unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    server.stop().await;
}

#[tokio::test]
async fn flight_can_have_its_own_port() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { db_path: dir.path().join("split.duckdb"), ..Config::default() };
    let state = arrowport::app::App::open(&config).unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flight = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let flight_url = format!("http://{}", flight.local_addr().unwrap());
    let http_url = format!("http://{}", http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(arrowport::transport::serve(http, Some(flight), state, None, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(flight_url).unwrap().connect().await.unwrap();
    let mut client = FlightClient::new(channel);
    let messages = put_messages("events", &[batch(0, 5)]);
    let acks: Vec<PutResult> =
        client.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await.unwrap().try_collect().await.unwrap();
    assert_eq!(acks.len(), 1);
    // HTTP stays on its own port; gRPC is not served there.
    let body = reqwest::get(format!("{http_url}/healthz")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "ok");
    let on_http = Channel::from_shared(http_url).unwrap().connect().await.unwrap();
    let listed = match FlightClient::new(on_http).list_flights(vec![]).await {
        Ok(flights) => flights.try_collect::<Vec<_>>().await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(listed.is_err(), "no Flight service on the HTTP port");
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// FlightDataEncoder output for `batches`, as a client library would send it.
#[tokio::test]
async fn encoder_built_streams_with_dictionaries_land() {
    use arrow::array::{DictionaryArray, Int32Array};
    use arrow::datatypes::Int8Type;
    let server = TestServer::start().await;
    let dictionary: DictionaryArray<Int8Type> = vec!["a", "b", "a", "c"].into_iter().collect();
    let batch = RecordBatch::try_from_iter([
        ("k", std::sync::Arc::new(dictionary) as _),
        ("v", std::sync::Arc::new(Int32Array::from(vec![1, 2, 3, 4])) as _),
    ])
    .unwrap();
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec!["dict".into()])))
        .build(futures::stream::iter([Ok(batch)]));
    let messages: Vec<FlightData> = data.try_collect().await.unwrap();
    let acks = put(&server, messages).await.unwrap();
    assert_eq!(acks[0].rows_total, 4);
    assert_eq!(server.scalar::<String>("SELECT string_agg(k, ',' ORDER BY v) FROM dict"), "a,b,a,c");
    server.stop().await;
}
