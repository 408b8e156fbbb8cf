//! The iptables dataplane: kube-proxy's iptables mode, with Orca's own chains (`ORCA-*`, never `KUBE-*`).
//!
//! - [`rules`] turns the desired state into `iptables-restore` input for the `filter` and `nat` tables, rule for
//!   rule as kube-proxy's `pkg/proxy/iptables/proxier.go` does.
//! - Every sync is one `iptables-restore -w 5 --noflush --counters` transaction. A full sync (start-up,
//!   `--sync-period`, after a failed partial sync) rewrites every Orca chain and deletes the stale ones (found
//!   with `iptables-save -t nat`/`filter`); a partial sync ([`Dataplane::apply`]) rewrites the dispatch chains
//!   (`ORCA-SERVICES`, `ORCA-NODEPORTS`, every filter chain) and the own chains of the changed service ports only,
//!   and deletes the chains of removed ones (and the chains changed ports no longer use).
//! - The jump rules from the built-in chains are checked on every full sync (one `iptables -S` per built-in chain;
//!   `-C` and `-I` for a jump not found), as kube-proxy does: with iptables-legacy each of those calls reads the
//!   whole table (seconds at 30k Services), so partial syncs skip them. Like kube-proxy's `KUBE-PROXY-CANARY`, an
//!   empty `ORCA-PROXY-CANARY` chain in the small mangle table is checked before every partial sync instead: when
//!   it is gone, the tables were flushed, and the sync becomes a full one.
//! - The flavour (nft or legacy) is detected as kube-proxy's iptables wrapper does ([`exec::Exec::detect`]).
//! - After a sync, stale UDP conntrack entries are deleted ([`conntrack`]).
//! - One dataplane per IP family, as kube-proxy runs one proxier per family: [`IptablesDataplane::new`] drives
//!   `iptables*` with the IPv4 addresses, endpoints and CIDRs, [`IptablesDataplane::for_family`] with
//!   [`IpFamily::V6`] drives `ip6tables*` with the IPv6 ones (the same chains and rules; NodePorts never on `::1`,
//!   no `route_localnet`); [`super::dual::DualStack`] runs both.
//!
//! Deliberate differences from kube-proxy: no nfacct counters (so no separate localhost-NodePort nfacct rule), the
//! canary is checked at each partial sync rather than polled every minute, conntrack cleanup by endpoint/first-endpoint deltas (kube-proxy
//! before 1.31) rather than by scanning every UDP entry, and comment text restricted to `[A-Za-z0-9._:/-]`.
//!
//! Scale (`proxy/tests/iptables_netns.rs::scale_full_sync`, release build, in a network namespace, iptables 1.8.9,
//! 2 cores; 2 endpoints per service port, every 4th a NodePort, one cluster CIDR; details and reading in
//! `bench/results/iptables-scale.md`):
//!
//! | service ports | backend | ORCA rules | full sync | partial sync (1 port) |
//! |---|---|---|---|---|
//! | 1,000  | nft    | 8,758  | 0.72 s  | 0.13 s |
//! | 10,000 | legacy | 87,508 | 3.75 s (2.29 s once the jumps exist) | 1.08 s |
//! | 10,000 | nft    | 87,508 | 182.6 s (`iptables-nft-restore --noflush` itself) | 4.16 s |
//!
//! Generating the 120k-line input for 10k ports takes ~0.17 s (with the `iptables-save` for stale chains); the rest
//! is the restore tool.

pub mod conntrack;
pub mod exec;
pub mod hash;
pub mod readback;
pub mod rules;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use self::conntrack::UdpFilter;
use self::exec::{chains_with_prefix, Exec, Flavour};
use self::rules::{Generator, GeneratorOptions, Ruleset, FILTER_CHAINS, JUMPS, PREFIX};
use super::{Dataplane, DataplaneConfig, ProxyMode, SyncStats};
use crate::model::state::{ServicePortState, Snapshot};
use crate::model::tracker::Diff;
use crate::model::{IpFamily, NodeInfo, Protocol, ServicePortName};

/// The empty mangle chain whose absence tells a partial sync that the tables were flushed (kube-proxy's
/// `KUBE-PROXY-CANARY`).
pub const CANARY: &str = "ORCA-PROXY-CANARY";

/// Options of the iptables dataplane that are not kube-proxy flags.
#[derive(Debug, Clone, Default)]
pub struct IptablesOptions {
    /// Run every command in this network namespace (`/run/netns/NAME`, joined as [`crate::netns`] does); `None`:
    /// the agent's own.
    pub netns: Option<String>,
    /// Force a flavour instead of detecting it.
    pub flavour: Option<Flavour>,
}

/// What the last sync sent, for logs and tests.
#[derive(Debug, Clone, Default)]
pub struct LastSync {
    pub full: bool,
    /// The restore input.
    pub input: String,
    /// Its line count.
    pub lines: usize,
    /// Rules in the input.
    pub rules_written: usize,
    /// Rules Orca owns after the sync.
    pub rules_total: usize,
    pub chains_deleted: usize,
    pub conntrack_deleted: usize,
    pub conntrack_method: conntrack::Method,
    /// Whole sync.
    pub duration: Duration,
    /// Generating the rules (and, on a full sync, reading the existing chains back with iptables-save).
    pub generate: Duration,
    /// The iptables-restore transaction.
    pub restore: Duration,
    /// Checking (and inserting) the jump rules.
    pub jumps: Duration,
}

/// The iptables dataplane.
pub struct IptablesDataplane {
    family: IpFamily,
    cfg: DataplaneConfig,
    exec: Exec,
    gen_opts: GeneratorOptions,
    /// The nat chains of every programmed service port.
    installed: HashMap<ServicePortName, Vec<String>>,
    /// The desired state of the last successful sync (for conntrack cleanup).
    applied: Option<Snapshot>,
    /// Conntrack filters whose deletion failed, retried on the next sync.
    conntrack_retry: Vec<UdpFilter>,
    /// Check the whole conntrack table against the endpoints on the next sync (a cleanup failed).
    conntrack_check_all: bool,
    synced: bool,
    route_localnet_done: bool,
    last: LastSync,
}

impl IptablesDataplane {
    /// The IPv4 dataplane.
    pub fn new(cfg: DataplaneConfig, opts: IptablesOptions) -> Result<Self> {
        Self::for_family(IpFamily::V4, cfg, opts)
    }

    /// The dataplane of `family`: `iptables*` for IPv4, `ip6tables*` for IPv6 (the flavour is detected once, from
    /// the IPv4 tables, as kube-proxy does, and used for both).
    pub fn for_family(family: IpFamily, cfg: DataplaneConfig, opts: IptablesOptions) -> Result<Self> {
        let mut exec = Exec::detect(opts.netns.as_deref());
        if let Some(f) = opts.flavour {
            if f != exec.flavour() {
                exec = Exec::with_flavour(opts.netns.as_deref(), f);
            }
        }
        let exec = exec.for_family(family);
        let tool = exec.tool();
        let version = exec
            .version_string()
            .with_context(|| format!("{tool} is not usable (is it installed, and are we root?)"))?;
        // A kernel without IPv6 (ipv6.disable=1) has ip6tables but no table to restore into.
        if family == IpFamily::V6 {
            exec.save("nat")
                .with_context(|| format!("{tool} cannot read the nat table (no IPv6 in this kernel?)"))?;
        }
        let liberal = exec
            .sysctl_get("net.netfilter.nf_conntrack_tcp_be_liberal")
            .is_some_and(|v| v != "0");
        let gen_opts = GeneratorOptions {
            random_fully: exec.has_random_fully(),
            conntrack_tcp_liberal: liberal,
        };
        tracing::info!(
            %family,
            flavour = exec.flavour().as_str(),
            version,
            random_fully = gen_opts.random_fully,
            conntrack_tcp_liberal = liberal,
            netns = ?exec.netns(),
            "iptables dataplane"
        );
        Ok(Self {
            family,
            cfg,
            exec,
            gen_opts,
            installed: HashMap::new(),
            applied: None,
            conntrack_retry: Vec::new(),
            conntrack_check_all: false,
            synced: false,
            route_localnet_done: false,
            last: LastSync::default(),
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.exec.flavour()
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    pub fn exec(&self) -> &Exec {
        &self.exec
    }

    /// What the last sync sent.
    pub fn last_sync(&self) -> &LastSync {
        &self.last
    }

    fn local_addrs(&self) -> Vec<IpAddr> {
        let needed = self.cfg.nodeport_primary
            || self
                .cfg
                .nodeport_addresses
                .iter()
                .any(|c| c.family() == self.family && c.prefix != 0);
        if !needed {
            return Vec::new();
        }
        self.exec.local_addrs().unwrap_or_else(|e| {
            tracing::error!(error = %format!("{e:#}"), "cannot list local addresses: NodePorts on --nodeport-addresses are off");
            Vec::new()
        })
    }

    fn generate(&self, desired: &Snapshot, node: &NodeInfo, write: &dyn Fn(&ServicePortName) -> bool) -> Ruleset {
        let addrs = self.local_addrs();
        let mut g = Generator::for_family(self.family, &self.cfg, node, &addrs, self.gen_opts);
        g.generate(desired, write)
    }

    /// Makes sure every jump from a built-in chain exists: one `iptables -S` per built-in chain (6 calls) finds the
    /// present ones; a jump not found that way is checked with `-C` and inserted with `-I`.
    fn ensure_jumps(&self) -> Result<()> {
        let mut listed: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for j in JUMPS {
            let present = listed
                .entry((j.table, j.from))
                .or_insert_with(|| self.exec.list_chain(j.table, j.from).unwrap_or_default());
            if present.contains(&j.save_form()) {
                continue;
            }
            let args = j.args();
            if !self.exec.check_rule(j.table, j.from, &args)? {
                self.exec
                    .insert_rule(j.table, j.from, &args)
                    .with_context(|| format!("inserting the jump {} -> {}", j.from, j.to))?;
            }
        }
        Ok(())
    }

    fn ensure_route_localnet(&mut self, needed: bool, full: bool) -> Result<()> {
        if self.family != IpFamily::V4 {
            return Ok(());
        }
        if full && needed {
            // Re-checked on every full sync, in case something reset it.
            self.route_localnet_done = self.exec.sysctl_get("net.ipv4.conf.all.route_localnet").as_deref() == Some("1");
        }
        if needed && !self.route_localnet_done {
            tracing::info!("setting route_localnet=1 for NodePorts on 127.0.0.1 (--nodeport-addresses includes it)");
            self.exec.sysctl_set("net.ipv4.conf.all.route_localnet", "1")?;
            self.route_localnet_done = true;
        }
        Ok(())
    }

    /// Whether the mangle canary chain is still there (one `iptables -S` of the small mangle table).
    fn canary_present(&self) -> bool {
        self.exec.list_chain("mangle", CANARY).is_ok()
    }

    fn sync(&mut self, desired: &Snapshot, node: &NodeInfo, diff: Option<&Diff>) -> Result<SyncStats> {
        let start = Instant::now();
        let mut full = diff.is_none() || !self.synced;
        if !full && !self.canary_present() {
            tracing::warn!(
                chain = CANARY,
                "the mangle canary chain is gone (iptables flushed?); doing a full sync"
            );
            full = true;
        }
        let (ruleset, stale_filter, stale_nat) = if full {
            let rs = self.generate(desired, node, &|_| true);
            let existing_nat = chains_with_prefix(&self.exec.save("nat")?, PREFIX);
            let existing_filter = chains_with_prefix(&self.exec.save("filter")?, PREFIX);
            let mut active: HashSet<&str> = rs.top_nat_chains().into_iter().collect();
            for cs in rs.port_chains.values() {
                active.extend(cs.iter().map(String::as_str));
            }
            let stale_nat: Vec<String> = existing_nat
                .into_iter()
                .filter(|c| !active.contains(c.as_str()))
                .collect();
            let stale_filter: Vec<String> = existing_filter
                .into_iter()
                .filter(|c| !FILTER_CHAINS.contains(&c.as_str()))
                .collect();
            (rs, stale_filter, stale_nat)
        } else {
            let diff = diff.expect("partial sync has a diff");
            let mut changed: HashSet<&ServicePortName> = diff.upserted.iter().map(|s| s.name()).collect();
            // Anything desired but never programmed (should not happen) is written too.
            for k in desired.keys() {
                if !self.installed.contains_key(k) {
                    changed.insert(k);
                }
            }
            let rs = self.generate(desired, node, &|n| changed.contains(n));
            let mut stale = BTreeSet::new();
            for name in &changed {
                let new: HashSet<&String> = rs.port_chains.get(*name).into_iter().flatten().collect();
                for c in self.installed.get(*name).into_iter().flatten() {
                    if !new.contains(c) {
                        stale.insert(c.clone());
                    }
                }
            }
            for name in &diff.removed {
                if desired.contains_key(name) {
                    continue;
                }
                stale.extend(self.installed.get(name).into_iter().flatten().cloned());
            }
            (rs, Vec::new(), stale.into_iter().collect())
        };
        let (mut input, mut lines) = ruleset.restore_input(&stale_filter, &stale_nat);
        if full {
            input.push_str(&format!("*mangle\n:{CANARY} - [0:0]\nCOMMIT\n"));
            lines += 3;
        }
        let t_generate = start.elapsed();
        self.exec.restore(&input)?;
        let t_restore = start.elapsed() - t_generate;
        if full {
            self.ensure_jumps()?;
        }
        let t_jumps = start.elapsed() - t_generate - t_restore;
        self.ensure_route_localnet(ruleset.localhost_nodeports, full)?;

        if full {
            self.installed = ruleset.port_chains.clone();
        } else if let Some(diff) = diff {
            for name in &diff.removed {
                if !desired.contains_key(name) {
                    self.installed.remove(name);
                }
            }
            for (k, v) in &ruleset.port_chains {
                self.installed.insert(k.clone(), v.clone());
            }
        }
        self.synced = true;

        let mut filters = match (&self.applied, diff) {
            (Some(old), Some(diff)) if !full => {
                let names = diff.upserted.iter().map(|s| s.name()).chain(diff.removed.iter());
                conntrack_filters(self.family, node, names, old, desired)
            }
            (Some(old), _) => conntrack_filters(self.family, node, old.keys().chain(desired.keys()), old, desired),
            (None, _) => Vec::new(),
        };
        // The deltas miss what changed while no agent ran (the first sync after a start) and what a failed
        // cleanup left: then the whole table is checked against the current endpoints, and failed filters retried.
        filters.append(&mut self.conntrack_retry);
        let check_all = self.applied.is_none() || self.conntrack_check_all;
        let state = check_all.then(|| udp_state(self.family, node, desired));
        let (conntrack_deleted, conntrack_method) =
            match conntrack::delete_udp(self.exec.netns(), self.family, &filters, state.as_ref()) {
                Ok(r) => {
                    self.conntrack_check_all = false;
                    r
                }
                Err(e) => {
                    tracing::error!(
                        error = %format!("{e:#}"),
                        family = %self.family,
                        "deleting stale UDP conntrack entries failed; retried on the next sync"
                    );
                    self.conntrack_retry = filters;
                    self.conntrack_check_all = true;
                    (0, conntrack::Method::None)
                }
            };
        self.applied = Some(desired.clone());

        self.last = LastSync {
            full,
            input,
            lines,
            rules_written: ruleset.rules_written,
            rules_total: ruleset.rules_total,
            chains_deleted: stale_filter.len() + stale_nat.len(),
            conntrack_deleted,
            conntrack_method,
            duration: start.elapsed(),
            generate: t_generate,
            restore: t_restore,
            jumps: t_jumps,
        };
        tracing::debug!(
            family = %self.family,
            full,
            lines,
            rules_written = ruleset.rules_written,
            rules_total = ruleset.rules_total,
            chains_deleted = self.last.chains_deleted,
            conntrack_deleted,
            elapsed = ?self.last.duration,
            "iptables sync"
        );
        Ok(SyncStats {
            objects_written: ruleset.rules_written,
            service_ports: desired.len(),
            failed_service_ports: 0,
            conntrack_cleanup_failed: self.conntrack_check_all,
        })
    }
}

/// Every frontend address of `family` of a service port: cluster IP, external IPs, load-balancer IPs.
fn frontends(family: IpFamily, st: &ServicePortState) -> Vec<IpAddr> {
    let p = &st.port;
    let mut v: Vec<IpAddr> = family.filter(&p.cluster_ips).take(1).collect();
    v.extend(family.filter(&p.external_ips));
    v.extend(family.filter(&p.load_balancer_ips));
    v
}

/// The reachable endpoints of `family`, categorised as the rule generator does ([`ServicePortState::selected_in`]).
fn reachable(family: IpFamily, node: &NodeInfo, st: &ServicePortState) -> BTreeSet<(IpAddr, u16)> {
    st.selected_in(family, node)
        .all_reachable
        .iter()
        .map(|e| (e.ip, e.port))
        .collect()
}

/// Every UDP Service port's frontends of `family` and NodePort with the endpoint IPs its flows may be DNATed to.
pub fn udp_state(family: IpFamily, node: &NodeInfo, desired: &Snapshot) -> conntrack::UdpState {
    let mut st = conntrack::UdpState::default();
    for (name, s) in desired {
        if name.protocol != Protocol::Udp || !s.port.has_family(family) {
            continue;
        }
        let eps: HashSet<IpAddr> = reachable(family, node, s).into_iter().map(|(ip, _)| ip).collect();
        for f in frontends(family, s) {
            st.frontends.entry((f, s.port.port)).or_default().extend(&eps);
        }
        if let Some(np) = s.port.node_port {
            st.node_ports.entry(np).or_default().extend(&eps);
        }
    }
    st
}

/// kube-proxy's UDP conntrack cleanup for the service ports `names`, comparing `old` with `new`:
/// - an endpoint that is no longer reachable: entries to every frontend (and the NodePort) DNATed to it;
/// - a first endpoint after none: entries to every frontend (and the NodePort), which cached the REJECT.
pub fn conntrack_filters<'a>(
    family: IpFamily,
    node: &NodeInfo,
    names: impl Iterator<Item = &'a ServicePortName>,
    old: &Snapshot,
    new: &Snapshot,
) -> Vec<UdpFilter> {
    let mut out = BTreeSet::new();
    for name in names {
        if name.protocol != Protocol::Udp {
            continue;
        }
        let (o, n) = (old.get(name), new.get(name));
        let old_eps = o.map(|s| reachable(family, node, s)).unwrap_or_default();
        let new_eps = n.map(|s| reachable(family, node, s)).unwrap_or_default();
        if let Some(o) = o {
            let new_ips: HashSet<IpAddr> = new_eps.iter().map(|(ip, _)| *ip).collect();
            for (ip, _) in old_eps.iter().filter(|e| !new_eps.contains(e)) {
                if new_ips.contains(ip) {
                    continue;
                }
                for f in frontends(family, o) {
                    out.insert(UdpFilter {
                        orig_dst: Some(f),
                        orig_dport: o.port.port,
                        reply_src: Some(*ip),
                    });
                }
                if let Some(np) = o.port.node_port {
                    out.insert(UdpFilter {
                        orig_dst: None,
                        orig_dport: np,
                        reply_src: Some(*ip),
                    });
                }
            }
        }
        if let Some(n) = n {
            if old_eps.is_empty() && !new_eps.is_empty() {
                for f in frontends(family, n) {
                    out.insert(UdpFilter {
                        orig_dst: Some(f),
                        orig_dport: n.port.port,
                        reply_src: None,
                    });
                }
                if let Some(np) = n.port.node_port {
                    out.insert(UdpFilter {
                        orig_dst: None,
                        orig_dport: np,
                        reply_src: None,
                    });
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The `iptables-restore --noflush` input that removes Orca from one table, given its `iptables-save`: every `ORCA-*`
/// chain flushed, every rule of another chain that jumps to one deleted (as iptables-save spells it, which
/// iptables-restore reads back), then the chains deleted. Empty when the table holds nothing of Orca's.
pub fn cleanup_input(table: &str, save: &str) -> String {
    let chains = chains_with_prefix(save, PREFIX);
    let jumps: Vec<&str> = save
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter(|r| !r.starts_with(PREFIX))
        .filter(|r| {
            let mut w = r.split_whitespace();
            w.any(|x| x == "-j" || x == "-g") && w.next().is_some_and(|t| t.starts_with(PREFIX))
        })
        .collect();
    if chains.is_empty() && jumps.is_empty() {
        return String::new();
    }
    let mut out = format!("*{table}\n");
    for c in &chains {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for j in &jumps {
        out.push_str(&format!("-D {j}\n"));
    }
    for c in &chains {
        out.push_str(&format!("-X {c}\n"));
    }
    out.push_str("COMMIT\n");
    out
}

impl Dataplane for IptablesDataplane {
    fn mode(&self) -> ProxyMode {
        ProxyMode::Iptables
    }

    fn full_sync(&mut self, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.sync(desired, node, None)
    }

    fn apply(&mut self, diff: &Diff, desired: &Snapshot, node: &NodeInfo) -> Result<SyncStats> {
        self.sync(desired, node, Some(diff))
    }

    fn cluster_frontends(&self, _desired: &Snapshot, _node: &NodeInfo) -> Result<crate::verify::FrontendMap> {
        readback::read_cluster_frontends(self.exec.netns())
    }

    /// Removes the jump rules, then flushes and deletes every `ORCA-*` chain of the filter, nat and mangle tables:
    /// one `iptables-save` per table finds them, one `iptables-restore` transaction removes them (with
    /// iptables-legacy every separate `iptables -C`/`-D` would read the whole table again).
    fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        let mut input = String::new();
        for table in ["filter", "nat", "mangle"] {
            match self.exec.save(table) {
                Ok(save) => input.push_str(&cleanup_input(table, &save)),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if !input.is_empty() {
            if let Err(e) = self.exec.restore(&input) {
                errors.push(format!("{e:#}"));
            }
        }
        self.installed.clear();
        self.applied = None;
        self.synced = false;
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("iptables cleanup: {}", errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests;
