//! What a sandbox node has besides its network namespace, as an agent of a DaemonSet finds it on a real node: a
//! bpffs that outlives the agent (the host's `/sys/fs/bpf`) and the node's cgroup v2 tree (the host's cgroup2
//! root), in which the node's own processes run.
//!
//! The sandbox's nodes share this machine's kernel, so each node gets its own part of both:
//!
//! * one bpffs mounted at `/run/orca-sandbox/bpffs` in the machine's mount namespace; node X pins under
//!   `/run/orca-sandbox/bpffs/X` (its `--bpf-root`). Processes started with `ip netns exec` get a private mount
//!   namespace whose `/sys` is fresh, but they see `/run` as it was, so an agent's pins survive the agent (a
//!   SIGKILL, a restart) exactly as they would on a node;
//! * one cgroup v2 directory per node, `<cgroup2>/orca-sandbox/X`, reachable by the agents at
//!   `/run/orca-sandbox/cgroup2/X`: `<cgroup2>/orca-sandbox` is bind-mounted there, outside `/sys` (which `ip
//!   netns exec` replaces). Only that subtree is visible through the mount, so an agent looking for a cgroup2
//!   mount of its own finds no way to the machine's root cgroup. Every process the sandbox starts in node X's network namespace (the agent, test clients,
//!   hostNetwork pods) joins it ([`join_node_cgroup`]), and node X's agent attaches its socket hooks there
//!   (`--ebpf-cgroup-root`), never to the machine's root cgroup.
//!
//! [`teardown`] removes the pins, the cgroups and both mounts.
use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Everything of this module lives below this directory.
pub const ROOT: &str = "/run/orca-sandbox";
/// The directory of the per-node cgroups inside the cgroup2 hierarchy.
const CGROUP_SUBTREE: &str = "orca-sandbox";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The sandbox's bpffs.
pub fn bpffs() -> PathBuf {
    Path::new(ROOT).join("bpffs")
}

/// The sandbox's mount of the cgroup2 hierarchy.
pub fn cgroup2() -> PathBuf {
    Path::new(ROOT).join("cgroup2")
}

/// Node `node`'s `--bpf-root`.
pub fn node_bpf_root(node: &str) -> PathBuf {
    bpffs().join(node)
}

/// Node `node`'s cgroup (its agent's `--ebpf-cgroup-root`).
pub fn node_cgroup(node: &str) -> PathBuf {
    cgroup2().join(node)
}

/// This machine's cgroup v2 mount (in the sandbox owner's mount namespace).
fn machine_cgroup2() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

fn bind(source: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let (s, t) = (
        CString::new(source.as_os_str().as_encoded_bytes())?,
        CString::new(target.as_os_str().as_encoded_bytes())?,
    );
    // SAFETY: valid C strings; a bind mount takes no type or data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()));
    }
    Ok(())
}

fn mount(fstype: &str, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let t = CString::new(target.as_os_str().as_encoded_bytes())?;
    let fs = CString::new(fstype)?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fs.as_ptr(), t.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting {fstype} on {}", target.display()));
    }
    Ok(())
}

/// Mounts the bpffs and the cgroup2 hierarchy (unless mounted) and creates each node's pin directory and cgroup.
/// Without cgroup v2 on this machine the nodes get no cgroups (host-network clients then get no translation in
/// eBPF mode, which the suite reports); a missing bpffs is an error.
pub fn create(nodes: &[&str]) -> Result<()> {
    if fs_magic(&bpffs()) != Some(BPF_FS_MAGIC) {
        mount("bpf", &bpffs())?;
    }
    for n in nodes {
        std::fs::create_dir_all(node_bpf_root(n))?;
    }
    if fs_magic(&cgroup2()) != Some(CGROUP2_SUPER_MAGIC) {
        let Some(machine) = machine_cgroup2().filter(|p| p != &cgroup2()) else {
            tracing::warn!("no cgroup v2 on this machine: the sandbox's nodes get no cgroups");
            return Ok(());
        };
        let subtree = machine.join(CGROUP_SUBTREE);
        std::fs::create_dir_all(&subtree).with_context(|| format!("creating {}", subtree.display()))?;
        bind(&subtree, &cgroup2())?;
    }
    for n in nodes {
        std::fs::create_dir_all(node_cgroup(n)).with_context(|| format!("creating {}", node_cgroup(n).display()))?;
    }
    Ok(())
}

/// The node whose network namespace `ns` is (`orca-node-a` -> `node-a`).
pub fn node_of_netns(ns: &str) -> Option<&str> {
    ns.strip_prefix(crate::netns::PREFIX).filter(|n| n.starts_with("node-"))
}

/// Makes `cmd` join node `node`'s cgroup before it executes (when the node has one), as every process of a node
/// runs in the node's cgroup tree.
pub fn join_node_cgroup(cmd: &mut Command, node: &str) {
    use std::os::unix::process::CommandExt as _;
    let procs = node_cgroup(node).join("cgroup.procs");
    if !procs.exists() {
        return;
    }
    let Ok(path) = CString::new(procs.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: between fork and exec only async-signal-safe calls (open, write, close) on memory prepared before the
    // fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
            libc::close(fd);
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Pids in node `node`'s cgroup.
pub fn node_cgroup_pids(node: &str) -> Vec<u32> {
    std::fs::read_to_string(node_cgroup(node).join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes the pins (files and directories of the bpffs), the node cgroups (once their processes are gone, waiting
/// up to 5 s) and both mounts. Returns what it removed; what it could not remove is logged.
pub fn teardown() -> Vec<String> {
    let mut removed = Vec::new();
    if fs_magic(&bpffs()) == Some(BPF_FS_MAGIC) {
        if let Ok(rd) = std::fs::read_dir(bpffs()) {
            for e in rd.flatten() {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!("removing {}: {err}", e.path().display());
                }
            }
        }
        match unmount(&bpffs()) {
            Ok(()) => removed.push(format!("bpffs {}", bpffs().display())),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    if fs_magic(&cgroup2()) == Some(CGROUP2_SUPER_MAGIC) {
        if let Ok(rd) = std::fs::read_dir(cgroup2()) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                match remove_cgroup(&e.path()) {
                    Ok(()) => removed.push(format!("cgroup {}", e.path().display())),
                    Err(err) => tracing::warn!("{err:#}"),
                }
            }
        }
        match unmount(&cgroup2()) {
            Ok(()) => removed.push(format!("cgroup2 bind mount {}", cgroup2().display())),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    if let Some(machine) = machine_cgroup2() {
        if std::fs::remove_dir(machine.join(CGROUP_SUBTREE)).is_ok() {
            removed.push(format!("cgroup {}", machine.join(CGROUP_SUBTREE).display()));
        }
    }
    let _ = std::fs::remove_dir(bpffs());
    let _ = std::fs::remove_dir(cgroup2());
    let _ = std::fs::remove_dir(ROOT);
    removed
}

/// rmdir of a cgroup, retried while its last processes exit.
fn remove_cgroup(dir: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => bail!("removing cgroup {}: {e}", dir.display()),
        }
    }
}

fn unmount(target: &Path) -> Result<()> {
    let t = CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("unmounting {}", target.display()));
    }
    Ok(())
}
