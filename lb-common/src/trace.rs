//! `lb trace`: its filter and the records the datapath writes.

use crate::FlowKey;

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
    /// 1: encapsulated (`ipip`), 2: in UDP (`gue`), 0: MACs rewritten
    /// (`dsr`) or not forwarded.
    pub ipip: u8,
    pub _pad: [u8; 2],
    /// The second chance's second hop named in the GUE header (a backend
    /// id), or 0.
    pub second_hop_id: u32,
}
