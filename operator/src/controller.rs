//! The reconcile loop. The unit of work is an ingester (namespace + name), not a single
//! ArrowportStream: all its streams share one ConfigMap, and deleting the last stream must still
//! rewrite it, which a per-object controller (it never sees deleted objects) cannot do without
//! finalizers. Watches on streams, the ConfigMaps and the ingesters' StatefulSets map each change to
//! the ingesters it touches; a deduplicating scheduler runs one reconcile per ingester at a time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::time::Duration;

use futures::channel::mpsc::{self, UnboundedSender};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::scheduler::{ScheduleRequest, debounced_scheduler};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector as reflect};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::crd::ArrowportStream;
use crate::plan::{ConfigMapState, Ingester, STREAMS_KEY, Snapshot};
use crate::reconcile::{Context, INGESTER_LABEL, reconcile};

/// Coalesces bursts (a `kubectl apply` of many streams) into one reconcile per ingester.
const DEBOUNCE: Duration = Duration::from_millis(100);

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
        // A writer is only dropped when its watch task ends, which happens when the loop is torn down.
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

/// Starts the watches and reconciles until the returned future is dropped.
pub async fn run(client: Client, namespace: Option<&str>, ctx: Context) {
    let mut tasks = JoinSet::new();
    let (queue_tx, queue_rx) = mpsc::unbounded();

    let (streams, writer) = reflector::store();
    let mut tracker = StreamTracker::default();
    let stream_events = reflect(writer, watcher(api(&client, namespace), watcher::Config::default()));
    tasks.spawn(forward(stream_events, queue_tx.clone(), move |e| tracker.on_event(e)));

    // Only ConfigMaps carrying the ingester label; other ConfigMaps never concern the operator.
    let labelled = watcher::Config::default().labels(INGESTER_LABEL);
    let (config_maps, writer) = reflector::store();
    let config_map_events = reflect(writer, watcher(api(&client, namespace), labelled.clone()));
    tasks.spawn(forward(config_map_events, queue_tx.clone(), |e| touched(e, config_map_ingester)));

    let (ingesters, writer) = reflector::store();
    let ingester_events = reflect(writer, watcher(api(&client, namespace), labelled));
    tasks.spawn(forward(ingester_events, queue_tx.clone(), |e| touched(e, statefulset_ingester)));

    let stores = Stores { streams, config_maps, ingesters };
    info!("Waiting for the watches to list streams, ConfigMaps and ingesters.");
    stores.wait_until_ready().await;
    info!("Watches are in sync; reconciling.");
    // A full pass at start: ingesters whose last stream was deleted while no operator ran.
    for ingester in stores.all_ingesters() {
        schedule(&queue_tx, ingester, Duration::ZERO);
    }

    let mut queue = debounced_scheduler(queue_rx, DEBOUNCE);
    let mut failures: HashMap<Ingester, u32> = HashMap::new();
    while let Some(ingester) = queue.next().await {
        let snapshot = stores.snapshot(&ingester);
        let started = Instant::now();
        let result = reconcile(&ctx, &snapshot).await;
        ctx.metrics.reconciled(started.elapsed(), result.as_ref().map(|_| ()));
        match result {
            Ok(()) => {
                failures.remove(&ingester);
            }
            Err(error) => {
                let attempts = failures.entry(ingester.clone()).or_default();
                *attempts += 1;
                let delay = retry_delay(*attempts);
                warn!(%ingester, %error, retry_in = ?delay, "Reconcile failed.");
                schedule(&queue_tx, ingester, delay);
            }
        }
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

/// Forwards the ingesters each watch event touches to the queue; logs watch errors (the watch retries
/// with backoff by itself).
async fn forward<K, S>(
    events: S,
    queue: UnboundedSender<ScheduleRequest<Ingester>>,
    mut touched: impl FnMut(&Event<K>) -> Vec<Ingester>,
) where
    K: Resource<DynamicType = ()>,
    S: Stream<Item = watcher::Result<Event<K>>>,
{
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                for ingester in touched(&event) {
                    schedule(&queue, ingester, Duration::ZERO);
                }
            }
            Err(error) => warn!(kind = %K::kind(&()), %error, "Watch failed; retrying."),
        }
    }
}

/// The ingester a ConfigMap or StatefulSet event concerns.
fn touched<K>(event: &Event<K>, ingester_of: fn(&K) -> Option<Ingester>) -> Vec<Ingester> {
    match event {
        Event::Apply(obj) | Event::InitApply(obj) | Event::Delete(obj) => ingester_of(obj).into_iter().collect(),
        Event::Init | Event::InitDone => vec![],
    }
}

fn schedule(queue: &UnboundedSender<ScheduleRequest<Ingester>>, ingester: Ingester, delay: Duration) {
    // Sending fails only once the loop is gone, when there is nothing left to schedule for.
    let _ = queue.unbounded_send(ScheduleRequest { message: ingester, run_at: Instant::now() + delay });
}

/// 1 s, 2 s, 4 s ... up to 256 s.
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1 << attempts.saturating_sub(1).min(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
}
