//! Prometheus metrics under kube-proxy's names (subsystem `kubeproxy`), plus Orca's own (`orca_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::dataplane::ebpf::DatapathCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: String,
    pub fallback_reason: String,
}

/// `reason` of `orca_dataplane_degraded`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// An HTTP status code (kube-proxy's healthz/livez counters).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub network_programming_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub endpoint_changes_total: Counter,
    pub service_changes_total: Counter,
    pub endpoint_changes_pending: Gauge,
    pub service_changes_pending: Gauge,
    pub sync_errors_total: Counter,
    pub conntrack_cleanup_errors_total: Counter,
    pub invalid_objects_total: Family<KindLabels, Counter>,
    pub mode: Family<ModeLabels, Gauge>,
    pub degraded: Family<ReasonLabel, Gauge>,
    pub service_ports: Gauge,
    pub failed_service_ports: Gauge,
    /// The eBPF datapath's own counters, read on each scrape.
    pub datapath: Arc<DatapathCollector>,
    pub proxy_healthz_total: Family<CodeLabels, Counter>,
    pub proxy_livez_total: Family<CodeLabels, Counter>,
}

fn sync_buckets() -> Histogram {
    // kube-proxy: exponential from 1ms, factor 2, 15 buckets.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            // kube-proxy: linear 0.25s..? merged with exponential; a wide exponential range serves the same use.
            network_programming_duration: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_total: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes_pending: Gauge::default(),
            sync_errors_total: Counter::default(),
            conntrack_cleanup_errors_total: Counter::default(),
            invalid_objects_total: Family::default(),
            mode: Family::default(),
            degraded: Family::default(),
            service_ports: Gauge::default(),
            failed_service_ports: Gauge::default(),
            datapath: Arc::default(),
            proxy_healthz_total: Family::default(),
            proxy_livez_total: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        // prometheus-client appends `_total` to counters.
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes_total.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.proxy_healthz_total.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.proxy_livez_total.clone(),
        );
        r.register(
            "orca_sync_errors",
            "Syncs that failed and were retried",
            m.sync_errors_total.clone(),
        );
        r.register(
            "orca_conntrack_cleanup_errors",
            "Syncs whose deletion of stale UDP conntrack entries failed (retried on the next sync)",
            m.conntrack_cleanup_errors_total.clone(),
        );
        r.register(
            "orca_invalid_objects",
            "Kubernetes objects (or parts) ignored as invalid",
            m.invalid_objects_total.clone(),
        );
        r.register(
            "orca_dataplane_mode",
            "The active dataplane (1) and why Orca fell back, if it did",
            m.mode.clone(),
        );
        r.register(
            "orca_dataplane_degraded",
            "1 per thing the dataplane runs without (reason: BpffsNotPersistent, NoCgroup2, CgroupNotRoot)",
            m.degraded.clone(),
        );
        r.register(
            "orca_service_ports",
            "Service ports programmed",
            m.service_ports.clone(),
        );
        r.register(
            "orca_failed_service_ports",
            "Service ports the last sync could not program (e.g. a full BPF map); retried on every sync",
            m.failed_service_ports.clone(),
        );
        r.register_collector(Box::new(m.datapath.clone()));
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("encoding metrics failed");
        }
        out
    }
}

/// Reads the eBPF datapath's counters (set by the eBPF dataplane when it runs).
pub type DatapathSource = Box<dyn Fn() -> DatapathCounts + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// `orca_datapath_drops_total{reason}`, `orca_datapath_untranslated_total{reason}`, `orca_map_entries{map}`,
/// `orca_conntrack_*` and `orca_snat_ports_in_use`, read from the datapath on each scrape. Nothing is exported
/// while no eBPF datapath runs (iptables mode).
#[derive(Default)]
pub struct DatapathCollector {
    source: Mutex<Option<DatapathSource>>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl DatapathCollector {
    pub fn set_source(&self, source: DatapathSource) {
        if let Ok(mut s) = self.source.lock() {
            *s = Some(source);
        }
    }

    fn read(&self) -> Option<DatapathCounts> {
        self.source.lock().ok()?.as_ref().map(|f| f())
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.read() else {
            return Ok(());
        };
        for (name, help, dropped) in [
            (
                "orca_datapath_drops",
                "Packets the eBPF programs dropped (or answered with a reject), by reason",
                true,
            ),
            (
                "orca_datapath_untranslated",
                "Packets the eBPF programs passed untranslated although they could be Service traffic, by reason",
                false,
            ),
        ] {
            let mut e = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (i, (reason, is_drop)) in orca_common::REASONS.iter().enumerate() {
                if *is_drop != dropped {
                    continue;
                }
                let labels = ReasonLabels {
                    reason: reason.to_string(),
                };
                let n = c.reasons.get(i).copied().unwrap_or(0);
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        let ct = &c.conntrack;
        let mut maps: Vec<(&str, u64)> = vec![(orca_common::MAP_CT, ct.entries)];
        maps.extend(ct.other_maps.iter().map(|(n, v)| (*n, *v)));
        let mut e = encoder.encode_descriptor(
            "orca_map_entries",
            "Entries in each eBPF map (as of the conntrack collector's last pass)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, n) in maps {
            let labels = MapLabels { map: map.to_string() };
            ConstGauge::new(n as i64).encode(e.encode_family(&labels)?)?;
        }
        for (name, help, v) in [
            (
                "orca_conntrack_capacity",
                "Entries the eBPF conntrack map holds at most",
                ct.capacity,
            ),
            (
                "orca_snat_ports_in_use",
                "Masquerade source ports held by live flows",
                ct.snat_ports,
            ),
            (
                "orca_unmatched_pod_interfaces",
                "Veths matching no --ebpf-pod-interface-prefixes and no uplink: their pods get no Service translation",
                c.unmatched_interfaces,
            ),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        for (name, help, v) in [
            (
                "orca_conntrack_expired_deleted",
                "eBPF conntrack entries the collector deleted because they expired",
                ct.expired_deleted,
            ),
            (
                "orca_conntrack_pressure_deleted",
                "Unanswered eBPF conntrack entries deleted because the map was nearly full",
                ct.pressure_deleted,
            ),
        ] {
            let k = ConstCounter::new(v);
            k.encode(encoder.encode_descriptor(name, help, None, k.metric_type())?)?;
        }
        Ok(())
    }
}
