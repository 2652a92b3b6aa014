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
                loader::AttachMode::Native,
            )
        })
        .expect("setns")
        .expect("attach lb");
    // The sink on g0 counts what the balancer sends back.
    let mut sink = load().expect("load sink");
    gen_ns
        .enter(|| {
            loader::attach(
                &mut sink,
                lb_common::PROG_SINK,
                "g0",
                loader::AttachMode::Native,
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
