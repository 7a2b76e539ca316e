//! Carries out a [`Plan`]: one server-side apply of the ConfigMap, then the status of each stream whose
//! status changed, and an Event where its `Ready` reason changed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::crd::ArrowportStream;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::plan::{Ingester, Reason, STREAMS_KEY, Snapshot, StreamOutcome, plan};

/// The one field manager of everything the operator writes.
pub const MANAGER: &str = "arrowport-operator";
/// Marks a ConfigMap (and the ingester's StatefulSet) as belonging to ingester `<value>`.
pub const INGESTER_LABEL: &str = "arrowport.dev/ingester";

/// What a reconcile needs besides the snapshot.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

/// Brings one ingester's ConfigMap and its streams' statuses in line with the streams that exist.
pub async fn reconcile(ctx: &Context, snapshot: &Snapshot) -> Result<(), Error> {
    let plan = plan(snapshot, Timestamp::now())?;
    let ingester = &snapshot.ingester;
    if let Some(yaml) = &plan.write_streams_yaml {
        apply_config_map(&ctx.client, ingester, yaml).await?;
        let routes = plan.streams.iter().filter(|o| o.status.config_map.is_some()).count();
        info!(namespace = %ingester.namespace, config_map = %ingester.config_map_name(), routes, "Wrote the streams file.");
    }
    for outcome in &plan.streams {
        if outcome.status_changed() {
            write_status(&ctx.client, outcome).await?;
        }
        if outcome.reason_changed() {
            publish_event(&ctx.recorder, outcome).await;
        }
    }
    Ok(())
}

async fn apply_config_map(client: &Client, ingester: &Ingester, streams_yaml: &str) -> Result<(), kube::Error> {
    let name = ingester.config_map_name();
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ingester.namespace.clone()),
            // Only what this manager owns: Helm (or whoever created the ConfigMap) keeps its own labels,
            // such as `app.kubernetes.io/managed-by`, and neither side overwrites the other.
            labels: Some(BTreeMap::from([(INGESTER_LABEL.to_owned(), ingester.name.clone())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(STREAMS_KEY.to_owned(), streams_yaml.to_owned())])),
        ..ConfigMap::default()
    };
    // Forced apply: this manager owns `data.streams.yaml` and takes it back from hand edits.
    Api::<ConfigMap>::namespaced(client.clone(), &ingester.namespace)
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&config_map))
        .await?;
    Ok(())
}

async fn write_status(client: &Client, outcome: &StreamOutcome) -> Result<(), kube::Error> {
    let stream = &outcome.stream;
    let patch = serde_json::json!({
        "apiVersion": ArrowportStream::api_version(&()),
        "kind": ArrowportStream::kind(&()),
        "status": outcome.status,
    });
    Api::<ArrowportStream>::namespaced(client.clone(), &stream.namespace().unwrap_or_default())
        .patch_status(&stream.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    let ready = outcome.status.ready();
    info!(
        namespace = %stream.namespace().unwrap_or_default(),
        stream = %stream.name_any(),
        ready = ready.map(|c| c.status.as_str()).unwrap_or_default(),
        reason = outcome.reason.as_str(),
        "Updated the stream's status."
    );
    Ok(())
}

/// Events are best effort: a failure is logged, not retried, since the status already says it.
async fn publish_event(recorder: &Recorder, outcome: &StreamOutcome) {
    let event = Event {
        type_: match outcome.reason {
            Reason::Accepted => EventType::Normal,
            _ => EventType::Warning,
        },
        reason: outcome.reason.as_str().to_owned(),
        note: outcome.status.ready().map(|c| c.message.clone()),
        action: "Route".to_owned(),
        secondary: None,
    };
    let stream = &outcome.stream;
    if let Err(error) = recorder.publish(&event, &stream.object_ref(&())).await {
        warn!(stream = %stream.name_any(), %error, "Could not publish an event.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::StreamCompressionAlgorithm;
    use crate::fixtures::{settled, snapshot, timeout_after};
    use crate::plan::ConfigMapState;

    #[tokio::test]
    async fn new_stream_writes_the_config_map_then_its_status_and_an_event() {
        let (ctx, mut server) = Context::test();
        let stream = ArrowportStream::test("lineitem");
        let snap = snapshot(vec![stream.clone()], None);
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", "streams:\n  lineitem:\n    target_table: lineitem\n").await;
            let status = server.status_apply("lineitem").await;
            assert_eq!(status.stream_name.as_deref(), Some("lineitem"));
            assert_eq!(status.target_table.as_deref(), Some("lineitem"));
            assert_eq!(status.config_map.as_deref(), Some("arrowport-streams"));
            assert_eq!(status.observed_generation, Some(1));
            server.event("lineitem", "Normal", "Accepted").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn settled_state_makes_no_requests() {
        let (ctx, server) = Context::test();
        let snap = settled(vec![ArrowportStream::test("lineitem")]);
        let verifier = tokio::spawn(server.done());
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn changed_spec_rewrites_the_file_and_records_the_generation() {
        let expected = "streams:\n  lineitem:\n    target_table: lineitem\n    chunk_size: 1024\n";
        edited_spec_rewrites_the_file(|stream| stream.with_chunk_size(1024), expected).await;
    }

    #[tokio::test]
    async fn granting_writers_rewrites_the_file_with_their_names() {
        let expected =
            "streams:\n  lineitem:\n    target_table: lineitem\n    writers:\n    - loader\n    - etl-batch\n";
        edited_spec_rewrites_the_file(|stream| stream.with_writers(&["loader", "etl-batch"]), expected).await;
    }

    /// Edits the one settled stream's spec (generation 2): the file is rewritten as `expected` and the
    /// status records the generation, with no event for the unchanged reason (still Accepted).
    async fn edited_spec_rewrites_the_file(
        edit: impl FnOnce(ArrowportStream) -> ArrowportStream,
        expected: &'static str,
    ) {
        let (ctx, mut server) = Context::test();
        let mut snap = settled(vec![ArrowportStream::test("lineitem")]);
        let edited = edit((*snap.streams[0]).clone()).with_generation(2);
        snap.streams = vec![edited.into()];
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", expected).await;
            let status = server.status_apply("lineitem").await;
            assert_eq!(status.observed_generation, Some(2));
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn deleting_the_last_stream_leaves_an_empty_streams_file() {
        let (ctx, mut server) = Context::test();
        let mut snap = settled(vec![ArrowportStream::test("lineitem")]);
        snap.streams.clear();
        let verifier = tokio::spawn(async move {
            let yaml = server.config_map_apply("arrowport-streams", "streams: {}\n").await;
            assert_eq!(arrowport_config::StreamsFile::from_yaml(&yaml).unwrap(), Default::default());
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn conflict_marks_the_newer_resource_and_leaves_the_route_alone() {
        let (ctx, mut server) = Context::test();
        let winner = ArrowportStream::test("old").with_stream_name("events").created_at(10);
        let mut snap = settled(vec![winner]);
        let loser = ArrowportStream::test("new").with_stream_name("events").with_table("other").created_at(20);
        snap.streams.push(loser.into());
        let verifier = tokio::spawn(async move {
            let status = server.status_apply("new").await;
            let ready = status.ready().unwrap();
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ResourceConflict"));
            assert!(ready.message.contains("managed by ns/old"), "{}", ready.message);
            server.event("new", "Warning", "ResourceConflict").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn deleting_the_loser_never_touches_the_winners_route() {
        let (ctx, server) = Context::test();
        let winner = ArrowportStream::test("old").with_stream_name("events").created_at(10);
        let loser = ArrowportStream::test("new").with_stream_name("events").with_table("other").created_at(20);
        let mut snap = settled(vec![winner, loser]);
        snap.streams.retain(|s| s.name_any() == "old");
        let verifier = tokio::spawn(server.done());
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn loser_takes_over_when_the_winner_goes() {
        let (ctx, mut server) = Context::test();
        let winner = ArrowportStream::test("old").with_stream_name("events").created_at(10);
        let loser = ArrowportStream::test("new").with_stream_name("events").with_table("other").created_at(20);
        let mut snap = settled(vec![winner, loser]);
        snap.streams.retain(|s| s.name_any() == "new");
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", "streams:\n  events:\n    target_table: other\n").await;
            let status = server.status_apply("new").await;
            assert_eq!(status.ready().unwrap().reason, "Accepted");
            assert_eq!(status.target_table.as_deref(), Some("other"));
            server.event("new", "Normal", "Accepted").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn invalid_spec_gets_a_status_and_a_warning_but_no_route() {
        let (ctx, mut server) = Context::test();
        let bad = ArrowportStream::test("bad").with_compression(StreamCompressionAlgorithm::Lz4, Some(5));
        let snap = snapshot(vec![bad], None);
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", "streams: {}\n").await;
            let status = server.status_apply("bad").await;
            let ready = status.ready().unwrap();
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
            assert!(ready.message.contains("only to zstd"), "{}", ready.message);
            assert_eq!(status.config_map, None);
            server.event("bad", "Warning", "InvalidSpec").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn hand_edited_config_map_is_put_back() {
        let (ctx, mut server) = Context::test();
        let mut snap = settled(vec![ArrowportStream::test("lineitem")]);
        let good = snap.config_map.as_ref().unwrap().streams_yaml.clone().unwrap();
        snap.config_map =
            Some(ConfigMapState { streams_yaml: Some("streams:\n  hijacked: {}\n".to_owned()), labelled: true });
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", &good).await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn deleted_config_map_is_recreated() {
        let (ctx, mut server) = Context::test();
        let mut snap = settled(vec![ArrowportStream::test("lineitem")]);
        snap.config_map = None;
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", "streams:\n  lineitem:\n    target_table: lineitem\n").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn missing_ingester_is_reported_but_the_route_is_written() {
        let (ctx, mut server) = Context::test();
        let mut snap = snapshot(vec![ArrowportStream::test("lineitem")], None);
        snap.ingester_found = false;
        let verifier = tokio::spawn(async move {
            server.config_map_apply("arrowport-streams", "streams:\n  lineitem:\n    target_table: lineitem\n").await;
            let status = server.status_apply("lineitem").await;
            assert_eq!(status.ready().unwrap().reason, "IngesterNotFound");
            server.event("lineitem", "Warning", "IngesterNotFound").await;
            server.done().await;
        });
        reconcile(&ctx, &snap).await.unwrap();
        drop(ctx);
        timeout_after(verifier).await;
    }

    #[tokio::test]
    async fn api_errors_fail_the_reconcile_with_a_metric_label() {
        let (ctx, mut server) = Context::test();
        let snap = snapshot(vec![ArrowportStream::test("lineitem")], None);
        let verifier = tokio::spawn(async move {
            server.refuse_config_map_apply(403).await;
            server.done().await;
        });
        let error = reconcile(&ctx, &snap).await.unwrap_err();
        assert_eq!(error.metric_label(), "forbidden");
        drop(ctx);
        timeout_after(verifier).await;
    }
}
