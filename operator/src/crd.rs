//! The `ArrowportStream` custom resource. The CRD YAML in `crds/` is generated from these types.
//!
//! Everything a person can get wrong is refused by the API server through the schema (patterns, ranges,
//! enums and CEL rules with messages); the operator re-checks with the ingester's own validation.

use arrowport_config::{CompressionAlgorithm, SchemaPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition of the route: written into the ingester's ConfigMap, and the ingester exists.
pub const READY: &str = "Ready";
/// The condition of the data: the ingester committed rows of the stream recently.
pub const FLOWING: &str = "Flowing";

/// The ingester a stream routes into when `spec.ingester` is not set.
pub const DEFAULT_INGESTER: &str = "arrowport";

/// Stream names: `arrowport_config::is_valid_stream_name` as a schema pattern.
const STREAM_NAME_PATTERN: &str = "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$";
/// Table names: `arrowport_config::is_valid_table_name` as a schema pattern.
const TABLE_NAME_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]{0,127}$";
/// Ingester names end up in a label value and in the ConfigMap name `<ingester>-streams`: a DNS-1123 label.
const INGESTER_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Declares one Arrowport stream: the name producers send to, the DuckDB table it lands in and how
/// batches are loaded. The operator renders all streams of an ingester into its `<ingester>-streams`
/// ConfigMap, which the ingest pods mount and hot-reload.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "arrowport.dev",
    version = "v1alpha1",
    kind = "ArrowportStream",
    plural = "arrowportstreams",
    namespaced,
    shortname = "aps",
    category = "arrowport",
    status = "ArrowportStreamStatus",
    derive = "PartialEq",
    doc = "An Arrowport stream: routes a named stream of Arrow data into a DuckDB table of an ingester.",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Stream", type_ = "string", json_path = ".status.streamName"),
    printcolumn(name = "Table", type_ = "string", json_path = ".status.targetTable"),
    printcolumn(name = "Ingester", type_ = "string", json_path = ".spec.ingester"),
    printcolumn(name = "Rows", type_ = "integer", json_path = ".status.ingest.rows"),
    printcolumn(name = "Last Write", type_ = "date", json_path = ".status.ingest.lastWrite"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].reason"#,
        priority = 1
    ),
    printcolumn(name = "ConfigMap", type_ = "string", json_path = ".status.configMap", priority = 1),
    printcolumn(
        name = "Flowing",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Flowing")].reason"#,
        priority = 1
    ),
    validation = Rule::new("has(self.spec.streamName) || self.metadata.name.size() <= 128")
        .message("the resource name is longer than 128 characters, so it cannot be the stream name: set spec.streamName")
)]
#[x_kube(
    validation = Rule::new("has(self.targetTable) || !has(self.streamName) || self.streamName.matches('^[A-Za-z_][A-Za-z0-9_]*$')")
        .message("streamName is not a valid table name (it has '.' or '-' or starts with a digit): set targetTable")
)]
#[serde(rename_all = "camelCase")]
pub struct ArrowportStreamSpec {
    /// The Arrowport ingester (in this namespace) the stream routes into: the StatefulSet labelled
    /// `arrowport.dev/ingester=<ingester>`. Its routes live in the ConfigMap `<ingester>-streams`.
    #[serde(default = "default_ingester")]
    #[schemars(length(min = 1, max = 63), regex(pattern = INGESTER_NAME_PATTERN))]
    pub ingester: String,

    /// The stream name producers send to (`POST /ingest/<name>`, Flight path `<name>`); defaults to the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = STREAM_NAME_PATTERN))]
    pub stream_name: Option<String>,

    /// The DuckDB table the stream lands in; defaults to the stream name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = TABLE_NAME_PATTERN))]
    pub target_table: Option<String>,

    /// Most rows handed to DuckDB in one step (larger batches are sliced); defaults to the ingester's
    /// setting (122880, one DuckDB row group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub chunk_size: Option<i64>,

    /// Compression of the Arrow data Arrowport sends for this stream; defaults to the ingester's setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<StreamCompression>,

    /// What happens to a batch with columns the table lacks: `reject` refuses it (HTTP 422), `evolve`
    /// adds the new columns.
    #[serde(default)]
    pub schema_policy: StreamSchemaPolicy,

    /// When a long Arrow Flight `DoPut` commits and acknowledges what it has received; whichever threshold
    /// is reached first. Unset fields take the ingester's defaults (10000000 rows, 1GiB, 10 seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush: Option<StreamFlush>,

    /// Names of the ingester's tokens file entries (tokens, or client certificates' common names) that may
    /// write this stream, besides any whose own `write` grants cover it. Only in force where the ingester
    /// has access control on (`auth.tokens_file`); the tokens themselves live in a Secret, never here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 128), regex(pattern = r"^[ -~]+$")))]
    pub writers: Vec<String>,
}

/// Commit thresholds for long Flight `DoPut` calls.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StreamFlush {
    /// Uncommitted rows that trigger a commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rows: Option<i64>,
    /// Uncommitted decoded bytes that trigger a commit, such as `256MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+ ?([KMGT]i?B|B)?$"))]
    pub bytes: Option<String>,
    /// Age in seconds of the oldest uncommitted batch that triggers a commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub interval_seconds: Option<i64>,
}

fn default_ingester() -> String {
    DEFAULT_INGESTER.to_owned()
}

/// Compression of Arrow IPC buffers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!has(self.level) || (self.algorithm == 'zstd' && self.level == 3)")
    .message("level may only be 3 and only with algorithm zstd (Arrow IPC compresses zstd at level 3 and \
    cannot use another level): remove it, or use algorithm zstd with level 3"))]
pub struct StreamCompression {
    /// The codec: `zstd`, `lz4` or `none`.
    pub algorithm: StreamCompressionAlgorithm,
    /// The zstd level: only 3, and only for `zstd`; left out, it is 3 too. Arrow IPC compresses zstd at
    /// level 3 and cannot use another level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
}

/// Arrow IPC buffer compression codecs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamCompressionAlgorithm {
    Zstd,
    Lz4,
    None,
}

impl From<StreamCompressionAlgorithm> for CompressionAlgorithm {
    fn from(algorithm: StreamCompressionAlgorithm) -> Self {
        match algorithm {
            StreamCompressionAlgorithm::Zstd => Self::Zstd,
            StreamCompressionAlgorithm::Lz4 => Self::Lz4,
            StreamCompressionAlgorithm::None => Self::None,
        }
    }
}

/// What to do with a batch whose columns are not all in the target table.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamSchemaPolicy {
    /// Refuse the whole request with 422, naming the offending columns.
    #[default]
    Reject,
    /// Add the new columns (nullable) in the same transaction as the data.
    Evolve,
}

impl From<StreamSchemaPolicy> for SchemaPolicy {
    fn from(policy: StreamSchemaPolicy) -> Self {
        match policy {
            StreamSchemaPolicy::Reject => Self::Reject,
            StreamSchemaPolicy::Evolve => Self::Evolve,
        }
    }
}

/// What the operator last made of the resource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArrowportStreamStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: `True` when the route is in the ingester's ConfigMap and the ingester exists; `False`
    /// with a reason (`InvalidSpec`, `ResourceConflict`, `IngesterNotFound`) and a message otherwise.
    /// `Flowing` (routed streams only): `True` (`Receiving`) while the ingester committed rows of the
    /// stream recently; `False` (`Idle`, `NoWrites`) when it did not; `Unknown` (`IngesterUnreachable`,
    /// `IngesterRefused`, `RouteNotLoaded`) when the operator cannot tell. A map keyed by `type`: the
    /// route's reconcile and the stream-health poller each own their condition (server-side apply).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The effective stream name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_name: Option<String>,
    /// The effective table, set while the route is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_table: Option<String>,
    /// The ConfigMap the route is written into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// What the ingester reports of the stream (`GET /streams`), polled by the operator; counted since
    /// the ingester process started. Kept as last seen while the ingester cannot be reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<StreamIngest>,
}

/// One stream's totals as its ingester reports them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StreamIngest {
    /// Rows committed since the ingester process started.
    pub rows: u64,
    /// Committed requests (HTTP requests, Flight `DoPut` flushes, Flight SQL ingests).
    pub requests: u64,
    /// Bytes of the committed requests as received (compressed, if they were).
    pub bytes_received: u64,
    /// Arrow bytes committed, after decoding.
    pub bytes_decoded: u64,
    /// Time of the last commit; absent before the first one since the ingester started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_write: Option<Time>,
}

impl ArrowportStreamStatus {
    /// The `Ready` condition, if the operator has set one.
    pub fn ready(&self) -> Option<&Condition> {
        self.condition(READY)
    }

    /// The `Flowing` condition, if the stream-health poller has set one.
    pub fn flowing(&self) -> Option<&Condition> {
        self.condition(FLOWING)
    }

    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// The part of the status the route's reconcile writes: without the stream-health poller's
    /// `ingest` and `Flowing`, which it leaves to the poller.
    pub fn route_part(&self) -> Self {
        let mut route = self.clone();
        route.ingest = None;
        route.conditions.retain(|c| c.type_ != FLOWING);
        route
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_names_and_subresources() {
        let crd = ArrowportStream::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("arrowportstreams.arrowport.dev"));
        let names = &crd.spec.names;
        assert_eq!(names.short_names.as_deref(), Some(&["aps".to_owned()][..]));
        assert_eq!(names.categories.as_deref(), Some(&["arrowport".to_owned()][..]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .filter(|c| c.priority.is_none())
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Stream", "Table", "Ingester", "Rows", "Last Write", "Age"]);
    }

    /// `kubectl get aps` shows ROWS and LAST WRITE from the health the poller writes.
    #[test]
    fn printer_columns_read_the_stream_health() {
        let crd = ArrowportStream::crd();
        let columns = crd.spec.versions[0].additional_printer_columns.clone().unwrap();
        let mut stream = ArrowportStream::new("s", serde_json::from_str::<ArrowportStreamSpec>("{}").unwrap());
        let last_write = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let ingest = StreamIngest { rows: 42, last_write: Some(Time(last_write)), ..StreamIngest::default() };
        stream.status = Some(ArrowportStreamStatus { ingest: Some(ingest), ..ArrowportStreamStatus::default() });
        let json = serde_json::to_value(&stream).unwrap();
        for (name, want) in [("Rows", serde_json::json!(42)), ("Last Write", serde_json::json!("2027-01-15T08:00:00Z"))]
        {
            let column = columns.iter().find(|c| c.name == name).unwrap();
            assert_eq!(json.pointer(&column.json_path.replace('.', "/")), Some(&want), "column {name}");
        }
    }

    #[test]
    fn spec_defaults_apply_when_fields_are_missing() {
        let spec: ArrowportStreamSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.ingester, DEFAULT_INGESTER);
        assert_eq!(spec.schema_policy, StreamSchemaPolicy::Reject);
        assert_eq!(spec.stream_name, None);
    }
}
