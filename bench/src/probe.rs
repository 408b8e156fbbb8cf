//! Side measurements: the proxies' Prometheus histograms, their processes' RSS and CPU time, and the TC
//! program's cost per packet with BPF_PROG_TEST_RUN against a running eBPF agent's pinned maps.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// A Prometheus histogram: cumulative buckets (upper bound, count), sum and count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    /// `self - earlier` (observations between two scrapes).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map(|(_, c)| *c)
                    .unwrap_or(0.0);
                (*le, c - before)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// Upper bound of the bucket holding the `q`-quantile (an over-estimate by at most one bucket width).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let want = q * self.count;
        self.buckets.iter().find(|(_, c)| *c >= want).map(|(le, _)| *le)
    }
}

/// Parse histogram `name` from a Prometheus text exposition: the series without labels or with
/// `ip_family="IPv4"` (kube-proxy exports one series per IP family; the sandbox is IPv4).
pub fn parse_histogram(text: &str, name: &str) -> Option<Histogram> {
    let mut h = Histogram::default();
    let mut found = false;
    let bucket = format!("{name}_bucket{{");
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else { continue };
        if key.contains("ip_family=") && !key.contains("ip_family=\"IPv4\"") {
            continue;
        }
        if let Some(rest) = key.strip_prefix(&bucket) {
            let Some(le) = rest
                .split(',')
                .find_map(|kv| kv.trim_end_matches('}').strip_prefix("le=\""))
                .map(|s| s.trim_end_matches('"'))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            if !le.is_nan() && !h.buckets.iter().any(|(l, _)| *l == le) {
                h.buckets.push((le, v));
                found = true;
            }
        } else if key == format!("{name}_sum") || key.starts_with(&format!("{name}_sum{{")) {
            h.sum = v;
            found = true;
        } else if key == format!("{name}_count") || key.starts_with(&format!("{name}_count{{")) {
            h.count = v;
            found = true;
        }
    }
    h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    found.then_some(h)
}

pub const NETWORK_PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
pub const SYNC_RULES: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
pub const SYNC_FULL: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
pub const SYNC_PARTIAL: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds";

/// Sync timings a proxy logged (node-a's log, from a byte offset on).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoggedSyncs {
    /// Duration of each sync that applied changes (Orca: `synced full=false` lines with changes; kube-proxy:
    /// every `SyncProxyRules complete`, periodic ones included), ms.
    pub sync_ms: Vec<f64>,
    /// Orca only: the oldest change's age when its sync finished (watch event -> datapath written), ms.
    pub since_change_ms: Vec<f64>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A Go duration string ("1.52s", "697.4ms", "850µs", "1m2.5s") in ms.
pub fn go_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim().trim_matches('"');
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&d) = chars.peek() {
            if d.is_ascii_digit() || d == '.' {
                break;
            }
            unit.push(d);
            chars.next();
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "µs" | "us" => 1e-3,
            "ns" => 1e-6,
            _ => return None,
        };
        any = true;
    }
    (any && num.is_empty()).then_some(total)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let i = line.find(key)?;
    line[i + key.len()..].split_whitespace().next()
}

/// Sync timings from a proxy log text (Orca's tracing lines or kube-proxy's klog lines).
pub fn parse_logged_syncs(text: &str) -> LoggedSyncs {
    let mut r = LoggedSyncs::default();
    for raw in text.lines() {
        if raw.contains("SyncProxyRules complete") {
            if let Some(ms) = field(raw, "elapsed=").and_then(go_duration_ms) {
                r.sync_ms.push(ms);
            }
            continue;
        }
        if !raw.contains("synced") {
            continue;
        }
        let line = strip_ansi(raw);
        if !line.contains(" synced") || field(&line, "full=") != Some("false") {
            continue;
        }
        let n = |k: &str| field(&line, k).and_then(|v| v.parse::<f64>().ok());
        if n("upserted=").unwrap_or(0.0) + n("removed=").unwrap_or(0.0) == 0.0 {
            continue;
        }
        if let Some(s) = n("seconds=") {
            r.sync_ms.push(s * 1e3);
        }
        if let Some(s) = n("since_first_change=") {
            r.since_change_ms.push(s * 1e3);
        }
    }
    r
}

/// The sync timings `path` logged after byte `from`.
pub fn logged_syncs(path: &Path, from: u64) -> Result<LoggedSyncs> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let from = (from as usize).min(bytes.len());
    Ok(parse_logged_syncs(&String::from_utf8_lossy(&bytes[from..])))
}

/// RSS and CPU time of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcStats {
    pub pid: u32,
    pub comm: String,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// utime + stime.
    pub cpu_s: f64,
    /// cutime + cstime: waited-for children (kube-proxy's iptables-restore / nft runs).
    pub children_cpu_s: f64,
    /// RssAnon (heap, stacks) of the RSS.
    #[serde(default)]
    pub rss_anon_mib: Option<f64>,
    /// Threads.
    #[serde(default)]
    pub threads: Option<u64>,
}

fn status_field(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Processes named one of `names` inside network namespace `ns` (`ip netns pids`).
pub fn proxy_pids(ns: &str, names: &[&str]) -> Vec<(u32, String)> {
    let out = match std::process::Command::new("ip").args(["netns", "pids", ns]).output() {
        Ok(o) => o,
        Err(_) => return Vec::new(),
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim().to_string();
            names.contains(&comm.as_str()).then_some((pid, comm))
        })
        .collect()
}

/// Parse `/proc/<pid>/status` (VmRSS, VmHWM) and `/proc/<pid>/stat` (utime, stime, cutime, cstime).
pub fn parse_proc(status: &str, stat: &str, ticks: f64) -> Result<(f64, f64, f64, f64)> {
    let kb = |key: &str| -> Result<f64> {
        let l = status
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in status"))?;
        let n: f64 = l
            .split_whitespace()
            .nth(1)
            .context("empty line")?
            .parse()
            .with_context(|| format!("bad {key} line {l:?}"))?;
        Ok(n / 1024.0)
    };
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let after = stat.rsplit_once(')').map(|(_, r)| r).context("stat without comm")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Result<f64> {
        f.get(n - 3)
            .with_context(|| format!("stat has no field {n}"))?
            .parse::<f64>()
            .with_context(|| format!("stat field {n}"))
    };
    Ok((
        kb("VmRSS:")?,
        kb("VmHWM:")?,
        (field(14)? + field(15)?) / ticks,
        (field(16)? + field(17)?) / ticks,
    ))
}

pub fn proc_stats(pid: u32, comm: &str) -> Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (rss, hwm, cpu, children) = parse_proc(&status, &stat, if ticks > 0.0 { ticks } else { 100.0 })?;
    Ok(ProcStats {
        pid,
        comm: comm.to_string(),
        rss_mib: rss,
        hwm_mib: hwm,
        cpu_s: cpu,
        children_cpu_s: children,
        rss_anon_mib: status_field(&status, "RssAnon:").map(|kb| kb / 1024.0),
        threads: status_field(&status, "Threads:").map(|n| n as u64),
    })
}

/// `perf report --stdio` with `args`: its output, or an error with perf's own message.
fn perf_report(args: &[&str]) -> Result<String> {
    let rep = std::process::Command::new("perf")
        .args(["report", "--stdio"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running perf report")?;
    if !rep.status.success() {
        bail!("perf report failed: {}", String::from_utf8_lossy(&rep.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&rep.stdout).into_owned())
}

/// `perf record -a` for `secs` seconds into `out`, then the top of `perf report` by comm, object and symbol
/// (entries of at least 0.5% of all samples, at most 60 lines). The data file is removed afterwards.
pub fn perf_profile(out: &Path, secs: f64) -> Result<String> {
    let outs = out.to_str().context("non-UTF-8 temp path")?;
    let sleep = format!("{secs:.2}");
    let rec = std::process::Command::new("perf")
        .args(["record", "-a", "-F", "999", "-q", "-o", outs, "--", "sleep", &sleep])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running perf record")?;
    let result = (|| {
        if !rec.status.success() {
            bail!("perf record failed: {}", String::from_utf8_lossy(&rec.stderr).trim());
        }
        let text = perf_report(&[
            "-i",
            outs,
            "--no-children",
            "--sort",
            "comm,dso,symbol",
            "--percent-limit",
            "0.5",
        ])?;
        let samples = text
            .lines()
            .find(|l| l.starts_with("# Samples"))
            .unwrap_or("")
            .trim()
            .to_string();
        let mut lines = vec![samples];
        lines.extend(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| {
                    let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
                    // Without hardware counters perf prints empty IPC columns ("- -").
                    l.trim_end_matches(" - -").to_string()
                })
                .take(60),
        );
        Ok(lines.join("\n"))
    })();
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(format!("{outs}.old"));
    result
}

/// `perf record -g -p <pid>` running until [`AgentProfile::finish`].
pub struct AgentProfile {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl AgentProfile {
    pub fn start(pid: u32, out: &Path) -> Result<AgentProfile> {
        let outs = out.to_str().context("non-UTF-8 temp path")?.to_string();
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-F", "999", "-g", "-p", &pid.to_string(), "-o", &outs])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting perf record")?;
        Ok(AgentProfile {
            child,
            out: out.to_path_buf(),
        })
    }

    /// Stop the recording (SIGINT, as perf expects) and return the top symbols by self time and by
    /// inclusive time (at most 40 lines each, ≥ 1% of the agent's samples).
    pub fn finish(mut self) -> Result<String> {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("perf record did not stop within 60 s of SIGINT");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let outs = self.out.to_str().context("non-UTF-8 temp path")?.to_string();
        let report = |children: bool| -> Result<String> {
            let text = perf_report(&[
                "-i",
                &outs,
                "--sort",
                "symbol",
                "--percent-limit",
                "1",
                "-g",
                "none",
                if children { "--children" } else { "--no-children" },
            ])?;
            Ok(text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| {
                    let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
                    l.trim_end_matches(" - -").to_string()
                })
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let result = (|| {
            Ok(format!(
                "self:\n{}\n\ninclusive (children):\n{}",
                report(false)?,
                report(true)?
            ))
        })();
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(format!("{outs}.old"));
        result
    }
}

/// TC program cost, nanoseconds per run as BPF_PROG_TEST_RUN reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TcCost {
    /// A TCP SYN from a pod to the measured ClusterIP (the first run creates the conntrack entry; the
    /// repeats take the established-flow path of the same 5-tuple).
    pub service_ns: f64,
    /// A TCP SYN from a pod to a pod IP (no Service: lookups miss, the packet passes).
    pub passthrough_ns: f64,
    pub repeat: u32,
    pub service_verdict: u32,
    pub passthrough_verdict: u32,
    /// The same test run of a two-instruction TC program (`r0 = TC_ACT_OK; exit`) on the SYN: the harness's own
    /// per-repeat floor (skb reset, program dispatch, timing), which `service_ns` includes too.
    #[serde(default)]
    pub empty_ns: Option<f64>,
    /// An ARP frame (not IPv4: the program parses the Ethernet header, reads the clock, checks for an ICMP
    /// error and passes it): the program's fixed entry cost without any map lookup.
    #[serde(default)]
    pub nonip_ns: Option<f64>,
    /// A TCP SYN from the pod's IPv6 address to the Service's IPv6 cluster IP (after a warm-up run that created its
    /// conntrack entry, as for `service_ns`): the IPv6 Service path. (Agents before the eBPF IPv6 datapath passed it
    /// on untranslated to ip6tables; `ipv6_dst` tells which.)
    #[serde(default)]
    pub ipv6_ns: Option<f64>,
    /// Destination of that SYN after the program ran: an IPv6 backend when translated, the cluster IP when not.
    #[serde(default)]
    pub ipv6_dst: Option<String>,
    /// Destination of the service SYN after the program ran: a backend's address when it was translated (the
    /// cost is then the Service path's), the ClusterIP when not.
    #[serde(default)]
    pub service_dst: Option<String>,
}

/// A broadcast ARP request (Ethernet + 28 bytes).
pub fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 244, 1, 2]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 244, 1, 1]);
    f
}

/// BPF_PROG_TEST_RUN of a two-instruction sched_cls program on `frame`, `repeat` times: nanoseconds per run.
pub fn tc_empty_baseline(frame: &[u8], repeat: u32) -> Result<f64> {
    let empty = crate::testrun::EmptyProgram::load()?;
    Ok(f64::from(empty.run(frame, repeat)?))
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP SYN (checksums valid).
pub fn syn_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp_frame(src, sport, dst, dport, 0x02)
}

/// A 20-byte TCP header with `flags`, its checksum over `pseudo` (the IP pseudo-header) and itself.
fn tcp_header(sport: u16, dport: u16, flags: u8, pseudo: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&0x1000_0000u32.to_be_bytes());
    tcp.extend_from_slice(&0u32.to_be_bytes());
    tcp.push(5 << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let c = csum_fold(csum_add(csum_add(0, pseudo), &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    tcp
}

/// Ethernet + IPv6 + a TCP SYN header (checksum valid).
pub fn syn6_frame(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&20u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 6]);
    let tcp = tcp_header(sport, dport, 0x02, &pseudo);
    // Version 6, no traffic class or flow label; payload length; next header TCP; hop limit 64.
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x07, 0x86, 0xdd];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// Ethernet + IPv4 + a TCP header with `flags` (checksums valid).
pub fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&20u16.to_be_bytes());
    let tcp = tcp_header(sport, dport, flags, &pseudo);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x07, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// Load the agent's programs over the maps a running orca-proxy pinned under `bpf_root` (so the lookups see
/// the real tables at this scale) and test-run `orca_from_pod` `repeat` times on two SYNs.
pub fn tc_cost(
    bpf_root: &Path,
    client: Ipv4Addr,
    vip: Ipv4Addr,
    vport: u16,
    pod: Ipv4Addr,
    v6: (Ipv6Addr, Ipv6Addr),
    repeat: u32,
) -> Result<TcCost> {
    use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
    let dir = orca_proxy::dataplane::ebpf::loader::versioned_dir(bpf_root);
    if !dir.join("maps").is_dir() {
        let found: Vec<String> = std::fs::read_dir(bpf_root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "no pinned maps under {} (is orca-proxy running in eBPF mode? {} holds {found:?})",
            dir.display(),
            bpf_root.display()
        );
    }
    let settings = orca_proxy::dataplane::ebpf::loader::LoadSettings::for_pinned(&dir)?;
    let ebpf = orca_proxy::dataplane::ebpf::loader::load(&dir, &settings)?;
    let prog: &SchedClassifier = ebpf
        .program(orca_common::PROG_FROM_POD)
        .context("no orca_from_pod program")?
        .try_into()?;
    let run_out = |frame: &[u8]| -> Result<(f64, u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        Ok((r.duration.as_nanos() as f64, r.return_value, out))
    };
    let run = |frame: &[u8]| run_out(frame).map(|(ns, v, _)| (ns, v));
    // Warm up (creates the conntrack entry), then measure.
    let svc = syn_frame(client, 40_000, vip, vport);
    let _ = run(&svc)?;
    let (service_ns, service_verdict, out) = run_out(&svc)?;
    // The program must have translated the SYN: its destination is a backend now, not the ClusterIP.
    let service_dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    let (passthrough_ns, passthrough_verdict) = run(&syn_frame(client, 40_001, pod, 8080))?;
    let svc6 = syn6_frame(v6.0, 40_002, v6.1, vport);
    let _ = run(&svc6);
    let (ipv6_ns, ipv6_dst) = match run_out(&svc6) {
        Ok((ns, _, out)) => {
            let dst: [u8; 16] = out[38..54].try_into().unwrap_or([0; 16]);
            (Some(ns), Some(std::net::Ipv6Addr::from(dst).to_string()))
        }
        Err(_) => (None, None),
    };
    Ok(TcCost {
        service_ns,
        passthrough_ns,
        repeat,
        service_verdict,
        passthrough_verdict,
        empty_ns: tc_empty_baseline(&svc, repeat).ok(),
        nonip_ns: run(&arp_frame()).ok().map(|(ns, _)| ns),
        ipv6_ns,
        ipv6_dst,
        service_dst: Some(service_dst.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP kubeproxy_sync_proxy_rules_duration_seconds x
# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.001"} 1
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.002"} 3
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.004"} 4
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="+Inf"} 4
kubeproxy_sync_proxy_rules_duration_seconds_sum 0.007
kubeproxy_sync_proxy_rules_duration_seconds_count 4
kubeproxy_network_programming_duration_seconds_bucket{le="0.25"} 0
kubeproxy_x_bucket{ip_family="IPv4",le="0.5"} 2
kubeproxy_x_bucket{ip_family="IPv4",le="+Inf"} 2
kubeproxy_x_sum{ip_family="IPv4"} 0.5
kubeproxy_x_count{ip_family="IPv4"} 2
kubeproxy_x_bucket{ip_family="IPv6",le="0.5"} 9
kubeproxy_x_bucket{ip_family="IPv6",le="+Inf"} 9
kubeproxy_x_sum{ip_family="IPv6"} 3
kubeproxy_x_count{ip_family="IPv6"} 9
"#;

    #[test]
    fn histograms() {
        let h = parse_histogram(SAMPLE, SYNC_RULES).unwrap();
        assert_eq!(h.count, 4.0);
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.quantile_bound(0.5), Some(0.002));
        assert_eq!(h.quantile_bound(0.99), Some(0.004));
        assert!((h.mean().unwrap() - 0.00175).abs() < 1e-9);
        let earlier = Histogram {
            buckets: vec![(0.001, 1.0), (0.002, 1.0), (0.004, 1.0), (f64::INFINITY, 1.0)],
            sum: 0.001,
            count: 1.0,
        };
        let d = h.since(&earlier);
        assert_eq!(d.count, 3.0);
        assert_eq!(d.quantile_bound(0.3), Some(0.002));
        assert!(parse_histogram(SAMPLE, "nope").is_none());
        let v4 = parse_histogram(SAMPLE, "kubeproxy_x").unwrap();
        assert_eq!((v4.count, v4.sum), (2.0, 0.5));
        assert_eq!(v4.buckets, vec![(0.5, 2.0), (f64::INFINITY, 2.0)]);
        assert!(parse_histogram("garbage {{{ ", SYNC_RULES).is_none());
    }

    #[test]
    fn proc_parsing() {
        let status = "Name:\tkube-proxy\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\n";
        let stat = "123 (kube proxy) S 1 2 3 4 5 6 7 8 9 10 250 50 30 20 20 0";
        let (rss, hwm, cpu, ch) = parse_proc(status, stat, 100.0).unwrap();
        assert_eq!((rss, hwm), (10.0, 20.0));
        assert_eq!(cpu, 3.0);
        assert_eq!(ch, 0.5);
        assert!(parse_proc("", stat, 100.0).is_err());
        assert_eq!(
            status_field("RssAnon:\t  2048 kB\nThreads:\t7\n", "RssAnon:"),
            Some(2048.0)
        );
        assert_eq!(status_field("Threads:\t7\n", "Threads:"), Some(7.0));
        assert_eq!(status_field("", "Threads:"), None);
        assert!(parse_proc(status, "123 (x) S 1", 100.0).is_err());
    }

    #[test]
    fn logged_sync_lines() {
        let text = "\u{1b}[2m2026-11-26T18:35:06.854321Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m \u{1b}[2morca_proxy::sync\u{1b}[0m\u{1b}[2m:\u{1b}[0m synced \u{1b}[3mfull\u{1b}[0m\u{1b}[2m=\u{1b}[0mfalse \u{1b}[3mupserted\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \u{1b}[3mremoved\u{1b}[0m\u{1b}[2m=\u{1b}[0m0 \u{1b}[3mwritten\u{1b}[0m\u{1b}[2m=\u{1b}[0m7 \u{1b}[3mseconds\u{1b}[0m\u{1b}[2m=\u{1b}[0m0.0003 \u{1b}[3msince_first_change\u{1b}[0m\u{1b}[2m=\u{1b}[0m0.0005
2026-11-26T18:35:07Z DEBUG orca_proxy::sync: synced full=true upserted=9 removed=0 written=70 seconds=0.2 since_first_change=0.3
2026-11-26T18:35:08Z DEBUG orca_proxy::sync: synced full=false upserted=0 removed=0 written=0 seconds=0.01
I1126 18:33:35.927956   26486 proxier.go:649] \"SyncProxyRules complete\" ipFamily=\"IPv4\" elapsed=\"1.962849624s\"
I1126 18:33:36.927956   26486 proxier.go:649] \"SyncProxyRules complete\" ipFamily=\"IPv4\" elapsed=\"697.5ms\"
";
        let r = parse_logged_syncs(text);
        assert_eq!(r.since_change_ms.len(), 1);
        assert!((r.since_change_ms[0] - 0.5).abs() < 1e-9);
        assert_eq!(r.sync_ms.len(), 3, "{r:?}");
        assert!((r.sync_ms[0] - 0.3).abs() < 1e-9);
        assert!((r.sync_ms[1] - 1962.849624).abs() < 1e-6);
        assert!((r.sync_ms[2] - 697.5).abs() < 1e-9);
        assert_eq!(go_duration_ms("1m2.5s"), Some(62_500.0));
        assert_eq!(go_duration_ms("850µs"), Some(0.85));
        assert_eq!(go_duration_ms("12"), None);
        assert_eq!(go_duration_ms("3parsecs"), None);
    }

    #[test]
    fn empty_program_baseline() {
        // Needs CAP_BPF; as an unprivileged user the load fails with an error, never a panic.
        let f = syn_frame(Ipv4Addr::new(10, 244, 1, 2), 40000, Ipv4Addr::new(10, 96, 0, 10), 80);
        match tc_empty_baseline(&f, 1000) {
            Ok(ns) => assert!(ns < 10_000.0, "{ns} ns for two instructions"),
            Err(e) => assert!(e.to_string().contains("BPF_PROG"), "{e}"),
        }
    }

    #[test]
    fn syn_checksums() {
        let f = syn_frame(Ipv4Addr::new(10, 244, 1, 2), 40000, Ipv4Addr::new(10, 96, 0, 10), 80);
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(csum_fold(csum_add(0, &f[14..34])), 0);
        // The TCP checksum over the pseudo-header and the segment folds to zero.
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(csum_fold(csum_add(csum_add(0, &pseudo), &f[34..])), 0);
        let a = arp_frame();
        assert_eq!((a.len(), &a[12..14]), (42, &[0x08u8, 0x06][..]));
        let src: Ipv6Addr = "fd00:244:1::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00:96::a".parse().unwrap();
        let f = syn6_frame(src, 40000, dst, 80);
        assert_eq!((f.len(), &f[12..14], f[20]), (14 + 40 + 20, &[0x86u8, 0xdd][..], 6));
        let mut pseudo = f[22..54].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
        assert_eq!(csum_fold(csum_add(csum_add(0, &pseudo), &f[54..])), 0);
    }
}
