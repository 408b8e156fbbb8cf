//! Types shared between the Orca agent (user space) and its eBPF programs (kernel space).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so the layout is the same
//! on both sides and no byte of a key is left uninitialised (hash maps compare keys bytewise).
//!
//! Byte order: addresses and ports are stored exactly as they appear in packets (network byte
//! order). An address `a.b.c.d` is the `u32` whose in-memory bytes are `[a, b, c, d]`, that is
//! `u32::from_ne_bytes(octets)`; a port `p` is `p.to_be()`. The constructors below do this.
#![no_std]

/// Layout version of the maps below. The agent pins its maps under `<bpffs root>/v<ABI_VERSION>/`,
/// so a release that changes a layout never adopts maps written by an older one.
pub const ABI_VERSION: u32 = 4;

/// Map names as they appear in the eBPF object (at most 15 bytes: the kernel's BPF_OBJ_NAME_LEN).
pub const MAP_FRONTENDS: &str = "ORCA_FRONTENDS";
pub const MAP_BACKENDS: &str = "ORCA_BACKENDS";
pub const MAP_MEMBERS: &str = "ORCA_MEMBERS";
pub const MAP_CT: &str = "ORCA_CT4";
pub const MAP_AFFINITY: &str = "ORCA_AFFINITY";
pub const MAP_CONFIG: &str = "ORCA_CONFIG";
pub const MAP_SRC_RANGES: &str = "ORCA_SRC_RANGES";
pub const MAP_SOCK: &str = "ORCA_SOCK";
pub const MAP_MAGLEV: &str = "ORCA_MAGLEV";
pub const MAP_STATS: &str = "ORCA_STATS";
/// The IPv6 twins of the per-family maps (same roles, `In6` addresses).
pub const MAP_FRONTENDS6: &str = "ORCA_FRONTENDS6";
pub const MAP_BACKENDS6: &str = "ORCA_BACKENDS6";
pub const MAP_MEMBERS6: &str = "ORCA_MEMBERS6";
pub const MAP_CT6: &str = "ORCA_CT6";
pub const MAP_AFFINITY6: &str = "ORCA_AFFINITY6";
pub const MAP_SRC_RANGES6: &str = "ORCA_SRC_RANGE6";
pub const MAP_SOCK6: &str = "ORCA_SOCK6";
pub const MAP_MAGLEV6: &str = "ORCA_MAGLEV6";

/// The names of one family's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapNames {
    pub frontends: &'static str,
    pub backends: &'static str,
    pub members: &'static str,
    pub ct: &'static str,
    pub affinity: &'static str,
    pub src_ranges: &'static str,
    pub sock: &'static str,
    pub maglev: &'static str,
}

pub const MAPS4: MapNames = MapNames {
    frontends: MAP_FRONTENDS,
    backends: MAP_BACKENDS,
    members: MAP_MEMBERS,
    ct: MAP_CT,
    affinity: MAP_AFFINITY,
    src_ranges: MAP_SRC_RANGES,
    sock: MAP_SOCK,
    maglev: MAP_MAGLEV,
};

pub const MAPS6: MapNames = MapNames {
    frontends: MAP_FRONTENDS6,
    backends: MAP_BACKENDS6,
    members: MAP_MEMBERS6,
    ct: MAP_CT6,
    affinity: MAP_AFFINITY6,
    src_ranges: MAP_SRC_RANGES6,
    sock: MAP_SOCK6,
    maglev: MAP_MAGLEV6,
};

/// An address as the maps hold it, in packet order: IPv4 as `u32` (`addr_from_octets`), IPv6 as [`In6`]. Every
/// per-family type below is generic over it, with IPv4 as the default.
pub trait Addr:
    Copy + Default + PartialEq + Eq + PartialOrd + Ord + core::hash::Hash + core::fmt::Debug + 'static
{
    /// Address length in bits (32 or 128).
    const BITS: u32;
    /// The family's map names.
    const MAPS: MapNames;
    fn is_zero(&self) -> bool;
    /// Feeds the address bytes, in packet order, to `f`.
    fn each_byte(&self, f: impl FnMut(u8));
}

impl Addr for u32 {
    const BITS: u32 = 32;
    const MAPS: MapNames = MAPS4;
    #[inline(always)]
    fn is_zero(&self) -> bool {
        *self == 0
    }
    #[inline(always)]
    fn each_byte(&self, mut f: impl FnMut(u8)) {
        for b in self.to_ne_bytes() {
            f(b);
        }
    }
}

/// An IPv6 address in packet order: four `u32` words, each as `u32::from_ne_bytes` of four address bytes (so it
/// is 4-aligned, like every other field, and no map type gets hidden padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Eq, PartialOrd, Ord)]
pub struct In6(pub [u32; 4]);

impl core::hash::Hash for In6 {
    fn hash<H: core::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for In6 {
    /// Branch-free (the eBPF programs compare addresses on every packet, with few registers to spare).
    #[inline(always)]
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
    }
}

impl In6 {
    pub const fn from_octets(o: [u8; 16]) -> Self {
        In6([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }

    pub const fn octets(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.0[i].to_ne_bytes();
            o[4 * i] = b[0];
            o[4 * i + 1] = b[1];
            o[4 * i + 2] = b[2];
            o[4 * i + 3] = b[3];
            i += 1;
        }
        o
    }
}

impl Addr for In6 {
    const BITS: u32 = 128;
    const MAPS: MapNames = MAPS6;
    #[inline(always)]
    fn is_zero(&self) -> bool {
        self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
    }
    #[inline(always)]
    fn each_byte(&self, mut f: impl FnMut(u8)) {
        for w in self.0 {
            for b in w.to_ne_bytes() {
                f(b);
            }
        }
    }
}

/// `ORCA_CONFIG` (array of `u32`) indices.
/// The node's IPv4 address (packet order) used as source for masqueraded flows; 0 disables SNAT.
pub const CONFIG_SNAT_IPV4: u32 = 0;
/// The network namespace cookie (low and high 32 bits) whose sockets the cgroup hooks translate;
/// 0 disables them. Several agents (one per sandbox node) can share a cgroup this way.
pub const CONFIG_NETNS_COOKIE_LO: u32 = 1;
pub const CONFIG_NETNS_COOKIE_HI: u32 = 2;
/// `CONFIG_F_*` bits.
pub const CONFIG_FLAGS: u32 = 3;
/// The node's IPv6 address for masqueraded IPv6 flows: four words (`In6`), from this index; all zero disables it.
pub const CONFIG_SNAT_IPV6: u32 = 4;
pub const CONFIG_LEN: u32 = 8;

/// `--masquerade-all`: every translated flow is masqueraded.
pub const CONFIG_F_MASQUERADE_ALL: u32 = 1;
/// `--cluster-cidr` is set: ClusterIP traffic arriving from outside the node from a source outside
/// the cluster CIDRs (`ORCA_SRC_RANGES` entries of `CLUSTER_CIDR_ID`) is masqueraded.
pub const CONFIG_F_CLUSTER_CIDR: u32 = 2;
/// The same for IPv6 (`ORCA_SRC_RANGE6` entries of `CLUSTER_CIDR_ID`).
pub const CONFIG_F_CLUSTER_CIDR6: u32 = 4;
/// Service id under which `ORCA_SRC_RANGES` holds the cluster CIDRs (real ids start at 1).
pub const CLUSTER_CIDR_ID: u32 = 0;

/// Socket-level load balancing for clients in the node's own network namespace (host processes,
/// hostNetwork pods): cgroup/connect4, sendmsg4, recvmsg4 and getpeername4 hooks.
pub const PROG_CONNECT4: &str = "orca_connect4";
pub const PROG_SENDMSG4: &str = "orca_sendmsg4";
pub const PROG_RECVMSG4: &str = "orca_recvmsg4";
pub const PROG_GETPEERNAME4: &str = "orca_getpeername4";
/// Their IPv6 twins (connect6, sendmsg6, recvmsg6, getpeername6).
pub const PROG_CONNECT6: &str = "orca_connect6";
pub const PROG_SENDMSG6: &str = "orca_sendmsg6";
pub const PROG_RECVMSG6: &str = "orca_recvmsg6";
pub const PROG_GETPEERNAME6: &str = "orca_getpeername6";

/// Program names in the eBPF object.
/// Attached (TC ingress) on the host side of pod veths: traffic leaving local pods.
pub const PROG_FROM_POD: &str = "orca_from_pod";
/// Attached (TC ingress) on node uplinks: traffic arriving at the node.
pub const PROG_FROM_NETDEV: &str = "orca_from_netdev";
/// Attached (TC egress) on uplinks and pod veths, unless netfilter is bypassed: traffic leaving the node's stack.
pub const PROG_EGRESS: &str = "orca_egress";
/// The IPv6 halves of the three (not attached: tail-called from them through `ORCA_PROGS6`, at these slots).
pub const PROG_FROM_POD6: &str = "orca_from_pod6";
pub const PROG_FROM_NETDEV6: &str = "orca_from_netdev6";
pub const PROG_EGRESS6: &str = "orca_egress6";
pub const MAP_PROGS6: &str = "ORCA_PROGS6";
pub const PROG6_FROM_POD: u32 = 0;
pub const PROG6_FROM_NETDEV: u32 = 1;
pub const PROG6_EGRESS: u32 = 2;
pub const PROG6_SLOTS: u32 = 3;
/// The IPv6 programs by slot.
pub const PROGS6: [(&str, u32); 3] = [
    (PROG_FROM_POD6, PROG6_FROM_POD),
    (PROG_FROM_NETDEV6, PROG6_FROM_NETDEV),
    (PROG_EGRESS6, PROG6_EGRESS),
];

/// Map capacities. The frontend, backend-slot and member maps are allocated as entries are written
/// (`BPF_F_NO_PREALLOC`), so their capacity costs no kernel memory until used: 1M backend slots hold 300k
/// endpoints (30k Services x 10) with room for the second slot range each update writes before the switch.
pub const FRONTENDS_MAX: u32 = 1 << 18;
pub const BACKENDS_MAX: u32 = 1 << 20;
/// Default conntrack capacity: entries of `ORCA_CT4` (two or three per flow; see `CT_DIR_*`), allocated on use.
/// The agent sizes the map from `--ebpf-conntrack-max` (flows) at load time.
pub const CT_MAX: u32 = 1 << 21;
pub const AFFINITY_MAX: u32 = 65_536;
pub const SRC_RANGES_MAX: u32 = 16_384;
pub const SOCK_MAX: u32 = 65_536;
pub const MAGLEV_MAX: u32 = 1 << 21;

/// Size of a Maglev lookup table (a prime). Every backend owns M/N entries (within one); a
/// backend change moves few flows as long as the table is much larger than the backend count
/// (about 10 times or more: services of up to ~100 backends).
pub const MAGLEV_TABLE_SIZE: u32 = 1_021;

/// Most backends a single frontend can hold (slot indices are `u16`).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_535;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// `addr.octets()` to the packet-order `u32` used in every map.
#[inline(always)]
pub const fn addr_from_octets(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The packet-order `u32` back to octets.
#[inline(always)]
pub const fn addr_octets(addr: u32) -> [u8; 4] {
    addr.to_ne_bytes()
}

/// A service frontend: a (virtual) address, port and protocol that packets are sent to.
/// Map `ORCA_FRONTENDS` (hash): `FrontendKey` -> `Frontend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey<A = u32> {
    /// Destination address, packet order.
    pub addr: A,
    /// Destination port, network byte order.
    pub port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// `SCOPE_*`: which traffic the entry applies to.
    pub scope: u8,
}

/// Frontend scope: any traffic (pods, and traffic from outside when there is no
/// `SCOPE_EXTERNAL` entry for the same address).
pub const SCOPE_ANY: u8 = 0;
/// Frontend scope: traffic arriving from outside the node (`orca_from_netdev`) only. Used for
/// externalTrafficPolicy=Local frontends: outside clients get the node-local endpoints while local
/// pods, through the `SCOPE_ANY` entry, get the cluster-wide ones (kube-proxy's short-circuit).
pub const SCOPE_EXTERNAL: u8 = 1;

impl FrontendKey {
    /// `port` in host byte order.
    pub const fn new(octets: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: addr_from_octets(octets),
            port: port.to_be(),
            proto,
            scope: SCOPE_ANY,
        }
    }
}

impl FrontendKey<In6> {
    /// `port` in host byte order.
    pub const fn new6(octets: [u8; 16], port: u16, proto: u8) -> Self {
        Self {
            addr: In6::from_octets(octets),
            port: port.to_be(),
            proto,
            scope: SCOPE_ANY,
        }
    }
}

impl<A: Addr> FrontendKey<A> {
    /// `addr` (packet order) and `port` (host byte order).
    pub fn of(addr: A, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port: port.to_be(),
            proto,
            scope: SCOPE_ANY,
        }
    }

    pub const fn with_scope(mut self, scope: u8) -> Self {
        self.scope = scope;
        self
    }
}

/// What a frontend translates to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Identifies the backend set (slots, members, affinity). Never 0 for a live frontend.
    pub service_id: u32,
    /// Number of usable backend slots; 0 means "no endpoints": the packet is rejected.
    pub backend_count: u16,
    /// `FRONTEND_F_*` bits.
    pub flags: u16,
    /// ClientIP session affinity timeout in seconds; 0 disables affinity.
    pub affinity_timeout: u32,
    /// Backends live in slots `slot_base .. slot_base + backend_count` of `ORCA_BACKENDS`. The
    /// agent writes a new backend set into a fresh slot range, switches the frontend to it in one
    /// map update, then frees the old range: a packet never sees a half-written set.
    pub slot_base: u32,
}

/// Frontend flag: packets arriving from outside the node (the `orca_from_netdev` program) are
/// masqueraded to the node address, so replies of a backend on another node come back through
/// this node (kube-proxy masquerades external traffic of externalTrafficPolicy=Cluster).
pub const FRONTEND_F_SNAT_EXTERNAL: u16 = 1;

/// Frontend flag: with no backends, drop packets instead of rejecting them. Set when the service
/// has usable endpoints elsewhere but none this frontend may use (a Local traffic policy without
/// local endpoints): kube-proxy drops those and rejects only when there are no endpoints at all.
pub const FRONTEND_F_DROP_WHEN_EMPTY: u16 = 2;

/// Frontend flag: only sources matching an `ORCA_SRC_RANGES` entry of the frontend's service id
/// may open connections (loadBalancerSourceRanges on load-balancer IPs); others are dropped.
pub const FRONTEND_F_SOURCE_RANGES: u16 = 4;

/// Map `ORCA_SRC_RANGES` (LPM trie): key `{prefix_len: 32 + cidr length, SrcRangeKey}` -> `u32`
/// (unused). The service id is always matched in full, then the source address by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeKey<A = u32> {
    pub service_id: u32,
    /// Source address, packet order (so prefixes match from the most significant bit).
    pub addr: A,
}

/// Frontend flag: a ClusterIP (internal) frontend.
pub const FRONTEND_F_CLUSTER_IP: u16 = 16;

/// Frontend flag: choose backends by Maglev consistent hashing of the 5-tuple instead of at
/// random, so every node picks the same backend for a flow and a backend change moves few flows.
pub const FRONTEND_F_MAGLEV: u16 = 8;

/// Map `ORCA_MAGLEV` (hash): `BackendSlotKey { service_id, slot: slot_base + i }` for
/// `i < MAGLEV_TABLE_SIZE` -> the backend's offset in the slot range. The table lives in the same
/// half of the slot space as the backend set it indexes, so it switches with it.
pub type MaglevKey = BackendSlotKey;

/// The flow hash Maglev tables are indexed by (the same on every node and in the agent's tests):
/// FNV-1a over the 5-tuple bytes in packet order.
#[inline(always)]
pub fn flow_hash<A: Addr>(saddr: A, daddr: A, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    saddr.each_byte(&mut mix);
    daddr.each_byte(&mut mix);
    for b in sport.to_ne_bytes() {
        mix(b);
    }
    for b in dport.to_ne_bytes() {
        mix(b);
    }
    mix(proto);
    h
}

/// Map `ORCA_SOCK` (LRU hash): `SockKey` -> `Backend`, the socket-level translation state.
/// `SOCK_DIR_SERVICE`: (socket, frontend) -> the backend it was sent to (UDP sockets keep theirs);
/// `SOCK_DIR_REVERSE`: (socket, backend) -> the frontend, for recvmsg/getpeername.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey<A = u32> {
    pub addr: A,
    pub port: u16,
    pub dir: u8,
    pub _pad: u8,
    /// The socket cookie, low and high 32 bits (two words, so the key is 4-aligned without padding in both
    /// families).
    pub cookie: [u32; 2],
}

impl<A: Addr> SockKey<A> {
    #[inline(always)]
    pub fn new(cookie: u64, addr: A, port: u16, dir: u8) -> Self {
        Self {
            addr,
            port,
            dir,
            _pad: 0,
            cookie: [cookie as u32, (cookie >> 32) as u32],
        }
    }
}

pub const SOCK_DIR_SERVICE: u8 = 0;
pub const SOCK_DIR_REVERSE: u8 = 1;

/// Map `ORCA_BACKENDS` (hash): `BackendSlotKey` -> `Backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = u32> {
    /// Backend address, packet order.
    pub addr: A,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

impl Backend {
    /// `port` in host byte order.
    pub const fn new(octets: [u8; 4], port: u16) -> Self {
        Self {
            addr: addr_from_octets(octets),
            port: port.to_be(),
            _pad: 0,
        }
    }
}

impl Backend<In6> {
    /// `port` in host byte order.
    pub const fn new6(octets: [u8; 16], port: u16) -> Self {
        Self {
            addr: In6::from_octets(octets),
            port: port.to_be(),
            _pad: 0,
        }
    }
}

/// Map `ORCA_MEMBERS` (hash): `MemberKey` -> slot index (informational). Present exactly while the
/// backend belongs to the service's current set. The programs use it to decide whether a
/// conntrack or affinity entry still points at a live backend: UDP flows and new TCP connections
/// (SYN) move off removed backends, established TCP flows keep theirs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey<A = u32> {
    pub service_id: u32,
    pub addr: A,
    pub port: u16,
    pub _pad: u16,
}

impl<A: Addr> MemberKey<A> {
    pub const fn of(service_id: u32, backend: &Backend<A>) -> Self {
        Self {
            service_id,
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
        }
    }
}

/// Conntrack entry roles (`CtKey::dir`). A translated flow has up to three entries, each keyed by the tuple of
/// the packets that look it up, and each holding the whole flow (`CtValue`), so that any entry can find (and
/// refresh) the others:
///
/// - `CT_DIR_SERVICE`: client -> frontend, as packets arrive at TC ingress. Every flow.
/// - `CT_DIR_REPLY`: backend -> client, as replies arrive at TC ingress, where the client is the masquerade
///   address and port for a masqueraded flow. Masqueraded flows, and every flow when netfilter is bypassed.
/// - `CT_DIR_INNER`: client <-> backend (the tuple the node's stack and netfilter see between the two halves of
///   the translation), keyed in canonical order (`CtKey::inner`) so that one lookup at TC egress serves both
///   directions. Every flow, unless netfilter is bypassed.
pub const CT_DIR_SERVICE: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;
pub const CT_DIR_INNER: u8 = 2;

/// Map `ORCA_CT4` (hash, entries allocated on use, never evicted: expired entries are taken over by new flows
/// in the datapath and deleted by the agent's garbage collector): `CtKey` -> `CtValue`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A = u32> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

impl<A: Addr> CtKey<A> {
    /// The `CT_DIR_INNER` key of the flow between `a`:`ap` and `b`:`bp` (either order gives the same key).
    #[inline(always)]
    pub fn inner(a: A, ap: u16, b: A, bp: u16, proto: u8) -> Self {
        // Packet-order values compared as plain integers: any total order does, as long as both sides agree.
        let swap = (a, ap) > (b, bp);
        let ((saddr, sport), (daddr, dport)) = if swap { ((b, bp), (a, ap)) } else { ((a, ap), (b, bp)) };
        CtKey {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            dir: CT_DIR_INNER,
            _pad: 0,
        }
    }
}

/// One translated flow. Addresses in packet order, ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue<A = u32> {
    pub client_addr: A,
    pub frontend_addr: A,
    pub backend_addr: A,
    /// The source masqueraded packets get (the node's address); 0: the flow is not masqueraded.
    pub nat_addr: A,
    pub client_port: u16,
    pub frontend_port: u16,
    pub backend_port: u16,
    pub nat_port: u16,
    pub service_id: u32,
    /// `CT_F_*` state bits.
    pub flags: u32,
    /// `ct_tick(now)` when this entry last refreshed the flow's other entries: that costs lookups, so it happens
    /// at most once per tick (about a second) and on every state change, not on every packet.
    pub peer_refreshed: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last packet of the flow seen through this entry.
    pub last_seen_ns: u64,
}

impl<A: Addr> CtValue<A> {
    /// Whether `other` describes the same flow (the same client, frontend and backend).
    #[inline(always)]
    pub fn same_flow(&self, other: &CtValue<A>) -> bool {
        self.client_addr == other.client_addr
            && self.client_port == other.client_port
            && self.frontend_addr == other.frontend_addr
            && self.frontend_port == other.frontend_port
            && self.backend_addr == other.backend_addr
            && self.backend_port == other.backend_port
    }

    /// The `CT_DIR_SERVICE` key of the flow.
    #[inline(always)]
    pub fn service_key(&self, proto: u8) -> CtKey<A> {
        CtKey {
            saddr: self.client_addr,
            daddr: self.frontend_addr,
            sport: self.client_port,
            dport: self.frontend_port,
            proto,
            dir: CT_DIR_SERVICE,
            _pad: 0,
        }
    }

    /// The `CT_DIR_REPLY` key of the flow: replies as they arrive (to the masquerade address when masqueraded).
    #[inline(always)]
    pub fn reply_key(&self, proto: u8) -> CtKey<A> {
        let (daddr, dport) = if !self.nat_addr.is_zero() {
            (self.nat_addr, self.nat_port)
        } else {
            (self.client_addr, self.client_port)
        };
        CtKey {
            saddr: self.backend_addr,
            daddr,
            sport: self.backend_port,
            dport,
            proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        }
    }

    /// The `CT_DIR_INNER` key of the flow.
    #[inline(always)]
    pub fn inner_key(&self, proto: u8) -> CtKey<A> {
        CtKey::inner(
            self.client_addr,
            self.client_port,
            self.backend_addr,
            self.backend_port,
            proto,
        )
    }

    /// How long the flow lives without traffic in its current state, as the kernel's conntrack decides it.
    #[inline(always)]
    pub fn lifetime_ns(&self, proto: u8, t: &CtTimeouts) -> u64 {
        let f = self.flags;
        if proto == IPPROTO_TCP {
            if f & CT_F_RST != 0 {
                t.tcp_close_ns
            } else if f & CT_F_FIN_CLIENT != 0 && f & CT_F_FIN_BACKEND != 0 {
                t.tcp_time_wait_ns
            } else if f & (CT_F_FIN_CLIENT | CT_F_FIN_BACKEND) != 0 {
                t.tcp_close_wait_ns
            } else if f & CT_F_SEEN_REPLY != 0 {
                t.tcp_established_ns
            } else {
                t.tcp_syn_sent_ns
            }
        } else if f & CT_F_SEEN_REPLY != 0 {
            t.udp_stream_ns
        } else {
            t.udp_ns
        }
    }

    /// Idle for longer than its lifetime: the flow is over, its 5-tuple (and masquerade port) is free.
    #[inline(always)]
    pub fn expired(&self, proto: u8, now_ns: u64, t: &CtTimeouts) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(proto, t)
    }

    /// Expired for long enough that every other entry of the flow is expired too (entries refresh each other at
    /// most once per tick, so they may lag by a tick): only then may an entry be reclaimed by another flow or the
    /// garbage collector.
    #[inline(always)]
    pub fn reclaimable(&self, proto: u8, now_ns: u64, t: &CtTimeouts) -> bool {
        now_ns.saturating_sub(self.last_seen_ns) > self.lifetime_ns(proto, t).saturating_add(CT_RECLAIM_GRACE_NS)
    }

    /// A TCP connection that is over but whose entry lives on for stray segments (TIME_WAIT: both sides sent
    /// FIN; CLOSE: reset): a new connection (SYN) may take its 5-tuple over, as the kernel's NAT does.
    #[inline(always)]
    pub fn tcp_closed(&self) -> bool {
        let f = self.flags;
        f & CT_F_RST != 0 || (f & CT_F_FIN_CLIENT != 0 && f & CT_F_FIN_BACKEND != 0)
    }
}

/// Conntrack state: a packet from the backend to the client was seen (TCP: the connection is established; UDP:
/// a stream).
pub const CT_F_SEEN_REPLY: u32 = 1;
/// Conntrack state: the client sent a FIN.
pub const CT_F_FIN_CLIENT: u32 = 2;
/// Conntrack state: the backend sent a FIN.
pub const CT_F_FIN_BACKEND: u32 = 4;
/// Conntrack state: a RST was seen.
pub const CT_F_RST: u32 = 8;

/// See `CtValue::reclaimable`: two ticks.
pub const CT_RECLAIM_GRACE_NS: u64 = 2 << 30;

/// Idle lifetimes per conntrack state, in nanoseconds: the program's global `ORCA_CT_TIMEOUTS` (set when the
/// agent loads the programs) and the agent's garbage collector use the same values.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// A SYN without an answer yet (kernel: `nf_conntrack_tcp_timeout_syn_sent`, 120 s).
    pub tcp_syn_sent_ns: u64,
    /// kube-proxy's `--conntrack-tcp-timeout-established` (24 h).
    pub tcp_established_ns: u64,
    /// One side closed (kube-proxy's `--conntrack-tcp-timeout-close-wait`, 1 h).
    pub tcp_close_wait_ns: u64,
    /// Both sides closed (kernel: `nf_conntrack_tcp_timeout_time_wait`, 120 s).
    pub tcp_time_wait_ns: u64,
    /// Reset (kernel: `nf_conntrack_tcp_timeout_close`, 10 s).
    pub tcp_close_ns: u64,
    /// UDP without a reply (kube-proxy's `--conntrack-udp-timeout`; kernel `nf_conntrack_udp_timeout`, 30 s).
    pub udp_ns: u64,
    /// UDP with replies (kube-proxy's `--conntrack-udp-timeout-stream`; kernel 120 s).
    pub udp_stream_ns: u64,
}

const SEC: u64 = 1_000_000_000;

impl CtTimeouts {
    /// The kernel's defaults, with kube-proxy's defaults for established and close-wait TCP.
    pub const DEFAULT: CtTimeouts = CtTimeouts {
        tcp_syn_sent_ns: 120 * SEC,
        tcp_established_ns: 86_400 * SEC,
        tcp_close_wait_ns: 3_600 * SEC,
        tcp_time_wait_ns: 120 * SEC,
        tcp_close_ns: 10 * SEC,
        udp_ns: 30 * SEC,
        udp_stream_ns: 120 * SEC,
    };
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The masquerade source ports: `span` ports from `lo` (host order), skipping `hole_len` ports from `hole_start`
/// (the node's own ephemeral range, `net.ipv4.ip_local_port_range`, so that the node's connections never pick a
/// port a masqueraded flow holds). The program's global `ORCA_NAT_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatPorts {
    pub lo: u32,
    pub span: u32,
    pub hole_start: u32,
    pub hole_len: u32,
}

impl NatPorts {
    /// The ports `min..=max` except `exclude` (inclusive; an empty or disjoint exclusion removes nothing). `None`
    /// when no port is left.
    pub fn new(min: u16, max: u16, exclude: Option<(u16, u16)>) -> Option<NatPorts> {
        if min > max {
            return None;
        }
        let (lo, hi) = (u32::from(min), u32::from(max));
        let (mut hole_start, mut hole_len) = (u32::MAX, 0);
        if let Some((a, b)) = exclude {
            let (a, b) = (u32::from(a).max(lo), u32::from(b).min(hi));
            if a <= b {
                hole_start = a;
                hole_len = b - a + 1;
            }
        }
        let span = hi - lo + 1 - hole_len;
        if span == 0 {
            return None;
        }
        if hole_start == lo {
            // The hole starts the range: start after it instead.
            return Some(NatPorts {
                lo: lo + hole_len,
                span,
                hole_start: u32::MAX,
                hole_len: 0,
            });
        }
        Some(NatPorts {
            lo,
            span,
            hole_start,
            hole_len,
        })
    }

    /// The `r`-th allowed port (`r` taken modulo the number of ports), host order.
    #[inline(always)]
    pub fn port(&self, r: u32) -> u16 {
        let span = if self.span == 0 { 1 } else { self.span };
        let mut p = self.lo + r % span;
        if p >= self.hole_start {
            p += self.hole_len;
        }
        p as u16
    }

    /// Whether `port` (host order) is one of the ports.
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let p = u32::from(port);
        let hi = self.lo + self.span + self.hole_len;
        p >= self.lo && p < hi && !(p >= self.hole_start && p < self.hole_start.saturating_add(self.hole_len))
    }
}

/// The default masquerade ports before the node's ephemeral range is cut out (the kernel's MASQUERADE uses
/// 1024-65535 for unprivileged source ports).
pub const NAT_PORT_MIN: u16 = 1024;
pub const NAT_PORT_MAX: u16 = 65_535;

/// Coarse time for `CtValue::peer_refreshed`: bpf_ktime_get_ns() in units of 2^30 ns (about 1.07 s).
#[inline(always)]
pub const fn ct_tick(now_ns: u64) -> u32 {
    (now_ns >> 30) as u32
}

// `ORCA_STATS` (per-CPU array of `u64`) indices: packets per reason, for every drop and every packet the programs
// leave untranslated although they looked at it as possible Service traffic.

/// Drops.
pub const REASON_SOURCE_RANGE: u32 = 0;
pub const REASON_NO_LOCAL_ENDPOINTS: u32 = 1;
pub const REASON_NO_ENDPOINTS_REJECTED: u32 = 2;
pub const REASON_NO_ENDPOINTS_DROPPED: u32 = 3;
pub const REASON_CT_FULL: u32 = 4;
pub const REASON_NO_SNAT_PORT: u32 = 5;
/// A packet (or an ICMP error's quote) whose rewrite failed half-way: it would be corrupt.
pub const REASON_REWRITE_FAILED: u32 = 6;
/// Untranslated passes: IP fragments (no ports to translate by), non-IP frames (ARP, ...), and with netfilter bypassed
/// translated packets the FIB would not forward (handed to the stack).
pub const REASON_FRAGMENT: u32 = 7;
pub const REASON_NOT_IP: u32 = 8;
pub const REASON_FIB_DECLINED: u32 = 9;
pub const REASON_COUNT: u32 = 10;

/// Name (the metric's `reason` label) and whether the packet was dropped, per `REASON_*`.
pub const REASONS: [(&str, bool); REASON_COUNT as usize] = [
    ("source_range", true),
    ("no_local_endpoints", true),
    ("no_endpoints_rejected", true),
    ("no_endpoints_dropped", true),
    ("conntrack_full", true),
    ("no_snat_port", true),
    ("rewrite_failed", true),
    ("fragment", false),
    ("not_ip", false),
    ("fib_declined", false),
];

/// Names of the programs' load-time globals (`EbpfLoader::set_global`).
pub const GLOBAL_CT_TIMEOUTS: &str = "ORCA_CT_TIMEOUTS";
pub const GLOBAL_NAT_PORTS: &str = "ORCA_NAT_PORTS";
/// `u32`, 1: translated packets are forwarded by the programs (FIB lookup and redirect), bypassing the node's
/// routing and netfilter; 0 (default): DNAT at ingress, SNAT at egress, the stack and netfilter in between.
pub const GLOBAL_BYPASS_NETFILTER: &str = "ORCA_BYPASS_NETFILTER";

/// Map `ORCA_AFFINITY` (LRU hash): `AffinityKey` -> `AffinityValue` (ClientIP session affinity).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A = u32> {
    pub service_id: u32,
    pub client_addr: A,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityValue<A = u32> {
    pub backend: Backend<A>,
    /// bpf_ktime_get_ns() of the client's last new connection to the service, low and high 32 bits (two words: no
    /// padding in either family).
    pub last_used: [u32; 2],
}

impl<A: Addr> AffinityValue<A> {
    #[inline(always)]
    pub fn new(backend: Backend<A>, last_used_ns: u64) -> Self {
        Self {
            backend,
            last_used: [last_used_ns as u32, (last_used_ns >> 32) as u32],
        }
    }

    #[inline(always)]
    pub fn last_used_ns(&self) -> u64 {
        u64::from(self.last_used[0]) | (u64::from(self.last_used[1]) << 32)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], made only of integers, with explicit padding fields, so
    // every bit pattern is valid and there are no implicit padding bytes.
    // The generic ones are checked for both families below (the sizes are sums of their fields).
    unsafe impl aya::Pod for In6 {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for FrontendKey<A> {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for Backend<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for MemberKey<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for CtKey<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for CtValue<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for AffinityKey<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for AffinityValue<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for SrcRangeKey<A> {}
    unsafe impl<A: Addr + aya::Pod> aya::Pod for SockKey<A> {}
    unsafe impl aya::Pod for CtTimeouts {}
    unsafe impl aya::Pod for NatPorts {}
}

// The layouts are part of the kernel/user ABI: fail the build if one changes by accident.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<FrontendKey>() == 8);
    assert!(size_of::<Frontend>() == 16);
    assert!(size_of::<BackendSlotKey>() == 8);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<MemberKey>() == 12);
    assert!(size_of::<CtKey>() == 16);
    assert!(size_of::<CtValue>() == 48);
    assert!(size_of::<CtTimeouts>() == 56);
    assert!(size_of::<NatPorts>() == 16);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SrcRangeKey>() == 8);
    assert!(size_of::<SockKey>() == 16);
    // IPv6: no hidden padding either (each size is the sum of its fields).
    assert!(size_of::<In6>() == 16);
    assert!(size_of::<FrontendKey<In6>>() == 20);
    assert!(size_of::<Backend<In6>>() == 20);
    assert!(size_of::<MemberKey<In6>>() == 24);
    assert!(size_of::<CtKey<In6>>() == 40);
    assert!(size_of::<CtValue<In6>>() == 96);
    assert!(size_of::<AffinityKey<In6>>() == 20);
    assert!(size_of::<AffinityValue<In6>>() == 28);
    assert!(size_of::<SrcRangeKey<In6>>() == 20);
    assert!(size_of::<SockKey<In6>>() == 28);
};

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn nat_ports_skip_the_hole_and_cover_every_allowed_port() {
        let p = NatPorts::new(1024, 65_535, Some((32_768, 60_999))).unwrap();
        assert_eq!(p.span, 65_535 - 1024 + 1 - (60_999 - 32_768 + 1));
        let all: BTreeSet<u16> = (0..p.span).map(|r| p.port(r)).collect();
        assert_eq!(all.len() as u32, p.span);
        assert_eq!(all.first(), Some(&1024));
        assert_eq!(all.last(), Some(&65_535));
        assert!(!all.iter().any(|x| (32_768..=60_999).contains(x)));
        assert!(all.iter().all(|&x| p.contains(x)));
        assert!(!p.contains(40_000) && !p.contains(1023));
        // Wraps around.
        assert_eq!(p.port(p.span), 1024);
    }

    #[test]
    fn nat_ports_with_the_hole_at_an_end_or_outside() {
        let p = NatPorts::new(1024, 65_535, Some((1000, 2047))).unwrap();
        assert_eq!((p.port(0), p.span), (2048, 65_535 - 2048 + 1));
        let p = NatPorts::new(1024, 65_535, Some((60_000, 65_535))).unwrap();
        assert_eq!((p.port(0), p.port(p.span - 1)), (1024, 59_999));
        let p = NatPorts::new(20_000, 20_009, None).unwrap();
        assert_eq!((p.span, p.port(9), p.port(10)), (10, 20_009, 20_000));
        let p = NatPorts::new(20_000, 20_009, Some((1, 100))).unwrap();
        assert_eq!(p.span, 10);
        assert!(NatPorts::new(1024, 65_535, Some((1, 65_535))).is_none());
        assert!(NatPorts::new(2, 1, None).is_none());
    }

    #[test]
    fn inner_keys_are_the_same_from_both_ends() {
        let a = CtKey::inner(
            addr_from_octets([10, 0, 0, 1]),
            4000u16.to_be(),
            addr_from_octets([10, 0, 0, 2]),
            80u16.to_be(),
            IPPROTO_TCP,
        );
        let b = CtKey::inner(
            addr_from_octets([10, 0, 0, 2]),
            80u16.to_be(),
            addr_from_octets([10, 0, 0, 1]),
            4000u16.to_be(),
            IPPROTO_TCP,
        );
        assert_eq!(a, b);
        assert_eq!(a.dir, CT_DIR_INNER);
        // Hairpin: the same address at both ends, told apart by the ports.
        let c = CtKey::inner(7, 1, 7, 2, IPPROTO_UDP);
        assert_eq!(c, CtKey::inner(7, 2, 7, 1, IPPROTO_UDP));
    }

    #[test]
    fn lifetimes_follow_the_kernel_states() {
        let t = CtTimeouts::DEFAULT;
        let mut v: CtValue = CtValue::default();
        assert_eq!(v.lifetime_ns(IPPROTO_TCP, &t), t.tcp_syn_sent_ns);
        assert_eq!(v.lifetime_ns(IPPROTO_UDP, &t), t.udp_ns);
        v.flags = CT_F_SEEN_REPLY;
        assert_eq!(v.lifetime_ns(IPPROTO_TCP, &t), t.tcp_established_ns);
        assert_eq!(v.lifetime_ns(IPPROTO_UDP, &t), t.udp_stream_ns);
        v.flags |= CT_F_FIN_BACKEND;
        assert_eq!(v.lifetime_ns(IPPROTO_TCP, &t), t.tcp_close_wait_ns);
        assert!(!v.tcp_closed());
        v.flags |= CT_F_FIN_CLIENT;
        assert_eq!(v.lifetime_ns(IPPROTO_TCP, &t), t.tcp_time_wait_ns);
        assert!(v.tcp_closed());
        v.flags = CT_F_SEEN_REPLY | CT_F_RST;
        assert_eq!(v.lifetime_ns(IPPROTO_TCP, &t), t.tcp_close_ns);
        v.last_seen_ns = 1_000;
        assert!(!v.expired(IPPROTO_TCP, 1_000 + t.tcp_close_ns, &t));
        assert!(v.expired(IPPROTO_TCP, 1_001 + t.tcp_close_ns, &t));
        assert!(!v.reclaimable(IPPROTO_TCP, 1_001 + t.tcp_close_ns, &t));
        assert!(v.reclaimable(IPPROTO_TCP, 1_001 + t.tcp_close_ns + CT_RECLAIM_GRACE_NS, &t));
    }
}
