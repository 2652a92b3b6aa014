//! Real TCP and UDP through the VIP, with the balancer attached natively to
//! a veth in namespaces this test creates (and always deletes):
//!
//! ```text
//! client ns  c0 ──veth── l0  lb ns (lb_xdp native on l0)  l1 ──veth── b0  backend ns
//! 198.18.10.2        198.18.10.1              198.18.11.1        198.18.11.2, VIP on lo
//! ```
//! The balancer redirects VIP packets from l0 to l1 (devmap); the backend
//! owns the VIP on loopback (`dsr`) or strips the tunnel with `lb_decap`
//! (`ipip`) and answers the client through the LB's kernel routing.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use lb_common::{
    AF_INET, AF_INET6, Backend, PROTO_TCP, PROTO_UDP, VIP_F_IPIP, VipKey, VipMeta, verdict,
};
use lb_tests::{Dataplane, Netns, dc_bare, fmt_mac, ifindex_of, load, loader, mac_of, v4, v6};

/// Starts a TCP server (answers "backend\n" per connection) and a UDP echo
/// server bound to the VIP, inside the backend namespace. Both stop on their
/// own after the test's bounded number of requests.
fn servers(ns: &Netns, vip: &str, tcp_conns: usize, udp_msgs: usize) {
    let (tcp, udp) = ns
        .enter(|| {
            let ip: std::net::IpAddr = vip.parse().expect("address");
            let tcp = TcpListener::bind(SocketAddr::new(ip, 8080)).expect("tcp bind");
            let udp = UdpSocket::bind(SocketAddr::new(ip, 5353)).expect("udp bind");
            (tcp, udp)
        })
        .expect("setns");
    std::thread::spawn(move || {
        for _ in 0..tcp_conns {
            let Ok((mut s, _)) = tcp.accept() else { return };
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"backend\n");
        }
    });
    udp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..udp_msgs {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                return;
            };
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

fn run_case(tag: &str, family: u8, ipip: bool) {
    const CONNS: usize = 10;
    const DGRAMS: usize = 10;
    let t = dc_bare(tag, 1).expect("dc");
    let backend = &t.backends[0];
    // Let the LB learn the backend's neighbour entries the normal way.
    t.lb.exec(
        "ip",
        &[
            "neigh",
            "replace",
            "198.18.11.2",
            "lladdr",
            &fmt_mac(mac_of(backend, "b0")),
            "dev",
            "l1",
        ],
    )
    .expect("neigh");
    let (vip_s, vip_addr, backend_addr) = if family == AF_INET {
        ("198.18.0.100", v4([198, 18, 0, 100]), v4([198, 18, 11, 2]))
    } else {
        (
            "2001:2::100",
            v6("2001:2::100".parse().unwrap()),
            v6("2001:2:11::2".parse().unwrap()),
        )
    };
    if family == AF_INET6 {
        t.lb.exec(
            "ip",
            &[
                "-6",
                "neigh",
                "replace",
                "2001:2:11::2",
                "lladdr",
                &fmt_mac(mac_of(backend, "b0")),
                "dev",
                "l1",
            ],
        )
        .expect("neigh6");
    }

    // The balancer on l0.
    let mut lb = load().expect("load");
    let l1 = ifindex_of(&t.lb, "l1");
    {
        let mut dp = Dataplane::new(&mut lb);
        dp.set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().unwrap()),
            flags: 0,
            ..Default::default()
        })
        .expect("settings");
        let flags = if ipip { VIP_F_IPIP } else { 0 };
        for (id, port, proto) in [(0, 8080, PROTO_TCP), (1, 5353, PROTO_UDP)] {
            let key = VipKey {
                addr: vip_addr,
                port,
                proto,
                family,
            };
            dp.upsert_vip(
                &key,
                VipMeta {
                    vip_id: id,
                    flags,
                    ..Default::default()
                },
            )
            .expect("vip");
        }
        dp.set_backend(
            1,
            &Backend {
                addr: backend_addr,
                dst_mac: mac_of(backend, "b0"),
                src_mac: mac_of(&t.lb, "l1"),
                ifindex: l1,
                family,
                state: lb_common::BACKEND_UP,
                weight: 1,
                ..Default::default()
            },
        )
        .expect("backend");
        let table = lb_user::policy::maglev::build(
            &[lb_user::policy::maglev::Entry {
                id: 1,
                addr: backend_addr,
                weight: 1,
            }],
            251,
        );
        for (port, proto) in [(8080, PROTO_TCP), (5353, PROTO_UDP)] {
            dp.install_ring(
                &VipKey {
                    addr: vip_addr,
                    port,
                    proto,
                    family,
                },
                &table,
            )
            .expect("ring");
        }
    }
    t.lb.enter(|| {
        Dataplane::new(&mut lb).add_tx_port(l1).expect("devmap");
        loader::attach(
            &mut lb,
            lb_common::PROG_BALANCER,
            "l0",
            lb_user::vocab::XdpMode::Native,
        )
        .expect("attach lb");
    })
    .expect("setns");

    // The backend side: decap for ipip; otherwise a pass program, because
    // native XDP redirect into a veth needs an XDP program on the receiver.
    let mut be = load().expect("load backend");
    Dataplane::new(&mut be)
        .add_decap_addr(backend_addr)
        .expect("decap addr");
    let prog = if ipip {
        lb_common::PROG_DECAP
    } else {
        lb_common::PROG_PASS
    };
    backend
        .enter(|| {
            loader::attach(&mut be, prog, "b0", lb_user::vocab::XdpMode::Native)
                .expect("attach backend")
        })
        .expect("setns");
    servers(backend, vip_s, CONNS, DGRAMS);

    let vip_tcp: SocketAddr = SocketAddr::new(vip_s.parse().unwrap(), 8080);
    let vip_udp: SocketAddr = SocketAddr::new(vip_s.parse().unwrap(), 5353);
    let (tcp_ok, udp_ok) = t
        .client
        .enter(|| {
            let mut tcp_ok = 0;
            for _ in 0..CONNS {
                let Ok(mut s) = TcpStream::connect_timeout(&vip_tcp, Duration::from_secs(3)) else {
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let _ = s.write_all(b"GET\n");
                let mut resp = String::new();
                if s.read_to_string(&mut resp).is_ok() && resp == "backend\n" {
                    tcp_ok += 1;
                }
            }
            let any: SocketAddr = if family == AF_INET {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let u = UdpSocket::bind(any).expect("udp");
            u.connect(vip_udp).expect("connect");
            u.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let mut udp_ok = 0;
            for i in 0..DGRAMS {
                let msg = format!("ping {i}");
                let _ = u.send(msg.as_bytes());
                let mut buf = [0u8; 64];
                if let Ok(n) = u.recv(&mut buf)
                    && &buf[..n] == msg.as_bytes()
                {
                    udp_ok += 1;
                }
            }
            (tcp_ok, udp_ok)
        })
        .expect("setns");

    let v = Dataplane::new(&mut lb).verdicts().expect("counters");
    let dv = Dataplane::new(&mut be)
        .decap_verdicts()
        .expect("decap counters");
    println!("{tag}: tcp {tcp_ok}/{CONNS}, udp {udp_ok}/{DGRAMS}, lb verdicts {v:?}, decap {dv:?}");
    assert_eq!(
        tcp_ok, CONNS,
        "every TCP connection through the VIP succeeds"
    );
    assert_eq!(
        udp_ok, DGRAMS,
        "every UDP datagram through the VIP is echoed"
    );
    assert!(
        v[verdict::REDIRECT as usize] > 0,
        "VIP traffic was redirected by XDP: {v:?}"
    );
    if ipip {
        assert!(
            dv[lb_common::decap_verdict::DECAPSULATED as usize] > 0,
            "the backend decapsulated: {dv:?}"
        );
    }
}

#[test]
fn dsr_ipv4_tcp_and_udp() {
    run_case("fd4", AF_INET, false);
}

#[test]
fn ipip_ipv4_tcp_and_udp() {
    run_case("fi4", AF_INET, true);
}

#[test]
fn dsr_ipv6_tcp_and_udp() {
    run_case("fd6", AF_INET6, false);
}

#[test]
fn ipip_ipv6_tcp_and_udp() {
    run_case("fi6", AF_INET6, true);
}

/// `next_hop = "fib"`: the next hop comes from the kernel's routes and
/// neighbours per packet (bpf_fib_lookup), so it follows a neighbour change
/// at once, and a missing neighbour passes the packet (counted).
#[test]
fn fib_next_hop_follows_the_neighbour_table() {
    use lb_common::{AF_INET, PROTO_TCP, VipKey, VipMeta, verdict};
    use lb_tests::{action, run_on, tcp4};
    Netns::sweep("fib");
    let ns = Netns::new("fib").expect("ns");
    lb_tests::veth(&ns, "v0", &ns, "v1").expect("veth");
    ns.exec("ip", &["addr", "add", "198.18.2.254/24", "dev", "v0"])
        .expect("addr");
    ns.exec("ip", &["link", "set", "v0", "up"]).expect("up");
    ns.exec("ip", &["link", "set", "v1", "up"]).expect("up");
    // bpf_fib_lookup answers "forwarding disabled" unless the host forwards.
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .expect("forwarding");
    let v0 = ifindex_of(&ns, "v0");
    let v0_mac = mac_of(&ns, "v0");

    let mut lb = load().expect("load");
    let vip = VipKey {
        addr: v4([198, 18, 0, 100]),
        port: 80,
        proto: PROTO_TCP,
        family: AF_INET,
    };
    {
        let mut dp = Dataplane::new(&mut lb);
        dp.set_settings(&lb_common::Settings {
            flags: lb_common::SETTINGS_F_FIB,
            ..Default::default()
        })
        .expect("settings");
        dp.upsert_vip(
            &vip,
            VipMeta {
                vip_id: 0,
                ..Default::default()
            },
        )
        .expect("vip");
        // No MAC in the entry: only the kernel knows it.
        let b = Backend {
            addr: v4([198, 18, 2, 1]),
            family: AF_INET,
            state: lb_common::BACKEND_UP,
            weight: 1,
            ..Default::default()
        };
        dp.set_backend(1, &b).expect("backend");
        let t = lb_user::policy::maglev::build(
            &[lb_user::policy::maglev::Entry {
                id: 1,
                addr: b.addr,
                weight: 1,
            }],
            251,
        );
        dp.install_ring(&vip, &t).expect("ring");
    }
    let pkt = tcp4([198, 19, 0, 1], [198, 18, 0, 100], 40000, 80, b"");
    let (r1, r2, r3) = ns
        .enter(|| {
            let none = run_on(&mut lb, lb_common::PROG_BALANCER, &pkt, v0).expect("run");
            ns.exec(
                "ip",
                &[
                    "neigh",
                    "replace",
                    "198.18.2.1",
                    "lladdr",
                    "02:00:00:00:aa:01",
                    "dev",
                    "v0",
                ],
            )
            .expect("neigh");
            let first = run_on(&mut lb, lb_common::PROG_BALANCER, &pkt, v0).expect("run");
            ns.exec(
                "ip",
                &[
                    "neigh",
                    "replace",
                    "198.18.2.1",
                    "lladdr",
                    "02:00:00:00:bb:02",
                    "dev",
                    "v0",
                ],
            )
            .expect("neigh");
            let second = run_on(&mut lb, lb_common::PROG_BALANCER, &pkt, v0).expect("run");
            (none, first, second)
        })
        .expect("setns");
    assert_eq!(
        r1.action,
        action::PASS,
        "no neighbour yet: passed to the kernel"
    );
    assert_eq!(r2.action, action::TX);
    assert_eq!(
        &r2.out[0..6],
        &[0x02, 0, 0, 0, 0xaa, 0x01],
        "MAC from the neighbour table"
    );
    assert_eq!(
        &r2.out[6..12],
        &v0_mac,
        "source MAC of the egress interface"
    );
    assert_eq!(
        &r3.out[0..6],
        &[0x02, 0, 0, 0, 0xbb, 0x02],
        "a neighbour change applies to the next packet"
    );
    let v = Dataplane::new(&mut lb).verdicts().expect("counters");
    assert_eq!(
        (v[verdict::NO_NEIGH as usize], v[verdict::TX as usize]),
        (1, 2)
    );
}
