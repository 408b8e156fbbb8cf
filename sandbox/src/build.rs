//! Builds the control-plane binaries from the pinned Go modules in `sandbox/k8s/` (Kubernetes) and
//! `sandbox/k8s/etcd/` (etcd), one at a time, into `<repo>/.cache/k8s/bin/`.
//!
//! A stamp file (`.cache/k8s/bin/.stamp`) records a hash of everything that decides the output (go.mod, go.sum,
//! the build flags, `go version`); when it matches and every binary is there, [`ensure_k8s_binaries`] returns at
//! once. The Go build cache (default `GOCACHE`) makes a rebuild after a stamp change fast too.
//!
//! `GOTOOLCHAIN=local`: k8s.io/kubernetes v1.37.2 declares `go 1.26.0`, the machine's Go 1.26.x builds it.
//! `ORCA_K8S_BIN_DIR` points at a directory of prebuilt binaries instead (no build, no stamp check).
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The pinned Kubernetes release (must match `sandbox/k8s/go.mod`).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// One binary: its file name, the Go module directory (relative to `sandbox/k8s`) and the main package.
struct Target {
    name: &'static str,
    module_dir: &'static str,
    package: &'static str,
    k8s_version_ldflags: bool,
}

const TARGETS: &[Target] = &[
    Target {
        name: "etcd",
        module_dir: "etcd",
        package: "go.etcd.io/etcd/server/v3",
        k8s_version_ldflags: false,
    },
    Target {
        name: "kube-apiserver",
        module_dir: ".",
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
        k8s_version_ldflags: true,
    },
    Target {
        name: "kube-controller-manager",
        module_dir: ".",
        package: "k8s.io/kubernetes/cmd/kube-controller-manager",
        k8s_version_ldflags: true,
    },
    Target {
        name: "kube-proxy",
        module_dir: ".",
        package: "k8s.io/kubernetes/cmd/kube-proxy",
        k8s_version_ldflags: true,
    },
];

/// Names of the binaries [`ensure_k8s_binaries`] provides.
pub fn binary_names() -> impl Iterator<Item = &'static str> {
    TARGETS.iter().map(|t| t.name)
}

/// The Go module directory `sandbox/k8s`.
pub fn go_module_dir() -> PathBuf {
    crate::repo_root().join("sandbox").join("k8s")
}

/// Where the binaries live: `ORCA_K8S_BIN_DIR` if set, else `<repo>/.cache/k8s/bin`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("ORCA_K8S_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => crate::cache_dir().join("k8s").join("bin"),
    }
}

/// True when every binary is present in [`bin_dir`] (without building or checking the stamp).
pub fn binaries_present() -> bool {
    let dir = bin_dir();
    TARGETS.iter().all(|t| dir.join(t.name).is_file())
}

fn ldflags(t: &Target) -> String {
    let mut f = String::from("-s -w");
    if t.k8s_version_ldflags {
        let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
        for (k, v) in [
            ("gitVersion", KUBERNETES_VERSION),
            ("gitMajor", "1"),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            f.push_str(&format!(" -X k8s.io/component-base/version.{k}={v}"));
        }
    }
    f
}

fn go_command(dir: &Path) -> Command {
    let mut c = Command::new("go");
    c.current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-buildvcs=false");
    c
}

/// FNV-1a 64: a stable hash for the stamp (std's hasher is not stable across Rust releases).
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn stamp_value() -> Result<String> {
    let root = go_module_dir();
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for f in ["go.mod", "go.sum", "etcd/go.mod", "etcd/go.sum"] {
        let p = root.join(f);
        let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        h = fnv1a(h, f.as_bytes());
        h = fnv1a(h, &data);
    }
    for t in TARGETS {
        h = fnv1a(h, t.name.as_bytes());
        h = fnv1a(h, t.package.as_bytes());
        h = fnv1a(h, ldflags(t).as_bytes());
    }
    let out = go_command(&root)
        .arg("version")
        .output()
        .context("running `go version` (is Go installed? `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!("`go version` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    h = fnv1a(h, version.as_bytes());
    Ok(format!("{h:016x} {version} kubernetes {KUBERNETES_VERSION}\n"))
}

/// Make sure etcd, kube-apiserver, kube-controller-manager and kube-proxy are built, and return their directory.
///
/// The first build compiles Kubernetes from source (tens of minutes on 2 cores, progress on stderr); after that
/// it returns in well under a second while `sandbox/k8s/go.{mod,sum}` and the Go version are unchanged.
pub fn ensure_k8s_binaries() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ORCA_K8S_BIN_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(d);
        for t in TARGETS {
            if !dir.join(t.name).is_file() {
                bail!("ORCA_K8S_BIN_DIR={} has no {} binary", dir.display(), t.name);
            }
        }
        return Ok(dir);
    }
    let dir = bin_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp_path = dir.join(".stamp");
    let want = stamp_value()?;
    let have = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    if have == want && binaries_present() {
        return Ok(dir);
    }
    // The stamp goes first so that an interrupted build is not mistaken for a finished one.
    let _ = std::fs::remove_file(&stamp_path);
    let total = Instant::now();
    for (i, t) in TARGETS.iter().enumerate() {
        let started = Instant::now();
        eprintln!(
            "[orca-sandbox] building {} ({}/{}) from {} ... (the first build compiles from source and takes a while)",
            t.name,
            i + 1,
            TARGETS.len(),
            t.package
        );
        let out = dir.join(t.name);
        let tmp = dir.join(format!(".{}.{}.tmp", t.name, std::process::id()));
        let status = go_command(&go_module_dir().join(t.module_dir))
            .args(["build", "-trimpath", "-ldflags"])
            .arg(ldflags(t))
            .arg("-o")
            .arg(&tmp)
            .arg(t.package)
            .status()
            .with_context(|| format!("running go build for {}", t.name))?;
        if !status.success() {
            let _ = std::fs::remove_file(&tmp);
            bail!("go build of {} failed ({status})", t.package);
        }
        std::fs::rename(&tmp, &out).with_context(|| format!("moving {} into place", out.display()))?;
        eprintln!(
            "[orca-sandbox] built {} in {:.1}s",
            t.name,
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::write(&stamp_path, &want).with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!(
        "[orca-sandbox] control-plane binaries ready in {} ({:.1}s)",
        dir.display(),
        total.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// Path of one binary in [`bin_dir`].
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_input_sensitive() {
        let a = fnv1a(0xcbf2_9ce4_8422_2325, b"go.mod");
        assert_eq!(a, fnv1a(0xcbf2_9ce4_8422_2325, b"go.mod"));
        assert_ne!(a, fnv1a(0xcbf2_9ce4_8422_2325, b"go.sum"));
        // Known FNV-1a 64 test vector: "a" -> af63dc4c8601ec8c.
        assert_eq!(fnv1a(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn k8s_ldflags_carry_the_release() {
        let f = ldflags(&TARGETS[1]);
        assert!(f.contains("gitVersion=v1.37.2"), "{f}");
        assert!(f.contains("gitMinor=37"), "{f}");
        assert_eq!(ldflags(&TARGETS[0]), "-s -w");
    }
}
