//! VIPs (key, entry, the directory), regions and backends.

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
/// [`VipMeta::flags`], with [`VIP_F_IPIP`]: the outer header is followed by
/// UDP (to `Settings::gue_port`) and a GUE header (`forwarding = "gue"`).
pub const VIP_F_GUE: u32 = 1 << 5;
/// The GUE header (version 0, no optional fields): 4 bytes.
pub const GUE_HDR_LEN: usize = 4;
/// UDP and GUE headers together.
pub const GUE_OVERHEAD: usize = 8 + GUE_HDR_LEN;
/// The default UDP port of GUE (`agent.gue_port`, `lb backend-host
/// --gue-port`).
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// [`VipMeta::flags`], with [`VIP_F_GUE`]: the second chance. A packet
/// that is not a SYN, scheduled on the ring (no table entry kept it), whose
/// backend on the VIP's previous ring (the ring's other half, while
/// `PREV_RING_UNTIL` says it is recent) is another live backend, names
/// that backend as its second hop in the GUE header ([`GUE_HOP_TAG`]).
/// `lb_decap` on the first hop delivers it when the host has a connection
/// for it, and otherwise forwards it once to the second hop.
pub const VIP_F_SECOND_CHANCE: u32 = 1 << 6;
/// GUE private data naming a second hop: these four bytes ("LB", kind 1,
/// reserved), then the hop's address (4 bytes in an IPv4 tunnel, 16 in an
/// IPv6 one). The GUE header's `Hlen` counts it in 32-bit words (2 or 5;
/// no flags, so it is all private data, as draft-ietf-intarea-gue allows).
pub const GUE_HOP_TAG: [u8; 4] = [b'L', b'B', 1, 0];
/// Bytes of second-hop private data in an IPv4 tunnel.
pub const GUE_HOP_V4: usize = 4 + 4;
/// Bytes of second-hop private data in an IPv6 tunnel.
pub const GUE_HOP_V6: usize = 4 + 16;

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
