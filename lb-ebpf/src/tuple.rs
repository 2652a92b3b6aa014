//! A flow as its headers name it, read straight into registers for the
//! established path (`fast`): Ethernet + IPv4 without options or IPv6
//! without extension headers + TCP or UDP, in the connection table's
//! words; and its `FlowKey` built on the stack where a map call needs one.

use aya_ebpf::programs::XdpContext;
use lb_common::{AF_INET, AF_INET6, FlowKey, PROTO_TCP, PROTO_UDP, hash};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::parse::ptr_at;

/// A flow as its headers name it, in the connection table's words: the
/// addresses as four words each (an IPv4 address in the first, the others
/// zero, as `FlowKey` holds it), the ports as `FlowKey`'s ninth word
/// (source port in the low half, both in host order).
pub(crate) struct Tuple {
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
    pub(crate) ports: u32,
    /// TCP flags (0 for UDP).
    pub(crate) tcp_flags: u8,
    /// Bytes from the IP header to the end of the IP packet.
    pub(crate) ip_len: u16,
}

impl Tuple {
    #[inline(always)]
    pub(crate) fn dport(&self) -> u16 {
        (self.ports >> 16) as u16
    }

    /// The staged balancer's table hash (`table::probe`) of the same key:
    /// the table's set and tag, and the outer source of an encapsulation.
    #[inline(always)]
    pub(crate) fn table_hash(&self) -> u32 {
        let fold = |a: &[u32; 4]| a[0] ^ a[1] ^ a[2] ^ a[3];
        hash::table_hash(fold(&self.src), self.ports as u16, self.dport(), self.proto)
    }

    /// Whether the 40-byte table key at `k` is this flow's (compared as
    /// words, see `table::find`).
    #[inline(always)]
    pub(crate) fn is_key(&self, k: *const u32) -> bool {
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
    pub(crate) fn src_bytes(&self) -> [u8; 16] {
        // SAFETY: [u32; 4] and [u8; 16] have the same size, every bit
        // pattern valid for both (the words were read from these bytes).
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(self.src) }
    }

    /// The key as `FlowKey` (for the drop log only).
    #[inline(always)]
    pub(crate) fn key(&self) -> FlowKey {
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

/// Ethernet + IPv4 + 20 bytes (a TCP header; a UDP datagram's header and
/// 12 bytes): the shortest packet taken here. (A shorter UDP packet is the
/// staged balancer's.)
pub(crate) const V4_MIN: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;
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
pub(crate) fn read_v4(ctx: &XdpContext, p: *const u8) -> Option<Tuple> {
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
pub(crate) fn read_v6(ctx: &XdpContext) -> Option<Tuple> {
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

/// A `FlowKey` built on the stack a word at a time: built as a struct,
/// LLVM merges its zero words into 8-byte stores at 4-aligned offsets
/// (the objects allow misaligned access), which the verifier refuses on
/// the stack.
#[repr(C, align(8))]
pub(crate) struct KeyWords([u32; 10]);

impl KeyWords {
    /// Writes `t`'s key into `k` in place, a word at a time (built and
    /// returned, it is copied with merged stores again).
    #[inline(always)]
    pub(crate) fn fill<'a>(k: &'a mut core::mem::MaybeUninit<KeyWords>, t: &Tuple) -> &'a KeyWords {
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
    pub(crate) fn key(&self) -> &FlowKey {
        // SAFETY: `FlowKey` is `repr(C)`, 40 bytes of plain integers at
        // these words' offsets (as `table` compares them), alignment 4.
        unsafe { &*(self.0.as_ptr() as *const FlowKey) }
    }
}
