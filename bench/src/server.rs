//! A freshly started `arrowport serve` process with its own database, and what it cost.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

pub struct Server {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` on fresh storage of `kind` in a temporary directory.
    pub fn start(binary: &Path, kind: &StorageKind) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, kind.config_yaml(dir.path()))?;
        let mut child = Command::new(binary)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let addr = loop {
            let line = lines.next().context("the server exited before listening")??;
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap_or_default().to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, url: format!("http://{addr}"), dir })
    }

    /// Parquet files in the lake's data directory now (0 for a DuckDB file).
    pub fn parquet_files(&self) -> u64 {
        count_parquet(&self.dir.path().join(LAKE_DATA))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Posts one Arrow stream and returns the committed row count.
    pub async fn ingest(&self, client: &reqwest::Client, stream: &str, body: reqwest::Body) -> anyhow::Result<u64> {
        let response = client
            .post(format!("{}/ingest/{stream}", self.url))
            .header("content-type", "application/vnd.apache.arrow.stream")
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let report: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "ingest failed with {status}: {report}");
        report["rows"].as_u64().context("rows in the report")
    }

    /// The server's peak memory and CPU time so far, read before stopping it.
    pub fn stop(mut self) -> anyhow::Result<Usage> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let peak_rss_kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmHWM in /proc/<pid>/status")?;
        let cpu = cpu_time(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?).context("/proc/<pid>/stat")?;
        Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        self.child.wait()?;
        // A lake's maintenance runs once more at shutdown.
        Ok(Usage { peak_rss_kib, cpu, parquet_files: self.parquet_files() })
    }
}

/// What a server process used.
pub struct Usage {
    /// Peak resident memory (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
    /// User and system CPU time of all its threads.
    pub cpu: Duration,
    /// Parquet files in the lake after the server stopped (and maintained it a last time).
    pub parquet_files: u64,
}

/// Where a lake's Parquet files go, in the server's directory.
const LAKE_DATA: &str = "lake-data";

/// What the benchmark writes into.
#[derive(Debug, Clone)]
pub enum StorageKind {
    Duckdb,
    /// A local DuckLake, with the extension files in this directory.
    Ducklake {
        extensions: PathBuf,
    },
}

impl StorageKind {
    /// The server's config file for storage in `dir`.
    pub fn config_yaml(&self, dir: &Path) -> String {
        match self {
            Self::Duckdb => format!("db_path: {}\n", dir.join("bench.duckdb").display()),
            Self::Ducklake { extensions } => format!(
                "storage: {{kind: ducklake, catalog: {}, data_path: {}}}\nduckdb: {{extension_directory: {}}}\n",
                dir.join("meta.ducklake").display(),
                dir.join(LAKE_DATA).display(),
                extensions.display()
            ),
        }
    }

    /// The same storage for in-process loading, in `dir`.
    pub fn open_in_process(&self, dir: &Path) -> anyhow::Result<Box<dyn arrowport::store::Storage>> {
        Ok(match self {
            Self::Duckdb => Box::new(arrowport::store::DuckDbFile::new(dir.join("native.duckdb"))),
            Self::Ducklake { extensions } => Box::new(arrowport::store::DuckLake::new(
                &dir.join("meta.ducklake").to_string_lossy(),
                &dir.join(LAKE_DATA),
                extensions,
                10_000,
                Duration::from_secs(3600),
                Duration::from_secs(300),
            )?),
        })
    }
}

fn count_parquet(dir: &Path) -> u64 {
    let mut count = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "parquet") {
                count += 1;
            }
        }
    }
    count
}

/// CPU time this process has used so far.
pub fn own_cpu_time() -> anyhow::Result<Duration> {
    cpu_time(&std::fs::read_to_string("/proc/self/stat")?).context("/proc/self/stat")
}

/// `utime + stime` from a `/proc/<pid>/stat` line. Their unit is USER_HZ, 100 per second on Linux.
fn cpu_time(stat: &str) -> Option<Duration> {
    // The command name (field 2) may contain spaces, but it ends at the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11); // field 3 (state) is the first here; 14 is utime
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_adds_user_and_system_ticks_after_the_command_name() {
        let stat = "4242 (arrow port) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 31 0 0 20 0 9 0";
        assert_eq!(cpu_time(stat), Some(Duration::from_millis(2810)));
        assert_eq!(cpu_time("4242 (truncated"), None);
    }
}
