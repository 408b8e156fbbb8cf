//! Conntrack: per-state lifetimes, entries that keep each other alive, masquerade ports given back when their
//! flow is over, established flows that are never evicted, and the agent's collector.

use orca_common::{CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST, CT_F_SEEN_REPLY, REASON_CT_FULL, REASON_NO_SNAT_PORT};
use orca_proxy::dataplane::ebpf::conntrack;

use crate::harness::*;

fn ct_map(dp: &Datapath) -> &MapData {
    match dp.ebpf.map(MAP_CT).unwrap() {
        aya::maps::Map::HashMap(m) => m,
        other => panic!("ORCA_CT4 is not a plain hash map: {other:?}"),
    }
}

/// Makes every conntrack entry look idle since `ns_ago` nanoseconds.
fn age_all(dp: &mut Datapath, ns_ago: u64) {
    let then = monotonic_ns().saturating_sub(ns_ago);
    let entries = dp.ct_entries();
    let mut m = dp.map::<CtKey, CtValue>(MAP_CT);
    for (k, mut v) in entries {
        v.last_seen_ns = then;
        m.insert(k, v, 0).unwrap();
    }
}

#[test]
fn conntrack_entries_follow_the_kernels_states_and_lifetimes() {
    both_modes(|mut dp| {
        let t = CtTimeouts::DEFAULT;
        dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 60, 0, &[be(BACKEND_A, 8080)], 0);
        let svc = ct_key(CLIENT, VIP, 60000, 80, IPPROTO_TCP, CT_DIR_SERVICE);
        let lifetime = |dp: &mut Datapath| {
            let v = dp.ct(&svc).unwrap();
            // Every entry of the flow is in the same state.
            for (_, other) in dp.ct_entries() {
                assert_eq!(other.flags, v.flags);
            }
            v.lifetime_ns(IPPROTO_TCP, &t)
        };
        // SYN sent, no answer yet.
        dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(60000, 80)));
        assert_eq!(lifetime(&mut dp), t.tcp_syn_sent_ns);
        // The SYN-ACK establishes it.
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60000, SYN | ACK)),
        );
        assert_eq!(lifetime(&mut dp), t.tcp_established_ns);
        // The client closes its side: CLOSE_WAIT; the backend too: TIME_WAIT; a reset: CLOSE.
        dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &tcp_flags(60000, 80, ACK | FIN)));
        assert_eq!(lifetime(&mut dp), t.tcp_close_wait_ns);
        assert_eq!(
            dp.ct(&svc).unwrap().flags & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND),
            CT_F_FIN_CLIENT
        );
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60000, ACK | FIN)),
        );
        assert_eq!(lifetime(&mut dp), t.tcp_time_wait_ns);
        assert!(dp.ct(&svc).unwrap().tcp_closed());
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60000, RST)),
        );
        assert_eq!(lifetime(&mut dp), t.tcp_close_ns);

        // A SYN on the closed connection's tuple opens a new connection: a fresh state, not the old one's.
        dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(60000, 80)));
        assert_eq!(dp.ct(&svc).unwrap().flags, 0);

        // UDP: 30 s until a reply, then a stream (120 s).
        dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 61, 0, &[be(BACKEND_B, 5353)], 0);
        let usvc = ct_key(CLIENT, VIP, 60001, 53, IPPROTO_UDP, CT_DIR_SERVICE);
        dp.cross(PROG_FROM_POD, &udp_frame(CLIENT, VIP, 60001, 53, b"q"));
        assert_eq!(dp.ct(&usvc).unwrap().lifetime_ns(IPPROTO_UDP, &t), t.udp_ns);
        dp.cross(PROG_FROM_NETDEV, &udp_frame(BACKEND_B, CLIENT, 5353, 60001, b"a"));
        assert_eq!(dp.ct(&usvc).unwrap().lifetime_ns(IPPROTO_UDP, &t), t.udp_stream_ns);

        // An expired service entry is a new flow: the stale backend it names is not used.
        let mut stale = dp.ct(&svc).unwrap();
        stale.backend_addr = addr_from_octets([10, 244, 99, 99]);
        stale.last_seen_ns = 0;
        dp.map::<CtKey, CtValue>(MAP_CT).insert(svc, stale, 0).unwrap();
        let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::data(60000, 80, b"x")));
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    });
}

#[test]
fn replies_keep_a_silent_clients_flow_alive() {
    both_modes(|mut dp| {
        dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 61, 0, &[be(BACKEND_B, 5353)], 0);
        dp.cross(PROG_FROM_POD, &udp_frame(CLIENT, VIP, 61000, 53, b"sub"));
        let svc = ct_key(CLIENT, VIP, 61000, 53, IPPROTO_UDP, CT_DIR_SERVICE);
        // The client has been silent for 100 s of its 120 s; the backend keeps streaming, and its replies last
        // passed the refresh on to the flow's other entries a tick ago (they do so once per tick, about a second).
        let entries = dp.ct_entries();
        {
            let mut m = dp.map::<CtKey, CtValue>(MAP_CT);
            for (k, mut v) in entries {
                v.flags |= CT_F_SEEN_REPLY;
                v.last_seen_ns = monotonic_ns() - 100_000_000_000;
                v.peer_refreshed = orca_common::ct_tick(monotonic_ns()).wrapping_sub(1);
                m.insert(k, v, 0).unwrap();
            }
        }
        let (_, out) = dp.cross(PROG_FROM_NETDEV, &udp_frame(BACKEND_B, CLIENT, 5353, 61000, b"push"));
        assert_eq!(check(&out).src, Ipv4Addr::from(VIP));
        let after = dp.ct(&svc).unwrap().last_seen_ns;
        assert!(
            monotonic_ns() - after < 5_000_000_000,
            "the reply did not refresh the service entry"
        );
    });
}

/// A NodePort (masqueraded) whose only backend is `BACKEND_B`, with the masquerade ports 20000-29999.
fn node_port_with_10k_ports(o: Options) -> Datapath {
    let mut dp = Datapath::load_with(Options {
        nat_ports: NatPorts::new(20_000, 29_999, None),
        ..o
    });
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    dp
}

/// Opens a connection from `client`:`sport` to the NodePort; returns its masquerade port, or the verdict.
fn open(dp: &Datapath, client: [u8; 4], sport: u16) -> Result<u16, u32> {
    let (rc, out) = dp.cross(PROG_FROM_NETDEV, &tcp_frame(client, NODE_IP, &Tcp::syn(sport, 30080)));
    if rc != TC_ACT_OK {
        return Err(rc);
    }
    let seen = check(&out);
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::from(NODE_IP), Ipv4Addr::from(BACKEND_B))
    );
    Ok(seen.sport)
}

#[test]
fn masquerade_ports_are_given_back_when_their_flows_expire() {
    // The conntrack map at its real size; 10,000 masquerade ports; unanswered SYNs live 1 s here.
    let timeouts = CtTimeouts {
        tcp_syn_sent_ns: 1_000_000_000,
        ..CtTimeouts::DEFAULT
    };
    let mut dp = node_port_with_10k_ports(Options {
        ct_entries: None,
        timeouts,
        ..Options::default()
    });
    let t0 = std::time::Instant::now();
    // 10,000 connections from one client to the one backend take every port (each keeps its own source port
    // when it can, as the kernel's masquerade does).
    let mut ports = std::collections::HashSet::new();
    for sport in 20_000..30_000u16 {
        ports.insert(open(&dp, EXTERNAL_CLIENT, sport).expect("a free port"));
    }
    assert_eq!(ports.len(), 10_000);
    // None is left: the next connection is dropped, and counted.
    assert_eq!(open(&dp, [192, 0, 2, 51], 40_000), Err(TC_ACT_SHOT));
    assert_eq!(dp.stats()[REASON_NO_SNAT_PORT as usize], 1);
    println!("10,000 masqueraded flows in {:?}", t0.elapsed());

    // Once those flows expired (lifetime and the reclaim grace), every port serves again, without a collector:
    // 10,000 connections of another client all get translated, taking the expired flows' ports over.
    std::thread::sleep(std::time::Duration::from_nanos(
        timeouts.tcp_syn_sent_ns + orca_common::CT_RECLAIM_GRACE_NS + 300_000_000,
    ));
    let other = [192, 0, 2, 77];
    for sport in 20_000..30_000u16 {
        assert!(
            open(&dp, other, sport).is_ok(),
            "connection from port {sport} was dropped"
        );
    }
    assert_eq!(dp.stats()[REASON_NO_SNAT_PORT as usize], 1, "no new drop");
    // The ports now belong to the new client's flows.
    let replies: Vec<CtValue> = dp
        .ct_entries()
        .into_iter()
        .filter(|(k, _)| k.dir == CT_DIR_REPLY)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(replies.len(), 10_000);
    assert!(replies.iter().all(|v| v.client_addr == addr_from_octets(other)));

    // The collector deletes what expired: after another lifetime, one pass leaves nothing.
    std::thread::sleep(std::time::Duration::from_nanos(
        timeouts.tcp_syn_sent_ns + orca_common::CT_RECLAIM_GRACE_NS + 300_000_000,
    ));
    let mut counts = conntrack::CtCounts::default();
    let cap = u64::from(orca_common::CT_MAX);
    conntrack::pass(ct_map(&dp), cap, &timeouts, &mut counts).unwrap();
    assert_eq!(counts.entries, 0, "{counts:?}");
    assert!(counts.expired_deleted >= 30_000, "{counts:?}");
    assert!(dp.ct_entries().is_empty());
}

#[test]
fn a_closed_connection_keeps_its_port_except_for_its_own_client_reopening() {
    // As the kernel's conntrack: a SYN of the same tuple replaces a closed (TIME_WAIT) entry at once, but its
    // masquerade tuple is never given to another client's flow before it expires (the backend may still hold the
    // old connection in TIME_WAIT; a late segment of it would reach the new one). With one masquerade port:
    let mut dp = Datapath::load_with(Options {
        nat_ports: NatPorts::new(20_000, 20_000, None),
        ..Options::default()
    });
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 50_000), Ok(20_000));
    // While it is open, the port is taken.
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 50_001), Err(TC_ACT_SHOT));
    // Established, then closed by both sides.
    dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(BACKEND_B, NODE_IP, &tcp_flags(8080, 20_000, SYN | ACK)),
    );
    dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &tcp_flags(50_000, 30080, ACK | FIN)),
    );
    dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(BACKEND_B, NODE_IP, &tcp_flags(8080, 20_000, ACK | FIN)),
    );
    // Another client port: no port is free until the closed flow's entry expires.
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 50_001), Err(TC_ACT_SHOT));
    assert_eq!(dp.stats()[orca_common::REASON_NO_SNAT_PORT as usize], 2);
    // The same client port opening again takes it over at once.
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 50_000), Ok(20_000));
    // A UDP flow's port is not taken over before it expires.
    let mut dp = Datapath::load_with(Options {
        nat_ports: NatPorts::new(20_000, 20_000, None),
        ..Options::default()
    });
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30053, IPPROTO_UDP);
    dp.set_service(np, 10, 0, &[be(BACKEND_B, 5353)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    let (rc, _) = dp.cross(
        PROG_FROM_NETDEV,
        &udp_frame(EXTERNAL_CLIENT, NODE_IP, 50_000, 30053, b"a"),
    );
    assert_eq!(rc, TC_ACT_OK);
    let (rc, _) = dp.cross(
        PROG_FROM_NETDEV,
        &udp_frame(EXTERNAL_CLIENT, NODE_IP, 50_001, 30053, b"b"),
    );
    assert_eq!(rc, TC_ACT_SHOT);
}

#[test]
fn a_full_map_drops_new_flows_but_never_evicts_established_ones() {
    // A small map: 64 entries. An established TCP flow (2 entries) then UDP flows until the map is full.
    let mut dp = Datapath::load_with(Options {
        ct_entries: Some(64),
        ..Options::default()
    });
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 2, 0, &[be(BACKEND_B, 5353)], 0);
    dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(45_000, 80)));
    dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 45_000, SYN | ACK)),
    );
    let mut dropped = 0;
    for sport in 0..100u16 {
        let (rc, _) = dp.cross(PROG_FROM_POD, &udp_frame(CLIENT, VIP, 30_000 + sport, 53, b"q"));
        if rc == TC_ACT_SHOT {
            dropped += 1;
        }
    }
    // 31 UDP flows fit (2 entries each) beside the TCP flow; the rest were dropped and counted.
    assert_eq!(dropped, 100 - 31);
    assert_eq!(dp.stats()[REASON_CT_FULL as usize], 69);
    // The established connection still goes to its backend, and its replies still come back from the VIP.
    for _ in 0..5 {
        let (rc, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::data(45_000, 80, b"x")));
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
        let (_, out) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &Tcp::data(8080, 45_000, b"y")),
        );
        assert_eq!(check(&out).src, Ipv4Addr::from(VIP));
    }
    // Under that pressure the collector deletes unanswered flows idle for a second (the kernel's early drop),
    // never the established one; new flows get in again.
    age_all(&mut dp, 2_000_000_000);
    let mut counts = conntrack::CtCounts::default();
    conntrack::pass(ct_map(&dp), 64, &CtTimeouts::DEFAULT, &mut counts).unwrap();
    assert_eq!(counts.pressure_deleted, 62, "{counts:?}");
    assert_eq!(counts.entries, 2);
    let (rc, _) = dp.cross(PROG_FROM_POD, &udp_frame(CLIENT, VIP, 31_000, 53, b"q"));
    assert_eq!(rc, TC_ACT_OK);
    let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::data(45_000, 80, b"x")));
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
}

#[test]
fn a_missing_entry_is_recreated_by_the_rest_of_its_flow() {
    // The collector may delete an entry just as its flow comes back to life: the flow's other entries put it
    // back at their next refresh.
    both_modes(|mut dp| {
        dp.set_snat_ip(NODE_IP);
        let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
        dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
        dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
        let port = open(&dp, EXTERNAL_CLIENT, 50_000).unwrap();
        let all = dp.ct_entries();
        let (reply_key, _) = *all.iter().find(|(k, _)| k.dir == CT_DIR_REPLY).unwrap();
        dp.map::<CtKey, CtValue>(MAP_CT).remove(&reply_key).unwrap();
        // Force the refresh (it happens once per tick otherwise).
        let svc = ct_key(EXTERNAL_CLIENT, NODE_IP, 50_000, 30080, IPPROTO_TCP, CT_DIR_SERVICE);
        let mut v = dp.ct(&svc).unwrap();
        v.peer_refreshed = v.peer_refreshed.wrapping_sub(1);
        dp.map::<CtKey, CtValue>(MAP_CT).insert(svc, v, 0).unwrap();
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::data(50_000, 30080, b"x")),
        );
        assert!(dp.ct(&reply_key).is_some(), "the reply entry was not re-created");
        let (_, out) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_B, NODE_IP, &tcp_flags(8080, port, SYN | ACK)),
        );
        let seen = check(&out);
        assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50_000));
    });
}

#[test]
fn an_entry_taken_over_by_another_flow_is_left_alone() {
    // A flow refreshing its peers must not touch an entry that now belongs to another flow.
    let mut dp = node_port_with_10k_ports(Options::default());
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 20_000), Ok(20_000));
    let reply_key = dp
        .ct_entries()
        .into_iter()
        .find(|(k, _)| k.dir == CT_DIR_REPLY)
        .unwrap()
        .0;
    let mut foreign = dp.ct(&reply_key).unwrap();
    foreign.client_addr = addr_from_octets([192, 0, 2, 99]);
    foreign.last_seen_ns = 7;
    dp.map::<CtKey, CtValue>(MAP_CT).insert(reply_key, foreign, 0).unwrap();
    let svc = ct_key(EXTERNAL_CLIENT, NODE_IP, 20_000, 30080, IPPROTO_TCP, CT_DIR_SERVICE);
    let mut v = dp.ct(&svc).unwrap();
    v.peer_refreshed = v.peer_refreshed.wrapping_sub(1);
    dp.map::<CtKey, CtValue>(MAP_CT).insert(svc, v, 0).unwrap();
    dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::data(20_000, 30080, b"x")),
    );
    assert_eq!(dp.ct(&reply_key).unwrap(), foreign);
}

#[test]
fn the_collector_keeps_live_flows_and_counts_them() {
    let mut dp = node_port_with_10k_ports(Options::default());
    for sport in 20_000..20_010u16 {
        open(&dp, EXTERNAL_CLIENT, sport).unwrap();
    }
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(45_000, 80)));
    let mut counts = conntrack::CtCounts::default();
    conntrack::pass(ct_map(&dp), 4096, &CtTimeouts::DEFAULT, &mut counts).unwrap();
    assert_eq!(
        (
            counts.entries,
            counts.service,
            counts.inner,
            counts.reply,
            counts.snat_ports
        ),
        (32, 11, 11, 10, 10)
    );
    assert_eq!((counts.expired_deleted, counts.pressure_deleted), (0, 0));
    // A RST flow idle for 13 s (10 s and the grace) is gone after the next pass; the rest stays.
    dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &tcp_flags(45_000, 80, RST)));
    let entries = dp.ct_entries();
    {
        let mut m = dp.map::<CtKey, CtValue>(MAP_CT);
        for (k, mut v) in entries {
            if v.flags & CT_F_RST != 0 {
                v.last_seen_ns = monotonic_ns() - 13_000_000_000;
                m.insert(k, v, 0).unwrap();
            }
        }
    }
    conntrack::pass(ct_map(&dp), 4096, &CtTimeouts::DEFAULT, &mut counts).unwrap();
    assert_eq!((counts.entries, counts.expired_deleted), (30, 2));
}

#[test]
fn the_collector_spares_an_entry_a_new_flow_took_over_while_it_read_the_map() {
    // The collector reads the whole map, then deletes what had expired; a large map takes a while to read, and
    // meanwhile the programs may give an expired entry to a new flow (here: an expired flow's masquerade port, the
    // new client's own port, tried first). Deleting that key blindly would delete the new flow's reply entry: its
    // backend's answer would find no entry (the node answers it with a reset, and the client waits in vain).
    let mut dp = node_port_with_10k_ports(Options::default());
    assert_eq!(open(&dp, EXTERNAL_CLIENT, 20_000), Ok(20_000));
    age_all(&mut dp, 3_600_000_000_000);
    let t = CtTimeouts::DEFAULT;
    let found = conntrack::survey::<u32>(ct_map(&dp), 4096, &t).unwrap();
    assert_eq!(found.doomed().len(), 3, "the old flow's three entries are doomed");
    // Between the survey and the deletions, another client's connection takes the port over.
    let other = [192, 0, 2, 51];
    assert_eq!(open(&dp, other, 20_000), Ok(20_000));
    let mut counts = conntrack::CtCounts::default();
    conntrack::reap(ct_map(&dp), found, &t, &mut counts).unwrap();
    // The old flow's service and inner entries are gone; the port's reply entry is the new flow's, and works.
    assert_eq!((counts.expired_deleted, counts.snat_ports), (2, 1), "{counts:?}");
    let left = dp.ct_entries();
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.iter().all(|(_, v)| v.client_addr == addr_from_octets(other)));
    let reply = ct_key(BACKEND_B, NODE_IP, 8080, 20_000, IPPROTO_TCP, CT_DIR_REPLY);
    assert_eq!(dp.ct(&reply).map(|v| v.client_addr), Some(addr_from_octets(other)));
    assert!(dp
        .ct(&ct_key(
            EXTERNAL_CLIENT,
            NODE_IP,
            20_000,
            30080,
            IPPROTO_TCP,
            CT_DIR_SERVICE
        ))
        .is_none());
    let (_, out) = dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(BACKEND_B, NODE_IP, &tcp_flags(8080, 20_000, SYN | ACK)),
    );
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(other), 20_000));
}

#[test]
fn a_reopened_tuple_leaves_nothing_of_the_old_flow_behind() {
    // As the kernel's conntrack drops the whole entry when a SYN reopens a closed connection's tuple: when the new
    // connection goes to another backend, a late packet of the old backend (a retransmitted FIN) must not come out
    // as the VIP's into the new connection (the client would answer it with a reset).
    both_modes(|mut dp| {
        dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 62, 0, &[be(BACKEND_A, 8080)], 0);
        dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(60100, 80)));
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60100, SYN | ACK)),
        );
        dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &tcp_flags(60100, 80, ACK | FIN)));
        dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60100, ACK | FIN)),
        );
        // The backend set changes; the client reuses its port: the new connection goes to B.
        dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 62, 2, &[be(BACKEND_B, 8080)], 0);
        dp.remove_backends(62, 0, &[be(BACKEND_A, 8080)]);
        let (_, out) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(60100, 80)));
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_B));
        // A's retransmitted FIN: untranslated (the client's stack finds no socket for A and ignores it).
        let late = tcp_frame(BACKEND_A, CLIENT, &tcp_flags(8080, 60100, ACK | FIN));
        let (_, out) = dp.cross(PROG_FROM_NETDEV, &late);
        assert_eq!(
            check(&out).src,
            Ipv4Addr::from(BACKEND_A),
            "the old backend's packet came out as the VIP's"
        );
        // Only the new flow's entries are left.
        for (_, v) in dp.ct_entries() {
            assert_eq!(v.backend_addr, addr_from_octets(BACKEND_B));
        }
    });
}
