//! Watches a run: the group's memory every quarter second, the server's own gauges (resident memory,
//! DuckDB's buffer manager, decoded bytes in flight) every second, and whether the server is still there.
//! Keeps each one's peak, and what the others were at the group's peak of anonymous memory, to say which
//! part grew.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cgroup::{Files, Sample, mib};
use crate::load::Tally;
use crate::server::metric;

/// The server's own view of its memory, from `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    pub resident: u64,
    pub duckdb: u64,
    pub inflight: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Peaks {
    /// Highest sample of everything charged to the group.
    pub usage: u64,
    /// Highest sample of the group's anonymous memory, and the page cache at that moment.
    pub anon: Sample,
    /// The server's gauges last read before that sample.
    pub at_anon_peak: Gauges,
    /// Each gauge's own peak.
    pub gauges: Gauges,
}

/// Samples until `tally` says the run is over (its producers stopped) and `done` is set by the caller.
pub async fn watch(
    url: String,
    pid: u32,
    files: Files,
    tally: Arc<Tally>,
    done: Arc<std::sync::atomic::AtomicBool>,
    progress_every: Duration,
) -> Peaks {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("HTTP client");
    let started = Instant::now();
    let mut peaks = Peaks::default();
    let mut gauges = Gauges::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_progress = progress_every;
    let mut ticks = 0u64;
    let mut last_rows = (Duration::ZERO, 0u64);
    while !done.load(Ordering::Relaxed) {
        tick.tick().await;
        ticks += 1;
        if !running(pid) {
            tally.dead.store(true, Ordering::Relaxed);
        }
        if ticks % 4 == 1
            && !tally.dead.load(Ordering::Relaxed)
            && let Some(now) = scrape(&client, &url).await
        {
            gauges = now;
            peaks.gauges.resident = peaks.gauges.resident.max(now.resident);
            peaks.gauges.duckdb = peaks.gauges.duckdb.max(now.duckdb);
            peaks.gauges.inflight = peaks.gauges.inflight.max(now.inflight);
        }
        let sample = files.sample();
        peaks.usage = peaks.usage.max(sample.usage);
        if sample.anon >= peaks.anon.anon {
            peaks.anon = sample;
            peaks.at_anon_peak = gauges;
        }
        let elapsed = started.elapsed();
        if elapsed >= next_progress {
            next_progress += progress_every;
            let rows = tally.acked_total();
            let rate = (rows - last_rows.1) as f64 / (elapsed - last_rows.0).as_secs_f64();
            last_rows = (elapsed, rows);
            eprintln!(
                "  {:>4.0} s  {:>11} rows acked  {:>5.2}M rows/s  group {} (anon {}, cache {})  server RSS {}  DuckDB {}  in flight {}{}",
                elapsed.as_secs_f64(),
                rows,
                rate / 1e6,
                mib(sample.usage),
                mib(sample.anon),
                mib(sample.file),
                mib(gauges.resident),
                mib(gauges.duckdb),
                mib(gauges.inflight),
                match (tally.overloaded(), tally.errors()) {
                    (0, 0) => String::new(),
                    (overloaded, errors) => format!("  overloaded {overloaded}, errors {errors}"),
                }
            );
        }
    }
    peaks
}

async fn scrape(client: &reqwest::Client, url: &str) -> Option<Gauges> {
    let text = client.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
    let gauge = |name| metric(&text, name).map_or(0, |v| v as u64);
    Some(Gauges {
        resident: gauge("arrowport_process_resident_memory_bytes"),
        duckdb: gauge("arrowport_duckdb_memory_bytes"),
        inflight: gauge("arrowport_inflight_bytes"),
    })
}

/// Whether `pid` is a running process (not gone, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rfind(')').and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}
