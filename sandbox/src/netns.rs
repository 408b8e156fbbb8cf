//! Network namespaces through iproute2 (`ip netns ...`), the processes the sandbox starts, and teardown.
//!
//! Every namespace the sandbox creates is named `orca-*` ([`PREFIX`]). Every process it starts is recorded in
//! `.cache/sandbox/pids` (pid and start time, so a recycled pid is never killed). [`teardown`] kills the recorded
//! processes and every process inside an `orca-*` namespace (`ip netns pids`), then deletes every `orca-*`
//! namespace; it is safe to call at any time, also when nothing is up.
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every namespace the sandbox (and its pods) create.
pub const PREFIX: &str = "orca-";

/// Name prefixes of the sandbox's own namespaces: the topology's (fabric, control plane, client, nodes) and the
/// pods'. Other `orca-*` namespaces (unit tests of the dataplanes, which clean up after themselves) are not the
/// sandbox's: [`teardown`] leaves them alone so that it never breaks a test running next to it; [`teardown_all`]
/// (`cargo xtask sandbox down --all`) removes every `orca-*` namespace.
pub const SANDBOX_NETNS_PREFIXES: &[&str] = &["orca-fabric", "orca-cp", "orca-client", "orca-node-", "orca-pod-"];

/// Whether `name` is one of the sandbox's namespaces (see [`SANDBOX_NETNS_PREFIXES`]).
pub fn is_sandbox_netns(name: &str) -> bool {
    SANDBOX_NETNS_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn pid_file() -> PathBuf {
    crate::sandbox_dir().join("pids")
}

/// Directory for the logs of the sandbox's processes: `.cache/sandbox/logs`.
pub fn log_dir() -> PathBuf {
    crate::sandbox_dir().join("logs")
}

/// Run `ip <args>` in the root namespace (only `ip netns ...` / `ip -n <orca-ns> ...` forms are used), failing
/// with its stderr when it exits non-zero.
pub fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Run a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// A `Command` running `program args...` inside namespace `ns` (`ip netns exec ns program args...`). In a node's
/// namespace the process also joins the node's cgroup ([`crate::hostfs`]), as the node's own processes do.
pub fn command_in(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]).args(args);
    if let Some(node) = crate::hostfs::node_of_netns(ns) {
        crate::hostfs::join_node_cgroup(&mut c, node);
    }
    c
}

/// Run `cmd[0] cmd[1..]` inside namespace `ns` and wait for it; non-zero exit is an error carrying stderr.
pub fn exec(ns: &str, cmd: &[&str]) -> Result<Output> {
    let Some((program, args)) = cmd.split_first() else {
        bail!("exec in {ns}: empty command");
    };
    run(&mut command_in(ns, program, args))
}

/// Start `cmd` inside namespace `ns` with stdout and stderr appended to `.cache/sandbox/logs/<log_name>.log`,
/// in its own process group, and record its pid for [`teardown`].
pub fn spawn(ns: &str, cmd: &[&str], log_name: &str) -> Result<Child> {
    let Some((program, args)) = cmd.split_first() else {
        bail!("spawn in {ns}: empty command");
    };
    let mut c = command_in(ns, program, args);
    spawn_logged(&mut c, log_name)
}

/// Start an arbitrary command with its output in `.cache/sandbox/logs/<log_name>.log`, in its own process group
/// (so a terminal's Ctrl-C reaches the sandbox owner, which then tears down in order), and record its pid.
pub fn spawn_logged(cmd: &mut Command, log_name: &str) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let dir = log_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{log_name}.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let log2 = log.try_clone()?;
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {desc}"))?;
    record_pid(child.id(), log_name)?;
    tracing::debug!(pid = child.id(), log = %path.display(), "started {desc}");
    Ok(child)
}

/// Field 22 of /proc/<pid>/stat: the process start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Record a process the sandbox started (pods and kubelet helpers call this for their own processes too).
pub fn record_pid(pid: u32, name: &str) -> Result<()> {
    let path = pid_file();
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let start = start_time(pid).unwrap_or(0);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{pid} {start} {name}")?;
    Ok(())
}

/// Recorded processes that are still alive (same pid and same start time).
fn recorded_alive() -> Vec<(u32, String)> {
    let Ok(text) = std::fs::read_to_string(pid_file()) else {
        return Vec::new();
    };
    let mut alive = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ' ');
        let (Some(pid), Some(start)) = (it.next(), it.next()) else {
            tracing::warn!("ignoring malformed pid-file line {line:?}");
            continue;
        };
        let name = it.next().unwrap_or("").to_string();
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
            tracing::warn!("ignoring malformed pid-file line {line:?}");
            continue;
        };
        if pid <= 1 || pid == std::process::id() {
            continue;
        }
        if start_time(pid).is_some_and(|s| start == 0 || s == start) {
            alive.push((pid, name));
        }
    }
    alive
}

/// Names of the existing sandbox namespaces ([`is_sandbox_netns`]).
pub fn list_sandbox_netns() -> Vec<String> {
    list_orca_netns().into_iter().filter(|n| is_sandbox_netns(n)).collect()
}

/// Names of the existing `orca-*` namespaces.
pub fn list_orca_netns() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).stdin(Stdio::null()).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // Lines look like "orca-cp (id: 3)" or "orca-cp".
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| *p > 1 && *p != std::process::id())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; treat it as gone (its parent will reap it).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGTERM every pid, wait up to `grace` for them to exit, then SIGKILL the rest and wait a little more.
pub fn terminate(pids: &[u32], grace: Duration) {
    for &p in pids {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    for &p in &rest {
        tracing::warn!(pid = p, "did not exit on SIGTERM, sending SIGKILL");
        signal(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && rest.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Remove everything any sandbox left: recorded processes, processes inside the sandbox's namespaces, the
/// namespaces themselves, etcd temp dirs, the pid file. Returns what it removed, for logs. Never fails: every
/// step is best-effort and logs what it could not do.
pub fn teardown() -> Vec<String> {
    teardown_matching(is_sandbox_netns)
}

/// [`teardown`], and also every other `orca-*` namespace and the processes inside it.
pub fn teardown_all() -> Vec<String> {
    teardown_matching(|_| true)
}

fn teardown_matching(netns_filter: fn(&str) -> bool) -> Vec<String> {
    // Serialize teardowns within the process (a signal handler may run one while the owner runs another).
    static TEARDOWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = TEARDOWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut removed = Vec::new();
    let recorded = recorded_alive();
    if !recorded.is_empty() {
        // Clients of the apiserver first (all at once), then the apiserver, then etcd: stopped together, the
        // apiserver hangs on its lost storage until SIGKILL.
        let rank = |name: &str| match name {
            "etcd" => 2,
            "kube-apiserver" => 1,
            _ => 0,
        };
        for wave in 0..=2 {
            let pids: Vec<u32> = recorded
                .iter()
                .filter(|(_, n)| rank(n) == wave)
                .map(|(p, _)| *p)
                .collect();
            if !pids.is_empty() {
                terminate(&pids, Duration::from_secs(3));
            }
        }
        removed.extend(recorded.iter().map(|(p, n)| format!("process {p} ({n})")));
    }
    let namespaces: Vec<String> = list_orca_netns().into_iter().filter(|n| netns_filter(n)).collect();
    for ns in &namespaces {
        let pids = netns_pids(ns);
        if !pids.is_empty() {
            terminate(&pids, Duration::from_secs(3));
            removed.extend(pids.iter().map(|p| format!("process {p} in {ns}")));
        }
    }
    for ns in &namespaces {
        match ip(&["netns", "del", ns]) {
            Ok(_) => removed.push(format!("netns {ns}")),
            Err(e) => tracing::warn!("could not delete netns {ns}: {e:#}"),
        }
    }
    if netns_filter("orca-node-") {
        removed.extend(crate::hostfs::teardown());
    }
    let _ = std::fs::remove_file(pid_file());
    for tmp in [Path::new("/dev/shm").to_path_buf(), std::env::temp_dir()] {
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("orca-etcd-") {
                    let _ = std::fs::remove_dir_all(e.path());
                    removed.push(format!("dir {}", e.path().display()));
                }
            }
        }
    }
    removed
}

/// Exclusive, process-wide and machine-wide ownership of the sandbox's fixed namespace names: an flock on
/// `/run/orca-sandbox.lock` (machine-wide), released when dropped (or when the process dies). The owner's pid is written into the
/// file so `cargo xtask sandbox down` can ask a running owner to stop.
pub struct SandboxLock {
    file: File,
}

impl SandboxLock {
    /// Wait (up to `timeout`) for the lock.
    pub fn acquire(timeout: Duration) -> Result<SandboxLock> {
        let path = lock_path();
        std::fs::create_dir_all(crate::sandbox_dir())?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            // SAFETY: flock on a file descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "another sandbox (pid {}) holds {}; stop it or run `cargo xtask sandbox down`",
                    lock_owner().map_or("?".into(), |p| p.to_string()),
                    path.display()
                );
            }
            if !told {
                eprintln!(
                    "[orca-sandbox] waiting for another sandbox to finish (lock {})",
                    path.display()
                );
                told = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(SandboxLock { file })
    }
}

impl Drop for SandboxLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        // SAFETY: unlocking our own descriptor.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The lock is machine-wide, not per checkout: the namespace names it guards are global, and two clones of the
/// repository (a developer's and CI's) must not tear down each other's sandbox.
fn lock_path() -> PathBuf {
    let run = Path::new("/run");
    if run.is_dir() {
        run.join("orca-sandbox.lock")
    } else {
        crate::sandbox_dir().join("lock")
    }
}

/// The pid of a live process holding the sandbox lock, if any.
pub fn lock_owner() -> Option<u32> {
    let path = lock_path();
    let file = File::open(&path).ok()?;
    // SAFETY: flock on a descriptor we own; if we can take the lock nobody holds it.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        return None;
    }
    let pid: u32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    (pid != std::process::id() && alive(pid)).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_readable_and_stable() {
        let me = std::process::id();
        let a = start_time(me).expect("own /proc stat");
        assert_eq!(Some(a), start_time(me));
        assert!(alive(me));
        assert!(!alive(u32::MAX - 7));
    }

    #[test]
    fn sandbox_namespaces_are_told_apart() {
        for n in [
            "orca-cp",
            "orca-fabric",
            "orca-client",
            "orca-node-a",
            "orca-pod-x",
            "orca-pod-ns_x",
        ] {
            assert!(is_sandbox_netns(n), "{n}");
        }
        for n in ["orca-ipt-scale-1", "orca-ebpf-t", "cp", "node-a", "orca-"] {
            assert!(!is_sandbox_netns(n), "{n}");
        }
    }

    #[test]
    fn empty_commands_are_errors_not_panics() {
        assert!(exec("orca-none", &[]).is_err());
        assert!(spawn("orca-none", &[], "x").is_err());
    }
}
