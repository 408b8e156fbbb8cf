//! Every drop, and every packet left untranslated although it may be Service traffic, has a reason that the
//! programs count (`ORCA_STATS`, exported as `orca_datapath_drops_total{reason}` and
//! `orca_datapath_untranslated_total{reason}`): each reason is provoked here once and read back.

use orca_common::*;

use crate::harness::*;

/// Runs `provoke` and checks that exactly the counter of `reason` moved, by one.
fn counts_once(dp: &mut Datapath, reason: u32, provoke: impl FnOnce(&mut Datapath)) {
    let before = dp.stats();
    provoke(dp);
    let after = dp.stats();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let want = if i == reason as usize { b + 1 } else { *b };
        assert_eq!(
            *a, want,
            "counter {} after provoking {}",
            REASONS[i].0, REASONS[reason as usize].0
        );
    }
}

#[test]
fn every_reason_is_counted() {
    let mut dp = Datapath::load_with(Options {
        ct_entries: Some(8),
        nat_ports: NatPorts::new(20_000, 20_000, None),
        ..Options::default()
    });
    dp.set_snat_ip(NODE_IP);

    // loadBalancerSourceRanges: a source outside the ranges.
    let lb = FrontendKey::new([198, 51, 100, 40], 80, IPPROTO_TCP);
    dp.set_service(lb, 30, 0, &[be(BACKEND_A, 8080)], 0);
    dp.set_flags(lb, FRONTEND_F_SOURCE_RANGES);
    counts_once(&mut dp, REASON_SOURCE_RANGE, |dp| {
        let (rc, _) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, [198, 51, 100, 40], &Tcp::syn(1, 80)),
        );
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // A Local policy without local endpoints.
    let local = FrontendKey::new(NODE_IP, 30091, IPPROTO_UDP).with_scope(SCOPE_EXTERNAL);
    dp.set_service(local, 22, 0, &[], 0);
    dp.set_flags(local, FRONTEND_F_DROP_WHEN_EMPTY);
    counts_once(&mut dp, REASON_NO_LOCAL_ENDPOINTS, |dp| {
        let (rc, _) = dp.cross(PROG_FROM_NETDEV, &udp_frame(EXTERNAL_CLIENT, NODE_IP, 2, 30091, b"q"));
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // No endpoints at all: rejected; a reset is never answered: dropped.
    dp.set_service(FrontendKey::new(VIP, 81, IPPROTO_TCP), 5, 0, &[], 0);
    counts_once(&mut dp, REASON_NO_ENDPOINTS_REJECTED, |dp| {
        let (rc, _) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(3, 81)));
        assert_eq!(rc, TC_ACT_REDIRECT);
    });
    counts_once(&mut dp, REASON_NO_ENDPOINTS_DROPPED, |dp| {
        let (rc, _) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &tcp_flags(4, 81, RST)));
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // The one masquerade port is taken: the next masqueraded flow finds none.
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    let (rc, _) = dp.cross(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(5, 30080)),
    );
    assert_eq!(rc, TC_ACT_OK);
    counts_once(&mut dp, REASON_NO_SNAT_PORT, |dp| {
        let (rc, _) = dp.cross(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(6, 30080)),
        );
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // The conntrack map (8 entries) is full: 3 taken by the masqueraded flow, 2 by each further flow.
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    for sport in [7, 8] {
        let (rc, _) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(sport, 80)));
        assert_eq!(rc, TC_ACT_OK);
    }
    counts_once(&mut dp, REASON_CT_FULL, |dp| {
        let (rc, _) = dp.cross(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(9, 80)));
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // A truncated UDP datagram (ports, but no checksum field) to a tracked flow cannot be rewritten.
    let mut dp2 = Datapath::load();
    dp2.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 7, 0, &[be(BACKEND_B, 5353)], 0);
    counts_once(&mut dp2, REASON_REWRITE_FAILED, |dp| {
        let mut l4 = 10u16.to_be_bytes().to_vec();
        l4.extend_from_slice(&53u16.to_be_bytes());
        let (rc, _) = dp.cross(PROG_FROM_POD, &frame(CLIENT, VIP, IPPROTO_UDP, &[], 0, &l4));
        assert_eq!(rc, TC_ACT_SHOT);
    });

    // Untranslated: a fragment to the VIP, a frame that is not IP (both pass untouched).
    counts_once(&mut dp2, REASON_FRAGMENT, |dp| {
        let f = frame(
            CLIENT,
            VIP,
            IPPROTO_UDP,
            &[],
            0x2000,
            &udp_bytes(CLIENT, VIP, 11, 53, b"x", true),
        );
        assert_eq!(dp.cross(PROG_FROM_POD, &f), (TC_ACT_OK, f.clone()));
    });
    counts_once(&mut dp2, REASON_NOT_IP, |dp| {
        let mut f = tcp_frame(CLIENT, VIP, &Tcp::syn(12, 80));
        f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(dp.run(PROG_FROM_POD, &f), (TC_ACT_OK, f.clone()));
    });

    // With netfilter bypassed, a translated packet the FIB does not forward (forwarding is off in this fresh
    // namespace) goes to the stack.
    let mut dp3 = Datapath::load_bypass();
    dp3.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    counts_once(&mut dp3, REASON_FIB_DECLINED, |dp| {
        let (rc, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(13, 80)));
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    });

    // Every reason was provoked above.
    let provoked = [&dp.stats(), &dp2.stats(), &dp3.stats()];
    for (i, (name, _)) in REASONS.iter().enumerate() {
        assert!(provoked.iter().any(|s| s[i] > 0), "reason {name} never provoked");
    }
}
