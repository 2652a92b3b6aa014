//! The datapath's signals of backend failure, end to end: `lb run` in a
//! small data center, real TCP from the client namespace, the agent's
//! pinned program fed with crafted packets. A NAT backend whose server is
//! gone answers the next new connection with RST and is out long before
//! its probes alone would take it out; a SYN sent again on a healthy
//! backend costs a burst of probes that succeed, never a failover; a slow
//! but healthy backend raises no signal at all.

mod support;

use std::{
    io::{BufRead as _, Write as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{Dc, Netns, ask_vip, backend_addr, dc};
use lb_user::{api::BackendState, config::file};
use support::{Agent, servers};

/// A probe interval under which probes alone take at least 3 × 2 s to
/// take a backend out.
fn slow_probes() -> Option<file::Health> {
    Some(file::Health {
        interval_ms: Some(2000),
        ..Default::default()
    })
}

/// `lb_backend_signals_total` of `backend` for `signal`, from the agent's
/// `/metrics` (0 when the series does not exist yet).
fn signals(d: &Dc, backend: &str, signal: &str) -> u64 {
    let text =
        d.lb.enter(|| {
            ureq::get("http://127.0.0.1:9100/metrics")
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .expect("setns")
        .expect("/metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("lb_backend_signals_total{")
                && l.contains(&format!("backend=\"{backend}\""))
                && l.contains(&format!("signal=\"{signal}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn state_of(agent: &Agent, addr: &str) -> (BackendState, u64) {
    let b = agent
        .backends()
        .into_iter()
        .find(|b| b.address.to_string() == addr)
        .expect("listed");
    (b.state, b.transitions)
}

/// Bursts started by a signal for `addr`, from the agent's log.
fn bursts(agent: &Agent, addr: &str) -> usize {
    agent
        .events(&[
            ("message", "a datapath signal: probing the backend at once"),
            ("backend", addr),
        ])
        .len()
}

#[test]
fn a_nat_backend_refusing_new_connections_is_out_at_once() {
    let d = dc("sgr", 2).expect("dc");
    let mut srv = servers(&d);
    let _pass = support::nat_two_armed(&d);
    let agent = Agent::start_edited("sgr", &d, 2, |f| {
        f.agent.nat_source_v4 = vec!["198.18.11.1".into()];
        f.agent.reply_interfaces = vec!["l1".into(), "l2".into()];
        f.vips[0].forwarding = Some(lb_user::vocab::Forwarding::Nat);
        f.vips[0].health = slow_probes();
    });
    let b2 = backend_addr(2);
    assert_eq!(signals(&d, &b2, "rst_on_syn"), 0);

    // Kill b2's server; new connections go on, one every 20 ms: the first
    // that b2 gets is refused (RST), which the datapath signals.
    srv[1].stop();
    let t_kill = Instant::now();
    let mut refused = 0;
    let out = d
        .client
        .enter(|| {
            loop {
                if ask_vip(Duration::from_millis(500)).is_err() {
                    refused += 1;
                }
                if state_of(&agent, &b2).0 == BackendState::Down {
                    return Some(t_kill.elapsed());
                }
                if t_kill.elapsed() > Duration::from_secs(3) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .expect("setns");
    let out = out.unwrap_or_else(|| {
        panic!(
            "b2 still not down 3 s after the kill ({refused} refused); log:\n{}",
            agent.log_text()
        )
    });
    println!("NAT server killed → backend down: {out:?} ({refused} connection(s) refused)");
    // Probes alone, every 2 s, need at least 4 s for three failures.
    assert!(
        out < Duration::from_millis(1500),
        "the signal took b2 out in {out:?}"
    );
    assert!(signals(&d, &b2, "rst_on_syn") >= 1, "the RST was signalled");
    assert_eq!(bursts(&agent, &b2), 1, "one burst of probes");

    let down = agent.events(&[("message", "backend health changed"), ("backend", &b2)]);
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(down[0]["state"], "down");
    let at = |e: &serde_json::Value| e["timestamp"].as_str().unwrap_or("").to_string();
    println!(
        "the signal's burst began {}, b2 down {}",
        at(&agent.events(&[("message", "a datapath signal: probing the backend at once")])[0]),
        at(&down[0])
    );
    // The other backend saw no signal and stays up.
    let b1 = backend_addr(1);
    assert_eq!(signals(&d, &b1, "rst_on_syn"), 0);
    assert_eq!(state_of(&agent, &b1), (BackendState::Up, 0));
}

#[test]
fn a_syn_sent_again_costs_probes_that_succeed_never_a_failover() {
    let d = dc("sgs", 1).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start_edited("sgs", &d, 1, |f| {
        f.vips[0].health = slow_probes();
    });
    let b1 = backend_addr(1);
    let prog = aya::programs::Xdp::from_pin(
        format!("/sys/fs/bpf/lb/{}/prog", agent.instance),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .expect("the agent's pinned program");
    let run = |pkt: &[u8]| {
        lb_tests::run_with_headroom_taken(&prog, pkt, 0, 1).expect("test run");
    };
    let (client, vip) = ([198, 18, 1, 77], [198, 18, 0, 100]);
    let syn = |port| lb_tests::tcp4_syn(client, vip, port, 8080);

    // SYN, then ACK: the flow opened; its next SYN (a reused port) is no
    // signal.
    run(&syn(41000));
    run(&lb_tests::tcp4(client, vip, 41000, 8080, b""));
    run(&syn(41000));
    // SYN and the same SYN again: the client got no SYN-ACK.
    run(&syn(41001));
    run(&syn(41001));
    let t0 = Instant::now();
    while bursts(&agent, &b1) < 1 && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(signals(&d, &b1, "syn_again"), 1, "only the SYN sent again");
    assert_eq!(bursts(&agent, &b1), 1, "log:\n{}", agent.log_text());
    // The same SYN a third time: one signal per connection attempt.
    run(&syn(41001));
    // Another attempt whose SYN comes again, within the second: counted,
    // but no second burst.
    run(&syn(41002));
    run(&syn(41002));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(signals(&d, &b1, "syn_again"), 2);
    assert_eq!(bursts(&agent, &b1), 1, "at most one burst a second");
    // The burst's probes succeeded: b1 is up and never changed.
    assert_eq!(state_of(&agent, &b1), (BackendState::Up, 0));
    assert!(
        agent
            .events(&[("message", "backend health changed")])
            .is_empty()
    );
}

/// A backend that answers every connection after `delay` (a slow
/// application on a healthy host): the kernel completes the handshake at
/// once, so no client sends its SYN again.
struct SlowServer(Arc<AtomicBool>);

impl SlowServer {
    fn start(ns: &Netns, delay: Duration) -> Self {
        let l = ns
            .enter(|| std::net::TcpListener::bind("0.0.0.0:8080"))
            .expect("setns")
            .expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        std::thread::spawn(move || {
                            std::thread::sleep(delay);
                            let _ = c.write_all(b"slow\n");
                            let _ = std::io::BufReader::new(&c).read_line(&mut String::new());
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        SlowServer(stop)
    }
}

impl Drop for SlowServer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_slow_but_healthy_backend_raises_no_signal() {
    let d = dc("sgl", 1).expect("dc");
    let _srv = SlowServer::start(&d.backends[0], Duration::from_millis(300));
    let agent = Agent::start("sgl", &d, 1);
    let b1 = backend_addr(1);
    let answers = d
        .client
        .enter(|| {
            (0..10)
                .map(|_| ask_vip(Duration::from_secs(2)).map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        })
        .expect("setns");
    assert!(
        answers.iter().all(|a| a.as_deref() == Ok("slow")),
        "{answers:?}"
    );
    assert_eq!(signals(&d, &b1, "syn_again"), 0);
    assert_eq!(bursts(&agent, &b1), 0);
    assert_eq!(state_of(&agent, &b1), (BackendState::Up, 0));
}
