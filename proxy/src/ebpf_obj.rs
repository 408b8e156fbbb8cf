//! The eBPF object built by `build.rs` from `proxy-ebpf/`, embedded in the agent.

/// The ELF object holding Orca's TC programs and maps, aligned for aya's parser. Empty when the
/// crate was built with `AYA_BUILD_SKIP=1`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/orca-ebpf"));

/// Whether this build embeds the eBPF programs.
pub fn available() -> bool {
    !OBJECT.is_empty()
}
