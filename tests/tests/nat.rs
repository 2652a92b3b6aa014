//! Full NAT through the real program (BPF_PROG_TEST_RUN): a NAT VIP's
//! packet leaves from a NAT source address and port to the backend's
//! address and port; the backend's reply to that address and port goes
//! back to the client from the VIP. IPv4 and IPv6, TCP and UDP, every
//! checksum checked by etherparse; ports never shared by two live flows to
//! one backend, shared across backends, and a counted refusal when a range
//! is used up.

use std::net::IpAddr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{AF_INET, AF_INET6, PROTO_TCP, PROTO_UDP, VIP_F_NAT, VipKey, verdict};
use lb_tests::{CLIENT_MAC, Fixture, LB_MAC, VipSpec, action, backend_mac, v4, v6};

const NAT4: [u8; 4] = [198, 18, 11, 1];
const VIP4: [u8; 4] = [198, 18, 0, 100];

fn nat6() -> [u8; 16] {
    v6("2001:2:11::1".parse().unwrap())
}
fn vip6() -> [u8; 16] {
    v6("2001:2::100".parse().unwrap())
}

/// What left the balancer: addresses, ports, MACs, and whether every
/// checksum is right.
#[derive(Debug)]
struct Out {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
}

fn decode(frame: &[u8]) -> Out {
    let p = SlicedPacket::from_ethernet(frame).expect("parse");
    let (src, dst): (IpAddr, IpAddr) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.calc_header_checksum(),
                h.header_checksum,
                "IPv4 header checksum"
            );
            (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            )
        }
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => panic!("not IP"),
    };
    let (sport, dport) = match (&p.transport, &p.net) {
        (Some(TransportSlice::Tcp(t)), Some(NetSlice::Ipv4(ip))) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                .unwrap();
            assert_eq!(want, t.checksum(), "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        (Some(TransportSlice::Tcp(t)), Some(NetSlice::Ipv6(ip))) => {
            let want = t
                .to_header()
                .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                .unwrap();
            assert_eq!(want, t.checksum(), "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        (Some(TransportSlice::Udp(u)), Some(NetSlice::Ipv4(ip))) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                    .unwrap();
                assert_eq!(want, u.checksum(), "UDP checksum");
            }
            (u.source_port(), u.destination_port())
        }
        (Some(TransportSlice::Udp(u)), Some(NetSlice::Ipv6(ip))) => {
            let want = u
                .to_header()
                .calc_checksum_ipv6(&ip.header().to_header(), u.payload())
                .unwrap();
            assert_eq!(want, u.checksum(), "UDP checksum");
            (u.source_port(), u.destination_port())
        }
        _ => panic!("no transport header"),
    };
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&frame[..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    Out {
        src,
        dst,
        sport,
        dport,
        dst_mac,
        src_mac,
    }
}

fn ip(a: [u8; 16], family: u8) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(a)
    }
}

/// A segment or datagram with explicit MACs (a backend's reply).
#[allow(clippy::too_many_arguments)]
fn packet(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: &str,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let payload = b"hello";
    let mut v = Vec::new();
    macro_rules! finish {
        ($ipb:expr) => {
            if proto == PROTO_TCP {
                let mut t = $ipb.tcp(sport, dport, 1000, 65535);
                if flags.contains('S') {
                    t = t.syn();
                }
                if flags.contains('A') {
                    t = t.ack(1);
                }
                if flags.contains('F') {
                    t = t.fin();
                }
                t.write(&mut v, payload).unwrap();
            } else {
                $ipb.udp(sport, dport).write(&mut v, payload).unwrap();
            }
        };
    }
    if family == AF_INET {
        let s = [src[0], src[1], src[2], src[3]];
        let d = [dst[0], dst[1], dst[2], dst[3]];
        finish!(eth.ipv4(s, d, 64));
    } else {
        finish!(eth.ipv6(src, dst, 64));
    }
    v
}

/// A NAT VIP for [`fixture`]: key, id, backends (id, address, port).
type NatVip = (VipKey, u32, Vec<(u32, [u8; 16], u16)>);

/// A fixture with NAT sources, a port range of `ports`, and NAT VIPs.
fn fixture(ports: (u16, u16), vips: &[NatVip]) -> Fixture {
    let mut f = Fixture::new().expect("load");
    f.dp()
        .set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().unwrap()),
            flags: 0,
            nat_port_lo: ports.0,
            nat_port_hi: ports.1,
            nat_v4_count: 1,
            nat_v6_count: 1,
            nat_cpus: 1,
            ..Default::default()
        })
        .expect("settings");
    f.dp()
        .set_nat_addrs(&[v4(NAT4)], &[nat6()])
        .expect("nat addresses");
    for (key, id, backends) in vips {
        f.add_vip(&VipSpec {
            key: *key,
            vip_id: *id,
            flags: VIP_F_NAT,
            ring_size: 251,
            backends: backends.iter().map(|(i, a, _)| (*i, *a, 1)).collect(),
        })
        .expect("vip");
        for (bid, addr, port) in backends {
            let mut dp = f.dp();
            let mut b = dp.backend(*bid).expect("backend");
            assert_eq!(b.addr, *addr);
            b.port = *port;
            dp.set_backend(*bid, &b).expect("backend port");
        }
    }
    f
}

fn key(addr: [u8; 16], family: u8, proto: u8) -> VipKey {
    VipKey {
        addr,
        port: 80,
        proto,
        family,
    }
}

fn counted(f: &mut Fixture, before: &[u64], reason: u32) {
    let after = f.verdicts().expect("verdicts");
    assert_eq!(
        lb_tests::moved_verdicts(before, &after),
        vec![(reason as usize, 1)],
        "exactly one `{}`",
        verdict::NAMES[reason as usize]
    );
}

/// One family and protocol both ways: the client's packet is translated to
/// the backend (its own port when it has one), the flow keeps its source
/// port, the reply returns to the client from the VIP.
fn both_directions(family: u8, proto: u8) {
    let (vip, nat, client, backend) = if family == AF_INET {
        (v4(VIP4), v4(NAT4), v4([198, 18, 1, 7]), v4([198, 18, 2, 1]))
    } else {
        (
            vip6(),
            nat6(),
            v6("2001:2:1::7".parse().unwrap()),
            v6("2001:2:2::1".parse().unwrap()),
        )
    };
    let k = key(vip, family, proto);
    let mut f = fixture((1024, 32767), &[(k, 0, vec![(1, backend, 8080)])]);
    let first = if proto == PROTO_TCP { "S" } else { "" };
    let what = format!("family {family} proto {proto}");

    let before = f.verdicts().unwrap();
    let r = f
        .run(&packet(
            (CLIENT_MAC, LB_MAC),
            client,
            vip,
            family,
            proto,
            40000,
            80,
            first,
        ))
        .expect("run");
    assert_eq!(r.action, action::TX, "{what}");
    counted(&mut f, &before, verdict::TX);
    let out = decode(&r.out);
    assert_eq!(out.src, ip(nat, family), "{what}: from the NAT address");
    assert_eq!(out.dst, ip(backend, family), "{what}: to the backend");
    assert_eq!(out.dport, 8080, "{what}: the backend's own port");
    assert!((1024..=32767).contains(&out.sport), "{what}: {}", out.sport);
    assert_eq!((out.dst_mac, out.src_mac), (backend_mac(1), LB_MAC));
    let port = out.sport;

    // The next packet of the flow keeps its source port.
    let r = f
        .run(&packet(
            (CLIENT_MAC, LB_MAC),
            client,
            vip,
            family,
            proto,
            40000,
            80,
            "A",
        ))
        .expect("run");
    assert_eq!(decode(&r.out).sport, port, "{what}: same port");

    // The reply: from the backend's port to the NAT port, back to the client.
    let before = f.verdicts().unwrap();
    let bmac = backend_mac(1);
    let r = f
        .run(&packet(
            (bmac, LB_MAC),
            backend,
            nat,
            family,
            proto,
            8080,
            port,
            "A",
        ))
        .expect("run");
    assert_eq!(r.action, action::TX, "{what}: reply");
    counted(&mut f, &before, verdict::NAT_REPLY);
    let out = decode(&r.out);
    assert_eq!(out.src, ip(vip, family), "{what}: reply from the VIP");
    assert_eq!(out.dst, ip(client, family), "{what}: reply to the client");
    assert_eq!((out.sport, out.dport), (80, 40000), "{what}: reply ports");
    assert_eq!(
        (out.dst_mac, out.src_mac),
        (CLIENT_MAC, LB_MAC),
        "{what}: reply MACs"
    );

    // A packet to the NAT address that belongs to no flow is not ours.
    let before = f.verdicts().unwrap();
    let r = f
        .run(&packet(
            (bmac, LB_MAC),
            backend,
            nat,
            family,
            proto,
            8080,
            port + 1,
            "A",
        ))
        .expect("run");
    assert_eq!(r.action, action::PASS, "{what}: unknown port");
    counted(&mut f, &before, verdict::PASS_NON_VIP);
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_both_directions() {
    for family in [AF_INET, AF_INET6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            both_directions(family, proto);
        }
    }
}

/// IPv4 UDP without a checksum (0) stays without one.
#[test]
fn udp_without_checksum_stays_so() {
    let k = key(v4(VIP4), AF_INET, PROTO_UDP);
    let mut f = fixture((1024, 32767), &[(k, 0, vec![(1, v4([198, 18, 2, 1]), 0)])]);
    let mut pkt = packet(
        (CLIENT_MAC, LB_MAC),
        v4([198, 18, 1, 7]),
        v4(VIP4),
        AF_INET,
        PROTO_UDP,
        40000,
        80,
        "",
    );
    // Ethernet 14 + IPv4 20: the UDP checksum is at 34 + 6.
    pkt[40] = 0;
    pkt[41] = 0;
    let r = f.run(&pkt).expect("run");
    assert_eq!(r.action, action::TX);
    assert_eq!(&r.out[40..42], &[0, 0]);
    let out = decode(&r.out);
    assert_eq!(out.dport, 80, "no backend port: the VIP's");
}

/// Two ports: two clients of one backend take them; a third is refused
/// and counted (never given a port in use); a second backend has ports of
/// its own.
#[test]
fn ports_are_never_shared_and_exhaustion_is_counted() {
    let k1 = key(v4(VIP4), AF_INET, PROTO_TCP);
    let k2 = VipKey { port: 81, ..k1 };
    let b1 = v4([198, 18, 2, 1]);
    let b2 = v4([198, 18, 2, 2]);
    let mut f = fixture(
        (2000, 2001),
        &[(k1, 0, vec![(1, b1, 0)]), (k2, 1, vec![(2, b2, 0)])],
    );
    let syn = |c: u8, dport: u16| {
        packet(
            (CLIENT_MAC, LB_MAC),
            v4([198, 18, 1, c]),
            v4(VIP4),
            AF_INET,
            PROTO_TCP,
            40000,
            dport,
            "S",
        )
    };
    let mut ports = Vec::new();
    for c in [1, 2] {
        let r = f.run(&syn(c, 80)).expect("run");
        assert_eq!(r.action, action::TX);
        ports.push(decode(&r.out).sport);
    }
    ports.sort_unstable();
    assert_eq!(ports, vec![2000, 2001], "two flows, two ports");
    // A retransmitted SYN of the first client keeps its port.
    let r = f.run(&syn(1, 80)).expect("run");
    assert!(ports.contains(&decode(&r.out).sport));

    let before = f.verdicts().unwrap();
    let r = f.run(&syn(3, 80)).expect("run");
    assert_eq!(r.action, action::DROP, "no port left for a third flow");
    counted(&mut f, &before, verdict::NAT_NO_PORT);

    // The other backend's port space is its own.
    let r = f.run(&syn(3, 81)).expect("run");
    assert_eq!(r.action, action::TX);
    let out = decode(&r.out);
    assert_eq!(out.dst, IpAddr::from([198, 18, 2, 2]));
    assert!((2000..=2001).contains(&out.sport));
}

/// A ones'-complement checksum after a 16-bit word of the data it covers
/// went down by `dec` (RFC 1624).
fn ones_fix(c: u16, dec: u16) -> u16 {
    let mut s = u32::from(!c) + u32::from(!dec);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" from router
/// `from` to `to`, quoting a TCP segment `qsrc:qsport → qdst:qdport`.
#[allow(clippy::too_many_arguments)]
fn too_big_error(
    family: u8,
    macs: ([u8; 6], [u8; 6]),
    from: [u8; 16],
    to: [u8; 16],
    qsrc: [u8; 16],
    qsport: u16,
    qdst: [u8; 16],
    qdport: u16,
) -> Vec<u8> {
    let mut quoted = Vec::new();
    let mut pkt = Vec::new();
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    if family == AF_INET {
        let a = |x: [u8; 16]| [x[0], x[1], x[2], x[3]];
        PacketBuilder::ipv4(a(qsrc), a(qdst), 64)
            .tcp(qsport, qdport, 1, 1024)
            .write(&mut quoted, &[])
            .unwrap();
        eth.ipv4(a(from), a(to), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut pkt, &quoted)
            .unwrap();
    } else {
        PacketBuilder::ipv6(qsrc, qdst, 64)
            .tcp(qsport, qdport, 1, 1024)
            .write(&mut quoted, &[])
            .unwrap();
        eth.ipv6(from, to, 64)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
            .write(&mut pkt, &quoted)
            .unwrap();
    }
    pkt
}

/// The translated error: outer addresses, quoted addresses and ports, and
/// every checksum (outer and quoted IPv4 header, ICMP / ICMPv6 with its
/// pseudo-header).
fn check_error(
    family: u8,
    out: &[u8],
    outer: (IpAddr, IpAddr),
    quoted: ((IpAddr, u16), (IpAddr, u16)),
) {
    let (l4, icmp) = if family == AF_INET {
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&out[14..]).expect("ipv4");
        assert_eq!(
            ip.calc_header_checksum(),
            ip.header_checksum,
            "outer IPv4 checksum"
        );
        assert_eq!(
            (IpAddr::from(ip.source), IpAddr::from(ip.destination)),
            outer
        );
        assert_eq!(lb_tests::ones_sum(rest), 0xffff, "ICMP checksum");
        assert_eq!(rest[0], 3, "destination unreachable");
        if rest[1] == 4 {
            assert_eq!(u16::from_be_bytes([rest[6], rest[7]]), 1400, "MTU kept");
        }
        let (q, qrest) = etherparse::Ipv4Header::from_slice(&rest[8..]).expect("quoted ipv4");
        assert_eq!(
            q.calc_header_checksum(),
            q.header_checksum,
            "quoted IPv4 checksum"
        );
        (
            (
                (
                    IpAddr::from(q.source),
                    u16::from_be_bytes([qrest[0], qrest[1]]),
                ),
                (
                    IpAddr::from(q.destination),
                    u16::from_be_bytes([qrest[2], qrest[3]]),
                ),
            ),
            rest.to_vec(),
        )
    } else {
        let (ip, rest) = etherparse::Ipv6Header::from_slice(&out[14..]).expect("ipv6");
        assert_eq!(
            (IpAddr::from(ip.source), IpAddr::from(ip.destination)),
            outer
        );
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip.source);
        pseudo.extend_from_slice(&ip.destination);
        pseudo.extend_from_slice(&(rest.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(rest);
        assert_eq!(lb_tests::ones_sum(&pseudo), 0xffff, "ICMPv6 checksum");
        assert_eq!(&rest[..2], &[2, 0]);
        let (q, qrest) = etherparse::Ipv6Header::from_slice(&rest[8..]).expect("quoted ipv6");
        (
            (
                (
                    IpAddr::from(q.source),
                    u16::from_be_bytes([qrest[0], qrest[1]]),
                ),
                (
                    IpAddr::from(q.destination),
                    u16::from_be_bytes([qrest[2], qrest[3]]),
                ),
            ),
            rest.to_vec(),
        )
    };
    let _ = icmp;
    assert_eq!(l4, quoted, "the quoted packet as this side knows it");
}

/// Path-MTU errors about a NAT flow cross the NAT: one about a reply to the
/// client (sent to the VIP) reaches the backend as if about the reply it
/// sent; one about a packet to the backend (sent to the NAT address) reaches
/// the client as if about its own packet. IPv4 and IPv6; an error about no
/// flow passes untouched.
#[test]
fn path_mtu_errors_cross_the_nat_both_ways() {
    for family in [AF_INET, AF_INET6] {
        let (vip, nat, client, backend, router) = if family == AF_INET {
            (
                v4(VIP4),
                v4(NAT4),
                v4([198, 18, 1, 7]),
                v4([198, 18, 2, 1]),
                v4([198, 18, 9, 1]),
            )
        } else {
            (
                vip6(),
                nat6(),
                v6("2001:2:1::7".parse().unwrap()),
                v6("2001:2:2::1".parse().unwrap()),
                v6("2001:2:9::1".parse().unwrap()),
            )
        };
        let k = key(vip, family, PROTO_TCP);
        let mut f = fixture((1024, 32767), &[(k, 0, vec![(1, backend, 8080)])]);
        let r = f
            .run(&packet(
                (CLIENT_MAC, LB_MAC),
                client,
                vip,
                family,
                PROTO_TCP,
                40000,
                80,
                "S",
            ))
            .expect("run");
        let port = decode(&r.out).sport;
        let ipa = |a| ip(a, family);

        // About the reply VIP:80 → client:40000, from the client's side.
        let before = f.verdicts().unwrap();
        let e = too_big_error(
            family,
            (CLIENT_MAC, LB_MAC),
            router,
            vip,
            vip,
            80,
            client,
            40000,
        );
        let r = f.run(&e).expect("run");
        assert_eq!(r.action, action::TX, "family {family}: to the backend");
        counted(&mut f, &before, verdict::NAT_ICMP);
        assert_eq!(
            (&r.out[..6], &r.out[6..12]),
            (&backend_mac(1)[..], &LB_MAC[..])
        );
        check_error(
            family,
            &r.out,
            (ipa(nat), ipa(backend)),
            ((ipa(backend), 8080), (ipa(nat), port)),
        );

        // About the packet NAT:port → backend:8080, from the backend's side.
        let before = f.verdicts().unwrap();
        let e = too_big_error(
            family,
            (backend_mac(1), LB_MAC),
            router,
            nat,
            nat,
            port,
            backend,
            8080,
        );
        let r = f.run(&e).expect("run");
        assert_eq!(r.action, action::TX, "family {family}: to the client");
        counted(&mut f, &before, verdict::NAT_ICMP);
        assert_eq!((&r.out[..6], &r.out[6..12]), (&CLIENT_MAC[..], &LB_MAC[..]));
        check_error(
            family,
            &r.out,
            (ipa(vip), ipa(client)),
            ((ipa(client), 40000), (ipa(vip), 80)),
        );

        // Another error of the same kind, port unreachable from the
        // backend about its port (destination unreachable, code 3), also
        // reaches the client (IPv4: any destination-unreachable code).
        if family == AF_INET {
            let mut e = too_big_error(
                family,
                (backend_mac(1), LB_MAC),
                router,
                nat,
                nat,
                port,
                backend,
                8080,
            );
            // Code 4 → 3, and the ICMP checksum word follows (+1 in the
            // first word: its complement goes down by one).
            e[14 + 20 + 1] = 3;
            let c = u16::from_be_bytes([e[14 + 22], e[14 + 23]]);
            let c = ones_fix(c, 1);
            e[14 + 22..14 + 24].copy_from_slice(&c.to_be_bytes());
            let before = f.verdicts().unwrap();
            let r = f.run(&e).expect("run");
            assert_eq!(r.action, action::TX, "port unreachable to the client");
            counted(&mut f, &before, verdict::NAT_ICMP);
            assert_eq!(r.out[14 + 20 + 1], 3, "still port unreachable");
            check_error(
                family,
                &r.out,
                (ipa(vip), ipa(client)),
                ((ipa(client), 40000), (ipa(vip), 80)),
            );
        }

        // About no flow: untouched.
        let before = f.verdicts().unwrap();
        let e = too_big_error(
            family,
            (CLIENT_MAC, LB_MAC),
            router,
            vip,
            vip,
            80,
            client,
            40001,
        );
        let r = f.run(&e).expect("run");
        assert_eq!(r.action, action::PASS);
        counted(&mut f, &before, verdict::PASS_NON_VIP);
    }
}

/// A NAT VIP without a NAT source of its family refuses new flows
/// (counted), it never sends one from a wrong address.
#[test]
fn no_nat_source_is_counted_not_guessed() {
    let k = key(v4(VIP4), AF_INET, PROTO_TCP);
    let mut f = fixture((1024, 32767), &[(k, 0, vec![(1, v4([198, 18, 2, 1]), 0)])]);
    f.dp()
        .set_settings(&lb_common::Settings {
            nat_port_lo: 1024,
            nat_port_hi: 32767,
            nat_v4_count: 0,
            nat_v6_count: 1,
            nat_cpus: 1,
            ..Default::default()
        })
        .expect("settings");
    let before = f.verdicts().unwrap();
    let r = f
        .run(&packet(
            (CLIENT_MAC, LB_MAC),
            v4([198, 18, 1, 7]),
            v4(VIP4),
            AF_INET,
            PROTO_TCP,
            40000,
            80,
            "S",
        ))
        .expect("run");
    assert_eq!(r.action, action::DROP);
    counted(&mut f, &before, verdict::NAT_NO_PORT);
}

/// Seconds on the datapath's clock (CLOCK_MONOTONIC).
/// A TCP packet from `client`:40000 to the IPv4 VIP's port 80.
fn client_packet(client: [u8; 16], flags: &str) -> Vec<u8> {
    packet(
        (CLIENT_MAC, LB_MAC),
        client,
        v4(VIP4),
        AF_INET,
        PROTO_TCP,
        40000,
        80,
        flags,
    )
}

fn monotonic_s() -> u32 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}

/// The agent's sweep frees a closed flow's port only after the backend's
/// TIME_WAIT (60 s), an open one only after 300 s idle; once freed, the
/// port serves a new flow of the exhausted range.
#[test]
fn closed_ports_return_after_time_wait_and_not_before() {
    let k = key(v4(VIP4), AF_INET, PROTO_TCP);
    let backend = v4([198, 18, 2, 1]);
    let mut f = fixture((3000, 3001), &[(k, 0, vec![(1, backend, 0)])]);
    let from = |c: u8, flags: &str| client_packet(v4([198, 18, 1, c]), flags);
    for c in [1, 2] {
        assert_eq!(f.run(&from(c, "S")).expect("run").action, action::TX);
    }
    // Client 1 closes; client 2 stays open.
    assert_eq!(f.run(&from(1, "AF")).expect("run").action, action::TX);
    assert_eq!(f.dp().nat_flows().expect("count"), 2);
    let now = monotonic_s();
    assert_eq!(
        f.dp().nat_sweep(now).expect("sweep"),
        0,
        "nothing is free yet"
    );
    assert_eq!(
        f.dp().nat_sweep(now + 59).expect("sweep"),
        0,
        "inside the backend's TIME_WAIT the closed port stays held"
    );
    // The agent sweeps through a handle of its own (no lock held): the
    // same table.
    let mut handle = f.dp().nat_handle().expect("handle").expect("a NAT map");
    assert_eq!(
        lb_user::datapath::sweep_nat(&mut handle, now + 61),
        1,
        "then it is freed"
    );
    assert_eq!(f.dp().nat_flows().expect("count"), 1);
    // Freed: a third client gets a port of the two-port range.
    let r = f.run(&from(3, "S")).expect("run");
    assert_eq!(r.action, action::TX, "the freed port serves a new flow");
    assert!((3000..=3001).contains(&decode(&r.out).sport));
    // The open flow's port goes only after 300 s without a packet.
    assert_eq!(f.dp().nat_sweep(now + 299).expect("sweep"), 0);
    assert_eq!(f.dp().nat_sweep(now + 302).expect("sweep"), 2);
}

/// Sets the clock of every `NAT` entry to `at`.
fn rewind_nat_entries(f: &mut Fixture, at: u32) {
    let mut nat: aya::maps::HashMap<_, lb_common::NatKey, lb_common::NatEntry> =
        aya::maps::HashMap::try_from(f.ebpf.map_mut(lb_common::MAP_NAT).expect("map"))
            .expect("hash");
    let entries: Vec<_> = nat.iter().map(|r| r.expect("entry")).collect();
    assert_eq!(entries.len(), 1, "one NAT flow");
    for (k, mut e) in entries {
        e.last_seen_s = at;
        nat.insert(k, e, 0).expect("rewind");
    }
}

/// Sets the clock of flow `key`'s connection-table entry to `at`.
fn rewind_flow(f: &mut Fixture, key: &lb_common::FlowKey, at: u32) {
    let mut e = f.dp().flow(key).expect("read").expect("the flow");
    e.last_seen_s = at;
    assert!(f.dp().set_flow(key, &e).expect("rewind"), "the flow's slot");
}

/// An open flow's packets keep its reply entry alive: the entry's clock is
/// refreshed when the flow's own clock moves (at most once a second, not
/// on every packet), so a flow quiet for a while that speaks again is not
/// swept 300 s after the entry's last refresh. Both clocks are rewound by
/// 100 s to stand for the quiet time; without a packet the entry goes at
/// 300 s from its clock (the control), with one it stays.
#[test]
fn a_flows_packets_keep_its_reply_entry_alive() {
    let k = key(v4(VIP4), AF_INET, PROTO_TCP);
    let mut f = fixture((3000, 3001), &[(k, 0, vec![(1, v4([198, 18, 2, 1]), 0)])]);
    let client = v4([198, 18, 1, 1]);
    let from = |flags: &str| client_packet(client, flags);
    let flow = lb_common::FlowKey {
        src: client,
        dst: v4(VIP4),
        sport: 40000,
        dport: 80,
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    };
    let now = monotonic_s();
    let quiet = now - 100;
    for speaks in [false, true] {
        assert_eq!(f.run(&from("S")).expect("run").action, action::TX);
        rewind_nat_entries(&mut f, quiet);
        rewind_flow(&mut f, &flow, quiet);
        if speaks {
            assert_eq!(f.run(&from("A")).expect("run").action, action::TX);
        }
        assert_eq!(
            f.dp().nat_sweep(now + 201).expect("sweep"),
            usize::from(!speaks),
            "swept at 300 s from the entry's clock unless the flow spoke (speaks: {speaks})"
        );
    }
}
