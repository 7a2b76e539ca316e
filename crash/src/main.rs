//! `arrowport-crash`: durability you can prove. Producers ingest continuously into the real `arrowport`
//! binary over HTTP and Flight `DoPut`, small and large requests, while the server is killed with SIGKILL
//! at random moments and started again on the same database file. After every restart (through the
//! server's Flight SQL query API, before the producers resume) and at the end (opening the file with
//! duckdb-rs after a graceful stop) the table is checked request by request against what the producers
//! were told: every acknowledged request present exactly once, none torn, none duplicated, nothing
//! present that was refused or never sent. Exits non-zero if anything is lost, torn or duplicated, or if
//! the server fails to come back.

mod check;
mod data;
mod ledger;
mod producer;
mod rng;
mod server;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use check::{Findings, Seen};
use ledger::{Ledger, Protocol, State};
use producer::{Load, Phase, Producer, Shared};
use rng::Rng;
use server::{Log, Server, Spec, file_size};

/// Kills the real arrowport server with SIGKILL under continuous ingest, restarts it on the same database
/// and checks that every acknowledged request is there exactly once and no request is torn.
#[derive(Parser)]
#[command(name = "arrowport-crash")]
struct Args {
    /// The `arrowport` binary [default: `arrowport` beside this program].
    #[arg(long)]
    server: Option<PathBuf>,
    /// How many times to kill the server.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Seconds of ingest before each kill, drawn from MIN..MAX (or exactly N).
    #[arg(long, default_value = "0.3..2.5", value_parser = parse_range)]
    seconds_between: (f64, f64),
    /// Concurrent producers: even ones send over HTTP, odd ones over Flight `DoPut`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=256))]
    producers: i32,
    /// Rows of a small request.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(i32).range(1..=100_000_000))]
    small_rows: i32,
    /// Rows of a large request, drawn from MIN..MAX.
    #[arg(long, default_value = "200000..400000", value_parser = parse_rows)]
    large_rows: (i32, i32),
    /// Chance that a request is large.
    #[arg(long, default_value_t = 0.03)]
    large_share: f64,
    /// Most requests (one batch each) in one Flight `DoPut`; the stream commits every 5,000 rows and
    /// every second, so longer calls are acknowledged in steps.
    #[arg(long, default_value_t = 8)]
    requests_per_call: u64,
    /// Seed of every random choice (printed at the start) [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Print the figures as one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Directory for the database and the server's config, kept afterwards [default: a temporary one,
    /// kept only if the run fails].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The server's `duckdb.checkpoint_threshold` (e.g. `16MiB`) [default: the server's, 64MiB]: the
    /// largest the write-ahead log grows, so the longest replay after a kill.
    #[arg(long)]
    checkpoint_threshold: Option<String>,
    /// Seconds a restart may take until `/readyz` answers 200.
    #[arg(long, default_value_t = 120)]
    recovery_timeout: u64,
    /// What the server writes: a DuckDB file, or a DuckLake (with `--extension-directory`; a local catalog
    /// file unless `--catalog` names another).
    #[arg(long, value_enum, default_value_t = Storage::Duckdb)]
    storage: Storage,
    /// The DuckDB extension files a lake needs (`bash scripts/duckdb-extensions` prints the directory).
    #[arg(long, env = "ARROWPORT_TEST_EXTENSIONS")]
    extension_directory: Option<PathBuf>,
    /// The lake's catalog, e.g. `postgres:host=... dbname=...` [default: a catalog file in the run's directory].
    #[arg(long)]
    catalog: Option<String>,
    /// Turn on the server's journal: small requests are acknowledged once durable in it and written to
    /// the table after, so kills also land between an acknowledgement and the write.
    #[arg(long)]
    journal: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Storage {
    Duckdb,
    Ducklake,
}

/// A lake's maintenance (elected, then flush, merge, expire, clean up, delete orphans) runs this often in
/// the test, and keeps snapshots and unreferenced files this long: longer than any transaction of the
/// test's load, whose files maintenance must not take for orphans.
const LAKE_MAINTENANCE_SECONDS: u64 = 2;
const LAKE_RETENTION_SECONDS: u64 = 5;

fn parse_range(text: &str) -> Result<(f64, f64), String> {
    let number = |s: &str| s.trim().parse::<f64>().map_err(|e| format!("{s:?}: {e}"));
    let (low, high) = match text.split_once("..") {
        Some((low, high)) => (number(low)?, number(high)?),
        None => (number(text)?, number(text)?),
    };
    if !(0.0 <= low && low <= high) {
        return Err(format!("{text}: expected MIN..MAX with 0 <= MIN <= MAX"));
    }
    Ok((low, high))
}

fn parse_rows(text: &str) -> Result<(i32, i32), String> {
    let (low, high) = parse_range(text)?;
    if low < 1.0 || high > 100_000_000.0 || low.fract() != 0.0 || high.fract() != 0.0 {
        return Err(format!("{text}: expected whole numbers of rows, 1 to 100000000"));
    }
    Ok((low as i32, high as i32))
}

/// One kill and the restart after it.
struct Kill {
    /// Seconds of ingest before it.
    after: f64,
    /// Requests the killed run acknowledged, their slowest acknowledgement, and the longest time in it
    /// without any acknowledgement (from its start, between acks, and until the kill).
    acked: usize,
    slowest_ack: Duration,
    longest_silence: Duration,
    /// Requests sent to the killed run that got no answer, and how many of them the table holds.
    cut: usize,
    cut_landed: usize,
    /// Size of `<db>.wal` and of the database file before the restart.
    wal_bytes: u64,
    db_bytes: u64,
    /// From spawning the server to `/readyz` answering 200.
    recovery: Duration,
    /// What the check after the restart saw, and how long it took.
    seen: Seen,
    check: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Progress lines: stdout, or stderr when stdout is for the JSON.
macro_rules! say {
    ($json:expr, $($arg:tt)*) => {
        if $json { eprintln!($($arg)*) } else { println!($($arg)*) }
    };
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(rng::fresh_seed);
    let binary = match &args.server {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("arrowport"),
    };
    anyhow::ensure!(binary.is_file(), "no arrowport binary at {} (pass --server)", binary.display());
    let (dir, temporary) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let temporary = tempfile::Builder::new().prefix("arrowport-crash-").tempdir()?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    let lake = match args.storage {
        Storage::Duckdb => None,
        Storage::Ducklake => Some(server::Lake {
            catalog: args.catalog.clone().unwrap_or_else(|| dir.join("crash.ducklake").to_string_lossy().into_owned()),
            data_path: dir.join("lake-data"),
            extensions: args.extension_directory.clone().context("a lake needs --extension-directory")?,
        }),
    };
    let db = dir.join(if lake.is_some() { "crash.ducklake" } else { "crash.duckdb" });
    let spec = Spec { binary, config: dir.join("config.yaml"), db, lake };
    anyhow::ensure!(
        !spec.db.exists(),
        "{} exists already: the crash test starts from an empty database",
        spec.db.display()
    );
    std::fs::write(&spec.config, config_yaml(&args, spec.lake.as_ref()))?;
    say!(
        args.json,
        "arrowport-crash: seed {seed}; {} kills, {}..{} s of ingest before each; {} producers ({} HTTP, {} Flight); \
         requests of {} rows, {:.0}% of {}..{} rows; {} {}",
        args.kills,
        args.seconds_between.0,
        args.seconds_between.1,
        args.producers,
        (args.producers + 1) / 2,
        args.producers / 2,
        args.small_rows,
        args.large_share * 100.0,
        args.large_rows.0,
        args.large_rows.1,
        if spec.lake.is_some() { "DuckLake, catalog" } else { "database" },
        spec.lake.as_ref().map_or_else(|| spec.db.display().to_string(), |lake| lake.catalog.clone())
    );

    let outcome = crash_test(&args, seed, &spec).await;
    let passed = match outcome {
        Ok(report) => {
            let passed = report.passed();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report.json(seed))?);
            }
            report.print(args.json, seed);
            passed
        }
        Err(error) => {
            eprintln!("FAIL: {error:#}");
            false
        }
    };
    if !passed && let Some(temporary) = temporary {
        eprintln!("The database and the server's config are kept in {}", temporary.keep().display());
    }
    if !passed {
        eprintln!("FAIL (reproduce the run's choices with --seed {seed})");
    }
    Ok(passed)
}

fn config_yaml(args: &Args, lake: Option<&server::Lake>) -> String {
    let mut yaml = String::from(
        "# Written by arrowport-crash. Flight DoPut calls commit (and acknowledge) every 5,000 rows and every second.\n\
         streams:\n  crash:\n    flush: {rows: 5000, interval_seconds: 1}\n",
    );
    if let Some(lake) = lake {
        let quoted = |text: &str| serde_json::to_string(text).expect("a string");
        yaml.push_str(&format!(
            "storage:\n  kind: ducklake\n  catalog: {}\n  data_path: {}\n  maintenance_interval_seconds: \
             {LAKE_MAINTENANCE_SECONDS}\n  snapshot_retention_seconds: {LAKE_RETENTION_SECONDS}\n",
            quoted(&lake.catalog),
            quoted(&lake.data_path.to_string_lossy())
        ));
    }
    if args.journal {
        yaml.push_str("journal:\n  enabled: true\n");
    }
    let extensions = lake.map(|lake| format!("  extension_directory: {}\n", lake.extensions.display()));
    let threshold =
        args.checkpoint_threshold.as_ref().map(|threshold| format!("  checkpoint_threshold: {threshold}\n"));
    if extensions.is_some() || threshold.is_some() {
        yaml.push_str("duckdb:\n");
        yaml.extend(extensions.into_iter().chain(threshold));
    }
    yaml
}

struct Report {
    kills: Vec<Kill>,
    /// Kills the server did not come back from (0 or 1: the run stops there).
    failed_restart: Option<String>,
    ledger: Ledger,
    findings: Findings,
    problems: Vec<String>,
    notable_log: Vec<String>,
    graceful_stop: Option<(bool, Duration)>,
    final_seen: Option<Seen>,
    final_check: Duration,
    final_db_bytes: u64,
    /// A lake's Parquet files after a last run without load, once its maintenance has cleaned up what the
    /// kills left: unreferenced on disk, and referenced but missing (both must be none).
    lake_files: Option<Result<LakeUpkeep, String>>,
    elapsed: Duration,
}

async fn crash_test(args: &Args, seed: u64, spec: &Spec) -> anyhow::Result<Report> {
    let started = Instant::now();
    let shared = Arc::new(Shared::new());
    let load = Load {
        small_rows: args.small_rows,
        large_rows: args.large_rows,
        large_share: args.large_share,
        requests_per_call: args.requests_per_call,
        pause_ms: 30,
    };
    let producers: Vec<_> =
        (0..args.producers).map(|id| tokio::spawn(Producer::new(id, seed, load.clone()).run(shared.clone()))).collect();
    let log = Arc::new(Mutex::new(Log::default()));
    let recovery_timeout = Duration::from_secs(args.recovery_timeout);
    let mut rng = Rng::derive(seed, 0);
    let (mut durable, mut findings) = (BTreeSet::new(), Findings::default());
    let mut kills = Vec::new();
    let mut failed_restart = None;

    let (first, _) = match Server::start(spec, &log, recovery_timeout).await {
        Ok(started) => started,
        Err(error) => anyhow::bail!("first start: {error:#}\n{}", log.lock().expect("log lock").tail()),
    };
    let mut server = Some(first);
    let mut final_seen = None;
    let mut final_check = Duration::ZERO;
    let mut graceful_stop = None;
    for n in 1..=args.kills {
        let epoch = u64::from(n - 1);
        let after = rng.between_f64(args.seconds_between.0, args.seconds_between.1);
        let running = server.take().expect("a running server");
        shared.phase.send_replace(Phase { epoch, url: Some(running.url().to_owned()), stop: false });
        let released = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(after)).await;
        // Failures from here on are the kill's doing: mark the run as ending before the signal.
        shared.ended.store(epoch + 1, Ordering::SeqCst);
        let killed = Instant::now();
        running.kill()?;
        shared.phase.send_modify(|phase| phase.url = None);
        wait_idle(&shared).await?;
        let (wal_bytes, db_bytes) = (file_size(&spec.wal()), file_size(&spec.db));
        match Server::start(spec, &log, recovery_timeout).await {
            Ok((next, recovery)) => {
                let checking = Instant::now();
                let table = check::through_server(next.url()).await.with_context(|| format!("check after kill {n}"))?;
                let ledger = shared.ledger.lock().expect("ledger lock");
                let seen = check::check(&ledger, &table, &mut durable, &format!("after kill {n}"), &mut findings);
                let cut: Vec<_> = ledger
                    .iter()
                    .filter(|(_, s)| s.epoch == epoch && s.state == State::Ambiguous)
                    .map(|(key, _)| *key)
                    .collect();
                let cut_landed = cut.iter().filter(|key| table.contains_key(key)).count();
                let acks: Vec<Instant> = ledger
                    .iter()
                    .filter(|(_, s)| s.epoch == epoch && s.state == State::Acked)
                    .filter_map(|(_, s)| Some(s.sent + s.ack_latency?))
                    .collect();
                let slowest_ack = ledger
                    .iter()
                    .filter(|(_, s)| s.epoch == epoch)
                    .filter_map(|(_, s)| s.ack_latency)
                    .max()
                    .unwrap_or_default();
                let (acked, longest_silence) = (acks.len(), silence(released, killed, acks));
                let check = checking.elapsed();
                let kill = Kill {
                    after,
                    acked,
                    slowest_ack,
                    longest_silence,
                    cut: cut.len(),
                    cut_landed,
                    wal_bytes,
                    db_bytes,
                    recovery,
                    seen,
                    check,
                };
                say!(
                    args.json,
                    "kill {n:>3}/{} after {after:.2} s: {} acked (slowest {:.2} s, longest silence {:.2} s), {} cut \
                     ({} landed); WAL {} (db {}), back in {:.3} s; checked {} requests, {} rows in {:.2} s: {}",
                    args.kills,
                    kill.acked,
                    slowest_ack.as_secs_f64(),
                    longest_silence.as_secs_f64(),
                    kill.cut,
                    kill.cut_landed,
                    mib(wal_bytes),
                    mib(db_bytes),
                    recovery.as_secs_f64(),
                    seen.requests,
                    seen.rows,
                    check.as_secs_f64(),
                    if findings.total() == 0 { "ok".to_owned() } else { format!("{} FINDINGS", findings.total()) }
                );
                kills.push(kill);
                server = Some(next);
            }
            Err(error) => {
                let tail = log.lock().expect("log lock").tail();
                // Does DuckDB itself open the file the server could not?
                let direct = match tokio::task::block_in_place(|| check::from_file(spec)) {
                    Ok(table) => format!("duckdb-rs opens it ({} requests in the table)", table.len()),
                    Err(error) => format!("duckdb-rs cannot open it either: {error:#}"),
                };
                failed_restart = Some(format!("after kill {n} (WAL {}): {error:#}; {direct}\n{tail}", mib(wal_bytes)));
                break;
            }
        }
    }

    if let Some(running) = server.take() {
        // The end: ingest once more, then a graceful stop (SIGTERM) under load, then the file itself.
        let epoch = u64::from(args.kills);
        let after = rng.between_f64(args.seconds_between.0, args.seconds_between.1);
        shared.phase.send_replace(Phase { epoch, url: Some(running.url().to_owned()), stop: false });
        tokio::time::sleep(Duration::from_secs_f64(after)).await;
        shared.ended.store(epoch + 1, Ordering::SeqCst);
        let stopping = Instant::now();
        let status = running.terminate(Duration::from_secs(90)).await?;
        graceful_stop = Some((status.success(), stopping.elapsed()));
        shared.phase.send_modify(|phase| phase.url = None);
        wait_idle(&shared).await?;
        let checking = Instant::now();
        let table = tokio::task::block_in_place(|| check::from_file(spec)).context("final check")?;
        final_check = checking.elapsed();
        let ledger = shared.ledger.lock().expect("ledger lock");
        final_seen =
            Some(check::check(&ledger, &table, &mut durable, "at the end, opened with duckdb-rs", &mut findings));
    }
    shared.phase.send_modify(|phase| phase.stop = true);
    for producer in producers {
        producer.await?;
    }
    let lake_files = match (&spec.lake, &final_seen) {
        (Some(_), Some(_)) => Some(quiet_maintenance(spec, &log, recovery_timeout).await.map_err(|e| format!("{e:#}"))),
        _ => None,
    };
    let ledger = std::mem::take(&mut *shared.ledger.lock().expect("ledger lock"));
    let problems = std::mem::take(&mut *shared.problems.lock().expect("problems lock"));
    let notable_log = std::mem::take(&mut log.lock().expect("log lock").notable);
    Ok(Report {
        kills,
        failed_restart,
        ledger,
        findings,
        problems,
        notable_log,
        graceful_stop,
        final_seen,
        final_check,
        final_db_bytes: file_size(&spec.db),
        lake_files,
        elapsed: started.elapsed(),
    })
}

/// A lake's Parquet files before and after its maintenance cleaned up after the kills.
struct LakeUpkeep {
    /// Unreferenced files when the load ended (left by killed inserts, or only old snapshots need them).
    unreferenced_before: usize,
    on_disk: usize,
    unreferenced: Vec<String>,
    missing: Vec<String>,
}

/// A lake's last run: the server started again without load until its maintenance (every
/// [`LAKE_MAINTENANCE_SECONDS`], once the turn a killed server held has run out: up to a minute) has run
/// for two retention periods, so that it expires the snapshots the kills left and deletes the files
/// nothing references; then a graceful stop and the files counted.
async fn quiet_maintenance(
    spec: &Spec,
    log: &Arc<Mutex<Log>>,
    recovery_timeout: Duration,
) -> anyhow::Result<LakeUpkeep> {
    let before = tokio::task::block_in_place(|| check::lake_files(spec))?;
    let (server, _) = Server::start(spec, log, recovery_timeout).await.context("the quiet run")?;
    let started = Instant::now();
    let client = reqwest::Client::new();
    let mut first_turn = None;
    let enough = Duration::from_secs(2 * LAKE_RETENTION_SECONDS + LAKE_MAINTENANCE_SECONDS);
    while first_turn.is_none_or(|at: Instant| at.elapsed() < enough) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(180), "no maintenance ran in 180 s without load");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let metrics = client.get(format!("{}/metrics", server.url())).send().await?.text().await?;
        let maintained = metrics.lines().any(|line| {
            line.strip_prefix("arrowport_checkpoints_total{outcome=\"ok\"} ")
                .and_then(|value| value.trim().parse::<f64>().ok())
                .is_some_and(|runs| runs > 0.0)
        });
        if maintained && first_turn.is_none() {
            first_turn = Some(Instant::now());
        }
    }
    let status = server.terminate(Duration::from_secs(60)).await?;
    anyhow::ensure!(status.success(), "the quiet run exited with {status}");
    let files = tokio::task::block_in_place(|| check::lake_files(spec))?;
    let names = |paths: Vec<&PathBuf>| paths.into_iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
    Ok(LakeUpkeep {
        unreferenced_before: before.unreferenced().len(),
        on_disk: files.on_disk.len(),
        unreferenced: names(files.unreferenced()),
        missing: names(files.missing()),
    })
}

/// The longest stretch of `from..to` without an acknowledgement.
fn silence(from: Instant, to: Instant, mut acks: Vec<Instant>) -> Duration {
    acks.sort();
    let mut last = from;
    let mut longest = Duration::ZERO;
    for at in acks.into_iter().chain([to]) {
        longest = longest.max(at.saturating_duration_since(last));
        last = last.max(at);
    }
    longest
}

/// Waits until no producer is inside a session: every request sent to the killed server has failed.
async fn wait_idle(shared: &Shared) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(150);
    while shared.busy.load(Ordering::SeqCst) > 0 {
        anyhow::ensure!(Instant::now() < deadline, "producers still busy 150 s after the server went away");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Requests and rows of one protocol (or all) in one state.
fn tally(ledger: &Ledger, state: State, protocol: Option<Protocol>) -> (usize, i64) {
    ledger
        .iter()
        .filter(|(_, s)| s.state == state && protocol.is_none_or(|p| s.protocol == p))
        .fold((0, 0), |(n, rows), (_, s)| (n + 1, rows + s.rows))
}

/// Minimum, median and maximum.
fn spread(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    Some((*values.first()?, values[values.len() / 2], *values.last()?))
}

impl Report {
    fn passed(&self) -> bool {
        self.failed_restart.is_none()
            && self.findings.total() == 0
            && self.problems.is_empty()
            && self.graceful_stop.is_some_and(|(clean, _)| clean)
            && self.final_seen.is_some()
            && self.lake_files.as_ref().is_none_or(|files| {
                files.as_ref().is_ok_and(|upkeep| upkeep.unreferenced.is_empty() && upkeep.missing.is_empty())
            })
    }

    fn recovery(&self) -> Option<(f64, f64, f64)> {
        spread(self.kills.iter().map(|k| k.recovery.as_secs_f64()).collect())
    }

    /// Recovery time as a straight line in the WAL's size (least squares): seconds at no WAL, seconds per MiB.
    fn recovery_fit(&self) -> Option<(f64, f64)> {
        let points: Vec<(f64, f64)> =
            self.kills.iter().map(|k| (k.wal_bytes as f64 / (1u64 << 20) as f64, k.recovery.as_secs_f64())).collect();
        let n = points.len() as f64;
        let (mean_x, mean_y) =
            (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
        let spread_x: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        if points.len() < 2 || spread_x == 0.0 {
            return None;
        }
        let slope = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum::<f64>() / spread_x;
        Some((mean_y - slope * mean_x, slope))
    }

    /// Server runs killed before they acknowledged anything: a sign of a server that does not get to
    /// work between kills (e.g. a checkpoint longer than the time between kills, started again after each).
    fn starved(&self) -> usize {
        self.kills.iter().filter(|k| k.acked == 0).count()
    }

    fn largest_wal(&self) -> Option<&Kill> {
        self.kills.iter().max_by_key(|k| k.wal_bytes)
    }

    fn json(&self, seed: u64) -> serde_json::Value {
        let (acked, acked_rows) = tally(&self.ledger, State::Acked, None);
        let by_protocol = |protocol| {
            let (requests, rows) = tally(&self.ledger, State::Acked, Some(protocol));
            json!({ "requests": requests, "rows": rows })
        };
        let (refused, _) = tally(&self.ledger, State::Refused, None);
        let (cut, cut_rows) = tally(&self.ledger, State::Ambiguous, None);
        let recovery = self.recovery().map(|(min, median, max)| json!({ "min": min, "median": median, "max": max }));
        json!({
            "passed": self.passed(),
            "seed": seed,
            "kills_survived": self.kills.len(),
            "runs_with_nothing_acknowledged": self.starved(),
            "longest_silence_seconds": self.kills.iter().map(|k| k.longest_silence.as_secs_f64()).fold(0.0, f64::max),
            "slowest_ack_seconds": self.kills.iter().map(|k| k.slowest_ack.as_secs_f64()).fold(0.0, f64::max),
            "failed_restart": self.failed_restart,
            "acknowledged": { "requests": acked, "rows": acked_rows, "http": by_protocol(Protocol::Http), "flight": by_protocol(Protocol::Flight) },
            "refused": refused,
            "cut_by_kills": { "requests": cut, "rows": cut_rows, "landed_at_the_end": self.final_seen.map(|s| s.ambiguous_present) },
            "lost": self.findings.lost.len(),
            "torn": self.findings.torn.len(),
            "duplicated": self.findings.duplicated.len(),
            "phantom": self.findings.phantom.len(),
            "altered": self.findings.altered.len(),
            "findings": self.findings.describe(20),
            "problems": self.problems,
            "recovery_seconds": recovery,
            "largest_wal_bytes": self.largest_wal().map(|k| k.wal_bytes),
            "recovery_at_largest_wal_seconds": self.largest_wal().map(|k| k.recovery.as_secs_f64()),
            "per_kill": self.kills.iter().map(|k| json!({
                "seconds_of_ingest": k.after,
                "cut": k.cut,
                "cut_landed": k.cut_landed,
                "acked": k.acked,
                "slowest_ack_seconds": k.slowest_ack.as_secs_f64(),
                "longest_silence_seconds": k.longest_silence.as_secs_f64(),
                "wal_bytes": k.wal_bytes,
                "db_bytes": k.db_bytes,
                "recovery_seconds": k.recovery.as_secs_f64(),
                "requests_in_table": k.seen.requests,
                "cut_so_far": k.seen.ambiguous,
                "check_seconds": k.check.as_secs_f64(),
                "rows_in_table": k.seen.rows,
            })).collect::<Vec<_>>(),
            "graceful_stop": self.graceful_stop.map(|(clean, took)| json!({ "exit_ok": clean, "seconds": took.as_secs_f64() })),
            "final_table": self.final_seen.map(|s| json!({ "requests": s.requests, "rows": s.rows, "check_seconds": self.final_check.as_secs_f64() })),
            "recovery_fit": self.recovery_fit().map(|(base, per_mib)| json!({ "seconds": base, "seconds_per_wal_mib": per_mib })),
            "final_db_bytes": self.final_db_bytes,
            "lake_files": self.lake_files.as_ref().map(|files| match files {
                Ok(upkeep) => json!({
                    "unreferenced_when_the_load_ended": upkeep.unreferenced_before,
                    "on_disk": upkeep.on_disk,
                    "unreferenced": upkeep.unreferenced,
                    "missing": upkeep.missing,
                }),
                Err(error) => json!({ "error": error }),
            }),
            "server_warnings_and_errors": self.notable_log.len(),
            "seconds": self.elapsed.as_secs_f64(),
        })
    }

    fn print(&self, json: bool, seed: u64) {
        let (acked, acked_rows) = tally(&self.ledger, State::Acked, None);
        let (http, http_rows) = tally(&self.ledger, State::Acked, Some(Protocol::Http));
        let (flight, flight_rows) = tally(&self.ledger, State::Acked, Some(Protocol::Flight));
        let (refused, _) = tally(&self.ledger, State::Refused, None);
        let (cut, _) = tally(&self.ledger, State::Ambiguous, None);
        say!(json, "");
        say!(json, "seed                      {seed}");
        say!(
            json,
            "kills survived            {} of {}",
            self.kills.len(),
            self.kills.len() + usize::from(self.failed_restart.is_some())
        );
        say!(
            json,
            "acknowledged              {acked} requests, {acked_rows} rows (HTTP {http} / {http_rows}, Flight {flight} / {flight_rows})"
        );
        say!(
            json,
            "server runs acking none   {} of {} (killed before any commit was answered)",
            self.starved(),
            self.kills.len()
        );
        if let Some((n, kill)) = self.kills.iter().enumerate().max_by_key(|(_, k)| k.longest_silence) {
            say!(
                json,
                "longest stall             {:.2} s without an ack (run ended by kill {}; slowest ack {:.2} s)",
                kill.longest_silence.as_secs_f64(),
                n + 1,
                self.kills.iter().map(|k| k.slowest_ack).max().unwrap_or_default().as_secs_f64()
            );
        }
        say!(
            json,
            "cut by a kill (no answer) {cut} requests, {} of them in the table at the end",
            self.final_seen.map_or("?".to_owned(), |s| s.ambiguous_present.to_string())
        );
        say!(json, "refused with an answer    {refused} (must all be absent)");
        say!(json, "lost                      {}", self.findings.lost.len());
        say!(json, "torn                      {}", self.findings.torn.len());
        say!(json, "duplicated                {}", self.findings.duplicated.len());
        say!(json, "phantom / altered         {} / {}", self.findings.phantom.len(), self.findings.altered.len());
        if let Some((min, median, max)) = self.recovery() {
            say!(json, "recovery (spawn→/readyz)  min {min:.3} s, median {median:.3} s, max {max:.3} s");
        }
        if let Some(kill) = self.largest_wal() {
            say!(
                json,
                "largest WAL at a kill     {} (recovered in {:.3} s)",
                mib(kill.wal_bytes),
                kill.recovery.as_secs_f64()
            );
        }
        if let Some((base, per_mib)) = self.recovery_fit() {
            say!(json, "recovery against WAL      {:.3} s + {:.1} ms per MiB (least squares)", base, per_mib * 1e3);
        }
        if let Some((clean, took)) = self.graceful_stop {
            say!(
                json,
                "graceful stop under load  {} in {:.2} s",
                if clean { "exit 0" } else { "FAILED" },
                took.as_secs_f64()
            );
        }
        if let Some(seen) = self.final_seen {
            say!(
                json,
                "final table (duckdb-rs)   {} requests, {} rows, file {}; exact check in {:.1} s",
                seen.requests,
                seen.rows,
                mib(self.final_db_bytes),
                self.final_check.as_secs_f64()
            );
        }
        match &self.lake_files {
            Some(Ok(upkeep)) => say!(
                json,
                "lake files after upkeep   {} Parquet files, {} unreferenced ({} when the load ended), {} missing",
                upkeep.on_disk,
                upkeep.unreferenced.len(),
                upkeep.unreferenced_before,
                upkeep.missing.len()
            ),
            Some(Err(error)) => say!(json, "FAIL: the lake's quiet run: {error}"),
            None => {}
        }
        if let Some(Ok(upkeep)) = &self.lake_files {
            for file in upkeep.unreferenced.iter().take(5) {
                say!(json, "FAIL: unreferenced after maintenance: {file}");
            }
            for file in upkeep.missing.iter().take(5) {
                say!(json, "FAIL: referenced by the lake but missing: {file}");
            }
        }
        say!(json, "server warnings/errors    {}", self.notable_log.len());
        say!(json, "took                      {:.1} s", self.elapsed.as_secs_f64());
        for line in self.notable_log.iter().take(10) {
            say!(json, "  server log: {line}");
        }
        if let Some(failure) = &self.failed_restart {
            say!(json, "FAIL: the server did not come back {failure}");
        }
        for line in self.findings.describe(20) {
            say!(json, "FAIL: {line}");
        }
        for problem in &self.problems {
            say!(json, "FAIL: {problem}");
        }
        say!(json, "{}", if self.passed() { "PASS" } else { "FAIL" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_the_longest_gap_from_the_start_between_acks_and_to_the_end() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(silence(start, at(1000), vec![]), Duration::from_millis(1000));
        assert_eq!(silence(start, at(1000), vec![at(700), at(100), at(300)]), Duration::from_millis(400));
        assert_eq!(silence(start, at(1000), vec![at(50), at(200)]), Duration::from_millis(800));
    }

    #[test]
    fn ranges_parse_as_min_max_or_one_number() {
        assert_eq!(parse_range("0.5..3"), Ok((0.5, 3.0)));
        assert_eq!(parse_range("2"), Ok((2.0, 2.0)));
        assert!(parse_range("3..1").is_err());
        assert_eq!(parse_rows("200000..400000"), Ok((200_000, 400_000)));
        assert!(parse_rows("1.5..2").is_err());
    }
}
