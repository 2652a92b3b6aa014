//! The balancer's decision for a parsed VIP-candidate packet, in the order a
//! packet meets it: [`try_lb`] finds the VIP and the flow's entry
//! ([`find`]), keeps or chooses a backend ([`choose`]), finds the next hop
//! ([`next_hop`]), rewrites the packet ([`rewrite`]), records a new flow
//! ([`record`]), counts, and sends. Each stage returns a small struct, or
//! the (verdict reason, XDP action) that ends the packet there.
//!
//! Every stage is `#[inline(always)]`: one program for the verifier, as
//! before the split (a BPF-to-BPF call per stage would cost every packet a
//! call and the verifier its budget).

use core::ptr::NonNull;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    Backend, FLOW_F_COUNTED, FLOW_F_OPENING, FLOW_F_SIGNALLED, Flow, PROTO_TCP, SCHED_LEAST_CONN,
    SETTINGS_F_FIB, Settings, VIP_F_GUE, VIP_F_HASH_SRC_IP, VIP_F_IPIP, VIP_F_NAT,
    VIP_F_NO_FLOW_TABLE, VipMeta, hash, trace_ring, trace_table, verdict,
};

use crate::{
    encap,
    flow::{may_record_flow, now_s},
    forward::{self, Hop, fib_next_hop},
    log, maps,
    maps::SETTINGS,
    nat, parse,
    parse::Packet,
    sched::{active_add, backend, ring_for, schedule, second_hop, vip_ring},
    send, signal, stats, table,
    trace::Observe,
    vip::{is_vip_addr, lookup_vip, maybe_table_vip, maybe_vip_only_addr, vip_of_flow},
};

/// The verdict reason and XDP action a packet ends with.
type Verdict = (u32, u32);

/// The balancer's decision for a parsed packet whose destination passed the
/// VIP-address filter: (verdict reason, XDP action), with what it saw along
/// the way reported to `seen` (for `lb trace`; `Quiet` otherwise).
#[inline(always)]
pub(crate) fn try_lb<O: Observe>(
    ctx: &XdpContext,
    pkt: &Packet,
    folded_dst: u32,
    seen: &mut O,
) -> Verdict {
    if pkt.fragment {
        if is_vip_addr(pkt) {
            return (verdict::FRAGMENT, xdp_action::XDP_DROP);
        }
        return (verdict::PASS_NON_VIP, xdp_action::XDP_PASS);
    }
    let found = match find(ctx, pkt, folded_dst, seen) {
        Ok(f) => f,
        Err(v) => return v,
    };
    let vip = &found.vip;
    let mut choice = match choose(pkt, &found, seen) {
        Ok(c) => c,
        Err(v) => return v,
    };
    seen.backend(choice.id);
    let Some(settings) = SETTINGS.get(0) else {
        // Cannot happen (an array's index 0 always exists): counted apart
        // rather than under a reason that would mislead.
        return log::dropped(pkt, verdict::INTERNAL, choice.id);
    };
    let Some(hop) = next_hop(ctx, pkt, settings, choice.backend) else {
        return (verdict::NO_NEIGH, xdp_action::XDP_PASS);
    };
    // Rewrite first, then record the flow: a packet that cannot be sent
    // leaves no table entry (and no least-connections count) behind.
    let nat_src = match rewrite(ctx, pkt, &found, &mut choice, settings, &hop, seen) {
        Ok(n) => n,
        Err(v) => return v,
    };
    record(pkt, &found, &mut choice, nat_src);
    stats::traffic(
        vip.vip_id,
        choice.id,
        (ctx.data_end() - ctx.data()) as u64,
        choice.new_flow,
    );
    if pkt.icmp_error {
        send(
            ctx,
            pkt,
            choice.id,
            hop.ifindex,
            verdict::ICMP_TO_FLOW,
            verdict::ICMP_TO_FLOW,
        )
    } else {
        send(
            ctx,
            pkt,
            choice.id,
            hop.ifindex,
            verdict::TX,
            verdict::REDIRECT,
        )
    }
}

/// What [`find`] found for a VIP packet.
pub(crate) struct Found {
    /// A copy: each read of the map's value would be a new unknown to the
    /// verifier, which then walks paths where one flag is both set and
    /// clear.
    vip: VipMeta,
    /// Whether the VIP keeps its flows in the connection table (a NAT VIP
    /// always does: a NAT flow must find its source port again).
    use_table: bool,
    /// The flow's set in the table, and the table hash that also varies the
    /// IPIP outer source: computed where the table is looked up (or later,
    /// for an IPIP packet of a VIP without a table).
    probe: table::Probe,
    /// The flow's entry in `FLOWS`, if the VIP keeps a table and it has one.
    at: Option<NonNull<Flow>>,
}

/// Finds the packet's VIP and its flow's entry. Where a VIP with a
/// connection table may live, the flow is looked up first: an established
/// flow's entry names its VIP, read by id (one array read) instead of
/// through the VIP directory. Anything else (a new flow, an entry whose VIP
/// is gone) looks the VIP up in the directory. `Err`: the packet is no VIP's
/// (a NAT reply, perhaps, translated here) or an ICMP error handed on.
#[inline(always)]
fn find<O: Observe>(
    ctx: &XdpContext,
    pkt: &Packet,
    folded_dst: u32,
    seen: &mut O,
) -> Result<Found, Verdict> {
    let early = !pkt.icmp_error && maybe_table_vip(folded_dst, pkt.key.dport);
    // No VIP on the address (a NAT address): a backend's reply, perhaps,
    // which needs neither the VIP lookups nor the flow hash.
    if !early && !pkt.icmp_error && !maybe_vip_only_addr(folded_dst) {
        return Err(nat_reply(ctx, pkt));
    }
    let mut probe = table::Probe::NONE;
    let mut at: Option<NonNull<Flow>> = None;
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
        return Err((verdict::PASS_NON_VIP, xdp_action::XDP_PASS));
    }
    let Some(vip) = vip else {
        // Perhaps a backend's reply to a NAT flow.
        return Err(nat_reply(ctx, pkt));
    };
    let vip: VipMeta = *vip;
    seen.vip(vip.vip_id, vip.scheduler as u8);
    let use_table = vip.flags & VIP_F_NO_FLOW_TABLE == 0 || vip.flags & VIP_F_NAT != 0;
    if !use_table {
        at = None;
    } else if at.is_none() && !early {
        probe = table::probe(&pkt.key);
        at = table::lookup(probe.base, probe.tag, &pkt.key);
    }
    Ok(Found {
        vip,
        use_table,
        probe,
        at,
    })
}

/// The backend a packet goes to, and what the later stages need to know
/// about how it was chosen.
pub(crate) struct Choice {
    id: u32,
    backend: &'static Backend,
    /// Scheduled now (no entry kept it): the flow is recorded after the
    /// rewrite.
    new_flow: bool,
    /// A least-connections flow counted in `ACTIVE` that is being
    /// rescheduled (its backend died or it idled out): uncounted from this
    /// old backend once the new one is recorded.
    uncount: Option<u32>,
    /// A NAT flow's source (address index, port), from its entry.
    nat_src: Option<(u16, u16)>,
    /// The NAT flow's reply entry is due for a clock refresh.
    nat_refresh: bool,
    /// The clock in seconds, 0 until some stage read it (it is dear here:
    /// BENCHMARKS.md's cost rows).
    now: u32,
    /// Flags the new entry keeps from the one it replaces
    /// (`FLOW_F_SIGNALLED` for a SYN sent again).
    carry: u16,
    /// The second chance's second hop (`sched::second_hop`), a backend id
    /// (0: none; an id, not the entry, keeps this struct as small as
    /// before: it lives through the whole general path): the flow may be
    /// the previous ring's backend's, so it is not recorded.
    second: u32,
}

/// Keeps the flow's backend, unless the flow opens anew (a SYN without
/// ACK: a reused client port does not inherit the old connection's,
/// perhaps drained, backend), its backend is down, or it sat idle past the
/// VIP's timeout; else schedules the packet. `Err`: no live backend.
#[inline(always)]
fn choose<O: Observe>(pkt: &Packet, found: &Found, seen: &mut O) -> Result<Choice, Verdict> {
    let vip = &found.vip;
    let mut now = 0;
    let mut uncount = None;
    let mut carry = 0;
    let opening = pkt.key.proto == PROTO_TCP
        && pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
    if let Some(p) = found.at {
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
            if flags & FLOW_F_OPENING != 0 {
                // The client's SYN again: no SYN-ACK reached it. Signalled
                // once per attempt (the micro-benchmark's SYN case sends
                // one SYN over and over: it pays this once).
                if flags & FLOW_F_SIGNALLED == 0 {
                    signal::syn_again(id, pkt.family, &pkt.key);
                }
                carry = FLOW_F_SIGNALLED;
            }
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
            // Past the SYN (a SYN is never `fresh`): the flow has opened.
            let mut kept = flags & !(FLOW_F_OPENING | FLOW_F_SIGNALLED);
            if counted && pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
                // The connection is ending: it no longer counts as active.
                active_add(id, u64::MAX);
                kept &= !FLOW_F_COUNTED;
            }
            if kept != flags {
                // SAFETY: as above.
                unsafe { (*f).flags = kept };
            }
            let mut nat_src = None;
            let mut nat_refresh = false;
            if vip.flags & VIP_F_NAT != 0 && nat_port != 0 {
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
            return Ok(Choice {
                id,
                backend: b,
                new_flow: false,
                uncount: None,
                nat_src,
                nat_refresh,
                now,
                carry: 0,
                second: 0,
            });
        }
        if fresh {
            seen.table(trace_table::BACKEND_DOWN);
        }
        if counted {
            uncount = Some(id);
        }
    } else if found.use_table {
        seen.table(trace_table::MISS);
    }
    let ring = ring_for(pkt, vip);
    let regional = ring.id != vip.vip_id;
    let h = scheduling_hash(pkt, vip);
    seen.ring(
        if regional {
            trace_ring::REGION
        } else {
            trace_ring::VIP
        },
        &ring,
        h,
    );
    let (ring, (id, backend)) = match schedule(vip, &ring, h) {
        Some(c) => (ring, c),
        // A region with no live backend: its clients use the whole VIP.
        None if regional => {
            let whole = vip_ring(vip);
            seen.ring(trace_ring::REGION_FALLBACK, &whole, h);
            match schedule(vip, &whole, h) {
                Some(c) => (whole, c),
                None => return Err((verdict::NO_BACKEND, xdp_action::XDP_DROP)),
            }
        }
        None => return Err((verdict::NO_BACKEND, xdp_action::XDP_DROP)),
    };
    // A TCP packet that opens no connection may be of one the previous
    // ring placed (see `fast::stateless`).
    let second = if pkt.key.proto == PROTO_TCP && !opening && !pkt.icmp_error {
        second_hop(vip, &ring, h, id).map_or(0, |s| s.0)
    } else {
        0
    };
    Ok(Choice {
        id,
        backend,
        new_flow: true,
        uncount,
        nat_src: None,
        nat_refresh: false,
        now,
        carry,
        second,
    })
}

/// The scheduling hash (the one the rings and `lb explain` use), needed
/// only for a new flow: an established packet computes just the table's
/// cheaper hash (`table::probe`).
#[inline(always)]
fn scheduling_hash(pkt: &Packet, vip: &VipMeta) -> u32 {
    if vip.flags & VIP_F_HASH_SRC_IP != 0 {
        hash::hash_src(&pkt.key.src)
    } else {
        hash::hash_5tuple(&pkt.key.src, pkt.key.sport, pkt.key.dport, pkt.key.proto)
    }
}

/// The next hop's MACs and interface: from the FIB when `next_hop = "fib"`,
/// else the backend's entry (`None`: its neighbour is not resolved yet).
#[inline(always)]
fn next_hop(ctx: &XdpContext, pkt: &Packet, settings: &Settings, b: &Backend) -> Option<Hop> {
    if settings.flags & SETTINGS_F_FIB != 0 {
        fib_next_hop(ctx, pkt, b)
    } else if b.dst_mac != [0; 6] {
        Some(Hop {
            dmac: b.dst_mac,
            smac: b.src_mac,
            ifindex: b.ifindex,
        })
    } else {
        None
    }
}

/// Rewrites the packet for its backend: full NAT (a source port allocated
/// for a new flow), IPIP (or an ICMP "too big" answer), or the MACs alone
/// (L2 DSR). `Ok`: the NAT source (address index, port) to record, `(0, 0)`
/// for other modes.
#[inline(always)]
fn rewrite<O: Observe>(
    ctx: &XdpContext,
    pkt: &Packet,
    found: &Found,
    c: &mut Choice,
    settings: &Settings,
    hop: &Hop,
    seen: &mut O,
) -> Result<(u16, u16), Verdict> {
    let vip = &found.vip;
    let (id, b) = (c.id, c.backend);
    if vip.flags & VIP_F_NAT != 0 {
        if c.now == 0 {
            c.now = now_s();
        }
        let src = match c.nat_src {
            Some((idx, port)) => {
                let Some(addr) = nat::source_addr(idx) else {
                    return Err(log::dropped(pkt, verdict::INTERNAL, id));
                };
                let src = nat::Source { idx, addr, port };
                // Keeps the reply entry's clock (once a second) and closing
                // state (FIN or RST) up to date.
                if c.nat_refresh || pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) != 0 {
                    nat::note_forward(pkt, b, &src, c.now);
                }
                src
            }
            None => match nat::allocate(ctx, pkt, b, settings, scheduling_hash(pkt, vip), c.now) {
                Some(s) => s,
                None => return Err(log::dropped(pkt, verdict::NAT_NO_PORT, id)),
            },
        };
        let bport = nat::backend_port(pkt, b);
        if nat::rewrite(ctx, pkt, &src.addr, src.port, &b.addr, bport).is_err()
            || forward::set_macs(ctx, hop).is_err()
        {
            return Err(log::dropped(pkt, verdict::INTERNAL, id));
        }
        return Ok((src.idx, src.port));
    }
    if vip.flags & VIP_F_IPIP != 0 {
        // Too big once encapsulated: tell the client (path-MTU discovery)
        // rather than drop it silently.
        let gue = vip.flags & VIP_F_GUE != 0;
        let outer = if pkt.family == lb_common::AF_INET {
            20
        } else {
            40
        } + if gue {
            encap::gue_overhead(pkt.family, c.second != 0)
        } else {
            0
        };
        if settings.ipip_mtu != 0 && pkt.ip_len > settings.ipip_mtu.saturating_sub(outer) {
            if let Some(n) = maps::TOO_BIG_NOTE.get_ptr_mut(0) {
                // SAFETY: this CPU's slot, read by `lb_too_big` next.
                unsafe { *n = outer };
            }
            // The error is built by a program of its own (`lb_too_big`),
            // which counts it: its headers do not fit this one's stack.
            // SAFETY: tail call into a program of the same type; with an
            // empty slot it falls through and the packet is dropped.
            unsafe { maps::ICMP_JUMP.tail_call(ctx, 0) };
            return Err(log::dropped(pkt, verdict::TOO_BIG, id));
        }
        seen.ipip(gue);
        if c.second != 0 {
            seen.second_hop(c.second);
        }
        // The outer source varies per flow with the table hash, so a
        // receiver's RSS spreads flows (of one client too) over its queues.
        let flow_hash = if found.use_table {
            found.probe.hash
        } else {
            table::probe(&pkt.key).hash
        };
        if encap::encap(
            ctx,
            &encap::Inner::of(pkt),
            b,
            settings,
            flow_hash,
            hop,
            gue,
            if c.second != 0 {
                backend(c.second)
            } else {
                None
            },
        )
        .is_err()
        {
            return Err(log::dropped(pkt, verdict::ENCAP_FAILED, id));
        }
        return Ok((0, 0));
    }
    if forward::set_macs(ctx, hop).is_err() {
        return Err(log::dropped(pkt, verdict::INTERNAL, id));
    }
    Ok((0, 0))
}

/// Records a new flow in the connection table (a full set replaces a slot
/// not recently used: see `table`) with its least-connections count, and
/// uncounts the rescheduled flow's old backend. A NAT flow is always
/// recorded (without its entry the next packet would get another port):
/// the flood guard spares NAT VIPs.
#[inline(always)]
fn record(pkt: &Packet, found: &Found, c: &mut Choice, nat_src: (u16, u16)) {
    let vip = &found.vip;
    let nat_vip = vip.flags & VIP_F_NAT != 0;
    // A flow sent with a second hop may be the previous ring's backend's:
    // recorded, it would be kept on the first hop after the previous ring
    // expires (its packets carry both until then).
    if !c.new_flow
        || !found.use_table
        || pkt.icmp_error
        || c.second != 0
        || !(nat_vip || may_record_flow())
    {
        return;
    }
    if c.now == 0 && vip.idle_timeout_s != 0 {
        c.now = now_s();
    }
    let count =
        vip.scheduler == SCHED_LEAST_CONN && pkt.tcp_flags & (parse::TCP_FIN | parse::TCP_RST) == 0;
    let flow = Flow {
        backend_id: c.id,
        vip_id: vip.vip_id as u16,
        flags: if count { FLOW_F_COUNTED } else { 0 }
            | if pkt.key.proto == PROTO_TCP
                && pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN
            {
                FLOW_F_OPENING | c.carry
            } else {
                0
            },
        last_seen_s: c.now,
        nat_addr: nat_src.0,
        nat_port: nat_src.1,
    };
    table::insert(found.probe.base, found.probe.tag, &pkt.key, &flow);
    if count {
        active_add(c.id, 1);
    }
    if let Some(old) = c.uncount {
        active_add(old, u64::MAX);
    }
}

/// A packet to no VIP that passed the address filter: a backend's reply
/// to a NAT flow is translated back to its client (source: the VIP) and
/// sent out where the client's packet came in; anything else passes.
#[inline(always)]
fn nat_reply(ctx: &XdpContext, pkt: &Packet) -> Verdict {
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
