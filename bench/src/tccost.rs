//! `orca-bench tc-cost`: what the TC program costs per packet at each scale, on every path a packet
//! can take, measured with BPF_PROG_TEST_RUN the honest way (see `crate::testrun`:
//! test-run repeats see the already translated packet, so translating paths are timed one run per
//! syscall, and the harness's own floor, measured the same way on an empty program, is subtracted).
//!
//! The agent's embedded object is loaded with the production map sizes into a network namespace of
//! this thread's own, whose routes and neighbours let the FIB forward to the measured backends. Each program
//! variant is measured side by side in one run: the default path (DNAT at ingress, the packet goes on through the
//! node's routing and netfilter, the egress program on the output device), the `--ebpf-bypass-netfilter` fast
//! path (FIB lookup and redirect from ingress), and, with `--baseline-object`, the programs of an earlier build
//! ("before"). Every path is also given as a ratio to the pass-through path of the same variant and scale. The maps are filled as the
//! agent fills them: `scale` frontends with 2 to 10 backends each (slots, members, then the
//! frontend); the measured Service is the last one written.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::testrun::{median_empty_runs, median_single_runs_with, EmptyProgram};
use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use orca_common::{Backend, BackendSlotKey, Frontend, FrontendKey, MemberKey, IPPROTO_TCP};
use serde::Serialize;

use crate::probe::tcp_frame;

const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_OK: u32 = 0;

#[derive(clap::Args, Debug)]
pub struct TcCostArgs {
    /// Scales (Service counts), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,30000")]
    scales: Vec<usize>,
    /// Single runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3000)]
    samples: usize,
    /// The programs object of an earlier build, measured as "before" in the same run (`cargo xtask bench --tc-cost
    /// --baseline <git rev>` builds it).
    #[arg(long)]
    baseline_object: Option<PathBuf>,
    /// The label of the baseline (e.g. its commit).
    #[arg(long, default_value = "before")]
    baseline_label: String,
    /// Where the results go (`<date>-tc-cost.{md,json}`).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Which programs, with which load-time settings.
#[derive(Clone, Debug)]
pub enum Variant {
    /// The embedded programs, default settings: Service traffic through the node's netfilter.
    Netfilter,
    /// The embedded programs with `--ebpf-bypass-netfilter`.
    Bypass,
    /// An earlier build's object (label, path), with its default settings: builds before netfilter was seen by
    /// default forwarded every translated packet by FIB redirect, later ones hand them to the stack.
    Baseline(String, PathBuf),
}

impl Variant {
    pub fn name(&self) -> String {
        match self {
            Variant::Netfilter => "netfilter (default)".into(),
            Variant::Bypass => "bypass-netfilter".into(),
            Variant::Baseline(label, _) => label.clone(),
        }
    }

    /// Whether translated packets are redirected by the program (FIB) rather than handed back to the stack.
    fn redirects(&self) -> bool {
        !matches!(self, Variant::Netfilter)
    }
}

/// Nanoseconds per packet, test-run floor subtracted (medians).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Row {
    /// `Variant::name` (empty in results written before variants existed: the FIB-redirect programs).
    #[serde(default)]
    pub variant: String,
    pub services: usize,
    pub backends: usize,
    /// First packet of a connection: frontend hit, backend choice, two conntrack inserts, DNAT, FIB, redirect.
    pub new_connection_ns: f64,
    /// A later packet of the connection: conntrack hit, DNAT, FIB, redirect.
    pub established_ns: f64,
    /// The backend's reply: reverse NAT, FIB, redirect.
    pub reply_ns: f64,
    /// A packet to no frontend (pod to pod): two lookups that miss.
    pub passthrough_ns: f64,
    /// The default path only: the egress program's share of `established_ns` (on the output device, for the
    /// DNATed packet: a conntrack hit, no rewrite for a flow that is not masqueraded). On the default path
    /// `established_ns` and `reply_ns` are the sum of the ingress and the egress program.
    #[serde(default)]
    pub egress_ns: Option<f64>,
    /// The harness's own cost of one run (empty program), already subtracted above.
    pub floor_ns: f64,
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8)
}

fn backend(i: usize, j: usize) -> Ipv4Addr {
    let n = i * 10 + j;
    Ipv4Addr::new(10, 245, (n >> 8) as u8, n as u8)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// This thread's own network namespace: a "pod" side and a "backend" side, forwarding on, the backend
/// range routed and the measured backends' neighbours resolved. Returns (pod ifindex, backend ifindex).
fn private_netns(measured: &[Ipv4Addr], forwarding: bool) -> Result<(u32, u32)> {
    // SAFETY: unshare affects only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    ip(&["link", "add", "orca-tc-b", "type", "veth", "peer", "name", "orca-tc-p"])?;
    ip(&["link", "set", "orca-tc-b", "up"])?;
    ip(&["link", "set", "orca-tc-p", "up"])?;
    ip(&["addr", "add", "10.245.255.254/16", "dev", "orca-tc-b"])?;
    ip(&["addr", "add", "10.244.0.1/24", "dev", "orca-tc-p"])?;
    ip(&[
        "neigh",
        "add",
        "10.244.0.7",
        "lladdr",
        "02:00:00:00:00:07",
        "dev",
        "orca-tc-p",
        "nud",
        "permanent",
    ])?;
    for (k, b) in measured.iter().enumerate() {
        let mac = format!("02:00:00:00:01:{:02x}", k);
        ip(&[
            "neigh",
            "add",
            &b.to_string(),
            "lladdr",
            &mac,
            "dev",
            "orca-tc-b",
            "nud",
            "permanent",
        ])?;
    }
    let setting = format!("net.ipv4.ip_forward={}", u8::from(forwarding));
    let st = std::process::Command::new("sysctl").args(["-qw", &setting]).status()?;
    if !st.success() {
        bail!("sysctl {setting} failed");
    }
    let idx = |n: &str| -> Result<u32> {
        let c = std::ffi::CString::new(n)?;
        // SAFETY: a valid NUL-terminated name.
        match unsafe { libc::if_nametoindex(c.as_ptr()) } {
            0 => bail!("no interface {n}"),
            i => Ok(i),
        }
    };
    Ok((idx("orca-tc-p")?, idx("orca-tc-b")?))
}

fn map<'a, K: aya::Pod, V: aya::Pod>(ebpf: &'a mut Ebpf, name: &str) -> Result<HashMap<&'a mut MapData, K, V>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(name).with_context(|| format!("map {name}"))?,
    )?)
}

/// Writes `scale` frontends like the agent (slots and members first, then the frontend); returns the
/// backend count of every Service.
fn fill(ebpf: &mut Ebpf, scale: usize) -> Result<usize> {
    let mut total = 0;
    for i in 0..scale {
        let n = 2 + i % 9;
        let id = i as u32 + 1;
        for j in 0..n {
            let b = Backend::new(backend(i, j).octets(), 8080);
            map::<BackendSlotKey, Backend>(ebpf, orca_common::MAP_BACKENDS)?.insert(
                BackendSlotKey {
                    service_id: id,
                    slot: j as u32,
                },
                b,
                0,
            )?;
            map::<MemberKey, u32>(ebpf, orca_common::MAP_MEMBERS)?.insert(MemberKey::of(id, &b), j as u32, 0)?;
        }
        let fe = Frontend {
            service_id: id,
            backend_count: n as u16,
            flags: 0,
            affinity_timeout: 0,
            slot_base: 0,
        };
        map::<FrontendKey, Frontend>(ebpf, orca_common::MAP_FRONTENDS)?.insert(
            FrontendKey::new(vip(i).octets(), 80, IPPROTO_TCP),
            fe,
            0,
        )?;
        total += n;
    }
    Ok(total)
}

fn load(variant: &Variant) -> Result<Ebpf> {
    let bypass = u32::from(matches!(variant, Variant::Bypass));
    let mut loader = EbpfLoader::new();
    // The other globals keep the defaults compiled into the object (the agent's defaults).
    loader.override_global(orca_common::GLOBAL_BYPASS_NETFILTER, &bypass, false);
    let mut ebpf = match variant {
        Variant::Baseline(_, path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            loader.load(&bytes)
        }
        _ => loader.load(orca_proxy::ebpf_obj::OBJECT),
    }
    .with_context(|| format!("loading the eBPF object ({})", variant.name()))?;
    let mut names = vec![orca_common::PROG_FROM_POD, orca_common::PROG_FROM_NETDEV];
    // A baseline object has an egress program when it is from after the netfilter default.
    let baseline_egress = matches!(variant, Variant::Baseline(..)) && ebpf.program(orca_common::PROG_EGRESS).is_some();
    if matches!(variant, Variant::Netfilter) || baseline_egress {
        names.push(orca_common::PROG_EGRESS);
    }
    for name in names {
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(ebpf)
}

fn measure(variant: &Variant, scale: usize, samples: usize, empty: &EmptyProgram, ifs: (u32, u32)) -> Result<Row> {
    let (pod_if, backend_if) = ifs;
    let translated = if variant.redirects() {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    };
    let mut ebpf = load(variant)?;
    let backends = fill(&mut ebpf, scale)?;
    let last = scale - 1;
    let from_pod: &SchedClassifier = ebpf
        .program(orca_common::PROG_FROM_POD)
        .context("from_pod")?
        .try_into()?;
    let from_netdev: &SchedClassifier = ebpf
        .program(orca_common::PROG_FROM_NETDEV)
        .context("from_netdev")?
        .try_into()?;

    let baseline = matches!(variant, Variant::Baseline(..));
    let expect = |what: &str, verdict: u32, want: u32| -> Result<()> {
        // A baseline translates either way (see `Variant::Baseline`).
        let either = baseline && want == translated && (verdict == TC_ACT_OK || verdict == TC_ACT_REDIRECT);
        if verdict != want && !either {
            bail!("{what}: verdict {verdict}, expected {want} (is the FIB set-up right?)");
        }
        Ok(())
    };
    // New connections: a new source port every sample.
    let (new_ns, v) = median_single_runs_with(from_pod, samples, pod_if, |i| {
        tcp_frame(CLIENT, 10_000 + i as u16, vip(last), 80, TCP_SYN)
    })?;
    expect("new connection", v, translated)?;
    // The stack forwards what ingress translated, and the egress program completes it: the default, and a baseline
    // from after it (which handed the packet back to the stack).
    let stack_path = matches!(variant, Variant::Netfilter) || (baseline && v == TC_ACT_OK);
    // Established: the flow of the first sample, again and again.
    let est = tcp_frame(CLIENT, 10_000, vip(last), 80, TCP_ACK);
    let (est_ns, v) = median_single_runs_with(from_pod, samples, pod_if, |_| est.clone())?;
    expect("established", v, translated)?;
    // The translated established packet: its destination is the chosen backend.
    let once = |prog: &SchedClassifier, frame: &[u8]| -> Result<Vec<u8>> {
        let mut out = vec![0u8; frame.len() + 64];
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        out.truncate(frame.len());
        Ok(out)
    };
    let est_out = once(from_pod, &est)?;
    let chosen = Ipv4Addr::new(est_out[30], est_out[31], est_out[32], est_out[33]);
    // Replies of that flow. With netfilter bypassed, ingress translates them; by default ingress leaves them to
    // the stack and the egress program on the client's device translates them.
    let reply = tcp_frame(chosen, 8080, CLIENT, 10_000, TCP_ACK);
    let (reply_ns, v) = median_single_runs_with(from_netdev, samples, backend_if, |_| reply.clone())?;
    expect("reply", v, translated)?;
    let (mut est_egress_ns, mut reply_egress_ns) = (None, None);
    if stack_path {
        let egress: &SchedClassifier = ebpf
            .program(orca_common::PROG_EGRESS)
            .context("orca_egress")?
            .try_into()?;
        let (ns, v) = median_single_runs_with(egress, samples, backend_if, |_| est_out.clone())?;
        expect("egress of the established packet", v, TC_ACT_OK)?;
        est_egress_ns = Some(ns);
        let (ns, v) = median_single_runs_with(egress, samples, pod_if, |_| reply.clone())?;
        expect("egress of the reply", v, TC_ACT_OK)?;
        let out = once(egress, &reply)?;
        let src = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
        if src != vip(last) {
            bail!(
                "the egress program left the reply's source at {src}, expected the ClusterIP {}",
                vip(last)
            );
        }
        reply_egress_ns = Some(ns);
    }
    // Pass-through: nothing is rewritten, so repeats are faithful.
    let pass = tcp_frame(CLIENT, 20_000, chosen, 8080, TCP_ACK);
    let mut out = vec![0u8; pass.len() + 64];
    let r = from_pod.test_run(TestRunOptions {
        data_in: Some(&pass),
        data_out: Some(&mut out),
        repeat: 100_000,
        ..TestRunOptions::default()
    })?;
    expect("pass-through", r.return_value, TC_ACT_OK)?;
    let pass_ns = r.duration.as_nanos() as f64 - f64::from(empty.run(&pass, 100_000)?);
    let floor = median_empty_runs(empty, &est, samples)?;
    let net = |x: f64| (x - floor).max(0.0);
    Ok(Row {
        variant: variant.name(),
        services: scale,
        backends,
        new_connection_ns: net(new_ns),
        established_ns: net(est_ns) + est_egress_ns.map_or(0.0, net),
        reply_ns: net(reply_ns) + reply_egress_ns.map_or(0.0, net),
        passthrough_ns: pass_ns.max(0.0),
        egress_ns: est_egress_ns.map(net),
        floor_ns: floor,
    })
}

pub fn run(a: TcCostArgs) -> Result<()> {
    let mut variants = vec![Variant::Netfilter, Variant::Bypass];
    if let Some(obj) = &a.baseline_object {
        variants.push(Variant::Baseline(a.baseline_label.clone(), obj.clone()));
    }
    let rows = measure_scales(&a.scales, a.samples, &variants)?;
    write(&a, &variants, &rows)
}

/// Every (scale, variant) row, measured in a network namespace of a thread of its own (gone with the thread);
/// the variants of one scale are measured one after the other, so they see the same machine.
pub fn measure_scales(scales: &[usize], samples: usize, variants: &[Variant]) -> Result<Vec<Row>> {
    if scales.is_empty() || scales.contains(&0) || scales.iter().any(|&s| s > 60_000) {
        bail!("--scales: 1..=60000 each");
    }
    let scales = scales.to_vec();
    let variants = variants.to_vec();
    std::thread::spawn(move || {
        // The measured Service is always the last one: its backends need neighbours at every scale.
        let measured: Vec<Ipv4Addr> = scales
            .iter()
            .flat_map(|&s| (0..2 + (s - 1) % 9).map(move |j| backend(s - 1, j)))
            .collect();
        let ifs = private_netns(&measured, true)?;
        let empty = EmptyProgram::load()?;
        let mut rows = Vec::new();
        for &scale in &scales {
            for v in &variants {
                let row = measure(v, scale, samples, &empty, ifs)?;
                println!(
                    "{:>6} Services ({:>6} backends), {:<20}: new {:>5.0} ns, established {:>5.0} ns, reply {:>5.0} ns, pass-through {:>4.0} ns, egress {} (floor {:.0} ns)",
                    row.services,
                    row.backends,
                    row.variant,
                    row.new_connection_ns,
                    row.established_ns,
                    row.reply_ns,
                    row.passthrough_ns,
                    row.egress_ns.map_or("-".to_string(), |e| format!("{e:.0} ns")),
                    row.floor_ns
                );
                rows.push(row);
            }
        }
        Ok(rows)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TC cost thread panicked"))?
}

/// `x` as a multiple of the pass-through path.
pub fn ratio(x: f64, passthrough: f64) -> String {
    if passthrough <= 0.0 {
        "-".into()
    } else {
        format!("{:.1}x", x / passthrough)
    }
}

/// The markdown table of `rows` (one line per scale and variant).
pub fn table(rows: &[Row]) -> String {
    let mut md = String::from(
        "| Services | backends | programs | new connection | established | reply | of which egress | pass-through | floor subtracted |\n\
         | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let p = r.passthrough_ns;
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} ({}) | {:.0} ({}) | {:.0} ({}) | {} | {:.0} | {:.0} |\n",
            r.services,
            r.backends,
            if r.variant.is_empty() {
                "fib-redirect"
            } else {
                &r.variant
            },
            r.new_connection_ns,
            ratio(r.new_connection_ns, p),
            r.established_ns,
            ratio(r.established_ns, p),
            r.reply_ns,
            ratio(r.reply_ns, p),
            r.egress_ns
                .map_or("-".to_string(), |e| format!("{e:.0} ({})", ratio(e, p))),
            p,
            r.floor_ns
        ));
    }
    md
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

fn write(a: &TcCostArgs, variants: &[Variant], rows: &[Row]) -> Result<()> {
    let now = crate::cluster::rfc3339_now();
    let date = &now[..10.min(now.len())];
    let stem = format!("{date}-tc-cost");
    std::fs::create_dir_all(&a.out)?;
    let json = a.out.join(format!("{stem}.json"));
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&serde_json::json!({"machine": machine(), "samples": a.samples, "rows": rows}))?,
    )?;
    let baseline = variants.iter().find_map(|v| match v {
        Variant::Baseline(label, _) => Some(label.clone()),
        _ => None,
    });
    let mut md = format!(
        "# TC program cost per packet\n\nMachine: {}. Command: `cargo xtask bench --tc-cost{}` \
         (`orca-bench tc-cost --scales {} --samples {}`), as root.\n\n\
         BPF_PROG_TEST_RUN of the agent's own programs over maps filled like the agent fills them (production map \
         sizes; 2 to 10 backends per Service; the measured Service written last), in a network namespace whose \
         FIB forwards to the backends. Programs: `netfilter (default)` hands the translated packet back to the \
         stack (the node's routing and netfilter forward it) and the egress program on the output device completes the \
         translation, so its established and reply figures are the sum of both programs (the egress share of \
         established in its own column); `bypass-netfilter` (`--ebpf-bypass-netfilter`) includes the FIB lookup and the \
         redirect{}. Translating paths are timed one run per syscall (test-run repeats would see the already \
         translated packet), median of {} runs, minus the median of an empty program's runs (the harness's floor, \
         shown). Nanoseconds per packet, and in brackets the multiple of the same row's pass-through path \
         (absolute figures differ 2-3x between machines of this kind; the ratios travel).\n\n",
        machine(),
        baseline.as_deref().map(|b| format!(" --baseline {b}")).unwrap_or_default(),
        a.scales.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        a.samples,
        baseline
            .as_deref()
            .map(|b| format!("; `{b}` is the programs object of commit {b}, built by the same command, with its defaults (builds from before the netfilter default forward by FIB redirect; later ones are measured like `netfilter (default)`, egress program included)"))
            .unwrap_or_default(),
        a.samples
    );
    md.push_str(&table(rows));
    let path = a.out.join(format!("{stem}.md"));
    std::fs::write(&path, md)?;
    println!("wrote {} and {}", path.display(), json.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The per-packet cost does not depend on the number of Services (hash lookups, not chains): the agent's own
    /// programs over maps filled like the agent fills them, with 1 and with 10,000 Services. Not a speed goal (those
    /// are the bench's results): only that the Service table's size does not show.
    #[test]
    fn per_packet_cost_does_not_grow_with_the_number_of_services() {
        let rows = super::measure_scales(&[1, 10_000], 2_000, &[super::Variant::Netfilter]).expect("measuring");
        let (one, many) = (&rows[0], &rows[1]);
        assert_eq!((one.services, many.services), (1, 10_000));
        for (what, a, b) in [
            ("established", one.established_ns, many.established_ns),
            ("reply", one.reply_ns, many.reply_ns),
            ("pass-through", one.passthrough_ns, many.passthrough_ns),
        ] {
            assert!(
                b < a * 2.0 + 200.0,
                "{what}: {a:.0} ns with 1 Service, {b:.0} ns with 10,000"
            );
            assert!(a < 5_000.0, "{what}: {a:.0} ns per packet");
        }
    }
}
