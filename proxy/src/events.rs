//! Kubernetes Events about this node, recorded as kube-proxy records them (cmd/kube-proxy/app/server.go): through
//! the events.k8s.io/v1 API, regarding the Node (`apiVersion: v1, kind: Node, name: <node>`, no namespace, so the
//! Event lives in `default`), with kube-proxy's reasons and its action `StartKubeProxy`:
//!
//! | type    | reason                          | note                                   | when                          |
//! |---------|---------------------------------|----------------------------------------|-------------------------------|
//! | Normal  | Starting                        | (none)                                 | the agent started (birth cry) |
//! | Warning | FailedToStartProxierHealthcheck | the listen error                       | the healthz port is taken     |
//! | Warning | FailedToStartMetricServer       | the listen error                       | the metrics port is taken     |
//! | Warning | DataplaneFallback (Orca's own)  | why eBPF could not run                 | eBPF fell back to iptables    |
//! | Warning | DataplaneDegraded (Orca's own)  | what is missing and what it breaks     | eBPF runs without a node need |
//!
//! The reporting controller is `orca-proxy` (instance `orca-proxy-<hostname>`, as kube-proxy uses
//! `kube-proxy-<hostname>`), so that during a migration an admin can tell which proxy an Event came from.
//!
//! Publishing never blocks or fails the agent: each Event is sent from its own task, retried like client-go's
//! broadcaster (up to 12 tries, 10 s apart) while the apiserver is unreachable, and given up (with a log line) on a
//! refusal such as 403 Forbidden.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

/// The reporting controller of Orca's Events.
pub const REPORTING_CONTROLLER: &str = "orca-proxy";
/// kube-proxy's action for the Events it records at start.
pub const ACTION_START: &str = "StartKubeProxy";
/// Orca's reason for an eBPF -> iptables fallback.
pub const REASON_FALLBACK: &str = "DataplaneFallback";
/// Orca's reason for an eBPF dataplane that runs without something it needs from the node.
pub const REASON_DEGRADED: &str = "DataplaneDegraded";

/// client-go's event broadcaster: tries per Event and the pause between them.
const MAX_TRIES: u32 = 12;
const RETRY_PAUSE: Duration = Duration::from_secs(10);
/// events.k8s.io/v1 limits: note 1 kB, reportingInstance 128 characters.
const MAX_NOTE: usize = 1024;
const MAX_INSTANCE: usize = 128;

/// The reference kube-proxy's Events carry for its Node.
pub fn node_ref(node_name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.into()),
        ..Default::default()
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// kube-proxy's birth cry.
pub fn starting() -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Starting".into(),
        note: None,
        action: ACTION_START.into(),
        secondary: None,
    }
}

/// The eBPF dataplane could not start and iptables runs instead.
pub fn dataplane_fallback(reason: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: REASON_FALLBACK.into(),
        note: Some(truncate(
            &format!("eBPF dataplane unavailable, using iptables: {reason}"),
            MAX_NOTE,
        )),
        action: ACTION_START.into(),
        secondary: None,
    }
}

/// The eBPF dataplane runs without something it needs from the node (a persistent bpffs, the cgroup2 root).
pub fn dataplane_degraded(d: &crate::dataplane::Degraded) -> Event {
    Event {
        type_: EventType::Warning,
        reason: REASON_DEGRADED.into(),
        note: Some(truncate(&format!("{}: {}", d.reason, d.message), MAX_NOTE)),
        action: ACTION_START.into(),
        secondary: None,
    }
}

/// The healthz (`metrics == false`) or metrics server cannot listen.
pub fn server_failed(metrics: bool, error: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: if metrics {
            "FailedToStartMetricServer"
        } else {
            "FailedToStartProxierHealthcheck"
        }
        .into(),
        note: Some(truncate(error, MAX_NOTE)),
        action: ACTION_START.into(),
        secondary: None,
    }
}

/// Whether a failed publish is worth another try: transport errors and 429/5xx are, other refusals are not.
fn retriable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code == 429 || s.code >= 500,
        _ => true,
    }
}

/// Records Events about one Node.
#[derive(Clone)]
pub struct NodeEvents {
    recorder: Recorder,
    node: ObjectReference,
}

impl NodeEvents {
    pub fn new(client: Client, node_name: &str) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let instance = if host.is_empty() {
            REPORTING_CONTROLLER.to_string()
        } else {
            truncate(&format!("{REPORTING_CONTROLLER}-{host}"), MAX_INSTANCE)
        };
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            node: node_ref(node_name),
        }
    }

    /// Publishes `ev` from a task of its own; the task returns whether the apiserver took it.
    pub fn publish(&self, ev: Event) -> tokio::task::JoinHandle<bool> {
        let (recorder, node) = (self.recorder.clone(), self.node.clone());
        tokio::spawn(async move {
            for attempt in 1..=MAX_TRIES {
                match recorder.publish(&ev, &node).await {
                    Ok(()) => {
                        tracing::debug!(reason = %ev.reason, "event recorded");
                        return true;
                    }
                    Err(e) if retriable(&e) && attempt < MAX_TRIES => {
                        tracing::debug!(reason = %ev.reason, attempt, error = %e, "recording an event failed; retrying");
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Err(e) => {
                        tracing::warn!(reason = %ev.reason, attempt, error = %e, "could not record an event");
                        return false;
                    }
                }
            }
            false
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_match_kube_proxys() {
        let s = starting();
        assert_eq!(
            (s.type_, s.reason.as_str(), s.action.as_str()),
            (EventType::Normal, "Starting", "StartKubeProxy")
        );
        assert!(s.note.is_none());
        let r = node_ref("node-a");
        assert_eq!(r.kind.as_deref(), Some("Node"));
        assert_eq!(r.api_version.as_deref(), Some("v1"));
        assert_eq!(r.name.as_deref(), Some("node-a"));
        assert!(r.namespace.is_none() && r.uid.is_none());
        let h = server_failed(false, "listen tcp 0.0.0.0:10256: bind: address already in use");
        assert_eq!(
            (h.type_, h.reason.as_str()),
            (EventType::Warning, "FailedToStartProxierHealthcheck")
        );
        assert_eq!(server_failed(true, "x").reason, "FailedToStartMetricServer");
    }

    #[test]
    fn fallback_note_carries_the_reason_within_the_limit() {
        let f = dataplane_fallback("loading the programs: Operation not permitted");
        assert_eq!((f.type_, f.reason.as_str()), (EventType::Warning, "DataplaneFallback"));
        assert_eq!(
            f.note.as_deref(),
            Some("eBPF dataplane unavailable, using iptables: loading the programs: Operation not permitted")
        );
        let long = "é".repeat(2000);
        let note = dataplane_fallback(&long).note.unwrap();
        assert!(note.len() <= MAX_NOTE && note.len() > MAX_NOTE - 4, "{}", note.len());
    }
}
