//! The eBPF dataplane (`--proxy-mode ebpf`): loads the TC programs embedded in the agent, pins
//! their maps under a configurable bpffs root (adopted by a restarted agent), attaches them on pod
//! veths (host side) and node uplinks, and keeps the maps in line with the desired state.
//!
//! Layout under the root (default `/sys/fs/bpf/orca`): `v<ABI>/maps/<MAP>`,
//! `v<ABI>/progs/<program>` and `v<ABI>/links/<ifname>-{ingress,egress}`.

pub mod conntrack;
pub mod loader;
pub mod maglev;
pub mod services;
pub mod testrun;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as AyaHashMap, MapData};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use orca_common::{
    Backend, BackendSlotKey, CtTimeouts, Frontend, FrontendKey, MemberKey, NatPorts, SrcRangeKey, MAP_AFFINITY,
    MAP_BACKENDS, MAP_CONFIG, MAP_FRONTENDS, MAP_MAGLEV, MAP_MEMBERS, MAP_SOCK, MAP_SRC_RANGES, MAP_STATS,
};

use crate::dataplane::{Dataplane, DataplaneConfig, ProxyMode, SyncStats};
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::tracker::Diff;
use crate::model::{NodeInfo, ServicePortName};

use loader::{Attacher, Role};
use services::{MapOps, Programmer, SrcRange};

/// Where and on which interfaces the programs go.
#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// bpffs directory for pins; mounted when it is not on a bpffs.
    pub bpf_root: PathBuf,
    /// Interfaces whose name starts with one of these are pod veths (host side).
    pub pod_interface_prefixes: Vec<String>,
    /// Explicit pod interfaces (in addition to the prefixes).
    pub pod_interfaces: Vec<String>,
    /// Node uplinks; empty means the interfaces holding one of the node's addresses, else the
    /// ones carrying the IPv4 default route.
    pub uplinks: Vec<String>,
    /// cgroup (v2) whose processes get socket-level translation when they run in the agent's
    /// network namespace (host processes, hostNetwork pods): the agent passes the root of the host's cgroup v2
    /// hierarchy ([`loader::choose_cgroup`]). `None` (the default) disables the hooks.
    pub cgroup: Option<PathBuf>,
    /// Why host-network clients will not all be translated, found while choosing `cgroup`.
    pub cgroup_warning: Option<crate::dataplane::Degraded>,
    /// Choose backends by Maglev consistent hashing instead of at random.
    pub maglev: bool,
    /// Translated packets are forwarded by the programs (FIB lookup and redirect) instead of going through the
    /// node's routing and netfilter (`--ebpf-bypass-netfilter`).
    pub bypass_netfilter: bool,
    pub conntrack: ConntrackOptions,
    /// TCX or clsact (`--ebpf-tc-attach`).
    pub tc_attach: loader::TcAttach,
}

/// The eBPF conntrack's capacity, lifetimes and masquerade ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackOptions {
    /// Flows the conntrack map holds (`--ebpf-conntrack-max`); the map has two entries per flow (a masqueraded
    /// flow takes three).
    pub max_flows: u32,
    pub timeouts: CtTimeouts,
    /// Masquerade source ports (inclusive), before the node's ephemeral range is cut out.
    pub snat_ports: (u16, u16),
}

impl Default for ConntrackOptions {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_CONNTRACK_MAX,
            timeouts: CtTimeouts::DEFAULT,
            snat_ports: (orca_common::NAT_PORT_MIN, orca_common::NAT_PORT_MAX),
        }
    }
}

/// Default `--ebpf-conntrack-max`: a million flows.
pub const DEFAULT_CONNTRACK_MAX: u32 = 1 << 20;

impl ConntrackOptions {
    /// Entries of the conntrack map.
    pub fn entries(&self) -> u32 {
        self.max_flows.saturating_mul(2).max(1024)
    }

    /// The masquerade ports without the ephemeral range of the calling thread's network namespace
    /// (`net.ipv4.ip_local_port_range`), so the node's own connections never pick a port a masqueraded flow
    /// holds.
    pub fn nat_ports(&self) -> Result<NatPorts> {
        let eph = ephemeral_ports();
        let (lo, hi) = self.snat_ports;
        NatPorts::new(lo, hi, eph).with_context(|| {
            format!(
                "no masquerade source port left: the range {lo}-{hi} lies inside the node's ephemeral ports {eph:?} \
                 (net.ipv4.ip_local_port_range)"
            )
        })
    }
}

/// `net.ipv4.ip_local_port_range` of the calling thread's network namespace.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/thread-self/net/../sys/net/ipv4/ip_local_port_range")
        .or_else(|_| std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range"))
        .ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Some((a, b)),
        _ => None,
    }
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            bpf_root: PathBuf::from("/sys/fs/bpf/orca"),
            // Calico, plain veth CNIs (bridge/ptp: veth*), Cilium-style lxc*, the sandbox's pods.
            pod_interface_prefixes: ["cali", "veth", "lxc", "orca-p"].map(String::from).to_vec(),
            pod_interfaces: vec![],
            uplinks: vec![],
            cgroup: None,
            cgroup_warning: None,
            maglev: false,
            bypass_netfilter: false,
            conntrack: ConntrackOptions::default(),
            tc_attach: loader::TcAttach::Auto,
        }
    }
}

pub struct EbpfDataplane {
    cfg: DataplaneConfig,
    ebpf: Ebpf,
    programmer: Programmer,
    links: Arc<Mutex<Links>>,
    watcher: Option<Watcher>,
    mounted_bpffs: Option<PathBuf>,
    /// What this dataplane runs without (found at start).
    degraded: Vec<crate::dataplane::Degraded>,
    /// Last value written to `ORCA_CONFIG[CONFIG_SNAT_IPV4]`.
    snat_ipv4: Option<u32>,
    /// Service ports whose last upsert failed (e.g. a full map): retried on every sync.
    failed: BTreeSet<ServicePortName>,
    collector: conntrack::Collector,
    /// The per-reason packet counters (`ORCA_STATS`).
    stats: StatsMap,
}

/// Attachment state shared with the interface watcher thread.
struct Links {
    opts: EbpfOptions,
    /// Veths that are neither pod interfaces (by name) nor uplinks, as of the last scan.
    unmatched: BTreeSet<String>,
    /// Their number, read by the metrics.
    unmatched_count: Arc<std::sync::atomic::AtomicU64>,
    attacher: Attacher,
    /// Handles of the pinned programs, per role.
    progs: BTreeMap<Role, SchedClassifier>,
    /// The node's addresses: interfaces holding one are uplinks (unless configured explicitly).
    node_addresses: Vec<std::net::IpAddr>,
}

impl Links {
    /// Attaches to pod veths and uplinks that appeared since the last call; forgets vanished ones.
    fn scan(&mut self) {
        let present = loader::interfaces();
        self.attacher.forget_missing(&present);
        let uplinks = if !self.opts.uplinks.is_empty() {
            self.opts.uplinks.clone()
        } else {
            let mut u = loader::interfaces_with_addresses(&self.node_addresses);
            if u.is_empty() {
                u = loader::default_route_interfaces();
            }
            u
        };
        let mut unmatched = BTreeSet::new();
        for (name, ifindex) in &present {
            let is_pod = self.opts.pod_interfaces.contains(name)
                || self
                    .opts
                    .pod_interface_prefixes
                    .iter()
                    .any(|p| !p.is_empty() && name.starts_with(p.as_str()));
            let role = if is_pod {
                Role::Pod
            } else if uplinks.contains(name) {
                Role::Netdev
            } else {
                // A veth that is neither a pod's (by name) nor an uplink: most likely a pod of a CNI whose prefix is
                // not configured. Said once per interface, counted in the metrics and shown by `status`.
                if self.unmatched.contains(name) || loader::driver(name).as_deref() == Some("veth") {
                    if !self.unmatched.contains(name) {
                        tracing::warn!(
                            interface = %name,
                            prefixes = ?self.opts.pod_interface_prefixes,
                            "a veth matching no --ebpf-pod-interface-prefixes: traffic from behind it gets no Service \
                             translation (add its prefix, or name it in --ebpf-pod-interfaces)"
                        );
                    }
                    unmatched.insert(name.clone());
                }
                continue;
            };
            let mut roles = vec![role];
            if !self.opts.bypass_netfilter {
                roles.push(Role::Egress);
            }
            for role in roles {
                let Some(prog) = self.progs.get_mut(&role) else {
                    continue;
                };
                // One interface failing (it vanished meanwhile, ...) must not stop the others.
                if let Err(e) = self.attacher.attach(prog, name, *ifindex, role) {
                    tracing::warn!(interface = %name, error = %format!("{e:#}"), "cannot attach");
                }
            }
        }
        self.unmatched_count
            .store(unmatched.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.unmatched = unmatched;
    }
}

/// Follows pod veths as pods come and go: rescans the interfaces every `WATCH_INTERVAL`, so a new
/// pod's traffic is translated within that time, without waiting for a Service change.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const WATCH_INTERVAL: Duration = Duration::from_millis(200);

impl Watcher {
    fn start(links: Arc<Mutex<Links>>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The thread inherits the network namespace of the calling thread.
        let thread = std::thread::Builder::new()
            .name("orca-ebpf-ifwatch".into())
            .spawn(move || {
                // Link notifications wake the scan at once (a new pod's veth is attached before the pod sends its
                // first packet); the periodic scan stays as the fallback when they cannot be had.
                let events = loader::LinkEvents::open()
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "no link notifications: new pod interfaces are found by the periodic scan only")
                    })
                    .ok();
                while !flag.load(Ordering::Relaxed) {
                    match &events {
                        Some(ev) => ev.wait(WATCH_INTERVAL),
                        None => std::thread::sleep(WATCH_INTERVAL),
                    }
                    if let Ok(mut l) = links.lock() {
                        l.scan();
                    }
                }
            })
            .context("starting the interface watcher")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        let programmer = Programmer::adopt(&AyaMaps { ebpf: &mut ebpf }).with_maglev(opts.maglev);
        let maps_dir = dir.join("maps");
        let collector = conntrack::Collector::start(
            &maps_dir,
            settings.ct_entries,
            settings.timeouts,
            &[
                MAP_FRONTENDS,
                MAP_BACKENDS,
                MAP_MEMBERS,
                MAP_MAGLEV,
                MAP_AFFINITY,
                MAP_SOCK,
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
            programmer,
            links,
            watcher,
            mounted_bpffs,
            degraded,
            snat_ipv4: None,
            failed: BTreeSet::new(),
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
        let snat = node
            .addresses
            .iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(orca_common::addr_from_octets(v4.octets())),
                std::net::IpAddr::V6(_) => None,
            })
            .unwrap_or(0);
        if self.snat_ipv4 != Some(snat) {
            let map = self.ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
            let mut cfg: Array<&mut MapData, u32> = Array::try_from(map)?;
            cfg.set(orca_common::CONFIG_SNAT_IPV4, snat, 0)
                .context("writing ORCA_CONFIG")?;
            self.snat_ipv4 = Some(snat);
        }
        let mut links = lock(&self.links)?;
        if links.node_addresses != node.addresses {
            links.node_addresses = node.addresses.clone();
            links.scan();
        }
        Ok(())
    }
}

/// Applies again the ports that were refused an address:port another port owned, now that it let it go (two
/// Services claiming one external or load-balancer IP: the survivor serves it as soon as the other is gone).
/// Bounded: a hand-over can free nothing new, so two rounds suffice; the rest waits for the next sync.
fn hand_over(
    programmer: &mut Programmer,
    failed: &mut BTreeSet<ServicePortName>,
    maps: &mut dyn MapOps,
    desired: &Snapshot,
    node: &NodeInfo,
    cfg: &DataplaneConfig,
) -> usize {
    let mut written = 0;
    for _ in 0..2 {
        let released = programmer.take_released();
        if released.is_empty() {
            break;
        }
        for name in released {
            if let Some(st) = desired.get(&name) {
                tracing::info!(service = %name, "an address:port this service port claims was freed: applying it");
                written += upsert_contained(programmer, failed, maps, st, node, cfg);
            }
        }
    }
    written
}

/// The datapath's own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathCounts {
    /// Packets per `REASON_*` (summed over CPUs), in `orca_common::REASONS` order.
    pub reasons: Vec<u64>,
    pub conntrack: conntrack::CtCounts,
    /// Veths that match no pod interface prefix and are no uplink (no program on them).
    pub unmatched_interfaces: u64,
}

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
    let p = maps_dir.join(orca_common::MAP_CT);
    let ct = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
    Ok(DatapathCounts {
        reasons: read_stats(&stats),
        conntrack: conntrack::census(&ct, timeouts)?,
        unmatched_interfaces: loader::veths_without_program(root).len() as u64,
    })
}

/// Sums the per-CPU `ORCA_STATS` counters.
pub fn read_stats(map: &StatsMap) -> Vec<u64> {
    (0..orca_common::REASON_COUNT)
        .map(|i| map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// Writes `--masquerade-all` and `--cluster-cidr` (IPv4) into the maps, replacing what a previous
/// agent wrote.
fn configure(ebpf: &mut Ebpf, cfg: &DataplaneConfig) -> Result<()> {
    let mut maps = AyaMaps { ebpf };
    for r in maps.ranges() {
        if r.service_id == orca_common::CLUSTER_CIDR_ID {
            maps.del_range(&r)?;
        }
    }
    let mut flags = 0;
    if cfg.masquerade_all {
        flags |= orca_common::CONFIG_F_MASQUERADE_ALL;
    }
    for c in &cfg.cluster_cidrs {
        if let std::net::IpAddr::V4(a) = c.addr {
            maps.put_range(SrcRange {
                service_id: orca_common::CLUSTER_CIDR_ID,
                addr: orca_common::addr_from_octets(a.octets()),
                prefix: c.prefix,
            })?;
            flags |= orca_common::CONFIG_F_CLUSTER_CIDR;
        }
    }
    let map = maps.ebpf.map_mut(MAP_CONFIG).context("map ORCA_CONFIG missing")?;
    let mut config: Array<&mut MapData, u32> = Array::try_from(map)?;
    config
        .set(orca_common::CONFIG_FLAGS, flags, 0)
        .context("writing ORCA_CONFIG")?;
    Ok(())
}

fn lock(links: &Mutex<Links>) -> Result<std::sync::MutexGuard<'_, Links>> {
    links
        .lock()
        .map_err(|_| anyhow::anyhow!("the interface watcher panicked"))
}

/// Programs one service port; a failure (e.g. a full map) is logged once when it starts, recorded in `failed` and
/// contained to that port, so that every other Service is still programmed. Returns the entries written.
fn upsert_contained(
    programmer: &mut Programmer,
    failed: &mut BTreeSet<ServicePortName>,
    maps: &mut dyn MapOps,
    st: &ServicePortState,
    node: &NodeInfo,
    cfg: &DataplaneConfig,
) -> usize {
    match programmer.upsert(maps, st, node, cfg) {
        Ok(w) => {
            if failed.remove(st.name()) {
                tracing::info!(service = %st.name(), "service port programmed after earlier failures");
            }
            w.entries
        }
        Err(e) => {
            if failed.insert(st.name().clone()) {
                tracing::error!(
                    service = %st.name(),
                    error = format!("{e:#}"),
                    "cannot program this service port (is a BPF map full?); it keeps its previous state and is \
                     retried on every sync; other Services are not affected"
                );
            }
            0
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Ebpf
    }

    fn full_sync(&mut self, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.set_node(node)?;
        let mut maps = AyaMaps { ebpf: &mut self.ebpf };
        let mut written = 0;
        for name in self.programmer.names() {
            if !desired.contains_key(&name) {
                written += self.programmer.remove(&mut maps, &name)?.entries;
            }
        }
        self.failed.retain(|n| desired.contains_key(n));
        for st in desired.values() {
            written += upsert_contained(&mut self.programmer, &mut self.failed, &mut maps, st, node, &self.cfg);
        }
        written += hand_over(
            &mut self.programmer,
            &mut self.failed,
            &mut maps,
            desired,
            node,
            &self.cfg,
        );
        written += self.programmer.sweep(&mut maps)?.entries;
        // A full sync follows a (re)list: the parsed objects and per-Service temporaries are freed by now; give
        // their pages back (about 13 MiB of VmRSS at 30k Services x 10 endpoints, `orca-bench agent-mem`).
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(SyncStats {
            objects_written: written,
            service_ports: self.programmer.service_ports(),
            failed_service_ports: self.failed.len(),
            ..Default::default()
        })
    }

    fn apply(&mut self, diff: &Diff, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.set_node(node)?;
        let mut maps = AyaMaps { ebpf: &mut self.ebpf };
        let mut written = 0;
        for name in &diff.removed {
            written += self.programmer.remove(&mut maps, name)?.entries;
            self.failed.remove(name);
        }
        for st in &diff.upserted {
            written += upsert_contained(&mut self.programmer, &mut self.failed, &mut maps, st, node, &self.cfg);
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
                Some(st) => {
                    written += upsert_contained(&mut self.programmer, &mut self.failed, &mut maps, st, node, &self.cfg)
                }
                None => {
                    self.failed.remove(&name);
                }
            }
        }
        written += hand_over(
            &mut self.programmer,
            &mut self.failed,
            &mut maps,
            desired,
            node,
            &self.cfg,
        );
        Ok(SyncStats {
            objects_written: written,
            service_ports: self.programmer.service_ports(),
            failed_service_ports: self.failed.len(),
            ..Default::default()
        })
    }

    fn degraded(&self) -> Vec<crate::dataplane::Degraded> {
        self.degraded.clone()
    }

    fn datapath_source(&self) -> Option<crate::metrics::DatapathSource> {
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

/// The kernel maps as [`MapOps`].
struct AyaMaps<'a> {
    ebpf: &'a mut Ebpf,
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

#[cfg(test)]
mod tests;

/// One frontend as the pinned maps hold it (for `orca-proxy status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FrontendView {
    pub address: std::net::SocketAddrV4,
    pub protocol: &'static str,
    pub service_id: u32,
    pub affinity_timeout_seconds: u32,
    pub masquerade_external: bool,
    pub backends: Vec<std::net::SocketAddrV4>,
    /// Slots the frontend counts that are missing from ORCA_BACKENDS (should always be 0).
    pub missing_slots: u32,
}

fn sock(addr: u32, port_be: u16) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(orca_common::addr_octets(addr).into(), u16::from_be(port_be))
}

/// Reads the maps pinned under `root` (by a running or previous agent), without loading anything.
pub fn dump(root: &std::path::Path) -> Result<Vec<FrontendView>> {
    let maps_dir = loader::versioned_dir(root).join("maps");
    let open = |name: &str| -> Result<aya::maps::Map> {
        let p = maps_dir.join(name);
        let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
        Ok(aya::maps::Map::from_map_data(data)?)
    };
    let fes: AyaHashMap<MapData, FrontendKey, Frontend> = AyaHashMap::try_from(open(MAP_FRONTENDS)?)?;
    let slots: AyaHashMap<MapData, BackendSlotKey, Backend> = AyaHashMap::try_from(open(MAP_BACKENDS)?)?;
    let mut out = Vec::new();
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
    out.sort_by_key(|v| (v.address, v.protocol));
    Ok(out)
}
