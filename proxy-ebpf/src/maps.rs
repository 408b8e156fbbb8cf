//! Map definitions. Names, sizes and key/value types come from orca-common, so the agent and the
//! programs agree on them.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray},
};
use orca_common::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, Frontend, FrontendKey, MemberKey, SockKey,
    SrcRangeKey, AFFINITY_MAX, BACKENDS_MAX, CONFIG_LEN, CT_MAX, FRONTENDS_MAX, REASON_COUNT, SOCK_MAX, SRC_RANGES_MAX,
};

use orca_common::{MaglevKey, MAGLEV_MAX};

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

const BPF_F_NO_PREALLOC: u32 = 1;
