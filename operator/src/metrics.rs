//! Operator metrics, served as Prometheus text on `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PollLabels {
    outcome: &'static str,
}

/// Handles to the operator's metrics; clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
    polls: Family<PollLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under the `arrowport_operator` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            // 1 ms to ~16 s: a reconcile is a handful of API calls.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            leader: Gauge::default(),
            polls: Family::default(),
        };
        let registry = registry.sub_registry_with_prefix("arrowport_operator");
        registry.register(
            "reconciles",
            "Reconciles of one ingester's streams, successful or not",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by reason (forbidden, not_found, conflict, invalid, api_error, connection, render)",
            metrics.failures.clone(),
        );
        registry.register("reconcile_duration_seconds", "Time one reconcile took", metrics.duration.clone());
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles, 0 while it waits",
            metrics.leader.clone(),
        );
        registry.register(
            "ingester_polls",
            "Stream-health polls of an ingester's GET /streams by outcome (ok, unreachable, refused)",
            metrics.polls.clone(),
        );
        metrics
    }

    pub fn reconciled(&self, elapsed: Duration, result: Result<(), &Error>) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if let Err(error) = result {
            self.failures.get_or_create(&FailureLabels { reason: error.metric_label() }).inc();
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Counts one poll of an ingester's streams: `ok`, `unreachable` or `refused`.
    pub fn ingester_polled(&self, outcome: &'static str) {
        self.polls.get_or_create(&PollLabels { outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn failures_are_counted_by_reason() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.reconciled(Duration::from_millis(3), Ok(()));
        let forbidden =
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status::failure("no", "Forbidden").with_code(403))));
        metrics.reconciled(Duration::from_millis(5), Err(&forbidden));
        metrics.set_leader(true);
        metrics.ingester_polled("unreachable");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("arrowport_operator_reconciles_total 2"), "{text}");
        assert!(text.contains(r#"arrowport_operator_reconcile_failures_total{reason="forbidden"} 1"#), "{text}");
        assert!(text.contains("arrowport_operator_reconcile_duration_seconds_count 2"), "{text}");
        assert!(text.contains("arrowport_operator_leader 1"), "{text}");
        assert!(text.contains(r#"arrowport_operator_ingester_polls_total{outcome="unreachable"} 1"#), "{text}");
    }
}
