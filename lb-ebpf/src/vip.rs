//! Which VIP a packet is for (a reference into its map: an `Option` of a
//! copy leaves a `None`'s payload undefined, which the verifier refuses to
//! see copied): the address filters (one array lookup that
//! turns non-VIP traffic away; one that says whether an established flow
//! may name its VIP), the VIP of an established flow by its id, the exact
//! and every-port VIP lookups, and the address check fragments need.

use aya_ebpf::maps::Array;
use lb_common::{FlowKey, VipById, VipKey, VipMeta, hash};

use crate::{
    maps::{VIP_ADDRS, VIP_FILTER, VIP_ONLY_FILTER, VIP_TABLE_FILTER, VIPS, VIPS_BY_ID},
    parse::Packet,
};

/// The VIP of a flow whose connection-table entry names VIP `id`, if that
/// VIP is still the one the packet is addressed to (an id given to another
/// VIP since the flow began, or a removed VIP, does not match): one array
/// read instead of [`lookup_vip`]'s one or two hash lookups.
#[inline(always)]
pub(crate) fn vip_of_flow(pkt: &Packet, id: u16) -> Option<&'static VipMeta> {
    let e = VIPS_BY_ID.get(u32::from(id))?;
    let k = &e.key;
    if k.family != pkt.family
        || k.proto != pkt.key.proto
        || (k.port != pkt.key.dport && k.port != 0)
        || !same_addr(e, &pkt.key)
    {
        return None;
    }
    Some(&e.meta)
}

/// The VIP's address equals the flow's destination, compared a word at a
/// time (a byte-array comparison is a call of `bcmp`).
#[inline(always)]
fn same_addr(v: &VipById, k: &FlowKey) -> bool {
    // SAFETY: both addresses are 4-aligned (`VipById` starts with its key
    // and is 4-aligned; `FlowKey` is `align(4)` with `dst` at offset 16)
    // and 16 bytes long.
    let (a, b) = unsafe {
        (
            &*(v.key.addr.as_ptr() as *const [u32; 4]),
            &*(k.dst.as_ptr() as *const [u32; 4]),
        )
    };
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

/// False when no VIP lives on the address (its bit in `VIP_ONLY_FILTER`
/// is clear): a packet that passed `VIP_FILTER` for a NAT address then
/// skips the VIP hash lookups.
#[inline(always)]
pub(crate) fn maybe_vip_only_addr(folded_dst: u32) -> bool {
    bit_set(&VIP_ONLY_FILTER, hash::vip_filter_slot_folded(folded_dst))
}

/// Whether bit `bit` of word `w` of an address filter is set.
#[inline(always)]
fn bit_set(filter: &Array<u32>, (w, bit): (u32, u32)) -> bool {
    filter.get(w).is_some_and(|word| word & (1u32 << bit) != 0)
}

/// Whether a VIP that keeps a connection table may live on the packet's
/// destination address and port, or on every port of that address (their
/// bits in `VIP_TABLE_FILTER`): only there is an established flow looked
/// up before its VIP.
#[inline(always)]
pub(crate) fn maybe_table_vip(folded_dst: u32, port: u16) -> bool {
    let set = |port| {
        bit_set(
            &VIP_TABLE_FILTER,
            hash::vip_table_slot_folded(folded_dst, port),
        )
    };
    set(port) || set(0)
}

/// The VIP for this packet: exact (address, port, protocol), then the
/// every-port entry (port 0).
#[inline(always)]
pub(crate) fn lookup_vip(pkt: &Packet) -> Option<&'static VipMeta> {
    let mut key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.family,
    };
    // SAFETY: VIP entries are only replaced whole by userspace; a torn read
    // cannot happen for the values the kernel copies out under RCU.
    if let Some(m) = unsafe { VIPS.get(&key) } {
        return Some(m);
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&key) }
}

/// False when no VIP can live on the packet's destination address: its
/// filter bit is clear (one inlined array lookup, no hash-map probe).
#[inline(always)]
pub(crate) fn maybe_vip_addr(folded_dst: u32) -> bool {
    bit_set(&VIP_FILTER, hash::vip_filter_slot_folded(folded_dst))
}

/// Whether any VIP lives on this address (for fragments, which lack ports).
#[inline(always)]
pub(crate) fn is_vip_addr(pkt: &Packet) -> bool {
    let key = VipKey {
        addr: pkt.key.dst,
        port: 0,
        proto: 0,
        family: pkt.family,
    };
    VIP_ADDRS.get_ptr(&key).is_some()
}
