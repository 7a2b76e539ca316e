//! Pure reconcile logic: what the ConfigMap of one ingester should hold and what each stream's status
//! should say, given the resources the operator sees. No API calls here, so it is tested directly.

use std::collections::{BTreeMap, btree_map::Entry};
use std::fmt;
use std::sync::Arc;

use arrowport_config::{
    ByteSize, Compression, FlushPolicy, StreamConfig, StreamsFile, is_valid_stream_name, is_valid_table_name,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{ArrowportStream, ArrowportStreamStatus, READY, StreamFlush};

/// The key of the ConfigMap that holds the streams file.
pub const STREAMS_KEY: &str = "streams.yaml";

/// One ingester of one namespace: the unit the operator reconciles, since all its streams share a ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ingester {
    pub namespace: String,
    pub name: String,
}

impl Ingester {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The ingester a stream routes into.
    pub fn of(stream: &ArrowportStream) -> Self {
        Self::new(stream.namespace().unwrap_or_default(), &stream.spec.ingester)
    }

    /// The ConfigMap the ingester's pods mount: `<ingester>-streams`.
    pub fn config_map_name(&self) -> String {
        format!("{}-streams", self.name)
    }

    /// Ingester names end up in a label value and a ConfigMap name: a DNS-1123 label (the CRD schema
    /// enforces it; this guards resources created before the schema was installed).
    fn has_valid_name(&self) -> bool {
        let bytes = self.name.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    }
}

impl fmt::Display for Ingester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a stream is not `Ready`; the variant names are the condition reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Accepted,
    InvalidSpec,
    ResourceConflict,
    IngesterNotFound,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::InvalidSpec => "InvalidSpec",
            Self::ResourceConflict => "ResourceConflict",
            Self::IngesterNotFound => "IngesterNotFound",
        }
    }
}

/// What the operator sees of one ingester.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub ingester: Ingester,
    /// The ArrowportStreams of the namespace naming this ingester.
    pub streams: Vec<Arc<ArrowportStream>>,
    /// The current `streams.yaml` of the ConfigMap and whether it carries the operator's labels;
    /// `None` if the ConfigMap does not exist.
    pub config_map: Option<ConfigMapState>,
    /// Whether a StatefulSet labelled `arrowport.dev/ingester=<name>` exists in the namespace.
    pub ingester_found: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapState {
    pub streams_yaml: Option<String>,
    pub labelled: bool,
}

/// What one stream should look like after the reconcile.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutcome {
    pub stream: Arc<ArrowportStream>,
    pub reason: Reason,
    pub status: ArrowportStreamStatus,
}

impl StreamOutcome {
    /// The status differs from the one stored, so it must be written. Only the route's part counts:
    /// the stream-health poller's `ingest` and `Flowing` are its own (another field manager).
    pub fn status_changed(&self) -> bool {
        self.stream.status.as_ref().map(ArrowportStreamStatus::route_part).as_ref() != Some(&self.status)
    }

    /// The `Ready` reason differs from the stored one: worth an Event.
    pub fn reason_changed(&self) -> bool {
        let old = self.stream.status.as_ref().and_then(|s| s.ready()).map(|c| c.reason.as_str());
        old != Some(self.reason.as_str())
    }
}

/// The whole reconcile of one ingester.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The streams file to write, or `None` to leave the ConfigMap alone (it is already right, or the
    /// ingester name cannot name a ConfigMap).
    pub write_streams_yaml: Option<String>,
    /// One per stream, ordered by namespace/name.
    pub streams: Vec<StreamOutcome>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot render the streams file: {0}")]
pub struct RenderError(#[from] arrowport_config::ConfigError);

/// Decides the ConfigMap content and every stream's status for one ingester.
pub fn plan(snapshot: &Snapshot, now: Timestamp) -> Result<Plan, RenderError> {
    let ingester = &snapshot.ingester;
    let mut streams = snapshot.streams.clone();
    // Oldest first, so the first claim on a stream name is the winning one.
    streams.sort_by_cached_key(|s| (s.creation_timestamp(), s.namespace(), s.name_any()));

    let mut routes: BTreeMap<String, (StreamConfig, String)> = BTreeMap::new();
    let mut verdicts = Vec::with_capacity(streams.len());
    for stream in streams {
        let verdict = if !ingester.has_valid_name() {
            Verdict::Invalid(format!(
                "spec.ingester {:?} is not a valid ingester name (a DNS label: lowercase letters, digits and '-')",
                ingester.name
            ))
        } else {
            match effective_route(&stream) {
                Err(message) => Verdict::Invalid(message),
                Ok((name, config)) => match routes.entry(name.clone()) {
                    Entry::Vacant(slot) => {
                        let table = config.target_table.clone().unwrap_or_default();
                        slot.insert((config, full_name(&stream)));
                        Verdict::Routed { name, table }
                    }
                    Entry::Occupied(winner) => Verdict::Conflict { name, winner: winner.get().1.clone() },
                },
            }
        };
        verdicts.push((stream, verdict));
    }

    let file = StreamsFile { streams: routes.into_iter().map(|(name, (config, _))| (name, config)).collect() };
    let yaml = file.to_yaml()?;
    let write_streams_yaml = match &snapshot.config_map {
        _ if !ingester.has_valid_name() => None,
        Some(current) if current.labelled && current.streams_yaml.as_deref() == Some(yaml.as_str()) => None,
        _ => Some(yaml),
    };

    let mut outcomes: Vec<StreamOutcome> =
        verdicts.into_iter().map(|(stream, verdict)| outcome(stream, verdict, snapshot, now)).collect();
    outcomes.sort_by_cached_key(|o| (o.stream.namespace(), o.stream.name_any()));
    Ok(Plan { write_streams_yaml, streams: outcomes })
}

enum Verdict {
    Routed { name: String, table: String },
    Conflict { name: String, winner: String },
    Invalid(String),
}

fn full_name(stream: &ArrowportStream) -> String {
    format!("{}/{}", stream.namespace().unwrap_or_default(), stream.name_any())
}

/// The spec's flush thresholds over the ingester's defaults.
fn flush_policy(flush: &StreamFlush) -> Result<FlushPolicy, String> {
    let mut policy = FlushPolicy::default();
    let positive = |field: &str, n: i64| {
        u64::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| format!("spec.flush.{field} {n} must be at least 1"))
    };
    if let Some(rows) = flush.rows {
        policy.rows = positive("rows", rows)?;
    }
    if let Some(bytes) = &flush.bytes {
        policy.bytes = ByteSize::parse(bytes)
            .filter(|b| b.0 >= 1)
            .ok_or_else(|| format!("spec.flush.bytes {bytes:?} is not a byte size such as 256MiB"))?;
    }
    if let Some(seconds) = flush.interval_seconds {
        policy.interval_seconds = positive("intervalSeconds", seconds)?;
    }
    Ok(policy)
}

/// The stream name and the ingester's config for a resource, or why the resource cannot be routed.
/// The table is always written out, so the file says exactly what the status reports.
pub fn effective_route(stream: &ArrowportStream) -> Result<(String, StreamConfig), String> {
    let spec = &stream.spec;
    let name = match &spec.stream_name {
        Some(name) if !is_valid_stream_name(name) => {
            return Err(format!(
                "spec.streamName {name:?} is not a valid stream name (1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-')"
            ));
        }
        Some(name) => name.clone(),
        None if !is_valid_stream_name(&stream.name_any()) => {
            return Err(
                "the resource name is not a valid stream name (longer than 128 characters): set spec.streamName"
                    .to_owned(),
            );
        }
        None => stream.name_any(),
    };
    let table = match &spec.target_table {
        Some(table) if !is_valid_table_name(table) => {
            return Err(format!(
                "spec.targetTable {table:?} is not a valid table name (1-128 characters of [A-Za-z0-9_], not starting with a digit)"
            ));
        }
        Some(table) => table.clone(),
        None if !is_valid_table_name(&name) => {
            return Err(format!(
                "the stream name {name:?} is not a valid table name (it has '.' or '-' or starts with a digit): set spec.targetTable"
            ));
        }
        None => name.clone(),
    };
    let chunk_size = match spec.chunk_size {
        Some(n) => Some(
            usize::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("spec.chunkSize {n} must be at least 1"))?,
        ),
        None => None,
    };
    let compression = spec.compression.map(|c| Compression { algorithm: c.algorithm.into(), level: c.level });
    let flush = spec.flush.as_ref().map(flush_policy).transpose()?;
    let config = StreamConfig {
        target_table: Some(table),
        chunk_size,
        compression,
        schema_policy: spec.schema_policy.into(),
        flush,
        writers: spec.writers.clone(),
    };
    // The final word is the ingester's own parser: the route must survive a round trip through it.
    let file = StreamsFile { streams: BTreeMap::from([(name.clone(), config.clone())]) };
    file.to_yaml()
        .and_then(|yaml| StreamsFile::from_yaml(&yaml))
        .map_err(|e| format!("the ingester would refuse this stream: {e}"))?;
    Ok((name, config))
}

fn outcome(stream: Arc<ArrowportStream>, verdict: Verdict, snapshot: &Snapshot, now: Timestamp) -> StreamOutcome {
    let ingester = &snapshot.ingester;
    let config_map = ingester.config_map_name();
    let mut status = ArrowportStreamStatus { observed_generation: stream.metadata.generation, ..Default::default() };
    let (reason, message) = match verdict {
        Verdict::Invalid(message) => (Reason::InvalidSpec, message),
        Verdict::Conflict { name, winner } => {
            status.stream_name = Some(name.clone());
            let message = format!(
                "stream {name:?} of ingester {} is managed by {winner}, the oldest resource claiming it",
                ingester.name
            );
            (Reason::ResourceConflict, message)
        }
        Verdict::Routed { name, table } => {
            let routed = format!("stream {name:?} routes into table {table:?} through ConfigMap {config_map}");
            status.stream_name = Some(name);
            status.target_table = Some(table);
            status.config_map = Some(config_map.clone());
            if snapshot.ingester_found {
                (Reason::Accepted, routed)
            } else {
                let message = format!(
                    "no StatefulSet labelled arrowport.dev/ingester={} in namespace {}; {routed}, which applies once the ingester runs",
                    ingester.name, ingester.namespace
                );
                (Reason::IngesterNotFound, message)
            }
        }
    };
    let ready = if reason == Reason::Accepted { "True" } else { "False" };
    let previous = stream.status.as_ref().and_then(|s| s.ready());
    // The transition time moves only when the status does (the Kubernetes condition convention).
    let last_transition_time = match previous {
        Some(old) if old.status == ready => old.last_transition_time.clone(),
        _ => Time(now),
    };
    status.conditions = vec![Condition {
        type_: READY.to_owned(),
        status: ready.to_owned(),
        reason: reason.as_str().to_owned(),
        message,
        observed_generation: stream.metadata.generation,
        last_transition_time,
    }];
    StreamOutcome { stream, reason, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{StreamCompressionAlgorithm, StreamSchemaPolicy};
    use arrowport_config::{CompressionAlgorithm, SchemaPolicy};

    fn snapshot(streams: Vec<ArrowportStream>) -> Snapshot {
        Snapshot {
            ingester: Ingester::new("ns", "arrowport"),
            streams: streams.into_iter().map(Arc::new).collect(),
            config_map: None,
            ingester_found: true,
        }
    }

    fn reasons(plan: &Plan) -> Vec<(String, Reason)> {
        plan.streams.iter().map(|o| (o.stream.name_any(), o.reason)).collect()
    }

    fn rendered(plan: &Plan) -> StreamsFile {
        StreamsFile::from_yaml(plan.write_streams_yaml.as_deref().expect("a ConfigMap write")).unwrap()
    }

    #[test]
    fn full_spec_renders_what_the_ingester_parses() {
        let stream = ArrowportStream::test("sensors")
            .with_stream_name("sensors.v2")
            .with_table("sensor_readings")
            .with_chunk_size(4096)
            .with_compression(StreamCompressionAlgorithm::Zstd, Some(3))
            .with_schema_policy(StreamSchemaPolicy::Evolve)
            .with_writers(&["sensor-gateway", "CN with spaces"]);
        let plan = plan(&snapshot(vec![stream]), Timestamp::UNIX_EPOCH).unwrap();
        let file = rendered(&plan);
        let config = &file.streams["sensors.v2"];
        assert_eq!(config.writers, ["sensor-gateway", "CN with spaces"]);
        assert_eq!(config.target_table.as_deref(), Some("sensor_readings"));
        assert_eq!(config.chunk_size, Some(4096));
        assert_eq!(config.compression, Some(Compression { algorithm: CompressionAlgorithm::Zstd, level: Some(3) }));
        assert_eq!(config.schema_policy, SchemaPolicy::Evolve);
        let status = &plan.streams[0].status;
        assert_eq!(status.stream_name.as_deref(), Some("sensors.v2"));
        assert_eq!(status.target_table.as_deref(), Some("sensor_readings"));
        assert_eq!(status.config_map.as_deref(), Some("arrowport-streams"));
        assert_eq!(status.ready().unwrap().status, "True");
    }

    #[test]
    fn flush_thresholds_fill_in_the_ingester_defaults() {
        let mut stream = ArrowportStream::test("sensors");
        stream.spec.flush = Some(StreamFlush { rows: Some(5000), bytes: Some("64MiB".into()), interval_seconds: None });
        let accepted = plan(&snapshot(vec![stream.clone()]), Timestamp::UNIX_EPOCH).unwrap();
        let flush = rendered(&accepted).streams["sensors"].flush.unwrap();
        assert_eq!((flush.rows, flush.bytes, flush.interval_seconds), (5000, ByteSize::mib(64), 10));
        stream.spec.flush = Some(StreamFlush { bytes: Some("lots".into()), ..StreamFlush::default() });
        let refused = plan(&snapshot(vec![stream]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(reasons(&refused), [("sensors".into(), Reason::InvalidSpec)]);
    }

    #[test]
    fn defaults_come_from_the_resource_name() {
        let plan = plan(&snapshot(vec![ArrowportStream::test("lineitem")]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(plan.write_streams_yaml.as_deref(), Some("streams:\n  lineitem:\n    target_table: lineitem\n"));
    }

    #[test]
    fn output_is_byte_identical_whatever_the_order() {
        let a = ArrowportStream::test("a").with_table("t_a").created_at(1);
        let b = ArrowportStream::test("b").with_chunk_size(10).created_at(2);
        let c = ArrowportStream::test("c").with_schema_policy(StreamSchemaPolicy::Evolve).created_at(3);
        let one = plan(&snapshot(vec![a.clone(), b.clone(), c.clone()]), Timestamp::UNIX_EPOCH).unwrap();
        let two = plan(&snapshot(vec![c, a, b]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(one, two);
        assert_eq!(rendered(&one).streams.len(), 3);
    }

    #[test]
    fn no_streams_is_a_valid_empty_file() {
        let plan = plan(&snapshot(vec![]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(rendered(&plan), StreamsFile::default());
    }

    #[test]
    fn unchanged_config_map_is_not_rewritten() {
        let mut snap = snapshot(vec![ArrowportStream::test("lineitem")]);
        let yaml = plan(&snap, Timestamp::UNIX_EPOCH).unwrap().write_streams_yaml.unwrap();
        snap.config_map = Some(ConfigMapState { streams_yaml: Some(yaml.clone()), labelled: true });
        assert_eq!(plan(&snap, Timestamp::UNIX_EPOCH).unwrap().write_streams_yaml, None);
        // Same data but the labels were removed by hand: write again so the watch sees it.
        snap.config_map = Some(ConfigMapState { streams_yaml: Some(yaml.clone()), labelled: false });
        assert_eq!(plan(&snap, Timestamp::UNIX_EPOCH).unwrap().write_streams_yaml, Some(yaml));
    }

    #[test]
    fn oldest_claim_wins_and_the_other_names_it() {
        let old = ArrowportStream::test("old").with_stream_name("events").with_table("old_t").created_at(10);
        let new = ArrowportStream::test("new").with_stream_name("events").with_table("new_t").created_at(20);
        let plan = plan(&snapshot(vec![new, old]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(reasons(&plan), [("new".into(), Reason::ResourceConflict), ("old".into(), Reason::Accepted)]);
        assert_eq!(rendered(&plan).streams["events"].target_table.as_deref(), Some("old_t"));
        let loser = &plan.streams[0].status;
        let condition = loser.ready().unwrap();
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "ResourceConflict"));
        assert!(condition.message.contains("managed by ns/old"), "{}", condition.message);
        assert_eq!(loser.target_table, None);
        assert_eq!(loser.config_map, None);
    }

    #[test]
    fn equal_creation_times_fall_back_to_the_name() {
        let b = ArrowportStream::test("b").with_stream_name("s").created_at(5);
        let a = ArrowportStream::test("a").with_stream_name("s").created_at(5);
        let plan = plan(&snapshot(vec![b, a]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(reasons(&plan), [("a".into(), Reason::Accepted), ("b".into(), Reason::ResourceConflict)]);
    }

    #[test]
    fn loser_takes_over_when_the_winner_is_gone() {
        let loser = ArrowportStream::test("new").with_stream_name("events").with_table("new_t").created_at(20);
        let plan = plan(&snapshot(vec![loser]), Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(reasons(&plan), [("new".into(), Reason::Accepted)]);
        assert_eq!(rendered(&plan).streams["events"].target_table.as_deref(), Some("new_t"));
    }

    #[test]
    fn invalid_specs_are_explained_and_left_out() {
        let cases = [
            (ArrowportStream::test("sensors-v2"), "set spec.targetTable"),
            (ArrowportStream::test("x").with_table("9lives"), "spec.targetTable \"9lives\""),
            (ArrowportStream::test("y").with_stream_name(".hidden"), "spec.streamName \".hidden\""),
            (ArrowportStream::test("z").with_chunk_size(0), "spec.chunkSize 0"),
            (
                ArrowportStream::test("w").with_compression(StreamCompressionAlgorithm::Lz4, Some(3)),
                "a level applies only to zstd",
            ),
            (
                ArrowportStream::test("v").with_compression(StreamCompressionAlgorithm::Zstd, Some(7)),
                "Arrow IPC compresses zstd at level 3 and cannot use another level",
            ),
        ];
        for (stream, expected) in cases {
            let plan = plan(&snapshot(vec![stream]), Timestamp::UNIX_EPOCH).unwrap();
            let outcome = &plan.streams[0];
            assert_eq!(outcome.reason, Reason::InvalidSpec);
            let message = &outcome.status.ready().unwrap().message;
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
            assert_eq!(rendered(&plan), StreamsFile::default());
        }
    }

    #[test]
    fn invalid_ingester_name_writes_nothing() {
        let mut snap = snapshot(vec![ArrowportStream::test("a").with_ingester("Bad_Name")]);
        snap.ingester = Ingester::new("ns", "Bad_Name");
        let plan = plan(&snap, Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(plan.write_streams_yaml, None);
        assert_eq!(plan.streams[0].reason, Reason::InvalidSpec);
    }

    #[test]
    fn missing_ingester_still_writes_the_route() {
        let mut snap = snapshot(vec![ArrowportStream::test("lineitem")]);
        snap.ingester_found = false;
        let plan = plan(&snap, Timestamp::UNIX_EPOCH).unwrap();
        assert!(rendered(&plan).streams.contains_key("lineitem"));
        let condition = plan.streams[0].status.ready().unwrap().clone();
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "IngesterNotFound"));
        assert!(condition.message.contains("arrowport.dev/ingester=arrowport"), "{}", condition.message);
    }

    #[test]
    fn unchanged_status_is_not_rewritten_and_keeps_its_transition_time() {
        let stream = ArrowportStream::test("lineitem").with_generation(3);
        let first = plan(&snapshot(vec![stream.clone()]), Timestamp::UNIX_EPOCH).unwrap();
        assert!(first.streams[0].status_changed() && first.streams[0].reason_changed());
        assert_eq!(first.streams[0].status.observed_generation, Some(3));

        let stored = stream.with_status(first.streams[0].status.clone());
        let later = Timestamp::from_second(1_000).unwrap();
        let second = plan(&snapshot(vec![stored.clone()]), later).unwrap();
        assert!(!second.streams[0].status_changed() && !second.streams[0].reason_changed());

        // A new generation is recorded even though the route is the same.
        let edited = stored.with_generation(4);
        let third = plan(&snapshot(vec![edited]), later).unwrap();
        assert!(third.streams[0].status_changed() && !third.streams[0].reason_changed());
        assert_eq!(third.streams[0].status.ready().unwrap().last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }

    #[test]
    fn compression_without_level_is_rendered_without_one() {
        let stream = ArrowportStream::test("s").with_compression(StreamCompressionAlgorithm::None, None);
        let plan = plan(&snapshot(vec![stream]), Timestamp::UNIX_EPOCH).unwrap();
        let config = &rendered(&plan).streams["s"];
        assert_eq!(config.compression, Some(Compression { algorithm: CompressionAlgorithm::None, level: None }));
    }
}
