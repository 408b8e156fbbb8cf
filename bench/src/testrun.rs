//! Measuring TC program cost with BPF_PROG_TEST_RUN, honestly.
//!
//! The kernel runs a test-run `repeat` times on the *same* skb without restoring it, so after the
//! first run of a translating program every repeat sees the already translated packet (which is no
//! longer addressed to a frontend) and measures the pass-through path instead. The established-flow
//! path is therefore measured one run per syscall (`repeat` = 1), and the harness's own cost per run
//! (skb set-up, dispatch, timing) is measured the same way with an empty program and subtracted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// A loaded two-instruction TC program (`r0 = TC_ACT_OK; exit`): the floor of a test run.
pub struct EmptyProgram(OwnedFd);

impl EmptyProgram {
    pub fn load() -> Result<Self> {
        // mov64 r0, 0 ; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, then zeros.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
        attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: attr is a valid, zero-padded bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len() as u32) };
        if fd < 0 {
            bail!(
                "BPF_PROG_LOAD of the empty program: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Nanoseconds per run, as the kernel reports them, of `repeat` runs on `frame`.
    pub fn run(&self, frame: &[u8], repeat: u32) -> Result<u32> {
        let mut out = vec![0u8; frame.len() + 256];
        // test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration, ...
        let mut t = [0u8; 128];
        t[0..4].copy_from_slice(&(self.0.as_raw_fd() as u32).to_ne_bytes());
        t[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        t[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
        t[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
        t[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
        t[32..36].copy_from_slice(&repeat.to_ne_bytes());
        // SAFETY: t is a valid bpf_attr for BPF_PROG_TEST_RUN; its buffers outlive the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, t.as_mut_ptr(), t.len() as u32) };
        if r < 0 {
            bail!(
                "BPF_PROG_TEST_RUN of the empty program: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(u32::from_ne_bytes([t[36], t[37], t[38], t[39]]))
    }
}

/// Median of `samples` single runs of `prog` (ns per run as the kernel reports them) and the program's verdict,
/// with the frame of sample `i` from `frame(i)` (e.g. a new 5-tuple for every sample), as if it arrived on interface
/// `ifindex` (0: the namespace's loopback).
pub fn median_single_runs_with(
    prog: &SchedClassifier,
    samples: usize,
    ifindex: u32,
    mut frame: impl FnMut(usize) -> Vec<u8>,
) -> Result<(f64, u32)> {
    // struct __sk_buff up to `ifindex` (offset 40); everything else zero.
    let mut skb_ctx = [0u8; 44];
    skb_ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut v = Vec::with_capacity(samples);
    let mut verdict = 0;
    for i in 0..samples.max(1) {
        let f = frame(i);
        let mut out = vec![0u8; f.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&f),
            data_out: Some(&mut out),
            ctx_in: (ifindex != 0).then_some(&skb_ctx[..]),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        verdict = r.return_value;
        v.push(r.duration.as_nanos() as f64);
    }
    Ok((median(&mut v), verdict))
}

/// Median of `samples` single runs of the empty program on `frame`.
pub fn median_empty_runs(empty: &EmptyProgram, frame: &[u8], samples: usize) -> Result<f64> {
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        v.push(f64::from(empty.run(frame, 1)?));
    }
    Ok(median(&mut v))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
