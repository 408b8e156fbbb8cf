//! Counters of why packets were dropped, or left untranslated although they looked like Service traffic
//! (`REASON_*` in orca-common): a per-CPU array the agent sums into `orca_datapath_drops_total{reason}` and
//! `orca_datapath_untranslated_total{reason}`. Only the exceptional paths count; the fast paths do not pay.

use aya_ebpf::bindings::TC_ACT_SHOT;

use crate::maps;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(p) = maps::STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *p += 1 };
    }
}

/// Counts `reason` and drops the packet.
#[inline(always)]
pub fn drop(reason: u32) -> i32 {
    count(reason);
    TC_ACT_SHOT
}
