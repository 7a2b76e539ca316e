//! Arrowport's configuration contract.
//!
//! Two documents share these types: the ingester's base file ([`Config`]) and the streams file
//! ([`StreamsFile`]) that the Kubernetes operator renders into a ConfigMap. Keeping them in this small
//! crate (serde only, no DuckDB) lets the operator write exactly what the ingester parses.

mod bytesize;
mod error;
mod ident;
mod locate;
pub mod settings;
pub mod tokens;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use bytesize::ByteSize;
pub use error::ConfigError;
pub use ident::{is_valid_stream_name, is_valid_table_name};
pub use tokens::{TokenEntry, TokensFile, token_sha256};

use locate::KeyLines;

/// Default DuckDB file when nothing else is configured.
pub const DEFAULT_DB_PATH: &str = "./arrowport.duckdb";
/// Default listen address.
pub const DEFAULT_HOST: &str = "0.0.0.0";
/// Default listen port, shared by HTTP and Arrow Flight.
pub const DEFAULT_PORT: u16 = 8888;
/// One DuckDB row group: the largest step the loader hands DuckDB at once.
pub const DEFAULT_CHUNK_SIZE: usize = 122_880;

/// The ingester's base configuration file (`--config`, `ARROWPORT_CONFIG`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// DuckDB database file the ingester writes into (created if missing), when `storage.kind` is
    /// `duckdb` (the default).
    pub db_path: PathBuf,
    /// What the ingester writes into: a DuckDB file (`db_path`) or a DuckLake.
    pub storage: StorageConfig,
    /// Address to listen on.
    pub host: String,
    /// Port for HTTP and Arrow Flight (gRPC), multiplexed on one listener.
    pub port: u16,
    /// Serve Arrow Flight on this port instead, with HTTP alone on `port`.
    pub flight_port: Option<u16>,
    /// Compression Arrowport uses for Arrow data it sends, advertised to producers.
    pub compression: Compression,
    /// DuckDB extensions loaded at start (must be installable offline).
    pub duckdb_extensions: Vec<String>,
    /// Optional separate streams file holding only the `streams:` map (what the operator renders).
    pub streams_path: Option<PathBuf>,
    /// Route streams without a configured entry to a table named after the stream; `false` answers 404.
    pub auto_create: bool,
    /// Resource limits protecting the ingester.
    pub limits: Limits,
    /// Settings of the embedded DuckDB database.
    pub duckdb: DuckDbSettings,
    /// How long retries with an idempotency key are recognised.
    pub idempotency: IdempotencySettings,
    /// Small requests answered once they are durable in a journal on local disk, and written to their
    /// tables in large transactions. Off by default.
    pub journal: JournalSettings,
    /// Access control: bearer tokens with per-stream write grants and a query grant. Off by default.
    pub auth: AuthConfig,
    /// TLS on the listening port(s), and mutual TLS with `client_ca`. Off by default.
    pub tls: Option<TlsConfig>,
    /// Per-stream routing, keyed by stream name.
    pub streams: BTreeMap<String, StreamConfig>,
}

/// Access control. Without `tokens_file` every client may write and query (as before).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The tokens file (see [`TokensFile`]): each token's SHA-256, name and grants. Re-read when it
    /// changes, like the streams file (in Kubernetes, a Secret mounted as a volume).
    pub tokens_file: Option<PathBuf>,
}

/// TLS for every protocol on the port (HTTP/1.1, HTTP/2, gRPC; ALPN `h2` and `http/1.1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first. Re-read when it changes.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate.
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates: set, every client must present one
    /// (mutual TLS), and its subject common name can stand for a token name in the tokens file. Re-read
    /// when it changes, like the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            db_path: PathBuf::from(DEFAULT_DB_PATH),
            storage: StorageConfig::default(),
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            flight_port: None,
            compression: Compression::default(),
            duckdb_extensions: Vec::new(),
            streams_path: None,
            auto_create: true,
            limits: Limits::default(),
            duckdb: DuckDbSettings::default(),
            idempotency: IdempotencySettings::default(),
            journal: JournalSettings::default(),
            auth: AuthConfig::default(),
            tls: None,
            streams: BTreeMap::new(),
        }
    }
}

/// The storage kind, with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// One DuckDB database file, `db_path`: one writing process.
    #[default]
    Duckdb,
    /// A DuckLake: a catalog (a local file, or PostgreSQL for several ingesters) and Parquet files.
    Ducklake(DuckLakeConfig),
}

/// A DuckLake to write into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DuckLakeConfig {
    /// The lake's catalog: a local file (`/data/lake/meta.ducklake`, one ingester), or `postgres:`
    /// followed by a libpq connection string (`postgres:host=pg dbname=lake user=arrowport`; several
    /// ingesters). A password comes from the environment (`PGPASSWORD`), never from this file.
    pub catalog: String,
    /// Directory of the lake's Parquet files; shared storage when several ingesters write the lake.
    /// Relative paths are made absolute at start (DuckLake stores the path as it is given).
    pub data_path: PathBuf,
    /// Inserts of up to this many rows are kept in the catalog instead of a Parquet file of their own,
    /// and written out to Parquet by maintenance (DuckLake's `DATA_INLINING_ROW_LIMIT`).
    #[serde(default = "default_inlining_row_limit")]
    pub data_inlining_row_limit: u64,
    /// How often one ingester runs the lake's maintenance (write inlined rows to Parquet, merge small
    /// files, expire old snapshots, delete files no snapshot needs); 0 turns it off.
    #[serde(default = "default_maintenance_interval")]
    pub maintenance_interval_seconds: u64,
    /// Snapshots (and the files only they reference) are kept this long for time travel.
    #[serde(default = "default_snapshot_retention")]
    pub snapshot_retention_seconds: u64,
}

fn default_inlining_row_limit() -> u64 {
    // DuckLake 1.5.5 inlines rows as SQL literals that the catalog parses and plans: ~25 µs of CPU a
    // row, against a few milliseconds for a Parquet file. At 10,000, 1,000-row requests from 32
    // producers ran at 0.04M rows/s; at 100 at 0.6M, leaving maintenance to merge the files.
    100
}

fn default_maintenance_interval() -> u64 {
    300
}

fn default_snapshot_retention() -> u64 {
    3_600
}

impl DuckLakeConfig {
    /// A lake at `catalog` with its data in `data_path`, and the defaults for the rest.
    pub fn new(catalog: impl Into<String>, data_path: impl Into<PathBuf>) -> Self {
        Self {
            catalog: catalog.into(),
            data_path: data_path.into(),
            data_inlining_row_limit: default_inlining_row_limit(),
            maintenance_interval_seconds: default_maintenance_interval(),
            snapshot_retention_seconds: default_snapshot_retention(),
        }
    }

    /// Whether the catalog is a PostgreSQL database (which several ingesters may share).
    pub fn is_postgres(&self) -> bool {
        self.catalog.starts_with("postgres:")
    }
}

/// Retries with an idempotency key (`Idempotency-Key`, or a Flight producer's key): each committed key
/// is remembered beside the data, so a retry of a committed request is answered, not written again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencySettings {
    /// How long a committed key is remembered. A day covers a producer that retries after an outage of
    /// hours; each key costs a row of about 100 bytes until it expires.
    pub key_window_seconds: u64,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self { key_window_seconds: 86_400 }
    }
}

/// The journal (see the README's "Small writes"). A small request (below one chunk of rows and 8 MiB)
/// to a table it has written before is answered once it is durable in the journal; its rows are then
/// written together with others' in transactions of up to a million rows, and are read by Arrowport's
/// queries as soon as the request is answered (a query first waits for them). Readers that open the
/// database or lake directly see them up to `linger_ms` later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSettings {
    pub enabled: bool,
    /// The journal's directory, on a persistent volume of this ingester alone. Default: beside the
    /// database file (`<db_path>.journal`) or the lake's catalog file (`<catalog>.journal`); with a
    /// PostgreSQL catalog it must be set.
    pub path: Option<PathBuf>,
    /// Longest a journaled request waits before its table is written, unless a million rows gather
    /// first. Longer makes larger transactions (faster, fewer Parquet files in a lake) and holds more
    /// rows in memory, within `limits.memory_budget_bytes`.
    pub linger_ms: u64,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self { enabled: false, path: None, linger_ms: 500 }
    }
}

/// Settings of the embedded DuckDB database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuckDbSettings {
    /// DuckDB's own `memory_limit` (its buffer pool). `None`: the ingester derives it from the memory
    /// available, leaving room for `limits.memory_budget_bytes` and the process itself (DuckDB's own
    /// default, 80% of the memory, would not).
    pub memory_limit: Option<ByteSize>,
    /// Arrowport runs `CHECKPOINT` this often (0: only at shutdown); DuckDB also checkpoints by itself
    /// when its write-ahead log grows past `checkpoint_threshold`.
    pub checkpoint_interval_seconds: u64,
    /// Directory holding DuckDB extension files (`<name>.duckdb_extension`) for the extensions a DuckLake
    /// needs (`ducklake`, `icu`, and `postgres_scanner` for a PostgreSQL catalog). Nothing is downloaded.
    pub extension_directory: Option<PathBuf>,
    /// DuckDB's `checkpoint_threshold`: the write-ahead log size at which a commit checkpoints. Small
    /// commits go through the log, and checkpointing a few of them at a time costs far more than a larger
    /// batch of them (DuckDB's own default, 16 MiB, halves small-request throughput); a larger log takes
    /// more memory until it is checkpointed and longer to replay after a crash.
    pub checkpoint_threshold: ByteSize,
    /// DuckDB's `threads`; `None` keeps DuckDB's default (every core it sees). Fewer threads cost a
    /// small commit less CPU (a committing thread spins while another finishes its insert) but slow bulk
    /// loads: on two cores, one thread took 1.9 instead of 2.4 s of CPU per million rows of 1,000-row
    /// requests at the same rate, and loaded one producer's bulk upload at 0.9M instead of 1.5M rows/s.
    pub threads: Option<usize>,
}

impl Default for DuckDbSettings {
    fn default() -> Self {
        Self {
            memory_limit: None,
            checkpoint_interval_seconds: 300,
            extension_directory: None,
            checkpoint_threshold: ByteSize::mib(64),
            threads: None,
        }
    }
}

/// Limits on what one request, and all requests together, may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted on the wire (before decompression); larger bodies get 413.
    pub max_body_bytes: ByteSize,
    /// Largest single Arrow IPC message (one record batch); larger messages get 413.
    pub max_message_bytes: ByteSize,
    /// What all in-flight requests may hold together (messages being received, decoded batches); beyond
    /// it requests get 503. `None`: the ingester derives it from the memory available.
    pub memory_budget_bytes: Option<ByteSize>,
    /// DuckDB connections loading data at once; further requests wait for a free one.
    pub max_concurrent_loads: usize,
    /// Read-only Flight SQL queries running at once; further queries wait for a free slot.
    pub max_concurrent_queries: usize,
    /// A read-only query running longer than this is cancelled.
    pub query_timeout_seconds: u64,
    /// A connection must send a request's HTTP/1.1 headers within this time, or it is closed.
    pub header_timeout_seconds: u64,
    /// An upload that sends nothing for this long (no body bytes, no `DoPut` message) is rolled back
    /// and refused (`408 idle_timeout` / `DEADLINE_EXCEEDED`).
    pub idle_timeout_seconds: u64,
    /// After SIGTERM, open requests may finish for this long; then uploads still open are rolled back
    /// and answered `503` / `UNAVAILABLE` (retry elsewhere). Keep it below the pod's
    /// `terminationGracePeriodSeconds`.
    pub shutdown_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: ByteSize::gib(64),
            max_message_bytes: ByteSize::mib(256),
            memory_budget_bytes: None,
            max_concurrent_loads: 8,
            max_concurrent_queries: 2,
            query_timeout_seconds: 300,
            header_timeout_seconds: 30,
            idle_timeout_seconds: 60,
            shutdown_timeout_seconds: 30,
        }
    }
}

/// Routing and loading settings of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Table the stream lands in; defaults to the stream name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_table: Option<String>,
    /// Most rows handed to DuckDB in one step (larger batches are sliced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<usize>,
    /// Compression for Arrow data Arrowport sends for this stream; defaults to the global setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// What happens when a batch carries columns the table lacks.
    #[serde(skip_serializing_if = "SchemaPolicy::is_default")]
    pub schema_policy: SchemaPolicy,
    /// When a long Flight `DoPut` commits what it has received so far (each threshold on its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush: Option<FlushPolicy>,
    /// Names of tokens file entries (tokens, or client certificates' common names) allowed to write this
    /// stream, besides those whose own `write` patterns match it. Only in force with `auth.tokens_file`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub writers: Vec<String>,
}

/// Commit thresholds for long-running Flight `DoPut` calls: whichever is reached first commits.
/// HTTP requests always commit once, at the end of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushPolicy {
    /// Rows received since the last commit.
    pub rows: u64,
    /// Decoded Arrow bytes received since the last commit.
    pub bytes: ByteSize,
    /// Seconds since the first uncommitted batch arrived.
    pub interval_seconds: u64,
}

impl Default for FlushPolicy {
    /// Each commit ends DuckDB's scan and starts a new one: ~80 ms on a 2-core machine, about 8% of a
    /// full-speed stream at a flush per million rows. These flush a full-speed stream every few seconds
    /// and a slow one within the interval.
    fn default() -> Self {
        Self { rows: 10_000_000, bytes: ByteSize::gib(1), interval_seconds: 10 }
    }
}

/// What to do with a batch whose columns are not all in the target table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemaPolicy {
    /// Refuse the whole request with 422, naming the offending columns.
    #[default]
    Reject,
    /// Add new columns (nullable) in the same transaction as the data; incompatible types still fail.
    Evolve,
}

impl SchemaPolicy {
    fn is_default(&self) -> bool {
        *self == Self::Reject
    }

    /// The policy's name as written in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Reject => "reject",
            Self::Evolve => "evolve",
        }
    }
}

/// The zstd level of Arrow IPC compression: zstd's default, the only level Arrow IPC compresses at.
pub const ZSTD_LEVEL: i32 = 3;

/// Compression of Arrow IPC buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// `zstd`, `lz4` or `none`.
    pub algorithm: CompressionAlgorithm,
    /// zstd level: only [`ZSTD_LEVEL`] (3), or left out, which means the same. Arrow IPC compresses zstd
    /// at level 3 and cannot use another level; lz4 and none take no level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
}

impl Default for Compression {
    fn default() -> Self {
        Self { algorithm: CompressionAlgorithm::Zstd, level: Some(ZSTD_LEVEL) }
    }
}

/// Arrow IPC buffer compression codecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionAlgorithm {
    Zstd,
    Lz4,
    None,
}

impl CompressionAlgorithm {
    /// The codec's name as written in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
            Self::None => "none",
        }
    }
}

/// The streams file: only the `streams:` map. The operator renders it; the ingester hot-reloads it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsFile {
    /// Per-stream routing, keyed by stream name.
    #[serde(default)]
    pub streams: BTreeMap<String, StreamConfig>,
}

impl Config {
    /// Parses and validates a base config file's text; the error is the first problem.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::check_yaml(text).map_err(first)
    }

    /// Parses and validates like [`Config::from_yaml`], reporting every problem with its key path and
    /// line. Bad YAML, an unknown key or a value of the wrong type stops the parser, so it comes alone.
    pub fn check_yaml(text: &str) -> Result<Self, Vec<ConfigError>> {
        let config: Self = error::parse_yaml(text).map_err(|error| vec![error])?;
        locate(text, config.issues())?;
        Ok(config)
    }

    /// Checks what the type system cannot: names, ranges and combinations. The error is the first of
    /// [`Config::problems`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem [`Config::validate`] checks for, in the order of the keys (without lines: those
    /// come from the text, see [`Config::check_yaml`]).
    pub fn problems(&self) -> Vec<ConfigError> {
        self.issues().into_iter().map(|issue| issue.error(None)).collect()
    }

    fn issues(&self) -> Vec<Issue> {
        let mut issues = Vec::new();
        let limits = &self.limits;
        for (field, value, message) in [
            ("max_concurrent_loads", limits.max_concurrent_loads as u64, "must be at least 1"),
            ("max_concurrent_queries", limits.max_concurrent_queries as u64, "must be at least 1"),
            ("query_timeout_seconds", limits.query_timeout_seconds, "must be at least 1"),
            ("header_timeout_seconds", limits.header_timeout_seconds, "must be at least 1"),
            ("idle_timeout_seconds", limits.idle_timeout_seconds, "must be at least 1"),
            ("shutdown_timeout_seconds", limits.shutdown_timeout_seconds, "must be at least 1"),
            ("memory_budget_bytes", limits.memory_budget_bytes.map_or(1, |b| b.0), "must be greater than 0"),
        ] {
            if value == 0 {
                issues.push(Issue::new(key(&["limits", field]), message));
            }
        }
        if let StorageConfig::Ducklake(lake) = &self.storage {
            if lake.catalog.trim().is_empty() {
                issues.push(Issue::new(
                    key(&["storage", "catalog"]),
                    "must name a catalog file or postgres:<connection string>",
                ));
            }
            if lake.data_path.as_os_str().is_empty() {
                issues.push(Issue::new(key(&["storage", "data_path"]), "must name a directory"));
            }
            if self.duckdb.extension_directory.is_none() {
                issues.push(Issue::new(
                    key(&["duckdb", "extension_directory"]),
                    "a DuckLake needs the directory holding ducklake.duckdb_extension (and icu, postgres_scanner)",
                ));
            }
        }
        if self.journal.enabled {
            let lake_on_postgres = matches!(&self.storage, StorageConfig::Ducklake(lake) if lake.is_postgres());
            match &self.journal.path {
                Some(path) if path.as_os_str().is_empty() => {
                    issues.push(Issue::new(key(&["journal", "path"]), "must name a directory"))
                }
                None if lake_on_postgres => issues.push(Issue::new(
                    key(&["journal", "path"]),
                    "must be set with a PostgreSQL catalog: a directory on this ingester's own volume",
                )),
                _ => {}
            }
            if self.journal.linger_ms == 0 {
                issues.push(Issue::new(key(&["journal", "linger_ms"]), "must be at least 1"));
            }
        }
        if self.idempotency.key_window_seconds == 0 {
            issues.push(Issue::new(key(&["idempotency", "key_window_seconds"]), "must be at least 1"));
        }
        check_compression(&mut issues, key(&["compression"]), &self.compression);
        if self.auth.tokens_file.as_ref().is_some_and(|path| path.as_os_str().is_empty()) {
            issues.push(Issue::new(key(&["auth", "tokens_file"]), "must name a file"));
        }
        if let Some(tls) = &self.tls {
            for (field, path) in
                [("cert", Some(&tls.cert)), ("key", Some(&tls.key)), ("client_ca", tls.client_ca.as_ref())]
            {
                if path.is_some_and(|path| path.as_os_str().is_empty()) {
                    issues.push(Issue::new(key(&["tls", field]), "must name a PEM file"));
                }
            }
        }
        check_streams(&mut issues, &self.streams);
        issues
    }
}

impl StreamsFile {
    /// Parses and validates a streams file's text; the error is the first problem. An empty document
    /// is an empty map.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::check_yaml(text).map_err(first)
    }

    /// Parses and validates like [`StreamsFile::from_yaml`], reporting every problem (see
    /// [`Config::check_yaml`]).
    pub fn check_yaml(text: &str) -> Result<Self, Vec<ConfigError>> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let file: Self = error::parse_yaml(text).map_err(|error| vec![error])?;
        let mut issues = Vec::new();
        check_streams(&mut issues, &file.streams);
        locate(text, issues)?;
        Ok(file)
    }

    /// Renders the file deterministically (streams sorted by name).
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_saphyr::to_string(self).map_err(|e| ConfigError::Render(e.to_string()))
    }
}

/// A value that parsed but is not acceptable. The path is kept in segments because stream names may
/// contain dots.
pub(crate) struct Issue {
    path: Vec<String>,
    message: &'static str,
}

impl Issue {
    pub(crate) fn new(path: Vec<String>, message: &'static str) -> Self {
        Self { path, message }
    }

    fn error(self, line: Option<u64>) -> ConfigError {
        ConfigError::Invalid { key: self.path.join("."), message: self.message.to_owned(), line }
    }
}

/// Gives each issue the line of its key in `text`.
pub(crate) fn locate(text: &str, issues: Vec<Issue>) -> Result<(), Vec<ConfigError>> {
    if issues.is_empty() {
        return Ok(());
    }
    let lines = KeyLines::parse(text);
    Err(issues
        .into_iter()
        .map(|issue| {
            let line = lines.line(&issue.path);
            issue.error(line)
        })
        .collect())
}

pub(crate) fn first(mut problems: Vec<ConfigError>) -> ConfigError {
    problems.swap_remove(0)
}

fn check_streams(issues: &mut Vec<Issue>, streams: &BTreeMap<String, StreamConfig>) {
    for (name, stream) in streams {
        let at = |field: &[&str]| [key(&["streams", name]), key(field)].concat();
        if !is_valid_stream_name(name) {
            issues.push(Issue::new(
                at(&[]),
                "stream names are 1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'",
            ));
        }
        if let Some(table) = &stream.target_table
            && !is_valid_table_name(table)
        {
            issues.push(Issue::new(
                at(&["target_table"]),
                "table names are 1-128 characters of [A-Za-z0-9_], not starting with a digit",
            ));
        }
        if stream.chunk_size == Some(0) {
            issues.push(Issue::new(at(&["chunk_size"]), "must be at least 1"));
        }
        if let Some(compression) = &stream.compression {
            check_compression(issues, at(&["compression"]), compression);
        }
        if stream.writers.iter().any(|writer| !tokens::is_valid_token_name(writer)) {
            issues.push(Issue::new(at(&["writers"]), "each entry is a token name: 1-128 printable ASCII characters"));
        }
        if let Some(flush) = &stream.flush {
            for (field, value) in
                [("rows", flush.rows), ("bytes", flush.bytes.0), ("interval_seconds", flush.interval_seconds)]
            {
                if value == 0 {
                    issues.push(Issue::new(at(&["flush", field]), "must be at least 1"));
                }
            }
        }
    }
}

fn check_compression(issues: &mut Vec<Issue>, mut path: Vec<String>, compression: &Compression) {
    let message = match (compression.algorithm, compression.level) {
        (CompressionAlgorithm::Zstd, Some(level)) if level != ZSTD_LEVEL => {
            "Arrow IPC compresses zstd at level 3 and cannot use another level: set 3 or leave the level out"
        }
        (CompressionAlgorithm::Lz4 | CompressionAlgorithm::None, Some(_)) => "a level applies only to zstd",
        _ => return,
    };
    path.push("level".to_owned());
    issues.push(Issue::new(path, message));
}

pub(crate) fn key(segments: &[&str]) -> Vec<String> {
    segments.iter().map(|segment| (*segment).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_config() {
        assert_eq!(Config::from_yaml("{}").unwrap(), Config::default());
    }

    #[test]
    fn parses_the_documented_example() {
        let config = Config::from_yaml(
            "db_path: ./warehouse.duckdb\n\
             compression: {algorithm: zstd, level: 3}\n\
             streams:\n  lineitem: {target_table: lineitem, chunk_size: 122880}\n  sensors:\n    target_table: sensor_readings\n    compression: {algorithm: lz4}\n    schema_policy: evolve\n",
        )
        .unwrap();
        assert_eq!(config.db_path, PathBuf::from("./warehouse.duckdb"));
        let sensors = &config.streams["sensors"];
        assert_eq!(sensors.target_table.as_deref(), Some("sensor_readings"));
        assert_eq!(sensors.schema_policy, SchemaPolicy::Evolve);
        assert_eq!(sensors.compression.unwrap().algorithm, CompressionAlgorithm::Lz4);
        assert_eq!(config.streams["lineitem"].chunk_size, Some(122_880));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::from_yaml("port: 1\nstreams:\n  a: {target_tabel: x}\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("target_tabel"), "{message}");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn bad_table_name_is_refused() {
        let err = Config::from_yaml("streams:\n  a: {target_table: 'x\"; drop table t; --'}\n").unwrap_err();
        assert!(err.to_string().contains("streams.a.target_table"), "{err}");
    }

    #[test]
    fn level_only_for_zstd() {
        let err = Config::from_yaml("compression: {algorithm: lz4, level: 3}\n").unwrap_err();
        assert_eq!(err.to_string(), "compression.level: a level applies only to zstd (line 1)");
        let err = Config::from_yaml("compression: {algorithm: none, level: 3}\n").unwrap_err();
        assert_eq!(err.to_string(), "compression.level: a level applies only to zstd (line 1)");
    }

    #[test]
    fn zstd_takes_level_3_or_none() {
        for text in ["compression: {algorithm: zstd, level: 3}\n", "compression: {algorithm: zstd}\n"] {
            Config::from_yaml(text).unwrap();
        }
        for level in [7, 1, 22, 0] {
            let text = format!("compression: {{algorithm: zstd, level: {level}}}\n");
            let err = Config::from_yaml(&text).unwrap_err();
            assert_eq!(
                err.to_string(),
                "compression.level: Arrow IPC compresses zstd at level 3 and cannot use another level: set 3 or \
                 leave the level out (line 1)",
                "level {level}"
            );
        }
        let err = StreamsFile::from_yaml("streams:\n  a: {compression: {algorithm: zstd, level: 7}}\n").unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("streams.a.compression.level: Arrow IPC compresses zstd at level 3"), "{message}");
    }

    #[test]
    fn streams_file_round_trips_byte_for_byte() {
        let text = "streams:\n  a:\n    target_table: t\n  b:\n    chunk_size: 10\n    schema_policy: evolve\n";
        let file = StreamsFile::from_yaml(text).unwrap();
        let rendered = file.to_yaml().unwrap();
        assert_eq!(StreamsFile::from_yaml(&rendered).unwrap(), file);
        assert_eq!(rendered, file.to_yaml().unwrap());
    }

    #[test]
    fn empty_streams_file_is_valid() {
        assert_eq!(StreamsFile::from_yaml("").unwrap(), StreamsFile::default());
        assert_eq!(StreamsFile::from_yaml("streams: {}\n").unwrap(), StreamsFile::default());
    }

    #[test]
    fn flush_thresholds_parse_and_must_be_positive() {
        let config = Config::from_yaml("streams:\n  a: {flush: {rows: 500, interval_seconds: 2}}\n").unwrap();
        let flush = config.streams["a"].flush.unwrap();
        assert_eq!((flush.rows, flush.bytes, flush.interval_seconds), (500, ByteSize::gib(1), 2));
        let err = Config::from_yaml("streams:\n  a: {flush: {rows: 0}}\n").unwrap_err();
        assert!(err.to_string().contains("streams.a.flush.rows"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_and_line() {
        let text = "limits:\n  max_concurrent_loads: 0\ncompression: {algorithm: lz4, level: 3}\nstreams:\n  \
                    events:\n    chunk_size: 0\n    target_table: 'a-b'\n    \
                    compression: {algorithm: zstd, level: 7}\n  sensors.v2: {flush: {rows: 0}}\n";
        let problems: Vec<String> = Config::check_yaml(text).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "limits.max_concurrent_loads: must be at least 1 (line 2)",
                "compression.level: a level applies only to zstd (line 3)",
                "streams.events.target_table: table names are 1-128 characters of [A-Za-z0-9_], not starting with a digit (line 7)",
                "streams.events.chunk_size: must be at least 1 (line 6)",
                "streams.events.compression.level: Arrow IPC compresses zstd at level 3 and cannot use another \
                 level: set 3 or leave the level out (line 8)",
                "streams.sensors.v2.flush.rows: must be at least 1 (line 9)",
            ]
        );
        // The single-error API keeps returning the first problem.
        let first = Config::from_yaml(text).unwrap_err();
        assert!(
            matches!(&first, ConfigError::Invalid { key, line: Some(2), .. } if key == "limits.max_concurrent_loads")
        );
        let config: Config = error::parse_yaml(text).unwrap();
        assert_eq!(config.problems().len(), 6);
        assert_eq!(config.validate().unwrap_err().to_string(), "limits.max_concurrent_loads: must be at least 1");
    }

    #[test]
    fn a_parse_error_comes_alone() {
        let problems = StreamsFile::check_yaml("streams:\n  a: {chunk_size: 0}\n  b: {chunk_sise: 1}\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(matches!(&problems[0], ConfigError::Parse { message, .. } if message.contains("chunk_sise")));
        let problems = StreamsFile::check_yaml("streams:\n  a: {chunk_size: 0}\n  -b: {}\n").unwrap_err();
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("streams.-b: stream names") && problems[0].ends_with("(line 3)"));
        assert_eq!(problems[1], "streams.a.chunk_size: must be at least 1 (line 2)");
    }

    #[test]
    fn byte_sizes_accept_units() {
        let config = Config::from_yaml("limits: {memory_budget_bytes: 64MiB, max_body_bytes: 1000}\n").unwrap();
        assert_eq!(config.limits.memory_budget_bytes, Some(ByteSize::mib(64)));
        assert_eq!(config.limits.max_body_bytes, ByteSize(1000));
    }

    #[test]
    fn storage_is_a_duckdb_file_or_a_ducklake() {
        assert_eq!(Config::default().storage, StorageConfig::Duckdb);
        let text = "storage:\n  kind: ducklake\n  catalog: postgres:host=pg dbname=lake\n  data_path: /data/lake\n\
                    duckdb:\n  extension_directory: /ext\n";
        let StorageConfig::Ducklake(lake) = Config::from_yaml(text).unwrap().storage else { panic!("a lake") };
        assert!(lake.is_postgres());
        assert_eq!((lake.data_inlining_row_limit, lake.maintenance_interval_seconds), (100, 300));
        let unknown = Config::from_yaml("storage: {kind: ducklake, catalog: c, data_path: d, extra: 1}\n").unwrap_err();
        assert!(unknown.to_string().contains("extra"), "{unknown}");
        let no_extensions = Config::from_yaml("storage: {kind: ducklake, catalog: c, data_path: d}\n").unwrap_err();
        assert!(no_extensions.to_string().contains("duckdb.extension_directory"), "{no_extensions}");
        let other = Config::from_yaml("storage: {kind: sqlite}\n").unwrap_err();
        assert!(other.to_string().contains("sqlite"), "{other}");
    }

    #[test]
    fn a_journal_needs_a_path_of_its_own_with_a_postgresql_catalog_and_a_linger_time() {
        let on = Config::from_yaml("journal: {enabled: true}\n").unwrap();
        assert_eq!((on.journal.path, on.journal.linger_ms), (None, 500), "beside a DuckDB file by default");
        let lake = "storage: {kind: ducklake, catalog: 'postgres:host=pg', data_path: /lake}\n\
                    duckdb: {extension_directory: /ext}\n";
        let error = Config::from_yaml(&format!("{lake}journal: {{enabled: true}}\n")).unwrap_err().to_string();
        assert!(error.starts_with("journal.path: must be set with a PostgreSQL catalog"), "{error}");
        Config::from_yaml(&format!("{lake}journal: {{enabled: true, path: /data/journal}}\n")).unwrap();
        Config::from_yaml(&format!("{lake}journal: {{enabled: false}}\n")).unwrap();
        let error = Config::from_yaml("journal: {enabled: true, linger_ms: 0}\n").unwrap_err().to_string();
        assert!(error.starts_with("journal.linger_ms: must be at least 1"), "{error}");
    }
}
