//! The objects a benchmark needs on the sandbox's apiserver: filler Services with hand-made EndpointSlices
//! (created in bulk, concurrently), the measured Services, and the programming-latency Service whose slice the
//! benchmark patches itself.
use anyhow::{bail, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime};

/// Namespace of the filler Services. It sorts before [`BENCH_NS`]: Orca's iptables mode writes its dispatch chain
/// in (namespace, name) order, so the measured Services come last there — the worst place, as the issue asks.
pub const FILL_NS: &str = "a-bench-fill";
/// Namespace of the pods and measured Services.
pub const BENCH_NS: &str = "bench";
/// Label value of `endpointslice.kubernetes.io/managed-by` on the slices the benchmark writes.
pub const MANAGED_BY: &str = "orca-bench";
/// Concurrent requests while creating fillers (default of `--fill-concurrency`).
pub const FILL_CONCURRENCY: usize = 64;

/// Endpoints of filler `i`: `fixed`, or 2 to 10 in turn.
pub fn filler_endpoint_count(i: usize, fixed: Option<usize>) -> usize {
    fixed.unwrap_or(2 + i % 9)
}

/// Dummy endpoint address `j` of filler `i`: inside the cluster CIDR 10.244.0.0/16 but outside both nodes' pod
/// CIDRs (10.244.1.0/24, 10.244.2.0/24), so no real pod has it; nothing is ever sent there.
pub fn filler_ip(i: usize, j: usize) -> Ipv4Addr {
    let n = (i * 10 + j) as u32;
    // 10.244.16.0 .. 10.244.255.255: 240 * 256 addresses, reused cyclically (addresses may repeat across
    // Services, as real pods can back several Services).
    let host = n % (240 * 256);
    Ipv4Addr::new(10, 244, 16 + (host / 256) as u8, (host % 256) as u8)
}

pub async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_none() {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
    }
    Ok(())
}

fn slice_json(ns: &str, name: &str, service: &str, eps: &[(Ipv4Addr, bool)], port: u16) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, ready)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": ready, "serving": ready, "terminating": false}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY
            }
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

fn selectorless_service(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

/// How many filler Services exist now.
pub async fn filler_count(client: &Client) -> Result<usize> {
    let api: Api<Service> = Api::namespaced(client.clone(), FILL_NS);
    let l = api.list_metadata(&ListParams::default()).await?;
    Ok(l.items.len())
}

/// Create fillers `from..to` (Service, then its slice), `concurrency` requests at a time (kube-rs has no
/// client-side rate limit: the apiserver is the only bound). Prints progress every 5,000 fillers. Returns the
/// number of objects created per second.
pub async fn create_fillers(
    client: &Client,
    from: usize,
    to: usize,
    concurrency: usize,
    endpoints: Option<usize>,
) -> Result<f64> {
    if to <= from {
        return Ok(0.0);
    }
    ensure_namespace(client, FILL_NS).await?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), FILL_NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), FILL_NS);
    let t0 = Instant::now();
    let pp = PostParams::default();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let done = &done;
    stream::iter(from..to)
        .map(|i| {
            let (svcs, slices, pp) = (svcs.clone(), slices.clone(), pp.clone());
            async move {
                let name = format!("fill-{i}");
                let s: Service = serde_json::from_value(selectorless_service(FILL_NS, &name))?;
                create_or_exists(svcs.create(&pp, &s).await).with_context(|| format!("creating service {name}"))?;
                let eps: Vec<(Ipv4Addr, bool)> = (0..filler_endpoint_count(i, endpoints))
                    .map(|j| (filler_ip(i, j), true))
                    .collect();
                let sl: EndpointSlice =
                    serde_json::from_value(slice_json(FILL_NS, &format!("{name}-x"), &name, &eps, 8080))?;
                create_or_exists(slices.create(&pp, &sl).await).with_context(|| format!("creating slice of {name}"))?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(5000) {
                    println!(
                        "bench: {n}/{} fillers ({:.0} objects/s)",
                        to - from,
                        2.0 * n as f64 / t0.elapsed().as_secs_f64()
                    );
                }
                Ok::<(), anyhow::Error>(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(2.0 * (to - from) as f64 / t0.elapsed().as_secs_f64())
}

fn create_or_exists<T>(r: kube::Result<T>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Delete Service `name` (and the slices the benchmark wrote for it) in `ns`, waiting until it is gone.
pub async fn delete_service(client: &Client, ns: &str, name: &str) -> Result<()> {
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let _ = svcs.delete(name, &DeleteParams::default()).await;
    let lp = ListParams::default().labels(&format!(
        "kubernetes.io/service-name={name},endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
    ));
    let _ = slices.delete_collection(&DeleteParams::default(), &lp).await;
    let t0 = Instant::now();
    while svcs.get_opt(name).await?.is_some() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("service {ns}/{name} still there after 30s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// (Re)create a dual-stack Service selecting `app=<app>` with ports 80->8080 (http), 9000 (echo), 9001 (sink);
/// returns its IPv4 and IPv6 cluster IPs.
pub async fn create_selector_service(client: &Client, name: &str, app: &str) -> Result<(Ipv4Addr, Ipv6Addr)> {
    delete_service(client, BENCH_NS, name).await?;
    let v = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": BENCH_NS},
        "spec": {"type": "ClusterIP", "selector": {"app": app},
                 "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"], "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "echo", "port": 9000, "targetPort": 9000, "protocol": "TCP"},
            {"name": "sink", "port": 9001, "targetPort": 9001, "protocol": "TCP"}
        ]}
    });
    let s: Service = serde_json::from_value(v)?;
    let s = Api::<Service>::namespaced(client.clone(), BENCH_NS)
        .create(&PostParams::default(), &s)
        .await
        .with_context(|| format!("creating service {name}"))?;
    let v6 = s
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ips.as_ref())
        .and_then(|ips| ips.iter().find_map(|ip| ip.parse::<Ipv6Addr>().ok()))
        .with_context(|| format!("service {name} has no IPv6 cluster IP"))?;
    Ok((cluster_ip(&s)?, v6))
}

fn cluster_ip(s: &Service) -> Result<Ipv4Addr> {
    let ip = s
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .context("service has no clusterIP")?;
    ip.parse().with_context(|| format!("clusterIP {ip:?}"))
}

/// The programming-latency Service: selector-less, with one slice the benchmark owns listing `backends`
/// (port 8080), all ready. Returns its ClusterIP.
pub async fn create_prog_service(client: &Client, name: &str, backends: &[Ipv4Addr]) -> Result<Ipv4Addr> {
    delete_service(client, BENCH_NS, name).await?;
    let s: Service = serde_json::from_value(selectorless_service(BENCH_NS, name))?;
    let s = Api::<Service>::namespaced(client.clone(), BENCH_NS)
        .create(&PostParams::default(), &s)
        .await
        .with_context(|| format!("creating service {name}"))?;
    let eps: Vec<(Ipv4Addr, bool)> = backends.iter().map(|ip| (*ip, true)).collect();
    let sl: EndpointSlice = serde_json::from_value(slice_json(BENCH_NS, &format!("{name}-x"), name, &eps, 8080))?;
    Api::<EndpointSlice>::namespaced(client.clone(), BENCH_NS)
        .create(&PostParams::default(), &sl)
        .await
        .with_context(|| format!("creating the slice of {name}"))?;
    cluster_ip(&s)
}

/// RFC 3339 UTC time with microseconds, for `endpoints.kubernetes.io/last-change-trigger-time` (which upstream
/// kube-proxy's network_programming_duration_seconds measures from).
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Rewrite the endpoints of the programming-latency slice: `backends` with their readiness, stamped with the
/// trigger-time annotation.
pub async fn set_prog_endpoints(client: &Client, name: &str, backends: &[(Ipv4Addr, bool)]) -> Result<()> {
    let eps: Vec<Value> = backends
        .iter()
        .map(|(ip, r)| json!({"addresses": [ip.to_string()], "conditions": {"ready": r, "serving": r, "terminating": false}}))
        .collect();
    let patch = json!({
        "metadata": {"annotations": {"endpoints.kubernetes.io/last-change-trigger-time": rfc3339_now()}},
        "endpoints": eps
    });
    Api::<EndpointSlice>::namespaced(client.clone(), BENCH_NS)
        .patch(&format!("{name}-x"), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching the slice of {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_shape() {
        let counts: Vec<usize> = (0..9).map(|i| filler_endpoint_count(i, None)).collect();
        assert_eq!(counts, vec![2, 3, 4, 5, 6, 7, 8, 9, 10]);
        for i in [0, 1, 999, 29_999] {
            for j in 0..filler_endpoint_count(i, None) {
                let ip = filler_ip(i, j);
                let o = ip.octets();
                assert_eq!((o[0], o[1]), (10, 244));
                assert!(o[2] >= 16, "{ip} collides with a node pod CIDR");
            }
        }
        let v = slice_json("ns", "s-x", "s", &[(Ipv4Addr::new(10, 244, 16, 1), false)], 8080);
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "s");
        assert_eq!(v["endpoints"][0]["conditions"]["ready"], false);
    }

    #[test]
    fn rfc3339() {
        let s = rfc3339_now();
        assert_eq!(s.len(), "2026-11-26T15:00:00.000000Z".len(), "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T", "{s}");
    }
}
