//! Frontends without usable endpoints (reject, or drop for a Local policy) and loadBalancerSourceRanges.

use crate::harness::*;

/// Checks an ICMP port-unreachable answer to `orig` (a frame sent by CLIENT to VIP).
fn assert_port_unreachable(out: &[u8], orig: &[u8]) {
    assert_eq!(&out[0..6], &orig[6..12], "destination MAC is the sender's");
    assert_eq!(&out[6..12], &orig[0..6]);
    let seen = check(out);
    assert_eq!(seen.proto, IPPROTO_ICMP);
    assert_eq!(seen.src, Ipv4Addr::from(VIP));
    assert_eq!(seen.dst, Ipv4Addr::from(CLIENT));
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 3), "type 3 code 3");
    assert_eq!(csum_fold(csum_add(0, icmp)), 0, "ICMP checksum invalid");
    // RFC 792: the offending IP header and the first 8 bytes of its payload.
    assert_eq!(&icmp[8..], &orig[14..14 + 28]);
}

#[test]
fn no_endpoints_rejects_tcp_and_udp_with_icmp_port_unreachable() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 5, 0, &[], 0);
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 6, 0, &[], 0);

    let syn = tcp_frame(CLIENT, VIP, &Tcp::syn(46000, 80));
    let (rc, out) = dp.run(PROG_FROM_POD, &syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 20 + 8 + 28);
    assert_port_unreachable(&out, &syn);

    // A small UDP datagram: the frame grows to hold the answer.
    let dgram = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 46001, 53, b"", true),
    );
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &dgram);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_port_unreachable(&out, &dgram);

    // Never answer a TCP reset.
    let mut rst = Tcp::data(46002, 80, b"");
    rst.flags = 0x04;
    let (rc, _) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &rst));
    assert_eq!(rc, TC_ACT_SHOT);
    // Nothing was tracked.
    assert!(dp
        .ct(&ct_key(CLIENT, VIP, 46000, 80, IPPROTO_TCP, CT_DIR_SERVICE))
        .is_none());
}

#[test]
fn no_usable_endpoint_for_this_policy_drops_instead_of_rejecting() {
    let mut dp = Datapath::load();
    let np = FrontendKey::new(NODE_IP, 30091, IPPROTO_UDP).with_scope(orca_common::SCOPE_EXTERNAL);
    dp.set_service(np, 22, 0, &[], 0);
    dp.set_flags(np, orca_common::FRONTEND_F_DROP_WHEN_EMPTY);
    let dgram = frame(
        EXTERNAL_CLIENT,
        NODE_IP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(EXTERNAL_CLIENT, NODE_IP, 55000, 30091, b"q", true),
    );
    let (rc, _) = dp.run(PROG_FROM_NETDEV, &dgram);
    assert_eq!(rc, TC_ACT_SHOT);
    // The same frontend without the flag (no endpoints anywhere) rejects.
    dp.set_flags(np, 0);
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &dgram);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!((out[34], out[35]), (3, 3));
}

#[test]
fn load_balancer_source_ranges_drop_other_sources() {
    use aya::maps::lpm_trie::{Key, LpmTrie};
    let mut dp = Datapath::load();
    let lb_ip = [198, 51, 100, 40];
    let fe = FrontendKey::new(lb_ip, 80, IPPROTO_TCP);
    dp.set_service(fe, 30, 0, &[be(BACKEND_A, 8080)], 0);
    dp.set_flags(fe, orca_common::FRONTEND_F_SOURCE_RANGES);
    {
        let map = dp.ebpf.map_mut(orca_common::MAP_SRC_RANGES).unwrap();
        let mut t: LpmTrie<&mut MapData, orca_common::SrcRangeKey, u32> = LpmTrie::try_from(map).unwrap();
        let key = orca_common::SrcRangeKey {
            service_id: 30,
            addr: addr_from_octets([203, 0, 113, 0]),
        };
        t.insert(&Key::new(32 + 24, key), 1, 0).unwrap();
        // Another service's range must not open this one.
        let other = orca_common::SrcRangeKey {
            service_id: 31,
            addr: addr_from_octets([192, 0, 2, 0]),
        };
        t.insert(&Key::new(32 + 24, other), 1, 0).unwrap();
    }
    let (rc, out) = dp.run(
        PROG_FROM_NETDEV,
        &tcp_frame([203, 0, 113, 77], lb_ip, &Tcp::syn(56000, 80)),
    );
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    for src in [[203, 0, 114, 1], EXTERNAL_CLIENT] {
        let (rc, _) = dp.run(PROG_FROM_NETDEV, &tcp_frame(src, lb_ip, &Tcp::syn(56001, 80)));
        assert_eq!(rc, TC_ACT_SHOT, "{src:?} is outside the ranges");
    }
}
