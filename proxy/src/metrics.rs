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
use crate::model::tracker::{Counters, PendingChanges};

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
    /// kube-proxy's `*_changes_pending`, read from the change tracker on each scrape.
    pub pending: Arc<PendingCollector>,
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
            pending: Arc::default(),
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
        r.register_collector(Box::new(m.pending.clone()));
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
            "Kubernetes objects (or parts) ignored as invalid, by kind (Service, EndpointSlice)",
            m.invalid_objects_total.clone(),
        );
        for kind in [INVALID_SERVICE, INVALID_SLICE] {
            let _ = m.invalid_objects_total.get_or_create(&KindLabels { kind: kind.into() });
        }
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

/// `kind` of `orca_invalid_objects_total` for Services and for EndpointSlices.
pub const INVALID_SERVICE: &str = "Service";
pub const INVALID_SLICE: &str = "EndpointSlice";

impl Metrics {
    /// Copies the change tracker's cumulative counters into their metrics (the tracker counts; the sync loop
    /// publishes after each sync).
    pub fn set_tracker_counters(&self, c: &Counters) {
        use std::sync::atomic::Ordering::Relaxed;
        self.service_changes_total.inner().store(c.service_changes, Relaxed);
        self.endpoint_changes_total.inner().store(c.endpoint_changes, Relaxed);
        for (kind, n) in [(INVALID_SERVICE, c.invalid_services), (INVALID_SLICE, c.invalid_slices)] {
            self.invalid_objects_total
                .get_or_create(&KindLabels { kind: kind.into() })
                .inner()
                .store(n, Relaxed);
        }
    }
}

/// kube-proxy's `kubeproxy_sync_proxy_rules_service_changes_pending` and `..._endpoint_changes_pending`: Services with
/// a Service change and EndpointSlice changes that no sync has taken yet, read from the tracker on each scrape (0
/// before the watchers start).
#[derive(Debug, Default)]
pub struct PendingCollector {
    pub source: ScrapeSource<PendingChanges>,
}

/// A reader of something that exists only once the agent has started it (the watchers, the eBPF datapath), set then
/// and called on each scrape.
pub struct ScrapeSource<T>(Mutex<Option<Box<dyn Fn() -> T + Send + Sync>>>);

impl<T> Default for ScrapeSource<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> std::fmt::Debug for ScrapeSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeSource")
    }
}

impl<T> ScrapeSource<T> {
    pub fn set(&self, source: Box<dyn Fn() -> T + Send + Sync>) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(source);
        }
    }

    fn read(&self) -> Option<T> {
        self.0.lock().ok()?.as_ref().map(|f| f())
    }
}

/// One unlabelled gauge of a collector.
fn encode_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for PendingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = self.source.read().unwrap_or_default();
        for (name, help, v) in [
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                p.endpoints,
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                p.services,
            ),
        ] {
            encode_gauge(&mut encoder, name, help, v)?;
        }
        Ok(())
    }
}

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
#[derive(Debug, Default)]
pub struct DatapathCollector {
    pub source: ScrapeSource<DatapathCounts>,
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.source.read() else {
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
            encode_gauge(&mut encoder, name, help, v)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn map_occupancy_and_drops_come_from_the_datapath_on_each_scrape() {
        let m = Metrics::new();
        // Iptables mode: no datapath, none of its series.
        assert!(!m.encode().contains("orca_map_entries"));
        let counts = Arc::new(Mutex::new(DatapathCounts::default()));
        let source = counts.clone();
        m.datapath.source.set(Box::new(move || source.lock().unwrap().clone()));
        {
            let mut c = counts.lock().unwrap();
            c.reasons = vec![0; orca_common::REASONS.len()];
            c.reasons[orca_common::REASON_NO_SNAT_PORT as usize] = 4;
            c.conntrack.entries = 1200;
            c.conntrack.snat_ports = 300;
            c.conntrack.other_maps = vec![(orca_common::MAP_FRONTENDS, 7)];
        }
        let text = m.encode();
        for (series, want) in [
            ("orca_map_entries{map=\"ORCA_CT4\"}", 1200.0),
            ("orca_map_entries{map=\"ORCA_FRONTENDS\"}", 7.0),
            ("orca_snat_ports_in_use", 300.0),
            ("orca_datapath_drops_total{reason=\"no_snat_port\"}", 4.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
        // The next scrape reads again.
        counts.lock().unwrap().conntrack.entries = 2;
        assert_eq!(value(&m.encode(), "orca_map_entries{map=\"ORCA_CT4\"}"), Some(2.0));
    }

    #[test]
    fn pending_changes_and_invalid_objects_are_exported_as_they_move() {
        let m = Metrics::new();
        let text = m.encode();
        // Before the watchers start: every series is there, at 0.
        for series in [
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "orca_invalid_objects_total{kind=\"Service\"}",
            "orca_invalid_objects_total{kind=\"EndpointSlice\"}",
        ] {
            assert_eq!(value(&text, series), Some(0.0), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes_pending gauge"));
        // The tracker's pending changes are read on each scrape.
        let pending = Arc::new(Mutex::new(PendingChanges {
            services: 3,
            endpoints: 2,
        }));
        let source = pending.clone();
        m.pending.source.set(Box::new(move || *source.lock().unwrap()));
        let text = m.encode();
        assert_eq!(
            value(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            Some(3.0)
        );
        assert_eq!(
            value(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            Some(2.0)
        );
        *pending.lock().unwrap() = PendingChanges::default();
        let text = m.encode();
        assert_eq!(
            value(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            Some(0.0)
        );
        // The tracker's cumulative counts, as the sync loop publishes them.
        m.set_tracker_counters(&Counters {
            service_changes: 7,
            endpoint_changes: 5,
            invalid_services: 2,
            invalid_slices: 1,
        });
        let text = m.encode();
        for (series, want) in [
            ("kubeproxy_sync_proxy_rules_service_changes_total", 7.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 5.0),
            ("orca_invalid_objects_total{kind=\"Service\"}", 2.0),
            ("orca_invalid_objects_total{kind=\"EndpointSlice\"}", 1.0),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series} in\n{text}");
        }
    }
}
