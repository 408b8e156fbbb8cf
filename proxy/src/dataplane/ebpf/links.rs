//! Which interfaces carry the programs, and the watcher thread that follows pod veths as they come and go.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::SchedClassifier;

use super::loader::{self, Attacher, Role};
use super::EbpfOptions;

/// Attachment state shared with the interface watcher thread.
pub(super) struct Links {
    pub(super) opts: EbpfOptions,
    /// Veths that are neither pod interfaces (by name) nor uplinks, as of the last scan.
    pub(super) unmatched: BTreeSet<String>,
    /// Their number, read by the metrics.
    pub(super) unmatched_count: Arc<std::sync::atomic::AtomicU64>,
    pub(super) attacher: Attacher,
    /// Handles of the pinned programs, per role.
    pub(super) progs: BTreeMap<Role, SchedClassifier>,
    /// The node's addresses: interfaces holding one are uplinks (unless configured explicitly).
    pub(super) node_addresses: Vec<std::net::IpAddr>,
}

impl Links {
    /// Attaches to pod veths and uplinks that appeared since the last call; forgets vanished ones.
    pub(super) fn scan(&mut self) {
        let present = loader::interfaces();
        self.attacher.forget_missing(&present);
        let uplinks = if !self.opts.uplinks.is_empty() {
            self.opts.uplinks.clone()
        } else {
            let mut u = loader::interfaces_with_addresses(&self.node_addresses);
            if u.is_empty() {
                u = loader::default_route_interfaces();
            }
            u
        };
        let mut unmatched = BTreeSet::new();
        for (name, ifindex) in &present {
            let is_pod = self.opts.pod_interfaces.contains(name)
                || self
                    .opts
                    .pod_interface_prefixes
                    .iter()
                    .any(|p| !p.is_empty() && name.starts_with(p.as_str()));
            let role = if is_pod {
                Role::Pod
            } else if uplinks.contains(name) {
                Role::Netdev
            } else {
                // A veth that is neither a pod's (by name) nor an uplink: most likely a pod of a CNI whose prefix is
                // not configured. Said once per interface, counted in the metrics and shown by `status`.
                if self.unmatched.contains(name) || loader::driver(name).as_deref() == Some("veth") {
                    if !self.unmatched.contains(name) {
                        tracing::warn!(
                            interface = %name,
                            prefixes = ?self.opts.pod_interface_prefixes,
                            "a veth matching no --ebpf-pod-interface-prefixes: traffic from behind it gets no Service \
                             translation (add its prefix, or name it in --ebpf-pod-interfaces)"
                        );
                    }
                    unmatched.insert(name.clone());
                }
                continue;
            };
            let mut roles = vec![role];
            if !self.opts.bypass_netfilter {
                roles.push(Role::Egress);
            }
            for role in roles {
                let Some(prog) = self.progs.get_mut(&role) else {
                    continue;
                };
                // One interface failing (it vanished meanwhile, ...) must not stop the others.
                if let Err(e) = self.attacher.attach(prog, name, *ifindex, role) {
                    tracing::warn!(interface = %name, error = %format!("{e:#}"), "cannot attach");
                }
            }
        }
        self.unmatched_count
            .store(unmatched.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.unmatched = unmatched;
    }
}

/// Follows pod veths as pods come and go: rescans the interfaces every `WATCH_INTERVAL`, so a new
/// pod's traffic is translated within that time, without waiting for a Service change.
pub(super) struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WATCH_INTERVAL: Duration = Duration::from_millis(200);

impl Watcher {
    pub(super) fn start(links: Arc<Mutex<Links>>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The thread inherits the network namespace of the calling thread.
        let thread = std::thread::Builder::new()
            .name("orca-ebpf-ifwatch".into())
            .spawn(move || {
                // Link notifications wake the scan at once (a new pod's veth is attached before the pod sends its
                // first packet); the periodic scan stays as the fallback when they cannot be had.
                let events = loader::LinkEvents::open()
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "no link notifications: new pod interfaces are found by the periodic scan only")
                    })
                    .ok();
                while !flag.load(Ordering::Relaxed) {
                    match &events {
                        Some(ev) => ev.wait(WATCH_INTERVAL),
                        None => std::thread::sleep(WATCH_INTERVAL),
                    }
                    if let Ok(mut l) = links.lock() {
                        l.scan();
                    }
                }
            })
            .context("starting the interface watcher")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
