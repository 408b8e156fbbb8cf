//! Types shared between the Orca agent (user space) and its eBPF programs (kernel space).
#![no_std]
