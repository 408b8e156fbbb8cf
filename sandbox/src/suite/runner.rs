//! Runs every selected scenario against every selected proxy on one sandbox and builds the summary.
use crate::kubelet::Kubelet;
use crate::suite::ctx::Ctx;
use crate::suite::proxy::{Proxy, ProxyEnv, ProxyKind, StartOptions};
use crate::suite::scenarios::{self, Scenario};
use crate::{build, Sandbox, SandboxOptions};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub proxies: Vec<ProxyKind>,
    /// Scenario names; empty: all.
    pub scenarios: Vec<String>,
    /// The orca-proxy binary, or why there is none.
    pub orca_proxy_bin: std::result::Result<PathBuf, String>,
    /// Limit for one scenario (its cleanup not included).
    pub scenario_timeout: Duration,
    /// Print every step.
    pub verbose: bool,
}

/// One cell of the table.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: String,
    pub proxy: ProxyKind,
    /// How long it took, or why it failed.
    pub result: std::result::Result<Duration, String>,
}

/// Everything the suite found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
    /// Per proxy: start time, notes from stopping/cleaning up.
    pub proxy_notes: BTreeMap<ProxyKind, Vec<String>>,
    pub sandbox_up: Duration,
    pub total: Duration,
    pub scenarios: Vec<String>,
    pub proxies: Vec<ProxyKind>,
}

impl Report {
    /// The failures against `kinds`.
    pub fn failures_for(&self, kinds: &[ProxyKind]) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| kinds.contains(&o.proxy) && o.result.is_err())
            .collect()
    }

    /// The summary: a scenario x proxy table, then every failure with its reason.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = self.scenarios.iter().map(String::len).max().unwrap_or(8).max(8);
        out.push_str(&format!("{:<w$}", "scenario"));
        for p in &self.proxies {
            out.push_str(&format!("  {:<20}", p.name()));
        }
        out.push('\n');
        for s in &self.scenarios {
            out.push_str(&format!("{s:<w$}"));
            for p in &self.proxies {
                let cell = match self.outcomes.iter().find(|o| &o.scenario == s && o.proxy == *p) {
                    Some(Outcome { result: Ok(d), .. }) => format!("pass {:>5.1}s", d.as_secs_f64()),
                    Some(Outcome { result: Err(_), .. }) => "FAIL".to_string(),
                    None => "-".to_string(),
                };
                out.push_str(&format!("  {cell:<20}"));
            }
            out.push('\n');
        }
        for p in &self.proxies {
            let n = self.outcomes.iter().filter(|o| o.proxy == *p).count();
            let ok = self
                .outcomes
                .iter()
                .filter(|o| o.proxy == *p && o.result.is_ok())
                .count();
            out.push_str(&format!("{}: {ok}/{n} passed\n", p.name()));
        }
        let failures: Vec<&Outcome> = self.outcomes.iter().filter(|o| o.result.is_err()).collect();
        if !failures.is_empty() {
            out.push_str("\nfailures:\n");
            for f in failures {
                if let Err(why) = &f.result {
                    out.push_str(&format!("  {} x {}: {why}\n", f.scenario, f.proxy));
                }
            }
        }
        let notes: Vec<(&ProxyKind, &Vec<String>)> = self.proxy_notes.iter().filter(|(_, n)| !n.is_empty()).collect();
        if !notes.is_empty() {
            out.push_str("\nproxy notes:\n");
            for (p, ns) in notes {
                for n in ns {
                    out.push_str(&format!("  {p}: {n}\n"));
                }
            }
        }
        out.push_str(&format!(
            "\nsandbox up in {:.1}s; suite {:.1}s in all\n",
            self.sandbox_up.as_secs_f64(),
            self.total.as_secs_f64()
        ));
        out
    }
}

/// The selected scenarios, in suite order; an unknown name is an error listing the known ones.
pub fn select(names: &[String]) -> Result<Vec<Scenario>> {
    let all = scenarios::all();
    if names.is_empty() {
        return Ok(all);
    }
    for n in names {
        if !all.iter().any(|s| s.name == n) {
            let known: Vec<&str> = all.iter().map(|s| s.name).collect();
            bail!("unknown scenario {n:?}; known: {}", known.join(", "));
        }
    }
    Ok(all.into_iter().filter(|s| names.iter().any(|n| n == s.name)).collect())
}

/// Bring the sandbox up, run everything, tear it down (also when something fails; a panic or Ctrl-C tears
/// down through the sandbox's own handlers).
pub async fn run(opts: &SuiteOptions) -> Result<Report> {
    let selected = select(&opts.scenarios)?;
    let t0 = Instant::now();
    println!("suite: bringing the sandbox up");
    let sb = Sandbox::up(SandboxOptions::default()).await?;
    let sandbox_up = t0.elapsed();
    println!("suite: sandbox up in {:.1}s", sandbox_up.as_secs_f64());
    let result = run_on(&sb, opts, &selected).await;
    let down = sb.down();
    let mut report = result?;
    if let Err(e) = down {
        bail!("teardown: {e:#}");
    }
    report.sandbox_up = sandbox_up;
    report.total = t0.elapsed();
    Ok(report)
}

/// Run on an existing sandbox.
pub async fn run_on(sb: &Sandbox, opts: &SuiteOptions, selected: &[Scenario]) -> Result<Report> {
    let env = ProxyEnv {
        topology: sb.topology().clone(),
        kubeconfig: sb.kube_proxy_kubeconfig(),
        kube_proxy_bin: sb.bin_dir().join("kube-proxy"),
        orca_proxy_bin: opts.orca_proxy_bin.clone(),
    };
    if !env.kube_proxy_bin.is_file() {
        bail!(
            "{} is missing (cargo xtask sandbox build-k8s builds it; binaries in {})",
            env.kube_proxy_bin.display(),
            build::bin_dir().display()
        );
    }
    default_routes(sb.topology())?;
    // A run interrupted while orca-proxy ran may have left its per-node pin directories.
    for n in &sb.topology().nodes {
        let pins = crate::suite::proxy::bpf_root(&n.name);
        if pins.read_dir().is_ok_and(|mut d| d.next().is_some()) {
            std::fs::remove_dir_all(&pins)?;
            println!("suite: removed {} left by an earlier run", pins.display());
        }
    }
    let kubelet = Arc::new(Kubelet::new(sb.admin_client(), sb.topology())?);
    let mut report = Report {
        scenarios: selected.iter().map(|s| s.name.to_string()).collect(),
        proxies: opts.proxies.clone(),
        ..Report::default()
    };
    for &kind in &opts.proxies {
        println!("\n== {kind} ==");
        let t = Instant::now();
        let mut proxy = match Proxy::start(kind, &env, StartOptions::default()).await {
            Ok(p) => p,
            Err(e) => {
                let why = format!("proxy did not start: {e:#}");
                println!("   {why}");
                for s in selected {
                    report.outcomes.push(Outcome {
                        scenario: s.name.to_string(),
                        proxy: kind,
                        result: Err(why.clone()),
                    });
                }
                continue;
            }
        };
        let mut notes = vec![format!("ready on every node in {:.1}s", t.elapsed().as_secs_f64())];
        println!("   ready on every node in {:.1}s", t.elapsed().as_secs_f64());
        let mut dead: Option<String> = None;
        for s in selected {
            if let Some(why) = &dead {
                report.outcomes.push(Outcome {
                    scenario: s.name.to_string(),
                    proxy: kind,
                    result: Err(why.clone()),
                });
                continue;
            }
            println!("-- {} x {kind}: {}", s.name, s.about);
            let ctx = Arc::new(
                Ctx::new(
                    sb.admin_client(),
                    kubelet.clone(),
                    sb.topology().clone(),
                    s.name,
                    kind,
                    opts.verbose,
                )
                .with_agents(proxy.agents()),
            );
            let t = Instant::now();
            let mut result = match ctx.setup().await {
                Err(e) => Err(format!("setup: {e:#}")),
                Ok(()) => {
                    let fut = (s.run)(ctx.clone());
                    let limit =
                        scenarios::time_limit(s.name).map_or(opts.scenario_timeout, |t| t.max(opts.scenario_timeout));
                    match tokio::spawn(tokio::time::timeout(limit, fut)).await {
                        Ok(Ok(Ok(()))) => Ok(t.elapsed()),
                        Ok(Ok(Err(e))) => Err(format!("{e:#}")),
                        Ok(Err(_)) => Err(format!("did not finish within {:.0}s", limit.as_secs_f64())),
                        Err(e) if e.is_panic() => Err(format!("panicked: {}", panic_text(e))),
                        Err(e) => Err(format!("task failed: {e}")),
                    }
                }
            };
            // What Orca programmed, read back from the kernel on both nodes, matches the apiserver.
            if result.is_ok() && !kind.is_upstream() {
                let env = env.clone();
                let verified = tokio::task::spawn_blocking(move || {
                    env.topology
                        .nodes
                        .iter()
                        .try_for_each(|n| crate::suite::proxy::verify(kind, &env, n))
                })
                .await;
                match verified {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => result = Err(format!("{e:#}")),
                    Err(e) => result = Err(format!("status --verify: {e}")),
                }
            }
            if let Err(e) = proxy.check_alive() {
                let why = format!("{e:#}");
                result = Err(match result {
                    Ok(_) => why.clone(),
                    Err(r) => format!("{r} ({why})"),
                });
                dead = Some(why);
            }
            if let (Err(_), Some(secs)) = (&result, pause_on_failure()) {
                println!("   failed: pausing {secs}s before cleanup (ORCA_SUITE_PAUSE_ON_FAILURE) for inspection");
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            if let Err(e) = ctx.cleanup().await {
                println!("   cleanup: {e:#}");
                notes.push(format!("{}: {e:#}", s.name));
            }
            match &result {
                Ok(d) => println!("   PASS ({:.1}s)", d.as_secs_f64()),
                Err(why) => println!("   FAIL ({:.1}s): {why}", t.elapsed().as_secs_f64()),
            }
            report.outcomes.push(Outcome {
                scenario: s.name.to_string(),
                proxy: kind,
                result,
            });
        }
        notes.extend(proxy.stop().await);
        report.proxy_notes.insert(kind, notes);
    }
    if let Err(e) = kubelet.shutdown().await {
        println!("kubelet shutdown: {e:#}");
    }
    Ok(report)
}

/// Give every node a default route (IPv4 and IPv6) via the control-plane namespace, as real nodes have a default
/// gateway.
///
/// Without one, the kernel drops a pod's packet to a ClusterIP the proxy did not DNAT at the routing decision
/// (the TCP client sees a non-fatal "network unreachable" and retries until it times out), before the proxy's
/// filter rules can REJECT it: kube-proxy's "refused when there are no endpoints" depends on the packet being
/// routable. The control plane forwards nothing back, so unhandled traffic stays unanswered as in a real cluster.
pub fn default_routes(topo: &crate::Topology) -> Result<()> {
    let via = topo.control_plane.ip.to_string();
    for n in &topo.nodes {
        // A packet the proxy has not DNATed yet (a Service created a moment ago) would now leave through the
        // interface it came in on, and the node would send the client an ICMP redirect to the control plane,
        // which the client caches for minutes: later packets to that IP would bypass the node entirely.
        for iface in ["all", "default", crate::topology::MEMBER_IFACE] {
            crate::netns::exec(
                &n.netns,
                &["sysctl", "-qw", &format!("net.ipv4.conf.{iface}.send_redirects=0")],
            )?;
        }
        crate::netns::ip(&["-n", &n.netns, "route", "replace", "default", "via", &via])?;
        let via6 = crate::topology::v6(topo.control_plane.ip).to_string();
        crate::netns::ip(&["-n", &n.netns, "-6", "route", "replace", "default", "via", &via6])?;
    }
    // IPv6 has no switch against sending redirects: the client and the control plane ignore them instead.
    for ns in [&topo.client.netns, &topo.control_plane.netns] {
        for iface in ["all", "default", crate::topology::MEMBER_IFACE] {
            crate::netns::exec(
                ns,
                &["sysctl", "-qw", &format!("net.ipv6.conf.{iface}.accept_redirects=0")],
            )?;
        }
    }
    Ok(())
}

/// `ORCA_SUITE_PAUSE_ON_FAILURE=<secs>` (at most 600): keep a failed scenario's objects that long.
fn pause_on_failure() -> Option<u64> {
    std::env::var("ORCA_SUITE_PAUSE_ON_FAILURE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| s.min(600))
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let p = e.into_panic();
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_and_table() {
        assert_eq!(select(&[]).unwrap().len(), scenarios::all().len());
        assert_eq!(select(&["soak".into()]).unwrap().len(), 1);
        assert_eq!(select(&["seed".into()]).unwrap().len(), 1);
        assert!(select(&["nope".into()]).is_err());
        let r = Report {
            outcomes: vec![
                Outcome {
                    scenario: "seed".into(),
                    proxy: ProxyKind::KubeProxyIptables,
                    result: Ok(Duration::from_secs(3)),
                },
                Outcome {
                    scenario: "seed".into(),
                    proxy: ProxyKind::OrcaEbpf,
                    result: Err("proxy did not start: no eBPF".into()),
                },
            ],
            scenarios: vec!["seed".into()],
            proxies: vec![ProxyKind::KubeProxyIptables, ProxyKind::OrcaEbpf],
            ..Report::default()
        };
        let t = r.table();
        assert!(t.contains("pass   3.0s"), "{t}");
        assert!(t.contains("seed x orca-ebpf: proxy did not start: no eBPF"), "{t}");
        assert_eq!(r.failures_for(&[ProxyKind::KubeProxyIptables]).len(), 0);
        assert_eq!(r.failures_for(&[ProxyKind::OrcaEbpf]).len(), 1);
    }
}
