//! What an upload has sent so far: counters for the summary, and a progress line on stderr when it is
//! a terminal.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrowport_api::decoded_size;
use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    rows: AtomicU64,
    /// Arrow bytes of the batches, uncompressed (measured as the server measures `bytes_decoded`).
    arrow_bytes: AtomicU64,
    /// Bytes handed to the connection: Arrow IPC with compressed buffers, plus framing.
    wire_bytes: AtomicU64,
}

/// Totals of a finished upload.
#[derive(Debug, Clone, Copy)]
pub struct Totals {
    pub rows: u64,
    pub arrow_bytes: u64,
    pub wire_bytes: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn start() -> Self {
        // Redirected or piped stderr gets no bar, so logs and CI output stay clean.
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let style = ProgressStyle::with_template("{spinner:.green} {human_pos} rows, {msg} sent, {rate}, {elapsed}")
            .expect("a valid progress template")
            .with_key("rate", |state: &ProgressState, out: &mut dyn fmt::Write| {
                let _ = write!(out, "{} rows/s", HumanCount(state.per_sec() as u64));
            });
        let bar = ProgressBar::with_draw_target(None, target).with_style(style).with_message("0 B");
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            bar,
            started: Instant::now(),
            rows: AtomicU64::new(0),
            arrow_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
        }
    }

    /// Counts a batch handed to the transport.
    pub fn batch(&self, batch: &RecordBatch) {
        self.rows.fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        self.arrow_bytes.fetch_add(decoded_size(batch), Ordering::Relaxed);
        self.bar.inc(batch.num_rows() as u64);
    }

    /// Counts bytes handed to the connection.
    pub fn sent(&self, bytes: usize) {
        let total = self.wire_bytes.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.bar.set_message(HumanBytes(total).to_string());
    }

    /// Removes the progress line and returns the totals.
    pub fn finish(&self) -> Totals {
        self.bar.finish_and_clear();
        Totals {
            rows: self.rows.load(Ordering::Relaxed),
            arrow_bytes: self.arrow_bytes.load(Ordering::Relaxed),
            wire_bytes: self.wire_bytes.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }
}
