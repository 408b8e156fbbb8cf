//! The sandbox: a real kube-apiserver, kube-controller-manager and nodes, all inside network namespaces.
