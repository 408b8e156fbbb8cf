//! Reading Orca's iptables rules back from the kernel (`iptables-save`), next to [`super::rules`] that writes them:
//! the chain names and the comment text come from there, so a change to one is a change to both.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use super::exec::Exec;
use super::rules::{CLUSTER_IP_COMMENT, MARK_MASQ, PREFIX, SERVICES};
use crate::verify::FrontendMap;

/// The ClusterIP frontends programmed in the calling process's network namespace (or in `netns`), with the
/// endpoints each sends to: `iptables-save` (and `ip6tables-save`, when it works) of the nat and filter tables,
/// parsed by [`cluster_frontends`].
pub fn read_cluster_frontends(netns: Option<&str>) -> Result<FrontendMap> {
    let exec = Exec::detect(netns);
    let mut out = read_family(&exec)?;
    let v6 = exec.for_family(crate::model::IpFamily::V6);
    if let Ok(map) = read_family(&v6) {
        out.extend(map);
    }
    Ok(out)
}

/// The ClusterIP frontends in the tables of `exec`'s family.
pub fn read_family(exec: &Exec) -> Result<FrontendMap> {
    let save = exec.save("nat")? + &exec.save("filter")?;
    Ok(cluster_frontends(&save))
}

/// An address as `*-save` prints a destination: `10.96.0.10/32`, `fd00:96::a/128`.
fn host(dst: &str) -> Option<IpAddr> {
    dst.trim_end_matches("/32").trim_end_matches("/128").parse().ok()
}

fn arg<'a>(words: &'a [&'a str], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| *w == flag)
        .and_then(|i| words.get(i + 1).copied())
}

/// Parses `iptables-save -t nat` output: every `ORCA-SERVICES` rule commented "... cluster IP" is a frontend; its
/// backends are the DNAT destinations reached by following its jump through Orca's chains.
pub fn cluster_frontends(save: &str) -> FrontendMap {
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
                ("filter", Some((&chain, rule))) if chain == SERVICES => filtered.push(rule.to_vec()),
                ("nat" | "", Some((chain, rule))) => chains.entry(chain).or_default().push(rule.to_vec()),
                _ => {}
            }
        }
    }
    fn resolve(chains: &HashMap<&str, Vec<Vec<&str>>>, chain: &str, depth: u8, out: &mut BTreeSet<SocketAddr>) {
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
                Some(target) if target.starts_with(PREFIX) && target != MARK_MASQ => {
                    resolve(chains, target, depth + 1, out)
                }
                _ => {}
            }
        }
    }
    let mut out = FrontendMap::new();
    for rule in chains.get(SERVICES).into_iter().flatten() {
        let line = rule.join(" ");
        if !line.contains(&format!("{CLUSTER_IP_COMMENT}\"")) {
            continue;
        }
        let (Some(dst), Some(port), Some(proto), Some(target)) =
            (arg(rule, "-d"), arg(rule, "--dport"), arg(rule, "-p"), arg(rule, "-j"))
        else {
            continue;
        };
        let (Some(ip), Ok(port)) = (host(dst), port.parse::<u16>()) else {
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
        if let (Some(ip), Ok(port)) = (host(dst), port.parse::<u16>()) {
            out.entry((ip, port, proto.to_uppercase())).or_default();
        }
    }
    out
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
        let got = cluster_frontends(SAVE);
        assert_eq!(got.len(), 4);
        // Rejected (no endpoints) or dropped (no local endpoints) in the filter table: a frontend without backends.
        assert!(got[&("10.96.0.13".parse().unwrap(), 53, "UDP".to_string())].is_empty());
        assert!(got[&("10.96.0.14".parse().unwrap(), 80, "TCP".to_string())].is_empty());
        let web = &got[&("10.96.0.10".parse().unwrap(), 80, "TCP".to_string())];
        let want: BTreeSet<SocketAddr> =
            ["10.244.1.5:8080".parse().unwrap(), "10.244.2.5:8080".parse().unwrap()].into();
        assert_eq!(web, &want);
        assert!(got[&("10.96.0.11".parse().unwrap(), 53, "UDP".to_string())].is_empty());
    }
}
