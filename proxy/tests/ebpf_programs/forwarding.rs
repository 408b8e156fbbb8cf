//! What happens to a translated packet next: by default the node's stack forwards it (routing, netfilter) and
//! the egress program completes the translation; with netfilter bypassed the programs forward it themselves.

use crate::harness::*;

#[test]
fn by_default_the_stack_forwards_translated_packets() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 12, 0, &[be(BACKEND_A, 8080)], 0);
    // Even where the FIB would forward (forwarding on, a route and a resolved neighbour), the ingress program
    // hands the packet to the stack: TC_ACT_OK, MACs and TTL as they came (the stack's forwarding decrements it).
    ip(&[
        "link",
        "add",
        "orca-fwd-b",
        "type",
        "veth",
        "peer",
        "name",
        "orca-fwd-p",
    ]);
    ip(&["link", "set", "orca-fwd-b", "up"]);
    ip(&["link", "set", "orca-fwd-p", "up"]);
    ip(&["addr", "add", "10.244.1.1/24", "dev", "orca-fwd-b"]);
    ip(&["addr", "add", "10.244.0.1/24", "dev", "orca-fwd-p"]);
    ip(&[
        "neigh",
        "add",
        "10.244.1.5",
        "lladdr",
        "02:00:00:00:0b:05",
        "dev",
        "orca-fwd-b",
        "nud",
        "permanent",
    ]);
    let st = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .expect("sysctl");
    assert!(st.success());
    let syn = tcp_frame(CLIENT, VIP, &Tcp::syn(41001, 80));
    let (rc, out) = dp.run_on(PROG_FROM_POD, &syn, ifindex("orca-fwd-p"));
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    assert_eq!(&out[0..12], &syn[0..12]);
    assert_eq!(out[22], 64);
    assert_eq!(dp.stats().iter().sum::<u64>(), 0, "nothing to count");
}

#[test]
fn with_netfilter_bypassed_translated_packets_go_straight_to_the_routed_device() {
    let mut dp = Datapath::load_bypass();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 12, 0, &[be(BACKEND_A, 8080)], 0);
    // In this thread's own namespace: a "pod" side and a "backend" side, forwarding on, and a
    // resolved neighbour for the backend only.
    ip(&[
        "link",
        "add",
        "orca-fwd-b",
        "type",
        "veth",
        "peer",
        "name",
        "orca-fwd-p",
    ]);
    ip(&["link", "set", "orca-fwd-b", "address", "02:00:00:00:0b:01", "up"]);
    ip(&["link", "set", "orca-fwd-p", "up"]);
    ip(&["addr", "add", "10.244.1.1/24", "dev", "orca-fwd-b"]);
    ip(&["addr", "add", "10.244.0.1/24", "dev", "orca-fwd-p"]);
    ip(&[
        "neigh",
        "add",
        "10.244.1.5",
        "lladdr",
        "02:00:00:00:0b:05",
        "dev",
        "orca-fwd-b",
        "nud",
        "permanent",
    ]);
    let (pod_if, backend_if) = (ifindex("orca-fwd-p"), ifindex("orca-fwd-b"));

    // Forwarding off (a fresh namespace): the FIB declines, the stack gets the translated packet (counted).
    let (rc, out) = dp.run_on(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41000, 80)), pod_if);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    assert_eq!(out[22], 64, "TTL changed although the stack forwards the packet");
    assert_eq!(dp.stats()[orca_common::REASON_FIB_DECLINED as usize], 1);

    let st = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv4.ip_forward=1"])
        .status()
        .expect("sysctl");
    assert!(st.success());

    // Routed and resolved: DNAT, then out of the backend's device with its MACs, TTL 63.
    let syn = tcp_frame(CLIENT, VIP, &Tcp::syn(41001, 80));
    let (rc, out) = dp.run_on(PROG_FROM_POD, &syn, pod_if);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_A), 8080));
    assert_eq!(
        &out[0..6],
        &[2, 0, 0, 0, 0x0b, 5],
        "destination MAC = the backend's neighbour entry"
    );
    assert_eq!(&out[6..12], &[2, 0, 0, 0, 0x0b, 1], "source MAC = the egress device's");
    assert_eq!(out[22], 63, "TTL decremented");

    // The reply: reverse NAT, then towards the client, whose neighbour is unresolved (the
    // neighbour subsystem resolves it: still a redirect, MACs untouched here).
    let mut synack = Tcp::syn(8080, 41001);
    synack.flags = SYN | ACK;
    let reply = tcp_frame(BACKEND_A, CLIENT, &synack);
    let (rc, out) = dp.run_on(PROG_FROM_POD, &reply, backend_if);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(VIP), 80));
    assert_eq!(&out[0..12], &reply[0..12]);
    assert_eq!(out[22], 63);

    // TTL 1 is not forwarded here: the stack answers with time exceeded.
    let mut last_hop = tcp_frame(CLIENT, VIP, &Tcp::syn(41002, 80));
    last_hop[22] = 1;
    last_hop[24..26].copy_from_slice(&[0, 0]);
    let c = csum_fold(csum_add(0, &last_hop[14..34]));
    last_hop[24..26].copy_from_slice(&c.to_be_bytes());
    let (rc, out) = dp.run_on(PROG_FROM_POD, &last_hop, pod_if);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!((check(&out).dst, out[22]), (Ipv4Addr::from(BACKEND_A), 1));

    // No route to the backend: the stack decides (and drops or answers).
    dp.set_service(FrontendKey::new(VIP, 81, IPPROTO_TCP), 13, 1, &[be(BACKEND_C, 8080)], 0);
    let (rc, out) = dp.run_on(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41003, 81)), pod_if);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_C));
}
