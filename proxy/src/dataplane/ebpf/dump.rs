//! Reading the pinned maps back without loading anything (`orca-proxy status`, `status --verify`, the metrics):
//! frontends with their backends, the ClusterIP frontends compared with the desired state, and the datapath's
//! counters.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as AyaHashMap, MapData};
use orca_common::{Backend, BackendSlotKey, CtTimeouts, Frontend, FrontendKey, In6, MAP_STATS};

use super::services::Family;

use super::{conntrack, loader};
use crate::model::state::Snapshot;
use crate::verify::{Frontend as FrontendTuple, FrontendMap};

/// The datapath's own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathCounts {
    /// Packets per `REASON_*` (summed over CPUs), in `orca_common::REASONS` order.
    pub reasons: Vec<u64>,
    pub conntrack: conntrack::CtCounts,
    /// Veths that match no pod interface prefix and are no uplink (no program on them).
    pub unmatched_interfaces: u64,
}

/// Reads the eBPF datapath's counters (the metrics' source while the eBPF dataplane runs).
pub type DatapathSource = Box<dyn Fn() -> DatapathCounts + Send + Sync>;

/// The pinned per-reason counters.
pub type StatsMap = aya::maps::PerCpuArray<MapData, u64>;

/// Opens the `ORCA_STATS` map pinned in `maps_dir`.
pub fn open_stats(maps_dir: &std::path::Path) -> Result<StatsMap> {
    let p = maps_dir.join(MAP_STATS);
    let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
    Ok(StatsMap::try_from(aya::maps::Map::from_map_data(data)?)?)
}

/// Where the pinned maps of the running (or last) agent under `root` live.
pub fn pinned_maps_dir(root: &std::path::Path) -> PathBuf {
    loader::versioned_dir(root).join("maps")
}

/// The datapath's counters and conntrack occupancy read from the pinned maps under `root` (for `orca-proxy
/// status`); the conntrack census only reads, so expired entries the collector has not deleted yet are counted
/// as such.
pub fn datapath_report(root: &std::path::Path, timeouts: &CtTimeouts) -> Result<DatapathCounts> {
    let maps_dir = pinned_maps_dir(root);
    let stats = open_stats(&maps_dir)?;
    let open = |name: &str| -> Result<MapData> {
        let p = maps_dir.join(name);
        MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))
    };
    let ct4 = conntrack::census(&open(orca_common::MAP_CT)?, timeouts)?;
    let ct6 = conntrack::census_in::<In6>(&open(orca_common::MAP_CT6)?, timeouts)?;
    Ok(DatapathCounts {
        reasons: read_stats(&stats),
        conntrack: ct4.plus(&ct6),
        unmatched_interfaces: loader::veths_without_program(root).len() as u64,
    })
}

/// Sums the per-CPU `ORCA_STATS` counters.
pub fn read_stats(map: &StatsMap) -> Vec<u64> {
    (0..orca_common::REASON_COUNT)
        .map(|i| map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// One frontend as the pinned maps hold it (for `orca-proxy status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    pub address: std::net::SocketAddr,
    pub protocol: &'static str,
    pub service_id: u32,
    pub affinity_timeout_seconds: u32,
    pub masquerade_external: bool,
    pub backends: Vec<std::net::SocketAddr>,
    /// Slots the frontend counts that are missing from ORCA_BACKENDS (should always be 0).
    pub missing_slots: u32,
}

fn sock<A: Family>(addr: A, port_be: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.to_ip(), u16::from_be(port_be))
}

/// Reads the maps pinned under `root` (by a running or previous agent), without loading anything: both families'
/// frontends.
pub fn dump(root: &std::path::Path) -> Result<Vec<FrontendView>> {
    let maps_dir = loader::versioned_dir(root).join("maps");
    let mut out = Vec::new();
    dump_family::<u32>(&maps_dir, &mut out)?;
    dump_family::<In6>(&maps_dir, &mut out)?;
    out.sort_by_key(|v| (v.address, v.protocol));
    Ok(out)
}

fn dump_family<A: Family>(maps_dir: &std::path::Path, out: &mut Vec<FrontendView>) -> Result<()> {
    let open = |name: &str| -> Result<aya::maps::Map> {
        let p = maps_dir.join(name);
        let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
        Ok(aya::maps::Map::from_map_data(data)?)
    };
    let fes: AyaHashMap<MapData, FrontendKey<A>, Frontend> = AyaHashMap::try_from(open(A::MAPS.frontends)?)?;
    let slots: AyaHashMap<MapData, BackendSlotKey, Backend<A>> = AyaHashMap::try_from(open(A::MAPS.backends)?)?;
    for entry in fes.iter() {
        let (k, f) = entry?;
        let mut backends = Vec::new();
        let mut missing_slots = 0;
        for i in 0..u32::from(f.backend_count) {
            let key = BackendSlotKey {
                service_id: f.service_id,
                slot: f.slot_base.wrapping_add(i),
            };
            match slots.get(&key, 0) {
                Ok(b) => backends.push(sock(b.addr, b.port)),
                Err(_) => missing_slots += 1,
            }
        }
        out.push(FrontendView {
            address: sock(k.addr, k.port),
            protocol: match k.proto {
                orca_common::IPPROTO_TCP => "TCP",
                orca_common::IPPROTO_UDP => "UDP",
                _ => "?",
            },
            service_id: f.service_id,
            affinity_timeout_seconds: f.affinity_timeout,
            masquerade_external: f.flags & orca_common::FRONTEND_F_SNAT_EXTERNAL != 0,
            backends,
            missing_slots,
        });
    }
    Ok(())
}

/// The ClusterIP frontends in the pinned eBPF maps: every frontend except those that are a desired load-balancer,
/// external-IP or NodePort frontend (those are checked by their own scenarios), so a stale ClusterIP entry left for
/// a deleted Service shows up as drift.
pub fn cluster_frontends(views: &[FrontendView], desired: &Snapshot, node_addresses: &[IpAddr]) -> FrontendMap {
    let mut external: BTreeSet<FrontendTuple> = BTreeSet::new();
    for st in desired.values() {
        let p = &st.port;
        let proto = p.protocol.as_str().to_string();
        for ip in p.load_balancer_ips.iter().chain(&p.external_ips) {
            external.insert((*ip, p.port, proto.clone()));
        }
        if let Some(np) = p.node_port {
            for ip in node_addresses {
                external.insert((*ip, np, proto.clone()));
            }
        }
    }
    let mut out = FrontendMap::new();
    for v in views {
        let fe = (v.address.ip(), v.address.port(), v.protocol.to_uppercase());
        if !external.contains(&fe) {
            out.entry(fe).or_default().extend(v.backends.iter().copied());
        }
    }
    out
}
