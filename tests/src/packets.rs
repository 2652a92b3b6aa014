//! Packets for the fixtures, built with etherparse: TCP and UDP over IPv4
//! and IPv6 from the client's MAC to the LB's, a VLAN tag or IP options
//! added, and reading a forwarded frame's backend back.

use etherparse::PacketBuilder;

use crate::{CLIENT_MAC, LB_MAC};

/// One's-complement sum of `b` folded to 16 bits: 0xffff when a checksum
/// over it holds.
pub fn ones_sum(b: &[u8]) -> u16 {
    let mut s = 0u32;
    for w in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Address helpers: 16-byte network-order form used by the maps.
pub fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a);
    o
}

pub fn v6(a: std::net::Ipv6Addr) -> [u8; 16] {
    a.octets()
}

/// An Ethernet/IPv4/TCP segment of an established connection (ACK) from
/// `src:sport` to `dst:dport`.
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/TCP SYN (no ACK): a connection being opened.
pub fn tcp4_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let payload: &[u8] = &[];
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/TCP FIN|ACK: a connection being closed.
pub fn tcp4_fin(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1)
        .fin();
    let payload: &[u8] = &[];
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/UDP datagram.
pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// The Ethernet frame `p` with an 802.1Q tag (VLAN 42) after its MACs.
pub fn vlan(p: Vec<u8>) -> Vec<u8> {
    let mut o = p[..12].to_vec();
    o.extend_from_slice(&[0x81, 0x00, 0x00, 42]);
    o.extend_from_slice(&p[12..]);
    o
}

/// The Ethernet/IPv4 frame `p` rebuilt with a 4-byte options field (IHL 6).
pub fn with_ip_options(p: Vec<u8>) -> Vec<u8> {
    let (mut h, rest) = etherparse::Ipv4Header::from_slice(&p[14..]).expect("ipv4");
    h.options = [1, 1, 1, 1][..].try_into().expect("options");
    h.total_len += 4;
    h.header_checksum = h.calc_header_checksum();
    let mut o = p[..14].to_vec();
    h.write(&mut o).expect("write");
    o.extend_from_slice(rest);
    o
}

/// An Ethernet/IPv6/TCP segment of an established connection (ACK).
pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv6/TCP SYN (no ACK): a connection opening.
pub fn tcp6_syn(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv6/UDP datagram.
pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// The MAC the fixtures give backend `id`: 02:00:00:00:01:<id>.
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, (id >> 8) as u8 | 0x01, id as u8]
}

/// Which backend a forwarded frame was sent to, from its destination MAC.
pub fn backend_of(frame: &[u8]) -> u32 {
    assert!(frame.len() >= 6, "frame too short to carry a MAC");
    (((frame[4] & !0x01) as u32) << 8) | frame[5] as u32
}
