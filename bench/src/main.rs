//! `arrowport-bench`: Arrowport's HTTP and Flight ingest against in-process DuckDB loading of the same
//! data, on the same machine, in one run. Run it through `bench/run`, which builds the release binaries
//! first.

mod data;
mod flight;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::RecordBatch;
use arrow_flight::FlightData;
use arrow_ipc::CompressionType;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
use arrowport::budget::MemoryBudget;
use arrowport::load::{Loader, LoaderOptions, Proof, TableMode, Target, decoded_size};
use arrowport::store::{Database, DatabaseOptions};
use arrowport_config::SchemaPolicy;
use clap::Parser;

use server::{FreshStorage, Server, StorageKind, Usage, own_cpu_time};

/// Measures Arrowport's HTTP and Flight ingest against in-process DuckDB loading of the same batches.
#[derive(Parser)]
struct Args {
    /// Rows loaded by each scenario.
    #[arg(long, default_value_t = 2_000_000)]
    rows: u64,
    /// Rows per record batch (122,880 is one DuckDB row group).
    #[arg(long, default_value_t = 122_880)]
    batch_rows: usize,
    /// The `arrowport` binary to start for the HTTP and Flight scenarios.
    #[arg(long)]
    server: PathBuf,
    /// The small-request scenarios, each `ROWSxPRODUCERS`: requests of ROWS rows from PRODUCERS concurrent
    /// producers (repeat the flag for several).
    #[arg(long = "small", value_parser = small_point, default_values = ["1000x32", "100x256"])]
    small: Vec<SmallPoint>,
    /// Size of the single streamed upload whose server peak RSS is reported (0 skips it).
    #[arg(long, default_value_t = 1.0)]
    upload_gib: f64,
    /// Runs of each scenario, each right after a run of the in-process baseline (with as many concurrent
    /// sessions as the scenario has producers); the table shows the run with the median ratio to its
    /// baseline (and the highest peak RSS of all runs).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Run only the scenarios whose name contains this text (the in-process baseline always runs).
    #[arg(long)]
    only: Option<String>,
    /// What every scenario, in-process baselines included, writes into.
    #[arg(long, value_enum, default_value_t = StorageArg::Duckdb)]
    storage: StorageArg,
    /// The DuckDB extension directory for `--storage ducklake` (bench/run sets it from
    /// scripts/duckdb-extensions).
    #[arg(long, env = "ARROWPORT_EXTENSIONS")]
    extensions: Option<PathBuf>,
    /// With `--storage ducklake`: `postgres:` and a libpq connection string to a PostgreSQL server
    /// where every lake, in-process ones included, gets a catalog database of its own (created and
    /// dropped); without it each lake has a local catalog file. Adds the scenarios of two ingesters
    /// sharing one lake.
    #[arg(long, value_parser = postgres_server)]
    catalog: Option<String>,
}

/// The PostgreSQL server's connection string in a `--catalog` value.
fn postgres_server(catalog: &str) -> Result<String, String> {
    match catalog.strip_prefix("postgres:") {
        Some(server) => Ok(server.to_owned()),
        None => Err("the catalog is `postgres:` and a libpq connection string (a local catalog is the default)".into()),
    }
}

/// Rows per request and concurrent producers of a small-request scenario.
#[derive(Clone, Copy, Debug)]
struct SmallPoint {
    rows: usize,
    producers: usize,
}

fn small_point(point: &str) -> Result<SmallPoint, String> {
    let parse = |(rows, producers): (&str, &str)| {
        Some(SmallPoint { rows: rows.parse().ok()?, producers: producers.parse().ok()? })
    };
    match point.split_once('x').and_then(parse) {
        Some(point) if point.rows > 0 && point.producers > 0 => Ok(point),
        _ => Err("expected ROWSxPRODUCERS, e.g. 1000x32".into()),
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StorageArg {
    /// A DuckDB database file.
    Duckdb,
    /// A DuckLake with a local catalog file.
    Ducklake,
}

impl Args {
    fn storage(&self) -> anyhow::Result<StorageKind> {
        Ok(match self.storage {
            StorageArg::Duckdb if self.catalog.is_some() => anyhow::bail!("--catalog needs --storage ducklake"),
            StorageArg::Duckdb => StorageKind::Duckdb,
            StorageArg::Ducklake => StorageKind::Ducklake {
                extensions: self.extensions.clone().context("--storage ducklake needs --extensions DIR")?,
                postgres: self.catalog.clone(),
            },
        })
    }

    fn selects(&self, scenario: &str) -> bool {
        self.only.as_deref().is_none_or(|only| scenario.to_lowercase().contains(&only.to_lowercase()))
    }
}

const SMALL_REQUESTS: &str = "HTTP, small requests";
const SMALL_CALLS: &str = "Flight DoPut, small calls";
/// The same with the server's journal on: the clock stops once every row is in the table.
const SMALL_REQUESTS_JOURNAL: &str = "HTTP, small requests, journal";
const SMALL_CALLS_JOURNAL: &str = "Flight DoPut, small calls, journal";
const STREAMED_UPLOAD: &str = "HTTP, streamed upload";
/// Ingesters sharing one lake in the scenarios that need a PostgreSQL catalog.
const SHARED_LAKE_INGESTERS: usize = 2;

struct Outcome {
    scenario: String,
    rows: u64,
    bytes: u64,
    elapsed: Duration,
    /// Rate against the in-process Arrow scan run just before it, with as many sessions as producers.
    ratio: f64,
    /// CPU time of the server, or of this process for in-process loading.
    cpu: Option<Duration>,
    /// CPU time of this process while it produced for a server: the producers share the server's cores.
    producer_cpu: Option<Duration>,
    /// Peak resident memory of the server, KiB.
    peak_rss_kib: Option<u64>,
    /// Median, 99th and 99.9th-percentile time from sending a request to its commit answer.
    latency: Option<[Duration; 3]>,
    /// A lake's Parquet files when the load ended, and after the server's last maintenance.
    files: Option<(u64, u64)>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let batches: Vec<RecordBatch> = (0..args.rows)
        .step_by(args.batch_rows)
        .map(|start| data::batch(start, args.batch_rows.min((args.rows - start) as usize)))
        .collect();
    let bytes: u64 = batches.iter().map(decoded_size).sum();
    println!(
        "Arrowport benchmark: {} lineitem-like rows in {} batches, {:.0} MB of Arrow data, {} cores, into {:?}{}",
        args.rows,
        batches.len(),
        bytes as f64 / 1e6,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.storage,
        if args.catalog.is_some() { " with a PostgreSQL catalog" } else { "" }
    );

    let eighths = split(&batches, 8);
    let eighths: Vec<&[RecordBatch]> = eighths.iter().map(Vec::as_slice).collect();
    let mut bench = Bench {
        runs: args.runs.max(1),
        storage: args.storage()?,
        whole: &batches,
        eighths: &eighths,
        baselines: Vec::new(),
    };
    // The Appender writes a DuckDB file; a lake has no counterpart.
    let mut outcomes = Vec::new();
    if matches!(args.storage, StorageArg::Duckdb) {
        outcomes.push(bench.median(1, || async { in_process_appender(&batches) }).await?);
    }
    let http_scenarios = [
        ("HTTP, 1 producer", vec![ipc(&batches, None)]),
        ("HTTP, 1 producer, IPC zstd", vec![ipc(&batches, Some(CompressionType::ZSTD))]),
        ("HTTP, 1 producer, IPC lz4", vec![ipc(&batches, Some(CompressionType::LZ4_FRAME))]),
        ("HTTP, 8 producers", eighths.iter().map(|part| ipc(part, None)).collect()),
    ];
    for (scenario, bodies) in http_scenarios.into_iter().filter(|(scenario, _)| args.selects(scenario)) {
        let producers = bodies.len();
        let payloads = Payloads::Http(bodies);
        outcomes.push(bench.median(producers, || remote(&args, scenario, &payloads, bytes, 1)).await?);
    }
    let flight_scenarios = [
        ("Flight DoPut, 1 producer", vec![&batches[..]], None),
        ("Flight DoPut, 1 producer, IPC zstd", vec![&batches[..]], Some(CompressionType::ZSTD)),
        ("Flight DoPut, 1 producer, IPC lz4", vec![&batches[..]], Some(CompressionType::LZ4_FRAME)),
        ("Flight DoPut, 8 producers", eighths.clone(), None),
    ];
    for (scenario, parts, compression) in flight_scenarios.into_iter().filter(|(scenario, ..)| args.selects(scenario)) {
        let mut puts = Vec::new();
        for part in parts {
            puts.push(flight::messages("lineitem", part, compression).await?);
        }
        let producers = puts.len();
        let payloads = Payloads::Flight(puts);
        outcomes.push(bench.median(producers, || remote(&args, scenario, &payloads, bytes, 1)).await?);
    }
    // Several ingesters share a lake only through a PostgreSQL catalog.
    if args.catalog.is_some() {
        let http = Payloads::Http(eighths.iter().map(|part| ipc(part, None)).collect());
        let mut puts = Vec::new();
        for part in &eighths {
            puts.push(flight::messages("lineitem", part, None).await?);
        }
        let shared = [
            (format!("HTTP, 8 producers, {SHARED_LAKE_INGESTERS} ingesters"), http),
            (format!("Flight DoPut, 8 producers, {SHARED_LAKE_INGESTERS} ingesters"), Payloads::Flight(puts)),
        ];
        for (scenario, payloads) in shared.into_iter().filter(|(scenario, _)| args.selects(scenario)) {
            let run = || remote(&args, &scenario, &payloads, bytes, SHARED_LAKE_INGESTERS);
            outcomes.push(bench.median(eighths.len(), run).await?);
        }
    }
    for point in &args.small {
        let http = [(SMALL_REQUESTS, false), (SMALL_REQUESTS_JOURNAL, true)];
        let http: Vec<_> = http.into_iter().filter(|(scenario, _)| args.selects(scenario)).collect();
        if !http.is_empty() {
            let requests: Vec<Request> = small_pieces(point, &batches)
                .iter()
                .map(|piece| Request::Http(ipc(std::slice::from_ref(piece), None)))
                .collect();
            for (scenario, journal) in http {
                let run = || small_requests(&args, *point, scenario, journal, &requests, bytes);
                outcomes.push(bench.median(1, run).await?);
            }
        }
        let flight = [(SMALL_CALLS, false), (SMALL_CALLS_JOURNAL, true)];
        let flight: Vec<_> = flight.into_iter().filter(|(scenario, _)| args.selects(scenario)).collect();
        if !flight.is_empty() {
            let mut requests = Vec::new();
            for piece in small_pieces(point, &batches) {
                requests.push(Request::Flight(flight::messages("lineitem", &[piece], None).await?));
            }
            for (scenario, journal) in flight {
                let run = || small_requests(&args, *point, scenario, journal, &requests, bytes);
                outcomes.push(bench.median(1, run).await?);
            }
        }
    }
    if args.upload_gib > 0.0 && args.selects(STREAMED_UPLOAD) {
        outcomes.push(bench.median(1, || streamed_upload(&args)).await?);
    }
    outcomes.splice(0..0, bench.baselines()?);
    report(&outcomes);
    Ok(())
}

/// Pairs every run of a scenario with a run of the in-process baseline just before it. The speed of a
/// shared virtual machine drifts by more than ±15% over minutes, so a ratio is only meaningful between
/// runs that saw the same machine.
///
/// Scenarios with eight producers are paired with eight concurrent in-process sessions, each loading
/// what one producer sends: eight transactions cost DuckDB more than one (more row groups built at
/// once, more memory), with or without a network in between. That baseline's own ratio to the single
/// session, run just before it, shows what the concurrency costs DuckDB itself.
struct Bench<'a> {
    runs: usize,
    storage: StorageKind,
    whole: &'a [RecordBatch],
    eighths: &'a [&'a [RecordBatch]],
    /// Every baseline run so far, by sessions.
    baselines: Vec<(usize, Outcome)>,
}

impl Bench<'_> {
    /// Runs a scenario of `producers` producers `runs` times, each after a baseline run: the run with
    /// the median ratio, with the highest peak RSS seen in any run.
    async fn median<F, Fut>(&mut self, producers: usize, mut scenario: F) -> anyhow::Result<Outcome>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Outcome>>,
    {
        let mut outcomes = Vec::with_capacity(self.runs);
        for _ in 0..self.runs {
            let single = in_process_native(&[self.whole], &self.storage).await?;
            let baseline = match producers {
                1 => single,
                n if n == self.eighths.len() => {
                    let mut concurrent = in_process_native(self.eighths, &self.storage).await?;
                    concurrent.ratio = rate(&concurrent) / rate(&single);
                    self.baselines.push((1, single));
                    concurrent
                }
                _ => anyhow::bail!("no in-process baseline for {producers} producers"),
            };
            let mut outcome = scenario().await?;
            outcome.ratio = rate(&outcome) / rate(&baseline);
            self.baselines.push((producers, baseline));
            outcomes.push(outcome);
        }
        let peak_rss_kib = outcomes.iter().filter_map(|o| o.peak_rss_kib).max();
        outcomes.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
        let mut median = outcomes.swap_remove(self.runs / 2);
        median.peak_rss_kib = peak_rss_kib;
        Ok(median)
    }

    /// The median run of each baseline: the single session by time, concurrent sessions by their ratio.
    fn baselines(self) -> anyhow::Result<Vec<Outcome>> {
        let (mut single, mut concurrent): (Vec<_>, Vec<_>) =
            self.baselines.into_iter().partition(|(sessions, _)| *sessions == 1);
        single.sort_by_key(|(_, o)| o.elapsed);
        concurrent.sort_by(|(_, a), (_, b)| a.ratio.total_cmp(&b.ratio));
        let middle = single.len() / 2;
        let mut medians = vec![single.into_iter().nth(middle).context("no scenario ran")?.1];
        let middle = concurrent.len() / 2;
        medians.extend(concurrent.into_iter().nth(middle).map(|(_, o)| o));
        Ok(medians)
    }
}

/// The batches cut into `parts` runs of equal rows (zero-copy slices), one for each producer.
fn split(batches: &[RecordBatch], parts: usize) -> Vec<Vec<RecordBatch>> {
    let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let share = total.div_ceil(parts);
    let mut out: Vec<Vec<RecordBatch>> = vec![Vec::new()];
    let mut room = share;
    for batch in batches {
        let mut start = 0;
        while start < batch.num_rows() {
            if room == 0 {
                out.push(Vec::new());
                room = share;
            }
            let take = room.min(batch.num_rows() - start);
            out.last_mut().expect("one part at least").push(batch.slice(start, take));
            (start, room) = (start + take, room - take);
        }
    }
    out
}

/// Wall-clock and this process's CPU time since it started.
struct Clock {
    started: Instant,
    cpu: Duration,
}

impl Clock {
    fn start() -> anyhow::Result<Self> {
        Ok(Self { started: Instant::now(), cpu: own_cpu_time()? })
    }

    fn stop(self) -> anyhow::Result<(Duration, Duration)> {
        Ok((self.started.elapsed(), own_cpu_time()? - self.cpu))
    }
}

fn rate(outcome: &Outcome) -> f64 {
    outcome.rows as f64 / outcome.elapsed.as_secs_f64()
}

/// DuckDB scanning Arrow streams in-process: the same loader the server uses, without the network. Each
/// part is one session (one transaction), all at once.
async fn in_process_native(parts: &[&[RecordBatch]], storage: &StorageKind) -> anyhow::Result<Outcome> {
    let fresh = FreshStorage::new(storage, false)?;
    let budget = MemoryBudget::new(u64::MAX / 2, Duration::ZERO);
    let checkpoint_threshold = arrowport_config::DuckDbSettings::default().checkpoint_threshold.0;
    let options = DatabaseOptions { extensions: vec![], memory_limit: None, checkpoint_threshold, threads: None };
    let database = Arc::new(Database::open(fresh.open_in_process()?, &options)?);
    let options = LoaderOptions {
        max_concurrent_loads: parts.len(),
        slot_wait: Duration::from_secs(3600),
        budget,
        journal: None,
    };
    let loader = Loader::new(database, options)?;
    let target = Target {
        table: "lineitem".into(),
        chunk_size: 122_880,
        policy: SchemaPolicy::Reject,
        mode: TableMode::default(),
    };
    let clock = Clock::start()?;
    let sessions = parts.iter().map(|part| async {
        let mut session = loader.begin(target.clone(), part[0].schema()).await?;
        for batch in *part {
            let reservation = loader.budget().reserve_batch(decoded_size(batch)).await?;
            session.send(batch.clone(), reservation).await?;
        }
        anyhow::Ok(session.commit(Proof::default()).await?.rows)
    });
    let rows: u64 = futures::future::try_join_all(sessions).await?.into_iter().sum();
    let (elapsed, cpu) = clock.stop()?;
    let scenario = match parts.len() {
        1 => "in-process, DuckDB Arrow scan".to_owned(),
        n => format!("in-process, DuckDB Arrow scan, {n} concurrent sessions"),
    };
    let batches: Vec<RecordBatch> = parts.iter().flat_map(|part| part.iter().cloned()).collect();
    Ok(Outcome::in_process(&scenario, rows, &batches, elapsed, cpu))
}

/// duckdb-rs's Appender, the other common in-process way (single-threaded in DuckDB).
fn in_process_appender(batches: &[RecordBatch]) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let connection = duckdb::Connection::open(dir.path().join("appender.duckdb"))?;
    connection.execute_batch(
        "CREATE TABLE lineitem (l_orderkey BIGINT, l_partkey BIGINT, l_suppkey BIGINT, l_linenumber INTEGER, \
         l_quantity DECIMAL(15,2), l_extendedprice DECIMAL(15,2), l_discount DECIMAL(15,2), l_tax DECIMAL(15,2), \
         l_returnflag VARCHAR, l_linestatus VARCHAR, l_shipdate DATE, l_commitdate DATE, l_receiptdate DATE, \
         l_shipinstruct VARCHAR, l_shipmode VARCHAR, l_comment VARCHAR)",
    )?;
    let clock = Clock::start()?;
    let mut appender = connection.appender("lineitem")?;
    for batch in batches {
        appender.append_record_batch(batch.clone())?;
    }
    appender.flush()?;
    drop(appender);
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let (elapsed, cpu) = clock.stop()?;
    Ok(Outcome::in_process("in-process, duckdb-rs Appender", rows, batches, elapsed, cpu))
}

impl Outcome {
    /// A load in this process, which used `cpu` of this process's CPU time.
    fn in_process(scenario: &str, rows: u64, batches: &[RecordBatch], elapsed: Duration, cpu: Duration) -> Self {
        let bytes = batches.iter().map(decoded_size).sum();
        Self {
            scenario: scenario.to_owned(),
            rows,
            bytes,
            elapsed,
            ratio: 1.0,
            cpu: Some(cpu),
            producer_cpu: None,
            peak_rss_kib: None,
            latency: None,
            files: None,
        }
    }

    /// A load by a server process, which used `server`, from producers in this process, which used
    /// `producer_cpu`.
    fn remote(
        scenario: String,
        rows: u64,
        bytes: u64,
        (elapsed, producer_cpu): (Duration, Duration),
        server: Usage,
    ) -> Self {
        Self {
            scenario,
            rows,
            bytes,
            elapsed,
            ratio: 1.0,
            cpu: Some(server.cpu),
            producer_cpu: Some(producer_cpu),
            peak_rss_kib: Some(server.peak_rss_kib),
            latency: None,
            files: None,
        }
    }
}

/// What the producers of one scenario send, each encoded before the clock starts.
#[derive(Clone)]
enum Payloads {
    /// One Arrow IPC stream body per producer.
    Http(Vec<Vec<u8>>),
    /// One `DoPut` per producer.
    Flight(Vec<Vec<FlightData>>),
}

/// Sends every payload concurrently to `ingesters` fresh servers sharing one storage, one producer each
/// (spread over the servers in turn), and waits for all commits. The CPU time and peak memory are the
/// servers' added up.
async fn remote(
    args: &Args,
    scenario: &str,
    payloads: &Payloads,
    bytes: u64,
    ingesters: usize,
) -> anyhow::Result<Outcome> {
    let storage = Arc::new(FreshStorage::new(&args.storage()?, false)?);
    let servers: Vec<Server> =
        (0..ingesters).map(|_| Server::start_on(&args.server, storage.clone())).collect::<anyhow::Result<_>>()?;
    let server_of = |producer: usize| &servers[producer % servers.len()];
    let client = reqwest::Client::new();
    // Copied before the clock starts: each run sends its own.
    let payloads = payloads.clone();
    let clock = Clock::start()?;
    let committed: Vec<u64> = match payloads {
        Payloads::Http(bodies) => {
            let requests = bodies
                .into_iter()
                .enumerate()
                .map(|(producer, body)| server_of(producer).ingest(&client, "lineitem", reqwest::Body::from(body)));
            futures::future::try_join_all(requests).await?
        }
        Payloads::Flight(puts) => {
            let calls = puts
                .into_iter()
                .enumerate()
                .map(|(producer, messages)| flight::put(server_of(producer).url(), messages));
            futures::future::try_join_all(calls).await?
        }
    };
    let times = clock.stop()?;
    let (committed, rows) = (committed.iter().sum::<u64>(), args.rows);
    anyhow::ensure!(committed == rows, "{scenario}: the servers committed {committed} rows, expected {rows}");
    let usage = Usage::together(servers.into_iter().map(Server::stop).collect::<anyhow::Result<Vec<_>>>()?);
    Ok(Outcome::remote(scenario.to_owned(), rows, bytes, times, usage))
}

/// Many small requests (`point.rows` each) from `point.producers` concurrent producers, each waiting for
/// its answer before sending the next: where per-request overhead (one transaction each) shows. Over
/// Flight each request is one `DoPut`, and each producer keeps its own connection. With the `journal`,
/// answers come before the rows are in the table, so the clock stops only once the server's count of
/// the table (which first waits for the journaled rows) has every row.
///
/// The steady state is measured, as for a stream that has been running: before the clock starts, one
/// request creates the table (that first request waits for the commit that creates it, and the journal
/// takes requests only for a table whose schema a commit proved), and the Flight producers connect.
async fn small_requests(
    args: &Args,
    point: SmallPoint,
    scenario: &str,
    journal: bool,
    requests: &[Request],
    bytes: u64,
) -> anyhow::Result<Outcome> {
    // Copied before the clock starts: each run sends its own.
    let mut requests = requests.to_vec();
    let server = Server::start(&args.server, &args.storage()?, journal)?;
    let client = reqwest::Client::new();
    let first = requests.pop().context("no small requests")?;
    let first_rows = send(&server, &client, &mut None, first).await?;
    let flight = requests.first().is_some_and(|request| matches!(request, Request::Flight(_)));
    let mut connections = Vec::new();
    for _ in 0..point.producers {
        connections.push(if flight { Some(flight::connect(server.url()).await?) } else { None });
    }
    let queue = std::sync::Arc::new(std::sync::Mutex::new(requests));
    let clock = Clock::start()?;
    let producers = connections.into_iter().map(|mut flight| {
        let (queue, client, server) = (queue.clone(), client.clone(), &server);
        async move {
            let mut latencies = Vec::new();
            let mut rows = 0;
            loop {
                let Some(request) = queue.lock().expect("queue lock").pop() else { break };
                let sent = Instant::now();
                rows += send(server, &client, &mut flight, request).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok((rows, latencies))
        }
    });
    let results = futures::future::try_join_all(producers).await?;
    let in_table = flight::table_rows(server.url(), "lineitem").await?;
    let times = clock.stop()?;
    let rows: u64 = results.iter().map(|(rows, _)| rows).sum();
    let expected = args.rows - first_rows;
    anyhow::ensure!(rows == expected, "{scenario}: the server committed {rows} rows, expected {expected}");
    anyhow::ensure!(in_table == args.rows, "{scenario}: the table holds {in_table} rows, expected {}", args.rows);
    let mut latencies: Vec<Duration> = results.into_iter().flat_map(|(_, l)| l).collect();
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let scenario = format!("{scenario}: {} rows each from {} producers", point.rows, point.producers);
    let files_at_end = server.parquet_files();
    let usage = server.stop()?;
    let files = (matches!(args.storage, StorageArg::Ducklake)).then_some((files_at_end, usage.parquet_files));
    // The bytes the clock saw: the first request went before it.
    let bytes = (u128::from(bytes) * u128::from(rows) / u128::from(args.rows)) as u64;
    let outcome = Outcome::remote(scenario, rows, bytes, times, usage);
    Ok(Outcome { latency: Some([percentile(0.5), percentile(0.99), percentile(0.999)]), files, ..outcome })
}

/// Sends one small request, over `flight` (connected on first use) if it is a Flight one; the rows
/// committed.
async fn send(
    server: &Server,
    client: &reqwest::Client,
    flight: &mut Option<arrow_flight::FlightClient>,
    request: Request,
) -> anyhow::Result<u64> {
    match request {
        Request::Http(body) => server.ingest(client, "lineitem", reqwest::Body::from(body)).await,
        Request::Flight(messages) => {
            let client = match flight {
                Some(client) => client,
                None => flight.insert(flight::connect(server.url()).await?),
            };
            flight::put_on(client, messages).await
        }
    }
}

/// One small request of either protocol, encoded before the clock starts.
#[derive(Clone)]
enum Request {
    Http(Vec<u8>),
    Flight(Vec<FlightData>),
}

/// The batches cut into `point.rows` pieces.
fn small_pieces(point: &SmallPoint, batches: &[RecordBatch]) -> Vec<RecordBatch> {
    batches
        .iter()
        .flat_map(|batch| {
            (0..batch.num_rows())
                .step_by(point.rows)
                .map(|start| batch.slice(start, point.rows.min(batch.num_rows() - start)))
        })
        .collect()
}

/// One upload of `upload_gib` GiB, generated and sent batch by batch so neither side holds it whole.
async fn streamed_upload(args: &Args) -> anyhow::Result<Outcome> {
    let target_bytes = (args.upload_gib * (1u64 << 30) as f64) as u64;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let batch_rows = args.batch_rows;
    let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
        let mut writer = StreamWriter::try_new(Vec::new(), &data::schema())?;
        let (mut rows, mut sent) = (0u64, 0u64);
        while sent < target_bytes {
            writer.write(&data::batch(rows, batch_rows))?;
            rows += batch_rows as u64;
            let piece = std::mem::take(writer.get_mut());
            sent += piece.len() as u64;
            if tx.blocking_send(Ok(piece)).is_err() {
                anyhow::bail!("the upload stopped early");
            }
        }
        writer.finish()?;
        let _ = tx.blocking_send(Ok(std::mem::take(writer.get_mut())));
        Ok((rows, sent))
    });
    let server = Server::start(&args.server, &args.storage()?, false)?;
    let body = reqwest::Body::wrap_stream(tokio_stream(rx));
    let clock = Clock::start()?;
    let committed = server.ingest(&reqwest::Client::new(), "upload", body).await?;
    let times = clock.stop()?;
    let (rows, sent) = producer.await.context("producer task")??;
    anyhow::ensure!(committed == rows, "committed {committed} of {rows} rows");
    let scenario = format!("{STREAMED_UPLOAD} of {:.1} GiB", sent as f64 / (1u64 << 30) as f64);
    Ok(Outcome::remote(scenario, rows, sent, times, server.stop()?))
}

fn tokio_stream<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn ipc(batches: &[RecordBatch], compression: Option<CompressionType>) -> Vec<u8> {
    let options = IpcWriteOptions::default().try_with_compression(compression).expect("codec compiled in");
    let mut writer = StreamWriter::try_new_with_options(Vec::new(), &batches[0].schema(), options).expect("IPC writer");
    for batch in batches {
        writer.write(batch).expect("in-memory write");
    }
    writer.into_inner().expect("in-memory finish")
}

fn report(outcomes: &[Outcome]) {
    println!();
    println!(
        "| scenario | rows | seconds | rows/s | MB/s | vs in-process (as many sessions as producers) | server CPU (per M rows) | producer CPU | server peak RSS | ack latency p50 / p99 / p99.9 | Parquet files per M rows (end / after maintenance) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let seconds = o.elapsed.as_secs_f64();
        let seconds_of =
            |cpu: Option<Duration>| cpu.map_or("-".to_owned(), |cpu| format!("{:.2} s", cpu.as_secs_f64()));
        let per_million_rows = |cpu: Duration| cpu.as_secs_f64() * 1e6 / o.rows.max(1) as f64;
        let cpu =
            o.cpu.map_or("-".to_owned(), |cpu| format!("{:.2} s ({:.2} s)", cpu.as_secs_f64(), per_million_rows(cpu)));
        let producer_cpu = seconds_of(o.producer_cpu);
        let rss = o.peak_rss_kib.map_or("-".to_owned(), |kib| format!("{} MB", kib / 1024));
        let latency = o.latency.map_or("-".to_owned(), |quantiles| {
            let [p50, p99, p999] = quantiles.map(|q| q.as_secs_f64() * 1e3);
            format!("{p50:.1} / {p99:.1} / {p999:.1} ms")
        });
        let per_million = |files: u64| files as f64 * 1e6 / o.rows.max(1) as f64;
        let files = o
            .files
            .map_or("-".to_owned(), |(end, after)| format!("{:.0} / {:.0}", per_million(end), per_million(after)));
        println!(
            "| {} | {} | {:.2} | {:.2}M | {:.0} | {:.2}x | {} | {} | {} | {} | {} |",
            o.scenario,
            o.rows,
            seconds,
            rate(o) / 1e6,
            o.bytes as f64 / 1e6 / seconds,
            o.ratio,
            cpu,
            producer_cpu,
            rss,
            latency,
            files
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producers_get_equal_shares_of_the_rows_in_order() {
        let batches: Vec<RecordBatch> = (0..17).map(|i| data::batch(i * 10, 10)).collect();
        let parts = split(&batches, 8);
        let rows: Vec<usize> = parts.iter().map(|p| p.iter().map(RecordBatch::num_rows).sum()).collect();
        assert_eq!(rows, [22, 22, 22, 22, 22, 22, 22, 16]);
        let again: Vec<RecordBatch> = parts.into_iter().flatten().collect();
        let whole = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(arrow::compute::concat_batches(&whole.schema(), &again).unwrap(), whole);
    }
}
