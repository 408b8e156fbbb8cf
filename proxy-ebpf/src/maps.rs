//! Map definitions. Names, sizes and key/value types come from orca-common, so the agent and the
//! programs agree on them.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use orca_common::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, Frontend, FrontendKey, In6, MemberKey,
    SockKey, SrcRangeKey, AFFINITY_MAX, BACKENDS_MAX, CONFIG_LEN, CT_MAX, FRONTENDS_MAX, REASON_COUNT, SOCK_MAX,
    SRC_RANGES_MAX,
};

use orca_common::{MaglevKey, MAGLEV_MAX, PROG6_SLOTS};
use proxy_ebpf::hdr::REJECT6_FRAME_LEN;

#[map(name = "ORCA_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_BACKENDS")]
pub static BACKENDS: HashMap<BackendSlotKey, Backend> = HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_MEMBERS")]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

/// Conntrack: a plain hash map, so that no entry is ever evicted to make room (an LRU map would evict idle
/// established flows); expired entries are taken over by new flows here and deleted by the agent's collector.
/// The agent sets the capacity at load time.
#[map(name = "ORCA_CT4")]
pub static CT: HashMap<CtKey, CtValue> = HashMap::with_max_entries(CT_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::with_max_entries(AFFINITY_MAX, 0);

/// Settings of the programs (`CONFIG_*` indices), written by the agent.
#[map(name = "ORCA_CONFIG")]
pub static CONFIG: Array<u32> = Array::with_max_entries(CONFIG_LEN, 0);

/// loadBalancerSourceRanges of frontends flagged `FRONTEND_F_SOURCE_RANGES`.
#[map(name = "ORCA_SRC_RANGES")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u32> = LpmTrie::with_max_entries(SRC_RANGES_MAX, 0);

/// Socket-level translation state of the cgroup hooks.
#[map(name = "ORCA_SOCK")]
pub static SOCK: LruHashMap<SockKey, Backend> = LruHashMap::with_max_entries(SOCK_MAX, 0);

/// Maglev lookup tables of frontends flagged `FRONTEND_F_MAGLEV`.
#[map(name = "ORCA_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, u32> = HashMap::with_max_entries(MAGLEV_MAX, BPF_F_NO_PREALLOC);

/// Packets per `REASON_*` (drops and untranslated passes), read by the agent for its metrics.
#[map(name = "ORCA_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

// The IPv6 twins: the same roles with 16-byte addresses (`fam::Fam` picks a family's maps).

#[map(name = "ORCA_FRONTENDS6")]
pub static FRONTENDS6: HashMap<FrontendKey<In6>, Frontend> =
    HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_BACKENDS6")]
pub static BACKENDS6: HashMap<BackendSlotKey, Backend<In6>> =
    HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_MEMBERS6")]
pub static MEMBERS6: HashMap<MemberKey<In6>, u32> = HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_CT6")]
pub static CT6: HashMap<CtKey<In6>, CtValue<In6>> = HashMap::with_max_entries(CT_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_AFFINITY6")]
pub static AFFINITY6: LruHashMap<AffinityKey<In6>, AffinityValue<In6>> = LruHashMap::with_max_entries(AFFINITY_MAX, 0);

#[map(name = "ORCA_SRC_RANGE6")]
pub static SRC_RANGES6: LpmTrie<SrcRangeKey<In6>, u32> = LpmTrie::with_max_entries(SRC_RANGES_MAX, 0);

#[map(name = "ORCA_SOCK6")]
pub static SOCK6: LruHashMap<SockKey<In6>, Backend<In6>> = LruHashMap::with_max_entries(SOCK_MAX, 0);

#[map(name = "ORCA_MAGLEV6")]
pub static MAGLEV6: HashMap<MaglevKey, u32> = HashMap::with_max_entries(MAGLEV_MAX, BPF_F_NO_PREALLOC);

/// Per-CPU scratch space for the IPv6 path's large temporaries (a 512-byte stack holds little of 16-byte
/// addresses): the packet's flow, the conntrack value being created, the ICMPv6 reject frame.
#[repr(C)]
pub struct Scratch6 {
    pub flow: crate::parse::Flow<In6>,
    /// The frontend of a new flow, between `ingress6` and `new_flow6`.
    pub fe: Frontend,
    pub ct: CtValue<In6>,
    pub frame: [u8; REJECT6_FRAME_LEN],
}

#[map(name = "ORCA_SCRATCH6")]
pub static SCRATCH6: PerCpuArray<Scratch6> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 programs (`PROG6_*` slots), tail-called by the entry points for IPv6 frames. Filled by the agent and
/// pinned, so that they keep running when the agent is gone (a program array is emptied when its last user
/// reference, fd or pin, is closed).
#[map(name = "ORCA_PROGS6")]
pub static PROGS6: ProgramArray = ProgramArray::with_max_entries(PROG6_SLOTS, 0);

const BPF_F_NO_PREALLOC: u32 = 1;
