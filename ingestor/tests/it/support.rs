//! Test fixtures: a running server, Arrow bodies, and queries against the server's database.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_ipc::CompressionType;
use arrow_ipc::writer::{FileWriter, IpcWriteOptions, StreamWriter};
use arrowport::app::App;
use arrowport_api::IngestReport;
use arrowport_config::{Config, StreamConfig};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub const STREAM_TYPE: &str = "application/vnd.apache.arrow.stream";
pub const FILE_TYPE: &str = "application/vnd.apache.arrow.file";

/// An ingest server on 127.0.0.1 with its own database in a temporary directory.
pub struct TestServer {
    pub url: String,
    pub app: Arc<App>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with_config(Config::default()).await
    }

    /// Starts a server with `config`; its storage is replaced by a fresh one in a temporary directory: a
    /// DuckDB file, or a DuckLake when `ARROWPORT_TEST_STORAGE=ducklake` (see [`storage_under_test`]).
    pub async fn with_config(mut config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        config.db_path = dir.path().join("test.duckdb");
        use_storage_under_test(&mut config, dir.path());
        Self { _dir: Some(dir), ..Self::with_config_at(config).await }
    }

    /// Starts a server with `config`, on its storage as it is.
    pub async fn with_config_at(config: Config) -> Self {
        let app = arrowport::app::App::open(&config).unwrap();
        if let Some(path) = &config.auth.tokens_file {
            app.replace_tokens(&arrowport_config::settings::load_tokens(path).unwrap());
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(arrowport::transport::serve(listener, None, app.clone(), None, async {
            let _ = stopped.await;
        }));
        Self { url, app, client: reqwest::Client::new(), stop: Some(stop), task: Some(task), _dir: None }
    }

    /// POSTs `body` to `/ingest/{stream}` as an Arrow stream.
    pub async fn ingest(&self, stream: &str, body: Vec<u8>) -> reqwest::Response {
        self.ingest_with(stream, body, &[("content-type", STREAM_TYPE)]).await
    }

    pub async fn ingest_with(
        &self,
        stream: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.client.post(format!("{}/ingest/{stream}", self.url)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// POSTs and expects 200, returning the report.
    pub async fn ingest_ok(&self, stream: &str, body: Vec<u8>) -> IngestReport {
        let response = self.ingest(stream, body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Runs a query returning one value.
    pub fn scalar<T: duckdb::types::FromSql>(&self, sql: &str) -> T {
        self.app.database().with_connection(|c| c.query_row(sql, [], |row| row.get(0))).unwrap()
    }

    /// Rows in `table`, or `None` if it does not exist.
    pub fn count(&self, table: &str) -> Option<i64> {
        let exists: bool =
            self.scalar(&format!("SELECT count(*) > 0 FROM duckdb_tables() WHERE table_name = '{table}'"));
        exists.then(|| self.scalar(&format!("SELECT count(*) FROM \"{table}\"")))
    }

    /// Runs a query and returns its result as Arrow batches.
    pub fn query_arrow(&self, sql: &str) -> Vec<RecordBatch> {
        self.app.database().with_connection(|c| Ok(c.prepare(sql)?.query_arrow([])?.collect())).unwrap()
    }

    /// `GET /streams`.
    pub async fn streams_report(&self) -> arrowport_api::StreamsReport {
        self.client.get(format!("{}/streams", self.url)).send().await.unwrap().json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }

    /// Stops accepting, waits for in-flight requests, checkpoints.
    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap();
    }
}

/// The storage kind the suite runs against: `duckdb` (a file, the default) or `ducklake` (a local lake;
/// `ARROWPORT_TEST_EXTENSIONS` names the extension directory, as `scripts/duckdb-extensions` prints it).
pub fn storage_under_test() -> &'static str {
    match std::env::var("ARROWPORT_TEST_STORAGE").as_deref() {
        Ok("ducklake") => "ducklake",
        Ok("duckdb") | Err(_) => "duckdb",
        Ok(other) => panic!("ARROWPORT_TEST_STORAGE={other}: use duckdb or ducklake"),
    }
}

/// Whether the suite runs against a DuckLake.
pub fn on_ducklake() -> bool {
    storage_under_test() == "ducklake"
}

/// For tests of what only a DuckDB file has (table constraints): true, after saying so, on a lake.
pub fn skip_on_ducklake(test: &str, why: &str) -> bool {
    if on_ducklake() {
        eprintln!("SKIPPED on DuckLake: {test}: {why}");
    }
    on_ducklake()
}

/// Points `config` at the storage under test, in `dir`. A lake runs its maintenance where a DuckDB file
/// checkpoints, at `duckdb.checkpoint_interval_seconds`.
pub fn use_storage_under_test(config: &mut Config, dir: &Path) {
    if !on_ducklake() {
        return;
    }
    let extensions = std::env::var("ARROWPORT_TEST_EXTENSIONS")
        .expect("ARROWPORT_TEST_EXTENSIONS names the extension directory (bash scripts/duckdb-extensions)");
    config.duckdb.extension_directory = Some(extensions.into());
    let mut lake = arrowport_config::DuckLakeConfig::new(dir.join("meta.ducklake").to_string_lossy(), dir.join("data"));
    lake.maintenance_interval_seconds = config.duckdb.checkpoint_interval_seconds;
    config.storage = arrowport_config::StorageConfig::Ducklake(lake);
}

/// Lets a [`SlotHolder`] take the server's only load slot: one load at a time, and a stream whose
/// requests stream in a session of their own from the first row.
pub fn one_load_slot(config: &mut Config) {
    config.limits.max_concurrent_loads = 1;
    config.streams.insert("slot_holder".to_owned(), StreamConfig { chunk_size: Some(1), ..Default::default() });
}

/// A request holding the only load slot of a server configured with [`one_load_slot`] until released,
/// so that other requests queue behind it.
pub struct SlotHolder {
    rest: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    end_of_stream: Vec<u8>,
    response: JoinHandle<reqwest::Response>,
}

impl SlotHolder {
    /// Starts the request and returns once its load is running (its scan view exists).
    pub async fn take(server: &TestServer) -> Self {
        let mut body = ipc_stream(&[batch(0, 2)], None);
        let end_of_stream = body.split_off(body.len() - 8);
        let (rest, received) = tokio::sync::mpsc::channel(2);
        rest.send(Ok(body)).await.unwrap();
        let request = server
            .client
            .post(format!("{}/ingest/slot_holder", server.url))
            .header("content-type", STREAM_TYPE)
            .body(reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(received)));
        let response = tokio::spawn(async move { request.send().await.unwrap() });
        let views = "SELECT count(*) FROM duckdb_views() WHERE database_name = 'arrowport_scratch'";
        wait_until("the slot holder's load", Duration::from_secs(30), || async { server.scalar::<i64>(views) > 0 })
            .await;
        Self { rest, end_of_stream, response }
    }

    /// Waits until `queued` other requests are in flight behind the slot and checks that none of them is
    /// `answered` yet; then [releases](Self::release) the slot.
    pub async fn release_once_queued(
        self,
        server: &TestServer,
        queued: usize,
        answered: &std::sync::atomic::AtomicUsize,
    ) -> reqwest::StatusCode {
        let in_flight = Some((queued + 1) as f64);
        wait_until("all requests in flight", Duration::from_secs(30), || async {
            metric(&server.metrics().await, "arrowport_inflight_requests ") == in_flight
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing is answered before its commit");
        self.release().await
    }

    /// Ends the request and lets its load commit.
    pub async fn release(self) -> reqwest::StatusCode {
        self.rest.send(Ok(self.end_of_stream)).await.unwrap();
        drop(self.rest);
        self.response.await.unwrap().status()
    }
}

/// The value of the metric line starting with `prefix` (name and labels), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
        Field::new("price", DataType::Float64, true),
    ]))
}

/// `rows` rows with ids `start..start + rows`.
pub fn batch(start: i64, rows: usize) -> RecordBatch {
    let ids = Int64Array::from_iter_values(start..start + rows as i64);
    let names = StringArray::from_iter((0..rows).map(|i| (i % 7 != 0).then(|| format!("item-{i}"))));
    let prices = Float64Array::from_iter_values((0..rows).map(|i| i as f64 * 0.25));
    let columns: Vec<ArrayRef> = vec![Arc::new(ids), Arc::new(names), Arc::new(prices)];
    RecordBatch::try_new(schema(), columns).unwrap()
}

/// An Arrow IPC stream of `batches`, optionally with compressed buffers.
pub fn ipc_stream(batches: &[RecordBatch], compression: Option<CompressionType>) -> Vec<u8> {
    let options = IpcWriteOptions::default().try_with_compression(compression).unwrap();
    let mut writer = StreamWriter::try_new_with_options(Vec::new(), &batches[0].schema(), options).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.into_inner().unwrap()
}

pub fn ipc_file(batches: &[RecordBatch]) -> Vec<u8> {
    let mut writer = FileWriter::try_new(Vec::new(), &batches[0].schema()).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.into_inner().unwrap()
}

/// The JSON error body of a response, checked for shape.
pub async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    // The body may be partly unread: an HTTP/1.1 client must not reuse the connection.
    assert_eq!(response.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let body: serde_json::Value = response.json().await.unwrap();
    let code = body["error"]["code"].as_str().expect("error.code").to_owned();
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    (status, code)
}

/// A running `arrowport serve` and the address it logged.
pub struct Process {
    pub child: Child,
    pub url: String,
}

impl Process {
    /// Starts `arrowport serve ARGS` in `dir` with `env`, and waits for its "Listening." line.
    pub fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_arrowport"));
        command.arg("serve").args(args).current_dir(dir).stderr(Stdio::piped()).stdout(Stdio::null());
        for var in ["ARROWPORT_CONFIG", "ARROWPORT_DB", "ARROWPORT_PORT", "ARROWPORT_HOST"] {
            command.env_remove(var);
        }
        command.envs(env.iter().copied()).env("NO_COLOR", "1");
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("the server exited before listening").unwrap();
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, url: format!("http://{addr}") }
    }

    pub fn terminate(&mut self) {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().unwrap();
        panic!("the server did not exit within 30 s of SIGTERM");
    }
}

/// Polls `check` every 20 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// The repository's README. Found at run time (cargo sets `CARGO_MANIFEST_DIR` for tests), not baked in
/// at compile time, so a test binary reused from another checkout's build cache reads this checkout.
pub fn readme_path() -> std::path::PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test")).join("../README.md")
}

/// The pieces of a request body, sent as the test chooses; the body ends when the sender is dropped.
pub type BodySender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Starts an upload to `stream` whose body arrives piece by piece through the returned sender.
pub fn spawn_upload(server: &TestServer, stream: &str) -> (BodySender, JoinHandle<reqwest::Response>) {
    let (tx, rx) = mpsc::channel(4);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|piece| (piece, rx))
    }));
    let request = server.client.post(format!("{}/ingest/{stream}", server.url)).header("content-type", STREAM_TYPE);
    (tx, tokio::spawn(async move { request.body(body).send().await.unwrap() }))
}
