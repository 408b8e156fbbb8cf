//! Load-time settings: read-only globals that the agent sets when it loads the programs
//! (`EbpfLoader::set_global`), so the verifier knows them as constants (a mode's dead branches are pruned before
//! they cost a thing). The values below are the defaults of a program loaded without them.

use orca_common::{CtTimeouts, NatPorts};

#[unsafe(no_mangle)]
static ORCA_CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;

/// 1024-65535 without Linux's default ephemeral range 32768-60999.
#[unsafe(no_mangle)]
static ORCA_NAT_PORTS: NatPorts = NatPorts {
    lo: 1024,
    span: 65_535 - 1024 + 1 - (60_999 - 32_768 + 1),
    hole_start: 32_768,
    hole_len: 60_999 - 32_768 + 1,
};

#[unsafe(no_mangle)]
static ORCA_BYPASS_NETFILTER: u32 = 0;

// The reads are volatile: the statics are immutable to the compiler, which would otherwise fold their initial
// values into the code and ignore what the agent wrote.

/// Conntrack lifetimes per state.
#[inline(always)]
pub fn timeouts() -> CtTimeouts {
    // SAFETY: reading a static.
    unsafe { core::ptr::read_volatile(&ORCA_CT_TIMEOUTS) }
}

/// The masquerade source ports.
#[inline(always)]
pub fn nat_ports() -> NatPorts {
    // SAFETY: reading a static.
    unsafe { core::ptr::read_volatile(&ORCA_NAT_PORTS) }
}

/// Translated packets are forwarded by the programs, bypassing the node's routing and netfilter (see `fwd`).
#[inline(always)]
pub fn bypass_netfilter() -> bool {
    // SAFETY: reading a static.
    unsafe { core::ptr::read_volatile(&ORCA_BYPASS_NETFILTER) != 0 }
}
