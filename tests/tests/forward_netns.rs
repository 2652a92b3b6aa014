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
use lb_tests::{Dataplane, Netns, load, loader, sh, v4, v6};

struct Topo {
    client: Netns,
    lb: Netns,
    backend: Netns,
}

fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let s = ns
        .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
        .expect("mac");
    let mut m = [0u8; 6];
    for (i, p) in s.trim().split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

fn ifindex_of(ns: &Netns, dev: &str) -> u32 {
    ns.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])
        .expect("ifindex")
        .trim()
        .parse()
        .expect("num")
}

fn topo(tag: &str) -> Topo {
    Netns::sweep(tag);
    let t = Topo {
        client: Netns::new(&format!("{tag}-c")).expect("ns"),
        lb: Netns::new(&format!("{tag}-l")).expect("ns"),
        backend: Netns::new(&format!("{tag}-b")).expect("ns"),
    };
    let (c, l, b) = (&t.client.name, &t.lb.name, &t.backend.name);
    sh(
        "ip",
        &[
            "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "l0", "netns", l,
        ],
    )
    .expect("veth");
    sh(
        "ip",
        &[
            "link", "add", "l1", "netns", l, "type", "veth", "peer", "name", "b0", "netns", b,
        ],
    )
    .expect("veth");
    let cmds: &[(&Netns, &[&str])] = &[
        (
            &t.client,
            &["ip", "addr", "add", "198.18.10.2/24", "dev", "c0"],
        ),
        (
            &t.client,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:2:10::2/64",
                "dev",
                "c0",
                "nodad",
            ],
        ),
        (&t.client, &["ip", "link", "set", "c0", "up"]),
        (
            &t.client,
            &["ip", "route", "add", "198.18.0.0/24", "via", "198.18.10.1"],
        ),
        (
            &t.client,
            &[
                "ip",
                "-6",
                "route",
                "add",
                "2001:2::/64",
                "via",
                "2001:2:10::1",
            ],
        ),
        (&t.lb, &["ip", "addr", "add", "198.18.10.1/24", "dev", "l0"]),
        (
            &t.lb,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:2:10::1/64",
                "dev",
                "l0",
                "nodad",
            ],
        ),
        (&t.lb, &["ip", "addr", "add", "198.18.11.1/24", "dev", "l1"]),
        (
            &t.lb,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:2:11::1/64",
                "dev",
                "l1",
                "nodad",
            ],
        ),
        (&t.lb, &["ip", "link", "set", "l0", "up"]),
        (&t.lb, &["ip", "link", "set", "l1", "up"]),
        (&t.lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
        (&t.lb, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]),
        (
            &t.backend,
            &["ip", "addr", "add", "198.18.11.2/24", "dev", "b0"],
        ),
        (
            &t.backend,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                "2001:2:11::2/64",
                "dev",
                "b0",
                "nodad",
            ],
        ),
        (
            &t.backend,
            &["ip", "addr", "add", "198.18.0.100/32", "dev", "lo"],
        ),
        (
            &t.backend,
            &["ip", "-6", "addr", "add", "2001:2::100/128", "dev", "lo"],
        ),
        (&t.backend, &["ip", "link", "set", "b0", "up"]),
        (
            &t.backend,
            &["ip", "route", "add", "default", "via", "198.18.11.1"],
        ),
        (
            &t.backend,
            &["ip", "-6", "route", "add", "default", "via", "2001:2:11::1"],
        ),
        // Packets the XDP program forwards must carry finished checksums: a
        // veth would otherwise hand over a partial one (TX offload).
        (&t.client, &["ethtool", "-K", "c0", "tx", "off"]),
    ];
    for (ns, cmd) in cmds {
        ns.exec(cmd[0], &cmd[1..])
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }
    // Let the LB learn the backend's neighbour entries the normal way.
    t.lb.exec(
        "ip",
        &[
            "neigh",
            "replace",
            "198.18.11.2",
            "lladdr",
            &fmt_mac(mac_of(&t.backend, "b0")),
            "dev",
            "l1",
        ],
    )
    .expect("neigh");
    t
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

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
    let t = topo(tag);
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
                &fmt_mac(mac_of(&t.backend, "b0")),
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
                dst_mac: mac_of(&t.backend, "b0"),
                src_mac: mac_of(&t.lb, "l1"),
                ifindex: l1,
                family,
                state: lb_common::BACKEND_UP,
                _pad: [0; 2],
            },
        )
        .expect("backend");
        let table = lb_user::maglev::build(
            &[lb_user::maglev::Entry {
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
            loader::AttachMode::Native,
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
    t.backend
        .enter(|| {
            loader::attach(&mut be, prog, "b0", loader::AttachMode::Native).expect("attach backend")
        })
        .expect("setns");
    servers(&t.backend, vip_s, CONNS, DGRAMS);

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

/// The agent (`lb run`, embedded) on the LB, two backends in the backend
/// namespace (198.18.11.2 and .3, same host, each with its own health
/// listener), steady connections through the VIP. Killing one backend's
/// health listener takes it out within one second; the connections keep
/// succeeding; bringing it back makes it rejoin.
#[test]
fn agent_fails_a_dead_backend_over_within_a_second() {
    let t = topo("agt");
    t.backend
        .exec("ip", &["addr", "add", "198.18.11.3/24", "dev", "b0"])
        .expect("addr");
    let bmac = fmt_mac(mac_of(&t.backend, "b0"));
    t.lb.exec(
        "ip",
        &[
            "neigh",
            "replace",
            "198.18.11.3",
            "lladdr",
            &bmac,
            "dev",
            "l1",
        ],
    )
    .expect("neigh");
    let mut be = load().expect("load");
    t.backend
        .enter(|| {
            loader::attach(
                &mut be,
                lb_common::PROG_PASS,
                "b0",
                loader::AttachMode::Native,
            )
            .expect("attach")
        })
        .expect("setns");

    // Service on the VIP, and one health listener per backend address.
    let (svc, h2, h3) = t
        .backend
        .enter(|| {
            (
                TcpListener::bind("198.18.0.100:8080").expect("svc"),
                TcpListener::bind("198.18.11.2:8080").expect("h2"),
                TcpListener::bind("198.18.11.3:8080").expect("h3"),
            )
        })
        .expect("setns");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for l in [svc, h2] {
        let stop = stop.clone();
        l.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).ok();
                        let _ = s.write_all(b"backend\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }
    h3.set_nonblocking(true).expect("nonblocking");

    let dir = std::env::temp_dir().join(format!("lb-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg_path = dir.join("lb.toml");
    std::fs::write(
        &cfg_path,
        r#"
[agent]
interface = "l0"
xdp_mode = "native"
flow_table_size = 4096

[[vip]]
address = "198.18.0.100"
port = 8080
protocol = "tcp"

[[vip.backend]]
address = "198.18.11.2"

[[vip.backend]]
address = "198.18.11.3"
"#,
    )
    .expect("write config");
    let cfg = lb_user::config::load(&cfg_path).expect("config");
    let _ = std::fs::remove_dir_all(&dir);

    let (ev_tx, ev_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let lb_ns = t.lb.name.clone();
    let agent = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{lb_ns}")).expect("netns");
        use std::os::fd::AsRawFd;
        // SAFETY: moves only this (dedicated) thread into the LB namespace;
        // the runtime's threads are created from it and inherit it.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(lb_user::agent::run_until(
            cfg,
            async {
                let _ = stop_rx.await;
            },
            Some(ev_tx),
        ))
    });

    let vip: SocketAddr = "198.18.0.100:8080".parse().unwrap();
    let connect_ok = || -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&vip, Duration::from_secs(2)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut r = String::new();
        s.read_to_string(&mut r).is_ok() && r == "backend\n"
    };
    // Health of .3: accept probes for a while, then "die", then come back.
    let serve = |l: &TcpListener, d: Duration| {
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            if let Ok((s, _)) = l.accept() {
                drop(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    serve(&h3, Duration::from_millis(800));
    let before = t
        .client
        .enter(|| (0..20).filter(|_| connect_ok()).count())
        .expect("setns");

    let killed = std::time::Instant::now();
    drop(h3); // backend .3 dies: probes are refused
    let down = ev_rx
        .recv_timeout(Duration::from_secs(3))
        .expect("a DOWN event");
    let took = down.at.duration_since(killed);
    println!(
        "backend {} DOWN ({}) {:.0} ms after the kill",
        down.backend,
        down.reason,
        took.as_secs_f64() * 1e3
    );
    assert!(!down.up && down.backend.to_string() == "198.18.11.3");
    assert!(
        took < Duration::from_secs(1),
        "marked down after {took:?}, must be < 1 s"
    );
    let during = t
        .client
        .enter(|| (0..20).filter(|_| connect_ok()).count())
        .expect("setns");

    // It comes back: after `rise` good probes it rejoins.
    let h3 = t
        .backend
        .enter(|| TcpListener::bind("198.18.11.3:8080").expect("h3 again"))
        .expect("setns");
    h3.set_nonblocking(true).expect("nonblocking");
    let back = std::time::Instant::now();
    let mut up = None;
    while up.is_none() && back.elapsed() < Duration::from_secs(3) {
        serve(&h3, Duration::from_millis(50));
        up = ev_rx.try_recv().ok();
    }
    let up = up.expect("an UP event");
    println!(
        "backend {} UP again after {:.0} ms",
        up.backend,
        up.at.duration_since(back).as_secs_f64() * 1e3
    );
    assert!(up.up);

    let _ = stop_tx.send(());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    agent
        .join()
        .expect("agent thread")
        .expect("agent ran cleanly");
    assert_eq!(before, 20, "all connections succeed before the failure");
    assert_eq!(during, 20, "all connections succeed after the failover");
}
