//! The sandbox: a real kube-apiserver, kube-controller-manager and nodes, all inside network namespaces.
//!
//! * [`build`] builds (once, then cached) etcd, kube-apiserver, kube-controller-manager and kube-proxy from the
//!   pinned Go modules in `sandbox/k8s/`.
//! * [`netns`] runs `ip` commands, tracks the processes the sandbox starts and tears everything down.
//! * [`topology`] lays out the fabric, the control-plane, node and client namespaces and their addresses.
//! * [`controlplane`] generates credentials, starts etcd, the apiserver and the controller-manager, registers the
//!   Nodes and gives out clients ([`Sandbox`]).
//!
//! Only one sandbox can exist on a machine at a time (the namespace names are fixed); [`Sandbox::up`] takes a
//! file lock so that concurrent test binaries queue instead of destroying each other's namespaces.
pub mod build;
pub mod controlplane;
pub mod hostfs;
pub mod kubelet;
pub mod load;
pub mod netns;
pub mod pods;
pub mod suite;
pub mod topology;

pub use controlplane::{Sandbox, SandboxOptions};
pub use topology::{Ipv4Cidr, Topology};

use std::path::PathBuf;

/// The repository (cargo workspace) root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `<repo>/.cache` (gitignored): built binaries, the sandbox's credentials, logs and pid file.
pub fn cache_dir() -> PathBuf {
    repo_root().join(".cache")
}

/// `<repo>/.cache/sandbox`: the running sandbox's pid file, logs (`logs/`) and credentials (`run/`).
pub fn sandbox_dir() -> PathBuf {
    cache_dir().join("sandbox")
}
