//! `lb loadgen` for real: live frames from a generator namespace into the
//! balancer attached natively to the peer veth, which bounces them
//! (`XDP_TX`) back to a counting sink on the generator's veth.

use std::process::Command;

use lb_common::{AF_INET, Backend, PROTO_UDP, VipKey, VipMeta};
use lb_tests::{Dataplane, Netns, load, loader, mac_of, sink_count, v4};

const LB: &str = env!("CARGO_BIN_EXE_lb");

#[test]
fn loadgen_sends_distinct_flows_through_the_balancer() {
    Netns::sweep("lg");
    let gen_ns = Netns::new("lg-g").expect("ns");
    let lb_ns = Netns::new("lg-l").expect("ns");
    lb_tests::veth(&gen_ns, "g0", &lb_ns, "l0").expect("veth");
    gen_ns.exec("ip", &["link", "set", "g0", "up"]).expect("up");
    lb_ns.exec("ip", &["link", "set", "l0", "up"]).expect("up");
    let g0_mac = mac_of(&gen_ns, "g0");
    let l0_mac = mac_of(&lb_ns, "l0");

    // The balancer on l0: one UDP VIP whose only backend is "behind" g0.
    let mut lb = load().expect("load");
    let vip = VipKey {
        addr: v4([198, 18, 20, 100]),
        port: 9,
        proto: PROTO_UDP,
        family: AF_INET,
    };
    {
        let mut dp = Dataplane::new(&mut lb);
        dp.upsert_vip(
            &vip,
            VipMeta {
                vip_id: 0,
                ..Default::default()
            },
        )
        .expect("vip");
        let b = Backend {
            addr: v4([198, 18, 21, 1]),
            dst_mac: g0_mac,
            src_mac: l0_mac,
            ifindex: 0,
            family: AF_INET,
            state: lb_common::BACKEND_UP,
            weight: 1,
            ..Default::default()
        };
        dp.set_backend(1, &b).expect("backend");
        let table = lb_user::policy::maglev::build(
            &[lb_user::policy::maglev::Entry {
                id: 1,
                addr: b.addr,
                weight: 1,
            }],
            251,
        );
        dp.install_ring(&vip, &table).expect("ring");
    }
    lb_ns
        .enter(|| {
            loader::attach(
                &mut lb,
                lb_common::PROG_BALANCER,
                "l0",
                lb_user::vocab::XdpMode::Native,
            )
        })
        .expect("setns")
        .expect("attach lb");
    // The sink on g0 counts what the balancer sends back.
    let mut sink = lb_tests::load_tools().expect("load sink");
    gen_ns
        .enter(|| {
            loader::attach(
                &mut sink,
                lb_common::PROG_SINK,
                "g0",
                lb_user::vocab::XdpMode::Native,
            )
        })
        .expect("setns")
        .expect("attach sink");

    const N: u64 = 200_000;
    const FLOWS: u32 = 1000;
    let out = Command::new(LB)
        .args([
            "loadgen",
            "--netns",
            &gen_ns.name,
            "--iface",
            "g0",
            "--dst",
            "198.18.20.100:9",
            "--dst-mac",
        ])
        .arg(lb_tests::fmt_mac(l0_mac))
        .args([
            "--count",
            &N.to_string(),
            "--flows",
            &FLOWS.to_string(),
            // Paced well below what the veth pair carries on this VM (about
            // 0.9 Mpps flat out): what this test checks is that every frame
            // is a distinct flow that reaches the sink, not the peak rate
            // (flat out, the veth ring drops ~10 % on a busy 2-vCPU VM).
            "--rate",
            "400000",
            "--json",
        ])
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    println!("loadgen: {summary}");
    assert_eq!(summary["packets"], N);
    std::thread::sleep(std::time::Duration::from_millis(200));

    let received = sink_count(&sink);
    let dp = Dataplane::new(&mut lb);
    let t = dp.vip_traffic(0).expect("vip stats");
    println!(
        "balancer forwarded {} packets, {} new flows; sink received {received}",
        t.packets, t.new_flows
    );
    assert_eq!(t.new_flows, FLOWS as u64, "exactly {FLOWS} distinct flows");
    assert!(
        t.packets >= N * 9 / 10,
        "the balancer saw most frames: {}",
        t.packets
    );
    assert!(
        received >= t.packets * 9 / 10,
        "the sink received most of what was bounced: {received}"
    );
}

/// The generator's flow space, frame by frame through its own program
/// (BPF_PROG_TEST_RUN, its sequence counter set for each case): IPv6 flows
/// past 65,536 get source addresses of their own (the last four bytes are
/// the flow number, the port stays), IPv4 flows past 65,536 reuse the 65,536
/// addresses with the next port; every frame's checksums stay valid.
#[test]
fn loadgen_flow_space_and_checksums() {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let mut e = lb_tests::load_tools().expect("load");
    let nr_cpus = aya::util::nr_cpus().expect("cpus");
    for (dst, src, syn) in [
        ("[2001:2::100]:80", "2001:2:0:1::", true),
        ("[2001:2::100]:53", "2001:2:0:1::", false),
        ("198.18.20.100:80", "198.19.0.0", true),
        ("198.18.20.100:53", "198.19.0.0", false),
    ] {
        let o = lb_user::tools::loadgen::Options {
            iface: "unused".into(),
            dst: dst.parse().unwrap(),
            dst_mac: Some([2, 0, 0, 0, 0, 1]),
            src: src.parse().unwrap(),
            tcp_syn: syn,
            size: 0,
            flows: 4_000_000,
            rate: 0,
            duration: None,
            count: Some(1),
            threads: 1,
            progress: false,
        };
        let (frame, cfg) =
            lb_user::tools::loadgen::template(&o, [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
                .expect("template");
        {
            let m = e.map_mut(lb_common::MAP_LOADGEN).expect("LOADGEN");
            let mut a: aya::maps::Array<_, lb_common::LoadgenCfg> =
                aya::maps::Array::try_from(m).unwrap();
            a.set(0, cfg, 0).unwrap();
        }
        lb_user::tools::loadgen::set_frame_template(&mut e, &frame).expect("template");
        let mut seen = std::collections::HashSet::new();
        for flow in [0u32, 1, 65_535, 65_536, 65_537, 999_999, 3_999_999] {
            {
                let m = e.map_mut("LOADGEN_SEQ").expect("LOADGEN_SEQ");
                let mut seq: aya::maps::PerCpuArray<_, u64> =
                    aya::maps::PerCpuArray::try_from(m).unwrap();
                seq.set(
                    0,
                    aya::maps::PerCpuValues::try_from(vec![flow as u64; nr_cpus]).unwrap(),
                    0,
                )
                .unwrap();
            }
            let r = lb_tests::run(&mut e, lb_common::PROG_LOADGEN, &frame).expect("run");
            assert_eq!(r.action, lb_tests::action::TX, "{dst} flow {flow}");
            let p = SlicedPacket::from_ethernet(&r.out).expect("parse");
            let (src_addr, v4_ok): (std::net::IpAddr, bool) = match &p.net {
                Some(NetSlice::Ipv4(ip)) => {
                    let h = ip.header().to_header();
                    (
                        ip.header().source_addr().into(),
                        h.calc_header_checksum() == h.header_checksum,
                    )
                }
                Some(NetSlice::Ipv6(ip)) => (ip.header().source_addr().into(), true),
                _ => panic!("not IP"),
            };
            assert!(v4_ok, "{dst} flow {flow}: IPv4 header checksum");
            let (sport, csum_ok) = match (&p.transport, &p.net) {
                (Some(TransportSlice::Tcp(t)), Some(NetSlice::Ipv6(ip))) => (
                    t.source_port(),
                    t.to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                        .unwrap()
                        == t.checksum(),
                ),
                (Some(TransportSlice::Tcp(t)), Some(NetSlice::Ipv4(ip))) => (
                    t.source_port(),
                    t.to_header()
                        .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                        .unwrap()
                        == t.checksum(),
                ),
                (Some(TransportSlice::Udp(u)), Some(NetSlice::Ipv6(ip))) => (
                    u.source_port(),
                    u.to_header()
                        .calc_checksum_ipv6(&ip.header().to_header(), u.payload())
                        .unwrap()
                        == u.checksum(),
                ),
                (Some(TransportSlice::Udp(u)), Some(NetSlice::Ipv4(ip))) => (
                    u.source_port(),
                    u.checksum() == 0
                        || u.to_header()
                            .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                            .unwrap()
                            == u.checksum(),
                ),
                _ => panic!("{dst}: no transport header"),
            };
            assert!(csum_ok, "{dst} flow {flow}: transport checksum");
            match src_addr {
                std::net::IpAddr::V6(a) => {
                    let o = a.octets();
                    assert_eq!(
                        &o[..12],
                        &src.parse::<std::net::Ipv6Addr>().unwrap().octets()[..12]
                    );
                    assert_eq!(
                        u32::from_be_bytes(o[12..].try_into().unwrap()),
                        flow,
                        "{dst}"
                    );
                    assert_eq!(sport, 1024, "{dst} flow {flow}: IPv6 keeps the port");
                }
                std::net::IpAddr::V4(a) => {
                    let o = a.octets();
                    assert_eq!(&o[..2], &[198, 19]);
                    assert_eq!(u16::from_be_bytes([o[2], o[3]]), (flow & 0xffff) as u16);
                    assert_eq!(sport, 1024 + (flow >> 16) as u16, "{dst} flow {flow}");
                }
            }
            assert!(
                seen.insert((src_addr, sport)),
                "{dst}: flow {flow} repeats an earlier one"
            );
        }
    }
}
