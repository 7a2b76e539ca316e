//! Access control on every route: tokens from a tokens file, per-stream write grants, the query grant,
//! over HTTP, Flight and Flight SQL; refusals while legitimate traffic keeps flowing; the tokens file's
//! hot reload through the real binary, swapped as the kubelet swaps a Secret volume.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use arrow_flight::error::FlightError;
use arrow_flight::sql::CommandStatementIngest;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightClient, FlightData, FlightDescriptor, PutResult, Ticket};
use arrowport_config::{Config, StreamConfig, token_sha256};
use futures::TryStreamExt;
use tonic::Code;

use crate::flight::{channel, put_messages};
use crate::support::*;

const LOADER: &str = "loader-7f3a9c";
const READER: &str = "reader-51be02";
const OTHER: &str = "other-c0ffee";

/// `loader` writes `events` and `sensors.*`; `reader` queries; `other` writes `orders`, and is named as a
/// writer of the configured stream `shared`.
fn tokens_yaml(with_other: bool) -> String {
    let mut text = format!(
        "tokens:\n  loader:\n    sha256: {}\n    write: [events, 'sensors.*']\n  reader:\n    sha256: {}\n    query: true\n",
        token_sha256(LOADER.as_bytes()),
        token_sha256(READER.as_bytes()),
    );
    if with_other {
        text += &format!("  other:\n    sha256: {}\n    write: [orders]\n", token_sha256(OTHER.as_bytes()));
    }
    text
}

async fn server(dir: &Path) -> TestServer {
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, tokens_yaml(true)).unwrap();
    let mut config = Config::default();
    config.auth.tokens_file = Some(tokens);
    config
        .streams
        .insert("shared".to_owned(), StreamConfig { writers: vec!["other".to_owned()], ..Default::default() });
    TestServer::with_config(config).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn ingest_as(server: &TestServer, stream: &str, token: Option<&str>) -> reqwest::Response {
    let authorization = token.map(bearer);
    let mut headers = vec![("content-type", STREAM_TYPE)];
    if let Some(value) = &authorization {
        headers.push(("authorization", value.as_str()));
    }
    server.ingest_with(stream, ipc_stream(&[batch(0, 10)], None), &headers).await
}

async fn streams_as(server: &TestServer, token: Option<&str>) -> reqwest::Response {
    let mut request = server.client.get(format!("{}/streams", server.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// Status and JSON error code of a refused HTTP request.
async fn refusal(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().unwrap().to_owned())
}

/// Producers writing their streams with their tokens the whole time a test runs: each must succeed.
fn legitimate_traffic(server: &TestServer) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<u64>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (client, url) = (server.client.clone(), server.url.clone());
    let task = tokio::spawn(async move {
        let mut sent = 0;
        while !*stopped.borrow() {
            let response = client
                .post(format!("{url}/ingest/sensors.a"))
                .header("content-type", STREAM_TYPE)
                .bearer_auth(LOADER)
                .body(ipc_stream(&[batch(sent as i64 * 10, 10)], None))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
            sent += 1;
        }
        sent
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refuses_each_request_outside_its_grant_while_granted_ones_land() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let (stop, traffic) = legitimate_traffic(&server);

    // No token, a wrong one, a malformed header: 401, and the ingest reads no body.
    let response = ingest_as(&server, "events", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_code(response).await, (401, "unauthenticated".to_owned()));
    assert_eq!(refusal(ingest_as(&server, "events", Some("guessed")).await).await, (401, "unauthenticated".into()));
    let basic_scheme = [("content-type", STREAM_TYPE), ("authorization", "Token loader-7f3a9c")];
    let response = server.ingest_with("events", ipc_stream(&[batch(0, 1)], None), &basic_scheme).await;
    assert_eq!(refusal(response).await, (401, "unauthenticated".into()));
    // A valid token for another stream, and a token without the query grant: 403.
    assert_eq!(error_code(ingest_as(&server, "orders", Some(LOADER)).await).await, (403, "permission_denied".into()));
    assert_eq!(refusal(ingest_as(&server, "sensorsx", Some(LOADER)).await).await, (403, "permission_denied".into()));
    assert_eq!(refusal(ingest_as(&server, "events", Some(READER)).await).await, (403, "permission_denied".into()));
    assert_eq!(refusal(streams_as(&server, Some(LOADER)).await).await, (403, "permission_denied".into()));
    assert_eq!(refusal(streams_as(&server, None).await).await, (401, "unauthenticated".into()));

    // Granted: by name, by pattern, by the stream's `writers`, and the query grant.
    assert_eq!(ingest_as(&server, "events", Some(LOADER)).await.status(), 200);
    assert_eq!(ingest_as(&server, "orders", Some(OTHER)).await.status(), 200);
    assert_eq!(ingest_as(&server, "shared", Some(OTHER)).await.status(), 200);
    assert_eq!(refusal(ingest_as(&server, "shared", Some(LOADER)).await).await, (403, "permission_denied".into()));
    let report: arrowport_api::StreamsReport = streams_as(&server, Some(READER)).await.json().await.unwrap();
    assert!(report.streams.iter().any(|stream| stream.stream == "events"));
    // Basic with the token as the password works like Bearer.
    let response = server
        .client
        .post(format!("{}/ingest/events", server.url))
        .header("content-type", STREAM_TYPE)
        .basic_auth("whoever", Some(LOADER))
        .body(ipc_stream(&[batch(0, 10)], None))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Health, readiness and metrics stay open.
    for path in ["healthz", "readyz", "metrics"] {
        let response = server.client.get(format!("{}/{path}", server.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "/{path}");
    }
    stop.send(true).unwrap();
    let sent = traffic.await.unwrap();
    assert!(sent > 0);
    assert_eq!(server.count("sensors_a"), Some(sent as i64 * 10), "every granted request landed");
    assert_eq!(server.count("events"), Some(20));
    let text = server.metrics().await;
    for (reason, count) in [("missing", 2.0), ("invalid", 2.0), ("stream_not_granted", 4.0), ("query_not_granted", 1.0)]
    {
        let line = format!(r#"arrowport_auth_refusals_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&text, &line), Some(count), "{reason}");
    }
    assert_eq!(metric(&text, "arrowport_auth_tokens "), Some(3.0));
    // A refused stream is no label (clients could mint time series), and the tokens appear nowhere.
    assert_eq!(
        metric(&text, r#"arrowport_requests_total{stream="",protocol="http",outcome="permission_denied"}"#),
        Some(4.0)
    );
    assert!(![LOADER, READER, OTHER].iter().any(|token| text.contains(token)));
    server.stop().await;
}

async fn flight_client(server: &TestServer, token: Option<&str>) -> FlightClient {
    let mut client = FlightClient::new(channel(server).await);
    if let Some(token) = token {
        client.add_header("authorization", &bearer(token)).unwrap();
    }
    client
}

fn code<T>(result: Result<T, FlightError>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(FlightError::Tonic(status)) => status.code(),
        Err(other) => panic!("not a gRPC status: {other}"),
    }
}

async fn put_as(server: &TestServer, token: Option<&str>, stream: &str) -> Code {
    let mut client = flight_client(server, token).await;
    let messages: Vec<FlightData> = put_messages(stream, &[batch(0, 5)]);
    let result = match client.do_put(futures::stream::iter(messages.into_iter().map(Ok))).await {
        Ok(replies) => replies.try_collect::<Vec<PutResult>>().await,
        Err(error) => Err(error),
    };
    code(result)
}

async fn sql_client(server: &TestServer, token: Option<&str>) -> FlightSqlServiceClient<tonic::transport::Channel> {
    let mut sql = FlightSqlServiceClient::new(channel(server).await);
    if let Some(token) = token {
        sql.set_token(token.to_owned());
    }
    sql
}

async fn sql_ingest_as(server: &TestServer, token: Option<&str>, table: &str) -> Code {
    let command = CommandStatementIngest { table: table.to_owned(), ..Default::default() };
    let batches = futures::stream::iter([Ok(batch(0, 3))]);
    code(sql_client(server, token).await.execute_ingest(command, batches).await)
}

async fn sql_query_as(server: &TestServer, token: Option<&str>) -> Code {
    code(sql_client(server, token).await.execute("SELECT count(*) FROM events".to_owned(), None).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_refuses_each_call_outside_its_grant_while_granted_ones_land() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let (stop, traffic) = legitimate_traffic(&server);

    // DoPut (its own codec route): no token, a wrong one; another stream; a reader.
    assert_eq!(put_as(&server, None, "events").await, Code::Unauthenticated);
    assert_eq!(put_as(&server, Some("guessed"), "events").await, Code::Unauthenticated);
    assert_eq!(put_as(&server, Some(LOADER), "orders").await, Code::PermissionDenied);
    assert_eq!(put_as(&server, Some(READER), "events").await, Code::PermissionDenied);
    assert_eq!(put_as(&server, Some(LOADER), "events").await, Code::Ok);
    assert_eq!(put_as(&server, Some(OTHER), "shared").await, Code::Ok);
    // Flight SQL bulk ingest: the table is the stream.
    assert_eq!(sql_ingest_as(&server, None, "events").await, Code::Unauthenticated);
    assert_eq!(sql_ingest_as(&server, Some(LOADER), "orders").await, Code::PermissionDenied);
    assert_eq!(sql_ingest_as(&server, Some(LOADER), "sensors.b").await, Code::Ok);

    // Reads need the query grant: DoGet, ListFlights, GetFlightInfo, GetSchema, Flight SQL.
    let descriptor = FlightDescriptor::new_path(vec!["events".to_owned()]);
    for (token, expected) in [
        (None, Code::Unauthenticated),
        (Some("guessed"), Code::Unauthenticated),
        (Some(LOADER), Code::PermissionDenied),
    ] {
        let mut client = flight_client(&server, token).await;
        let read = client.do_get(Ticket::new("events")).await;
        assert_eq!(
            code(match read {
                Ok(stream) => stream.try_collect::<Vec<_>>().await.map(drop),
                Err(error) => Err(error),
            }),
            expected,
            "DoGet {token:?}"
        );
        let listed = match client.list_flights("").await {
            Ok(stream) => stream.try_collect::<Vec<_>>().await.map(drop),
            Err(error) => Err(error),
        };
        assert_eq!(code(listed), expected, "ListFlights {token:?}");
        assert_eq!(code(client.get_flight_info(descriptor.clone()).await), expected, "GetFlightInfo {token:?}");
        assert_eq!(code(client.get_schema(descriptor.clone()).await), expected, "GetSchema {token:?}");
        assert_eq!(sql_query_as(&server, token).await, expected, "Flight SQL {token:?}");
    }
    let mut reader = flight_client(&server, Some(READER)).await;
    let rows: usize = reader
        .do_get(Ticket::new("events"))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|batch| batch.num_rows())
        .sum();
    assert_eq!(rows, 5);
    assert_eq!(code(reader.get_flight_info(descriptor).await), Code::Ok);
    assert_eq!(sql_query_as(&server, Some(READER)).await, Code::Ok);

    // The Flight SQL handshake with a user name and password (password = token) hands out the bearer
    // token, which the client then sends; a wrong password is refused.
    let mut sql = FlightSqlServiceClient::new(channel(&server).await);
    sql.handshake("anyone", READER).await.unwrap();
    assert_eq!(sql.token().map(String::as_str), Some(READER));
    assert!(sql.execute("SELECT 1".to_owned(), None).await.is_ok());
    let mut wrong = FlightSqlServiceClient::new(channel(&server).await);
    let refused = wrong.handshake("anyone", "guessed").await.unwrap_err().to_string();
    assert!(refused.contains("Unauthenticated") || refused.contains("unauthenticated"), "{refused}");

    stop.send(true).unwrap();
    let sent = traffic.await.unwrap();
    assert_eq!(server.count("sensors_a"), Some(sent as i64 * 10));
    assert_eq!(server.count("orders"), None, "nothing refused was written");
    assert_eq!(server.count("sensors_b"), Some(3));
    server.stop().await;
}

/// Lays out a directory as the kubelet mounts a Secret: `tokens.yaml -> ..data/tokens.yaml`,
/// `..data -> ..<version>`, swapped atomically.
fn secret_version(mount: &Path, version: &str, tokens_yaml: &str) {
    let dir = mount.join(format!("..{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokens.yaml"), tokens_yaml).unwrap();
    let tmp = mount.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, mount.join("..data")).unwrap();
    if !mount.join("tokens.yaml").exists() {
        symlink("..data/tokens.yaml", mount.join("tokens.yaml")).unwrap();
    }
}

async fn status_as(url: &str, token: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/ingest/orders"))
        .header("content-type", STREAM_TYPE)
        .bearer_auth(token)
        .body(ipc_stream(&[batch(0, 1)], None))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_tokens_secret_is_in_force_within_seconds_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("tokens");
    std::fs::create_dir(&mount).unwrap();
    secret_version(&mount, "v1", &tokens_yaml(false));
    let base = format!("db_path: auth.duckdb\nauth: {{tokens_file: {}}}\n", mount.join("tokens.yaml").display());
    std::fs::write(dir.path().join("config.yaml"), base).unwrap();
    let mut server = Process::serve(dir.path(), &["--config", "config.yaml", "--port", "0"], &[]);
    assert_eq!(status_as(&server.url, OTHER).await, 401, "not in the first version");

    // The Secret gains `other` (may write orders): in force without a restart.
    secret_version(&mount, "v2", &tokens_yaml(true));
    std::fs::remove_dir_all(mount.join("..v1")).unwrap();
    let took =
        wait_until("the new tokens", Duration::from_secs(10), || async { status_as(&server.url, OTHER).await == 200 })
            .await;
    assert!(took < Duration::from_secs(2), "the swap took {took:?}");
    assert_eq!(status_as(&server.url, LOADER).await, 403);

    // A version that does not validate keeps the tokens in force.
    secret_version(&mount, "v3", "tokens:\n  other: {sha256: not-a-hash}\n");
    let metrics = format!("{}/metrics", server.url);
    wait_until("the refused reload", Duration::from_secs(10), || async {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        metric(&text, "arrowport_config_reload_failures_total ") == Some(1.0)
    })
    .await;
    assert_eq!(status_as(&server.url, OTHER).await, 200);

    // `other` revoked: refused from then on.
    secret_version(&mount, "v4", &tokens_yaml(false));
    wait_until("the revocation", Duration::from_secs(10), || async { status_as(&server.url, OTHER).await == 401 })
        .await;
    server.terminate();
    assert!(server.wait().success());
}

/// The binary's client commands: `token hash`, and `ingest` / `streams` with `--token-file` or
/// `ARROWPORT_TOKEN`, over HTTP and Flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_send_their_token_and_hash_tokens() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let file = dir.path().join("events.arrows");
    std::fs::write(&file, ipc_stream(&[batch(0, 10)], None)).unwrap();
    let token_file = dir.path().join("loader.token");
    std::fs::write(&token_file, format!("{LOADER}\n")).unwrap();
    let (file, token_file) = (file.to_str().unwrap(), token_file.to_str().unwrap());
    let arrowport = |args: &[&str], token: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_arrowport"));
        command.args(args).env_remove("ARROWPORT_TOKEN").env("ARROWPORT_SERVER", &server.url).env("NO_COLOR", "1");
        if let Some(token) = token {
            command.env("ARROWPORT_TOKEN", token);
        }
        command
    };

    let mut hash = arrowport(&["token", "hash"], None)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    hash.stdin.take().unwrap().write_all(format!("{LOADER}\n").as_bytes()).await.unwrap();
    let printed = hash.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), format!("{}\n", token_sha256(LOADER.as_bytes())));

    let refused = arrowport(&["ingest", "events", file], None).output().await.unwrap();
    let stderr = String::from_utf8(refused.stderr).unwrap();
    assert!(stderr.contains("HTTP 401 unauthenticated"), "{stderr}");
    for (args, token) in [
        (vec!["ingest", "events", file, "--token-file", token_file], None),
        (vec!["ingest", "events", file, "--flight"], Some(LOADER)),
    ] {
        let done = arrowport(&args, token).output().await.unwrap();
        assert!(done.status.success(), "{args:?}: {}", String::from_utf8_lossy(&done.stderr));
    }
    let other = arrowport(&["ingest", "orders", file, "--flight"], Some(LOADER)).output().await.unwrap();
    let stderr = String::from_utf8(other.stderr).unwrap();
    assert!(stderr.contains("PERMISSION_DENIED permission_denied"), "{stderr}");
    let listed = arrowport(&["streams", "--output", "json"], Some(READER)).output().await.unwrap();
    assert!(String::from_utf8(listed.stdout).unwrap().contains("\"events\""));
    let not_reader = arrowport(&["streams"], Some(LOADER)).output().await.unwrap();
    assert!(String::from_utf8(not_reader.stderr).unwrap().contains("HTTP 403 permission_denied"));
    assert_eq!(server.count("events"), Some(20));
    server.stop().await;
}
