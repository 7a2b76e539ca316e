//! Arrowport's Kubernetes operator: reconciles `ArrowportStream` resources into the streams ConfigMap
//! (`<ingester>-streams`, key `streams.yaml`) that the ingest pods mount and hot-reload.

pub mod controller;
pub mod crd;
pub mod error;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
mod server;

#[cfg(test)]
mod fixtures;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, CustomResourceExt};
use prometheus_client::registry::Registry;
use tracing::info;

use crate::crd::ArrowportStream;
use crate::health::HealthConfig;
use crate::leader::{LeaderElector, LeaseError};
use crate::metrics::Metrics;
use crate::reconcile::{Context, MANAGER};

/// The committed CRD file, relative to the repository root.
pub const CRD_PATH: &str = "crds/arrowportstreams.arrowport.dev.yaml";

/// Command-line flags; each has an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "arrowport-operator", version, about)]
pub struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "ARROWPORT_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, env = "ARROWPORT_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "ARROWPORT_OPERATOR_LEASE_NAME", default_value = "arrowport-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the hostname, which is the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds between two polls of every ingester's `GET /streams` for the streams' health (0: no polling).
    #[arg(long, env = "ARROWPORT_OPERATOR_STREAM_HEALTH_INTERVAL_SECONDS", default_value_t = 30)]
    pub stream_health_interval_seconds: u64,
    /// A stream with no commit for this many seconds is `Flowing=False` (`Idle`).
    #[arg(long, env = "ARROWPORT_OPERATOR_STREAM_IDLE_AFTER_SECONDS", default_value_t = 300)]
    pub stream_idle_after_seconds: u64,
    /// A stream's changed totals (rows, bytes, last write) are written at most once per this many seconds.
    #[arg(long, env = "ARROWPORT_OPERATOR_STREAM_HEALTH_WRITE_INTERVAL_SECONDS", default_value_t = 60)]
    pub stream_health_write_interval_seconds: u64,
    /// Base URL of an ingester: `{service}`, `{namespace}` and `{port}` come from its StatefulSet (its
    /// `serviceName` and the container port named `http`).
    #[arg(long, env = "ARROWPORT_OPERATOR_INGESTER_URL", default_value = "http://{service}.{namespace}.svc:{port}")]
    pub ingester_url: String,
    /// A file holding a bearer token sent to the ingesters (`Authorization: Bearer <token>`), for ingesters
    /// that require one to read `GET /streams`; read at every poll.
    #[arg(long, env = "ARROWPORT_OPERATOR_INGESTER_TOKEN_FILE")]
    pub ingester_token_file: Option<std::path::PathBuf>,
}

impl Args {
    /// The stream-health poller's settings; `None` when polling is off.
    pub fn health(&self) -> Option<HealthConfig> {
        (self.stream_health_interval_seconds > 0).then(|| HealthConfig {
            interval: Duration::from_secs(self.stream_health_interval_seconds),
            idle_after: Duration::from_secs(self.stream_idle_after_seconds),
            write_interval: Duration::from_secs(self.stream_health_write_interval_seconds),
            // A poll never outlasts the interval, nor 10 s.
            timeout: Duration::from_secs(self.stream_health_interval_seconds.clamp(1, 10)),
            url_template: self.ingester_url.clone(),
            token_file: self.ingester_token_file.clone(),
        })
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach Kubernetes with the in-cluster or KUBECONFIG credentials: {0}")]
    Connect(#[source] kube::Error),
    #[error("the ArrowportStream CRD is not installed: install the CRD with kubectl apply -f {CRD_PATH}")]
    CrdMissing,
    #[error("cannot list ArrowportStreams (is the API server reachable, and may this ServiceAccount list them?): {0}")]
    List(#[source] kube::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election: {0}; exiting so that a restart rejoins the election")]
    Lease(#[from] LeaseError),
}

/// The CRD as YAML, exactly as committed in [`CRD_PATH`].
pub fn crd_yaml() -> String {
    serde_saphyr::to_string(&ArrowportStream::crd()).expect("the CRD serializes")
}

/// Runs the operator until `shutdown` completes (then it releases the Lease) or an error stops it.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Connect)?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::Bind { addr: args.metrics_addr, source })?;
    info!(addr = %listener.local_addr().unwrap_or(args.metrics_addr), "Serving /metrics, /healthz and /readyz.");
    let server = tokio::spawn(server::serve(listener, Arc::new(registry), ready.clone()));
    let result = lead(client, &args, metrics, &ready, shutdown).await;
    server.abort();
    result
}

async fn lead(
    client: Client,
    args: &Args,
    metrics: Metrics,
    ready: &AtomicBool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    check_crd(&client, args.namespace.as_deref()).await?;
    ready.store(true, Ordering::Relaxed);

    let identity = args.identity.clone().unwrap_or_else(hostname);
    let elector = LeaderElector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity);
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: MANAGER.to_owned(), instance: Some(identity.clone()) });
    let ctx = Context { client: client.clone(), recorder, metrics: metrics.clone() };
    let namespace = args.namespace.as_deref();
    info!(namespace = namespace.unwrap_or("(all)"), %identity, "Starting.");

    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        acquired = elector.acquire() => acquired?,
        () = &mut shutdown => return Ok(()),
    }
    metrics.set_leader(true);
    let result = tokio::select! {
        () = controller::run(client, namespace, ctx, args.health()) => Ok(()),
        lost = elector.hold() => Err(RunError::Lease(lost)),
        () = &mut shutdown => {
            info!("Shutting down.");
            elector.release().await;
            Ok(())
        }
    };
    metrics.set_leader(false);
    result
}

/// Fails early, with the fix in the message, when the CRD is missing.
async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<(), RunError> {
    let api: Api<ArrowportStream> = match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(RunError::CrdMissing),
        Err(error) => Err(RunError::List(error)),
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("arrowport-operator-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../../crds/arrowportstreams.arrowport.dev.yaml");
        assert!(
            committed == super::crd_yaml(),
            "crds/ is stale: run `cargo run -q -p arrowport-operator --bin crdgen > {}`",
            super::CRD_PATH
        );
    }

    #[tokio::test]
    async fn missing_crd_is_a_clear_startup_failure() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a list request");
            assert_eq!(
                request.uri().to_string(),
                "/apis/arrowport.dev/v1alpha1/namespaces/data/arrowportstreams?&limit=1"
            );
            let status = kube::core::Status::failure("the server could not find the requested resource", "NotFound")
                .with_code(404);
            send.send_response(
                http::Response::builder().status(404).body(serde_json::to_vec(&status).unwrap().into()).unwrap(),
            );
        });
        let error = super::check_crd(&kube::Client::new(service, "default"), Some("data")).await.unwrap_err();
        server.await.unwrap();
        assert!(
            error
                .to_string()
                .contains("install the CRD with kubectl apply -f crds/arrowportstreams.arrowport.dev.yaml"),
            "{error}"
        );
    }

    #[test]
    fn examples_are_valid_streams() {
        for yaml in
            [include_str!("../../deploy/examples/lineitem.yaml"), include_str!("../../deploy/examples/sensors.yaml")]
        {
            let stream: super::crd::ArrowportStream = serde_saphyr::from_str(yaml).unwrap();
            super::plan::effective_route(&stream).unwrap();
        }
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        use clap::Parser;
        let args = super::Args::try_parse_from(["arrowport-operator"]).unwrap();
        assert_eq!(args.metrics_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(args.lease_name, "arrowport-operator");
        let health = args.health().unwrap();
        assert_eq!(health.interval.as_secs(), 30);
        assert_eq!(health.idle_after.as_secs(), 300);
        assert_eq!(health.write_interval.as_secs(), 60);
        assert_eq!(health.url_template, "http://{service}.{namespace}.svc:{port}");
        assert_eq!(health.token_file, None);
        let off = super::Args::try_parse_from(["arrowport-operator", "--stream-health-interval-seconds", "0"]).unwrap();
        assert!(off.health().is_none());
        let args = super::Args::try_parse_from(["arrowport-operator", "--namespace", "data"]).unwrap();
        assert_eq!(args.namespace.as_deref(), Some("data"));
    }
}
