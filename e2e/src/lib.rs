//! Harness for the operator's end-to-end tests: reach the cluster `KUBECONFIG` names (or skip), install
//! the committed CRD, make a throwaway namespace, get an operator (in this process, or the Helm chart's
//! with `ARROWPORT_E2E_INSTALL=helm`), apply resources and wait on their state, never on a fixed sleep.

use std::fmt::Debug;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrowport_config::StreamsFile;
use arrowport_operator::crd::ArrowportStream;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::process::Command;

/// The files the suite applies, exactly as a user would.
pub const CRD_YAML: &str = include_str!("../../crds/arrowportstreams.arrowport.dev.yaml");
pub const LINEITEM_YAML: &str = include_str!("../../deploy/examples/lineitem.yaml");
pub const SENSORS_YAML: &str = include_str!("../../deploy/examples/sensors.yaml");

/// Field manager of what the suite itself writes.
const MANAGER: &str = "arrowport-e2e";
/// How long to wait for the operator to act; it normally takes well under a second.
const WAIT: Duration = Duration::from_secs(60);
/// How long a cluster gets to answer before the suite skips.
const CONNECT: Duration = Duration::from_secs(3);

/// A client for the cluster `KUBECONFIG` (or in-cluster credentials) names, or why the suite skips.
pub async fn cluster() -> Result<Client, String> {
    connect().await.map_err(|reason| {
        format!(
            "no Kubernetes cluster reachable ({reason}). \
             Point KUBECONFIG at a test cluster (kind, k3d, ...) to run it."
        )
    })
}

async fn connect() -> Result<Client, String> {
    let client = tokio::time::timeout(CONNECT, Client::try_default())
        .await
        .map_err(|_| "timed out reading the credentials".to_owned())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(CONNECT, client.apiserver_version())
        .await
        .map_err(|_| format!("the API server did not answer within {CONNECT:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(client)
}

/// Says loudly that the suite did not run: a silent skip would look like a pass.
pub fn skip(reason: &str) {
    say(&format!("SKIPPED arrowport e2e: {reason}"));
}

/// Written straight to stderr: the test harness captures `println!` and `eprintln!` of passing tests.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Installs (or updates) the committed CRD and waits until the API server serves it.
pub async fn install_crd(client: &Client) {
    let crd: CustomResourceDefinition = serde_saphyr::from_str(CRD_YAML).expect("the committed CRD parses");
    let name = crd.name_any();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    apply(&crds, &crd).await;
    tokio::time::timeout(WAIT, await_condition(crds, &name, conditions::is_crd_established()))
        .await
        .expect("the CRD was not established in time")
        .expect("watching the CRD failed");
}

/// A namespace of its own for one run, deleted by [`TestNamespace::delete`].
pub struct TestNamespace {
    client: Client,
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let name = format!("arrowport-e2e-{nanos:x}");
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(name.clone());
        apply(&Api::<Namespace>::all(client.clone()), &namespace).await;
        Self { client: client.clone(), name }
    }

    pub async fn delete(self) {
        let namespaces: Api<Namespace> = Api::all(self.client);
        if let Err(error) = namespaces.delete(&self.name, &DeleteParams::default()).await {
            say(&format!("could not delete namespace {}: {error}", self.name));
        }
    }
}

/// Where the operator under test runs, chosen by `ARROWPORT_E2E_INSTALL`.
pub enum Install {
    /// Unset: in this process, with a stand-in ingester the scenario brings.
    InProcess,
    /// `helm`: the operator and a real ingester from the Helm chart, installed with the `helm` binary.
    Chart(Helm),
}

impl Install {
    /// The install asked for, or why the suite skips (no runnable `helm`). Panics on a bad setting.
    pub async fn from_env() -> Result<Self, String> {
        match std::env::var("ARROWPORT_E2E_INSTALL").unwrap_or_default().as_str() {
            "" => Ok(Self::InProcess),
            "helm" => Helm::from_env().await.map(Self::Chart),
            other => panic!(
                "ARROWPORT_E2E_INSTALL={other:?}: set it to `helm`, or leave it unset to run the operator in-process"
            ),
        }
    }
}

/// The chart in this checkout, installed as the release `arrowport`: the chart names the main ingester
/// after the release and an ArrowportStream routes to the ingester `arrowport` by default, so the
/// scenarios find the ingester and its ConfigMap `arrowport-streams` as in-process.
/// Found at run time (cargo sets `CARGO_MANIFEST_DIR` for tests): a build reused from another checkout's
/// cache must install this checkout's chart.
fn chart_dir() -> std::path::PathBuf {
    std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo test")).join("../helm/arrowport")
}
const RELEASE: &str = "arrowport";

/// The `helm` binary (`ARROWPORT_E2E_HELM`, default `helm` on `PATH`) and the images the chart runs: the
/// chart's `image.registry` (`ARROWPORT_E2E_IMAGE_REGISTRY`, default empty: the bare names `kind load`
/// gives local builds) and `image.tag` (`ARROWPORT_E2E_IMAGE_TAG`), under which the cluster pulls
/// `arrowport-operator` and `arrowport`.
pub struct Helm {
    binary: PathBuf,
    version: String,
    registry: String,
    tag: String,
}

impl Helm {
    async fn from_env() -> Result<Self, String> {
        let binary = std::env::var_os("ARROWPORT_E2E_HELM").map_or_else(|| PathBuf::from("helm"), PathBuf::from);
        let version = run_helm(&binary, &["version", "--short"]).await.map_err(|error| {
            format!(
                "{error}. Put Helm 3.8+ on PATH or set ARROWPORT_E2E_HELM, e.g. to \
                 $HOME/.cache/arrowport-tools/bin/helm, where .ci/helm-checks installs it."
            )
        })?;
        let registry = std::env::var("ARROWPORT_E2E_IMAGE_REGISTRY").unwrap_or_default();
        let tag = std::env::var("ARROWPORT_E2E_IMAGE_TAG").unwrap_or_default();
        if tag.is_empty() {
            panic!(
                "ARROWPORT_E2E_INSTALL=helm needs ARROWPORT_E2E_IMAGE_TAG=<tag> (and ARROWPORT_E2E_IMAGE_REGISTRY unless \
                 the cluster has the bare names): the images arrowport-operator:<tag> and arrowport:<tag> of this \
                 checkout, which the cluster can pull (e.g. after `kind load docker-image arrowport-operator:e2e \
                 arrowport:e2e`). ARROWPORT_E2E_IMAGE, for the former single image, is no longer read"
            )
        }
        Ok(Self { binary, version, registry: registry.trim_end_matches('/').to_owned(), tag })
    }

    /// `helm install --wait`: returns once the operator Deployment and the ingester StatefulSet are ready.
    /// The namespace exists already ([`TestNamespace`]), and so does the CRD ([`install_crd`], the same
    /// file as the chart's copy, which `.ci/helm-checks` checks): unlike Helm, it updates a CRD left
    /// from an older run.
    pub async fn install(&self, namespace: &str) -> Result<(), String> {
        say(&format!(
            "helm {}: installing {RELEASE} into {namespace} with the images of registry {:?}, tag {}",
            self.version, self.registry, self.tag
        ));
        // --set-string: with --set, a tag such as `2` would become a number, which the values schema refuses.
        let image = format!("image.registry={},image.tag={}", self.registry, self.tag);
        let chart = chart_dir().to_string_lossy().into_owned();
        let args =
            ["install", RELEASE, &chart, "--namespace", namespace, "--skip-crds", "--wait", "--set-string", &image];
        run_helm(&self.binary, &args).await.map(drop)
    }

    /// Best effort, also after a failure: the release's ClusterRole and binding would outlive the namespace.
    pub async fn uninstall(&self, namespace: &str) {
        if let Err(error) = run_helm(&self.binary, &["uninstall", RELEASE, "--namespace", namespace]).await {
            say(&format!("could not uninstall release {RELEASE} from {namespace}: {error}"));
        }
    }
}

/// Runs `helm` with `args`; its stdout, or what went wrong with its stderr.
async fn run_helm(binary: &Path, args: &[&str]) -> Result<String, String> {
    let output = Command::new(binary)
        .args(args)
        .output()
        .await
        .map_err(|error| format!("cannot run helm binary {}: {error}", binary.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("`helm {}` failed ({}): {}", args.join(" "), output.status, stderr.trim()));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Server-side apply, as `kubectl apply --server-side` would.
pub async fn apply<K>(api: &Api<K>, object: &K) -> K
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.clone().expect("a named object");
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(object))
        .await
        .unwrap_or_else(|e| panic!("applying {name}: {e}"))
}

/// An example resource from `deploy/examples/`.
pub fn example(yaml: &str) -> ArrowportStream {
    serde_saphyr::from_str(yaml).expect("the example parses as an ArrowportStream")
}

/// Waits until `name` exists and satisfies `condition`; on time-out, fails showing the object as it is.
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, condition: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let watch = await_condition(api.clone(), name, move |obj: Option<&K>| obj.is_some_and(&condition));
    match tokio::time::timeout(WAIT, watch).await {
        Ok(Ok(Some(obj))) => obj,
        Ok(Ok(None)) => panic!("{name} vanished while waiting for {what}"),
        Ok(Err(error)) => panic!("watching {name} for {what}: {error}"),
        Err(_) => {
            let current = api.get_opt(name).await.ok().flatten();
            panic!("{name} did not reach {what} within {WAIT:?}; it is now {current:#?}")
        }
    }
}

/// The stream's `Ready` condition as `(status, reason, message)`, once it describes the current spec.
pub fn ready(stream: &ArrowportStream) -> Option<(String, String, String)> {
    let status = stream.status.as_ref()?;
    if status.observed_generation != stream.metadata.generation {
        return None;
    }
    let ready = status.ready()?;
    Some((ready.status.clone(), ready.reason.clone(), ready.message.clone()))
}

pub fn has_reason(stream: &ArrowportStream, reason: &str) -> bool {
    ready(stream).is_some_and(|(_, r, _)| r == reason)
}

/// The streams file in the ConfigMap, parsed by the ingester's own parser.
pub fn streams_file(config_map: &ConfigMap) -> Option<StreamsFile> {
    let yaml = config_map.data.as_ref()?.get("streams.yaml")?;
    Some(StreamsFile::from_yaml(yaml).expect("the ingester parses the operator's streams file"))
}

/// The table `stream` routes to in the ConfigMap, if it is routed.
pub fn routed_table(config_map: &ConfigMap, stream: &str) -> Option<String> {
    streams_file(config_map)?.streams.get(stream)?.target_table.clone()
}
