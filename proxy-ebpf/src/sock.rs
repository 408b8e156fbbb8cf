//! Socket-level load balancing for clients in the node's own network namespace (host processes,
//! hostNetwork pods), whose packets never cross a pod veth or an uplink's ingress. The cgroup
//! hooks rewrite the destination of connect() and of unconnected sendmsg() from a frontend to a
//! backend before any packet exists, and rewrite the address back for recvmsg() (UDP replies) and
//! getpeername(), so applications only ever see the frontend.
//!
//! The hooks act only on sockets of the network namespace named in `ORCA_CONFIG` (the agent's), so
//! one cgroup can carry the hooks of several agents and other namespaces are never touched.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext as _,
};
use orca_common::{
    Backend, Frontend, FrontendKey, SockKey, CONFIG_NETNS_COOKIE_HI, CONFIG_NETNS_COOKIE_LO, CONFIG_SNAT_IPV4,
    FRONTEND_F_SOURCE_RANGES, SCOPE_ANY, SOCK_DIR_REVERSE, SOCK_DIR_SERVICE,
};

use crate::{affinity, lb, maps};

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
const PROCEED: i32 = 1;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn config(i: u32) -> u32 {
    maps::CONFIG.get(i).copied().unwrap_or(0)
}

#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let want = u64::from(config(CONFIG_NETNS_COOKIE_LO)) | (u64::from(config(CONFIG_NETNS_COOKIE_HI)) << 32);
    // SAFETY: the context pointer is the program's own.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

/// (address, port, protocol) the syscall is about: packet order / network byte order.
#[inline(always)]
fn target(ctx: &SockAddrContext) -> (u32, u16, u8) {
    // SAFETY: reading fields of the program's context.
    unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16, sa.protocol as u8)
    }
}

#[inline(always)]
fn set_target(ctx: &SockAddrContext, addr: u32, port: u16) {
    // SAFETY: these context fields are writable in connect4/sendmsg4/recvmsg4/getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr;
        (*ctx.sock_addr).user_port = u32::from(port);
    }
}

#[inline(always)]
fn sock_key(cookie: u64, addr: u32, port: u16, dir: u8) -> SockKey {
    SockKey {
        cookie,
        addr,
        port,
        dir,
        _pad: 0,
    }
}

#[inline(always)]
fn frontend(addr: u32, port: u16, proto: u8) -> Option<Frontend> {
    let key = FrontendKey {
        addr,
        port,
        proto,
        scope: SCOPE_ANY,
    };
    // SAFETY: copied out at once.
    unsafe { maps::FRONTENDS.get(key) }.copied()
}

/// connect4 (`keep` false) and sendmsg4 (true: a UDP socket keeps its backend while it is a
/// member, as a conntrack entry would).
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, keep: bool) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (addr, port, proto) = target(ctx);
    let Some(fe) = frontend(addr, port, proto) else {
        return PROCEED;
    };
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The client address is the node's (what the socket will bind to for this destination).
    let client = config(CONFIG_SNAT_IPV4);
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe.service_id, client) {
        return refuse();
    }
    let skey = sock_key(cookie, addr, port, SOCK_DIR_SERVICE);
    let kept = if keep {
        // SAFETY: copied out at once.
        unsafe { maps::SOCK.get(skey) }
            .copied()
            .filter(|b| lb::is_member(fe.service_id, b))
    } else {
        None
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let backend = match kept.or_else(|| affinity::lookup(&fe, client, now)) {
        Some(b) => b,
        // Sockets have no source port yet: hash what is known (client, frontend, cookie).
        None => match lb::choose_backend(&fe, orca_common::flow_hash(client, addr, cookie as u16, port, proto)) {
            Some(b) => b,
            None => return refuse(),
        },
    };
    affinity::record(&fe, client, &backend, now);
    let _ = maps::SOCK.insert(skey, backend, 0);
    let front = Backend { addr, port, _pad: 0 };
    let _ = maps::SOCK.insert(sock_key(cookie, backend.addr, backend.port, SOCK_DIR_REVERSE), front, 0);
    set_target(ctx, backend.addr, backend.port);
    PROCEED
}

/// No endpoints: the syscall fails with ECONNREFUSED, as a reject would make it.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    0
}

/// recvmsg4 / getpeername4: a backend address seen by a translated socket becomes the frontend.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (addr, port, _) = target(ctx);
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    if let Some(front) = unsafe { maps::SOCK.get(sock_key(cookie, addr, port, SOCK_DIR_REVERSE)) }.copied() {
        set_target(ctx, front.addr, front.port);
    }
    PROCEED
}
