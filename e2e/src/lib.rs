//! Harness for the operator's end-to-end tests: reach the cluster `KUBECONFIG` names (or skip), install
//! the committed CRD, make a throwaway namespace, apply resources and wait on their state, never on a
//! fixed sleep.

use std::fmt::Debug;
use std::io::Write;
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

/// A client for the cluster `KUBECONFIG` (or in-cluster credentials) names, or why there is none.
pub async fn cluster() -> Result<Client, String> {
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

/// Says loudly that the suite did not run. Written straight to stderr: the test harness captures
/// `println!` of passing tests, and a silent skip would look like a pass.
pub fn skip(reason: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED arrowport e2e: no Kubernetes cluster reachable ({reason}). \
         Point KUBECONFIG at a test cluster (kind, k3d, ...) to run it."
    );
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
            let _ = writeln!(std::io::stderr(), "could not delete namespace {}: {error}", self.name);
        }
    }
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
