//! Builds the eBPF programs (`proxy-ebpf`) with the pinned nightly and bpf-linker through
//! aya-build, so one `cargo build` yields an agent with its programs embedded
//! (see `src/ebpf_obj.rs`). `cargo xtask setup` installs the toolchain this needs.
//!
//! The nightly is named once, in `xtask/src/setup.rs` (`pub const NIGHTLY`); this script reads it
//! from there. `ORCA_EBPF_TOOLCHAIN` overrides it; `AYA_BUILD_SKIP=1` skips the eBPF build (the
//! agent then embeds an empty object and can only run the iptables dataplane).

use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

const EBPF_PACKAGE: &str = "proxy-ebpf";
const EBPF_BINARY: &str = "orca-ebpf";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("proxy/ has no parent directory")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let setup_rs = root.join("xtask/src/setup.rs");
    println!("cargo:rerun-if-changed={}", setup_rs.display());
    println!("cargo:rerun-if-env-changed=ORCA_EBPF_TOOLCHAIN");
    // The programs include the shared map types.
    println!("cargo:rerun-if-changed={}", root.join("common").display());

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let object = out_dir.join(EBPF_BINARY);
    if skip {
        // aya-build prints the warning; leave an empty object so the crate still compiles.
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, b"")?;
        return Ok(());
    }

    let toolchain = match env::var("ORCA_EBPF_TOOLCHAIN") {
        Ok(t) if !t.is_empty() => t,
        _ => pinned_nightly(&setup_rs)?,
    };
    // Rebuild when bpf-linker is replaced (`cargo xtask setup` after a nightly bump).
    if let Some(linker) = find_in_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    } else {
        bail!("bpf-linker not found in PATH: run `cargo xtask setup` (it installs {toolchain} and bpf-linker)");
    }

    let ebpf_dir = root.join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // aya-build forwards every stderr line of the nested cargo as a cargo warning; keep it to
    // real diagnostics. The build script is single-threaded, so changing its environment is sound.
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!("building {EBPF_PACKAGE} with {toolchain} failed (is it installed? run `cargo xtask setup`)")
    })?;
    if !object.exists() {
        bail!("aya-build did not produce {}", object.display());
    }
    Ok(())
}

/// Reads `pub const NIGHTLY: &str = "...";` from xtask/src/setup.rs.
fn pinned_nightly(setup_rs: &std::path::Path) -> Result<String> {
    let text = fs::read_to_string(setup_rs)
        .with_context(|| format!("reading {} for the pinned nightly", setup_rs.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("pub const NIGHTLY: &str = \""))
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .with_context(|| format!("no `pub const NIGHTLY: &str = \"...\";` in {}", setup_rs.display()))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
