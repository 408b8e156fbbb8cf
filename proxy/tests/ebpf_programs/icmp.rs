//! ICMP errors about translated flows, translated like the flow (conntrack's "related" NAT).

use crate::harness::*;

#[test]
fn icmp_errors_about_a_cluster_ip_flow_are_translated_both_ways() {
    both_modes(icmp_cluster_ip);
}

fn icmp_cluster_ip(mut dp: Datapath) {
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 30, 0, &[be(BACKEND_A, 5353)], 0);
    let query = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 40000, 53, b"query", true),
    );
    let (_, to_backend) = dp.cross(PROG_FROM_POD, &query);
    assert_eq!(check(&to_backend).dst, Ipv4Addr::from(BACKEND_A));

    // The backend has no listener: port unreachable quoting what it received. The client must
    // see an error about the packet it sent (to the VIP), from the VIP.
    let unreach = icmp_error(BACKEND_A, CLIENT, 3, 3, &to_backend[14..14 + 28]);
    let (rc, out) = dp.cross(PROG_FROM_NETDEV, &unreach);
    assert_eq!(rc, TC_ACT_OK);
    let (src, dst, quote) = check_icmp(&out);
    assert_eq!((src, dst), (Ipv4Addr::from(VIP), Ipv4Addr::from(CLIENT)));
    assert_eq!(
        quote,
        &query[14..14 + 28],
        "quote = the client's own packet, checksums included"
    );

    // The other way: the client reports the VIP's reply (e.g. fragmentation needed); the backend
    // must see an error about the packet it sent.
    let reply = frame(
        BACKEND_A,
        CLIENT,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(BACKEND_A, CLIENT, 5353, 40000, b"answer", true),
    );
    let (_, to_client) = dp.cross(PROG_FROM_NETDEV, &reply);
    assert_eq!(check(&to_client).src, Ipv4Addr::from(VIP));
    let too_big = icmp_error(CLIENT, VIP, 3, 4, &to_client[14..14 + 28]);
    let (rc, out) = dp.cross(PROG_FROM_POD, &too_big);
    assert_eq!(rc, TC_ACT_OK);
    let (src, dst, quote) = check_icmp(&out);
    assert_eq!((src, dst), (Ipv4Addr::from(CLIENT), Ipv4Addr::from(BACKEND_A)));
    assert_eq!(quote, &reply[14..14 + 28]);

    // Errors about flows nobody tracks, and ICMP that is not an error, pass untouched.
    let stranger = frame(
        CLIENT,
        BACKEND_C,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, BACKEND_C, 40001, 53, b"x", true),
    );
    let unknown = icmp_error(BACKEND_C, CLIENT, 3, 3, &stranger[14..14 + 28]);
    assert_eq!(dp.cross(PROG_FROM_NETDEV, &unknown), (TC_ACT_OK, unknown.clone()));
    let echo_reply = icmp_error(BACKEND_A, CLIENT, 0, 0, &to_backend[14..14 + 28]);
    assert_eq!(dp.cross(PROG_FROM_NETDEV, &echo_reply), (TC_ACT_OK, echo_reply.clone()));
}

#[test]
fn icmp_errors_about_a_masqueraded_node_port_flow_reach_the_outside_client() {
    both_modes(icmp_node_port);
}

fn icmp_node_port(mut dp: Datapath) {
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30081, IPPROTO_TCP);
    dp.set_service(np, 31, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    let syn = tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50500, 30081));
    let (_, to_backend) = dp.cross(PROG_FROM_NETDEV, &syn);
    let seen = check(&to_backend);
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::from(NODE_IP), Ipv4Addr::from(BACKEND_B))
    );

    // Fragmentation needed on the way to the backend, quoting the whole TCP header (checksum
    // included), sent to the node (the masqueraded source).
    let quote_len = to_backend.len() - 14;
    let too_big = icmp_error(BACKEND_B, NODE_IP, 3, 4, &to_backend[14..14 + quote_len]);
    let (rc, out) = dp.cross(PROG_FROM_NETDEV, &too_big);
    assert_eq!(rc, TC_ACT_OK);
    let (src, dst, quote) = check_icmp(&out);
    assert_eq!((src, dst), (Ipv4Addr::from(NODE_IP), Ipv4Addr::from(EXTERNAL_CLIENT)));
    assert_eq!(
        quote,
        &syn[14..14 + quote_len],
        "quote = the client's SYN, TCP checksum included"
    );
}
