//! The VIP directory's lookups, with array reads only: the VIP of a key
//! (address, port, protocol, family) in `VIP_DIR`, whose id is then read
//! from `VIPS_BY_ID`, and a VIP by its id. Apart from `vip.rs` (the
//! address filters and the lookups of a parsed packet) so that the tools
//! object prices the same code (`cost_dir`) over its own two maps.

use lb_common::{VipMeta, hash};

use crate::maps::{VIP_DIR, VIPS_BY_ID, vip_dir_mask};

/// VIP `id`, if its key is (`family`, `proto`, `port` or every port, the
/// address `dst` as four words): `vip::vip_of_flow` for a flow known by its
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

/// `vip::lookup_vip` of a destination (four words), port, protocol and
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
