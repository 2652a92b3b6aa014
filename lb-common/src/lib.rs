//! Types shared by the XDP datapath (`lb-ebpf`) and userspace (`lb-user`, `tests`).
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every
//! type is `#[repr(C)]`, states its padding explicitly, and uses integer flags
//! instead of `bool` or Rust enums. Addresses are stored as 16 bytes in network
//! order (IPv4 in the first four bytes, the rest zero); ports are host order
//! (the datapath converts once, when it parses).
//!
//! Layout: `names` (families, capacities, map and program names), `vip`
//! (VIPs, the directory, regions, backends), `flow` (the connection table,
//! the flood guard), `nat`, `trace`, `hash` (the hashes kernel and userspace
//! share); this file: counters, settings, the traffic generator's
//! configuration, verdicts, and the size checks. Every module's items are
//! re-exported here, so users name them `lb_common::X`.
#![no_std]

mod flow;
pub mod hash;
mod names;
mod nat;
mod trace;
mod vip;

pub use flow::*;
pub use names::*;
pub use nat::*;
pub use trace::*;
pub use vip::*;

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
    /// UDP destination port of `gue` VIPs' encapsulation (host order).
    pub gue_port: u16,
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
    /// Second chance: no connection here for a packet that names a second
    /// hop; forwarded there once (its hop removed).
    pub const SECOND_HOP: u32 = 3;
    /// Second chance: no connection here and no route or neighbour to the
    /// second hop yet; delivered here (the stack answers as it would).
    pub const SECOND_HOP_UNREACHABLE: u32 = 4;
    pub const COUNT: u32 = 5;
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
    unsafe impl aya::Pod for super::Signal {}
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
    assert!(core::mem::size_of::<Signal>() == 48);
};
