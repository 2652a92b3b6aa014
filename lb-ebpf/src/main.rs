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

mod csum;
mod forward;
mod loadgen;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{
    BACKEND_DOWN, Backend, Flow, FlowKey, VIP_F_HASH_SRC_IP, VIP_F_IPIP, VIP_F_NO_FLOW_TABLE,
    VipKey, VipMeta, decap_verdict, hash, ring_base, verdict,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    maps::{BACKENDS, DECAP_ADDRS, FLOWS, RINGS, SETTINGS, TX_PORTS, VIP_ADDRS, VIPS},
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
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
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

/// Whether any VIP lives on this address (for fragments, which lack ports).
#[inline(always)]
fn is_vip_addr(pkt: &Packet) -> bool {
    let key = VipKey {
        addr: pkt.dst,
        port: 0,
        proto: 0,
        family: pkt.family,
    };
    VIP_ADDRS.get_ptr(&key).is_some()
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    if id == 0 {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.family == 0 || b.state == BACKEND_DOWN {
        return None;
    }
    Some(*b)
}

/// Picks a backend through the VIP's live ring half.
#[inline(always)]
fn from_ring(vip: &VipMeta, h: u32) -> Option<(u32, Backend)> {
    if vip.ring_size == 0 {
        return None;
    }
    let slot = h % vip.ring_size;
    let id = *RINGS.get(ring_base(vip.vip_id, vip.active_half) + slot)?;
    Some((id, backend(id)?))
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
    if pkt.fragment {
        if is_vip_addr(&pkt) {
            return Ok(verdict(verdict::FRAGMENT, xdp_action::XDP_DROP));
        }
        return Ok(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    let Some(vip) = lookup_vip(&pkt) else {
        return Ok(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    };

    let h = if vip.flags & VIP_F_HASH_SRC_IP != 0 {
        hash::hash_src(&pkt.src)
    } else {
        hash::hash_5tuple(&pkt.src, pkt.sport, pkt.dport, pkt.proto)
    };
    let use_table = vip.flags & VIP_F_NO_FLOW_TABLE == 0;
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    };

    // Known flow: keep its backend unless that backend is down or the flow
    // sat idle past the VIP's timeout.
    let mut chosen: Option<(u32, Backend)> = None;
    let mut now = 0;
    if use_table && let Some(f) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer comes from a successful lookup; a concurrent
        // writer can at worst make us reschedule a flow, never read garbage
        // out of bounds.
        let (id, last) = unsafe { ((*f).backend_id, (*f).last_seen_s) };
        let fresh = if vip.idle_timeout_s != 0 {
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
        if fresh && let Some(b) = backend(id) {
            chosen = Some((id, b));
        }
    }
    let new_flow = chosen.is_none();
    let (id, b) = match chosen {
        Some(c) => c,
        None => match from_ring(&vip, h) {
            Some(c) => c,
            None => return Ok(verdict(verdict::NO_BACKEND, xdp_action::XDP_DROP)),
        },
    };
    if b.dst_mac == [0; 6] {
        return Ok(verdict(verdict::NO_NEIGH, xdp_action::XDP_PASS));
    }
    if new_flow && use_table && !pkt.icmp_error {
        if now == 0 && vip.idle_timeout_s != 0 {
            now = now_s();
        }
        let flow = Flow {
            backend_id: id,
            vip_id: vip.vip_id,
            last_seen_s: now,
        };
        // A full table evicts its least recently used entry; a failed insert
        // only costs this flow its stickiness, so the error is ignored.
        let _ = FLOWS.insert(&key, &flow, 0);
    }

    if vip.flags & VIP_F_IPIP != 0 {
        let Some(s) = SETTINGS.get(0) else {
            return Ok(verdict(verdict::ENCAP_FAILED, xdp_action::XDP_DROP));
        };
        let s = *s;
        if forward::encap(ctx, &pkt, &b, &s, h).is_err() {
            return Ok(verdict(verdict::ENCAP_FAILED, xdp_action::XDP_DROP));
        }
    } else {
        forward::set_macs(ctx, &b)?;
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
    if b.ifindex == 0 || b.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(verdict(reason.unwrap_or(verdict::TX), xdp_action::XDP_TX));
    }
    let action = TX_PORTS
        .redirect(b.ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED);
    Ok(verdict(reason.unwrap_or(verdict::REDIRECT), action))
}

fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let (ether_type, l3_off) = match parse::parse_l2(ctx) {
        Ok(v) => v,
        Err(_) => {
            return Ok(decap_verdict(
                decap_verdict::MALFORMED,
                xdp_action::XDP_PASS,
            ));
        }
    };
    let pass = || decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS);
    // Constant offsets for the verifier: the same value as l3_off.
    let l3 = if l3_off > EthHdr::LEN {
        18
    } else {
        EthHdr::LEN
    };
    let outer_len = match ether_type {
        parse::ETH_P_IP => {
            let ip: *const Ipv4Hdr = parse::ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            let (vihl, proto, dst) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).dst_addr) };
            if vihl != 0x45 || proto != parse::IPPROTO_IPIP {
                return Ok(pass());
            }
            let key = [
                dst[0], dst[1], dst[2], dst[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            if DECAP_ADDRS.get_ptr(&key).is_none() {
                return Ok(pass());
            }
            Ipv4Hdr::LEN
        }
        parse::ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = parse::ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            let (next, dst) = unsafe { ((*ip).next_hdr, (*ip).dst_addr) };
            if next != parse::IPPROTO_IPV6 || DECAP_ADDRS.get_ptr(&dst).is_none() {
                return Ok(pass());
            }
            Ipv6Hdr::LEN
        }
        _ => return Ok(pass()),
    };
    forward::decap(ctx, l3, outer_len)?;
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
    let (ether_type, l3_off) = parse::parse_l2(ctx).map_err(|_| ())?;
    let l3 = if l3_off > EthHdr::LEN {
        18
    } else {
        EthHdr::LEN
    };
    let outer_len = match ether_type {
        parse::ETH_P_IP => {
            let ip: *const Ipv4Hdr = parse::ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            if unsafe { (*ip).proto } != parse::IPPROTO_IPIP {
                return Ok(());
            }
            Ipv4Hdr::LEN
        }
        parse::ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = parse::ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            if unsafe { (*ip).next_hdr } != parse::IPPROTO_IPV6 {
                return Ok(());
            }
            Ipv6Hdr::LEN
        }
        _ => return Ok(()),
    };
    forward::decap(ctx, l3, outer_len)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
