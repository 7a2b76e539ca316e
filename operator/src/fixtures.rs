//! Test fixtures: builder-style resources and a mocked API server that checks each request.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle, SendResponse};

use crate::crd::{
    ArrowportStream, ArrowportStreamSpec, ArrowportStreamStatus, StreamCompression, StreamCompressionAlgorithm,
    StreamSchemaPolicy,
};
use crate::health::HEALTH_MANAGER;
use crate::metrics::Metrics;
use crate::plan::{ConfigMapState, Ingester, STREAMS_KEY, Snapshot, plan};
use crate::reconcile::{Context, MANAGER};

pub const NAMESPACE: &str = "ns";

impl ArrowportStream {
    /// A minimal stream `name` in namespace `ns`, generation 1, created at the epoch.
    pub fn test(name: &str) -> Self {
        let mut stream = ArrowportStream::new(name, serde_json::from_str::<ArrowportStreamSpec>("{}").unwrap());
        stream.metadata.namespace = Some(NAMESPACE.to_owned());
        stream.metadata.uid = Some(format!("uid-{name}"));
        stream.metadata.generation = Some(1);
        stream.created_at(0)
    }

    pub fn with_stream_name(mut self, name: &str) -> Self {
        self.spec.stream_name = Some(name.to_owned());
        self
    }

    pub fn with_table(mut self, table: &str) -> Self {
        self.spec.target_table = Some(table.to_owned());
        self
    }

    pub fn with_ingester(mut self, ingester: &str) -> Self {
        self.spec.ingester = ingester.to_owned();
        self
    }

    pub fn with_chunk_size(mut self, rows: i64) -> Self {
        self.spec.chunk_size = Some(rows);
        self
    }

    pub fn with_compression(mut self, algorithm: StreamCompressionAlgorithm, level: Option<i32>) -> Self {
        self.spec.compression = Some(StreamCompression { algorithm, level });
        self
    }

    pub fn with_schema_policy(mut self, policy: StreamSchemaPolicy) -> Self {
        self.spec.schema_policy = policy;
        self
    }

    /// Names the tokens file entries that may write the stream.
    pub fn with_writers(mut self, writers: &[&str]) -> Self {
        self.spec.writers = writers.iter().map(|writer| (*writer).to_owned()).collect();
        self
    }

    /// Sets `creationTimestamp` to `seconds` after the epoch.
    pub fn created_at(mut self, seconds: i64) -> Self {
        self.metadata.creation_timestamp = Some(Time(Timestamp::from_second(seconds).unwrap()));
        self
    }

    pub fn with_generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    pub fn with_status(mut self, status: ArrowportStreamStatus) -> Self {
        self.status = Some(status);
        self
    }
}

/// A snapshot of ingester `ns/arrowport` (which exists) with these streams and, if given, a labelled
/// ConfigMap holding `streams_yaml`.
pub fn snapshot(streams: Vec<ArrowportStream>, streams_yaml: Option<String>) -> Snapshot {
    Snapshot {
        ingester: Ingester::new(NAMESPACE, "arrowport"),
        streams: streams.into_iter().map(Arc::new).collect(),
        config_map: streams_yaml.map(|yaml| ConfigMapState { streams_yaml: Some(yaml), labelled: true }),
        ingester_found: true,
    }
}

/// A snapshot in which the operator has already done its work: the ConfigMap holds the rendered
/// file and every stream carries the status the plan gives it.
pub fn settled(streams: Vec<ArrowportStream>) -> Snapshot {
    let snap = snapshot(streams, None);
    let plan = plan(&snap, Timestamp::UNIX_EPOCH).unwrap();
    let streams = plan.streams.into_iter().map(|o| (*o.stream).clone().with_status(o.status)).collect();
    snapshot(streams, plan.write_streams_yaml)
}

/// Waits for a verifier task, failing the test if it panicked or hangs.
pub async fn timeout_after(verifier: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(5), verifier)
        .await
        .expect("the verifier timed out")
        .expect("the verifier failed");
}

impl Context {
    /// A context whose client talks to the returned mock API server.
    pub fn test() -> (Self, ApiServerVerifier) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, NAMESPACE);
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.to_owned(), instance: None });
        let metrics = Metrics::register(&mut Registry::default());
        (Self { client, recorder, metrics }, ApiServerVerifier(handle))
    }
}

/// Plays the API server: each method expects one request, checks it and answers as Kubernetes would.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

impl ApiServerVerifier {
    async fn next(&mut self, expected: &str) -> (Request<Body>, SendResponse<Response<Body>>) {
        tokio::time::timeout(Duration::from_secs(2), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("expected {expected}, but no request came"))
            .unwrap_or_else(|| panic!("expected {expected}, but the client was dropped"))
    }

    /// Expects the forced server-side apply of ConfigMap `name` holding exactly `streams_yaml`;
    /// returns the YAML.
    pub async fn config_map_apply(&mut self, name: &str, streams_yaml: &str) -> String {
        let (request, send) = self.next("a ConfigMap apply").await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().to_string(),
            format!("/api/v1/namespaces/{NAMESPACE}/configmaps/{name}?&force=true&fieldManager={MANAGER}")
        );
        let body = json_body(request).await;
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "ConfigMap");
        // The operator never claims labels it does not own; Helm sets `app.kubernetes.io/managed-by`.
        assert_eq!(body["metadata"]["labels"].get("app.kubernetes.io/managed-by"), None);
        assert_eq!(body["metadata"]["labels"]["arrowport.dev/ingester"], "arrowport");
        assert_eq!(body["metadata"].get("ownerReferences"), None);
        let yaml = body["data"][STREAMS_KEY].as_str().expect("data.streams.yaml").to_owned();
        assert_eq!(yaml, streams_yaml);
        send.send_response(json_response(200, &body));
        yaml
    }

    /// Answers the next ConfigMap apply with an API error of this HTTP status.
    pub async fn refuse_config_map_apply(&mut self, code: u16) {
        let (request, send) = self.next("a ConfigMap apply").await;
        assert_eq!(request.method(), Method::PATCH);
        let status = kube::core::Status::failure("refused by the test", "Refused").with_code(code);
        send.send_response(json_response(code, &serde_json::to_value(status).unwrap()));
    }

    /// Expects the forced server-side apply of stream `name`'s status; returns that status.
    pub async fn status_apply(&mut self, name: &str) -> ArrowportStreamStatus {
        let (request, send) = self.next("a status apply").await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().to_string(),
            format!(
                "/apis/arrowport.dev/v1alpha1/namespaces/{NAMESPACE}/arrowportstreams/{name}/status?&force=true&fieldManager={MANAGER}"
            )
        );
        let body = json_body(request).await;
        assert_eq!(body["apiVersion"], "arrowport.dev/v1alpha1");
        assert_eq!(body["kind"], "ArrowportStream");
        let status: ArrowportStreamStatus = serde_json::from_value(body["status"].clone()).expect("a valid status");
        let stored = ArrowportStream::test(name).with_status(status.clone());
        send.send_response(json_response(200, &serde_json::to_value(stored).unwrap()));
        status
    }

    /// Expects the stream-health poller's forced server-side apply of stream `name`'s status (field manager
    /// `arrowport-operator-health`); returns that status, which holds only the poller's fields.
    pub async fn health_apply(&mut self, name: &str) -> ArrowportStreamStatus {
        let (request, send) = self.next("a health status apply").await;
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(
            request.uri().to_string(),
            format!(
                "/apis/arrowport.dev/v1alpha1/namespaces/{NAMESPACE}/arrowportstreams/{name}/status?&force=true&fieldManager={HEALTH_MANAGER}"
            )
        );
        let body = json_body(request).await;
        assert_eq!(body["apiVersion"], "arrowport.dev/v1alpha1");
        assert_eq!(body["kind"], "ArrowportStream");
        let status: ArrowportStreamStatus = serde_json::from_value(body["status"].clone()).expect("a valid status");
        assert_eq!(status.route_part(), ArrowportStreamStatus::default(), "the poller wrote a field of the route's");
        let stored = ArrowportStream::test(name).with_status(status.clone());
        send.send_response(json_response(200, &serde_json::to_value(stored).unwrap()));
        status
    }

    /// Expects an `events.k8s.io` Event about stream `name` with this type and reason.
    pub async fn event(&mut self, name: &str, type_: &str, reason: &str) {
        let (request, send) = self.next("an event").await;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().to_string(), format!("/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events?"));
        let body = json_body(request).await;
        assert_eq!(body["regarding"]["kind"], "ArrowportStream");
        assert_eq!(body["regarding"]["name"], name);
        assert_eq!(body["type"], type_);
        assert_eq!(body["reason"], reason);
        assert!(body["note"].as_str().is_some_and(|n| !n.is_empty()), "an event without a note");
        send.send_response(json_response(201, &body));
    }

    /// The next request, whichever it is, for tests in which requests race (the controller reconciles
    /// ingesters concurrently); `None` once the client is dropped.
    pub async fn any_request(&mut self) -> Option<(Request<Body>, SendResponse<Response<Body>>)> {
        self.0.next_request().await
    }

    /// Expects no further request: the client must be dropped without another call.
    pub async fn done(mut self) {
        if let Some((request, _)) = self.0.next_request().await {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

pub async fn json_body(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).expect("a JSON body")
}

pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}
