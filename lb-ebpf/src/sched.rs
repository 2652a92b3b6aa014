//! Scheduling a new flow: the ring it is scheduled over (the VIP's, or its
//! region's), the backends in it, and the policies (Maglev slot, round-robin
//! walk, least connections exact or power of two choices).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    BACKEND_DOWN, Backend, LC_EXACT_MAX, RegionKey, SCHED_LEAST_CONN, SCHED_MAGLEV,
    SCHED_ROUND_ROBIN, VIP_F_REGIONS, VIP_F_SECOND_CHANCE, VipMeta, ring_base,
};

use crate::{
    flow::now_s,
    maps::{ACTIVE, BACKENDS, PREV_RING_UNTIL, REGIONS, RINGS, RR_POS},
    parse::Packet,
};

#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<&'static Backend> {
    if id == 0 {
        return None;
    }
    // A reference into the map, not a copy: the BPF stack is 512 bytes.
    let b = BACKENDS.get(id)?;
    if b.family == 0 || b.state == BACKEND_DOWN {
        return None;
    }
    Some(b)
}

/// The ring a new flow is scheduled over: the VIP's, or its client's
/// region's (longest-prefix match on the client address).
pub(crate) struct Ring {
    pub(crate) id: u32,
    pub(crate) half: u32,
    pub(crate) size: u32,
    pub(crate) offset: u32,
}

#[inline(always)]
pub(crate) fn ring_for(pkt: &Packet, vip: &VipMeta) -> Ring {
    ring_for_src(&pkt.key.src, vip)
}

/// [`ring_for`] of a client address.
#[inline(always)]
pub(crate) fn ring_for_src(src: &[u8; 16], vip: &VipMeta) -> Ring {
    if vip.flags & VIP_F_REGIONS != 0 {
        let key = Key::new(
            32 + 128,
            RegionKey {
                vip_id_be: vip.vip_id.to_be_bytes(),
                addr: *src,
            },
        );
        if let Some(r) = REGIONS.get(&key) {
            return Ring {
                id: r.ring_id,
                half: r.active_half,
                size: r.ring_size,
                offset: r.ring_offset,
            };
        }
    }
    vip_ring(vip)
}

#[inline(always)]
pub(crate) fn vip_ring(vip: &VipMeta) -> Ring {
    Ring {
        id: vip.vip_id,
        half: vip.active_half,
        size: vip.ring_size,
        offset: vip.ring_offset,
    }
}

#[inline(always)]
pub(crate) fn ring_entry(base: u32, i: u32) -> Option<(u32, &'static Backend)> {
    let id = *RINGS.get(base + i)?;
    Some((id, backend(id)?))
}

#[inline(always)]
pub(crate) fn active(id: u32) -> u64 {
    ACTIVE.get(id).copied().unwrap_or(0)
}

/// Adds `delta` (wrapping: u64::MAX is -1) to a backend's active flows.
#[inline(always)]
pub(crate) fn active_add(id: u32, delta: u64) {
    if let Some(p) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: a valid map value pointer; every CPU updates it atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
    }
}

/// Whether `a` (active flows, weight) is less loaded than `b`.
#[inline(always)]
pub(crate) fn less_loaded(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 * b.1 < b.0 * a.1
}

/// Least connections: the exact minimum of active/weight over small rings
/// (which list each live backend once), two hashed candidates otherwise.
#[inline(always)]
pub(crate) fn least_conn(base: u32, size: u32, h: u32) -> Option<(u32, &'static Backend)> {
    let load = |id: u32, b: &Backend| (active(id), (b.weight as u64).max(1));
    if size <= LC_EXACT_MAX {
        let best_id = lb_lc_scan(base, size, h);
        let best = backend(best_id).map(|b| (best_id, b));
        return best;
    }
    let a = ring_entry(base, h % size);
    let b = ring_entry(base, (h.rotate_left(16) ^ 0x9e37_79b9) % size);
    match (a, b) {
        (Some(x), Some(y)) => Some(if less_loaded(load(y.0, &y.1), load(x.0, &x.1)) {
            y
        } else {
            x
        }),
        (x, y) => x.or(y),
    }
}

/// The exact least-connections scan over a small ring (at most
/// `LC_EXACT_MAX` entries). Returns the chosen backend id, 0 if none is
/// live. A BPF global function (`extern "C"`, not inlined, scalars in and
/// out): the verifier checks it once, on its own, instead of once per path
/// into it, which took the balancer from 808,011 verified instructions to
/// 274,564 (the traced copy from 871,863 to 320,794). Its frame adds to
/// the balancer's within the 512-byte limit, so its running best lives in
/// `LC_SCRATCH`, not on its stack.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_lc_scan(base: u32, size: u32, h: u32) -> u32 {
    // The running best lives in this CPU's scratch slot, not on the stack:
    // this function's frame adds to the balancer's (512 bytes in all).
    let Some(best) = crate::maps::LC_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, ours while the program runs.
    unsafe { *best = [0; 4] };
    let mut i = 0;
    while i < LC_EXACT_MAX {
        if i >= size {
            break;
        }
        if let Some(id) = RINGS.get(base + i).copied()
            && let Some(b) = backend(id)
        {
            let (a, w) = (active(id), (b.weight as u64).max(1));
            // Ties between equally loaded backends go to the one whose
            // id hashes lowest with this flow: spread, not first-wins.
            let tie = u64::from((id ^ h).wrapping_mul(0x9e37_79b1));
            // SAFETY: as above. [id, active, weight, tie].
            unsafe {
                let [bid, ba, bw, bt] = *best;
                let better = bid == 0 || a * bw < ba * w || (a * bw == ba * w && tie < bt);
                if better {
                    *best = [u64::from(id), a, w, tie];
                }
            }
        }
        i += 1;
    }
    // SAFETY: as above.
    unsafe { (*best)[0] as u32 }
}

/// Picks a backend for a new flow with the VIP's scheduler.
#[inline(always)]
pub(crate) fn schedule(vip: &VipMeta, ring: &Ring, h: u32) -> Option<(u32, &'static Backend)> {
    if ring.size == 0 {
        return None;
    }
    let base = ring_base(ring.offset, ring.size, ring.half);
    match vip.scheduler {
        SCHED_ROUND_ROBIN => {
            let pos = RR_POS.get_ptr_mut(ring.id)?;
            // SAFETY: per-CPU slot.
            let p = unsafe {
                let p = *pos;
                *pos = p.wrapping_add(1);
                p
            };
            ring_entry(base, p % ring.size)
        }
        SCHED_LEAST_CONN => least_conn(base, ring.size, h),
        _ => ring_entry(base, h % ring.size),
    }
}

/// The second chance's second hop of a packet scheduled on `ring` (slot
/// `h`) to backend `first`: the backend the same slot named on the ring's
/// previous ring (its other half), if the VIP asks for it, the agent says
/// the other half is recent (`PREV_RING_UNTIL`), and that backend is
/// another live one. Maglev only: a round-robin or least-connections ring
/// does not say where a flow went. The caller asks for no SYN (a SYN opens
/// its connection where the current ring says).
#[inline(always)]
pub(crate) fn second_hop(
    vip: &VipMeta,
    ring: &Ring,
    h: u32,
    first: u32,
) -> Option<(u32, &'static Backend)> {
    if vip.flags & VIP_F_SECOND_CHANCE == 0 || vip.scheduler != SCHED_MAGLEV || ring.size == 0 {
        return None;
    }
    let until = *PREV_RING_UNTIL.get(ring.id)?;
    if until == 0 || now_s() > until {
        return None;
    }
    let base = ring_base(ring.offset, ring.size, ring.half ^ 1);
    let (id, b) = ring_entry(base, h % ring.size)?;
    if id == first { None } else { Some((id, b)) }
}
