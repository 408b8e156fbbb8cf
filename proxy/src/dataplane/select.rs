//! Chooses and builds the dataplane: eBPF by default, iptables when asked or when eBPF cannot run.

use crate::dataplane::dual::DualStack;
use crate::dataplane::ebpf::{EbpfDataplane, EbpfOptions};
use crate::dataplane::iptables::{IptablesDataplane, IptablesOptions};
use crate::dataplane::{Dataplane, ProxyMode};
use crate::model::IpFamily;
use crate::settings::Settings;

/// Builds the dataplane for `s.mode`; returns it with the reason for a fallback, if one happened.
pub fn create(s: &Settings) -> anyhow::Result<(Box<dyn Dataplane>, Option<String>)> {
    match s.mode {
        ProxyMode::Iptables => {
            remove_ebpf(s, "iptables mode");
            Ok((dual_stack(s, iptables(s)?), None))
        }
        // The eBPF dataplane serves both families itself.
        ProxyMode::Ebpf => match ebpf(s) {
            Ok(dp) => {
                remove_ip6tables(s);
                Ok((dp, None))
            }
            Err(e) if s.allow_fallback => {
                let reason = format!("{e:#}");
                tracing::warn!(reason = %reason, "eBPF dataplane unavailable; falling back to iptables");
                // Whatever this or an earlier eBPF agent attached would translate in front of the iptables rules.
                remove_ebpf(s, "fallback to iptables");
                Ok((dual_stack(s, iptables(s)?), Some(reason)))
            }
            Err(e) => Err(e.context("eBPF dataplane unavailable and --no-fallback is set")),
        },
    }
}

/// Removes what an eBPF agent attached (TC programs on either path, socket hooks, pins), before iptables runs.
fn remove_ebpf(s: &Settings, why: &str) {
    if let Err(e) = crate::dataplane::ebpf::remove_all(&s.bpf_root) {
        tracing::warn!(
            error = format!("{e:#}"),
            why,
            "could not remove everything an eBPF agent left"
        );
    }
}

/// An earlier Orca release served IPv6 Services in eBPF mode with ip6tables: its chains go (the programs translate
/// IPv6 before netfilter sees it, so they would only be clutter).
fn remove_ip6tables(s: &Settings) {
    if let Ok(mut v6) = IptablesDataplane::for_family(IpFamily::V6, s.dataplane.clone(), IptablesOptions::default()) {
        if let Err(e) = v6.cleanup() {
            tracing::warn!(error = %format!("{e:#}"), "could not remove Orca's ip6tables chains left by an earlier run");
        }
    }
}

/// The IPv4 iptables dataplane `v4` with the IPv6 one beside it (ip6tables), as kube-proxy runs dual-stack
/// whenever the node can; `v4` alone, with a warning, when ip6tables cannot run here (no IPv6 in the kernel, no
/// ip6tables), as kube-proxy falls back to single-stack.
fn dual_stack(s: &Settings, v4: Box<dyn Dataplane>) -> Box<dyn Dataplane> {
    match IptablesDataplane::for_family(IpFamily::V6, s.dataplane.clone(), IptablesOptions::default()) {
        Ok(v6) => Box::new(DualStack::new(v4, Box::new(v6))),
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "no IPv6 dataplane: IPv6 Services are not programmed on this node (single-stack IPv4)"
            );
            v4
        }
    }
}

fn iptables(s: &Settings) -> anyhow::Result<Box<dyn Dataplane>> {
    let dp = IptablesDataplane::new(s.dataplane.clone(), IptablesOptions::default())?;
    Ok(Box::new(dp))
}

fn ebpf(s: &Settings) -> anyhow::Result<Box<dyn Dataplane>> {
    let cgroup = crate::dataplane::ebpf::loader::choose_cgroup(s.cgroup_root.as_deref())?;
    let mut opts = EbpfOptions {
        cgroup: cgroup.path,
        cgroup_warning: cgroup.degraded,
        bpf_root: s.bpf_root.clone(),
        maglev: s.load_balancing == crate::model::LoadBalancing::Maglev,
        pod_interfaces: s.pod_interfaces.clone(),
        uplinks: s.uplinks.clone(),
        bypass_netfilter: s.bypass_netfilter,
        conntrack: s.conntrack.clone(),
        tc_attach: s.tc_attach,
        ..Default::default()
    };
    if !s.pod_interface_prefixes.is_empty() {
        opts.pod_interface_prefixes = s.pod_interface_prefixes.clone();
    }
    Ok(Box::new(EbpfDataplane::new(s.dataplane.clone(), opts)?))
}

/// `orca-proxy cleanup`: removes what every dataplane may have left.
pub fn cleanup_all(s: &Settings) -> anyhow::Result<()> {
    // Both, whatever the mode: an earlier run may have used the other one (or fallen back).
    let ebpf = crate::dataplane::ebpf::remove_all(&s.bpf_root);
    match &ebpf {
        Ok(()) => tracing::info!(root = %s.bpf_root.display(), "removed Orca's eBPF links, maps and pins"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "removing eBPF pins failed"),
    }
    IptablesDataplane::new(s.dataplane.clone(), IptablesOptions::default())?.cleanup()?;
    tracing::info!("removed Orca's iptables chains and rules");
    match IptablesDataplane::for_family(IpFamily::V6, s.dataplane.clone(), IptablesOptions::default()) {
        Ok(mut v6) => {
            v6.cleanup()?;
            tracing::info!("removed Orca's ip6tables chains and rules");
        }
        Err(e) => tracing::info!(error = %format!("{e:#}"), "no ip6tables here: nothing to remove"),
    }
    ebpf
}
