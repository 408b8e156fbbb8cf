//! Loading the programs like the agent does, crafting packets and checking them (independently of the
//! programs' own code).
#![allow(dead_code)]

pub use std::net::Ipv4Addr;

pub use aya::{
    maps::{Array, HashMap, MapData},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
pub use orca_common::{
    addr_from_octets, Backend, BackendSlotKey, CtKey, CtTimeouts, CtValue, Frontend, FrontendKey, MemberKey, NatPorts,
    CONFIG_SNAT_IPV4, CT_DIR_REPLY, CT_DIR_SERVICE, FRONTEND_F_SNAT_EXTERNAL, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    MAP_BACKENDS, MAP_CONFIG, MAP_CT, MAP_FRONTENDS, MAP_MEMBERS, PROG_EGRESS, PROG_FROM_NETDEV, PROG_FROM_POD,
};
use orca_proxy::ebpf_obj;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: [u8; 4] = [10, 244, 0, 7];
pub const VIP: [u8; 4] = [10, 96, 0, 10];
pub const BACKEND_A: [u8; 4] = [10, 244, 1, 5];
pub const BACKEND_B: [u8; 4] = [10, 244, 2, 6];
pub const BACKEND_C: [u8; 4] = [10, 244, 3, 7];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

// ---------------------------------------------------------------------------------------------
// Loading and map programming.

/// How the programs are loaded: the agent's load-time settings.
#[derive(Clone, Copy)]
pub struct Options {
    pub bypass_netfilter: bool,
    /// Entries of ORCA_CT4; `None`: the real default size.
    pub ct_entries: Option<u32>,
    pub frontends: u32,
    pub timeouts: CtTimeouts,
    pub nat_ports: Option<NatPorts>,
    /// Also load the IPv6 programs (and fill `ORCA_PROGS6`): the IPv6 tests. Others leave them out, which spares
    /// the verifier (and the kernel matrix's emulated VMs) most of the work; IPv6 frames then pass untouched.
    pub ipv6: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bypass_netfilter: false,
            ct_entries: Some(4096),
            frontends: 1024,
            timeouts: CtTimeouts::DEFAULT,
            nat_ports: None,
            ipv6: false,
        }
    }
}

/// The masquerade ports of a program loaded without `nat_ports`: the agent's default on a node with Linux's
/// default ephemeral range.
pub fn default_nat_ports() -> NatPorts {
    NatPorts::new(
        orca_common::NAT_PORT_MIN,
        orca_common::NAT_PORT_MAX,
        Some((32_768, 60_999)),
    )
    .unwrap()
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub bypass: bool,
}

/// Runs `body` against the programs loaded in each mode: netfilter seen (default) and bypassed.
pub fn both_modes(body: impl Fn(Datapath)) {
    for bypass in [false, true] {
        body(Datapath::load_with(Options {
            bypass_netfilter: bypass,
            ..Options::default()
        }));
    }
}

/// `both_modes` with the IPv6 programs.
pub fn both_modes6(body: impl Fn(Datapath)) {
    for bypass in [false, true] {
        body(Datapath::load_with(Options {
            bypass_netfilter: bypass,
            ipv6: true,
            ..Options::default()
        }));
    }
}

impl Datapath {
    pub fn load() -> Self {
        Self::load_with(Options::default())
    }

    /// With the IPv6 programs.
    pub fn load6() -> Self {
        Self::load_with(Options {
            ipv6: true,
            ..Options::default()
        })
    }

    pub fn load_bypass() -> Self {
        Self::load_with(Options {
            bypass_netfilter: true,
            ..Options::default()
        })
    }

    pub fn load_with_frontends(frontends: u32) -> Self {
        Self::load_with(Options {
            frontends,
            ..Options::default()
        })
    }

    pub fn load_with(o: Options) -> Self {
        let frontends = o.frontends;
        assert!(
            nix_is_root(),
            "the eBPF datapath tests load programs into the kernel: run them as root"
        );
        assert!(
            ebpf_obj::available(),
            "orca-proxy was built with AYA_BUILD_SKIP: no eBPF object to test"
        );
        private_netns();
        let bypass = u32::from(o.bypass_netfilter);
        let nat_ports = o.nat_ports.unwrap_or_else(default_nat_ports);
        let mut loader = EbpfLoader::new();
        // Small maps unless asked (many tests load their own copy in parallel); the hash maps are allocated on
        // use, so the real conntrack size costs only its buckets.
        loader
            .map_max_entries("ORCA_AFFINITY", 1024)
            .map_max_entries(MAP_FRONTENDS, frontends)
            .map_max_entries(MAP_BACKENDS, 4096.max(frontends))
            .map_max_entries(MAP_MEMBERS, 4096.max(frontends))
            .override_global(orca_common::GLOBAL_BYPASS_NETFILTER, &bypass, true)
            .override_global(orca_common::GLOBAL_CT_TIMEOUTS, &o.timeouts, true)
            .override_global(orca_common::GLOBAL_NAT_PORTS, &nat_ports, true);
        if let Some(n) = o.ct_entries {
            loader.map_max_entries(MAP_CT, n);
        }
        let mut ebpf = loader
            .load(ebpf_obj::OBJECT)
            .expect("parse and create maps of the embedded eBPF object");
        // The three TC programs, and the IPv6 ones they tail-call for IPv6 frames.
        let ipv6 = orca_common::PROGS6.into_iter().map(|(n, _)| n).filter(|_| o.ipv6);
        for name in [PROG_FROM_POD, PROG_FROM_NETDEV, PROG_EGRESS].into_iter().chain(ipv6) {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("a TC classifier");
            if let Err(e) = prog.load() {
                panic!("the verifier rejected {name}: {}", verifier_log(&e));
            }
        }
        if o.ipv6 {
            orca_proxy::dataplane::ebpf::loader::fill_progs6(&mut ebpf).expect("filling ORCA_PROGS6");
        }
        // The socket hooks load where the agent loads them (bpf_set_retval: 5.18); the netns tests exercise them.
        let hooks = orca_proxy::dataplane::ebpf::loader::sock_hooks_supported();
        for name in orca_proxy::dataplane::ebpf::loader::SOCK_PROGRAMS
            .into_iter()
            .filter(|_| hooks)
        {
            let prog: &mut aya::programs::CgroupSockAddr = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("a cgroup sock_addr program");
            if let Err(e) = prog.load() {
                panic!("the verifier rejected {name}: {}", verifier_log(&e));
            }
        }
        Self {
            ebpf,
            bypass: o.bypass_netfilter,
        }
    }

    pub fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect(name)).expect(name)
    }

    /// Publishes a frontend with `backends` in slots `slot_base..`, in the agent's order: slots
    /// and members, then the frontend.
    pub fn set_service(
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
    pub fn remove_backends(&mut self, service_id: u32, slot_base: u32, backends: &[Backend]) {
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

    pub fn set_flags(&mut self, fe: FrontendKey, flags: u16) {
        let mut m = self.map::<FrontendKey, Frontend>(MAP_FRONTENDS);
        let mut v = m.get(&fe, 0).unwrap();
        v.flags = flags;
        m.insert(fe, v, 0).unwrap();
    }

    pub fn set_snat_ip(&mut self, ip: [u8; 4]) {
        let mut cfg: Array<&mut MapData, u32> = Array::try_from(self.ebpf.map_mut(MAP_CONFIG).unwrap()).unwrap();
        cfg.set(CONFIG_SNAT_IPV4, addr_from_octets(ip), 0).unwrap();
    }

    pub fn run(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(prog, frame, 0)
    }

    /// Runs `prog` on `frame` as if it arrived on interface `ifindex` (0: the namespace's loopback).
    pub fn run_on(&self, prog: &str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
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

    pub fn ct(&mut self, key: &CtKey) -> Option<CtValue> {
        self.map::<CtKey, CtValue>(MAP_CT).get(key, 0).ok()
    }

    /// A packet crossing the node: the ingress program `prog` (of the interface it arrives on), then, when the
    /// stack gets it (TC_ACT_OK) and netfilter is not bypassed, the egress program of the interface it leaves
    /// by. Returns what leaves the node (or the ingress verdict when the packet stops there).
    pub fn cross(&self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let (rc, out) = self.run(prog, frame);
        if rc != TC_ACT_OK || self.bypass {
            return (rc, out);
        }
        self.run(PROG_EGRESS, &out)
    }

    /// Every conntrack entry.
    pub fn ct_entries(&mut self) -> Vec<(CtKey, CtValue)> {
        let m = self.map::<CtKey, CtValue>(MAP_CT);
        m.iter().map(|r| r.unwrap()).collect()
    }

    /// The per-reason counters, summed over CPUs.
    pub fn stats(&self) -> Vec<u64> {
        let m: aya::maps::PerCpuArray<&MapData, u64> =
            aya::maps::PerCpuArray::try_from(self.ebpf.map(orca_common::MAP_STATS).unwrap()).unwrap();
        (0..orca_common::REASON_COUNT)
            .map(|i| m.get(&i, 0).unwrap().iter().sum())
            .collect()
    }
}

pub fn verifier_log(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            format!("{io_error}\n{verifier_log}")
        }
        other => format!("{other}"),
    }
}

/// Moves this thread into a new network namespace, once.
pub fn private_netns() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    // SAFETY: unshare affects only the calling thread's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
}

/// Runs `ip` in this thread's network namespace (the child inherits it).
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

pub fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------------------------
// Packet crafting and checking (independent of the programs' code).

pub fn csum_add(mut acc: u32, bytes: &[u8]) -> u32 {
    for chunk in bytes.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).copied().map_or(0, u32::from);
        acc += hi | lo;
    }
    acc
}

pub fn csum_fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    csum_add(csum_add(0, &src), &dst) + u32::from(proto) + len as u32
}

#[derive(Clone)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

impl Tcp {
    pub fn syn(sport: u16, dport: u16) -> Self {
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

    pub fn data(sport: u16, dport: u16, payload: &[u8]) -> Self {
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

    pub fn bytes(&self, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
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

pub fn udp_bytes(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8], csum: bool) -> Vec<u8> {
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
pub fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, ip_options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
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

pub fn tcp_frame(src: [u8; 4], dst: [u8; 4], tcp: &Tcp) -> Vec<u8> {
    frame(src, dst, IPPROTO_TCP, &[], 0, &tcp.bytes(src, dst))
}

#[derive(Debug)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub l4_csum: u16,
}

/// Parses an output frame and asserts that its IPv4 header checksum and TCP/UDP checksum verify.
pub fn check(f: &[u8]) -> Seen {
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

pub fn be(octets: [u8; 4], port: u16) -> Backend {
    Backend::new(octets, port)
}

pub fn ct_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
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

pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const NODE_IP: [u8; 4] = [192, 168, 50, 10];
pub const EXTERNAL_CLIENT: [u8; 4] = [192, 0, 2, 50];

pub fn monotonic_ns() -> u64 {
    orca_proxy::dataplane::ebpf::conntrack::monotonic_ns()
}

/// A TCP segment with `flags` and no payload.
pub fn tcp_flags(sport: u16, dport: u16, flags: u8) -> Tcp {
    let mut t = Tcp::data(sport, dport, b"");
    t.flags = flags;
    t
}

pub fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    frame(
        src,
        dst,
        IPPROTO_UDP,
        &[],
        0,
        &udp_bytes(src, dst, sport, dport, payload, true),
    )
}

/// An ICMP error (`icmp_type`/`code`) from `src` to `dst` quoting `quote` (an IPv4 packet's head).
pub fn icmp_error(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc];
    m.extend_from_slice(quote);
    let c = csum_fold(csum_add(0, &m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    frame(src, dst, IPPROTO_ICMP, &[], 0, &m)
}

/// Checks the outer IPv4 and ICMP checksums of an ICMP error; returns its outer addresses and
/// the quote.
pub fn check_icmp(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
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
