//! The traffic generator's XDP side, run with BPF_PROG_TEST_RUN in
//! live-frames mode (the xdp-trafficgen technique): every run rewrites the
//! template frame's source address and port to the next of `flows` flows,
//! patches the checksums incrementally (RFC 1624) and sends it with
//! `XDP_TX`. And `sink`, which counts and drops what arrives.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{AF_INET, PROTO_TCP};

use crate::{
    maps::{LOADGEN, LOADGEN_FRAME, LOADGEN_SEQ, SINK},
    parse::ptr_at,
};

/// Copies the template's first `N` bytes over the frame's.
#[inline(always)]
fn restore<const N: usize>(
    ctx: &XdpContext,
    t: &[u8; lb_common::LOADGEN_FRAME_LEN],
) -> Result<(), ()> {
    let f: *mut [u8; N] = ptr_at(ctx, 0)?;
    let mut i = 0;
    while i < N && i < lb_common::LOADGEN_FRAME_LEN {
        // SAFETY: ptr_at checked all N bytes.
        unsafe { (*f)[i] = t[i] };
        i += 1;
    }
    Ok(())
}

/// Ones'-complement update of checksum `c` when a 16-bit word changes from
/// `old` to `new` (RFC 1624, eqn. 3). All values big-endian as in the packet.
#[inline(always)]
fn csum_replace(c: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!c as u32) + (!old as u32 & 0xffff) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn rd16(p: *const [u8; 2]) -> u16 {
    // SAFETY: callers pass pointers checked by ptr_at.
    u16::from_be_bytes(unsafe { *p })
}

#[inline(always)]
fn wr16(p: *mut [u8; 2], v: u16) {
    // SAFETY: callers pass pointers checked by ptr_at.
    unsafe { *p = v.to_be_bytes() };
}

pub fn try_loadgen(ctx: &XdpContext) -> Result<u32, ()> {
    let cfg = *LOADGEN.get(0).ok_or(())?;
    let seq = LOADGEN_SEQ.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU slot.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let flows = if cfg.flows == 0 { 1 } else { cfg.flows as u64 };
    let flow = (n % flows) as u32;
    // IPv4: the last 16 bits of the source address, then the port (a test
    // range of 65,536 addresses). IPv6: the last 32 bits of the address, the
    // port fixed, so every flow has a source address of its own.
    let v4 = cfg.family == AF_INET;
    // The headers as the template has them (Ethernet, maybe VLAN, IP,
    // TCP/UDP): the patches below assume them.
    let t = LOADGEN_FRAME.get(0).ok_or(())?;
    let vlan = cfg.l3_off > 14;
    match (v4, cfg.proto == PROTO_TCP, vlan) {
        (true, false, false) => restore::<42>(ctx, t)?,
        (true, true, false) => restore::<54>(ctx, t)?,
        (false, false, false) => restore::<62>(ctx, t)?,
        (false, true, false) => restore::<74>(ctx, t)?,
        (true, false, true) => restore::<46>(ctx, t)?,
        (true, true, true) => restore::<58>(ctx, t)?,
        (false, false, true) => restore::<66>(ctx, t)?,
        (false, true, true) => restore::<78>(ctx, t)?,
    }
    let addr_lo = (flow & 0xffff) as u16;
    let (addr_hi, port) = if v4 {
        (0, 1024u16.wrapping_add((flow >> 16) as u16))
    } else {
        ((flow >> 16) as u16, 1024)
    };

    // Offsets bounded for the verifier (the frame is ours: Ethernet, maybe VLAN).
    let l3 = (cfg.l3_off & 0x3f) as usize;
    let l4 = (cfg.l4_off & 0xff) as usize;
    // IPv4: bytes 14..16 of the header are the low half of the source;
    // IPv6: bytes 20..24 its low 32 bits.
    let src_lo_off = if v4 { l3 + 14 } else { l3 + 22 };
    let src_lo: *mut [u8; 2] = ptr_at(ctx, src_lo_off)?;
    let old_lo = rd16(src_lo);
    wr16(src_lo, addr_lo);
    let mut old_hi = 0;
    if v4 {
        let ipc: *mut [u8; 2] = ptr_at(ctx, l3 + 10)?;
        wr16(ipc, csum_replace(rd16(ipc), old_lo, addr_lo));
    } else {
        let src_hi: *mut [u8; 2] = ptr_at(ctx, l3 + 20)?;
        old_hi = rd16(src_hi);
        wr16(src_hi, addr_hi);
    }
    let sport: *mut [u8; 2] = ptr_at(ctx, l4)?;
    let old_port = rd16(sport);
    wr16(sport, port);
    // The transport checksum covers the pseudo-header (address) and the port.
    let csum_off = if cfg.proto == PROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    let l4c: *mut [u8; 2] = ptr_at(ctx, csum_off)?;
    let c = rd16(l4c);
    if c != 0 || !v4 || cfg.proto == PROTO_TCP {
        let c = csum_replace(c, old_lo, addr_lo);
        let c = csum_replace(c, old_hi, addr_hi);
        wr16(l4c, csum_replace(c, old_port, port));
    }
    Ok(xdp_action::XDP_TX)
}

pub fn sink(_ctx: &XdpContext) -> u32 {
    if let Some(c) = SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}
