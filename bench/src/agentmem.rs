//! `orca-bench agent-mem`: the agent's user-space memory per endpoint, in-process, no sandbox.
//!
//! Synthetic selector-less ClusterIP Services (one port) with one EndpointSlice each (N ready IPv4 endpoints with
//! `nodeName` set, unique addresses) go through the agent's own path: [`ChangeTracker`] (as `watch.rs` feeds it:
//! each object is built, handed over and dropped, like a watch event), `take_diff` (the desired [`Snapshot`]),
//! then the eBPF dataplane's [`Programmer`] as `full_sync` drives it, over maps that hold nothing in user space
//! (the kernel maps are not in the agent's RSS). Live heap comes from a counting global allocator; VmRSS and VmHWM
//! from `/proc/self/status`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use orca_common::{Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey};
use orca_proxy::dataplane::ebpf::services::{MapOps, Programmer, SrcRange};
use orca_proxy::dataplane::DataplaneConfig;
use orca_proxy::model::tracker::ChangeTracker;
use orca_proxy::model::NodeInfo;
use serde_json::json;

/// System's allocator, counting the bytes currently allocated once `agent-mem` has switched counting on (the other
/// subcommands, e.g. the load generator, then pay one relaxed load of a flag that never changes, not a shared
/// counter's cache line).
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn count(delta: isize) {
    if ON.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only a counter is updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[derive(clap::Args, Debug)]
pub struct AgentMemArgs {
    /// Selector-less ClusterIP Services, one EndpointSlice each.
    #[arg(long, default_value_t = 30_000)]
    services: usize,
    /// Ready endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints_per_service: usize,
    /// Nodes the endpoints are spread over (their nodeName); the agent's node is node-0.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
}

/// Kernel maps stand-in: accepts every write and keeps nothing (map memory is kernel memory, not RSS).
#[derive(Default)]
struct NullMaps {
    writes: usize,
}

impl NullMaps {
    fn w(&mut self) -> Result<()> {
        self.writes += 1;
        Ok(())
    }
}

impl MapOps for NullMaps {
    fn put_frontend(&mut self, _: FrontendKey, _: Frontend) -> Result<()> {
        self.w()
    }
    fn del_frontend(&mut self, _: &FrontendKey) -> Result<()> {
        self.w()
    }
    fn put_slot(&mut self, _: BackendSlotKey, _: Backend) -> Result<()> {
        self.w()
    }
    fn del_slot(&mut self, _: &BackendSlotKey) -> Result<()> {
        self.w()
    }
    fn get_slot(&self, _: &BackendSlotKey) -> Option<Backend> {
        None
    }
    fn put_member(&mut self, _: MemberKey, _: u32) -> Result<()> {
        self.w()
    }
    fn del_member(&mut self, _: &MemberKey) -> Result<()> {
        self.w()
    }
    fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
        Vec::new()
    }
    fn slots(&self) -> Vec<BackendSlotKey> {
        Vec::new()
    }
    fn members(&self) -> Vec<MemberKey> {
        Vec::new()
    }
    fn put_maglev(&mut self, _: BackendSlotKey, _: u32) -> Result<()> {
        self.w()
    }
    fn del_maglev(&mut self, _: &BackendSlotKey) -> Result<()> {
        self.w()
    }
    fn maglev_keys(&self) -> Vec<BackendSlotKey> {
        Vec::new()
    }
    fn put_range(&mut self, _: SrcRange) -> Result<()> {
        self.w()
    }
    fn del_range(&mut self, _: &SrcRange) -> Result<()> {
        self.w()
    }
    fn ranges(&self) -> Vec<SrcRange> {
        Vec::new()
    }
}

fn service(i: usize) -> Result<Service> {
    let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("fill-{i}"), "namespace": "orca-bench"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))?)
}

fn slice(i: usize, n: usize, nodes: usize) -> Result<EndpointSlice> {
    let endpoints: Vec<_> = (0..n)
        .map(|j| {
            // Unique across the whole run: 10.0.0.0/8 holds 16M addresses.
            let a = (i * n + j) as u32;
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (a & 0x00ff_ffff));
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", (i + j) % nodes.max(1))})
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("fill-{i}-abcde"), "namespace": "orca-bench",
                     "labels": {"kubernetes.io/service-name": format!("fill-{i}"),
                                "endpointslice.kubernetes.io/managed-by": "orca-bench"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))?)
}

fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

struct Meter {
    base: isize,
    endpoints: usize,
}

impl Meter {
    fn report(&self, phase: &str) -> isize {
        let live = LIVE.load(Ordering::Relaxed) - self.base;
        let mib = |b: f64| b / (1024.0 * 1024.0);
        println!(
            "{phase:<34} heap {:>8.1} MiB  {:>6.0} B/endpoint   VmRSS {:>7.1} MiB  VmHWM {:>7.1} MiB",
            mib(live as f64),
            live as f64 / self.endpoints.max(1) as f64,
            proc_status("VmRSS:") as f64 / 1024.0,
            proc_status("VmHWM:") as f64 / 1024.0,
        );
        live
    }
}

pub fn run(a: AgentMemArgs) -> Result<()> {
    // Counted from here on: what was allocated before and is freed later makes the figures smaller, never larger,
    // and every figure is a difference from a baseline taken after this point.
    ON.store(true, Ordering::Relaxed);
    let endpoints = a.services * a.endpoints_per_service;
    anyhow::ensure!(
        endpoints <= 1 << 24,
        "at most 16M endpoints (unique addresses in 10.0.0.0/8)"
    );
    println!(
        "agent-mem: {} Services x {} endpoints = {endpoints} endpoints over {} nodes",
        a.services, a.endpoints_per_service, a.nodes
    );
    let m = Meter {
        base: LIVE.load(Ordering::Relaxed),
        endpoints,
    };
    m.report("start");
    let node = NodeInfo::new("node-0", vec!["192.168.0.10".parse()?]);
    let mut tracker = ChangeTracker::new(node.clone());
    for i in 0..a.services {
        // Built, handed over and dropped, like a watch event.
        tracker.service_updated(&service(i)?);
        tracker.slice_updated(&slice(i, a.endpoints_per_service, a.nodes)?);
    }
    m.report("tracker fed (input dropped)");
    let diff = tracker.take_diff();
    anyhow::ensure!(
        diff.upserted.len() == a.services,
        "expected {} service ports, got {}",
        a.services,
        diff.upserted.len()
    );
    m.report("after take_diff (diff held)");
    let desired = tracker.desired_shared();
    let mut maps = NullMaps::default();
    let mut programmer = Programmer::adopt(&maps);
    let cfg = DataplaneConfig::default();
    for st in desired.values() {
        programmer
            .upsert(&mut maps, st, &node, &cfg)
            .with_context(|| format!("programming {}", st.name()))?;
    }
    programmer.sweep(&mut maps)?;
    anyhow::ensure!(
        programmer.service_ports() == a.services,
        "programmer lost service ports"
    );
    m.report("after full sync (diff held)");
    drop(desired);
    drop(diff);
    let steady = m.report("steady: diff dropped");
    // What the eBPF dataplane's full_sync does at its end.
    let t = std::time::Instant::now();
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    let took = t.elapsed();
    m.report("steady after malloc_trim(0)");
    println!("(malloc_trim took {took:?})");
    // What the Programmer alone keeps.
    drop(programmer);
    let tracker_only = m.report("tracker only (programmer dropped)");
    drop(tracker);
    m.report("everything dropped");
    println!(
        "summary: steady live heap {:.1} MiB = {:.0} B/endpoint (tracker {:.0}, programmer {:.0}); {} map writes",
        steady as f64 / (1024.0 * 1024.0),
        steady as f64 / endpoints.max(1) as f64,
        tracker_only as f64 / endpoints.max(1) as f64,
        (steady - tracker_only) as f64 / endpoints.max(1) as f64,
        maps.writes
    );
    Ok(())
}
