//! `orca-proxy status --verify`: the ClusterIP frontends the desired state asks for, compared with what the kernel
//! holds. Each dataplane reads its own state back next to the code that writes it
//! ([`crate::dataplane::iptables::readback`], [`crate::dataplane::ebpf::dump`]), from the kernel itself — never from
//! the agent's memory — so a rule deleted by hand shows up as drift.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::model::{IpFamily, NodeInfo};

use crate::model::state::Snapshot;

/// A frontend: address, port, protocol ("TCP", "UDP", "SCTP").
pub type Frontend = (IpAddr, u16, String);
/// Frontends and the backends each one sends to.
pub type FrontendMap = BTreeMap<Frontend, BTreeSet<SocketAddr>>;

/// The ClusterIP frontends (each cluster IP, of both families) the desired state asks for, with the endpoints of
/// the same family internal traffic from `node` goes to (each family's endpoints selected alone, as the
/// dataplanes do: [`crate::model::state::ServicePortState::selected_in`]).
pub fn desired_cluster_frontends(desired: &Snapshot, node: &NodeInfo) -> FrontendMap {
    let mut out = FrontendMap::new();
    for st in desired.values() {
        for ip in &st.port.cluster_ips {
            let family = IpFamily::of(*ip);
            let sel = st.selected_in(family, node);
            let internal = if st.port.internal_policy_local() {
                &sel.local
            } else {
                &sel.cluster
            };
            let backends: BTreeSet<SocketAddr> = internal.iter().map(|e| SocketAddr::new(e.ip, e.port)).collect();
            out.insert((*ip, st.port.port, st.port.protocol.as_str().to_string()), backends);
        }
    }
    out
}

/// The part of `map` in `family`.
pub fn of_family(map: FrontendMap, family: IpFamily) -> FrontendMap {
    map.into_iter().filter(|(fe, _)| family.matches(&fe.0)).collect()
}

/// Differences between the desired and the programmed ClusterIP frontends, one line each; empty when in sync.
pub fn compare(desired: &FrontendMap, programmed: &FrontendMap) -> Vec<String> {
    let mut drift = Vec::new();
    for (fe, want) in desired {
        let name = format!("{}:{}/{}", fe.0, fe.1, fe.2);
        match programmed.get(fe) {
            None => drift.push(format!("{name}: missing from the kernel")),
            Some(have) if have != want => drift.push(format!(
                "{name}: kernel sends to [{}], desired [{}]",
                have.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", "),
                want.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ")
            )),
            Some(_) => {}
        }
    }
    for fe in programmed.keys().filter(|fe| !desired.contains_key(*fe)) {
        drift.push(format!("{}:{}/{}: in the kernel but not desired", fe.0, fe.1, fe.2));
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontends(list: &[(&str, u16, &str, &[&str])]) -> FrontendMap {
        list.iter()
            .map(|(ip, port, proto, backends)| {
                (
                    (ip.parse().unwrap(), *port, proto.to_string()),
                    backends.iter().map(|b| b.parse().unwrap()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn compare_reports_each_kind_of_drift() {
        let programmed = frontends(&[
            ("10.96.0.10", 80, "TCP", &["10.244.1.5:8080", "10.244.2.5:8080"]),
            ("10.96.0.11", 53, "UDP", &[]),
        ]);
        assert!(compare(&programmed, &programmed).is_empty());
        let mut desired = programmed.clone();
        desired
            .get_mut(&("10.96.0.10".parse().unwrap(), 80, "TCP".into()))
            .unwrap()
            .remove(&"10.244.2.5:8080".parse().unwrap());
        desired.remove(&("10.96.0.11".parse().unwrap(), 53, "UDP".into()));
        desired.insert(("10.96.0.12".parse().unwrap(), 443, "TCP".into()), BTreeSet::new());
        let d = compare(&desired, &programmed);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().any(|l| l.contains("10.96.0.10:80/TCP: kernel sends to")));
        assert!(d
            .iter()
            .any(|l| l.contains("10.96.0.11:53/UDP: in the kernel but not desired")));
        assert!(d.iter().any(|l| l.contains("10.96.0.12:443/TCP: missing")));
    }
}
