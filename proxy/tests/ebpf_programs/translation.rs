//! Translation: DNAT of packets to frontends, the reverse of replies, which backend a flow gets and keeps.

use crate::harness::*;

#[test]
fn verifier_accepts_every_program() {
    let bypass6 = Options {
        bypass_netfilter: true,
        ipv6: true,
        ..Options::default()
    };
    for dp in [Datapath::load6(), Datapath::load_with(bypass6)] {
        let names: Vec<&str> = dp.ebpf.programs().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 14, "{names:?}");
        let tc_programs = [
            PROG_FROM_POD,
            PROG_FROM_NETDEV,
            PROG_EGRESS,
            orca_common::PROG_FROM_POD6,
            orca_common::PROG_FROM_NETDEV6,
            orca_common::PROG_EGRESS6,
        ];
        for p in tc_programs {
            assert!(names.contains(&p), "{p} missing: {names:?}");
        }
        // Datapath::load loaded each program (the socket hooks where the kernel has bpf_set_retval, 5.18+), so the
        // verifier accepted all of them.
        let hooks = orca_proxy::dataplane::ebpf::loader::sock_hooks_supported();
        for (name, prog) in dp.ebpf.programs() {
            let tc = tc_programs.contains(&name);
            assert_eq!(prog.fd().is_ok(), tc || hooks, "{name} loaded");
        }
    }
}

#[test]
fn dnat_of_tcp_syn_to_cluster_ip_and_reverse_nat_of_reply() {
    both_modes(|mut dp| {
        dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);

        let syn = tcp_frame(CLIENT, VIP, &Tcp::syn(40000, 80));
        let (rc, out) = dp.cross(PROG_FROM_POD, &syn);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check(&out);
        assert_eq!(seen.src, Ipv4Addr::from(CLIENT));
        assert_eq!(seen.dst, Ipv4Addr::from(BACKEND_A));
        assert_eq!((seen.sport, seen.dport), (40000, 8080));
        assert_eq!(out.len(), syn.len());
        // Everything but addresses, ports and checksums is untouched (options included).
        assert_eq!(&out[..24], &syn[..24], "Ethernet/IP head changed");
        assert_eq!(&out[38..50], &syn[38..50], "TCP seq/ack/flags changed");
        assert_eq!(&out[54..], &syn[54..], "TCP options changed");

        // The flow is tracked: the service entry names the backend; the replies' entry is the inner one (found at
        // egress, after the stack) or, with netfilter bypassed, the reply one (found at ingress).
        let fwd = dp
            .ct(&ct_key(CLIENT, VIP, 40000, 80, IPPROTO_TCP, CT_DIR_SERVICE))
            .expect("service entry");
        assert_eq!(
            (fwd.backend_addr, fwd.backend_port, fwd.nat_addr),
            (addr_from_octets(BACKEND_A), 8080u16.to_be(), 0)
        );
        let rev = if dp.bypass {
            ct_key(BACKEND_A, CLIENT, 8080, 40000, IPPROTO_TCP, CT_DIR_REPLY)
        } else {
            CtKey::inner(
                addr_from_octets(CLIENT),
                40000u16.to_be(),
                addr_from_octets(BACKEND_A),
                8080u16.to_be(),
                IPPROTO_TCP,
            )
        };
        let rev = dp.ct(&rev).expect("the replies' entry");
        assert!(rev.same_flow(&fwd));
        assert_eq!(
            dp.ct_entries().len(),
            2,
            "a flow that is not masqueraded has two entries"
        );

        // The backend's SYN-ACK, arriving from the uplink (remote backend), leaves as the VIP's.
        let mut synack = Tcp::syn(8080, 40000);
        synack.flags = SYN | ACK;
        synack.ack = 1001;
        let reply = tcp_frame(BACKEND_A, CLIENT, &synack);
        let (rc, out) = dp.cross(PROG_FROM_NETDEV, &reply);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check(&out);
        assert_eq!(seen.src, Ipv4Addr::from(VIP));
        assert_eq!(seen.dst, Ipv4Addr::from(CLIENT));
        assert_eq!((seen.sport, seen.dport), (80, 40000));
        // The reply established the flow, in every entry.
        for (_, v) in dp.ct_entries() {
            assert_ne!(v.flags & orca_common::CT_F_SEEN_REPLY, 0);
        }

        // Payload-carrying packets of the flow are translated too, payload intact.
        let data = tcp_frame(CLIENT, VIP, &Tcp::data(40000, 80, b"GET / HTTP/1.1\r\n\r\n"));
        let (rc, out) = dp.cross(PROG_FROM_POD, &data);
        assert_eq!(rc, TC_ACT_OK);
        let seen = check(&out);
        assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_A), 8080));
        assert!(out.ends_with(b"GET / HTTP/1.1\r\n\r\n"));
    });
}

#[test]
fn dnat_with_ip_options() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    // Router alert option (4 bytes): IHL 6.
    let f = frame(
        CLIENT,
        VIP,
        IPPROTO_TCP,
        &[0x94, 0x04, 0, 0],
        0,
        &Tcp::syn(40001, 80).bytes(CLIENT, VIP),
    );
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(out[14] & 0x0f, 6);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_A), 8080));
    assert_eq!(&out[34..38], &[0x94, 0x04, 0, 0], "IP options changed");
}

#[test]
fn dnat_of_udp_with_and_without_checksum() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 7, 0, &[be(BACKEND_B, 5353)], 0);

    let f = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 33000, 53, b"query", true),
    );
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!(seen.proto, IPPROTO_UDP);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 5353));
    assert_ne!(seen.l4_csum, 0);

    // A zero UDP checksum means "no checksum" and must stay zero.
    let f = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 33001, 53, b"query", false),
    );
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 5353));
    assert_eq!(seen.l4_csum, 0);

    // The reply is reverse-NATed.
    let f = frame(
        BACKEND_B,
        CLIENT,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(BACKEND_B, CLIENT, 5353, 33000, b"answer", true),
    );
    let (rc, out) = dp.cross(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(VIP), 53));
}

/// A UDP payload of 16 bytes whose checksum is zero once the datagram carries `src`:`sport` ->
/// `dst`:`dport` (its last two bytes cancel the rest of the sum).
fn udp_payload_summing_to_zero(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut payload = b"zero-checksum\0\0\0".to_vec();
    let l4 = udp_bytes(src, dst, sport, dport, &payload, false);
    let rest = csum_fold(csum_add(pseudo(src, dst, IPPROTO_UDP, l4.len()), &l4));
    // `rest` is the complement of the folded sum: adding it makes the sum all ones (checksum 0).
    payload[14..16].copy_from_slice(&rest.to_be_bytes());
    let l4 = udp_bytes(src, dst, sport, dport, &payload, false);
    assert_eq!(csum_fold(csum_add(pseudo(src, dst, IPPROTO_UDP, l4.len()), &l4)), 0);
    payload
}

#[test]
fn udp_checksum_that_becomes_zero_is_sent_as_all_ones() {
    // RFC 768: a computed zero checksum is transmitted as 0xffff (0 means "no checksum"), in both
    // directions of a translated flow.
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 7, 0, &[be(BACKEND_B, 5353)], 0);

    let payload = udp_payload_summing_to_zero(CLIENT, BACKEND_B, 33010, 5353);
    let f = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 33010, 53, &payload, true),
    );
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 5353));
    assert_eq!(seen.l4_csum, 0xffff, "a zero checksum must be sent as 0xffff");
    assert!(out.ends_with(&payload));

    let payload = udp_payload_summing_to_zero(VIP, CLIENT, 53, 33010);
    let f = frame(
        BACKEND_B,
        CLIENT,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(BACKEND_B, CLIENT, 5353, 33010, &payload, true),
    );
    let (rc, out) = dp.cross(PROG_FROM_POD, &f);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(VIP), 53));
    assert_eq!(seen.l4_csum, 0xffff, "a zero checksum must be sent as 0xffff");
}

#[test]
fn established_flow_keeps_its_backend_when_the_backend_set_changes() {
    let mut dp = Datapath::load();
    let fe = FrontendKey::new(VIP, 80, IPPROTO_TCP);
    let old = [be(BACKEND_A, 8080), be(BACKEND_B, 8080)];
    dp.set_service(fe, 1, 0, &old, 0);

    let (rc, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41000, 80)));
    assert_eq!(rc, TC_ACT_OK);
    let first = check(&out).dst;

    // New set in a fresh slot range (without the chosen backend), switch, free the old slots.
    let new = [be(BACKEND_C, 9090)];
    dp.set_service(fe, 1, 1000, &new, 0);
    dp.remove_backends(1, 0, &old);

    // The established connection keeps its backend, for many packets.
    for _ in 0..20 {
        let (rc, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::data(41000, 80, b"x")));
        assert_eq!(rc, TC_ACT_OK);
        let seen = check(&out);
        assert_eq!(seen.dst, first);
        assert_eq!(seen.dport, 8080);
    }
    // A new connection goes to the new set.
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41001, 80)));
    assert_eq!((check(&out).dst, check(&out).dport), (Ipv4Addr::from(BACKEND_C), 9090));
    // A SYN reusing the old 5-tuple (new connection) does not go to the removed backend.
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41000, 80)));
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_C));
}

#[test]
fn udp_flow_moves_off_a_removed_backend_but_stays_on_a_kept_one() {
    let mut dp = Datapath::load();
    let fe = FrontendKey::new(VIP, 53, IPPROTO_UDP);
    let a = be(BACKEND_A, 53);
    dp.set_service(fe, 3, 0, &[a], 0);
    let dgram = |sport| {
        frame(
            CLIENT,
            VIP,
            IPPROTO_UDP,
            &[],
            0,
            &udp_bytes(CLIENT, VIP, sport, 53, b"q", true),
        )
    };

    let (_, out) = dp.run(PROG_FROM_POD, &dgram(34000));
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));

    // A is kept and B added: the flow stays on A.
    dp.set_service(fe, 3, 100, &[a, be(BACKEND_B, 53)], 0);
    dp.remove_backends(3, 0, &[]);
    for _ in 0..20 {
        let (_, out) = dp.run(PROG_FROM_POD, &dgram(34000));
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    }
    // A removed: the flow moves to B at once.
    dp.set_service(fe, 3, 200, &[be(BACKEND_B, 53)], 0);
    dp.remove_backends(3, 100, &[a]);
    let (_, out) = dp.run(PROG_FROM_POD, &dgram(34000));
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_B));
}

#[test]
fn random_choice_spreads_new_connections_over_all_backends() {
    let mut dp = Datapath::load();
    let backends = [be(BACKEND_A, 80), be(BACKEND_B, 80), be(BACKEND_C, 80)];
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 2, 0, &backends, 0);
    let mut counts = [0u32; 3];
    for sport in 0..300u16 {
        let (rc, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(20000 + sport, 80)));
        assert_eq!(rc, TC_ACT_OK);
        let dst = check(&out).dst.octets();
        let i = [BACKEND_A, BACKEND_B, BACKEND_C]
            .iter()
            .position(|b| *b == dst)
            .expect("a backend");
        counts[i] += 1;
    }
    // Uniform: 100 each expected; 40 is more than 7 standard deviations below.
    assert!(counts.iter().all(|&c| c >= 40), "{counts:?}");
}

#[test]
fn client_ip_affinity_pins_new_connections_until_the_backend_leaves() {
    let mut dp = Datapath::load();
    let fe = FrontendKey::new(VIP, 443, IPPROTO_TCP);
    let backends = [be(BACKEND_A, 8443), be(BACKEND_B, 8443)];
    dp.set_service(fe, 4, 0, &backends, 10_800);
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(45000, 443)));
    let pinned = check(&out).dst;
    // Without affinity 30 new connections would all pick one of two backends with p = 2^-29.
    for sport in 1..=30u16 {
        let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(45000 + sport, 443)));
        assert_eq!(check(&out).dst, pinned);
    }
    // Another client is balanced independently: over 30 connections of distinct clients both
    // backends appear.
    let mut seen = std::collections::HashSet::new();
    for i in 0..30u8 {
        let client = [10, 244, 9, i + 1];
        let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(client, VIP, &Tcp::syn(45000, 443)));
        seen.insert(check(&out).dst);
    }
    assert_eq!(seen.len(), 2);
    // The pinned backend leaves: new connections go to the remaining one.
    let (gone, stays) = if pinned == Ipv4Addr::from(BACKEND_A) {
        (backends[0], backends[1])
    } else {
        (backends[1], backends[0])
    };
    dp.set_service(fe, 4, 100, &[stays], 10_800);
    dp.remove_backends(4, 0, &[gone]);
    for sport in 100..110u16 {
        let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(45000 + sport, 443)));
        assert_eq!(check(&out).dst.octets(), orca_common::addr_octets(stays.addr));
    }
}

#[test]
fn maglev_picks_the_same_backend_for_a_flow_on_every_node() {
    let backends = [be(BACKEND_A, 8080), be(BACKEND_B, 8080), be(BACKEND_C, 8080)];
    let table = orca_proxy::dataplane::ebpf::maglev::table(&backends, orca_common::MAGLEV_TABLE_SIZE);
    let fe = FrontendKey::new(VIP, 80, IPPROTO_TCP);
    // Two "nodes": separate maps, same Service, same table.
    let mut nodes = [Datapath::load(), Datapath::load()];
    for dp in &mut nodes {
        dp.set_service(fe, 40, 0, &backends, 0);
        dp.set_flags(fe, orca_common::FRONTEND_F_MAGLEV);
        let mut m: HashMap<&mut MapData, BackendSlotKey, u32> =
            HashMap::try_from(dp.ebpf.map_mut(orca_common::MAP_MAGLEV).unwrap()).unwrap();
        for (i, offset) in table.iter().enumerate() {
            m.insert(
                BackendSlotKey {
                    service_id: 40,
                    slot: i as u32,
                },
                *offset,
                0,
            )
            .unwrap();
        }
    }
    let mut used = std::collections::HashSet::new();
    for sport in 0..60u16 {
        let f = tcp_frame(CLIENT, VIP, &Tcp::syn(57000 + sport, 80));
        let a = check(&nodes[0].run(PROG_FROM_POD, &f).1).dst;
        let b = check(&nodes[1].run(PROG_FROM_POD, &f).1).dst;
        assert_eq!(a, b, "nodes disagree for source port {}", 57000 + sport);
        // And it is the table's choice for the flow hash the agent documents.
        let h = orca_common::flow_hash(
            addr_from_octets(CLIENT),
            addr_from_octets(VIP),
            (57000 + sport).to_be(),
            80u16.to_be(),
            IPPROTO_TCP,
        );
        let want = backends[table[(h % orca_common::MAGLEV_TABLE_SIZE) as usize] as usize];
        assert_eq!(a.octets(), orca_common::addr_octets(want.addr));
        used.insert(a);
    }
    assert_eq!(used.len(), 3, "{used:?}");
}

#[test]
fn non_tcp_udp_fragments_and_non_ipv4_pass_untouched() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 2, 0, &[be(BACKEND_A, 53)], 0);

    let mut icmp_echo = vec![8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
    let c = csum_fold(csum_add(0, &icmp_echo));
    icmp_echo[2..4].copy_from_slice(&c.to_be_bytes());
    let udp = udp_bytes(CLIENT, VIP, 47000, 53, b"fragmented", true);
    let tcp = Tcp::syn(47001, 80).bytes(CLIENT, VIP);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "ICMP echo to the VIP",
            frame(CLIENT, VIP, IPPROTO_ICMP, &[], 0, &icmp_echo),
        ),
        ("SCTP-like protocol 132", frame(CLIENT, VIP, 132, &[], 0, &tcp)),
        (
            "first fragment (MF) of UDP to the VIP",
            frame(CLIENT, VIP, IPPROTO_UDP, &[], 0x2000, &udp),
        ),
        (
            "later fragment of TCP to the VIP",
            frame(CLIENT, VIP, IPPROTO_TCP, &[], 0x0010, &tcp),
        ),
        (
            "TCP to a non-service address",
            tcp_frame(CLIENT, [10, 96, 0, 11], &Tcp::syn(47002, 80)),
        ),
        (
            "TCP to the VIP on another port",
            tcp_frame(CLIENT, VIP, &Tcp::syn(47003, 81)),
        ),
        ("IPv6", {
            let mut f = tcp_frame(CLIENT, VIP, &Tcp::syn(47004, 80));
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f
        }),
        ("ARP", {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&0x0806u16.to_be_bytes());
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&[0; 20]);
            f
        }),
    ];
    for (what, f) in cases {
        for prog in [PROG_FROM_POD, PROG_FROM_NETDEV, PROG_EGRESS] {
            let (rc, out) = dp.run(prog, &f);
            assert_eq!(rc, TC_ACT_OK, "{what} ({prog})");
            assert_eq!(out, f, "{what} ({prog}) was modified");
        }
    }
    // None of them created conntrack state.
    let ct: HashMap<_, CtKey, CtValue> = dp.map(MAP_CT);
    assert_eq!(ct.keys().count(), 0);
}
