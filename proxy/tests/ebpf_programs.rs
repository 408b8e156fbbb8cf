//! Datapath tests of the eBPF programs embedded in the agent: each test loads the object with aya
//! (so the verifier of this kernel checks every program), fills the maps like the agent does, and
//! runs the TC programs on crafted packets with BPF_PROG_TEST_RUN. Checksums of the output are
//! recomputed here, independently of the programs' own arithmetic.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Nothing is attached and nothing is pinned: the maps and
//! programs disappear with the test process.
//!
//! Every test thread first moves into a network namespace of its own (`unshare(CLONE_NEWNET)`, which
//! is per thread): the programs forward translated packets after a FIB lookup, so the routes of the
//! namespace a program runs in decide its verdict. In a fresh namespace forwarding is off, the FIB
//! declines and translated packets go to the stack (TC_ACT_OK); the forwarding test builds the
//! routes it needs there. The namespaces die with their threads.

use std::net::Ipv4Addr;

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use orca_common::{
    addr_from_octets, Backend, BackendSlotKey, CtKey, CtValue, Frontend, FrontendKey, MemberKey, CONFIG_SNAT_IPV4,
    CT_DIR_REPLY, CT_DIR_SERVICE, FRONTEND_F_SNAT_EXTERNAL, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAP_BACKENDS,
    MAP_CONFIG, MAP_CT, MAP_FRONTENDS, MAP_MEMBERS, NAT_PORT_MAX, NAT_PORT_MIN, PROG_FROM_NETDEV, PROG_FROM_POD,
};
use orca_proxy::ebpf_obj;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [10, 244, 0, 7];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKEND_A: [u8; 4] = [10, 244, 1, 5];
const BACKEND_B: [u8; 4] = [10, 244, 2, 6];
const BACKEND_C: [u8; 4] = [10, 244, 3, 7];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

// ---------------------------------------------------------------------------------------------
// Loading and map programming.

struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    fn load() -> Self {
        Self::load_with_frontends(1024)
    }

    fn load_with_frontends(frontends: u32) -> Self {
        assert!(
            nix_is_root(),
            "the eBPF datapath tests load programs into the kernel: run them as root"
        );
        assert!(
            ebpf_obj::available(),
            "orca-proxy was built with AYA_BUILD_SKIP: no eBPF object to test"
        );
        private_netns();
        let mut ebpf = EbpfLoader::new()
            // Small maps: many tests load their own copy in parallel.
            .map_max_entries(MAP_CT, 4096)
            .map_max_entries("ORCA_AFFINITY", 1024)
            .map_max_entries(MAP_FRONTENDS, frontends)
            .map_max_entries(MAP_BACKENDS, 4096.max(frontends))
            .map_max_entries(MAP_MEMBERS, 4096.max(frontends))
            .load(ebpf_obj::OBJECT)
            .expect("parse and create maps of the embedded eBPF object");
        for name in [PROG_FROM_POD, PROG_FROM_NETDEV] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("a TC classifier");
            if let Err(e) = prog.load() {
                panic!("the verifier rejected {name}: {}", verifier_log(&e));
            }
        }
        for name in orca_proxy::dataplane::ebpf::loader::SOCK_PROGRAMS {
            let prog: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("a cgroup sock_addr program");
            if let Err(e) = prog.load() {
                panic!("the verifier rejected {name}: {}", verifier_log(&e));
            }
        }
        Self { ebpf }
    }

    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect(name)).expect(name)
    }

    /// Publishes a frontend with `backends` in slots `slot_base..`, in the agent's order: slots
    /// and members, then the frontend.
    fn set_service(
        &mut self,
        fe: FrontendKey,
        service_id: u32,
        slot_base: u32,
        backends: &[Backend],
        affinity_timeout: u32,
    ) {
        for (i, b) in backends.iter().enumerate() {
            let slot = BackendSlotKey {
                service_id,
                slot: slot_base + i as u32,
            };
            self.map::<BackendSlotKey, Backend>(MAP_BACKENDS)
                .insert(slot, *b, 0)
                .unwrap();
            self.map::<MemberKey, u32>(MAP_MEMBERS)
                .insert(MemberKey::of(service_id, b), i as u32, 0)
                .unwrap();
        }
        let value = Frontend {
            service_id,
            backend_count: backends.len() as u16,
            flags: 0,
            affinity_timeout,
            slot_base,
        };
        self.map::<FrontendKey, Frontend>(MAP_FRONTENDS)
            .insert(fe, value, 0)
            .unwrap();
    }

    /// Removes backends from a service: slots and membership (the frontend is updated by the
    /// caller first, as the agent does).
    fn remove_backends(&mut self, service_id: u32, slot_base: u32, backends: &[Backend]) {
        for (i, b) in backends.iter().enumerate() {
            let slot = BackendSlotKey {
                service_id,
                slot: slot_base + i as u32,
            };
            let _ = self.map::<BackendSlotKey, Backend>(MAP_BACKENDS).remove(&slot);
            self.map::<MemberKey, u32>(MAP_MEMBERS)
                .remove(&MemberKey::of(service_id, b))
                .unwrap();
        }
    }

    fn set_flags(&mut self, fe: FrontendKey, flags: u16) {
        let mut m = self.map::<FrontendKey, Frontend>(MAP_FRONTENDS);
        let mut v = m.get(&fe, 0).unwrap();
        v.flags = flags;
        m.insert(fe, v, 0).unwrap();
    }

    fn set_snat_ip(&mut self, ip: [u8; 4]) {
        let mut cfg: Array<&mut MapData, u32> = Array::try_from(self.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
        cfg.set(CONFIG_SNAT_IPV4, addr_from_octets(ip), 0).unwrap();
    }

    fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(prog, frame, 0)
    }

    /// Runs `prog` on `frame` as if it arrived on interface `ifindex` (0: the namespace's loopback).
    fn run_on(&self, prog: &str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff up to `ifindex` (offset 40); everything else zero.
        let mut skb_ctx = [0u8; 44];
        skb_ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: (ifindex != 0).then_some(&skb_ctx[..]),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn ct(&mut self, key: &CtKey) -> Option<CtValue> {
        self.map::<CtKey, CtValue>(MAP_CT).get(key, 0).ok()
    }
}

fn verifier_log(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            format!("{io_error}\n{verifier_log}")
        }
        other => format!("{other}"),
    }
}

/// Moves this thread into a new network namespace, once.
fn private_netns() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    // SAFETY: unshare affects only the calling thread's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
}

/// Runs `ip` in this thread's network namespace (the child inherits it).
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// Packet crafting and checking (independent of the programs' code).

fn csum_add(mut acc: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).copied().map_or(0, u32::from);
        acc += hi | lo;
    }
    acc
}

fn csum_fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    csum_add(csum_add(0, &src), &dst) + u32::from(proto) + len as u32
}

#[derive(Clone)]
struct Tcp {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: Vec<u8>,
    payload: Vec<u8>,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

impl Tcp {
    fn syn(sport: u16, dport: u16) -> Self {
        Self {
            sport,
            dport,
            seq: 1000,
            ack: 0,
            flags: SYN,
            // MSS 1460, SACK permitted, window scale 7, NOP: 12 bytes (doff 8).
            options: vec![2, 4, 0x05, 0xb4, 4, 2, 3, 3, 7, 1, 1, 1],
            payload: vec![],
        }
    }

    fn data(sport: u16, dport: u16, payload: &[u8]) -> Self {
        Self {
            sport,
            dport,
            seq: 1001,
            ack: 5001,
            flags: ACK | 0x08,
            options: vec![],
            payload: payload.to_vec(),
        }
    }

    fn bytes(&self, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0);
        let doff = (20 + self.options.len()) / 4;
        let mut s = Vec::new();
        s.extend_from_slice(&self.sport.to_be_bytes());
        s.extend_from_slice(&self.dport.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.push((doff as u8) << 4);
        s.push(self.flags);
        s.extend_from_slice(&64240u16.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]);
        s.extend_from_slice(&self.options);
        s.extend_from_slice(&self.payload);
        let c = csum_fold(csum_add(pseudo(src, dst, IPPROTO_TCP, s.len()), &s));
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }
}

fn udp_bytes(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8], csum: bool) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    if csum {
        let mut c = csum_fold(csum_add(pseudo(src, dst, IPPROTO_UDP, s.len()), &s));
        if c == 0 {
            c = 0xffff;
        }
        s[6..8].copy_from_slice(&c.to_be_bytes());
    }
    s
}

/// Ethernet + IPv4 (with `ip_options`, a multiple of 4 bytes) + `l4`.
fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, ip_options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ihl = (20 + ip_options.len()) / 4;
    let tot = 20 + ip_options.len() + l4.len();
    let mut ip = vec![(4 << 4) | ihl as u8, 0];
    ip.extend_from_slice(&(tot as u16).to_be_bytes());
    ip.extend_from_slice(&0x1234u16.to_be_bytes());
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.push(64);
    ip.push(proto);
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(ip_options);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

fn tcp_frame(src: [u8; 4], dst: [u8; 4], tcp: &Tcp) -> Vec<u8> {
    frame(src, dst, IPPROTO_TCP, &[], 0, &tcp.bytes(src, dst))
}

#[derive(Debug)]
struct Seen {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    l4_csum: u16,
}

/// Parses an output frame and asserts that its IPv4 header checksum and TCP/UDP checksum verify.
fn check(f: &[u8]) -> Seen {
    assert!(f.len() >= 34, "frame too short: {f:?}");
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let ip = &f[14..14 + ihl];
    assert_eq!(csum_fold(csum_add(0, ip)), 0, "IPv4 header checksum invalid");
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &f[14 + ihl..14 + tot];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let proto = ip[9];
    let l4_csum = match proto {
        IPPROTO_TCP => u16::from_be_bytes([l4[16], l4[17]]),
        IPPROTO_UDP => u16::from_be_bytes([l4[6], l4[7]]),
        _ => 0,
    };
    if proto == IPPROTO_TCP || (proto == IPPROTO_UDP && l4_csum != 0) {
        assert_eq!(
            csum_fold(csum_add(pseudo(src, dst, proto, l4.len()), l4)),
            0,
            "L4 checksum invalid"
        );
    }
    Seen {
        src: src.into(),
        dst: dst.into(),
        proto,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        l4_csum,
    }
}

fn be(octets: [u8; 4], port: u16) -> Backend {
    Backend::new(octets, port)
}

fn ct_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr: addr_from_octets(src),
        daddr: addr_from_octets(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn verifier_accepts_every_program() {
    let dp = Datapath::load();
    let names: Vec<&str> = dp.ebpf.programs().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(
        names.contains(&PROG_FROM_POD) && names.contains(&PROG_FROM_NETDEV),
        "{names:?}"
    );
    // Datapath::load loaded each program, so the verifier accepted all of them.
    for (name, prog) in dp.ebpf.programs() {
        assert!(prog.fd().is_ok(), "{name} not loaded");
    }
}

#[test]
fn dnat_of_tcp_syn_to_cluster_ip_and_reverse_nat_of_reply() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 1, 0, &[be(BACKEND_A, 8080)], 0);

    let syn = tcp_frame(CLIENT, VIP, &Tcp::syn(40000, 80));
    let (rc, out) = dp.run(PROG_FROM_POD, &syn);
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

    // Both conntrack directions exist.
    let fwd = dp
        .ct(&ct_key(CLIENT, VIP, 40000, 80, IPPROTO_TCP, CT_DIR_SERVICE))
        .expect("service-direction entry");
    assert_eq!((fwd.addr, fwd.port), (addr_from_octets(BACKEND_A), 8080u16.to_be()));
    let rev = dp
        .ct(&ct_key(BACKEND_A, CLIENT, 8080, 40000, IPPROTO_TCP, CT_DIR_REPLY))
        .expect("reply-direction entry");
    assert_eq!((rev.addr, rev.port), (addr_from_octets(VIP), 80u16.to_be()));

    // The backend's SYN-ACK, arriving from the uplink (remote backend), leaves as the VIP's.
    let mut synack = Tcp::syn(8080, 40000);
    synack.flags = SYN | ACK;
    synack.ack = 1001;
    let reply = tcp_frame(BACKEND_A, CLIENT, &synack);
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &reply);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!(seen.src, Ipv4Addr::from(VIP));
    assert_eq!(seen.dst, Ipv4Addr::from(CLIENT));
    assert_eq!((seen.sport, seen.dport), (80, 40000));

    // Payload-carrying packets of the flow are translated too, payload intact.
    let data = tcp_frame(CLIENT, VIP, &Tcp::data(40000, 80, b"GET / HTTP/1.1\r\n\r\n"));
    let (rc, out) = dp.run(PROG_FROM_POD, &data);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_A), 8080));
    assert!(out.ends_with(b"GET / HTTP/1.1\r\n\r\n"));
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
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
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
    let (rc, out) = dp.run(PROG_FROM_POD, &f);
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
        for prog in [PROG_FROM_POD, PROG_FROM_NETDEV] {
            let (rc, out) = dp.run(prog, &f);
            assert_eq!(rc, TC_ACT_OK, "{what} ({prog})");
            assert_eq!(out, f, "{what} ({prog}) was modified");
        }
    }
    // None of them created conntrack state.
    let ct: HashMap<_, CtKey, CtValue> = dp.map(MAP_CT);
    assert_eq!(ct.keys().count(), 0);
}

const NODE_IP: [u8; 4] = [192, 168, 50, 10];
const EXTERNAL_CLIENT: [u8; 4] = [192, 0, 2, 50];

#[test]
fn external_traffic_is_masqueraded_and_replies_are_restored() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30080, IPPROTO_TCP);
    dp.set_service(np, 9, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);

    let syn = tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50000, 30080));
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &syn);
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(BACKEND_B), 8080));
    assert_eq!(
        seen.src,
        Ipv4Addr::from(NODE_IP),
        "external source masqueraded to the node"
    );
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&seen.sport), "{}", seen.sport);
    let nat_port = seen.sport;

    // Later packets of the flow use the same source port.
    let (_, out) = dp.run(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::data(50000, 30080, b"x")),
    );
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(NODE_IP), nat_port));

    // The backend (on another node) answers the node; the reply leaves as the NodePort's, to the client.
    let mut synack = Tcp::syn(8080, nat_port);
    synack.flags = SYN | ACK;
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &tcp_frame(BACKEND_B, NODE_IP, &synack));
    assert_eq!(rc, TC_ACT_OK);
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(NODE_IP), 30080));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50000));

    // Distinct clients get distinct source ports.
    let mut ports = std::collections::HashSet::new();
    for i in 0..50u16 {
        let (_, out) = dp.run(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(51000 + i, 30080)),
        );
        ports.insert(check(&out).sport);
    }
    assert_eq!(ports.len(), 50);

    // Local pods reaching the same NodePort are masqueraded too, as kube-proxy's KUBE-EXT chain
    // does with externalTrafficPolicy Cluster (the Local policy's pod entry is tested below).
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, NODE_IP, &Tcp::syn(52000, 30080)));
    let seen = check(&out);
    assert_eq!(seen.src, Ipv4Addr::from(NODE_IP));
    assert!((NAT_PORT_MIN..=NAT_PORT_MAX).contains(&seen.sport), "{}", seen.sport);
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30081, IPPROTO_TCP);
    dp.set_service(np, 10, 0, &[be(BACKEND_A, 8080)], 0);
    let (_, out) = dp.run(
        PROG_FROM_NETDEV,
        &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50001, 30081)),
    );
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(EXTERNAL_CLIENT), 50001));
    assert_eq!(seen.dst, Ipv4Addr::from(BACKEND_A));
}

#[test]
fn hairpin_is_masqueraded_so_the_pod_can_reach_itself() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 11, 0, &[be(CLIENT, 8080)], 0);
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(53000, 80)));
    let seen = check(&out);
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(CLIENT), 8080));
    assert_eq!(seen.src, Ipv4Addr::from(NODE_IP));
    let nat_port = seen.sport;
    let mut synack = Tcp::syn(8080, nat_port);
    synack.flags = SYN | ACK;
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, NODE_IP, &synack));
    let seen = check(&out);
    assert_eq!((seen.src, seen.sport), (Ipv4Addr::from(VIP), 80));
    assert_eq!((seen.dst, seen.dport), (Ipv4Addr::from(CLIENT), 53000));
}

#[test]
fn translated_packets_go_straight_to_the_routed_device_with_the_ttl_decremented() {
    let mut dp = Datapath::load();
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

    // Forwarding off (a fresh namespace): the FIB declines, the stack gets the translated packet.
    let (rc, out) = dp.run_on(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(41000, 80)), pod_if);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
    assert_eq!(out[22], 64, "TTL changed although the stack forwards the packet");

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
        let (_, out) = dp.run(
            PROG_FROM_NETDEV,
            &tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(54000 + sport, 30090)),
        );
        assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));
        let (_, out) = dp.run(
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
        let (_, out) = dp.run(prog, &tcp_frame(client, VIP, &Tcp::syn(sport, 80)));
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

/// Per-packet cost of the established-flow path (conntrack hit + DNAT), measured with
/// BPF_PROG_TEST_RUN's repeat, with 1 and with 10,000 Services in the maps: the cost must not
/// grow with the number of Services (hash lookups), unlike iptables' linear chains.
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

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn conntrack_entries_expire_like_conntrack_and_fin_rst_shorten_them() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 80, IPPROTO_TCP), 60, 0, &[be(BACKEND_A, 8080)], 0);
    dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::syn(60000, 80)));
    let fwd_key = ct_key(CLIENT, VIP, 60000, 80, IPPROTO_TCP, CT_DIR_SERVICE);
    let rev_key = ct_key(BACKEND_A, CLIENT, 8080, 60000, IPPROTO_TCP, CT_DIR_REPLY);

    // A FIN marks the flow as closing (120 s lifetime), a RST as reset (10 s).
    let mut fin = Tcp::data(60000, 80, b"");
    fin.flags = ACK | 0x01;
    dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &fin));
    let v = dp.ct(&fwd_key).unwrap();
    assert_eq!(v.flags & orca_common::CT_F_FIN, orca_common::CT_F_FIN);
    assert_eq!(v.lifetime_ns(IPPROTO_TCP), orca_common::CT_TCP_FIN_NS);
    let mut rst = Tcp::data(8080, 60000, b"");
    rst.flags = 0x04;
    dp.run(PROG_FROM_NETDEV, &tcp_frame(BACKEND_A, CLIENT, &rst));
    assert_ne!(dp.ct(&rev_key).unwrap().flags & orca_common::CT_F_RST, 0);
    assert_ne!(
        dp.ct(&fwd_key).unwrap().flags & orca_common::CT_F_RST,
        0,
        "the reply marks the service entry too"
    );

    // An expired service entry (reset, idle since boot) is a new flow: the stale backend it
    // names is not used.
    let mut stale = dp.ct(&fwd_key).unwrap();
    assert_ne!(stale.flags & orca_common::CT_F_RST, 0);
    stale.addr = addr_from_octets([10, 244, 99, 99]);
    stale.last_seen_ns = 0;
    dp.map::<CtKey, CtValue>(MAP_CT).insert(fwd_key, stale, 0).unwrap();
    let (_, out) = dp.run(PROG_FROM_POD, &tcp_frame(CLIENT, VIP, &Tcp::data(60000, 80, b"x")));
    assert_eq!(check(&out).dst, Ipv4Addr::from(BACKEND_A));

    // An expired reply entry rewrites nothing.
    // (A reset flow idle since boot: older than its 10 s lifetime whatever the uptime.)
    let mut old_rev = dp.ct(&rev_key).unwrap();
    old_rev.flags |= orca_common::CT_F_RST;
    old_rev.last_seen_ns = 0;
    dp.map::<CtKey, CtValue>(MAP_CT).insert(rev_key, old_rev, 0).unwrap();
    let reply = tcp_frame(BACKEND_A, CLIENT, &Tcp::data(8080, 60000, b"y"));
    let (_, out) = dp.run(PROG_FROM_NETDEV, &reply);
    assert_eq!(out, reply);
}

#[test]
fn replies_keep_a_silent_clients_flow_alive() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 61, 0, &[be(BACKEND_B, 5353)], 0);
    let q = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 61000, 53, b"sub", true),
    );
    dp.run(PROG_FROM_POD, &q);
    let fwd_key = ct_key(CLIENT, VIP, 61000, 53, IPPROTO_UDP, CT_DIR_SERVICE);
    // The client has been silent for 100 s of its 120 s; the backend keeps streaming, and its
    // replies last passed the refresh on to the service entry a tick ago (they do so once per
    // tick, about a second).
    let mut v = dp.ct(&fwd_key).unwrap();
    v.last_seen_ns = monotonic_ns() - 100_000_000_000;
    dp.map::<CtKey, CtValue>(MAP_CT).insert(fwd_key, v, 0).unwrap();
    let rev_key = ct_key(BACKEND_B, CLIENT, 5353, 61000, IPPROTO_UDP, CT_DIR_REPLY);
    let mut r = dp.ct(&rev_key).unwrap();
    r.peer_refreshed = orca_common::ct_tick(monotonic_ns()).wrapping_sub(1);
    dp.map::<CtKey, CtValue>(MAP_CT).insert(rev_key, r, 0).unwrap();
    let push = frame(
        BACKEND_B,
        CLIENT,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(BACKEND_B, CLIENT, 5353, 61000, b"push", true),
    );
    let (_, out) = dp.run(PROG_FROM_NETDEV, &push);
    assert_eq!(check(&out).src, Ipv4Addr::from(VIP));
    let after = dp.ct(&fwd_key).unwrap().last_seen_ns;
    assert!(
        monotonic_ns() - after < 5_000_000_000,
        "the reply did not refresh the service entry"
    );
}

// ---------------------------------------------------------------------------------------------
// ICMP errors about translated flows.

/// An ICMP error (`icmp_type`/`code`) from `src` to `dst` quoting `quote` (an IPv4 packet's head).
fn icmp_error(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
    m.extend_from_slice(quote);
    let c = csum_fold(csum_add(0, &m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, IPPROTO_ICMP, &[], 0, &m)
}

/// Checks the outer IPv4 and ICMP checksums of an ICMP error; returns its outer addresses and
/// the quote.
fn check_icmp(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    let ip = &f[14..34];
    assert_eq!(ip[9], IPPROTO_ICMP);
    assert_eq!(csum_fold(csum_add(0, ip)), 0, "outer IPv4 checksum invalid");
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &f[34..14 + tot];
    assert_eq!(csum_fold(csum_add(0, icmp)), 0, "ICMP checksum invalid");
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    (src.into(), dst.into(), icmp[8..].to_vec())
}

#[test]
fn icmp_errors_about_a_cluster_ip_flow_are_translated_both_ways() {
    let mut dp = Datapath::load();
    dp.set_service(FrontendKey::new(VIP, 53, IPPROTO_UDP), 30, 0, &[be(BACKEND_A, 5353)], 0);
    let query = frame(
        CLIENT,
        VIP,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(CLIENT, VIP, 40000, 53, b"query", true),
    );
    let (_, to_backend) = dp.run(PROG_FROM_POD, &query);
    assert_eq!(check(&to_backend).dst, Ipv4Addr::from(BACKEND_A));

    // The backend has no listener: port unreachable quoting what it received. The client must
    // see an error about the packet it sent (to the VIP), from the VIP.
    let unreach = icmp_error(BACKEND_A, CLIENT, 3, 3, &to_backend[14..14 + 28]);
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &unreach);
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
    let (_, to_client) = dp.run(PROG_FROM_NETDEV, &reply);
    assert_eq!(check(&to_client).src, Ipv4Addr::from(VIP));
    let too_big = icmp_error(CLIENT, VIP, 3, 4, &to_client[14..14 + 28]);
    let (rc, out) = dp.run(PROG_FROM_POD, &too_big);
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
    assert_eq!(dp.run(PROG_FROM_NETDEV, &unknown), (TC_ACT_OK, unknown.clone()));
    let echo_reply = icmp_error(BACKEND_A, CLIENT, 0, 0, &to_backend[14..14 + 28]);
    assert_eq!(dp.run(PROG_FROM_NETDEV, &echo_reply), (TC_ACT_OK, echo_reply.clone()));
}

#[test]
fn icmp_errors_about_a_masqueraded_node_port_flow_reach_the_outside_client() {
    let mut dp = Datapath::load();
    dp.set_snat_ip(NODE_IP);
    let np = FrontendKey::new(NODE_IP, 30081, IPPROTO_TCP);
    dp.set_service(np, 31, 0, &[be(BACKEND_B, 8080)], 0);
    dp.set_flags(np, FRONTEND_F_SNAT_EXTERNAL);
    let syn = tcp_frame(EXTERNAL_CLIENT, NODE_IP, &Tcp::syn(50500, 30081));
    let (_, to_backend) = dp.run(PROG_FROM_NETDEV, &syn);
    let seen = check(&to_backend);
    assert_eq!(
        (seen.src, seen.dst),
        (Ipv4Addr::from(NODE_IP), Ipv4Addr::from(BACKEND_B))
    );

    // Fragmentation needed on the way to the backend, quoting the whole TCP header (checksum
    // included), sent to the node (the masqueraded source).
    let quote_len = to_backend.len() - 14;
    let too_big = icmp_error(BACKEND_B, NODE_IP, 3, 4, &to_backend[14..14 + quote_len]);
    let (rc, out) = dp.run(PROG_FROM_NETDEV, &too_big);
    assert_eq!(rc, TC_ACT_OK);
    let (src, dst, quote) = check_icmp(&out);
    assert_eq!((src, dst), (Ipv4Addr::from(NODE_IP), Ipv4Addr::from(EXTERNAL_CLIENT)));
    assert_eq!(
        quote,
        &syn[14..14 + quote_len],
        "quote = the client's SYN, TCP checksum included"
    );
}
