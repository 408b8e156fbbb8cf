//! IPv6: the same translations as IPv4 through the IPv6 maps (`ORCA_*6`): DNAT and reverse NAT, extension headers,
//! masquerading, reject with ICMPv6, ICMPv6 errors about tracked flows. Packets are built and checked here
//! (the ICMPv6 and TCP/UDP checksums over the IPv6 pseudo header), independently of the programs' code.

use std::net::Ipv6Addr;

use crate::harness::*;
use orca_common::{In6, CONFIG_SNAT_IPV6, MAPS6};

const CLIENT6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const VIP6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const BACKEND6_A: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const BACKEND6_B: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];
const NODE6: [u8; 16] = [0xfd, 0, 2, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const EXTERNAL6: [u8; 16] = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50];

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const ICMPV6: u8 = 58;

fn pseudo6(src: [u8; 16], dst: [u8; 16], proto: u8, len: usize) -> u32 {
    csum_add(csum_add(0, &src), &dst) + (len as u32 >> 16) + (len as u32 & 0xffff) + u32::from(proto)
}

fn tcp6(src: [u8; 16], dst: [u8; 16], t: &Tcp) -> Vec<u8> {
    // The IPv4 builder's checksum is over an IPv4 pseudo header: recompute it over IPv6's.
    let mut s = t.bytes([0; 4], [0; 4]);
    s[16..18].copy_from_slice(&[0, 0]);
    let c = csum_fold(csum_add(pseudo6(src, dst, IPPROTO_TCP, s.len()), &s));
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = udp_bytes([0; 4], [0; 4], sport, dport, payload, false);
    let mut c = csum_fold(csum_add(pseudo6(src, dst, IPPROTO_UDP, s.len()), &s));
    if c == 0 {
        c = 0xffff;
    }
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// Ethernet + IPv6 + extension headers `ext` (each `(next header, bytes)`, bytes a multiple of 8 with the first
/// two left for next header and length) + the upper-layer `l4` of protocol `proto`.
fn frame6(src: [u8; 16], dst: [u8; 16], ext: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut chain = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = ext.get(i + 1).map_or(proto, |(n, _)| *n);
        h[1] = (h.len() / 8 - 1) as u8;
        chain.extend_from_slice(&h);
    }
    let first = ext.first().map_or(proto, |(n, _)| *n);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    f.push(first);
    f.push(64);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&chain);
    f.extend_from_slice(l4);
    f
}

fn tcp_frame6(src: [u8; 16], dst: [u8; 16], t: &Tcp) -> Vec<u8> {
    frame6(src, dst, &[], IPPROTO_TCP, &tcp6(src, dst, t))
}

#[derive(Debug)]
struct Seen6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// Offset of the upper-layer header in the frame.
    l4: usize,
}

/// Parses an IPv6 frame (walking its extension headers) and asserts that its upper-layer checksum verifies.
fn check6(f: &[u8]) -> Seen6 {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "not IPv6");
    let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
    assert_eq!(f.len(), 54 + plen, "payload length");
    let src: [u8; 16] = f[22..38].try_into().unwrap();
    let dst: [u8; 16] = f[38..54].try_into().unwrap();
    let (mut next, mut off) = (f[20], 54);
    while [NEXTHDR_HOP, NEXTHDR_DEST, 43].contains(&next) {
        let len = (usize::from(f[off + 1]) + 1) * 8;
        next = f[off];
        off += len;
    }
    let l4 = &f[off..];
    assert_eq!(
        csum_fold(csum_add(pseudo6(src, dst, next, l4.len()), l4)),
        0,
        "upper-layer checksum invalid ({next})"
    );
    Seen6 {
        src: src.into(),
        dst: dst.into(),
        proto: next,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4: off,
    }
}

fn be6(a: [u8; 16], port: u16) -> Backend<In6> {
    Backend::new6(a, port)
}

fn key6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey<In6> {
    CtKey {
        saddr: In6::from_octets(src),
        daddr: In6::from_octets(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

fn set_service6(dp: &mut Datapath, fe: FrontendKey<In6>, id: u32, backends: &[Backend<In6>], flags: u16) {
    for (i, b) in backends.iter().enumerate() {
        let slot = BackendSlotKey {
            service_id: id,
            slot: i as u32,
        };
        dp.map::<BackendSlotKey, Backend<In6>>(MAPS6.backends)
            .insert(slot, *b, 0)
            .unwrap();
        dp.map::<MemberKey<In6>, u32>(MAPS6.members)
            .insert(MemberKey::of(id, b), i as u32, 0)
            .unwrap();
    }
    let value = Frontend {
        service_id: id,
        backend_count: backends.len() as u16,
        flags,
        affinity_timeout: 0,
        slot_base: 0,
    };
    dp.map::<FrontendKey<In6>, Frontend>(MAPS6.frontends)
        .insert(fe, value, 0)
        .unwrap();
}

fn set_snat6(dp: &mut Datapath, a: [u8; 16]) {
    let mut cfg: Array<&mut MapData, u32> = Array::try_from(dp.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
    for (i, w) in In6::from_octets(a).0.iter().enumerate() {
        cfg.set(CONFIG_SNAT_IPV6 + i as u32, *w, 0).unwrap();
    }
}

fn ct6(dp: &mut Datapath, k: &CtKey<In6>) -> Option<CtValue<In6>> {
    dp.map::<CtKey<In6>, CtValue<In6>>(MAPS6.ct).get(k, 0).ok()
}

#[test]
fn ipv6_dnat_of_tcp_syn_and_reverse_nat_of_reply() {
    both_modes6(|mut dp| {
        let fe = FrontendKey::new6(VIP6, 80, IPPROTO_TCP);
        set_service6(&mut dp, fe, 1, &[be6(BACKEND6_A, 8080)], 0);
        // An IPv4 frontend with the same id and port is another map: it does not answer IPv6.
        dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_B, 9090)], 0);

        let syn = tcp_frame6(CLIENT6, VIP6, &Tcp::syn(40000, 80));
        let (rc, out) = dp.cross(PROG_FROM_POD, &syn);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!((seen.src, seen.sport), (Ipv6Addr::from(CLIENT6), 40000));
        assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(BACKEND6_A), 8080));
        assert_eq!(out.len(), syn.len());
        assert_eq!(&out[..22], &syn[..22], "Ethernet/IPv6 head changed");
        assert_eq!(&out[58..70], &syn[58..70], "TCP seq/ack/flags changed");

        let fwd = ct6(&mut dp, &key6(CLIENT6, VIP6, 40000, 80, IPPROTO_TCP, CT_DIR_SERVICE)).expect("service entry");
        assert_eq!(fwd.backend_addr, In6::from_octets(BACKEND6_A));
        assert!(fwd.nat_addr == In6::default(), "not masqueraded");
        assert!(dp.ct_entries().is_empty(), "nothing in the IPv4 conntrack map");

        // The backend's SYN-ACK leaves as the VIP's.
        let mut synack = Tcp::syn(8080, 40000);
        synack.flags = SYN | ACK;
        synack.ack = 1001;
        let (rc, out) = dp.cross(PROG_FROM_NETDEV, &tcp_frame6(BACKEND6_A, CLIENT6, &synack));
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!((seen.src, seen.sport), (Ipv6Addr::from(VIP6), 80));
        assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(CLIENT6), 40000));

        // UDP too, and a flow to an address that is no frontend passes untouched.
        let dns = FrontendKey::new6(VIP6, 53, IPPROTO_UDP);
        set_service6(&mut dp, dns, 2, &[be6(BACKEND6_B, 5353)], 0);
        let q = frame6(
            CLIENT6,
            VIP6,
            &[],
            IPPROTO_UDP,
            &udp6(CLIENT6, VIP6, 40001, 53, b"query"),
        );
        let (_, out) = dp.cross(PROG_FROM_POD, &q);
        let seen = check6(&out);
        assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(BACKEND6_B), 5353));
        let other = tcp_frame6(CLIENT6, BACKEND6_B, &Tcp::syn(40002, 80));
        assert_eq!(dp.cross(PROG_FROM_POD, &other), (TC_ACT_OK, other.clone()));
    });
}

#[test]
fn ipv6_extension_headers_are_skipped_and_fragments_pass() {
    let mut dp = Datapath::load6();
    let fe = FrontendKey::new6(VIP6, 80, IPPROTO_TCP);
    set_service6(&mut dp, fe, 3, &[be6(BACKEND6_A, 8080)], 0);
    // Hop-by-hop options (a PadN) then destination options of 16 bytes.
    let hop = vec![0, 0, 1, 4, 0, 0, 0, 0];
    let mut dest = vec![0u8; 16];
    dest[2..4].copy_from_slice(&[1, 12]);
    let l4 = tcp6(CLIENT6, VIP6, &Tcp::syn(41000, 80));
    let syn = frame6(
        CLIENT6,
        VIP6,
        &[(NEXTHDR_HOP, hop), (NEXTHDR_DEST, dest)],
        IPPROTO_TCP,
        &l4,
    );
    let (rc, out) = dp.cross(PROG_FROM_POD, &syn);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check6(&out);
    assert_eq!(seen.l4, 14 + 40 + 8 + 16);
    assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(BACKEND6_A), 8080));
    assert_eq!(&out[54..78], &syn[54..78], "extension headers untouched");

    // A fragment (fragment header): no ports to translate by; it passes untouched and is counted.
    let before = dp.stats()[orca_common::REASON_FRAGMENT as usize];
    let frag = frame6(
        CLIENT6,
        VIP6,
        &[(NEXTHDR_FRAGMENT, vec![0, 0, 0, 1, 0, 0, 0, 7])],
        IPPROTO_TCP,
        &l4,
    );
    assert_eq!(dp.run(PROG_FROM_POD, &frag), (TC_ACT_OK, frag.clone()));
    assert_eq!(dp.stats()[orca_common::REASON_FRAGMENT as usize], before + 1);
}

#[test]
fn ipv6_no_endpoints_rejects_with_icmpv6_port_unreachable() {
    let mut dp = Datapath::load6();
    set_service6(&mut dp, FrontendKey::new6(VIP6, 80, IPPROTO_TCP), 4, &[], 0);
    let syn = tcp_frame6(CLIENT6, VIP6, &Tcp::syn(42000, 80));
    let (rc, out) = dp.run(PROG_FROM_POD, &syn);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out.len(), 14 + 40 + 8 + 48);
    assert_eq!(&out[0..6], &syn[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &syn[0..6]);
    let seen = check6(&out);
    assert_eq!(seen.proto, ICMPV6);
    assert_eq!((seen.src, seen.dst), (Ipv6Addr::from(VIP6), Ipv6Addr::from(CLIENT6)));
    assert_eq!((out[54], out[55]), (1, 4), "destination unreachable, port unreachable");
    assert_eq!(out[21], 64, "hop limit");
    assert_eq!(
        &out[62..],
        &syn[14..14 + 48],
        "quote: the IPv6 header and 8 bytes of TCP"
    );

    // A small UDP datagram: the frame grows to hold the answer.
    set_service6(&mut dp, FrontendKey::new6(VIP6, 53, IPPROTO_UDP), 5, &[], 0);
    let q = frame6(CLIENT6, VIP6, &[], IPPROTO_UDP, &udp6(CLIENT6, VIP6, 42001, 53, b""));
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &q);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(check6(&out).proto, ICMPV6);

    // With extension headers the quote would not reach the ports: dropped, counted as such.
    let with_ext = frame6(
        CLIENT6,
        VIP6,
        &[(NEXTHDR_DEST, vec![0, 0, 1, 4, 0, 0, 0, 0])],
        IPPROTO_TCP,
        &tcp6(CLIENT6, VIP6, &Tcp::syn(42002, 80)),
    );
    assert_eq!(dp.run(PROG_FROM_POD, &with_ext).0, TC_ACT_SHOT);
    assert!(dp.stats()[orca_common::REASON_NO_ENDPOINTS_DROPPED as usize] >= 1);
}

#[test]
fn ipv6_external_traffic_is_masqueraded_to_the_node_address() {
    both_modes6(|mut dp| {
        set_snat6(&mut dp, NODE6);
        let np = FrontendKey::new6(NODE6, 30080, IPPROTO_TCP);
        set_service6(&mut dp, np, 6, &[be6(BACKEND6_B, 8080)], FRONTEND_F_SNAT_EXTERNAL);
        let syn = tcp_frame6(EXTERNAL6, NODE6, &Tcp::syn(50000, 30080));
        let (rc, out) = dp.cross(PROG_FROM_NETDEV, &syn);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(BACKEND6_B), 8080));
        assert_eq!(
            seen.src,
            Ipv6Addr::from(NODE6),
            "masqueraded to the node's IPv6 address"
        );
        assert!(default_nat_ports().contains(seen.sport), "{}", seen.sport);
        let nat_port = seen.sport;

        let mut synack = Tcp::syn(8080, nat_port);
        synack.flags = SYN | ACK;
        let (rc, out) = dp.cross(PROG_FROM_NETDEV, &tcp_frame6(BACKEND6_B, NODE6, &synack));
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!((seen.src, seen.sport), (Ipv6Addr::from(NODE6), 30080));
        assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(EXTERNAL6), 50000));

        // Hairpin: a pod reaching itself through an IPv6 ClusterIP is masqueraded too.
        set_service6(
            &mut dp,
            FrontendKey::new6(VIP6, 81, IPPROTO_TCP),
            7,
            &[be6(CLIENT6, 8081)],
            0,
        );
        let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame6(CLIENT6, VIP6, &Tcp::syn(43000, 81)));
        let seen = check6(&out);
        assert_eq!((seen.src, seen.dst), (Ipv6Addr::from(NODE6), Ipv6Addr::from(CLIENT6)));
    });
}

/// An ICMPv6 error from `src` to `dst` quoting `quote`, with its checksum over the pseudo header.
fn icmp6_error(src: [u8; 16], dst: [u8; 16], icmp_type: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0x00];
    m.extend_from_slice(quote);
    let c = csum_fold(csum_add(pseudo6(src, dst, ICMPV6, m.len()), &m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    frame6(src, dst, &[], ICMPV6, &m)
}

#[test]
fn ipv6_icmp_errors_about_a_cluster_ip_flow_are_translated_both_ways() {
    both_modes6(|mut dp| {
        set_service6(
            &mut dp,
            FrontendKey::new6(VIP6, 53, IPPROTO_UDP),
            8,
            &[be6(BACKEND6_A, 5353)],
            0,
        );
        let query = frame6(
            CLIENT6,
            VIP6,
            &[],
            IPPROTO_UDP,
            &udp6(CLIENT6, VIP6, 40000, 53, b"query"),
        );
        let (_, to_backend) = dp.cross(PROG_FROM_POD, &query);
        assert_eq!(check6(&to_backend).dst, Ipv6Addr::from(BACKEND6_A));

        // The backend has no listener: the client sees an error about its own packet, from the VIP.
        let unreach = icmp6_error(BACKEND6_A, CLIENT6, 1, 4, &to_backend[14..]);
        let (rc, out) = dp.cross(PROG_FROM_NETDEV, &unreach);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!((seen.src, seen.dst), (Ipv6Addr::from(VIP6), Ipv6Addr::from(CLIENT6)));
        assert_eq!(
            &out[62..],
            &query[14..],
            "quote = the client's own packet, checksum included"
        );

        // Packet too big about the VIP's reply, reported by the client: the backend sees its own packet quoted.
        let reply = frame6(
            BACKEND6_A,
            CLIENT6,
            &[],
            IPPROTO_UDP,
            &udp6(BACKEND6_A, CLIENT6, 5353, 40000, b"answer"),
        );
        let (_, to_client) = dp.cross(PROG_FROM_NETDEV, &reply);
        assert_eq!(check6(&to_client).src, Ipv6Addr::from(VIP6));
        let too_big = icmp6_error(CLIENT6, VIP6, 2, 0, &to_client[14..]);
        let (rc, out) = dp.cross(PROG_FROM_POD, &too_big);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check6(&out);
        assert_eq!(
            (seen.src, seen.dst),
            (Ipv6Addr::from(CLIENT6), Ipv6Addr::from(BACKEND6_A))
        );
        assert_eq!(&out[62..], &reply[14..]);

        // Errors about untracked flows, and neighbour discovery, pass untouched.
        let stranger = frame6(
            CLIENT6,
            BACKEND6_B,
            &[],
            IPPROTO_UDP,
            &udp6(CLIENT6, BACKEND6_B, 40001, 53, b"x"),
        );
        let unknown = icmp6_error(BACKEND6_B, CLIENT6, 1, 4, &stranger[14..]);
        assert_eq!(dp.cross(PROG_FROM_NETDEV, &unknown), (TC_ACT_OK, unknown.clone()));
        let ns = icmp6_error(CLIENT6, VIP6, 135, 0, &[0; 20]);
        assert_eq!(dp.cross(PROG_FROM_POD, &ns), (TC_ACT_OK, ns.clone()));
    });
}

#[test]
fn ipv6_with_netfilter_bypassed_translated_packets_go_to_the_fib_device() {
    // In this thread's own namespace: a "backend" veth with a resolved IPv6 neighbour, IPv6 forwarding on.
    let mut dp = Datapath::load_with(Options {
        bypass_netfilter: true,
        ipv6: true,
        ..Options::default()
    });
    set_service6(
        &mut dp,
        FrontendKey::new6(VIP6, 80, IPPROTO_TCP),
        9,
        &[be6(BACKEND6_A, 8080)],
        0,
    );
    ip(&["link", "add", "orca6-b", "type", "veth", "peer", "name", "orca6-p"]);
    ip(&["link", "set", "orca6-b", "address", "02:00:00:00:0b:01", "up"]);
    ip(&["link", "set", "orca6-p", "up"]);
    ip(&["-6", "addr", "add", "fd00:244:2::1/64", "dev", "orca6-b", "nodad"]);
    ip(&["-6", "addr", "add", "fd00:244:1::1/64", "dev", "orca6-p", "nodad"]);
    ip(&[
        "-6",
        "neigh",
        "add",
        "fd00:244:2::5",
        "lladdr",
        "02:00:00:00:0b:05",
        "dev",
        "orca6-b",
        "nud",
        "permanent",
    ]);
    let pod_if = ifindex("orca6-p");
    let before = dp.stats()[orca_common::REASON_FIB_DECLINED as usize];
    // Forwarding off: the FIB declines, the stack gets the translated packet.
    let (rc, out) = dp.run_on(PROG_FROM_POD, &tcp_frame6(CLIENT6, VIP6, &Tcp::syn(44000, 80)), pod_if);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!((check6(&out).dst, out[21]), (Ipv6Addr::from(BACKEND6_A), 64));
    assert_eq!(dp.stats()[orca_common::REASON_FIB_DECLINED as usize], before + 1);

    let st = std::process::Command::new("sysctl")
        .args(["-qw", "net.ipv6.conf.all.forwarding=1"])
        .status()
        .expect("sysctl");
    assert!(st.success());
    let (rc, out) = dp.run_on(PROG_FROM_POD, &tcp_frame6(CLIENT6, VIP6, &Tcp::syn(44001, 80)), pod_if);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let seen = check6(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv6Addr::from(BACKEND6_A), 8080));
    assert_eq!(
        &out[0..6],
        &[2, 0, 0, 0, 0x0b, 5],
        "destination MAC = the backend's neighbour entry"
    );
    assert_eq!(&out[6..12], &[2, 0, 0, 0, 0x0b, 1], "source MAC = the egress device's");
    assert_eq!(out[21], 63, "hop limit decremented");
}
