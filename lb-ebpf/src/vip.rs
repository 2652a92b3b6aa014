//! Which VIP a packet is for: the address filter (one array lookup that
//! turns non-VIP traffic away), the exact and every-port VIP lookups, and
//! the address check fragments need.

use lb_common::{VipKey, VipMeta, hash};

use crate::{
    maps::{VIP_ADDRS, VIP_FILTER, VIPS},
    parse::Packet,
};

/// The VIP for this packet: exact (address, port, protocol), then the
/// every-port entry (port 0).
#[inline(always)]
pub(crate) fn lookup_vip(pkt: &Packet) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.family,
    };
    // SAFETY: VIP entries are only replaced whole by userspace; a torn read
    // cannot happen for the values the kernel copies out under RCU.
    if let Some(m) = unsafe { VIPS.get(&key) } {
        return Some(*m);
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&key) }.copied()
}

/// False when no VIP can live on the packet's destination address: its
/// filter bit is clear (one inlined array lookup, no hash-map probe).
#[inline(always)]
pub(crate) fn maybe_vip_addr(folded_dst: u32) -> bool {
    let (w, bit) = hash::vip_filter_slot_folded(folded_dst);
    VIP_FILTER
        .get(w)
        .is_some_and(|word| word & (1u32 << bit) != 0)
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
