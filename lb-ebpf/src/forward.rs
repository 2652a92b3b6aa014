//! Header rewrites every path shares: the MACs (L2 direct server return),
//! the L2 header moved, a whole IPv4 header, room at the head, the FIB's
//! next hop. Encapsulation builds on these in `encap.rs`.
//!
//! Preconditions: `pkt` describes this very `ctx` (from
//! [`crate::parse::parse`], or the established path's own reading), and `b`
//! has a known next-hop MAC. On return the packet is
//! ready to leave; the caller picks `XDP_TX` or `XDP_REDIRECT`.

use aya_ebpf::{
    bindings::bpf_fib_lookup as FibParams,
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::Backend;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum,
    maps::FIB_SCRATCH,
    parse::{Packet, ptr_at},
};

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
pub(crate) unsafe fn put_words<const N: usize>(dst: *mut u8, words: &[u32; N]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: within the caller's `4 * N` bytes.
        unsafe { (dst.add(4 * i) as *mut u32).write_unaligned(*w) };
    }
}

/// The four words of an address, read four bytes at a time.
#[inline(always)]
pub(crate) fn addr_words(a: &[u8; 16]) -> [u32; 4] {
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

/// Writes address `a` over an address field of `N` words at `dst` (1: an
/// IPv4 field, from `a`'s first four bytes; 4: IPv6), four bytes at a
/// time: assigned as an array, an address is a load and a store per byte.
///
/// # Safety
/// As [`put_words`], for `4 * N` bytes.
#[inline(always)]
pub(crate) unsafe fn put_addr<const N: usize>(dst: *mut u8, a: &[u8; 16]) {
    let w = addr_words(a);
    for (i, w) in w.iter().take(N).enumerate() {
        // SAFETY: within the caller's `4 * N` bytes.
        unsafe { (dst.add(4 * i) as *mut u32).write_unaligned(*w) };
    }
}

#[inline(always)]
pub(crate) fn grow(ctx: &XdpContext, by: usize) -> Result<(), ()> {
    // SAFETY: the helper only moves ctx->data; every pointer is re-derived
    // from ctx (and re-checked by ptr_at) afterwards.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(by as i32)) };
    if rc != 0 { Err(()) } else { Ok(()) }
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
