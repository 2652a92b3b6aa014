//! Every map of the datapath, in one place. Sizes here are defaults: the
//! loader resizes `FLOWS` (and may shrink `RINGS`) at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    Backend, BackendIdKey, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_RING_SLOTS, FloodGuard, FloodState,
    FlowSlot, MAX_BACKENDS, MAX_NAT_ADDRS, MAX_TX_PORTS, MAX_VIPS, NatEntry, NatKey, RegionKey,
    RegionMeta, Settings, TraceCfg, Traffic, VipById, VipDirBucket, VipKey, VipMeta, decap_verdict,
    verdict,
};

/// (address, port, protocol) → VIP. Port 0 entries match every port. The
/// agent's record (pinned, read back when it starts); packets find their
/// VIP in `VIP_DIR` and `VIPS_BY_ID`, arrays, and never read this one.
#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 2, 0);

/// Addresses that carry at least one VIP (port 0, protocol 0 keys), so that
/// fragments, which may lack ports, can be recognised as VIP traffic.
#[map(name = "VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_VIPS * 2, 0);

/// One bit per hashed destination address (`hash::vip_filter_slot`): clear
/// means no VIP lives there, so non-VIP packets cost one array lookup.
#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<u32> = Array::with_max_entries(lb_common::hash::VIP_FILTER_WORDS, 0);

/// The same slots as `VIP_FILTER`, set only for addresses with a VIP that
/// keeps a connection table: where an established flow is looked up
/// before its VIP (see `VIPS_BY_ID`).
#[map(name = "VIP_TABLE_FILTER")]
pub static VIP_TABLE_FILTER: Array<u32> =
    Array::with_max_entries(lb_common::hash::VIP_FILTER_WORDS, 0);

/// The established path's filter (`fast.rs`): the slots of
/// `VIP_TABLE_FILTER` (address and port) in 64-bit words, the bit of a
/// slot in the low half for VIPs with a connection table (where it looks a
/// flow up), in the high half for VIPs without one (which it schedules);
/// full-NAT VIPs in neither (their packets are the staged balancer's).
/// One lookup per port answers both.
#[map(name = "VIP_FAST_FILTER")]
pub static VIP_FAST_FILTER: Array<u64> =
    Array::with_max_entries(lb_common::hash::VIP_FILTER_WORDS, 0);

/// The same slots as `VIP_FILTER`, for VIP addresses only (not NAT
/// addresses): a packet to an address with no VIP skips the VIP lookups.
#[map(name = "VIP_ONLY_FILTER")]
pub static VIP_ONLY_FILTER: Array<u32> =
    Array::with_max_entries(lb_common::hash::VIP_FILTER_WORDS, 0);

/// (address, port, protocol) → VIP id, in buckets of four slots (see
/// `vip.rs`): where every packet finds its VIP, with array reads. Sized by
/// the loader (`lb_common::vip_dir_buckets` of `agent.max_vips`), which sets
/// `VIP_DIR_MASK` to match; written by the agent next to `VIPS`.
#[map(name = "VIP_DIR")]
pub static VIP_DIR: Array<VipDirBucket> =
    Array::with_max_entries(lb_common::vip_dir_buckets(MAX_VIPS), 0);

/// Buckets of `VIP_DIR` − 1: a load-time constant.
#[unsafe(no_mangle)]
static VIP_DIR_MASK: u32 = lb_common::vip_dir_buckets(MAX_VIPS) - 1;

#[inline(always)]
pub fn vip_dir_mask() -> u32 {
    // SAFETY: as `flow_sets`.
    unsafe { core::ptr::read_volatile(&VIP_DIR_MASK) }
}

/// VIP id → the VIP's key and entry (`lb_common::VipById`).
#[map(name = "VIPS_BY_ID")]
pub static VIPS_BY_ID: Array<VipById> = Array::with_max_entries(MAX_VIPS, 0);

/// Backend id → backend. Id 0 stays zeroed: "no backend".
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev rings: a VIP's (or region's) half h is the `ring_size` slots at
/// `ring_base(ring_offset, ring_size, h)`, holding backend ids. The agent
/// allocates each ring's range; the loader sizes the array
/// (`agent.ring_slots`).
#[map(name = "RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_RING_SLOTS, 0);

/// Connection table: client 5-tuple → backend, in sets of `FLOW_WAYS`
/// slots (see `table.rs`). Sized by the loader (`agent.flow_table_size`),
/// which sets `FLOW_SETS` to match.
#[map(name = "FLOWS")]
pub static FLOWS: Array<FlowSlot> = Array::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Sets of `FLOWS` (`lb_common::flow_sets` of its size): a load-time
/// constant (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static FLOW_SETS: u32 = lb_common::flow_sets(DEFAULT_FLOW_TABLE_SIZE);

#[inline(always)]
pub fn flow_sets() -> u32 {
    // SAFETY: a read of a constant the loader may have overridden; volatile
    // so the compiler does not fold the default in.
    unsafe { core::ptr::read_volatile(&FLOW_SETS) }
}

/// The UDP port `lb_decap` takes GUE on: a load-time constant (`lb
/// backend-host --gue-port`).
#[unsafe(no_mangle)]
static DECAP_GUE_PORT: u16 = lb_common::DEFAULT_GUE_PORT;

#[inline(always)]
pub fn decap_gue_port() -> u16 {
    // SAFETY: as `flow_sets`.
    unsafe { core::ptr::read_volatile(&DECAP_GUE_PORT) }
}

/// The outer header's length for `lb_too_big`, written by the balancer
/// before it tail-calls it (this CPU's slot; 0: plain IPIP).
#[map(name = "TOO_BIG_NOTE")]
pub static TOO_BIG_NOTE: PerCpuArray<u16> = PerCpuArray::with_max_entries(1, 0);

/// The flood guard's limit (see `lb_common::FloodGuard`).
#[map(name = "FLOOD_GUARD")]
pub static FLOOD_GUARD: Array<FloodGuard> = Array::with_max_entries(1, 0);

/// Per-CPU flood-guard window and count of flows kept out of the table.
#[map(name = "FLOOD_STATE")]
pub static FLOOD_STATE: PerCpuArray<FloodState> = PerCpuArray::with_max_entries(1, 0);

/// One counter per verdict reason.
#[map(name = "VERDICTS")]
pub static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(verdict::COUNT, 0);

/// One counter per `decap_verdict` reason of the decap program.
#[map(name = "DECAP_VERDICTS")]
pub static DECAP_VERDICTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(decap_verdict::COUNT, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Egress interfaces for `XDP_REDIRECT`, keyed by ifindex.
/// The reply direction of NAT flows: (backend, port, NAT address, port,
/// protocol) → the client it goes back to. Sized like `FLOWS` by the
/// loader; a plain hash (see `nat.rs`), swept by the agent. Not
/// preallocated (`BPF_F_NO_PREALLOC`): an agent without NAT VIPs pays for
/// its buckets only, not for a million entries.
#[map(name = "NAT")]
pub static NAT: HashMap<NatKey, NatEntry> = HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 1);

/// NAT source addresses: IPv4 at `0..MAX_NAT_ADDRS`, IPv6 after (counts in
/// `Settings`).
#[map(name = "NAT_ADDRS")]
pub static NAT_ADDRS: Array<[u8; 16]> = Array::with_max_entries(2 * MAX_NAT_ADDRS, 0);

/// Scratch space for a NAT key and entry being built: at 100 bytes they do
/// not fit the 512-byte stack next to the rest of the balancer.
#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// A NAT key and entry under construction (per-CPU, `NAT_SCRATCH`). (Here,
/// with its map, so that `nat` uses `maps` and not the reverse.)
#[repr(C)]
pub struct NatScratch {
    pub key: NatKey,
    pub entry: NatEntry,
}

/// Per-CPU position in this CPU's slice of the NAT port range.
#[map(name = "NAT_CURSOR")]
pub static NAT_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Tail-call slots of the ICMP programs (installed by the loader):
/// 0 `lb_too_big`, 1 `lb_nat_icmp`.
#[map(name = "ICMP_JUMP")]
pub static ICMP_JUMP: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Tail-call slot of the drop log program `lb_drop_log` (see `log.rs`),
/// installed by the loader.
#[map(name = "LOG_JUMP")]
pub static LOG_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Addresses the `decap` program strips tunnels for (the backend's own).
#[map(name = "DECAP_ADDRS")]
pub static DECAP_ADDRS: HashMap<[u8; 16], u32> = HashMap::with_max_entries(64, 0);

/// (VIP, backend address) → backend id. Only userspace reads or writes it;
/// it is a map so that it is pinned, and survives, with the others.
#[map(name = "BACKEND_IDS")]
pub static BACKEND_IDS: HashMap<BackendIdKey, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Active flows per backend (least-connections). Updated with atomic adds
/// by every CPU; the agent reconciles it against `FLOWS` periodically.
#[map(name = "ACTIVE")]
pub static ACTIVE: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The exact least-connections scan's running best (`sched::lb_lc_scan`):
/// [backend id, active flows, weight, tie-break hash].
#[map(name = "LC_SCRATCH")]
pub static LC_SCRATCH: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

/// What a rare drop path leaves for `lb_drop_log` (see `log.rs`).
#[map(name = "LOG_NOTE")]
pub static LOG_NOTE: PerCpuArray<lb_common::DropNote> = PerCpuArray::with_max_entries(1, 0);

/// The log's rate limit, per verdict reason (see `log.rs`).
#[map(name = "LOG_LIMIT")]
pub static LOG_LIMIT: PerCpuArray<lb_common::LogLimit> =
    PerCpuArray::with_max_entries(verdict::COUNT, 0);

/// Ring id → until when (coarse clock, seconds) the ring's other half is
/// its previous ring: the second chance (`lb_common::VIP_F_SECOND_CHANCE`).
#[map(name = "PREV_RING_UNTIL")]
pub static PREV_RING_UNTIL: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);

/// Per-CPU position in each ring for round-robin.
#[map(name = "RR_POS")]
pub static RR_POS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// (VIP id, client prefix) → the region's ring (longest prefix wins).
#[map(name = "REGIONS")]
pub static REGIONS: LpmTrie<RegionKey, RegionMeta> = LpmTrie::with_max_entries(1024, 0);

/// Scratch space for `bpf_fib_lookup`'s parameter block (too big for the stack).
#[map(name = "FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// `lb trace`'s filter (see `lb_common::TraceCfg`).
#[map(name = "TRACE_CFG")]
pub static TRACE_CFG: Array<TraceCfg> = Array::with_max_entries(1, 0);

/// Slot 0: `lb_xdp_traced`, which `lb_xdp` tail-calls while tracing.
#[map(name = "TRACE_JUMP")]
pub static TRACE_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Per-CPU room for what the traced balancer saw.
#[map(name = "TRACE_SCRATCH")]
pub static TRACE_SCRATCH: PerCpuArray<SeenData> = PerCpuArray::with_max_entries(1, 0);

/// What the balancer decided for one packet, filled in as it goes (plain
/// stores into this CPU's `TRACE_SCRATCH` slot: the balancer's stack has no
/// room left for it; read only when tracing).
/// (Here, with its map, so that `trace` uses `maps` and not the reverse.)
pub struct SeenData {
    pub family: u8,
    pub vip_id: u32,
    pub backend_id: u32,
    pub ring_id: u32,
    pub ring_size: u32,
    pub hash: u32,
    pub table: u8,
    pub ring: u8,
    pub scheduler: u8,
    pub ipip: u8,
    pub second_hop_id: u32,
}

/// Traced packets, read by `lb trace`.
#[map(name = "TRACE")]
pub static TRACE: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Signs of backend failure for the agent (`signal`); each agent's load
/// brings its own ring (not pinned).
#[map(name = "SIGNALS")]
pub static SIGNALS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);
