//! Families, protocols, capacities, and the names of maps, programs and
//! load-time globals: what the datapath and the agent look each other up by.

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
/// The datapath's established path's filter (`lb-ebpf/src/fast.rs`), the
/// slots of `VIP_TABLE_FILTER` in 64-bit words: the low half for VIPs with
/// a connection table, the high half for VIPs without one (full-NAT VIPs
/// in neither).
pub const MAP_VIP_FAST_FILTER: &str = "VIP_FAST_FILTER";
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
/// Ring id (a VIP's or a region's) → until when, in seconds of the coarse
/// monotonic clock, the other half of its ring is its previous ring (the
/// second chance, `VIP_F_SECOND_CHANCE`); 0: it is not.
pub const MAP_PREV_RING_UNTIL: &str = "PREV_RING_UNTIL";
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
/// The datapath's signals of backend failure for the agent ([`crate::Signal`]).
pub const MAP_SIGNALS: &str = "SIGNALS";
pub const MAP_TRACE_CFG: &str = "TRACE_CFG";
pub const MAP_TRACE_JUMP: &str = "TRACE_JUMP";
/// Load-time constant of the datapath (`EbpfLoader::override_global`):
/// the connection table's sets.
pub const GLOBAL_FLOW_SETS: &str = "FLOW_SETS";
/// The UDP port `lb_decap` takes GUE on (a load-time constant).
pub const GLOBAL_DECAP_GUE_PORT: &str = "DECAP_GUE_PORT";
/// Load-time constant of the datapath: the VIP directory's buckets − 1.
pub const GLOBAL_VIP_DIR_MASK: &str = "VIP_DIR_MASK";
