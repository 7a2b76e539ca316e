//! Stream health: what each ingester says of its streams, in each ArrowportStream's status.
//!
//! Every [`HealthConfig::interval`], the leader asks each ingester that has routed streams for its
//! `GET /streams` (the `arrowport_api::StreamsReport`), through the Service its StatefulSet names
//! (`spec.serviceName`, and the container port named `http`), and derives for each of its routed streams
//! the `status.ingest` totals and the `Flowing` condition ([`health`], pure). It writes them with
//! server-side apply under a field manager of its own ([`HEALTH_MANAGER`]), so the route's reconcile and
//! this poller never overwrite each other's fields (`conditions` is a list map keyed by `type`).
//!
//! # Bounded writes
//!
//! A stream's health is written only when [`needs_write`] says so: at once when the `Flowing` condition's
//! status or reason changes, and for changed totals (rows, bytes, last write) at most once per
//! [`HealthConfig::write_interval`] per stream; never when nothing but a message changed. So each stream
//! costs at most one status write per poll, and a busy, healthy stream one per write interval.
//!
//! An ingester that cannot be reached (no Service, connection refused, timeout, an error answer, a body
//! that is not a streams report) gives `Flowing=Unknown` with the reason and the error in the message, the
//! last totals kept; the poller itself never fails and goes on with the next ingester.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrowport_api::StreamsReport;
use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use reqwest::StatusCode;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::crd::{ArrowportStream, ArrowportStreamStatus, FLOWING, StreamIngest};
use crate::metrics::Metrics;
use crate::plan::Ingester;
use crate::reconcile::INGESTER_LABEL;

/// The field manager of the health fields (`status.ingest`, the `Flowing` condition).
pub const HEALTH_MANAGER: &str = "arrowport-operator-health";
/// Most ingesters asked at once.
const CONCURRENCY: usize = 8;

/// How the poller runs; the operator's flags set it.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Time between two polls of every ingester.
    pub interval: Duration,
    /// A stream with no commit for this long is `Flowing=False` (`Idle`).
    pub idle_after: Duration,
    /// Changed totals of a stream are written at most once per this long.
    pub write_interval: Duration,
    /// Timeout of one `GET /streams`.
    pub timeout: Duration,
    /// The ingester's base URL; `{service}`, `{namespace}` and `{port}` are filled in from its StatefulSet.
    pub url_template: String,
    /// A file holding the bearer token sent to the ingesters (read at every poll, so a rotated token is
    /// picked up); no `Authorization` header without one.
    pub token_file: Option<PathBuf>,
}

/// The `Flowing` condition's reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowingReason {
    /// `True`: the ingester committed rows of the stream within `idle_after`.
    Receiving,
    /// `False`: the last commit is older than `idle_after`.
    Idle,
    /// `False`: the ingester serves the stream but has committed none of it since it started.
    NoWrites,
    /// `Unknown`: the ingester does not list the stream (yet): its streams ConfigMap reaches the pod up to
    /// about a minute after a change.
    RouteNotLoaded,
    /// `Unknown`: no answer, or not a streams report.
    IngesterUnreachable,
    /// `Unknown`: the ingester refused the operator (401/403): its token is missing or lacks the grant.
    IngesterRefused,
}

impl FlowingReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiving => "Receiving",
            Self::Idle => "Idle",
            Self::NoWrites => "NoWrites",
            Self::RouteNotLoaded => "RouteNotLoaded",
            Self::IngesterUnreachable => "IngesterUnreachable",
            Self::IngesterRefused => "IngesterRefused",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Self::Receiving => "True",
            Self::Idle | Self::NoWrites => "False",
            Self::RouteNotLoaded | Self::IngesterUnreachable | Self::IngesterRefused => "Unknown",
        }
    }
}

/// Why an ingester's streams report could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no address for ingester {0}: {1}")]
    NoAddress(Ingester, &'static str),
    #[error("cannot reach the ingester at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the ingester at {url} refused the operator ({status}): give the operator a token with the query grant (--ingester-token-file)"
    )]
    Refused { url: String, status: StatusCode },
    #[error("the ingester at {url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("the ingester at {url} answered no streams report: {source}")]
    Invalid {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot read the ingester token from {path}: {message}")]
    Token { path: String, message: String },
}

impl PollError {
    pub fn reason(&self) -> FlowingReason {
        match self {
            Self::Refused { .. } | Self::Token { .. } => FlowingReason::IngesterRefused,
            _ => FlowingReason::IngesterUnreachable,
        }
    }

    /// A fixed label for the polls metric.
    fn metric_label(&self) -> &'static str {
        match self.reason() {
            FlowingReason::IngesterRefused => "refused",
            _ => "unreachable",
        }
    }
}

/// Asks ingesters for their `GET /streams`.
#[derive(Clone)]
pub struct IngesterClient {
    http: reqwest::Client,
}

impl IngesterClient {
    pub fn new(timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .expect("an HTTP client without TLS always builds");
        Self { http }
    }

    /// `GET {base_url}/streams`, with `Authorization: Bearer <token>` when a token is given.
    pub async fn streams(&self, base_url: &str, token: Option<&str>) -> Result<StreamsReport, PollError> {
        let url = format!("{}/streams", base_url.trim_end_matches('/'));
        let mut request = self.http.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|source| PollError::Unreachable { url: url.clone(), source })?;
        match response.status() {
            StatusCode::OK => response.json().await.map_err(|source| PollError::Invalid { url, source }),
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(PollError::Refused { url, status }),
            status => Err(PollError::Status { url, status }),
        }
    }
}

/// An ingester's base URL from its StatefulSet: the template filled with its governing Service, namespace
/// and the container port named `http`.
pub fn ingester_url(template: &str, sts: &StatefulSet) -> Result<String, &'static str> {
    let spec = &sts.spec;
    let service = spec.service_name.as_deref().filter(|s| !s.is_empty()).ok_or("its StatefulSet names no Service")?;
    let port = spec
        .template
        .spec
        .iter()
        .flat_map(|pod| &pod.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .map(|p| p.container_port)
        .ok_or("its StatefulSet's pods have no container port named http")?;
    Ok(template
        .replace("{service}", service)
        .replace("{namespace}", &sts.namespace().unwrap_or_default())
        .replace("{port}", &port.to_string()))
}

/// What the poller writes for one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub ingest: Option<StreamIngest>,
    pub flowing: Condition,
}

impl Health {
    fn reason(&self) -> &str {
        &self.flowing.reason
    }
}

/// The stream name the ingester knows a routed stream by; `None` while the stream has no route (invalid,
/// or losing a conflict: the stream name's totals are another resource's then).
fn routed_name(stream: &ArrowportStream) -> Option<&str> {
    let status = stream.status.as_ref()?;
    status.config_map.as_ref()?;
    status.stream_name.as_deref()
}

/// The health of a routed stream, from its ingester's report (or why there is none) at `now`.
pub fn health(
    stream: &ArrowportStream,
    name: &str,
    report: &Result<StreamsReport, PollError>,
    now: Timestamp,
    idle_after: Duration,
) -> Health {
    let previous = stream.status.as_ref();
    let kept = || previous.and_then(|s| s.ingest.clone());
    let (ingest, reason, message) = match report {
        Err(error) => (kept(), error.reason(), error.to_string()),
        Ok(report) => match report.streams.iter().find(|s| s.stream == name) {
            None => (
                kept(),
                FlowingReason::RouteNotLoaded,
                format!(
                    "the ingester does not serve stream {name:?} yet (its streams ConfigMap reaches the pod up to about a minute after a change)"
                ),
            ),
            Some(found) => {
                let stats = &found.stats;
                let last_write = stats.last_write.as_deref().and_then(|t| t.parse::<Timestamp>().ok());
                let ingest = StreamIngest {
                    rows: stats.rows,
                    requests: stats.requests,
                    bytes_received: stats.bytes_received,
                    bytes_decoded: stats.bytes_decoded,
                    last_write: last_write.map(Time),
                };
                let idle = jiff_duration(idle_after);
                let (reason, message) = match last_write {
                    None => (
                        FlowingReason::NoWrites,
                        format!("the ingester has committed no rows of stream {name:?} since it started"),
                    ),
                    Some(at) if now.duration_since(at) <= idle => {
                        (FlowingReason::Receiving, format!("last commit at {at}"))
                    }
                    Some(at) => (
                        FlowingReason::Idle,
                        format!("no commit for more than {}s (last commit at {at})", idle_after.as_secs()),
                    ),
                };
                (Some(ingest), reason, message)
            }
        },
    };
    let status = reason.status();
    // The transition time moves only when the status does (the Kubernetes condition convention).
    let last_transition_time = match previous.and_then(ArrowportStreamStatus::flowing) {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let flowing = Condition {
        type_: FLOWING.to_owned(),
        status: status.to_owned(),
        reason: reason.as_str().to_owned(),
        message,
        observed_generation: stream.metadata.generation,
        last_transition_time,
    };
    Health { ingest, flowing }
}

fn jiff_duration(duration: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(duration).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

/// Whether the desired health is worth a status write: at once when the `Flowing` status or reason (or
/// the generation it describes) changed; changed totals only once `write_interval` has passed since this stream's last health write
/// (`since_last_write`, `None` when this process has not written it yet); a changed message alone never.
pub fn needs_write(
    stored: Option<&ArrowportStreamStatus>,
    desired: &Health,
    since_last_write: Option<Duration>,
    write_interval: Duration,
) -> bool {
    let old = stored.and_then(ArrowportStreamStatus::flowing);
    let key = |c: &Condition| (c.status.clone(), c.reason.clone(), c.observed_generation);
    if old.map(key) != Some(key(&desired.flowing)) {
        return true;
    }
    stored.and_then(|s| s.ingest.as_ref()) != desired.ingest.as_ref()
        && since_last_write.is_none_or(|elapsed| elapsed >= write_interval)
}

/// The poller: owns the time of each stream's last health write.
pub struct Poller {
    client: Client,
    ingesters: IngesterClient,
    config: HealthConfig,
    metrics: Metrics,
    last_writes: HashMap<ObjectRef<ArrowportStream>, Instant>,
}

impl Poller {
    pub fn new(client: Client, config: HealthConfig, metrics: Metrics) -> Self {
        let ingesters = IngesterClient::new(config.timeout);
        Self { client, ingesters, config, metrics, last_writes: HashMap::new() }
    }

    /// Polls every `interval` until dropped, once the watch caches are filled.
    pub async fn run(mut self, streams: Store<ArrowportStream>, statefulsets: Store<StatefulSet>) {
        let _ = tokio::join!(streams.wait_until_ready(), statefulsets.wait_until_ready());
        info!(interval = ?self.config.interval, "Polling the ingesters for stream health.");
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_once(&streams.state(), &statefulsets.state(), Timestamp::now()).await;
        }
    }

    /// One round: asks each ingester with routed streams, then writes the health that changed.
    pub async fn poll_once(
        &mut self,
        streams: &[Arc<ArrowportStream>],
        statefulsets: &[Arc<StatefulSet>],
        now: Timestamp,
    ) {
        let present: HashSet<_> = streams.iter().map(|s| ObjectRef::from_obj(&**s)).collect();
        self.last_writes.retain(|key, _| present.contains(key));
        let mut by_ingester: BTreeMap<Ingester, Vec<&ArrowportStream>> = BTreeMap::new();
        let mut unrouted = Vec::new();
        for stream in streams {
            if routed_name(stream).is_some() {
                by_ingester.entry(Ingester::of(stream)).or_default().push(stream);
            } else {
                unrouted.push(&**stream);
            }
        }
        let token = self.token();
        let targets: Vec<_> = by_ingester
            .keys()
            .map(|ingester| {
                let address = match &token {
                    Err((path, message)) => Err(PollError::Token { path: path.clone(), message: message.clone() }),
                    Ok(token) => self.url(ingester, statefulsets).map(|url| (url, token.clone())),
                };
                (ingester.clone(), address)
            })
            .collect();
        let client = &self.ingesters;
        let reports: Vec<(Ingester, Result<StreamsReport, PollError>)> = stream::iter(targets)
            .map(|(ingester, address)| async move {
                let report = match address {
                    Ok((url, token)) => client.streams(&url, token.as_deref()).await,
                    Err(error) => Err(error),
                };
                (ingester, report)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (ingester, report) in reports {
            let outcome = match &report {
                Ok(_) => "ok",
                Err(error) => {
                    warn!(%ingester, %error, "Cannot read the ingester's streams.");
                    error.metric_label()
                }
            };
            self.metrics.ingester_polled(outcome);
            for stream in &by_ingester[&ingester] {
                let name = routed_name(stream).unwrap_or_default();
                let desired = health(stream, name, &report, now, self.config.idle_after);
                let key = ObjectRef::from_obj(*stream);
                let since = self.last_writes.get(&key).map(Instant::elapsed);
                if needs_write(stream.status.as_ref(), &desired, since, self.config.write_interval) {
                    self.write(stream, Some(&desired)).await;
                }
            }
        }
        // A stream that lost its route (invalid, or now losing a conflict) keeps no stale health.
        for stream in unrouted {
            let status = stream.status.as_ref();
            if status.is_some_and(|s| s.ingest.is_some() || s.flowing().is_some()) {
                self.write(stream, None).await;
            }
        }
    }

    fn url(&self, ingester: &Ingester, statefulsets: &[Arc<StatefulSet>]) -> Result<String, PollError> {
        let sts = statefulsets
            .iter()
            .find(|sts| {
                sts.namespace().as_deref() == Some(&ingester.namespace)
                    && sts.labels().get(INGESTER_LABEL) == Some(&ingester.name)
            })
            .ok_or_else(|| PollError::NoAddress(ingester.clone(), "no StatefulSet carries its label"))?;
        ingester_url(&self.config.url_template, sts).map_err(|why| PollError::NoAddress(ingester.clone(), why))
    }

    /// The bearer token, read afresh; `Err((path, error message))` when the file cannot be read.
    fn token(&self) -> Result<Option<String>, (String, String)> {
        let Some(path) = &self.config.token_file else { return Ok(None) };
        std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|error| (path.display().to_string(), error.to_string()))
    }

    /// Applies the health (or, with `None`, removes it) as [`HEALTH_MANAGER`]; a failure is logged and
    /// retried at the next poll.
    async fn write(&mut self, stream: &ArrowportStream, health: Option<&Health>) {
        let status = match health {
            Some(health) => ArrowportStreamStatus {
                ingest: health.ingest.clone(),
                conditions: vec![health.flowing.clone()],
                ..ArrowportStreamStatus::default()
            },
            None => ArrowportStreamStatus::default(),
        };
        let patch = serde_json::json!({
            "apiVersion": ArrowportStream::api_version(&()),
            "kind": ArrowportStream::kind(&()),
            "status": status,
        });
        let namespace = stream.namespace().unwrap_or_default();
        let api = Api::<ArrowportStream>::namespaced(self.client.clone(), &namespace);
        match api
            .patch_status(&stream.name_any(), &PatchParams::apply(HEALTH_MANAGER).force(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                self.last_writes.insert(ObjectRef::from_obj(stream), Instant::now());
                let reason = health.map(Health::reason).unwrap_or("(removed)");
                let rows = health.and_then(|h| h.ingest.as_ref()).map(|i| i.rows);
                debug!(%namespace, stream = %stream.name_any(), flowing = reason, ?rows, "Wrote the stream's health.");
            }
            // Deleted since the watch cache saw it: nothing to report on.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                warn!(%namespace, stream = %stream.name_any(), %error, "Could not write the stream's health.")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    use arrowport_api::StreamReport;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use prometheus_client::registry::Registry;

    use crate::fixtures::{NAMESPACE, settled, timeout_after};
    use crate::reconcile::Context;

    const IDLE: Duration = Duration::from_secs(300);
    const WRITE_INTERVAL: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    /// Stream `name` as the route's reconcile left it: routed, `Ready=True`.
    fn routed(name: &str) -> ArrowportStream {
        (*settled(vec![ArrowportStream::test(name)]).streams[0]).clone()
    }

    /// The same stream after a health write of `health`.
    fn with_health(stream: &ArrowportStream, health: &Health) -> ArrowportStream {
        let mut status = stream.status.clone().unwrap_or_default();
        status.ingest.clone_from(&health.ingest);
        status.conditions.retain(|c| c.type_ != FLOWING);
        status.conditions.push(health.flowing.clone());
        stream.clone().with_status(status)
    }

    fn report(streams: Vec<(&str, u64, Option<Timestamp>)>) -> Result<StreamsReport, PollError> {
        let json = serde_json::json!({
            "generation": 1, "hash": "h", "auto_create": false,
            "compression": {"algorithm": "zstd", "level": 3},
            "streams": streams.iter().map(|(name, rows, last_write)| serde_json::json!({
                "stream": name, "table": name, "configured": true, "routable": true,
                "schema_policy": "reject", "chunk_size": null,
                "compression": {"algorithm": "zstd", "level": 3},
                "requests": 1, "rows": rows, "batches": 1, "bytes_received": 10, "bytes_decoded": 40,
                "last_write": last_write.map(|t| t.to_string()), "compression_ratio": 4.0,
            })).collect::<Vec<_>>(),
        });
        Ok(serde_json::from_value(json).expect("the JSON of GET /streams"))
    }

    fn unreachable() -> Result<StreamsReport, PollError> {
        Err(PollError::NoAddress(Ingester::new(NAMESPACE, "arrowport"), "no StatefulSet carries its label"))
    }

    fn statefulset(service: &str, port: i32) -> StatefulSet {
        let mut sts = StatefulSet::default();
        sts.metadata.name = Some("arrowport-ingester".to_owned());
        sts.metadata.namespace = Some(NAMESPACE.to_owned());
        sts.metadata.labels = Some([(INGESTER_LABEL.to_owned(), "arrowport".to_owned())].into());
        sts.spec.service_name = Some(service.to_owned());
        let ports = vec![
            ContainerPort { name: Some("other".to_owned()), container_port: 1, ..ContainerPort::default() },
            ContainerPort { name: Some("http".to_owned()), container_port: port, ..ContainerPort::default() },
        ];
        let container = Container { name: "ingester".to_owned(), ports: Some(ports), ..Container::default() };
        sts.spec.template.spec = Some(PodSpec { containers: vec![container], ..PodSpec::default() });
        sts
    }

    fn config(url_template: &str) -> HealthConfig {
        HealthConfig {
            interval: Duration::from_secs(30),
            idle_after: IDLE,
            write_interval: WRITE_INTERVAL,
            timeout: Duration::from_secs(2),
            url_template: url_template.to_owned(),
            token_file: None,
        }
    }

    #[test]
    fn wire_types_match_the_api_crate() {
        // The fixture above is the JSON the ingester writes: it must read back as its own type.
        let report = report(vec![("events", 3, Some(at(0)))]).unwrap();
        let stream: &StreamReport = &report.streams[0];
        assert_eq!((stream.stats.rows, stream.stats.bytes_decoded), (3, 40));
    }

    #[test]
    fn flowing_follows_the_last_commit() {
        let stream = routed("events");
        let recent = health(&stream, "events", &report(vec![("events", 3, Some(at(0)))]), at(299), IDLE);
        assert_eq!((recent.flowing.status.as_str(), recent.flowing.reason.as_str()), ("True", "Receiving"));
        let ingest = recent.ingest.clone().unwrap();
        assert_eq!((ingest.rows, ingest.requests, ingest.bytes_received, ingest.bytes_decoded), (3, 1, 10, 40));
        assert_eq!(ingest.last_write, Some(Time(at(0))));
        assert_eq!(recent.flowing.last_transition_time, Time(at(299)));
        assert_eq!(recent.flowing.observed_generation, Some(1));

        let idle = health(&stream, "events", &report(vec![("events", 3, Some(at(0)))]), at(301), IDLE);
        assert_eq!((idle.flowing.status.as_str(), idle.flowing.reason.as_str()), ("False", "Idle"));
        assert!(idle.flowing.message.contains("no commit for more than 300s"), "{}", idle.flowing.message);

        let never = health(&stream, "events", &report(vec![("events", 0, None)]), at(0), IDLE);
        assert_eq!((never.flowing.status.as_str(), never.flowing.reason.as_str()), ("False", "NoWrites"));
        assert_eq!(never.ingest.unwrap().last_write, None);

        let other = health(&stream, "events", &report(vec![("other", 3, Some(at(0)))]), at(0), IDLE);
        assert_eq!((other.flowing.status.as_str(), other.flowing.reason.as_str()), ("Unknown", "RouteNotLoaded"));
        assert_eq!(other.ingest, None);
    }

    #[test]
    fn an_unreachable_ingester_keeps_the_last_totals_and_says_why() {
        let seen = health(&routed("events"), "events", &report(vec![("events", 3, Some(at(0)))]), at(10), IDLE);
        let stream = with_health(&routed("events"), &seen);
        let lost = health(&stream, "events", &unreachable(), at(20), IDLE);
        assert_eq!((lost.flowing.status.as_str(), lost.flowing.reason.as_str()), ("Unknown", "IngesterUnreachable"));
        assert!(lost.flowing.message.contains("no StatefulSet carries its label"), "{}", lost.flowing.message);
        assert_eq!(lost.ingest, seen.ingest);
        assert_eq!(lost.flowing.last_transition_time, Time(at(20)));
        let refused = Err(PollError::Refused { url: "http://x/streams".to_owned(), status: StatusCode::UNAUTHORIZED });
        let refused = health(&stream, "events", &refused, at(20), IDLE);
        assert_eq!(refused.flowing.reason, "IngesterRefused");
        assert!(refused.flowing.message.contains("--ingester-token-file"), "{}", refused.flowing.message);
    }

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let stream = routed("events");
        let first = health(&stream, "events", &report(vec![("events", 3, Some(at(0)))]), at(10), IDLE);
        let stream = with_health(&stream, &first);
        let later = health(&stream, "events", &report(vec![("events", 9, Some(at(50)))]), at(60), IDLE);
        assert_eq!(later.flowing.last_transition_time, Time(at(10)));
        let idle = health(&stream, "events", &report(vec![("events", 9, Some(at(50)))]), at(600), IDLE);
        assert_eq!(idle.flowing.last_transition_time, Time(at(600)));
    }

    #[test]
    fn writes_are_bounded() {
        let stream = routed("events");
        let first = health(&stream, "events", &report(vec![("events", 3, Some(at(0)))]), at(10), IDLE);
        // Nothing written yet: write.
        assert!(needs_write(stream.status.as_ref(), &first, None, WRITE_INTERVAL));
        let stored = with_health(&stream, &first);
        let status = stored.status.as_ref();
        // Same health, also after the interval: no write.
        assert!(!needs_write(status, &first, Some(Duration::from_secs(600)), WRITE_INTERVAL));
        // More rows: written only once the write interval has passed since the last write.
        let more = health(&stored, "events", &report(vec![("events", 9, Some(at(20)))]), at(20), IDLE);
        assert!(!needs_write(status, &more, Some(Duration::from_secs(59)), WRITE_INTERVAL));
        assert!(needs_write(status, &more, Some(Duration::from_secs(60)), WRITE_INTERVAL));
        assert!(needs_write(status, &more, None, WRITE_INTERVAL));
        // The condition changes: at once.
        let lost = health(&stored, "events", &unreachable(), at(20), IDLE);
        assert!(needs_write(status, &lost, Some(Duration::ZERO), WRITE_INTERVAL));
        // Only the message changed (another error text, the same reason): no write.
        let lost_stored = with_health(&stored, &lost);
        let mut other_error = lost.clone();
        other_error.flowing.message = "cannot reach the ingester at http://x/streams: timed out".to_owned();
        assert!(!needs_write(lost_stored.status.as_ref(), &other_error, Some(Duration::ZERO), WRITE_INTERVAL));
        // A new generation of the spec: the condition says which one it describes.
        let edited = stored.clone().with_generation(2);
        let same = health(&edited, "events", &report(vec![("events", 3, Some(at(0)))]), at(10), IDLE);
        assert!(needs_write(status, &same, Some(Duration::ZERO), WRITE_INTERVAL));
    }

    #[test]
    fn the_ingester_url_comes_from_its_statefulset() {
        let sts = statefulset("arrowport-ingester", 8888);
        assert_eq!(
            ingester_url("http://{service}.{namespace}.svc:{port}", &sts).unwrap(),
            "http://arrowport-ingester.ns.svc:8888"
        );
        let mut no_service = sts.clone();
        no_service.spec.service_name = None;
        assert_eq!(ingester_url("http://{service}", &no_service), Err("its StatefulSet names no Service"));
        let mut no_port = sts;
        no_port.spec.template.spec = None;
        assert_eq!(
            ingester_url("http://{service}", &no_port),
            Err("its StatefulSet's pods have no container port named http")
        );
    }

    /// The route's reconcile ignores the poller's fields: a stream carrying health is still settled.
    #[test]
    fn the_route_reconcile_leaves_the_health_alone() {
        let stream = routed("events");
        let health = health(&stream, "events", &report(vec![("events", 3, Some(at(0)))]), at(10), IDLE);
        let plan = crate::plan::plan(&settled(vec![with_health(&stream, &health)]), at(20)).unwrap();
        assert!(!plan.streams[0].status_changed());
    }

    fn poller(ctx: &Context, url_template: &str) -> Poller {
        Poller::new(ctx.client.clone(), config(url_template), Metrics::register(&mut Registry::default()))
    }

    /// A port with nothing listening on it.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn an_unreachable_ingester_is_a_condition_written_once() {
        let (ctx, mut server) = Context::test();
        let mut poller = poller(&ctx, "http://127.0.0.1:{port}");
        let stream = Arc::new(routed("events"));
        let statefulsets = [Arc::new(statefulset("arrowport-ingester", closed_port().into()))];
        let verifier = tokio::spawn(async move {
            let status = server.health_apply("events").await;
            let flowing = status.flowing().unwrap();
            assert_eq!((flowing.status.as_str(), flowing.reason.as_str()), ("Unknown", "IngesterUnreachable"));
            assert!(flowing.message.contains("cannot reach the ingester at http://127.0.0.1:"), "{}", flowing.message);
            server
        });
        poller.poll_once(std::slice::from_ref(&stream), &statefulsets, at(0)).await;
        let server = tokio::time::timeout(Duration::from_secs(5), verifier).await.unwrap().unwrap();

        // The next poll finds the same condition stored: no write.
        let lost = health(&stream, "events", &unreachable(), at(0), IDLE);
        let stored = Arc::new(with_health(&stream, &lost));
        poller.poll_once(&[stored], &statefulsets, at(30)).await;
        drop((ctx, poller));
        timeout_after(tokio::spawn(server.done())).await;
    }

    #[tokio::test]
    async fn a_stream_that_lost_its_route_loses_its_health() {
        let (ctx, mut server) = Context::test();
        let mut poller = poller(&ctx, "http://127.0.0.1:{port}");
        let stale = health(&routed("events"), "events", &report(vec![("events", 3, Some(at(0)))]), at(0), IDLE);
        let mut conflicting = with_health(&routed("events"), &stale);
        conflicting.status.as_mut().unwrap().config_map = None;
        let verifier = tokio::spawn(async move {
            assert_eq!(server.health_apply("events").await, ArrowportStreamStatus::default());
            server.done().await;
        });
        poller.poll_once(&[Arc::new(conflicting)], &[], at(10)).await;
        drop((ctx, poller));
        timeout_after(verifier).await;
    }

    /// The `arrowport` binary of this workspace (`ARROWPORT_BIN`, else next to the test binary's
    /// directory: `cargo test --workspace` builds it).
    fn arrowport_bin() -> std::path::PathBuf {
        if let Ok(bin) = std::env::var("ARROWPORT_BIN") {
            return bin.into();
        }
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().and_then(Path::parent).unwrap().join("arrowport");
        assert!(
            bin.is_file(),
            "{} is missing: build it with `cargo build -p arrowport`, or set ARROWPORT_BIN",
            bin.display()
        );
        bin
    }

    /// `arrowport serve` on a free loopback port with a temporary database; killed on drop.
    struct RealIngester {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl RealIngester {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("streams.yaml"), "streams:\n  events:\n    target_table: events\n").unwrap();
            let mut child = Command::new(arrowport_bin())
                .args(["serve", "--host", "127.0.0.1", "--port", "0", "--db"])
                .arg(dir.path().join("db.duckdb"))
                .arg("--streams-path")
                .arg(dir.path().join("streams.yaml"))
                .current_dir(dir.path())
                .env_remove("ARROWPORT_CONFIG")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let addr = loop {
                let line = lines.next().expect("the ingester exited before listening").unwrap();
                if let Some(rest) = line.split("addr=").nth(1) {
                    break rest.split_whitespace().next().unwrap().to_owned();
                }
            };
            std::thread::spawn(move || lines.for_each(drop));
            let port = addr.rsplit(':').next().unwrap().parse().unwrap();
            Self { child, port, _dir: dir }
        }

        /// Sends `rows` rows to stream `events` with the `arrowport ingest` client (HTTP).
        fn ingest(&self, rows: usize) {
            let dir = tempfile::tempdir().unwrap();
            let csv = dir.path().join("events.csv");
            let body: String = (0..rows).map(|i| format!("{i},reading {i}\n")).collect();
            std::fs::write(&csv, format!("id,note\n{body}")).unwrap();
            let output = Command::new(arrowport_bin())
                .args(["ingest", "--server", &format!("http://127.0.0.1:{}", self.port), "events"])
                .arg(&csv)
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        }
    }

    impl Drop for RealIngester {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The poller against a real `arrowport serve`: no rows yet, then rows sent with the real client.
    #[tokio::test]
    async fn a_real_ingesters_streams_become_the_status() {
        let ingester = RealIngester::start();
        let (ctx, mut server) = Context::test();
        let mut poller = poller(&ctx, "http://127.0.0.1:{port}");
        let statefulsets = [Arc::new(statefulset("arrowport-ingester", ingester.port.into()))];
        let stream = Arc::new(routed("events"));

        let verifier = tokio::spawn(async move { (server.health_apply("events").await, server) });
        poller.poll_once(std::slice::from_ref(&stream), &statefulsets, Timestamp::now()).await;
        let (status, mut server) = tokio::time::timeout(Duration::from_secs(10), verifier).await.unwrap().unwrap();
        let flowing = status.flowing().unwrap();
        assert_eq!((flowing.status.as_str(), flowing.reason.as_str()), ("False", "NoWrites"), "{}", flowing.message);
        assert_eq!(status.ingest.as_ref().map(|i| i.rows), Some(0));
        let stream = Arc::new((*stream).clone().with_status(ArrowportStreamStatus {
            conditions: stream.status.clone().unwrap().conditions.into_iter().chain(status.conditions).collect(),
            ingest: status.ingest,
            ..stream.status.clone().unwrap()
        }));

        ingester.ingest(3);
        let verifier = tokio::spawn(async move {
            let status = server.health_apply("events").await;
            server.done().await;
            status
        });
        poller.poll_once(std::slice::from_ref(&stream), &statefulsets, Timestamp::now()).await;
        drop((ctx, poller));
        let status = tokio::time::timeout(Duration::from_secs(10), verifier).await.unwrap().unwrap();
        let flowing = status.flowing().unwrap();
        assert_eq!((flowing.status.as_str(), flowing.reason.as_str()), ("True", "Receiving"), "{}", flowing.message);
        let ingest = status.ingest.unwrap();
        assert_eq!((ingest.rows, ingest.requests), (3, 1));
        assert!(ingest.bytes_received > 0 && ingest.bytes_decoded > 0, "{ingest:?}");
        let since = Timestamp::now().duration_since(ingest.last_write.unwrap().0);
        assert!(since.as_secs() < 60, "last write {since:?} ago");
    }
}
