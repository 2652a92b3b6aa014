//! A TCP SYN along a VIP's forwarding path, for path probes: the frame a
//! client's SYN becomes after the balancer (`dsr`: to VIP:port, delivered
//! to the backend's MAC; `ipip`: the same inside an outer header to the
//! backend's address), sent from this host's address on the backend's
//! segment with a packet socket, and the backend's answer read from a
//! packet socket: SYN-ACK (something listens on VIP:port there), RST
//! (nothing does), or nothing (the VIP is not on the backend, its decap is
//! gone, the path is broken). This host's kernel, which owns no socket for
//! the answer, resets the half-open connection itself.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6Header, PacketBuilder};

use super::netlink;

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

/// A classic BPF filter that passes only TCP from the VIP's address and
/// port to `sport` (the answers to our SYN), so the socket is not handed
/// the host's other traffic.
fn filter(vip: SocketAddr, sport: u16) -> Vec<libc::sock_filter> {
    const LD_H: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const LD_B: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
    const LDX_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // Each check falls through on a match and jumps to the final "reject"
    // otherwise; jump offsets are filled in once the program is complete.
    let mut p: Vec<libc::sock_filter> = Vec::new();
    let mut checks: Vec<usize> = Vec::new();
    let mut check = |p: &mut Vec<libc::sock_filter>, k: u32| {
        checks.push(p.len());
        p.push(op(JEQ, k));
    };
    match vip.ip() {
        IpAddr::V4(a) => {
            p.push(op(LD_H, 12));
            check(&mut p, 0x0800);
            p.push(op(LD_B, 23));
            check(&mut p, 6);
            p.push(op(LD_W, 26));
            check(&mut p, u32::from(a));
            p.push(op(LDX_MSH, 14));
            p.push(op(LD_H_IND, 14));
            check(&mut p, vip.port() as u32);
            p.push(op(LD_H_IND, 16));
            check(&mut p, sport as u32);
        }
        IpAddr::V6(a) => {
            p.push(op(LD_H, 12));
            check(&mut p, 0x86dd);
            p.push(op(LD_B, 20));
            check(&mut p, 6);
            for (i, w) in a.octets().chunks(4).enumerate() {
                p.push(op(LD_W, 22 + 4 * i as u32));
                check(&mut p, u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
            }
            p.push(op(LD_H, 54));
            check(&mut p, vip.port() as u32);
            p.push(op(LD_H, 56));
            check(&mut p, sport as u32);
        }
    }
    p.push(op(RET, 0xffff));
    let reject = p.len();
    p.push(op(RET, 0));
    for i in checks {
        p[i].jf = (reject - i - 1) as u8;
    }
    p
}

/// A packet socket for IPv4 or IPv6 frames, passing nothing until a probe
/// attaches its filter.
fn packet_socket(v4: bool) -> Result<OwnedFd> {
    let proto = if v4 { libc::ETH_P_IP } else { libc::ETH_P_IPV6 } as u16;
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.to_be() as i32,
        )
    };
    if fd < 0 {
        bail!(
            "opening a packet socket: {} (path probes need root)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let reject = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    attach(&fd, &reject)?;
    Ok(fd)
}

/// Attaches (replaces) the socket's filter.
fn attach(fd: &OwnedFd, prog: &[libc::sock_filter]) -> Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, alive for the call; the kernel
    // copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "attaching the probe filter: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A backend's path prober: one packet socket for all its probes (closing
/// a packet socket waits for an RCU grace period, 10 ms and more here,
/// which a socket per probe would add to every probe's latency).
pub struct Prober {
    fd: OwnedFd,
    v4: bool,
}

impl Prober {
    pub fn new(v4: bool) -> Result<Self> {
        Ok(Self {
            fd: packet_socket(v4)?,
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
        probe_on(&self.fd, path, limit)
    }
}

/// [`Prober::probe`] on a packet socket of the path's family.
fn probe_on(fd: &OwnedFd, path: &Path, limit: Duration) -> Result<Answer> {
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
    let frame = frame(path, src, sport, seq, smac, dmac)?;
    let v4 = path.vip.is_ipv4();
    attach(fd, &filter(path.vip, sport))?;
    let mut buf = [0u8; 2048];
    // Whatever the previous filter let in is no answer to this probe.
    // SAFETY: `buf` is valid for its length.
    while unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } > 0
    {}
    // SAFETY: a zeroed sockaddr_ll, filled in below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    // IPIP stays in its family (IPv4 in IPv4, IPv6 in IPv6).
    to.sll_protocol = (if v4 { libc::ETH_P_IP } else { libc::ETH_P_IPV6 } as u16).to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dmac);
    // SAFETY: `frame` and `to` are valid for the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        bail!(
            "sending the path probe: {}",
            std::io::Error::last_os_error()
        );
    }
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Ok(Answer::Silent);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n <= 0 {
            continue;
        }
        // SAFETY: `buf` is valid for its length.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got <= 0 {
            continue;
        }
        if let Some(a) = answer(&buf[..got as usize], path.vip, src, sport, seq) {
            if a == Answer::Open {
                // Close the backend's half-open connection along the same
                // path (this host's own reset would follow its routes to
                // the VIP, not to this backend). Best effort.
                if let Ok(rst) =
                    frame_flags(path, src, sport, seq.wrapping_add(1), smac, dmac, true)
                {
                    // SAFETY: as for the SYN.
                    unsafe {
                        libc::sendto(
                            fd.as_raw_fd(),
                            rst.as_ptr().cast(),
                            rst.len(),
                            0,
                            (&raw const to).cast(),
                            std::mem::size_of::<libc::sockaddr_ll>() as u32,
                        )
                    };
                }
            }
            return Ok(a);
        }
    }
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

    #[test]
    fn the_filter_checks_every_field_and_ends_in_reject() {
        let f = filter("198.18.0.100:80".parse().unwrap(), 41000);
        assert_eq!(f.last().map(|i| i.k), Some(0), "reject last");
        assert_eq!(f[f.len() - 2].k, 0xffff, "accept before it");
        let f6 = filter("[2001:2::100]:80".parse().unwrap(), 41000);
        assert!(f6.len() > f.len());
    }
}
