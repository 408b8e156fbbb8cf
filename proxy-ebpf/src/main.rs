//! Orca's TC programs. The entry points are thin; each concern lives in its own module, as in
//! Cilium's bpf/lib:
//! - `fam`: what differs between IPv4 and IPv6 (each family's maps, node address, header steps); everything else
//!   is generic over the address type
//! - `parse`: Ethernet/IPv4/IPv6/TCP/UDP parsing (IPv6 extension headers skipped; fragments and other protocols
//!   pass untouched)
//! - `maps`: the map definitions (types in orca-common)
//! - `cfg`: load-time settings (conntrack lifetimes, masquerade ports, netfilter bypass)
//! - `lb`: frontend lookup, backend choice, backend membership
//! - `affinity`: ClientIP session affinity
//! - `ct`: connection tracking (an established flow keeps its backend; per-state lifetimes; masquerade ports) and
//!   what each entry translates a packet to
//! - `nat`: address and port rewriting with incremental L3/L4 checksums
//! - `fwd`: with netfilter bypassed, delivery of translated packets to their egress device (FIB lookup, redirect)
//! - `icmp`, `icmp6`: ICMP and ICMPv6 errors about tracked flows, translated like the flow (conntrack's "related")
//! - `reject`: ICMP / ICMPv6 port unreachable for frontends without endpoints
//! - `sock`: cgroup connect/sendmsg/recvmsg/getpeername hooks (4 and 6) for clients in the node's namespace
//! - `stats`: counters of drops and untranslated packets, per reason
//! - `datapath`: the per-packet flow that ties them together (ingress: DNAT; egress: SNAT and reverse DNAT)
//!
//! The crate is built for `bpfel-unknown-none` by proxy/build.rs. On the host it compiles to an
//! empty binary (so `cargo clippy`/`cargo check` cover this code without a BPF target).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod affinity;
mod cfg;
mod ct;
mod datapath;
mod fam;
mod fwd;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

/// TC ingress on the host side of pod veths (traffic leaving local pods, and replies of local
/// backends).
#[classifier]
pub fn orca_from_pod(ctx: TcContext) -> i32 {
    datapath::ingress(&ctx, datapath::Origin::Pod)
}

/// TC ingress on node uplinks (traffic arriving at the node, and replies of remote backends).
#[classifier]
pub fn orca_from_netdev(ctx: TcContext) -> i32 {
    datapath::ingress(&ctx, datapath::Origin::Netdev)
}

/// TC egress on node uplinks and pod veths: the second half of the translation of what the node's stack
/// forwarded between a client and a backend (masquerade source; the frontend back on replies).
#[classifier]
pub fn orca_egress(ctx: TcContext) -> i32 {
    datapath::egress(&ctx)
}

/// IPv6 at TC ingress of pod veths (tail-called by `orca_from_pod`).
#[classifier]
pub fn orca_from_pod6(ctx: TcContext) -> i32 {
    datapath::ingress_v6(&ctx, datapath::Origin::Pod)
}

/// IPv6 at TC ingress of uplinks (tail-called by `orca_from_netdev`).
#[classifier]
pub fn orca_from_netdev6(ctx: TcContext) -> i32 {
    datapath::ingress_v6(&ctx, datapath::Origin::Netdev)
}

/// IPv6 at TC egress (tail-called by `orca_egress`).
#[classifier]
pub fn orca_egress6(ctx: TcContext) -> i32 {
    if cfg::bypass_netfilter() {
        return aya_ebpf::bindings::TC_ACT_OK;
    }
    datapath::egress_v6(&ctx)
}

/// cgroup/connect4: TCP and connected UDP sockets of the node's namespace to a frontend.
#[cgroup_sock_addr(connect4)]
pub fn orca_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false)
}

/// cgroup/sendmsg4: unconnected UDP datagrams to a frontend.
#[cgroup_sock_addr(sendmsg4)]
pub fn orca_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true)
}

/// cgroup/recvmsg4: UDP replies of a backend appear to come from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn orca_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx)
}

/// cgroup/getpeername4: a connected socket's peer is the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn orca_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx)
}

/// cgroup/connect6: the same for IPv6 sockets (IPv6 frontends; IPv4 ones as mapped addresses).
#[cgroup_sock_addr(connect6)]
pub fn orca_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx, false)
}

/// cgroup/sendmsg6.
#[cgroup_sock_addr(sendmsg6)]
pub fn orca_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx, true)
}

/// cgroup/recvmsg6.
#[cgroup_sock_addr(recvmsg6)]
pub fn orca_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore6(&ctx)
}

/// cgroup/getpeername6.
#[cgroup_sock_addr(getpeername6)]
pub fn orca_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore6(&ctx)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
