//! The results: a markdown report (medians with min and max, ratios to direct and to kube-proxy iptables, the
//! goals of issue 6 checked against the largest scale run), the raw JSON, and PNG bar charts.
use crate::load::LoadResult;
use crate::results::{ConfigResult, RunResult};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Median, min, max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mmm {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn mmm(v: &[f64]) -> Option<Mmm> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Mmm {
        med,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Nearest-rank quantile of samples.
pub fn q(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// A metric extracted from one configuration's result: one value per repetition.
pub struct Metric {
    pub title: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub get: fn(&ConfigResult) -> Vec<f64>,
}

fn lr(v: &[LoadResult], f: fn(&LoadResult) -> f64) -> Vec<f64> {
    v.iter().filter(|r| r.ops > 0 || r.bytes > 0).map(f).collect()
}

pub fn packet_metrics() -> Vec<Metric> {
    vec![
        Metric {
            title: "New connections/s, pod on node-a to Service backed on node-b (connect, GET, close)",
            unit: "conn/s",
            higher_is_better: true,
            get: |c| lr(&c.connect_remote, |r| r.rate),
        },
        Metric {
            title: "New connections/s to the same Service's IPv6 cluster IP (dual-stack; eBPF maps in orca-ebpf, ip6tables in orca-iptables and in orca-ebpf-before)",
            unit: "conn/s",
            higher_is_better: true,
            get: |c| lr(&c.connect_remote6, |r| r.rate),
        },
        Metric {
            title: "Connect latency p50, cross-node",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.connect_remote, |r| r.connect_p50_us),
        },
        Metric {
            title: "Connect latency p99, cross-node",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.connect_remote, |r| r.connect_p99_us),
        },
        Metric {
            title: "New connections/s, same node",
            unit: "conn/s",
            higher_is_better: true,
            get: |c| lr(&c.connect_local, |r| r.rate),
        },
        Metric {
            title: "Connect latency p50, same node",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.connect_local, |r| r.connect_p50_us),
        },
        Metric {
            title: "Connect latency p99, same node",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.connect_local, |r| r.connect_p99_us),
        },
        Metric {
            title: "Established request/response (64 B echo), cross-node",
            unit: "req/s",
            higher_is_better: true,
            get: |c| lr(&c.rr, |r| r.rate),
        },
        Metric {
            title: "Request/response latency p50",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.rr, |r| r.lat_p50_us),
        },
        Metric {
            title: "Request/response latency p99",
            unit: "µs",
            higher_is_better: false,
            get: |c| lr(&c.rr, |r| r.lat_p99_us),
        },
        Metric {
            title: "Single-stream throughput (TCP sink), cross-node",
            unit: "Mbit/s",
            higher_is_better: true,
            get: |c| lr(&c.stream, |r| r.mbit_s),
        },
    ]
}

fn node_a_proc(c: &ConfigResult) -> Option<&crate::probe::ProcStats> {
    c.procs.iter().find(|(n, _)| n == "node-a").map(|(_, p)| p)
}

/// Titles the goals look metrics up by (a position in [`control_metrics`] would shift when a metric is added).
const PROG_P99: &str = "Programming latency p99";
const AGENT_RSS: &str = "Agent RSS on node-a (at the end)";

/// The metric titled `title`.
fn named<'a>(metrics: &'a [Metric], title: &str) -> Option<&'a Metric> {
    metrics.iter().find(|m| m.title == title)
}

pub fn control_metrics() -> Vec<Metric> {
    vec![
        Metric {
            title: "Programming latency p50 (slice patched unready -> no longer answered)",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.prog
                    .as_ref()
                    .and_then(|p| q(&p.removal_ms, 0.5))
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: PROG_P99,
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.prog
                    .as_ref()
                    .and_then(|p| q(&p.removal_ms, 0.99))
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "network_programming_duration_seconds during the changes: mean (proxy's own metric)",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.net_prog
                    .as_ref()
                    .and_then(|h| h.mean())
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "sync_proxy_rules_duration_seconds: mean over the proxy's life at this scale",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.sync_rules
                    .as_ref()
                    .and_then(|h| h.mean())
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "sync_proxy_rules_duration_seconds: p99 bucket bound",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.sync_rules
                    .as_ref()
                    .and_then(|h| h.quantile_bound(0.99))
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "Start to programmed (process start -> measured ClusterIPs answer: full sync at this scale)",
            unit: "s",
            higher_is_better: false,
            get: |c| c.startup_s.into_iter().collect(),
        },
        Metric {
            title: AGENT_RSS,
            unit: "MiB",
            higher_is_better: false,
            get: |c| node_a_proc(c).map(|p| p.rss_mib).into_iter().collect(),
        },
        Metric {
            title: "Agent peak RSS (VmHWM) on node-a",
            unit: "MiB",
            higher_is_better: false,
            get: |c| node_a_proc(c).map(|p| p.hwm_mib).into_iter().collect(),
        },
        Metric {
            title: "Agent CPU on node-a over its life at this scale (self + waited-for children)",
            unit: "s",
            higher_is_better: false,
            get: |c| node_a_proc(c).map(|p| p.cpu_s + p.children_cpu_s).into_iter().collect(),
        },
        Metric {
            title: "TC program per packet, BPF_PROG_TEST_RUN repeats of a SYN to the measured ClusterIP on the live maps \
                    (after the first repeat the program sees the already translated packet: the pass-through path; \
                    the translating paths are in the TC cost table)",
            unit: "ns",
            higher_is_better: false,
            get: |c| c.tc.as_ref().map(|t| t.service_ns).into_iter().collect(),
        },
        Metric {
            title: "TC program per packet, SYN to a pod IP (no Service)",
            unit: "ns",
            higher_is_better: false,
            get: |c| c.tc.as_ref().map(|t| t.passthrough_ns).into_iter().collect(),
        },
        Metric {
            title: "TC program per packet, an ARP frame (not IPv4: parse, clock read, no map lookup)",
            unit: "ns",
            higher_is_better: false,
            get: |c| c.tc.as_ref().and_then(|t| t.nonip_ns).into_iter().collect(),
        },
        Metric {
            title: "TC program per packet, an IPv6 SYN to the Service's IPv6 cluster IP (translated by agents with the eBPF IPv6 datapath; passed on to ip6tables before)",
            unit: "ns",
            higher_is_better: false,
            get: |c| c.tc.as_ref().and_then(|t| t.ipv6_ns).into_iter().collect(),
        },
        Metric {
            title: "TC test-run floor: a two-instruction program (r0 = TC_ACT_OK; exit) on the same SYN",
            unit: "ns",
            higher_is_better: false,
            get: |c| c.tc.as_ref().and_then(|t| t.empty_ns).into_iter().collect(),
        },
        Metric {
            title: "Full sync: kubeproxy_sync_full_proxy_rules_duration_seconds, mean over the proxy's life at this scale",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.sync_full
                    .as_ref()
                    .and_then(|h| h.mean())
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "Partial sync during the changes: kubeproxy_sync_partial_proxy_rules_duration_seconds, mean",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.sync_partial
                    .as_ref()
                    .and_then(|h| h.mean())
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "Partial sync during the changes: p99 bucket bound",
            unit: "ms",
            higher_is_better: false,
            get: |c| {
                c.sync_partial
                    .as_ref()
                    .and_then(|h| h.quantile_bound(0.99))
                    .map(|s| s * 1e3)
                    .into_iter()
                    .collect()
            },
        },
        Metric {
            title: "Sync duration the proxy logged during the changes, p50 (Orca: syncs that applied changes; kube-proxy: every SyncProxyRules)",
            unit: "ms",
            higher_is_better: false,
            get: |c| c.logged.as_ref().and_then(|l| q(&l.sync_ms, 0.5)).into_iter().collect(),
        },
        Metric {
            title: "Sync duration the proxy logged during the changes, p99",
            unit: "ms",
            higher_is_better: false,
            get: |c| c.logged.as_ref().and_then(|l| q(&l.sync_ms, 0.99)).into_iter().collect(),
        },
        Metric {
            title: "Orca: change received from the watch -> datapath written (since_first_change), p50",
            unit: "ms",
            higher_is_better: false,
            get: |c| c.logged.as_ref().and_then(|l| q(&l.since_change_ms, 0.5)).into_iter().collect(),
        },
        Metric {
            title: "Orca: change received from the watch -> datapath written (since_first_change), p99",
            unit: "ms",
            higher_is_better: false,
            get: |c| c.logged.as_ref().and_then(|l| q(&l.since_change_ms, 0.99)).into_iter().collect(),
        },
        Metric {
            title: "Re-add latency p50 (PATCH -> the endpoint made ready in the same PATCH answers; coarse)",
            unit: "ms",
            higher_is_better: false,
            get: |c| c.prog.as_ref().and_then(|p| q(&p.add_ms, 0.5)).into_iter().collect(),
        },
    ]
}

/// Endpoints at scale `s`: the fillers' (`fixed` each, or 2 to 10) plus the measured Services' (2 + 2 + 3).
pub fn endpoints_at(s: usize, fixed: Option<usize>) -> usize {
    (0..s.saturating_sub(1))
        .map(|i| crate::cluster::filler_endpoint_count(i, fixed))
        .sum::<usize>()
        + 7
}

fn find<'a>(r: &'a RunResult, cfg: &str, scale: usize) -> Option<&'a ConfigResult> {
    r.results.iter().find(|c| c.config == cfg && c.scale == scale)
}

fn med(r: &RunResult, m: &Metric, cfg: &str, scale: usize) -> Option<f64> {
    find(r, cfg, scale).and_then(|c| mmm(&(m.get)(c))).map(|x| x.med)
}

fn scale_name(s: usize) -> String {
    if s == 1 {
        "1 Service".into()
    } else {
        format!("{s} Services")
    }
}

fn table(out: &mut String, r: &RunResult, m: &Metric, with_direct: bool) {
    let _ = writeln!(
        out,
        "\n**{}** ({}; {} is better)\n",
        m.title,
        m.unit,
        if m.higher_is_better { "higher" } else { "lower" }
    );
    let mut head = String::from("| config |");
    let mut sep = String::from("| --- |");
    for &s in &r.scales {
        let _ = write!(head, " {} median (min–max) |", scale_name(s));
        sep.push_str(" ---: |");
        if with_direct {
            head.push_str(" ×direct |");
            sep.push_str(" ---: |");
        }
        head.push_str(" ×kp-iptables |");
        sep.push_str(" ---: |");
    }
    let _ = writeln!(out, "{head}\n{sep}");
    for cfg in &r.configs {
        if !with_direct && cfg == "direct" {
            continue;
        }
        let mut row = format!("| {cfg} |");
        let mut any = false;
        for &s in &r.scales {
            let v = find(r, cfg, s).and_then(|c| mmm(&(m.get)(c)));
            match v {
                Some(x) if x.n > 1 => {
                    any = true;
                    let _ = write!(row, " {} ({}–{}) |", fmt_num(x.med), fmt_num(x.min), fmt_num(x.max));
                }
                Some(x) => {
                    any = true;
                    let _ = write!(row, " {} |", fmt_num(x.med));
                }
                None => row.push_str(" – |"),
            }
            let ratio = |base: &str| match (v, med(r, m, base, s)) {
                (Some(x), Some(b)) if b != 0.0 => format!("{:.2}", x.med / b),
                _ => "–".into(),
            };
            if with_direct {
                let _ = write!(row, " {} |", ratio("direct"));
            }
            let _ = write!(row, " {} |", ratio("kube-proxy-iptables"));
        }
        if any {
            let _ = writeln!(out, "{row}");
        }
    }
}

fn goal_line(out: &mut String, what: &str, got: Option<f64>, target: f64, at_least: bool, unit: &str) {
    let line = match got {
        None => format!("- {what}: not measured"),
        Some(g) => {
            let met = if at_least { g >= target } else { g < target };
            let by = if at_least { g / target } else { target / g };
            let u = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            format!(
                "- {what}: {}{u} (goal {} {}{u}) — {}",
                fmt_num(g),
                if at_least { "≥" } else { "<" },
                fmt_num(target),
                if met {
                    "met".to_string()
                } else {
                    format!("MISSED (reached {:.0}% of the goal)", by * 100.0)
                }
            )
        }
    };
    let _ = writeln!(out, "{line}");
}

/// The markdown report.
pub fn markdown(r: &RunResult, plots: &[(String, String)]) -> String {
    let mut out = String::new();
    let kind = if r.quick { "quick" } else { "full" };
    let _ = writeln!(
        out,
        "# Orca benchmarks ({kind} mode), {}\n",
        &r.started_utc[..10.min(r.started_utc.len())]
    );
    let _ = writeln!(
        out,
        "Direct pod IPs, Orca eBPF, Orca iptables, upstream kube-proxy iptables and nftables, measured side by side \
         in one run on one sandbox (real kube-apiserver, two node namespaces, pods as namespaces running \
         `orca-testpod`). Scales: {}. Each configuration repeated {}×; cells are medians with (min–max) over the \
         repetitions; ratios are medians over the median of direct / of kube-proxy iptables at the same scale.\n",
        r.scales.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
        r.repeats
    );
    let _ = writeln!(out, "## Machine and run\n");
    let _ = writeln!(out, "- started {} UTC, took {:.0} s", r.started_utc, r.duration_s);
    let _ = writeln!(
        out,
        "- load average (1, 5, 15 min) at the start: {}; at the end: {} — other engineers' builds and tests ran on \
         this machine at the same time, so absolute numbers are noisy: prefer the ratios",
        r.load_start, r.load_end
    );
    for (k, v) in &r.machine {
        if v.contains('\n') {
            let _ = writeln!(out, "- {k}:\n\n```\n{v}\n```");
        } else {
            let _ = writeln!(out, "- {k}: {v}");
        }
    }
    let _ = writeln!(out, "- parameters: {}", r.load_params);
    for (s, rate) in &r.fill_rate {
        let _ = writeln!(
            out,
            "- fillers for scale {s} created at {rate:.0} objects/s (Service + EndpointSlice each)"
        );
    }
    let _ = writeln!(out, "- reproduce: `{}`", r.command);
    let _ = writeln!(
        out,
        "\nScale N = N−1 filler Services (selector-less, {} ready endpoints each, EndpointSlices written \
         directly through the apiserver, dummy addresses in 10.244.16.0/20+ that no pod has) plus the measured \
         Services `bench-remote` (2 pods on node-b), `bench-local` (2 pods on node-a) and `bench-prog`, recreated \
         after the fillers so they are the newest objects (highest resourceVersion, newest ClusterIP); the fillers \
         live in namespace `{}`, which sorts before `bench`, so the measured Services are also last in Orca's \
         iptables dispatch chain, which is written in (namespace, name) order. Upstream kube-proxy's iptables \
         mode writes KUBE-SERVICES in Go map order (a new order every sync); the table below gives the position \
         the measured rule had when the load ran. The client pod runs on node-a; the load generator is \
         `orca-bench load` started inside its network namespace. Direct = the same requests to the pod IPs (no \
         proxy running at all). Endpoints per scale: {}.",
        r.filler_endpoints.map_or("2–10".to_string(), |n| n.to_string()),
        crate::cluster::FILL_NS,
        r.scales
            .iter()
            .map(|s| format!("{s} → {}", endpoints_at(*s, r.filler_endpoints)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if r.results.iter().any(|c| c.iptables_backend.is_some()) {
        let _ = writeln!(
            out,
            "\n**iptables backend and the measured Service's place in the dispatch chain (node-a, after the first \
             sync).** Both iptables proxies get the same backend at a scale: `nft` = iptables-nft (the default \
             of an empty node), `legacy` = iptables-legacy, used where iptables-nft-restore's quadratic restore \
             makes one sync take minutes (see `iptables-scale.md`): the node carries kubelet's \
             `KUBE-IPTABLES-HINT` chain in the legacy mangle table (Orca's detection picks legacy from it) and \
             kube-proxy's `iptables*` commands resolve to iptables-legacy, as its image's wrapper would set them.\n"
        );
        let _ = writeln!(
            out,
            "| config | scale | backend | chain | position of bench-remote:80 | rules in chain | rules in nat |"
        );
        let _ = writeln!(out, "| --- | ---: | --- | --- | ---: | ---: | ---: |");
        for c in &r.results {
            let Some(b) = &c.iptables_backend else { continue };
            match &c.position {
                Some(p) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {b} | {} | {} | {} | {} |",
                        c.config,
                        c.scale,
                        p.chain,
                        p.index.map(|i| i.to_string()).unwrap_or("not found".into()),
                        p.chain_rules,
                        p.nat_rules
                    );
                }
                None => {
                    let _ = writeln!(out, "| {} | {} | {b} | – | – | – | – |", c.config, c.scale);
                }
            }
        }
    }
    let _ = writeln!(out, "\n## Packet path\n");
    for (name, path) in plots
        .iter()
        .filter(|(n, _)| n.starts_with("conn") || n.starts_with("rr"))
    {
        let _ = writeln!(out, "![{name}]({path})");
    }
    for m in packet_metrics() {
        table(&mut out, r, &m, true);
    }
    let _ = writeln!(out, "\n## Control plane, memory, CPU, TC cost\n");
    for (name, path) in plots.iter().filter(|(n, _)| n.starts_with("prog")) {
        let _ = writeln!(out, "![{name}]({path})");
    }
    let _ = writeln!(
        out,
        "\nProgramming latency: `bench-prog` has 3 endpoints (the 2 pods on node-b and one on node-a), 2 ready at \
         a time. Change k patches its slice (with `endpoints.kubernetes.io/last-change-trigger-time`, which \
         upstream's network_programming_duration measures from) so that endpoint k mod 3 turns unready and the \
         one change k−1 took out turns ready again: one PATCH, one sync per change. From the moment the PATCH is \
         sent, the client pod opens new connections in a loop and reads which pod answers; the removal latency is \
         the send time of the first probe after the last one the unready pod answered ({} answers in a row without \
         it, and one from the re-readied pod, end the change); the re-add latency is the first answer of the \
         re-readied pod. After a pause the next change starts. p50/p99 are over all changes at that scale \
         (nearest rank); histogram p99 values are bucket upper bounds. The full-sync time is kube-proxy's \
         kubeproxy_sync_full_proxy_rules_duration_seconds (Orca exports the same metric) and the start-to-\
         programmed time below.",
        crate::results::GONE_STREAK
    );
    for m in control_metrics() {
        table(&mut out, r, &m, false);
    }
    if !r.tc_cost.is_empty() {
        let _ = writeln!(
            out,
            "\n**TC program cost per packet, by path** (ns; lower is better; in brackets the multiple of the same \
             row's pass-through). Measured before the sandbox started, as `orca-bench tc-cost` does: \
             BPF_PROG_TEST_RUN of the agent's own programs over maps filled to the scale (2 to 10 backends per \
             Service, the measured Service written last), in a network namespace whose FIB forwards to the backends; \
             `netfilter (default)` sums the ingress and the egress program, `bypass-netfilter` includes the FIB \
             lookup and redirect; one run per syscall, median of 3000, minus an empty program's median (the floor, \
             shown).\n"
        );
        out.push_str(&crate::tccost::table(&r.tc_cost));
    }
    let _ = writeln!(out, "\n| config | scale | changes | removal p50 / p99 / max ms | timeouts | re-add not seen | probe errors | PATCH round trip p50 ms | re-add p50 ms | network_programming count | stopped by the time budget |");
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for c in &r.results {
        if let Some(p) = &c.prog {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} / {} / {} | {} | {} | {} | {} | {} | {} | {} |",
                c.config,
                c.scale,
                p.removal_ms.len() + p.timeouts,
                q(&p.removal_ms, 0.5).map(fmt_num).unwrap_or("–".into()),
                q(&p.removal_ms, 0.99).map(fmt_num).unwrap_or("–".into()),
                q(&p.removal_ms, 1.0).map(fmt_num).unwrap_or("–".into()),
                p.timeouts,
                p.add_timeouts,
                p.probe_errors,
                q(&p.patch_rtt_ms, 0.5).map(fmt_num).unwrap_or("–".into()),
                q(&p.add_ms, 0.5).map(fmt_num).unwrap_or("–".into()),
                c.net_prog
                    .as_ref()
                    .map(|h| format!("{}", h.count))
                    .unwrap_or("–".into()),
                p.budget_exhausted_s
                    .map(|s| format!("yes, after {s:.0} s"))
                    .unwrap_or("no".into())
            );
        }
    }
    let _ = writeln!(
        out,
        "\nProcesses (node-a and node-b) at the end of each configuration:\n"
    );
    let _ = writeln!(
        out,
        "| config | scale | node | process | RSS MiB | of which anon MiB | peak RSS MiB | threads | CPU s | children CPU s |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in &r.results {
        for (node, p) in &c.procs {
            let _ = writeln!(
                out,
                "| {} | {} | {node} | {} ({}) | {:.1} | {} | {:.1} | {} | {:.2} | {:.2} |",
                c.config,
                c.scale,
                p.comm,
                p.pid,
                p.rss_mib,
                p.rss_anon_mib.map(|m| format!("{m:.1}")).unwrap_or("–".into()),
                p.hwm_mib,
                p.threads.map(|t| t.to_string()).unwrap_or("–".into()),
                p.cpu_s,
                p.children_cpu_s
            );
        }
    }
    // Goals, at the largest scale run.
    let top = r.scales.iter().copied().max().unwrap_or(1);
    let low = r.scales.iter().copied().min().unwrap_or(1);
    let conn = &packet_metrics()[0];
    let ctl = control_metrics();
    let e = |cfg: &str, s: usize| med(r, conn, cfg, s);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let _ = writeln!(
        out,
        "\n## Goals of issue 6 (checked at {}; the goals are stated for 30,000 Services{})\n",
        scale_name(top),
        if top < 30_000 {
            " — this run did not reach that scale"
        } else {
            ""
        }
    );
    goal_line(
        &mut out,
        "conn/s Orca eBPF / direct",
        ratio(e("orca-ebpf", top), e("direct", top)),
        0.95,
        true,
        "",
    );
    goal_line(
        &mut out,
        "conn/s Orca eBPF / kube-proxy iptables",
        ratio(e("orca-ebpf", top), e("kube-proxy-iptables", top)),
        2.0,
        true,
        "",
    );
    goal_line(
        &mut out,
        "conn/s Orca eBPF / kube-proxy nftables",
        ratio(e("orca-ebpf", top), e("kube-proxy-nftables", top)),
        1.1,
        true,
        "",
    );
    goal_line(
        &mut out,
        &format!("conn/s Orca eBPF at {top} / at {low}"),
        ratio(e("orca-ebpf", top), e("orca-ebpf", low)),
        0.95,
        true,
        "",
    );
    goal_line(
        &mut out,
        "programming latency p99, Orca eBPF",
        named(&ctl, PROG_P99).and_then(|m| med(r, m, "orca-ebpf", top)),
        50.0,
        false,
        "ms",
    );
    // The default path's row (results from before the variants have an empty name).
    let tc = r
        .tc_cost
        .iter()
        .find(|row| row.services == top && (row.variant.is_empty() || row.variant.starts_with("netfilter")));
    let _ = writeln!(
        out,
        "{}",
        match tc {
            Some(row) => {
                let worst = row.established_ns.max(row.reply_ns);
                format!(
                    "- TC program per packet (established flow {} ns, reply {} ns, pass-through {} ns, new \
                     connection {} ns): {} (goal ≤ 100 ns)",
                    fmt_num(row.established_ns),
                    fmt_num(row.reply_ns),
                    fmt_num(row.passthrough_ns),
                    fmt_num(row.new_connection_ns),
                    if worst <= 100.0 {
                        "met".to_string()
                    } else {
                        format!(
                            "MISSED by {} ns on the slower of established and reply",
                            fmt_num(worst - 100.0)
                        )
                    }
                )
            }
            None => "- TC program per packet: not measured".into(),
        }
    );
    let rss = |s: usize| named(&ctl, AGENT_RSS).and_then(|m| med(r, m, "orca-ebpf", s));
    goal_line(
        &mut out,
        &format!(
            "Orca eBPF agent RSS on node-a at {} ({} endpoints)",
            scale_name(top),
            endpoints_at(top, r.filler_endpoints)
        ),
        rss(top),
        150.0,
        false,
        "MiB",
    );
    // The goal names 300,000 endpoints; 2–10 per Service gives fewer at 30k Services: a linear projection from
    // the two largest scales, labelled as such.
    let mut measured: Vec<usize> = r.scales.iter().copied().filter(|s| rss(*s).is_some()).collect();
    measured.sort_unstable();
    if let [.., s1, s2] = measured[..] {
        if let (Some(m1), Some(m2)) = (rss(s1), rss(s2)) {
            let (e1, e2) = (
                endpoints_at(s1, r.filler_endpoints) as f64,
                endpoints_at(s2, r.filler_endpoints) as f64,
            );
            if e2 > e1 && (endpoints_at(s2, r.filler_endpoints) as f64) < 300_000.0 {
                let per = (m2 - m1) / (e2 - e1);
                let proj = m2 + per * (300_000.0 - e2);
                let _ = writeln!(
                    out,
                    "  - projected to 300,000 endpoints (linear from {} and {}: {:.1} KiB per endpoint): {:.0} MiB — a \
                     projection, not a measurement",
                    scale_name(s1),
                    scale_name(s2),
                    per * 1024.0,
                    proj
                );
            }
        }
    }
    if r.results.iter().any(|c| c.profile.is_some()) {
        let _ = writeln!(
            out,
            "\n## Profiles\n\n`perf record -a -F 999` over most of the first cross-node connect run at the largest \
             scale (the whole machine: load generator, servers, proxies, and whatever else ran); entries ≥ 0.5% of \
             all samples, by command, object and symbol."
        );
        for c in &r.results {
            if let Some(p) = &c.profile {
                let _ = writeln!(
                    out,
                    "\n<details><summary>{} at {}</summary>\n\n```\n{p}\n```\n</details>",
                    c.config,
                    scale_name(c.scale)
                );
            }
        }
    }
    if r.results.iter().any(|c| c.agent_profile.is_some()) {
        let _ = writeln!(
            out,
            "\n## Agent profiles during the programming-latency changes\n\n`perf record -F 999 -g -p <node-a's \
             agent>` from the first to the last change; symbols ≥ 1% of the agent's samples."
        );
        for c in &r.results {
            if let Some(p) = &c.agent_profile {
                let _ = writeln!(
                    out,
                    "\n<details><summary>{} at {}</summary>\n\n```\n{p}\n```\n</details>",
                    c.config,
                    scale_name(c.scale)
                );
            }
        }
    }
    if !r.notes.is_empty()
        || r.results
            .iter()
            .any(|c| !c.errors.is_empty() || !c.stop_notes.is_empty())
    {
        let _ = writeln!(out, "\n## Errors and notes\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
        for c in &r.results {
            for e in &c.errors {
                let _ = writeln!(out, "- {} at {}: {}", c.config, c.scale, e.replace('\n', " "));
            }
            for e in &c.stop_notes {
                let _ = writeln!(
                    out,
                    "- {} at {}, stopping (the node is reset afterwards regardless): {}",
                    c.config,
                    c.scale,
                    e.replace('\n', " ")
                );
            }
        }
    }
    out
}

/// One line per configuration while the run goes.
pub fn print_brief(c: &ConfigResult) {
    let m = |v: Vec<f64>| mmm(&v).map(|x| fmt_num(x.med)).unwrap_or("-".into());
    let pm = packet_metrics();
    let cm = control_metrics();
    println!(
        "  {} @ {}: conn/s remote {} local {}; rr/s {}; stream {} Mbit/s; prog p50 {} p99 {} ms; RSS {} MiB; TC {} ns{}",
        c.config,
        c.scale,
        m((pm[0].get)(c)),
        m((pm[3].get)(c)),
        m((pm[6].get)(c)),
        m((pm[9].get)(c)),
        m((cm[0].get)(c)),
        m((cm[1].get)(c)),
        m((cm[6].get)(c)),
        m((cm[9].get)(c)),
        if c.errors.is_empty() {
            String::new()
        } else {
            format!("; {} error(s): {}", c.errors.len(), c.errors[0])
        }
    );
}

// ---------------------------------------------------------------------------------------------------------
// Plots

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<bool> = OnceLock::new();
    if *DONE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(b) = std::fs::read(p) {
                let b: &'static [u8] = Box::leak(b.into_boxed_slice());
                if plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, b).is_ok() {
                    return true;
                }
            }
        }
        false
    }) {
        Ok(())
    } else {
        anyhow::bail!("no TrueType font found (looked at {FONT_PATHS:?}); install fonts-dejavu-core for plots")
    }
}

/// Grouped bars: one group per config, one bar per scale (median), min–max whiskers.
fn bar_chart(path: &Path, title: &str, unit: &str, r: &RunResult, m: &Metric, configs: &[String]) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let scales = &r.scales;
    let mut ymax = 0.0f64;
    let mut data = Vec::new();
    for (gi, cfg) in configs.iter().enumerate() {
        for (si, &s) in scales.iter().enumerate() {
            if let Some(x) = find(r, cfg, s).and_then(|c| mmm(&(m.get)(c))) {
                ymax = ymax.max(x.max);
                data.push((gi, si, x));
            }
        }
    }
    if data.is_empty() {
        anyhow::bail!("no data for {title}");
    }
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = configs.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n, 0.0..ymax * 1.3)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfgs = configs.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(configs.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < cfgs.len() {
                cfgs[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let palette = [
        RGBColor(70, 130, 180),
        RGBColor(230, 126, 34),
        RGBColor(46, 139, 87),
        RGBColor(155, 89, 182),
    ];
    let ns = scales.len() as f64;
    let w = 0.8 / ns;
    for (si, &s) in scales.iter().enumerate() {
        let color = palette[si % palette.len()];
        let bars: Vec<_> = data.iter().filter(|(_, i, _)| *i == si).collect();
        chart
            .draw_series(bars.iter().map(|(gi, _, x)| {
                let x0 = *gi as f64 + 0.1 + si as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, x.med)], color.filled())
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(scale_name(s))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        chart
            .draw_series(bars.iter().map(|(gi, _, x)| {
                let xc = *gi as f64 + 0.1 + si as f64 * w + w * 0.45;
                PathElement::new(vec![(xc, x.min), (xc, x.max)], BLACK.stroke_width(2))
            }))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Write `<stem>.md`, `<stem>.json` and `<stem>-*.png` into `dir`; returns the markdown path.
pub fn write(dir: &Path, stem: &str, r: &RunResult) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pm = packet_metrics();
    let cm = control_metrics();
    let proxies: Vec<String> = r.configs.iter().filter(|c| *c != "direct").cloned().collect();
    let charts: Vec<(&str, &Metric, &Vec<String>)> = vec![
        ("conn-remote", &pm[0], &r.configs),
        ("conn-local", &pm[3], &r.configs),
        ("rr", &pm[6], &r.configs),
        ("prog-p99", &cm[1], &proxies),
    ];
    let mut plots = Vec::new();
    let mut notes = Vec::new();
    for (name, m, cfgs) in charts {
        let file = format!("{stem}-{name}.png");
        match bar_chart(&dir.join(&file), m.title, m.unit, r, m, cfgs) {
            Ok(()) => plots.push((name.to_string(), file)),
            Err(e) => notes.push(format!("plot {name}: {e:#}")),
        }
    }
    let mut r2 = r.clone();
    r2.notes.extend(notes);
    let md = markdown(&r2, &plots);
    let path = dir.join(format!("{stem}.md"));
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(dir.join(format!("{stem}.json")), serde_json::to_string_pretty(&r2)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProcStats;

    fn lr(rate: f64) -> LoadResult {
        LoadResult {
            ops: 100,
            rate,
            connect_p50_us: 50.0,
            connect_p99_us: 200.0,
            ..LoadResult::default()
        }
    }

    fn sample() -> RunResult {
        let mut r = RunResult {
            quick: true,
            scales: vec![1, 1000],
            repeats: 3,
            configs: vec!["direct".into(), "orca-ebpf".into(), "kube-proxy-iptables".into()],
            started_utc: "2026-11-26T16:00:00.000000Z".into(),
            command: "cargo xtask bench --quick".into(),
            ..RunResult::default()
        };
        for (cfg, base) in [("direct", 1000.0), ("orca-ebpf", 950.0), ("kube-proxy-iptables", 400.0)] {
            for s in [1usize, 1000] {
                let f = if s == 1000 && cfg == "kube-proxy-iptables" {
                    0.5
                } else {
                    1.0
                };
                r.results.push(ConfigResult {
                    config: cfg.into(),
                    scale: s,
                    connect_remote: vec![lr(base * f), lr(base * f * 1.1), lr(base * f * 0.9)],
                    procs: if cfg == "direct" {
                        vec![]
                    } else {
                        vec![(
                            "node-a".into(),
                            ProcStats {
                                rss_mib: 40.0,
                                ..ProcStats::default()
                            },
                        )]
                    },
                    ..ConfigResult::default()
                });
            }
        }
        r
    }

    #[test]
    fn stats() {
        let x = mmm(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((x.med, x.min, x.max, x.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(mmm(&[1.0, 3.0]).unwrap().med, 2.0);
        assert!(mmm(&[]).is_none());
        assert_eq!(q(&[5.0, 1.0, 3.0], 0.99), Some(5.0));
    }

    #[test]
    fn markdown_has_ratios_and_goals() {
        let md = markdown(&sample(), &[]);
        // orca-ebpf 950 vs direct 1000 -> 0.95, vs kube-proxy iptables 400 -> 2.38 (scale 1) and 200 -> 4.75.
        assert!(md.contains("| orca-ebpf | 950.0 (855.0–1045) | 0.95 | 2.38 |"), "{md}");
        assert!(md.contains("4.75"), "{md}");
        assert!(
            md.contains("conn/s Orca eBPF / direct: 0.950 (goal ≥ 0.950) — met"),
            "{md}"
        );
        assert!(md.contains("programming latency p99, Orca eBPF: not measured"), "{md}");
        assert!(
            md.contains(
                "Orca eBPF agent RSS on node-a at 1000 Services (6001 endpoints): 40.00 MiB (goal < 150.0 MiB) — met"
            ),
            "{md}"
        );
        assert!(md.contains("projected to 300,000 endpoints"), "{md}");
        assert_eq!(endpoints_at(1, None), 7);
        assert!(md.contains("this run did not reach that scale"), "{md}");
    }

    #[test]
    fn plots_render() {
        let dir = std::env::temp_dir().join(format!("orca-bench-plot-{}", std::process::id()));
        let r = sample();
        let p = write(&dir, "t", &r).unwrap();
        let md = std::fs::read_to_string(&p).unwrap();
        if register_font().is_ok() {
            let png = std::fs::read(dir.join("t-conn-remote.png")).unwrap();
            assert_eq!(&png[1..4], b"PNG");
            assert!(md.contains("![conn-remote](t-conn-remote.png)"), "{md}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
