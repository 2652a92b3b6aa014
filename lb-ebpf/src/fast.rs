//! The established path: a packet of a flow the connection table already
//! holds, or of a VIP that keeps no table, forwarded as the staged balancer
//! (`balance`) would forward it, without its general machinery. Most of a
//! balancer's packets are these.
//!
//! It reads the headers it needs straight into registers (no `Packet`, no
//! key on the stack); finds the flow's slot comparing the slot's words with
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
    AF_INET, AF_INET6, Backend, FLOW_F_COUNTED, FLOW_F_OPENING, FLOW_F_SIGNALLED, Flow, FlowKey,
    PROTO_TCP, PROTO_UDP, SCHED_LEAST_CONN, SETTINGS_F_FIB, VIP_F_GUE, VIP_F_HASH_SRC_IP,
    VIP_F_IPIP, VIP_F_NAT, VIP_F_NO_FLOW_TABLE, VIP_F_SECOND_CHANCE, flow_set_base,
    flow_tag_folded, hash, verdict,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    flow::{may_record_flow, now_s},
    forward::{self, Hop, Inner},
    log,
    maps::{SETTINGS, flow_sets},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    sched::{Ring, backend, ring_for_src, schedule, second_hop, vip_ring},
    send_or, signal, stats, table,
    vip::{lookup_vip_by, maybe_fast_vip, vip_by_id},
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
    /// TCP flags (0 for UDP).
    tcp_flags: u8,
    /// Bytes from the IP header to the end of the IP packet.
    ip_len: u16,
}

impl Tuple {
    #[inline(always)]
    fn dport(&self) -> u16 {
        (self.ports >> 16) as u16
    }

    /// The staged balancer's table hash (`table::probe`) of the same key:
    /// the table's set and tag, and the outer source of an encapsulation.
    #[inline(always)]
    fn table_hash(&self) -> u32 {
        let fold = |a: &[u32; 4]| a[0] ^ a[1] ^ a[2] ^ a[3];
        hash::table_hash(fold(&self.src), self.ports as u16, self.dport(), self.proto)
    }

    /// Whether the 40-byte table key at `k` is this flow's (compared as
    /// words, see `table::find`).
    #[inline(always)]
    fn is_key(&self, k: *const u32) -> bool {
        let w = |i| {
            // SAFETY: `k` is a slot's 40-byte key (see `table::find`).
            unsafe { core::ptr::read_volatile(k.add(i)) }
        };
        (w(0) ^ self.src[0])
            | (w(1) ^ self.src[1])
            | (w(2) ^ self.src[2])
            | (w(3) ^ self.src[3])
            | (w(4) ^ self.dst[0])
            | (w(5) ^ self.dst[1])
            | (w(6) ^ self.dst[2])
            | (w(7) ^ self.dst[3])
            | (w(8) ^ self.ports)
            | (w(9) ^ u32::from(self.proto))
            == 0
    }

    /// The client address as `FlowKey` holds it.
    #[inline(always)]
    fn src_bytes(&self) -> [u8; 16] {
        // SAFETY: [u32; 4] and [u8; 16] have the same size, every bit
        // pattern valid for both (the words were read from these bytes).
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.src) }
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

/// Ethernet + IPv4 + 20 bytes (a TCP header; a UDP datagram's header and
/// 12 bytes): the shortest packet taken here. (A shorter UDP packet is the
/// staged balancer's.)
const V4_MIN: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;
/// The same for IPv6.
const V6_MIN: usize = EthHdr::LEN + Ipv6Hdr::LEN + TcpHdr::LEN;

/// The two ports of the TCP or UDP header at `l4` (20 bytes there, checked
/// by the caller) as `Tuple::ports`, and the TCP flags (0 for UDP).
#[inline(always)]
fn ports(l4: *const u8, proto: u8) -> Option<(u32, u8)> {
    let flags = if proto == PROTO_TCP {
        // SAFETY: the caller checked the bounds; byte 13 holds the flags.
        unsafe { *l4.add(13) }
    } else if proto == PROTO_UDP {
        0
    } else {
        return None;
    };
    // SAFETY: as above.
    let raw = unsafe { (l4 as *const u32).read_unaligned() };
    // Each 16-bit half from network to host order.
    Some((
        ((raw & 0x00ff_00ff) << 8) | ((raw >> 8) & 0x00ff_00ff),
        flags,
    ))
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
    let (ports, tcp_flags) = ports(unsafe { p.add(EthHdr::LEN + Ipv4Hdr::LEN) }, proto)?;
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
        tcp_flags,
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
    let (ports, tcp_flags) = ports(
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
        tcp_flags,
        ip_len: payload_len + Ipv6Hdr::LEN as u16,
    })
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
    let target = stateless(t)?;
    // The outer source of an encapsulation varies with the same hash.
    let h = if target.vip_flags & VIP_F_IPIP != 0 {
        t.table_hash()
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
/// hash (the client address alone for source-ip hashing), the VIP's or its
/// client's region's ring, the VIP's scheduler; a region with no live
/// backend falls back to the whole VIP. (The ring used, the hash, the
/// backend.)
#[inline(always)]
fn schedule_flow(
    t: &Tuple,
    vip: &lb_common::VipMeta,
) -> Option<(Ring, u32, (u32, &'static Backend))> {
    let src = t.src_bytes();
    let h = if vip.flags & VIP_F_HASH_SRC_IP != 0 {
        hash::hash_src(&src)
    } else {
        hash::hash_5tuple(&src, t.ports as u16, t.dport(), t.proto)
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

/// A `FlowKey` built on the stack a word at a time: built as a struct,
/// LLVM merges its zero words into 8-byte stores at 4-aligned offsets
/// (the objects allow misaligned access), which the verifier refuses on
/// the stack.
#[repr(C, align(8))]
struct KeyWords([u32; 10]);

impl KeyWords {
    /// Writes `t`'s key into `k` in place, a word at a time (built and
    /// returned, it is copied with merged stores again).
    #[inline(always)]
    fn fill<'a>(k: &'a mut core::mem::MaybeUninit<KeyWords>, t: &Tuple) -> &'a KeyWords {
        let p = k.as_mut_ptr() as *mut u32;
        let w = [
            t.src[0],
            t.src[1],
            t.src[2],
            t.src[3],
            t.dst[0],
            t.dst[1],
            t.dst[2],
            t.dst[3],
            t.ports,
            u32::from(t.proto),
        ];
        for (i, v) in w.into_iter().enumerate() {
            // SAFETY: within the ten words; volatile so no two are merged.
            unsafe { core::ptr::write_volatile(p.add(i), v) };
        }
        // SAFETY: every word written above.
        unsafe { k.assume_init_ref() }
    }

    #[inline(always)]
    fn key(&self) -> &FlowKey {
        // SAFETY: `FlowKey` is `repr(C)`, 40 bytes of plain integers at
        // these words' offsets (as `table` compares them), alignment 4.
        unsafe { &*(self.0.as_ptr() as *const FlowKey) }
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
    let (_, _, (id, b)) = schedule_flow(t, vip)?;
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
/// `balance::choose` schedules it. (A round-robin VIP's packet that
/// [`send_to`] then hands back, e.g. for want of a next-hop MAC, moves this
/// CPU's position twice: the general balancer schedules it again.)
#[inline(always)]
fn stateless(t: &Tuple) -> Option<Target> {
    let vip = lookup_vip_by(&t.dst, t.dport(), t.proto, t.family)?;
    if vip.flags & VIP_F_NAT != 0 || vip.flags & VIP_F_NO_FLOW_TABLE == 0 {
        return None;
    }
    let (ring, h, (id, b)) = schedule_flow(t, vip)?;
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
                forward::gue_overhead(t.family, to.second.is_some())
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
        if forward::encap(ctx, &inner, b, settings, h, &hop, gue, to.second).is_err() {
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
