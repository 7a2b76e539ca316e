//! `arrowport-memlimit`: proves that the ingester, given a memory limit, is never OOM-killed (which would
//! lose every request in flight), loses no acknowledged row and keeps its ingest rate.
//!
//! It starts the real `arrowport serve` binary inside a memory cgroup of its own (cgroup v1's memory
//! controller, or a cgroup v2 child group; the test is skipped, loudly, where neither can be created),
//! with the server's default configuration unless `--config` says otherwise, and drives it hard: eight
//! producers of large requests over HTTP and Flight `DoPut`, one streamed upload of a GiB and small
//! requests from a few more producers. Then it checks the group's OOM counters, that the server is still
//! running, and that every acknowledged row is in the tables (counted through Flight SQL), and reports
//! the memory peaks and the rate. `--compare` runs the same load without a limit too; `--find-min`
//! searches for the smallest limit that holds.

mod cgroup;
mod data;
mod load;
mod monitor;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use arrowport_config::ByteSize;
use clap::Parser;

use cgroup::{Counters, Group, Unavailable, Version, mib};
use load::{Payloads, Protocols, STREAMS, Shape, Tally, UploadOutcome};
use monitor::Peaks;
use server::Server;

const MIB: u64 = 1 << 20;

/// Runs the real Arrowport server inside a memory limit under heavy mixed load: no OOM kill, no lost
/// acknowledged row, and its rate against the same load without a limit.
#[derive(Parser)]
struct Args {
    /// The `arrowport` binary to start.
    #[arg(long)]
    server: PathBuf,
    /// The memory limit of the server's cgroup (`768MiB`, `1GiB`, ...; `0`: no limit, only measure).
    #[arg(long, default_value = "768MiB", value_parser = parse_size)]
    limit: u64,
    /// Seconds of load (the streamed upload, started with the rest, may make a run longer: the other
    /// producers keep going until it is done).
    #[arg(long, default_value_t = 150)]
    seconds: u64,
    /// Run the same load without a limit too, right after, and print the ratio of the rates.
    #[arg(long)]
    compare: bool,
    /// With `--compare`: pairs of runs (limited, unlimited, alternating which goes first); the ratio
    /// reported is the median of the pairs'.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Search for the smallest limit that holds (no OOM kill, nothing lost, no failed request), by
    /// bisection between `--find-min-low` and `--find-min-high`, with runs of `--find-min-seconds`.
    #[arg(long)]
    find_min: bool,
    #[arg(long, default_value_t = 30)]
    find_min_seconds: u64,
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    find_min_low: u64,
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    find_min_high: u64,
    /// The search stops once the interval is this narrow.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    find_min_step: u64,
    /// Fail (exit 2) instead of skipping where no memory cgroup can be created.
    #[arg(long)]
    require: bool,
    /// Producers of large requests (every other one over Flight `DoPut`).
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Protocols of the large producers: `mixed` (every other one over Flight `DoPut`), `http` or `flight`.
    #[arg(long, value_enum, default_value_t = Protocols::Mixed)]
    protocols: Protocols,
    /// Record batches in each large request.
    #[arg(long, default_value_t = 8)]
    request_batches: usize,
    /// Rows per record batch of the large requests and the upload.
    #[arg(long, default_value_t = 100_000)]
    batch_rows: usize,
    /// Producers of small requests (every other one over Flight `DoPut`), each waiting for its answer.
    #[arg(long, default_value_t = 4)]
    small_producers: usize,
    /// Rows per small request.
    #[arg(long, default_value_t = 1_000)]
    small_rows: usize,
    /// Size of the one streamed HTTP upload, GiB (0: none).
    #[arg(long, default_value_t = 1.0)]
    upload_gib: f64,
    /// Columns of the tables: the 16 lineitem columns, cycled.
    #[arg(long, default_value_t = 16)]
    columns: usize,
    /// A config file for the server (by default it runs with its defaults, which is what is promised).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for the server's database (a fresh one inside it per run; the system's temporary
    /// directory by default). Each 150 s run writes several GB.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 10)]
    progress: u64,
}

fn parse_size(text: &str) -> Result<u64, String> {
    ByteSize::parse(text).map(|size| size.0).ok_or_else(|| format!("not a size: {text} (e.g. 768MiB, 1GiB, 0)"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(&args) => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // The server and its group are gone by now (dropped with the interrupted run, if it was).
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if !args.server.is_file() {
        anyhow::bail!("no server binary at {}", args.server.display());
    }
    // Whether a group can be made at all, before the payloads are encoded.
    if let Err(Unavailable(reason)) = Group::create(0, Some(args.limit.max(256 * MIB))) {
        println!(
            "SKIPPED: {reason}. The memory-limit test needs a writable memory cgroup (root, or a delegated group)."
        );
        return skipped(args);
    }
    let payloads = Arc::new(
        Payloads::new(args.columns, args.batch_rows, args.request_batches, args.small_rows)
            .await
            .context("encoding the payloads")?,
    );
    println!(
        "arrowport-memlimit: {} large producers ({:?}; {} rows, {:.0} MB of Arrow IPC per request, {} columns), \
         {} small producers ({} rows per request), {}; {} cores",
        args.producers,
        args.protocols,
        payloads.rows_per_request,
        payloads.bytes_per_request as f64 / 1e6,
        payloads.columns,
        args.small_producers,
        args.small_rows,
        match args.upload_gib {
            0.0 => "no streamed upload".to_owned(),
            gib => format!("one {gib:.1} GiB streamed upload"),
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    let mut runner = Runner { args, payloads, runs: 0 };
    let mut failed = false;
    let limit = (args.limit > 0).then_some(args.limit);
    if !args.find_min || args.compare {
        let mut runs = Vec::new();
        let mut ratios = Vec::new();
        let rounds = if args.compare { args.rounds.max(1) } else { 1 };
        for round in 0..rounds {
            let order = if args.compare && round % 2 == 1 { [None, limit] } else { [limit, None] };
            let mut pair = [None, None];
            for (i, run_limit) in order.into_iter().enumerate() {
                if i == 1 && !args.compare {
                    break;
                }
                let Some(run) = runner.run(run_limit, args.seconds).await? else {
                    return skipped(args);
                };
                print_problems(&run);
                failed |= run.limit.is_some() && !run.holds();
                // A rate is only compared where the run held: a killed server's rate means nothing.
                pair[usize::from(run_limit.is_none())] = run.holds().then(|| run.rate());
                runs.push(run);
            }
            if let [Some(limited), Some(unlimited)] = pair {
                ratios.push(limited / unlimited);
            }
        }
        report(&runs);
        if args.compare && ratios.is_empty() {
            println!("\nNo rate ratio: a run did not hold (see above)");
        }
        if !ratios.is_empty() {
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
            ratios.sort_by(f64::total_cmp);
            println!(
                "\nRate inside the limit against the same load without one: {:.2}x{}",
                ratios[ratios.len() / 2],
                if ratios.len() > 1 { format!(" (median of {})", each.join(", ")) } else { String::new() }
            );
        }
    }
    if args.find_min {
        match find_min(&mut runner).await? {
            Some(code) => failed |= code != ExitCode::SUCCESS,
            None => return skipped(args),
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn skipped(args: &Args) -> anyhow::Result<ExitCode> {
    Ok(if args.require { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

/// Bisects for the smallest limit that holds. `None` where no group can be created.
async fn find_min(runner: &mut Runner<'_>) -> anyhow::Result<Option<ExitCode>> {
    let args = runner.args;
    let step = args.find_min_step.max(MIB);
    let round = |bytes: u64| bytes / step * step;
    let (mut low, mut high) = (round(args.find_min_low), round(args.find_min_high).max(round(args.find_min_low)));
    println!(
        "\nSearching for the smallest limit that holds, {} to {}, {} s runs",
        mib(low),
        mib(high),
        args.find_min_seconds
    );
    let mut probes = Vec::new();
    let probe = async |runner: &mut Runner<'_>, limit: u64, probes: &mut Vec<Run>| -> anyhow::Result<Option<bool>> {
        let Some(run) = runner.run(Some(limit), args.find_min_seconds).await? else { return Ok(None) };
        let holds = run.holds();
        println!(
            "  {}: {} ({:.2}M rows/s, peak anon {}){}",
            mib(limit),
            if holds { "holds" } else { "FAILS" },
            run.rate() / 1e6,
            mib(run.peaks.anon.anon),
            if holds { String::new() } else { format!(": {}", run.problems().join("; ")) }
        );
        probes.push(run);
        Ok(Some(holds))
    };
    let Some(high_holds) = probe(runner, high, &mut probes).await? else { return Ok(None) };
    let smallest = if !high_holds {
        None
    } else if probe(runner, low, &mut probes).await? == Some(true) {
        Some(low)
    } else {
        while high - low > step {
            let middle = round(low + (high - low) / 2);
            let middle = if middle <= low { low + step } else { middle };
            match probe(runner, middle, &mut probes).await? {
                Some(true) => high = middle,
                Some(false) => low = middle,
                None => return Ok(None),
            }
        }
        Some(high)
    };
    report(&probes);
    let columns = runner.payloads.columns;
    Ok(Some(match smallest {
        Some(limit) if limit == round(args.find_min_low) => {
            println!(
                "\nSmallest limit that holds: {} or less ({columns} columns): the lowest limit tried held",
                mib(limit)
            );
            ExitCode::SUCCESS
        }
        Some(limit) => {
            println!(
                "\nSmallest limit that holds: {} ({columns} columns; {} failed; to within {})",
                mib(limit),
                mib(limit - step),
                mib(step)
            );
            ExitCode::SUCCESS
        }
        None => {
            println!("\nNo limit up to {} holds ({columns} columns)", mib(high));
            ExitCode::FAILURE
        }
    }))
}

struct Runner<'a> {
    args: &'a Args,
    payloads: Arc<Payloads>,
    runs: u32,
}

/// One run: its load, what the server acknowledged and what is in its tables, and the memory it took.
struct Run {
    limit: Option<u64>,
    version: Version,
    duckdb_limit: Option<u64>,
    budget: Option<u64>,
    elapsed: Duration,
    acked: [u64; 5],
    /// Rows in each stream's table, or why they could not be counted.
    counts: Result<Vec<Option<u64>>, String>,
    /// The server had died, and was started again (outside the group) to count.
    counted_after_restart: bool,
    requests: u64,
    overloaded: u64,
    errors: u64,
    messages: Vec<String>,
    small_latency: Option<(Duration, Duration)>,
    upload: Option<UploadOutcome>,
    alive: bool,
    shutdown: String,
    shutdown_ok: bool,
    /// At the end of the load, and after the server's shutdown (which checkpoints).
    counters: Counters,
    final_counters: Counters,
    peaks: Peaks,
    vm_hwm: Option<u64>,
    log: Vec<String>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.acked.iter().sum::<u64>() as f64 / self.elapsed.as_secs_f64()
    }

    fn label(&self) -> String {
        self.limit.map_or("none".to_owned(), mib)
    }

    /// Acknowledged rows not in the tables, and rows in the tables never acknowledged.
    fn missing_and_extra(&self) -> Option<(u64, u64)> {
        let counts = self.counts.as_ref().ok()?;
        let mut missing_extra = (0, 0);
        for (acked, count) in self.acked.iter().zip(counts) {
            let count = count.unwrap_or(0);
            missing_extra.0 += acked.saturating_sub(count);
            missing_extra.1 += count.saturating_sub(*acked);
        }
        Some(missing_extra)
    }

    fn oom_kills(&self) -> u64 {
        self.final_counters.oom_kill.or(self.counters.oom_kill).unwrap_or(0)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.oom_kills() > 0 {
            problems.push(format!("the OOM killer killed {} process(es) in the group", self.oom_kills()));
        }
        if !self.alive {
            problems.push("the server was not running at the end of the load".to_owned());
        } else if !self.shutdown_ok {
            problems.push(format!("the server's shutdown ended with {}", self.shutdown));
        }
        match (&self.counts, self.missing_and_extra()) {
            (Err(error), _) => problems.push(format!("could not count the rows: {error}")),
            (_, Some((missing, extra))) => {
                if missing > 0 {
                    problems.push(format!("{missing} acknowledged rows are missing"));
                }
                // A request committed just before a kill has lost its answer, which the durability promise
                // allows (a retry with an idempotency key would not write it again): only a running server's
                // unacknowledged rows are a fault.
                if extra > 0 && self.alive {
                    problems.push(format!("{extra} rows in the tables were never acknowledged"));
                }
            }
            _ => {}
        }
        if self.errors > 0 {
            problems.push(format!("{} requests failed (besides overload answers)", self.errors));
        }
        problems
    }

    fn holds(&self) -> bool {
        self.problems().is_empty()
    }
}

impl Runner<'_> {
    /// One run of `seconds` inside `limit` (`None`: a group without a limit, which only measures).
    /// `None` where no group can be created (reported as SKIPPED).
    async fn run(&mut self, limit: Option<u64>, seconds: u64) -> anyhow::Result<Option<Run>> {
        let args = self.args;
        self.runs += 1;
        let group = match Group::create(self.runs, limit) {
            Ok(group) => group,
            Err(Unavailable(reason)) => {
                println!(
                    "\nSKIPPED: {reason}. The memory-limit test needs a writable memory cgroup (root, or a delegated group)."
                );
                return Ok(None);
            }
        };
        let (version, files) = (group.version(), group.files().clone());
        let group_dir = group.dir().to_owned();
        let dir = server::database_dir(args.dir.as_ref())?;
        let db = dir.path().join("memlimit.duckdb");
        let mut server = Server::start(&args.server, &db, args.config.as_deref(), Some(group))?;
        let url = server.url().to_owned();
        let metrics = reqwest::get(format!("{url}/metrics")).await?.text().await?;
        let duckdb_limit = server::metric(&metrics, "arrowport_duckdb_memory_limit_bytes").map(|v| v as u64);
        let budget = server::metric(&metrics, "arrowport_memory_budget_bytes").map(|v| v as u64);
        println!(
            "\nRun {}: limit {} ({version}, {}); the server sized itself: DuckDB memory_limit {}, memory budget {}",
            self.runs,
            limit.map_or("none".to_owned(), mib),
            group_dir.display(),
            duckdb_limit.map_or("?".to_owned(), mib),
            budget.map_or("?".to_owned(), mib),
        );
        if let Some(line) = server.sizing() {
            println!("  server: {line}");
        }
        let tally = Arc::new(Tally::default());
        let done = Arc::new(AtomicBool::new(false));
        let watch = tokio::spawn(monitor::watch(
            url.clone(),
            server.pid(),
            files.clone(),
            tally.clone(),
            done.clone(),
            Duration::from_secs(args.progress.max(1)),
        ));
        let shape = Shape {
            producers: args.producers,
            protocols: args.protocols,
            small_producers: args.small_producers,
            upload_bytes: (args.upload_gib * (1u64 << 30) as f64) as u64,
            duration: Duration::from_secs(seconds),
        };
        let elapsed = load::drive(&url, self.payloads.clone(), &shape, tally.clone()).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let peaks = watch.await.context("the monitor")?;
        let vm_hwm = server.peak_rss();
        let alive = server.alive();
        let counters = files.counters();
        let mut counts = if alive {
            server::count_rows(&url, &STREAMS).await.map_err(|e| format!("{e:#}"))
        } else {
            Err("the server is gone".to_owned())
        };
        let log = server.log();
        let status = server.stop(Duration::from_secs(120));
        let (shutdown, shutdown_ok) = match &status {
            Ok(status) => (status.to_string(), status.success()),
            Err(e) => (format!("{e:#}"), false),
        };
        // The group goes once the server has exited; its counters first.
        let group = server.into_group();
        let final_counters = files.counters();
        drop(group);
        let mut counted_after_restart = false;
        if !alive {
            // Counted by a fresh server on the same database: what an OOM-killed pod would come back to.
            let mut again = Server::start(&args.server, &db, args.config.as_deref(), None)?;
            counts = server::count_rows(again.url(), &STREAMS).await.map_err(|e| format!("{e:#}"));
            again.stop(Duration::from_secs(120))?;
            counted_after_restart = true;
        }
        Ok(Some(Run {
            limit,
            version,
            duckdb_limit,
            budget,
            elapsed,
            acked: tally.acked(),
            counts,
            counted_after_restart,
            requests: tally.requests(),
            overloaded: tally.overloaded(),
            errors: tally.errors(),
            messages: tally.messages(),
            small_latency: tally.small_latency(),
            upload: tally.upload.lock().expect("lock").clone(),
            alive,
            shutdown,
            shutdown_ok,
            counters,
            final_counters,
            peaks,
            vm_hwm,
            log,
        }))
    }
}

fn print_problems(run: &Run) {
    let problems = run.problems();
    if problems.is_empty() {
        println!(
            "  held: no OOM kill, the server ran to the end, all {} acknowledged rows are in the tables",
            run.acked.iter().sum::<u64>()
        );
        return;
    }
    println!("  FAILED (limit {}): {}", run.label(), problems.join("; "));
    if run.counted_after_restart {
        println!("  (rows counted by a fresh server on the same database, after the first one died)");
        if let Some((_, extra)) = run.missing_and_extra().filter(|(_, extra)| *extra > 0) {
            println!("  ({extra} rows were committed but their answers lost to the kill: allowed, see Durability)");
        }
    }
    for message in &run.messages {
        println!("  error: {message}");
    }
    if !run.alive || run.oom_kills() > 0 {
        println!("  the server's last log lines:");
        for line in &run.log {
            println!("    {line}");
        }
    }
}

fn report(runs: &[Run]) {
    let optional = |v: Option<u64>| v.map_or("-".to_owned(), mib);
    let count = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    println!("\nLoad:\n");
    println!(
        "| limit | DuckDB memory_limit | budget | seconds | requests | rows acked | rows/s | in tables | 503 overloaded | failed requests | small p50 / p99 | streamed upload |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|");
    for run in runs {
        let in_tables = match (&run.counts, run.missing_and_extra()) {
            (Err(_), _) => "not counted".to_owned(),
            (_, Some((0, 0))) => "all".to_owned(),
            (_, Some((missing, extra))) => format!("{missing} missing, {extra} extra"),
            _ => "-".to_owned(),
        };
        let latency = run.small_latency.map_or("-".to_owned(), |(p50, p99)| {
            format!("{:.0} / {:.0} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3)
        });
        let upload = run.upload.as_ref().map_or("-".to_owned(), |u| {
            format!(
                "{:.2} GiB, {} rows in {:.0} s{}",
                u.bytes as f64 / (1u64 << 30) as f64,
                u.rows,
                u.elapsed.as_secs_f64(),
                if u.attempts > 1 { format!(" ({} attempts)", u.attempts) } else { String::new() }
            )
        });
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {:.2}M | {} | {} | {} | {} | {} |",
            run.label(),
            optional(run.duckdb_limit),
            optional(run.budget),
            run.elapsed.as_secs_f64(),
            run.requests,
            run.acked.iter().sum::<u64>(),
            run.rate() / 1e6,
            in_tables,
            run.overloaded,
            run.errors,
            latency,
            upload
        );
    }
    println!("\nMemory ({}):\n", runs.first().map_or(String::new(), |r| r.version.to_string()));
    println!(
        "| limit | peak charged (kernel) | peak anon (sampled) | cache then | DuckDB then | in flight then | server RSS then | server VmHWM | peak DuckDB | peak in flight | failcnt | oom_kill | under_oom | server at the end |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for run in runs {
        let p = &run.peaks;
        let c = &run.final_counters;
        let end = if run.alive { format!("running; shutdown {}", run.shutdown) } else { "dead".to_owned() };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.label(),
            optional(c.peak.or(run.counters.peak)),
            mib(p.anon.anon),
            mib(p.anon.file),
            mib(p.at_anon_peak.duckdb),
            mib(p.at_anon_peak.inflight),
            mib(p.at_anon_peak.resident),
            optional(run.vm_hwm),
            mib(p.gauges.duckdb),
            mib(p.gauges.inflight),
            count(c.failcnt) + &c.memsw_failcnt.map_or(String::new(), |m| format!(" (memsw {m})")),
            count(c.oom_kill),
            count(run.counters.under_oom.or(c.oom)),
            end
        );
    }
    println!(
        "\nPeak charged is the kernel's (v1 memory.max_usage_in_bytes, v2 memory.peak): it includes the page cache of \
         the database file, which the kernel reclaims at the limit. Peak anon is the group's anonymous memory (v1 \
         total_rss, v2 anon; sampled every 250 ms), what only an OOM kill frees; the columns after it are the \
         server's gauges (GET /metrics, every second) just before that sample."
    );
    if runs.iter().any(|r| r.oom_kills() > 0 && r.final_counters.failcnt == Some(0)) {
        println!(
            "failcnt stayed 0 through an OOM kill: this kernel does not maintain the v1 counter (Linux 6.x can leave \
             it untracked); oom_kill is the figure to trust."
        );
    }
}
