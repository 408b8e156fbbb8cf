//! core/v1 Service -> [`ServicePort`]s, with kube-proxy's skipping and defaulting rules.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;

use super::{
    Cidr, LoadBalancing, Protocol, ServiceName, ServicePort, ServicePortName, TrafficPolicy, ANNOTATION_LOAD_BALANCING,
    DEFAULT_AFFINITY_TIMEOUT, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
};

/// Why a Service yields no service ports at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    /// clusterIP is "None": DNS-only.
    #[error("headless (clusterIP None)")]
    Headless,
    /// No cluster IP allocated (yet).
    #[error("no cluster IP")]
    NoClusterIp,
    #[error("type ExternalName")]
    ExternalName,
    /// Carries `service.kubernetes.io/service-proxy-name`: another proxy owns it.
    #[error("labelled {}", LABEL_SERVICE_PROXY_NAME)]
    OtherProxy,
    /// Carries `service.kubernetes.io/headless`.
    #[error("labelled {}", LABEL_HEADLESS)]
    HeadlessLabel,
    /// Missing namespace or name.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Problems with parts of a Service that are skipped while the rest is used.
pub type Warnings = Vec<String>;

/// The name of a Service object.
pub fn service_name(svc: &Service) -> Result<ServiceName, Skip> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    if ns.is_empty() || name.is_empty() {
        return Err(Skip::Malformed("missing namespace or name".into()));
    }
    Ok(ServiceName::new(ns, name))
}

fn parse_ips(what: &str, raw: &[String], warnings: &mut Warnings) -> Vec<IpAddr> {
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => warnings.push(format!("ignoring invalid {what} {s:?}")),
        }
    }
    out
}

/// Turns a Service into its service ports, or says why kube-proxy would ignore it. Warnings name the parts that
/// were dropped (an invalid external IP, a port out of range, ...); the rest of the Service is still used.
pub fn service_ports(svc: &Service) -> Result<(Vec<ServicePort>, Warnings), Skip> {
    let name = service_name(svc)?;
    if let Some(labels) = &svc.metadata.labels {
        if labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
            return Err(Skip::OtherProxy);
        }
        if labels.contains_key(LABEL_HEADLESS) {
            return Err(Skip::HeadlessLabel);
        }
    }
    let spec = svc.spec.as_ref().ok_or_else(|| Skip::Malformed("no spec".into()))?;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Err(Skip::ExternalName);
    }
    let primary = spec.cluster_ip.as_deref().unwrap_or_default();
    if primary == "None" {
        return Err(Skip::Headless);
    }
    let mut warnings = Warnings::new();
    let load_balancing = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_LOAD_BALANCING))
        .and_then(|v| match v.parse::<LoadBalancing>() {
            Ok(lb) => Some(lb),
            Err(e) => {
                warnings.push(format!(
                    "annotation {ANNOTATION_LOAD_BALANCING}: {e}; using the default"
                ));
                None
            }
        });
    let mut raw_ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if raw_ips.is_empty() && !primary.is_empty() {
        raw_ips.push(primary.to_string());
    }
    let cluster_ips = parse_ips("cluster IP", &raw_ips, &mut warnings);
    if cluster_ips.is_empty() {
        return Err(Skip::NoClusterIp);
    }

    let external_ips = parse_ips(
        "external IP",
        spec.external_ips.as_deref().unwrap_or_default(),
        &mut warnings,
    );
    let mut load_balancer_ips = Vec::new();
    for ing in svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        // Proxy-mode load balancers deliver to the node themselves; kube-proxy programs only VIP-mode ingress IPs.
        if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) if !load_balancer_ips.contains(&ip) => load_balancer_ips.push(ip),
            Ok(_) => {}
            Err(_) => warnings.push(format!("ignoring invalid load-balancer ingress IP {ip:?}")),
        }
    }
    let mut load_balancer_source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.as_deref().unwrap_or_default() {
        match r.parse::<Cidr>() {
            Ok(c) => load_balancer_source_ranges.push(c),
            Err(e) => warnings.push(format!("ignoring loadBalancerSourceRange: {e}")),
        }
    }

    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|t| *t > 0)
            .map(|t| Duration::from_secs(t as u64))
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    // Service-level rules, as in kube-proxy's apiservice helpers.
    let externally_accessible =
        matches!(svc_type, "LoadBalancer" | "NodePort") || (svc_type == "ClusterIP" && !external_ips.is_empty());
    let external_policy = if externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local") {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    };
    let internal_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let health_check_node_port = if svc_type == "LoadBalancer" && external_policy == TrafficPolicy::Local {
        match spec.health_check_node_port {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            _ => {
                warnings.push("LoadBalancer with externalTrafficPolicy Local has no valid healthCheckNodePort".into());
                None
            }
        }
    } else {
        None
    };

    let mut ports = Vec::new();
    for p in spec.ports.as_deref().unwrap_or_default() {
        let port_name = p.name.clone().unwrap_or_default();
        let protocol = match Protocol::parse(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(e) => {
                warnings.push(format!("ignoring port {port_name:?}: {e}"));
                continue;
            }
        };
        let Some(port) = u16::try_from(p.port).ok().filter(|p| *p != 0) else {
            warnings.push(format!("ignoring port {port_name:?}: port {} out of range", p.port));
            continue;
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    warnings.push(format!("ignoring nodePort {n} of port {port_name:?}: out of range"));
                    None
                }
            },
        };
        let spn = ServicePortName {
            service: name.clone(),
            port: port_name.into(),
            protocol,
        };
        if ports.iter().any(|sp: &ServicePort| sp.name == spn) {
            warnings.push(format!("ignoring duplicate port {spn}"));
            continue;
        }
        ports.push(ServicePort {
            name: spn,
            cluster_ips: cluster_ips.clone(),
            port,
            protocol,
            node_port,
            load_balancer_ips: load_balancer_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            session_affinity,
            external_policy,
            internal_policy,
            health_check_node_port,
            traffic_distribution: spec.traffic_distribution.clone(),
            load_balancing,
        });
    }
    Ok((ports, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn clusterip_service_with_named_ports() {
        let s = svc(json!({
            "metadata": {"namespace": "default", "name": "alpaca-prod"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }));
        let (ports, warnings) = service_ports(&s).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].name.to_string(), "default/alpaca-prod:http/TCP");
        assert_eq!(ports[1].name.to_string(), "default/alpaca-prod:dns/UDP");
        assert_eq!(ports[1].protocol, Protocol::Udp);
        assert_eq!(ports[0].cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert!(!ports[0].externally_accessible());
        assert!(ports[0].uses_cluster_endpoints());
        assert!(!ports[0].uses_local_endpoints());
    }

    #[test]
    fn constructor_builds_what_a_minimal_cluster_ip_service_parses_to() {
        let s = svc(json!({
            "metadata": {"namespace": "default", "name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "protocol": "UDP"}, {"port": 443}]}
        }));
        let (ports, warnings) = service_ports(&s).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(
            ports,
            vec![
                ServicePort::new(ServicePortName::new("default", "web", "http", Protocol::Udp), vip, 80),
                ServicePort::new(ServicePortName::new("default", "web", "", Protocol::Tcp), vip, 443),
            ]
        );
    }

    #[test]
    fn skipped_services() {
        let base = |spec: serde_json::Value, labels: serde_json::Value| {
            svc(json!({"metadata": {"namespace": "ns", "name": "s", "labels": labels}, "spec": spec}))
        };
        let ports = json!([{"port": 80}]);
        assert_eq!(
            service_ports(&base(json!({"clusterIP": "None", "ports": ports}), json!({}))).unwrap_err(),
            Skip::Headless
        );
        assert_eq!(
            service_ports(&base(
                json!({"type": "ExternalName", "externalName": "x.example"}),
                json!({})
            ))
            .unwrap_err(),
            Skip::ExternalName
        );
        assert_eq!(
            service_ports(&base(json!({"ports": ports}), json!({}))).unwrap_err(),
            Skip::NoClusterIp
        );
        assert_eq!(
            service_ports(&base(
                json!({"clusterIP": "10.96.0.1", "ports": ports}),
                json!({LABEL_SERVICE_PROXY_NAME: "other"})
            ))
            .unwrap_err(),
            Skip::OtherProxy
        );
        assert_eq!(
            service_ports(&base(
                json!({"clusterIP": "10.96.0.1", "ports": ports}),
                json!({LABEL_HEADLESS: ""})
            ))
            .unwrap_err(),
            Skip::HeadlessLabel
        );
        let nameless = svc(json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.96.0.1"}}));
        assert!(matches!(service_ports(&nameless).unwrap_err(), Skip::Malformed(_)));
    }

    #[test]
    fn load_balancer_local_with_everything() {
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.1.1", "clusterIPs": ["10.96.1.1", "fd00::1"],
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "externalIPs": ["192.0.2.7", "not-an-ip"],
                     "loadBalancerSourceRanges": [" 198.51.100.0/24 ", "bad/99"],
                     "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "trafficDistribution": "PreferSameZone",
                     "ports": [{"port": 80, "nodePort": 31080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"ip": "203.0.113.10", "ipMode": "Proxy"},
                                                      {"hostname": "lb.example"}]}}
        }));
        let (ports, warnings) = service_ports(&s).unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        let p = &ports[0];
        assert_eq!(p.name.to_string(), "ns/lb/TCP");
        assert_eq!(p.cluster_ips.len(), 2);
        assert_eq!(p.node_port, Some(31080));
        assert_eq!(p.load_balancer_ips, vec!["203.0.113.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.external_ips, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            p.load_balancer_source_ranges,
            vec!["198.51.100.0/24".parse::<Cidr>().unwrap()]
        );
        assert_eq!(p.session_affinity, Some(Duration::from_secs(60)));
        assert_eq!(p.external_policy, TrafficPolicy::Local);
        assert_eq!(p.health_check_node_port, Some(32000));
        assert_eq!(p.traffic_distribution.as_deref(), Some("PreferSameZone"));
        assert!(p.uses_cluster_endpoints() && p.uses_local_endpoints());
        assert_eq!(p.load_balancing, None);
    }

    #[test]
    fn load_balancing_annotation() {
        let with = |v: &str| {
            svc(json!({
                "metadata": {"namespace": "ns", "name": "s", "annotations": {"orca.dev/load-balancing": v}},
                "spec": {"clusterIP": "10.96.0.5", "ports": [{"port": 80}]}
            }))
        };
        let (ports, warnings) = service_ports(&with("maglev")).unwrap();
        assert_eq!(
            (ports[0].load_balancing, warnings.len()),
            (Some(LoadBalancing::Maglev), 0)
        );
        let (ports, _) = service_ports(&with("random")).unwrap();
        assert_eq!(ports[0].load_balancing, Some(LoadBalancing::Random));
        // A bad value is a warning; the Service is served with the default.
        let (ports, warnings) = service_ports(&with("round-robin")).unwrap();
        assert_eq!(ports[0].load_balancing, None);
        assert!(
            warnings.len() == 1
                && warnings[0].contains("orca.dev/load-balancing")
                && warnings[0].contains("round-robin"),
            "{warnings:?}"
        );
    }

    #[test]
    fn policies_follow_service_type() {
        // eTP=Local on a plain ClusterIP Service without external IPs has no effect.
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "c"},
            "spec": {"clusterIP": "10.96.1.2", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                     "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}
        }));
        let (ports, _) = service_ports(&s).unwrap();
        assert_eq!(ports[0].external_policy, TrafficPolicy::Cluster);
        assert_eq!(ports[0].internal_policy, TrafficPolicy::Local);
        assert_eq!(ports[0].session_affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert!(!ports[0].uses_cluster_endpoints());
        assert!(ports[0].uses_local_endpoints());
        // NodePort with eTP=Local: no health check node port (only LoadBalancer needs one).
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "n"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.1.3", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "nodePort": 30080}]}
        }));
        let (ports, warnings) = service_ports(&s).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(ports[0].external_policy, TrafficPolicy::Local);
        assert_eq!(ports[0].health_check_node_port, None);
    }

    #[test]
    fn bad_ports_are_dropped_not_fatal() {
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "p"},
            "spec": {"clusterIP": "10.96.1.4",
                     "ports": [{"name": "a", "port": 0}, {"name": "b", "port": 70000},
                               {"name": "c", "port": 80, "protocol": "ICMP"}, {"name": "d", "port": 81},
                               {"name": "d", "port": 82}]}
        }));
        let (ports, warnings) = service_ports(&s).unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 81);
        assert_eq!(warnings.len(), 4, "{warnings:?}");
    }
}
