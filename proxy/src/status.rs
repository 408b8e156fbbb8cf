//! `orca-proxy status`: the desired state per service port, as computed from the apiserver.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::Api;

use crate::app::kube_client;
use crate::dataplane::ebpf;
use crate::model::state::Snapshot;
use crate::model::tracker::ChangeTracker;
use crate::model::PROXY_LABEL_SELECTOR;
use crate::settings::Settings;
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

/// Renders the eBPF datapath's counters: every drop and untranslated pass by reason, and the conntrack map.
pub fn render_datapath(maps_dir: &std::path::Path, d: &ebpf::DatapathCounts) -> String {
    let mut out = format!("DATAPATH (eBPF, {})\n", maps_dir.display());
    let ct = &d.conntrack;
    let share = if ct.capacity == 0 {
        0.0
    } else {
        100.0 * ct.entries as f64 / ct.capacity as f64
    };
    out.push_str(&format!(
        "conntrack\t{} of {} entries ({share:.1}%): {} service, {} reply ({} masquerade ports held), {} inner; {} expired, not yet collected\n",
        ct.entries, ct.capacity, ct.service, ct.reply, ct.snat_ports, ct.inner, ct.expired_deleted
    ));
    for (what, dropped) in [("drops", true), ("untranslated", false)] {
        let list: Vec<String> = orca_common::REASONS
            .iter()
            .zip(&d.reasons)
            .filter(|((_, drop), _)| *drop == dropped)
            .map(|((name, _), n)| format!("{name}={n}"))
            .collect();
        out.push_str(&format!("{what}\t{}\n", list.join(" ")));
    }
    out
}

/// The `host clients` line: whether the socket hooks that translate for host-network processes are attached.
pub fn render_socket_hooks(hooks: &[(&str, Option<u64>)]) -> String {
    let attached: Vec<u64> = hooks.iter().filter_map(|(_, id)| *id).collect();
    let mut ids = attached.clone();
    ids.dedup();
    match (attached.len(), ids.as_slice()) {
        (0, _) => "host clients\tno socket hooks attached: host-network processes get no Service translation \
                   (see --ebpf-cgroup-root)"
            .to_string(),
        (n, [id]) if n == hooks.len() => format!("host clients\tsocket hooks attached ({n} programs, cgroup id {id})"),
        (n, _) => {
            let missing: Vec<&str> = hooks
                .iter()
                .filter(|(_, id)| id.is_none())
                .map(|(name, _)| *name)
                .collect();
            format!(
                "host clients\t{n} of {} socket hooks attached (cgroup ids {ids:?}); missing: {}",
                hooks.len(),
                missing.join(", ")
            )
        }
    }
}

/// The `pod interfaces` line: veths of this namespace without Orca's program.
pub fn render_unmatched(veths: &[String]) -> String {
    if veths.is_empty() {
        "pod interfaces\tevery veth has Orca's program".to_string()
    } else {
        format!(
            "pod interfaces\tveths without Orca's program (no Service translation for what is behind them; see \
             --ebpf-pod-interface-prefixes): {}",
            veths.join(", ")
        )
    }
}

pub async fn run(s: &Settings, json: bool, verify: bool) -> anyhow::Result<()> {
    let (state, node) = desired_state(s).await?;
    if json {
        let list: Vec<&crate::model::state::ServicePortState> = state.values().map(|s| s.as_ref()).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_table(&state));
        let maps_dir = ebpf::pinned_maps_dir(&s.bpf_root);
        match ebpf::datapath_report(&s.bpf_root, &s.conntrack.timeouts) {
            Ok(d) => {
                print!("{}", render_datapath(&maps_dir, &d));
                println!(
                    "{}",
                    render_socket_hooks(&ebpf::loader::pinned_socket_hooks(&s.bpf_root))
                );
                println!(
                    "{}",
                    render_unmatched(&ebpf::loader::veths_without_program(&s.bpf_root))
                );
            }
            Err(e) => tracing::debug!(error = format!("{e:#}"), "no eBPF datapath counters"),
        }
    }
    if verify {
        let (mode, have) = crate::dataplane::read_back_cluster_frontends(&s.bpf_root, &state, &node)?;
        let drift = verify::compare(&verify::desired_cluster_frontends(&state, &node), &have);
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

#[cfg(test)]
mod tests {
    #[test]
    fn socket_hooks_line() {
        let all = [("a", Some(7)), ("b", Some(7))];
        assert_eq!(
            render_socket_hooks(&all),
            "host clients\tsocket hooks attached (2 programs, cgroup id 7)"
        );
        let none = render_socket_hooks(&[("a", None), ("b", None)]);
        assert!(none.starts_with("host clients\tno socket hooks attached"), "{none}");
        let some = render_socket_hooks(&[("a", Some(7)), ("b", None)]);
        assert_eq!(
            some,
            "host clients\t1 of 2 socket hooks attached (cgroup ids [7]); missing: b"
        );
    }

    use super::*;

    #[test]
    fn datapath_section_names_every_reason_and_the_occupancy() {
        let mut reasons = vec![0u64; orca_common::REASON_COUNT as usize];
        reasons[orca_common::REASON_NO_SNAT_PORT as usize] = 7;
        reasons[orca_common::REASON_FRAGMENT as usize] = 2;
        let d = ebpf::DatapathCounts {
            reasons,
            conntrack: crate::dataplane::ebpf::conntrack::CtCounts {
                entries: 30,
                capacity: 120,
                service: 10,
                reply: 10,
                snat_ports: 4,
                inner: 10,
                ..Default::default()
            },
            unmatched_interfaces: 0,
        };
        let out = render_datapath(std::path::Path::new("/sys/fs/bpf/orca/v3/maps"), &d);
        assert!(out.contains("30 of 120 entries (25.0%)"), "{out}");
        assert!(out.contains("4 masquerade ports held"), "{out}");
        assert!(out.contains("no_snat_port=7"), "{out}");
        assert!(
            out.contains("untranslated\tfragment=2 not_ip=0 fib_declined=0"),
            "{out}"
        );
        for (name, _) in orca_common::REASONS {
            assert!(out.contains(&format!("{name}=")), "{name} missing: {out}");
        }
    }
}
