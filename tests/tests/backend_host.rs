//! `lb backend-host` end to end: the real binary on a veth in a namespace
//! of its own, its pinned `lb_decap` fed with IPIP packets through
//! BPF_PROG_TEST_RUN. It decapsulates for the interface's addresses (and
//! follows a new one), counts (`stats`, `/metrics`), survives its own
//! restart with the program attached throughout and the counters kept, and
//! `down` detaches it. Everything it creates is removed, also on failure.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, PacketBuilder};
use lb_tests::{Netns, veth};

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A running `lb backend-host run`, stopped (SIGTERM) on drop; the pins
/// are removed by [`Pins`].
struct Host(Child);

impl Host {
    fn start(ns: &Netns, instance: &str) -> Self {
        let child = Command::new(LB)
            .args([
                "backend-host",
                "run",
                "--interface",
                "h0",
                "--instance",
                instance,
            ])
            .args(["--netns", &ns.name, "--metrics-listen", "127.0.0.1:9101"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lb backend-host run");
        Host(child)
    }

    /// SIGTERM, then the exit status and what it logged.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let out = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("true"))
            .wait_with_output()
            .expect("wait");
        assert!(out.status.success(), "exit status {}", out.status);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `lb backend-host down` at the end, however the test ends.
struct Pins(String);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(LB)
            .args(["backend-host", "down", "--instance", &self.0])
            .stdout(Stdio::null())
            .status();
    }
}

fn pin(instance: &str, what: &str) -> std::path::PathBuf {
    std::path::Path::new("/sys/fs/bpf/lb-backend")
        .join(instance)
        .join(what)
}

/// Ethernet / IPv4 (protocol 4, to `outer_dst`) / IPv4 / TCP to
/// 198.18.0.100:80: what the balancer sends a backend.
fn ipip(outer_dst: [u8; 4]) -> Vec<u8> {
    let b = PacketBuilder::ipv4([198, 18, 1, 9], [198, 18, 0, 100], 64)
        .tcp(40000, 80, 1, 65535)
        .ack(1);
    let mut inner = Vec::new();
    b.write(&mut inner, b"hello").expect("inner");
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        IpNumber::IPV4,
        [198, 19, 0, 1],
        outer_dst,
    )
    .expect("outer");
    outer.header_checksum = outer.calc_header_checksum();
    let mut v = Vec::new();
    Ethernet2Header {
        source: [2, 0, 0, 0, 0, 1],
        destination: [2, 0, 0, 0, 0, 2],
        ether_type: EtherType::IPV4,
    }
    .write(&mut v)
    .expect("eth");
    outer.write(&mut v).expect("ipv4");
    v.extend_from_slice(&inner);
    v
}

/// Runs `pkt` through the instance's pinned program: (action, frame out).
fn run(instance: &str, pkt: &[u8]) -> (u32, Vec<u8>) {
    let prog = aya::programs::Xdp::from_pin(
        pin(instance, "prog"),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .expect("the pinned lb_decap");
    let r = lb_tests::run_with_headroom_taken(&prog, pkt, 0, 1).expect("test run");
    (r.action, r.out)
}

fn stats(instance: &str) -> serde_json::Value {
    let out = Command::new(LB)
        .args(["backend-host", "stats", "--json", "--instance", instance])
        .output()
        .expect("stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The id of the XDP program attached to h0 (None: none).
fn attached(ns: &Netns) -> Option<u64> {
    let out = ns.exec("ip", &["-j", "link", "show", "dev", "h0"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v[0]["xdp"]["prog"]["id"].as_u64()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(15), "waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_backend_host_decapsulates_counts_survives_its_restart_and_goes_down() {
    Netns::sweep("bhh");
    Netns::sweep("bhp");
    let host = Netns::new("bhh").expect("netns");
    let peer = Netns::new("bhp").expect("netns");
    veth(&host, "h0", &peer, "p0").expect("veth");
    host.exec("ip", &["addr", "add", "198.18.40.2/24", "dev", "h0"])
        .expect("addr");
    host.exec("ip", &["link", "set", "h0", "up"]).expect("up");
    let instance = format!("t-bh-{}", std::process::id());
    let _pins = Pins(instance.clone());
    let h = Host::start(&host, &instance);
    wait_for("the pinned program", || {
        pin(&instance, "prog").exists() && attached(&host).is_some()
    });

    // A tunnel to the interface's address is stripped; one to another
    // address passes as it came.
    let to_me = ipip([198, 18, 40, 2]);
    let (action, out) = run(&instance, &to_me);
    assert_eq!(action, lb_tests::action::PASS);
    assert_eq!(out.len(), to_me.len() - 20, "the outer header is gone");
    assert_eq!(
        &out[14 + 16..14 + 20],
        &[198, 18, 0, 100],
        "the inner packet to the VIP"
    );
    let other = ipip([198, 18, 40, 3]);
    let (action, out) = run(&instance, &other);
    assert_eq!((action, out.len()), (lb_tests::action::PASS, other.len()));
    let s = stats(&instance);
    assert_eq!(
        (s["decapsulated"].as_u64(), s["passed"].as_u64()),
        (Some(1), Some(1))
    );
    let metrics = host
        .enter(|| {
            ureq::get("http://127.0.0.1:9101/metrics")
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .expect("setns")
        .expect("/metrics");
    assert!(
        metrics.contains("lb_decap_packets_total{verdict=\"decapsulated\"} 1"),
        "{metrics}"
    );

    // A new address on the interface is followed (every 5 s).
    host.exec("ip", &["addr", "add", "198.18.40.3/24", "dev", "h0"])
        .expect("addr");
    wait_for("the new address", || {
        run(&instance, &other).1.len() == other.len() - 20
    });

    // Restart: the program stays attached while no process runs, the new
    // one swaps in its program, and the counters go on.
    let before = attached(&host).expect("attached");
    let log = h.stop();
    assert!(log.contains("stays attached"), "{log}");
    assert_eq!(attached(&host), Some(before), "attached with no process");
    assert_eq!(run(&instance, &to_me).1.len(), to_me.len() - 20);
    let h = Host::start(&host, &instance);
    wait_for("the restarted host's program", || {
        attached(&host).is_some_and(|id| id != before)
    });
    let s = stats(&instance);
    assert!(
        s["decapsulated"].as_u64().unwrap_or(0) >= 3,
        "counters kept over the restart: {s}"
    );
    let log = h.stop();
    assert!(log.contains("adopted"), "the link was adopted: {log}");

    // The instance belongs to h0: started on another interface, it refuses
    // (rather than swap h0's program).
    let out = Command::new(LB)
        .args([
            "backend-host",
            "run",
            "--interface",
            "lo",
            "--instance",
            &instance,
        ])
        .args(["--netns", &host.name])
        .output()
        .expect("run on lo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("attached to another interface"),
        "{err}"
    );
    assert!(attached(&host).is_some(), "h0 keeps its program");

    // Down: detached, pins gone.
    let out = Command::new(LB)
        .args(["backend-host", "down", "--instance", &instance])
        .output()
        .expect("down");
    assert!(out.status.success());
    assert_eq!(attached(&host), None);
    assert!(!pin(&instance, "prog").exists());
}
