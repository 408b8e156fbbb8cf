//! The bounded-frequency sync runner: applies the tracker's diffs to the dataplane.
//!
//! Like kube-proxy's BoundedFrequencyRunner: a change triggers a sync at once while the burst allows it, syncs are
//! otherwise at least `min_sync_period` apart (changes arriving meanwhile are batched), a periodic sync runs every
//! `sync_period` even without changes (the dataplane re-checks its hooks: jump rules, new pod interfaces), and a full
//! resync runs at start, after a failure, and once an hour (kube-proxy's FullSyncPeriod).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::dataplane::Dataplane;
use crate::healthcheck::HealthCheckServers;
use crate::metrics::Metrics;
use crate::watch::Shared;

/// How often a full resync rewrites everything, as kube-proxy's iptables mode does.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Burst of syncs allowed back to back before `min_sync_period` applies (kube-proxy uses 2).
const BURST: u32 = 2;

#[derive(Debug, Clone, Copy)]
pub struct SyncConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
}

/// What the health server needs to know about syncs.
#[derive(Debug, Default)]
pub struct SyncHealth {
    inner: Mutex<HealthInner>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    /// The oldest change queued and not yet programmed.
    oldest_queued: Option<SystemTime>,
}

impl SyncHealth {
    pub fn queued(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.oldest_queued.get_or_insert_with(SystemTime::now);
    }

    pub fn updated(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.last_updated = Some(SystemTime::now());
        g.oldest_queued = None;
    }

    /// kube-proxy's rule: healthy unless a queued change has waited longer than `timeout`, or no sync ever
    /// succeeded within `timeout` of the first queued change. Returns (healthy, last_updated).
    pub fn check(&self, timeout: Duration) -> (bool, Option<SystemTime>) {
        let g = *self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let healthy = match g.oldest_queued {
            None => true,
            Some(q) => now.duration_since(q).unwrap_or_default() < timeout,
        };
        (healthy, g.last_updated)
    }
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
    shared: Shared,
    mut dataplane: Box<dyn Dataplane>,
    cfg: SyncConfig,
    health: Arc<SyncHealth>,
    metrics: Arc<Metrics>,
    mut health_checks: HealthCheckServers,
) {
    health.queued();
    shared.wait_synced().await;
    tracing::info!(mode = %dataplane.mode(), "caches synced; starting syncs");
    let mut limit = RateLimit::new(cfg.min_sync_period);
    let mut need_full = true;
    let mut last_full = Instant::now();
    let mut last_sync = Instant::now();
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
            (diff, t.counters(), t.desired().clone(), t.node().clone())
        };
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
                health.updated();
                health_checks.sync(&desired, &node.addresses);
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
        metrics
            .service_changes_total
            .inner()
            .store(counters.service_changes, std::sync::atomic::Ordering::Relaxed);
        metrics
            .endpoint_changes_total
            .inner()
            .store(counters.endpoint_changes, std::sync::atomic::Ordering::Relaxed);

        // Wait for the next change, the next periodic sync, or a retry after a failure.
        let until_periodic = cfg.sync_period.saturating_sub(last_sync.elapsed());
        let retry = if need_full {
            Duration::from_secs(1).max(cfg.min_sync_period)
        } else {
            until_periodic
        };
        let notified = shared.changed.notified();
        if shared.lock().has_pending() {
            health.queued();
            metrics.last_queued_timestamp.set(unix_seconds(SystemTime::now()));
            continue;
        }
        tokio::select! {
            _ = notified => {
                health.queued();
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

    #[test]
    fn health_turns_unhealthy_when_queued_too_long() {
        let h = SyncHealth::default();
        assert!(h.check(Duration::from_secs(1)).0);
        h.queued();
        assert!(h.check(Duration::from_secs(60)).0);
        assert!(!h.check(Duration::ZERO).0);
        h.updated();
        let (ok, last) = h.check(Duration::ZERO);
        assert!(ok && last.is_some());
    }
}
