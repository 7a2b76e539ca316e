//! The control loop, built from kube-runtime's controller machinery: [`applier`], the engine behind
//! `Controller::run`, schedules and deduplicates the reconciles, runs several ingesters at once and
//! retries a failed one with backoff, so one slow or failing ingester does not hold up the others.
//!
//! # What is reconciled: an ingester
//!
//! The unit of work is an ingester (namespace + name), not a single ArrowportStream. All streams of an
//! ingester render into one file, its ConfigMap `<ingester>-streams`, and a conflict between two streams
//! is decided by looking at both, so one reconcile plans the whole ingester (`plan::plan`, pure) from the
//! watch caches: the ConfigMap and the status of each of its streams. Keyed by stream instead, the same
//! file would be rendered once per stream by sibling reconciles racing on it, and since a controller never
//! sees a deleted object, deleting an ingester's last stream could not empty its file without a finalizer
//! on every stream (which would block deleting streams while no operator runs, and need write access to
//! the streams themselves).
//!
//! `Controller::new` keys its reconciles by objects of a watched kind, and an ingester is none: its
//! ConfigMap may not exist yet (no route written so far, or deleted by hand) and its StatefulSet need not
//! exist either (routes are written for ingesters that start later). So the controller is assembled from
//! the parts `Controller` is made of:
//!
//! - The reconciled objects are `IngesterKey`s, one per ingester the watches have named, in a store of
//!   their own.
//! - Three watches (ArrowportStreams, and the ConfigMaps and StatefulSets labelled `arrowport.dev/ingester`)
//!   keep the caches a reconcile reads, and map each event to the ingesters it touches, as the mappers of
//!   `Controller::watches` do: a stream to its ingester (and to the one it left when `spec.ingester`
//!   changed, or when it vanished in a relist), a ConfigMap `<ingester>-streams` or a StatefulSet to the
//!   ingester in its label.
//! - [`applier`] runs `reconcile_ingester` and `error_policy`, each reconcile on its own task, as
//!   `Controller::run` does.
//!
//! # Scheduling
//!
//! - Concurrency: up to [`CONCURRENCY`] ingesters are reconciled at once, but one ingester never twice at
//!   once: a change to an ingester under reconcile runs once that reconcile ends. Requests for the same
//!   ingester within [`DEBOUNCE`] are coalesced into one reconcile (a `kubectl apply` of many streams).
//! - Backoff: a failed reconcile is retried after 1 s, doubling with each consecutive failure of that
//!   ingester up to 256 s; a success resets it. A watch event still triggers a reconcile at once.
//! - Requeue: a successful reconcile runs again after [`RESYNC`], a safety net for missed watch events; it
//!   makes no API calls when nothing drifted, since the plan writes only what differs.
//! - Start-up: nothing runs until all three watches have listed everything; then every ingester with
//!   streams or a streams ConfigMap is reconciled, also one whose last stream was deleted while no
//!   operator ran.
//!
//! Leader election gates all of it: `lib.rs` runs [`run`] only while this replica holds the Lease, and
//! drops it when the Lease is lost, which aborts the reconciles in flight.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, future, stream};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta};
use kube::runtime::controller::{self, Action, Config, ReconcileReason, ReconcileRequest};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::CancelableJoinHandle;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, applier, reflector as reflect};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use crate::crd::ArrowportStream;
use crate::error::Error;
use crate::health::{HealthConfig, Poller};
use crate::plan::{ConfigMapState, Ingester, STREAMS_KEY, Snapshot};
use crate::reconcile::{Context, INGESTER_LABEL, reconcile};

/// Coalesces bursts (a `kubectl apply` of many streams) into one reconcile per ingester.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// Most ingesters reconciled at once. Each reconcile is a handful of API calls; the bound keeps a start-up
/// pass over many ingesters from flooding the API server.
pub const CONCURRENCY: u16 = 8;
/// A successfully reconciled ingester is reconciled again after this long, even without a watch event.
pub const RESYNC: Duration = Duration::from_secs(5 * 60);

/// The operator's view of the cluster, kept current by watches.
#[derive(Clone)]
pub struct Stores {
    streams: Store<ArrowportStream>,
    config_maps: Store<ConfigMap>,
    ingesters: Store<StatefulSet>,
}

impl Stores {
    /// Everything one reconcile of `ingester` looks at.
    pub fn snapshot(&self, ingester: &Ingester) -> Snapshot {
        let streams = self.streams.state_filter(|s| Ingester::of(s) == *ingester);
        let config_map_ref = ObjectRef::new(&ingester.config_map_name()).within(&ingester.namespace);
        let config_map = self.config_maps.get(&config_map_ref).map(|cm| ConfigMapState {
            streams_yaml: cm.data.as_ref().and_then(|d| d.get(STREAMS_KEY)).cloned(),
            labelled: cm.labels().get(INGESTER_LABEL) == Some(&ingester.name),
        });
        let ingester_found = self.ingesters.find(|sts| statefulset_ingester(sts).as_ref() == Some(ingester)).is_some();
        Snapshot { ingester: ingester.clone(), streams, config_map, ingester_found }
    }

    /// Every ingester that has streams or a streams ConfigMap.
    fn all_ingesters(&self) -> BTreeSet<Ingester> {
        let from_streams = self.streams.state().into_iter().map(|s| Ingester::of(&s));
        let from_config_maps = self.config_maps.state().into_iter().filter_map(|cm| config_map_ingester(&cm));
        from_streams.chain(from_config_maps).collect()
    }

    async fn wait_until_ready(&self) {
        // A writer is only dropped when its watch ends, which happens when the controller is torn down.
        let _ = tokio::join!(
            self.streams.wait_until_ready(),
            self.config_maps.wait_until_ready(),
            self.ingesters.wait_until_ready()
        );
    }
}

/// The ingester whose streams file this ConfigMap is: `<ingester>-streams` labelled with its name.
fn config_map_ingester(cm: &ConfigMap) -> Option<Ingester> {
    let ingester = Ingester::new(cm.namespace()?, cm.labels().get(INGESTER_LABEL)?);
    (cm.name_any() == ingester.config_map_name()).then_some(ingester)
}

fn statefulset_ingester(sts: &StatefulSet) -> Option<Ingester> {
    Some(Ingester::new(sts.namespace()?, sts.labels().get(INGESTER_LABEL)?))
}

/// The object the controller reconciles: one ingester, named like a namespaced object so that
/// kube-runtime's scheduler and runner can key, deduplicate and retry reconciles by ingester. It is not a
/// Kubernetes kind; nothing serves it and it is never sent to the API server.
#[derive(Clone, Debug)]
struct IngesterKey {
    metadata: ObjectMeta,
}

impl IngesterKey {
    fn new(ingester: &Ingester) -> Self {
        let metadata = ObjectMeta {
            name: Some(ingester.name.clone()),
            namespace: Some(ingester.namespace.clone()),
            ..ObjectMeta::default()
        };
        Self { metadata }
    }

    fn ingester(&self) -> Ingester {
        Ingester::new(self.namespace().unwrap_or_default(), self.name_any())
    }
}

impl Resource for IngesterKey {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    // Shows in the controller's logs as `Ingester.internal.arrowport.dev/<name>.<namespace>`.
    fn kind(_: &()) -> Cow<'_, str> {
        "Ingester".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "arrowport.dev".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "internal".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "ingesters".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The reconciled objects: every ingester the watches have named since the operator started leading.
/// Their store turns ready, which lets reconciles start, once the watches have listed everything.
struct Keys {
    writer: Writer<IngesterKey>,
}

impl Keys {
    fn new() -> (Self, Store<IngesterKey>) {
        let (store, writer) = reflector::store();
        (Self { writer }, store)
    }

    fn insert(&mut self, ingester: &Ingester) -> ObjectRef<IngesterKey> {
        let key = IngesterKey::new(ingester);
        let obj_ref = ObjectRef::from_obj(&key);
        self.writer.apply_watcher_event(&Event::Apply(key));
        obj_ref
    }

    /// Marks the store ready, keeping every key inserted so far (readiness comes with a relist's end, which
    /// replaces the store's content by the relisted objects).
    fn mark_ready(&mut self) {
        let known = self.writer.as_reader().state();
        self.writer.apply_watcher_event(&Event::Init);
        for key in known {
            self.writer.apply_watcher_event(&Event::InitApply((*key).clone()));
        }
        self.writer.apply_watcher_event(&Event::InitDone);
    }
}

/// Maps stream events to the ingesters they touch, remembering each stream's ingester so that moving a
/// stream to another ingester also rewrites the one it left.
#[derive(Default)]
struct StreamTracker {
    ingester_of: HashMap<ObjectRef<ArrowportStream>, Ingester>,
    seen_in_relist: HashSet<ObjectRef<ArrowportStream>>,
}

impl StreamTracker {
    fn on_event(&mut self, event: &Event<ArrowportStream>) -> Vec<Ingester> {
        match event {
            Event::Apply(stream) | Event::InitApply(stream) => {
                let key = ObjectRef::from_obj(stream);
                let ingester = Ingester::of(stream);
                if matches!(event, Event::InitApply(_)) {
                    self.seen_in_relist.insert(key.clone());
                }
                match self.ingester_of.insert(key, ingester.clone()) {
                    Some(old) if old != ingester => vec![old, ingester],
                    _ => vec![ingester],
                }
            }
            Event::Delete(stream) => {
                self.ingester_of.remove(&ObjectRef::from_obj(stream));
                vec![Ingester::of(stream)]
            }
            Event::Init => {
                self.seen_in_relist.clear();
                vec![]
            }
            // Streams deleted while the watch was down vanish in a relist without a Delete event.
            Event::InitDone => {
                let seen = std::mem::take(&mut self.seen_in_relist);
                let mut gone = Vec::new();
                self.ingester_of.retain(|key, ingester| {
                    let keep = seen.contains(key);
                    if !keep {
                        gone.push(ingester.clone());
                    }
                    keep
                });
                gone
            }
        }
    }
}

/// What the watches tell the controller.
enum Trigger {
    /// A watch event touched these ingesters.
    Touched { ingesters: Vec<Ingester>, reason: String },
    /// All three watches have listed everything once.
    Synced,
}

/// Starts the watches and reconciles until the returned future is dropped; with `health`, also polls the
/// ingesters for the streams' health (`health.rs`) from the same watch caches.
pub async fn run(client: Client, namespace: Option<&str>, ctx: Context, health: Option<HealthConfig>) {
    let (streams, writer) = reflector::store();
    let mut tracker = StreamTracker::default();
    let stream_events = reflect(writer, watcher(api(&client, namespace), watcher::Config::default()));
    let stream_triggers = triggers(stream_events, move |e| tracker.on_event(e));

    // Only ConfigMaps carrying the ingester label; other ConfigMaps never concern the operator.
    let labelled = watcher::Config::default().labels(INGESTER_LABEL);
    let (config_maps, writer) = reflector::store();
    let config_map_events = reflect(writer, watcher(api(&client, namespace), labelled.clone()));
    let config_map_triggers = triggers(config_map_events, |e| touched(e, config_map_ingester));

    let (ingesters, writer) = reflector::store();
    let ingester_events = reflect(writer, watcher(api(&client, namespace), labelled));
    let ingester_triggers = triggers(ingester_events, |e| touched(e, statefulset_ingester));

    let stores = Stores { streams, config_maps, ingesters };
    let poller = health.map(|config| {
        let poller = Poller::new(client.clone(), config, ctx.metrics.clone());
        poller.run(stores.streams.clone(), stores.ingesters.clone())
    });
    info!("Waiting for the watches to list streams, ConfigMaps and ingesters.");
    let synced = {
        let stores = stores.clone();
        async move {
            stores.wait_until_ready().await;
            info!("Watches are in sync; reconciling.");
            Trigger::Synced
        }
    };
    let triggers = stream::select_all([
        stream_triggers.boxed(),
        config_map_triggers.boxed(),
        ingester_triggers.boxed(),
        stream::once(synced).boxed(),
    ]);
    let (keys, requests) = requests(triggers, stores.clone());
    let control_loop = controller(stores, keys, requests, ctx).for_each(|result| {
        // Failed reconciles are logged by `error_policy`; nothing else is expected here.
        if let Err(error) = result
            && !matches!(error, controller::Error::ReconcilerFailed(..))
        {
            warn!(%error, "Controller error.");
        }
        future::ready(())
    });
    match poller {
        Some(poller) => {
            tokio::select! {
                () = control_loop => {}
                () = poller => {}
            }
        }
        None => control_loop.await,
    }
}

/// Turns what the watches report into reconcile requests, keeping the store of reconciled objects: every
/// ingester named is added to it before its request goes out. Once the watches are in sync, the store
/// turns ready and every ingester with streams or a streams ConfigMap is requested too.
fn requests(
    triggers: impl Stream<Item = Trigger>,
    stores: Stores,
) -> (Store<IngesterKey>, impl Stream<Item = ReconcileRequest<IngesterKey>>) {
    let (mut keys, store) = Keys::new();
    let requests = triggers.flat_map(move |trigger| {
        let (ingesters, reason) = match trigger {
            Trigger::Touched { ingesters, reason } => (ingesters, reason),
            Trigger::Synced => {
                let all: Vec<_> = stores.all_ingesters().into_iter().collect();
                for ingester in &all {
                    keys.insert(ingester);
                }
                keys.mark_ready();
                (all, "start-up pass".to_owned())
            }
        };
        let requests: Vec<_> = ingesters
            .iter()
            .map(|ingester| ReconcileRequest {
                obj_ref: keys.insert(ingester),
                reason: ReconcileReason::Custom { reason: reason.clone() },
            })
            .collect();
        stream::iter(requests)
    });
    (store, requests)
}

/// What every reconcile shares.
struct State {
    ctx: Context,
    stores: Stores,
    failures: Failures,
}

/// Runs the reconciles `requests` asks for, of the ingesters in `keys`; yields each reconcile's outcome.
fn controller(
    stores: Stores,
    keys: Store<IngesterKey>,
    requests: impl Stream<Item = ReconcileRequest<IngesterKey>> + Send + 'static,
    ctx: Context,
) -> impl Stream<Item = Result<(ObjectRef<IngesterKey>, Action), controller::Error<Error, Infallible>>> + Send {
    let state = Arc::new(State { ctx, stores, failures: Failures::default() });
    applier(
        // As in `Controller::run`: each reconcile on a task of its own, aborted when the controller is dropped.
        |key, state| CancelableJoinHandle::spawn(reconcile_ingester(key, state).in_current_span(), &Handle::current()),
        error_policy,
        state,
        keys,
        requests.map(Ok::<_, Infallible>),
        Config::default().concurrency(CONCURRENCY).debounce(DEBOUNCE),
    )
}

/// Reconciles one ingester from the current watch caches.
async fn reconcile_ingester(key: Arc<IngesterKey>, state: Arc<State>) -> Result<Action, Error> {
    let ingester = key.ingester();
    let snapshot = state.stores.snapshot(&ingester);
    let started = Instant::now();
    let result = reconcile(&state.ctx, &snapshot).await;
    state.ctx.metrics.reconciled(started.elapsed(), result.as_ref().map(|_| ()));
    result?;
    state.failures.reset(&ingester);
    Ok(Action::requeue(RESYNC))
}

/// Retries a failed ingester with exponential backoff.
fn error_policy(key: Arc<IngesterKey>, error: &Error, state: Arc<State>) -> Action {
    let ingester = key.ingester();
    let delay = state.failures.record(&ingester);
    warn!(%ingester, %error, retry_in = ?delay, "Reconcile failed.");
    Action::requeue(delay)
}

/// Consecutive failed reconciles per ingester. An ingester's reconcile and its `error_policy` never run
/// while another reconcile of it does, so its count is never raced.
#[derive(Default)]
struct Failures(Mutex<HashMap<Ingester, u32>>);

impl Failures {
    /// Counts a failure; returns how long to wait before the retry.
    fn record(&self, ingester: &Ingester) -> Duration {
        let mut failures = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let attempts = failures.entry(ingester.clone()).or_default();
        *attempts = attempts.saturating_add(1);
        retry_delay(*attempts)
    }

    fn reset(&self, ingester: &Ingester) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(ingester);
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff()
}

/// The ingesters each watch event touches; watch errors are logged (the watch retries with backoff by
/// itself).
fn triggers<K, S>(events: S, mut touched: impl FnMut(&Event<K>) -> Vec<Ingester>) -> impl Stream<Item = Trigger>
where
    K: Resource<DynamicType = ()>,
    S: Stream<Item = watcher::Result<Event<K>>>,
{
    events.filter_map(move |event| {
        let trigger = match event {
            Ok(event) => {
                let ingesters = touched(&event);
                let reason = format!("{} event", K::kind(&()));
                (!ingesters.is_empty()).then_some(Trigger::Touched { ingesters, reason })
            }
            Err(error) => {
                warn!(kind = %K::kind(&()), %error, "Watch failed; retrying.");
                None
            }
        };
        future::ready(trigger)
    })
}

/// The ingester a ConfigMap or StatefulSet event concerns.
fn touched<K>(event: &Event<K>, ingester_of: fn(&K) -> Option<Ingester>) -> Vec<Ingester> {
    match event {
        Event::Apply(obj) | Event::InitApply(obj) | Event::Delete(obj) => ingester_of(obj).into_iter().collect(),
        Event::Init | Event::InitDone => vec![],
    }
}

/// 1 s, 2 s, 4 s ... up to 256 s.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.saturating_sub(1).min(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use http::{Method, Response};
    use kube::client::Body;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;
    use serde_json::{Value, json};
    use tower_test::mock::SendResponse;

    use crate::fixtures::{ApiServerVerifier, NAMESPACE, json_body, json_response, settled, timeout_after};
    use crate::metrics::Metrics;

    fn config_map(namespace: &str, name: &str, label: Option<&str>) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.to_owned());
        cm.metadata.namespace = Some(namespace.to_owned());
        cm.metadata.labels = label.map(|l| BTreeMap::from([(INGESTER_LABEL.to_owned(), l.to_owned())]));
        cm
    }

    #[test]
    fn only_the_streams_config_map_names_an_ingester() {
        let ingester = Ingester::new("ns", "arrowport");
        assert_eq!(config_map_ingester(&config_map("ns", "arrowport-streams", Some("arrowport"))), Some(ingester));
        // The chart may label the ingester's base config too; it is not the streams file.
        assert_eq!(config_map_ingester(&config_map("ns", "arrowport-config", Some("arrowport"))), None);
        assert_eq!(config_map_ingester(&config_map("ns", "arrowport-streams", None)), None);
    }

    #[test]
    fn moving_a_stream_touches_both_ingesters() {
        let mut tracker = StreamTracker::default();
        let a = ArrowportStream::test("s");
        assert_eq!(tracker.on_event(&Event::Apply(a.clone())), [Ingester::new("ns", "arrowport")]);
        let moved = a.with_ingester("other");
        assert_eq!(
            tracker.on_event(&Event::Apply(moved.clone())),
            [Ingester::new("ns", "arrowport"), Ingester::new("ns", "other")]
        );
        assert_eq!(tracker.on_event(&Event::Delete(moved)), [Ingester::new("ns", "other")]);
    }

    #[test]
    fn streams_gone_in_a_relist_touch_their_ingester() {
        let mut tracker = StreamTracker::default();
        tracker.on_event(&Event::Apply(ArrowportStream::test("kept")));
        tracker.on_event(&Event::Apply(ArrowportStream::test("gone").with_ingester("other")));
        assert!(tracker.on_event(&Event::Init).is_empty());
        tracker.on_event(&Event::InitApply(ArrowportStream::test("kept")));
        assert_eq!(tracker.on_event(&Event::InitDone), [Ingester::new("ns", "other")]);
        assert_eq!(tracker.ingester_of.len(), 1);
    }

    #[test]
    fn snapshot_gathers_one_ingesters_view() {
        let (streams, mut stream_writer) = reflector::store();
        let (config_maps, mut cm_writer) = reflector::store();
        let (ingesters, mut sts_writer) = reflector::store();
        for stream in [ArrowportStream::test("mine"), ArrowportStream::test("elsewhere").with_ingester("other")] {
            stream_writer.apply_watcher_event(&Event::Apply(stream));
        }
        let mut stream_in_other_ns = ArrowportStream::test("foreign");
        stream_in_other_ns.metadata.namespace = Some("other-ns".to_owned());
        stream_writer.apply_watcher_event(&Event::Apply(stream_in_other_ns));
        let mut cm = config_map("ns", "arrowport-streams", Some("arrowport"));
        cm.data = Some(BTreeMap::from([(STREAMS_KEY.to_owned(), "streams: {}\n".to_owned())]));
        cm_writer.apply_watcher_event(&Event::Apply(cm));
        let mut sts = StatefulSet::default();
        sts.metadata.name = Some("whatever".to_owned());
        sts.metadata.namespace = Some("ns".to_owned());
        sts.metadata.labels = Some(BTreeMap::from([(INGESTER_LABEL.to_owned(), "arrowport".to_owned())]));
        sts_writer.apply_watcher_event(&Event::Apply(sts));
        let stores = Stores { streams, config_maps, ingesters };

        let snapshot = stores.snapshot(&Ingester::new("ns", "arrowport"));
        let names: Vec<_> = snapshot.streams.iter().map(|s| s.name_any()).collect();
        assert_eq!(names, ["mine"]);
        assert!(snapshot.ingester_found);
        assert_eq!(
            snapshot.config_map,
            Some(ConfigMapState { streams_yaml: Some("streams: {}\n".to_owned()), labelled: true })
        );
        let other = stores.snapshot(&Ingester::new("ns", "other"));
        assert!(!other.ingester_found && other.config_map.is_none());
        assert_eq!(
            stores.all_ingesters().into_iter().collect::<Vec<_>>(),
            [Ingester::new("ns", "arrowport"), Ingester::new("ns", "other"), Ingester::new("other-ns", "arrowport")]
        );
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(100), Duration::from_secs(256));
    }

    #[test]
    fn failures_back_off_per_ingester_until_a_success() {
        let failures = Failures::default();
        let (a, b) = (Ingester::new("ns", "a"), Ingester::new("ns", "b"));
        assert_eq!(failures.record(&a), Duration::from_secs(1));
        assert_eq!(failures.record(&a), Duration::from_secs(2));
        assert_eq!(failures.record(&b), Duration::from_secs(1));
        assert_eq!(failures.record(&a), Duration::from_secs(4));
        failures.reset(&a);
        assert_eq!(failures.record(&a), Duration::from_secs(1));
        assert_eq!(failures.record(&b), Duration::from_secs(2));
    }

    #[test]
    fn ingester_keys_name_their_ingester() {
        let ingester = Ingester::new("data", "arrowport");
        let key = IngesterKey::new(&ingester);
        assert_eq!(key.ingester(), ingester);
        assert_eq!(ObjectRef::from_obj(&key).to_string(), "Ingester.internal.arrowport.dev/arrowport.data");
    }

    #[tokio::test]
    async fn a_settled_ingester_makes_no_requests_and_is_resynced_later() {
        let (ctx, server) = Context::test();
        let snap = settled(vec![ArrowportStream::test("lineitem")]);
        let mut cm = config_map(NAMESPACE, "arrowport-streams", Some("arrowport"));
        cm.data = snap
            .config_map
            .as_ref()
            .map(|c| BTreeMap::from([(STREAMS_KEY.to_owned(), c.streams_yaml.clone().unwrap())]));
        let streams = snap.streams.iter().map(|s| (**s).clone()).collect();
        let stores = stores(streams, vec![cm], vec![statefulset("arrowport")]);
        let state = Arc::new(State { ctx, stores, failures: Failures::default() });
        let verifier = tokio::spawn(server.done());
        let key = Arc::new(IngesterKey::new(&snap.ingester));
        assert_eq!(reconcile_ingester(key, state.clone()).await.unwrap(), Action::requeue(RESYNC));
        drop(state);
        timeout_after(verifier).await;
    }

    /// The whole controller (watches, triggers, runner) against an API server that leaves the first
    /// ConfigMap write hanging and then fails it: the other ingester is reconciled in the meantime, and
    /// the failed one is retried after the backoff.
    #[tokio::test]
    async fn a_hanging_or_failing_ingester_holds_up_no_other_and_is_retried_with_backoff() {
        let (mut ctx, server) = Context::test();
        let mut registry = Registry::default();
        ctx.metrics = Metrics::register(&mut registry);
        let operator = tokio::spawn(run(ctx.client.clone(), Some(NAMESPACE), ctx, None));
        let mut api = FakeApiServer {
            server,
            streams: vec![ArrowportStream::test("a"), ArrowportStream::test("b").with_ingester("other")],
            statefulsets: vec![statefulset("arrowport"), statefulset("other")],
            open_watches: Vec::new(),
        };
        let writes_of = |ingester: &str| {
            let stream = if ingester == "arrowport" { "a" } else { "b" };
            [
                Write::ConfigMap {
                    name: format!("{ingester}-streams"),
                    streams_yaml: format!("streams:\n  {stream}:\n    target_table: {stream}\n"),
                },
                Write::Status { stream: stream.to_owned(), reason: "Accepted".to_owned() },
                Write::Event { stream: stream.to_owned(), reason: "Accepted".to_owned() },
            ]
        };

        let scenario = async {
            // Both ingesters start at once; whichever writes its ConfigMap first gets no answer for now.
            let (held, _, held_reply) = api.next_write().await;
            let Write::ConfigMap { name, .. } = &held else { panic!("expected a ConfigMap write first, got {held:?}") };
            let (slow, fast) =
                if name == "arrowport-streams" { ("arrowport", "other") } else { ("other", "arrowport") };
            assert_eq!(held, writes_of(slow)[0]);

            // The other ingester is reconciled to the end while that call hangs.
            let mut writes = Vec::new();
            for _ in 0..3 {
                writes.push(api.accept_next_write().await);
            }
            assert_eq!(writes, writes_of(fast));

            // The hanging call fails: the ingester is retried after the backoff's first step (1 s).
            let status = kube::core::Status::failure("etcdserver: request timed out", "InternalError").with_code(500);
            held_reply.send_response(json_response(500, &serde_json::to_value(status).unwrap()));
            let failed = Instant::now();
            let mut writes = vec![api.accept_next_write().await];
            let retried_after = failed.elapsed();
            assert!(retried_after >= Duration::from_secs(1), "retried after {retried_after:?}");
            let mut text = String::new();
            encode(&mut text, &registry).unwrap();
            assert!(text.contains("arrowport_operator_reconciles_total 2"), "{text}");
            assert!(text.contains(r#"arrowport_operator_reconcile_failures_total{reason="api_error"} 1"#), "{text}");
            for _ in 0..2 {
                writes.push(api.accept_next_write().await);
            }
            assert_eq!(writes, writes_of(slow));
        };
        tokio::time::timeout(Duration::from_secs(20), scenario)
            .await
            .expect("the scenario timed out: one ingester's reconcile waited for another's");
        operator.abort();
    }

    fn statefulset(ingester: &str) -> StatefulSet {
        let mut sts = StatefulSet::default();
        sts.metadata.name = Some(ingester.to_owned());
        sts.metadata.namespace = Some(NAMESPACE.to_owned());
        sts.metadata.labels = Some(BTreeMap::from([(INGESTER_LABEL.to_owned(), ingester.to_owned())]));
        sts
    }

    fn stores(streams: Vec<ArrowportStream>, config_maps: Vec<ConfigMap>, statefulsets: Vec<StatefulSet>) -> Stores {
        fn store<K: Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> Store<K> {
            let (store, mut writer) = reflector::store();
            for object in objects {
                writer.apply_watcher_event(&Event::Apply(object));
            }
            store
        }
        Stores { streams: store(streams), config_maps: store(config_maps), ingesters: store(statefulsets) }
    }

    /// A write the operator sent, as the API server saw it.
    #[derive(Debug, PartialEq)]
    enum Write {
        ConfigMap { name: String, streams_yaml: String },
        Status { stream: String, reason: String },
        Event { stream: String, reason: String },
    }

    /// Plays the API server for the whole controller: lists these streams, no ConfigMaps and these
    /// StatefulSets, keeps the watches open without events, and hands each write to the test.
    struct FakeApiServer {
        server: ApiServerVerifier,
        streams: Vec<ArrowportStream>,
        statefulsets: Vec<StatefulSet>,
        open_watches: Vec<SendResponse<Response<Body>>>,
    }

    impl FakeApiServer {
        /// Serves the watches until the next write comes; returns it, its body and its unanswered reply.
        async fn next_write(&mut self) -> (Write, Value, SendResponse<Response<Body>>) {
            loop {
                let (request, reply) = self.server.any_request().await.expect("the operator stopped");
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                if method == Method::GET {
                    if request.uri().query().unwrap_or_default().contains("watch=true") {
                        self.open_watches.push(reply);
                        continue;
                    }
                    let items: Vec<Value> = match path.rsplit('/').next() {
                        Some("arrowportstreams") => {
                            self.streams.iter().map(|s| serde_json::to_value(s).unwrap()).collect()
                        }
                        Some("configmaps") => Vec::new(),
                        Some("statefulsets") => {
                            self.statefulsets.iter().map(|s| serde_json::to_value(s).unwrap()).collect()
                        }
                        _ => panic!("unexpected GET {}", request.uri()),
                    };
                    let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items});
                    reply.send_response(json_response(200, &list));
                    continue;
                }
                let body = json_body(request).await;
                let segments: Vec<&str> = path.split('/').collect();
                let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
                let write = match (method, segments.as_slice()) {
                    (Method::PATCH, [.., "configmaps", name]) => {
                        Write::ConfigMap { name: (*name).to_owned(), streams_yaml: text(&body["data"][STREAMS_KEY]) }
                    }
                    (Method::PATCH, [.., "arrowportstreams", stream, "status"]) => Write::Status {
                        stream: (*stream).to_owned(),
                        reason: text(&body["status"]["conditions"][0]["reason"]),
                    },
                    (Method::POST, [.., "events"]) => {
                        Write::Event { stream: text(&body["regarding"]["name"]), reason: text(&body["reason"]) }
                    }
                    (method, _) => panic!("unexpected {method} {path}"),
                };
                return (write, body, reply);
            }
        }

        /// Takes the next write and answers it as a successful one.
        async fn accept_next_write(&mut self) -> Write {
            let (write, body, reply) = self.next_write().await;
            let (code, answer) = match &write {
                Write::Status { stream, .. } => {
                    let status = serde_json::from_value(body["status"].clone()).unwrap();
                    (200, serde_json::to_value(ArrowportStream::test(stream).with_status(status)).unwrap())
                }
                Write::Event { .. } => (201, body),
                Write::ConfigMap { .. } => (200, body),
            };
            reply.send_response(json_response(code, &answer));
            write
        }
    }
}
