//! The eBPF dataplane (`--proxy-mode ebpf`): loads the TC programs embedded in the agent, pins
//! their maps under a configurable bpffs root (adopted by a restarted agent), attaches them on pod
//! veths (host side) and node uplinks, and keeps the maps in line with the desired state.
//!
//! Layout under the root (default `/sys/fs/bpf/orca`): `v<ABI>/maps/<MAP>`,
//! `v<ABI>/progs/<program>` and `v<ABI>/links/<ifname>-{ingress,egress}`.

pub mod conntrack;
pub mod dump;
mod links;
pub mod loader;
pub mod maglev;
mod maps;
pub mod options;
pub mod services;

pub use dump::{
    datapath_report, dump, open_stats, pinned_maps_dir, read_stats, DatapathCounts, DatapathSource, FrontendView,
    StatsMap,
};
pub use options::{ephemeral_ports, ConntrackOptions, EbpfOptions, DEFAULT_CONNTRACK_MAX};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use aya::Ebpf;
use orca_common::{In6, MAPS4, MAPS6, MAP_CONFIG};

use crate::dataplane::{Dataplane, DataplaneConfig, ProxyMode, SyncStats};
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::tracker::Diff;
use crate::model::{IpFamily, NodeInfo, ServicePortName};

use links::{Links, Watcher};
use loader::Attacher;
use maps::AyaMaps;
use services::{Family, MapOps, Programmer, SrcRange};

pub struct EbpfDataplane {
    cfg: DataplaneConfig,
    ebpf: Ebpf,
    links: Arc<Mutex<Links>>,
    watcher: Option<Watcher>,
    mounted_bpffs: Option<PathBuf>,
    /// What this dataplane runs without (found at start).
    degraded: Vec<crate::dataplane::Degraded>,
    /// Last values written to `ORCA_CONFIG[CONFIG_SNAT_IPV4]` and `[CONFIG_SNAT_IPV6..]`.
    snat_ipv4: Option<u32>,
    snat_ipv6: Option<In6>,
    /// Each family's maps: IPv4 and IPv6 Services are programmed side by side, as kube-proxy's two proxiers.
    v4: FamilyState<u32>,
    v6: FamilyState<In6>,
    collector: conntrack::Collector,
    /// The per-reason packet counters (`ORCA_STATS`).
    stats: StatsMap,
}

impl EbpfDataplane {
    /// Mounts bpffs if needed, loads (verifies) the programs, adopts pinned maps and attaches to
    /// the interfaces present now, then follows interfaces as they come and go. Any failure here
    /// is the reason to fall back to iptables.
    pub fn new(cfg: DataplaneConfig, opts: EbpfOptions) -> Result<Self> {
        let mounted_bpffs = loader::ensure_bpffs(&opts.bpf_root)?;
        let mut degraded: Vec<crate::dataplane::Degraded> = opts.cgroup_warning.iter().cloned().collect();
        if let Some(m) = mounted_bpffs.as_deref().filter(|m| !loader::bpffs_outlives_agent(m)) {
            degraded.push(crate::dataplane::Degraded::new(
                crate::dataplane::Degraded::BPFFS_NOT_PERSISTENT,
                format!(
                    "the bpffs this agent mounted at {} is private to its mount namespace and dies with it: \
                     after a restart or crash every Service on this node stops until the next agent is up; mount \
                     the host's /sys/fs/bpf (hostPath, mountPropagation Bidirectional; see deploy/)",
                    m.display()
                ),
            ));
        }
        for d in &degraded {
            tracing::warn!(reason = d.reason, "{}", d.message);
        }
        remove_other_layouts(&opts.bpf_root)?;
        let dir = loader::versioned_dir(&opts.bpf_root);
        let settings = loader::LoadSettings {
            ct_entries: opts.conntrack.entries(),
            timeouts: opts.conntrack.timeouts,
            nat_ports: opts.conntrack.nat_ports()?,
            bypass_netfilter: opts.bypass_netfilter,
        };
        let mut ebpf = loader::load(&dir, &settings)?;
        loader::fill_progs6(&mut ebpf)?;
        let progs = loader::pin_programs(&mut ebpf, &dir)?;
        if opts.cgroup.is_some() && !loader::sock_hooks_supported() {
            let d = crate::dataplane::Degraded::new(
                crate::dataplane::Degraded::KERNEL_WITHOUT_SOCKET_HOOKS,
                format!(
                    "kernel {:?} is older than {}.{} (bpf_set_retval): no socket hooks, so host-network processes \
                     and hostNetwork pods on this node cannot reach ClusterIPs or this node's NodePorts",
                    loader::kernel_version().unwrap_or_default(),
                    loader::MIN_KERNEL_SOCKET_HOOKS.0,
                    loader::MIN_KERNEL_SOCKET_HOOKS.1
                ),
            );
            tracing::warn!(reason = d.reason, "{}", d.message);
            degraded.push(d);
        }
        if let Some(cg) = opts.cgroup.as_ref().filter(|_| loader::sock_hooks_supported()) {
            let cookie = loader::netns_cookie()?;
            let map = ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
            let mut config: Array<&mut MapData, u32> = Array::try_from(map)?;
            config.set(orca_common::CONFIG_NETNS_COOKIE_LO, cookie as u32, 0)?;
            config.set(orca_common::CONFIG_NETNS_COOKIE_HI, (cookie >> 32) as u32, 0)?;
            loader::attach_sock_programs(&mut ebpf, cg, &dir)?;
        }
        configure(&mut ebpf, &cfg)?;
        let v4 = FamilyState {
            programmer: Programmer::adopt(&AyaMaps { ebpf: &mut ebpf }).with_maglev(opts.maglev),
            failed: BTreeSet::new(),
        };
        let v6 = FamilyState {
            programmer: Programmer::adopt(&AyaMaps { ebpf: &mut ebpf }).with_maglev(opts.maglev),
            failed: BTreeSet::new(),
        };
        let maps_dir = dir.join("maps");
        let collector = conntrack::Collector::start(
            &maps_dir,
            settings.ct_entries,
            settings.timeouts,
            &[
                MAPS4.frontends,
                MAPS4.backends,
                MAPS4.members,
                MAPS4.maglev,
                MAPS4.affinity,
                MAPS4.sock,
                MAPS6.frontends,
                MAPS6.backends,
                MAPS6.members,
                MAPS6.maglev,
                MAPS6.affinity,
                MAPS6.sock,
            ],
        )?;
        let stats = open_stats(&maps_dir)?;
        tracing::info!(
            conntrack_flows = opts.conntrack.max_flows,
            conntrack_entries = settings.ct_entries,
            masquerade_ports = settings.nat_ports.span,
            bypass_netfilter = opts.bypass_netfilter,
            "eBPF datapath loaded"
        );
        let attacher = Attacher::new(&dir, opts.tc_attach)?;
        let links = Arc::new(Mutex::new(Links {
            opts,
            unmatched: BTreeSet::new(),
            unmatched_count: Arc::default(),
            attacher,
            progs,
            node_addresses: Vec::new(),
        }));
        lock(&links)?.scan();
        let watcher = Some(Watcher::start(links.clone())?);
        Ok(Self {
            cfg,
            ebpf,
            links,
            watcher,
            mounted_bpffs,
            degraded,
            snat_ipv4: None,
            snat_ipv6: None,
            v4,
            v6,
            collector,
            stats,
        })
    }

    /// What the datapath counted: packets per reason, and what the maps hold (as of the collector's last pass).
    pub fn datapath_counts(&self) -> DatapathCounts {
        DatapathCounts {
            reasons: read_stats(&self.stats),
            conntrack: self.collector.counts.lock().map(|c| c.clone()).unwrap_or_default(),
            unmatched_interfaces: lock(&self.links).map(|l| l.unmatched.len() as u64).unwrap_or_default(),
        }
    }

    /// Veths that are neither pod interfaces (by name) nor uplinks, as of the interface watcher's last scan.
    pub fn unmatched_interfaces(&self) -> Vec<String> {
        lock(&self.links)
            .map(|l| l.unmatched.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The bpffs mount point `new` created, if it mounted one.
    pub fn mounted_bpffs(&self) -> Option<&std::path::Path> {
        self.mounted_bpffs.as_deref()
    }

    /// Interfaces with an Orca program attached (at either hook).
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.links)
            .map(|l| l.attacher.attached().keys().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default();
        v.dedup();
        v
    }

    /// Every attachment: (interface, program).
    pub fn attachments(&self) -> Vec<(String, &'static str)> {
        lock(&self.links)
            .map(|l| {
                l.attacher
                    .attached()
                    .iter()
                    .map(|((n, _), r)| (n.clone(), r.program()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Node facts the programs need: the masquerade source address; and the interfaces to attach
    /// to (uplinks are found by the node's addresses).
    fn set_node(&mut self, node: &NodeInfo) -> Result<()> {
        let snat = node.addresses.iter().find_map(u32::of).unwrap_or(0);
        if self.snat_ipv4 != Some(snat) {
            let map = self.ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
            let mut cfg: Array<&mut MapData, u32> = Array::try_from(map)?;
            cfg.set(orca_common::CONFIG_SNAT_IPV4, snat, 0)
                .context("writing ORCA_CONFIG")?;
            self.snat_ipv4 = Some(snat);
        }
        // IPv6: the node's first global IPv6 address (link-local ones cannot be masqueraded to).
        let snat6 = node
            .addresses
            .iter()
            .filter(|a| matches!(a, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 != 0xfe80))
            .find_map(In6::of)
            .unwrap_or_default();
        if self.snat_ipv6 != Some(snat6) {
            let map = self.ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
            let mut cfg: Array<&mut MapData, u32> = Array::try_from(map)?;
            for (i, w) in snat6.0.iter().enumerate() {
                cfg.set(orca_common::CONFIG_SNAT_IPV6 + i as u32, *w, 0)
                    .context("writing ORCA_CONFIG")?;
            }
            self.snat_ipv6 = Some(snat6);
        }
        let mut links = lock(&self.links)?;
        if links.node_addresses != node.addresses {
            links.node_addresses = node.addresses.clone();
            links.scan();
        }
        Ok(())
    }
}

/// One family's programmer and the service ports whose last upsert failed there (e.g. a full map: retried on
/// every sync).
struct FamilyState<A: Family> {
    programmer: Programmer<A>,
    failed: BTreeSet<ServicePortName>,
}

impl<A: Family> FamilyState<A> {
    fn full_sync(
        &mut self,
        maps: &mut dyn MapOps<A>,
        desired: &Snapshot,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> Result<usize> {
        let mut written = 0;
        for name in self.programmer.names() {
            if !desired.contains_key(&name) {
                written += self.programmer.remove(maps, &name)?.entries;
            }
        }
        self.failed.retain(|n| desired.contains_key(n));
        for st in desired.values() {
            written += self.upsert_contained(maps, st, node, cfg);
        }
        written += self.hand_over(maps, desired, node, cfg);
        written += self.programmer.sweep(maps)?.entries;
        Ok(written)
    }

    fn apply(
        &mut self,
        maps: &mut dyn MapOps<A>,
        diff: &Diff,
        desired: &Snapshot,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> Result<usize> {
        let mut written = 0;
        for name in &diff.removed {
            written += self.programmer.remove(maps, name)?.entries;
            self.failed.remove(name);
        }
        for st in &diff.upserted {
            written += self.upsert_contained(maps, st, node, cfg);
        }
        // Ports that failed before (and did not change now) are retried: the map may have room again.
        let retry: Vec<ServicePortName> = self
            .failed
            .iter()
            .filter(|n| !diff.upserted.iter().any(|st| st.name() == *n))
            .cloned()
            .collect();
        for name in retry {
            match desired.get(&name) {
                Some(st) => written += self.upsert_contained(maps, st, node, cfg),
                None => {
                    self.failed.remove(&name);
                }
            }
        }
        written += self.hand_over(maps, desired, node, cfg);
        Ok(written)
    }

    /// Applies again the ports that were refused an address:port another port owned, now that it let it go (two
    /// Services claiming one external or load-balancer IP: the survivor serves it as soon as the other is gone).
    /// Bounded: a hand-over can free nothing new, so two rounds suffice; the rest waits for the next sync.
    fn hand_over(
        &mut self,
        maps: &mut dyn MapOps<A>,
        desired: &Snapshot,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> usize {
        let mut written = 0;
        for _ in 0..2 {
            let released = self.programmer.take_released();
            if released.is_empty() {
                break;
            }
            for name in released {
                if let Some(st) = desired.get(&name) {
                    tracing::info!(service = %name, "an address:port this service port claims was freed: applying it");
                    written += self.upsert_contained(maps, st, node, cfg);
                }
            }
        }
        written
    }

    fn upsert_contained(
        &mut self,
        maps: &mut dyn MapOps<A>,
        st: &ServicePortState,
        node: &NodeInfo,
        cfg: &DataplaneConfig,
    ) -> usize {
        upsert_contained(&mut self.programmer, &mut self.failed, maps, st, node, cfg)
    }
}

/// Programs one service port; a failure (e.g. a full map) is logged once when it starts, recorded in `failed` and
/// contained to that port, so that every other Service is still programmed. Returns the entries written.
fn upsert_contained<A: Family>(
    programmer: &mut Programmer<A>,
    failed: &mut BTreeSet<ServicePortName>,
    maps: &mut dyn MapOps<A>,
    st: &ServicePortState,
    node: &NodeInfo,
    cfg: &DataplaneConfig,
) -> usize {
    match programmer.upsert(maps, st, node, cfg) {
        Ok(w) => {
            if failed.remove(st.name()) {
                tracing::info!(service = %st.name(), family = ?A::FAMILY, "service port programmed after earlier failures");
            }
            w.entries
        }
        Err(e) => {
            if failed.insert(st.name().clone()) {
                tracing::error!(
                    service = %st.name(),
                    family = ?A::FAMILY,
                    error = format!("{e:#}"),
                    "cannot program this service port (is a BPF map full?); it keeps its previous state and is \
                     retried on every sync; other Services are not affected"
                );
            }
            0
        }
    }
}

/// Writes `--masquerade-all` and `--cluster-cidr` (both families) into the maps, replacing what a previous agent
/// wrote.
fn configure(ebpf: &mut Ebpf, cfg: &DataplaneConfig) -> Result<()> {
    let mut maps = AyaMaps { ebpf };
    let mut flags = 0;
    if cfg.masquerade_all {
        flags |= orca_common::CONFIG_F_MASQUERADE_ALL;
    }
    if configure_cluster_cidrs::<u32>(&mut maps, cfg)? {
        flags |= orca_common::CONFIG_F_CLUSTER_CIDR;
    }
    if configure_cluster_cidrs::<In6>(&mut maps, cfg)? {
        flags |= orca_common::CONFIG_F_CLUSTER_CIDR6;
    }
    let map = maps.ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
    let mut config: Array<&mut MapData, u32> = Array::try_from(map)?;
    config
        .set(orca_common::CONFIG_FLAGS, flags, 0)
        .context("writing ORCA_CONFIG")?;
    Ok(())
}

/// The family's cluster CIDRs as source ranges of `CLUSTER_CIDR_ID`; whether it has any.
fn configure_cluster_cidrs<A: Family>(maps: &mut AyaMaps<'_>, cfg: &DataplaneConfig) -> Result<bool> {
    for r in MapOps::<A>::ranges(maps) {
        if r.service_id == orca_common::CLUSTER_CIDR_ID {
            MapOps::<A>::del_range(maps, &r)?;
        }
    }
    let mut any = false;
    for c in &cfg.cluster_cidrs {
        if let Some(addr) = A::of(&c.addr) {
            MapOps::<A>::put_range(
                maps,
                SrcRange {
                    service_id: orca_common::CLUSTER_CIDR_ID,
                    addr,
                    prefix: c.prefix,
                },
            )?;
            any = true;
        }
    }
    Ok(any)
}

fn lock(links: &Mutex<Links>) -> Result<std::sync::MutexGuard<'_, Links>> {
    links
        .lock()
        .map_err(|_| anyhow::anyhow!("the interface watcher panicked"))
}

impl EbpfDataplane {
    fn stats(&self, written: usize) -> SyncStats {
        let v6_only = self
            .v6
            .programmer
            .names_iter()
            .filter(|n| !self.v4.programmer.has(n))
            .count();
        let failed = self.v4.failed.len() + self.v6.failed.iter().filter(|n| !self.v4.failed.contains(*n)).count();
        SyncStats {
            objects_written: written,
            service_ports: self.v4.programmer.service_ports() + v6_only,
            failed_service_ports: failed,
            ..Default::default()
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ebpf
    }

    fn families(&self) -> Vec<IpFamily> {
        IpFamily::BOTH.to_vec()
    }

    fn full_sync(&mut self, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.set_node(node)?;
        let mut maps = AyaMaps { ebpf: &mut self.ebpf };
        let mut written = self.v4.full_sync(&mut maps, desired, node, &self.cfg)?;
        written += self.v6.full_sync(&mut maps, desired, node, &self.cfg)?;
        // A full sync follows a (re)list: the parsed objects and per-Service temporaries are freed by now; give
        // their pages back (about 13 MiB of VmRSS at 30k Services x 10 endpoints, `orca-bench agent-mem`).
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(self.stats(written))
    }

    fn apply(&mut self, diff: &Diff, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.set_node(node)?;
        let mut maps = AyaMaps { ebpf: &mut self.ebpf };
        let mut written = self.v4.apply(&mut maps, diff, desired, node, &self.cfg)?;
        written += self.v6.apply(&mut maps, diff, desired, node, &self.cfg)?;
        Ok(self.stats(written))
    }

    fn degraded(&self) -> Vec<crate::dataplane::Degraded> {
        self.degraded.clone()
    }

    fn datapath_source(&self) -> Option<DatapathSource> {
        let maps_dir = loader::versioned_dir(&lock(&self.links).ok()?.opts.bpf_root).join("maps");
        let stats = match open_stats(&maps_dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "no datapath counters for the metrics");
                return None;
            }
        };
        let counts = self.collector.counts.clone();
        let unmatched = lock(&self.links).ok()?.unmatched_count.clone();
        Some(Box::new(move || DatapathCounts {
            reasons: read_stats(&stats),
            conntrack: counts.lock().map(|c| c.clone()).unwrap_or_default(),
            unmatched_interfaces: unmatched.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    fn cluster_frontends(&self, desired: &Snapshot, node: &NodeInfo) -> Result<crate::verify::FrontendMap> {
        let root = lock(&self.links)?.opts.bpf_root.clone();
        Ok(dump::cluster_frontends(&dump(&root)?, desired, &node.addresses))
    }

    fn cleanup(&mut self) -> Result<()> {
        // Stop following interfaces first, so nothing is attached again behind our back.
        self.watcher.take();
        let mut links = lock(&self.links)?;
        links.attacher.detach_all()?;
        links.progs.clear();
        remove_pins(&links.opts.bpf_root)
    }
}

/// Removes this release's pins under `root` (maps, links) and the directories, whatever process
/// created them. Links are detached by unpinning them (nothing else holds them).
pub fn remove_pins(root: &std::path::Path) -> Result<()> {
    remove_layout(&loader::versioned_dir(root))
}

/// Everything an eBPF agent may have left attached in the calling thread's network namespace and under `root`:
/// pinned TCX and cgroup links (detached by unpinning), clsact filters running Orca's programs (found by name, pinned
/// or not), maps and programs. What `orca-proxy cleanup`, a fallback to iptables and a start in iptables mode run.
pub fn remove_all(root: &std::path::Path) -> Result<()> {
    let filters = loader::detach_clsact_filters();
    if filters > 0 {
        tracing::info!(filters, "removed Orca's clsact filters");
    }
    remove_pins(root)
}

/// Detaches the links pinned in one layout directory (`<root>/v<N>`) and removes its pins. Works
/// on any version's layout: links are found by listing, maps and programs are unpinned by file.
fn remove_layout(dir: &std::path::Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let mut att = Attacher::new(dir, loader::TcAttach::Auto)?;
    att.detach_all()?;
    for sub in ["maps", "progs"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                let p = e.path();
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    for sub in ["maps", "links", "progs"] {
        let _ = std::fs::remove_dir(dir.join(sub));
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Layouts of other releases under `root` (`v<N>`, N != ABI_VERSION): their programs would keep
/// translating with stale maps next to ours, so they are detached and removed at start-up (the
/// new release recreates its state from the desired state at its first full sync).
fn remove_other_layouts(root: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let other = name
            .strip_prefix('v')
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n != orca_common::ABI_VERSION);
        if other {
            tracing::warn!(layout = %e.path().display(), "removing the pinned state of another Orca release");
            remove_layout(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
