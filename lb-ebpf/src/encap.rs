//! IPIP / IP6IP6 and GUE encapsulation: the outer headers a packet to a
//! backend gets (`forward.rs` holds the rewrites every path shares: MACs,
//! the IPv4 header, the head's room, the FIB's next hop).

use aya_ebpf::programs::XdpContext;
use lb_common::{AF_INET, Backend, GUE_HOP_TAG, GUE_HOP_V4, GUE_HOP_V6, GUE_OVERHEAD, Settings};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    forward::{Hop, Ipv4Out, addr_words, grow, put_words, set_macs, write_ipv4},
    parse::{IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, Packet, fixed_l3_off, ptr_at},
};

const ENCAP_TTL: u8 = 64;

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

/// Room for an outer header of `by` bytes between the Ethernet header and
/// the packet at `l3_off`: the L2 tail read (see [`L2Tail`]), the head
/// grown, the next hop's MACs and the tail written in front of it.
#[inline(always)]
fn open_outer(ctx: &XdpContext, l3_off: usize, by: usize, hop: &Hop) -> Result<(), ()> {
    let l2 = L2Tail::read(ctx, l3_off)?;
    grow(ctx, by)?;
    set_macs(ctx, hop)?;
    l2.write(ctx)
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
    let l3_off = fixed_l3_off(pkt.l3_off);
    // The inner TOS is copied to the outer header (before the head moves).
    let inner: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked the bounds.
    let tos = unsafe { (*inner).tos };
    open_outer(ctx, l3_off, Ipv4Hdr::LEN + GUE, hop)?;

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
    let l3_off = fixed_l3_off(pkt.l3_off);
    let inner: *const [u8; 2] = ptr_at(ctx, l3_off)?;
    // SAFETY: ptr_at checked the bounds. Traffic class spans both bytes.
    let tc_bytes = unsafe { *inner };
    open_outer(ctx, l3_off, Ipv6Hdr::LEN + GUE, hop)?;

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
