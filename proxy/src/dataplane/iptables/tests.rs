//! Unit tests of the rule generator: exact rules per feature, checked line by line against kube-proxy's.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::rules::{sep_chain, svc_chain, Generator, GeneratorOptions, Ruleset};
use super::*;
use crate::model::{Cidr, Endpoint, ServicePort, TrafficPolicy};

fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName::new("ns", name, port, protocol)
}

fn port(name: &str, ip: &str, p: u16, protocol: Protocol) -> ServicePort {
    ServicePort::new(spn(name, "http", protocol), ip.parse().unwrap(), p)
}

/// A ready endpoint, on this node (`node-a`) when `local`, else on `node-b`.
fn ep(ip: &str, p: u16, local: bool) -> Endpoint {
    Endpoint::new(ip.parse().unwrap(), p).on_node(if local { "node-a" } else { "node-b" }, local)
}

fn node() -> NodeInfo {
    NodeInfo::new("node-a", vec!["192.168.50.10".parse().unwrap()])
}

fn snap(states: Vec<(ServicePort, Vec<Endpoint>)>) -> Snapshot {
    let n = node();
    states
        .into_iter()
        .map(|(p, e)| (p.name.clone(), Arc::new(ServicePortState::new(p, e, &n))))
        .collect()
}

fn gen_with(cfg: &DataplaneConfig, s: &Snapshot, addrs: &[IpAddr]) -> Ruleset {
    let n = node();
    let mut g = Generator::new(cfg, &n, addrs, GeneratorOptions::default());
    g.generate(s, &|_| true)
}

fn text(cfg: &DataplaneConfig, s: &Snapshot) -> String {
    gen_with(cfg, s, &[]).restore_input(&[], &[]).0
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn cfg_cidr() -> DataplaneConfig {
    DataplaneConfig {
        cluster_cidrs: vec![cidr("10.244.0.0/16")],
        ..Default::default()
    }
}

/// The lines of `text` that mention `needle`, in order.
fn with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

/// The lines of `text` that mention `needle` and one of `any`, in order.
fn with_any<'a>(text: &'a str, needle: &str, any: &[&str]) -> Vec<&'a str> {
    with(text, needle)
        .into_iter()
        .filter(|l| any.iter().any(|a| l.contains(a)))
        .collect()
}

fn block(s: &str) -> Vec<&str> {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

fn two_endpoints() -> Vec<Endpoint> {
    vec![ep("10.244.1.5", 8080, false), ep("10.244.2.6", 8080, false)]
}

#[test]
fn chain_names_are_kube_proxy_hashes_with_orca_prefix() {
    let n = spn("web", "http", Protocol::Tcp);
    assert_eq!(svc_chain(&n), "ORCA-SVC-HMALVVKA6APKJPPY");
    assert_eq!(sep_chain(&n, "10.244.1.5:8080"), "ORCA-SEP-QR6MYR7CYITOXECY");
    assert_eq!(
        svc_chain(&spn("web", "http", Protocol::Udp)),
        "ORCA-SVC-HYGLXIAGAZ2G5SIP"
    );
    // Every chain name fits iptables' 28-character limit.
    assert!(sep_chain(&n, "10.244.1.5:8080").len() <= 28);
    assert!(rules::EXTERNAL_SERVICES.len() <= 28 && rules::MASQ_OFF_CLUSTER.len() <= 28);
}

#[test]
fn cluster_ip_two_endpoints_exact() {
    let s = snap(vec![(port("web", "10.96.0.10", 80, Protocol::Tcp), two_endpoints())]);
    let got = text(&DataplaneConfig::default(), &s);
    let want = r#"*filter
:ORCA-SERVICES - [0:0]
:ORCA-EXTERNAL-SERVICES - [0:0]
:ORCA-FORWARD - [0:0]
:ORCA-NODEPORTS - [0:0]
:ORCA-PROXY-FIREWALL - [0:0]
:ORCA-FIREWALL - [0:0]
-A ORCA-FORWARD -m conntrack --ctstate INVALID -j DROP
-A ORCA-FORWARD -m comment --comment "orca forwarding rules" -m mark --mark 0x004000/0x004000 -j ACCEPT
-A ORCA-FORWARD -m comment --comment "orca forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:ORCA-SERVICES - [0:0]
:ORCA-NODEPORTS - [0:0]
:ORCA-POSTROUTING - [0:0]
:ORCA-MARK-MASQ - [0:0]
:ORCA-SVC-HMALVVKA6APKJPPY - [0:0]
:ORCA-SEP-QR6MYR7CYITOXECY - [0:0]
:ORCA-SEP-TLMGOFNRX4CYW3BC - [0:0]
-A ORCA-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN
-A ORCA-POSTROUTING -j MARK --xor-mark 0x004000
-A ORCA-POSTROUTING -m comment --comment "orca service traffic requiring SNAT" -j MASQUERADE --random-fully
-A ORCA-MARK-MASQ -j MARK --or-mark 0x004000
-A ORCA-SERVICES -m comment --comment "ns/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j ORCA-SVC-HMALVVKA6APKJPPY
-A ORCA-SERVICES -m comment --comment "orca service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j ORCA-NODEPORTS
-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment "ns/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j ORCA-SEP-QR6MYR7CYITOXECY
-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment "ns/web:http -> 10.244.2.6:8080" -j ORCA-SEP-TLMGOFNRX4CYW3BC
-A ORCA-SEP-QR6MYR7CYITOXECY -m comment --comment ns/web:http -s 10.244.1.5 -j ORCA-MARK-MASQ
-A ORCA-SEP-QR6MYR7CYITOXECY -m comment --comment ns/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080
-A ORCA-SEP-TLMGOFNRX4CYW3BC -m comment --comment ns/web:http -s 10.244.2.6 -j ORCA-MARK-MASQ
-A ORCA-SEP-TLMGOFNRX4CYW3BC -m comment --comment ns/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.2.6:8080
COMMIT
"#;
    assert_eq!(got, want);
    let rs = gen_with(&DataplaneConfig::default(), &s, &[]);
    assert_eq!(rs.rules_written, 3 + 4 + 2 + 2 + 4);
    assert_eq!(rs.restore_input(&[], &[]).1, got.lines().count());
    assert_eq!(
        rs.port_chains[&spn("web", "http", Protocol::Tcp)],
        vec![
            "ORCA-SVC-HMALVVKA6APKJPPY",
            "ORCA-SEP-QR6MYR7CYITOXECY",
            "ORCA-SEP-TLMGOFNRX4CYW3BC"
        ]
    );
}

#[test]
fn off_cluster_masquerade_and_masquerade_all() {
    let s = snap(vec![(port("web", "10.96.0.10", 80, Protocol::Tcp), two_endpoints())]);
    let t = text(&cfg_cidr(), &s);
    assert_eq!(
        with(&t, "-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment \"ns/web:http cluster IP\""),
        vec!["-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment \"ns/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ"]
    );
    let all = DataplaneConfig {
        masquerade_all: true,
        cluster_cidrs: vec![cidr("10.244.0.0/16")],
        masquerade_bit: 5,
        ..Default::default()
    };
    let t = text(&all, &s);
    assert_eq!(
        with(&t, "-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment \"ns/web:http cluster IP\""),
        vec!["-A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment \"ns/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j ORCA-MARK-MASQ"]
    );
    assert!(t.contains("-A ORCA-MARK-MASQ -j MARK --or-mark 0x000020\n"), "{t}");
    // Several cluster CIDRs: one helper chain returns for each, marks the rest.
    let two = DataplaneConfig {
        cluster_cidrs: vec![cidr("10.244.0.0/16"), cidr("10.245.0.0/16"), cidr("fd00::/64")],
        ..Default::default()
    };
    let t = text(&two, &s);
    assert_eq!(
        with(&t, "ORCA-MASQ-OFF-CLUSTER"),
        block(
            r#":ORCA-MASQ-OFF-CLUSTER - [0:0]
            -A ORCA-MASQ-OFF-CLUSTER -s 10.244.0.0/16 -j RETURN
            -A ORCA-MASQ-OFF-CLUSTER -s 10.245.0.0/16 -j RETURN
            -A ORCA-MASQ-OFF-CLUSTER -j ORCA-MARK-MASQ
            -A ORCA-SVC-HMALVVKA6APKJPPY -m comment --comment "ns/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j ORCA-MASQ-OFF-CLUSTER"#
        )
    );
}

#[test]
fn session_affinity_client_ip() {
    let mut a = port("aff", "10.96.0.11", 80, Protocol::Tcp);
    a.session_affinity = Some(Duration::from_secs(10800));
    let eps = vec![
        ep("10.244.1.5", 8080, false),
        ep("10.244.2.6", 8080, false),
        ep("10.244.3.7", 8080, false),
    ];
    let t = text(&cfg_cidr(), &snap(vec![(a, eps)]));
    assert_eq!(
        with(&t, "-A ORCA-SVC-P7VAKRBBOOUCJMCG"),
        block(
            r#"-A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http cluster IP" -m tcp -p tcp -d 10.96.0.11 --dport 80 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.1.5:8080" -m recent --name ORCA-SEP-DONN5MUBGPUZJ27P --rcheck --seconds 10800 --reap -j ORCA-SEP-DONN5MUBGPUZJ27P
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.2.6:8080" -m recent --name ORCA-SEP-73PYPF3W5MEQIEAV --rcheck --seconds 10800 --reap -j ORCA-SEP-73PYPF3W5MEQIEAV
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.3.7:8080" -m recent --name ORCA-SEP-MFKTLZP3U6MMZB7A --rcheck --seconds 10800 --reap -j ORCA-SEP-MFKTLZP3U6MMZB7A
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.3333333333 -j ORCA-SEP-DONN5MUBGPUZJ27P
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.2.6:8080" -m statistic --mode random --probability 0.5000000000 -j ORCA-SEP-73PYPF3W5MEQIEAV
            -A ORCA-SVC-P7VAKRBBOOUCJMCG -m comment --comment "ns/aff:http -> 10.244.3.7:8080" -j ORCA-SEP-MFKTLZP3U6MMZB7A"#
        )
    );
    assert_eq!(
        with(&t, "-A ORCA-SEP-DONN5MUBGPUZJ27P"),
        block(
            r#"-A ORCA-SEP-DONN5MUBGPUZJ27P -m comment --comment ns/aff:http -s 10.244.1.5 -j ORCA-MARK-MASQ
            -A ORCA-SEP-DONN5MUBGPUZJ27P -m comment --comment ns/aff:http -m recent --name ORCA-SEP-DONN5MUBGPUZJ27P --set -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080"#
        )
    );
}

#[test]
fn probabilities_are_formatted_like_kube_proxy() {
    let eps: Vec<Endpoint> = (1..=7).map(|i| ep(&format!("10.244.0.{i}"), 80, false)).collect();
    let t = text(
        &DataplaneConfig::default(),
        &snap(vec![(port("p", "10.96.0.20", 80, Protocol::Tcp), eps)]),
    );
    let probs: Vec<&str> = t
        .lines()
        .filter_map(|l| l.split("--probability ").nth(1))
        .map(|r| r.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        probs,
        vec![
            "0.1428571429",
            "0.1666666667",
            "0.2000000000",
            "0.2500000000",
            "0.3333333333",
            "0.5000000000"
        ]
    );
}

fn etp_local_port() -> ServicePort {
    let mut l = port("loc", "10.96.0.12", 80, Protocol::Tcp);
    l.node_port = Some(30080);
    l.load_balancer_ips = vec!["203.0.113.7".parse().unwrap()];
    l.external_ips = vec!["198.51.100.3".parse().unwrap()];
    l.external_policy = TrafficPolicy::Local;
    l.health_check_node_port = Some(32000);
    l
}

#[test]
fn external_traffic_policy_local() {
    let s = snap(vec![(
        etp_local_port(),
        vec![ep("10.244.1.5", 8080, true), ep("10.244.2.6", 8080, false)],
    )]);
    let t = text(&cfg_cidr(), &s);
    let want = block(
        r#"-A ORCA-NODEPORTS -m comment --comment "ns/loc:http health check node port" -m tcp -p tcp --dport 32000 -j ACCEPT
        :ORCA-EXT-THJD4KT6SXVV5S2L - [0:0]
        :ORCA-SVC-THJD4KT6SXVV5S2L - [0:0]
        :ORCA-SVL-THJD4KT6SXVV5S2L - [0:0]
        -A ORCA-SERVICES -m comment --comment "ns/loc:http cluster IP" -m tcp -p tcp -d 10.96.0.12 --dport 80 -j ORCA-SVC-THJD4KT6SXVV5S2L
        -A ORCA-SERVICES -m comment --comment "ns/loc:http external IP" -m tcp -p tcp -d 198.51.100.3 --dport 80 -j ORCA-EXT-THJD4KT6SXVV5S2L
        -A ORCA-SERVICES -m comment --comment "ns/loc:http loadbalancer IP" -m tcp -p tcp -d 203.0.113.7 --dport 80 -j ORCA-EXT-THJD4KT6SXVV5S2L
        -A ORCA-NODEPORTS -m comment --comment ns/loc:http -m tcp -p tcp --dport 30080 -j ORCA-EXT-THJD4KT6SXVV5S2L
        -A ORCA-SVC-THJD4KT6SXVV5S2L -m comment --comment "ns/loc:http cluster IP" -m tcp -p tcp -d 10.96.0.12 --dport 80 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ
        -A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "pod traffic for ns/loc:http external destinations" -s 10.244.0.0/16 -j ORCA-SVC-THJD4KT6SXVV5S2L
        -A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "masquerade LOCAL traffic for ns/loc:http external destinations" -m addrtype --src-type LOCAL -j ORCA-MARK-MASQ
        -A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "route LOCAL traffic for ns/loc:http external destinations" -m addrtype --src-type LOCAL -j ORCA-SVC-THJD4KT6SXVV5S2L
        -A ORCA-EXT-THJD4KT6SXVV5S2L -j ORCA-SVL-THJD4KT6SXVV5S2L
        -A ORCA-SVC-THJD4KT6SXVV5S2L -m comment --comment "ns/loc:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j ORCA-SEP-PXK2DTYCCVG7326K
        -A ORCA-SVC-THJD4KT6SXVV5S2L -m comment --comment "ns/loc:http -> 10.244.2.6:8080" -j ORCA-SEP-BKPAKFMA6SHVMMFE
        -A ORCA-SVL-THJD4KT6SXVV5S2L -m comment --comment "ns/loc:http -> 10.244.1.5:8080" -j ORCA-SEP-PXK2DTYCCVG7326K"#,
    );
    assert_eq!(with(&t, "THJD4KT6SXVV5S2L").len() + 1, want.len());
    let got: Vec<&str> = t
        .lines()
        .filter(|l| l.contains("THJD4KT6SXVV5S2L") || l.contains("health check"))
        .collect();
    assert_eq!(got, want);
    // No REJECT/DROP: there are local endpoints.
    assert!(
        !t.contains("-j DROP\n-A ORCA-NODEPORTS") && !t.contains("no local endpoints"),
        "{t}"
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() {
    let s = snap(vec![(etp_local_port(), vec![ep("10.244.2.6", 8080, false)])]);
    let t = text(&cfg_cidr(), &s);
    assert_eq!(
        with(&t, "-A ORCA-EXTERNAL-SERVICES"),
        block(
            r#"-A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no local endpoints" -m tcp -p tcp -d 198.51.100.3 --dport 80 -j DROP
            -A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no local endpoints" -m tcp -p tcp -d 203.0.113.7 --dport 80 -j DROP
            -A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j DROP"#
        )
    );
    // Pods and the node itself still short-circuit to the cluster chain; nothing else leaves the EXT chain.
    assert_eq!(
        with(&t, "-A ORCA-EXT-THJD4KT6SXVV5S2L"),
        block(
            r#"-A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "pod traffic for ns/loc:http external destinations" -s 10.244.0.0/16 -j ORCA-SVC-THJD4KT6SXVV5S2L
            -A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "masquerade LOCAL traffic for ns/loc:http external destinations" -m addrtype --src-type LOCAL -j ORCA-MARK-MASQ
            -A ORCA-EXT-THJD4KT6SXVV5S2L -m comment --comment "route LOCAL traffic for ns/loc:http external destinations" -m addrtype --src-type LOCAL -j ORCA-SVC-THJD4KT6SXVV5S2L"#
        )
    );
    assert!(!t.contains("ORCA-SVL-"), "no SVL chain without local endpoints: {t}");
    // The ClusterIP is still served by the cluster endpoints.
    assert_eq!(with(&t, "-j ORCA-SVC-THJD4KT6SXVV5S2L").len(), 3);
}

#[test]
fn no_endpoints_rejects_in_filter() {
    let s = snap(vec![(etp_local_port(), vec![])]);
    let t = text(&cfg_cidr(), &s);
    assert_eq!(
        with(&t, "has no endpoints"),
        block(
            r#"-A ORCA-SERVICES -m comment --comment "ns/loc:http has no endpoints" -m tcp -p tcp -d 10.96.0.12 --dport 80 -j REJECT
            -A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no endpoints" -m tcp -p tcp -d 198.51.100.3 --dport 80 -j REJECT
            -A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no endpoints" -m tcp -p tcp -d 203.0.113.7 --dport 80 -j REJECT
            -A ORCA-EXTERNAL-SERVICES -m comment --comment "ns/loc:http has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT"#
        )
    );
    // Nothing for it in nat: only the fixed rules and the NodePorts tail call.
    let nat = t.split("*nat\n").nth(1).unwrap();
    assert!(!nat.contains("ns/loc"), "{nat}");
    // Rejected in filter, before the nat table could DNAT: the REJECT rules sit in the filter table only.
    assert!(t.split("*nat\n").next().unwrap().contains("-j REJECT"));
}

#[test]
fn internal_traffic_policy_local() {
    let mut u = port("dns", "10.96.0.10", 53, Protocol::Udp);
    u.internal_policy = TrafficPolicy::Local;
    // No local endpoint: ClusterIP traffic is dropped.
    let t = text(&cfg_cidr(), &snap(vec![(u.clone(), vec![ep("10.244.2.6", 53, false)])]));
    assert_eq!(
        with(&t, "ns/dns"),
        vec!["-A ORCA-SERVICES -m comment --comment \"ns/dns:http has no local endpoints\" -m udp -p udp -d 10.96.0.10 --dport 53 -j DROP"]
    );
    // A local endpoint: ClusterIP goes to the SVL chain, which holds only local endpoints.
    let t = text(
        &cfg_cidr(),
        &snap(vec![(u, vec![ep("10.244.1.5", 53, true), ep("10.244.2.6", 53, false)])]),
    );
    assert_eq!(
        with(&t, "XK2AAOVBI7CLTYAB"),
        block(
            r#":ORCA-SVL-XK2AAOVBI7CLTYAB - [0:0]
            -A ORCA-SERVICES -m comment --comment "ns/dns:http cluster IP" -m udp -p udp -d 10.96.0.10 --dport 53 -j ORCA-SVL-XK2AAOVBI7CLTYAB
            -A ORCA-SVL-XK2AAOVBI7CLTYAB -m comment --comment "ns/dns:http cluster IP" -m udp -p udp -d 10.96.0.10 --dport 53 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ
            -A ORCA-SVL-XK2AAOVBI7CLTYAB -m comment --comment "ns/dns:http -> 10.244.1.5:53" -j ORCA-SEP-SV7QNYZJFJW6EOQ3"#
        )
    );
    assert!(!t.contains("10.244.2.6"), "remote endpoint unused under iTP=Local: {t}");
}

#[test]
fn load_balancer_source_ranges() {
    let mut f = port("fw", "10.96.0.13", 443, Protocol::Tcp);
    f.load_balancer_ips = vec!["203.0.113.9".parse().unwrap()];
    f.load_balancer_source_ranges = vec![cidr("192.168.50.0/24"), cidr("10.20.0.0/16")];
    f.node_port = Some(30443);
    let t = text(
        &cfg_cidr(),
        &snap(vec![(f.clone(), vec![ep("10.244.2.6", 8443, false)])]),
    );
    assert_eq!(
        with_any(&t, "Y5GJKP3ERFFMPWOM", &["FW-", "FIREWALL"]),
        block(
            r#"-A ORCA-PROXY-FIREWALL -m comment --comment "ns/fw:http traffic not accepted by ORCA-FW-Y5GJKP3ERFFMPWOM" -m tcp -p tcp -d 203.0.113.9 --dport 443 -j DROP
            :ORCA-FW-Y5GJKP3ERFFMPWOM - [0:0]
            -A ORCA-SERVICES -m comment --comment "ns/fw:http loadbalancer IP" -m tcp -p tcp -d 203.0.113.9 --dport 443 -j ORCA-FW-Y5GJKP3ERFFMPWOM
            -A ORCA-FW-Y5GJKP3ERFFMPWOM -m comment --comment "ns/fw:http loadbalancer IP" -s 192.168.50.0/24 -j ORCA-EXT-Y5GJKP3ERFFMPWOM
            -A ORCA-FW-Y5GJKP3ERFFMPWOM -m comment --comment "ns/fw:http loadbalancer IP" -s 10.20.0.0/16 -j ORCA-EXT-Y5GJKP3ERFFMPWOM
            -A ORCA-FW-Y5GJKP3ERFFMPWOM -m comment --comment "ns/fw:http loadbalancer IP" -s 203.0.113.9 -j ORCA-EXT-Y5GJKP3ERFFMPWOM
            -A ORCA-FW-Y5GJKP3ERFFMPWOM -m comment --comment "other traffic to ns/fw:http will be dropped by ORCA-PROXY-FIREWALL""#
        )
    );
    // NodePorts are not subject to the source ranges.
    assert!(t.contains(
        "-A ORCA-NODEPORTS -m comment --comment ns/fw:http -m tcp -p tcp --dport 30443 -j ORCA-EXT-Y5GJKP3ERFFMPWOM\n"
    ));
    // The node's own IP outside every range: no rule for the VIP as source.
    f.load_balancer_source_ranges = vec![cidr("10.20.0.0/16")];
    let t = text(&cfg_cidr(), &snap(vec![(f, vec![ep("10.244.2.6", 8443, false)])]));
    assert!(!t.contains("-s 203.0.113.9"), "{t}");
}

#[test]
fn node_port_cluster_policy_and_addresses() {
    let mut np = port("np", "10.96.0.14", 80, Protocol::Tcp);
    np.node_port = Some(30080);
    let s = snap(vec![(np, two_endpoints())]);
    let t = text(&DataplaneConfig::default(), &s);
    assert_eq!(
        with_any(&t, "6NTMJTFMEHCEII5R", &["EXT", "NODEPORTS"]),
        block(
            r#":ORCA-EXT-6NTMJTFMEHCEII5R - [0:0]
            -A ORCA-NODEPORTS -m comment --comment ns/np:http -m tcp -p tcp --dport 30080 -j ORCA-EXT-6NTMJTFMEHCEII5R
            -A ORCA-EXT-6NTMJTFMEHCEII5R -m comment --comment "masquerade traffic for ns/np:http external destinations" -j ORCA-MARK-MASQ
            -A ORCA-EXT-6NTMJTFMEHCEII5R -j ORCA-SVC-6NTMJTFMEHCEII5R"#
        )
    );
    // Default: every local address except loopback.
    assert!(t.contains("-A ORCA-SERVICES -m comment --comment \"orca service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j ORCA-NODEPORTS\n"));
    let rs = gen_with(&DataplaneConfig::default(), &s, &[]);
    assert!(!rs.localhost_nodeports);
    assert!(!t.contains("block incoming localnet"));

    // Explicit addresses: one tail rule per matching local address; 127.0.0.1 asked for -> localnet guard.
    let addrs: Vec<IpAddr> = ["127.0.0.1", "192.168.50.10", "10.0.0.1", "fd00::1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let cfg = DataplaneConfig {
        nodeport_addresses: vec![cidr("192.168.50.0/24"), cidr("127.0.0.1/32")],
        ..Default::default()
    };
    let rs = gen_with(&cfg, &s, &addrs);
    let t = rs.restore_input(&[], &[]).0;
    assert!(rs.localhost_nodeports);
    assert_eq!(
        with(&t, "-j ORCA-NODEPORTS"),
        block(
            r#"-A ORCA-SERVICES -m comment --comment "orca service nodeports; NOTE: this must be the last rule in this chain" -d 127.0.0.1 -j ORCA-NODEPORTS
            -A ORCA-SERVICES -m comment --comment "orca service nodeports; NOTE: this must be the last rule in this chain" -d 192.168.50.10 -j ORCA-NODEPORTS"#
        )
    );
    assert!(t.contains("-A ORCA-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"));
    // Without 127.0.0.1 in the list, loopback never answers.
    let cfg = DataplaneConfig {
        nodeport_addresses: vec![cidr("192.168.50.0/24"), cidr("10.0.0.0/8")],
        ..Default::default()
    };
    let rs = gen_with(&cfg, &s, &addrs);
    let t = rs.restore_input(&[], &[]).0;
    assert!(!rs.localhost_nodeports);
    assert_eq!(with(&t, "-j ORCA-NODEPORTS").len(), 2);
    assert!(!t.contains("-d 127.0.0.1") && !t.contains("block incoming localnet"));
    // 0.0.0.0/0 given explicitly: every local address, loopback included (it contains 127.0.0.0).
    let cfg = DataplaneConfig {
        nodeport_addresses: vec![cidr("0.0.0.0/0")],
        ..Default::default()
    };
    let rs = gen_with(&cfg, &s, &addrs);
    let t = rs.restore_input(&[], &[]).0;
    assert!(rs.localhost_nodeports);
    assert!(t.contains("-m addrtype --dst-type LOCAL -j ORCA-NODEPORTS\n"), "{t}");
    // `primary`: the Node's own address only (192.168.50.10), not every local address.
    let cfg = DataplaneConfig {
        nodeport_primary: true,
        ..Default::default()
    };
    let rs = gen_with(&cfg, &s, &addrs);
    let t = rs.restore_input(&[], &[]).0;
    assert!(!rs.localhost_nodeports);
    assert_eq!(
        with(&t, "-j ORCA-NODEPORTS"),
        block(
            r#"-A ORCA-SERVICES -m comment --comment "orca service nodeports; NOTE: this must be the last rule in this chain" -d 192.168.50.10 -j ORCA-NODEPORTS"#
        )
    );
}

#[test]
fn udp_and_sctp_ports() {
    let u = port("dns", "10.96.0.10", 53, Protocol::Udp);
    let mut sc = port("sig", "10.96.0.30", 3868, Protocol::Sctp);
    sc.name.port = "diameter".into();
    let t = text(
        &DataplaneConfig::default(),
        &snap(vec![
            (u, vec![ep("10.244.1.5", 53, false)]),
            (sc, vec![ep("10.244.1.9", 3868, false)]),
        ]),
    );
    assert!(t.contains("-A ORCA-SERVICES -m comment --comment \"ns/dns:http cluster IP\" -m udp -p udp -d 10.96.0.10 --dport 53 -j ORCA-SVC-"));
    assert!(t.contains("-m udp -p udp -j DNAT --to-destination 10.244.1.5:53\n"));
    assert!(t.contains("-A ORCA-SERVICES -m comment --comment \"ns/sig:diameter cluster IP\" -m sctp -p sctp -d 10.96.0.30 --dport 3868 -j ORCA-SVC-"));
    assert!(t.contains("-m sctp -p sctp -j DNAT --to-destination 10.244.1.9:3868\n"));
}

#[test]
fn partial_generation_writes_only_changed_ports() {
    let s = snap(vec![
        (port("a", "10.96.0.1", 80, Protocol::Tcp), two_endpoints()),
        (port("b", "10.96.0.2", 80, Protocol::Tcp), two_endpoints()),
    ]);
    let n = node();
    let cfg = DataplaneConfig::default();
    let full = Generator::new(&cfg, &n, &[], GeneratorOptions::default()).generate(&s, &|_| true);
    let only_b = spn("b", "http", Protocol::Tcp);
    let part = Generator::new(&cfg, &n, &[], GeneratorOptions::default()).generate(&s, &|p| *p == only_b);
    let (t, _) = part.restore_input(&[], &["ORCA-SEP-GONE".into()]);
    let a_svc = svc_chain(&spn("a", "http", Protocol::Tcp));
    let b_svc = svc_chain(&only_b);
    // Both are still dispatched from ORCA-SERVICES, only b's chains are (re)written.
    assert!(t.contains(&format!("-j {a_svc}\n")) && t.contains(&format!("-j {b_svc}\n")));
    assert!(!t.contains(&format!(":{a_svc}")) && !t.contains(&format!("-A {a_svc}")));
    assert!(t.contains(&format!(":{b_svc}")));
    assert_eq!(part.port_chains.len(), 1);
    assert_eq!(part.rules_total, full.rules_total);
    assert_eq!(full.rules_written - part.rules_written, 2 + 4);
    assert!(t.contains(":ORCA-SEP-GONE - [0:0]\n") && t.ends_with("-X ORCA-SEP-GONE\nCOMMIT\n"));
}

#[test]
fn large_clusters_drop_endpoint_comments() {
    let states: Vec<(ServicePort, Vec<Endpoint>)> = (0..501)
        .map(|i| {
            (
                port(
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    80,
                    Protocol::Tcp,
                ),
                vec![
                    ep(&format!("10.244.{}.{}", i / 250, i % 250 + 1), 80, false),
                    ep("10.245.0.1", 80, false),
                ],
            )
        })
        .collect();
    let t = text(&DataplaneConfig::default(), &snap(states));
    let sep_rules: Vec<&str> = t.lines().filter(|l| l.starts_with("-A ORCA-SEP-")).collect();
    assert_eq!(sep_rules.len(), 501 * 2 * 2);
    assert!(sep_rules.iter().all(|l| !l.contains("--comment")), "{}", sep_rules[0]);
    assert!(t
        .lines()
        .filter(|l| l.starts_with("-A ORCA-SVC-"))
        .all(|l| !l.contains("--comment")));
    // Dispatch rules keep theirs.
    assert!(t.contains("--comment \"ns/s0:http cluster IP\""));
}

#[test]
fn the_ipv4_generator_leaves_ipv6_out() {
    let mut d = port("ds", "10.96.0.40", 80, Protocol::Tcp);
    d.cluster_ips.push("fd00:96::40".parse().unwrap());
    let mut v6only = port("v6", "fd00:96::41", 80, Protocol::Tcp);
    v6only.name.port = "".into();
    let t = text(
        &DataplaneConfig::default(),
        &snap(vec![
            (d, vec![ep("10.244.1.5", 80, false), ep("fd00:244::5", 80, false)]),
            (v6only, vec![ep("fd00:244::6", 80, false)]),
        ]),
    );
    assert!(!t.contains("fd00"), "{t}");
    assert!(!t.contains("ns/v6"), "{t}");
    assert_eq!(with(&t, "-j DNAT").len(), 1);
    assert!(!t.contains("probability"), "one IPv4 endpoint: no random choice: {t}");
}

#[test]
fn conntrack_cleanup_filters() {
    let mut u = port("dns", "10.96.0.10", 53, Protocol::Udp);
    u.node_port = Some(30053);
    u.external_ips = vec!["198.51.100.3".parse().unwrap()];
    let name = u.name.clone();
    let none = snap(vec![(u.clone(), vec![])]);
    let one = snap(vec![(u.clone(), vec![ep("10.244.1.5", 53, false)])]);
    let two = snap(vec![(
        u.clone(),
        vec![ep("10.244.1.5", 53, false), ep("10.244.2.6", 53, false)],
    )]);
    let ip = |s: &str| Some(s.parse().unwrap());
    let f = |d: Option<std::net::IpAddr>, p: u16, r: Option<std::net::IpAddr>| UdpFilter {
        orig_dst: d,
        orig_dport: p,
        reply_src: r,
    };
    // First endpoint: entries for every frontend (they cached the REJECT).
    let got = conntrack_filters(IpFamily::V4, &node(), [&name].into_iter(), &none, &one);
    assert_eq!(
        got,
        vec![
            f(None, 30053, None),
            f(ip("10.96.0.10"), 53, None),
            f(ip("198.51.100.3"), 53, None)
        ]
    );
    // An endpoint goes: entries DNATed to it.
    let got = conntrack_filters(IpFamily::V4, &node(), [&name].into_iter(), &two, &one);
    assert_eq!(
        got,
        vec![
            f(None, 30053, ip("10.244.2.6")),
            f(ip("10.96.0.10"), 53, ip("10.244.2.6")),
            f(ip("198.51.100.3"), 53, ip("10.244.2.6"))
        ]
    );
    // Nothing lost, nothing gained: nothing to delete.
    assert!(conntrack_filters(IpFamily::V4, &node(), [&name].into_iter(), &one, &two).is_empty());
    // The service port is removed: its endpoints' entries go.
    let empty = Snapshot::new();
    assert_eq!(
        conntrack_filters(IpFamily::V4, &node(), [&name].into_iter(), &one, &empty).len(),
        3
    );
    // TCP: never.
    let t = port("web", "10.96.0.1", 80, Protocol::Tcp);
    let tn = t.name.clone();
    let a = snap(vec![(t.clone(), two_endpoints())]);
    let b = snap(vec![(t, vec![])]);
    assert!(conntrack_filters(IpFamily::V4, &node(), [&tn].into_iter(), &a, &b).is_empty());
    let _: Option<Cidr> = None;
}

#[test]
fn jump_rules_in_save_form() {
    let f: Vec<String> = rules::JUMPS.iter().map(|j| j.save_form()).collect();
    assert_eq!(
        f[0],
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"orca externally-visible service portals\" -j ORCA-EXTERNAL-SERVICES"
    );
    assert_eq!(
        f[9],
        "-A OUTPUT -m comment --comment \"orca service portals\" -j ORCA-SERVICES"
    );
    assert_eq!(
        rules::JUMPS[0].args().join(" "),
        "-m conntrack --ctstate NEW -m comment --comment orca externally-visible service portals -j ORCA-EXTERNAL-SERVICES"
    );
}

#[test]
fn hostile_names_cannot_break_the_restore_input() {
    let mut p = port("web", "10.96.0.10", 80, Protocol::Tcp);
    p.name.service.name = "we\"b\n-A INPUT -j DROP".into();
    p.name.port = "ht tp".into();
    let t = text(&DataplaneConfig::default(), &snap(vec![(p.clone(), two_endpoints())]));
    assert!(!t.contains("-A INPUT"), "{t}");
    assert!(
        t.contains("--comment \"ns/we_b_-A_INPUT_-j_DROP:ht_tp cluster IP\""),
        "{t}"
    );
    // Chain names still hash the real name, as kube-proxy does.
    assert!(t.contains(&format!(":{} - [0:0]", svc_chain(&p.name))));
    assert_eq!(t.lines().filter(|l| l.starts_with("-A ")).count(), 3 + 4 + 2 + 2 + 4);
}

#[test]
fn cleanup_input_deletes_jumps_then_chains_and_leaves_the_rest() {
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:ORCA-SERVICES - [0:0]\n\
                :ORCA-SVC-X - [0:0]\n\
                -A PREROUTING -m comment --comment \"orca service portals\" -j ORCA-SERVICES\n\
                -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                -A OUTPUT -j ORCA-SERVICES\n\
                -A ORCA-SERVICES -d 10.96.0.1/32 -j ORCA-SVC-X\n\
                -A ORCA-SVC-X -j DNAT --to-destination 10.244.1.2:80\n\
                COMMIT\n";
    assert_eq!(
        cleanup_input("nat", save),
        "*nat\n:ORCA-SERVICES - [0:0]\n:ORCA-SVC-X - [0:0]\n\
         -D PREROUTING -m comment --comment \"orca service portals\" -j ORCA-SERVICES\n\
         -D OUTPUT -j ORCA-SERVICES\n\
         -X ORCA-SERVICES\n-X ORCA-SVC-X\nCOMMIT\n"
    );
    assert_eq!(
        cleanup_input(
            "filter",
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n"
        ),
        ""
    );
}

#[test]
fn generated_rules_read_back_as_the_desired_cluster_frontends() {
    // What rules.rs writes, parsed by readback.rs (what `status --verify` reads from iptables-save): a ClusterIP with
    // two endpoints, one without endpoints (rejected in the filter table) and an internalTrafficPolicy=Local one
    // without local endpoints (dropped there).
    let mut local_only = port("local", "10.96.0.12", 8443, Protocol::Tcp);
    local_only.internal_policy = TrafficPolicy::Local;
    let s = snap(vec![
        (port("web", "10.96.0.10", 80, Protocol::Tcp), two_endpoints()),
        (port("empty", "10.96.0.11", 53, Protocol::Udp), vec![]),
        (local_only, two_endpoints()),
    ]);
    let desired = crate::verify::desired_cluster_frontends(&s, &node());
    assert_eq!(desired.len(), 3);
    assert_eq!(super::readback::cluster_frontends(&text(&cfg_cidr(), &s)), desired);
}

fn dual_node() -> NodeInfo {
    NodeInfo::new(
        "node-a",
        vec!["192.168.50.10".parse().unwrap(), "fd00:240::11".parse().unwrap()],
    )
}

fn text_v6(cfg: &DataplaneConfig, s: &Snapshot, addrs: &[IpAddr]) -> String {
    let n = dual_node();
    let mut g = Generator::for_family(IpFamily::V6, cfg, &n, addrs, GeneratorOptions::default());
    g.generate(s, &|_| true).restore_input(&[], &[]).0
}

fn dual_stack_port() -> (ServicePort, Vec<Endpoint>) {
    let mut d = port("ds", "10.96.0.40", 80, Protocol::Tcp);
    d.cluster_ips.push("fd00:96::40".parse().unwrap());
    d.node_port = Some(30080);
    let eps = vec![
        ep("10.244.1.5", 8080, false),
        ep("fd00:244:1::5", 8080, false),
        ep("fd00:244:2::6", 8080, false),
    ];
    (d, eps)
}

fn cfg_dual() -> DataplaneConfig {
    DataplaneConfig {
        cluster_cidrs: vec![cidr("10.244.0.0/16"), cidr("fd00:244::/56")],
        ..Default::default()
    }
}

#[test]
fn ipv6_rules_exact() {
    // The ip6tables half of a dual-stack port: kube-proxy's IPv6 proxier writes the same chains (same hashes) with
    // the IPv6 cluster IP, endpoints in brackets, the IPv6 cluster CIDR and `! -d ::1/128` on the NodePorts jump.
    let t = text_v6(&cfg_dual(), &snap(vec![dual_stack_port()]), &[]);
    let nat = &t[t.find("*nat").unwrap()..];
    let want = r#"*nat
:ORCA-SERVICES - [0:0]
:ORCA-NODEPORTS - [0:0]
:ORCA-POSTROUTING - [0:0]
:ORCA-MARK-MASQ - [0:0]
:ORCA-EXT-UUU2UOYNFWQICNAH - [0:0]
:ORCA-SVC-UUU2UOYNFWQICNAH - [0:0]
:ORCA-SEP-4TYZJYLDQTFFKPT2 - [0:0]
:ORCA-SEP-SHRNXFBG7MN5B4T3 - [0:0]
-A ORCA-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN
-A ORCA-POSTROUTING -j MARK --xor-mark 0x004000
-A ORCA-POSTROUTING -m comment --comment "orca service traffic requiring SNAT" -j MASQUERADE --random-fully
-A ORCA-MARK-MASQ -j MARK --or-mark 0x004000
-A ORCA-SERVICES -m comment --comment "ns/ds:http cluster IP" -m tcp -p tcp -d fd00:96::40 --dport 80 -j ORCA-SVC-UUU2UOYNFWQICNAH
-A ORCA-NODEPORTS -m comment --comment ns/ds:http -m tcp -p tcp --dport 30080 -j ORCA-EXT-UUU2UOYNFWQICNAH
-A ORCA-SERVICES -m comment --comment "orca service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d ::1/128 -j ORCA-NODEPORTS
-A ORCA-SVC-UUU2UOYNFWQICNAH -m comment --comment "ns/ds:http cluster IP" -m tcp -p tcp -d fd00:96::40 --dport 80 ! -s fd00:244::/56 -j ORCA-MARK-MASQ
-A ORCA-EXT-UUU2UOYNFWQICNAH -m comment --comment "masquerade traffic for ns/ds:http external destinations" -j ORCA-MARK-MASQ
-A ORCA-EXT-UUU2UOYNFWQICNAH -j ORCA-SVC-UUU2UOYNFWQICNAH
-A ORCA-SVC-UUU2UOYNFWQICNAH -m comment --comment "ns/ds:http -> [fd00:244:1::5]:8080" -m statistic --mode random --probability 0.5000000000 -j ORCA-SEP-4TYZJYLDQTFFKPT2
-A ORCA-SVC-UUU2UOYNFWQICNAH -m comment --comment "ns/ds:http -> [fd00:244:2::6]:8080" -j ORCA-SEP-SHRNXFBG7MN5B4T3
-A ORCA-SEP-4TYZJYLDQTFFKPT2 -m comment --comment ns/ds:http -s fd00:244:1::5 -j ORCA-MARK-MASQ
-A ORCA-SEP-4TYZJYLDQTFFKPT2 -m comment --comment ns/ds:http -m tcp -p tcp -j DNAT --to-destination [fd00:244:1::5]:8080
-A ORCA-SEP-SHRNXFBG7MN5B4T3 -m comment --comment ns/ds:http -s fd00:244:2::6 -j ORCA-MARK-MASQ
-A ORCA-SEP-SHRNXFBG7MN5B4T3 -m comment --comment ns/ds:http -m tcp -p tcp -j DNAT --to-destination [fd00:244:2::6]:8080
COMMIT
"#;
    assert_eq!(nat, want);
    // kube-proxy's SEP hash takes the endpoint as Go's net.JoinHostPort writes it.
    assert_eq!(
        sep_chain(&spn("ds", "http", Protocol::Tcp), "[fd00:244:1::5]:8080"),
        "ORCA-SEP-4TYZJYLDQTFFKPT2"
    );
    // No IPv4 address of any kind reaches ip6tables.
    assert!(!t.contains("10.") && !t.contains("127.0.0.0"), "{t}");
}

#[test]
fn dual_stack_port_splits_by_family() {
    let s = snap(vec![dual_stack_port()]);
    let v4 = text(&cfg_dual(), &s);
    // The IPv4 half: its cluster IP, its one endpoint (no random choice), its cluster CIDR.
    assert!(!v4.contains("fd00"), "{v4}");
    let sep = sep_chain(&spn("ds", "http", Protocol::Tcp), "10.244.1.5:8080");
    assert_eq!(
        with(&v4, "-j DNAT"),
        vec![format!(
            "-A {sep} -m comment --comment ns/ds:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080"
        )]
    );
    assert!(
        v4.contains("-d 10.96.0.40 --dport 80 ! -s 10.244.0.0/16 -j ORCA-MARK-MASQ"),
        "{v4}"
    );
    assert!(!v4.contains("probability"), "{v4}");
    // Both families serve the NodePort.
    assert_eq!(with(&v4, "--dport 30080").len(), 1);
    // A port with endpoints of one family only rejects in the other (kube-proxy: no endpoints of that family).
    let (d, _) = dual_stack_port();
    let only_v4 = snap(vec![(d, vec![ep("10.244.1.5", 8080, false)])]);
    let v6 = text_v6(&cfg_dual(), &only_v4, &[]);
    assert_eq!(
        with(&v6, "-j REJECT"),
        vec![
            "-A ORCA-SERVICES -m comment --comment \"ns/ds:http has no endpoints\" -m tcp -p tcp -d fd00:96::40 --dport 80 -j REJECT",
            "-A ORCA-EXTERNAL-SERVICES -m comment --comment \"ns/ds:http has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT",
        ],
        "{v6}"
    );
    assert!(!text(&cfg_dual(), &only_v4).contains("REJECT"));
}

#[test]
fn ipv6_single_stack_port_and_source_ranges() {
    let mut p = port("v6", "fd00:96::41", 443, Protocol::Tcp);
    p.load_balancer_ips = vec!["fd00:250::7".parse().unwrap()];
    p.load_balancer_source_ranges = vec![cidr("fd00:240::100/128"), cidr("192.0.2.0/24")];
    let s = snap(vec![(p.clone(), vec![ep("fd00:244:1::5", 8443, false)])]);
    // IPv4 has nothing of it.
    let v4 = text(&cfg_dual(), &s);
    assert!(!v4.contains("ns/v6"), "{v4}");
    let v6 = text_v6(&cfg_dual(), &s, &[]);
    let fw = with(&v6, "ORCA-FW-");
    assert!(
        fw.iter().any(|l| l.contains("-s fd00:240::100/128 -j ORCA-EXT-")),
        "{v6}"
    );
    assert!(!v6.contains("192.0.2.0"), "{v6}");
    assert!(fw.iter().any(|l| l.contains("-d fd00:250::7 --dport 443")), "{v6}");
    // Ranges of the other family only: kube-proxy filters them per family, which leaves this family open.
    p.load_balancer_source_ranges = vec![cidr("192.0.2.0/24")];
    let v6 = text_v6(
        &cfg_dual(),
        &snap(vec![(p, vec![ep("fd00:244:1::5", 8443, false)])]),
        &[],
    );
    assert!(!v6.contains("ORCA-FW-"), "{v6}");
    assert!(
        v6.contains("loadbalancer IP\" -m tcp -p tcp -d fd00:250::7 --dport 443 -j ORCA-EXT-"),
        "{v6}"
    );
}

#[test]
fn ipv6_rules_read_back_as_the_desired_ipv6_frontends() {
    let mut v6only = port("v6", "fd00:96::41", 80, Protocol::Tcp);
    v6only.name.port = "web".into();
    let s = snap(vec![
        dual_stack_port(),
        (v6only, vec![ep("fd00:244:2::9", 80, false)]),
        (port("web", "10.96.0.10", 80, Protocol::Tcp), two_endpoints()),
    ]);
    let desired = crate::verify::desired_cluster_frontends(&s, &node());
    assert_eq!(desired.len(), 4);
    let v6 = crate::verify::of_family(desired.clone(), IpFamily::V6);
    assert_eq!(v6.len(), 2);
    assert_eq!(super::readback::cluster_frontends(&text_v6(&cfg_dual(), &s, &[])), v6);
    assert_eq!(
        super::readback::cluster_frontends(&text(&cfg_dual(), &s)),
        crate::verify::of_family(desired, IpFamily::V4)
    );
}

#[test]
fn each_family_selects_its_own_endpoints_for_rules_and_conntrack_alike() {
    // A dual-stack UDP port whose IPv4 endpoint is terminating but still serving while the IPv6 one is ready:
    // kube-proxy's IPv4 proxier, seeing no ready IPv4 endpoint, falls back to the serving terminating one. The
    // rules and the conntrack cleanup must agree: the IPv4 flows to it stay.
    let mut u = port("dns", "10.96.0.10", 53, Protocol::Udp);
    u.cluster_ips.push("fd00:96::a".parse().unwrap());
    let name = u.name.clone();
    let v6 = ep("fd00:244:2::6", 53, false);
    let before = snap(vec![(u.clone(), vec![ep("10.244.1.5", 53, false), v6.clone()])]);
    let mut leaving = ep("10.244.1.5", 53, false);
    (leaving.ready, leaving.terminating) = (false, true);
    let after = snap(vec![(u, vec![leaving, v6])]);
    let t = text(&cfg_dual(), &after);
    assert!(t.contains("--to-destination 10.244.1.5:53"), "{t}");
    assert!(
        conntrack_filters(IpFamily::V4, &node(), [&name].into_iter(), &before, &after).is_empty(),
        "the serving IPv4 endpoint's flows must stay"
    );
    let st = &after[&name];
    assert_eq!(st.selected_in(IpFamily::V4, &node()).all_reachable.len(), 1);
    assert_eq!(st.selected_in(IpFamily::V6, &node()).all_reachable.len(), 1);
}
