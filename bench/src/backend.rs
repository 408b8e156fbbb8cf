//! Which iptables backend the iptables-mode proxies (Orca's and upstream's) use, and where the measured Service
//! ended up in their dispatch chain.
//!
//! `iptables-nft-restore` 1.8.9 with `--noflush` grows quadratically with chains × rules (10k service ports:
//! 182 s per restore, see `bench/results/iptables-scale.md`), so at 10,000 and 30,000 Services an nft-backed
//! iptables proxy spends minutes to hours per sync. At those scales the benchmark runs both iptables proxies on
//! `iptables-legacy`, the way a node whose kubelet uses legacy iptables runs them:
//!
//! * the node namespace gets the `KUBE-IPTABLES-HINT` chain in the legacy `mangle` table (what kubelet leaves
//!   behind on such a node): Orca's flavour detection, which follows kube-proxy's iptables wrapper, then picks
//!   legacy;
//! * upstream kube-proxy calls plain `iptables`, `iptables-save`, `iptables-restore` (and the ip6tables ones); its
//!   container image's wrapper points them at the detected backend. Here a bench-owned directory of symlinks to
//!   `xtables-legacy-multi` comes first in its `PATH` (a two-line `kube-proxy` shell wrapper that `exec`s the real
//!   binary, so the process is still `kube-proxy`).
//!
//! Both proxies thus get the same input and the same backend. Everything lives in the sandbox's `orca-node-*`
//! namespaces and is flushed after each proxy.
//!
//! iptables-legacy serialises its users with a lock file, `/run/xtables.lock`, which is machine-wide: the two
//! sandbox nodes share it while two real nodes would not. At 30k Services one legacy restore takes longer than
//! the proxies' 5 s lock wait (`-w 5`), so node-b's restore made node-a's fail, forever. Both wrappers (Orca's
//! and kube-proxy's) therefore set `XTABLES_LOCKFILE` (honoured by iptables 1.8) to a per-namespace file
//! `/run/orca-bench-xtables-<netns>.lock`, which the shim removes when it is dropped.
use anyhow::{bail, Context, Result};
use orca_sandbox::netns;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// `--iptables-backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// nft below `LEGACY_FROM` Services, legacy from there on.
    Auto,
    /// Whatever the node would pick: nft on these empty namespaces.
    Nft,
    Legacy,
}

/// Scale from which `auto` uses iptables-legacy.
pub const LEGACY_FROM: usize = 5_000;

/// The backend an iptables proxy runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub fn choose(c: BackendChoice, scale: usize) -> Backend {
        match c {
            BackendChoice::Nft => Backend::Nft,
            BackendChoice::Legacy => Backend::Legacy,
            BackendChoice::Auto if scale >= LEGACY_FROM => Backend::Legacy,
            BackendChoice::Auto => Backend::Nft,
        }
    }

    fn save_tool(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }
}

/// The legacy shim: `<dir>/bin/{iptables,ip6tables}{,-save,-restore}` -> xtables-legacy-multi;
/// `<dir>/kube-proxy`, a wrapper that puts `<dir>/bin` first in `PATH` and execs the real kube-proxy; and
/// `<dir>/orca/orca-proxy`, which execs the real orca-proxy. Both set a per-namespace `XTABLES_LOCKFILE`.
pub struct LegacyShim {
    dir: PathBuf,
    pub kube_proxy: PathBuf,
    pub orca_proxy: Option<PathBuf>,
}

/// Prefix of the per-namespace xtables lock files.
pub const LOCK_PREFIX: &str = "/run/orca-bench-xtables-";

/// Shell lines that set `XTABLES_LOCKFILE` for the namespace the script runs in (left unset outside one).
fn lockfile_lines() -> String {
    format!(
        "ns=$(ip netns identify $$ 2>/dev/null)\nif [ -n \"$ns\" ]; then XTABLES_LOCKFILE={LOCK_PREFIX}$ns.lock; export XTABLES_LOCKFILE; fi\n"
    )
}

fn find_on_path(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn sh_quote(p: &Path) -> Result<String> {
    let s = p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))?;
    if s.contains('\'') {
        bail!("path {s:?} contains a quote");
    }
    Ok(format!("'{s}'"))
}

impl LegacyShim {
    pub fn create(real_kube_proxy: &Path, real_orca_proxy: Option<&Path>) -> Result<LegacyShim> {
        use std::os::unix::fs::PermissionsExt;
        let multi =
            find_on_path("iptables-legacy").context("iptables-legacy not found (Debian: apt-get install iptables)")?;
        let multi = std::fs::canonicalize(&multi).with_context(|| format!("resolving {}", multi.display()))?;
        let dir = std::env::temp_dir().join(format!("orca-bench-legacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        for tool in [
            "iptables",
            "iptables-save",
            "iptables-restore",
            "ip6tables",
            "ip6tables-save",
            "ip6tables-restore",
        ] {
            std::os::unix::fs::symlink(&multi, bin.join(tool))
                .with_context(|| format!("linking {tool} to {}", multi.display()))?;
        }
        let kube_proxy = dir.join("kube-proxy");
        let script = format!(
            "#!/bin/sh\n# orca-bench: kube-proxy on iptables-legacy (what its image's iptables wrapper does on a legacy node)\nPATH={}:\"$PATH\"\nexport PATH\n{}exec {} \"$@\"\n",
            sh_quote(&bin)?,
            lockfile_lines(),
            sh_quote(real_kube_proxy)?
        );
        std::fs::write(&kube_proxy, script).with_context(|| format!("writing {}", kube_proxy.display()))?;
        std::fs::set_permissions(&kube_proxy, std::fs::Permissions::from_mode(0o755))?;
        let orca_proxy = match real_orca_proxy {
            Some(real) => {
                let d = dir.join("orca");
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                let p = d.join("orca-proxy");
                let script = format!(
                    "#!/bin/sh\n# orca-bench: orca-proxy with a per-namespace xtables lock\n{}exec {} \"$@\"\n",
                    lockfile_lines(),
                    sh_quote(real)?
                );
                std::fs::write(&p, script).with_context(|| format!("writing {}", p.display()))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
                Some(p)
            }
            None => None,
        };
        Ok(LegacyShim {
            dir,
            kube_proxy,
            orca_proxy,
        })
    }
}

impl Drop for LegacyShim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Ok(rd) = std::fs::read_dir("/run") {
            for e in rd.flatten() {
                let p = e.path();
                if p.to_str()
                    .is_some_and(|s| s.starts_with(LOCK_PREFIX) && s.ends_with(".lock"))
                {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

fn check_ns(ns: &str) -> Result<()> {
    if !ns.starts_with(netns::PREFIX) {
        bail!("refusing to touch {ns}: not a sandbox namespace");
    }
    Ok(())
}

/// Mark a node namespace as a legacy-iptables node (kubelet's hint chain in the legacy mangle table).
pub fn mark_legacy(ns: &str) -> Result<()> {
    check_ns(ns)?;
    netns::exec(
        ns,
        &["iptables-legacy", "-w", "5", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    )
    .with_context(|| format!("creating the legacy hint chain in {ns}"))?;
    Ok(())
}

/// Flush every legacy IPv4 and IPv6 table of a node namespace (the sandbox's reset does IPv4 only).
pub fn flush_legacy(ns: &str) -> Result<()> {
    check_ns(ns)?;
    for (tool, names) in [
        ("iptables-legacy", "/proc/net/ip_tables_names"),
        ("ip6tables-legacy", "/proc/net/ip6_tables_names"),
    ] {
        let out = netns::exec(ns, &["cat", names]).map(|o| String::from_utf8_lossy(&o.stdout).to_string());
        for t in out.unwrap_or_default().split_whitespace() {
            let _ = netns::exec(ns, &[tool, "-w", "5", "-t", t, "-F"]);
            let _ = netns::exec(ns, &[tool, "-w", "5", "-t", t, "-X"]);
        }
    }
    Ok(())
}

/// Where the measured Service's rule is in the proxy's dispatch chain.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChainPosition {
    pub backend: String,
    pub chain: String,
    /// 1-based index of the first rule of `chain` matching the measured ClusterIP and port.
    pub index: Option<usize>,
    /// Rules in `chain`.
    pub chain_rules: usize,
    /// Rules in the whole nat table.
    pub nat_rules: usize,
}

/// Position of `-d <vip>/32 ... --dport <port>` among the `-A <chain>` rules of an `iptables-save` text.
pub fn chain_position(save: &str, chain: &str, vip: Ipv4Addr, port: u16) -> (Option<usize>, usize, usize) {
    let head = format!("-A {chain} ");
    let dst = format!("-d {vip}/32 ");
    let dport = format!("--dport {port} ");
    let (mut index, mut n, mut all) = (None, 0, 0);
    for line in save.lines() {
        if !line.starts_with("-A ") {
            continue;
        }
        all += 1;
        if let Some(rest) = line.strip_prefix(&head) {
            n += 1;
            let rest = format!("{rest} ");
            if index.is_none() && rest.contains(&dst) && rest.contains(&dport) {
                index = Some(n);
            }
        }
    }
    (index, n, all)
}

/// `iptables-<backend>-save -t nat` in `ns` and the measured Service's position in `chain`.
pub fn position(ns: &str, backend: Backend, chain: &str, vip: Ipv4Addr, port: u16) -> Result<ChainPosition> {
    check_ns(ns)?;
    let out = netns::exec(ns, &[backend.save_tool(), "-t", "nat"])
        .with_context(|| format!("{} -t nat in {ns}", backend.save_tool()))?;
    let save = String::from_utf8_lossy(&out.stdout);
    let (index, chain_rules, nat_rules) = chain_position(&save, chain, vip, port);
    Ok(ChainPosition {
        backend: backend.name().into(),
        chain: chain.into(),
        index,
        chain_rules,
        nat_rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice() {
        assert_eq!(Backend::choose(BackendChoice::Auto, 1000), Backend::Nft);
        assert_eq!(Backend::choose(BackendChoice::Auto, 10_000), Backend::Legacy);
        assert_eq!(Backend::choose(BackendChoice::Nft, 30_000), Backend::Nft);
        assert_eq!(Backend::choose(BackendChoice::Legacy, 1), Backend::Legacy);
    }

    #[test]
    fn position_in_chain() {
        let save = "*nat\n:KUBE-SERVICES - [0:0]\n\
            -A PREROUTING -j KUBE-SERVICES\n\
            -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A\n\
            -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 8080 -j KUBE-SVC-B\n\
            -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-C\n\
            -A KUBE-SVC-C -j KUBE-SEP-X\n\
            COMMIT\n";
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(chain_position(save, "KUBE-SERVICES", vip, 80), (Some(3), 3, 5));
        assert_eq!(chain_position(save, "KUBE-SERVICES", vip, 81), (None, 3, 5));
        assert_eq!(chain_position(save, "ORCA-SERVICES", vip, 80), (None, 0, 5));
    }

    #[test]
    fn shim_scripts() {
        let Ok(shim) = LegacyShim::create(Path::new("/bin/true"), Some(Path::new("/bin/true"))) else {
            return; // no iptables-legacy on this machine
        };
        let kp = std::fs::read_to_string(&shim.kube_proxy).unwrap();
        assert!(
            kp.contains("XTABLES_LOCKFILE=/run/orca-bench-xtables-$ns.lock") && kp.contains("exec '/bin/true' \"$@\""),
            "{kp}"
        );
        let op = shim.orca_proxy.clone().unwrap();
        assert_eq!(op.file_name().unwrap(), "orca-proxy");
        for script in [&shim.kube_proxy, &op] {
            let st = std::process::Command::new("sh").arg("-n").arg(script).status().unwrap();
            assert!(st.success(), "{}", script.display());
            // Outside a named namespace the wrapper still runs the program.
            let st = std::process::Command::new(script).status().unwrap();
            assert!(st.success(), "{}", script.display());
        }
        let ipt = shim.dir.join("bin/iptables");
        assert!(std::fs::read_link(&ipt).unwrap().to_string_lossy().contains("legacy"));
        let dir = shim.dir.clone();
        drop(shim);
        assert!(!dir.exists());
    }

    #[test]
    fn refuses_foreign_namespaces() {
        assert!(mark_legacy("default").is_err());
        assert!(flush_legacy("").is_err());
        assert!(position("host", Backend::Nft, "X", Ipv4Addr::LOCALHOST, 1).is_err());
    }
}
