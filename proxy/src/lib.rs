//! Orca's agent: Kubernetes objects -> service model -> diff -> one dataplane.

pub mod dataplane;
pub mod model;
