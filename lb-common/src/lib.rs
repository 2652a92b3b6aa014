//! Types shared by the XDP datapath (`lb-ebpf`) and userspace (`lb-user`, `tests`).
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every
//! type is `#[repr(C)]`, states its padding explicitly, and uses integer flags
//! instead of `bool` or Rust enums. Addresses are stored as 16 bytes in network
//! order (IPv4 in the first four bytes, the rest zero); ports are host order
//! (the datapath converts once, when it parses).
//!
//! Layout: capacities and map names, then the map key/value types, then the
//! verdict counters, then the flow hash that kernel and userspace share.
#![no_std]

pub mod hash;

/// Address family tags used in [`VipKey::family`] and [`Backend::family`].
pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// IP protocol numbers the datapath balances.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Default capacity in VIPs and region rings (`agent.max_vips`): the ring id
/// of a VIP or region indexes the per-VIP stats and round-robin positions.
/// The loader sizes the maps at load time.
pub const MAX_VIPS: u32 = 256;
/// Default capacity in backends over all VIPs (`agent.max_backends`); id 0
/// is reserved as "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// Largest Maglev ring a VIP can have (a prime). Each VIP owns two halves of
/// its own ring size in [`RINGS`](MAP_RINGS) so that an update is one atomic
/// flip.
pub const MAX_RING_SIZE: u32 = 65537;
/// Default size of `RINGS` in slots (`agent.ring_slots`, 8 bytes each in the kernel): 64
/// VIPs of the default ring size, double-buffered.
pub const DEFAULT_RING_SLOTS: u32 = 64 * 2 * 65537;
/// Default Maglev ring size (a prime, as Maglev requires).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default connection-table size; the agent overrides it at load time.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Number of devmap slots for `XDP_REDIRECT` (indexed by ifindex).
pub const MAX_TX_PORTS: u32 = 256;

/// Map names, as the loader and the pins see them.
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_RINGS: &str = "RINGS";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_VERDICTS: &str = "VERDICTS";
pub const MAP_VIP_STATS: &str = "VIP_STATS";
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
pub const MAP_TX_PORTS: &str = "TX_PORTS";
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const MAP_DECAP_ADDRS: &str = "DECAP_ADDRS";
pub const MAP_DECAP_VERDICTS: &str = "DECAP_VERDICTS";
pub const MAP_VIP_ADDRS: &str = "VIP_ADDRS";
pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
/// The VIP-address filter of addresses with a VIP that keeps a connection
/// table (same slots as `VIP_FILTER`).
pub const MAP_VIP_TABLE_FILTER: &str = "VIP_TABLE_FILTER";
/// The VIP-address filter without the NAT addresses (same slots as
/// `VIP_FILTER`): a clear bit means no VIP lives on the address, so a
/// packet to it (a NAT reply) skips the VIP lookups.
pub const MAP_VIP_ONLY_FILTER: &str = "VIP_ONLY_FILTER";
/// VIP id → [`VipById`].
pub const MAP_VIPS_BY_ID: &str = "VIPS_BY_ID";
/// The VIP directory: (address, port, protocol) → VIP id in an array of
/// [`VipDirBucket`]s, where the datapath finds a packet's VIP.
pub const MAP_VIP_DIR: &str = "VIP_DIR";
pub const MAP_ACTIVE: &str = "ACTIVE";
pub const MAP_RR_POS: &str = "RR_POS";
pub const MAP_FIB_SCRATCH: &str = "FIB_SCRATCH";
pub const MAP_NAT: &str = "NAT";
pub const MAP_ICMP_JUMP: &str = "ICMP_JUMP";
pub const MAP_LOG_JUMP: &str = "LOG_JUMP";
pub const MAP_NAT_ADDRS: &str = "NAT_ADDRS";
pub const MAP_NAT_CURSOR: &str = "NAT_CURSOR";
pub const MAP_REGIONS: &str = "REGIONS";
pub const MAP_BACKEND_IDS: &str = "BACKEND_IDS";

/// Program names in the object file.
pub const PROG_BALANCER: &str = "lb_xdp";
/// The balancer with tracing, tail-called by `lb_xdp` while `lb trace` runs.
pub const PROG_BALANCER_TRACED: &str = "lb_xdp_traced";
pub const PROG_DECAP: &str = "lb_decap";
/// Builds ICMP "too big" errors; tail-called by the balancer.
pub const PROG_TOO_BIG: &str = "lb_too_big";
/// Translates ICMP errors about NAT flows; tail-called by the balancer.
pub const PROG_NAT_ICMP: &str = "lb_nat_icmp";
/// Logs a rare drop (aya-log), tail-called by the balancer after counting it.
pub const PROG_DROP_LOG: &str = "lb_drop_log";
pub const PROG_PASS: &str = "lb_pass";
pub const PROG_FLOOR_DROP: &str = "floor_drop";
pub const PROG_FLOOR_TX: &str = "floor_tx";
pub const PROG_BENCH_IPIP: &str = "bench_ipip";
/// Restores a rewritten packet before tail-calling the balancer (full NAT).
pub const PROG_BENCH_RESTORE: &str = "bench_restore";
/// `bench_restore`'s frame: the first [`BENCH_FRAME_LEN`] bytes it writes
/// back.
pub const MAP_BENCH_FRAME: &str = "BENCH_FRAME";
pub const BENCH_FRAME_LEN: usize = 64;
pub const PROG_LOADGEN: &str = "loadgen";
pub const PROG_SINK: &str = "sink";
pub const MAP_LOADGEN: &str = "LOADGEN";
/// The generator's template headers (`LOADGEN_FRAME_LEN` bytes, zero-padded).
pub const MAP_LOADGEN_FRAME: &str = "LOADGEN_FRAME";
/// Bytes of template `LOADGEN_FRAME` holds: the longest header chain the
/// generator builds (Ethernet, VLAN, IPv6, TCP = 78) rounded up.
pub const LOADGEN_FRAME_LEN: usize = 80;
pub const MAP_SINK: &str = "SINK";
pub const MAP_BENCH_JUMP: &str = "BENCH_JUMP";
pub const MAP_FLOOD_GUARD: &str = "FLOOD_GUARD";
pub const MAP_FLOOD_STATE: &str = "FLOOD_STATE";
pub const MAP_TRACE: &str = "TRACE";
pub const MAP_TRACE_CFG: &str = "TRACE_CFG";
pub const MAP_TRACE_JUMP: &str = "TRACE_JUMP";
/// Load-time constant of the datapath (`EbpfLoader::override_global`):
/// the connection table's sets.
pub const GLOBAL_FLOW_SETS: &str = "FLOW_SETS";
/// Load-time constant of the datapath: the VIP directory's buckets − 1.
pub const GLOBAL_VIP_DIR_MASK: &str = "VIP_DIR_MASK";

/// Ways per set of the connection table (`FLOWS`, see [`FlowSlot`]).
pub const FLOW_WAYS: u32 = 4;

/// Sets of a connection table of `entries` slots: the last set may be cut
/// short (its missing ways are never used).
pub const fn flow_sets(entries: u32) -> u32 {
    let s = entries.div_ceil(FLOW_WAYS);
    if s == 0 { 1 } else { s }
}

/// The first slot of the set a flow hash falls in (multiply-shift: any
/// number of sets, no division).
#[inline(always)]
pub const fn flow_set_base(h: u32, sets: u32) -> u32 {
    (((h as u64) * (sets as u64)) >> 32) as u32 * FLOW_WAYS
}

/// The tag a connection-table slot carries for `key`: never 0 (0 marks an
/// empty slot), and written in one 8-byte store with the backend id, so a
/// slot torn between two writers never pairs one flow's key with another's
/// backend unnoticed. `h` is [`table_hash_of`] the key.
#[inline(always)]
pub const fn flow_tag(h: u32, key: &FlowKey) -> u32 {
    flow_tag_folded(h, hash::fold_addr(&key.dst))
}

/// [`flow_tag`] with the destination already folded ([`hash::fold_addr`]).
#[inline(always)]
pub const fn flow_tag_folded(h: u32, dst_folded: u32) -> u32 {
    (h ^ dst_folded.rotate_left(16)) | 1
}

/// The connection table's hash of `key` ([`hash::table_hash`]): which set
/// it lives in ([`flow_set_base`]) and, with [`flow_tag`], its tag.
#[inline(always)]
pub const fn table_hash_of(key: &FlowKey) -> u32 {
    hash::table_hash(hash::fold_addr(&key.src), key.sport, key.dport, key.proto)
}

/// New flows per second per CPU above which new flows are forwarded
/// without a connection-table entry (Katran's default flood guard).
pub const DEFAULT_NEW_FLOW_LIMIT: u32 = 125_000;

/// The flood guard's setting (one entry in `FLOOD_GUARD`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FloodGuard {
    /// New flows per second per CPU that may be written to the connection
    /// table; 0 = no limit.
    pub new_flows_per_cpu_s: u32,
    pub _pad: u32,
}

/// Per-CPU flood-guard window and the flows it kept out of the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FloodState {
    /// Where the current window began: the first new flow past the limit
    /// after the previous window's second was over (see the datapath's
    /// `may_record_flow`).
    pub window_start_ns: u64,
    /// New flows recorded since the window began.
    pub count: u64,
    /// New flows forwarded without a table entry, ever.
    pub unrecorded: u64,
}

/// Key of the VIP table: (address, port, protocol). Port 0 matches every port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipKey {
    /// Network order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// Host order; 0 = every port.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
}

/// Value of `VIPS_BY_ID`: a VIP's key and entry under its id. An
/// established flow's table entry names its VIP's id, so its packets find
/// the VIP with one array read instead of one or two hash lookups; the key
/// is compared with the packet's destination, so an id given to another
/// VIP since the flow began does not match. `key.family == 0`: no VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipById {
    pub key: VipKey,
    pub meta: VipMeta,
}

/// Slots per [`VipDirBucket`].
pub const VIP_DIR_WAYS: usize = 4;

/// Buckets of the VIP directory for `max_vips` VIPs: a power of two with
/// at least [`VIP_DIR_WAYS`] slots per VIP (at most a quarter of the slots
/// used), so that a VIP almost always finds room in the first of its two
/// buckets and never in neither (see [`hash::vip_dir_buckets`]).
pub const fn vip_dir_buckets(max_vips: u32) -> u32 {
    let n = if max_vips < 16 { 16 } else { max_vips };
    n.next_power_of_two()
}

/// One slot of the VIP directory: a VIP's key and id. `key.family == 0`:
/// empty. The datapath compares the key as six 32-bit words (`VipKey` is
/// 20 bytes, 4-aligned), then reads the VIP by its id from `VIPS_BY_ID`,
/// whose key it compares again: a slot read while the agent rewrites it
/// cannot hand a packet another VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipDirSlot {
    pub key: VipKey,
    pub vip_id: u32,
}

/// A bucket of the VIP directory (`VIP_DIR`, an array): a key lives in one
/// of its two buckets ([`hash::vip_dir_buckets`]), in any slot. 96 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipDirBucket {
    pub slots: [VipDirSlot; VIP_DIR_WAYS],
}

/// [`VipMeta::flags`]: hash the client address only (source-ip stickiness).
pub const VIP_F_HASH_SRC_IP: u32 = 1 << 0;
/// [`VipMeta::flags`]: no connection table, every packet goes through the ring.
pub const VIP_F_NO_FLOW_TABLE: u32 = 1 << 1;
/// [`VipMeta::flags`]: encapsulate (IPIP / IP6IP6) instead of L2 DSR.
pub const VIP_F_IPIP: u32 = 1 << 2;

/// Value of the VIP table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipMeta {
    /// Index into the per-VIP stats and the rings, `< MAX_VIPS`.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// Which half of the VIP's double-buffered ring is live (0 or 1).
    pub active_half: u32,
    /// Ring size M of this VIP (prime, `<= MAX_RING_SIZE`).
    pub ring_size: u32,
    /// Idle timeout of this VIP's flows in seconds (0 = only LRU eviction).
    pub idle_timeout_s: u32,
    /// How new flows pick a backend: `SCHED_*`.
    pub scheduler: u32,
    /// Where the VIP's two ring halves start in `RINGS` (half h at
    /// `ring_offset + h * ring_size`); allocated by the agent.
    pub ring_offset: u32,
}

/// [`VipMeta::scheduler`]: Maglev consistent hashing over the ring.
pub const SCHED_MAGLEV: u32 = 0;
/// [`VipMeta::scheduler`]: the ring holds a (smooth weighted) round-robin
/// sequence; each CPU walks it in turn.
pub const SCHED_ROUND_ROBIN: u32 = 1;
/// [`VipMeta::scheduler`]: the ring lists the live backends; a new flow
/// goes to the one with the fewest active flows relative to its weight
/// (exact for up to [`LC_EXACT_MAX`] backends, power of two choices above).
pub const SCHED_LEAST_CONN: u32 = 2;
/// Pools up to this size get the exact least-connections minimum.
pub const LC_EXACT_MAX: u32 = 8;
/// [`VipMeta::flags`]: client prefixes map to regions (see `REGIONS`).
pub const VIP_F_REGIONS: u32 = 1 << 3;
/// [`VipMeta::flags`]: full NAT: the packet leaves addressed to the
/// backend's address and port, from a balancer address and a port the
/// datapath gives the flow; replies are translated back (see `NAT`).
pub const VIP_F_NAT: u32 = 1 << 4;

/// Key of `NAT`, the reply direction of NAT flows: a packet from the
/// backend (address, port) to the balancer's NAT address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NatKey {
    /// The backend's address (network order; IPv4 in the first 4 bytes).
    pub backend: [u8; 16],
    /// The balancer's NAT source address.
    pub nat: [u8; 16],
    /// Host order.
    pub backend_port: u16,
    /// Host order.
    pub nat_port: u16,
    pub proto: u8,
    // Two integers, not `[u8; 3]`: see `FlowKey`.
    pub _pad: u8,
    pub _pad2: u16,
}

/// Value of `NAT`: where a reply goes back to, and the entry's life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NatEntry {
    pub client: [u8; 16],
    pub vip: [u8; 16],
    /// Host order.
    pub client_port: u16,
    /// Host order.
    pub vip_port: u16,
    /// The client side's next hop (the source MAC of the client's packet).
    pub client_mac: [u8; 6],
    /// The balancer's MAC on that side (the client packet's destination).
    pub lb_mac: [u8; 6],
    /// `NAT_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// Interface the client's packet arrived on: replies leave there.
    pub ifindex: u32,
    /// The monotonic clock at the last packet either way, in seconds.
    pub last_seen_s: u32,
}

/// [`NatEntry::flags`]: a FIN or RST was seen; the port is free again
/// after [`NAT_CLOSED_S`] seconds.
pub const NAT_F_CLOSING: u16 = 1 << 0;
/// Seconds a closed NAT flow keeps its port: a backend that closed first
/// holds the connection in TIME_WAIT for 60 s (Linux), and a new SYN from
/// the same address and port, with another client's timestamps, would be
/// refused by it.
pub const NAT_CLOSED_S: u32 = 60;
/// Seconds an idle open NAT flow keeps its port.
pub const NAT_IDLE_S: u32 = 300;

/// Whether a NAT entry's port may be given to another flow at `now_s`
/// (the datapath's rule, and the agent's sweep).
pub const fn nat_reclaimable(flags: u16, last_seen_s: u32, now_s: u32) -> bool {
    let age = now_s.saturating_sub(last_seen_s);
    if flags & NAT_F_CLOSING != 0 {
        age >= NAT_CLOSED_S
    } else {
        age >= NAT_IDLE_S
    }
}
/// NAT source addresses per family (`NAT_ADDRS`: IPv4 at 0.., IPv6 at 16..).
pub const MAX_NAT_ADDRS: u32 = 16;
/// Ports a new NAT flow tries before it is refused (`nat_no_port`).
pub const NAT_PORT_TRIES: u32 = 8;

/// Key of the `REGIONS` LPM trie: the VIP id (32 bits, always matched) then
/// the client address; `prefix_len` = 32 + the client prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RegionKey {
    /// Big-endian, so that it is the most significant part of the prefix.
    pub vip_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Value of the `REGIONS` trie: which ring slot serves this region's clients.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RegionMeta {
    /// A ring id (from the VIP id space) for the region's round-robin
    /// position.
    pub ring_id: u32,
    pub active_half: u32,
    pub ring_size: u32,
    /// Where the region's two ring halves start in `RINGS`.
    pub ring_offset: u32,
}

/// Index of the first slot of ring half `half` in the `RINGS` array, for a
/// ring of `size` slots per half allocated at `offset`.
#[inline(always)]
pub const fn ring_base(offset: u32, size: u32, half: u32) -> u32 {
    offset + (half & 1) * size
}

/// [`Backend::state`] values.
pub const BACKEND_UP: u8 = 0;
pub const BACKEND_DRAINING: u8 = 1;
pub const BACKEND_DOWN: u8 = 2;

/// Value of the backend table, indexed by backend id (id 0 = "no backend").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// Network order; IPv4 uses the first four bytes.
    pub addr: [u8; 16],
    /// Next-hop MAC (the backend's, or its gateway's); all zero = not known yet.
    pub dst_mac: [u8; 6],
    /// Source MAC to send with (the egress interface's own address).
    pub src_mac: [u8; 6],
    /// Egress ifindex; 0 or the ingress ifindex = `XDP_TX`, else `XDP_REDIRECT`.
    pub ifindex: u32,
    /// [`AF_INET`] or [`AF_INET6`]; 0 = unused slot.
    pub family: u8,
    /// `BACKEND_UP`, `BACKEND_DRAINING` or `BACKEND_DOWN`.
    pub state: u8,
    /// Weight, for least-connections (active flows are compared per weight).
    pub weight: u16,
    /// Port the backend listens on, host order (NAT VIPs; 0 = the VIP's).
    pub port: u16,
    pub _pad: u16,
}

/// Key of the connection table: the flow's 5-tuple as the client sent it.
/// Aligned to 4 so the datapath can compare its addresses a word at a time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
    pub proto: u8,
    // Padding as two integers, not `[u8; 3]`: zeroing three bytes compiles
    // to a call of `memset` (a byte loop in a function of its own) on the
    // datapath's every packet; two stores do not.
    pub _pad: u8,
    pub _pad2: u16,
}

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    pub backend_id: u32,
    pub vip_id: u16,
    /// `FLOW_F_*` bits.
    pub flags: u16,
    /// The monotonic clock at the last packet, in seconds (idle expiry).
    /// 32 bits (136 years of uptime); an entry written as the 64-bit field
    /// of earlier versions reads the same (little-endian, high half zero).
    pub last_seen_s: u32,
    /// NAT VIPs: the source port the balancer gave this flow (host order),
    /// 0 for other VIPs.
    pub nat_port: u16,
    /// NAT VIPs: which source address (index into `NAT_ADDRS`).
    pub nat_addr: u16,
}

/// One slot of the connection table `FLOWS`, an array of sets of
/// [`FLOW_WAYS`] slots (the set from the flow hash, [`flow_set_base`]).
/// `tag` and `flow.backend_id` are the 8-byte word at offset 40, written
/// last (0 first) by the datapath: a reader that sees the same word before
/// and after reading the rest read one writer's entry. `tag == 0`: empty.
/// 64 bytes: one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowSlot {
    pub key: FlowKey,
    /// [`flow_tag`] of the key, 0 for an empty slot.
    pub tag: u32,
    pub flow: Flow,
    /// Set by a packet of the flow, cleared when a full set looks for a
    /// slot to give a new flow: a slot left clear since is replaced first
    /// (not-recently-used, without a clock read per packet).
    pub referenced: u32,
}

/// [`Flow::flags`]: counted in `ACTIVE` (a least-connections VIP's flow).
pub const FLOW_F_COUNTED: u16 = 1 << 0;

/// `lb trace`'s filter (the one `TRACE_CFG` entry), written by the CLI.
/// With `owner_pid == 0` tracing is off and costs the datapath one array
/// read per parsed packet. Zero fields match anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TraceCfg {
    /// The tracing `lb trace` process; 0: off.
    pub owner_pid: u32,
    /// Leading bits of `dst` that must match (an address: 32 or 128).
    pub dst_len: u32,
    /// Leading bits of `src` (the client) that must match.
    pub src_len: u32,
    /// [`AF_INET`] or [`AF_INET6`], or 0.
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`], or 0.
    pub proto: u8,
    /// Destination port (host order), or 0.
    pub dport: u16,
    /// Client port (host order), or 0.
    pub sport: u16,
    pub _pad: [u8; 2],
    pub dst: [u8; 16],
    pub src: [u8; 16],
}

/// [`TraceRecord::table`]: what the connection table said.
pub mod trace_table {
    /// The VIP does not use the table (or no VIP matched).
    pub const NOT_USED: u8 = 0;
    /// An entry: its backend kept the flow.
    pub const HIT: u8 = 1;
    /// No entry: a new flow.
    pub const MISS: u8 = 2;
    /// An entry, but a SYN without ACK opens a new connection.
    pub const SYN: u8 = 3;
    /// An entry whose backend is down or gone: rescheduled.
    pub const BACKEND_DOWN: u8 = 4;
    /// An entry idle past the VIP's timeout: rescheduled.
    pub const IDLE: u8 = 5;
}

/// [`TraceRecord::ring`]: which ring chose the backend of a new flow.
pub mod trace_ring {
    /// None (the table chose, or nothing was scheduled).
    pub const NONE: u8 = 0;
    /// The VIP's ring.
    pub const VIP: u8 = 1;
    /// The client's region's ring.
    pub const REGION: u8 = 2;
    /// The region had no live backend: the VIP's ring.
    pub const REGION_FALLBACK: u8 = 3;
}

/// One traced packet, as `lb trace` reads it from the `TRACE` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TraceRecord {
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// The packet's 5-tuple (the flow's, for an ICMP error about one).
    pub key: FlowKey,
    /// The VIP's id, or `u32::MAX` when no VIP matched.
    pub vip_id: u32,
    /// The backend chosen, or 0.
    pub backend_id: u32,
    /// The ring scheduled over (for a new flow): id and size.
    pub ring_id: u32,
    pub ring_size: u32,
    /// The flow hash a new flow was scheduled with (Maglev slot: hash % size).
    pub hash: u32,
    /// The verdict reason (`verdict::*`) and the XDP action.
    pub verdict: u8,
    pub action: u8,
    /// [`trace_table`].
    pub table: u8,
    /// [`trace_ring`].
    pub ring: u8,
    /// The VIP's `SCHED_*`.
    pub scheduler: u8,
    /// 1: encapsulated (`ipip`), 0: MACs rewritten (`dsr`) or not forwarded.
    pub ipip: u8,
    pub _pad: [u8; 6],
}

/// Packets, bytes and new flows: one per VIP and one per backend (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Key of `BACKEND_IDS`, a map only userspace uses: which backend id the
/// agent gave a (VIP, backend address) pair. It lives with the pinned maps so
/// that a restarted agent keeps every id (flow entries refer to them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendIdKey {
    pub vip: VipKey,
    pub addr: [u8; 16],
}

/// Global datapath settings (one entry in `SETTINGS`), written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Settings {
    /// Outer IPv4 source for IPIP: the upper 16 bits come from here, the lower
    /// 16 from the flow hash, so receivers can spread flows over queues.
    pub ipip_src_v4: [u8; 4],
    /// Outer IPv6 source for IP6IP6; the last 4 bytes come from the flow hash.
    pub ipip_src_v6: [u8; 16],
    /// `SETTINGS_F_*` bits.
    pub flags: u32,
    /// NAT source ports, first and last (host order; the kernel's own
    /// ephemeral range must lie outside).
    pub nat_port_lo: u16,
    pub nat_port_hi: u16,
    /// NAT source addresses in `NAT_ADDRS` (IPv4 at 0.., IPv6 at 16..).
    pub nat_v4_count: u8,
    pub nat_v6_count: u8,
    /// CPUs the port range is sliced over (each allocates in its own).
    pub nat_cpus: u16,
    /// MTU of the path to `ipip` backends: a packet that would exceed it
    /// once encapsulated is answered with ICMP "fragmentation needed" /
    /// ICMPv6 "packet too big" (0 = no check).
    pub ipip_mtu: u16,
    pub _pad: u16,
}

/// [`Settings::flags`]: take each packet's next hop from `bpf_fib_lookup`
/// (the kernel's routes and neighbours) instead of the backend entry.
pub const SETTINGS_F_FIB: u32 = 1 << 0;

/// Settings of the `loadgen` program (one entry in `LOADGEN`): how it varies
/// the template frame per packet so that `flows` distinct flows leave.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LoadgenCfg {
    /// Number of distinct flows (>= 1). IPv4: flow f uses source address
    /// `base` with its last two bytes `f & 0xffff`, and source port
    /// `1024 + (f >> 16)`. IPv6: the last four bytes of the address are `f`,
    /// the port 1024 (every flow its own address).
    pub flows: u32,
    /// Offset of the IP header in the frame.
    pub l3_off: u32,
    /// Offset of the transport header.
    pub l4_off: u32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// Verdict reasons. Every exit of the balancer increments exactly one of
/// these, so they sum to the packets the program saw. The names double as
/// metric labels.
pub mod verdict {
    /// Rewritten and sent with `XDP_TX`.
    pub const TX: u32 = 0;
    /// Rewritten and sent with `XDP_REDIRECT`.
    pub const REDIRECT: u32 = 1;
    /// Not addressed to a VIP: passed to the kernel untouched.
    pub const PASS_NON_VIP: u32 = 2;
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed untouched.
    pub const PASS_NON_IP: u32 = 3;
    /// IPv6 with an extension header before the transport header: passed.
    pub const PASS_IPV6_EXT: u32 = 4;
    /// Headers shorter than they claim, bad version or IHL: passed to the
    /// kernel, whose own checks drop it (the balancer never forwards it).
    pub const MALFORMED: u32 = 5;
    /// VIP matched but the ring has no live backend: dropped.
    pub const NO_BACKEND: u32 = 6;
    /// IPv4 fragment addressed to a VIP: dropped (documented limitation).
    pub const FRAGMENT: u32 = 7;
    /// Backend chosen but its next-hop MAC is not known yet: passed.
    pub const NO_NEIGH: u32 = 8;
    /// `bpf_xdp_adjust_head` failed while encapsulating: dropped.
    pub const ENCAP_FAILED: u32 = 9;
    /// ICMP error routed to the backend of the flow it belongs to.
    pub const ICMP_TO_FLOW: u32 = 10;
    /// `XDP_REDIRECT` to the backend's interface failed (not in the
    /// redirect map): dropped.
    pub const REDIRECT_FAILED: u32 = 11;
    /// A datapath invariant did not hold (no settings entry, a header that
    /// parsed but cannot be rewritten): dropped, never forwarded half-done.
    pub const INTERNAL: u32 = 12;
    /// A new flow of a NAT VIP found no free source port (every try taken,
    /// or no NAT address of its family): dropped.
    pub const NAT_NO_PORT: u32 = 13;
    /// A backend's reply translated back to its client (sent with
    /// `XDP_TX` or `XDP_REDIRECT`).
    pub const NAT_REPLY: u32 = 14;
    /// An ICMP "destination unreachable" / "packet too big" about a NAT
    /// flow, translated to the other side of the NAT and sent.
    pub const NAT_ICMP: u32 = 15;
    /// An `ipip` packet that would exceed `agent.ipip_mtu` once
    /// encapsulated: answered with ICMP "fragmentation needed" (IPv4 with
    /// DF) or ICMPv6 "packet too big" (`XDP_TX`), else dropped.
    pub const TOO_BIG: u32 = 16;
    /// Number of verdict reasons.
    pub const COUNT: u32 = 17;

    /// Metric label of each verdict, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "tx",
        "redirect",
        "pass_non_vip",
        "pass_non_ip",
        "pass_ipv6_ext",
        "malformed",
        "no_backend",
        "fragment",
        "no_neigh",
        "encap_failed",
        "icmp_to_flow",
        "redirect_failed",
        "internal",
        "nat_no_port",
        "nat_reply",
        "nat_icmp",
        "too_big",
    ];
}

/// The datapath's own log (aya-log, read by the agent into its log): one
/// event per rare drop, rate-limited per CPU and per reason in the
/// datapath. The message is a line of `key=value` fields (the agent parses
/// it back into fields):
///
/// `drop reason=R client=A:P dst=A:P proto=N backend_id=B suppressed=S`
///
/// with IPv6 addresses in brackets; `R` a [`verdict`] reason, `B` 0 when no
/// backend was chosen, `S` the events of this reason this CPU held back
/// since its last one.
pub mod drop_log {
    use super::verdict;

    /// Events per second, per reason and per CPU; the rest are counted in
    /// the next event's `suppressed`.
    pub const PER_SECOND: u32 = 5;

    /// The verdict reasons whose drops are logged: each means a packet for
    /// a VIP was dropped for a cause an operator must act on, and none is on
    /// a forwarding fast path.
    pub const fn logged(reason: u32) -> bool {
        matches!(
            reason,
            verdict::INTERNAL
                | verdict::ENCAP_FAILED
                | verdict::REDIRECT_FAILED
                | verdict::NAT_NO_PORT
                | verdict::TOO_BIG
        )
    }
}

/// What a rare drop path leaves for the log program (one per-CPU slot,
/// `LOG_NOTE`): the packet's flow, its family, the backend chosen (0:
/// none), the verdict reason, and whether it is still to be logged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropNote {
    pub key: FlowKey,
    pub backend_id: u32,
    pub reason: u8,
    pub family: u8,
    pub pending: u8,
    pub _pad: u8,
}

/// One reason's rate limit on one CPU (`LOG_LIMIT`, per-CPU, indexed by
/// reason): the current one-second window, the events sent in it, and the
/// events held back since the last one sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LogLimit {
    pub window_ns: u64,
    pub sent: u32,
    pub suppressed: u32,
}

/// Verdict counters of the decap program (in `DECAP_VERDICTS`).
pub mod decap_verdict {
    pub const DECAPSULATED: u32 = 0;
    pub const PASS: u32 = 1;
    pub const MALFORMED: u32 = 2;
    pub const COUNT: u32 = 3;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made only of integers and byte
    // arrays, with explicit padding (checked by bytemuck's derive).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::VipById {}
    unsafe impl aya::Pod for super::VipDirBucket {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowSlot {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::FloodGuard {}
    unsafe impl aya::Pod for super::FloodState {}
    unsafe impl aya::Pod for super::BackendIdKey {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::LoadgenCfg {}
    unsafe impl aya::Pod for super::RegionKey {}
    unsafe impl aya::Pod for super::RegionMeta {}
    unsafe impl aya::Pod for super::TraceCfg {}
    unsafe impl aya::Pod for super::TraceRecord {}
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipMeta>() == 28);
    assert!(core::mem::size_of::<VipById>() == 48);
    assert!(core::mem::size_of::<Backend>() == 40);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<Flow>() == 16);
    assert!(core::mem::size_of::<FlowSlot>() == 64);
    assert!(core::mem::offset_of!(FlowSlot, tag) == 40);
    assert!(core::mem::offset_of!(FlowSlot, flow) == 44);
    assert!(core::mem::size_of::<Settings>() == 36);
    assert!(core::mem::size_of::<NatKey>() == 40);
    assert!(core::mem::size_of::<NatEntry>() == 60);
    assert!(core::mem::size_of::<FloodGuard>() == 8);
    assert!(core::mem::size_of::<FloodState>() == 24);
    assert!(core::mem::size_of::<RegionKey>() == 20);
    assert!(core::mem::size_of::<RegionMeta>() == 16);
    assert!(core::mem::size_of::<TraceCfg>() == 52);
    assert!(core::mem::size_of::<TraceRecord>() == 80);
};
