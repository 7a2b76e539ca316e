//! The client commands of the real `arrowport` binary (`ingest`, `streams`, `validate`) against a real
//! server, with the data checked in DuckDB.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use arrow::array::RecordBatch;
use arrowport_config::{Compression, CompressionAlgorithm, Config, StreamConfig};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::*;

/// What one run of the binary printed.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn arrowport(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_arrowport"));
    command.args(args).env_remove("ARROWPORT_SERVER").env("NO_COLOR", "1").kill_on_drop(true);
    command
}

async fn run(args: &[&str]) -> Run {
    finished(arrowport(args).output().await.unwrap())
}

fn finished(output: std::process::Output) -> Run {
    Run {
        status: output.status,
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Runs and expects success, returning stdout.
async fn run_ok(args: &[&str]) -> String {
    let run = run(args).await;
    assert!(run.status.success(), "arrowport {args:?} failed: {}{}", run.stdout, run.stderr);
    run.stdout
}

/// Runs and expects failure (exit 1), returning stderr.
async fn run_err(args: &[&str]) -> String {
    let run = run(args).await;
    assert_eq!(run.status.code(), Some(1), "arrowport {args:?}: {}{}", run.stdout, run.stderr);
    assert!(run.stderr.starts_with("error: ") || run.stderr.contains("\nerror: "), "{}", run.stderr);
    run.stderr
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).unwrap();
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
}

fn write_csv(path: &Path, batches: &[RecordBatch]) {
    let mut writer = arrow::csv::Writer::new(std::fs::File::create(path).unwrap());
    for batch in batches {
        writer.write(batch).unwrap();
    }
}

fn write_jsonl(path: &Path, batches: &[RecordBatch]) {
    let mut writer = arrow::json::LineDelimitedWriter::new(std::fs::File::create(path).unwrap());
    for batch in batches {
        writer.write(batch).unwrap();
    }
    writer.finish().unwrap();
}

/// `batches` in each format `ingest` reads, in `dir`.
fn write_files(dir: &Path, batches: &[RecordBatch]) -> Vec<PathBuf> {
    let path = |name: &str| dir.join(name);
    std::fs::write(path("data.arrows"), ipc_stream(batches, None)).unwrap();
    std::fs::write(path("data.arrow"), ipc_file(batches)).unwrap();
    write_parquet(&path("data.parquet"), batches);
    write_csv(&path("data.csv"), batches);
    write_jsonl(&path("data.jsonl"), batches);
    ["data.arrows", "data.arrow", "data.parquet", "data.csv", "data.jsonl"].map(path).to_vec()
}

/// Row count, id sum, non-null names and price sum of `table`.
fn contents(server: &TestServer, table: &str) -> (i64, i64, i64, f64) {
    (
        server.scalar(&format!("SELECT count(*) FROM {table}")),
        server.scalar(&format!("SELECT sum(id)::BIGINT FROM {table}")),
        server.scalar(&format!("SELECT count(name) FROM {table}")),
        server.scalar(&format!("SELECT sum(price) FROM {table}")),
    )
}

/// What `batches` put into a table.
fn expected(batches: &[RecordBatch]) -> (i64, i64, i64, f64) {
    let mut totals = (0, 0, 0, 0.0);
    for batch in batches {
        let ids = batch.column(0).as_any().downcast_ref::<arrow::array::Int64Array>().unwrap();
        let prices = batch.column(2).as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
        totals.0 += batch.num_rows() as i64;
        totals.1 += ids.values().iter().sum::<i64>();
        totals.2 += (batch.num_rows() - batch.column(1).null_count()) as i64;
        totals.3 += prices.values().iter().sum::<f64>();
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_lands_over_http_and_flight() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let batches = [batch(0, 1000), batch(1000, 500)];
    let files = write_files(dir.path(), &batches);
    for transport in ["--http", "--flight"] {
        for file in &files {
            let format = file.extension().unwrap().to_str().unwrap();
            let stream = format!("{format}_{}", transport.trim_start_matches('-'));
            let stdout = run_ok(&["ingest", &stream, file.to_str().unwrap(), transport, "--server", &server.url]).await;
            assert!(stdout.starts_with(&format!("{stream}: 1500 rows committed over ")), "{stdout}");
            assert_eq!(contents(&server, &stream), expected(&batches), "{stream}");
        }
    }
    // All five files in one invocation: one request, one transaction.
    let all: Vec<&str> = files.iter().map(|file| file.to_str().unwrap()).collect();
    let stdout = run_ok(&[&["ingest", "everything", "--server", &server.url], all.as_slice()].concat()).await;
    assert!(stdout.starts_with("everything: 7500 rows committed over HTTP"), "{stdout}");
    assert_eq!(contents(&server, "everything").0, 7500);
    let report = server.streams_report().await;
    let everything = report.streams.iter().find(|s| s.stream == "everything").unwrap();
    assert_eq!(everything.stats.requests, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_an_arrow_ipc_stream() {
    let server = TestServer::start().await;
    let batches = [batch(0, 3000)];
    for transport in ["--http", "--flight"] {
        let stream = format!("piped_{}", transport.trim_start_matches('-'));
        let mut child = arrowport(&["ingest", &stream, "-", transport, "--server", &server.url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&ipc_stream(&batches, None)).await.unwrap();
        drop(stdin);
        let run = finished(child.wait_with_output().await.unwrap());
        assert!(run.status.success(), "{}", run.stderr);
        // Not a terminal: no progress bar, nothing on stderr.
        assert_eq!(run.stderr, "");
        assert!(run.stdout.starts_with(&format!("{stream}: 3000 rows")), "{}", run.stdout);
        assert_eq!(contents(&server, &stream), expected(&batches));
    }
    server.stop().await;
}

/// Rows that compress well, so compressed and plain uploads differ clearly on the wire.
fn repetitive(rows: usize) -> RecordBatch {
    let mut batch = batch(0, rows);
    let names = arrow::array::StringArray::from_iter_values((0..rows).map(|_| "the same long name, again and again"));
    let mut columns = batch.columns().to_vec();
    columns[1] = std::sync::Arc::new(names);
    batch = RecordBatch::try_new(batch.schema(), columns).unwrap();
    batch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_follows_the_flag_or_the_server() {
    let mut config = Config::default();
    let lz4 = Compression { algorithm: CompressionAlgorithm::Lz4, level: None };
    config.streams.insert("fast".to_owned(), StreamConfig { compression: Some(lz4), ..StreamConfig::default() });
    let server = TestServer::with_config(config).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("repetitive.arrows");
    std::fs::write(&file, ipc_stream(&[repetitive(20_000)], None)).unwrap();
    let file = file.to_str().unwrap();
    for (stream, flags, buffers) in [
        ("plain", &["--compression", "none"][..], "none"),
        ("zstd_flag", &["--compression", "zstd"], "zstd"),
        ("lz4_flag", &["--compression", "lz4", "--flight"], "lz4"),
        // No flag: the stream's configured compression, else the server's default (zstd).
        ("fast", &[], "lz4"),
        ("other", &[], "zstd"),
    ] {
        let stdout = run_ok(&[&["ingest", stream, file, "--server", &server.url], flags].concat()).await;
        assert!(stdout.trim_end().ends_with(&format!("{buffers} buffers)")), "{stream}: {stdout}");
        assert_eq!(contents(&server, stream).0, 20_000);
    }
    // What the server received says the same: compressed uploads are a fraction of their data.
    let report = server.streams_report().await;
    for entry in &report.streams {
        let ratio = entry.compression_ratio.unwrap();
        if entry.stream == "plain" {
            assert!(ratio < 1.1, "{}: {ratio}", entry.stream);
        } else if entry.stream != "lz4_flag" {
            // (Flight commits do not count wire bytes per stream.)
            assert!(ratio > 2.0, "{}: {ratio}", entry.stream);
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rows_rechunks() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.arrows");
    let batches: Vec<RecordBatch> = (0..10).map(|i| batch(i * 30, 30)).collect();
    std::fs::write(&small, ipc_stream(&batches, None)).unwrap();
    let big = dir.path().join("big.arrows");
    std::fs::write(&big, ipc_stream(&[batch(0, 1000), batch(1000, 500)], None)).unwrap();
    run_ok(&["ingest", "combined", small.to_str().unwrap(), "--batch-rows", "100", "--server", &server.url]).await;
    run_ok(&["ingest", "split", big.to_str().unwrap(), "--batch-rows", "100", "--server", &server.url]).await;
    run_ok(&["ingest", "as_read", big.to_str().unwrap(), "--server", &server.url]).await;
    let report = server.streams_report().await;
    let batches_of = |name: &str| report.streams.iter().find(|s| s.stream == name).unwrap().stats.batches;
    assert_eq!(batches_of("combined"), 3, "300 rows in batches of 100");
    assert_eq!(batches_of("split"), 15);
    assert_eq!(batches_of("as_read"), 2);
    assert_eq!(contents(&server, "combined"), expected(&batches));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_the_reason() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.arrows");
    std::fs::write(&good, ipc_stream(&[batch(0, 100)], None)).unwrap();
    let good = good.to_str().unwrap();

    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = format!("http://{closed}");
    for flags in [&[][..], &["--compression", "none"], &["--flight", "--compression", "none"]] {
        let stderr = run_err(&[&["ingest", "events", good, "--server", &down], flags].concat()).await;
        assert!(stderr.contains(&format!("cannot reach the server at {down}")), "{flags:?}: {stderr}");
    }

    let unknown = dir.path().join("data.xyz");
    std::fs::write(&unknown, "not data").unwrap();
    let stderr = run_err(&["ingest", "events", unknown.to_str().unwrap(), "--server", &down]).await;
    assert!(stderr.contains("data.xyz: unknown file type"), "{stderr}");
    let stderr = run_err(&["ingest", "events", "/nonexistent/file.csv", "--server", &server.url]).await;
    assert!(stderr.contains("/nonexistent/file.csv: No such file"), "{stderr}");

    // The table has `id BIGINT`; a CSV whose ids are text does not fit it.
    run_ok(&["ingest", "events", good, "--server", &server.url]).await;
    let text_ids = dir.path().join("text_ids.csv");
    std::fs::write(&text_ids, "id,name\nfirst,a\nsecond,b\n").unwrap();
    let stderr = run_err(&["ingest", "events", text_ids.to_str().unwrap(), "--server", &server.url]).await;
    let mismatch = "id is BIGINT in the table but VARCHAR in the data";
    assert!(stderr.contains("HTTP 422 schema_mismatch") && stderr.contains(mismatch), "{stderr}");
    let stderr = run_err(&["ingest", "events", text_ids.to_str().unwrap(), "--flight", "--server", &server.url]).await;
    assert!(stderr.contains("gRPC FAILED_PRECONDITION schema_mismatch") && stderr.contains(mismatch), "{stderr}");
    assert_eq!(server.count("events"), Some(100));

    // Files of one upload must share their columns (in any order); nothing is sent otherwise.
    let upload = |second: &Path| {
        let args = ["ingest", "mixed", good, second.to_str().unwrap(), "--server", &server.url].map(str::to_owned);
        async move { run_err(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let stderr = upload(&text_ids).await;
    assert!(
        stderr.contains(&format!(
            "text_ids.csv does not have the columns of {good}: its column `id` is Utf8 where {good} has Int64"
        )),
        "{stderr}"
    );
    let no_price = dir.path().join("no_price.csv");
    std::fs::write(&no_price, "id,name\n1,a\n").unwrap();
    assert!(upload(&no_price).await.contains("no_price.csv does not have the columns of"));
    assert!(upload(&no_price).await.contains("it lacks the column `price`"));
    let extra = dir.path().join("extra.csv");
    std::fs::write(&extra, "price,id,name,colour\n1.5,1,a,red\n").unwrap();
    assert!(upload(&extra).await.contains("it has a column `colour` that"));
    let reordered = dir.path().join("reordered.csv");
    std::fs::write(&reordered, "price,name,id\n1.5,a,100\n").unwrap();
    run_ok(&["ingest", "mixed", good, reordered.to_str().unwrap(), "--server", &server.url]).await;
    assert_eq!(server.scalar::<f64>("SELECT price FROM mixed WHERE id = 100"), 1.5);
    assert_eq!(server.count("mixed"), Some(101));

    // A value the CSV reader cannot parse, after the rows its types were inferred from: the read
    // fails mid-upload and the request is rolled back.
    let late = dir.path().join("late_error.csv");
    let mut text = String::from("id,name,price\n");
    for i in 0..20_000 {
        text += &format!("{i},item-{i},{i}.5\n");
    }
    text += "oops,x,1.0\n";
    std::fs::write(&late, text).unwrap();
    for transport in ["--http", "--flight"] {
        let stderr = run_err(&[
            "ingest",
            "late",
            late.to_str().unwrap(),
            transport,
            "--batch-rows",
            "1000",
            "--server",
            &server.url,
        ])
        .await;
        assert!(stderr.contains("late_error.csv: Parser error") && stderr.contains("oops"), "{stderr}");
        assert_eq!(server.count("late"), None, "{transport}: nothing of a failed upload is committed");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lists_the_server_and_a_config() {
    let server = TestServer::with_config(
        Config::from_yaml("streams:\n  sensors: {target_table: sensor_readings, schema_policy: evolve}\n").unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.arrows");
    std::fs::write(&file, ipc_stream(&[batch(0, 1234)], None)).unwrap();
    run_ok(&["ingest", "sensors", file.to_str().unwrap(), "--server", &server.url]).await;

    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["streams", "--output", "json", "--server", &server.url]).await).unwrap();
    assert_eq!(json["streams"][0]["stream"], "sensors");
    assert_eq!(json["streams"][0]["table"], "sensor_readings");
    assert_eq!(json["streams"][0]["rows"], 1234);

    let table = run_ok(&["streams", "--server", &server.url]).await;
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["STREAM", "TABLE", "ROWS", "BYTES", "COMPRESSION", "POLICY", "LAST", "WRITE"]);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..3], ["sensors", "sensor_readings", "1234"], "{table}");
    assert_eq!(row[5..7], ["zstd(3)", "evolve"], "{table}");
    assert!(lines[2].starts_with("Other streams: a table named after the stream"), "{table}");

    // --config: what the file would route, without a server (this one is down).
    let config = dir.path().join("config.yaml");
    let streams = dir.path().join("streams.yaml");
    std::fs::write(&streams, "streams:\n  b.v2: {schema_policy: evolve}\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "auto_create: false\nstreams_path: {}\nstreams:\n  a: {{target_table: t_a, compression: {{algorithm: lz4}}}}\n",
            streams.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let table = run_ok(&["streams", "--config", config, "--server", "http://127.0.0.1:1"]).await;
    assert_eq!(
        table,
        "STREAM  TABLE  COMPRESSION  POLICY\na       t_a    lz4          reject\nb.v2    b_v2   zstd(3)      evolve\n\
         Other streams: refused (auto_create is off).\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["streams", "--config", config, "-o", "json"]).await).unwrap();
    assert_eq!(json["auto_create"], false);
    assert_eq!(json["streams"][1]["stream"], "b.v2");
    assert_eq!(json["streams"][1]["chunk_size"], 122_880);
    assert_eq!(json["streams"][1]["flush"]["rows"], 10_000_000);

    let stderr = run_err(&["streams", "--server", "http://127.0.0.1:1"]).await;
    assert!(stderr.contains("cannot reach the server at http://127.0.0.1:1"), "{stderr}");
    server.stop().await;
}

#[tokio::test]
async fn validate_prints_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "limits:\n  max_concurrent_loads: 0\nstreams:\n  events:\n    chunk_size: 0\n    target_table: '9x'\n  -b: {}\n",
    )
    .unwrap();
    let run = run(&["validate", "--config", bad.to_str().unwrap()]).await;
    assert_eq!(run.status.code(), Some(1));
    let bad = bad.display();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{bad}: limits.max_concurrent_loads: must be at least 1 (line 2)"),
            format!(
                "{bad}: streams.-b: stream names are 1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-' (line 7)"
            ),
            format!(
                "{bad}: streams.events.target_table: table names are 1-128 characters of [A-Za-z0-9_], not starting with a digit (line 6)"
            ),
            format!("{bad}: streams.events.chunk_size: must be at least 1 (line 5)"),
            format!("error: {bad}: 4 problems"),
        ]
    );
    assert_eq!(run.stdout, "");

    // The streams file a config names is checked too.
    let streams = dir.path().join("streams.yaml");
    let config = dir.path().join("config.yaml");
    std::fs::write(&streams, "streams:\n  a: {flush: {rows: 0}}\n").unwrap();
    std::fs::write(&config, format!("streams_path: {}\n", streams.display())).unwrap();
    let stderr = run_err(&["validate", "-c", config.to_str().unwrap()]).await;
    assert!(stderr.contains(&format!("{}: streams.a.flush.rows: must be at least 1 (line 2)", streams.display())));
    assert!(stderr.contains(&format!("{}: 1 problem\n", config.display())), "{stderr}");

    let stderr = run_err(&["validate", "-c", "/nonexistent/config.yaml"]).await;
    assert!(stderr.starts_with("error: cannot read /nonexistent/config.yaml: No such file"), "{stderr}");

    std::fs::write(&streams, "streams:\n  a: {flush: {rows: 10}}\n").unwrap();
    assert_eq!(
        run_ok(&["validate", "--config", config.to_str().unwrap()]).await,
        format!("{}: ok\n", config.display())
    );
}

#[tokio::test]
async fn version_and_help() {
    assert_eq!(run_ok(&["--version"]).await, format!("arrowport {}\n", env!("CARGO_PKG_VERSION")));
    let help = run_ok(&["ingest", "--help"]).await;
    for flag in ["--server", "--flight", "--http", "--compression", "--batch-rows", "ARROWPORT_SERVER"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    assert!(run_ok(&["streams", "--help"]).await.contains("--output"));
    // --flight and --http exclude each other.
    let run = run(&["ingest", "s", "f.arrows", "--flight", "--http"]).await;
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
}

/// The README's `<!-- test: cli -->` block, line by line, in a directory holding the files it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_examples_run_as_written() {
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let block = readme.split("<!-- test: cli -->\n```sh\n").nth(1).expect("the README's cli block");
    let block = block.split("```").next().unwrap();
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    std::fs::write(file("events.arrows"), ipc_stream(&[batch(0, 100)], None)).unwrap();
    write_parquet(&file("orders-1.parquet"), &[batch(0, 1000)]);
    write_parquet(&file("orders-2.parquet"), &[batch(1000, 500)]);
    write_csv(&file("readings.csv"), &[batch(0, 70)]);
    write_jsonl(&file("readings.jsonl"), &[batch(70, 30)]);
    std::fs::write(file("config.yaml"), "streams:\n  sensors: {target_table: sensor_readings}\n").unwrap();
    let binaries = Path::new(env!("CARGO_BIN_EXE_arrowport")).parent().unwrap();
    let path = format!("{}:{}", binaries.display(), std::env::var("PATH").unwrap());
    for line in block.lines() {
        let output = Command::new("sh")
            .args(["-c", line])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("ARROWPORT_SERVER", &server.url)
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        let run = finished(output);
        assert!(run.status.success(), "{line}: {}{}", run.stdout, run.stderr);
    }
    assert_eq!(server.count("events"), Some(300));
    assert_eq!(server.count("orders"), Some(1500));
    assert_eq!(server.count("sensors"), Some(100));
    server.stop().await;
}
