//! The XDP datapath: what `lb run` loads, and nothing else (the traffic
//! generator, its sink and the benchmark programs are the tools object,
//! `tools.rs`).
//!
//! `lb_xdp` is the balancer: parse → VIP lookup → connection table or Maglev
//! ring → rewrite (L2 DSR, IPIP, or full NAT) → `XDP_TX` / `XDP_REDIRECT`;
//! a backend's reply to a NAT flow is translated back to its client.
//! Everything else passes to the kernel untouched. `lb_xdp_traced` is its
//! watched copy for `lb trace`. `lb_decap` runs on backends and strips the
//! IPIP/IP6IP6 header the balancer added. `lb_pass` is the trivial program
//! the lab attaches to veth peers (native `XDP_TX` on a veth needs one
//! there).
//!
//! Modules: `parse` (offsets), `vip` (which VIP), `table` (the connection
//! table: sets of array slots), `sched` (scheduling a new flow), `flow`
//! (flood guard, clock), `forward` (header rewrites, FIB next
//! hop), `nat` (full NAT both ways), `decap` (stripping a tunnel), `maps`,
//! `stats` (counters), `csum`, `trace`, `log` (rare drops into the agent's
//! log, by `lb_drop_log`). This file: the entry points and the
//! balancer's flow, parse → VIP → table or schedule → rewrite → count.
#![no_std]
#![no_main]
// `core::sync::atomic` offers no fetch_add on the BPF target; the intrinsic
// lowers to BPF's atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod csum;
mod decap;
mod flow;
mod forward;
mod icmp;
mod log;
mod maps;
mod nat;
mod parse;
mod sched;
mod stats;
mod table;
mod trace;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    Backend, FLOW_F_COUNTED, Flow, PROTO_TCP, SCHED_LEAST_CONN, SETTINGS_F_FIB, VIP_F_HASH_SRC_IP,
    VIP_F_IPIP, VIP_F_NAT, VIP_F_NO_FLOW_TABLE, VipMeta, decap_verdict, hash, trace_ring,
    trace_table, verdict,
};

use crate::{
    flow::{may_record_flow, now_s},
    forward::fib_next_hop,
    maps::{DECAP_ADDRS, SETTINGS, TX_PORTS},
    parse::Skip,
    sched::{active_add, backend, ring_for, schedule, vip_ring},
    stats::{decap_verdict, verdict},
    trace::{Observe, Quiet, Seen},
    vip::{
        is_vip_addr, lookup_vip, maybe_table_vip, maybe_vip_addr, maybe_vip_only_addr, vip_of_flow,
    },
};

// `#[inline(always)]` reaches the function `#[xdp]` wraps: without it LLVM
// keeps the balancer's body as a BPF-to-BPF call of its own (too big for
// its inliner), which every packet pays for (a call, a second prologue).
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (pkt, folded) = match vip_candidate(&ctx) {
        Ok(p) => p,
        Err(action) => return action,
    };
    if trace::filter().is_some() {
        // SAFETY: tail call into a program of the same type; with an empty
        // slot (no agent loaded the traced copy) it falls through.
        unsafe { maps::TRACE_JUMP.tail_call(&ctx, 0) };
    }
    let (reason, action) = try_lb(&ctx, &pkt, folded, &mut Quiet);
    let action = verdict(reason, action);
    log::after(&ctx, reason);
    action
}

/// Parses the packet and lets through what cannot be for a VIP, counted:
/// not IP, IPv6 extension headers, malformed, or an address that is no
/// VIP's (most of a host's traffic, which leaves here before the trace
/// check: `lb trace` sees VIP addresses only). `Ok`: the packet and its
/// destination folded to 32 bits (the filters' input); `Err`: the XDP
/// action.
#[inline(always)]
fn vip_candidate(ctx: &XdpContext) -> Result<(parse::Packet, u32), u32> {
    let skip = |s| match s {
        Skip::NotIp => verdict(verdict::PASS_NON_IP, xdp_action::XDP_PASS),
        Skip::Ipv6Ext => verdict(verdict::PASS_IPV6_EXT, xdp_action::XDP_PASS),
        Skip::Malformed => verdict(verdict::MALFORMED, xdp_action::XDP_PASS),
    };
    // The filter first, on the destination alone: most of a host's traffic
    // is for no VIP and leaves after one array lookup, unparsed.
    let folded = parse::folded_dst(ctx).map_err(skip)?;
    if !maybe_vip_addr(folded) {
        return Err(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    Ok((parse::parse(ctx).map_err(skip)?, folded))
}

/// [`lb_xdp`] while `lb trace` runs: the same balancer, watched, entered by
/// a tail call. A program of its own, so the untraced path carries none of
/// it and each copy fits the verifier's budget on its own.
#[xdp]
#[inline(always)]
pub fn lb_xdp_traced(ctx: XdpContext) -> u32 {
    let (pkt, folded) = match vip_candidate(&ctx) {
        Ok(p) => p,
        Err(action) => return action,
    };
    let Some(mut seen) = Seen::new() else {
        let (reason, action) = log::dropped(&pkt, verdict::INTERNAL, 0);
        let action = verdict(reason, action);
        log::after(&ctx, reason);
        return action;
    };
    let (reason, action) = try_lb(&ctx, &pkt, folded, &mut seen);
    if let Some(c) = trace::filter() {
        seen.0.family = pkt.family;
        trace::emit(c, &pkt.key, seen.data(), (reason << 8) | action);
    }
    let action = verdict(reason, action);
    log::after(&ctx, reason);
    action
}

/// An `ipip` packet too big for the path once encapsulated, tail-called
/// from the balancer: answered with ICMP "fragmentation needed" / ICMPv6
/// "packet too big" (see `icmp`), counted as `too_big`.
#[xdp]
pub fn lb_too_big(ctx: XdpContext) -> u32 {
    let action = match (parse::parse(&ctx), SETTINGS.get(0)) {
        (Ok(pkt), Some(s)) => {
            let outer: u16 = if pkt.family == lb_common::AF_INET {
                20
            } else {
                40
            };
            match icmp::too_big(&ctx, &pkt, s.ipip_mtu.saturating_sub(outer)) {
                Ok(a) => a,
                // The answer could not be built: the client never learns.
                Err(_) => {
                    let action =
                        verdict(verdict::TOO_BIG, log::dropped(&pkt, verdict::TOO_BIG, 0).1);
                    log::after(&ctx, verdict::TOO_BIG);
                    return action;
                }
            }
        }
        _ => xdp_action::XDP_DROP,
    };
    verdict(verdict::TOO_BIG, action)
}

/// An ICMP error about a NAT flow, tail-called from the balancer:
/// translated to the other side of the NAT and sent (see
/// `nat::icmp_error`), counted as `nat_icmp`; anything else passes.
#[xdp]
pub fn lb_nat_icmp(ctx: XdpContext) -> u32 {
    let Ok(pkt) = parse::parse(&ctx) else {
        return verdict(verdict::MALFORMED, xdp_action::XDP_PASS);
    };
    if !pkt.icmp_error {
        return verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    }
    let Some(out) = nat::icmp_error(&ctx, &pkt) else {
        return verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    };
    let hop = forward::Hop {
        dmac: out.dmac,
        smac: out.smac,
        ifindex: out.ifindex,
    };
    let (reason, action) = if forward::set_macs(&ctx, &hop).is_err() {
        log::dropped(&pkt, verdict::INTERNAL, 0)
    } else {
        send(
            &ctx,
            &pkt,
            0,
            hop.ifindex,
            verdict::NAT_ICMP,
            verdict::NAT_ICMP,
        )
    };
    let action = verdict(reason, action);
    log::after(&ctx, reason);
    action
}

/// A rare drop, counted by the program that tail-called this one: logged
/// (aya-log, rate-limited; see `log`) and dropped.
#[xdp]
pub fn lb_drop_log(_ctx: XdpContext) -> u32 {
    log::emit()
}

/// Sends the rewritten packet: back out where it came in (`XDP_TX`, counted
/// as `tx_reason`) when `ifindex` is 0 or the ingress interface, else to
/// `ifindex` (`XDP_REDIRECT`, counted as `redirect_reason`); an interface
/// that is no redirect target drops it (`redirect_failed`, logged with
/// `pkt` and `backend_id`). Returns (verdict reason, XDP action).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    backend_id: u32,
    ifindex: u32,
    tx_reason: u32,
    redirect_reason: u32,
) -> (u32, u32) {
    if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        return (tx_reason, xdp_action::XDP_TX);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (redirect_reason, action),
        Err(_) => log::dropped(pkt, verdict::REDIRECT_FAILED, backend_id),
    }
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) => action,
        Err(()) => decap_verdict(decap_verdict::MALFORMED, xdp_action::XDP_PASS),
    }
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The balancer's decision for a parsed packet whose destination passed the
/// VIP-address filter: (verdict reason, XDP action), with what it saw along
/// the way reported to `seen` (for `lb trace`; [`Quiet`] otherwise).
#[inline(always)]
fn try_lb<O: Observe>(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    folded_dst: u32,
    seen: &mut O,
) -> (u32, u32) {
    if pkt.fragment {
        if is_vip_addr(pkt) {
            return (verdict::FRAGMENT, xdp_action::XDP_DROP);
        }
        return (verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    }
    // Where a VIP with a connection table may live, the flow is looked up
    // first: an established flow's entry names its VIP, read by id (one
    // array read) instead of through the VIP directory. Anything else (a
    // new flow, an entry whose VIP is gone) looks the VIP up in the
    // directory, and the entry found here is the one used below.
    let early = !pkt.icmp_error && maybe_table_vip(folded_dst, pkt.key.dport);
    // No VIP on the address (a NAT address): a backend's reply, perhaps,
    // which needs neither the VIP lookups nor the flow hash.
    if !early && !pkt.icmp_error && !maybe_vip_only_addr(folded_dst) {
        return nat_reply(ctx, pkt);
    }
    // The connection table's set for this flow, and the table hash that
    // also varies the IPIP outer source: computed where the table is
    // looked up (or an IPIP packet is encapsulated), so a VIP without a
    // table, which schedules every packet with the scheduling hash, never
    // pays for it.
    let mut probe = table::Probe::NONE;
    // The flow's entry in `FLOWS`.
    let mut at: Option<core::ptr::NonNull<Flow>> = None;
    let mut vip = None;
    if early {
        probe = table::probe(&pkt.key);
        at = table::lookup(probe.base, probe.tag, &pkt.key);
        if let Some(f) = at {
            // SAFETY: a pointer into the entry's map value.
            vip = vip_of_flow(pkt, u32::from(unsafe { (*f.as_ptr()).vip_id }));
        }
    }
    let vip = match vip {
        Some(v) => Some(v),
        // No VIP on the address (a NAT address: a backend's reply) needs
        // no directory lookup.
        None if maybe_vip_only_addr(folded_dst) => lookup_vip(pkt),
        None => None,
    };
    if pkt.icmp_error && vip.is_none_or(|v| v.flags & VIP_F_NAT != 0) {
        // About a NAT VIP's flow, or to no VIP (perhaps a NAT address):
        // translated by `lb_nat_icmp` (tail call; its rewrite does not fit
        // this program's stack), which passes what is no NAT flow's; an
        // empty slot passes it untouched.
        // SAFETY: tail call into a program of the same type.
        unsafe { maps::ICMP_JUMP.tail_call(ctx, 1) };
        return (verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    }
    let Some(vip) = vip else {
        // Perhaps a backend's reply to a NAT flow.
        return nat_reply(ctx, pkt);
    };
    // A copy: each read of the map's value would be a new unknown to the
    // verifier, which then walks paths where one flag is both set and clear.
    let vip: VipMeta = *vip;
    seen.vip(vip.vip_id, vip.scheduler as u8);
    let nat_vip = vip.flags & VIP_F_NAT != 0;

    // The scheduling hash (the one the rings and `lb explain` use), needed
    // only for a new flow: an established packet computes just the table's
    // cheaper hash (`table::probe`).
    let flow_hash = || {
        if vip.flags & VIP_F_HASH_SRC_IP != 0 {
            hash::hash_src(&pkt.key.src)
        } else {
            hash::hash_5tuple(&pkt.key.src, pkt.key.sport, pkt.key.dport, pkt.key.proto)
        }
    };
    // A NAT flow must find its source port again: NAT VIPs always keep one.
    let use_table = vip.flags & VIP_F_NO_FLOW_TABLE == 0 || nat_vip;
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
    // A NAT flow's source (address index, port), from its table entry, and
    // whether its reply entry's clock is due for a refresh.
    let mut nat_src: Option<(u16, u16)> = None;
    let mut nat_refresh = false;
    if !use_table {
        at = None;
    } else if at.is_none() && !early {
        probe = table::probe(key);
        at = table::lookup(probe.base, probe.tag, key);
    }
    if let Some(p) = at {
        let f = p.as_ptr();
        // SAFETY: a pointer into the entry's map value (read through it, not
        // copied: a copy on the stack, zero where no entry was found, would
        // split every path that follows in two for the verifier).
        let (id, last, flags, nat_addr, nat_port) = unsafe {
            (
                (*f).backend_id,
                (*f).last_seen_s,
                (*f).flags,
                (*f).nat_addr,
                (*f).nat_port,
            )
        };
        let fresh = if opening {
            seen.table(trace_table::SYN);
            false
        } else if vip.idle_timeout_s != 0 {
            now = now_s();
            if now.saturating_sub(last) <= vip.idle_timeout_s {
                if now != last {
                    // SAFETY: `at` points into the entry's map value; a
                    // concurrent writer can at worst make us reschedule a
                    // flow, never read garbage out of bounds.
                    unsafe { (*f).last_seen_s = now };
                }
                true
            } else {
                seen.table(trace_table::IDLE);
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
            if nat_vip && nat_port != 0 {
                nat_src = Some((nat_addr, nat_port));
                // The reply entry's clock (60 s and 300 s timeouts) needs
                // a refresh at most once a second: the flow's own clock
                // says when, saving a NAT lookup on every other packet.
                if now == 0 {
                    now = now_s();
                }
                if now != last {
                    // SAFETY: as above.
                    unsafe { (*f).last_seen_s = now };
                    nat_refresh = true;
                }
            }
            seen.table(trace_table::HIT);
        } else {
            if fresh {
                seen.table(trace_table::BACKEND_DOWN);
            }
            if counted {
                uncount = Some(id);
            }
        }
    } else if use_table {
        seen.table(trace_table::MISS);
    }
    let new_flow = chosen.is_none();
    let (id, b) = match chosen {
        Some(c) => c,
        None => {
            let ring = ring_for(pkt, &vip);
            let regional = ring.id != vip.vip_id;
            let h = flow_hash();
            seen.ring(
                if regional {
                    trace_ring::REGION
                } else {
                    trace_ring::VIP
                },
                &ring,
                h,
            );
            match schedule(&vip, &ring, h) {
                Some(c) => c,
                // A region with no live backend: its clients use the whole VIP.
                None if regional => {
                    let whole = vip_ring(&vip);
                    seen.ring(trace_ring::REGION_FALLBACK, &whole, h);
                    match schedule(&vip, &whole, h) {
                        Some(c) => c,
                        None => return (verdict::NO_BACKEND, xdp_action::XDP_DROP),
                    }
                }
                None => return (verdict::NO_BACKEND, xdp_action::XDP_DROP),
            }
        }
    };
    seen.backend(id);
    let Some(settings) = SETTINGS.get(0) else {
        // Cannot happen (an array's index 0 always exists): counted apart
        // rather than under a reason that would mislead.
        return log::dropped(pkt, verdict::INTERNAL, id);
    };
    let hop = if settings.flags & SETTINGS_F_FIB != 0 {
        fib_next_hop(ctx, pkt, b)
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
        return (verdict::NO_NEIGH, xdp_action::XDP_PASS);
    };
    // Rewrite first, then record the flow: a packet that cannot be sent
    // leaves no table entry (and no least-connections count) behind.
    let mut nat_rec = (0, 0);
    if nat_vip {
        if now == 0 {
            now = now_s();
        }
        let src = match nat_src {
            Some((idx, port)) => {
                let Some(addr) = nat::source_addr(idx) else {
                    return log::dropped(pkt, verdict::INTERNAL, id);
                };
                let src = nat::Source { idx, addr, port };
                // Keeps the reply entry's clock (once a second) and closing
                // state (FIN or RST) up to date.
                if nat_refresh || pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
                    nat::note_forward(pkt, b, &src, now);
                }
                src
            }
            None => match nat::allocate(ctx, pkt, b, settings, flow_hash(), now) {
                Some(s) => s,
                None => return log::dropped(pkt, verdict::NAT_NO_PORT, id),
            },
        };
        let bport = nat::backend_port(pkt, b);
        if nat::rewrite(ctx, pkt, &src.addr, src.port, &b.addr, bport).is_err()
            || forward::set_macs(ctx, &hop).is_err()
        {
            return log::dropped(pkt, verdict::INTERNAL, id);
        }
        nat_rec = (src.idx, src.port);
    } else if vip.flags & VIP_F_IPIP != 0 {
        // Too big once encapsulated: tell the client (path-MTU discovery)
        // rather than drop it silently.
        let outer: u16 = if pkt.family == lb_common::AF_INET {
            20
        } else {
            40
        };
        if settings.ipip_mtu != 0 && pkt.ip_len > settings.ipip_mtu.saturating_sub(outer) {
            // The error is built by a program of its own (`lb_too_big`),
            // which counts it: its headers do not fit this one's stack.
            // SAFETY: tail call into a program of the same type; with an
            // empty slot it falls through and the packet is dropped.
            unsafe { maps::ICMP_JUMP.tail_call(ctx, 0) };
            return log::dropped(pkt, verdict::TOO_BIG, id);
        }
        seen.ipip();
        // The outer source varies per flow with the table hash, so a
        // receiver's RSS spreads flows (of one client too) over its queues.
        if !use_table {
            probe = table::probe(&pkt.key);
        }
        if forward::encap(ctx, pkt, b, settings, probe.hash, &hop).is_err() {
            return log::dropped(pkt, verdict::ENCAP_FAILED, id);
        }
    } else if forward::set_macs(ctx, &hop).is_err() {
        return log::dropped(pkt, verdict::INTERNAL, id);
    }
    // A NAT flow is always recorded (without its entry the next packet
    // would get another port): the flood guard spares NAT VIPs.
    if new_flow && use_table && !pkt.icmp_error && (nat_vip || may_record_flow()) {
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
            nat_addr: nat_rec.0,
            nat_port: nat_rec.1,
        };
        // A full set replaces a slot not recently used (see `table`).
        table::insert(probe.base, probe.tag, key, &flow);
        if count {
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
    if pkt.icmp_error {
        send(
            ctx,
            pkt,
            id,
            hop.ifindex,
            verdict::ICMP_TO_FLOW,
            verdict::ICMP_TO_FLOW,
        )
    } else {
        send(ctx, pkt, id, hop.ifindex, verdict::TX, verdict::REDIRECT)
    }
}

/// A packet to no VIP that passed the address filter: a backend's reply
/// to a NAT flow is translated back to its client (source: the VIP) and
/// sent out where the client's packet came in; anything else passes.
#[inline(always)]
fn nat_reply(ctx: &XdpContext, pkt: &parse::Packet) -> (u32, u32) {
    let Some(e) = nat::reply_for(pkt) else {
        return (verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    };
    // SAFETY: a value pointer from a successful lookup; an entry is only
    // ever replaced whole by the allocating CPU.
    let e = unsafe { &*e };
    if nat::rewrite(ctx, pkt, &e.vip, e.vip_port, &e.client, e.client_port).is_err()
        || forward::write_macs(ctx, &e.client_mac, &e.lb_mac).is_err()
    {
        return log::dropped(pkt, verdict::INTERNAL, 0);
    }
    send(
        ctx,
        pkt,
        0,
        e.ifindex,
        verdict::NAT_REPLY,
        verdict::NAT_REPLY,
    )
}

fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let Some(t) = parse::tunnel(ctx)? else {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    };
    if DECAP_ADDRS.get_ptr(&t.dst).is_none() {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    }
    decap::decap(ctx, t.l3_off, t.outer_len)?;
    Ok(decap_verdict(
        decap_verdict::DECAPSULATED,
        xdp_action::XDP_PASS,
    ))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
