//! The connection table's companions: the flood guard that decides whether
//! a new flow may be recorded, and the clock idle timeouts use.
//!
//! Both read `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE: the
//! monotonic clock as of the last tick, at most one tick behind), not
//! `bpf_ktime_get_ns`, which reads the clock source: on this VM kind that
//! measured 4-5x the swap-MACs floor per call, the coarse one well under
//! one (BENCHMARKS.md, "What a packet costs"). Windows of a second and
//! timeouts in seconds do not need better than a tick.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;

use crate::maps::{FLOOD_GUARD, FLOOD_STATE};

/// Whether this new flow may be written to the connection table. Above the
/// configured new flows per second on this CPU (a SYN flood), new flows are
/// forwarded statelessly, by the consistent hash, so a flood cannot evict
/// established flows from the table; each one is counted.
///
/// The clock is read only where it decides: when this CPU's count since
/// its window began passes the limit. A window that began a second or more
/// ago starts again there (the flow is recorded, the count is 1); a younger
/// one refuses. So a window records at most `limit` flows and lasts at least
/// a second (a flood's first second can record up to twice the limit: the
/// count it found, then a new window's), and a CPU under the limit never
/// reads the clock (`bpf_ktime_get_coarse_ns` is about half a swap-MACs
/// floor here: BENCHMARKS.md's cost rows).
#[inline(always)]
pub(crate) fn may_record_flow() -> bool {
    let limit = match FLOOD_GUARD.get(0) {
        Some(g) if g.new_flows_per_cpu_s != 0 => g.new_flows_per_cpu_s as u64,
        _ => return true,
    };
    let Some(st) = FLOOD_STATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe {
        (*st).count += 1;
        if (*st).count <= limit {
            return true;
        }
        // SAFETY: plain helper call without arguments.
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub((*st).window_start_ns) >= 1_000_000_000 {
            (*st).window_start_ns = now;
            (*st).count = 1;
            true
        } else {
            (*st).unrecorded += 1;
            false
        }
    }
}

#[inline(always)]
pub(crate) fn now_s() -> u32 {
    // SAFETY: plain helper call without arguments.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    (ns / 1_000_000_000) as u32
}
