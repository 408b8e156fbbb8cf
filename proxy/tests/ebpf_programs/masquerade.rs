//! Masquerading, as kube-proxy does it: external traffic to NodePorts, load-balancer and external IPs
//! (externalTrafficPolicy Cluster), hairpin, `--cluster-cidr` and `--masquerade-all`.

use crate::harness::*;

#[test]
fn external_traffic_is_masqueraded_and_replies_are_restored() {
    both_modes(external_traffic_is_masqueraded);
}

fn external_traffic_is_masqueraded(mut dp: Datapath) {
    let nat_ports = default_nat_ports();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);

    let syn = tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50000, 30080));
    let (rc, out) = dp.cross(PROG_FROM_NETDEV, &syn);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 8080));
    assert_eq!(
        seen.src,
        Ipv4Addr::from(NODE_IP),
        "external source masqueraded to the node"
    );
    assert!(nat_ports.contains(seen.sport), "{}", seen.sport);
    let nat_port = seen.sport;

    // Later packets of the flow use the same source port.
    let (_, out) = dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::data(50000, 30080, b"x")),
    );
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(NODE_IP), nat_port));

    // The backend (on another node) answers the node; the reply leaves as the NodePort's, to the client.
    let mut synack = Tcp::syn(8080, nat_port);
    synack.flags = SYN | ACK;
    let (rc, out) = dp.cross(PROG_FROM_NETDEV, &tcp_frame(BACKEND_B, NODE_IP, &synack));
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(NODE_IP), 30080));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50000));

    // Distinct clients get distinct source ports.
    let mut ports = std::collections::HashSet::new();
    for i in 0..50u16 {
        let (_, out) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(51000 + i, 30080)),
        );
        ports.insert(check(&out).sport);
    }
    assert_eq!(ports.len(), 50);

    // Local pods reaching the same NodePort are masqueraded too, as kube-proxy's KUBE-EXT chain
    // does with externalTrafficPolicy Cluster (the Local policy's pod entry is tested below).
    let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, NODE_IP, &Tcp::syn(52000, 30080)));
    let seen = check(&out);
    assert_eq!(seen.src, Ipv4Addr::from(NODE_IP));
    assert!(nat_ports.contains(seen.sport), "{}", seen.sport);
}

#[test]
fn the_stack_sees_client_to_backend_and_masquerading_happens_at_egress() {
    // With netfilter seen (the default), what the node's stack gets from the ingress program carries the client's
    // own source: FORWARD and POSTROUTING see client -> backend as with kube-proxy, and the input route check
    // never meets a packet with the node's own address as its source. The masquerade source is written at egress.
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    let syn = tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50000, 30080));
    let (rc, to_stack) = dp.run(PROG_FROM_NETDEV, &syn);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&to_stack);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50000));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 8080));
    let (rc, wire) = dp.run(PROG_EGRESS, &to_stack);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&wire);
    assert_eq!(seen.src, Ipv4Addr::from(NODE_IP));
    let nat_port = seen.sport;
    // The reply to the node: its client is restored at ingress (so the stack routes it to the client, with the
    // backend as source), its frontend at egress.
    let mut synack = Tcp::syn(8080, nat_port);
    synack.flags = SYN | ACK;
    let (rc, to_stack) = dp.run(PROG_FROM_NETDEV, &tcp_frame(BACKEND_B, NODE_IP, &synack));
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&to_stack);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(BACKEND_B), 8080));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50000));
    let (_, wire) = dp.run(PROG_EGRESS, &to_stack);
    let seen = check(&wire);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(NODE_IP), 30080));
    // Three entries: the service and inner ones, and the reply one that holds the masquerade port.
    assert_eq!(dp.ct_entries().len(), 3);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30081, IPPROTO_TCP);
    dp.set_service(np, 10, 0, &[be(BACKEND_A, 8080)], 0);
    let (_, out) = dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50001, 30081)),
    );
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50001));
    assert_eq!(seen.dst, Ipv4Addr::from(BACKEND_A));
}

#[test]
fn hairpin_is_masqueraded_so_the_pod_can_reach_itself() {
    both_modes(hairpin);
}

fn hairpin(mut dp: Datapath) {
    dp.set_snat_ip(NODE_IP);
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 11, 0, &[be(CLIENT, 8080)], 0);
    let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(53000, 80)));
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(CLIENT), 8080));
    assert_eq!(seen.src, Ipv4Addr::from(NODE_IP));
    let nat_port = seen.sport;
    let mut synack = Tcp::syn(8080, nat_port);
    synack.flags = SYN | ACK;
    let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, NODE_IP, &synack));
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(VIP), 80));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(CLIENT), 53000));
}

#[test]
fn external_scope_entries_serve_outside_clients_and_pods_get_the_cluster_set() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30090, IPPROTO_TCP);
    // eTP=Local: outside clients -> the local endpoint A; local pods -> every endpoint (here B).
    dp.set_service(
        np.with_scope(orca_common::SCOPE_EXTERNAL),
        20,
        0,
        &[be(BACKEND_A, 8080)],
        0,
    );
    dp.set_service(np, 21, 0, &[be(BACKEND_B, 8080)], 0);
    for sport in 0..10u16 {
        let (_, out) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(54000 + sport, 30090)),
        );
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
        let (_, out) = dp.cross(
            PROG_FROM_POD,
            &tcp_frame(CLIENT, NODE_IP, &Tcp::syn(54000 + sport, 30090)),
        );
        let seen = check(&out);
        assert_eq!(seen.dst, Ipv4Addr::from(BACKEND_B));
        assert_eq!(
            seen.src,
            Ipv4Addr::from(CLIENT),
            "pods keep their address with eTP=Local"
        );
    }
}

#[test]
fn cluster_cidr_and_masquerade_all_decide_masquerading_of_cluster_ips() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let fe = FrontendKey::new(VIP, 80, IPPROTO_TCP);
    dp.set_service(fe, 50, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(fe, orca_common::FRONTEND_F_CLUSTER_IP);
    let set_config_flags = |dp: &mut Datapath, flags: u32| {
        let mut cfg: Array<&mut MapData, u32> = Array::try_from(dp.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
        cfg.set(orca_common::CONFIG_FLAGS, flags, 0).unwrap();
    };
    {
        let map = dp.ebpf.map_mut(orca_common::MAP_SRC_RANGES).unwrap();
        let mut t: LpmTrie<&mut MapData, orca_common::SrcRangeKey, u32> = LpmTrie::try_from(map).unwrap();
        let key = orca_common::SrcRangeKey {
            service_id: orca_common::CLUSTER_CIDR_ID,
            addr: addr_from_octets([10, 244, 0, 0]),
        };
        t.insert(&Key::new(32 + 16, key), 1, 0).unwrap();
    }
    let src_of = |dp: &Datapath, prog: &str, client: [u8; 4], sport: u16| {
        let (_, out) = dp.cross(prog, &tcp_frame(client, VIP, &Tcp::syn(sport, 80)));
        let seen = check(&out);
        assert_eq!(seen.dst, Ipv4Addr::from(BACKEND_B));
        seen.src
    };
    // No --cluster-cidr: nothing is masqueraded.
    assert_eq!(
        src_of(&dp, PROG_FROM_NETDEV, EXTERNAL_CLIENT, 58000),
        Ipv4Addr::from(EXTERNAL_CLIENT)
    );
    // --cluster-cidr 10.244.0.0/16: outside sources arriving from the network are, pods are not.
    set_config_flags(&mut dp, orca_common::CONFIG_F_CLUSTER_CIDR);
    assert_eq!(
        src_of(&dp, PROG_FROM_NETDEV, EXTERNAL_CLIENT, 58001),
        Ipv4Addr::from(NODE_IP)
    );
    assert_eq!(
        src_of(&dp, PROG_FROM_NETDEV, [10, 244, 2, 9], 58002),
        Ipv4Addr::from([10, 244, 2, 9])
    );
    assert_eq!(src_of(&dp, PROG_FROM_POD, CLIENT, 58003), Ipv4Addr::from(CLIENT));
    // --masquerade-all: everything is.
    set_config_flags(&mut dp, orca_common::CONFIG_F_MASQUERADE_ALL);
    assert_eq!(src_of(&dp, PROG_FROM_POD, CLIENT, 58004), Ipv4Addr::from(NODE_IP));
}
