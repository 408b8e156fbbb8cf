//! `orca-proxy check-kernel`: whether this node's kernel runs the eBPF dataplane, and what its verifier says of
//! every program (instructions processed), for both variants of the TC programs (netfilter path and
//! `--ebpf-bypass-netfilter`). Loads without pinning or attaching anything.

use anyhow::Result;

use crate::dataplane::ebpf::loader::{self, LoadSettings};
use crate::dataplane::ebpf::ConntrackOptions;

/// Prints the report; Err when the kernel is too old or a program is rejected.
pub fn run() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = loader::kernel_version();
    println!("kernel\t{}", release.trim());
    let (min, hooks) = (loader::MIN_KERNEL, loader::MIN_KERNEL_SOCKET_HOOKS);
    println!(
        "minimum\t{}.{} (socket hooks for host-network clients: {}.{})",
        min.0, min.1, hooks.0, hooks.1
    );
    if let Some((major, minor)) = version {
        loader::kernel_supported(major, minor)?;
    }
    println!(
        "tc attach\t{}",
        if loader::TcAttach::Auto.tcx() { "tcx" } else { "clsact" }
    );
    let sock_hooks = loader::sock_hooks_supported();
    for bypass in [false, true] {
        let settings = LoadSettings {
            ct_entries: 1024,
            timeouts: orca_common::CtTimeouts::DEFAULT,
            nat_ports: ConntrackOptions::default().nat_ports()?,
            bypass_netfilter: bypass,
        };
        let ebpf = loader::load_with(None, &settings, sock_hooks && !bypass)?;
        let variant = if bypass { "bypass-netfilter" } else { "default" };
        for (name, insns) in loader::verifier_report(&ebpf) {
            let insns = insns.map_or("loaded (count not reported before 5.16)".to_string(), |n| n.to_string());
            println!("verifier\t{variant}\t{name}\t{insns}");
        }
    }
    if !sock_hooks {
        println!(
            "socket hooks\tnot loaded: the kernel is older than {}.{}",
            hooks.0, hooks.1
        );
    }
    println!("result\tthe eBPF dataplane runs on this kernel");
    Ok(())
}
