//! `cargo xtask kernels`: Orca's eBPF programs and dataplane tests on the kernels real clusters run, each booted in
//! a qemu VM.
//!
//! For every kernel of [`KERNELS`] (Debian's own packages, fetched by name with `apt-get download` and unpacked,
//! never installed on this machine):
//!
//! 1. an initramfs is built: busybox (static), the kernel's `veth`, `sch_ingress` and `cls_bpf` modules (with what
//!    they depend on), the test executables of `proxy/tests/ebpf_programs.rs` and `proxy/tests/ebpf_dataplane.rs`,
//!    `orca-proxy` (at the path the tests were compiled with), `ip`, `tc` and `socat`, each with the shared
//!    libraries `ldd` names, and an `/init` that mounts proc, sysfs, bpffs and cgroup2, loads the modules and runs;
//! 2. `orca-proxy check-kernel` (every program through this kernel's verifier: instructions processed), then the
//!    BPF_PROG_TEST_RUN tests, then the eBPF dataplane netns tests (real TCP and UDP through a ClusterIP with TCX or
//!    clsact as the kernel has it and with clsact forced, restart adoption, cleanup leaving nothing attached, the
//!    socket hooks for host clients) -- all but the one that needs iptables;
//! 3. qemu boots it (`-nographic`, serial console on stdout): KVM is tried first (a guest that prints nothing within
//!    30 s is given up: nested virtualisation hangs on this machine kind), TCG (`-accel tcg -cpu max`) otherwise.
//!
//! The console is parsed into a per-kernel report (verifier counts, tests passed and failed, wall time, accelerator)
//! printed as a table and written to `.cache/kernels/report.md`. Any failure fails the command.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Debian's kernels, by package name: Debian 12's 6.1 (clsact path: no TCX), 6.12 from bookworm's updates (TCX, an
/// older verifier than this machine's), and Debian 11's 5.10, the oldest kernel Orca supports.
pub const KERNELS: &[&str] = &[
    "linux-image-6.1.0-50-cloud-amd64",
    "linux-image-6.12.115+deb12-cloud-amd64",
    "linux-image-5.10.0-32-cloud-amd64",
];

/// Packages not in this machine's apt sources (Debian 12) come from this Debian release's index on the same mirror:
/// found by name in its `Packages.gz`, downloaded and checked against the SHA-256 the index gives.
const OTHER_RELEASE: (&str, &str) = ("linux-image-5.10.", "bullseye");
const MIRROR: &str = "http://deb.debian.org/debian";

/// Modules the tests need that Debian's cloud kernels build as modules.
const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

/// The eBPF dataplane tests that cannot run in the VM: iptables is not in the initramfs.
const SKIPPED_TESTS: &[&str] = &["iptables_start_and_fallback_remove_what_ebpf_attached"];

#[derive(Args, Debug)]
pub struct KernelArgs {
    /// Kernel packages to boot (repeatable); default: all of KERNELS.
    #[arg(long = "kernel", value_name = "PACKAGE")]
    pub kernels: Vec<String>,
    /// Time limit of one VM run, in seconds.
    #[arg(long, default_value_t = 1200)]
    pub timeout: u64,
}

/// What one VM run showed.
#[derive(Debug, Default)]
struct Outcome {
    package: String,
    release: String,
    accel: String,
    wall: Duration,
    /// (variant, program) -> instructions processed.
    verifier: BTreeMap<(String, String), String>,
    tc_attach: String,
    /// Per test binary: (passed, failed).
    tests: BTreeMap<String, (usize, usize)>,
    /// The last `test result:` line's counts, until its binary's `=== rc` line names it.
    pending: Option<(usize, usize)>,
    failures: Vec<String>,
    complete: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.complete && self.failures.is_empty() && !self.tests.is_empty() && !self.verifier.is_empty()
    }
}

fn cache() -> Result<PathBuf> {
    let root = crate::setup::workspace_root()?;
    Ok(root.join(".cache").join("kernels"))
}

pub fn run(args: KernelArgs) -> Result<()> {
    let started = Instant::now();
    crate::setup::run()?;
    crate::setup::ensure_packages(&["qemu-system-x86", "busybox-static", "xz-utils"])?;
    let kernels: Vec<String> = if args.kernels.is_empty() {
        KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    let bins = test_binaries()?;
    let mut outcomes = Vec::new();
    for pkg in &kernels {
        println!("kernels: {pkg}");
        let tree = fetch_kernel(pkg)?;
        let initrd = build_initramfs(pkg, &tree, &bins)?;
        let vmlinuz = find_file(&tree.join("boot"), "vmlinuz-")?;
        let o = boot(pkg, &vmlinuz, &initrd, Duration::from_secs(args.timeout))?;
        println!(
            "kernels: {pkg}: {} on {} in {:.0}s",
            if o.ok() { "passed" } else { "FAILED" },
            o.accel,
            o.wall.as_secs_f64()
        );
        outcomes.push(o);
    }
    let report = render(&outcomes);
    print!("{report}");
    let path = cache()?.join("report.md");
    std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "kernels: report in {} ({:.0}s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.package.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("failed on {}", failed.join(", "));
    }
    Ok(())
}

/// The executables to bring: (path on this machine, path in the VM).
struct Binaries {
    tests: Vec<(String, PathBuf)>,
    orca_proxy: PathBuf,
}

/// Builds orca-proxy and the two eBPF test executables; returns their paths.
fn test_binaries() -> Result<Binaries> {
    let status = crate::cargo()
        .args(["build", "-p", "orca-proxy", "--bin", "orca-proxy"])
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("cargo build -p orca-proxy failed");
    }
    let out = crate::cargo()
        .args([
            "test",
            "-p",
            "orca-proxy",
            "--test",
            "ebpf_programs",
            "--test",
            "ebpf_dataplane",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(exe) = json_str(line, "executable") else {
            continue;
        };
        for name in ["ebpf_programs", "ebpf_dataplane"] {
            if line.contains(&format!("\"name\":\"{name}\"")) && line.contains("\"kind\":[\"test\"]") {
                tests.push((name.to_string(), PathBuf::from(&exe)));
            }
        }
    }
    if tests.len() != 2 {
        bail!("expected the ebpf_programs and ebpf_dataplane test executables, found {tests:?}");
    }
    let root = crate::setup::workspace_root()?;
    Ok(Binaries {
        tests,
        orca_proxy: root.join("target/debug/orca-proxy"),
    })
}

/// The string value of `"key":"..."` in a JSON line (cargo's messages; no escapes in paths).
fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// `apt-get download` of `pkg` (unless cached), unpacked with `dpkg-deb -x`; returns the tree.
fn fetch_kernel(pkg: &str) -> Result<PathBuf> {
    let dir = cache()?;
    let tree = dir.join(pkg);
    if tree.join("boot").is_dir() {
        return Ok(tree);
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs)?;
    let deb_of = |debs: &Path| -> Option<PathBuf> {
        std::fs::read_dir(debs).ok()?.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
    };
    if deb_of(&debs).is_none() && pkg.starts_with(OTHER_RELEASE.0) {
        download_from_index(pkg, OTHER_RELEASE.1, &debs)?;
    }
    if deb_of(&debs).is_none() {
        // _apt cannot write into root's directories: download as root (apt warns, and does it).
        let status = Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(&debs)
            .status()
            .context("apt-get download")?;
        if !status.success() {
            // The index may be stale on a fresh machine.
            crate::setup::apt_get(&["update", "-q"])?;
            let status = Command::new("apt-get")
                .args(["download", "-q", pkg])
                .current_dir(&debs)
                .status()?;
            if !status.success() {
                bail!("apt-get download {pkg} failed");
            }
        }
    }
    let deb = deb_of(&debs).with_context(|| format!("no .deb of {pkg} in {}", debs.display()))?;
    let tmp = dir.join(format!("{pkg}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp).status()?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    std::fs::rename(&tmp, &tree)?;
    Ok(tree)
}

/// `pkg` from Debian release `release`'s main index on [`MIRROR`], checked against the index's SHA-256.
fn download_from_index(pkg: &str, release: &str, debs: &Path) -> Result<()> {
    let index_url = format!("{MIRROR}/dists/{release}/main/binary-amd64/Packages.gz");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("curl -fsSL --max-time 120 '{index_url}' | gzip -dc"))
        .output()
        .context("downloading the package index")?;
    if !out.status.success() {
        bail!("downloading {index_url} failed");
    }
    let index = String::from_utf8_lossy(&out.stdout);
    let stanza = index
        .split("\n\n")
        .find(|st| st.lines().next() == Some(&format!("Package: {pkg}")))
        .with_context(|| format!("{pkg} is not in {index_url}"))?;
    let field = |name: &str| {
        stanza
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_string)
            .with_context(|| format!("no {name} for {pkg} in {index_url}"))
    };
    let (file, sha) = (field("Filename")?, field("SHA256")?);
    let name = file.rsplit('/').next().unwrap_or(&file).to_string();
    let tmp = debs.join(format!("{name}.partial"));
    let status = Command::new("curl")
        .args(["-fsSL", "--max-time", "600", "-o"])
        .arg(&tmp)
        .arg(format!("{MIRROR}/{file}"))
        .status()
        .context("curl")?;
    if !status.success() {
        bail!("downloading {MIRROR}/{file} failed");
    }
    let sum = Command::new("sha256sum").arg(&tmp).output().context("sha256sum")?;
    let got = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    if got != sha {
        let _ = std::fs::remove_file(&tmp);
        bail!("{name}: SHA-256 {got} is not the index's {sha}");
    }
    std::fs::rename(&tmp, debs.join(name))?;
    Ok(())
}

fn find_file(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// The `depends=` of a kernel module (its `.modinfo` section).
fn module_depends(ko: &Path) -> Result<Vec<String>> {
    let tmp = std::env::temp_dir().join(format!("orca-modinfo-{}", std::process::id()));
    let status = Command::new("objcopy")
        .args(["-O", "binary", "--only-section=.modinfo"])
        .arg(ko)
        .arg(&tmp)
        .status()
        .context("objcopy")?;
    if !status.success() {
        bail!("objcopy of {} failed", ko.display());
    }
    let data = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok())
        .filter_map(|f| f.strip_prefix("depends="))
        .flat_map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// Files of the initramfs: path inside -> contents source.
struct Cpio {
    files: BTreeMap<String, Entry>,
}

enum Entry {
    File(PathBuf, u32),
    Data(Vec<u8>, u32),
    Dir,
}

impl Cpio {
    fn dirs_of(&mut self, path: &str) {
        let mut p = String::new();
        for part in path
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|x| x.1)
            .unwrap_or(&[])
        {
            p.push('/');
            p.push_str(part);
            self.files.entry(p.clone()).or_insert(Entry::Dir);
        }
    }
    fn file(&mut self, inside: &str, from: &Path, mode: u32) {
        self.dirs_of(inside);
        self.files
            .insert(inside.to_string(), Entry::File(from.to_path_buf(), mode));
    }
    fn data(&mut self, inside: &str, data: Vec<u8>, mode: u32) {
        self.dirs_of(inside);
        self.files.insert(inside.to_string(), Entry::Data(data, mode));
    }
    fn dir(&mut self, inside: &str) {
        self.dirs_of(&format!("{inside}/x"));
    }

    /// Writes the newc archive.
    fn write(&self, out: &Path) -> Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
        let mut ino = 1u32;
        let mut header = |w: &mut dyn Write, name: &str, mode: u32, size: usize| -> Result<()> {
            let name_z = format!("{}\0", name.trim_start_matches('/'));
            let h = format!(
                "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                name_z.len(),
                0
            );
            ino += 1;
            w.write_all(h.as_bytes())?;
            w.write_all(name_z.as_bytes())?;
            let pad = (4 - (110 + name_z.len()) % 4) % 4;
            w.write_all(&[0u8; 4][..pad])?;
            Ok(())
        };
        let pad_data = |w: &mut dyn Write, len: usize| -> Result<()> {
            w.write_all(&[0u8; 4][..(4 - len % 4) % 4])?;
            Ok(())
        };
        for (name, e) in &self.files {
            match e {
                Entry::Dir => header(&mut w, name, 0o040755, 0)?,
                Entry::Data(d, mode) => {
                    header(&mut w, name, 0o100000 | mode, d.len())?;
                    w.write_all(d)?;
                    pad_data(&mut w, d.len())?;
                }
                Entry::File(p, mode) => {
                    let d = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                    header(&mut w, name, 0o100000 | mode, d.len())?;
                    w.write_all(&d)?;
                    pad_data(&mut w, d.len())?;
                }
            }
        }
        header(&mut w, "TRAILER!!!", 0, 0)?;
        w.flush()?;
        Ok(())
    }
}

/// A stripped copy of `exe` in `dir` (test executables carry hundreds of MB of debug info).
fn stripped(exe: &Path, dir: &Path) -> Result<PathBuf> {
    let out = dir.join(exe.file_name().context("file name")?);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(exe)
        .status()
        .context("strip")?;
    if !status.success() {
        bail!("strip {} failed", exe.display());
    }
    Ok(out)
}

/// The shared libraries `ldd` resolves for `exe` (the dynamic loader included).
fn libraries(exe: &Path) -> Result<BTreeSet<PathBuf>> {
    let out = Command::new("ldd").arg(exe).output().context("ldd")?;
    let mut libs = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.insert(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// The VM's /init.
fn init_script(release: &str, modules: &[String], tests: &[(String, PathBuf)], orca: &Path) -> String {
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/bin:/usr/sbin:/bin:/sbin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/netns /sys/fs/bpf /var && ln -s /run /var/run\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         ip link set lo up\n",
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{release}/{m}.ko || echo \"=== insmod {m} failed\"\n"
        ));
    }
    s.push_str(&format!(
        "echo \"=== ORCA-KERNEL-BEGIN $(uname -r)\"\n{} check-kernel; echo \"=== rc check-kernel $?\"\n",
        orca.display()
    ));
    let mut skips: String = SKIPPED_TESTS.iter().map(|t| format!(" --skip {t}")).collect();
    // Before 5.18 the agent leaves the socket hooks out (no bpf_set_retval): nothing to test for host clients.
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    if (v.next().unwrap_or(0), v.next().unwrap_or(0)) < (5, 18) {
        skips.push_str(" --skip host_namespace_clients_use_the_socket_hooks");
    }
    // The dataplane tests first; the BPF_PROG_TEST_RUN tests age conntrack entries by moving their timestamps
    // back by up to the SYN_SENT lifetime (120 s) of the monotonic clock, which must have run that long since boot.
    let mut ordered: Vec<&(String, PathBuf)> = tests.iter().collect();
    ordered.sort_by_key(|(name, _)| name != "ebpf_dataplane");
    for (name, _) in ordered {
        if name == "ebpf_programs" {
            s.push_str("while [ \"$(cut -d. -f1 /proc/uptime)\" -lt 150 ]; do sleep 5; done\n");
        }
        s.push_str(&format!(
            "RUST_BACKTRACE=0 /tests/{name} --test-threads=1{skips}; echo \"=== rc {name} $?\"\n"
        ));
    }
    s.push_str("echo \"=== ORCA-KERNEL-END\"\npoweroff -f\n");
    s
}

/// Builds (or reuses, when every input is older) the initramfs for `pkg`.
fn build_initramfs(pkg: &str, tree: &Path, bins: &Binaries) -> Result<PathBuf> {
    let dir = cache()?;
    let out = dir.join(format!("{pkg}.cpio"));
    let release = find_file(&tree.join("lib/modules"), "")?
        .file_name()
        .context("release")?
        .to_string_lossy()
        .into_owned();
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    let mut cpio = Cpio { files: BTreeMap::new() };
    for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root"] {
        cpio.dir(d);
    }
    cpio.data("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644);
    cpio.data("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    cpio.file("/bin/busybox", Path::new("/bin/busybox"), 0o755);
    // The tests' shell scripts run `ip` and `tc`: busybox's sh would run its own applets of those names, so /bin/sh
    // is dash (busybox --install does not replace it).
    let dash = std::fs::canonicalize("/bin/dash").context("/bin/dash")?;
    cpio.file("/bin/sh", &dash, 0o755);
    // Modules and what they depend on, in load order.
    let mod_root = tree.join("lib/modules").join(&release);
    let mut order: Vec<String> = Vec::new();
    fn add(m: &str, mod_root: &Path, order: &mut Vec<String>, cpio: &mut Cpio, release: &str) -> Result<()> {
        if order.iter().any(|o| o == m) {
            return Ok(());
        }
        let names: Vec<String> = [m.replace('-', "_"), m.to_string()]
            .iter()
            .flat_map(|b| ["", ".xz", ".zst", ".gz"].map(|c| format!("{b}.ko{c}")))
            .collect();
        let found = walk(mod_root)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| names.iter().any(|x| n == x.as_str())))
            .with_context(|| format!("module {m} not in {}", mod_root.display()))?;
        let ko = decompressed(&found)?;
        for dep in module_depends(&ko)? {
            add(&dep, mod_root, order, cpio, release)?;
        }
        cpio.file(&format!("/lib/modules/{release}/{m}.ko"), &ko, 0o644);
        order.push(m.to_string());
        Ok(())
    }
    for m in MODULES {
        add(m, &mod_root, &mut order, &mut cpio, &release)?;
    }
    // Executables and their libraries.
    let mut libs = libraries(&dash)?;
    for (name, exe) in &bins.tests {
        let s = stripped(exe, &work)?;
        libs.extend(libraries(&s)?);
        cpio.file(&format!("/tests/{name}"), &s, 0o755);
    }
    let orca = stripped(&bins.orca_proxy, &work)?;
    libs.extend(libraries(&orca)?);
    // The tests run orca-proxy by the path they were compiled with (CARGO_BIN_EXE_orca-proxy).
    cpio.file(&bins.orca_proxy.to_string_lossy(), &orca, 0o755);
    for tool in ["/usr/bin/ip", "/usr/sbin/tc", "/usr/bin/socat"] {
        let real = std::fs::canonicalize(tool).with_context(|| format!("{tool} (apt package iproute2/socat)"))?;
        libs.extend(libraries(&real)?);
        // In /usr/bin and /usr/sbin, which come first in the VM's PATH: busybox's own `ip` and `tc` (in /bin) lack
        // what the tests use.
        cpio.file(tool, &real, 0o755);
    }
    for lib in &libs {
        let real = std::fs::canonicalize(lib)?;
        cpio.file(&lib.to_string_lossy(), &real, 0o755);
    }
    cpio.data(
        "/init",
        init_script(&release, &order, &bins.tests, &bins.orca_proxy).into_bytes(),
        0o755,
    );
    cpio.write(&out)?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "kernels:   initramfs {} ({} MB, modules {})",
        out.display(),
        size >> 20,
        order.join(" ")
    );
    Ok(out)
}

/// `ko` itself, or its decompressed copy next to the initramfs work files (6.12's modules are `.ko.xz`; busybox's
/// insmod loads plain `.ko` files).
fn decompressed(ko: &Path) -> Result<PathBuf> {
    let name = ko
        .file_name()
        .context("module file name")?
        .to_string_lossy()
        .into_owned();
    let tool = match name.rsplit('.').next() {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return Ok(ko.to_path_buf()),
    };
    let out = cache()?
        .join("work")
        .join(name.rsplit_once('.').map(|(a, _)| a).unwrap_or(&name));
    let data = Command::new(tool)
        .arg("-dc")
        .arg(ko)
        .output()
        .with_context(|| format!("{tool} -dc {}", ko.display()))?;
    if !data.status.success() {
        bail!("{tool} -dc {} failed", ko.display());
    }
    std::fs::write(&out, data.stdout)?;
    Ok(out)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Boots the VM and parses its console. KVM first (given up when the guest prints nothing within 20 s), then TCG.
fn boot(pkg: &str, vmlinuz: &Path, initrd: &Path, limit: Duration) -> Result<Outcome> {
    let kvm = Path::new("/dev/kvm").exists();
    for accel in ["kvm", "tcg"] {
        if accel == "kvm" && !kvm {
            continue;
        }
        let started = Instant::now();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
        if accel == "kvm" {
            cmd.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            cmd.args(["-accel", "tcg", "-cpu", "max"]);
        }
        cmd.arg("-kernel")
            .arg(vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut o = Outcome {
            package: pkg.to_string(),
            accel: if accel == "kvm" {
                "KVM".into()
            } else {
                "TCG (-cpu max)".into()
            },
            ..Outcome::default()
        };
        // The guest's /init printed its first marker (firmware output does not count: a hung KVM guest prints
        // SeaBIOS's banner and then nothing).
        let mut saw_output = false;
        let mut log = Vec::new();
        loop {
            let first_limit = if accel == "kvm" && !saw_output {
                Duration::from_secs(30)
            } else {
                limit
            };
            if started.elapsed() > first_limit {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(line) => {
                    let line = line.trim_end_matches('\r').to_string();
                    saw_output |= line.contains("=== ORCA-KERNEL-BEGIN");
                    parse_line(&line, &mut o);
                    log.push(line);
                    if o.complete {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        o.wall = started.elapsed();
        let log_path = cache()?.join(format!("{pkg}-{accel}.log"));
        std::fs::write(&log_path, log.join("\n"))?;
        if accel == "kvm" && !saw_output {
            println!("kernels:   the KVM guest did not reach /init within 30 s: TCG");
            continue;
        }
        if !o.complete {
            o.failures.push(format!(
                "the VM did not finish within {:.0}s (console in {})",
                limit.as_secs_f64(),
                log_path.display()
            ));
        }
        println!("kernels:   console in {}", log_path.display());
        return Ok(o);
    }
    bail!("no accelerator could run the VM")
}

/// Reads one console line into the outcome.
fn parse_line(line: &str, o: &mut Outcome) {
    if let Some(i) = line.find("=== ORCA-KERNEL-BEGIN ") {
        o.release = line[i + "=== ORCA-KERNEL-BEGIN ".len()..].trim().to_string();
    } else if line.starts_with("=== ORCA-KERNEL-END") {
        o.complete = true;
    } else if let Some(rest) = line.strip_prefix("=== rc ") {
        let mut it = rest.split_whitespace();
        if let (Some(what), Some(rc)) = (it.next(), it.next()) {
            if rc != "0" {
                o.failures.push(format!("{what} exited {rc}"));
            }
            if let Some(counts) = o.pending.take() {
                o.tests.insert(what.to_string(), counts);
            }
        }
    } else if line.starts_with("=== insmod") {
        o.failures.push(line.trim_start_matches("=== ").to_string());
    } else if let Some(rest) = line.strip_prefix("verifier\t") {
        let f: Vec<&str> = rest.split('\t').collect();
        if f.len() == 3 {
            o.verifier
                .insert((f[0].to_string(), f[1].to_string()), f[2].to_string());
        }
    } else if let Some(rest) = line.strip_prefix("tc attach\t") {
        o.tc_attach = rest.trim().to_string();
    } else if line.starts_with("test result: ") {
        let num = |key: &str| -> usize {
            line.split(';')
                .find_map(|part| {
                    let part = part
                        .trim()
                        .trim_start_matches("test result: ok.")
                        .trim_start_matches("test result: FAILED.");
                    part.trim().strip_suffix(key).and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        o.pending = Some((num("passed"), num("failed")));
    } else if line.starts_with("test ") && line.ends_with("FAILED") {
        o.failures.push(line.to_string());
    }
}

fn render(outcomes: &[Outcome]) -> String {
    let mut s = String::from("# Kernel matrix (`cargo xtask kernels`)\n\n");
    s.push_str("| kernel package | release | accelerator | TC attach | tests passed / failed | wall time | result |\n");
    s.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for o in outcomes {
        let (p, f) = o.tests.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {p} / {f} | {:.0} s | {} |\n",
            o.package,
            o.release,
            o.accel,
            o.tc_attach,
            o.wall.as_secs_f64(),
            if o.ok() {
                "pass".to_string()
            } else {
                format!("FAIL: {}", o.failures.join("; "))
            }
        ));
    }
    s.push_str(
        "\nInstructions processed by each kernel's verifier (`orca-proxy check-kernel`):\n\n| variant | program |",
    );
    for o in outcomes {
        s.push_str(&format!(" {} |", o.release));
    }
    s.push_str("\n| --- | --- |");
    for _ in outcomes {
        s.push_str(" --- |");
    }
    s.push('\n');
    let keys: BTreeSet<&(String, String)> = outcomes.iter().flat_map(|o| o.verifier.keys()).collect();
    for k in keys {
        s.push_str(&format!("| {} | {} |", k.0, k.1));
        for o in outcomes {
            s.push_str(&format!(" {} |", o.verifier.get(k).map(String::as_str).unwrap_or("-")));
        }
        s.push('\n');
    }
    s
}
