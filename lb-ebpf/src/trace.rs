//! `lb trace`: when the CLI has set a filter in `TRACE_CFG`, every parsed
//! packet that matches it leaves a [`TraceRecord`] in the `TRACE` ring
//! buffer: the VIP matched (or none), what the connection table said, the
//! ring and hash a new flow was scheduled with, the backend, the rewrite and
//! the verdict. Only packets whose destination passes the VIP-address filter
//! are traced (a port that is not a VIP on a VIP's address is; another
//! host's traffic is not looked at). Off (`owner_pid == 0`) it costs those
//! packets one array read: the balancer is generic over [`Observe`], the
//! untraced copy observes through [`Quiet`] (which compiles to nothing), and
//! the traced copy is a program of its own (`lb_xdp_traced`) that `lb_xdp`
//! tail-calls while a filter is set.
//!
//! A ring buffer rather than aya-log: records are fixed structures that the
//! CLI prints as text or JSON and resolves against the agent's backend ids,
//! and the filter is per VIP and client, not a global log level.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{FlowKey, TraceCfg, TraceRecord, trace_ring, trace_table};

use crate::{
    maps::{SeenData, TRACE, TRACE_CFG, TRACE_SCRATCH},
    sched::Ring,
};

/// [`SeenData`] in this CPU's scratch slot.
pub struct Seen(pub &'static mut SeenData);

impl Seen {
    /// This CPU's slot, reset; `None` cannot happen (index 0 of a per-CPU
    /// array always exists).
    #[inline(always)]
    pub fn new() -> Option<Self> {
        let p = TRACE_SCRATCH.get_ptr_mut(0)?;
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        let d = unsafe { &mut *p };
        *d = SeenData {
            family: 0,
            vip_id: u32::MAX,
            backend_id: 0,
            ring_id: 0,
            ring_size: 0,
            hash: 0,
            table: trace_table::NOT_USED,
            ring: trace_ring::NONE,
            scheduler: 0,
            ipip: 0,
            second_hop_id: 0,
        };
        Some(Seen(d))
    }

    #[inline(always)]
    pub fn data(&self) -> &SeenData {
        self.0
    }
}

/// What the balancer reports as it decides; [`Quiet`] compiles to nothing.
pub trait Observe {
    fn vip(&mut self, id: u32, scheduler: u8);
    fn table(&mut self, t: u8);
    fn ring(&mut self, which: u8, ring: &Ring, hash: u32);
    fn backend(&mut self, id: u32);
    /// Encapsulated: IPIP, or GUE (`gue`).
    fn ipip(&mut self, gue: bool);
    /// The second chance's second hop, named in the GUE header.
    fn second_hop(&mut self, id: u32);
}

/// The untraced balancer.
pub struct Quiet;

impl Observe for Quiet {
    #[inline(always)]
    fn vip(&mut self, _: u32, _: u8) {}
    #[inline(always)]
    fn table(&mut self, _: u8) {}
    #[inline(always)]
    fn ring(&mut self, _: u8, _: &Ring, _: u32) {}
    #[inline(always)]
    fn backend(&mut self, _: u32) {}
    #[inline(always)]
    fn ipip(&mut self, _gue: bool) {}
    #[inline(always)]
    fn second_hop(&mut self, _: u32) {}
}

impl Observe for Seen {
    #[inline(always)]
    fn vip(&mut self, id: u32, scheduler: u8) {
        self.0.vip_id = id;
        self.0.scheduler = scheduler;
    }
    #[inline(always)]
    fn table(&mut self, t: u8) {
        self.0.table = t;
    }
    #[inline(always)]
    fn ring(&mut self, which: u8, ring: &Ring, hash: u32) {
        self.0.ring = which;
        self.0.ring_id = ring.id;
        self.0.ring_size = ring.size;
        self.0.hash = hash;
    }
    #[inline(always)]
    fn backend(&mut self, id: u32) {
        self.0.backend_id = id;
    }
    #[inline(always)]
    fn ipip(&mut self, gue: bool) {
        self.0.ipip = if gue { 2 } else { 1 };
    }
    #[inline(always)]
    fn second_hop(&mut self, id: u32) {
        self.0.second_hop_id = id;
    }
}

/// The filter when tracing is on.
#[inline(always)]
pub fn filter() -> Option<&'static TraceCfg> {
    let c = TRACE_CFG.get(0)?;
    (c.owner_pid != 0).then_some(c)
}

#[inline(always)]
fn prefix_eq(a: &[u8; 16], b: &[u8; 16], bits: u32) -> bool {
    let mut i = 0;
    while i < 16 {
        let from = i as u32 * 8;
        if bits <= from {
            break;
        }
        let have = bits - from;
        let mask: u8 = if have >= 8 {
            0xff
        } else {
            0xffu8 << (8 - have)
        };
        if (a[i] ^ b[i]) & mask != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn matches(c: &TraceCfg, k: &FlowKey, family: u8) -> bool {
    (c.family == 0 || c.family == family)
        && (c.proto == 0 || c.proto == k.proto)
        && (c.dport == 0 || c.dport == k.dport)
        && (c.sport == 0 || c.sport == k.sport)
        && prefix_eq(&c.dst, &k.dst, c.dst_len)
        && prefix_eq(&c.src, &k.src, c.src_len)
}

/// Records the packet (its 5-tuple `key`) if it matches the filter;
/// `verdict` is `reason << 8 | action`. A full ring buffer drops the record
/// (the CLI reads faster than an operator can). Not inlined: the verifier
/// would walk it once per exit of the balancer (past its budget). Its
/// arguments are the key, already in memory for the table lookup, and
/// small values, so the packet's other fields stay in registers.
#[inline(never)]
pub fn emit(c: &TraceCfg, key: &FlowKey, seen: &SeenData, verdict: u32) {
    if !matches(c, key, seen.family) {
        return;
    }
    let (reason, action) = (verdict >> 8, verdict & 0xff);
    let Some(mut e) = TRACE.reserve::<TraceRecord>(0) else {
        return;
    };
    let r = e.as_mut_ptr();
    // SAFETY: `r` points at a reserved record of the right size; every
    // field is written before submit.
    unsafe {
        (*r).ts_ns = bpf_ktime_get_ns();
        (*r).key = *key;
        (*r).vip_id = seen.vip_id;
        (*r).backend_id = seen.backend_id;
        (*r).ring_id = seen.ring_id;
        (*r).ring_size = seen.ring_size;
        (*r).hash = seen.hash;
        (*r).verdict = reason as u8;
        (*r).action = action as u8;
        (*r).table = seen.table;
        (*r).ring = seen.ring;
        (*r).scheduler = seen.scheduler;
        (*r).ipip = seen.ipip;
        (*r)._pad = [0; 2];
        (*r).second_hop_id = seen.second_hop_id;
    }
    e.submit(0);
}
