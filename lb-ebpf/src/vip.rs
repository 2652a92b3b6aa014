//! Which VIP a packet is for (a reference into its map: an `Option` of a
//! copy leaves a `None`'s payload undefined, which the verifier refuses to
//! see copied): the address filters (one array lookup that
//! turns non-VIP traffic away; one that says whether an established flow
//! may name its VIP), the VIP of an established flow by its id, the exact
//! and every-port VIP lookups in the VIP directory (arrays only), and the
//! address check fragments need (the one hash lookup left, for fragments,
//! which are dropped).

use aya_ebpf::maps::Array;
use lb_common::{VipKey, VipMeta, hash};

use crate::{
    maps::{
        VIP_ADDRS, VIP_DIR, VIP_FAST_FILTER, VIP_FILTER, VIP_ONLY_FILTER, VIP_TABLE_FILTER,
        VIPS_BY_ID, vip_dir_mask,
    },
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

/// VIP `id`, if its key is (`family`, `proto`, `port` or every port, the
/// address `dst` as four words): [`vip_of_flow`] for a flow known by its
/// header fields (the established path, `fast`).
#[inline(always)]
pub(crate) fn vip_by_id(
    id: u32,
    family: u8,
    proto: u8,
    port: u16,
    dst: &[u32; 4],
) -> Option<&'static VipMeta> {
    let e = VIPS_BY_ID.get(id)?;
    let k = &e.key;
    // SAFETY: `VipById` starts with its key and is 4-aligned; the address
    // is its first 16 bytes (a byte-array comparison is a call of `bcmp`).
    let a = unsafe { &*(k.addr.as_ptr() as *const [u32; 4]) };
    if k.family != family
        || k.proto != proto
        || (k.port != port && k.port != 0)
        || (a[0] ^ dst[0]) | (a[1] ^ dst[1]) | (a[2] ^ dst[2]) | (a[3] ^ dst[3]) != 0
    {
        return None;
    }
    Some(&e.meta)
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

/// [`lookup_vip`] of a destination (four words), port, protocol and
/// family (the established path's, `fast`, which has no `Packet`).
#[inline(always)]
pub(crate) fn lookup_vip_by(
    dst: &[u32; 4],
    port: u16,
    proto: u8,
    family: u8,
) -> Option<&'static VipMeta> {
    let folded = dst[0] ^ dst[1] ^ dst[2] ^ dst[3];
    let mut id = dir_find(dst, folded, port, proto, family);
    if id == NO_VIP {
        id = dir_find(dst, folded, 0, proto, family);
    }
    vip_by_id(id, family, proto, port, dst)
}

/// What [`dir_find`] answers for a key the directory does not hold: no
/// index of `VIPS_BY_ID`, whose lookup then fails.
const NO_VIP: u32 = u32::MAX;

/// The id of the VIP (destination `dst`, `port`, the packet's protocol and
/// family) in `VIP_DIR`, or [`NO_VIP`]. A scalar, not a reference: every
/// slot it may come from leaves the verifier one state to follow.
#[inline(always)]
fn dir_find(dst: &[u32; 4], folded: u32, port: u16, proto: u8, family: u8) -> u32 {
    let tail = hash::vip_key_tail(port, proto, family);
    let (first, second) = hash::vip_dir_buckets(folded, tail, vip_dir_mask());
    let found = in_bucket(first, dst, tail);
    if found != NO_VIP {
        return found;
    }
    in_bucket(second, dst, tail)
}

/// The id in bucket `b` of the key (`dst`, `tail`), or [`NO_VIP`].
#[inline(always)]
fn in_bucket(b: u32, dst: &[u32; 4], tail: u32) -> u32 {
    let Some(bucket) = VIP_DIR.get(b) else {
        return NO_VIP;
    };
    for s in &bucket.slots {
        // SAFETY: `VipKey` is 20 bytes, 4-aligned (`repr(C)`, `VipDirSlot`
        // starts with it): five little-endian words, the last `tail`.
        let k = unsafe { &*(s.key.addr.as_ptr() as *const [u32; 5]) };
        if k[4] == tail
            && (k[0] ^ dst[0]) | (k[1] ^ dst[1]) | (k[2] ^ dst[2]) | (k[3] ^ dst[3]) == 0
        {
            return s.vip_id;
        }
    }
    NO_VIP
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
