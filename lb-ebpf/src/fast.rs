//! The established path: a packet of a flow the connection table already
//! holds, forwarded as the staged balancer (`balance`) would forward it,
//! without its general machinery. Most of a balancer's packets are these.
//!
//! It reads the headers it needs straight into registers (no `Packet`, no
//! key on the stack), finds the flow's slot comparing the slot's words with
//! them, and rewrites (L2 DSR, IPIP or GUE). Why: the staged balancer,
//! stopped after each stage and timed (`LB_PROFILE`, an established IPv4
//! dsr packet, swap-MACs floor 30 ns), took 45 ns to the end of the parse
//! and the filters, 30 ns more to find the flow and its VIP (13 of them in
//! the table lookup) and 20 ns more to send: a general `Packet` carried
//! through general stages, its key stored and read back around every map
//! lookup (BPF calls leave four registers to keep values in).
//!
//! It takes a packet only where the answer is the staged balancer's own,
//! and hands back (`None`, before touching the packet) everything else:
//! not Ethernet + IPv4 without options / IPv6 without extension headers +
//! TCP or UDP; a TCP SYN, FIN or RST (they open, reschedule or close
//! flows); no entry, or one still opening (`FLOW_F_OPENING`); a VIP that
//! moved, a full-NAT VIP, an idle flow past its timeout, a backend down or
//! without a next-hop MAC, `next_hop = "fib"`, a packet too big to
//! encapsulate. Every one of those is the staged balancer's, which then
//! parses the packet as before. `lb trace` runs the staged balancer alone
//! (its traced copy), so a trace shows every packet's stages.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    AF_INET, AF_INET6, FLOW_F_OPENING, FLOW_F_SIGNALLED, FlowKey, GUE_OVERHEAD, PROTO_TCP,
    PROTO_UDP, SETTINGS_F_FIB, VIP_F_GUE, VIP_F_IPIP, VIP_F_NAT, flow_set_base, flow_tag_folded,
    hash, verdict,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    flow::now_s,
    forward::{self, Hop, Inner},
    log,
    maps::{SETTINGS, flow_sets},
    parse::{TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    sched::backend,
    send_or, stats, table,
    vip::{maybe_fast_vip, vip_by_id},
};

/// A flow as its headers name it, in the connection table's words: the
/// addresses as four words each (an IPv4 address in the first, the others
/// zero, as `FlowKey` holds it), the ports as `FlowKey`'s ninth word
/// (source port in the low half, both in host order).
struct Tuple {
    family: u8,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    ports: u32,
    /// Bytes from the IP header to the end of the IP packet.
    ip_len: u16,
}

impl Tuple {
    #[inline(always)]
    fn dport(&self) -> u16 {
        (self.ports >> 16) as u16
    }

    /// The key as `FlowKey` (for the drop log only).
    #[inline(always)]
    fn key(&self) -> FlowKey {
        let a = |w: &[u32; 4]| {
            // SAFETY: [u32; 4] and [u8; 16] have the same size, every bit
            // pattern valid for both.
            unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*w) }
        };
        FlowKey {
            src: a(&self.src),
            dst: a(&self.dst),
            sport: self.ports as u16,
            dport: self.dport(),
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// The verdict reason and XDP action of an established packet forwarded
/// here, or `None`: the staged balancer's (see the module).
#[inline(always)]
pub(crate) fn established(ctx: &XdpContext, folded_dst: u32) -> Option<(u32, u32)> {
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

/// Ethernet + IPv4 + 20 bytes (a TCP header; a UDP datagram's header and
/// 12 bytes): the shortest packet taken here. (A shorter UDP packet is the
/// staged balancer's.)
const V4_MIN: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;
/// The same for IPv6.
const V6_MIN: usize = EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN;

/// The two ports of the TCP or UDP header at `l4` (20 bytes there, checked
/// by the caller) as `Tuple::ports`, for a TCP segment without SYN, FIN or
/// RST, or a UDP datagram.
#[inline(always)]
fn ports(l4: *const u8, proto: u8) -> Option<u32> {
    if proto == PROTO_TCP {
        // SAFETY: the caller checked the bounds; byte 13 holds the flags.
        if unsafe { *l4.add(13) } & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
            return None;
        }
    } else if proto != PROTO_UDP {
        return None;
    }
    // SAFETY: as above.
    let raw = unsafe { (l4 as *const u32).read_unaligned() };
    // Each 16-bit half from network to host order.
    Some(((raw & 0x00ff_00ff) << 8) | ((raw >> 8) & 0x00ff_00ff))
}

#[inline(always)]
fn read_v4(ctx: &XdpContext, p: *const u8) -> Option<Tuple> {
    // SAFETY: within the bounds the caller checked (`V4_MIN`).
    let ip = unsafe { p.add(EthHdr::LEN) as *const Ipv4Hdr };
    // SAFETY (each read below): ptr_at checked the bounds of the header.
    let (vihl, frags, tot_len, proto) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            u16::from_be_bytes((*ip).tot_len),
            (*ip).proto,
        )
    };
    // No options, not a fragment, the whole packet there.
    if vihl != 0x45
        || frags & 0x3fff != 0
        || (tot_len as usize) < Ipv4Hdr::LEN
        || ctx.data() + EthHdr::LEN + tot_len as usize > ctx.data_end()
    {
        return None;
    }
    // SAFETY: within the bounds checked.
    let ports = ports(unsafe { p.add(EthHdr::LEN + Ipv4Hdr::LEN) }, proto)?;
    // SAFETY: as above.
    let (src, dst) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    Some(Tuple {
        family: AF_INET,
        proto,
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        ports,
        ip_len: tot_len,
    })
}

#[inline(always)]
fn read_v6(ctx: &XdpContext) -> Option<Tuple> {
    let p: *const [u8; V6_MIN] = ptr_at(ctx, 0).ok()?;
    // SAFETY: within the bounds checked.
    let ip = unsafe { (p as *const u8).add(EthHdr::LEN) as *const Ipv6Hdr };
    // SAFETY (each read below): ptr_at checked the bounds of the header.
    let (version, payload_len, proto) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len),
            (*ip).next_hdr,
        )
    };
    if version != 6
        || ctx.data() + EthHdr::LEN + Ipv6Hdr::LEN + payload_len as usize > ctx.data_end()
    {
        return None;
    }
    // SAFETY: within the bounds checked.
    let ports = ports(
        unsafe { (p as *const u8).add(EthHdr::LEN + Ipv6Hdr::LEN) },
        proto,
    )?;
    // SAFETY: as above; the addresses are read a word at a time.
    let (src, dst) = unsafe {
        let w = |a: &[u8; 16]| (a.as_ptr() as *const [u32; 4]).read_unaligned();
        (w(&(*ip).src_addr), w(&(*ip).dst_addr))
    };
    Some(Tuple {
        family: AF_INET6,
        proto,
        src,
        dst,
        ports,
        ip_len: payload_len + Ipv6Hdr::LEN as u16,
    })
}

/// Finds the flow's entry and forwards the packet to its backend, or
/// `None` (see the module).
#[inline(always)]
fn forward_flow(ctx: &XdpContext, t: &Tuple, folded_dst: u32) -> Option<(u32, u32)> {
    if !maybe_fast_vip(folded_dst, t.dport()) {
        return None;
    }
    // The staged balancer's table hash (`table::probe`) of the same key.
    let fold = |a: &[u32; 4]| a[0] ^ a[1] ^ a[2] ^ a[3];
    let h = hash::table_hash(fold(&t.src), t.ports as u16, t.dport(), t.proto);
    let tag = flow_tag_folded(h, folded_dst);
    let (s, word) = table::find(flow_set_base(h, flow_sets()), tag, |k| {
        let w = |i| {
            // SAFETY: `k` is a slot's 40-byte key (see `table::find`).
            unsafe { core::ptr::read_volatile(k.add(i)) }
        };
        (w(0) ^ t.src[0])
            | (w(1) ^ t.src[1])
            | (w(2) ^ t.src[2])
            | (w(3) ^ t.src[3])
            | (w(4) ^ t.dst[0])
            | (w(5) ^ t.dst[1])
            | (w(6) ^ t.dst[2])
            | (w(7) ^ t.dst[3])
            | (w(8) ^ t.ports)
            | (w(9) ^ u32::from(t.proto))
            == 0
    })?;
    let f = table::flow_of(s);
    // SAFETY: a pointer into the slot's map value (see `table`).
    let (vip_id, flags, last) = unsafe { ((*f).vip_id, (*f).flags, (*f).last_seen_s) };
    if flags & (FLOW_F_OPENING | FLOW_F_SIGNALLED) != 0 {
        return None;
    }
    let vip = vip_by_id(u32::from(vip_id), t.family, t.proto, t.dport(), &t.dst)?;
    let (vip_id, vflags, idle) = (vip.vip_id, vip.flags, vip.idle_timeout_s);
    if vflags & VIP_F_NAT != 0 {
        return None;
    }
    let id = (word >> 32) as u32;
    let b = backend(id)?;
    let settings = SETTINGS.get(0)?;
    if settings.flags & SETTINGS_F_FIB != 0 || b.dst_mac == [0; 6] {
        return None;
    }
    let ipip = vflags & VIP_F_IPIP != 0;
    let gue = vflags & VIP_F_GUE != 0;
    if ipip && settings.ipip_mtu != 0 {
        let outer =
            if t.family == AF_INET { 20 } else { 40 } + if gue { GUE_OVERHEAD as u16 } else { 0 };
        if t.ip_len > settings.ipip_mtu.saturating_sub(outer) {
            // Answered with ICMP too-big by the staged balancer.
            return None;
        }
    }
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
        if forward::encap(ctx, &inner, b, settings, h, &hop, gue).is_err() {
            return Some(fail(verdict::ENCAP_FAILED));
        }
    } else if forward::write_macs(ctx, &b.dst_mac, &b.src_mac).is_err() {
        // (From the entry straight into the packet: a `Hop` on the stack
        // would copy both addresses twice, a byte at a time.)
        return Some(fail(verdict::INTERNAL));
    }
    stats::traffic(vip_id, id, (ctx.data_end() - ctx.data()) as u64, false);
    Some(send_or(
        ctx,
        b.ifindex,
        verdict::TX,
        verdict::REDIRECT,
        || fail(verdict::REDIRECT_FAILED),
    ))
}
