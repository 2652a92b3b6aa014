//! The second chance on a backend host (`lb_decap`): a GUE packet that
//! names a second hop (the balancer's previous ring placed the flow on
//! another backend, see `sched::second_hop`) is delivered here when this
//! host has a connection for it, and otherwise forwarded, once, to the
//! second hop, with the hop removed from its GUE header (so the second hop
//! delivers it whatever it finds: a packet no hop knows reaches one stack,
//! which answers with a reset, and never loops).
//!
//! "A connection for it" is what the kernel would deliver the packet to:
//! `bpf_skc_lookup_tcp` finds established, request (`SYN_RECV`) and
//! time-wait sockets; a listener alone counts only for the handshake's ACK
//! of a SYN cookie (`bpf_tcp_check_syncookie`). A SYN (without ACK) always
//! opens here: the balancer sent it where its current ring says. Anything
//! but TCP is delivered here: a UDP socket cannot tell whose a datagram's
//! "flow" is (an unconnected server socket takes every client), and the
//! balancer names no second hop for UDP.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, tcphdr, xdp_action},
    cty::c_void,
    helpers::generated::{
        bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
        bpf_xdp_adjust_head,
    },
    programs::XdpContext,
};
use lb_common::{GUE_HOP_V4, GUE_OVERHEAD};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    forward::{self, Ipv4Out, write_ipv4},
    parse::{IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, Tunnel, ptr_at},
};

/// `TCP_LISTEN` in `bpf_sock::state`.
const TCP_LISTEN: u32 = 10;
/// `BPF_F_CURRENT_NETNS`: the namespace of the receiving device.
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether tunnel `t` (naming a second hop) is this host's to deliver: not
/// TCP, a SYN, or a connection found here (see the module).
#[inline(always)]
pub(crate) fn is_local(ctx: &XdpContext, t: &Tunnel) -> Result<bool, ()> {
    let inner = t.l3_off + t.outer_len;
    if t.hop_len == GUE_HOP_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, inner)?;
        // SAFETY: ptr_at checked the bounds.
        let (vihl, proto, src, dst) =
            unsafe { ((*ip).vihl, (*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
        let ihl = usize::from(vihl & 0x0f) * 4;
        if proto != IPPROTO_TCP || ihl < Ipv4Hdr::LEN {
            return Ok(true);
        }
        let th = inner + ihl;
        let Some((ports, flags, doff)) = tcp(ctx, th)? else {
            return Ok(true);
        };
        // SAFETY: a plain-data union, zeroed, then its IPv4 half written.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        unsafe {
            let v4 = &mut tuple.__bindgen_anon_1.ipv4;
            v4.saddr = u32::from_ne_bytes(src);
            v4.daddr = u32::from_ne_bytes(dst);
            v4.sport = ports[0];
            v4.dport = ports[1];
        }
        Ok(found(ctx, &mut tuple, 12, flags, |sk| {
            cookie::<{ Ipv4Hdr::LEN }>(ctx, sk, inner, th, doff)
        }))
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, inner)?;
        // SAFETY: ptr_at checked the bounds.
        let (next, src, dst) = unsafe { ((*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
        // (Extension headers: delivered here, as anything but TCP.)
        if next != IPPROTO_TCP {
            return Ok(true);
        }
        let th = inner + Ipv6Hdr::LEN;
        let Some((ports, flags, doff)) = tcp(ctx, th)? else {
            return Ok(true);
        };
        let w = |a: [u8; 16]| {
            // SAFETY: [u8; 16] and [u32; 4] have the same size, every bit
            // pattern valid for both.
            unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(a) }
        };
        // SAFETY: as for IPv4.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        unsafe {
            let v6 = &mut tuple.__bindgen_anon_1.ipv6;
            v6.saddr = w(src);
            v6.daddr = w(dst);
            v6.sport = ports[0];
            v6.dport = ports[1];
        }
        Ok(found(ctx, &mut tuple, 36, flags, |sk| {
            cookie::<{ Ipv6Hdr::LEN }>(ctx, sk, inner, th, doff)
        }))
    }
}

/// The TCP header at `th`: its ports (network order, as the socket tuple
/// holds them), flags and data offset in 32-bit words; `None` for a SYN
/// (delivered here).
#[inline(always)]
fn tcp(ctx: &XdpContext, th: usize) -> Result<Option<([u16; 2], u8, u8)>, ()> {
    let h: *const [u8; 20] = ptr_at(ctx, th)?;
    // SAFETY: ptr_at checked the bounds.
    let h = unsafe { *h };
    let flags = h[13];
    if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Ok(None);
    }
    let ports = [
        u16::from_ne_bytes([h[0], h[1]]),
        u16::from_ne_bytes([h[2], h[3]]),
    ];
    Ok(Some((ports, flags, h[12] >> 4)))
}

/// Looks the tuple up among this namespace's TCP sockets: anything but a
/// listener is a connection; a listener is one for a valid SYN cookie's
/// ACK (`cookie`).
#[inline(always)]
fn found(
    ctx: &XdpContext,
    tuple: &mut bpf_sock_tuple,
    size: u32,
    flags: u8,
    cookie: impl FnOnce(*mut bpf_sock) -> bool,
) -> bool {
    // SAFETY: the tuple is on our stack, `size` bytes of it the family's
    // half; the helper returns a referenced socket or null.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.ctx.cast(), tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket the helper returned (`state` is readable on any).
    let state = unsafe { (*sk).state };
    let local = state != TCP_LISTEN || (flags & TCP_ACK != 0 && cookie(sk));
    // SAFETY: released once, on every path.
    unsafe { bpf_sk_release(sk.cast()) };
    local
}

/// Whether the ACK at `th` (`doff` words of TCP header) answers a SYN
/// cookie of listener `sk`. The helper wants the header's exact length as
/// a constant the verifier can check against the packet: one call per
/// possible length.
#[inline(always)]
fn cookie<const IP: usize>(
    ctx: &XdpContext,
    sk: *mut bpf_sock,
    ip: usize,
    th: usize,
    doff: u8,
) -> bool {
    match doff {
        5 => cookie_n::<IP, 20>(ctx, sk, ip, th),
        6 => cookie_n::<IP, 24>(ctx, sk, ip, th),
        7 => cookie_n::<IP, 28>(ctx, sk, ip, th),
        8 => cookie_n::<IP, 32>(ctx, sk, ip, th),
        9 => cookie_n::<IP, 36>(ctx, sk, ip, th),
        10 => cookie_n::<IP, 40>(ctx, sk, ip, th),
        11 => cookie_n::<IP, 44>(ctx, sk, ip, th),
        12 => cookie_n::<IP, 48>(ctx, sk, ip, th),
        13 => cookie_n::<IP, 52>(ctx, sk, ip, th),
        14 => cookie_n::<IP, 56>(ctx, sk, ip, th),
        15 => cookie_n::<IP, 60>(ctx, sk, ip, th),
        _ => false,
    }
}

#[inline(always)]
fn cookie_n<const IP: usize, const TH: usize>(
    ctx: &XdpContext,
    sk: *mut bpf_sock,
    ip: usize,
    th: usize,
) -> bool {
    let (Ok(iph), Ok(tcph)) = (ptr_at::<[u8; IP]>(ctx, ip), ptr_at::<[u8; TH]>(ctx, th)) else {
        return false;
    };
    // SAFETY: both ranges checked by ptr_at; the helper only reads them.
    unsafe {
        bpf_tcp_check_syncookie(
            sk.cast(),
            iph as *mut c_void,
            IP as u32,
            tcph as *mut tcphdr,
            TH as u32,
        ) == 0
    }
}

/// Forwards tunnel `t` to its second hop: the private data removed, the
/// outer destination the hop's address, the TTL one less, the MACs from
/// the kernel's FIB and neighbour table. The XDP action (`XDP_TX`, or
/// `XDP_REDIRECT` to another interface), or `None` when the hop cannot be
/// reached from here yet (no route, neighbour unresolved) or the TTL runs
/// out: the caller delivers the packet here instead.
#[inline(always)]
pub(crate) fn forward(ctx: &XdpContext, t: &Tunnel) -> Result<Option<u32>, ()> {
    // Constants per branch, for the verifier to follow through adjust_head.
    let l3 = if t.l3_off > 14 { 18 } else { 14 };
    // What the new headers keep: the L2 type (and VLAN tag), the UDP
    // source port and the GUE header's protocol.
    let l2: *const [u8; 6] = ptr_at(ctx, 12)?;
    // SAFETY: ptr_at checked the bounds (a tagged frame's tag and type;
    // the first two bytes alone otherwise).
    let l2 = unsafe { *l2 };
    // Read once: the verifier refuses a context pointer the compiler
    // offsets and keeps for later.
    let ingress = ctx.ingress_ifindex() as u32;
    if t.hop_len == GUE_HOP_V4 {
        forward_v4(ctx, ingress, l3, l2)
    } else {
        forward_v6(ctx, ingress, l3, l2)
    }
}

/// `bpf_fib_lookup`'s answers when the receiving interface does not
/// forward (`BPF_FIB_LKUP_RET_FWD_DISABLED`) and when the next hop's MAC is
/// not known (`BPF_FIB_LKUP_RET_NO_NEIGH`).
const FIB_FWD_DISABLED: i64 = 5;
const FIB_NO_NEIGH: i64 = 7;

/// The next hop towards `family`'s address `dst` (as `bpf_fib_lookup`'s
/// `ipv4_dst`/`ipv6_dst` words): (destination MAC, source MAC, ifindex).
/// A backend host seldom forwards (`net.ipv4.conf.*.forwarding` is off,
/// and on for IPv6 it would stop taking router advertisements), and the
/// kernel's FIB lookup then refuses; nor has it often talked to the other
/// backends (no neighbour entry, which XDP cannot ask for). Either way the
/// packet goes back to the L2 hop it came from (the router, or the
/// balancer's host), which routes it on. `None`: no route to the hop.
#[inline(always)]
fn next_hop(
    ctx: &XdpContext,
    ingress: u32,
    v4: bool,
    dst: [u32; 4],
    tot_len: u16,
) -> Option<([u8; 6], [u8; 6], u32)> {
    match forward::fib_lookup(ctx, ingress, v4, dst, tot_len) {
        (0, Some(h)) => Some((h.dmac, h.smac, h.ifindex)),
        (FIB_FWD_DISABLED | FIB_NO_NEIGH, _) => {
            let e: *const [u8; 12] = ptr_at(ctx, 0).ok()?;
            // SAFETY: ptr_at checked the bounds.
            let e = unsafe { *e };
            let (mut from, mut us) = ([0u8; 6], [0u8; 6]);
            from.copy_from_slice(&e[6..12]);
            us.copy_from_slice(&e[..6]);
            Some((from, us, ingress))
        }
        _ => None,
    }
}

/// `XDP_TX` back out of the receiving interface, else a redirect.
#[inline(always)]
fn send(ingress: u32, ifindex: u32) -> u32 {
    if ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Drops `by` bytes from the packet's head.
#[inline(always)]
fn shrink(ctx: &XdpContext, by: usize) -> Result<(), ()> {
    // SAFETY: every pointer is re-derived from ctx afterwards.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, by as i32) };
    if rc != 0 { Err(()) } else { Ok(()) }
}

/// Writes the Ethernet header (and VLAN tag) of a forwarded packet.
#[inline(always)]
fn write_l2(
    ctx: &XdpContext,
    l3: usize,
    dmac: [u8; 6],
    smac: [u8; 6],
    l2: [u8; 6],
) -> Result<(), ()> {
    let e: *mut [u8; 14] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let e = e as *mut u8;
        (e as *mut [u8; 6]).write_unaligned(dmac);
        (e.add(6) as *mut [u8; 6]).write_unaligned(smac);
        (e.add(12) as *mut [u8; 2]).write_unaligned([l2[0], l2[1]]);
    }
    if l3 > 14 {
        let tag: *mut [u8; 4] = ptr_at(ctx, 14)?;
        // SAFETY: ptr_at checked the bounds.
        unsafe { *tag = [l2[2], l2[3], l2[4], l2[5]] };
    }
    Ok(())
}

/// The UDP and GUE headers of a forwarded packet: no private data.
#[inline(always)]
fn write_udp_gue(
    ctx: &XdpContext,
    off: usize,
    udp: [u8; GUE_OVERHEAD],
    len: u16,
) -> Result<(), ()> {
    let h: *mut [u8; GUE_OVERHEAD] = ptr_at(ctx, off)?;
    let l = len.to_be_bytes();
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        *h = [
            udp[0], udp[1], udp[2], udp[3], l[0], l[1], 0, 0, 0, udp[9], 0, 0,
        ];
    }
    Ok(())
}

#[inline(always)]
fn forward_v4(ctx: &XdpContext, ingress: u32, l3: usize, l2: [u8; 6]) -> Result<Option<u32>, ()> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: ptr_at checked the bounds.
    let (tos, ttl, src, tot_len) = unsafe {
        (
            (*ip).tos,
            (*ip).ttl,
            (*ip).src_addr,
            u16::from_be_bytes((*ip).tot_len),
        )
    };
    let udp: *const [u8; GUE_OVERHEAD] = ptr_at(ctx, l3 + Ipv4Hdr::LEN)?;
    let hop: *const [u8; 4] = ptr_at(ctx, l3 + Ipv4Hdr::LEN + GUE_OVERHEAD + 4)?;
    // SAFETY: ptr_at checked the bounds.
    let (udp, hop) = unsafe { (*udp, *hop) };
    let tot_len = tot_len.wrapping_sub(GUE_HOP_V4 as u16);
    if ttl <= 1 {
        return Ok(None);
    }
    let Some((dmac, smac, ifindex)) = next_hop(
        ctx,
        ingress,
        true,
        [u32::from_ne_bytes(hop), 0, 0, 0],
        tot_len,
    ) else {
        return Ok(None);
    };
    shrink(ctx, GUE_HOP_V4)?;
    write_l2(ctx, l3, dmac, smac, l2)?;
    write_ipv4(
        ctx,
        l3,
        &Ipv4Out {
            tos,
            tot_len,
            ttl: ttl - 1,
            proto: IPPROTO_UDP,
            src,
            dst: hop,
        },
    )?;
    write_udp_gue(
        ctx,
        l3 + Ipv4Hdr::LEN,
        udp,
        tot_len.wrapping_sub(Ipv4Hdr::LEN as u16),
    )?;
    Ok(Some(send(ingress, ifindex)))
}

#[inline(always)]
fn forward_v6(ctx: &XdpContext, ingress: u32, l3: usize, l2: [u8; 6]) -> Result<Option<u32>, ()> {
    let hop_len = lb_common::GUE_HOP_V6;
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: ptr_at checked the bounds.
    let (vcf, hops, src, payload) = unsafe {
        (
            (*ip).vcf,
            (*ip).hop_limit,
            (*ip).src_addr,
            u16::from_be_bytes((*ip).payload_len),
        )
    };
    let udp: *const [u8; GUE_OVERHEAD] = ptr_at(ctx, l3 + Ipv6Hdr::LEN)?;
    let hop: *const [u8; 16] = ptr_at(ctx, l3 + Ipv6Hdr::LEN + GUE_OVERHEAD + 4)?;
    // SAFETY: ptr_at checked the bounds.
    let (udp, hop) = unsafe { (*udp, *hop) };
    let payload = payload.wrapping_sub(hop_len as u16);
    if hops <= 1 {
        return Ok(None);
    }
    // SAFETY: same size, every bit pattern valid for both.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(hop) };
    let Some((dmac, smac, ifindex)) =
        next_hop(ctx, ingress, false, words, payload + Ipv6Hdr::LEN as u16)
    else {
        return Ok(None);
    };
    shrink(ctx, hop_len)?;
    write_l2(ctx, l3, dmac, smac, l2)?;
    let out: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: ptr_at checked the bounds (after adjust_head).
    unsafe {
        (*out).vcf = vcf;
        (*out).payload_len = payload.to_be_bytes();
        (*out).next_hdr = IPPROTO_UDP;
        (*out).hop_limit = hops - 1;
        forward::put_addr::<4>((&raw mut (*out).src_addr).cast(), &src);
        forward::put_addr::<4>((&raw mut (*out).dst_addr).cast(), &hop);
    }
    write_udp_gue(ctx, l3 + Ipv6Hdr::LEN, udp, payload)?;
    Ok(Some(send(ingress, ifindex)))
}
