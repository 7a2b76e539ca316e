//! The real `arrowport serve` process, started on the run's database file, killed with SIGKILL and started
//! again on the same file.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Lines of the server's log kept for a failure report.
const TAIL: usize = 40;

/// How to start the server: the binary, its config file, the database file (for a lake with a local
/// catalog: the catalog file, a DuckDB database too).
pub struct Spec {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub db: PathBuf,
    pub lake: Option<Lake>,
}

/// A DuckLake: its catalog (`db`'s path, or `postgres:...`), data directory and the extension files.
pub struct Lake {
    pub catalog: String,
    pub data_path: PathBuf,
    pub extensions: PathBuf,
}

impl Spec {
    /// DuckDB's write-ahead log beside the database file: what a restart replays.
    pub fn wal(&self) -> PathBuf {
        let mut wal = self.db.clone().into_os_string();
        wal.push(".wal");
        PathBuf::from(wal)
    }
}

/// The server's log: the last lines of every run (for a failure report) and every warning or error.
#[derive(Default)]
pub struct Log {
    tail: VecDeque<String>,
    pub notable: Vec<String>,
}

impl Log {
    pub fn tail(&self) -> String {
        self.tail.iter().map(|line| format!("  | {line}\n")).collect()
    }
}

pub struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts the server and waits until `/readyz` answers 200. Returns it with the time from spawning
    /// the process to that answer: opening the database, replaying its write-ahead log, listening.
    pub async fn start(spec: &Spec, log: &Arc<Mutex<Log>>, timeout: Duration) -> anyhow::Result<(Self, Duration)> {
        let spawned = Instant::now();
        let mut command = Command::new(&spec.binary);
        command.args(["serve", "--host", "127.0.0.1", "--port", "0", "--config"]).arg(&spec.config);
        if spec.lake.is_none() {
            command.arg("--db").arg(&spec.db);
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", spec.binary.display()))?;
        let stderr = child.stderr.take().context("the server's stderr")?;
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let log = log.clone();
        std::thread::spawn(move || read_log(stderr, &log, addr_tx));
        let mut server = Self { child, url: String::new() };
        let ready = async {
            // The server logs its address once the database is open (the WAL replayed) and it listens.
            let addr = addr_rx.await.context("the server exited before listening")?;
            server.url = format!("http://{addr}");
            let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
            loop {
                if let Ok(response) = client.get(format!("{}/readyz", server.url)).send().await
                    && response.status() == reqwest::StatusCode::OK
                {
                    return anyhow::Ok(spawned.elapsed());
                }
                if let Some(status) = server.child.try_wait()? {
                    bail!("the server exited ({status}) before it was ready");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        match tokio::time::timeout(timeout, ready).await {
            Ok(Ok(recovery)) => Ok((server, recovery)),
            Ok(Err(error)) => {
                let status = server.stop_now();
                Err(error.context(format!("the server did not come back (exit: {status})")))
            }
            Err(_) => {
                server.stop_now();
                bail!("the server was not ready within {} s", timeout.as_secs())
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// SIGKILL: no handler runs, nothing is flushed, open transactions are cut where they stand.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().context("SIGKILL")?;
        self.child.wait().context("waiting for the killed server")?;
        Ok(())
    }

    /// SIGTERM, then waits for the graceful shutdown (requests finish, a checkpoint) and its exit status.
    pub async fn terminate(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.stop_now();
                bail!("the server did not stop within {} s of SIGTERM", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop_now(&mut self) -> String {
        let _ = self.child.kill();
        self.child.wait().map_or_else(|e| e.to_string(), |s| s.to_string())
    }
}

impl Drop for Server {
    /// A server still running when the harness gives up (an error) is not left behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop_now();
        }
    }
}

/// Reads the server's log until it exits: sends the address it listens on, keeps the tail and every
/// warning, error and panic.
fn read_log(stderr: impl std::io::Read, log: &Mutex<Log>, addr: tokio::sync::oneshot::Sender<String>) {
    let mut addr = Some(addr);
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.split("addr=").nth(1)
            && let Some(sender) = addr.take()
        {
            let _ = sender.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
        }
        let mut log = log.lock().expect("log lock");
        if [" WARN ", " ERROR ", "panicked"].iter().any(|marker| line.contains(marker)) {
            log.notable.push(line.clone());
        }
        if log.tail.len() == TAIL {
            log.tail.pop_front();
        }
        log.tail.push_back(line);
    }
}

/// Size of a file, 0 if there is none.
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}
