//! The cost programs that bound a whole path rather than price one
//! primitive: the minimal balancers (`cost_minimal_lb` and its variants),
//! the least work any balancer with a connection table does per
//! established packet; our connection table's part of an established
//! packet (`cost_est`); a bare encapsulation (`cost_encap`); Maglev
//! scheduling without a VIP lookup (`cost_sched`). BENCHMARKS.md's targets
//! table names them beside a target that lies below them.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head, macros::xdp, maps::LruHashMap,
    programs::XdpContext,
};
use lb_common::{Backend, Flow, Traffic, VipKey, flow_set_base, flow_tag_folded};
use network_types::eth::EthHdr;

use crate::{
    csum,
    maps::{COST_BACKENDS, COST_LRU, COST_LRU16, COST_PERCPU, COST_RING, COST_VIPS, flow_sets},
    parse, table, tuple,
};

/// The least a balancer with a connection table does for an established
/// packet: parse, find the VIP (one hash lookup), find the flow (one LRU
/// lookup), read the backend (one array lookup), count the packet (one
/// per-CPU update), write both MACs, `XDP_TX`. No scheduling, no checks,
/// no encapsulation: a lower bound for our established path. A new flow is
/// recorded on backend 1 and sent the same way.
#[xdp]
pub fn cost_minimal_lb(ctx: XdpContext) -> u32 {
    minimal_lb(&ctx, &COST_LRU, |p| p.key)
}

/// [`cost_minimal_lb`] with a compact 16-byte IPv4 flow key (addresses,
/// ports, protocol) instead of the 40-byte one: what a smaller table
/// entry saves.
#[xdp]
pub fn cost_minimal_lb16(ctx: XdpContext) -> u32 {
    minimal_lb(&ctx, &COST_LRU16, |p| {
        let mut k = [0u8; 16];
        k[0..4].copy_from_slice(&p.key.src[0..4]);
        k[4..8].copy_from_slice(&p.key.dst[0..4]);
        k[8..10].copy_from_slice(&p.key.sport.to_ne_bytes());
        k[10..12].copy_from_slice(&p.key.dport.to_ne_bytes());
        k[12] = p.key.proto;
        k
    })
}

/// [`cost_minimal_lb`] sending by IPIP / IP6IP6 ([`encapsulate`]) instead
/// of a MAC rewrite: timed through `bench_ipip` like the balancer's ipip
/// rows, the like-for-like minimal balancer for them.
#[xdp]
pub fn cost_minimal_lb_ipip(ctx: XdpContext) -> u32 {
    minimal_lb_sending(
        &ctx,
        &COST_LRU,
        |p| p.key,
        |p, b| {
            encapsulate(
                &ctx,
                p.family == lb_common::AF_INET,
                &b.addr,
                &b.dst_mac,
                &b.src_mac,
            )
        },
    )
}

/// Floor + the least an encapsulation does: room for the outer header
/// (one `bpf_xdp_adjust_head`), the Ethernet header moved in front of it
/// (MACs swapped, as the floor does), the outer IPv4 header with its
/// checksum or the outer IPv6 header written from the packet's length and
/// constants. Timed through `bench_ipip` like the balancer's ipip rows
/// (the wrapper's strip and tail call included): what encapsulating costs
/// before any balancing.
#[xdp]
pub fn cost_encap(ctx: XdpContext) -> u32 {
    let Ok(eth) = parse::ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the bounds.
    let (dmac, smac, v4) = unsafe {
        (
            (*eth).src_addr,
            (*eth).dst_addr,
            (*eth).ether_type == 0x0800u16.to_be(),
        )
    };
    // Addresses in the benchmark ranges; the packet is never sent.
    let dst = if v4 {
        [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    } else {
        [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    };
    encapsulate(&ctx, v4, &dst, &dmac, &smac)
}

/// Floor + what a packet to a VIP without a connection table cannot do
/// without, given the VIP: parse, the scheduling hash
/// (`lb_common::hash::hash_5tuple`, the one every node shares), the Maglev
/// slot (`% 65537`), one ring read, one backend read and its liveness
/// check, one per-CPU counter, the backend's MACs. No VIP lookup at all:
/// a lower bound for the stateless path.
#[xdp]
pub fn cost_sched(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::parse(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let h = lb_common::hash::hash_5tuple(&p.key.src, p.key.sport, p.key.dport, p.key.proto);
    let Some(id) = COST_RING.get(h % 65537).copied() else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(b) = COST_BACKENDS.get(id & 15) else {
        return xdp_action::XDP_ABORTED;
    };
    let b: &Backend = b;
    if b.family == 0 || b.state == lb_common::BACKEND_DOWN {
        // The first repetition names and primes backend 1.
        if let Some(r) = COST_RING.get_ptr_mut(h % 65537) {
            // SAFETY: a map value pointer.
            unsafe { *r = 1 };
        }
        if let Some(x) = COST_BACKENDS.get_ptr_mut(1) {
            // SAFETY: as above.
            unsafe { (*x).family = lb_common::AF_INET };
        }
        return xdp_action::XDP_ABORTED;
    }
    count(id, p.ip_len);
    write_macs(&ctx, b)
}

/// What an established IPv4 packet costs through our connection table and
/// nothing else, done the established path's way (`fast.rs`, with its own
/// code): the headers read into registers (`tuple::read_v4`), the table
/// hash, the set lookup comparing the slot's words with them
/// (`table::find`, a hit), the backend its entry names read and checked
/// live, one per-CPU counter, the backend's MACs, `XDP_TX`. No VIP filter,
/// no VIP read, no trace check, no settings: a lower bound for our
/// established path (the established target's). The first repetition
/// records the flow on backend 1, primes it, and aborts.
#[xdp]
pub fn cost_est(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::ptr_at::<[u8; tuple::V4_MIN]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(t) = tuple::read_v4(&ctx, p as *const u8) else {
        return xdp_action::XDP_ABORTED;
    };
    let h = t.table_hash();
    let base = flow_set_base(h, flow_sets());
    // (IPv4: the destination folds to its one word.)
    let tag = flow_tag_folded(h, t.dst[0]);
    let Some((_, word)) = table::find(base, tag, |k| t.is_key(k)) else {
        let mut key = core::mem::MaybeUninit::uninit();
        let key = tuple::KeyWords::fill(&mut key, &t);
        let f = Flow {
            backend_id: 1,
            ..Default::default()
        };
        table::insert(base, tag, key.key(), &f);
        if let Some(x) = COST_BACKENDS.get_ptr_mut(1) {
            // SAFETY: a map value pointer.
            unsafe { (*x).family = lb_common::AF_INET };
        }
        return xdp_action::XDP_ABORTED;
    };
    let id = (word >> 32) as u32;
    let Some(b) = COST_BACKENDS.get(id & 15) else {
        return xdp_action::XDP_ABORTED;
    };
    let b: &Backend = b;
    if b.family == 0 || b.state == lb_common::BACKEND_DOWN {
        return xdp_action::XDP_ABORTED;
    }
    count(id, t.ip_len);
    write_macs(&ctx, b)
}

/// One per-CPU traffic counter update, as the balancer counts a packet.
#[inline(always)]
fn count(id: u32, len: u16) {
    if let Some(t) = COST_PERCPU.get_ptr_mut(id & 15) {
        // SAFETY: per-CPU slot.
        unsafe {
            let t: *mut Traffic = t;
            (*t).packets += 1;
            (*t).bytes += u64::from(len);
        }
    }
}

/// The backend's MACs into the packet, `XDP_TX`.
#[inline(always)]
fn write_macs(ctx: &XdpContext, b: &Backend) -> u32 {
    let Ok(eth) = parse::ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        (*eth).dst_addr = b.dst_mac;
        (*eth).src_addr = b.src_mac;
    }
    xdp_action::XDP_TX
}

/// An untagged IPv4 (`v4`) or IPv6 packet wrapped in an outer header of
/// its family to `dst`, sent with these MACs: `XDP_TX`, or `XDP_ABORTED`
/// when a bound does not hold.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, v4: bool, dst: &[u8; 16], dmac: &[u8; 6], smac: &[u8; 6]) -> u32 {
    let ok = if v4 {
        encap_v4(ctx, dst, dmac, smac)
    } else {
        encap_v6(ctx, dst, dmac, smac)
    };
    if ok.is_ok() {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

#[inline(always)]
fn outer_eth(ctx: &XdpContext, dmac: &[u8; 6], smac: &[u8; 6], ether_type: u16) -> Result<(), ()> {
    let eth = parse::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds (after the head moved).
    unsafe {
        (*eth).dst_addr = *dmac;
        (*eth).src_addr = *smac;
        (*eth).ether_type = ether_type.to_be();
    }
    Ok(())
}

#[inline(always)]
fn encap_v4(ctx: &XdpContext, dst: &[u8; 16], dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), ()> {
    let inner = parse::ptr_at::<network_types::ip::Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let (tos, len) = unsafe { ((*inner).tos, u16::from_be_bytes((*inner).tot_len)) };
    // SAFETY: every pointer is re-derived by ptr_at afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) } != 0 {
        return Err(());
    }
    outer_eth(ctx, dmac, smac, 0x0800)?;
    let tot_len = len + 20;
    let src = [198u8, 18, 0, 1];
    let words: [u16; 10] = [
        0x4500 | tos as u16,
        tot_len,
        0,
        0,
        (64 << 8) | 4,
        0,
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
    ];
    let check = csum::ipv4_header(&words);
    let o = parse::ptr_at::<network_types::ip::Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        (*o).vihl = 0x45;
        (*o).tos = tos;
        (*o).tot_len = tot_len.to_be_bytes();
        (*o).id = [0, 0];
        (*o).frags = [0, 0];
        (*o).ttl = 64;
        (*o).proto = 4;
        (*o).check = check.to_be_bytes();
        (*o).src_addr = src;
        (*o).dst_addr = [dst[0], dst[1], dst[2], dst[3]];
    }
    Ok(())
}

#[inline(always)]
fn encap_v6(ctx: &XdpContext, dst: &[u8; 16], dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), ()> {
    let inner = parse::ptr_at::<network_types::ip::Ipv6Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    let (vcf, len) = unsafe { ((*inner).vcf, u16::from_be_bytes((*inner).payload_len)) };
    // SAFETY: as in `encap_v4`.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -40) } != 0 {
        return Err(());
    }
    outer_eth(ctx, dmac, smac, 0x86dd)?;
    let o = parse::ptr_at::<network_types::ip::Ipv6Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        (*o).vcf = [vcf[0], vcf[1] & 0xf0, 0, 0];
        (*o).payload_len = (len + 40).to_be_bytes();
        (*o).next_hdr = 41;
        (*o).hop_limit = 64;
        (*o).src_addr = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        (*o).dst_addr = *dst;
    }
    Ok(())
}

#[inline(always)]
fn minimal_lb<K>(
    ctx: &XdpContext,
    table: &LruHashMap<K, Flow>,
    key: impl Fn(&parse::Packet) -> K,
) -> u32 {
    minimal_lb_sending(ctx, table, key, |_, b| write_macs(ctx, b))
}

#[inline(always)]
fn minimal_lb_sending<K>(
    ctx: &XdpContext,
    table: &LruHashMap<K, Flow>,
    key: impl Fn(&parse::Packet) -> K,
    send: impl Fn(&parse::Packet, &Backend) -> u32,
) -> u32 {
    let Ok(p) = parse::parse(ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let vk = VipKey {
        addr: p.key.dst,
        port: p.key.dport,
        proto: p.key.proto,
        family: p.family,
    };
    // SAFETY: read-only use of the values.
    if unsafe { COST_VIPS.get(&vk) }.is_none() {
        let _ = COST_VIPS.insert(&vk, &0, 0);
        return xdp_action::XDP_ABORTED;
    }
    let k = key(&p);
    // SAFETY: as above.
    let backend_id = match unsafe { table.get(&k) } {
        Some(f) => f.backend_id,
        None => {
            // A new flow: recorded (on backend 1: no scheduling) and sent.
            let f = Flow {
                backend_id: 1,
                ..Default::default()
            };
            if table.insert(&k, &f, 0).is_err() {
                return xdp_action::XDP_ABORTED;
            }
            f.backend_id
        }
    };
    let Some(b) = COST_BACKENDS.get(backend_id & 15) else {
        return xdp_action::XDP_ABORTED;
    };
    let b: &Backend = b;
    count(backend_id, p.ip_len);
    send(&p, b)
}
