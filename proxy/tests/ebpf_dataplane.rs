//! The eBPF dataplane end to end, in network namespaces created (and removed) by the test:
//!
//! ```text
//!  client ns                 node ns (dataplane runs here)             backend ns
//!  eth0 10.201.0.2 ----- c0 10.201.0.1   b0 10.202.0.1 ----- eth0 10.202.0.2 (socat :8080)
//! ```
//!
//! The client connects to ClusterIP 10.96.0.10:80; the program on c0 (TCX ingress) DNATs to the
//! backend, the program on b0 reverse-NATs the replies. Then the Service loses its endpoints and
//! connect() must fail at once with "Connection refused" (ICMP port unreachable from the program).
//! An agent restart (new dataplane adopting the pinned maps and links) keeps the Service working,
//! and cleanup removes every pin. Needs root.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orca_proxy::dataplane::ebpf::loader::TcAttach;
use orca_proxy::dataplane::ebpf::{EbpfDataplane, EbpfOptions};
use orca_proxy::dataplane::{Dataplane, DataplaneConfig};
use orca_proxy::model::state::{ServicePortState, Snapshot};
use orca_proxy::model::tracker::Diff;
use orca_proxy::model::{Endpoint, NodeInfo, Protocol, ServicePort, ServicePortName};

struct Env {
    prefix: String,
    dir: PathBuf,
    servers: Vec<Child>,
}

impl Env {
    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }
    fn bpf_root(&self) -> PathBuf {
        self.dir.join("bpf")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Not every test makes every namespace.
        for role in ["client", "client2", "node", "backend"] {
            if Path::new("/run/netns").join(self.ns(role)).exists() {
                let _ = Command::new("ip").args(["netns", "del", &self.ns(role)]).status();
            }
        }
        let root = self.bpf_root();
        if let Ok(c) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) {
            // SAFETY: valid C string. Unmounting the private bpffs drops whatever is still pinned.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces `orca-ebdp-<pid>-<tag>-*`: tests of one process run in parallel.
fn setup(tag: &str) -> Env {
    let prefix = format!("orca-ebdp-{}-{tag}", std::process::id());
    let env = Env {
        dir: std::env::temp_dir().join(&prefix),
        prefix,
        servers: Vec::new(),
    };
    std::fs::create_dir_all(&env.dir).unwrap();
    let (c, n, b) = (env.ns("client"), env.ns("node"), env.ns("backend"));
    for ns in [&c, &n, &b] {
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    run(&[
        "ip", "-n", &n, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns", &c,
    ]);
    run(&[
        "ip", "-n", &n, "link", "add", "b0", "type", "veth", "peer", "name", "eth0", "netns", &b,
    ]);
    run(&["ip", "-n", &n, "addr", "add", "10.201.0.1/24", "dev", "c0"]);
    run(&["ip", "-n", &n, "addr", "add", "10.202.0.1/24", "dev", "b0"]);
    run(&["ip", "-n", &c, "addr", "add", "10.201.0.2/24", "dev", "eth0"]);
    run(&["ip", "-n", &b, "addr", "add", "10.202.0.2/24", "dev", "eth0"]);
    for (ns, dev) in [(&n, "c0"), (&n, "b0"), (&c, "eth0"), (&b, "eth0")] {
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    run(&["ip", "-n", &c, "route", "add", "default", "via", "10.201.0.1"]);
    run(&["ip", "-n", &b, "route", "add", "default", "via", "10.202.0.1"]);
    run(&["ip", "netns", "exec", &n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    env
}

fn enter_netns(name: &str) {
    let f = std::fs::File::open(Path::new("/var/run/netns").join(name)).expect("netns file");
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `body` on a thread that entered the node namespace (where the dataplane runs), then removes `env`
/// (namespaces, servers, bpffs) before passing on the body's panic: cleanup comes first, also when the body failed.
fn run_in_node(env: Env, body: impl FnOnce(&Env) + Send) {
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&env.ns("node"));
            body(&env)
        })
        .join()
    });
    drop(env);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

const DOWNLOAD_BYTES: usize = 30_000_000;

fn service(endpoints: &[&str]) -> Arc<ServicePortState> {
    service_on("web", "10.96.0.10", 80, 8080, endpoints)
}

/// The download Service: 10.96.0.11:81 -> backend:8081, which sends DOWNLOAD_BYTES.
fn download_service() -> Arc<ServicePortState> {
    service_on("download", "10.96.0.11", 81, 8081, &["10.202.0.2"])
}

fn service_on(svc: &str, vip: &str, vport: u16, target: u16, endpoints: &[&str]) -> Arc<ServicePortState> {
    let name = ServicePortName::new("default", svc, "http", Protocol::Tcp);
    let port = ServicePort::new(name, vip.parse().unwrap(), vport);
    let eps = endpoints
        .iter()
        .map(|ip| Endpoint::new(ip.parse().unwrap(), target).on_node("other", false))
        .collect();
    Arc::new(ServicePortState::new(port, eps, &node()))
}

fn node() -> NodeInfo {
    NodeInfo::new("node", vec!["10.201.0.1".parse().unwrap()])
}

fn snapshot(st: &Arc<ServicePortState>) -> Snapshot {
    [(st.name().clone(), st.clone())].into_iter().collect()
}

/// One TCP exchange from the client namespace: (output, error text, duration).
fn client_request(env: &Env) -> (String, String, Duration) {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &env.ns("client")])
        .args(["socat", "-T3", "-", "TCP:10.96.0.10:80,connect-timeout=3"])
        .stdin(Stdio::null())
        .output()
        .expect("socat");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

fn options(env: &Env) -> EbpfOptions {
    EbpfOptions {
        bpf_root: env.bpf_root(),
        // c0, b0 and the c1 added later (the watcher must pick it up on its own).
        pod_interface_prefixes: vec!["c".into(), "b".into()],
        pod_interfaces: vec![],
        uplinks: vec!["no-such-uplink".into()],
        cgroup: None,
        ..EbpfOptions::default()
    }
}

/// Orca's TC programs attached in the calling thread's network namespace, per interface and hook, whichever way
/// (TCX links, clsact filters): "c0 ingress tcx orca_from_pod", "c0 ingress clsact orca_from_pod ... pref 20306".
fn orca_tc_attachments() -> Vec<String> {
    use aya::programs::tc::{SchedClassifier, TcAttachType};
    let mut out = Vec::new();
    for (ifname, _) in orca_proxy::dataplane::ebpf::loader::interfaces() {
        for (hook, t) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&ifname, t) {
                for p in progs {
                    let name = p.name_as_str().unwrap_or_default().to_string();
                    if name.starts_with("orca_") {
                        out.push(format!("{ifname} {hook} tcx {name}"));
                    }
                }
            }
            let tc = Command::new("tc")
                .args(["filter", "show", "dev", &ifname, hook])
                .output()
                .expect("tc");
            for l in String::from_utf8_lossy(&tc.stdout)
                .lines()
                .filter(|l| l.contains("orca_"))
            {
                out.push(format!("{ifname} {hook} clsact {}", l.trim()));
            }
        }
    }
    out
}

#[test]
fn cluster_ip_dnat_reject_restart_and_cleanup_in_namespaces() {
    dnat_reject_restart_cleanup("c", TcAttach::Auto);
}

/// The same on the clsact path that kernels before 6.6 take (forced here with `--ebpf-tc-attach clsact`): filters at
/// Orca's priority and handle, replaced in place by a restarted agent, removed by cleanup.
#[test]
fn clsact_path_dnat_reject_restart_and_cleanup_in_namespaces() {
    dnat_reject_restart_cleanup("k", TcAttach::Clsact);
}

fn dnat_reject_restart_cleanup(tag: &str, attach: TcAttach) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the test creates namespaces and loads eBPF"
    );
    let mut env = setup(tag);
    for (port, reply) in [
        (8080, "SYSTEM:echo hello-from-backend".to_string()),
        (8081, format!("SYSTEM:head -c {DOWNLOAD_BYTES} /dev/zero")),
    ] {
        env.servers.push(
            Command::new("ip")
                .args(["netns", "exec", &env.ns("backend")])
                .args(["socat", &format!("TCP-LISTEN:{port},fork,reuseaddr"), &reply])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("backend server"),
        );
    }

    run_in_node(env, |env| {
        let cfg = DataplaneConfig::default();
        // A layout left by another release (maps pinned under v0) is removed at start-up.
        let stale = env.bpf_root().join("v0").join("maps");
        let mounted = orca_proxy::dataplane::ebpf::loader::ensure_bpffs(&env.bpf_root()).expect("bpffs");
        assert_eq!(mounted.as_deref(), Some(env.bpf_root().as_path()));
        std::fs::create_dir_all(&stale).unwrap();
        let mut old = aya::EbpfLoader::new();
        for m in orca_proxy::dataplane::ebpf::loader::ALL_MAPS {
            old.map_pin_path(m, stale.join(m));
        }
        drop(old.load(orca_proxy::ebpf_obj::OBJECT).expect("an old layout"));
        assert!(stale.join(orca_common::MAP_CT).exists());
        let opts = EbpfOptions {
            tc_attach: attach,
            ..options(env)
        };
        let mut dp = EbpfDataplane::new(cfg.clone(), opts.clone()).expect("eBPF dataplane");
        // One program per interface and hook, attached the way asked for.
        let kind = if attach.tcx() { " tcx " } else { " clsact " };
        let first = orca_tc_attachments();
        assert_eq!(first.len(), 4, "{first:#?}");
        assert!(first.iter().all(|a| a.contains(kind)), "{first:#?}");
        assert!(!env.bpf_root().join("v0").exists(), "the old layout was not removed");
        // The test mounted the bpffs itself (for the old layout) above.
        assert_eq!(dp.mounted_bpffs(), None);
        assert_eq!(dp.attached_interfaces(), ["b0", "c0"]);

        // 1. A ClusterIP with one endpoint: requests reach the backend through the VIP.
        let st = service(&["10.202.0.2"]);
        dp.full_sync(&snapshot(&st), &node()).expect("full sync");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (out, err, _) = client_request(env);
            if out.contains("hello-from-backend") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no answer through the ClusterIP: {out:?} {err:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        // A pod appears (new veth) with no Service change: the watcher attaches to it.
        let (c2, n) = (env.ns("client2"), env.ns("node"));
        run(&["ip", "netns", "add", &c2]);
        run(&[
            "ip", "-n", &n, "link", "add", "c1", "type", "veth", "peer", "name", "eth0", "netns", &c2,
        ]);
        run(&["ip", "-n", &n, "addr", "add", "10.203.0.1/24", "dev", "c1"]);
        run(&["ip", "-n", &c2, "addr", "add", "10.203.0.2/24", "dev", "eth0"]);
        run(&["ip", "-n", &n, "link", "set", "c1", "up"]);
        run(&["ip", "-n", &c2, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &c2, "route", "add", "default", "via", "10.203.0.1"]);
        assert!(
            answers_within(&c2, Duration::from_secs(5)),
            "the new pod interface c1 was never attached"
        );
        assert_eq!(dp.attached_interfaces(), ["b0", "c0", "c1"]);

        // The pod is re-created and its veth gets the same name, within one scan of the watcher (one `ip -batch`:
        // the new interface is renamed into place right after the old one is deleted): the watcher sees a new
        // interface index and attaches to it; a watcher that followed names only would keep the dead attachment.
        let batch = format!(
            "link add c1new type veth peer name eth0new netns {c2}\nlink del c1\nlink set c1new name c1\n\
             addr add 10.203.0.1/24 dev c1\nlink set c1 up\n"
        );
        let mut child = Command::new("ip")
            .args(["-n", &n, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("ip -batch");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), batch.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "re-creating c1");
        run(&["ip", "-n", &c2, "link", "set", "eth0new", "name", "eth0"]);
        run(&["ip", "-n", &c2, "addr", "add", "10.203.0.2/24", "dev", "eth0"]);
        run(&["ip", "-n", &c2, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &c2, "route", "add", "default", "via", "10.203.0.1"]);
        assert!(
            answers_within(&c2, Duration::from_secs(5)),
            "the re-created pod interface c1 was never attached"
        );
        assert_eq!(dp.attached_interfaces(), ["b0", "c0", "c1"]);

        // A veth whose name matches no pod prefix: no program, but said (log), counted (metric) and shown (status).
        assert!(dp.unmatched_interfaces().is_empty());
        run(&[
            "ip", "-n", &n, "link", "add", "x9", "type", "veth", "peer", "name", "eth1", "netns", &c2,
        ]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while dp.unmatched_interfaces().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(dp.unmatched_interfaces(), ["x9"]);
        assert_eq!(dp.datapath_counts().unmatched_interfaces, 1);
        assert_eq!(dp.attached_interfaces(), ["b0", "c0", "c1"]);
        let veths = orca_proxy::dataplane::ebpf::loader::veths_without_program(&env.bpf_root());
        assert_eq!(veths, ["x9"], "what status lists");
        assert!(orca_proxy::status::render_unmatched(&veths).ends_with(": x9"));
        run(&["ip", "-n", &n, "link", "del", "x9"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dp.unmatched_interfaces().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(dp.unmatched_interfaces().is_empty());

        // What `orca-proxy status` shows: the pinned maps, read from outside the dataplane.
        let view = orca_proxy::dataplane::ebpf::dump(&env.bpf_root()).expect("dump pinned maps");
        assert_eq!(view.len(), 1, "{view:?}");
        assert_eq!(view[0].address.to_string(), "10.96.0.10:80");
        assert_eq!(view[0].protocol, "TCP");
        assert_eq!(
            view[0].backends.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            ["10.202.0.2:8080"]
        );
        assert_eq!(view[0].missing_slots, 0);
        // And its DATAPATH section: the requests above are tracked, nothing was dropped.
        let report = orca_proxy::dataplane::ebpf::datapath_report(&env.bpf_root(), &orca_common::CtTimeouts::DEFAULT)
            .expect("datapath counters from the pins");
        assert!(report.conntrack.capacity > 0, "{report:?}");
        assert!(report.conntrack.service > 0 && report.conntrack.inner > 0, "{report:?}");
        assert_eq!(report.reasons.len(), orca_common::REASON_COUNT as usize);
        let dropped: u64 = orca_common::REASONS
            .iter()
            .zip(&report.reasons)
            .filter(|((_, drop), _)| *drop)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(dropped, 0, "{report:?}");

        // 2. No endpoints: connect() is refused at once.
        let empty = service(&[]);
        let diff = Diff {
            upserted: vec![empty.clone()],
            ..Diff::default()
        };
        dp.apply(&diff, &snapshot(&empty), &node()).expect("apply");
        let (out, err, took) = client_request(env);
        assert!(out.is_empty(), "{out:?}");
        assert!(err.contains("Connection refused"), "expected ECONNREFUSED, got {err:?}");
        assert!(took < Duration::from_secs(2), "reject took {took:?}");

        // 3. Endpoint back, then an agent restart: the new dataplane adopts the pinned maps and
        //    links (the old one is dropped without cleanup, as when the agent exits).
        let diff = Diff {
            upserted: vec![st.clone()],
            ..Diff::default()
        };
        dp.apply(&diff, &snapshot(&st), &node()).expect("apply");
        assert!(client_request(env).0.contains("hello-from-backend"));
        // A long download runs across the restart and must complete intact.
        let both: Snapshot = [st.clone(), download_service()]
            .into_iter()
            .map(|p| (p.name().clone(), p))
            .collect();
        dp.full_sync(&both, &node())
            .expect("full sync with the download service");
        let download = Command::new("ip")
            .args(["netns", "exec", &env.ns("client"), "sh", "-c"])
            .arg("socat -u TCP:10.96.0.11:81,connect-timeout=3 - | (sleep 1; wc -c)")
            .stdout(Stdio::piped())
            .spawn()
            .expect("download client");
        std::thread::sleep(Duration::from_millis(300));
        drop(dp);
        // The programs stay attached through the pinned links while no agent runs.
        assert!(
            client_request(env).0.contains("hello-from-backend"),
            "service broke while the agent was down"
        );
        let mut dp = EbpfDataplane::new(cfg, opts).expect("restarted dataplane");
        dp.full_sync(&both, &node()).expect("full sync after restart");
        // The restarted dataplane reads back from the pinned maps what the desired state asks for.
        assert_eq!(
            dp.cluster_frontends(&both, &node()).expect("read back"),
            orca_proxy::verify::desired_cluster_frontends(&both, &node())
        );
        // The restarted agent replaced the programs in place: still one per interface and hook.
        let after = orca_tc_attachments();
        assert_eq!(after.len(), 6, "c0, b0, c1 ingress and egress: {after:#?}");
        assert!(client_request(env).0.contains("hello-from-backend"));
        let out = download.wait_with_output().expect("download");
        let got: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        assert_eq!(got, DOWNLOAD_BYTES, "the download across the restart was cut");

        // 4. Cleanup removes programs, links, maps and pins: the VIP no longer answers.
        dp.cleanup().expect("cleanup");
        let versioned = env.bpf_root().join(format!("v{}", orca_common::ABI_VERSION));
        assert!(!versioned.exists(), "pins left under {}", versioned.display());
        let (out, _, _) = client_request(env);
        assert!(!out.contains("hello-from-backend"), "still translated after cleanup");
        let left = orca_tc_attachments();
        assert!(left.is_empty(), "attached after cleanup: {left:#?}");
    });
}

/// Agents of several nodes starting at once must not stack bpffs mounts (the later mount would
/// hide the pins made in the earlier one). Threads released together by a barrier race for the
/// mount, many times over.
/// An IPv6 exchange from the client namespace to `target` (`[addr]:port`): (output, error text).
fn client_request6(env: &Env, target: &str) -> (String, String) {
    request6_from(env, "client", target)
}

/// An IPv6 exchange from namespace `role` to `target`.
fn request6_from(env: &Env, role: &str, target: &str) -> (String, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &env.ns(role)])
        .args(["socat", "-T3", "-", &format!("TCP6:{target},connect-timeout=3")])
        .stdin(Stdio::null())
        .output()
        .expect("socat");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `client_request6` until the output contains `want` (10 s).
fn await_answer6(env: &Env, target: &str, want: &str) -> String {
    await_answer6_from(env, "client", target, want)
}

/// Polls `request6_from` until the output contains `want` (10 s).
fn await_answer6_from(env: &Env, role: &str, target: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, err) = request6_from(env, role, target);
        if out.contains(want) {
            return out;
        }
        assert!(Instant::now() < deadline, "{target}: no {want:?}: {out:?} {err:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The IPv6 side of the backend (`fd00:202::2`, its route through the node, which forwards IPv6) and its server on
/// port 8080, which answers with the address it saw the connection come from (see `peer6`).
fn ipv6_backend(env: &mut Env) {
    let (n, b) = (env.ns("node"), env.ns("backend"));
    run(&["ip", "-n", &b, "-6", "route", "add", "default", "via", "fd00:202::1"]);
    run(&[
        "ip",
        "netns",
        "exec",
        &n,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=1",
    ]);
    env.servers.push(
        Command::new("ip")
            .args(["netns", "exec", &b])
            .args([
                "socat",
                "TCP6-LISTEN:8080,fork,reuseaddr",
                "SYSTEM:echo peer=$SOCAT_PEERADDR",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("backend server"),
    );
}

/// The address `ipv6_backend`'s server reported (socat writes it in full, in brackets).
fn peer6(out: &str) -> std::net::Ipv6Addr {
    let p = out.trim().trim_start_matches("peer=");
    p.trim_matches(|c| c == '[' || c == ']').parse().expect(out)
}

#[test]
fn ipv6_cluster_ip_node_port_and_reject_through_the_ebpf_maps() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let mut env = setup("v6");
    let (c, n, b) = (env.ns("client"), env.ns("node"), env.ns("backend"));
    for (ns, dev, addr) in [
        (&n, "c0", "fd00:201::1/64"),
        (&n, "b0", "fd00:202::1/64"),
        (&c, "eth0", "fd00:201::2/64"),
        (&b, "eth0", "fd00:202::2/64"),
    ] {
        run(&["ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    run(&["ip", "-n", &c, "-6", "route", "add", "default", "via", "fd00:201::1"]);
    // The backend tells who connected: the client itself through the ClusterIP, the node (masqueraded) through
    // the NodePort.
    ipv6_backend(&mut env);

    run_in_node(env, |env| {
        let node = NodeInfo::new(
            "node",
            vec!["10.201.0.1".parse().unwrap(), "fd00:201::1".parse().unwrap()],
        );
        let mut dp = EbpfDataplane::new(DataplaneConfig::default(), options(env)).expect("eBPF dataplane");
        let name = ServicePortName::new("default", "web6", "http", Protocol::Tcp);
        let mut port = ServicePort::new(name, "fd00:96::10".parse().unwrap(), 80);
        port.node_port = Some(30080);
        let port = Arc::new(port);
        let with = |eps: &[&str]| {
            let eps = eps
                .iter()
                .map(|ip| Endpoint::new(ip.parse().unwrap(), 8080).on_node("other", false))
                .collect();
            Arc::new(ServicePortState::new((*port).clone(), eps, &node))
        };
        let st = with(&["fd00:202::2"]);
        dp.full_sync(&snapshot(&st), &node).expect("full sync");
        // The eBPF maps hold it (no ip6tables in eBPF mode).
        let views = orca_proxy::dataplane::ebpf::dump(&env.bpf_root()).expect("dump");
        let cluster: Vec<String> = views.iter().map(|v| v.address.to_string()).collect();
        assert!(cluster.contains(&"[fd00:96::10]:80".to_string()), "{cluster:?}");

        let peer = peer6;
        // ClusterIP: the backend sees the client's own address.
        let out = await_answer6(env, "[fd00:96::10]:80", "peer=");
        assert_eq!(peer(&out), "fd00:201::2".parse::<std::net::Ipv6Addr>().unwrap());
        // NodePort on the node's IPv6 address: masqueraded to it.
        let out = await_answer6(env, "[fd00:201::1]:30080", "peer=");
        assert_eq!(peer(&out), "fd00:201::1".parse::<std::net::Ipv6Addr>().unwrap());

        // The agent goes away (every fd of it closed): the IPv6 programs stay reachable, as the program array that
        // holds them is pinned; a new agent adopts everything and points the array at its own programs.
        drop(dp);
        let out = await_answer6(env, "[fd00:96::10]:80", "peer=");
        assert_eq!(
            peer(&out),
            "fd00:201::2".parse::<std::net::Ipv6Addr>().unwrap(),
            "while no agent runs"
        );
        let mut dp = EbpfDataplane::new(DataplaneConfig::default(), options(env)).expect("restarted dataplane");
        dp.full_sync(&snapshot(&st), &node).expect("full sync after restart");
        let out = await_answer6(env, "[fd00:201::1]:30080", "peer=");
        assert_eq!(
            peer(&out),
            "fd00:201::1".parse::<std::net::Ipv6Addr>().unwrap(),
            "after the restart"
        );

        // No endpoints: refused (ICMPv6 port unreachable from the programs), not timed out.
        let empty = with(&[]);
        let diff = Diff {
            upserted: vec![empty.clone()],
            ..Diff::default()
        };
        dp.apply(&diff, &snapshot(&empty), &node).expect("apply");
        let started = Instant::now();
        let (out, err) = client_request6(env, "[fd00:96::10]:80");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains("Connection refused"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        dp.cleanup().expect("cleanup");
    });
}

#[test]
fn an_ipv6_only_uplink_is_found_by_the_nodes_ipv6_address() {
    // An IPv6-only node: its uplink holds no IPv4 address and no IPv4 default route leads anywhere. With no
    // --uplinks, the agent finds the uplink by the node's IPv6 address (from its Node object), so a NodePort answers
    // there.
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let mut env = setup("u6");
    let (n, b, x) = (env.ns("node"), env.ns("backend"), env.ns("client2"));
    run(&["ip", "netns", "add", &x]);
    run(&["ip", "-n", &x, "link", "set", "lo", "up"]);
    run(&[
        "ip", "-n", &n, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &x,
    ]);
    for (ns, dev, addr) in [
        (&n, "up0", "fd00:203::1/64"),
        (&x, "eth0", "fd00:203::2/64"),
        (&n, "b0", "fd00:202::1/64"),
        (&b, "eth0", "fd00:202::2/64"),
    ] {
        run(&["ip", "-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
    run(&["ip", "-n", &x, "-6", "route", "add", "default", "via", "fd00:203::1"]);
    ipv6_backend(&mut env);

    run_in_node(env, |env| {
        let node = NodeInfo::new("node", vec!["fd00:203::1".parse().unwrap()]);
        let opts = EbpfOptions {
            uplinks: vec![],
            ..options(env)
        };
        let mut dp = EbpfDataplane::new(DataplaneConfig::default(), opts).expect("eBPF dataplane");
        let name = ServicePortName::new("default", "np6", "http", Protocol::Tcp);
        let mut port = ServicePort::new(name, "fd00:96::20".parse().unwrap(), 80);
        port.node_port = Some(30081);
        let ep = Endpoint::new("fd00:202::2".parse().unwrap(), 8080).on_node("other", false);
        let st = Arc::new(ServicePortState::new(port, vec![ep], &node));
        dp.full_sync(&snapshot(&st), &node).expect("full sync");
        let attached = orca_tc_attachments();
        assert!(
            attached
                .iter()
                .any(|a| a.starts_with("up0 ingress") && a.contains("orca_from_net")),
            "no uplink program on up0: {attached:#?}"
        );
        // The NodePort on the node's IPv6 address, from beyond the uplink: masqueraded to that address.
        let out = await_answer6_from(env, "client2", "[fd00:203::1]:30081", "peer=");
        assert_eq!(peer6(&out), "fd00:203::1".parse::<std::net::Ipv6Addr>().unwrap());
        dp.cleanup().expect("cleanup");
    });
}

#[test]
fn concurrent_agents_mount_bpffs_once() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root: the test mounts a bpffs");
    let dir = std::env::temp_dir().join(format!("orca-bpffs-race-{}", std::process::id()));
    let mount_point = dir.join("bpf");
    std::fs::create_dir_all(&mount_point).unwrap();
    let c_mount_point = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes()).unwrap();
    let count_mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(4) == Some(mount_point.to_str().unwrap()))
            .count()
    };
    const AGENTS: usize = 16;
    let mut failures = Vec::new();
    for round in 0..30 {
        let barrier = std::sync::Barrier::new(AGENTS);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..AGENTS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        orca_proxy::dataplane::ebpf::loader::ensure_bpffs(&mount_point)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mounts = count_mounts();
        for _ in 0..mounts {
            // SAFETY: valid C string.
            unsafe { libc::umount2(c_mount_point.as_ptr(), libc::MNT_DETACH) };
        }
        let mounted_by = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
        if mounts != 1 || mounted_by != 1 || results.iter().any(|r| r.is_err()) {
            failures.push(format!(
                "round {round}: {mounts} mounts, {mounted_by} agents mounted, {results:?}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Clients in the node's own namespace (host processes, hostNetwork pods) reach ClusterIPs
/// through the cgroup socket hooks: TCP connect, unconnected UDP with replies from the frontend,
/// ECONNREFUSED without endpoints; processes of other namespaces or cgroups are left alone.
#[test]
fn host_namespace_clients_use_the_socket_hooks() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the test creates namespaces and loads eBPF"
    );
    let cg_root = orca_proxy::dataplane::ebpf::loader::cgroup2_mount().expect("a cgroup v2 hierarchy");
    let mut env = setup("h");
    let cgroup = cg_root.join(&env.prefix);
    std::fs::create_dir_all(&cgroup).expect("test cgroup");
    let _cg_guard = CgroupGuard(cgroup.clone());
    // IPv6 between the node and the backend too, for the IPv6 hooks.
    let (n, b) = (env.ns("node"), env.ns("backend"));
    run(&[
        "ip",
        "-n",
        &n,
        "-6",
        "addr",
        "add",
        "fd00:202::1/64",
        "dev",
        "b0",
        "nodad",
    ]);
    run(&[
        "ip",
        "-n",
        &b,
        "-6",
        "addr",
        "add",
        "fd00:202::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    for (args, _) in [
        (["TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo hello-from-backend"], ()),
        (["UDP-RECVFROM:5353,fork", "SYSTEM:echo udp-hello"], ()),
        (
            ["TCP6-LISTEN:8086,fork,reuseaddr", "SYSTEM:echo hello6-from-backend"],
            (),
        ),
    ] {
        env.servers.push(
            Command::new("ip")
                .args(["netns", "exec", &env.ns("backend"), "socat"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("backend server"),
        );
    }
    let other = env.ns("client2");
    run(&["ip", "netns", "add", &other]);
    run(&["ip", "-n", &other, "link", "set", "lo", "up"]);

    // Runs `script` with sh in namespace `ns`, inside the test cgroup when `in_cgroup`. The cgroup
    // is joined before `ip netns exec`, which remounts /sys (and so hides the cgroup mounts).
    let sh = |ns: &str, in_cgroup: bool, script: &str| -> (String, String) {
        let join = if in_cgroup {
            format!("echo $$ > {}/cgroup.procs && ", cgroup.display())
        } else {
            String::new()
        };
        let quoted = script.replace('\'', "'\\''");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{join}exec ip netns exec {ns} sh -c '{quoted}'"))
            .stdin(Stdio::null())
            .output()
            .expect("sh");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let tcp = "exec socat -T3 - TCP:10.96.0.10:80,connect-timeout=3";

    run_in_node(env, |env| {
        let opts = EbpfOptions {
            pod_interface_prefixes: vec![],
            cgroup: Some(cgroup.clone()),
            // The socket hooks choose by Maglev here (the TC path is covered at random).
            maglev: true,
            ..options(env)
        };
        let mut dp = EbpfDataplane::new(DataplaneConfig::default(), opts).expect("eBPF dataplane");
        // `status` reads the hooks back from the pins: all eight (IPv4 and IPv6) attached, to the test's cgroup.
        let hooks = orca_proxy::dataplane::ebpf::loader::pinned_socket_hooks(&env.bpf_root());
        let cgroup_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cgroup).unwrap());
        assert_eq!(hooks.len(), 8);
        assert!(
            hooks.iter().all(|(_, id)| *id == Some(cgroup_id)),
            "{hooks:?} (cgroup id {cgroup_id})"
        );
        let web = service(&["10.202.0.2"]);
        let mut dns = (*service_on("dns", "10.96.0.53", 53, 5353, &["10.202.0.2"])).clone();
        dns.port.protocol = Protocol::Udp;
        dns.port.name.protocol = Protocol::Udp;
        let dns = Arc::new(dns);
        let web6 = {
            let name = ServicePortName::new("default", "web6", "http", Protocol::Tcp);
            let port = ServicePort::new(name, "fd00:96::10".parse().unwrap(), 80);
            let eps = vec![Endpoint::new("fd00:202::2".parse().unwrap(), 8086).on_node("other", false)];
            Arc::new(ServicePortState::new(port, eps, &node()))
        };
        let snap: Snapshot = [web.clone(), dns.clone(), web6]
            .into_iter()
            .map(|p| (p.name().clone(), p))
            .collect();
        dp.full_sync(&snap, &node()).expect("full sync");
        let (n, c2) = (env.ns("node"), other.clone());

        // TCP from a host process of the node's namespace.
        let (out, err) = sh(&n, true, tcp);
        assert!(out.contains("hello-from-backend"), "{out:?} {err:?}");
        // getpeername shows the ClusterIP, not the backend.
        // (This test's own executable, running only its `getpeername_probe` helper, is the client.)
        let probe = format!(
            "ORCA_GETPEERNAME_PROBE=10.96.0.10:80 exec {} --ignored --exact getpeername_probe --nocapture",
            std::env::current_exe().expect("test executable").display()
        );
        let (out, err) = sh(&n, true, &probe);
        assert!(out.contains("peer=10.96.0.10:80"), "{out:?} {err:?}");
        // Unconnected UDP: the request goes to the backend, the answer comes from the frontend.
        let (out, err) = sh(&n, true, "echo q | exec socat -T2 - UDP-SENDTO:10.96.0.53:53");
        assert!(out.contains("udp-hello"), "{out:?} {err:?}");
        // IPv6: an IPv6 ClusterIP (connect6), and the IPv4 one as an IPv4-mapped address of an IPv6 socket.
        let (out, err) = sh(&n, true, "exec socat -T3 - TCP6:[fd00:96::10]:80,connect-timeout=3");
        assert!(out.contains("hello6-from-backend"), "{out:?} {err:?}");
        let (out, err) = sh(
            &n,
            true,
            "exec socat -T3 - TCP6:[::ffff:10.96.0.10]:80,connect-timeout=3",
        );
        assert!(out.contains("hello-from-backend"), "{out:?} {err:?}");

        // Not ours: another namespace in the same cgroup, or our namespace outside the cgroup.
        let (out, err) = sh(&c2, true, tcp);
        assert!(!out.contains("hello") && !err.contains("refused"), "{out:?} {err:?}");
        let (out, err) = sh(&n, false, tcp);
        assert!(!out.contains("hello") && !err.contains("refused"), "{out:?} {err:?}");

        // No endpoints: connect() fails with ECONNREFUSED at once.
        let empty = service(&[]);
        let diff = Diff {
            upserted: vec![empty.clone()],
            ..Diff::default()
        };
        dp.apply(&diff, &snap, &node()).expect("apply");
        let started = Instant::now();
        let (out, err) = sh(&n, true, tcp);
        assert!(out.is_empty() && err.contains("Connection refused"), "{out:?} {err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        dp.cleanup().expect("cleanup");
        // Hooks gone: the ClusterIP is not translated any more.
        let (out, err) = sh(&n, true, tcp);
        assert!(!out.contains("hello") && !err.contains("refused"), "{out:?} {err:?}");
    });
}

/// `--no-fallback`: when eBPF cannot run, the agent stops at start with the reason instead of
/// running iptables. eBPF fails for real here: `--bpf-root` lies below a regular file, so no pin
/// directory can be created. The agent runs in a namespace of its own and never reaches an
/// apiserver (the kubeconfig points at a closed loopback port).
#[test]
fn no_fallback_stops_the_start_with_the_reason() {
    let prefix = format!("orca-ebdp-{}-nofb", std::process::id());
    let dir = std::env::temp_dir().join(&prefix);
    struct Cleanup(String, PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _cleanup = Cleanup(prefix.clone(), dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    run(&["ip", "netns", "add", &prefix]);
    run(&["ip", "-n", &prefix, "link", "set", "lo", "up"]);
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {token: t}}]\n",
    )
    .unwrap();
    let bpf_root = file.join("bpf");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &prefix, env!("CARGO_BIN_EXE_orca-proxy")])
        .args(["--proxy-mode", "ebpf", "--no-fallback", "--hostname-override", "n"])
        .arg("--bpf-root")
        .arg(&bpf_root)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn orca-proxy");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("orca-proxy --no-fallback kept running although eBPF cannot run");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("eBPF dataplane unavailable and --no-fallback is set")
            && stderr.contains(&bpf_root.display().to_string()),
        "the error names the flag and the failure:\n{stderr}"
    );
    assert!(!stderr.contains("using iptables"), "{stderr}");
}

/// Whether a client in namespace `ns` gets the backend's answer through the ClusterIP 10.96.0.10:80 within
/// `limit` (tried every 100 ms).
fn answers_within(ns: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "socat",
                "-T2",
                "-",
                "TCP:10.96.0.10:80,connect-timeout=1",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("socat");
        if String::from_utf8_lossy(&out.stdout).contains("hello-from-backend") {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a test's cgroup when dropped, also when the test failed.
struct CgroupGuard(PathBuf);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Programs attached to `cgroup` at the eight socket hooks' attach types (BPF_PROG_QUERY).
fn cgroup_programs(cgroup: &Path) -> usize {
    // BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP4_RECVMSG, BPF_CGROUP_INET4_GETPEERNAME, and
    // their IPv6 twins (INET6_CONNECT, UDP6_SENDMSG, UDP6_RECVMSG, INET6_GETPEERNAME).
    const TYPES: [u32; 8] = [10, 14, 19, 29, 11, 15, 20, 30];
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(cgroup).expect("opening the cgroup");
    TYPES
        .iter()
        .map(|t| {
            let mut ids = [0u32; 64];
            // bpf_attr.query: target_fd, attach_type, query_flags, attach_flags, prog_ids (u64), prog_cnt (u32).
            let mut attr = [0u64; 8];
            attr[0] = u64::from(dir.as_raw_fd() as u32) | (u64::from(*t) << 32);
            attr[2] = ids.as_mut_ptr() as u64;
            attr[3] = ids.len() as u64;
            // SAFETY: a bpf_attr of the size passed whose pointer (ids) outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr) as u32,
                )
            };
            assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
            (attr[3] & 0xffff_ffff) as usize
        })
        .sum()
}

/// A start in iptables mode, and a fallback from eBPF to iptables, first remove what an earlier eBPF agent left
/// attached (on both attach paths): TC programs, socket hooks, pins. Otherwise the old programs would keep
/// translating with frozen maps in front of the iptables rules.
#[test]
fn iptables_start_and_fallback_remove_what_ebpf_attached() {
    use clap::Parser as _;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root");
    let mut env = setup("f");
    env.servers.push(
        Command::new("ip")
            .args(["netns", "exec", &env.ns("backend")])
            .args([
                "socat",
                "TCP-LISTEN:8080,fork,reuseaddr",
                "SYSTEM:echo hello-from-backend",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("backend server"),
    );
    let cg_root = orca_proxy::dataplane::ebpf::loader::cgroup2_mount().expect("a cgroup v2 hierarchy");
    let cgroup = cg_root.join(&env.prefix);
    std::fs::create_dir_all(&cgroup).expect("test cgroup");
    let _cg_guard = CgroupGuard(cgroup.clone());
    run_in_node(env, |env| {
        let root = env.bpf_root();
        let root_s = root.to_str().unwrap().to_string();
        let cases = [
            (TcAttach::Tcx, vec!["--proxy-mode", "iptables"]),
            (TcAttach::Clsact, vec!["--proxy-mode", "iptables"]),
            // eBPF cannot start (the cgroup root is no cgroup2 directory): the fallback cleans up first.
            (
                TcAttach::Tcx,
                vec!["--proxy-mode", "ebpf", "--ebpf-cgroup-root", "/proc"],
            ),
            (
                TcAttach::Clsact,
                vec!["--proxy-mode", "ebpf", "--ebpf-cgroup-root", "/proc"],
            ),
        ];
        for (attach, args) in cases {
            let what = format!("{attach:?} then {args:?}");
            let opts = EbpfOptions {
                tc_attach: attach,
                cgroup: Some(cgroup.clone()),
                ..options(env)
            };
            let mut dp = EbpfDataplane::new(DataplaneConfig::default(), opts).expect("eBPF dataplane");
            dp.full_sync(&snapshot(&service(&["10.202.0.2"])), &node())
                .expect("full sync");
            assert!(client_request(env).0.contains("hello-from-backend"), "{what}");
            drop(dp);
            assert_eq!(
                orca_tc_attachments().len(),
                4,
                "{what}: the exited agent's programs stay"
            );
            assert_eq!(cgroup_programs(&cgroup), 8, "{what}: and its socket hooks");

            let mut argv = vec!["orca-proxy", "--hostname-override", "n", "--bpf-root", &root_s];
            argv.extend(args.iter().copied());
            let cli = orca_proxy::cli::Cli::try_parse_from(&argv).expect("flags");
            let settings = orca_proxy::settings::Settings::from_flags(&cli.flags).expect("settings");
            let (mut ipt, fallback) = orca_proxy::dataplane::select::create(&settings).expect("a dataplane");
            assert_eq!(ipt.mode(), orca_proxy::dataplane::ProxyMode::Iptables, "{what}");
            assert_eq!(fallback.is_some(), args.contains(&"ebpf"), "{what}: {fallback:?}");
            let left = orca_tc_attachments();
            assert!(left.is_empty(), "{what}: still attached: {left:#?}");
            assert_eq!(cgroup_programs(&cgroup), 0, "{what}: socket hooks left");
            assert!(
                !root.join(format!("v{}", orca_common::ABI_VERSION)).exists(),
                "{what}: pins left"
            );
            let (out, _, _) = client_request(env);
            assert!(!out.contains("hello-from-backend"), "{what}: still translated");
            ipt.cleanup().expect("iptables cleanup");
        }
    });
}

/// `orca-proxy check-kernel` loads every program of both variants through this kernel's verifier, pinning and
/// attaching nothing, and reports the instructions each took.
#[test]
fn check_kernel_reports_every_program() {
    let out = Command::new(env!("CARGO_BIN_EXE_orca-proxy"))
        .arg("check-kernel")
        .output()
        .expect("orca-proxy check-kernel");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let verified: Vec<&str> = text.lines().filter(|l| l.starts_with("verifier\t")).collect();
    // The three TC programs and their IPv6 halves in both variants, and the eight socket hooks (IPv4 and IPv6) in
    // the default one where the kernel loads them (5.18+).
    let hooks = orca_proxy::dataplane::ebpf::loader::sock_hooks_supported();
    assert_eq!(verified.len(), if hooks { 20 } else { 12 }, "{text}");
    // Kernels report the instructions processed since 5.16.
    let counted = orca_proxy::dataplane::ebpf::loader::kernel_version().is_some_and(|v| v >= (5, 16));
    for l in &verified {
        let insns = l.rsplit('\t').next().unwrap_or_default();
        if counted {
            assert!(insns.parse::<u32>().is_ok_and(|n| n > 0), "{l}");
        } else {
            assert!(insns.starts_with("loaded"), "{l}");
        }
    }
    assert!(
        text.contains("result\tthe eBPF dataplane runs on this kernel"),
        "{text}"
    );
}

/// Not a test: the client process of `host_namespace_clients_use_the_socket_hooks`, which runs this executable with
/// `--ignored --exact getpeername_probe` and `ORCA_GETPEERNAME_PROBE=<ip:port>` inside its namespace and cgroup.
/// Connects there and prints `peer=` with what getpeername(2) answers.
#[test]
#[ignore = "a helper process of host_namespace_clients_use_the_socket_hooks"]
fn getpeername_probe() {
    let target = std::env::var("ORCA_GETPEERNAME_PROBE").expect("ORCA_GETPEERNAME_PROBE=<ip:port>");
    let addr: std::net::SocketAddr = target.parse().expect("an ip:port");
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    println!("peer={}", s.peer_addr().expect("getpeername"));
}
