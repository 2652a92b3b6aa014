//! Packet fixtures for the balancer, Katran style: each case is a
//! description, an input packet built with etherparse, the expected action,
//! a check of the bytes that leave, and the verdict counter that must move.
//! All run through BPF_PROG_TEST_RUN on the real program.

use etherparse::{IpNumber, Ipv4Header, Ipv6Header, PacketBuilder};
use lb_common::{AF_INET, AF_INET6, PROTO_TCP, PROTO_UDP, VIP_F_IPIP, VipKey, verdict};
use lb_tests::{
    CLIENT_MAC, Fixture, LB_MAC, VipSpec, action, backend_mac, backend_of, tcp4, tcp6, udp4, udp6,
    v4, v6, vlan, with_ip_options,
};

const VIP4: [u8; 4] = [198, 18, 0, 100];
const CLIENT4: [u8; 4] = [198, 18, 1, 7];
const RING: u32 = 65537;

fn vip6() -> [u8; 16] {
    v6("2001:2::100".parse().unwrap())
}
fn client6() -> [u8; 16] {
    v6("2001:2:1::7".parse().unwrap())
}

fn vip4_key(port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: v4(VIP4),
        port,
        proto,
        family: AF_INET,
    }
}
fn vip6_key(port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: vip6(),
        port,
        proto,
        family: AF_INET6,
    }
}

fn backends4(n: u32) -> Vec<(u32, [u8; 16], u32)> {
    (1..=n).map(|i| (i, v4([198, 18, 2, i as u8]), 1)).collect()
}
fn backends6(n: u32, first_id: u32) -> Vec<(u32, [u8; 16], u32)> {
    (0..n)
        .map(|i| {
            (
                first_id + i,
                v6(format!("2001:2:2::{}", i + 1).parse().unwrap()),
                1,
            )
        })
        .collect()
}

/// A fixture with: IPv4 TCP :80 dsr, IPv4 UDP :53 ipip, IPv4 TCP :8080 ipip,
/// IPv6 TCP :80 dsr, IPv6 UDP :53 ipip, IPv6 TCP :8080 ipip, each over 3 backends.
fn standard() -> Fixture {
    let mut f = Fixture::new().expect("load");
    let specs = [
        (vip4_key(80, PROTO_TCP), 0, 0),
        (vip4_key(53, PROTO_UDP), 1, VIP_F_IPIP),
        (vip4_key(8080, PROTO_TCP), 2, VIP_F_IPIP),
        (vip4_key(5353, PROTO_UDP), 6, 0),
        (vip6_key(80, PROTO_TCP), 3, 0),
        (vip6_key(53, PROTO_UDP), 4, VIP_F_IPIP),
        (vip6_key(8080, PROTO_TCP), 5, VIP_F_IPIP),
        (vip6_key(5353, PROTO_UDP), 7, 0),
    ];
    for (key, id, flags) in specs {
        let backends = if key.family == AF_INET {
            backends4(3)
        } else {
            backends6(3, 11)
        };
        f.add_vip(&VipSpec {
            key,
            vip_id: id,
            flags,
            ring_size: RING,
            backends,
        })
        .expect("vip");
    }
    f
}

/// What a case expects of the bytes that leave.
enum Out {
    /// Byte-identical to the input.
    Same,
    /// Only the Ethernet addresses changed (to a backend, from LB_MAC).
    DsrRewrite,
    /// IPv4-in-IPv4 to one of the IPv4 backends; inner packet intact.
    Ipip4,
    /// IPv6-in-IPv6 to one of the IPv6 backends; inner packet intact.
    Ipip6,
    /// Not checked (dropped packets).
    Any,
}

struct Case {
    desc: &'static str,
    pkt: Vec<u8>,
    action: u32,
    out: Out,
    verdict: u32,
}

fn check_out(desc: &str, pkt: &[u8], out: &[u8], want: &Out) {
    match want {
        Out::Same => assert_eq!(out, pkt, "{desc}: bytes must be unchanged"),
        Out::Any => {}
        Out::DsrRewrite => {
            assert_eq!(out.len(), pkt.len(), "{desc}: length");
            let id = backend_of(out);
            assert_eq!(
                &out[0..6],
                &backend_mac(id),
                "{desc}: dst MAC is a backend's"
            );
            // ...and that backend is one of this VIP's (ids as `fixture` gives them).
            let ether_type = if pkt[12..14] == [0x81, 0x00] {
                &pkt[16..18]
            } else {
                &pkt[12..14]
            };
            let ids: &[u32] = if ether_type == [0x08, 0x00] {
                &[1, 2, 3]
            } else {
                &[11, 12, 13]
            };
            assert!(
                ids.contains(&id),
                "{desc}: backend {id} is one of the VIP's backends {ids:?}"
            );
            assert_eq!(&out[6..12], &LB_MAC, "{desc}: src MAC is ours");
            assert_eq!(
                &out[12..],
                &pkt[12..],
                "{desc}: everything after the MACs is unchanged"
            );
        }
        Out::Ipip4 => {
            assert_eq!(
                out.len(),
                pkt.len() + 20,
                "{desc}: grows by one IPv4 header"
            );
            assert_eq!(&out[6..12], &LB_MAC, "{desc}: src MAC");
            let (outer, rest) = Ipv4Header::from_slice(&out[14..]).expect("outer IPv4 header");
            assert_eq!(outer.protocol, IpNumber::IPV4, "{desc}: outer protocol 4");
            assert_eq!(
                outer.header_checksum,
                outer.calc_header_checksum(),
                "{desc}: outer checksum"
            );
            assert_eq!(
                outer.total_len as usize,
                pkt.len() - 14 + 20,
                "{desc}: outer total length"
            );
            let id = backend_of(out);
            assert_eq!(
                outer.destination,
                [198, 18, 2, id as u8],
                "{desc}: outer dst is the backend"
            );
            assert_eq!(
                &outer.source[..2],
                &[198, 19],
                "{desc}: outer src in the configured /16"
            );
            assert_eq!(rest, &pkt[14..], "{desc}: inner packet intact");
        }
        Out::Ipip6 => {
            assert_eq!(
                out.len(),
                pkt.len() + 40,
                "{desc}: grows by one IPv6 header"
            );
            let (outer, rest) = Ipv6Header::from_slice(&out[14..]).expect("outer IPv6 header");
            assert_eq!(outer.next_header, IpNumber::IPV6, "{desc}: next header 41");
            assert_eq!(
                outer.payload_length as usize,
                pkt.len() - 14,
                "{desc}: payload length"
            );
            let id = backend_of(out);
            let want: std::net::Ipv6Addr = format!("2001:2:2::{}", id - 10).parse().unwrap();
            assert_eq!(
                outer.destination,
                want.octets(),
                "{desc}: outer dst is the backend"
            );
            assert_eq!(
                &outer.source[..8],
                &[0x20, 0x01, 0, 2, 0, 0, 0, 0xff],
                "{desc}: outer src prefix"
            );
            assert_eq!(rest, &pkt[14..], "{desc}: inner packet intact");
        }
    }
}

fn run_cases(f: &mut Fixture, cases: Vec<Case>) {
    for c in cases {
        let before = f.verdicts().expect("counters");
        let r = f.run(&c.pkt).expect("test run");
        assert_ne!(r.action, action::ABORTED, "{}: aborted", c.desc);
        assert_eq!(r.action, c.action, "{}: action", c.desc);
        check_out(c.desc, &c.pkt, &r.out, &c.out);
        let after = f.verdicts().expect("counters");
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut want = vec![0u64; delta.len()];
        want[c.verdict as usize] = 1;
        assert_eq!(
            delta,
            want,
            "{}: exactly one `{}` verdict",
            c.desc,
            verdict::NAMES[c.verdict as usize]
        );
    }
}

fn case(desc: &'static str, pkt: Vec<u8>, action: u32, out: Out, verdict: u32) -> Case {
    Case {
        desc,
        pkt,
        action,
        out,
        verdict,
    }
}

#[test]
fn forwarding_fixtures() {
    let mut f = standard();
    let c6 = client6();
    let v6a = vip6();
    run_cases(
        &mut f,
        vec![
            case(
                "v4 tcp dsr",
                tcp4(CLIENT4, VIP4, 40000, 80, b"x"),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "v4 udp dsr",
                udp4(CLIENT4, VIP4, 40000, 5353, b"q"),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "v4 udp ipip",
                udp4(CLIENT4, VIP4, 40001, 53, b"q"),
                action::TX,
                Out::Ipip4,
                verdict::TX,
            ),
            case(
                "v4 tcp ipip",
                tcp4(CLIENT4, VIP4, 40002, 8080, b""),
                action::TX,
                Out::Ipip4,
                verdict::TX,
            ),
            case(
                "v6 tcp dsr",
                tcp6(c6, v6a, 40000, 80, b"x"),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "v6 udp dsr",
                udp6(c6, v6a, 40000, 5353, b"q"),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "v6 udp ipip",
                udp6(c6, v6a, 40001, 53, b"q"),
                action::TX,
                Out::Ipip6,
                verdict::TX,
            ),
            case(
                "v6 tcp ipip",
                tcp6(c6, v6a, 40002, 8080, b"hello"),
                action::TX,
                Out::Ipip6,
                verdict::TX,
            ),
            case(
                "non-VIP address",
                tcp4(CLIENT4, [198, 18, 0, 99], 1, 80, b""),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
            case(
                "VIP, wrong port",
                tcp4(CLIENT4, VIP4, 1, 81, b""),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
            case(
                "VIP, wrong protocol",
                udp4(CLIENT4, VIP4, 1, 80, b""),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
            case(
                "v6 non-VIP",
                tcp6(c6, client6(), 1, 80, b""),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
            case("ARP", arp(), action::PASS, Out::Same, verdict::PASS_NON_IP),
            case(
                "VLAN-tagged v4 tcp dsr",
                vlan(tcp4(CLIENT4, VIP4, 40003, 80, b"")),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "IPv4 with options",
                with_ip_options(tcp4(CLIENT4, VIP4, 40004, 80, b"o")),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "IPv6 hop-by-hop header",
                v6_hop_by_hop(),
                action::PASS,
                Out::Same,
                verdict::PASS_IPV6_EXT,
            ),
            case(
                "v4 fragment to VIP",
                fragment(true),
                action::DROP,
                Out::Any,
                verdict::FRAGMENT,
            ),
            case(
                "v4 fragment elsewhere",
                fragment(false),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
        ],
    );
}

#[test]
fn malformed_fixtures() {
    let mut f = standard();
    let good = tcp4(CLIENT4, VIP4, 40000, 80, b"");
    let mut cases = Vec::new();
    // Truncated at every length from the end of Ethernet to just short of
    // the full TCP header (BPF_PROG_TEST_RUN needs at least 14 bytes).
    for len in 14..good.len() {
        let mut p = good.clone();
        p.truncate(len);
        cases.push(case(
            "truncated v4",
            p,
            action::PASS,
            Out::Same,
            verdict::MALFORMED,
        ));
    }
    let good6 = tcp6(client6(), vip6(), 40000, 80, b"");
    for len in 14..good6.len() {
        let mut p = good6.clone();
        p.truncate(len);
        cases.push(case(
            "truncated v6",
            p,
            action::PASS,
            Out::Same,
            verdict::MALFORMED,
        ));
    }
    let tagged = vlan(good.clone());
    for len in 14..18 {
        let mut p = tagged.clone();
        p.truncate(len);
        cases.push(case(
            "truncated VLAN tag",
            p,
            action::PASS,
            Out::Same,
            verdict::MALFORMED,
        ));
    }
    // Transport header cut short, with an IP total length that agrees.
    let mut short_l4 = good.clone();
    short_l4.truncate(14 + 20 + 10);
    short_l4[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push(case(
        "TCP header cut, lengths consistent",
        short_l4,
        action::PASS,
        Out::Same,
        verdict::MALFORMED,
    ));
    let mut ver = good.clone();
    ver[14] = 0x65;
    cases.push(case(
        "IP version 6 in an IPv4 frame",
        ver,
        action::PASS,
        Out::Same,
        verdict::MALFORMED,
    ));
    let mut ihl = good.clone();
    ihl[14] = 0x44;
    cases.push(case(
        "IHL < 5",
        ihl,
        action::PASS,
        Out::Same,
        verdict::MALFORMED,
    ));
    let mut long = good.clone();
    long[16..18].copy_from_slice(&1500u16.to_be_bytes());
    cases.push(case(
        "total length beyond the frame",
        long,
        action::PASS,
        Out::Same,
        verdict::MALFORMED,
    ));
    run_cases(&mut f, cases);
}

#[test]
fn no_backend_and_no_neighbour() {
    let mut f = Fixture::new().expect("load");
    let key = vip4_key(80, PROTO_TCP);
    f.add_vip(&VipSpec {
        key,
        vip_id: 0,
        flags: 0,
        ring_size: 251,
        backends: vec![],
    })
    .expect("vip");
    let key2 = vip4_key(443, PROTO_TCP);
    f.add_vip(&VipSpec {
        key: key2,
        vip_id: 1,
        flags: 0,
        ring_size: 251,
        backends: backends4(1),
    })
    .expect("vip");
    let mut b = f.dp().backend(1).expect("backend");
    b.dst_mac = [0; 6];
    f.dp().set_backend(1, &b).expect("set");
    run_cases(
        &mut f,
        vec![
            case(
                "VIP with no backends",
                tcp4(CLIENT4, VIP4, 1, 80, b""),
                action::DROP,
                Out::Any,
                verdict::NO_BACKEND,
            ),
            case(
                "next hop unknown",
                tcp4(CLIENT4, VIP4, 1, 443, b""),
                action::PASS,
                Out::Same,
                verdict::NO_NEIGH,
            ),
        ],
    );
}

/// Established flows find their VIP by the id in their table entry. A VIP
/// removed and its id given to another VIP must not capture the old VIP's
/// flows: here the old address keeps a VIP of every port (ipip), which
/// takes them, not the new holder of the id (dsr, same port, another
/// address).
#[test]
fn an_established_flow_does_not_follow_its_vip_id_to_another_vip() {
    let mut f = Fixture::new().expect("load");
    let spec = |addr: [u8; 4], port: u16, id: u32, flags: u32| VipSpec {
        key: VipKey {
            addr: v4(addr),
            port,
            proto: PROTO_TCP,
            family: AF_INET,
        },
        vip_id: id,
        flags,
        ring_size: 251,
        backends: backends4(3),
    };
    f.add_vip(&spec(VIP4, 80, 0, 0)).expect("vip");
    f.add_vip(&spec(VIP4, 0, 1, VIP_F_IPIP))
        .expect("every port");
    let ack = tcp4(CLIENT4, VIP4, 40000, 80, b"x");
    for _ in 0..2 {
        let r = f.run(&ack).expect("run");
        assert_eq!((r.action, r.out.len()), (action::TX, ack.len()), "dsr");
    }
    f.dp()
        .remove_vip(&spec(VIP4, 80, 0, 0).key)
        .expect("remove");
    f.add_vip(&spec([198, 18, 0, 101], 80, 0, 0))
        .expect("another VIP, same id");
    let r = f.run(&ack).expect("run");
    assert_eq!(r.action, action::TX);
    assert_eq!(
        r.out.len(),
        ack.len() + 20,
        "the every-port VIP's (ipip), not the id's new VIP's (dsr)"
    );
}

/// Two VIPs that swap ids keep their entries under their new ids (where
/// established flows look them up): the first one's move must not clear the
/// slot the second still holds, nor the second's the slot the first took.
#[test]
fn vips_that_swap_ids_keep_their_entries_by_id() {
    let mut f = Fixture::new().expect("load");
    let spec = |port: u16, id: u32| VipSpec {
        key: vip4_key(port, PROTO_TCP),
        vip_id: id,
        flags: 0,
        ring_size: 251,
        backends: backends4(3),
    };
    f.add_vip(&spec(80, 1)).expect("vip");
    f.add_vip(&spec(443, 2)).expect("vip");
    f.add_vip(&spec(80, 2)).expect("80 takes id 2");
    f.add_vip(&spec(443, 1)).expect("443 takes id 1");
    let by_id: aya::maps::Array<_, lb_common::VipById> =
        aya::maps::Array::try_from(f.ebpf.map(lb_common::MAP_VIPS_BY_ID).expect("map"))
            .expect("array");
    let port_at = |id: u32| by_id.get(&id, 0).expect("slot").key.port;
    assert_eq!((port_at(1), port_at(2)), (443, 80));
}

/// A VIP's changed settings reach its established flows (they read the VIP
/// by id): a dsr VIP made ipip encapsulates the next packet of a flow.
#[test]
fn an_established_flow_sees_its_vip_change() {
    let mut f = Fixture::new().expect("load");
    let mut spec = VipSpec {
        key: vip4_key(80, PROTO_TCP),
        vip_id: 0,
        flags: 0,
        ring_size: 251,
        backends: backends4(3),
    };
    f.add_vip(&spec).expect("vip");
    let ack = tcp4(CLIENT4, VIP4, 40000, 80, b"x");
    let first = f.run(&ack).expect("run");
    assert_eq!((first.action, first.out.len()), (action::TX, ack.len()));
    spec.flags = VIP_F_IPIP;
    f.add_vip(&spec).expect("now ipip");
    let next = f.run(&ack).expect("run");
    assert_eq!(next.action, action::TX);
    assert_eq!(next.out.len(), ack.len() + 20, "encapsulated");
    assert_eq!(
        backend_of(&first.out),
        backend_of(&next.out),
        "on the same backend"
    );
}

/// The VIP directory at its fullest: as many VIPs as it is sized for, all
/// on one address (one key shape, so buckets collide and some VIPs live in
/// their second bucket), each found by its packets; a removed VIP is found
/// no more while its neighbours still are, and comes back when added again.
#[test]
fn a_full_vip_directory_finds_every_vip_and_forgets_removed_ones() {
    let max_vips = 16;
    let mut f = Fixture::with_options(&lb_user::datapath::loader::LoadOptions {
        flow_table_size: 4096,
        max_vips,
        ..Default::default()
    })
    .expect("load");
    // VIP i on port 1000 + i with one backend of its own, id i + 1.
    let spec = |i: u32| VipSpec {
        key: vip4_key(1000 + i as u16, PROTO_TCP),
        vip_id: i,
        flags: 0,
        ring_size: 251,
        backends: vec![(i + 1, v4([198, 18, 2, i as u8 + 1]), 1)],
    };
    for i in 0..max_vips {
        f.add_vip(&spec(i)).expect("vip");
    }
    let buckets = lb_common::vip_dir_buckets(max_vips);
    let in_second = (0..max_vips)
        .filter(|&i| {
            let k = spec(i).key;
            let tail = lb_common::hash::vip_key_tail(k.port, k.proto, k.family);
            let (first, _) = lb_common::hash::vip_dir_buckets(
                lb_common::hash::fold_addr(&k.addr),
                tail,
                buckets - 1,
            );
            let dir = f.dp().vip_dir_bucket(first).expect("bucket");
            !dir.slots.iter().any(|s| s.key == k)
        })
        .count();
    assert!(
        in_second > 0,
        "no VIP in its second bucket: the test must exercise both"
    );
    let check = |f: &mut Fixture, live: &dyn Fn(u32) -> bool| {
        for i in 0..max_vips {
            let r = f
                .run(&tcp4(CLIENT4, VIP4, 40000, 1000 + i as u16, b""))
                .expect("run");
            if live(i) {
                assert_eq!(r.action, action::TX, "VIP {i} forwards");
                assert_eq!(backend_of(&r.out), i + 1, "VIP {i} uses its own backend");
                assert_eq!(f.dp().vip_dir_id(&spec(i).key).expect("read"), Some(i));
            } else {
                assert_eq!(r.action, action::PASS, "removed VIP {i} passes");
                assert_eq!(f.dp().vip_dir_id(&spec(i).key).expect("read"), None);
            }
        }
    };
    check(&mut f, &|_| true);
    for i in (0..max_vips).step_by(2) {
        f.dp().remove_vip(&spec(i).key).expect("remove");
    }
    check(&mut f, &|i| i % 2 == 1);
    for i in (0..max_vips).step_by(2) {
        f.add_vip(&spec(i)).expect("vip again");
    }
    check(&mut f, &|_| true);
}

/// An agent stopped between writing a VIP and its directory slot left the
/// VIP unreachable: the next agent's first look at the record (the facade's
/// mirror) puts the slot back.
#[test]
fn a_vip_missing_from_the_directory_is_put_back_when_the_record_is_read() {
    let mut f = Fixture::new().expect("load");
    let spec = VipSpec {
        key: vip4_key(80, PROTO_TCP),
        vip_id: 3,
        flags: 0,
        ring_size: 251,
        backends: backends4(2),
    };
    f.add_vip(&spec).expect("vip");
    let syn = tcp4(CLIENT4, VIP4, 40000, 80, b"");
    assert_eq!(f.run(&syn).expect("run").action, action::TX);
    // Clear the VIP's slot behind the facade's back.
    {
        let mut dir: aya::maps::Array<_, lb_common::VipDirBucket> =
            aya::maps::Array::try_from(f.ebpf.map_mut(lb_common::MAP_VIP_DIR).expect("map"))
                .expect("array");
        for b in 0..dir.len() {
            let mut bucket = dir.get(&b, 0).expect("bucket");
            if let Some(s) = bucket.slots.iter_mut().find(|s| s.key == spec.key) {
                *s = lb_common::VipDirSlot::default();
                dir.set(b, bucket, 0).expect("clear");
            }
        }
    }
    // A new flow (an established one finds its VIP through its entry).
    let other = tcp4(CLIENT4, VIP4, 40001, 80, b"");
    let r = f.run(&other).expect("run");
    assert_eq!(r.action, action::PASS, "no slot, no VIP");
    f.dp().list_vips().expect("read the record");
    assert_eq!(f.dp().vip_dir_id(&spec.key).expect("read"), Some(3));
    let r = f.run(&other).expect("run");
    assert_eq!(r.action, action::TX, "the slot is back");
}

#[test]
fn port_zero_vip_matches_every_port() {
    let mut f = Fixture::new().expect("load");
    let key = vip4_key(0, PROTO_TCP);
    f.add_vip(&VipSpec {
        key,
        vip_id: 0,
        flags: 0,
        ring_size: 251,
        backends: backends4(2),
    })
    .expect("vip");
    run_cases(
        &mut f,
        vec![
            case(
                "any port 80",
                tcp4(CLIENT4, VIP4, 1, 80, b""),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "any port 9999",
                tcp4(CLIENT4, VIP4, 1, 9999, b""),
                action::TX,
                Out::DsrRewrite,
                verdict::TX,
            ),
            case(
                "but not UDP",
                udp4(CLIENT4, VIP4, 1, 80, b""),
                action::PASS,
                Out::Same,
                verdict::PASS_NON_VIP,
            ),
        ],
    );
}

#[test]
fn icmp_frag_needed_follows_its_flow() {
    let mut f = standard();
    for sport in 41000..41020u16 {
        // The client's flow first, then a router's "fragmentation needed"
        // about the backend's reply (VIP → client), sent to the VIP.
        let syn = f.run(&tcp4(CLIENT4, VIP4, sport, 80, b"")).expect("run");
        let want = backend_of(&syn.out);
        let err = f
            .run(&icmp4_frag_needed([198, 18, 9, 1], sport))
            .expect("run");
        assert_eq!(err.action, action::TX, "ICMP error forwarded");
        assert_eq!(
            backend_of(&err.out),
            want,
            "ICMP error for port {sport} goes to its flow's backend"
        );

        let syn6 = f
            .run(&tcp6(client6(), vip6(), sport, 80, b""))
            .expect("run");
        let err6 = f.run(&icmp6_too_big(sport)).expect("run");
        assert_eq!(err6.action, action::TX, "ICMPv6 error forwarded");
        assert_eq!(
            backend_of(&err6.out),
            backend_of(&syn6.out),
            "ICMPv6 too-big follows its flow"
        );
    }
    let v = f.verdicts().expect("counters");
    assert_eq!(v[verdict::ICMP_TO_FLOW as usize], 40);
}

#[test]
fn decap_restores_the_original_packet() {
    let mut f = standard();
    for addr in backends4(3).iter().chain(&backends6(3, 11)).map(|b| b.1) {
        f.dp().add_decap_addr(addr).expect("decap addr");
    }
    for pkt in [
        tcp4(CLIENT4, VIP4, 40010, 8080, b"payload"),
        udp4(CLIENT4, VIP4, 40011, 53, b"dns?"),
        tcp6(client6(), vip6(), 40012, 8080, b"payload6"),
        vlan(tcp4(CLIENT4, VIP4, 40013, 8080, b"tagged")),
    ] {
        let enc = f.run(&pkt).expect("encap");
        assert_eq!(enc.action, action::TX);
        assert!(enc.out.len() > pkt.len(), "encapsulated");
        let dec = lb_tests::run(&mut f.ebpf, lb_common::PROG_DECAP, &enc.out).expect("decap");
        assert_eq!(dec.action, action::PASS);
        assert_eq!(
            dec.out.len(),
            pkt.len(),
            "decap removes exactly the outer header"
        );
        assert_eq!(
            &dec.out[12..],
            &pkt[12..],
            "everything after the MACs is the original packet"
        );
    }
    // Not for us: an IPIP packet to another address passes untouched.
    let enc = f
        .run(&tcp4(CLIENT4, VIP4, 40020, 8080, b""))
        .expect("encap");
    let mut other = enc.out.clone();
    other[14 + 16..14 + 20].copy_from_slice(&[198, 18, 3, 3]);
    decap_passes_untouched(&mut f, &other, "another address");
    // A fragment of a tunnelled packet (first: MF set; later: an offset)
    // passes untouched, for the kernel to reassemble.
    for frags in [0x2000u16, 0x0010] {
        let mut frag = enc.out.clone();
        frag[14 + 6..14 + 8].copy_from_slice(&frags.to_be_bytes());
        let frag = with_ipv4_checksum(frag);
        decap_passes_untouched(&mut f, &frag, &format!("fragment {frags:#06x}"));
    }
    let dv = f.dp().decap_verdicts().expect("decap counters");
    assert_eq!(
        dv,
        vec![4, 3, 0, 0, 0],
        "decapsulated, passed, malformed, no second hop"
    );
}

/// `gue` VIPs: the packet leaves inside outer IP, UDP to the GUE port (the
/// source port from the flow hash) and a version-0 GUE header, in both
/// families, and `lb_decap` gives back exactly the original; UDP to
/// another port is not a tunnel and passes untouched.
#[test]
fn gue_encapsulates_and_decap_restores_the_original() {
    let mut f = standard();
    for (key, id) in [
        (vip4_key(9090, PROTO_TCP), 8),
        (vip6_key(9090, PROTO_TCP), 9),
    ] {
        let backends = if key.family == AF_INET {
            backends4(3)
        } else {
            backends6(3, 11)
        };
        f.add_vip(&VipSpec {
            key,
            vip_id: id,
            flags: VIP_F_IPIP | lb_common::VIP_F_GUE,
            ring_size: RING,
            backends,
        })
        .expect("vip");
    }
    for addr in backends4(3).iter().chain(&backends6(3, 11)).map(|b| b.1) {
        f.dp().add_decap_addr(addr).expect("decap addr");
    }
    let port = lb_common::DEFAULT_GUE_PORT.to_be_bytes();
    for (pkt, l3, ip_len, proto_at, inner) in [
        (
            tcp4(CLIENT4, VIP4, 40030, 9090, b"gue4"),
            14,
            20,
            14 + 9,
            4u8,
        ),
        (
            tcp6(client6(), vip6(), 40031, 9090, b"gue6"),
            14,
            40,
            14 + 6,
            41u8,
        ),
    ] {
        let enc = f.run(&pkt).expect("encap");
        assert_eq!(enc.action, action::TX);
        let o = &enc.out;
        assert_eq!(o.len(), pkt.len() + ip_len + 12, "outer IP, UDP and GUE");
        assert_eq!(o[proto_at], 17, "the outer header carries UDP");
        let udp = l3 + ip_len;
        assert_eq!(&o[udp + 2..udp + 4], &port, "to the GUE port");
        assert!(o[udp] & 0xc0 == 0xc0, "source port from the flow hash");
        assert_eq!(
            u16::from_be_bytes([o[udp + 4], o[udp + 5]]) as usize,
            pkt.len() - 14 + 12,
            "UDP length"
        );
        assert_eq!(&o[udp + 8..udp + 12], &[0, inner, 0, 0], "GUE header");
        assert_eq!(&o[udp + 12..], &pkt[14..], "the client's packet inside");
        let dec = lb_tests::run(&mut f.ebpf, lb_common::PROG_DECAP, o).expect("decap");
        assert_eq!(dec.action, action::PASS);
        assert_eq!(&dec.out[12..], &pkt[12..], "decap restores the original");
        let mut other = o.clone();
        other[udp + 3] ^= 1;
        decap_passes_untouched(&mut f, &other, "another UDP port");
    }
    let dv = f.dp().decap_verdicts().expect("decap counters");
    assert_eq!(dv[0], 2, "two decapsulated");
}

// ---- packet builders for the odd cases ----

fn arp() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x06]);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&CLIENT4);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&VIP4);
    p
}

fn v6_hop_by_hop() -> Vec<u8> {
    let p = tcp6(client6(), vip6(), 40000, 80, b"");
    let mut o = p[..14].to_vec();
    let mut ip = p[14..54].to_vec();
    ip[6] = 0; // next header: hop-by-hop options
    let plen = u16::from_be_bytes([ip[4], ip[5]]) + 8;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    o.extend_from_slice(&ip);
    o.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next: TCP, PadN
    o.extend_from_slice(&p[54..]);
    o
}

/// A first fragment (MF set) of a UDP datagram to the VIP or elsewhere.
fn fragment(to_vip: bool) -> Vec<u8> {
    let dst = if to_vip { VIP4 } else { [198, 18, 0, 99] };
    let mut p = udp4(CLIENT4, dst, 40000, 53, &[0u8; 64]);
    p[20] |= 0x20; // MF
    let (mut h, _) = Ipv4Header::from_slice(&p[14..]).expect("ipv4");
    h.header_checksum = h.calc_header_checksum();
    let mut hb = Vec::new();
    h.write(&mut hb).expect("write");
    p[14..34].copy_from_slice(&hb);
    p
}

/// ICMP "fragmentation needed" from a router to the VIP, quoting the
/// backend's reply VIP:80 → client:`client_port`.
fn icmp4_frag_needed(router: [u8; 4], client_port: u16) -> Vec<u8> {
    let quoted = {
        let b = PacketBuilder::ipv4(VIP4, CLIENT4, 64).tcp(80, client_port, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("write");
        v.truncate(28);
        v
    };
    let b = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x09], LB_MAC)
        .ipv4(router, VIP4, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut v = Vec::new();
    b.write(&mut v, &quoted).expect("write");
    v
}

fn icmp6_too_big(client_port: u16) -> Vec<u8> {
    let quoted = {
        let b = PacketBuilder::ipv6(vip6(), client6(), 64).tcp(80, client_port, 1, 1000);
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("write");
        v.truncate(48);
        v
    };
    let router = v6("2001:2:9::1".parse().unwrap());
    let b = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x09], LB_MAC)
        .ipv6(router, vip6(), 64)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 });
    let mut v = Vec::new();
    b.write(&mut v, &quoted).expect("write");
    v
}

/// Runs the balancer on `pkt` with `meta` bytes of XDP metadata in front of
/// it (see `lb_tests::run_with_headroom_taken`).
fn run_with_headroom_taken(f: &mut Fixture, pkt: &[u8], meta: u32) -> lb_tests::Run {
    let p = lb_tests::loader::xdp_program(&mut f.ebpf, lb_common::PROG_BALANCER).expect("prog");
    lb_tests::run_with_headroom_taken(p, pkt, meta, 1).expect("test run")
}

/// A rare drop (here `encap_failed`) is logged by the datapath: one event
/// per packet while under the rate limit, with the client, the
/// destination, the protocol and the backend the flow was given; a
/// forwarded packet logs nothing.
#[test]
fn a_rare_drop_is_logged_with_its_flow_and_backend() {
    use lb_user::datapath::drop_log::DropLog;
    let mut f = standard();
    let mut log = DropLog::take(&mut f.ebpf).expect("drop log");
    for (pkt, client, dst) in [
        (
            udp4(CLIENT4, VIP4, 40001, 53, b"q"),
            "198.18.1.7:40001",
            "198.18.0.100:53",
        ),
        (
            udp6(client6(), vip6(), 40002, 53, b"q"),
            "[2001:2:1::7]:40002",
            "[2001:2::100]:53",
        ),
    ] {
        let r = run_with_headroom_taken(&mut f, &pkt, 200);
        assert_eq!(r.action, action::DROP);
        let got = log.read();
        assert_eq!(got.len(), 1, "one event per drop: {got:?}");
        let e = got[0].clone().expect("an event of the drop log's format");
        assert_eq!(e.reason, "encap_failed");
        assert_eq!(e.client.to_string(), client);
        assert_eq!(e.dst.to_string(), dst);
        assert_eq!(e.proto, PROTO_UDP);
        assert_eq!(e.suppressed, 0);
        // The backend the same packet is given once it fits.
        let ok = run_with_headroom_taken(&mut f, &pkt, 0);
        assert_eq!(ok.action, action::TX);
        assert_eq!(
            backend_of(&ok.out),
            e.backend_id,
            "the event names the backend chosen"
        );
        assert!(log.read().is_empty(), "a forwarded packet logs nothing");
    }
}

/// An `ipip` packet with too little headroom for the outer header (200
/// bytes of metadata leave 56; the kernel keeps 40 for its frame header):
/// dropped as `encap_failed`, counted once, and no flow recorded; the same
/// packet with the usual headroom is encapsulated.
#[test]
fn ipip_without_headroom_is_encap_failed_and_records_nothing() {
    let mut f = standard();
    for (pkt, key) in [
        (
            udp4(CLIENT4, VIP4, 40001, 53, b"q"),
            lb_common::FlowKey {
                src: v4(CLIENT4),
                dst: v4(VIP4),
                sport: 40001,
                dport: 53,
                proto: PROTO_UDP,
                _pad: 0,
                _pad2: 0,
            },
        ),
        (
            udp6(client6(), vip6(), 40001, 53, b"q"),
            lb_common::FlowKey {
                src: client6(),
                dst: vip6(),
                sport: 40001,
                dport: 53,
                proto: PROTO_UDP,
                _pad: 0,
                _pad2: 0,
            },
        ),
    ] {
        let before = f.verdicts().expect("verdicts");
        let r = run_with_headroom_taken(&mut f, &pkt, 200);
        let after = f.verdicts().expect("verdicts");
        assert_eq!(r.action, action::DROP);
        assert_eq!(
            lb_tests::moved_verdicts(&before, &after),
            [(verdict::ENCAP_FAILED as usize, 1)],
            "exactly one encap_failed"
        );
        assert!(
            f.dp().flow(&key).expect("lookup").is_none(),
            "a packet that could not be sent leaves no flow"
        );
        let ok = run_with_headroom_taken(&mut f, &pkt, 0);
        assert_eq!(ok.action, action::TX, "with headroom it is encapsulated");
        assert_eq!(
            ok.out.len(),
            pkt.len() + if key.src == client6() { 40 } else { 20 }
        );
        assert!(f.dp().flow(&key).expect("lookup").is_some());
    }
}

/// Ring ranges never overlap, whether the facade allocating them is the one
/// that wrote the others or a new one reading a programmed datapath (the
/// agent after a restart); a removed VIP's range is reused.
#[test]
fn ring_ranges_never_overlap_and_are_reused() {
    let mut f = Fixture::new().expect("load");
    let spec = |port: u16, vip_id: u32, ring_size: u32| VipSpec {
        key: vip4_key(port, PROTO_TCP),
        vip_id,
        flags: 0,
        ring_size,
        backends: backends4(3),
    };
    // Each add_vip and set_ring opens a new facade on the object.
    for (i, size) in [(0u32, 251u32), (1, 1021), (2, 251)] {
        f.add_vip(&spec(80 + i as u16, i, size)).expect("vip");
    }
    let mut dp = f.dp();
    let ranges = |dp: &mut lb_user::datapath::Dataplane<&mut aya::Ebpf>| {
        let mut r: Vec<(u32, u32)> = dp
            .list_vips()
            .expect("vips")
            .into_iter()
            .map(|(_, m)| (m.ring_offset, 2 * m.ring_size))
            .collect();
        if let Some(m) = dp.region(0, v4([198, 18, 1, 0]), 24).expect("region") {
            r.push((m.ring_offset, 2 * m.ring_size));
        }
        r.sort_unstable();
        for w in r.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {r:?}");
        }
        r
    };
    assert_eq!(ranges(&mut dp), vec![(0, 502), (502, 2042), (2544, 502)]);

    // One long-lived facade: VIP 1 goes, a region ring of its size takes
    // its place (first fit), a new VIP comes after the others.
    dp.remove_vip(&vip4_key(81, PROTO_TCP)).expect("remove");
    let table = vec![1u32; 1021];
    dp.install_region_ring(0, &[(v4([198, 18, 1, 0]), 24)], 9, &table, 0, None)
        .expect("region ring");
    dp.upsert_vip(
        &vip4_key(90, PROTO_TCP),
        lb_common::VipMeta {
            vip_id: 3,
            ..Default::default()
        },
    )
    .expect("vip");
    dp.install_ring(&vip4_key(90, PROTO_TCP), &vec![1u32; 251])
        .expect("ring");
    let got = ranges(&mut dp);
    assert_eq!(got, vec![(0, 502), (502, 2042), (2544, 502), (3046, 502)]);
    // And a fresh facade sees the same space taken.
    drop(dp);
    let mut dp = f.dp();
    dp.upsert_vip(
        &vip4_key(91, PROTO_TCP),
        lb_common::VipMeta {
            vip_id: 4,
            ..Default::default()
        },
    )
    .expect("vip");
    dp.install_ring(&vip4_key(91, PROTO_TCP), &[1u32; 7])
        .expect("ring");
    assert_eq!(ranges(&mut dp).last(), Some(&(3548, 14)));
}

/// Sets `agent.ipip_mtu` in the fixture's settings.
fn set_ipip_mtu(f: &mut Fixture, mtu: u16) {
    f.dp()
        .set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().unwrap()),
            ipip_mtu: mtu,
            ..Default::default()
        })
        .expect("settings");
}

/// Sets DF on an Ethernet/IPv4 frame and fixes its header checksum.
fn with_df(p: Vec<u8>) -> Vec<u8> {
    set_df(p, true)
}

/// `lb_decap` lets `pkt` through (`XDP_PASS`) byte for byte.
fn decap_passes_untouched(f: &mut Fixture, pkt: &[u8], what: &str) {
    let dec = lb_tests::run(&mut f.ebpf, lb_common::PROG_DECAP, pkt).expect("decap");
    assert_eq!((dec.action, &dec.out[..]), (action::PASS, pkt), "{what}");
}

/// Sets or clears DF on an Ethernet/IPv4 frame, fixing its header checksum.
fn set_df(mut p: Vec<u8>, on: bool) -> Vec<u8> {
    if on {
        p[14 + 6] |= 0x40;
    } else {
        p[14 + 6] &= !0x40;
    }
    with_ipv4_checksum(p)
}

/// The Ethernet/IPv4 frame with its IPv4 header checksum computed again.
fn with_ipv4_checksum(mut p: Vec<u8>) -> Vec<u8> {
    p[14 + 10] = 0;
    p[14 + 11] = 0;
    let h = Ipv4Header::from_slice(&p[14..]).expect("ipv4").0;
    let c = h.calc_header_checksum().to_be_bytes();
    p[14 + 10] = c[0];
    p[14 + 11] = c[1];
    p
}

/// An `ipip` packet too big for `agent.ipip_mtu` once encapsulated comes
/// back to the client as ICMP "fragmentation needed" / ICMPv6 "packet too
/// big" (from the VIP, quoting the packet, checksums right, the inner MTU
/// that fits), counted as `too_big`; IPv4 without DF is dropped; a packet
/// that fits is encapsulated as before.
#[test]
fn ipip_too_big_for_the_path_answers_with_icmp() {
    let mut f = standard();
    set_ipip_mtu(&mut f, 1280);
    let count = |f: &mut Fixture| f.verdicts().expect("verdicts")[verdict::TOO_BIG as usize];

    // IPv4: 20 + 20 + 1300 = 1340 bytes > 1280 - 20.
    let big4 = with_df(tcp4(CLIENT4, VIP4, 40000, 8080, &[7; 1300]));
    let before = count(&mut f);
    let r = f.run(&big4).expect("run");
    assert_eq!(r.action, action::TX, "IPv4 too big: ICMP back");
    assert_eq!(count(&mut f), before + 1);
    assert_eq!((&r.out[..6], &r.out[6..12]), (&CLIENT_MAC[..], &LB_MAC[..]));
    let (ip, rest) = Ipv4Header::from_slice(&r.out[14..]).expect("ipv4");
    assert_eq!((ip.source, ip.destination), (VIP4, CLIENT4));
    assert_eq!(ip.protocol, IpNumber::ICMP);
    assert_eq!(ip.calc_header_checksum(), ip.header_checksum);
    assert_eq!(usize::from(ip.total_len), 20 + 8 + 28);
    assert_eq!(
        &rest[..2],
        &[3, 4],
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(u16::from_be_bytes([rest[6], rest[7]]), 1260, "next-hop MTU");
    assert_eq!(lb_tests::ones_sum(&rest[..36]), 0xffff, "ICMP checksum");
    assert_eq!(
        &rest[8..36],
        &big4[14..42],
        "quotes the IP header and 8 bytes"
    );

    // Without DF it may not be answered (the client would not expect it).
    let before = count(&mut f);
    let r = f
        .run(&set_df(tcp4(CLIENT4, VIP4, 40001, 8080, &[7; 1300]), false))
        .expect("run");
    assert_eq!(r.action, action::DROP, "IPv4 without DF: dropped");
    assert_eq!(count(&mut f), before + 1, "and counted");

    // IPv6: 40 + 20 + 1300 > 1280 - 40.
    let big6 = tcp6(client6(), vip6(), 40000, 8080, &[7; 1300]);
    let before = count(&mut f);
    let r = f.run(&big6).expect("run");
    assert_eq!(r.action, action::TX, "IPv6 too big: ICMPv6 back");
    assert_eq!(count(&mut f), before + 1);
    let (ip, rest) = Ipv6Header::from_slice(&r.out[14..]).expect("ipv6");
    assert_eq!((ip.source, ip.destination), (vip6(), client6()));
    assert_eq!(ip.next_header, IpNumber::IPV6_ICMP);
    assert_eq!(usize::from(ip.payload_length), 8 + 48);
    assert_eq!(&rest[..2], &[2, 0], "packet too big");
    assert_eq!(
        u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
        1240,
        "MTU"
    );
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip.source);
    pseudo.extend_from_slice(&ip.destination);
    pseudo.extend_from_slice(&(56u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&rest[..56]);
    assert_eq!(lb_tests::ones_sum(&pseudo), 0xffff, "ICMPv6 checksum");
    assert_eq!(&rest[8..56], &big6[14..62]);

    // A packet that fits is encapsulated as ever.
    let r = f
        .run(&with_df(tcp4(CLIENT4, VIP4, 40002, 8080, &[7; 1200])))
        .expect("run");
    assert_eq!(r.action, action::TX);
    assert_eq!(r.out[14 + 9], 4, "IPIP");
}
