//! Health, as kube-proxy's pkg/proxy/healthcheck splits it: [`proxy_health`] for the proxy's own /healthz and
//! /livez and the sync state behind them, [`service_health`] for the healthCheckNodePort servers of eTP=Local
//! Services.

pub mod proxy_health;
pub mod service_health;

pub use proxy_health::{proxy_health_body, HealthStatus, ProxyHealthServer, SyncHealth, FIRST_SYNC_LIVENESS};
pub use service_health::HealthCheckServers;
