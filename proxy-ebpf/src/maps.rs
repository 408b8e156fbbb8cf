//! Map definitions. Names, sizes and key/value types come from orca-common, so the agent and the
//! programs agree on them.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap},
};
use orca_common::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, CtKey, CtValue, Frontend, FrontendKey, MemberKey, SockKey,
    SrcRangeKey, AFFINITY_MAX, BACKENDS_MAX, CONFIG_LEN, CT_MAX, FRONTENDS_MAX, SOCK_MAX, SRC_RANGES_MAX,
};

use orca_common::{MaglevKey, MAGLEV_MAX};

#[map(name = "ORCA_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(FRONTENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_BACKENDS")]
pub static BACKENDS: HashMap<BackendSlotKey, Backend> = HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_MEMBERS")]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(BACKENDS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "ORCA_CT4")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(CT_MAX, 0);

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

const BPF_F_NO_PREALLOC: u32 = 1;
