//! The tools object: programs that are not the datapath, so `lb run` never
//! loads or verifies them. `lb loadgen`'s generator and its `sink`, the
//! micro-benchmark's floors, `bench_ipip` (which strips the previous
//! repetition's tunnel header and tail-calls a balancer loaded from the
//! datapath object), and the cost programs: the swap-MACs floor plus one
//! primitive each (a map lookup of a given kind, a counter update, a clock
//! read, a head adjustment), and `cost_minimal_lb`, the least work any
//! balancer with a connection table does per established packet. They
//! price what the balancer's per-packet budget is made of (BENCHMARKS.md,
//! "What a packet costs"; one primitive each in `tools/cost.rs`, the
//! bounds of whole paths in `tools/bound.rs`).
//!
//! Every cost program returns `XDP_TX` only when its primitive took the
//! path being priced (a lookup hit); a missing entry is inserted and the
//! packet aborted, so the first repetition primes the map. The exception is
//! `cost_minimal_lb`'s connection table: like a balancer, it records a new
//! flow and forwards it, so it also runs in the packet-rate benchmark.
#![no_std]
#![no_main]

// Shared with the datapath object; only part of each is used here.
#[allow(dead_code)]
#[path = "csum.rs"]
mod csum;
#[allow(dead_code)]
#[path = "decap.rs"]
mod decap;
#[path = "tools/loadgen.rs"]
mod loadgen;
#[allow(dead_code)]
#[path = "parse.rs"]
mod parse;
// The cost programs: one primitive each, and the bounds of whole paths.
#[path = "tools/bound.rs"]
mod bound;
#[path = "tools/cost.rs"]
mod cost;
// The datapath's VIP directory lookup, its own code, over the tools'
// `VIP_DIR` and `VIPS_BY_ID` (`cost_dir`).
#[allow(dead_code)]
#[path = "dir.rs"]
mod dir;
// The datapath's connection table, its own code, over the tools' `FLOWS`
// (`cost_set`).
#[allow(dead_code)]
#[path = "table.rs"]
mod table;
// The established path's header reading, its own code (`cost_est`).
#[allow(dead_code)]
#[path = "tuple.rs"]
mod tuple;

/// What `table.rs` takes from the datapath's scheduler: least-connections
/// counts, which no tools program keeps.
mod sched {
    #[inline(always)]
    pub(crate) fn active_add(_id: u32, _delta: u64) {}
}

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use network_types::eth::EthHdr;

/// The tools' maps (the datapath's are in `maps.rs`).
mod maps {
    use aya_ebpf::{
        macros::map,
        maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    };
    use lb_common::{Backend, Flow, FlowKey, LoadgenCfg, Traffic, VipKey};

    /// Tail-call slot of `bench_ipip`: the balancer being timed.
    #[map(name = "BENCH_JUMP")]
    pub static BENCH_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

    /// The frame `bench_restore` writes back before every repetition.
    #[map(name = "BENCH_FRAME")]
    pub static BENCH_FRAME: Array<[u8; lb_common::BENCH_FRAME_LEN]> = Array::with_max_entries(1, 0);

    /// Settings of the `loadgen` traffic generator.
    #[map(name = "LOADGEN")]
    pub static LOADGEN: Array<LoadgenCfg> = Array::with_max_entries(1, 0);

    /// The generator's template headers, copied over every frame before it
    /// is patched: a program that rewrote the frame in place (full NAT)
    /// leaves it changed in the recycled page.
    #[map(name = "LOADGEN_FRAME")]
    pub static LOADGEN_FRAME: Array<[u8; lb_common::LOADGEN_FRAME_LEN]> =
        Array::with_max_entries(1, 0);

    /// Per-CPU packet sequence of `loadgen` (which flow the next frame is).
    #[map(name = "LOADGEN_SEQ")]
    pub static LOADGEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Packets counted by the `sink` program.
    #[map(name = "SINK")]
    pub static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[map(name = "COST_ARRAY")]
    pub static COST_ARRAY: Array<u64> = Array::with_max_entries(16, 0);

    #[map(name = "COST_HASH")]
    pub static COST_HASH: HashMap<FlowKey, Flow> = HashMap::with_max_entries(65536, 0);

    /// Typed like the connection table and sized like the packet-rate
    /// benchmark's (`cost_minimal_lb` runs there too, with up to 100,000
    /// flows).
    #[map(name = "COST_LRU")]
    pub static COST_LRU: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1 << 18, 0);

    /// The same with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`, Katran's
    /// choice): one hash table, no LRU list shared between CPUs.
    #[map(name = "COST_LRU_PCPU")]
    pub static COST_LRU_PCPU: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65536, 2);

    /// A 16-byte key (a compact IPv4 flow key would be 13 bytes).
    #[map(name = "COST_HASH16")]
    pub static COST_HASH16: HashMap<[u8; 16], Flow> = HashMap::with_max_entries(65536, 0);

    /// `COST_LRU` with a compact IPv4 key.
    #[map(name = "COST_LRU16")]
    pub static COST_LRU16: LruHashMap<[u8; 16], Flow> = LruHashMap::with_max_entries(1 << 18, 0);

    #[map(name = "COST_PERCPU")]
    pub static COST_PERCPU: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(16, 0);

    #[map(name = "COST_VIPS")]
    pub static COST_VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(512, 0);

    #[map(name = "COST_BACKENDS")]
    pub static COST_BACKENDS: Array<Backend> = Array::with_max_entries(16, 0);

    /// A connection table as the datapath's (`table.rs`), of the
    /// packet-rate benchmark's size.
    #[map(name = "FLOWS")]
    pub static FLOWS: Array<lb_common::FlowSlot> = Array::with_max_entries(COST_FLOW_SLOTS, 0);

    pub const COST_FLOW_SLOTS: u32 = 1 << 18;

    /// The sets of `FLOWS` (a constant here; the datapath's is set at load).
    #[inline(always)]
    pub fn flow_sets() -> u32 {
        lb_common::flow_sets(COST_FLOW_SLOTS)
    }

    /// The VIP directory as the datapath's (`dir.rs`), of its default
    /// size, and the VIPs by id it points into (`cost_dir`).
    #[map(name = "VIP_DIR")]
    pub static VIP_DIR: Array<lb_common::VipDirBucket> =
        Array::with_max_entries(lb_common::vip_dir_buckets(lb_common::MAX_VIPS), 0);

    #[map(name = "VIPS_BY_ID")]
    pub static VIPS_BY_ID: Array<lb_common::VipById> =
        Array::with_max_entries(lb_common::MAX_VIPS, 0);

    /// Buckets of `VIP_DIR` − 1 (a constant here; the datapath's is set at
    /// load).
    #[inline(always)]
    pub fn vip_dir_mask() -> u32 {
        lb_common::vip_dir_buckets(lb_common::MAX_VIPS) - 1
    }

    /// A Maglev ring of the balancer's usual size (`cost_sched`): every
    /// slot names backend 1.
    #[map(name = "COST_RING")]
    pub static COST_RING: Array<u32> = Array::with_max_entries(65537, 0);
}

use maps::{BENCH_FRAME, BENCH_JUMP};

/// The micro-benchmark's wrapper for paths that rewrite the packet in
/// place (full NAT): BPF_PROG_TEST_RUN's `repeat` runs every repetition on
/// the bytes the previous one left, so the frame's first
/// `BENCH_FRAME_LEN` bytes are written back from `BENCH_FRAME` before the
/// balancer in `BENCH_JUMP` is tail-called. Its copy is part of the figure.
#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Ok(p) = parse::ptr_at::<[u8; lb_common::BENCH_FRAME_LEN]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the bounds; the map value is not packet memory.
    unsafe {
        core::ptr::copy_nonoverlapping(frame, p, 1);
        BENCH_JUMP.tail_call(&ctx, 0);
    }
    xdp_action::XDP_ABORTED
}

/// Traffic generator (see `loadgen`); run only through BPF_PROG_TEST_RUN.
#[xdp]
pub fn loadgen(ctx: XdpContext) -> u32 {
    loadgen::try_loadgen(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

/// Counts and drops: the receiving end of packet-rate benchmarks.
#[xdp]
pub fn sink(ctx: XdpContext) -> u32 {
    loadgen::sink(&ctx)
}

#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Swaps the Ethernet addresses: the cheapest work that reads and writes the
/// packet before it is sent.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), ()> {
    let eth = parse::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        let d = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = d;
    }
    Ok(())
}

/// Swap the Ethernet addresses and bounce: the cheapest program that reads
/// and writes the packet and sends it, the micro-benchmark's floor.
#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    match swap_macs(&ctx) {
        Ok(()) => xdp_action::XDP_TX,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Micro-benchmark wrapper for the encapsulating path. BPF_PROG_TEST_RUN's
/// `repeat` runs each repetition on the buffer the previous one left, so
/// after the first IPIP encapsulation the balancer would be timed on its own
/// output. This strips an outer IPIP/IP6IP6 header if there is one (restoring
/// the original packet) and tail-calls the balancer in `BENCH_JUMP`.
#[xdp]
pub fn bench_ipip(ctx: XdpContext) -> u32 {
    if let Ok(Some(t)) = parse::tunnel(&ctx, lb_common::DEFAULT_GUE_PORT) {
        let _ = decap::decap(&ctx, t.l3_off, t.outer_len);
    }
    // SAFETY: tail call into a program of the same type; falls through on
    // an empty slot.
    unsafe { BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
