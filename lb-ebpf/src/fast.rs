//! The established path: a packet of a flow the connection table already
//! holds, or of a VIP that keeps no table, forwarded as the staged balancer
//! (`balance`) would forward it, without its general machinery. Most of a
//! balancer's packets are these.
//!
//! It reads the headers it needs straight into registers (`tuple`: no
//! `Packet`, no key on the stack); finds the flow's slot comparing the slot's words with
//! them ([`established`]), or schedules a table-less VIP's packet on its
//! ring ([`stateless`]); and rewrites (L2 DSR, IPIP or GUE). A filter says
//! where to look (`VIP_FAST_FILTER`: per address and port, a bit for each
//! kind, full-NAT VIPs in neither). Why: the staged balancer,
//! stopped after each stage and timed (`LB_PROFILE`, an established IPv4
//! dsr packet, swap-MACs floor 30 ns), took 45 ns to the end of the parse
//! and the filters, 30 ns more to find the flow and its VIP (13 of them in
//! the table lookup) and 20 ns more to send: a general `Packet` carried
//! through general stages, its key stored and read back around every map
//! lookup (BPF calls leave four registers to keep values in).
//!
//! A TCP SYN (without ACK) to a VIP with a table is scheduled and
//! recorded here too ([`opening`]), as the staged balancer does it.
//!
//! It takes a packet only where the answer is the staged balancer's own,
//! and hands back (`None`, before touching the packet) everything else:
//! not Ethernet + IPv4 without options / IPv6 without extension headers +
//! TCP or UDP; for a VIP with a table, a FIN or RST (they close flows), a
//! SYN to a least-connections VIP (its counts) or of a flow counted there,
//! a non-SYN without an entry (a new flow, recorded there), or one still
//! opening (`FLOW_F_OPENING`); no live backend; a VIP that
//! moved, a full-NAT VIP, an idle flow past its timeout, a backend down or
//! without a next-hop MAC, `next_hop = "fib"`, a packet too big to
//! encapsulate. Every one of those is the staged balancer's, which then
//! parses the packet as before. `lb trace` runs the staged balancer alone
//! (its traced copy), so a trace shows every packet's stages.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    AF_INET, Backend, FLOW_F_COUNTED, FLOW_F_OPENING, FLOW_F_SIGNALLED, Flow, PROTO_TCP,
    SCHED_LEAST_CONN, SETTINGS_F_FIB, VIP_F_GUE, VIP_F_HASH_SRC_IP, VIP_F_IPIP, VIP_F_NAT,
    VIP_F_NO_FLOW_TABLE, VIP_F_SECOND_CHANCE, flow_set_base, flow_tag_folded, hash, verdict,
};
use network_types::eth::EthHdr;

use crate::{
    dir::{lookup_vip_by, vip_by_id},
    encap::{self, Inner},
    flow::{may_record_flow, now_s},
    forward::{self, Hop},
    log,
    maps::{SETTINGS, flow_sets},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    sched::{Ring, backend, ring_for_src, schedule, second_hop, vip_ring},
    send_or, signal, stats, table,
    tuple::{KeyWords, Tuple, V4_MIN, read_v4, read_v6},
    vip::maybe_fast_vip,
};

/// The verdict reason and XDP action of an established packet forwarded
/// here, or `None`: the staged balancer's (see the module).
#[inline(always)]
pub(crate) fn forward(ctx: &XdpContext, folded_dst: u32) -> Option<(u32, u32)> {
    // One bounds check for the shortest packet taken here (Ethernet, IPv4,
    // the first 20 bytes of TCP or UDP); each family checks its own below.
    let p: *const [u8; V4_MIN] = ptr_at(ctx, 0).ok()?;
    let p = p as *const u8;
    // SAFETY: ptr_at checked the bounds. (Compared in network order.)
    let ether_type = unsafe { (p.add(12) as *const u16).read_unaligned() };
    // One copy of the rest per family: an IPv4 tuple's zero words are
    // then constants, not values the rest carries.
    if ether_type == 0x0800u16.to_be() {
        forward_flow(ctx, &read_v4(ctx, p)?, folded_dst)
    } else if ether_type == 0x86ddu16.to_be() {
        forward_flow(ctx, &read_v6(ctx)?, folded_dst)
    } else {
        None
    }
}

/// The backend a packet goes to, as [`established`] or [`stateless`] found
/// it, and what sending needs of its VIP.
struct Target {
    vip_id: u32,
    vip_flags: u32,
    id: u32,
    backend: &'static Backend,
    /// Scheduled for this packet (a VIP without a table): counted as a new
    /// flow, as the staged balancer counts it.
    new_flow: bool,
    /// The second chance's second hop (`sched::second_hop`).
    second: Option<&'static Backend>,
}

/// Finds the packet's backend (its flow's entry, or the ring of a VIP
/// without a table) and forwards the packet there, or `None` (see the
/// module).
#[inline(always)]
fn forward_flow(ctx: &XdpContext, t: &Tuple, folded_dst: u32) -> Option<(u32, u32)> {
    // (An address can carry both kinds, on other ports or as an every-port
    // VIP: a flow not in the table may still be a stateless VIP's.)
    // The VIP's own port first; the every-port slot (port 0) only when
    // that answers no (an established flow of a port VIP reads one word).
    let (table, no_table) = maybe_fast_vip(folded_dst, t.dport());
    let (table0, no_table0) = if table {
        (false, false)
    } else {
        maybe_fast_vip(folded_dst, 0)
    };
    // A SYN, FIN or RST to a VIP with a table is the staged balancer's
    // (before any hashing: a SYN flood pays for nothing here).
    let opens_or_closes = t.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    if (table || table0) && !opens_or_closes {
        let h = t.table_hash();
        if let Some(e) = established(t, h, folded_dst) {
            return send_to(ctx, t, h, &e);
        }
    } else if (table || table0)
        && t.proto == PROTO_TCP
        && t.tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
    {
        return opening(ctx, t, folded_dst);
    }
    // (Here a port VIP with a table may still share its address with an
    // every-port VIP without one.)
    let no_table = no_table || no_table0 || (table && maybe_fast_vip(folded_dst, 0).1);
    if !no_table {
        return None;
    }
    let th = t.table_hash();
    let target = stateless(t, th)?;
    // The outer source of an encapsulation varies with the same hash.
    let h = if target.vip_flags & VIP_F_IPIP != 0 {
        th
    } else {
        0
    };
    send_to(ctx, t, h, &target)
}

/// The flow's entry in the connection table (`h`: the table hash), if it
/// is established (not opening; the caller took no SYN, FIN or RST) and
/// its VIP and backend still stand; refreshes its idle clock.
#[inline(always)]
fn established(t: &Tuple, h: u32, folded_dst: u32) -> Option<Target> {
    let tag = flow_tag_folded(h, folded_dst);
    let (s, word) = table::find(flow_set_base(h, flow_sets()), tag, |k| t.is_key(k))?;
    let f = table::flow_of(s);
    // SAFETY: a pointer into the slot's map value (see `table`).
    let (vip_id, flags, last) = unsafe { ((*f).vip_id, (*f).flags, (*f).last_seen_s) };
    if flags & (FLOW_F_OPENING | FLOW_F_SIGNALLED) != 0 {
        return None;
    }
    let vip = vip_by_id(u32::from(vip_id), t.family, t.proto, t.dport(), &t.dst)?;
    let (vip_id, vip_flags, idle) = (vip.vip_id, vip.flags, vip.idle_timeout_s);
    if vip_flags & VIP_F_NAT != 0 {
        return None;
    }
    let id = (word >> 32) as u32;
    let b = backend(id)?;
    if idle != 0 {
        let now = now_s();
        if now.saturating_sub(last) > idle {
            // Idle past the VIP's timeout: rescheduled.
            return None;
        }
        if now != last {
            // SAFETY: as above; a concurrent writer can at worst make a
            // packet reschedule its flow (see `balance::choose`).
            unsafe { (*f).last_seen_s = now };
        }
    }
    Some(Target {
        vip_id,
        vip_flags,
        id,
        backend: b,
        new_flow: false,
        second: None,
    })
}

/// Schedules the packet's flow as `balance::choose` does: the scheduling
/// hash (the client address alone for source-ip hashing; else the flow's
/// hash, `th`: `hash::hash_5tuple` is the table hash), the VIP's or its
/// client's region's ring, the VIP's scheduler; a region with no live
/// backend falls back to the whole VIP. (The ring used, the hash, the
/// backend.)
#[inline(always)]
fn schedule_flow(
    t: &Tuple,
    th: u32,
    vip: &lb_common::VipMeta,
) -> Option<(Ring, u32, (u32, &'static Backend))> {
    let src = t.src_bytes();
    let h = if vip.flags & VIP_F_HASH_SRC_IP != 0 {
        hash::hash_src(&src)
    } else {
        th
    };
    let ring = ring_for_src(&src, vip);
    match schedule(vip, &ring, h) {
        Some(c) => Some((ring, h, c)),
        None if ring.id != vip.vip_id => {
            let whole = vip_ring(vip);
            let c = schedule(vip, &whole, h)?;
            Some((whole, h, c))
        }
        None => None,
    }
}

/// A TCP SYN (without ACK) to a VIP with a connection table: scheduled
/// and recorded as the staged balancer does it (`balance::choose` and
/// `record`: the VIP from the directory, its ring and scheduler; the entry
/// written after the packet is rewritten, unless the flood guard says no;
/// a SYN again for a flow still opening signalled once per attempt), or
/// `None` (handed back, nothing written): full NAT, least connections (its
/// counts), an entry that counts for least connections, and whatever
/// [`send_to`] hands back.
#[inline(always)]
fn opening(ctx: &XdpContext, t: &Tuple, folded_dst: u32) -> Option<(u32, u32)> {
    let vip = lookup_vip_by(&t.dst, t.dport(), t.proto, t.family)?;
    if vip.flags & (VIP_F_NAT | VIP_F_NO_FLOW_TABLE) != 0 || vip.scheduler == SCHED_LEAST_CONN {
        return None;
    }
    let th = t.table_hash();
    let (base, tag) = (
        flow_set_base(th, flow_sets()),
        flow_tag_folded(th, folded_dst),
    );
    let mut carry = 0;
    if let Some((s, word)) = table::find(base, tag, |k| t.is_key(k)) {
        let f = table::flow_of(s);
        // SAFETY: a pointer into the slot's map value (see `table`).
        let flags = unsafe { (*f).flags };
        if flags & FLOW_F_COUNTED != 0 {
            return None;
        }
        if flags & FLOW_F_OPENING != 0 {
            // The client's SYN again: no SYN-ACK reached it.
            if flags & FLOW_F_SIGNALLED == 0 {
                let mut key = core::mem::MaybeUninit::uninit();
                let key = KeyWords::fill(&mut key, t);
                signal::syn_again((word >> 32) as u32, t.family, key.key());
            }
            carry = FLOW_F_SIGNALLED;
        }
    }
    let (_, _, (id, b)) = schedule_flow(t, th, vip)?;
    let (vip_id, idle) = (vip.vip_id, vip.idle_timeout_s);
    let target = Target {
        vip_id,
        vip_flags: vip.flags,
        id,
        backend: b,
        new_flow: true,
        second: None,
    };
    let outer = if vip.flags & VIP_F_IPIP != 0 { th } else { 0 };
    let sent = send_to(ctx, t, outer, &target)?;
    if (sent.0 == verdict::TX || sent.0 == verdict::REDIRECT) && may_record_flow() {
        let mut key = core::mem::MaybeUninit::uninit();
        let key = KeyWords::fill(&mut key, t);
        let flow = Flow {
            backend_id: id,
            vip_id: vip_id as u16,
            flags: FLOW_F_OPENING | carry,
            last_seen_s: if idle != 0 { now_s() } else { 0 },
            nat_addr: 0,
            nat_port: 0,
        };
        table::insert(base, tag, key.key(), &flow);
    }
    Some(sent)
}

/// The backend of a packet to a VIP without a connection table (not full
/// NAT): its VIP from the directory, its backend from the VIP's (or its
/// client's region's) ring, with the VIP's scheduler, as
/// `balance::choose` schedules it (`th`: the flow's hash). (A round-robin
/// VIP's packet that [`send_to`] then hands back, e.g. for want of a
/// next-hop MAC, moves this CPU's position twice: the general balancer
/// schedules it again.)
#[inline(always)]
fn stateless(t: &Tuple, th: u32) -> Option<Target> {
    let vip = lookup_vip_by(&t.dst, t.dport(), t.proto, t.family)?;
    if vip.flags & VIP_F_NAT != 0 || vip.flags & VIP_F_NO_FLOW_TABLE == 0 {
        return None;
    }
    let (ring, h, (id, b)) = schedule_flow(t, th, vip)?;
    // A TCP packet that does not open a connection may belong to one the
    // previous ring placed (the second chance); a SYN opens where the
    // ring says, and UDP has no connection to look for.
    let second = if vip.flags & VIP_F_SECOND_CHANCE != 0
        && t.proto == PROTO_TCP
        && t.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
    {
        second_hop(vip, &ring, h, id).map(|s| s.1)
    } else {
        None
    };
    Some(Target {
        vip_id: vip.vip_id,
        vip_flags: vip.flags,
        id,
        backend: b,
        new_flow: true,
        second,
    })
}

/// Rewrites the packet for `to` (L2 DSR, or IPIP / GUE with `h` in the
/// outer source) and sends it, counted; `None` where the staged balancer
/// answers otherwise (no next-hop MAC, `next_hop = "fib"`, too big to
/// encapsulate).
#[inline(always)]
fn send_to(ctx: &XdpContext, t: &Tuple, h: u32, to: &Target) -> Option<(u32, u32)> {
    let (b, id) = (to.backend, to.id);
    let settings = SETTINGS.get(0)?;
    if settings.flags & SETTINGS_F_FIB != 0 || b.dst_mac == [0; 6] {
        return None;
    }
    let ipip = to.vip_flags & VIP_F_IPIP != 0;
    let gue = to.vip_flags & VIP_F_GUE != 0;
    if ipip && settings.ipip_mtu != 0 {
        let outer = if t.family == AF_INET { 20 } else { 40 }
            + if gue {
                encap::gue_overhead(t.family, to.second.is_some())
            } else {
                0
            };
        if t.ip_len > settings.ipip_mtu.saturating_sub(outer) {
            // Answered with ICMP too-big by the staged balancer.
            return None;
        }
    }
    let fail = |reason| log::dropped_flow(&t.key(), t.family, reason, id);
    if ipip {
        let inner = Inner {
            family: t.family,
            l3_off: EthHdr::LEN,
            ip_len: t.ip_len,
        };
        let hop = Hop {
            dmac: b.dst_mac,
            smac: b.src_mac,
            ifindex: b.ifindex,
        };
        if encap::encap(ctx, &inner, b, settings, h, &hop, gue, to.second).is_err() {
            return Some(fail(verdict::ENCAP_FAILED));
        }
    } else if forward::write_macs(ctx, &b.dst_mac, &b.src_mac).is_err() {
        // (From the entry straight into the packet: a `Hop` on the stack
        // would copy both addresses twice, a byte at a time.)
        return Some(fail(verdict::INTERNAL));
    }
    stats::traffic(
        to.vip_id,
        id,
        (ctx.data_end() - ctx.data()) as u64,
        to.new_flow,
    );
    Some(send_or(
        ctx,
        b.ifindex,
        verdict::TX,
        verdict::REDIRECT,
        || fail(verdict::REDIRECT_FAILED),
    ))
}
