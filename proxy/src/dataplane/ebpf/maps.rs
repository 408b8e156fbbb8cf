//! The kernel maps as [`MapOps`]: what [`Programmer`](super::services::Programmer) writes goes through here.

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as AyaHashMap, MapData};
use aya::Ebpf;
use orca_common::{
    Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, SrcRangeKey, MAP_BACKENDS, MAP_FRONTENDS, MAP_MAGLEV,
    MAP_MEMBERS, MAP_SRC_RANGES,
};

use super::services::{MapOps, SrcRange};

/// The kernel maps as [`MapOps`].
pub(super) struct AyaMaps<'a> {
    pub(super) ebpf: &'a mut Ebpf,
}

impl AyaMaps<'_> {
    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> Result<AyaHashMap<&mut MapData, K, V>> {
        let m = self.ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
        AyaHashMap::try_from(m).with_context(|| format!("map {name}"))
    }

    fn map_ref<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Option<AyaHashMap<&MapData, K, V>> {
        AyaHashMap::try_from(self.ebpf.map(name)?).ok()
    }
}

/// Deleting an absent key is not an error here (the goal state is reached).
fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl MapOps for AyaMaps<'_> {
    fn put_frontend(&mut self, k: FrontendKey, v: Frontend) -> Result<()> {
        self.map(MAP_FRONTENDS)?
            .insert(k, v, 0)
            .context("updating ORCA_FRONTENDS")
    }
    fn del_frontend(&mut self, k: &FrontendKey) -> Result<()> {
        ignore_missing(self.map::<FrontendKey, Frontend>(MAP_FRONTENDS)?.remove(k))
    }
    fn put_slot(&mut self, k: BackendSlotKey, v: Backend) -> Result<()> {
        self.map(MAP_BACKENDS)?
            .insert(k, v, 0)
            .context("updating ORCA_BACKENDS")
    }
    fn del_slot(&mut self, k: &BackendSlotKey) -> Result<()> {
        ignore_missing(self.map::<BackendSlotKey, Backend>(MAP_BACKENDS)?.remove(k))
    }
    fn get_slot(&self, k: &BackendSlotKey) -> Option<Backend> {
        self.map_ref::<BackendSlotKey, Backend>(MAP_BACKENDS)?.get(k, 0).ok()
    }
    fn put_member(&mut self, k: MemberKey, slot: u32) -> Result<()> {
        self.map(MAP_MEMBERS)?
            .insert(k, slot, 0)
            .context("updating ORCA_MEMBERS")
    }
    fn del_member(&mut self, k: &MemberKey) -> Result<()> {
        ignore_missing(self.map::<MemberKey, u32>(MAP_MEMBERS)?.remove(k))
    }
    fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
        self.map_ref::<FrontendKey, Frontend>(MAP_FRONTENDS)
            .map(|m| m.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn slots(&self) -> Vec<BackendSlotKey> {
        self.map_ref::<BackendSlotKey, Backend>(MAP_BACKENDS)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn members(&self) -> Vec<MemberKey> {
        self.map_ref::<MemberKey, u32>(MAP_MEMBERS)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn put_maglev(&mut self, k: BackendSlotKey, offset: u32) -> Result<()> {
        self.map(MAP_MAGLEV)?
            .insert(k, offset, 0)
            .context("updating ORCA_MAGLEV")
    }
    fn del_maglev(&mut self, k: &BackendSlotKey) -> Result<()> {
        ignore_missing(self.map::<BackendSlotKey, u32>(MAP_MAGLEV)?.remove(k))
    }
    fn maglev_keys(&self) -> Vec<BackendSlotKey> {
        self.map_ref::<BackendSlotKey, u32>(MAP_MAGLEV)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn put_range(&mut self, r: SrcRange) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(MAP_SRC_RANGES)
            .context("map ORCA_SRC_RANGES missing")?;
        let mut t: LpmTrie<&mut MapData, SrcRangeKey, u32> = LpmTrie::try_from(map)?;
        t.insert(&range_key(&r), 1, 0).context("updating ORCA_SRC_RANGES")
    }
    fn del_range(&mut self, r: &SrcRange) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(MAP_SRC_RANGES)
            .context("map ORCA_SRC_RANGES missing")?;
        let mut t: LpmTrie<&mut MapData, SrcRangeKey, u32> = LpmTrie::try_from(map)?;
        ignore_missing(t.remove(&range_key(r)))
    }
    fn ranges(&self) -> Vec<SrcRange> {
        let Some(map) = self.ebpf.map(MAP_SRC_RANGES) else {
            return Vec::new();
        };
        let Ok(t) = LpmTrie::<&MapData, SrcRangeKey, u32>::try_from(map) else {
            return Vec::new();
        };
        t.keys()
            .filter_map(Result::ok)
            .map(|k| {
                let d = k.data();
                SrcRange {
                    service_id: d.service_id,
                    addr: d.addr,
                    prefix: k.prefix_len().saturating_sub(32) as u8,
                }
            })
            .collect()
    }
}

fn range_key(r: &SrcRange) -> Key<SrcRangeKey> {
    Key::new(
        32 + u32::from(r.prefix),
        SrcRangeKey {
            service_id: r.service_id,
            addr: r.addr,
        },
    )
}
