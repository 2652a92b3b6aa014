//! Counters. Every verdict the balancer returns goes through [`verdict`], so
//! the per-reason counters sum to the packets seen.

use lb_common::Traffic;

use crate::maps::{BACKEND_STATS, DECAP_VERDICTS, VERDICTS, VIP_STATS};

/// Counts one packet under `reason` and returns `action` unchanged.
#[inline(always)]
pub fn verdict(reason: u32, action: u32) -> u32 {
    if let Some(c) = VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    action
}

/// The decap program's counterpart of [`verdict`].
#[inline(always)]
pub fn decap_verdict(reason: u32, action: u32) -> u32 {
    if let Some(c) = DECAP_VERDICTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
    action
}

#[inline(always)]
fn add(t: Option<*mut Traffic>, bytes: u64, new_flow: bool) {
    if let Some(t) = t {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
            if new_flow {
                (*t).new_flows += 1;
            }
        }
    }
}

/// Counts a forwarded packet against its VIP and its backend.
#[inline(always)]
pub fn traffic(vip_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(VIP_STATS.get_ptr_mut(vip_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}
