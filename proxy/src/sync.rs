//! The bounded-frequency sync runner: applies the tracker's diffs to the dataplane.
//!
//! Like kube-proxy's BoundedFrequencyRunner: a change triggers a sync at once while the burst allows it, syncs are
//! otherwise at least `min_sync_period` apart (changes arriving meanwhile are batched), a periodic sync runs every
//! `sync_period` even without changes (the dataplane re-checks its hooks: jump rules, new pod interfaces), and a full
//! resync runs at start, after a failure, and once an hour (kube-proxy's FullSyncPeriod).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::dataplane::Dataplane;
use crate::healthcheck::{HealthCheckServers, SyncHealth};
use crate::metrics::Metrics;
use crate::watch::WatchState;

/// How often a full resync rewrites everything, as kube-proxy's iptables mode does.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Burst of syncs allowed back to back before `min_sync_period` applies (kube-proxy uses 2).
const BURST: u32 = 2;

#[derive(Debug, Clone, Copy)]
pub struct SyncConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
}

/// A token bucket: `BURST` tokens, one refilled every `min`.
struct RateLimit {
    min: Duration,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(min: Duration) -> Self {
        Self {
            min,
            tokens: f64::from(BURST),
            last: Instant::now(),
        }
    }

    /// How long to wait before the next sync may start.
    fn wait(&mut self) -> Duration {
        if self.min.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() / self.min.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.last = now;
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            self.min.mul_f64(1.0 - self.tokens)
        }
    }

    fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

/// Runs syncs forever (until the task is dropped).
pub async fn run(
    shared: WatchState,
    mut dataplane: Box<dyn Dataplane>,
    cfg: SyncConfig,
    health: Arc<SyncHealth>,
    metrics: Arc<Metrics>,
    mut health_checks: HealthCheckServers,
) {
    // kube-proxy's SyncLoop marks the proxy updated at its start, in case no sync ever succeeds.
    health.updated();
    shared.wait_synced().await;
    health.initialized();
    tracing::info!(mode = %dataplane.mode(), "caches synced; starting syncs");
    let mut limit = RateLimit::new(cfg.min_sync_period);
    let mut need_full = true;
    let mut last_full = Instant::now();
    let mut last_sync = Instant::now();
    // Since when some service ports have failed to program (a full BPF map, ...), while they still do.
    let mut failing_since: Option<Instant> = None;
    loop {
        let wait = limit.wait();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        limit.take();
        let full = need_full || last_full.elapsed() >= FULL_SYNC_PERIOD;
        let periodic = last_sync.elapsed() >= cfg.sync_period;
        let start = Instant::now();
        let (diff, counters, desired, node) = {
            let mut t = shared.lock();
            let diff = t.take_diff();
            (diff, t.counters(), t.desired_shared(), t.node().clone())
        };
        // The changes taken now are queued until a sync succeeds; this holds while the dataplane call hangs.
        if let Some(oldest) = diff.oldest_change {
            health.queued_at(oldest);
        }
        let result = if full {
            tokio::task::block_in_place(|| dataplane.full_sync(&desired, &node))
        } else if !diff.is_empty() || periodic {
            tokio::task::block_in_place(|| dataplane.apply(&diff, &desired, &node))
        } else {
            Ok(Default::default())
        };
        let took = start.elapsed().as_secs_f64();
        match result {
            Ok(stats) => {
                need_full = false;
                let ran = full || periodic || !diff.is_empty();
                if ran {
                    last_sync = Instant::now();
                    metrics.sync_duration.observe(took);
                }
                if full {
                    last_full = Instant::now();
                    metrics.sync_full_duration.observe(took);
                } else if ran {
                    metrics.sync_partial_duration.observe(took);
                }
                let now = SystemTime::now();
                metrics.last_sync_timestamp.set(unix_seconds(now));
                for t in &diff.trigger_times {
                    if let Ok(d) = now.duration_since(*t) {
                        metrics.network_programming_duration.observe(d.as_secs_f64());
                    }
                }
                metrics.service_ports.set(desired.len() as i64);
                if ran {
                    metrics.failed_service_ports.set(stats.failed_service_ports as i64);
                }
                if stats.conntrack_cleanup_failed {
                    metrics.conntrack_cleanup_errors_total.inc();
                }
                if ran {
                    failing_since = if stats.failed_service_ports == 0 {
                        None
                    } else {
                        failing_since.or(Some(start))
                    };
                }
                match failing_since {
                    // Every change is programmed.
                    None => health.updated(),
                    // Service ports the dataplane could not program are changes still waiting: /healthz turns 503
                    // once they have waited the health timeout, as kube-proxy's does when its restore keeps failing.
                    Some(since) => health.queued_at(since),
                }
                if full {
                    health_checks.sync(&desired, &node.addresses);
                } else {
                    health_checks.apply(&diff, &node.addresses);
                }
                if full || !diff.is_empty() {
                    tracing::debug!(
                        full,
                        upserted = diff.upserted.len(),
                        removed = diff.removed.len(),
                        written = stats.objects_written,
                        seconds = took,
                        since_first_change = diff.oldest_change.map(|o| o.elapsed().as_secs_f64()),
                        "synced"
                    );
                }
            }
            Err(e) => {
                need_full = true;
                metrics.sync_errors_total.inc();
                tracing::error!(error = format!("{e:#}"), full, "sync failed; retrying with a full sync");
            }
        }
        metrics.set_tracker_counters(&counters);

        // Wait for the next change, the next periodic sync, or a retry after a failure.
        let until_periodic = cfg.sync_period.saturating_sub(last_sync.elapsed());
        let retry = if need_full {
            Duration::from_secs(1).max(cfg.min_sync_period)
        } else {
            until_periodic
        };
        let notified = shared.changed.notified();
        if shared.lock().has_pending() {
            metrics.last_queued_timestamp.set(unix_seconds(SystemTime::now()));
            continue;
        }
        tokio::select! {
            _ = notified => {
                metrics.last_queued_timestamp.set(unix_seconds(SystemTime::now()));
            }
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_bursts_then_spaces() {
        let mut r = RateLimit::new(Duration::from_secs(10));
        assert_eq!(r.wait(), Duration::ZERO);
        r.take();
        assert_eq!(r.wait(), Duration::ZERO);
        r.take();
        let w = r.wait();
        assert!(w > Duration::from_secs(9) && w <= Duration::from_secs(10), "{w:?}");
        let mut z = RateLimit::new(Duration::ZERO);
        for _ in 0..10 {
            assert_eq!(z.wait(), Duration::ZERO);
            z.take();
        }
    }

    use crate::dataplane::SyncStats;
    use crate::model::state::Snapshot;

    /// A dataplane whose syncs leave `failing` service ports unprogrammed.
    struct Failing(Arc<std::sync::atomic::AtomicUsize>);

    impl crate::dataplane::Dataplane for Failing {
        fn mode(&self) -> crate::dataplane::ProxyMode {
            crate::dataplane::ProxyMode::Ebpf
        }
        fn full_sync(&mut self, _: &Snapshot, _: &crate::model::NodeInfo) -> anyhow::Result<SyncStats> {
            Ok(SyncStats {
                failed_service_ports: self.0.load(std::sync::atomic::Ordering::SeqCst),
                ..Default::default()
            })
        }
        fn apply(
            &mut self,
            _: &crate::model::tracker::Diff,
            d: &Snapshot,
            n: &crate::model::NodeInfo,
        ) -> anyhow::Result<SyncStats> {
            self.full_sync(d, n)
        }
        fn cleanup(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
        fn cluster_frontends(
            &self,
            _: &Snapshot,
            _: &crate::model::NodeInfo,
        ) -> anyhow::Result<crate::verify::FrontendMap> {
            Ok(Default::default())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn service_ports_that_fail_to_program_keep_the_health_queued() {
        let shared = WatchState::new(crate::model::tracker::ChangeTracker::new(Default::default()));
        for i in 0..3 {
            shared.set_synced(i);
        }
        let health = Arc::new(SyncHealth::watching(shared.clone()));
        let failing = Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let cfg = SyncConfig {
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_millis(50),
        };
        let hc = HealthCheckServers::new(health.clone(), Duration::from_secs(1), vec![]);
        let runner = tokio::spawn(run(
            shared.clone(),
            Box::new(Failing(failing.clone())),
            cfg,
            health.clone(),
            Arc::new(Metrics::new()),
            hc,
        ));
        // Syncs succeed but leave a port unprogrammed: the node does not serve what it should.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!health.status(Duration::from_millis(200)).healthy);
        assert!(!health.first_synced());
        // Programmed on a later (periodic) sync: healthy again, whatever the timeout.
        failing.store(0, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(health.status(Duration::ZERO).healthy);
        assert!(health.first_synced());
        runner.abort();
    }
}
