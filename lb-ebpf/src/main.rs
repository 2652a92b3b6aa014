//! The XDP datapath: what `lb run` loads, and nothing else (the traffic
//! generator, its sink and the benchmark programs are the tools object,
//! `tools.rs`).
//!
//! `lb_xdp` is the balancer: the address filter, then the established
//! path (`fast`: established flows and VIPs without a table, straight from
//! the headers), else the general balancer: parse → VIP lookup →
//! connection table or Maglev ring → rewrite (L2 DSR, IPIP, or full NAT) →
//! `XDP_TX` / `XDP_REDIRECT`;
//! a backend's reply to a NAT flow is translated back to its client.
//! Everything else passes to the kernel untouched. `lb_xdp_traced` is its
//! watched copy for `lb trace`. `lb_decap` runs on backends and strips the
//! IPIP/IP6IP6 header the balancer added. `lb_pass` is the trivial program
//! the lab attaches to veth peers (native `XDP_TX` on a veth needs one
//! there).
//!
//! Modules: `fast` (the established path), `balance` (the general
//! balancer's flow in stages: find the VIP and the
//! flow's entry → choose a backend → next hop → rewrite → record → count),
//! `parse` (offsets), `vip` (which VIP), `table` (the connection
//! table: sets of array slots), `sched` (scheduling a new flow), `flow`
//! (flood guard, clock), `forward` (header rewrites, FIB next
//! hop), `nat` (full NAT both ways), `decap` (stripping a tunnel), `second`
//! (the second chance on a backend host), `maps`,
//! `stats` (counters), `csum`, `trace`, `log` (rare drops into the agent's
//! log, by `lb_drop_log`). This file: the entry points (parse and the
//! VIP-address filter, then `balance::try_lb`) and `send`.
#![no_std]
#![no_main]
// `core::sync::atomic` offers no fetch_add on the BPF target; the intrinsic
// lowers to BPF's atomic add instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod balance;
mod csum;
mod decap;
mod dir;
mod encap;
mod fast;
mod flow;
mod forward;
mod icmp;
mod log;
mod maps;
mod nat;
mod parse;
mod sched;
mod second;
mod signal;
mod stats;
mod table;
mod trace;
mod tuple;
mod vip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{decap_verdict, verdict};

use crate::{
    balance::try_lb,
    maps::{DECAP_ADDRS, SETTINGS, TX_PORTS},
    parse::Skip,
    stats::{decap_verdict, verdict},
    trace::{Quiet, Seen},
    vip::maybe_vip_addr,
};

// `#[inline(always)]` reaches the function `#[xdp]` wraps: without it LLVM
// keeps the balancer's body as a BPF-to-BPF call of its own (too big for
// its inliner), which every packet pays for (a call, a second prologue).
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let folded = match vip_addr(&ctx) {
        Ok(f) => f,
        Err(action) => return action,
    };
    if trace::filter().is_some() {
        // SAFETY: tail call into a program of the same type; with an empty
        // slot (no agent loaded the traced copy) it falls through.
        unsafe { maps::TRACE_JUMP.tail_call(&ctx, 0) };
    }
    if let Some((reason, action)) = fast::forward(&ctx, folded) {
        let action = verdict(reason, action);
        log::after(&ctx, reason);
        return action;
    }
    let pkt = match parse::parse(&ctx).map_err(skip) {
        Ok(p) => p,
        Err(action) => return action,
    };
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
    let folded = vip_addr(ctx)?;
    Ok((parse::parse(ctx).map_err(skip)?, folded))
}

/// The first half of [`vip_candidate`]: the destination folded to 32 bits,
/// if the address filter lets it through. The filter first, on the
/// destination alone: most of a host's traffic is for no VIP and leaves
/// after one array lookup, unparsed.
#[inline(always)]
fn vip_addr(ctx: &XdpContext) -> Result<u32, u32> {
    let folded = parse::folded_dst(ctx).map_err(skip)?;
    if !maybe_vip_addr(folded) {
        return Err(verdict(verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    Ok(folded)
}

/// Counts a packet `parse` did not take, and lets it through.
#[inline(always)]
fn skip(s: Skip) -> u32 {
    match s {
        Skip::NotIp => verdict(verdict::PASS_NON_IP, xdp_action::XDP_PASS),
        Skip::Ipv6Ext => verdict(verdict::PASS_IPV6_EXT, xdp_action::XDP_PASS),
        Skip::Malformed => verdict(verdict::MALFORMED, xdp_action::XDP_PASS),
    }
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
            // The balancer's note of the outer header's length (`gue`
            // adds UDP and GUE); without one, plain IPIP's.
            let noted = maps::TOO_BIG_NOTE.get(0).copied().unwrap_or(0);
            let outer: u16 = if noted != 0 {
                noted
            } else if pkt.family == lb_common::AF_INET {
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
pub(crate) fn send(
    ctx: &XdpContext,
    pkt: &parse::Packet,
    backend_id: u32,
    ifindex: u32,
    tx_reason: u32,
    redirect_reason: u32,
) -> (u32, u32) {
    send_or(ctx, ifindex, tx_reason, redirect_reason, || {
        log::dropped(pkt, verdict::REDIRECT_FAILED, backend_id)
    })
}

/// [`send`], with what a failed redirect answers given by `failed` (the
/// established path, which has no `Packet` to log, builds its key there).
#[inline(always)]
pub(crate) fn send_or(
    ctx: &XdpContext,
    ifindex: u32,
    tx_reason: u32,
    redirect_reason: u32,
    failed: impl FnOnce() -> (u32, u32),
) -> (u32, u32) {
    if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        return (tx_reason, xdp_action::XDP_TX);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (redirect_reason, action),
        Err(_) => failed(),
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

fn try_decap(ctx: &XdpContext) -> Result<u32, ()> {
    let Some(t) = parse::tunnel(ctx, maps::decap_gue_port())? else {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    };
    if DECAP_ADDRS.get_ptr(&t.dst).is_none() {
        return Ok(decap_verdict(decap_verdict::PASS, xdp_action::XDP_PASS));
    }
    // The second chance: not this host's connection, then the second
    // hop's (see `second`).
    if t.hop_len != 0 && !second::is_local(ctx, &t)? {
        if let Some(action) = second::forward(ctx, &t)? {
            return Ok(decap_verdict(decap_verdict::SECOND_HOP, action));
        }
        decap::decap(ctx, t.l3_off, t.outer_len)?;
        return Ok(decap_verdict(
            decap_verdict::SECOND_HOP_UNREACHABLE,
            xdp_action::XDP_PASS,
        ));
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
