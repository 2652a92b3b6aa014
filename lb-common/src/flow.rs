//! The connection table (`FLOWS`: sets of slots, its hashes and tags) and
//! the flood guard.

use crate::hash;

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
/// 64 bytes (a kernel array's values begin 56 bytes into a cache line, so a
/// slot spans two; page-aligning them measured no faster: A/B history).
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
/// [`Flow::flags`]: written by a SYN and no packet of the flow but SYNs
/// seen since. A second SYN on such an entry is the client sending its SYN
/// again: no SYN-ACK reached it (a [`SIGNAL_SYN_AGAIN`]).
pub const FLOW_F_OPENING: u16 = 1 << 1;
/// [`Flow::flags`]: with [`FLOW_F_OPENING`], the SYN sent again was
/// signalled already: one signal per connection attempt, however often its
/// client sends the SYN.
pub const FLOW_F_SIGNALLED: u16 = 1 << 2;

/// What the datapath tells the agent about a backend (`SIGNALS`, a ring):
/// a sign of failure that the agent checks at once with probes (only
/// failed probes take a backend down).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Signal {
    /// `SIGNAL_*`.
    pub kind: u32,
    /// The backend, when the datapath knows its id (0: see `backend`).
    pub backend_id: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub proto: u8,
    /// The VIP's port (host order).
    pub vip_port: u16,
    pub _pad: u32,
    /// The VIP's address.
    pub vip: [u8; 16],
    /// The backend's address (`SIGNAL_RST_ON_SYN`: the reply's source).
    pub backend: [u8; 16],
}

/// [`Signal::kind`]: a client sent the SYN of a 5-tuple again while its
/// entry had seen nothing but the SYN (every mode).
pub const SIGNAL_SYN_AGAIN: u32 = 1;
/// [`Signal::kind`]: a NAT backend's first answer to a new connection was
/// a RST (nothing listens: the server is gone).
pub const SIGNAL_RST_ON_SYN: u32 = 2;
