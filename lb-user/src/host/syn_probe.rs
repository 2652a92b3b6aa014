//! A TCP SYN along a VIP's forwarding path, for path probes: the frame a
//! client's SYN becomes after the balancer (`dsr`: to VIP:port, delivered
//! to the backend's MAC; `ipip`: the same inside an outer header to the
//! backend's address), sent from this host's address on the backend's
//! segment with a packet socket, and the backend's answer read from a
//! packet socket: SYN-ACK (something listens on VIP:port there), RST
//! (nothing does), or nothing (the VIP is not on the backend, its decap is
//! gone, the path is broken). An open probe's half-open connection is
//! reset along the same path. The socket itself is `packet_socket`.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder};

use super::netlink;
use super::packet_socket::{PacketSocket, tcp_answers};

/// How the balancer delivers a VIP's packets to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// As they are, to the backend's MAC (`dsr`).
    None,
    /// Inside an IPv4 (IPv6) header to the backend's address (`ipip`).
    Ip,
    /// The same, with UDP to this port and a GUE header (`gue`).
    Gue(u16),
}

/// One path to probe: the VIP's address and the probed port, the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path {
    pub vip: SocketAddr,
    pub backend: IpAddr,
    pub encap: Encap,
}

/// What came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// SYN-ACK: a listener on VIP:port behind the path.
    Open,
    /// RST: the path delivers, but nothing listens on VIP:port.
    Refused,
    /// Nothing within the time limit.
    Silent,
}

/// Where frames to `backend` leave: this host's source address, the
/// interface, its MAC and the next hop's. The next hop is resolved by the
/// kernel (a datagram to the discard port starts it) within `limit`.
fn next_hop(backend: IpAddr, limit: Duration) -> Result<(IpAddr, u32, [u8; 6], [u8; 6])> {
    let any: SocketAddr = match backend {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let udp = UdpSocket::bind(any)?;
    udp.connect(SocketAddr::new(backend, 9))
        .with_context(|| format!("no route to {backend}"))?;
    let src = udp.local_addr()?.ip();
    let route = netlink::route(backend)?.with_context(|| format!("no route to {backend}"))?;
    let link = netlink::link_by_index(route.ifindex)?
        .with_context(|| format!("no interface {}", route.ifindex))?;
    let smac = link
        .mac
        .with_context(|| format!("{} has no MAC address", link.name))?;
    let t0 = Instant::now();
    let mut nudged = false;
    loop {
        if let Some(dmac) = netlink::neighbour(route.via, route.ifindex)? {
            return Ok((src, route.ifindex, smac, dmac));
        }
        if !nudged {
            // Makes the kernel resolve the next hop (the discard port: a
            // backend answers with at most an ICMP error).
            let _ = udp.send(&[]);
            nudged = true;
        }
        if t0.elapsed() >= limit {
            bail!(
                "the next hop {} of {backend} does not answer ARP/ND",
                route.via
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The frame a client's SYN from `src:sport` to the VIP becomes on `path`.
fn frame(
    path: &Path,
    src: IpAddr,
    sport: u16,
    seq: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
) -> Result<Vec<u8>> {
    frame_flags(path, src, sport, seq, smac, dmac, false)
}

/// [`frame`], or (`rst`) the reset that closes the probe's half-open
/// connection on the backend, sent the same way.
fn frame_flags(
    path: &Path,
    src: IpAddr,
    sport: u16,
    seq: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    rst: bool,
) -> Result<Vec<u8>> {
    let (vip, port) = (path.vip.ip(), path.vip.port());
    let mut inner = Vec::new();
    let ether_type = match (src, vip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let b = PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(sport, port, seq, 64240);
            if rst { b.rst() } else { b.syn() }.write(&mut inner, &[])?;
            EtherType::IPV4
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let b = PacketBuilder::ipv6(s.octets(), d.octets(), 64).tcp(sport, port, seq, 64240);
            if rst { b.rst() } else { b.syn() }.write(&mut inner, &[])?;
            EtherType::IPV6
        }
        _ => bail!("the VIP {vip} and the path's source {src} are of two families"),
    };
    let mut v = Vec::with_capacity(inner.len() + 54);
    Ethernet2Header {
        source: smac,
        destination: dmac,
        ether_type,
    }
    .write(&mut v)?;
    // `gue`: UDP (no checksum, as the balancer sends it) and a version-0
    // GUE header naming the inner protocol, between the two IP headers.
    let gue: Vec<u8> = match path.encap {
        Encap::Gue(port) => {
            let inner_proto = if src.is_ipv4() { 4u8 } else { 41 };
            let len = (inner.len() + lb_common::GUE_OVERHEAD) as u16;
            let mut g = Vec::with_capacity(lb_common::GUE_OVERHEAD);
            g.extend_from_slice(&sport.to_be_bytes());
            g.extend_from_slice(&port.to_be_bytes());
            g.extend_from_slice(&len.to_be_bytes());
            g.extend_from_slice(&[0, 0, 0, inner_proto, 0, 0]);
            g
        }
        _ => Vec::new(),
    };
    let payload = (inner.len() + gue.len()) as u16;
    match (path.encap, src, path.backend) {
        (Encap::None, _, _) => {}
        (Encap::Ip | Encap::Gue(_), IpAddr::V4(s), IpAddr::V4(b)) => {
            let proto = if gue.is_empty() {
                IpNumber::IPV4
            } else {
                IpNumber::UDP
            };
            let mut h = Ipv4Header::new(payload, 64, proto, s.octets(), b.octets())?;
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut v)?;
        }
        (Encap::Ip | Encap::Gue(_), IpAddr::V6(s), IpAddr::V6(b)) => {
            Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: payload,
                next_header: if gue.is_empty() {
                    IpNumber::IPV6
                } else {
                    IpNumber::UDP
                },
                hop_limit: 64,
                source: s.octets(),
                destination: b.octets(),
            }
            .write(&mut v)?;
        }
        _ => bail!(
            "the backend {} and the VIP are of two families",
            path.backend
        ),
    }
    v.extend_from_slice(&gue);
    v.extend_from_slice(&inner);
    Ok(v)
}

/// A backend's path prober: one packet socket for all its probes (closing
/// a packet socket waits for an RCU grace period, 10 ms and more here,
/// which a socket per probe would add to every probe's latency).
pub struct Prober {
    sock: PacketSocket,
    v4: bool,
}

impl Prober {
    pub fn new(v4: bool) -> Result<Self> {
        Ok(Self {
            sock: PacketSocket::open(v4)?,
            v4,
        })
    }

    /// Sends one SYN along `path` and waits up to `limit` for the answer.
    /// Blocking; `Err` is a local failure (no route, no next hop, no
    /// permission), not the backend's.
    pub fn probe(&mut self, path: &Path, limit: Duration) -> Result<Answer> {
        if path.vip.is_ipv4() != self.v4 {
            *self = Self::new(path.vip.is_ipv4())?;
        }
        probe_on(&self.sock, path, limit)
    }
}

/// [`Prober::probe`] on a packet socket of the path's family.
fn probe_on(sock: &PacketSocket, path: &Path, limit: Duration) -> Result<Answer> {
    let t0 = Instant::now();
    let (src, ifindex, smac, dmac) = next_hop(path.backend, limit / 2)?;
    // A random source port and sequence per probe: an answer must name
    // both (its acknowledgement is our sequence plus one).
    let mut r = [0u8; 6];
    // SAFETY: getrandom(2) into a buffer of the given length.
    if unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) } != r.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    let sport = 40000 + u16::from_ne_bytes([r[0], r[1]]) % 20000;
    let seq = u32::from_ne_bytes([r[2], r[3], r[4], r[5]]);
    let syn = frame(path, src, sport, seq, smac, dmac)?;
    sock.set_filter(&tcp_answers(path.vip, sport))?;
    // Whatever the previous filter let in is no answer to this probe.
    sock.drain();
    sock.send(&syn, ifindex, dmac)
        .context("sending the path probe")?;
    let mut buf = [0u8; 2048];
    while let Some(n) = sock.recv(&mut buf, limit.saturating_sub(t0.elapsed())) {
        let Some(a) = answer(&buf[..n], path.vip, src, sport, seq) else {
            continue;
        };
        if a == Answer::Open {
            // Close the backend's half-open connection along the same path
            // (this host's own reset would follow its routes to the VIP,
            // not to this backend). Best effort.
            if let Ok(rst) = frame_flags(path, src, sport, seq.wrapping_add(1), smac, dmac, true) {
                let _ = sock.send(&rst, ifindex, dmac);
            }
        }
        return Ok(a);
    }
    Ok(Answer::Silent)
}

/// The answer `pkt` gives to our SYN from `src:sport` with sequence
/// `seq`, if it is one (it acknowledges `seq + 1`).
fn answer(pkt: &[u8], vip: SocketAddr, src: IpAddr, sport: u16, seq: u32) -> Option<Answer> {
    let p = etherparse::SlicedPacket::from_ethernet(pkt).ok()?;
    let (s, d) = match p.net? {
        etherparse::NetSlice::Ipv4(h) => (
            IpAddr::from(h.header().source()),
            IpAddr::from(h.header().destination()),
        ),
        etherparse::NetSlice::Ipv6(h) => (
            IpAddr::from(h.header().source()),
            IpAddr::from(h.header().destination()),
        ),
    };
    let etherparse::TransportSlice::Tcp(t) = p.transport? else {
        return None;
    };
    if s != vip.ip()
        || d != src
        || t.source_port() != vip.port()
        || t.destination_port() != sport
        || !t.ack()
        || t.acknowledgment_number() != seq.wrapping_add(1)
    {
        return None;
    }
    if t.rst() {
        Some(Answer::Refused)
    } else if t.syn() && t.ack() {
        Some(Answer::Open)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(encap: Encap) -> Path {
        Path {
            vip: "198.18.0.100:80".parse().unwrap(),
            backend: "198.18.2.1".parse().unwrap(),
            encap,
        }
    }

    #[test]
    fn frames_are_a_clients_syn_after_the_balancer() {
        let src: IpAddr = "198.18.2.254".parse().unwrap();
        let (s, d) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let f = frame(&path(Encap::None), src, 41000, 7, s, d).unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("ipv4")
        };
        assert_eq!(ip.header().destination(), [198, 18, 0, 100]);
        let f = frame(&path(Encap::Ip), src, 41000, 7, s, d).unwrap();
        assert_eq!(f.len(), 14 + 20 + 20 + 20);
        assert_eq!(f[14 + 9], 4, "IP in IP");
        assert_eq!(&f[14 + 16..14 + 20], &[198, 18, 2, 1], "to the backend");
        assert_eq!(
            &f[34 + 16..34 + 20],
            &[198, 18, 0, 100],
            "inside: to the VIP"
        );
        let f = frame(&path(Encap::Gue(6080)), src, 41000, 7, s, d).unwrap();
        assert_eq!(f.len(), 14 + 20 + 12 + 20 + 20);
        assert_eq!(f[14 + 9], 17, "UDP");
        assert_eq!(
            &f[34 + 2..34 + 4],
            &6080u16.to_be_bytes(),
            "to the GUE port"
        );
        assert_eq!((f[34 + 8], f[34 + 9]), (0, 4), "GUE version 0, IPv4 inside");
        assert_eq!(
            &f[46 + 16..46 + 20],
            &[198, 18, 0, 100],
            "inside: to the VIP"
        );
    }

    #[test]
    fn answers_are_told_apart() {
        let vip: SocketAddr = "198.18.0.100:80".parse().unwrap();
        let me: IpAddr = "198.18.2.254".parse().unwrap();
        let reply = |sport: u16, rst: bool| {
            let b = PacketBuilder::ethernet2([2; 6], [3; 6])
                .ipv4([198, 18, 0, 100], [198, 18, 2, 254], 64)
                .tcp(80, sport, 1, 100);
            let b = if rst { b.rst().ack(8) } else { b.syn().ack(8) };
            let mut v = Vec::new();
            b.write(&mut v, &[]).unwrap();
            v
        };
        assert_eq!(
            answer(&reply(41000, false), vip, me, 41000, 7),
            Some(Answer::Open)
        );
        assert_eq!(
            answer(&reply(41000, true), vip, me, 41000, 7),
            Some(Answer::Refused)
        );
        assert_eq!(answer(&reply(41001, false), vip, me, 41000, 7), None);
        // Another probe's answer (another sequence) is not ours.
        assert_eq!(answer(&reply(41000, false), vip, me, 41000, 8), None);
    }
}
