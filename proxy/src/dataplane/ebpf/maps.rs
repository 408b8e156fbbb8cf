//! The kernel maps as [`MapOps`]: what [`Programmer`](super::services::Programmer) writes goes through here.

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as AyaHashMap, MapData};
use aya::Ebpf;
use orca_common::{Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, SrcRangeKey};

use super::services::{Family, MapOps, SrcRange};

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

/// One family's maps (`A::MAPS`: `ORCA_FRONTENDS` or `ORCA_FRONTENDS6`, ...).
impl<A: Family> MapOps<A> for AyaMaps<'_> {
    fn put_frontend(&mut self, k: FrontendKey<A>, v: Frontend) -> Result<()> {
        self.map(A::MAPS.frontends)?
            .insert(k, v, 0)
            .with_context(|| format!("updating {}", A::MAPS.frontends))
    }
    fn del_frontend(&mut self, k: &FrontendKey<A>) -> Result<()> {
        ignore_missing(self.map::<FrontendKey<A>, Frontend>(A::MAPS.frontends)?.remove(k))
    }
    fn put_slot(&mut self, k: BackendSlotKey, v: Backend<A>) -> Result<()> {
        self.map(A::MAPS.backends)?
            .insert(k, v, 0)
            .with_context(|| format!("updating {}", A::MAPS.backends))
    }
    fn del_slot(&mut self, k: &BackendSlotKey) -> Result<()> {
        ignore_missing(self.map::<BackendSlotKey, Backend<A>>(A::MAPS.backends)?.remove(k))
    }
    fn get_slot(&self, k: &BackendSlotKey) -> Option<Backend<A>> {
        self.map_ref::<BackendSlotKey, Backend<A>>(A::MAPS.backends)?
            .get(k, 0)
            .ok()
    }
    fn put_member(&mut self, k: MemberKey<A>, slot: u32) -> Result<()> {
        self.map(A::MAPS.members)?
            .insert(k, slot, 0)
            .with_context(|| format!("updating {}", A::MAPS.members))
    }
    fn del_member(&mut self, k: &MemberKey<A>) -> Result<()> {
        ignore_missing(self.map::<MemberKey<A>, u32>(A::MAPS.members)?.remove(k))
    }
    fn frontends(&self) -> Vec<(FrontendKey<A>, Frontend)> {
        self.map_ref::<FrontendKey<A>, Frontend>(A::MAPS.frontends)
            .map(|m| m.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn slots(&self) -> Vec<BackendSlotKey> {
        self.map_ref::<BackendSlotKey, Backend<A>>(A::MAPS.backends)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn members(&self) -> Vec<MemberKey<A>> {
        self.map_ref::<MemberKey<A>, u32>(A::MAPS.members)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn put_maglev(&mut self, k: BackendSlotKey, offset: u32) -> Result<()> {
        self.map(A::MAPS.maglev)?
            .insert(k, offset, 0)
            .with_context(|| format!("updating {}", A::MAPS.maglev))
    }
    fn del_maglev(&mut self, k: &BackendSlotKey) -> Result<()> {
        ignore_missing(self.map::<BackendSlotKey, u32>(A::MAPS.maglev)?.remove(k))
    }
    fn maglev_keys(&self) -> Vec<BackendSlotKey> {
        self.map_ref::<BackendSlotKey, u32>(A::MAPS.maglev)
            .map(|m| m.keys().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }
    fn put_range(&mut self, r: SrcRange<A>) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(A::MAPS.src_ranges)
            .with_context(|| format!("map {} missing", A::MAPS.src_ranges))?;
        let mut t: LpmTrie<&mut MapData, SrcRangeKey<A>, u32> = LpmTrie::try_from(map)?;
        t.insert(&range_key(&r), 1, 0)
            .with_context(|| format!("updating {}", A::MAPS.src_ranges))
    }
    fn del_range(&mut self, r: &SrcRange<A>) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(A::MAPS.src_ranges)
            .with_context(|| format!("map {} missing", A::MAPS.src_ranges))?;
        let mut t: LpmTrie<&mut MapData, SrcRangeKey<A>, u32> = LpmTrie::try_from(map)?;
        ignore_missing(t.remove(&range_key(r)))
    }
    fn ranges(&self) -> Vec<SrcRange<A>> {
        let Some(map) = self.ebpf.map(A::MAPS.src_ranges) else {
            return Vec::new();
        };
        let Ok(t) = LpmTrie::<&MapData, SrcRangeKey<A>, u32>::try_from(map) else {
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

fn range_key<A: Family>(r: &SrcRange<A>) -> Key<SrcRangeKey<A>> {
    Key::new(
        32 + u32::from(r.prefix),
        SrcRangeKey {
            service_id: r.service_id,
            addr: r.addr,
        },
    )
}
