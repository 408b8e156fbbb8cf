//! Kernel side of the eBPF dataplane: bpffs, loading with pinned maps, TC attachment (TCX with
//! pinned links where the kernel has it, clsact otherwise), interface discovery.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use orca_common::{
    CtTimeouts, NatPorts, ABI_VERSION, GLOBAL_BYPASS_NETFILTER, GLOBAL_CT_TIMEOUTS, GLOBAL_NAT_PORTS, MAPS4, MAPS6,
    MAP_CONFIG, MAP_CT, MAP_CT6, MAP_STATS,
};

use crate::ebpf_obj;

/// The maps pinned (and adopted by a restarted agent): both families' and the shared ones. (The programs' per-CPU
/// scratch space is not state: it is not pinned.)
pub const ALL_MAPS: [&str; 19] = [
    MAPS4.frontends,
    MAPS4.backends,
    MAPS4.members,
    MAPS4.ct,
    MAPS4.affinity,
    MAPS4.src_ranges,
    MAPS4.sock,
    MAPS4.maglev,
    MAPS6.frontends,
    MAPS6.backends,
    MAPS6.members,
    MAPS6.ct,
    MAPS6.affinity,
    MAPS6.src_ranges,
    MAPS6.sock,
    MAPS6.maglev,
    MAP_CONFIG,
    MAP_STATS,
    orca_common::MAP_PROGS6,
];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `<root>/v<ABI_VERSION>`: everything this release pins. A release with another layout uses
/// another directory, so it never adopts maps it cannot read.
pub fn versioned_dir(root: &Path) -> PathBuf {
    root.join(format!("v{ABI_VERSION}"))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `root` exists on a bpffs, mounting one when needed: at `/sys/fs/bpf` when `root`
/// lies below that (unmounted) conventional mount point, else at `root` itself. Returns the mount
/// point when it mounted one.
pub fn ensure_bpffs(root: &Path) -> Result<Option<PathBuf>> {
    // Agents of several sandbox nodes start together on one machine: without a lock two of them
    // can both see no bpffs and mount one each, the second hiding the first one's pins.
    let _lock = MountLock::acquire();
    let mut existing = root;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing) {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        return Ok(None);
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    let mount_point = if existing == sys_bpf && root.starts_with(sys_bpf) {
        sys_bpf.to_path_buf()
    } else {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        root.to_path_buf()
    };
    let target = CString::new(mount_point.as_os_str().as_encoded_bytes())?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("mounting bpffs on {}", mount_point.display()));
    }
    tracing::info!(path = %mount_point.display(), "mounted bpffs");
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    Ok(Some(mount_point))
}

/// An exclusive flock held while checking for and mounting bpffs (released on drop).
struct MountLock {
    _file: Option<std::fs::File>,
}

impl MountLock {
    fn acquire() -> Self {
        use std::os::fd::AsRawFd as _;
        for dir in ["/run", "/tmp"] {
            let path = Path::new(dir).join("orca-bpffs-mount.lock");
            if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
                // SAFETY: a valid open fd; blocks until the other holder is done.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    return Self { _file: Some(f) };
                }
            }
        }
        tracing::debug!("no lock file for the bpffs mount check; continuing without");
        Self { _file: None }
    }
}

/// What the programs are loaded with: their load-time globals and the conntrack capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSettings {
    /// Entries of the conntrack map (two or three per flow).
    pub ct_entries: u32,
    pub timeouts: CtTimeouts,
    pub nat_ports: NatPorts,
    pub bypass_netfilter: bool,
}

impl LoadSettings {
    /// The agent's defaults, with the conntrack capacity of the map pinned under `dir/maps` if there is one (a
    /// tool loading the programs next to a running agent must not replace that agent's conntrack map).
    pub fn for_pinned(dir: &Path) -> Result<Self> {
        let conntrack = super::ConntrackOptions::default();
        let ct_entries = aya::maps::MapData::from_pin(dir.join("maps").join(MAP_CT))
            .ok()
            .and_then(|m| m.info().ok().map(|i| i.max_entries()))
            .unwrap_or_else(|| conntrack.entries());
        Ok(Self {
            ct_entries,
            timeouts: conntrack.timeouts,
            nat_ports: conntrack.nat_ports()?,
            bypass_netfilter: false,
        })
    }
}

/// The oldest kernel the eBPF dataplane runs on: 5.10, the first with `bpf_redirect_neigh` (the bypass path), after
/// BPF links for TC-less cgroup hooks and their pinning (5.7), batch map operations (5.6, the conntrack collector),
/// `bpf_get_netns_cookie` in socket hooks (5.7) and the getpeername hooks (5.8). The socket hooks also need
/// `bpf_set_retval` (5.18, ECONNREFUSED for a Service without endpoints): below it they are left out, with a
/// warning. TCX (6.6) is used where present, clsact below.
pub const MIN_KERNEL: (u32, u32) = (5, 10);
/// The oldest kernel the socket hooks load on (`bpf_set_retval`).
pub const MIN_KERNEL_SOCKET_HOOKS: (u32, u32) = (5, 18);

/// Whether kernel `(major, minor)` runs the eBPF dataplane; the reason when not.
pub fn kernel_supported(major: u32, minor: u32) -> Result<()> {
    if (major, minor) < MIN_KERNEL {
        bail!(
            "kernel {major}.{minor} is older than {}.{}, the oldest the eBPF dataplane supports (bpf_redirect_neigh, \
             BPF links for TC and cgroup programs, batch map operations)",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

/// The running kernel's (major, minor), from its release string (`6.1.0-50-cloud-amd64` -> (6, 1)).
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_release(std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?.trim())
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Loads the embedded object, creating its maps or adopting the pinned ones under `dir/maps`,
/// and loads (verifies) every program.
pub fn load(dir: &Path, settings: &LoadSettings) -> Result<Ebpf> {
    let maps_dir = dir.join("maps");
    std::fs::create_dir_all(&maps_dir).with_context(|| format!("creating {}", maps_dir.display()))?;
    drop_resized_ct(&maps_dir.join(MAP_CT), settings.ct_entries)?;
    drop_resized_ct(&maps_dir.join(MAP_CT6), settings.ct_entries)?;
    load_with(Some(&maps_dir), settings, sock_hooks_supported())
}

/// Whether the running kernel loads the socket hooks (`bpf_set_retval`, 5.18).
pub fn sock_hooks_supported() -> bool {
    kernel_version().is_none_or(|v| v >= MIN_KERNEL_SOCKET_HOOKS)
}

/// Loads the object with its maps pinned under `maps_dir` (or not pinned at all) and verifies every program (the
/// socket hooks only when `sock_hooks`).
pub fn load_with(maps_dir: Option<&Path>, settings: &LoadSettings, sock_hooks: bool) -> Result<Ebpf> {
    if !ebpf_obj::available() {
        bail!("this orca-proxy was built without its eBPF programs (AYA_BUILD_SKIP)");
    }
    if let Some((major, minor)) = kernel_version() {
        kernel_supported(major, minor)?;
    }
    let bypass = u32::from(settings.bypass_netfilter);
    let mut loader = EbpfLoader::new();
    if let Some(maps_dir) = maps_dir {
        for m in ALL_MAPS {
            loader.map_pin_path(m, maps_dir.join(m));
        }
    }
    loader
        .map_max_entries(MAP_CT, settings.ct_entries)
        .map_max_entries(MAP_CT6, settings.ct_entries)
        .override_global(GLOBAL_CT_TIMEOUTS, &settings.timeouts, true)
        .override_global(GLOBAL_NAT_PORTS, &settings.nat_ports, true)
        .override_global(GLOBAL_BYPASS_NETFILTER, &bypass, true);
    let mut ebpf = loader.load(ebpf_obj::OBJECT).with_context(|| match maps_dir {
        Some(d) => format!("loading the eBPF object (maps pinned under {})", d.display()),
        None => "loading the eBPF object".to_string(),
    })?;
    for name in [
        orca_common::PROG_FROM_POD,
        orca_common::PROG_FROM_NETDEV,
        orca_common::PROG_EGRESS,
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load().map_err(|e| verifier_error(name, e))?;
    }
    for (name, _) in orca_common::PROGS6 {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        prog.load().map_err(|e| verifier_error(name, e))?;
    }
    // Private maps: nothing else uses this program array. (With pinned maps the agent fills it, `fill_progs6`:
    // a tool loading the programs next to a running agent leaves the agent's IPv6 programs in place.)
    if maps_dir.is_none() {
        fill_progs6(&mut ebpf)?;
    }
    if sock_hooks {
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load().map_err(|e| verifier_error(name, e))?;
        }
    }
    Ok(ebpf)
}

/// Points the entry programs' IPv6 tail calls (`ORCA_PROGS6`) at this object's IPv6 programs (loaded by `load`).
/// The array is pinned: programs of a previous agent still attached switch to these at once (they share the maps).
pub fn fill_progs6(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for (name, slot) in orca_common::PROGS6 {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        fds.push((slot, prog.fd()?.try_clone()?));
    }
    let map = ebpf
        .map_mut(orca_common::MAP_PROGS6)
        .with_context(|| format!("map {} missing", orca_common::MAP_PROGS6))?;
    let mut progs: aya::maps::ProgramArray<&mut aya::maps::MapData> = aya::maps::ProgramArray::try_from(map)?;
    for (slot, fd) in &fds {
        progs
            .set(*slot, fd, 0)
            .with_context(|| format!("setting slot {slot} of {}", orca_common::MAP_PROGS6))?;
    }
    Ok(())
}

/// Per loaded program: its name and the instructions the verifier processed (kernel 5.16+ reports it). What
/// `orca-proxy check-kernel` prints.
pub fn verifier_report(ebpf: &Ebpf) -> Vec<(String, Option<u32>)> {
    let mut out = Vec::new();
    for (name, prog) in ebpf.programs().filter(|(_, p)| p.fd().is_ok()) {
        let insns = prog.info().ok().and_then(|i| i.verified_instruction_count());
        out.push((name.to_string(), insns));
    }
    out.sort();
    out
}

/// A pinned conntrack map of another capacity cannot be adopted (the kernel fixes a map's size at creation):
/// its pin is removed, so the load creates one of the configured size. The flows it tracked start over.
fn drop_resized_ct(pin: &Path, entries: u32) -> Result<()> {
    let Ok(map) = aya::maps::MapData::from_pin(pin) else {
        return Ok(());
    };
    let current = map.info().map(|i| i.max_entries()).unwrap_or(entries);
    if current != entries {
        tracing::warn!(
            from = current,
            to = entries,
            "the conntrack capacity changed: starting a new conntrack map (tracked flows are forgotten)"
        );
        std::fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    Ok(())
}

/// Pins the loaded programs under `dir/progs/` (replacing pins of a previous agent, whose
/// programs live on while links use them) and opens them from there: the interface watcher
/// thread attaches these handles.
pub fn pin_programs(ebpf: &mut Ebpf, dir: &Path) -> Result<BTreeMap<Role, SchedClassifier>> {
    let progs_dir = dir.join("progs");
    std::fs::create_dir_all(&progs_dir).with_context(|| format!("creating {}", progs_dir.display()))?;
    let mut out = BTreeMap::new();
    for role in [Role::Pod, Role::Netdev, Role::Egress] {
        let name = role.program();
        let path = progs_dir.join(name);
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?;
        let _ = std::fs::remove_file(&path);
        prog.pin(&path)
            .with_context(|| format!("pinning {name} at {}", path.display()))?;
        let handle =
            SchedClassifier::from_pin(&path).with_context(|| format!("opening pinned program {}", path.display()))?;
        out.insert(role, handle);
    }
    Ok(out)
}

/// The cgroup hooks for clients in the node's own network namespace.
pub const SOCK_PROGRAMS: [&str; 8] = [
    orca_common::PROG_CONNECT4,
    orca_common::PROG_SENDMSG4,
    orca_common::PROG_RECVMSG4,
    orca_common::PROG_GETPEERNAME4,
    orca_common::PROG_CONNECT6,
    orca_common::PROG_SENDMSG6,
    orca_common::PROG_RECVMSG6,
    orca_common::PROG_GETPEERNAME6,
];

fn verifier_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            anyhow::anyhow!("the verifier rejected {name}: {io_error}\n{verifier_log}")
        }
        other => anyhow::Error::new(other).context(format!("loading {name}")),
    }
}

/// The cgroup v2 hierarchy's mount point (`/sys/fs/cgroup` or, on hybrid systems,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE).
pub fn netns_cookie() -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").context("socket for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a valid socket and a correctly sized out-buffer.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// Attaches the cgroup hooks to `cgroup` (alongside other agents' hooks) and pins their links;
/// links pinned by a previous agent are detached once the new ones are in place.
pub fn attach_sock_programs(ebpf: &mut Ebpf, cgroup: &Path, dir: &Path) -> Result<()> {
    let links_dir = dir.join("links");
    std::fs::create_dir_all(&links_dir)?;
    let cg = std::fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    for name in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf.program_mut(name).context("program missing")?.try_into()?;
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("cgroup link is not an fd link")?;
        let pin = links_dir.join(format!("cgroup-{name}"));
        if let Ok(old) = PinnedLink::from_pin(&pin) {
            // The old agent's hook: detach it now that ours runs.
            if let Ok(fd) = old.unpin() {
                drop(fd);
            }
        }
        let _ = std::fs::remove_file(&pin);
        link.pin(&pin)
            .with_context(|| format!("pinning the cgroup link of {name} at {}", pin.display()))?;
    }
    tracing::info!(cgroup = %cgroup.display(), "attached the socket hooks for host-namespace clients");
    Ok(())
}

/// What a program does on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Ingress of the host side of a pod veth.
    Pod,
    /// Ingress of a node uplink.
    Netdev,
    /// Egress of an uplink or a pod veth.
    Egress,
}

impl Role {
    pub fn program(self) -> &'static str {
        match self {
            Role::Pod => orca_common::PROG_FROM_POD,
            Role::Netdev => orca_common::PROG_FROM_NETDEV,
            Role::Egress => orca_common::PROG_EGRESS,
        }
    }

    pub fn hook(self) -> Hook {
        match self {
            Role::Pod | Role::Netdev => Hook::Ingress,
            Role::Egress => Hook::Egress,
        }
    }
}

/// The TC hook a program is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// Interfaces of the calling thread's network namespace (if_nameindex is netns-aware; sysfs is
/// not).
pub fn interfaces() -> Vec<(String, u32)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            if !(*p).if_name.is_null() {
                out.push((
                    CStr::from_ptr((*p).if_name).to_string_lossy().into_owned(),
                    (*p).if_index,
                ));
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The driver of interface `ifname` in the calling thread's network namespace (ethtool's GDRVINFO: `veth`,
/// `bridge`, `virtio_net`, ...), if the interface answers it.
pub fn driver(ifname: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, driver[32], version[32], fw_version[32], bus_info[32], erom_version[32],
    // reserved2[12], five u32 counts.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 20],
    }
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 20],
    };
    // SAFETY: an all-zero ifreq is valid; the name (NUL-terminated, shorter than IFNAMSIZ) and the data pointer
    // (to `info`, which outlives the ioctl) are set below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a drvinfo buffer of the size the kernel writes.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: the descriptor opened above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Veth interfaces of the calling thread's network namespace without an Orca program pinned under `root`: a pod's
/// interface whose name matches no `--ebpf-pod-interface-prefixes` (its pod gets no Service translation). What
/// `status` lists.
pub fn veths_without_program(root: &Path) -> Vec<String> {
    let links = versioned_dir(root).join("links");
    interfaces()
        .into_iter()
        .filter(|(name, _)| !links.join(format!("{name}-{}", Hook::Ingress.name())).exists())
        .filter(|(name, _)| driver(name).as_deref() == Some("veth"))
        .filter(|(name, _)| !has_ingress_program(name))
        .map(|(name, _)| name)
        .collect()
}

/// Whether one of Orca's programs runs at `ifname`'s ingress: a TCX link (queried), or a clsact filter (as `tc filter
/// show` lists it).
fn has_ingress_program(ifname: &str) -> bool {
    let tcx = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress).is_ok_and(|(_, progs)| {
        progs
            .iter()
            .any(|p| p.name_as_str().is_some_and(|n| n.starts_with("orca_")))
    });
    tcx || std::process::Command::new("tc")
        .args(["filter", "show", "dev", ifname, "ingress"])
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("orca_"))
}

/// A netlink route socket subscribed to link changes (RTMGRP_LINK) in the calling thread's network namespace.
pub struct LinkEvents(std::os::fd::OwnedFd);

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        const RTMGRP_LINK: u32 = 1;
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: binding the socket to a sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Waits until a link changed or `timeout` passed; drains what arrived (the caller rescans everything).
    pub fn wait(&self, timeout: std::time::Duration) {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            return;
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into a buffer of the size given; the socket is non-blocking.
            let r = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                break;
            }
        }
    }
}

/// Interfaces (of the calling thread's network namespace) holding one of `addrs` (either family: an IPv6-only node's
/// uplink holds its IPv6 address only).
pub fn interfaces_with_addresses(addrs: &[std::net::IpAddr]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, ip) in crate::netns::interface_addrs().unwrap_or_default() {
        if addrs.contains(&ip) && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Interfaces carrying a default route (IPv4 or IPv6) in the calling thread's network namespace.
pub fn default_route_interfaces() -> Vec<String> {
    let read = |file: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{file}")).unwrap_or_default();
    let mut out = default_routes4(&read("route"));
    out.extend(default_routes6(&read("ipv6_route")));
    out.sort();
    out.dedup();
    out
}

/// The interfaces of the default routes in `/proc/net/route`'s text (destination and mask 0).
fn default_routes4(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect()
}

/// The interfaces of the default routes in `/proc/net/ipv6_route`'s text (`::/0`), without the kernel's
/// unreachable ones (`RTF_REJECT`, on `lo`).
fn default_routes6(text: &str) -> Vec<String> {
    const RTF_REJECT: u32 = 0x0200;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            (f.len() == 10
                && f[0].bytes().all(|b| b == b'0')
                && f[1] == "00"
                && flags & RTF_REJECT == 0
                && f[9] != "lo")
                .then(|| f[9].to_string())
        })
        .collect()
}

/// How the TC programs attach: TCX links where the kernel has them (6.6+), else a clsact qdisc with direct-action
/// filters (`--ebpf-tc-attach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TcAttach {
    #[default]
    Auto,
    Tcx,
    Clsact,
}

impl TcAttach {
    /// Whether this choice means TCX on the running kernel.
    pub fn tcx(self) -> bool {
        match self {
            TcAttach::Auto => {
                aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            }
            TcAttach::Tcx => true,
            TcAttach::Clsact => false,
        }
    }
}

/// The priority and handle of Orca's clsact filters: fixed, so that a restarted agent replaces its predecessor's
/// filter in place (no window without a program, no second filter), and unlikely to be another loader's choice.
/// Cleanup finds them by program name (`orca_*`).
pub const CLSACT_PRIORITY: u16 = 0x4f52;
pub const CLSACT_HANDLE: u32 = 0x4f52;

/// Every program Orca attaches with TC.
pub const TC_PROGRAMS: [&str; 3] = [
    orca_common::PROG_FROM_POD,
    orca_common::PROG_FROM_NETDEV,
    orca_common::PROG_EGRESS,
];

/// Removes every clsact filter running one of Orca's programs, on every interface of the calling thread's network
/// namespace (whichever agent attached it, pinned or not). Returns how many (interface, hook, program) were found.
pub fn detach_clsact_filters() -> usize {
    let mut n = 0;
    for (ifname, _) in interfaces() {
        for hook in [Hook::Ingress, Hook::Egress] {
            for name in TC_PROGRAMS {
                match tc::qdisc_detach_program(&ifname, hook.attach_type(), name) {
                    Ok(()) => {
                        n += 1;
                        tracing::info!(interface = %ifname, hook = hook.name(), program = name, "detached clsact filter");
                    }
                    Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::debug!(interface = %ifname, error = %e, "no clsact filters to detach"),
                }
            }
        }
    }
    n
}

/// Attachments, by interface name and hook.
pub struct Attacher {
    links_dir: PathBuf,
    tcx: bool,
    attached: BTreeMap<(String, Hook), Role>,
    /// The interface index each attached interface had: a pod veth deleted and re-created under the same name
    /// between two scans is a new interface (the old one's links went with it).
    ifindex: BTreeMap<String, u32>,
}

/// Link types of `struct bpf_link_info`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// The type of the BPF link pinned at `pin` and the first word of its type-specific info (a cgroup link's
/// cgroup id; a TCX link's interface index, 0 once the interface is gone), read with BPF_OBJ_GET and
/// BPF_OBJ_GET_INFO_BY_FD (aya has no accessor for either).
fn pinned_link_info(pin: &Path) -> Option<(u32, u64)> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 4]| -> libc::c_long {
        // SAFETY: a bpf_attr prefix of the size passed, whose pointers (set by the callers) outlive the call.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr) as u32,
            )
        }
    };
    let path = CString::new(pin.as_os_str().as_bytes()).ok()?;
    // BPF_OBJ_GET: pathname (u64), bpf_fd, file_flags.
    let mut attr = [path.as_ptr() as u64, 0, 0, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the union of the per-type infos.
    let mut info = [0u64; 8];
    // BPF_OBJ_GET_INFO_BY_FD: bpf_fd (u32), info_len (u32), info (u64).
    let mut attr = [
        u64::from(fd.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32),
        info.as_mut_ptr() as u64,
        0,
        0,
    ];
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) != 0 {
        return None;
    }
    Some((info[0] as u32, info[2]))
}

/// The interface the TCX link pinned at `pin` is attached to (0 once the interface is gone).
fn tcx_pin_ifindex(pin: &Path) -> Option<u32> {
    match pinned_link_info(pin)? {
        (BPF_LINK_TYPE_TCX, word) => Some(word as u32),
        _ => None,
    }
}

/// The socket hooks pinned under `root` (the versioned pin directory's `links/cgroup-*`): per program, the id
/// of the cgroup its link is attached to, if the pin holds a live cgroup link.
pub fn pinned_socket_hooks(root: &Path) -> Vec<(&'static str, Option<u64>)> {
    let links = versioned_dir(root).join("links");
    SOCK_PROGRAMS
        .iter()
        .map(|name| {
            let id = match pinned_link_info(&links.join(format!("cgroup-{name}"))) {
                Some((BPF_LINK_TYPE_CGROUP, id)) => Some(id),
                _ => None,
            };
            (*name, id)
        })
        .collect()
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs writes into the zeroed struct; the path is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st) == 0).then_some(st.f_type as i64)
    }
}

/// Where the socket hooks for host-network clients attach, as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupChoice {
    /// The cgroup v2 directory the hooks attach to; `None`: no hooks.
    pub path: Option<PathBuf>,
    /// Why host-network clients will not all reach Services (a warning for the admin), if they will not.
    pub degraded: Option<super::super::Degraded>,
}

/// `--ebpf-cgroup-root`: `none` turns the socket hooks off; a path must be a cgroup v2 directory (on a hybrid
/// host the v1 tmpfs holding it in `unified/` is accepted too); no flag takes the cgroup v2 mount of the agent's
/// mount namespace, and warns when there is none or when it is not the hierarchy's root (a private cgroup
/// namespace: processes outside it would get no translation).
pub fn choose_cgroup(flag: Option<&Path>) -> Result<CgroupChoice> {
    use super::super::Degraded;
    use std::os::unix::fs::MetadataExt as _;
    // The root of a cgroup v2 hierarchy is kernfs node 1.
    let is_root = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.ino() == 1);
    match flag {
        Some(p) if p.as_os_str() == "none" => {
            tracing::info!(
                "--ebpf-cgroup-root none: no socket hooks; host-network processes get no Service translation"
            );
            Ok(CgroupChoice {
                path: None,
                degraded: None,
            })
        }
        Some(p) => {
            let path = if fs_magic(p) == Some(CGROUP2_SUPER_MAGIC) {
                p.to_path_buf()
            } else if fs_magic(&p.join("unified")) == Some(CGROUP2_SUPER_MAGIC) {
                p.join("unified")
            } else {
                bail!(
                    "--ebpf-cgroup-root {}: not a cgroup v2 directory (mount the host's cgroup2 hierarchy there, or \
                     pass none)",
                    p.display()
                );
            };
            if !is_root(&path) {
                tracing::info!(cgroup = %path.display(), "socket hooks attach below the cgroup root: only processes in this subtree reach Services from the node's namespace");
            }
            Ok(CgroupChoice {
                path: Some(path),
                degraded: None,
            })
        }
        None => match cgroup2_mount() {
            None => Ok(CgroupChoice {
                path: None,
                degraded: Some(Degraded::new(
                    Degraded::NO_CGROUP2,
                    "no cgroup v2 hierarchy is mounted where the agent runs: host-network processes (and hostNetwork \
                     pods) on this node cannot reach ClusterIPs or this node's NodePorts; mount the host's cgroup2 \
                     root and pass --ebpf-cgroup-root (see deploy/)",
                )),
            }),
            Some(p) if !is_root(&p) => Ok(CgroupChoice {
                degraded: Some(Degraded::new(
                    Degraded::CGROUP_NOT_ROOT,
                    format!(
                        "the cgroup v2 mount at {} is not the hierarchy's root (a private cgroup namespace): only \
                         processes below it reach Services from the node's namespace; mount the host's cgroup2 root \
                         and pass --ebpf-cgroup-root (see deploy/)",
                        p.display()
                    ),
                )),
                path: Some(p),
            }),
            Some(p) => Ok(CgroupChoice {
                path: Some(p),
                degraded: None,
            }),
        },
    }
}

/// Whether the bpffs this agent mounted at `mount_point` outlives it: only when the mount propagates to a peer
/// group (`shared:N` in mountinfo, e.g. the host's `/sys/fs/bpf` through a Bidirectional hostPath), or when the
/// agent runs in the machine's own mount namespace. A bpffs mounted in a private mount namespace (a container
/// without the host's bpffs, `ip netns exec`) disappears with its last process, and with it every pin.
pub fn bpffs_outlives_agent(mount_point: &Path) -> bool {
    // PID 1 is the machine's init only in the initial PID namespace, the one where kthreadd is PID 2 (in a
    // container, PID 1 shares the container's mount namespace).
    let initial_pid_ns = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let same_as_init = initial_pid_ns
        && std::process::id() != 1
        && matches!(
            (std::fs::read_link("/proc/self/ns/mnt"), std::fs::read_link("/proc/1/ns/mnt")),
            (Ok(a), Ok(b)) if a == b
        );
    if same_as_init {
        return true;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .rev()
        .find(|l| {
            let (left, _) = l.split_once(" - ").unwrap_or((l, ""));
            left.split_whitespace().nth(4).map(Path::new) == Some(mount_point)
        })
        .is_some_and(|l| {
            let (left, _) = l.split_once(" - ").unwrap_or((l, ""));
            left.split_whitespace().skip(6).any(|f| f.starts_with("shared:"))
        })
}

impl Attacher {
    pub fn new(dir: &Path, mode: TcAttach) -> Result<Self> {
        let links_dir = dir.join("links");
        std::fs::create_dir_all(&links_dir).with_context(|| format!("creating {}", links_dir.display()))?;
        Ok(Self {
            links_dir,
            tcx: mode.tcx(),
            attached: BTreeMap::new(),
            ifindex: BTreeMap::new(),
        })
    }

    pub fn attached(&self) -> &BTreeMap<(String, Hook), Role> {
        &self.attached
    }

    fn pin_path(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.links_dir.join(format!("{ifname}-{}", hook.name()))
    }

    /// Attaches the program of `role` on `ifname` (at the role's hook). With TCX the link is pinned, and a
    /// link pinned by a previous agent is switched to the new program atomically: no packet goes
    /// unprocessed across an agent restart.
    pub fn attach(&mut self, prog: &mut SchedClassifier, ifname: &str, ifindex: u32, role: Role) -> Result<()> {
        let hook = role.hook();
        let slot = (ifname.to_string(), hook);
        if self.attached.get(&slot) == Some(&role) && self.ifindex.get(ifname) == Some(&ifindex) {
            return Ok(());
        }
        if self.tcx {
            let pin = self.pin_path(ifname, hook);
            // A link pinned for an earlier interface of this name (deleted and re-created while no agent watched)
            // is defunct: unpin it, and attach afresh.
            if pin.exists() && tcx_pin_ifindex(&pin) != Some(ifindex) {
                tracing::info!(interface = ifname, pin = %pin.display(), "pinned link of a former interface of this name: replaced");
                let _ = std::fs::remove_file(&pin);
            }
            let id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link = FdLink::from(old).try_into().context("pinned link is not a TC link")?;
                    prog.attach_to_link(link)
                        .with_context(|| format!("replacing the program of the pinned link {}", pin.display()))?
                }
                Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.kind() == io::ErrorKind::NotFound =>
                {
                    prog.attach_with_options(
                        ifname,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching {} to {ifname} (TCX {})", role.program(), hook.name()))?
                }
                Err(e) => return Err(e).with_context(|| format!("opening pinned link {}", pin.display())),
            };
            let link = prog.take_link(id)?;
            let fd: FdLink = link.try_into().context("TCX link is not an fd link")?;
            // Re-pinning an adopted link: drop the old pin first.
            let _ = std::fs::remove_file(&pin);
            fd.pin(&pin)
                .with_context(|| format!("pinning the link of {ifname} at {}", pin.display()))?;
        } else {
            // Older kernels: clsact + a direct-action filter at Orca's priority and handle. The filter stays after
            // the agent exits (the link is forgotten, not detached); the next agent replaces its program in place.
            if let Err(e) = tc::qdisc_add_clsact(ifname) {
                tracing::debug!(interface = ifname, error = %e, "clsact (probably present already)");
            }
            let handle = TcHandle::from(CLSACT_HANDLE);
            let replaced = SchedClassifierLink::attached(ifname, hook.attach_type(), CLSACT_PRIORITY, handle, None)
                .ok()
                .and_then(|link| prog.attach_to_link(link).ok());
            let id = match replaced {
                Some(id) => id,
                None => prog
                    .attach_with_options(
                        ifname,
                        hook.attach_type(),
                        TcAttachOptions::Netlink(NlOptions {
                            priority: CLSACT_PRIORITY,
                            handle,
                            ..Default::default()
                        }),
                    )
                    .with_context(|| format!("attaching {} to {ifname} (clsact {})", role.program(), hook.name()))?,
            };
            std::mem::forget(prog.take_link(id)?);
        }
        tracing::info!(
            interface = ifname,
            ifindex,
            program = role.program(),
            tcx = self.tcx,
            "attached"
        );
        self.attached.insert(slot, role);
        self.ifindex.insert(ifname.to_string(), ifindex);
        Ok(())
    }

    /// Forgets interfaces that disappeared (their links went with them) and removes their pins; an interface
    /// whose index changed (deleted and re-created under the same name) is forgotten too, to be attached again.
    pub fn forget_missing(&mut self, present: &[(String, u32)]) {
        let gone: Vec<(String, Hook)> = self
            .attached
            .keys()
            .filter(|(n, _)| {
                let now = present.iter().find(|(p, _)| p == n).map(|(_, i)| *i);
                now.is_none() || now != self.ifindex.get(n).copied()
            })
            .cloned()
            .collect();
        for (n, hook) in gone {
            let _ = std::fs::remove_file(self.pin_path(&n, hook));
            self.attached.remove(&(n.clone(), hook));
            self.ifindex.remove(&n);
            tracing::info!(interface = %n, hook = hook.name(), "interface gone (or re-created under its name)");
        }
    }

    /// Detaches everything: pinned links are opened, unpinned and closed; clsact filters running Orca's programs
    /// are removed by name.
    pub fn detach_all(&mut self) -> Result<()> {
        detach_clsact_filters();
        if let Ok(dir) = std::fs::read_dir(&self.links_dir) {
            for e in dir.flatten() {
                let path = e.path();
                match PinnedLink::from_pin(&path) {
                    Ok(link) => {
                        // Unpinning and dropping the last fd detaches the link.
                        let fd = link.unpin().with_context(|| format!("unpinning {}", path.display()))?;
                        drop(fd);
                    }
                    Err(_) => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        self.attached.clear();
        Ok(())
    }
}

#[cfg(test)]
mod cgroup_tests {
    use super::*;

    #[test]
    fn cgroup_root_flag_is_checked() {
        let none = choose_cgroup(Some(Path::new("none"))).unwrap();
        assert_eq!((none.path, none.degraded), (None, None));
        let err = choose_cgroup(Some(Path::new("/proc"))).unwrap_err();
        assert!(format!("{err:#}").contains("not a cgroup v2 directory"), "{err:#}");
        // This machine's cgroup2 hierarchy, given explicitly (read only: nothing attaches here).
        if let Some(m) = cgroup2_mount() {
            let c = choose_cgroup(Some(&m)).unwrap();
            assert_eq!((c.path.as_deref(), c.degraded), (Some(m.as_path()), None));
            // A hybrid host's v1 tmpfs holding cgroup2 at unified/ is accepted for the hierarchy below it.
            if m.ends_with("unified") {
                let parent = m.parent().unwrap();
                assert_eq!(choose_cgroup(Some(parent)).unwrap().path.as_deref(), Some(m.as_path()));
            }
        }
    }

    #[test]
    fn minimum_kernel() {
        assert_eq!(parse_release("6.1.0-50-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.15.0-1052-aws"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
        assert!(kernel_supported(5, 10).is_ok() && kernel_supported(6, 18).is_ok());
        let e = kernel_supported(5, 4).unwrap_err();
        assert!(format!("{e}").contains("kernel 5.4 is older than 5.10"), "{e}");
        assert!((5, 15) < MIN_KERNEL_SOCKET_HOOKS && (6, 1) >= MIN_KERNEL_SOCKET_HOOKS);
    }
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn default_routes_of_both_families() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_routes4(v4), vec!["eth0"]);
        // /proc/net/ipv6_route's format: a prefix route, a default route via eth1, the kernel's unreachable default on
        // lo, a local route.
        let v6 = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
";
        assert_eq!(default_routes6(v6), vec!["eth1"]);
        assert!(default_routes6("garbage\n").is_empty());
    }
}
