//! Watches Services, EndpointSlices and this node's Node object, feeding the change tracker.
//!
//! kube-runtime's watcher re-lists on `410 Gone` and reconnects with backoff after errors or an apiserver restart.
//! A re-list never empties the dataplane: objects are only forgotten when the new list no longer holds them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::model::endpoints::slice_key;
use crate::model::service::service_name;
use crate::model::tracker::ChangeTracker;
use crate::model::{NodeInfo, LABEL_TOPOLOGY_ZONE, PROXY_LABEL_SELECTOR};

/// What the watchers keep for the sync runner: the change tracker, whether each resource has been listed once,
/// and the Node's eligibility; woken on every change.
#[derive(Clone)]
pub struct WatchState {
    pub tracker: Arc<Mutex<ChangeTracker>>,
    /// Woken on every change.
    pub changed: Arc<Notify>,
    synced: Arc<[AtomicBool; 3]>,
    synced_notify: Arc<Notify>,
    /// kube-proxy's NodeEligible for this node's latest Node object (false until it is seen).
    pub node_eligible: Arc<AtomicBool>,
}

impl WatchState {
    pub fn new(tracker: ChangeTracker) -> Self {
        Self {
            tracker: Arc::new(Mutex::new(tracker)),
            changed: Arc::new(Notify::new()),
            synced: Arc::new([AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false)]),
            synced_notify: Arc::new(Notify::new()),
            node_eligible: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Locks the tracker; a poisoned lock (a panic elsewhere) still yields the data.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ChangeTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_synced(&self, i: usize) {
        if !self.synced[i].swap(true, Ordering::SeqCst) {
            self.synced_notify.notify_waiters();
            self.changed.notify_one();
        }
    }

    /// Whether Services, EndpointSlices and the Node have each been listed once.
    pub fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::SeqCst))
    }

    /// Waits until the first list of every watched resource is in.
    pub async fn wait_synced(&self) {
        loop {
            let n = self.synced_notify.notified();
            if self.all_synced() {
                return;
            }
            n.await;
        }
    }
}

const SERVICES: usize = 0;
const SLICES: usize = 1;
const NODE: usize = 2;

/// The taint the Cluster Autoscaler puts on a node it is about to delete (kube-proxy's ToBeDeletedTaint).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// kube-proxy's NodeEligible: the Node has been seen, is not being deleted (no deletionTimestamp) and carries no
/// taint with the key [`TO_BE_DELETED_TAINT`] (whatever its value and effect).
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return false;
    };
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// Extracts what the agent needs from its Node object.
pub fn node_info(name: &str, node: Option<&Node>) -> NodeInfo {
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
        .cloned();
    let addresses = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .map(|a| a.iter().filter_map(|a| a.address.parse().ok()).collect())
        .unwrap_or_default();
    NodeInfo {
        name: name.to_string(),
        zone,
        addresses,
    }
}

fn watcher_config() -> watcher::Config {
    watcher::Config::default().labels(PROXY_LABEL_SELECTOR)
}

/// Runs the three watchers until the process ends. Errors are logged and retried with backoff.
pub async fn run(client: Client, node_name: String, shared: WatchState) {
    let svc = tokio::spawn(watch_kind::<Service>(Api::all(client.clone()), shared.clone()));
    let eps = tokio::spawn(watch_kind::<EndpointSlice>(Api::all(client.clone()), shared.clone()));
    let node = tokio::spawn(watch_node(Api::all(client), node_name, shared));
    let _ = tokio::join!(svc, eps, node);
}

/// How the change tracker takes one kind of object (Services, EndpointSlices).
trait Tracked:
    kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static
{
    type Key: Eq + std::hash::Hash + Send;
    /// Index into [`WatchState`]'s synced flags.
    const INDEX: usize;
    const KIND: &'static str;
    fn key(&self) -> Option<Self::Key>;
    fn updated(t: &mut ChangeTracker, o: &Self);
    fn deleted(t: &mut ChangeTracker, o: &Self);
    /// After a re-list: forget what the list no longer holds.
    fn retain(t: &mut ChangeTracker, listed: &HashSet<Self::Key>);
}

impl Tracked for Service {
    type Key = crate::model::ServiceName;
    const INDEX: usize = SERVICES;
    const KIND: &'static str = "Service";
    fn key(&self) -> Option<Self::Key> {
        service_name(self).ok()
    }
    fn updated(t: &mut ChangeTracker, o: &Self) {
        t.service_updated(o)
    }
    fn deleted(t: &mut ChangeTracker, o: &Self) {
        t.service_deleted(o)
    }
    fn retain(t: &mut ChangeTracker, listed: &HashSet<Self::Key>) {
        t.retain_services(listed)
    }
}

impl Tracked for EndpointSlice {
    type Key = (crate::model::ServiceName, String);
    const INDEX: usize = SLICES;
    const KIND: &'static str = "EndpointSlice";
    fn key(&self) -> Option<Self::Key> {
        slice_key(self).ok()
    }
    fn updated(t: &mut ChangeTracker, o: &Self) {
        t.slice_updated(o)
    }
    fn deleted(t: &mut ChangeTracker, o: &Self) {
        t.slice_deleted(o)
    }
    fn retain(t: &mut ChangeTracker, listed: &HashSet<Self::Key>) {
        t.retain_slices(listed)
    }
}

async fn watch_kind<K: Tracked>(api: Api<K>, shared: WatchState) {
    let mut listed = HashSet::new();
    let stream = watcher::watcher(api, watcher_config()).default_backoff();
    futures::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(ev)) => {
                let mut t = shared.lock();
                match ev {
                    Event::Init => listed.clear(),
                    Event::InitApply(o) => {
                        listed.extend(o.key());
                        K::updated(&mut t, &o);
                    }
                    Event::InitDone => {
                        K::retain(&mut t, &listed);
                        listed.clear();
                        drop(t);
                        shared.set_synced(K::INDEX);
                    }
                    Event::Apply(o) => K::updated(&mut t, &o),
                    Event::Delete(o) => K::deleted(&mut t, &o),
                }
                shared.changed.notify_one();
            }
            Ok(None) => return,
            Err(e) => tracing::warn!(kind = K::KIND, error = %e, "watch failed; retrying"),
        }
    }
}

async fn watch_node(api: Api<Node>, name: String, shared: WatchState) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, cfg).default_backoff();
    futures::pin_mut!(stream);
    let mut seen = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => seen = false,
            Ok(Event::InitApply(n)) | Ok(Event::Apply(n)) => {
                seen = true;
                shared.node_eligible.store(node_eligible(Some(&n)), Ordering::Relaxed);
                shared.lock().node_updated(node_info(&name, Some(&n)));
                shared.changed.notify_one();
            }
            Ok(Event::InitDone) => {
                if !seen {
                    shared.node_eligible.store(false, Ordering::Relaxed);
                    tracing::warn!(node = %name, "Node object not found; topology hints are ignored until it exists");
                }
                shared.set_synced(NODE);
            }
            Ok(Event::Delete(_)) => {
                shared.node_eligible.store(false, Ordering::Relaxed);
                shared.lock().node_updated(node_info(&name, None));
                shared.changed.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "Node watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn node_eligibility_is_kube_proxys() {
        assert!(!node_eligible(None), "a Node not seen yet is not eligible");
        assert!(node_eligible(Some(&node(
            serde_json::json!({"metadata": {"name": "a"}})
        ))));
        let other = node(serde_json::json!({"metadata": {"name": "a"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}));
        assert!(node_eligible(Some(&other)), "other taints do not matter");
        for effect in ["NoSchedule", "PreferNoSchedule", "NoExecute"] {
            let tainted = node(serde_json::json!({"metadata": {"name": "a"},
                "spec": {"taints": [{"key": "x", "effect": "NoSchedule"},
                                    {"key": TO_BE_DELETED_TAINT, "value": "1700000000", "effect": effect}]}}));
            assert!(!node_eligible(Some(&tainted)), "{effect}");
        }
        let deleting = node(serde_json::json!({"metadata": {"name": "a",
            "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["example.com/hold"]}}));
        assert!(!node_eligible(Some(&deleting)));
    }
}
