//! Socket-level load balancing for clients in the node's own network namespace (host processes,
//! hostNetwork pods), whose packets never cross a pod veth or an uplink's ingress. The cgroup
//! hooks rewrite the destination of connect() and of unconnected sendmsg() from a frontend to a
//! backend before any packet exists, and rewrite the address back for recvmsg() (UDP replies) and
//! getpeername(), so applications only ever see the frontend.
//!
//! IPv6 sockets run the `*6` hooks: IPv6 frontends, and IPv4 frontends reached as IPv4-mapped addresses
//! (`::ffff:a.b.c.d`, what a dual-stack socket uses for IPv4; the kernel runs only the IPv6 hook for them).
//!
//! The hooks act only on sockets of the network namespace named in `ORCA_CONFIG` (the agent's), so
//! one cgroup can carry the hooks of several agents and other namespaces are never touched.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    programs::SockAddrContext,
    EbpfContext as _,
};
use orca_common::{
    Backend, Frontend, FrontendKey, In6, SockKey, CONFIG_NETNS_COOKIE_HI, CONFIG_NETNS_COOKIE_LO,
    FRONTEND_F_SOURCE_RANGES, SCOPE_ANY, SOCK_DIR_REVERSE, SOCK_DIR_SERVICE,
};

use crate::{affinity, fam::Fam, lb, maps};

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

/// (port, protocol) the syscall is about: network byte order.
#[inline(always)]
fn port_proto(ctx: &SockAddrContext) -> (u16, u8) {
    // SAFETY: reading fields of the program's context.
    unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_port as u16, sa.protocol as u8)
    }
}

#[inline(always)]
fn ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: reading a field of the program's context (IPv4 hooks).
    unsafe { (*ctx.sock_addr).user_ip4 }
}

#[inline(always)]
fn ip6(ctx: &SockAddrContext) -> In6 {
    // SAFETY: reading fields of the program's context (IPv6 hooks), one word at a time as the verifier wants.
    unsafe {
        let sa = &*ctx.sock_addr;
        In6([sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]])
    }
}

#[inline(always)]
fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: writable in connect/sendmsg/recvmsg/getpeername hooks.
    unsafe { (*ctx.sock_addr).user_port = u32::from(port) };
}

#[inline(always)]
fn set_ip4(ctx: &SockAddrContext, addr: u32) {
    // SAFETY: writable in the IPv4 hooks.
    unsafe { (*ctx.sock_addr).user_ip4 = addr };
}

#[inline(always)]
fn set_ip6(ctx: &SockAddrContext, addr: In6) {
    // SAFETY: writable in the IPv6 hooks, word by word.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = addr.0[0];
        sa.user_ip6[1] = addr.0[1];
        sa.user_ip6[2] = addr.0[2];
        sa.user_ip6[3] = addr.0[3];
    }
}

/// `::ffff:0:0/96`, the third word in packet order.
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The IPv4 address of an IPv4-mapped IPv6 address.
#[inline(always)]
fn mapped_v4(a: &In6) -> Option<u32> {
    (a.0[0] == 0 && a.0[1] == 0 && a.0[2] == MAPPED_PREFIX).then_some(a.0[3])
}

#[inline(always)]
fn mapped(a: u32) -> In6 {
    In6([0, 0, MAPPED_PREFIX, a])
}

#[inline(always)]
fn frontend<A: Fam>(addr: A, port: u16, proto: u8) -> Option<Frontend> {
    let key = FrontendKey {
        addr,
        port,
        proto,
        scope: SCOPE_ANY,
    };
    // SAFETY: copied out at once.
    unsafe { A::frontends().get(key) }.copied()
}

/// What a connect/sendmsg to `addr`:`port` becomes.
enum Verdict<A> {
    /// Not a frontend.
    Pass,
    /// To this backend.
    To(Backend<A>),
    /// No endpoints (or a source range refuses the node).
    Refuse,
}

/// The backend for a connect (`keep` false) or sendmsg (true: a UDP socket keeps its backend while it is a member,
/// as a conntrack entry would), with the socket's state recorded for recvmsg/getpeername.
#[inline(always)]
fn choose<A: Fam>(ctx: &SockAddrContext, addr: A, port: u16, proto: u8, keep: bool) -> Verdict<A> {
    let Some(fe) = frontend(addr, port, proto) else {
        return Verdict::Pass;
    };
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The client address is the node's (what the socket will bind to for this destination).
    let client = A::snat();
    if fe.flags & FRONTEND_F_SOURCE_RANGES != 0 && !lb::source_allowed(fe.service_id, client) {
        return Verdict::Refuse;
    }
    let skey = SockKey::new(cookie, addr, port, SOCK_DIR_SERVICE);
    let kept = if keep {
        // SAFETY: copied out at once.
        unsafe { A::sock().get(skey) }
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
        None => match lb::choose_backend::<A>(&fe, orca_common::flow_hash(client, addr, cookie as u16, port, proto)) {
            Some(b) => b,
            None => return Verdict::Refuse,
        },
    };
    affinity::record(&fe, client, &backend, now);
    let _ = A::sock().insert(skey, backend, 0);
    let front = Backend { addr, port, _pad: 0 };
    let _ = A::sock().insert(
        SockKey::new(cookie, backend.addr, backend.port, SOCK_DIR_REVERSE),
        front,
        0,
    );
    Verdict::To(backend)
}

/// connect4 / sendmsg4.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, keep: bool) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (port, proto) = port_proto(ctx);
    match choose::<u32>(ctx, ip4(ctx), port, proto, keep) {
        Verdict::Pass => PROCEED,
        Verdict::To(b) => {
            set_ip4(ctx, b.addr);
            set_port(ctx, b.port);
            PROCEED
        }
        Verdict::Refuse => refuse(),
    }
}

/// connect6 / sendmsg6: IPv6 frontends, and IPv4 ones as mapped addresses.
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext, keep: bool) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (port, proto) = port_proto(ctx);
    let addr = ip6(ctx);
    if let Some(v4) = mapped_v4(&addr) {
        return match choose::<u32>(ctx, v4, port, proto, keep) {
            Verdict::Pass => PROCEED,
            Verdict::To(b) => {
                set_ip6(ctx, mapped(b.addr));
                set_port(ctx, b.port);
                PROCEED
            }
            Verdict::Refuse => refuse(),
        };
    }
    match choose::<In6>(ctx, addr, port, proto, keep) {
        Verdict::Pass => PROCEED,
        Verdict::To(b) => {
            set_ip6(ctx, b.addr);
            set_port(ctx, b.port);
            PROCEED
        }
        Verdict::Refuse => refuse(),
    }
}

/// No endpoints: the syscall fails with ECONNREFUSED, as a reject would make it.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: plain helper call.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    0
}

/// The frontend a translated socket sent to, for the backend `addr`:`port` it sees.
#[inline(always)]
fn front_of<A: Fam>(ctx: &SockAddrContext, addr: A, port: u16) -> Option<Backend<A>> {
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { A::sock().get(SockKey::new(cookie, addr, port, SOCK_DIR_REVERSE)) }.copied()
}

/// recvmsg4 / getpeername4: a backend address seen by a translated socket becomes the frontend.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (port, _) = port_proto(ctx);
    if let Some(front) = front_of::<u32>(ctx, ip4(ctx), port) {
        set_ip4(ctx, front.addr);
        set_port(ctx, front.port);
    }
    PROCEED
}

/// recvmsg6 / getpeername6.
#[inline(always)]
pub fn restore6(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let (port, _) = port_proto(ctx);
    let addr = ip6(ctx);
    if let Some(v4) = mapped_v4(&addr) {
        if let Some(front) = front_of::<u32>(ctx, v4, port) {
            set_ip6(ctx, mapped(front.addr));
            set_port(ctx, front.port);
        }
    } else if let Some(front) = front_of::<In6>(ctx, addr, port) {
        set_ip6(ctx, front.addr);
        set_port(ctx, front.port);
    }
    PROCEED
}
