//! Which VIP a packet is for (a reference into its map: an `Option` of a
//! copy leaves a `None`'s payload undefined, which the verifier refuses to
//! see copied): the address filters (one array lookup that
//! turns non-VIP traffic away; one that says whether an established flow
//! may name its VIP), the VIP of an established flow by its id, the exact
//! and every-port VIP lookups in the VIP directory (arrays only, in
//! `dir.rs`), and the
//! address check fragments need (the one hash lookup left, for fragments,
//! which are dropped).

use aya_ebpf::maps::Array;
use lb_common::{VipKey, VipMeta, hash};

use crate::{
    dir::{lookup_vip_by, vip_by_id},
    maps::{VIP_ADDRS, VIP_FAST_FILTER, VIP_FILTER, VIP_ONLY_FILTER, VIP_TABLE_FILTER},
    parse::Packet,
};

/// The VIP of a flow whose connection-table entry names VIP `id`, if that
/// VIP is still the one the packet is addressed to (an id given to another
/// VIP since the flow began, or a removed VIP, does not match): one array
/// read instead of [`lookup_vip`]'s directory buckets. Also the last step
/// of [`lookup_vip`], with the id the directory found.
#[inline(always)]
pub(crate) fn vip_of_flow(pkt: &Packet, id: u32) -> Option<&'static VipMeta> {
    // SAFETY: `FlowKey` is `align(4)` with `dst` at offset 16.
    let dst = unsafe { &*(pkt.key.dst.as_ptr() as *const [u32; 4]) };
    vip_by_id(id, pkt.family, pkt.key.proto, pkt.key.dport, dst)
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

/// What kinds of VIP may live on the destination and `port` (0: every
/// port of the address) for the established path (`VIP_FAST_FILTER`):
/// (one with a connection table, one without; full NAT in neither).
#[inline(always)]
pub(crate) fn maybe_fast_vip(folded_dst: u32, port: u16) -> (bool, bool) {
    let (w, bit) = hash::vip_table_slot_folded(folded_dst, port);
    let b = VIP_FAST_FILTER.get(w).map_or(0, |word| word >> bit);
    (b & 1 != 0, b & (1 << 32) != 0)
}

/// The VIP for this packet: exact (address, port, protocol), then the
/// every-port entry (port 0), found in the directory `VIP_DIR` with array
/// reads only (no hash-map lookup): each key lives in one of two buckets of
/// four slots; a packet reads the first, and the second only when the
/// first does not hold its key. The id found is read from `VIPS_BY_ID`,
/// whose key must match too ([`vip_of_flow`]).
#[inline(always)]
pub(crate) fn lookup_vip(pkt: &Packet) -> Option<&'static VipMeta> {
    // SAFETY: `FlowKey` is `align(4)` with `dst` at offset 16.
    let dst = unsafe { &*(pkt.key.dst.as_ptr() as *const [u32; 4]) };
    lookup_vip_by(dst, pkt.key.dport, pkt.key.proto, pkt.family)
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
