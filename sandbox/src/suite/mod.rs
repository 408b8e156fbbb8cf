//! The Service behaviour suite: scenarios that run against any proxy on the sandbox's nodes.
//!
//! * [`proxy`]: starting and stopping a proxy on every node namespace — upstream kube-proxy in iptables and
//!   nftables mode (the reference: a scenario failing against it is a wrong scenario or harness), Orca in
//!   iptables and eBPF mode — and resetting the nodes between proxies.
//! * [`ctx`]: a scenario's namespace, Services and bounded-wait traffic checks.
//! * [`scenarios`]: the seed walkthrough and upstream `[sig-network] Services` behaviours.
//! * [`dual_stack`]: the same behaviours for IPv6 and dual-stack Services.
//! * [`runner`]: one sandbox, every scenario x every proxy, the summary table.
//!
//! `cargo xtask suite [--proxy NAME]... [--scenario NAME]... [--require NAME]...` is the entry point.
pub mod ctx;
pub mod dual_stack;
pub mod proxy;
pub mod runner;
pub mod scenarios;

pub use proxy::{Proxy, ProxyEnv, ProxyKind, StartOptions};
pub use runner::{Report, SuiteOptions};
