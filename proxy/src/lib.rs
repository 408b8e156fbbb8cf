//! Orca's agent: Kubernetes objects -> service model -> diff -> one dataplane.

pub mod app;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod ebpf_obj;
pub mod events;
pub mod healthcheck;
pub mod http;
pub mod kernel_check;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod settings;
pub mod status;
pub mod sync;
pub mod verify;
pub mod watch;
