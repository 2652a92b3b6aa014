//! Stripping a tunnel header: what `lb_decap` does on a backend, and what
//! the micro-benchmark's `bench_ipip` does to undo the previous
//! repetition's encapsulation. A module of its own so both objects (the
//! datapath and the tools) share it.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use network_types::eth::EthHdr;

use crate::parse::ptr_at;

/// Strips an outer IPv4 (protocol 4) or IPv6 (next header 41) header in
/// front of an inner header of the same family. `outer_len` is the outer
/// header's length; the L2 header is moved forward over it.
#[inline(always)]
pub fn decap(ctx: &XdpContext, l3_off: usize, outer_len: usize) -> Result<(), ()> {
    // Move L2 forward: copy to [outer_len, outer_len + l3_off).
    let src: *const [u8; 14] = ptr_at(ctx, 0)?;
    let dst: *mut [u8; 14] = ptr_at(ctx, outer_len)?;
    // Read the whole L2 header into locals before writing, so the source and
    // destination ranges may overlap (they do with a VLAN tag and IPv4).
    // SAFETY: bounds checked by ptr_at.
    // Volatile reads: plain ones let the compiler turn read-then-write
    // back into a call of `memmove` (a byte loop in a function of its own).
    let (eth, tag) = unsafe {
        let eth = core::ptr::read_volatile(src);
        let tag = if l3_off > EthHdr::LEN {
            let t: *const [u8; 4] = ptr_at(ctx, EthHdr::LEN)?;
            Some(core::ptr::read_volatile(t))
        } else {
            None
        };
        (eth, tag)
    };
    // SAFETY: bounds checked above; the locals are not packet memory.
    unsafe { core::ptr::copy_nonoverlapping(&eth, dst, 1) };
    if let Some(tag) = tag {
        let t: *mut [u8; 4] = ptr_at(ctx, outer_len + EthHdr::LEN)?;
        // SAFETY: bounds checked by ptr_at; as above.
        unsafe { core::ptr::copy_nonoverlapping(&tag, t, 1) };
    }
    // SAFETY: shrinking the head; pointers are re-derived afterwards.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) };
    if rc != 0 { Err(()) } else { Ok(()) }
}
