//! The operator against a real cluster: install the CRD, get an operator (run in this process watching a
//! throwaway namespace, or with `ARROWPORT_E2E_INSTALL=helm` the one the Helm chart deploys there), apply
//! the examples and follow a stream's life through create, update, conflict, hand edits and delete.
//! Skips, passing, when no cluster is reachable.

use arrowport_e2e::{
    Helm, Install, LINEITEM_YAML, SENSORS_YAML, TestNamespace, apply, cluster, example, has_reason, install_crd, ready,
    routed_table, skip, streams_file, wait_for,
};
use arrowport_operator::Args;
use arrowport_operator::crd::{ArrowportStream, StreamCompressionAlgorithm};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

const CONFIG_MAP: &str = "arrowport-streams";

#[tokio::test]
async fn operator_routes_streams_into_the_ingester_config_map() {
    let client = match cluster().await {
        Ok(client) => client,
        Err(reason) => return skip(&reason),
    };
    let install = match Install::from_env().await {
        Ok(install) => install,
        Err(reason) => return skip(&reason),
    };
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client).await;
    let outcome = match &install {
        Install::InProcess => with_operator_in_process(&client, &namespace.name).await,
        Install::Chart(helm) => with_chart(helm, &client, &namespace.name).await,
    };
    namespace.delete().await;
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

/// The operator runs in this process, watching only `namespace`; the scenario brings a stand-in ingester.
/// Both run as tasks, so that a failed assertion comes back as an error and the cleanup still runs.
async fn with_operator_in_process(client: &Client, namespace: &str) -> Result<(), String> {
    let args = Args {
        namespace: Some(namespace.to_owned()),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        lease_namespace: namespace.to_owned(),
        lease_name: "arrowport-operator".to_owned(),
        identity: Some("e2e".to_owned()),
        // Polled often, so the scenario sees the health next to the route's condition; from outside the
        // cluster the Service name does not resolve: the stand-in is reported unreachable.
        stream_health_interval_seconds: 2,
        stream_idle_after_seconds: 300,
        stream_health_write_interval_seconds: 60,
        ingester_url: "http://{service}.{namespace}.svc:{port}".to_owned(),
        ingester_token_file: None,
    };
    let mut operator = tokio::spawn(arrowport_operator::run(args, std::future::pending()));
    let mut scenario = tokio::spawn(lifecycle(client.clone(), namespace.to_owned(), true));
    let outcome = tokio::select! {
        stopped = &mut operator => Err(format!("the operator stopped: {stopped:?}")),
        done = &mut scenario => done.map_err(|e| e.to_string()),
    };
    operator.abort();
    scenario.abort();
    outcome
}

/// The chart's operator (watching all namespaces) and its real ingester, installed into `namespace` and
/// uninstalled also when a step fails (the scenario runs as a task for that, as in-process).
async fn with_chart(helm: &Helm, client: &Client, namespace: &str) -> Result<(), String> {
    let outcome = match helm.install(namespace).await {
        Ok(()) => tokio::spawn(lifecycle(client.clone(), namespace.to_owned(), false)).await.map_err(|e| e.to_string()),
        Err(error) => Err(error),
    };
    helm.uninstall(namespace).await;
    outcome
}

/// With `stand_in`, the scenario starts without an ingester and brings a stand-in later; otherwise the
/// ingester (the chart's) is there from the start.
async fn lifecycle(client: Client, namespace: String, stand_in: bool) {
    let streams: Api<ArrowportStream> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);

    // The schema refuses a bad resource, with the CEL rule's message.
    let mut bad = example(SENSORS_YAML);
    bad.metadata.name = Some("bad".to_owned());
    bad.spec.compression.as_mut().unwrap().algorithm = StreamCompressionAlgorithm::Lz4;
    let refused = streams
        .patch("bad", &PatchParams::apply("arrowport-e2e"), &Patch::Apply(&bad))
        .await
        .expect_err("the API server accepted a level for lz4");
    assert!(refused.to_string().contains("level may only be 3 and only with algorithm zstd"), "{refused}");

    apply(&streams, &example(LINEITEM_YAML)).await;
    if stand_in {
        // Without an ingester the route is written anyway, and the status says what is missing.
        wait_for(&streams, "lineitem", "IngesterNotFound", |s| has_reason(s, "IngesterNotFound")).await;
        wait_for(&config_maps, CONFIG_MAP, "the lineitem route", |cm| {
            routed_table(cm, "lineitem").as_deref() == Some("lineitem")
        })
        .await;
        // Then the ingester appears.
        apply(&Api::<StatefulSet>::namespaced(client.clone(), &namespace), &ingester()).await;
    }

    // With the ingester, both examples become Ready.
    wait_for(&streams, "lineitem", "Ready", is_ready).await;
    apply(&streams, &example(SENSORS_YAML)).await;
    let sensors = wait_for(&streams, "sensors", "Ready", is_ready).await;
    let status = sensors.status.unwrap();
    assert_eq!(status.stream_name.as_deref(), Some("sensors.v2"));
    assert_eq!(status.target_table.as_deref(), Some("sensor_readings"));
    assert_eq!(status.config_map.as_deref(), Some(CONFIG_MAP));
    let config_map = wait_for(&config_maps, CONFIG_MAP, "both routes", |cm| {
        routed_table(cm, "sensors.v2").is_some() && routed_table(cm, "lineitem").is_some()
    })
    .await;
    let sensors_route = streams_file(&config_map).unwrap().streams["sensors.v2"].clone();

    // Stream health, written by the poller under a field manager of its own, lands next to the route's
    // `Ready` condition and leaves it alone (`conditions` is a list map keyed by type). The chart's
    // ingester answers (the route may not have reached its pod yet); the stand-in has no pod.
    let reasons: &[&str] = if stand_in { &["IngesterUnreachable"] } else { &["NoWrites", "RouteNotLoaded"] };
    wait_for(&streams, "lineitem", "a Flowing condition", |s| {
        let flowing = s.status.as_ref().and_then(|st| st.flowing());
        is_ready(s) && flowing.is_some_and(|c| reasons.contains(&c.reason.as_str()))
    })
    .await;
    assert_eq!(sensors_route.chunk_size, Some(65536));
    assert_eq!(sensors_route.compression.unwrap().level, Some(3));

    // An update reaches the ConfigMap and the status records the new generation.
    let change = serde_json::json!({"spec": {"targetTable": "sensor_readings_v2"}});
    streams.patch("sensors", &PatchParams::default(), &Patch::Merge(&change)).await.unwrap();
    wait_for(&streams, "sensors", "the new table in its status", |s| {
        is_ready(s) && s.status.as_ref().unwrap().target_table.as_deref() == Some("sensor_readings_v2")
    })
    .await;
    wait_for(&config_maps, CONFIG_MAP, "the new table", |cm| {
        routed_table(cm, "sensors.v2").as_deref() == Some("sensor_readings_v2")
    })
    .await;

    // A second claim on "lineitem" loses to the older resource, which keeps its route.
    let mut copy = example(LINEITEM_YAML);
    copy.metadata.name = Some("lineitem-copy".to_owned());
    copy.spec.stream_name = Some("lineitem".to_owned());
    copy.spec.target_table = Some("lineitem_copy".to_owned());
    apply(&streams, &copy).await;
    let loser = wait_for(&streams, "lineitem-copy", "ResourceConflict", |s| has_reason(s, "ResourceConflict")).await;
    let (_, _, message) = ready(&loser).unwrap();
    assert!(message.contains(&format!("{namespace}/lineitem")), "{message}");
    let config_map = config_maps.get(CONFIG_MAP).await.unwrap();
    assert_eq!(routed_table(&config_map, "lineitem").as_deref(), Some("lineitem"));

    // Hand edits and deletes of the ConfigMap are undone.
    let mut edit = ConfigMap::default();
    edit.metadata.name = Some(CONFIG_MAP.to_owned());
    edit.data = Some([("streams.yaml".to_owned(), "streams: {}\n".to_owned())].into());
    config_maps.patch(CONFIG_MAP, &PatchParams::apply("e2e-hand-edit").force(), &Patch::Apply(&edit)).await.unwrap();
    wait_for(&config_maps, CONFIG_MAP, "the routes put back", |cm| routed_table(cm, "lineitem").is_some()).await;
    let old_uid = config_maps.get(CONFIG_MAP).await.unwrap().uid();
    config_maps.delete(CONFIG_MAP, &DeleteParams::default()).await.unwrap();
    wait_for(&config_maps, CONFIG_MAP, "a recreated ConfigMap", |cm| {
        cm.uid() != old_uid && routed_table(cm, "lineitem").is_some()
    })
    .await;

    // When the winner goes, the loser takes over.
    streams.delete("lineitem", &DeleteParams::default()).await.unwrap();
    wait_for(&streams, "lineitem-copy", "Ready after the winner left", is_ready).await;
    wait_for(&config_maps, CONFIG_MAP, "the copy's route", |cm| {
        routed_table(cm, "lineitem").as_deref() == Some("lineitem_copy")
    })
    .await;

    // Deleting the last streams leaves a valid, empty streams file for the pods that mount it.
    for name in ["lineitem-copy", "sensors"] {
        streams.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for(&config_maps, CONFIG_MAP, "an empty streams file", |cm| {
        streams_file(cm).is_some_and(|f| f.streams.is_empty())
    })
    .await;
}

fn is_ready(stream: &ArrowportStream) -> bool {
    ready(stream).is_some_and(|(status, _, _)| status == "True")
}

/// A stand-in ingester: a StatefulSet with the ingester label and no pods.
fn ingester() -> StatefulSet {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "arrowport", "labels": {"arrowport.dev/ingester": "arrowport"}},
        "spec": {
            "replicas": 0,
            "serviceName": "arrowport",
            "selector": {"matchLabels": {"app": "arrowport-e2e"}},
            "template": {
                "metadata": {"labels": {"app": "arrowport-e2e"}},
                "spec": {"containers": [{"name": "ingester", "image": "registry.k8s.io/pause:3.10"}]}
            }
        }
    }))
    .unwrap()
}
