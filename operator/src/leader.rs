//! Leader election through a `coordination.k8s.io` Lease, so that two replicas never both write.
//!
//! Expiry is judged by how long *this* replica has seen the Lease unchanged (its resourceVersion), not
//! by comparing `renewTime` with the local clock, so clock skew between nodes cannot cause a takeover.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a Lease stays valid without renewal.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// The leader gives up if it could not renew for this long, well before others may take over.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the leader renews and followers retry.
const RETRY_PERIOD: Duration = Duration::from_secs(2);

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    TakeOver,
    Renew,
    Wait { holder: String },
}

/// What to do with an existing Lease, given how long it has been seen unchanged.
fn decide(lease: &Lease, identity: &str, unchanged_for: Duration) -> Decision {
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.filter(|h| !h.is_empty()) {
        Some(holder) if holder == identity => Decision::Renew,
        None => Decision::TakeOver,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(LEASE_DURATION, Duration::from_secs);
            if unchanged_for > duration { Decision::TakeOver } else { Decision::Wait { holder } }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read or write Lease {lease}: {source}")]
    Api {
        lease: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost Lease {lease} ({why})")]
    Lost { lease: String, why: String },
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The Lease's resourceVersion when first seen, and when.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            observed: Mutex::new(None),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), LeaseError> {
        let mut waiting_for = None;
        loop {
            match self.try_lead().await {
                Ok(Ok(())) => {
                    info!(lease = %self.name, identity = %self.identity, "Became the leader.");
                    return Ok(());
                }
                Ok(Err(holder)) => {
                    if waiting_for.as_ref() != Some(&holder) {
                        info!(lease = %self.name, %holder, "Another replica leads; waiting.");
                        waiting_for = Some(holder);
                    }
                }
                Err(error) => {
                    warn!(lease = %self.name, %error, "Leader election failed; retrying.")
                }
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    /// Renews the Lease until that fails; returns why leadership ended.
    pub async fn hold(&self) -> LeaseError {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            match self.try_lead().await {
                Ok(Ok(())) => renewed = Instant::now(),
                Ok(Err(holder)) => {
                    return LeaseError::Lost { lease: self.name.clone(), why: format!("{holder} holds it now") };
                }
                Err(error) if renewed.elapsed() > RENEW_DEADLINE => {
                    return LeaseError::Lost {
                        lease: self.name.clone(),
                        why: format!("not renewed for {RENEW_DEADLINE:?}: {error}"),
                    };
                }
                Err(error) => {
                    warn!(lease = %self.name, %error, "Could not renew the Lease; retrying.")
                }
            }
        }
    }

    /// Hands the Lease over at shutdown so that another replica need not wait for it to expire.
    pub async fn release(&self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            self.api.replace(&self.name, &PostParams::default(), &lease).await.map(drop)
        }
        .await;
        match result {
            Ok(()) => info!(lease = %self.name, "Released the Lease."),
            Err(error) => {
                warn!(lease = %self.name, %error, "Could not release the Lease; it expires by itself.")
            }
        }
    }

    /// One election round: `Ok(Ok(()))` if this replica now holds the Lease, `Ok(Err(holder))` if
    /// another does.
    async fn try_lead(&self) -> Result<Result<(), String>, LeaseError> {
        let api_error = |source| LeaseError::Api { lease: self.name.clone(), source };
        let current = self.api.get_opt(&self.name).await.map_err(api_error)?;
        let unchanged_for = self.unchanged_for(current.as_ref());
        let now = MicroTime(Timestamp::now());
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: kube::api::ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let decision = decide(&lease, &self.identity, unchanged_for);
                if let Decision::Wait { holder } = decision {
                    return Ok(Err(holder));
                }
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
                spec.renew_time = Some(now);
                // The resourceVersion makes this a compare-and-swap: a racing replica gets 409.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(lease) => {
                self.unchanged_for(Some(&lease));
                Ok(Ok(()))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Err("a racing replica".to_owned())),
            Err(source) => Err(api_error(source)),
        }
    }

    /// How long this replica has seen `lease` at its current resourceVersion.
    fn unchanged_for(&self, lease: Option<&Lease>) -> Duration {
        let version = lease.and_then(|l| l.resource_version()).unwrap_or_default();
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match &*observed {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                *observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let fresh = Duration::from_secs(1);
        let stale = Duration::from_secs(16);
        assert_eq!(decide(&lease(Some("me")), "me", stale), Decision::Renew);
        assert_eq!(decide(&lease(Some("other")), "me", fresh), Decision::Wait { holder: "other".to_owned() });
        assert_eq!(decide(&lease(Some("other")), "me", stale), Decision::TakeOver);
        // A released Lease is free at once.
        assert_eq!(decide(&lease(None), "me", fresh), Decision::TakeOver);
        assert_eq!(decide(&lease(Some("")), "me", fresh), Decision::TakeOver);
    }

    type Mock = tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

    const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";

    fn elector() -> (LeaderElector, Mock) {
        let (service, handle) = tower_test::mock::pair();
        (LeaderElector::new(Client::new(service, "ns"), "ns", "arrowport-operator", "me"), handle)
    }

    /// Expects `method path`, answers `code` with `answer` (or the request body) and returns the body.
    async fn expect(
        handle: &mut Mock,
        method: &str,
        path: &str,
        code: u16,
        answer: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!((request.method().as_str(), request.uri().to_string()), (method, path.to_owned()));
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let reply = answer.unwrap_or_else(|| body.clone());
        send.send_response(
            http::Response::builder().status(code).body(serde_json::to_vec(&reply).unwrap().into()).unwrap(),
        );
        body
    }

    fn not_found() -> serde_json::Value {
        serde_json::to_value(kube::core::Status::failure("not found", "NotFound").with_code(404)).unwrap()
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let (elector, mut handle) = elector();
        let server = tokio::spawn(async move {
            expect(&mut handle, "GET", &format!("{LEASE_PATH}/arrowport-operator"), 404, Some(not_found())).await;
            let created = expect(&mut handle, "POST", &format!("{LEASE_PATH}?"), 201, None).await;
            assert_eq!(created["spec"]["holderIdentity"], "me");
            assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
        });
        assert_eq!(elector.try_lead().await.unwrap(), Ok(()));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn waits_for_a_live_holder_and_takes_over_a_released_lease() {
        let (elector, mut handle) = elector();
        let mut held: serde_json::Value = serde_json::to_value(lease(Some("other"))).unwrap();
        held["metadata"] = serde_json::json!({"name": "arrowport-operator", "resourceVersion": "7"});
        let mut released = held.clone();
        released["spec"]["holderIdentity"] = serde_json::Value::Null;
        released["metadata"]["resourceVersion"] = "8".into();
        let server = tokio::spawn(async move {
            let path = format!("{LEASE_PATH}/arrowport-operator");
            expect(&mut handle, "GET", &path, 200, Some(held)).await;
            expect(&mut handle, "GET", &path, 200, Some(released)).await;
            let replaced = expect(&mut handle, "PUT", &format!("{path}?"), 200, None).await;
            assert_eq!(replaced["spec"]["holderIdentity"], "me");
            assert_eq!(replaced["spec"]["leaseTransitions"], 1);
            // Compare-and-swap on the version that was read.
            assert_eq!(replaced["metadata"]["resourceVersion"], "8");
        });
        assert_eq!(elector.try_lead().await.unwrap(), Err("other".to_owned()));
        assert_eq!(elector.try_lead().await.unwrap(), Ok(()));
        server.await.unwrap();
    }
}
