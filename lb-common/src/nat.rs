//! Full NAT's reply table and its timeouts.

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
/// [`NatEntry::flags`]: the backend has answered (a RST before this is a
/// [`crate::SIGNAL_RST_ON_SYN`]).
pub const NAT_F_REPLIED: u16 = 1 << 1;
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
