//! The datapath attached natively to a veth inside namespaces this test
//! creates (and always deletes): real packets cross and are counted.

use std::{net::UdpSocket, time::Duration};

use lb_common::verdict;
use lb_tests::{Dataplane, Netns, load, loader};

#[test]
fn attached_natively_counts_real_packets() {
    Netns::sweep("att");
    let lb = Netns::new("att-lb").expect("netns");
    let cl = Netns::new("att-cl").expect("netns");
    lb_tests::veth(&lb, "att-lb", &cl, "att-cl").expect("veth");
    lb.exec("ip", &["addr", "add", "198.18.1.1/24", "dev", "att-lb"])
        .expect("addr");
    cl.exec("ip", &["addr", "add", "198.18.1.2/24", "dev", "att-cl"])
        .expect("addr");
    lb.exec("ip", &["link", "set", "att-lb", "up"]).expect("up");
    cl.exec("ip", &["link", "set", "att-cl", "up"]).expect("up");

    let mut ebpf = load().expect("load");
    lb.enter(|| {
        loader::attach(
            &mut ebpf,
            lb_common::PROG_BALANCER,
            "att-lb",
            lb_user::vocab::XdpMode::Native,
        )
    })
    .expect("setns")
    .expect("native attach");

    const N: usize = 50;
    cl.enter(|| {
        let s = UdpSocket::bind("198.18.1.2:0").expect("bind");
        for _ in 0..N {
            s.send_to(b"x", "198.18.1.1:9").expect("send");
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .expect("setns");
    std::thread::sleep(Duration::from_millis(200));

    let v = Dataplane::new(&mut ebpf).verdicts().expect("counters");
    assert!(
        v[verdict::PASS_NON_VIP as usize] >= N as u64,
        "expected at least {N} non-VIP packets through XDP, got {v:?}"
    );
    assert!(
        v[verdict::PASS_NON_IP as usize] >= 1,
        "the ARP exchange should pass as non-IP: {v:?}"
    );
}

/// `xdp_mode = "auto"` falls back to generic (skb) mode where native XDP is
/// not available (the loopback device has no driver hook), and says so.
#[test]
fn auto_mode_falls_back_to_skb_and_says_so() {
    Netns::sweep("atf");
    let ns = Netns::new("atf").expect("netns");
    ns.exec("ip", &["link", "set", "lo", "up"]).expect("lo up");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_lb")])
        .args([
            "attach",
            "--iface",
            "lo",
            "--mode",
            "auto",
            "--seconds",
            "1",
        ])
        .output()
        .expect("lb attach");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{stdout}{stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("native XDP failed")
            && stderr.contains("falling back to generic")
            && stderr.contains("interface=\"lo\""),
        "{stderr}"
    );
    assert!(stdout.contains("in skb mode"), "{stdout}");
}
