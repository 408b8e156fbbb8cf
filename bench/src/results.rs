//! What a bench run measured, as written to `bench/results/*.json`: [`crate::run`] fills it in, [`crate::report`]
//! renders it.

use serde::{Deserialize, Serialize};

use crate::backend::ChainPosition;
use crate::load::LoadResult;
use crate::probe::{self, Histogram, ProcStats, TcCost};

/// Consecutive answers without the removed endpoint that declare it gone (with two other endpoints left, a
/// still-programmed endpoint escapes that many probes with probability (2/3)^30 < 10^-5).
pub const GONE_STREAK: usize = 30;

/// Programming latency of one proxy at one scale.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgResult {
    /// Slice patch sent -> the datapath stopped sending to the unready endpoint, milliseconds.
    pub removal_ms: Vec<f64>,
    /// Patch -> the endpoint the previous change had marked unready answered again (a coarse upper bound: the
    /// balancer must pick it).
    pub add_ms: Vec<f64>,
    /// Changes whose re-readied endpoint never answered while the removal was probed.
    #[serde(default)]
    pub add_timeouts: usize,
    /// Round trip of the slice PATCH at the apiserver, milliseconds (part of every latency above).
    pub patch_rtt_ms: Vec<f64>,
    /// Changes that did not converge within the bound.
    pub timeouts: usize,
    /// Probe requests that failed (refused, reset, timed out) while the datapath changed.
    pub probe_errors: usize,
    /// The changes stopped before `--prog-changes` because `--prog-budget-s` ran out (seconds spent).
    #[serde(default)]
    pub budget_exhausted_s: Option<f64>,
}

/// Everything measured for one configuration at one scale.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigResult {
    pub config: String,
    pub scale: usize,
    pub connect_remote: Vec<LoadResult>,
    pub connect_local: Vec<LoadResult>,
    /// New connections to the IPv6 ClusterIP of the cross-node Service (dual-stack; the fillers are IPv4).
    #[serde(default)]
    pub connect_remote6: Vec<LoadResult>,
    pub rr: Vec<LoadResult>,
    pub stream: Vec<LoadResult>,
    /// Proxy start -> the measured ClusterIPs answer (first full sync at this scale), seconds.
    pub startup_s: Option<f64>,
    pub prog: Option<ProgResult>,
    /// Upstream-named metrics of node-a's proxy during the programming-latency changes.
    pub net_prog: Option<Histogram>,
    /// The same over the proxy's whole life at this scale.
    pub sync_rules: Option<Histogram>,
    /// kubeproxy_sync_full_proxy_rules_duration_seconds over the proxy's life at this scale.
    #[serde(default)]
    pub sync_full: Option<Histogram>,
    /// kubeproxy_sync_partial_proxy_rules_duration_seconds during the programming-latency changes.
    #[serde(default)]
    pub sync_partial: Option<Histogram>,
    /// iptables modes: the backend they ran on ("nft" or "legacy").
    #[serde(default)]
    pub iptables_backend: Option<String>,
    /// iptables modes: where the measured Service (`bench-remote`:80) is in the dispatch chain on node-a.
    #[serde(default)]
    pub position: Option<ChainPosition>,
    /// `perf record -p <node-a's agent>` during the programming-latency changes (largest scale,
    /// `--profile-agent`): `perf report` lines by symbol (self time).
    #[serde(default)]
    pub agent_profile: Option<String>,
    /// Sync timings node-a's proxy logged during the programming-latency changes.
    #[serde(default)]
    pub logged: Option<probe::LoggedSyncs>,
    /// `perf record -a` during the first cross-node connect run (largest scale, `--profile`): `perf report`
    /// lines (comm, object, symbol, share of all samples on the machine).
    #[serde(default)]
    pub profile: Option<String>,
    pub procs: Vec<(String, ProcStats)>,
    pub tc: Option<TcCost>,
    pub errors: Vec<String>,
    /// What stopping the proxy noted (its own cleanup's leftovers; the nodes are reset regardless).
    #[serde(default)]
    pub stop_notes: Vec<String>,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub quick: bool,
    pub scales: Vec<usize>,
    pub repeats: usize,
    pub configs: Vec<String>,
    pub results: Vec<ConfigResult>,
    /// Filler creation rate (objects/s) per scale.
    pub fill_rate: Vec<(usize, f64)>,
    /// Endpoints of every filler Service (None: 2 to 10 in turn).
    #[serde(default)]
    pub filler_endpoints: Option<usize>,
    /// TC program cost per packet at each scale (`orca-bench tc-cost`'s measurement, taken before the sandbox
    /// starts, on the agent's programs over maps filled to the scale).
    #[serde(default)]
    pub tc_cost: Vec<crate::tccost::Row>,
    pub load_start: String,
    pub load_end: String,
    pub started_utc: String,
    pub duration_s: f64,
    pub command: String,
    pub machine: Vec<(String, String)>,
    pub notes: Vec<String>,
    pub load_params: String,
}
