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
pub const ABI_VERSION: u32 = 2;

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

/// `ORCA_CONFIG` (array of `u32`) indices.
/// The node's IPv4 address (packet order) used as source for masqueraded flows; 0 disables SNAT.
pub const CONFIG_SNAT_IPV4: u32 = 0;
/// The network namespace cookie (low and high 32 bits) whose sockets the cgroup hooks translate;
/// 0 disables them. Several agents (one per sandbox node) can share a cgroup this way.
pub const CONFIG_NETNS_COOKIE_LO: u32 = 1;
pub const CONFIG_NETNS_COOKIE_HI: u32 = 2;
/// `CONFIG_F_*` bits.
pub const CONFIG_FLAGS: u32 = 3;
pub const CONFIG_LEN: u32 = 4;

/// `--masquerade-all`: every translated flow is masqueraded.
pub const CONFIG_F_MASQUERADE_ALL: u32 = 1;
/// `--cluster-cidr` is set: ClusterIP traffic arriving from outside the node from a source outside
/// the cluster CIDRs (`ORCA_SRC_RANGES` entries of `CLUSTER_CIDR_ID`) is masqueraded.
pub const CONFIG_F_CLUSTER_CIDR: u32 = 2;
/// Service id under which `ORCA_SRC_RANGES` holds the cluster CIDRs (real ids start at 1).
pub const CLUSTER_CIDR_ID: u32 = 0;

/// Source ports of masqueraded flows come from this range (host order), above Linux's default
/// ephemeral range (`net.ipv4.ip_local_port_range` 32768-60999), so they do not collide with the
/// node's own connections.
pub const NAT_PORT_MIN: u16 = 61_000;
pub const NAT_PORT_MAX: u16 = 65_535;

/// Socket-level load balancing for clients in the node's own network namespace (host processes,
/// hostNetwork pods): cgroup/connect4, sendmsg4, recvmsg4 and getpeername4 hooks.
pub const PROG_CONNECT4: &str = "orca_connect4";
pub const PROG_SENDMSG4: &str = "orca_sendmsg4";
pub const PROG_RECVMSG4: &str = "orca_recvmsg4";
pub const PROG_GETPEERNAME4: &str = "orca_getpeername4";

/// Program names in the eBPF object.
/// Attached (TC ingress) on the host side of pod veths: traffic leaving local pods.
pub const PROG_FROM_POD: &str = "orca_from_pod";
/// Attached (TC ingress) on node uplinks: traffic arriving at the node.
pub const PROG_FROM_NETDEV: &str = "orca_from_netdev";

/// Map capacities. The frontend, backend-slot and member maps are allocated as entries are written
/// (`BPF_F_NO_PREALLOC`), so their capacity costs no kernel memory until used: 1M backend slots hold 300k
/// endpoints (30k Services x 10) with room for the second slot range each update writes before the switch.
pub const FRONTENDS_MAX: u32 = 1 << 18;
pub const BACKENDS_MAX: u32 = 1 << 20;
pub const CT_MAX: u32 = 262_144;
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
pub struct FrontendKey {
    /// Destination address, packet order.
    pub addr: u32,
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
pub struct SrcRangeKey {
    pub service_id: u32,
    /// Source address, packet order (so prefixes match from the most significant bit).
    pub addr: u32,
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
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    for b in saddr.to_ne_bytes() {
        mix(b);
    }
    for b in daddr.to_ne_bytes() {
        mix(b);
    }
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
pub struct SockKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub dir: u8,
    pub _pad: u8,
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
pub struct Backend {
    /// Backend address, packet order.
    pub addr: u32,
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

/// Map `ORCA_MEMBERS` (hash): `MemberKey` -> slot index (informational). Present exactly while the
/// backend belongs to the service's current set. The programs use it to decide whether a
/// conntrack or affinity entry still points at a live backend: UDP flows and new TCP connections
/// (SYN) move off removed backends, established TCP flows keep theirs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub service_id: u32,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

impl MemberKey {
    pub const fn of(service_id: u32, backend: &Backend) -> Self {
        Self {
            service_id,
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
        }
    }
}

/// Conntrack entry direction: the flow as sent by the client (to a frontend).
pub const CT_DIR_SERVICE: u8 = 0;
/// Conntrack entry direction: replies from the backend to the client.
pub const CT_DIR_REPLY: u8 = 1;

/// Map `ORCA_CT4` (LRU hash): `CtKey` -> `CtValue`. Two entries per translated flow:
/// - `CT_DIR_SERVICE`, keyed by client -> frontend as the client sends it; value: the backend.
/// - `CT_DIR_REPLY`, keyed by backend -> client as the backend replies; value: the frontend,
///   which becomes the reply's source again (reverse NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtValue {
    /// Service direction: backend address; reply direction: frontend address (packet order).
    pub addr: u32,
    /// Service direction: backend port; reply direction: frontend port (network byte order).
    pub port: u16,
    /// Masqueraded flows (`nat_addr` != 0). Service direction: the source port the client's
    /// packets get; reply direction: the client's port, the replies' new destination port.
    pub nat_port: u16,
    pub service_id: u32,
    /// Masqueraded flows. Service direction: the source address the client's packets get (the
    /// node's); reply direction: the client's address, the replies' new destination. 0: no SNAT.
    pub nat_addr: u32,
    /// `CT_F_*` bits.
    pub flags: u32,
    /// `ct_tick(now)` when a packet of this direction last refreshed the other direction's entry:
    /// that costs a second lookup, so it happens at most once per tick (about a second) and on
    /// FIN/RST, not on every packet.
    pub peer_refreshed: u32,
    /// bpf_ktime_get_ns() of the last packet that used the entry.
    pub last_seen_ns: u64,
}

/// Conntrack flag: a FIN was seen (the connection is closing).
pub const CT_F_FIN: u32 = 1;
/// Conntrack flag: a RST was seen.
pub const CT_F_RST: u32 = 2;

/// Idle lifetimes of conntrack entries, after which a packet with the same 5-tuple is a new flow
/// (and a reply-direction entry no longer rewrites anything). kube-proxy's conntrack settings:
/// established TCP 24 h (`--conntrack-tcp-timeout-established`), closing TCP like TIME_WAIT /
/// CLOSE_WAIT, UDP like a conntrack "stream".
pub const CT_TCP_ESTABLISHED_NS: u64 = 86_400 * 1_000_000_000;
pub const CT_TCP_FIN_NS: u64 = 120 * 1_000_000_000;
pub const CT_TCP_RST_NS: u64 = 10 * 1_000_000_000;
pub const CT_UDP_NS: u64 = 120 * 1_000_000_000;

/// Coarse time for `CtValue::peer_refreshed`: bpf_ktime_get_ns() in units of 2^30 ns (about 1.07 s).
#[inline(always)]
pub const fn ct_tick(now_ns: u64) -> u32 {
    (now_ns >> 30) as u32
}

impl CtValue {
    /// How long the entry lives without traffic.
    #[inline(always)]
    pub fn lifetime_ns(&self, proto: u8) -> u64 {
        if proto != IPPROTO_TCP {
            CT_UDP_NS
        } else if self.flags & CT_F_RST != 0 {
            CT_TCP_RST_NS
        } else if self.flags & CT_F_FIN != 0 {
            CT_TCP_FIN_NS
        } else {
            CT_TCP_ESTABLISHED_NS
        }
    }
}

/// Map `ORCA_AFFINITY` (LRU hash): `AffinityKey` -> `AffinityValue` (ClientIP session affinity).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityValue {
    pub backend: Backend,
    /// bpf_ktime_get_ns() of the client's last new connection to the service.
    pub last_used_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], made only of integers, with explicit padding fields, so
    // every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRangeKey {}
    unsafe impl aya::Pod for SockKey {}
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
    assert!(size_of::<CtValue>() == 32);
    assert!(size_of::<AffinityKey>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<SrcRangeKey>() == 8);
    assert!(size_of::<SockKey>() == 16);
};
