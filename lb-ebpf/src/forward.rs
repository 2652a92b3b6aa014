//! Header rewrites: L2 direct server return and IPIP / IP6IP6 encapsulation.
//!
//! Preconditions for both: `pkt` describes this very `ctx` (from
//! [`crate::parse::parse`], or the established path's own reading), and `b`
//! has a known next-hop MAC. On return the packet is
//! ready to leave; the caller picks `XDP_TX` or `XDP_REDIRECT`.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{AF_INET, Backend, GUE_HOP_TAG, GUE_HOP_V4, GUE_HOP_V6, GUE_OVERHEAD, Settings};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    maps::FIB_SCRATCH,
    parse::{IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, Packet, ptr_at},
};

const ENCAP_TTL: u8 = 64;

/// Where a packet leaves for: the next hop's MAC, our MAC on the egress
/// interface, and that interface (0 = the ingress one).
pub struct Hop {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub ifindex: u32,
}

/// Writes the next hop's MAC and our source MAC.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, hop: &Hop) -> Result<(), ()> {
    write_macs(ctx, &hop.dmac, &hop.smac)
}

/// Writes the Ethernet destination and source addresses.
#[inline(always)]
pub fn write_macs(ctx: &XdpContext, dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // Each address as a 4-byte and a 2-byte word (the objects allow
    // misaligned access, see `build.rs`): a plain assignment compiles to a
    // call of `memmove`, a `copy_nonoverlapping` of the arrays to six byte
    // loads and six byte stores each.
    let put = |dst: *mut u8, src: &[u8; 6]| {
        let s = src.as_ptr();
        // SAFETY: six bytes at `dst` (checked by ptr_at) and at `src`; the
        // sources are not packet memory.
        unsafe {
            (dst as *mut u32).write_unaligned((s as *const u32).read_unaligned());
            (dst.add(4) as *mut u16).write_unaligned((s.add(4) as *const u16).read_unaligned());
        }
    };
    put(eth as *mut u8, dmac);
    // SAFETY: within the header ptr_at checked.
    put(unsafe { (eth as *mut u8).add(6) }, smac);
    Ok(())
}

/// Moves the L2 header (`l3_off` bytes) from `from` to offset 0.
/// Precondition: `l3_off <= from`, so the regions do not overlap.
#[inline(always)]
pub(crate) fn move_l2(ctx: &XdpContext, from: usize, l3_off: usize) -> Result<(), ()> {
    // The VLAN tag, if any, follows the Ethernet header: 14 or 18 bytes.
    // Copies, not assignments: an assignment is a call of `memmove` (see
    // `set_macs`).
    let src: *const [u8; 14] = ptr_at(ctx, from)?;
    let dst: *mut [u8; 14] = ptr_at(ctx, 0)?;
    // SAFETY: both ranges checked by ptr_at; they do not overlap.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) };
    if l3_off > EthHdr::LEN {
        let src: *const [u8; 4] = ptr_at(ctx, from + EthHdr::LEN)?;
        let dst: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN)?;
        // SAFETY: as above.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) };
    }
    Ok(())
}

/// The Ethernet header's bytes after the two MACs: the type (2 bytes), or a
/// VLAN tag and the type (6), read before the head moves
/// ([`L2Tail::read`]) and written in front of the outer header after
/// ([`L2Tail::write`]). The MACs are the next hop's, written anew, so an
/// encapsulation moves only these bytes, not the whole header: IPv4 ipip
/// 0.94, IPv6 0.97, gue 0.96-0.98 in two A/B runs (history, 2026-12-05); a
/// packet naming a second hop 1.05 in both (a rare path; moving the whole
/// header for that variant alone put the other cases at 0.97-1.06, noise).
#[derive(Clone, Copy)]
pub(crate) struct L2Tail {
    /// Bytes 12..14.
    first: u16,
    /// Bytes 14..18 (a VLAN tag's TCI and the inner type), if tagged.
    tag: Option<u32>,
}

impl L2Tail {
    /// The bytes after the MACs of a header of `l3_off` bytes (14 or 18).
    #[inline(always)]
    pub(crate) fn read(ctx: &XdpContext, l3_off: usize) -> Result<L2Tail, ()> {
        let p: *const [u8; 2] = ptr_at(ctx, 12)?;
        // SAFETY: ptr_at checked the bounds.
        let first = unsafe { (p as *const u16).read_unaligned() };
        let tag = if l3_off > EthHdr::LEN {
            let t: *const [u8; 4] = ptr_at(ctx, EthHdr::LEN)?;
            // SAFETY: as above.
            Some(unsafe { (t as *const u32).read_unaligned() })
        } else {
            None
        };
        Ok(L2Tail { first, tag })
    }

    /// Writes the bytes back after the MACs, at the packet's (new) start.
    #[inline(always)]
    pub(crate) fn write(self, ctx: &XdpContext) -> Result<(), ()> {
        let p: *mut [u8; 2] = ptr_at(ctx, 12)?;
        // SAFETY: ptr_at checked the bounds.
        unsafe { (p as *mut u16).write_unaligned(self.first) };
        if let Some(tag) = self.tag {
            let t: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN)?;
            // SAFETY: as above.
            unsafe { (t as *mut u32).write_unaligned(tag) };
        }
        Ok(())
    }
}

/// What encapsulating needs to know of the packet it wraps.
pub struct Inner {
    /// [`AF_INET`] or [`lb_common::AF_INET6`].
    pub family: u8,
    /// Offset of the IP header: 14, or 18 with a VLAN tag.
    pub l3_off: usize,
    /// Bytes from the IP header to the end of the IP packet.
    pub ip_len: u16,
}

impl Inner {
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Inner {
        Inner {
            family: pkt.family,
            l3_off: pkt.l3_off,
            ip_len: pkt.ip_len,
        }
    }
}

/// Encapsulates the packet to backend `b`. `hash` varies the outer source
/// address (IPv4: low 16 bits; IPv6: last 32 bits and the flow label) so
/// that receivers can spread flows over queues. `second` (GUE only): the
/// second chance's second hop, named in the GUE header.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // one per thing an encapsulation depends on
pub fn encap(
    ctx: &XdpContext,
    pkt: &Inner,
    b: &Backend,
    s: &Settings,
    hash: u32,
    hop: &Hop,
    gue: bool,
    second: Option<&Backend>,
) -> Result<(), ()> {
    const V4_HOP: usize = GUE_OVERHEAD + GUE_HOP_V4;
    const V6_HOP: usize = GUE_OVERHEAD + GUE_HOP_V6;
    let none = &[0; 16];
    match (pkt.family == AF_INET, gue, second) {
        (true, false, _) => encap_v4::<0, 0>(ctx, pkt, b, s, hash, hop, none),
        (true, true, None) => encap_v4::<GUE_OVERHEAD, 0>(ctx, pkt, b, s, hash, hop, none),
        (true, true, Some(x)) => encap_v4::<V4_HOP, GUE_HOP_V4>(ctx, pkt, b, s, hash, hop, &x.addr),
        (false, false, _) => encap_v6::<0, 0>(ctx, pkt, b, s, hash, hop, none),
        (false, true, None) => encap_v6::<GUE_OVERHEAD, 0>(ctx, pkt, b, s, hash, hop, none),
        (false, true, Some(x)) => {
            encap_v6::<V6_HOP, GUE_HOP_V6>(ctx, pkt, b, s, hash, hop, &x.addr)
        }
    }
}

/// Bytes a GUE packet's outer headers take beyond the outer IP header, with
/// a second hop named or not.
#[inline(always)]
pub fn gue_overhead(family: u8, second: bool) -> u16 {
    (GUE_OVERHEAD
        + match (second, family == AF_INET) {
            (false, _) => 0,
            (true, true) => GUE_HOP_V4,
            (true, false) => GUE_HOP_V6,
        }) as u16
}

/// Writes the UDP and GUE headers of a `gue` packet at `off` (right after
/// the outer IP header): the source port from the flow hash (per-flow
/// entropy for the receiver's RSS), the destination `s.gue_port`, no UDP
/// checksum (RFC 6935 allows none for tunnels; `lb_decap` strips the
/// header before the backend's stack would check it), and a version-0 GUE
/// header naming the inner protocol, followed by `HOP` bytes of private
/// data naming `second` as the second hop (`lb_common::GUE_HOP_TAG`; `HOP`
/// = 0: none).
#[inline(always)]
fn write_gue<const HOP: usize>(
    ctx: &XdpContext,
    off: usize,
    s: &Settings,
    hash: u32,
    udp_len: u16,
    inner: u8,
    second: &[u8; 16],
) -> Result<(), ()> {
    if HOP > 0 {
        let d: *mut [u8; HOP] = ptr_at(ctx, off + GUE_OVERHEAD)?;
        let d = d as *mut u8;
        let a = addr_words(second);
        let tag = u32::from_ne_bytes(GUE_HOP_TAG);
        // `HOP` is 8 or 20 bytes (checked at `d`): the tag and an IPv4 or
        // IPv6 address.
        // SAFETY: ptr_at checked `HOP` bytes at `d`.
        unsafe {
            if HOP == GUE_HOP_V4 {
                put_words(d, &[tag, a[0]]);
            } else {
                put_words(d, &[tag, a[0], a[1], a[2], a[3]]);
            }
        }
    }
    let h: *mut [u8; GUE_OVERHEAD] = ptr_at(ctx, off)?;
    let sport = 0xc000 | (hash as u16 & 0x3fff);
    let (sp, dp, len) = (
        sport.to_be_bytes(),
        s.gue_port.to_be_bytes(),
        udp_len.to_be_bytes(),
    );
    // SAFETY: ptr_at checked the header's bounds.
    unsafe {
        put_words(
            h as *mut u8,
            &[
                u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]),
                // No UDP checksum.
                u32::from_ne_bytes([len[0], len[1], 0, 0]),
                u32::from_ne_bytes([(HOP / 4) as u8, inner, 0, 0]),
            ],
        )
    };
    Ok(())
}

/// An IPv4 header without options, written whole by a rewrite (an outer
/// header, a forwarded packet's, an ICMP answer's): no id, not a fragment.
pub(crate) struct Ipv4Out {
    pub(crate) tos: u8,
    pub(crate) tot_len: u16,
    pub(crate) ttl: u8,
    pub(crate) proto: u8,
    pub(crate) src: [u8; 4],
    pub(crate) dst: [u8; 4],
}

/// Writes `h` at offset `off`, with its checksum.
#[inline(always)]
pub(crate) fn write_ipv4(ctx: &XdpContext, off: usize, h: &Ipv4Out) -> Result<(), ()> {
    let (src, dst) = (h.src, h.dst);
    let words: [u16; 10] = [
        0x4500 | h.tos as u16,
        h.tot_len,
        0,
        0,
        ((h.ttl as u16) << 8) | h.proto as u16,
        0,
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
    ];
    let check = csum::ipv4_header(&words).to_be_bytes();
    let len = h.tot_len.to_be_bytes();
    let ip: *mut Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: ptr_at checked the header's 20 bytes.
    unsafe {
        put_words(
            ip as *mut u8,
            &[
                u32::from_ne_bytes([0x45, h.tos, len[0], len[1]]),
                0, // id, not a fragment
                u32::from_ne_bytes([h.ttl, h.proto, check[0], check[1]]),
                u32::from_ne_bytes(src),
                u32::from_ne_bytes(dst),
            ],
        )
    };
    Ok(())
}

/// Writes `words` at `dst` four bytes at a time (the objects allow
/// misaligned access, see `build.rs`): a header's fields assigned one by
/// one, or an address array assigned whole, compile to a load and a store
/// per byte.
///
/// # Safety
/// `dst` points at `4 * N` writable bytes (a header `ptr_at` checked).
#[inline(always)]
unsafe fn put_words<const N: usize>(dst: *mut u8, words: &[u32; N]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: within the caller's `4 * N` bytes.
        unsafe { (dst.add(4 * i) as *mut u32).write_unaligned(*w) };
    }
}

/// The four words of an address, read four bytes at a time.
#[inline(always)]
fn addr_words(a: &[u8; 16]) -> [u32; 4] {
    let p = a.as_ptr() as *const u32;
    // SAFETY: 16 bytes; misaligned reads are allowed (see `put_words`).
    unsafe {
        [
            p.read_unaligned(),
            p.add(1).read_unaligned(),
            p.add(2).read_unaligned(),
            p.add(3).read_unaligned(),
        ]
    }
}

#[inline(always)]
pub(crate) fn grow(ctx: &XdpContext, by: usize) -> Result<(), ()> {
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived
    // from ctx (and re-checked by ptr_at) afterwards.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(by as i32)) };
    if rc != 0 { Err(()) } else { Ok(()) }
}

/// IPv4 in IPv4, followed by `GUE` bytes of UDP and GUE header (0, or
/// `GUE_OVERHEAD` and `HOP` bytes naming `second`).
#[inline(always)]
fn encap_v4<const GUE: usize, const HOP: usize>(
    ctx: &XdpContext,
    pkt: &Inner,
    b: &Backend,
    s: &Settings,
    hash: u32,
    hop: &Hop,
    second: &[u8; 16],
) -> Result<(), ()> {
    // Same value as pkt.l3_off, spelled as one of two constants so the
    // verifier sees fixed offsets after adjust_head.
    let l3_off = if pkt.l3_off > EthHdr::LEN {
        18
    } else {
        EthHdr::LEN
    };
    // The inner TOS is copied to the outer header (before the head moves).
    let inner: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked the bounds.
    let tos = unsafe { (*inner).tos };
    let l2 = L2Tail::read(ctx, l3_off)?;
    grow(ctx, Ipv4Hdr::LEN + GUE)?;
    set_macs(ctx, hop)?;
    l2.write(ctx)?;

    let tot_len = pkt.ip_len + (Ipv4Hdr::LEN + GUE) as u16;
    let proto = if GUE > 0 { IPPROTO_UDP } else { IPPROTO_IPIP };
    let src = [
        s.ipip_src_v4[0],
        s.ipip_src_v4[1],
        (hash >> 8) as u8,
        hash as u8,
    ];
    let dst = [b.addr[0], b.addr[1], b.addr[2], b.addr[3]];
    write_ipv4(
        ctx,
        l3_off,
        &Ipv4Out {
            tos,
            tot_len,
            ttl: ENCAP_TTL,
            proto,
            src,
            dst,
        },
    )?;
    if GUE > 0 {
        write_gue::<HOP>(
            ctx,
            l3_off + Ipv4Hdr::LEN,
            s,
            hash,
            pkt.ip_len + GUE as u16,
            IPPROTO_IPIP,
            second,
        )?;
    }
    Ok(())
}

/// IPv6 in IPv6, followed by `GUE` bytes of UDP and GUE header (and
/// `HOP` naming `second`).
#[inline(always)]
fn encap_v6<const GUE: usize, const HOP: usize>(
    ctx: &XdpContext,
    pkt: &Inner,
    b: &Backend,
    s: &Settings,
    hash: u32,
    hop: &Hop,
    second: &[u8; 16],
) -> Result<(), ()> {
    let l3_off = if pkt.l3_off > EthHdr::LEN {
        18
    } else {
        EthHdr::LEN
    };
    let inner: *const [u8; 2] = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked the bounds. Traffic class spans both bytes.
    let tc_bytes = unsafe { *inner };
    let l2 = L2Tail::read(ctx, l3_off)?;
    grow(ctx, Ipv6Hdr::LEN + GUE)?;
    set_macs(ctx, hop)?;
    l2.write(ctx)?;

    // The source: the configured address with the flow hash in its last
    // word.
    let src = addr_words(&s.ipip_src_v6);
    let dst = addr_words(&b.addr);
    let label = hash & 0x000f_ffff;
    let len = (pkt.ip_len + GUE as u16).to_be_bytes();
    let next = if GUE > 0 { IPPROTO_UDP } else { IPPROTO_IPV6 };
    let outer: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked the header's 40 bytes (after adjust_head).
    unsafe {
        put_words(
            outer as *mut u8,
            &[
                u32::from_ne_bytes([
                    tc_bytes[0],
                    (tc_bytes[1] & 0xf0) | (label >> 16) as u8,
                    (label >> 8) as u8,
                    label as u8,
                ]),
                u32::from_ne_bytes([len[0], len[1], next, ENCAP_TTL]),
                src[0],
                src[1],
                src[2],
                u32::from_ne_bytes(hash.to_be_bytes()),
                dst[0],
                dst[1],
                dst[2],
                dst[3],
            ],
        )
    };
    if GUE > 0 {
        write_gue::<HOP>(
            ctx,
            l3_off + Ipv6Hdr::LEN,
            s,
            hash,
            pkt.ip_len + GUE as u16,
            IPPROTO_IPV6,
            second,
        )?;
    }
    Ok(())
}

/// The next hop towards backend `b` from the kernel's FIB and neighbour
/// table (`bpf_fib_lookup`), or `None` when the kernel cannot say yet (no
/// route, neighbour unresolved).
#[inline(always)]
pub(crate) fn fib_next_hop(ctx: &XdpContext, pkt: &Packet, b: &Backend) -> Option<Hop> {
    let a = &b.addr;
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    fib_lookup(
        ctx,
        ctx.ingress_ifindex() as u32,
        b.family == lb_common::AF_INET,
        [w(0), w(4), w(8), w(12)],
        pkt.ip_len,
    )
    .1
}

/// `bpf_fib_lookup` towards `dst` (network-order words; IPv4 in the first)
/// for a packet of `tot_len` bytes received on `ifindex`: the helper's
/// answer (`BPF_FIB_LKUP_RET_*`) and, when it is 0, the next hop. The
/// parameter block lives in a per-CPU scratch map: at 64 bytes it does not
/// fit the balancer's 512-byte stack, and the MACs in it sit at offsets
/// the verifier refuses to read there in words.
#[inline(always)]
pub(crate) fn fib_lookup(
    ctx: &XdpContext,
    ifindex: u32,
    v4: bool,
    dst: [u32; 4],
    tot_len: u16,
) -> (i64, Option<Hop>) {
    let Some(p) = FIB_SCRATCH.get_ptr_mut(0) else {
        return (-1, None);
    };
    // SAFETY: a per-CPU map value of the right type, exclusively ours while
    // this program runs on this CPU; the helper reads and writes only it.
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        (*p).ifindex = ifindex;
        (*p).__bindgen_anon_1.tot_len = tot_len;
        if v4 {
            (*p).family = 2; // AF_INET
            (*p).__bindgen_anon_4.ipv4_dst = dst[0];
        } else {
            (*p).family = 10; // AF_INET6
            (*p).__bindgen_anon_4.ipv6_dst = dst;
        }
        let rc = bpf_fib_lookup(
            ctx.ctx.cast(),
            p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        );
        let hop = (rc == 0).then(|| Hop {
            dmac: (*p).dmac,
            smac: (*p).smac,
            ifindex: (*p).ifindex,
        });
        (rc, hop)
    }
}
