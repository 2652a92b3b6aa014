//! The cost programs: the swap-MACs floor plus one primitive each (a map
//! lookup of a given kind, a counter update, a clock read, a head
//! adjustment, the datapath's own table and directory lookups). The
//! programs that bound a path, built from several primitives, are in
//! `bound.rs` (see the object's module text in `tools.rs`).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{Flow, FlowKey, VipKey};

use crate::{
    dir,
    maps::{
        COST_ARRAY, COST_HASH, COST_HASH16, COST_LRU, COST_LRU_PCPU, COST_PERCPU, VIP_DIR,
        VIPS_BY_ID, vip_dir_mask,
    },
    parse, swap_macs, table,
};

/// `XDP_TX` after swapping the MACs if `hit`, else `XDP_ABORTED`.
#[inline(always)]
fn tx_if(ctx: &XdpContext, hit: bool) -> u32 {
    if hit && swap_macs(ctx).is_ok() {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// Floor + parsing the packet as the balancer does (L2, L3, L4, flow key).
#[xdp]
pub fn cost_parse(ctx: XdpContext) -> u32 {
    let ok = parse::parse(&ctx).is_ok();
    tx_if(&ctx, ok)
}

/// Floor + one array lookup (the JIT inlines it).
#[xdp]
pub fn cost_array(ctx: XdpContext) -> u32 {
    let hit = COST_ARRAY.get_ptr(1).is_some();
    tx_if(&ctx, hit)
}

/// A key that the compiler cannot fold: the first bytes of the packet
/// (constant in the benchmark) make it.
#[inline(always)]
fn packet_key(ctx: &XdpContext) -> Option<FlowKey> {
    let w = parse::ptr_at::<[u8; 4]>(ctx, 26).ok()?;
    let mut k = FlowKey::default();
    // SAFETY: ptr_at checked the bounds.
    k.src[..4].copy_from_slice(unsafe { &*w });
    Some(k)
}

/// Floor + one hash-map lookup with a 40-byte key (the connection table's
/// key), hit.
#[xdp]
pub fn cost_hash(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: read-only use of the value.
    let hit = unsafe { COST_HASH.get(&k) }.is_some();
    if !hit {
        let _ = COST_HASH.insert(&k, &Flow::default(), 0);
    }
    tx_if(&ctx, hit)
}

/// Floor + one LRU-hash lookup with a 40-byte key, hit: the connection
/// table's lookup.
#[xdp]
pub fn cost_lru(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: read-only use of the value.
    let hit = unsafe { COST_LRU.get(&k) }.is_some();
    if !hit {
        let _ = COST_LRU.insert(&k, &Flow::default(), 0);
    }
    tx_if(&ctx, hit)
}

/// Floor + one LRU-hash update of an existing key (what a new flow's table
/// write costs at least).
#[xdp]
pub fn cost_lru_update(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let ok = COST_LRU.insert(&k, &Flow::default(), 0).is_ok();
    tx_if(&ctx, ok)
}

/// Floor + one hash-map lookup with a 16-byte key, hit.
#[xdp]
pub fn cost_hash16(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: read-only use of the value.
    let hit = unsafe { COST_HASH16.get(&k.src) }.is_some();
    if !hit {
        let _ = COST_HASH16.insert(&k.src, &Flow::default(), 0);
    }
    tx_if(&ctx, hit)
}

/// [`cost_lru`] on per-CPU LRU lists.
#[xdp]
pub fn cost_lru_pcpu(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: read-only use of the value.
    let hit = unsafe { COST_LRU_PCPU.get(&k) }.is_some();
    if !hit {
        let _ = COST_LRU_PCPU.insert(&k, &Flow::default(), 0);
    }
    tx_if(&ctx, hit)
}

/// [`cost_lru_update`] on per-CPU LRU lists.
#[xdp]
pub fn cost_lru_pcpu_update(ctx: XdpContext) -> u32 {
    let Some(k) = packet_key(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let ok = COST_LRU_PCPU.insert(&k, &Flow::default(), 0).is_ok();
    tx_if(&ctx, ok)
}

/// Floor + one per-CPU counter update (packets and bytes of a `Traffic`).
#[xdp]
pub fn cost_counter(ctx: XdpContext) -> u32 {
    let Some(t) = COST_PERCPU.get_ptr_mut(1) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot.
    unsafe {
        (*t).packets += 1;
        (*t).bytes += 64;
    }
    tx_if(&ctx, true)
}

/// Floor + one `bpf_ktime_get_ns`.
#[xdp]
pub fn cost_clock(ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let t = unsafe { bpf_ktime_get_ns() };
    tx_if(&ctx, t != 0)
}

/// Floor + one `bpf_ktime_get_coarse_ns` (the clock of the last tick).
#[xdp]
pub fn cost_clock_coarse(ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let t = unsafe { bpf_ktime_get_coarse_ns() };
    tx_if(&ctx, t != 0)
}

/// Floor + making room for an outer IPv4 header and giving it back (two
/// `bpf_xdp_adjust_head` calls: encapsulation needs one).
#[xdp]
pub fn cost_adjust_head(ctx: XdpContext) -> u32 {
    // SAFETY: the pointers are re-derived by swap_macs afterwards.
    let ok =
        unsafe { bpf_xdp_adjust_head(ctx.ctx, -20) == 0 && bpf_xdp_adjust_head(ctx.ctx, 20) == 0 };
    tx_if(&ctx, ok)
}

/// What the balancer does for a packet to no VIP, alone: parse, the
/// address filter (one array lookup), one per-CPU verdict counter, pass.
#[xdp]
pub fn cost_non_vip(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::parse(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let (w, bit) = lb_common::hash::vip_filter_slot(&p.key.dst);
    if COST_ARRAY
        .get(w & 15)
        .is_some_and(|v| v & (1u64 << bit) != 0)
    {
        return xdp_action::XDP_ABORTED;
    }
    if let Some(c) = COST_PERCPU.get_ptr_mut(2) {
        // SAFETY: per-CPU slot.
        unsafe { (*c).packets += 1 };
    }
    xdp_action::XDP_PASS
}

/// Floor + the connection table's own lookup: the datapath's
/// `table::find` (one set of `FLOW_WAYS` slots of a 262,144-slot table
/// chosen by the table hash, the tag and then the key compared in full).
/// Like `bound::cost_minimal_lb`, a flow it does not hold is recorded
/// (`table::insert`) and forwarded, so it also runs in the packet-rate
/// benchmark: what the table alone costs at 1, 1,000 and 100,000 flows.
#[xdp]
pub fn cost_set(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::parse(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let pr = table::probe(&p.key);
    if table::lookup(pr.base, pr.tag, &p.key).is_none() {
        let f = Flow {
            backend_id: 1,
            ..Default::default()
        };
        table::insert(pr.base, pr.tag, &p.key, &f);
    }
    tx_if(&ctx, true)
}

/// Floor + the datapath's VIP directory lookup (`dir::lookup_vip_by`, the
/// code a SYN and a packet of a VIP without a table find their VIP with:
/// the key's first bucket of `VIP_DIR` read and its slots compared, then
/// the VIP's entry in `VIPS_BY_ID` read and its key compared). The first
/// repetition writes the packet's VIP into slot 0 of that bucket (as the
/// agent would with one VIP) and aborts.
#[xdp]
pub fn cost_dir(ctx: XdpContext) -> u32 {
    let Ok(p) = parse::parse(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: `FlowKey` is `align(4)` with `dst` at offset 16.
    let dst = unsafe { &*(p.key.dst.as_ptr() as *const [u32; 4]) };
    if dir::lookup_vip_by(dst, p.key.dport, p.key.proto, p.family).is_some() {
        return tx_if(&ctx, true);
    }
    let key = VipKey {
        addr: p.key.dst,
        port: p.key.dport,
        proto: p.key.proto,
        family: p.family,
    };
    let tail = lb_common::hash::vip_key_tail(key.port, key.proto, key.family);
    let (first, _) = lb_common::hash::vip_dir_buckets(
        lb_common::hash::fold_addr(&key.addr),
        tail,
        vip_dir_mask(),
    );
    const ID: u32 = 7;
    if let (Some(b), Some(v)) = (VIP_DIR.get_ptr_mut(first), VIPS_BY_ID.get_ptr_mut(ID)) {
        // SAFETY: map value pointers.
        unsafe {
            (*b).slots[0] = lb_common::VipDirSlot { key, vip_id: ID };
            (*v).key = key;
        }
    }
    xdp_action::XDP_ABORTED
}
