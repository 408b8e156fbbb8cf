//! Reading back what the kernel holds for ClusterIP frontends, and comparing it with the desired state
//! (`orca-proxy status --verify`). The read-back comes from the kernel itself — `iptables-save` or the pinned eBPF
//! maps — never from the agent's memory, so a rule deleted by hand shows up as drift.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use crate::model::state::Snapshot;

/// A frontend: address, port, protocol ("TCP", "UDP", "SCTP").
pub type Frontend = (Ipv4Addr, u16, String);
/// Frontends and the backends each one sends to.
pub type FrontendMap = BTreeMap<Frontend, BTreeSet<SocketAddrV4>>;

/// The ClusterIP frontends (IPv4) the desired state asks for, with the endpoints internal traffic goes to.
pub fn desired_cluster_frontends(desired: &Snapshot) -> FrontendMap {
    let mut out = FrontendMap::new();
    for st in desired.values() {
        let backends: BTreeSet<SocketAddrV4> = st
            .internal_endpoints()
            .iter()
            .filter_map(|e| match e.ip {
                IpAddr::V4(a) => Some(SocketAddrV4::new(a, e.port)),
                IpAddr::V6(_) => None,
            })
            .collect();
        for ip in &st.port.cluster_ips {
            if let IpAddr::V4(a) = ip {
                out.insert(
                    (*a, st.port.port, st.port.protocol.as_str().to_string()),
                    backends.clone(),
                );
            }
        }
    }
    out
}

fn arg<'a>(words: &'a [&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

/// Parses `iptables-save -t nat` output: every `ORCA-SERVICES` rule commented "... cluster IP" is a frontend; its
/// backends are the DNAT destinations reached by following its jump through Orca's chains.
pub fn iptables_cluster_frontends(save: &str) -> FrontendMap {
    let mut chains: HashMap<&str, Vec<Vec<&str>>> = HashMap::new();
    // The filter table's ORCA-SERVICES: ClusterIPs without (local) endpoints, rejected or dropped there.
    let mut filtered: Vec<Vec<&str>> = Vec::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match (table, words.split_first()) {
                ("filter", Some((&"ORCA-SERVICES", rule))) => filtered.push(rule.to_vec()),
                ("nat" | "", Some((chain, rule))) => chains.entry(chain).or_default().push(rule.to_vec()),
                _ => {}
            }
        }
    }
    fn resolve(chains: &HashMap<&str, Vec<Vec<&str>>>, chain: &str, depth: u8, out: &mut BTreeSet<SocketAddrV4>) {
        if depth > 4 {
            return;
        }
        for rule in chains.get(chain).into_iter().flatten() {
            match arg(rule, "-j") {
                Some("DNAT") => {
                    if let Some(d) = arg(rule, "--to-destination").and_then(|d| d.parse().ok()) {
                        out.insert(d);
                    }
                }
                Some(target) if target.starts_with("ORCA-") && target != "ORCA-MARK-MASQ" => {
                    resolve(chains, target, depth + 1, out)
                }
                _ => {}
            }
        }
    }
    let mut out = FrontendMap::new();
    for rule in chains.get("ORCA-SERVICES").into_iter().flatten() {
        let line = rule.join(" ");
        if !line.contains("cluster IP\"") {
            continue;
        }
        let (Some(dst), Some(port), Some(proto), Some(target)) =
            (arg(rule, "-d"), arg(rule, "--dport"), arg(rule, "-p"), arg(rule, "-j"))
        else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (dst.trim_end_matches("/32").parse::<Ipv4Addr>(), port.parse::<u16>()) else {
            continue;
        };
        let mut backends = BTreeSet::new();
        resolve(&chains, target, 0, &mut backends);
        out.insert((ip, port, proto.to_uppercase()), backends);
    }
    for rule in &filtered {
        let (Some(dst), Some(port), Some(proto), Some("REJECT" | "DROP")) =
            (arg(rule, "-d"), arg(rule, "--dport"), arg(rule, "-p"), arg(rule, "-j"))
        else {
            continue;
        };
        if let (Ok(ip), Ok(port)) = (dst.trim_end_matches("/32").parse::<Ipv4Addr>(), port.parse::<u16>()) {
            out.entry((ip, port, proto.to_uppercase())).or_default();
        }
    }
    out
}

/// The ClusterIP frontends in the pinned eBPF maps: every frontend except those that are a desired load-balancer,
/// external-IP or NodePort frontend (those are checked by their own scenarios), so a stale ClusterIP entry left for
/// a deleted Service shows up as drift.
pub fn ebpf_cluster_frontends(
    views: &[crate::dataplane::ebpf::FrontendView],
    desired: &Snapshot,
    node_addresses: &[IpAddr],
) -> FrontendMap {
    let mut external: BTreeSet<Frontend> = BTreeSet::new();
    for st in desired.values() {
        let p = &st.port;
        let proto = p.protocol.as_str().to_string();
        for ip in p.load_balancer_ips.iter().chain(&p.external_ips) {
            if let IpAddr::V4(a) = ip {
                external.insert((*a, p.port, proto.clone()));
            }
        }
        if let Some(np) = p.node_port {
            for ip in node_addresses {
                if let IpAddr::V4(a) = ip {
                    external.insert((*a, np, proto.clone()));
                }
            }
        }
    }
    let mut out = FrontendMap::new();
    for v in views {
        let fe = (*v.address.ip(), v.address.port(), v.protocol.to_uppercase());
        if !external.contains(&fe) {
            out.entry(fe).or_default().extend(v.backends.iter().copied());
        }
    }
    out
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

    const SAVE: &str = r#"*nat
:ORCA-SERVICES - [0:0]
:ORCA-SVC-AAA - [0:0]
:ORCA-SEP-111 - [0:0]
:ORCA-SEP-222 - [0:0]
-A ORCA-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10/32 --dport 80 -j ORCA-SVC-AAA
-A ORCA-SERVICES -m comment --comment "default/empty cluster IP" -m udp -p udp -d 10.96.0.11/32 --dport 53 -j ORCA-SVC-BBB
-A ORCA-SERVICES -m comment --comment "default/web:http external IP" -m tcp -p tcp -d 192.0.2.1/32 --dport 80 -j ORCA-EXT-AAA
-A ORCA-SVC-AAA -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10/32 --dport 80 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ
-A ORCA-SVC-AAA -m comment --comment "default/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j ORCA-SEP-111
-A ORCA-SVC-AAA -m comment --comment "default/web:http -> 10.244.2.5:8080" -j ORCA-SEP-222
-A ORCA-SEP-111 -m comment --comment "default/web:http" -s 10.244.1.5/32 -j ORCA-MARK-MASQ
-A ORCA-SEP-111 -m comment --comment "default/web:http" -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080
-A ORCA-SEP-222 -m comment --comment "default/web:http" -m tcp -p tcp -j DNAT --to-destination 10.244.2.5:8080
COMMIT
*filter
:ORCA-SERVICES - [0:0]
-A ORCA-SERVICES -m comment --comment "default/gone:dns has no endpoints" -m udp -p udp -d 10.96.0.13/32 --dport 53 -j REJECT
-A ORCA-SERVICES -m comment --comment "default/itp:http has no local endpoints" -m tcp -p tcp -d 10.96.0.14/32 --dport 80 -j DROP
COMMIT
"#;

    #[test]
    fn parses_cluster_frontends_and_backends() {
        let got = iptables_cluster_frontends(SAVE);
        assert_eq!(got.len(), 4);
        // Rejected (no endpoints) or dropped (no local endpoints) in the filter table: a frontend without backends.
        assert!(got[&("10.96.0.13".parse().unwrap(), 53, "UDP".to_string())].is_empty());
        assert!(got[&("10.96.0.14".parse().unwrap(), 80, "TCP".to_string())].is_empty());
        let web = &got[&("10.96.0.10".parse().unwrap(), 80, "TCP".to_string())];
        let want: BTreeSet<SocketAddrV4> =
            ["10.244.1.5:8080".parse().unwrap(), "10.244.2.5:8080".parse().unwrap()].into();
        assert_eq!(web, &want);
        assert!(got[&("10.96.0.11".parse().unwrap(), 53, "UDP".to_string())].is_empty());
    }

    #[test]
    fn compare_reports_each_kind_of_drift() {
        let programmed = iptables_cluster_frontends(SAVE);
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
