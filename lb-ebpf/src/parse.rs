//! Packet parsing: the only place that computes header offsets.
//!
//! [`parse`] reads Ethernet (at most one 802.1Q tag), IPv4 (any IHL) or IPv6
//! (no extension headers), then TCP, UDP, or the header embedded in an
//! ICMP "fragmentation needed" / ICMPv6 "packet too big" error, and fills one
//! [`Packet`]. Byte order is converted here, once; later stages read only the
//! `Packet`.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, GUE_HOP_TAG, GUE_HOP_V4, GUE_HOP_V6, GUE_OVERHEAD};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Header fields as byte ranges from the start of their header, for the
/// stages that write them (`nat`, `icmp`); what `network_types`' header
/// structs do not name, or where a caller writes one field alone.
pub mod field {
    use core::ops::Range;

    /// TCP checksum.
    pub const TCP_CHECKSUM: Range<usize> = 16..18;
    /// UDP checksum.
    pub const UDP_CHECKSUM: Range<usize> = 6..8;
    /// ICMP and ICMPv6 checksum.
    pub const ICMP_CHECKSUM: Range<usize> = 2..4;
    /// An ICMP error's own header (type, code, checksum, 4 more bytes); the
    /// packet it quotes follows.
    pub const ICMP_ERROR_HEADER: Range<usize> = 0..8;
    /// IPv6 source and destination addresses.
    pub const IPV6_SRC: Range<usize> = 8..24;
    pub const IPV6_DST: Range<usize> = 24..40;
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// IPv4 `frag_off` bits: more-fragments flag and the offset.
const IPV4_MF_OFFSET: u16 = 0x3fff;
const ICMP_HDR_LEN: usize = field::ICMP_ERROR_HEADER.end;

/// The packet description every later stage reads.
///
/// For an ICMP error, the addresses and ports are those of the flow the error
/// is about, as the client sent it (the embedded header reversed), so the
/// error reaches the same backend as its flow.
///
/// `repr(C)`, the small fields in pairs at even offsets: LLVM may merge
/// two adjacent byte stores into one 2-byte store (the objects allow
/// misaligned access, see `build.rs`), which the verifier refuses on the
/// stack when it lands on an odd offset.
#[repr(C)]
pub struct Packet {
    /// Offset of the (outer) IP header: 14, or 18 with a VLAN tag.
    pub l3_off: usize,
    /// The flow as the client sent it: client address and port, VIP address
    /// and port (host order), transport protocol. It is also the connection
    /// table's key, kept once here because the BPF stack is 512 bytes.
    pub key: FlowKey,
    /// Bytes from the IP header to the end of the IP packet.
    pub ip_len: u16,
    /// [`lb_common::AF_INET`] or [`lb_common::AF_INET6`].
    pub family: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// IPv4 fragment (first or later).
    pub fragment: bool,
    /// An ICMP error about a VIP flow.
    pub icmp_error: bool,
}

/// TCP flags the datapath reacts to: the start (SYN without ACK) and the
/// end (FIN, RST) of a connection.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why [`parse`] did not produce a [`Packet`].
pub enum Skip {
    /// Neither IPv4 nor IPv6.
    NotIp,
    /// IPv6 with an extension header before the transport header.
    Ipv6Ext,
    /// Truncated or inconsistent headers.
    Malformed,
}

/// The only way to touch packet memory: a pointer to a `T` at `off`, or
/// `Err` if the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// An IPv4 address in the 16-byte form of `FlowKey`, built as four words:
/// built byte by byte, LLVM keeps each byte a value of its own, spilled
/// and stored one at a time on every path that carries the key.
#[inline(always)]
fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size, every bit pattern
    // valid for both.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([u32::from_ne_bytes(a), 0, 0, 0]) }
}

/// Reads the Ethernet header (and one VLAN tag). Returns (ethertype, l3 offset).
#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<(u16, usize), Skip> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|_| Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q {
        let vlan: *const VlanHdr = ptr_at(ctx, EthHdr::LEN).map_err(|_| Skip::Malformed)?;
        // SAFETY: ptr_at checked the bounds.
        let inner = u16::from_be(unsafe { (*vlan).ether_type });
        return Ok((inner, EthHdr::LEN + VlanHdr::LEN));
    }
    Ok((ether_type, EthHdr::LEN))
}

/// The destination address of an IPv4 or IPv6 packet folded to 32 bits
/// (see [`lb_common::hash::vip_filter_slot_folded`]), read with one bounds
/// check of the fixed IP header: the VIP-address filter runs on it before
/// the full parse, so traffic to no VIP costs that much and no more.
#[inline(always)]
pub fn folded_dst(ctx: &XdpContext) -> Result<u32, Skip> {
    let (ether_type, l3_off) = parse_l2(ctx)?;
    match ether_type {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).map_err(|_| Skip::Malformed)?;
            // SAFETY: ptr_at checked the bounds of the header.
            Ok(u32::from_le_bytes(unsafe { (*ip).dst_addr }))
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).map_err(|_| Skip::Malformed)?;
            // SAFETY: as above.
            let a = unsafe { &(*ip).dst_addr };
            let w = |i: usize| u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            Ok(w(0) ^ w(4) ^ w(8) ^ w(12))
        }
        _ => Err(Skip::NotIp),
    }
}

/// Parses the whole packet. See the module documentation.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Skip> {
    let (ether_type, l3_off) = parse_l2(ctx)?;
    match ether_type {
        ETH_P_IP => parse_v4(ctx, l3_off),
        ETH_P_IPV6 => parse_v6(ctx, l3_off),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize) -> Result<Packet, Skip> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).map_err(|_| Skip::Malformed)?;
    // SAFETY (each read below): ptr_at checked the bounds of the whole header.
    let vihl = unsafe { (*ip).vihl };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Skip::Malformed);
    }
    let tot_len = be16(unsafe { (*ip).tot_len });
    if (tot_len as usize) < ihl || ctx.data() + l3_off + tot_len as usize > ctx.data_end() {
        return Err(Skip::Malformed);
    }
    let proto = unsafe { (*ip).proto };
    let fragment = be16(unsafe { (*ip).frags }) & IPV4_MF_OFFSET != 0;
    let src = v4_addr(unsafe { (*ip).src_addr });
    let dst = v4_addr(unsafe { (*ip).dst_addr });
    let mut pkt = Packet {
        l3_off,
        family: lb_common::AF_INET,
        key: FlowKey {
            src,
            dst,
            sport: 0,
            dport: 0,
            proto,
            _pad: 0,
            _pad2: 0,
        },
        ip_len: tot_len,
        fragment,
        icmp_error: false,
        tcp_flags: 0,
    };
    if fragment {
        // Later fragments carry no ports; the caller drops VIP fragments.
        return Ok(pkt);
    }
    let l4_off = l3_off + ihl;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (s, d, f) = ports(ctx, l4_off, proto)?;
            pkt.key.sport = s;
            pkt.key.dport = d;
            pkt.tcp_flags = f;
        }
        IPPROTO_ICMP => icmp4_error(ctx, l4_off, &mut pkt)?,
        _ => {}
    }
    Ok(pkt)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize) -> Result<Packet, Skip> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).map_err(|_| Skip::Malformed)?;
    // SAFETY (each read below): ptr_at checked the bounds of the whole header.
    if unsafe { (*ip).vcf[0] } >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let payload_len = be16(unsafe { (*ip).payload_len });
    if ctx.data() + l3_off + Ipv6Hdr::LEN + payload_len as usize > ctx.data_end() {
        return Err(Skip::Malformed);
    }
    let proto = unsafe { (*ip).next_hdr };
    let mut pkt = Packet {
        l3_off,
        family: lb_common::AF_INET6,
        key: FlowKey {
            src: unsafe { (*ip).src_addr },
            dst: unsafe { (*ip).dst_addr },
            sport: 0,
            dport: 0,
            proto,
            _pad: 0,
            _pad2: 0,
        },
        ip_len: payload_len + Ipv6Hdr::LEN as u16,
        fragment: false,
        icmp_error: false,
        tcp_flags: 0,
    };
    let l4_off = l3_off + Ipv6Hdr::LEN;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (s, d, f) = ports(ctx, l4_off, proto)?;
            pkt.key.sport = s;
            pkt.key.dport = d;
            pkt.tcp_flags = f;
        }
        IPPROTO_ICMPV6 => icmp6_error(ctx, l4_off, &mut pkt)?,
        // Hop-by-hop, routing, fragment, destination options, AH, ESP,
        // mobility, HIP, shim6: the transport header is further in.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => return Err(Skip::Ipv6Ext),
        _ => {}
    }
    Ok(pkt)
}

/// Source and destination port (host order) of a TCP or UDP header, and
/// the TCP flags byte (0 for UDP).
#[inline(always)]
fn ports(ctx: &XdpContext, l4_off: usize, proto: u8) -> Result<(u16, u16, u8), Skip> {
    if proto == IPPROTO_TCP {
        // The whole fixed header must be there; flags are its byte 13.
        let th: *const [u8; TcpHdr::LEN] = ptr_at(ctx, l4_off).map_err(|_| Skip::Malformed)?;
        // SAFETY: ptr_at checked the bounds.
        let h = unsafe { *th };
        Ok((be16([h[0], h[1]]), be16([h[2], h[3]]), h[13]))
    } else {
        let uh: *const UdpHdr = ptr_at(ctx, l4_off).map_err(|_| Skip::Malformed)?;
        // SAFETY: ptr_at checked the bounds.
        let (s, d) = unsafe { ((*uh).src, (*uh).dst) };
        Ok((be16(s), be16(d), 0))
    }
}

/// First 4 bytes of the embedded transport header: its two ports, read as
/// raw big-endian pairs (an ICMP error quotes at least 8 bytes of it).
#[inline(always)]
fn quoted_ports(ctx: &XdpContext, off: usize) -> Result<(u16, u16), Skip> {
    let p: *const [u8; 4] = ptr_at(ctx, off).map_err(|_| Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let b = unsafe { *p };
    Ok((be16([b[0], b[1]]), be16([b[2], b[3]])))
}

/// If this ICMP packet is "destination unreachable" (any code:
/// fragmentation needed, port or host unreachable, ...), rewrites `pkt` to
/// describe the flow the quoted header belongs to, as Katran does. Other
/// ICMP types are left alone.
#[inline(always)]
fn icmp4_error(ctx: &XdpContext, l4_off: usize, pkt: &mut Packet) -> Result<(), Skip> {
    let icmp: *const [u8; 2] = ptr_at(ctx, l4_off).map_err(|_| Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let [ty, _code] = unsafe { *icmp };
    if ty != ICMP_DEST_UNREACH {
        return Ok(());
    }
    let inner_off = l4_off + ICMP_HDR_LEN;
    let ip: *const Ipv4Hdr = ptr_at(ctx, inner_off).map_err(|_| Skip::Malformed)?;
    // SAFETY (each read below): ptr_at checked the bounds of the whole header.
    let vihl = unsafe { (*ip).vihl };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Skip::Malformed);
    }
    let proto = unsafe { (*ip).proto };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(());
    }
    // The quoted packet went from the VIP to the client: reverse it.
    let (vip_port, client_port) = quoted_ports(ctx, inner_off + ihl)?;
    pkt.key.src = v4_addr(unsafe { (*ip).dst_addr });
    pkt.key.dst = v4_addr(unsafe { (*ip).src_addr });
    pkt.key.sport = client_port;
    pkt.key.dport = vip_port;
    pkt.key.proto = proto;
    pkt.icmp_error = true;
    Ok(())
}

/// The ICMPv6 counterpart of [`icmp4_error`]: "destination unreachable"
/// and "packet too big".
#[inline(always)]
fn icmp6_error(ctx: &XdpContext, l4_off: usize, pkt: &mut Packet) -> Result<(), Skip> {
    let icmp: *const [u8; 2] = ptr_at(ctx, l4_off).map_err(|_| Skip::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let [ty, _code] = unsafe { *icmp };
    if ty != ICMPV6_PKT_TOOBIG && ty != ICMPV6_DEST_UNREACH {
        return Ok(());
    }
    let inner_off = l4_off + ICMP_HDR_LEN;
    let ip: *const Ipv6Hdr = ptr_at(ctx, inner_off).map_err(|_| Skip::Malformed)?;
    // SAFETY (each read below): ptr_at checked the bounds of the whole header.
    let proto = unsafe { (*ip).next_hdr };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(());
    }
    let (vip_port, client_port) = quoted_ports(ctx, inner_off + Ipv6Hdr::LEN)?;
    pkt.key.src = unsafe { (*ip).dst_addr };
    pkt.key.dst = unsafe { (*ip).src_addr };
    pkt.key.sport = client_port;
    pkt.key.dport = vip_port;
    pkt.key.proto = proto;
    pkt.icmp_error = true;
    Ok(())
}

/// An IPv4-in-IPv4 or IPv6-in-IPv6 packet, as the balancer's `ipip`
/// forwarding builds it.
pub struct Tunnel {
    /// Offset of the outer IP header (14, or 18 with a VLAN tag), as a
    /// constant the verifier can follow through `bpf_xdp_adjust_head`.
    pub l3_off: usize,
    /// Outer headers to strip: IP, and for GUE UDP, GUE and the second
    /// hop's private data (`hop_len`).
    pub outer_len: usize,
    /// Outer destination (16 bytes, IPv4 in the first four).
    pub dst: [u8; 16],
    /// GUE naming a second hop (the second chance): its private data's
    /// length (`lb_common::GUE_HOP_V4` or `GUE_HOP_V6`; 0: none).
    pub hop_len: usize,
}

/// The L3 offset (14, or 18 behind a VLAN tag) spelled as one of its two
/// constants, so that the verifier sees fixed offsets after the head moves
/// (`bpf_xdp_adjust_head`) or the value went through the stack.
#[inline(always)]
pub(crate) fn fixed_l3_off(l3_off: usize) -> usize {
    if l3_off > EthHdr::LEN {
        18
    } else {
        EthHdr::LEN
    }
}

/// Recognises a tunnelled packet: outer IPv4 without options, not a
/// fragment, carrying protocol 4 (or GUE), or outer IPv6 whose next header
/// is 41 (or GUE). `Ok(None)` for
/// anything else; `Err` if the headers are cut short.
#[inline(always)]
pub fn tunnel(ctx: &XdpContext, gue_port: u16) -> Result<Option<Tunnel>, ()> {
    let (ether_type, l3_off) = parse_l2(ctx).map_err(|_| ())?;
    let l3 = fixed_l3_off(l3_off);
    match ether_type {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            let (vihl, proto, dst, frags) =
                unsafe { ((*ip).vihl, (*ip).proto, (*ip).dst_addr, (*ip).frags) };
            // A fragment of a tunnelled packet (a router on the way split
            // it: the balancer sets no DF) is no whole tunnel: stripping
            // the first fragment's outer header would hand the stack a
            // truncated packet, and a later fragment has no inner header
            // at all. The kernel reassembles it.
            if vihl != 0x45 || be16(frags) & IPV4_MF_OFFSET != 0 {
                return Ok(None);
            }
            let (outer_len, hop_len) = match proto {
                IPPROTO_IPIP => (Ipv4Hdr::LEN, 0),
                IPPROTO_UDP => {
                    match gue(ctx, l3 + Ipv4Hdr::LEN, gue_port, IPPROTO_IPIP, GUE_HOP_V4)? {
                        Some(hop) => (Ipv4Hdr::LEN + GUE_OVERHEAD + hop, hop),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
            Ok(Some(Tunnel {
                l3_off: l3,
                outer_len,
                dst: v4_addr(dst),
                hop_len,
            }))
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3)?;
            // SAFETY: ptr_at checked the bounds.
            let (next, dst) = unsafe { ((*ip).next_hdr, (*ip).dst_addr) };
            let (outer_len, hop_len) = match next {
                IPPROTO_IPV6 => (Ipv6Hdr::LEN, 0),
                IPPROTO_UDP => {
                    match gue(ctx, l3 + Ipv6Hdr::LEN, gue_port, IPPROTO_IPV6, GUE_HOP_V6)? {
                        Some(hop) => (Ipv6Hdr::LEN + GUE_OVERHEAD + hop, hop),
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            };
            Ok(Some(Tunnel {
                l3_off: l3,
                outer_len,
                dst,
                hop_len,
            }))
        }
        _ => Ok(None),
    }
}

/// Whether the UDP header at `off` goes to `gue_port` and carries a
/// version-0 GUE header whose inner protocol is `inner` (the outer family's
/// own: IPv4 in IPv4, IPv6 in IPv6), without optional fields (`Some(0)`)
/// or with exactly a second hop's private data of `hop` bytes
/// (`Some(hop)`, see `lb_common::GUE_HOP_TAG`); `None`: no such tunnel.
#[inline(always)]
fn gue(
    ctx: &XdpContext,
    off: usize,
    gue_port: u16,
    inner: u8,
    hop: usize,
) -> Result<Option<usize>, ()> {
    // A UDP packet too short for the headers is no tunnel, not malformed.
    let Ok(h) = ptr_at::<[u8; GUE_OVERHEAD]>(ctx, off) else {
        return Ok(None);
    };
    // SAFETY: ptr_at checked the bounds.
    let h = unsafe { *h };
    let (port, first, proto) = (u16::from_be_bytes([h[2], h[3]]), h[8], h[9]);
    if port != gue_port || proto != inner {
        return Ok(None);
    }
    if first == 0 {
        return Ok(Some(0));
    }
    // Version 0, no control bit, `Hlen` words of private data: ours only.
    if usize::from(first) != hop / 4 {
        return Ok(None);
    }
    let Ok(t) = ptr_at::<[u8; 4]>(ctx, off + GUE_OVERHEAD) else {
        return Ok(None);
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { *t } != GUE_HOP_TAG || ptr_at::<u8>(ctx, off + GUE_OVERHEAD + hop - 1).is_err() {
        return Ok(None);
    }
    Ok(Some(hop))
}
