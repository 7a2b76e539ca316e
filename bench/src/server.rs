//! A freshly started `arrowport serve` process with its own database, and what it cost.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use arrowport_config::{Config, DuckLakeConfig, StorageConfig};

pub struct Server {
    child: Child,
    url: String,
    storage: Arc<FreshStorage>,
}

impl Server {
    /// Starts `binary` on fresh storage of `kind`, with its journal on or off.
    pub fn start(binary: &Path, kind: &StorageKind, journal: bool) -> anyhow::Result<Self> {
        Self::start_on(binary, Arc::new(FreshStorage::new(kind, journal)?))
    }

    /// Starts `binary` on `storage`, which other servers may share (a lake with a PostgreSQL catalog).
    pub fn start_on(binary: &Path, storage: Arc<FreshStorage>) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--config"])
            .arg(storage.config_path())
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
        Ok(Self { child, url: format!("http://{addr}"), storage })
    }

    /// Parquet files in the lake's data directory now (0 for a DuckDB file).
    pub fn parquet_files(&self) -> u64 {
        self.storage.parquet_files()
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
#[derive(Default)]
pub struct Usage {
    /// Peak resident memory (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
    /// User and system CPU time of all its threads.
    pub cpu: Duration,
    /// Parquet files in the lake after the server stopped (and maintained it a last time).
    pub parquet_files: u64,
}

impl Usage {
    /// What servers sharing one lake used together, stopped in this order: their CPU time and peak
    /// memory added up, and the Parquet files after the last one stopped.
    pub fn together(usages: impl IntoIterator<Item = Usage>) -> Usage {
        usages.into_iter().fold(Usage::default(), |sum, usage| Usage {
            peak_rss_kib: sum.peak_rss_kib + usage.peak_rss_kib,
            cpu: sum.cpu + usage.cpu,
            parquet_files: usage.parquet_files,
        })
    }
}

/// What the benchmark writes into.
#[derive(Debug, Clone)]
pub enum StorageKind {
    Duckdb,
    /// A DuckLake, with the extension files in `extensions`: its catalog a local file, or a database of
    /// its own on the PostgreSQL server at `postgres` (a libpq connection string).
    Ducklake {
        extensions: PathBuf,
        postgres: Option<String>,
    },
}

/// Fresh storage of one kind for one run: a temporary directory with the server's config file in it,
/// and for a lake on PostgreSQL a catalog database of its own, dropped with it.
pub struct FreshStorage {
    kind: StorageKind,
    /// The server's journal is on (`journal.enabled`).
    journal: bool,
    dir: tempfile::TempDir,
    catalog: Option<CatalogDatabase>,
}

impl FreshStorage {
    pub fn new(kind: &StorageKind, journal: bool) -> anyhow::Result<Self> {
        let catalog = match kind {
            StorageKind::Ducklake { postgres: Some(server), .. } => Some(CatalogDatabase::create(server)?),
            _ => None,
        };
        let storage = Self { kind: kind.clone(), journal, dir: tempfile::tempdir()?, catalog };
        std::fs::write(storage.config_path(), serde_json::to_string(&storage.config())?)?; // JSON is YAML
        Ok(storage)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    /// The servers' configuration.
    fn config(&self) -> Config {
        let mut config = Config { db_path: self.dir.path().join("bench.duckdb"), ..Config::default() };
        if let StorageKind::Ducklake { extensions, .. } = &self.kind {
            config.storage = StorageConfig::Ducklake(DuckLakeConfig::new(self.catalog(), self.data_path()));
            config.duckdb.extension_directory = Some(extensions.clone());
        }
        config.journal.enabled = self.journal;
        config
    }

    /// A lake's catalog, as `storage.catalog` names it.
    fn catalog(&self) -> String {
        match &self.catalog {
            Some(database) => format!("postgres:{}", database.connection()),
            None => self.dir.path().join("meta.ducklake").to_string_lossy().into_owned(),
        }
    }

    fn data_path(&self) -> PathBuf {
        self.dir.path().join("lake-data")
    }

    /// The same storage for in-process loading.
    pub fn open_in_process(&self) -> anyhow::Result<Box<dyn arrowport::store::Storage>> {
        Ok(match &self.kind {
            StorageKind::Duckdb => Box::new(arrowport::store::DuckDbFile::new(self.dir.path().join("native.duckdb"))),
            StorageKind::Ducklake { extensions, .. } => Box::new(arrowport::store::DuckLake::new(
                &self.catalog(),
                &self.data_path(),
                extensions,
                DuckLakeConfig::new(self.catalog(), self.data_path()).data_inlining_row_limit,
                Duration::from_secs(3600),
                Duration::from_secs(300),
            )?),
        })
    }

    /// Parquet files in the lake's data directory now (0 for a DuckDB file).
    pub fn parquet_files(&self) -> u64 {
        count_parquet(&self.data_path())
    }
}

/// A database of its own on a PostgreSQL server, for one lake's catalog.
struct CatalogDatabase {
    server: String,
    name: String,
}

impl CatalogDatabase {
    fn create(server: &str) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("arrowport_bench_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        psql(server, &format!("CREATE DATABASE {name}"))?;
        Ok(Self { server: server.to_owned(), name })
    }

    /// Its libpq connection string: the server's, with this database (libpq takes a keyword's last value).
    fn connection(&self) -> String {
        format!("{} dbname={}", self.server, self.name)
    }
}

impl Drop for CatalogDatabase {
    fn drop(&mut self) {
        if let Err(error) = psql(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("cannot drop the catalog database {}: {error:#}", self.name);
        }
    }
}

/// Runs one SQL statement with `psql` on the PostgreSQL server at `server`.
fn psql(server: &str, statement: &str) -> anyhow::Result<()> {
    let output = Command::new("psql").args([server, "-qc", statement]).output().context("cannot run psql")?;
    anyhow::ensure!(output.status.success(), "{statement}: {}", String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
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

    #[test]
    fn servers_sharing_a_lake_add_up_cpu_and_memory_and_count_the_files_after_the_last() {
        let usage = |peak_rss_kib, cpu_ms, parquet_files| Usage {
            peak_rss_kib,
            cpu: Duration::from_millis(cpu_ms),
            parquet_files,
        };
        let together = Usage::together([usage(100, 1500, 7), usage(300, 2500, 4)]);
        assert_eq!((together.peak_rss_kib, together.cpu, together.parquet_files), (400, Duration::from_secs(4), 4));
    }

    #[test]
    fn a_local_lake_config_names_its_catalog_data_path_and_extensions() {
        let kind = StorageKind::Ducklake { extensions: "/opt/extensions".into(), postgres: None };
        let storage = FreshStorage::new(&kind, false).unwrap();
        let config: Config = serde_json::from_str(&std::fs::read_to_string(storage.config_path()).unwrap()).unwrap();
        let StorageConfig::Ducklake(lake) = &config.storage else { panic!("not a lake: {:?}", config.storage) };
        assert_eq!(lake.catalog, storage.dir.path().join("meta.ducklake").to_string_lossy());
        assert_eq!(lake.data_path, storage.dir.path().join("lake-data"));
        assert_eq!(config.duckdb.extension_directory, Some("/opt/extensions".into()));
    }
}
