//! ICMP "fragmentation needed" / ICMPv6 "packet too big", built in place
//! from a packet that would exceed `agent.ipip_mtu` once encapsulated (as
//! Katran does): the packet becomes the error, quoting its own IP header
//! and the first 8 bytes of its transport header, and goes back to where
//! it came from with `XDP_TX`. The client's stack lowers its path MTU and
//! sends smaller segments, which fit after encapsulation.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use lb_common::AF_INET;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum,
    forward::{Ipv4Out, grow, move_l2, put_addr, write_ipv4, write_macs},
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, Packet, field, fixed_l3_off, ptr_at},
};

/// An ICMP error's own header.
const ICMP_HDR: usize = field::ICMP_ERROR_HEADER.end;
/// What an error quotes: the IP header and 8 bytes of what follows.
const QUOTE_V4: usize = Ipv4Hdr::LEN + 8;
const QUOTE_V6: usize = Ipv6Hdr::LEN + 8;
const TTL: u8 = 64;

/// Turns the packet into the error and returns the XDP action: `XDP_TX`,
/// or `XDP_DROP` for an IPv4 packet without DF (it may be fragmented, which
/// XDP cannot do) or with options. `mtu` is what the inner packet may
/// measure (the path MTU less the outer header).
#[inline(always)]
pub(crate) fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Result<u32, ()> {
    let l3_off = fixed_l3_off(pkt.l3_off);
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    let (client_mac, our_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    if pkt.family == AF_INET {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off)?;
        // SAFETY: as above.
        let (vihl, frags) = unsafe { ((*ip).vihl, (*ip).frags) };
        if vihl != 0x45 || frags[0] & 0x40 == 0 {
            return Ok(xdp_action::XDP_DROP);
        }
        shape(ctx, l3_off, QUOTE_V4, Ipv4Hdr::LEN + ICMP_HDR)?;
        write_macs(ctx, &client_mac, &our_mac)?;
        let (src, dst) = (&pkt.key.dst, &pkt.key.src);
        write_ipv4(
            ctx,
            l3_off,
            &Ipv4Out {
                tos: 0,
                tot_len: (Ipv4Hdr::LEN + ICMP_HDR + QUOTE_V4) as u16,
                ttl: TTL,
                proto: IPPROTO_ICMP,
                src: [src[0], src[1], src[2], src[3]],
                dst: [dst[0], dst[1], dst[2], dst[3]],
            },
        )?;
        // Destination unreachable (3), fragmentation needed (4).
        let icmp_off = l3_off + Ipv4Hdr::LEN;
        let mut sum = (3u32 << 8 | 4) + mtu as u32;
        sum += csum::words_sum::<QUOTE_V4>(ctx, icmp_off + ICMP_HDR)?;
        let h: *mut [u8; ICMP_HDR] = ptr_at(ctx, icmp_off)?;
        let c = csum::fold(sum).to_be_bytes();
        let m = mtu.to_be_bytes();
        // SAFETY: as above.
        unsafe { *h = [3, 4, c[0], c[1], 0, 0, m[0], m[1]] };
    } else {
        shape(ctx, l3_off, QUOTE_V6, Ipv6Hdr::LEN + ICMP_HDR)?;
        write_macs(ctx, &client_mac, &our_mac)?;
        let (src, dst) = (&pkt.key.dst, &pkt.key.src);
        let payload = (ICMP_HDR + QUOTE_V6) as u16;
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off)?;
        // SAFETY: ptr_at checked the bounds (after the head moved).
        unsafe {
            (*ip).vcf = [0x60, 0, 0, 0];
            (*ip).payload_len = payload.to_be_bytes();
            (*ip).next_hdr = IPPROTO_ICMPV6;
            (*ip).hop_limit = TTL;
            put_addr::<4>((&raw mut (*ip).src_addr).cast(), src);
            put_addr::<4>((&raw mut (*ip).dst_addr).cast(), dst);
        }
        // Packet too big (2), code 0; the checksum covers the pseudo-header
        // (addresses, length, next header) as well.
        let icmp_off = l3_off + Ipv6Hdr::LEN;
        let mut sum = payload as u32 + IPPROTO_ICMPV6 as u32 + (2u32 << 8) + mtu as u32;
        let mut i = 0;
        while i < 8 {
            sum += u16::from_be_bytes([src[2 * i], src[2 * i + 1]]) as u32;
            sum += u16::from_be_bytes([dst[2 * i], dst[2 * i + 1]]) as u32;
            i += 1;
        }
        sum += csum::words_sum::<QUOTE_V6>(ctx, icmp_off + ICMP_HDR)?;
        let h: *mut [u8; ICMP_HDR] = ptr_at(ctx, icmp_off)?;
        let c = csum::fold(sum).to_be_bytes();
        let m = (mtu as u32).to_be_bytes();
        // SAFETY: as above.
        unsafe { *h = [2, 0, c[0], c[1], m[0], m[1], m[2], m[3]] };
    }
    Ok(xdp_action::XDP_TX)
}

/// Cuts the packet to its L2 header and `quote` bytes of IP, then makes
/// room for `hdrs` bytes of new headers between L2 and the quote.
#[inline(always)]
fn shape(ctx: &XdpContext, l3_off: usize, quote: usize, hdrs: usize) -> Result<(), ()> {
    let keep = l3_off + quote;
    let len = ctx.data_end() - ctx.data();
    if len < keep {
        return Err(());
    }
    // SAFETY: shrinking the tail; pointers are re-derived afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep as i32 - len as i32) } != 0 {
        return Err(());
    }
    grow(ctx, hdrs)?;
    move_l2(ctx, hdrs, l3_off)
}
