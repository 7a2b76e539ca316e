//! A real `arrowport serve` process, started inside a memory cgroup before it allocates anything, and what
//! it reports: its metrics, its peak RSS, and the rows of a table counted through Flight SQL.
//! Started the way `bench/src/server.rs` starts it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, Int64Array, RecordBatch};
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Channel;

use crate::cgroup::Group;

/// Lines of the server's log kept to show when something goes wrong.
const LOG_LINES: usize = 40;

pub struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<VecDeque<String>>>,
    /// What it logged before it listened (its memory sizing among it).
    startup: Vec<String>,
    /// Dropped after the server has exited (see `Drop`).
    group: Option<Group>,
}

impl Server {
    /// Starts `binary serve` on the database `db`, inside `group` if given: `sh` writes its own pid to
    /// the group's `cgroup.procs` and then `exec`s the server, so every byte the server allocates is
    /// charged to the group.
    pub fn start(binary: &Path, db: &Path, config: Option<&Path>, group: Option<Group>) -> anyhow::Result<Self> {
        let mut command = match &group {
            Some(group) => {
                let mut command = Command::new("sh");
                command.arg("-c").arg(r#"echo $$ > "$0" && exec "$@""#).arg(group.procs()).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.args(["serve", "--host", "127.0.0.1", "--port", "0", "--db"]).arg(db);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES)));
        let keep = |log: &Mutex<VecDeque<String>>, line: &str| {
            let mut log = log.lock().expect("log lock");
            if log.len() == LOG_LINES {
                log.pop_front();
            }
            log.push_back(line.to_owned());
        };
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut startup = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                let status = child.wait()?;
                let log = log.lock().expect("log lock").iter().cloned().collect::<Vec<_>>().join("\n");
                anyhow::bail!("the server exited ({status}) before listening:\n{log}");
            };
            let line = line?;
            keep(&log, &line);
            startup.push(line.clone());
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap_or_default().to_owned();
            }
        };
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep(&kept, &line);
            }
        });
        Ok(Self { child, url: format!("http://{addr}"), log, startup, group })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the server wrote.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").iter().cloned().collect()
    }

    /// What the server logged about DuckDB's memory limit at start.
    pub fn sizing(&self) -> Option<&str> {
        self.startup.iter().find(|line| line.contains("memory limit")).map(String::as_str)
    }

    /// Whether the process is still running (not exited, not killed).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident memory (`VmHWM`), while the process runs.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kib: u64 =
            status.lines().find_map(|line| line.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, then up to `patience` for the graceful shutdown (it checkpoints), then SIGKILL.
    pub fn stop(&mut self, patience: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status()?;
        let started = Instant::now();
        while started.elapsed() < patience {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("the server did not stop within {patience:?} of SIGTERM: killing it");
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// The server with its group handed back (for its final counters), after it exited.
    pub fn into_group(mut self) -> Option<Group> {
        let _ = self.stop(Duration::from_secs(120));
        self.group.take()
    }
}

impl Drop for Server {
    /// Never leaves the server running (on an error or Ctrl-C): killed and waited for, so that its group,
    /// dropped next, is empty.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `SELECT count(*)` of each table through Flight SQL; a table that does not exist counts `None`.
pub async fn count_rows(url: &str, tables: &[&str]) -> anyhow::Result<Vec<Option<u64>>> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    let mut sql = FlightSqlServiceClient::new(channel);
    let mut counts = Vec::new();
    for table in tables {
        let info = match sql.execute(format!("SELECT count(*) FROM {table}"), None).await {
            Ok(info) => info,
            Err(e) if e.to_string().contains("does not exist") => {
                counts.push(None);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("counting {table}")),
        };
        let ticket = info.endpoint.first().and_then(|e| e.ticket.clone()).context("no ticket in the answer")?;
        let batches: Vec<RecordBatch> = sql.do_get(ticket).await?.try_collect().await?;
        let count = batches
            .first()
            .and_then(|b| {
                b.column(0).as_any().downcast_ref::<Int64Array>().filter(|c| !c.is_empty()).map(|c| c.value(0))
            })
            .with_context(|| format!("no count in the answer for {table}"))?;
        counts.push(Some(count as u64));
    }
    Ok(counts)
}

/// Where the server's database goes: a fresh directory under `parent` (the system's temporary
/// directory by default), removed at the end.
pub fn database_dir(parent: Option<&PathBuf>) -> anyhow::Result<tempfile::TempDir> {
    let builder = tempfile::Builder::new()
        .prefix("arrowport-memlimit-")
        .tempdir_in(parent.cloned().unwrap_or_else(std::env::temp_dir))?;
    Ok(builder)
}
