//! The per-packet cost does not depend on the number of Services (hash lookups, not chains).

use crate::harness::*;

#[test]
fn per_packet_cost_does_not_grow_with_the_number_of_services() {
    use orca_proxy::dataplane::ebpf::testrun::{median_empty_runs, median_single_runs, EmptyProgram};
    const SAMPLES: usize = 2_000;
    let mut dp = Datapath::load_with_frontends(20_000);
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);
    let data = tcp_frame(CLIENT, VIP, &Tcp::data(59000, 80, b"x"));
    let pass = tcp_frame(CLIENT, BACKEND_B, &Tcp::data(59001, 8080, b"x"));
    let empty = EmptyProgram::load().expect("loading the empty program");
    // Established flow: one run per syscall (repeats would see the translated packet), minus the
    // test-run floor measured the same way. Pass-through (no frontend): repeats are fine.
    let measure = |dp: &Datapath| -> (f64, f64) {
        let prog: &SchedClassifier = dp.ebpf.program(PROG_FROM_POD).unwrap().try_into().unwrap();
        let (est, verdict) = median_single_runs(prog, &data, SAMPLES, || {}).unwrap();
        assert_eq!(verdict, TC_ACT_OK);
        let floor = median_empty_runs(&empty, &data, SAMPLES).unwrap();
        let mut out = vec![0u8; pass.len() + 64];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pass),
                data_out: Some(&mut out),
                repeat: 100_000,
                ..TestRunOptions::default()
            })
            .unwrap();
        assert_eq!(r.return_value, TC_ACT_OK);
        let pass_floor = f64::from(empty.run(&pass, 100_000).unwrap());
        (
            (est - floor).max(0.0),
            (r.duration.as_nanos() as f64 - pass_floor).max(0.0),
        )
    };
    // Establish the flow, then measure with one Service.
    dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(59000, 80)));
    let (one, one_pass) = measure(&dp);
    for i in 0..10_000u32 {
        let ip = [10, 97, (i >> 8) as u8, i as u8];
        dp.set_service(
            FrontendKey::new(ip, 80, IPPROTO_TCP),
            100 + i,
            0,
            &[be(BACKEND_B, 8080)],
            0,
        );
    }
    let (many, many_pass) = measure(&dp);
    println!(
        "per packet, test-run floor subtracted: established-flow DNAT {one:.0} ns with 1 Service, {many:.0} ns with \
         10001; pass-through {one_pass:.0} ns / {many_pass:.0} ns"
    );
    // Not a speed goal (those live in bench/): only that the Service table's size does not show.
    assert!(many < one * 2.0 + 200.0, "{one} ns -> {many} ns");
    assert!(one < 5_000.0, "{one} ns per packet");
}
