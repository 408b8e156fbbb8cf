//! Chooses and builds the dataplane: eBPF by default, iptables when asked or when eBPF cannot run.

use crate::app::Settings;
use crate::dataplane::iptables::{IptablesDataplane, IptablesOptions};
use crate::dataplane::{Dataplane, ProxyMode};

/// Builds the dataplane for `s.mode`; returns it with the reason for a fallback, if one happened.
pub fn create(s: &Settings) -> anyhow::Result<(Box<dyn Dataplane>, Option<String>)> {
    match s.mode {
        ProxyMode::Iptables => Ok((iptables(s)?, None)),
        ProxyMode::Ebpf => match ebpf(s) {
            Ok(dp) => Ok((dp, None)),
            Err(e) if s.allow_fallback => {
                let reason = format!("{e:#}");
                tracing::warn!(reason = %reason, "eBPF dataplane unavailable; falling back to iptables");
                Ok((iptables(s)?, Some(reason)))
            }
            Err(e) => Err(e.context("eBPF dataplane unavailable and --no-fallback is set")),
        },
    }
}

fn iptables(s: &Settings) -> anyhow::Result<Box<dyn Dataplane>> {
    let dp = IptablesDataplane::new(s.dataplane.clone(), IptablesOptions::default())?;
    Ok(Box::new(dp))
}

fn ebpf(_s: &Settings) -> anyhow::Result<Box<dyn Dataplane>> {
    anyhow::bail!("the eBPF dataplane is not part of this build yet")
}

/// `orca-proxy cleanup`: removes what every dataplane may have left.
pub fn cleanup_all(s: &Settings) -> anyhow::Result<()> {
    IptablesDataplane::new(s.dataplane.clone(), IptablesOptions::default())?.cleanup()?;
    tracing::info!("removed Orca's iptables chains and rules");
    Ok(())
}
