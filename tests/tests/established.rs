//! The established path (`lb-ebpf/src/fast.rs`) answers every packet as the
//! staged balancer does. `lb_xdp` runs it first; `lb_xdp_traced` (what
//! `lb trace` runs) is the staged balancer alone. Each case records a flow,
//! then sends the same packet through both programs, in turn, and compares
//! the action, every byte that leaves and the verdict counted, over every
//! shape the established path takes (IPv4 and IPv6, TCP and UDP, dsr, ipip
//! and gue, an idle timeout, an every-port VIP, VIPs without a connection
//! table with Maglev, source-ip hashing and least connections) and the
//! ones it must hand
//! back (a FIN, a SYN, a flow still opening, a backend down, an idle flow
//! past its timeout, a VLAN tag, IP options, a packet too big to
//! encapsulate, a full-NAT VIP).

use lb_common::{
    AF_INET, AF_INET6, BACKEND_DOWN, BACKEND_UP, PROTO_TCP, PROTO_UDP, SCHED_LEAST_CONN, VIP_F_GUE,
    VIP_F_HASH_SRC_IP, VIP_F_IPIP, VIP_F_NAT, VIP_F_NO_FLOW_TABLE, VipKey, VipMeta,
};
use lb_tests::{
    Fixture, VipSpec, action, tcp4, tcp4_fin, tcp4_syn, tcp6, udp4, udp6, v4, v6, vlan,
    with_ip_options,
};

const VIP4: [u8; 4] = [198, 18, 0, 100];
const CLIENT4: [u8; 4] = [198, 18, 1, 7];

fn vip6() -> [u8; 16] {
    v6("2001:2::100".parse().expect("literal"))
}
fn client6() -> [u8; 16] {
    v6("2001:2:1::7".parse().expect("literal"))
}

fn key(family: u8, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: if family == AF_INET { v4(VIP4) } else { vip6() },
        port,
        proto,
        family,
    }
}

const TCP: u8 = PROTO_TCP;
const UDP: u8 = PROTO_UDP;

/// Every VIP a case uses, three backends each (ids by family).
fn fixture() -> Fixture {
    let mut f = Fixture::new().expect("load");
    // (key, vip id, flags, idle timeout in seconds); the last four keep no
    // connection table (their packets are scheduled every time).
    let nt = VIP_F_NO_FLOW_TABLE;
    let vips: [(VipKey, u32, u32, u32); 16] = [
        (key(AF_INET, 80, TCP), 0, 0, 0),
        (key(AF_INET, 53, UDP), 1, 0, 0),
        (key(AF_INET, 8080, TCP), 2, VIP_F_IPIP, 0),
        (key(AF_INET, 8081, TCP), 3, VIP_F_IPIP | VIP_F_GUE, 0),
        (key(AF_INET, 81, TCP), 4, 0, 300),
        (key(AF_INET, 82, TCP), 5, 0, 1),
        (key(AF_INET, 0, UDP), 6, 0, 0),
        (key(AF_INET6, 80, TCP), 7, 0, 0),
        (key(AF_INET6, 53, UDP), 8, VIP_F_IPIP, 0),
        (key(AF_INET6, 8080, TCP), 9, VIP_F_IPIP, 0),
        (key(AF_INET6, 8081, TCP), 10, VIP_F_IPIP | VIP_F_GUE, 0),
        (key(AF_INET, 83, TCP), 11, VIP_F_NAT, 0),
        (key(AF_INET, 90, TCP), 12, nt, 0),
        (key(AF_INET, 91, TCP), 13, nt | VIP_F_HASH_SRC_IP, 0),
        (key(AF_INET, 92, TCP), 14, nt, 0),
        (key(AF_INET6, 90, UDP), 15, nt | VIP_F_IPIP, 0),
    ];
    for (k, vip_id, flags, idle) in vips {
        let backends = (1..=3u32)
            .map(|i| {
                let (id, addr) = if k.family == AF_INET {
                    (i, v4([198, 18, 2, i as u8]))
                } else {
                    (
                        10 + i,
                        v6(format!("2001:2:2::{i}").parse().expect("literal")),
                    )
                };
                (id, addr, 1)
            })
            .collect();
        f.add_vip(&VipSpec {
            key: k,
            vip_id,
            flags,
            ring_size: 251,
            backends,
        })
        .expect("vip");
        // VIP 14 schedules by least connections (two candidates from its
        // ring of 251).
        let scheduler = if vip_id == 14 { SCHED_LEAST_CONN } else { 0 };
        if idle != 0 || scheduler != 0 {
            let meta = f.dp().vip(&k).expect("meta");
            f.dp()
                .upsert_vip(
                    &k,
                    VipMeta {
                        idle_timeout_s: idle,
                        scheduler,
                        ..meta
                    },
                )
                .expect("idle timeout, scheduler");
        }
    }
    f
}

/// What one program answered.
#[derive(Debug, PartialEq)]
struct Answer {
    action: u32,
    out: Vec<u8>,
    /// The verdict counters that moved: (reason, by how much).
    verdicts: Vec<(usize, u64)>,
}

fn answer(f: &mut Fixture, prog: &str, pkt: &[u8]) -> Answer {
    let before = f.verdicts().expect("counters");
    let r = lb_tests::run(&mut f.ebpf, prog, pkt).expect("run");
    let after = f.verdicts().expect("counters");
    Answer {
        action: r.action,
        out: r.out,
        verdicts: lb_tests::moved_verdicts(&before, &after),
    }
}

/// Sends `pkt` through the balancer (`lb_xdp`: the established path first)
/// and through the staged balancer alone (`lb_xdp_traced`), `rounds` times
/// each, alternating, and checks every pair of answers is the same.
fn same_answers(f: &mut Fixture, desc: &str, pkt: &[u8], rounds: usize) -> Answer {
    let mut last = None;
    for _ in 0..rounds {
        let fast = answer(f, lb_common::PROG_BALANCER, pkt);
        let staged = answer(f, lb_common::PROG_BALANCER_TRACED, pkt);
        assert_eq!(
            fast, staged,
            "{desc}: lb_xdp and the staged balancer differ"
        );
        last = Some(fast);
    }
    last.expect("one round at least")
}

#[test]
fn the_established_path_answers_as_the_staged_balancer() {
    let mut f = fixture();
    let payload = [0x42u8; 100];
    let p = &payload[..];
    type Make<'a> = Box<dyn Fn(u16) -> Vec<u8> + 'a>;
    let (c4, v6a, c6) = (CLIENT4, vip6(), client6());
    let cases: Vec<(&str, Make)> = vec![
        ("IPv4 TCP dsr", Box::new(|sp| tcp4(c4, VIP4, sp, 80, p))),
        ("IPv4 UDP dsr", Box::new(|sp| udp4(c4, VIP4, sp, 53, p))),
        ("IPv4 TCP ipip", Box::new(|sp| tcp4(c4, VIP4, sp, 8080, p))),
        ("IPv4 TCP gue", Box::new(|sp| tcp4(c4, VIP4, sp, 8081, p))),
        (
            "IPv4 idle timeout",
            Box::new(|sp| tcp4(c4, VIP4, sp, 81, p)),
        ),
        (
            "IPv4 every-port UDP VIP",
            Box::new(|sp| udp4(c4, VIP4, sp, 9999, p)),
        ),
        ("IPv6 TCP dsr", Box::new(|sp| tcp6(c6, v6a, sp, 80, p))),
        ("IPv6 UDP ipip", Box::new(|sp| udp6(c6, v6a, sp, 53, p))),
        ("IPv6 TCP ipip", Box::new(|sp| tcp6(c6, v6a, sp, 8080, p))),
        ("IPv6 TCP gue", Box::new(|sp| tcp6(c6, v6a, sp, 8081, p))),
        ("IPv4 no table", Box::new(|sp| tcp4(c4, VIP4, sp, 90, p))),
        (
            "IPv4 no table, SYN",
            Box::new(|sp| tcp4_syn(c4, VIP4, sp, 90)),
        ),
        (
            "IPv4 no table, source-ip hash",
            Box::new(|sp| tcp4(c4, VIP4, sp, 91, p)),
        ),
        (
            "IPv4 no table, least connections",
            Box::new(|sp| tcp4(c4, VIP4, sp, 92, p)),
        ),
        (
            "IPv6 no table, UDP ipip",
            Box::new(|sp| udp6(c6, v6a, sp, 90, p)),
        ),
        (
            "IPv4 full NAT (handed back)",
            Box::new(|sp| tcp4(c4, VIP4, sp, 83, p)),
        ),
        (
            "IPv4 VLAN (handed back)",
            Box::new(|sp| vlan(tcp4(c4, VIP4, sp, 80, p))),
        ),
        (
            "IPv4 IP options (handed back)",
            Box::new(|sp| with_ip_options(tcp4(c4, VIP4, sp, 80, p))),
        ),
    ];
    // Eight flows per case (client ports): over three backends, a wrong
    // choice cannot hide behind a lucky one.
    for (desc, make) in &cases {
        for sp in (40001..).step_by(97).take(8) {
            let pkt = make(sp);
            // The first packet records the flow (a table miss: the staged
            // balancer's); the next ones are established.
            let first = answer(&mut f, lb_common::PROG_BALANCER, &pkt);
            let a = same_answers(&mut f, desc, &pkt, 3);
            assert_eq!(a.action, first.action, "{desc}: the flow kept its answer");
            assert_eq!(a.out, first.out, "{desc}: the flow kept its backend");
            assert!(
                a.action == action::TX || desc.contains("NAT"),
                "{desc}: forwarded ({a:?})"
            );
        }
    }
}

#[test]
fn what_the_established_path_hands_back_is_answered_as_before() {
    let mut f = fixture();
    let payload = [0x17u8; 64];
    // A SYN, then its ACK (the flow is still opening: handed back once),
    // then established packets, then a FIN.
    let syn = tcp4_syn(CLIENT4, VIP4, 41001, 80);
    let ack = tcp4(CLIENT4, VIP4, 41001, 80, &payload);
    same_answers(&mut f, "SYN", &syn, 1);
    same_answers(&mut f, "the handshake's ACK", &ack, 2);
    same_answers(&mut f, "FIN", &tcp4_fin(CLIENT4, VIP4, 41001, 80), 1);

    // A backend down: its established flows are rescheduled by both.
    let ack2 = tcp4(CLIENT4, VIP4, 41002, 80, &payload);
    let first = answer(&mut f, lb_common::PROG_BALANCER, &ack2);
    let before = lb_tests::backend_of(&first.out);
    // As the agent does: marked down, and out of the ring.
    f.dp()
        .set_backend_state(before, BACKEND_DOWN)
        .expect("down");
    let spec = |down: u32| VipSpec {
        key: key(AF_INET, 80, TCP),
        vip_id: 0,
        flags: 0,
        ring_size: 251,
        backends: (1..=3u32)
            .map(|i| (i, v4([198, 18, 2, i as u8]), u32::from(i != down)))
            .collect(),
    };
    f.set_ring(&spec(before)).expect("ring");
    let moved = same_answers(&mut f, "backend down", &ack2, 2);
    assert_ne!(
        lb_tests::backend_of(&moved.out),
        before,
        "rescheduled off the backend that is down"
    );
    f.dp().set_backend_state(before, BACKEND_UP).expect("up");
    f.set_ring(&spec(0)).expect("ring");

    // Too big to encapsulate: both answer with ICMP too-big (or drop).
    f.dp()
        .set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().expect("literal")),
            ipip_mtu: 1280,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            ..Default::default()
        })
        .expect("mtu");
    let big = tcp4(CLIENT4, VIP4, 41003, 8080, &[0u8; 1300]);
    same_answers(&mut f, "too big for ipip", &big, 2);

    // Idle past the VIP's timeout (1 s): rescheduled by both; the entry
    // is then fresh again.
    let idle = tcp4(CLIENT4, VIP4, 41004, 82, &payload);
    answer(&mut f, lb_common::PROG_BALANCER, &idle);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    same_answers(&mut f, "idle past the timeout", &idle, 2);
}

/// The filter the agent rebuilds when it adopts a datapath pinned without
/// it holds what the VIPs wrote one by one.
#[test]
fn the_established_path_filter_is_rebuilt_from_the_vips() {
    let mut f = fixture();
    let words = |f: &mut Fixture| -> Vec<u64> {
        let map = f.ebpf.map(lb_common::MAP_VIP_FAST_FILTER).expect("map");
        let a = aya::maps::Array::<_, u64>::try_from(map).expect("array");
        a.iter().map(|w| w.expect("word")).collect()
    };
    let written = words(&mut f);
    assert!(
        written.iter().filter(|w| **w != 0).count() >= 10,
        "the fixture's VIPs set bits"
    );
    {
        let map = f.ebpf.map_mut(lb_common::MAP_VIP_FAST_FILTER).expect("map");
        let mut a = aya::maps::Array::<_, u64>::try_from(map).expect("array");
        for i in 0..lb_common::hash::VIP_FILTER_WORDS {
            a.set(i, 0, 0).expect("clear");
        }
    }
    f.dp().rebuild_fast_filter().expect("rebuild");
    assert_eq!(words(&mut f), written);
}

/// A SYN to a VIP with a table is scheduled and recorded on the
/// established path (`fast::opening`) as the staged balancer does it: two
/// fixtures take the same packets, one through `lb_xdp`, the other through
/// the staged balancer alone; every answer, verdict and table entry (its
/// clock aside) is the same, for a first SYN, the same SYN again (still
/// opening: signalled once), and the handshake's ACK.
#[test]
fn a_syn_is_scheduled_and_recorded_as_the_staged_balancer_does_it() {
    let (mut fast, mut staged) = (fixture(), fixture());
    let payload = [7u8; 32];
    for (desc, port, family) in [
        ("IPv4 dsr", 80, AF_INET),
        ("IPv4 ipip", 8080, AF_INET),
        ("IPv4 gue", 8081, AF_INET),
        ("IPv4 idle timeout", 81, AF_INET),
        ("IPv6 dsr", 80, AF_INET6),
        ("IPv6 ipip", 8080, AF_INET6),
        ("IPv6 gue", 8081, AF_INET6),
    ] {
        for sp in (42001..).step_by(89).take(8) {
            let (syn, ack) = if family == AF_INET {
                (
                    tcp4_syn(CLIENT4, VIP4, sp, port),
                    tcp4(CLIENT4, VIP4, sp, port, &payload),
                )
            } else {
                (
                    lb_tests::tcp6_syn(client6(), vip6(), sp, port),
                    tcp6(client6(), vip6(), sp, port, &payload),
                )
            };
            let k = lb_common::FlowKey {
                src: if family == AF_INET {
                    v4(CLIENT4)
                } else {
                    client6()
                },
                dst: key(family, port, TCP).addr,
                sport: sp,
                dport: port,
                proto: TCP,
                _pad: 0,
                _pad2: 0,
            };
            for (step, pkt) in [
                ("SYN", &syn),
                ("SYN again", &syn),
                ("SYN again", &syn),
                ("ACK", &ack),
            ] {
                let a = answer(&mut fast, lb_common::PROG_BALANCER, pkt);
                let b = answer(&mut staged, lb_common::PROG_BALANCER_TRACED, pkt);
                assert_eq!(a, b, "{desc} {sp}, {step}: the answers differ");
                assert_eq!(a.action, action::TX, "{desc}: forwarded");
                let entry = |f: &mut Fixture| {
                    f.dp()
                        .flow(&k)
                        .expect("table")
                        .map(|e| VipMeta::default().vip_id + e.backend_id)
                        .zip(f.dp().flow(&k).expect("table").map(|e| (e.flags, e.vip_id)))
                };
                assert_eq!(
                    entry(&mut fast),
                    entry(&mut staged),
                    "{desc} {sp}, {step}: the entries differ"
                );
                assert!(entry(&mut fast).is_some(), "{desc}: recorded");
            }
        }
    }
}
