//! Chooses and builds the dataplane: eBPF by default, iptables when asked or when eBPF cannot run.

use crate::dataplane::ebpf::{EbpfDataplane, EbpfOptions};
use crate::dataplane::iptables::{IptablesDataplane, IptablesOptions};
use crate::dataplane::{Dataplane, ProxyMode};
use crate::settings::Settings;

/// Builds the dataplane for `s.mode`; returns it with the reason for a fallback, if one happened.
pub fn create(s: &Settings) -> anyhow::Result<(Box<dyn Dataplane>, Option<String>)> {
    match s.mode {
        ProxyMode::Iptables => {
            remove_ebpf(s, "iptables mode");
            Ok((iptables(s)?, None))
        }
        ProxyMode::Ebpf => match ebpf(s) {
            Ok(dp) => Ok((dp, None)),
            Err(e) if s.allow_fallback => {
                let reason = format!("{e:#}");
                tracing::warn!(reason = %reason, "eBPF dataplane unavailable; falling back to iptables");
                // Whatever this or an earlier eBPF agent attached would translate in front of the iptables rules.
                remove_ebpf(s, "fallback to iptables");
                Ok((iptables(s)?, Some(reason)))
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
    ebpf
}
