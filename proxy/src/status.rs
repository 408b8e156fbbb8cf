//! `orca-proxy status`: the desired state per service port, as computed from the apiserver.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;

use crate::app::{kube_client, Settings};
use crate::dataplane::iptables::exec::Exec;
use crate::model::state::Snapshot;
use crate::model::tracker::ChangeTracker;
use crate::model::PROXY_LABEL_SELECTOR;
use crate::verify;
use crate::watch::node_info;

/// Lists Services, EndpointSlices and the Node once and computes the desired state this node should hold.
pub async fn desired_state(s: &Settings) -> anyhow::Result<(Snapshot, crate::model::NodeInfo)> {
    let client = kube_client(s).await?;
    let lp = ListParams::default().labels(PROXY_LABEL_SELECTOR);
    let node = Api::<Node>::all(client.clone()).get_opt(&s.node_name).await?;
    let mut t = ChangeTracker::new(node_info(&s.node_name, node.as_ref()));
    for svc in Api::<Service>::all(client.clone()).list(&lp).await? {
        t.service_updated(&svc);
    }
    for slice in Api::<EndpointSlice>::all(client).list(&lp).await? {
        t.slice_updated(&slice);
    }
    t.take_diff();
    Ok((t.desired().clone(), t.node().clone()))
}

/// Renders the state as a table: one line per service port, its frontends and the endpoints this node uses.
pub fn render_table(state: &Snapshot) -> String {
    let mut out = String::from("SERVICE PORT\tFRONTENDS\tENDPOINTS (internal / external)\n");
    for (name, st) in state {
        let p = &st.port;
        let mut fronts: Vec<String> = p.cluster_ips.iter().map(|ip| format!("{ip}:{}", p.port)).collect();
        if let Some(np) = p.node_port {
            fronts.push(format!("*:{np}"));
        }
        fronts.extend(
            p.load_balancer_ips
                .iter()
                .chain(&p.external_ips)
                .map(|ip| format!("{ip}:{}", p.port)),
        );
        let list = |eps: &[crate::model::Endpoint]| {
            if eps.is_empty() {
                "-".to_string()
            } else {
                eps.iter().map(|e| e.addr_string()).collect::<Vec<_>>().join(",")
            }
        };
        out.push_str(&format!(
            "{name}\t{}\t{} / {}\n",
            fronts.join(","),
            list(st.internal_endpoints()),
            list(st.external_endpoints())
        ));
    }
    out
}

/// Reads the ClusterIP frontends back from the kernel: the pinned eBPF maps when they exist, else iptables.
pub fn programmed(
    s: &Settings,
    desired: &Snapshot,
    node: &crate::model::NodeInfo,
) -> anyhow::Result<(&'static str, verify::FrontendMap)> {
    match crate::dataplane::ebpf::dump(&s.bpf_root) {
        Ok(views) => Ok(("ebpf", verify::ebpf_cluster_frontends(&views, desired, &node.addresses))),
        Err(e) => {
            tracing::debug!(error = format!("{e:#}"), "no pinned eBPF maps; reading iptables");
            let save = Exec::detect(None).save("nat")?;
            Ok(("iptables", verify::iptables_cluster_frontends(&save)))
        }
    }
}

pub async fn run(s: &Settings, json: bool, verify: bool) -> anyhow::Result<()> {
    let (state, node) = desired_state(s).await?;
    if json {
        let list: Vec<&crate::model::state::ServicePortState> = state.values().map(|s| s.as_ref()).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_table(&state));
    }
    if verify {
        let (mode, have) = programmed(s, &state, &node)?;
        let drift = verify::compare(&verify::desired_cluster_frontends(&state), &have);
        if drift.is_empty() {
            println!(
                "verify ({mode}): {} ClusterIP frontends match the desired state",
                have.len()
            );
        } else {
            for d in &drift {
                println!("DRIFT ({mode}): {d}");
            }
            anyhow::bail!(
                "{} differences between the kernel ({mode}) and the desired state",
                drift.len()
            );
        }
    }
    Ok(())
}
