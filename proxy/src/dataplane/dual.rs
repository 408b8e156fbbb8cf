//! Dual-stack: one dataplane per IP family behind one [`Dataplane`], as kube-proxy's meta-proxier runs an IPv4
//! and an IPv6 proxier side by side.
//!
//! iptables mode: the IPv4 dataplane drives `iptables`, the IPv6 one `ip6tables` (the eBPF dataplane serves both
//! families itself and is not wrapped). Each family's dataplane programs only the addresses, endpoints and CIDRs of
//! its family, from the same desired state.
//!
//! Every sync reaches the IPv4 dataplane (its partial sync also does per-sync work of its own: node facts,
//! terminating-endpoint hand-overs, the canary check). A partial sync skips the IPv6 one only when the diff changes
//! service ports and none of them is, or was, of IPv6, nothing failed there before and the node is the same: an
//! IPv4-only change costs no `ip6tables-restore`. The periodic sync (an empty
//! diff: hooks are re-checked) and full syncs (start-up, after an error) always run both.

use std::collections::HashSet;

use super::{Dataplane, Degraded, ProxyMode, SyncStats};
use crate::model::state::Snapshot;
use crate::model::tracker::Diff;
use crate::model::{IpFamily, NodeInfo, ServicePortName};

/// One family's dataplane and what it programmed.
struct Family {
    family: IpFamily,
    dp: Box<dyn Dataplane>,
    /// The service ports with an address of this family in the desired state of its last sync.
    ports: HashSet<ServicePortName>,
    /// The last sync left something to retry (a service port it could not program, a conntrack cleanup).
    retry: bool,
    /// Every sync reaches it (the IPv4 dataplane).
    always: bool,
    /// The node as of its last sync.
    node: Option<NodeInfo>,
}

impl Family {
    fn new(family: IpFamily, dp: Box<dyn Dataplane>) -> Self {
        Self {
            family,
            dp,
            ports: HashSet::new(),
            retry: false,
            always: family == IpFamily::V4,
            node: None,
        }
    }

    /// Whether this family's dataplane has anything to do in a partial sync of `diff` on `node`.
    fn touched_by(&self, diff: &Diff, node: &NodeInfo) -> bool {
        self.always
            || self.retry
            || diff.is_empty()
            || self.node.as_ref() != Some(node)
            || diff
                .upserted
                .iter()
                .any(|s| s.port.has_family(self.family) || self.ports.contains(s.name()))
            || diff.removed.iter().any(|n| self.ports.contains(n))
    }

    fn record(&mut self, desired: &Snapshot, node: &NodeInfo, stats: &SyncStats) {
        self.node = Some(node.clone());
        self.ports = desired
            .iter()
            .filter(|(_, s)| s.port.has_family(self.family))
            .map(|(n, _)| n.clone())
            .collect();
        self.retry = stats.failed_service_ports > 0 || stats.conntrack_cleanup_failed;
    }
}

/// An IPv4 and an IPv6 dataplane as one.
pub struct DualStack {
    v4: Family,
    v6: Family,
}

impl DualStack {
    pub fn new(v4: Box<dyn Dataplane>, v6: Box<dyn Dataplane>) -> Self {
        Self {
            v4: Family::new(IpFamily::V4, v4),
            v6: Family::new(IpFamily::V6, v6),
        }
    }

    fn both(&mut self) -> [&mut Family; 2] {
        [&mut self.v4, &mut self.v6]
    }
}

/// Adds up two families' sync results.
fn sum(a: SyncStats, b: SyncStats) -> SyncStats {
    SyncStats {
        objects_written: a.objects_written + b.objects_written,
        // A dual-stack service port is one service port to the agent, programmed by both.
        service_ports: a.service_ports.max(b.service_ports),
        failed_service_ports: a.failed_service_ports + b.failed_service_ports,
        conntrack_cleanup_failed: a.conntrack_cleanup_failed || b.conntrack_cleanup_failed,
    }
}

impl Dataplane for DualStack {
    fn mode(&self) -> ProxyMode {
        self.v4.dp.mode()
    }

    fn full_sync(&mut self, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<SyncStats> {
        let mut total = SyncStats::default();
        let mut first_error = None;
        // Both run even when one fails: one family's trouble must not leave the other unprogrammed.
        for f in self.both() {
            match f.dp.full_sync(desired, node) {
                Ok(st) => {
                    f.record(desired, node, &st);
                    total = sum(total, st);
                }
                Err(e) => {
                    let e = e.context(format!("{} dataplane", f.family));
                    tracing::error!(error = %format!("{e:#}"), family = %f.family, "full sync failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn apply(&mut self, diff: &Diff, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<SyncStats> {
        let mut total = SyncStats::default();
        let mut first_error = None;
        for f in self.both() {
            if !f.touched_by(diff, node) {
                // Nothing of this family changed; its service ports are still the desired ones.
                total.service_ports = total.service_ports.max(f.ports.len());
                continue;
            }
            match f.dp.apply(diff, desired, node) {
                Ok(st) => {
                    f.record(desired, node, &st);
                    total = sum(total, st);
                }
                Err(e) => {
                    let e = e.context(format!("{} dataplane", f.family));
                    first_error.get_or_insert(e);
                }
            }
        }
        total.service_ports = desired.len();
        match first_error {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        for f in self.both() {
            if let Err(e) = f.dp.cleanup() {
                errors.push(format!("{}: {e:#}", f.family));
            }
            f.ports.clear();
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("cleanup: {}", errors.join("; "))
        }
    }

    /// Each family's frontends, read back by its own dataplane.
    fn cluster_frontends(&self, desired: &Snapshot, node: &NodeInfo) -> anyhow::Result<crate::verify::FrontendMap> {
        let mut out = crate::verify::of_family(self.v4.dp.cluster_frontends(desired, node)?, IpFamily::V4);
        out.extend(crate::verify::of_family(
            self.v6.dp.cluster_frontends(desired, node)?,
            IpFamily::V6,
        ));
        Ok(out)
    }

    fn datapath_source(&self) -> Option<super::ebpf::DatapathSource> {
        self.v4.dp.datapath_source()
    }

    fn families(&self) -> Vec<IpFamily> {
        vec![IpFamily::V4, IpFamily::V6]
    }

    fn degraded(&self) -> Vec<Degraded> {
        let mut v = self.v4.dp.degraded();
        v.extend(self.v6.dp.degraded());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state::ServicePortState;
    use crate::model::{Endpoint, ServicePort};
    use std::sync::{Arc, Mutex};

    /// Records which syncs reached it.
    struct Recorder {
        calls: Arc<Mutex<Vec<&'static str>>>,
        fail: bool,
    }

    impl Dataplane for Recorder {
        fn mode(&self) -> ProxyMode {
            ProxyMode::Iptables
        }
        fn full_sync(&mut self, d: &Snapshot, _: &NodeInfo) -> anyhow::Result<SyncStats> {
            self.calls.lock().unwrap().push("full");
            if self.fail {
                anyhow::bail!("boom");
            }
            Ok(SyncStats {
                service_ports: d.len(),
                ..Default::default()
            })
        }
        fn apply(&mut self, _: &Diff, d: &Snapshot, _: &NodeInfo) -> anyhow::Result<SyncStats> {
            self.calls.lock().unwrap().push("apply");
            Ok(SyncStats {
                service_ports: d.len(),
                ..Default::default()
            })
        }
        fn cleanup(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
        fn cluster_frontends(&self, _: &Snapshot, _: &NodeInfo) -> anyhow::Result<crate::verify::FrontendMap> {
            Ok(Default::default())
        }
    }

    fn recorder(fail: bool) -> (Box<dyn Dataplane>, Arc<Mutex<Vec<&'static str>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(Recorder {
                calls: calls.clone(),
                fail,
            }),
            calls,
        )
    }

    fn state(name: &str, ips: &[&str]) -> Arc<ServicePortState> {
        let n = ServicePortName::new("ns", name, "", crate::model::Protocol::Tcp);
        let mut p = ServicePort::new(n, ips[0].parse().unwrap(), 80);
        p.cluster_ips = ips.iter().map(|s| s.parse().unwrap()).collect();
        let eps = vec![Endpoint::new("10.244.1.5".parse().unwrap(), 8080)];
        Arc::new(ServicePortState::new(p, eps, &NodeInfo::default()))
    }

    fn diff(upserted: &[&Arc<ServicePortState>], removed: &[&str]) -> Diff {
        Diff {
            upserted: upserted.iter().map(|s| Arc::clone(s)).collect(),
            removed: removed
                .iter()
                .map(|n| ServicePortName::new("ns", *n, "", crate::model::Protocol::Tcp))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn partial_syncs_reach_ipv6_only_when_they_concern_it() {
        let (v4, c4) = recorder(false);
        let (v6, c6) = recorder(false);
        let mut dp = DualStack::new(v4, v6);
        let node = NodeInfo::default();
        let a4 = state("a", &["10.96.0.10"]);
        let b6 = state("b", &["fd00:96::b"]);
        let d46 = state("d", &["10.96.0.12", "fd00:96::d"]);
        let mut desired = Snapshot::new();
        for s in [&a4, &b6, &d46] {
            desired.insert(s.name().clone(), Arc::clone(s));
        }
        dp.full_sync(&desired, &node).unwrap();
        assert_eq!((c4.lock().unwrap().len(), c6.lock().unwrap().len()), (1, 1));

        let calls = |c: &Arc<Mutex<Vec<&'static str>>>| c.lock().unwrap().iter().filter(|x| **x == "apply").count();
        dp.apply(&diff(&[&a4], &[]), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (1, 0), "an IPv4-only change");
        dp.apply(&diff(&[&b6], &[]), &desired, &node).unwrap();
        assert_eq!(
            (calls(&c4), calls(&c6)),
            (2, 1),
            "an IPv6-only change (IPv4 runs every sync)"
        );
        dp.apply(&diff(&[&d46], &[]), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (3, 2), "a dual-stack change");
        // A Service that drops its IPv6 cluster IP still reaches the IPv6 dataplane once, which removes it.
        let d4 = state("d", &["10.96.0.12"]);
        desired.insert(d4.name().clone(), Arc::clone(&d4));
        dp.apply(&diff(&[&d4], &[]), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (4, 3));
        dp.apply(&diff(&[&d4], &[]), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (5, 3), "no longer an IPv6 port");
        // Removing an IPv6 Service reaches the IPv6 dataplane.
        desired.remove(b6.name());
        let st = dp.apply(&diff(&[], &["b"]), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (6, 4));
        assert_eq!(st.service_ports, 2);
        // The periodic sync (nothing changed: hooks are re-checked) reaches both.
        dp.apply(&Diff::default(), &desired, &node).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (7, 5), "periodic");
        // So does a change of the node (its addresses pick the NodePort addresses of both families).
        let moved = NodeInfo::new("node-a", vec!["fd00:240::11".parse().unwrap()]);
        dp.apply(&diff(&[&a4], &[]), &desired, &moved).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (8, 6), "node changed");
        dp.apply(&diff(&[&a4], &[]), &desired, &moved).unwrap();
        assert_eq!((calls(&c4), calls(&c6)), (9, 6), "same node again");
    }

    #[test]
    fn a_failing_family_does_not_keep_the_other_from_a_full_sync() {
        let (v4, c4) = recorder(true);
        let (v6, c6) = recorder(false);
        let mut dp = DualStack::new(v4, v6);
        let err = dp.full_sync(&Snapshot::new(), &NodeInfo::default()).unwrap_err();
        assert!(format!("{err:#}").contains("IPv4 dataplane: boom"), "{err:#}");
        assert_eq!((c4.lock().unwrap().len(), c6.lock().unwrap().len()), (1, 1));
    }
}
