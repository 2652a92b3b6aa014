//! The XDP datapath.
//!
//! `lb_xdp` is the balancer: parse → VIP lookup → connection table or Maglev
//! ring → rewrite (L2 DSR or IPIP) → `XDP_TX` / `XDP_REDIRECT`. Everything not
//! addressed to a VIP passes to the kernel untouched. `lb_decap` runs on
//! backends and strips the IPIP/IP6IP6 header the balancer added. `lb_pass`
//! is the trivial program the lab attaches to veth peers (native `XDP_TX` on a
//! veth needs one there), and `floor_drop` / `floor_tx` are the floors the
//! micro-benchmark compares against.
//!
//! Modules: `parse` (offsets), `maps`, `stats` (counters), `forward` (header
//! rewrites), `csum`.
#![no_std]
#![no_main]
// `core::sync::atomic` offers no fetch_add on the BPF target; the intrinsic
// lowers to BPF's atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod csum;
mod forward;
mod loadgen;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams, helpers::generated::bpf_fib_lookup, maps::lpm_trie::Key,
};
use lb_common::{
    BACKEND_DOWN, Backend, FLOW_F_COUNTED, Flow, LC_EXACT_MAX, PROTO_TCP, RegionKey,
    SCHED_LEAST_CONN, SCHED_ROUND_ROBIN, SETTINGS_F_FIB, VIP_F_HASH_SRC_IP, VIP_F_IPIP,
    VIP_F_NO_FLOW_TABLE, VIP_F_REGIONS, VipKey, VipMeta, decap_verdict, hash, ring_base, verdict,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{
        ACTIVE, BACKENDS, DECAP_ADDRS, FIB_SCRATCH, FLOOD_GUARD, FLOOD_STATE, FLOWS, REGIONS,
        RINGS, RR_POS, SETTINGS, TX_PORTS, VIP_ADDRS, VIP_FILTER, VIPS,
    },
    parse::{Packet, Skip},
    stats::{decap_verdict, verdict},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(()) => verdict(verdict::MALFORMED, xdp_action::XDP_PASS),
    }
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) => action,
        Err(()) => decap_verdict(decap_verdict::MALFORMED, xdp_action::XDP_PASS),
    }
}

/// Traffic generator (see `loadgen`); run only through BPF_PROG_TEST_RUN.
#[xdp]
pub fn loadgen(ctx: XdpContext) -> u32 {
    loadgen::try_loadgen(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

/// Counts and drops: the receiving end of packet-rate benchmarks.
#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    loadgen::sink(&ctx)
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Swap the Ethernet addresses and bounce: the cheapest program that reads
/// and writes the packet and sends it, the micro-benchmark's floor.
#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    let Ok(eth) = parse::ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let d = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = d;
    }
    xdp_action::XDP_TX
}

/// The VIP for this packet: exact (address, port, protocol), then the
/// every-port entry (port 0).
#[inline(always)]
fn lookup_vip(pkt: &Packet) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.family,
    };
    // SAFETY: VIP entries are only replaced whole by userspace; a torn read
    // cannot happen for the values the kernel copies out under RCU.
    if let Some(m) = unsafe { VIPS.get(&key) } {
        return Some(*m);
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&key) }.copied()
}

/// False when no VIP can live on the packet's destination address: its
/// filter bit is clear (one inlined array lookup, no hash-map probe).
#[inline(always)]
fn maybe_vip_addr(pkt: &Packet) -> bool {
    let (w, bit) = hash::vip_filter_slot(&pkt.key.dst);
    VIP_FILTER
        .get(w)
        .is_some_and(|word| word & (1u32 << bit) != 0)
}

/// Whether any VIP lives on this address (for fragments, which lack ports).
#[inline(always)]
fn is_vip_addr(pkt: &Packet) -> bool {
    let key = VipKey {
        addr: pkt.key.dst,
        port: 0,
        proto: 0,
        family: pkt.family,
    };
    VIP_ADDRS.get_ptr(&key).is_some()
}

#[inline(always)]
fn backend(id: u32) -> Option<&'static Backend> {
    if id == 0 {
        return None;
    }
    // A reference into the map, not a copy: the BPF stack is 512 bytes.
    let b = BACKENDS.get(id)?;
    if b.family == 0 || b.state == BACKEND_DOWN {
        return None;
    }
    Some(b)
}

/// The ring a new flow is scheduled over: the VIP's, or its client's
/// region's (longest-prefix match on the client address).
struct Ring {
    id: u32,
    half: u32,
    size: u32,
}

#[inline(always)]
fn ring_for(pkt: &Packet, vip: &VipMeta) -> Ring {
    if vip.flags & VIP_F_REGIONS != 0 {
        let key = Key::new(
            32 + 128,
            RegionKey {
                vip_id_be: vip.vip_id.to_be_bytes(),
                addr: pkt.key.src,
            },
        );
        if let Some(r) = REGIONS.get(&key) {
            return Ring {
                id: r.ring_id,
                half: r.active_half,
                size: r.ring_size,
            };
        }
    }
    vip_ring(vip)
}

#[inline(always)]
fn vip_ring(vip: &VipMeta) -> Ring {
    Ring {
        id: vip.vip_id,
        half: vip.active_half,
        size: vip.ring_size,
    }
}

#[inline(always)]
fn ring_entry(base: u32, i: u32) -> Option<(u32, &'static Backend)> {
    let id = *RINGS.get(base + i)?;
    Some((id, backend(id)?))
}

#[inline(always)]
fn active(id: u32) -> u64 {
    ACTIVE.get(id).copied().unwrap_or(0)
}

/// Adds `delta` (wrapping: u64::MAX is -1) to a backend's active flows.
#[inline(always)]
fn active_add(id: u32, delta: u64) {
    if let Some(p) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: a valid map value pointer; every CPU updates it atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Whether `a` (active flows, weight) is less loaded than `b`.
#[inline(always)]
fn less_loaded(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 * b.1 < b.0 * a.1
}

/// Least connections: the exact minimum of active/weight over small rings
/// (which list each live backend once), two hashed candidates otherwise.
#[inline(always)]
fn least_conn(base: u32, size: u32, h: u32) -> Option<(u32, &'static Backend)> {
    let load = |id: u32, b: &Backend| (active(id), (b.weight as u64).max(1));
    if size <= LC_EXACT_MAX {
        let best_id = lc_scan(base, size, h);
        let best = backend(best_id).map(|b| (best_id, b));
        return best;
    }
    let a = ring_entry(base, h % size);
    let b = ring_entry(base, (h.rotate_left(16) ^ 0x9e37_79b9) % size);
    match (a, b) {
        (Some(x), Some(y)) => Some(if less_loaded(load(y.0, &y.1), load(x.0, &x.1)) {
            y
        } else {
            x
        }),
        (x, y) => x.or(y),
    }
}

/// The exact least-connections scan over a small ring (at most
/// `LC_EXACT_MAX` entries). The verifier walks this unrolled scan once per
/// path into it; 16 entries exceeded its one-million-instruction budget, 8
/// fit. Returns the chosen backend id, 0 if none is live.
#[inline(always)]
fn lc_scan(base: u32, size: u32, h: u32) -> u32 {
    // Scalars only (no Option of a pointer) keep the verifier's state
    // count small over the unrolled scan.
    let mut best_id = 0u32;
    let mut best_a = 0u64;
    let mut best_w = 1u64;
    let mut best_tie = 0u32;
    let mut i = 0;
    while i < LC_EXACT_MAX {
        if i >= size {
            break;
        }
        if let Some(id) = RINGS.get(base + i).copied()
            && let Some(b) = backend(id)
        {
            let (a, w) = (active(id), (b.weight as u64).max(1));
            // Ties between equally loaded backends go to the one whose
            // id hashes lowest with this flow: spread, not first-wins.
            let tie = (id ^ h).wrapping_mul(0x9e37_79b1);
            let better = best_id == 0
                || a * best_w < best_a * w
                || (a * best_w == best_a * w && tie < best_tie);
            if better {
                best_id = id;
                best_a = a;
                best_w = w;
                best_tie = tie;
            }
        }
        i += 1;
    }
    best_id
}

/// Picks a backend for a new flow with the VIP's scheduler.
#[inline(always)]
fn schedule(vip: &VipMeta, ring: &Ring, h: u32) -> Option<(u32, &'static Backend)> {
    if ring.size == 0 {
        return None;
    }
    let base = ring_base(ring.id, ring.half);
    match vip.scheduler {
        SCHED_ROUND_ROBIN => {
            let pos = RR_POS.get_ptr_mut(ring.id)?;
            // SAFETY: per-CPU slot.
            let p = unsafe {
                let p = *pos;
                *pos = p.wrapping_add(1);
                p
            };
            ring_entry(base, p % ring.size)
        }
        SCHED_LEAST_CONN => least_conn(base, ring.size, h),
        _ => ring_entry(base, h % ring.size),
    }
}

/// The next hop towards backend `b` from the kernel's FIB and neighbour
/// table (`bpf_fib_lookup`), or `None` when the kernel cannot say yet (no
/// route, neighbour unresolved). The parameter block lives in a per-CPU
/// scratch map: at 64 bytes it does not fit the 512-byte stack next to the
/// rest of the balancer.
#[inline(always)]
fn fib_next_hop(ctx: &XdpContext, pkt: &Packet, b: &Backend) -> Option<forward::Hop> {
    let p = FIB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value of the right type, exclusively ours while
    // this program runs on this CPU; the helper reads and writes only it.
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        (*p).ifindex = ctx.ingress_ifindex() as u32;
        (*p).__bindgen_anon_1.tot_len = pkt.ip_len;
        if b.family == lb_common::AF_INET {
            (*p).family = 2; // AF_INET
            (*p).__bindgen_anon_4.ipv4_dst =
                u32::from_ne_bytes([b.addr[0], b.addr[1], b.addr[2], b.addr[3]]);
        } else {
            (*p).family = 10; // AF_INET6
            let a = &b.addr;
            (*p).__bindgen_anon_4.ipv6_dst = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        }
        let rc = bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        );
        if rc != 0 {
            return None;
        }
        Some(forward::Hop {
            dmac: (*p).dmac,
            smac: (*p).smac,
            ifindex: (*p).ifindex,
        })
    }
}

/// Whether this new flow may be written to the connection table. Above the
/// configured new flows per second on this CPU (a SYN flood), new flows are
/// forwarded statelessly, by the consistent hash, so a flood cannot evict
/// established flows from the table; each one is counted. The clock is
/// read only when a limit is set, and only for new flows.
#[inline(always)]
fn may_record_flow() -> bool {
    let limit = match FLOOD_GUARD.get(0) {
        Some(g) if g.new_flows_per_cpu_s != 0 => g.new_flows_per_cpu_s as u64,
        _ => return true,
    };
    let Some(st) = FLOOD_STATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe {
        if now.wrapping_sub((*st).window_start_ns) >= 1_000_000_000 {
            (*st).window_start_ns = now;
            (*st).count = 0;
        }
        (*st).count += 1;
        if (*st).count <= limit {
            true
        } else {
            (*st).unrecorded += 1;
            false
        }
    }
}

#[inline(always)]
fn now_s() -> u64 {
    // SAFETY: plain helper call without arguments.
    let ns = unsafe { bpf_ktime_get_ns() };
    ns / 1_000_000_000
}

fn try_lb(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(Skip::NotIp) => return Ok(verdict(verdict::PASS_NON_IP, xdp_action::XDP_PASS)),
        Err(Skip::Ipv6Ext) => return Ok(verdict(verdict::PASS_IPV6_EXT, xdp_action::XDP_PASS)),
        Err(Skip::Malformed) => return Ok(verdict(verdict::MALFORMED, xdp_action::XDP_PASS)),
    };
    if !maybe_vip_addr(&pkt) {
        return Ok(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    if pkt.fragment {
        if is_vip_addr(&pkt) {
            return Ok(verdict(verdict::FRAGMENT, xdp_action::XDP_DROP));
        }
        return Ok(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    let Some(vip) = lookup_vip(&pkt) else {
        return Ok(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    };

    // The flow hash is needed only to schedule a new flow or to vary the
    // IPIP outer source; established DSR packets skip it.
    let flow_hash = || {
        if vip.flags & VIP_F_HASH_SRC_IP != 0 {
            hash::hash_src(&pkt.key.src)
        } else {
            hash::hash_5tuple(&pkt.key.src, pkt.key.sport, pkt.key.dport, pkt.key.proto)
        }
    };
    let use_table = vip.flags & VIP_F_NO_FLOW_TABLE == 0;
    let key = &pkt.key;
    // A SYN without ACK opens a new connection: it is scheduled afresh and
    // overwrites whatever entry its 5-tuple still has, so a reused client
    // port does not inherit the old connection's (perhaps drained) backend.
    let opening = key.proto == PROTO_TCP
        && pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;

    // Known flow: keep its backend unless that backend is down or the flow
    // sat idle past the VIP's timeout.
    let mut chosen: Option<(u32, &'static Backend)> = None;
    let mut now = 0;
    // A least-connections flow counted in ACTIVE that is being rescheduled
    // (its backend died or it idled out): uncount it from the old backend.
    let mut uncount: Option<u32> = None;
    if use_table && let Some(f) = FLOWS.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup; a concurrent
        // writer can at worst make us reschedule a flow, never read garbage
        // out of bounds.
        let (id, last, flags) = unsafe { ((*f).backend_id, (*f).last_seen_s, (*f).flags) };
        let fresh = if opening {
            false
        } else if vip.idle_timeout_s != 0 {
            now = now_s();
            if now.saturating_sub(last) <= vip.idle_timeout_s as u64 {
                if now != last {
                    // SAFETY: as above.
                    unsafe { (*f).last_seen_s = now };
                }
                true
            } else {
                false
            }
        } else {
            true
        };
        let counted = flags & FLOW_F_COUNTED != 0;
        if fresh && let Some(b) = backend(id) {
            if counted && pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
                // The connection is ending: it no longer counts as active.
                active_add(id, u64::MAX);
                // SAFETY: as above.
                unsafe { (*f).flags = flags & !FLOW_F_COUNTED };
            }
            chosen = Some((id, b));
        } else if counted {
            uncount = Some(id);
        }
    }
    let new_flow = chosen.is_none();
    let (id, b) = match chosen {
        Some(c) => c,
        None => {
            let ring = ring_for(&pkt, &vip);
            let regional = ring.id != vip.vip_id;
            let h = flow_hash();
            match schedule(&vip, &ring, h) {
                Some(c) => c,
                // A region with no live backend: its clients use the whole VIP.
                None if regional => match schedule(&vip, &vip_ring(&vip), h) {
                    Some(c) => c,
                    None => return Ok(verdict(verdict::NO_BACKEND, xdp_action::XDP_DROP)),
                },
                None => return Ok(verdict(verdict::NO_BACKEND, xdp_action::XDP_DROP)),
            }
        }
    };
    let Some(settings) = SETTINGS.get(0) else {
        // Cannot happen (an array's index 0 always exists): counted apart
        // rather than under a reason that would mislead.
        return Ok(verdict(verdict::INTERNAL, xdp_action::XDP_DROP));
    };
    let hop = if settings.flags & SETTINGS_F_FIB != 0 {
        fib_next_hop(ctx, &pkt, b)
    } else if b.dst_mac != [0; 6] {
        Some(forward::Hop {
            dmac: b.dst_mac,
            smac: b.src_mac,
            ifindex: b.ifindex,
        })
    } else {
        None
    };
    let Some(hop) = hop else {
        return Ok(verdict(verdict::NO_NEIGH, xdp_action::XDP_PASS));
    };
    // Rewrite first, then record the flow: a packet that cannot be sent
    // leaves no table entry (and no least-connections count) behind.
    if vip.flags & VIP_F_IPIP != 0 {
        if forward::encap(ctx, &pkt, b, settings, flow_hash(), &hop).is_err() {
            return Ok(verdict(verdict::ENCAP_FAILED, xdp_action::XDP_DROP));
        }
    } else if forward::set_macs(ctx, &hop).is_err() {
        return Ok(verdict(verdict::INTERNAL, xdp_action::XDP_DROP));
    }
    if new_flow && use_table && !pkt.icmp_error && may_record_flow() {
        if now == 0 && vip.idle_timeout_s != 0 {
            now = now_s();
        }
        let count = vip.scheduler == SCHED_LEAST_CONN
            && pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) == 0;
        let flow = Flow {
            backend_id: id,
            vip_id: vip.vip_id as u16,
            flags: if count { FLOW_F_COUNTED } else { 0 },
            last_seen_s: now,
        };
        // A full table evicts its least recently used entry; a failed insert
        // only costs this flow its stickiness, so the error is ignored.
        if FLOWS.insert(key, &flow, 0).is_ok() && count {
            active_add(id, 1);
        }
        if let Some(old) = uncount {
            active_add(old, u64::MAX);
        }
    }

    stats::traffic(
        vip.vip_id,
        id,
        (ctx.data_end() - ctx.data()) as u64,
        new_flow,
    );
    let reason = if pkt.icmp_error {
        Some(verdict::ICMP_TO_FLOW)
    } else {
        None
    };
    if hop.ifindex == 0 || hop.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(verdict(reason.unwrap_or(verdict::TX), xdp_action::XDP_TX));
    }
    match TX_PORTS.redirect(hop.ifindex, 0) {
        Ok(action) => Ok(verdict(reason.unwrap_or(verdict::REDIRECT), action)),
        Err(_) => Ok(verdict(verdict::REDIRECT_FAILED, xdp_action::XDP_DROP)),
    }
}

fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let Some(t) = parse::tunnel(ctx)? else {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    };
    if DECAP_ADDRS.get_ptr(&t.dst).is_none() {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    }
    forward::decap(ctx, t.l3_off, t.outer_len)?;
    Ok(decap_verdict(
        decap_verdict::DECAPSULATED,
        xdp_action::XDP_PASS,
    ))
}

/// Micro-benchmark wrapper for the encapsulating path. BPF_PROG_TEST_RUN's
/// `repeat` runs each repetition on the buffer the previous one left, so
/// after the first IPIP encapsulation the balancer would be timed on its own
/// output. This strips an outer IPIP/IP6IP6 header if there is one (restoring
/// the original packet) and tail-calls the balancer. Only the benchmark
/// loads a program into `BENCH_JUMP`; in production it stays empty.
#[xdp]
pub fn bench_ipip(ctx: XdpContext) -> u32 {
    let _ = restore(&ctx);
    // SAFETY: tail call into a program of the same type; falls through on
    // an empty slot.
    unsafe { maps::BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[inline(always)]
fn restore(ctx: &XdpContext) -> Result<(), ()> {
    match parse::tunnel(ctx)? {
        Some(t) => forward::decap(ctx, t.l3_off, t.outer_len),
        None => Ok(()),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
