//! The datapath's own voice in the agent's log: one aya-log event per rare
//! drop (the reasons `lb_common::drop_log::logged` names: a broken
//! invariant, a failed encapsulation or redirect, a NAT VIP out of ports,
//! a too-big answer that could not be sent), never on a forwarding path.
//!
//! A drop path writes its packet's flow and backend into this CPU's
//! `LOG_NOTE` slot ([`dropped`]); the entry point, once the drop is counted
//! (and traced), tail-calls `lb_drop_log` ([`after`]), which formats the
//! event ([`emit`]). A program of its own: aya-log's formatting needs a
//! stack frame that the balancer's 464 bytes leave no room for (as a
//! called function the verifier refused "combined stack size 624"), and
//! the balancer carries none of its code. It sends at most
//! `drop_log::PER_SECOND` events per second per reason on each CPU and
//! counts the rest, whose number rides on the next event sent
//! (`suppressed`), so a flood of bad packets costs a counter bump each and
//! cannot flood the log. The message format is `lb_common::drop_log`'s.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use aya_log_ebpf::warn;
use lb_common::{AF_INET, FlowKey, drop_log, verdict};

use crate::{
    maps::{LOG_JUMP, LOG_LIMIT, LOG_NOTE},
    parse::Packet,
};

/// Notes the drop of `pkt` for `reason` (backend `backend_id`, 0 = none
/// chosen) for the log, and answers the verdict: (reason, `XDP_DROP`).
#[inline(always)]
pub(crate) fn dropped(pkt: &Packet, reason: u32, backend_id: u32) -> (u32, u32) {
    dropped_flow(&pkt.key, pkt.family, reason, backend_id)
}

/// [`dropped`] for a flow known by its key and family alone (the
/// established path, which builds no `Packet`).
#[inline(always)]
pub(crate) fn dropped_flow(key: &FlowKey, family: u8, reason: u32, backend_id: u32) -> (u32, u32) {
    if let Some(n) = LOG_NOTE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, ours while the program runs.
        unsafe {
            (*n).key = *key;
            (*n).family = family;
            (*n).backend_id = backend_id;
            (*n).reason = reason as u8;
            (*n).pending = 1;
        }
    }
    (reason, xdp_action::XDP_DROP)
}

/// At an entry point, after the verdict is counted: a logged drop goes on
/// to `lb_drop_log`, which logs it and drops the packet. Returns only when
/// it does not (another reason, or no log program installed).
#[inline(always)]
pub(crate) fn after(ctx: &XdpContext, reason: u32) {
    if drop_log::logged(reason) {
        // SAFETY: tail call into a program of the same type; an empty slot
        // falls through.
        unsafe { LOG_JUMP.tail_call(ctx, 0) };
    }
}

const NS_PER_S: u64 = 1_000_000_000;

/// Sends the event this CPU's `LOG_NOTE` holds, unless this CPU already
/// sent `drop_log::PER_SECOND` of its reason in the current second (then
/// it is counted). Returns the XDP action of a logged drop.
#[inline(always)]
pub(crate) fn emit() -> u32 {
    let Some(n) = LOG_NOTE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: this CPU's slot, ours while the program runs.
    let (pending, reason) = unsafe { ((*n).pending, u32::from((*n).reason)) };
    if pending == 0 || reason >= verdict::COUNT {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: as above.
    unsafe { (*n).pending = 0 };
    let Some(lim) = LOG_LIMIT.get_ptr_mut(reason) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a plain helper call; the coarse clock is enough for a window
    // of a second.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: this CPU's slots, ours while the program runs.
    let suppressed = unsafe {
        if (*lim).window_ns == 0 || now.wrapping_sub((*lim).window_ns) >= NS_PER_S {
            (*lim).window_ns = now;
            (*lim).sent = 0;
        }
        if (*lim).sent >= drop_log::PER_SECOND {
            (*lim).suppressed += 1;
            return xdp_action::XDP_DROP;
        }
        (*lim).sent += 1;
        let s = (*lim).suppressed;
        (*lim).suppressed = 0;
        s
    };
    // SAFETY: as above.
    let n = unsafe { &*n };
    let k = &n.key;
    if n.family == AF_INET {
        let src = [k.src[0], k.src[1], k.src[2], k.src[3]];
        let dst = [k.dst[0], k.dst[1], k.dst[2], k.dst[3]];
        warn!(
            &(),
            "drop reason={} client={:i}:{} dst={:i}:{} proto={} backend_id={} suppressed={}",
            reason,
            src,
            k.sport,
            dst,
            k.dport,
            k.proto,
            n.backend_id,
            suppressed
        );
    } else {
        warn!(
            &(),
            "drop reason={} client=[{:i}]:{} dst=[{:i}]:{} proto={} backend_id={} suppressed={}",
            reason,
            k.src,
            k.sport,
            k.dst,
            k.dport,
            k.proto,
            n.backend_id,
            suppressed
        );
    }
    xdp_action::XDP_DROP
}
