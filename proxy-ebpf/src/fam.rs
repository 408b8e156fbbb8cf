//! The address family a packet is handled in: the rest of the datapath is generic over the address type (`u32`
//! for IPv4, `In6` for IPv6), and this trait gives it that family's maps, its node address, and the few steps
//! whose headers differ (rewriting, rejecting, forwarding, ICMP errors). Each family compiles to its own code, so
//! IPv4 packets run exactly what they ran before IPv6 existed.

use aya_ebpf::{
    maps::{lpm_trie::LpmTrie, HashMap, LruHashMap},
    programs::TcContext,
};
use orca_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, Frontend, FrontendKey, In6, MaglevKey,
    MemberKey, SockKey, SrcRangeKey, CONFIG_F_CLUSTER_CIDR, CONFIG_F_CLUSTER_CIDR6, CONFIG_SNAT_IPV4, CONFIG_SNAT_IPV6,
};

use crate::{
    fwd, icmp, icmp6, maps, nat,
    parse::{Flow, Tuple},
    reject,
};

pub trait Fam: Addr {
    /// `CONFIG_F_*` bit saying the family's cluster CIDRs are configured.
    const CLUSTER_CIDR_FLAG: u32;
    fn frontends() -> &'static HashMap<FrontendKey<Self>, Frontend>;
    fn backends() -> &'static HashMap<BackendSlotKey, Backend<Self>>;
    fn members() -> &'static HashMap<MemberKey<Self>, u32>;
    fn ct() -> &'static HashMap<CtKey<Self>, CtValue<Self>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>>;
    fn src_ranges() -> &'static LpmTrie<SrcRangeKey<Self>, u32>;
    fn sock() -> &'static LruHashMap<SockKey<Self>, Backend<Self>>;
    fn maglev() -> &'static HashMap<MaglevKey, u32>;
    /// The node address masqueraded flows get; zero when the agent has not configured one.
    fn snat() -> Self;
    /// Rewrites the packet of `flow` to `t`, with its checksums, and updates `flow`.
    fn rewrite(ctx: &TcContext, flow: &mut Flow<Self>, t: Tuple<Self>) -> Result<(), i64>;
    /// Answers a packet to a frontend without endpoints (port unreachable), or drops it.
    fn reject(ctx: &TcContext, flow: &Flow<Self>) -> i32;
    /// With netfilter bypassed: sends the translated packet to its egress device.
    fn forward(ctx: &TcContext, flow: &Flow<Self>) -> i32;
    /// ICMP errors about tracked flows, translated like the flow; TC_ACT_OK for everything else.
    fn icmp(ctx: &TcContext, egress: bool) -> i32;
    /// Where a new conntrack value is built: `local` (IPv4), or a per-CPU scratch slot (IPv6, whose value would
    /// take a fifth of the stack).
    fn ct_scratch(local: &mut CtValue<Self>) -> Option<&mut CtValue<Self>>;
    /// Whether a new flow to `fe` continues in a subprogram of its own (IPv6: its stack would not fit in one),
    /// the frontend stashed next to the flow; IPv4 goes straight on.
    fn stash_new_flow(fe: &Frontend) -> bool;
}

#[inline(always)]
fn config(i: u32) -> u32 {
    maps::CONFIG.get(i).copied().unwrap_or(0)
}

impl Fam for u32 {
    const CLUSTER_CIDR_FLAG: u32 = CONFIG_F_CLUSTER_CIDR;
    #[inline(always)]
    fn frontends() -> &'static HashMap<FrontendKey<Self>, Frontend> {
        &maps::FRONTENDS
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendSlotKey, Backend<Self>> {
        &maps::BACKENDS
    }
    #[inline(always)]
    fn members() -> &'static HashMap<MemberKey<Self>, u32> {
        &maps::MEMBERS
    }
    #[inline(always)]
    fn ct() -> &'static HashMap<CtKey<Self>, CtValue<Self>> {
        &maps::CT
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>> {
        &maps::AFFINITY
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRangeKey<Self>, u32> {
        &maps::SRC_RANGES
    }
    #[inline(always)]
    fn sock() -> &'static LruHashMap<SockKey<Self>, Backend<Self>> {
        &maps::SOCK
    }
    #[inline(always)]
    fn maglev() -> &'static HashMap<MaglevKey, u32> {
        &maps::MAGLEV
    }
    #[inline(always)]
    fn snat() -> Self {
        config(CONFIG_SNAT_IPV4)
    }
    #[inline(always)]
    fn rewrite(ctx: &TcContext, flow: &mut Flow<Self>, t: Tuple<Self>) -> Result<(), i64> {
        nat::rewrite(ctx, flow, t.saddr, t.sport, t.daddr, t.dport)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>) -> i32 {
        reject::reject(ctx, flow)
    }
    #[inline(always)]
    fn forward(ctx: &TcContext, flow: &Flow<Self>) -> i32 {
        fwd::forward(ctx, flow)
    }
    #[inline(always)]
    fn icmp(ctx: &TcContext, egress: bool) -> i32 {
        icmp::handle(ctx, egress)
    }
    #[inline(always)]
    fn ct_scratch(local: &mut CtValue<Self>) -> Option<&mut CtValue<Self>> {
        Some(local)
    }
    #[inline(always)]
    fn stash_new_flow(_fe: &Frontend) -> bool {
        false
    }
}

impl Fam for In6 {
    const CLUSTER_CIDR_FLAG: u32 = CONFIG_F_CLUSTER_CIDR6;
    #[inline(always)]
    fn frontends() -> &'static HashMap<FrontendKey<Self>, Frontend> {
        &maps::FRONTENDS6
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<BackendSlotKey, Backend<Self>> {
        &maps::BACKENDS6
    }
    #[inline(always)]
    fn members() -> &'static HashMap<MemberKey<Self>, u32> {
        &maps::MEMBERS6
    }
    #[inline(always)]
    fn ct() -> &'static HashMap<CtKey<Self>, CtValue<Self>> {
        &maps::CT6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>> {
        &maps::AFFINITY6
    }
    #[inline(always)]
    fn src_ranges() -> &'static LpmTrie<SrcRangeKey<Self>, u32> {
        &maps::SRC_RANGES6
    }
    #[inline(always)]
    fn sock() -> &'static LruHashMap<SockKey<Self>, Backend<Self>> {
        &maps::SOCK6
    }
    #[inline(always)]
    fn maglev() -> &'static HashMap<MaglevKey, u32> {
        &maps::MAGLEV6
    }
    #[inline(always)]
    fn snat() -> Self {
        In6([
            config(CONFIG_SNAT_IPV6),
            config(CONFIG_SNAT_IPV6 + 1),
            config(CONFIG_SNAT_IPV6 + 2),
            config(CONFIG_SNAT_IPV6 + 3),
        ])
    }
    #[inline(always)]
    fn rewrite(ctx: &TcContext, flow: &mut Flow<Self>, t: Tuple<Self>) -> Result<(), i64> {
        nat::rewrite6(ctx, flow, t)
    }
    #[inline(always)]
    fn reject(ctx: &TcContext, flow: &Flow<Self>) -> i32 {
        reject::reject6(ctx, flow)
    }
    #[inline(always)]
    fn forward(ctx: &TcContext, flow: &Flow<Self>) -> i32 {
        fwd::forward6(ctx, flow)
    }
    #[inline(always)]
    fn icmp(ctx: &TcContext, egress: bool) -> i32 {
        icmp6::handle(ctx, egress)
    }
    #[inline(always)]
    fn ct_scratch(_local: &mut CtValue<Self>) -> Option<&mut CtValue<Self>> {
        let p = maps::SCRATCH6.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot, used by one program at a time (TC programs do not nest on a CPU).
        Some(unsafe { &mut (*p).ct })
    }
    #[inline(always)]
    fn stash_new_flow(fe: &Frontend) -> bool {
        if let Some(p) = maps::SCRATCH6.get_ptr_mut(0) {
            // SAFETY: this CPU's slot (the flow is already there).
            unsafe { (*p).fe = *fe };
        }
        true
    }
}
