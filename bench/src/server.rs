//! A freshly started `arrowport serve` process with its own database, and its peak memory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

pub struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start(binary: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(binary)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--db"])
            .arg(dir.path().join("bench.duckdb"))
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
        Ok(Self { child, url: format!("http://{addr}"), _dir: dir })
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

    /// Peak resident memory (KiB) of the server, read before stopping it.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let peak = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmHWM in /proc/<pid>/status")?;
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        self.child.wait()?;
        Ok(peak)
    }
}
