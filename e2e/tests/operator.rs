//! The operator against a real cluster: install the CRD, run the operator (in this process, watching a
//! throwaway namespace), apply the examples and follow a stream's life through create, update,
//! conflict, hand edits and delete. Skips, passing, when no cluster is reachable.

use arrowport_e2e::{
    LINEITEM_YAML, SENSORS_YAML, TestNamespace, apply, cluster, example, has_reason, install_crd, ready, routed_table,
    skip, streams_file, wait_for,
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
    install_crd(&client).await;
    let namespace = TestNamespace::create(&client).await;
    let args = Args {
        namespace: Some(namespace.name.clone()),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        lease_namespace: namespace.name.clone(),
        lease_name: "arrowport-operator".to_owned(),
        identity: Some("e2e".to_owned()),
    };
    let mut operator = tokio::spawn(arrowport_operator::run(args, std::future::pending()));
    let mut scenario = tokio::spawn(lifecycle(client.clone(), namespace.name.clone()));
    let outcome = tokio::select! {
        stopped = &mut operator => Err(format!("the operator stopped: {stopped:?}")),
        done = &mut scenario => done.map_err(|e| if e.is_panic() { std::panic::resume_unwind(e.into_panic()) } else { e.to_string() }),
    };
    operator.abort();
    scenario.abort();
    namespace.delete().await;
    outcome.unwrap();
}

async fn lifecycle(client: Client, namespace: String) {
    let streams: Api<ArrowportStream> = Api::namespaced(client.clone(), &namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);

    // The schema refuses a bad resource, with the CEL rule's message.
    let mut bad = example(SENSORS_YAML);
    bad.metadata.name = Some("bad".to_owned());
    bad.spec.compression.as_mut().unwrap().algorithm = StreamCompressionAlgorithm::Lz4;
    let refused = streams
        .patch("bad", &PatchParams::apply("arrowport-e2e"), &Patch::Apply(&bad))
        .await
        .expect_err("the API server accepted a level for lz4");
    assert!(refused.to_string().contains("level applies only to zstd"), "{refused}");

    // Without an ingester the route is written anyway, and the status says what is missing.
    apply(&streams, &example(LINEITEM_YAML)).await;
    wait_for(&streams, "lineitem", "IngesterNotFound", |s| has_reason(s, "IngesterNotFound")).await;
    wait_for(&config_maps, CONFIG_MAP, "the lineitem route", |cm| {
        routed_table(cm, "lineitem").as_deref() == Some("lineitem")
    })
    .await;

    // The ingester appears: both examples become Ready.
    apply(&statefulsets, &ingester()).await;
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
    assert_eq!(sensors_route.chunk_size, Some(65536));
    assert_eq!(sensors_route.compression.unwrap().level, Some(9));

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
