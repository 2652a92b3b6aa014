//! The second chance (`forwarding = "gue"`, `second_chance`): after a ring
//! change, a packet that is not a SYN and that the ring schedules (no
//! table entry keeps it) names, in its GUE header, the backend the
//! previous ring gave it when that is another live backend; `lb_decap` on
//! the first hop delivers it when the host has a connection for it, and
//! otherwise forwards it once to the second hop.
//!
//! Fixtures (BPF_PROG_TEST_RUN): the balancer's encoding in both families,
//! through the established path (`lb_xdp`) and the staged balancer alone
//! (`lb_xdp_traced`), byte for byte; and the backend host's decision
//! against real sockets in a namespace of the test's own.

use lb_common::{
    AF_INET, AF_INET6, GUE_HOP_TAG, PROTO_TCP, PROTO_UDP, VIP_F_GUE, VIP_F_IPIP,
    VIP_F_NO_FLOW_TABLE, VIP_F_SECOND_CHANCE, VipKey, hash,
};
use lb_tests::{Fixture, VipSpec, action, tcp4, tcp4_syn, tcp6, udp4, v4, v6};

const VIP4: [u8; 4] = [198, 18, 0, 100];
const CLIENT4: [u8; 4] = [198, 18, 1, 7];
const RING: u32 = 251;

fn vip6() -> [u8; 16] {
    v6("2001:2::100".parse().expect("literal"))
}
fn client6() -> [u8; 16] {
    v6("2001:2:1::7".parse().expect("literal"))
}

fn backend_addr(family: u8, i: u8) -> [u8; 16] {
    if family == AF_INET {
        v4([198, 18, 2, i])
    } else {
        v6(format!("2001:2:2::{i}").parse().expect("literal"))
    }
}

/// A `gue` VIP with the second chance on port `port`, backends 1–3 (ids
/// offset by `id0`), its first ring installed (no previous ring yet).
fn vip(f: &mut Fixture, family: u8, port: u16, vip_id: u32, id0: u32, table: bool) -> VipSpec {
    let spec = VipSpec {
        key: VipKey {
            addr: if family == AF_INET { v4(VIP4) } else { vip6() },
            port,
            proto: PROTO_TCP,
            family,
        },
        vip_id,
        flags: VIP_F_IPIP
            | VIP_F_GUE
            | VIP_F_SECOND_CHANCE
            | if table { 0 } else { VIP_F_NO_FLOW_TABLE },
        ring_size: RING,
        backends: (1..=3)
            .map(|i| (id0 + i, backend_addr(family, i as u8), 1))
            .collect(),
    };
    f.add_vip(&spec).expect("vip");
    spec
}

fn ring_of(spec: &VipSpec) -> Vec<u32> {
    let entries: Vec<_> = spec
        .backends
        .iter()
        .map(|&(id, addr, weight)| lb_user::policy::maglev::Entry { id, addr, weight })
        .collect();
    lb_user::policy::maglev::build(&entries, spec.ring_size)
}

/// A fourth backend joins: the ring changes, the old one is kept for 600 s.
fn add_fourth(f: &mut Fixture, spec: &mut VipSpec) -> (Vec<u32>, Vec<u32>) {
    let before = ring_of(spec);
    let (id, addr) = (spec.backends[0].0 + 3, backend_addr(spec.key.family, 4));
    f.dp()
        .set_backend(
            id,
            &lb_common::Backend {
                addr,
                dst_mac: lb_tests::backend_mac(id),
                src_mac: [2, 0, 0, 0, 0, 1],
                family: spec.key.family,
                state: lb_common::BACKEND_UP,
                weight: 1,
                ..Default::default()
            },
        )
        .expect("backend");
    spec.backends.push((id, addr, 1));
    let after = ring_of(spec);
    f.dp()
        .install_ring_keeping(&spec.key, &after, 600)
        .expect("ring");
    (before, after)
}

/// The outer destination of a GUE packet and the second hop it names.
fn hops(out: &[u8], family: u8) -> ([u8; 16], Option<[u8; 16]>) {
    let (ip, dst) = if family == AF_INET {
        (20, v4(out[30..34].try_into().unwrap()))
    } else {
        (40, out[38..54].try_into().unwrap())
    };
    let gue = 14 + ip + 8;
    let hlen = usize::from(out[gue] & 0x1f);
    if hlen == 0 {
        return (dst, None);
    }
    let data = &out[gue + 4..gue + 4 + 4 * hlen];
    assert_eq!(data[..4], GUE_HOP_TAG, "private data is a second hop");
    let hop = if family == AF_INET {
        assert_eq!(hlen, 2);
        v4(data[4..8].try_into().unwrap())
    } else {
        assert_eq!(hlen, 5);
        data[4..20].try_into().unwrap()
    };
    // The UDP length covers the private data.
    let udp_len = u16::from_be_bytes([out[14 + ip + 4], out[14 + ip + 5]]) as usize;
    assert_eq!(udp_len, out.len() - 14 - ip, "UDP length");
    (dst, Some(hop))
}

fn addr_of(spec: &VipSpec, id: u32) -> [u8; 16] {
    spec.backends.iter().find(|b| b.0 == id).expect("id").1
}

fn packet(family: u8, sport: u16, port: u16, syn: bool) -> Vec<u8> {
    match (family == AF_INET, syn) {
        (true, false) => tcp4(CLIENT4, VIP4, sport, port, b"data"),
        (true, true) => tcp4_syn(CLIENT4, VIP4, sport, port),
        (false, false) => tcp6(client6(), vip6(), sport, port, b"data"),
        (false, true) => lb_tests::tcp6_syn(client6(), vip6(), sport, port),
    }
}

/// Both programs (the established path first, the staged balancer alone)
/// forward `pkt` the same way; the bytes that leave.
fn forward_both(f: &mut Fixture, pkt: &[u8]) -> Vec<u8> {
    let a = f.run(pkt).expect("lb_xdp");
    let b = lb_tests::run(&mut f.ebpf, lb_common::PROG_BALANCER_TRACED, pkt).expect("traced");
    assert_eq!(a.action, action::TX);
    assert_eq!(b.action, action::TX);
    assert_eq!(
        a.out, b.out,
        "the established path and the staged balancer agree"
    );
    a.out
}

/// After a ring change, a non-SYN packet of a VIP without a table names
/// the previous ring's backend exactly where the two rings differ; a SYN
/// and UDP never do; once the previous ring expires, none does.
#[test]
fn a_ring_change_names_the_previous_backend() {
    let mut f = Fixture::new().expect("load");
    for (family, vip_id, id0) in [(AF_INET, 0u32, 0u32), (AF_INET6, 1, 10)] {
        let mut spec = vip(&mut f, family, 9000, vip_id, id0, false);
        // Before any change: no packet names a second hop.
        let (mut differ, mut same) = (0, 0);
        for sport in 41000..41040 {
            let out = forward_both(&mut f, &packet(family, sport, 9000, false));
            assert_eq!(hops(&out, family).1, None, "no previous ring yet");
        }
        let (before, after) = add_fourth(&mut f, &mut spec);
        let src = if family == AF_INET {
            v4(CLIENT4)
        } else {
            client6()
        };
        for sport in 41000..41200 {
            let h = hash::hash_5tuple(&src, sport, 9000, PROTO_TCP);
            let (cur, prev) = (after[(h % RING) as usize], before[(h % RING) as usize]);
            let out = forward_both(&mut f, &packet(family, sport, 9000, false));
            let (dst, hop) = hops(&out, family);
            assert_eq!(dst, addr_of(&spec, cur), "first hop: the current ring's");
            if cur == prev {
                assert_eq!(hop, None, "same backend on both rings: no second hop");
                same += 1;
            } else {
                assert_eq!(
                    hop,
                    Some(addr_of(&spec, prev)),
                    "second hop: the previous ring's"
                );
                differ += 1;
            }
            let syn = forward_both(&mut f, &packet(family, sport, 9000, true));
            assert_eq!(
                hops(&syn, family),
                (dst, None),
                "a SYN opens where the ring says"
            );
        }
        assert!(
            differ > 10 && same > 10,
            "{differ} flows moved, {same} stayed"
        );
        // Expired (the agent's clock says so): no second hop.
        f.dp()
            .install_ring_keeping(&spec.key, &before, 0)
            .expect("ring");
        for sport in 41000..41040 {
            let out = forward_both(&mut f, &packet(family, sport, 9000, false));
            assert_eq!(hops(&out, family).1, None, "no previous ring");
        }
    }
    // UDP: no connection to look for, no second hop.
    let spec = VipSpec {
        key: VipKey {
            addr: v4(VIP4),
            port: 53,
            proto: PROTO_UDP,
            family: AF_INET,
        },
        vip_id: 2,
        flags: VIP_F_IPIP | VIP_F_GUE | VIP_F_SECOND_CHANCE | VIP_F_NO_FLOW_TABLE,
        ring_size: RING,
        backends: vec![
            (21, backend_addr(AF_INET, 1), 1),
            (22, backend_addr(AF_INET, 2), 1),
        ],
    };
    f.add_vip(&spec).expect("vip");
    let mut udp = spec;
    add_fourth(&mut f, &mut udp);
    for sport in 41000..41100 {
        let out = forward_both(&mut f, &udp4(CLIENT4, VIP4, sport, 53, b"q"));
        assert_eq!(hops(&out, AF_INET).1, None, "UDP names no second hop");
    }
}

/// A VIP with a connection table: a flow in the table keeps its backend
/// and names no second hop; a non-SYN packet the table does not know
/// names one (when the rings differ) and is not recorded, so its next
/// packet names it again.
#[test]
fn a_table_vip_names_a_second_hop_only_for_flows_it_does_not_hold() {
    let mut f = Fixture::new().expect("load");
    let mut spec = vip(&mut f, AF_INET, 9001, 0, 0, true);
    // Flows opened before the change: recorded by their SYN.
    for sport in 42000..42100 {
        f.run(&packet(AF_INET, sport, 9001, true)).expect("syn");
        f.run(&packet(AF_INET, sport, 9001, false)).expect("ack");
    }
    let (before, after) = add_fourth(&mut f, &mut spec);
    let src = v4(CLIENT4);
    let mut moved = 0;
    for sport in 42000..42100 {
        let h = hash::hash_5tuple(&src, sport, 9001, PROTO_TCP);
        let old = before[(h % RING) as usize];
        let out = forward_both(&mut f, &packet(AF_INET, sport, 9001, false));
        assert_eq!(
            hops(&out, AF_INET),
            (addr_of(&spec, old), None),
            "kept by the table"
        );
    }
    for sport in 43000..43100 {
        let h = hash::hash_5tuple(&src, sport, 9001, PROTO_TCP);
        let (cur, prev) = (after[(h % RING) as usize], before[(h % RING) as usize]);
        let want = (
            addr_of(&spec, cur),
            (cur != prev).then(|| addr_of(&spec, prev)),
        );
        for _ in 0..2 {
            let out = forward_both(&mut f, &packet(AF_INET, sport, 9001, false));
            assert_eq!(
                hops(&out, AF_INET),
                want,
                "unknown flow: both hops, every packet"
            );
        }
        moved += usize::from(cur != prev);
    }
    assert!(moved > 5, "{moved} unknown flows had two hops");
}

/// A GUE packet to `outer_dst` (the first hop) carrying `inner` (an IP
/// packet) and naming `hop` as the second hop, as the balancer sends it.
fn gue(outer_dst: std::net::IpAddr, hop: Option<std::net::IpAddr>, inner: &[u8]) -> Vec<u8> {
    use std::net::IpAddr;
    let (proto, data) = match hop {
        None => (0, vec![]),
        Some(IpAddr::V4(a)) => (2, [&GUE_HOP_TAG[..], &a.octets()].concat()),
        Some(IpAddr::V6(a)) => (5, [&GUE_HOP_TAG[..], &a.octets()].concat()),
    };
    let inner_proto = if outer_dst.is_ipv4() { 4 } else { 41 };
    let payload = [&[proto, inner_proto, 0, 0][..], &data, inner].concat();
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0x50, 1]);
    let b = match outer_dst {
        IpAddr::V4(d) => b.ipv4([198, 19, 0, 1], d.octets(), 64),
        IpAddr::V6(d) => b.ipv6(
            "2001:2:0:ff::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            d.octets(),
            64,
        ),
    }
    .udp(0xc001, lb_common::DEFAULT_GUE_PORT);
    let mut v = Vec::new();
    b.write(&mut v, &payload).expect("write");
    v
}

/// `out` is `plain` (the packet as the balancer would have sent it to the
/// second hop) as a first hop forwards it: the same outer addresses, UDP
/// ports and length, GUE without a hop, the same inner packet; TTL one
/// less, the IPv4 header checksum valid.
fn forwarded(out: &[u8], plain: &[u8], v4: bool) {
    let ip = if v4 { 20 } else { 40 };
    assert_eq!(out.len(), plain.len(), "the hop removed");
    assert_eq!(out[12..14], plain[12..14], "L2 type");
    assert_eq!(
        out[14 + ip..14 + ip + 6],
        plain[14 + ip..14 + ip + 6],
        "UDP ports, length"
    );
    assert_eq!(
        out[14 + ip + 8..],
        plain[14 + ip + 8..],
        "GUE without hop, inner"
    );
    if v4 {
        assert_eq!(
            out[14 + 12..14 + 20],
            plain[14 + 12..14 + 20],
            "outer addresses"
        );
        assert_eq!(out[14 + 2..14 + 4], plain[14 + 2..14 + 4], "total length");
        assert_eq!(out[14 + 8], 63, "TTL one less");
        assert_eq!(lb_tests::ones_sum(&out[14..34]), 0xffff, "IPv4 checksum");
    } else {
        assert_eq!(
            out[14 + 8..14 + 40],
            plain[14 + 8..14 + 40],
            "outer addresses"
        );
        assert_eq!(out[14 + 4..14 + 6], plain[14 + 4..14 + 6], "payload length");
        assert_eq!(out[14 + 7], 63, "hop limit one less");
    }
}

/// The backend host's decision, against this namespace's sockets: a packet
/// of an established connection is delivered here (its tunnel stripped);
/// one of no connection here (only a listener) is forwarded once, to the
/// second hop (straight there where the host forwards, else back to the L2
/// hop it came from), its hop removed, and the second hop delivers it; a
/// SYN and UDP are delivered here; a second hop with no route yet:
/// delivered here.
#[test]
fn the_backend_host_delivers_what_it_knows_and_forwards_the_rest_once() {
    use std::net::{IpAddr, TcpListener, TcpStream};
    lb_tests::Netns::sweep("second");
    let ns = lb_tests::Netns::new("second").expect("netns");
    for args in [
        &["addr", "add", "198.18.50.10/32", "dev", "lo"][..],
        &[
            "-6",
            "addr",
            "add",
            "2001:2:50::10/128",
            "dev",
            "lo",
            "nodad",
        ],
        // (No dummy interfaces in this kernel: a veth pair, both ends here.)
        &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        &["link", "set", "d1", "up"],
        &["link", "set", "d0", "up"],
        &["addr", "add", "198.18.51.1/24", "dev", "d0"],
        &["-6", "addr", "add", "2001:2:51::1/64", "dev", "d0", "nodad"],
        &[
            "neigh",
            "add",
            "198.18.51.2",
            "lladdr",
            "02:00:00:00:51:02",
            "dev",
            "d0",
            "nud",
            "permanent",
        ],
        &[
            "-6",
            "neigh",
            "add",
            "2001:2:51::2",
            "lladdr",
            "02:00:00:00:51:02",
            "dev",
            "d0",
            "nud",
            "permanent",
        ],
    ] {
        ns.exec("ip", args).expect("ip");
    }
    let mut f = Fixture::new().expect("load");
    let first: [IpAddr; 2] = [
        "198.18.51.1".parse().unwrap(),
        "2001:2:51::1".parse().unwrap(),
    ];
    let second: [IpAddr; 2] = [
        "198.18.51.2".parse().unwrap(),
        "2001:2:51::2".parse().unwrap(),
    ];
    for a in first.iter().chain(&second) {
        let k = match a {
            IpAddr::V4(a) => v4(a.octets()),
            IpAddr::V6(a) => v6(*a),
        };
        f.dp().add_decap_addr(k).expect("decap addr");
    }
    let vips: [IpAddr; 2] = [
        "198.18.50.10".parse().unwrap(),
        "2001:2:50::10".parse().unwrap(),
    ];
    ns.enter(|| {
        for i in 0..2 {
            let (vip, first, second) = (vips[i], first[i], second[i]);
            let listener = TcpListener::bind((vip, 8080)).expect("listen");
            let conn = TcpStream::connect((vip, 8080)).expect("connect");
            let _accepted = listener.accept().expect("accept");
            let client = conn.local_addr().expect("addr");
            let seg = |sport: u16, syn: bool| -> Vec<u8> {
                let b = etherparse::PacketBuilder::ethernet2([0; 6], [0; 6]);
                let b = match (client.ip(), vip) {
                    (IpAddr::V4(c), IpAddr::V4(v)) => b.ipv4(c.octets(), v.octets(), 64),
                    (IpAddr::V6(c), IpAddr::V6(v)) => b.ipv6(c.octets(), v.octets(), 64),
                    _ => unreachable!(),
                };
                let b = b.tcp(sport, 8080, 7, 65535);
                let b = if syn { b.syn() } else { b.ack(1) };
                let mut v = Vec::new();
                b.write(&mut v, if syn { &[] } else { b"data" })
                    .expect("write");
                v[14..].to_vec()
            };
            let decap = |f: &mut Fixture, pkt: &[u8]| {
                lb_tests::run(&mut f.ebpf, lb_common::PROG_DECAP, pkt).expect("decap")
            };
            // Established here: delivered, the tunnel stripped.
            let known = seg(client.port(), false);
            let r = decap(&mut f, &gue(first, Some(second), &known));
            assert_eq!(r.action, action::PASS, "{vip}: a connection here");
            assert_eq!(&r.out[14..], &known[..], "{vip}: exactly the inner packet");
            // A SYN: opens here.
            let syn = seg(client.port().wrapping_add(1000), true);
            let r = decap(&mut f, &gue(first, Some(second), &syn));
            assert_eq!(
                (r.action, &r.out[14..]),
                (action::PASS, &syn[..]),
                "{vip}: a SYN"
            );
            // No connection here (a listener only): to the second hop,
            // once. A host that does not forward (the default) sends it
            // back to the L2 hop it came from, which routes it on.
            let unknown = seg(client.port().wrapping_add(1000), false);
            let sent = gue(first, Some(second), &unknown);
            let plain = gue(second, None, &unknown);
            let r = decap(&mut f, &sent);
            assert_eq!(r.action, action::TX, "{vip}: back where it came from");
            assert_eq!(
                r.out[..12],
                [&sent[6..12], &sent[..6]].concat(),
                "MACs swapped"
            );
            forwarded(&r.out, &plain, vip.is_ipv4());
            // A host that forwards: straight to the hop (out of d0).
            let sysctl = |v: &str| {
                let fam = if vip.is_ipv4() { "ipv4" } else { "ipv6" };
                ns.exec(
                    "sysctl",
                    &["-qw", &format!("net.{fam}.conf.all.forwarding={v}")],
                )
                .expect("sysctl");
            };
            sysctl("1");
            // A hop whose MAC this host has not learnt: back where it came
            // from as well (XDP cannot resolve a neighbour).
            let stranger: IpAddr = if vip.is_ipv4() {
                "198.18.51.3".parse().unwrap()
            } else {
                "2001:2:51::3".parse().unwrap()
            };
            let r = decap(&mut f, &gue(first, Some(stranger), &unknown));
            assert_eq!(r.action, action::TX, "{vip}: no neighbour: back");
            forwarded(&r.out, &gue(stranger, None, &unknown), vip.is_ipv4());
            let r = decap(&mut f, &sent);
            sysctl("0");
            assert_eq!(r.action, action::REDIRECT, "{vip}: forwarded (out of d0)");
            assert_eq!(r.out[..6], [2, 0, 0, 0, 0x51, 2], "{vip}: to the hop's MAC");
            forwarded(&r.out, &plain, vip.is_ipv4());
            // The second hop delivers it, whatever it finds.
            let r = decap(&mut f, &r.out);
            assert_eq!(
                (r.action, &r.out[14..]),
                (action::PASS, &unknown[..]),
                "{vip}: last hop"
            );
            // No route to the second hop yet: delivered here.
            let nowhere: IpAddr = if vip.is_ipv4() {
                "198.18.99.9".parse().unwrap()
            } else {
                "2001:2:99::9".parse().unwrap()
            };
            sysctl("1");
            let r = decap(&mut f, &gue(first, Some(nowhere), &unknown));
            sysctl("0");
            assert_eq!(
                (r.action, &r.out[14..]),
                (action::PASS, &unknown[..]),
                "{vip}: unreachable"
            );
        }
        // UDP: delivered here.
        let udp = udp4([198, 18, 50, 20], [198, 18, 50, 10], 5000, 53, b"q")[14..].to_vec();
        let r = lb_tests::run(
            &mut f.ebpf,
            lb_common::PROG_DECAP,
            &gue(first[0], Some(second[0]), &udp),
        )
        .expect("decap");
        assert_eq!((r.action, &r.out[14..]), (action::PASS, &udp[..]), "UDP");
    })
    .expect("enter");
    let dv = f.dp().decap_verdicts().expect("counters");
    assert_eq!(
        dv,
        vec![7, 0, 0, 6, 2],
        "decapsulated (known, SYN, last hop; ×2 and UDP), second hop (back ×2, straight; ×2), \
         unreachable ×2"
    );
}

/// Issue 24's (d), in fixtures: a SYN flood larger than the connection
/// table (the flood guard off), then a ring change. A `gue` VIP with a
/// table and no second chance (the control) loses established flows to
/// the flood and moves some of them; the
/// same VIP without a table (the second chance alone) has nothing to
/// evict, and every established flow's packet still reaches its backend:
/// as the first hop, or named as the second.
#[test]
fn a_syn_flood_leaves_a_stateless_vips_connections_reachable() {
    const FLOWS: u16 = 1000;
    const FLOOD: u32 = 70_000; // above the fixture's 65,536 table slots
    let mut f = Fixture::new().expect("load");
    // The control: a table, no second chance.
    let mut table = vip(&mut f, AF_INET, 9100, 0, 0, true);
    let meta = f.dp().vip(&table.key).expect("meta");
    f.dp()
        .upsert_vip(
            &table.key,
            lb_common::VipMeta {
                flags: meta.flags & !VIP_F_SECOND_CHANCE,
                ..meta
            },
        )
        .expect("no second chance");
    let mut stateless = vip(&mut f, AF_INET, 9101, 1, 10, false);
    let client = |i: u16| ([198, 18, 30 + (i / 250) as u8, (i % 250) as u8], 40000 + i);
    let first = |f: &mut Fixture, port| -> Vec<[u8; 16]> {
        (0..FLOWS)
            .map(|i| {
                let (a, p) = client(i);
                hops(
                    &f.run(&tcp4(a, VIP4, p, port, b"")).expect("run").out,
                    AF_INET,
                )
                .0
            })
            .collect()
    };
    let before = [first(&mut f, 9100), first(&mut f, 9101)];
    f.dp().set_flood_limit(0).expect("guard off");
    for n in 0..FLOOD {
        let a = [198, 19, (n >> 8) as u8, n as u8];
        for port in [9100, 9101] {
            let r = f
                .run(&tcp4_syn(a, VIP4, 1024 + (n >> 16) as u16, port))
                .expect("flood");
            assert_eq!(r.action, action::TX, "a flood packet is still forwarded");
        }
    }
    add_fourth(&mut f, &mut table);
    add_fourth(&mut f, &mut stateless);
    let (mut table_moved, mut stateless_missed) = (0, 0);
    for i in 0..FLOWS {
        let (a, p) = client(i);
        let out = f.run(&tcp4(a, VIP4, p, 9100, b"")).expect("run").out;
        table_moved += usize::from(hops(&out, AF_INET).0 != before[0][i as usize]);
        let (dst, second) = hops(
            &f.run(&tcp4(a, VIP4, p, 9101, b"")).expect("run").out,
            AF_INET,
        );
        stateless_missed +=
            usize::from(dst != before[1][i as usize] && second != Some(before[1][i as usize]));
    }
    println!(
        "after {FLOOD} SYN sources and a ring change: table VIP {table_moved} of {FLOWS} flows \
         sent elsewhere; table-less VIP with the second chance {stateless_missed} not sent to \
         their backend"
    );
    assert_eq!(
        stateless_missed, 0,
        "every flow reaches its backend, first or second hop"
    );
    assert!(
        table_moved > 0,
        "the control: the flood evicted flows the ring change then moved"
    );
}

/// `lb trace` names the second hop: the traced balancer records it, and the
/// trace's explanation shows its address.
#[test]
fn a_trace_names_the_second_hop() {
    let mut f = Fixture::new().expect("load");
    let mut spec = vip(&mut f, AF_INET, 9200, 0, 0, false);
    let (before, after) = add_fourth(&mut f, &mut spec);
    let src = v4(CLIENT4);
    let slot = |sport| (hash::hash_5tuple(&src, sport, 9200, PROTO_TCP) % RING) as usize;
    let sport = (41000..42000u16)
        .find(|p| before[slot(*p)] != after[slot(*p)])
        .expect("a flow the change moved");
    let mut cfg: aya::maps::Array<_, lb_common::TraceCfg> =
        aya::maps::Array::try_from(f.ebpf.map_mut(lb_common::MAP_TRACE_CFG).expect("map"))
            .expect("array");
    cfg.set(
        0,
        lb_common::TraceCfg {
            owner_pid: std::process::id(),
            ..Default::default()
        },
        0,
    )
    .expect("tracing on");
    f.run(&packet(AF_INET, sport, 9200, false)).expect("run");
    let mut ring = aya::maps::RingBuf::try_from(f.ebpf.map_mut(lb_common::MAP_TRACE).expect("map"))
        .expect("ring");
    let item = ring.next().expect("a trace record");
    assert!(item.len() >= std::mem::size_of::<lb_common::TraceRecord>());
    // SAFETY: a record of the datapath's `TraceRecord` (plain integers),
    // the length checked.
    let r: lb_common::TraceRecord =
        unsafe { std::ptr::read_unaligned(item.as_ptr() as *const lb_common::TraceRecord) };
    drop(item);
    let e = lb_user::datapath::trace::explain(&r, r.ts_ns, |id| {
        spec.backends
            .iter()
            .find(|b| b.0 == id)
            .map(|b| std::net::IpAddr::from(<[u8; 4]>::try_from(&b.1[..4]).unwrap()))
    });
    println!("{e}");
    let prev = spec
        .backends
        .iter()
        .find(|b| b.0 == before[slot(sport)])
        .unwrap()
        .1;
    assert_eq!(e.rewrite, Some("gue"));
    assert_eq!(
        e.second_hop,
        Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&prev[..4]).unwrap()).to_string())
    );
}
