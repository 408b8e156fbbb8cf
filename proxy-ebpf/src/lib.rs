//! Pure, helper-free pieces of Orca's eBPF programs: header layouts and checksum arithmetic.
//! They are plain Rust, so the host runs their unit tests (`cargo test -p proxy-ebpf --lib`) and
//! the programs in `main.rs` use the very same code.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod hdr;
