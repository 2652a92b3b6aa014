//! What the agent shows of the datapath, end to end: `lb explain`, `lb
//! trace`, NAT replies on other interfaces, where probes go, the drop log,
//! the status page in a browser. Same harness as `agent.rs`.

use std::{
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod support;

use lb_tests::{ask_vip, backend_addr, dc};
use lb_user::{
    api::{self, BackendInfo, BackendState, Request},
    config::file,
    vocab::{Forwarding, ProbeVia},
};
use support::{Agent, LB, greeting, servers};

/// `lb explain VIP CLIENT:PORT` names, from the live maps, the backend that
/// then really answers a connection from that address and port: by ring
/// slot before the connection exists, by the connection table while it is
/// open.
#[test]
fn explain_names_the_backend_that_answers() {
    let d = dc("agx", 3).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agx", &d, 3);
    let client_ip = d
        .client
        .enter(|| {
            let s = TcpStream::connect("198.18.0.100:8080").expect("connect");
            s.local_addr().expect("local").ip()
        })
        .expect("setns");
    let explain = |port: u16| -> api::ExplainInfo {
        let out = agent
            .cli(&[
                "explain",
                "198.18.0.100:8080",
                &format!("{client_ip}:{port}"),
                "--json",
            ])
            .expect("lb explain");
        serde_json::from_str(&out).expect("json")
    };
    let mut seen = std::collections::BTreeSet::new();
    for port in 41001..41013u16 {
        let before = explain(port);
        assert!(before.via.starts_with("ring slot"), "{:?}", before);
        let predicted = before.backend.expect("a backend").to_string();
        let (conn, name) = d
            .client
            .enter(|| {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                sock.set_reuse_address(true).expect("reuse");
                sock.bind(&std::net::SocketAddr::new(client_ip, port).into())
                    .expect("bind the chosen port");
                let vip: std::net::SocketAddr = "198.18.0.100:8080".parse().unwrap();
                sock.connect_timeout(&vip.into(), Duration::from_secs(1))
                    .expect("connect");
                greeting(sock.into())
            })
            .expect("setns");
        let answered = backend_addr(name.trim_start_matches('b').parse().expect("bN"));
        assert_eq!(
            predicted, answered,
            "port {port}: explain said {predicted}, {name} answered"
        );
        let during = explain(port);
        assert_eq!(during.via, "connection table", "{during:?}");
        assert_eq!(during.backend.map(|a| a.to_string()), Some(answered));
        seen.insert(name);
        drop(conn);
    }
    assert!(seen.len() >= 2, "the ports spread over backends: {seen:?}");
}

/// The instance's pinned trace filter, read the way another process would.
fn pinned_trace_owner(instance: &str) -> Option<u32> {
    let md =
        aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/TRACE_CFG")).ok()?;
    let a = aya::maps::Array::<_, lb_common::TraceCfg>::try_from(aya::maps::Map::Array(md)).ok()?;
    a.get(&0, 0).ok().map(|c| c.owner_pid)
}

/// `lb trace` on a live datapath: a traced request names the backend that
/// really answered (with the VIP, the table miss or SYN, the Maglev slot and
/// the verdict); a packet to a port that is not a VIP is shown as such; the
/// filter is off again when the trace ends.
#[test]
fn trace_names_the_backend_that_answered_and_a_non_vip_port() {
    let d = dc("agt", 3).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agt", &d, 3);
    let tracer = Command::new(LB)
        .args([
            "trace",
            "--instance",
            &agent.instance,
            "--vip",
            "198.18.0.100",
            "--client",
            "198.18.10.2",
            "--count",
            "200",
            "--duration",
            "4",
            "--json",
            "--socket",
        ])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lb trace");
    let t0 = Instant::now();
    while pinned_trace_owner(&agent.instance) != Some(tracer.id()) {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the trace never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered = d
        .client
        .enter(|| ask_vip(Duration::from_secs(2)))
        .expect("setns")
        .expect("a request through the VIP");
    // A port that is not a VIP: the SYN passes to the LB's kernel (which
    // has no route for it), so the connect fails; the trace explains why.
    let _ = d
        .client
        .enter(|| {
            TcpStream::connect_timeout(
                &"198.18.0.100:8081".parse().unwrap(),
                Duration::from_millis(300),
            )
        })
        .expect("setns");
    let out = tracer.wait_with_output().expect("lb trace output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let n: usize = answered.trim_start_matches('b').parse().expect("bN");
    let to_vip: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["vip"] == "198.18.0.100:8080/tcp")
        .collect();
    assert!(
        to_vip.len() >= 3,
        "the connection's packets were traced: {records:?}"
    );
    assert!(
        to_vip
            .iter()
            .all(|r| r["backend"] == backend_addr(n).as_str()
                && (r["verdict"] == "tx" || r["verdict"] == "redirect")),
        "every packet of the request went to {answered} ({}): {to_vip:?}",
        backend_addr(n)
    );
    let first = to_vip[0];
    assert!(
        (first["table"] == "syn" || first["table"] == "miss")
            && first["ring"] == "vip"
            && first["scheduler"] == "maglev"
            && first["slot"].as_u64().is_some_and(|s| s < 65537),
        "the SYN was scheduled on the VIP's Maglev ring: {first}"
    );
    assert!(
        to_vip[1..].iter().all(|r| r["table"] == "hit"),
        "later packets follow the table: {to_vip:?}"
    );
    let non_vip: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["dst"] == "198.18.0.100:8081")
        .collect();
    assert!(
        !non_vip.is_empty()
            && non_vip.iter().all(|r| r["vip"].is_null()
                && r["verdict"] == "pass_non_vip"
                && r["action"] == "XDP_PASS"),
        "a port that is not a VIP is shown as such: {non_vip:?}"
    );
    assert_eq!(
        pinned_trace_owner(&agent.instance),
        Some(0),
        "tracing is off again"
    );
}

/// NAT on a two-armed balancer: clients on `l0`, backends behind `l1` and
/// `l2`, the NAT source the LB's address on `l1`. The backends' replies
/// arrive on `l1` and `l2`, where `agent.reply_interfaces` attaches the
/// balancer; they are translated and redirected out of `l0` to the client.
#[test]
fn nat_replies_arriving_on_other_interfaces_reach_the_client() {
    let d = dc("anr", 2).expect("dc");
    let _srv = servers(&d);
    let _pass = support::nat_two_armed(&d);
    let agent = Agent::start_edited("anr", &d, 2, |f| {
        f.agent.metrics_listen = None;
        f.agent.nat_source_v4 = vec!["198.18.11.1".into()];
        f.agent.reply_interfaces = vec!["l1".into(), "l2".into()];
        f.vips[0].forwarding = Some(Forwarding::Nat);
    });
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..40u16 {
        let got = d
            .client
            .enter(|| -> std::io::Result<String> {
                use std::io::BufRead as _;
                let sock = std::net::TcpStream::connect_timeout(
                    &"198.18.0.100:8080".parse().unwrap(),
                    Duration::from_secs(2),
                )?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                std::io::BufReader::new(sock).read_line(&mut line)?;
                Ok(line.trim().to_string())
            })
            .expect("setns");
        let got = got.unwrap_or_else(|e| {
            panic!(
                "connection {k} through the NAT VIP: {e}; log:\n{}",
                agent.log_text()
            )
        });
        seen.insert(got);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["b1".to_string(), "b2".to_string()],
        "both backends answered, through l1 and l2"
    );
    let v = api::call(&agent.socket, &Request::Stats).expect("stats");
    let replies = v["verdicts"]["nat_reply"].as_u64().unwrap_or(0);
    assert!(replies >= 40, "replies translated in XDP: {v}");
}

/// Counts the TCP connections `ns` accepts on `port` (a health probe's
/// connect) until the returned flag is set; bounded to 60 s.
fn count_accepts(
    ns: &lb_tests::Netns,
    port: u16,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    let l = ns
        .enter(|| std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("setns")
        .expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let (n, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (n2, stop2) = (n.clone(), stop.clone());
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while !stop2.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
            match l.accept() {
                Ok(_) => {
                    n2.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (n, stop)
}

/// `lb health` and `lb vip list` say where probes really go: a NAT VIP on
/// 8080 whose backends listen on 9090 (their own port) is probed on 9090,
/// which the backends see, and which is what both commands show.
#[test]
fn health_probes_go_where_lb_health_says() {
    let d = dc("ahp", 2).expect("dc");
    // Nothing listens on the VIP's port: a probe sent there would be refused.
    let counters: Vec<_> = d.backends.iter().map(|b| count_accepts(b, 9090)).collect();
    let agent = Agent::start_edited("ahp", &d, 2, |f| {
        f.agent.metrics_listen = None;
        f.agent.nat_source_v4 = vec!["198.18.11.1".into()];
        f.vips[0].forwarding = Some(Forwarding::Nat);
        for b in f.backends_mut() {
            b.port = Some(9090);
        }
    });
    // Well past `fall` probes (3 × 200 ms): a wrong target would be down.
    std::thread::sleep(Duration::from_millis(1500));
    let v = api::call(&agent.socket, &Request::BackendList { vip: None }).expect("list");
    let list: Vec<BackendInfo> = serde_json::from_value(v).expect("backend list");
    for (i, (n, stop)) in counters.iter().enumerate() {
        let addr = backend_addr(i + 1);
        let b = list
            .iter()
            .find(|b| b.address.to_string() == addr)
            .expect("listed");
        assert_eq!(
            b.probe.as_deref(),
            Some(format!("tcp {addr}:9090").as_str())
        );
        assert_eq!(b.state, BackendState::Up, "{addr}: {}", b.last_result);
        let seen = n.load(std::sync::atomic::Ordering::Relaxed);
        assert!(seen >= 3, "{addr}:9090 saw {seen} probes");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let health = agent.cli(&["health"]).expect("lb health");
    assert!(
        health.contains(&format!("tcp {}:9090", backend_addr(1))),
        "{health}"
    );
    let vips = agent.cli(&["vip", "list"]).expect("vip list");
    assert!(vips.contains("tcp :9090 every 200 ms"), "{vips}");
}

/// Runs `pkt` `repeat` times through the agent's own (pinned) balancer
/// with BPF_PROG_TEST_RUN, `meta` bytes of its headroom taken; returns the
/// action.
fn run_pinned(instance: &str, pkt: &[u8], meta: u32, repeat: u32) -> u32 {
    let prog = aya::programs::Xdp::from_pin(
        format!("/sys/fs/bpf/lb/{instance}/prog"),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .expect("the agent's pinned program");
    lb_tests::run_with_headroom_taken(&prog, pkt, meta, repeat)
        .expect("test run")
        .action
}

/// The datapath's rare drops reach the agent's JSON log as events with
/// their fields (`reason`, `vip`, `client`, `backend`, `suppressed`), sent
/// through the agent's own pinned program: an `ipip` packet without room
/// for its outer header (`encap_failed`) and a NAT VIP out of ports
/// (`nat_no_port`). A burst of 10,000 such drops yields at most the rate
/// limit's events, and the events' packets plus their `suppressed` counts
/// add up to the drops counted.
#[test]
fn datapath_drops_reach_the_log_with_their_fields_and_a_rate_limit() {
    let d = dc("dlg", 1).expect("dc");
    let _srv = servers(&d);
    let b = backend_addr(1);
    let agent = Agent::start_edited("dlg", &d, 1, |f| {
        // One NAT port for the whole host: with two CPUs each CPU's slice
        // is empty, with one the first flow takes it (see below).
        f.agent.metrics_listen = None;
        f.agent.nat_source_v4 = vec!["198.18.11.1".into()];
        f.agent.nat_ports = Some("2000-2000".into());
        f.vips.push(file::Vip {
            forwarding: Some(Forwarding::Ipip),
            // The backend runs no lb_decap (the test only feeds the
            // program): its health is probed on its address.
            health: Some(file::Health {
                via: Some(ProbeVia::Address),
                ..Default::default()
            }),
            ..file::Vip::new("198.18.0.101", 8080, vec![file::Backend::at(&b)])
        });
        f.vips.push(file::Vip {
            forwarding: Some(Forwarding::Nat),
            ..file::Vip::new("198.18.0.102", 8080, vec![file::Backend::at(&b)])
        });
    });
    agent.wait_ready(3);
    // One CPU for every run below: the rate limit and its `suppressed`
    // count are per CPU.
    // SAFETY: sched_setaffinity on this thread with a zeroed, then filled,
    // CPU set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread"
        );
    }
    let wait_for = |want: &[(&str, &str)], n: usize| {
        let t0 = Instant::now();
        loop {
            let got = agent.events(want);
            if got.len() >= n || t0.elapsed() > Duration::from_secs(5) {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let syn = |c: u8| lb_tests::tcp4_syn([198, 18, 1, c], [198, 18, 0, 102], 40000, 8080);
    let ipip = lb_tests::tcp4([198, 18, 1, 50], [198, 18, 0, 101], 40000, 8080, b"x");
    assert_eq!(
        run_pinned(&agent.instance, &ipip, 200, 1),
        lb_tests::action::DROP
    );
    let got = wait_for(&[("reason", "encap_failed")], 1);
    assert_eq!(
        got.len(),
        1,
        "one encap_failed event; log:\n{}",
        agent.log_text()
    );
    let e = &got[0];
    assert_eq!(e["level"], "WARN");
    assert_eq!(e["vip"], "198.18.0.101:8080/tcp");
    assert_eq!(e["client"], "198.18.1.50:40000");
    assert_eq!(e["backend"], b.as_str());
    assert_eq!(e["suppressed"], 0);

    // With one CPU, this flow takes the only port; with more, none is free.
    run_pinned(&agent.instance, &syn(51), 0, 1);
    let no_port = || -> u64 {
        let v = api::call(&agent.socket, &Request::Stats).expect("stats");
        v["verdicts"]["nat_no_port"].as_u64().expect("nat_no_port")
    };
    assert_eq!(
        run_pinned(&agent.instance, &syn(52), 0, 1),
        lb_tests::action::DROP
    );
    let got = wait_for(
        &[("reason", "nat_no_port"), ("client", "198.18.1.52:40000")],
        1,
    );
    assert_eq!(
        got.len(),
        1,
        "one nat_no_port event; log:\n{}",
        agent.log_text()
    );
    assert_eq!(got[0]["vip"], "198.18.0.102:8080/tcp");
    assert_eq!(got[0]["backend"], b.as_str());

    // The burst, then (in the next second) one more drop, whose event
    // carries what the limit held back.
    let t0 = Instant::now();
    assert_eq!(
        run_pinned(&agent.instance, &syn(53), 0, 10_000),
        lb_tests::action::DROP
    );
    let burst = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1_200));
    run_pinned(&agent.instance, &syn(53), 0, 1);
    // Every NAT drop of this agent's life, all on this CPU.
    let dropped = no_port();
    assert!(dropped >= 10_002, "every drop counted: {dropped}");
    let sum = |events: &[serde_json::Value]| -> u64 {
        events
            .iter()
            .map(|e| 1 + e["suppressed"].as_u64().expect("suppressed"))
            .sum()
    };
    let want = [("reason", "nat_no_port")];
    let t1 = Instant::now();
    let mut events = agent.events(&want);
    while sum(&events) < dropped && t1.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        events = agent.events(&want);
    }
    assert_eq!(
        sum(&events),
        dropped,
        "events plus suppressed add up to the drops: {events:#?}"
    );
    // Windows of a second each: the burst's, the late drop's, and one
    // more should the burst have crossed a window's end.
    let limit = lb_common::drop_log::PER_SECOND as usize * (burst.as_secs() as usize + 2) + 1;
    assert!(
        events.len() <= limit,
        "{} events for {dropped} drops in {burst:?}: at most {limit}",
        events.len()
    );
    assert!(
        events.len() < 50,
        "the rate limit held: {} events",
        events.len()
    );
}

/// The status page in a real browser: headless Chromium loads it from the
/// agent (`agent.metrics_listen`, in the balancer's namespace), lets its
/// script poll `/status.json`, and the DOM it leaves names every backend
/// `up`; a backend whose server is killed is `down` on the page as soon as
/// the agent has marked it so (within the failover bound). Screenshots at
/// desktop and phone width go to `target/screenshots/` for a person to
/// look at.
#[test]
fn the_status_page_shows_a_killed_backend_down_in_a_browser() {
    let d = dc("agp", 3).expect("dc");
    let mut srv = servers(&d);
    let agent = Agent::start("agp", &d, 3);
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot directory");
    let profile = std::env::temp_dir().join(format!("lb-chromium-{}", std::process::id()));
    // Chromium in the balancer's namespace (the page's address is there),
    // bounded in time; its stderr (GPU and D-Bus notices) is not the test's.
    let browse = |extra: &[String]| -> String {
        let out = Command::new("timeout")
            .args(["60", "ip", "netns", "exec", &d.lb.name, "chromium"])
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--virtual-time-budget=4000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg("http://127.0.0.1:9100/")
            .output()
            .expect("chromium (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // The state cell of a backend's row in the DOM Chromium leaves.
    let state_of = |dom: &str, addr: &str| -> Option<String> {
        let row = &dom[dom.find(&format!("data-backend=\"{addr}\""))?..];
        let row = &row[..row.find("</tr>")?];
        let cls = &row[row.find("class=\"state ")? + "class=\"state ".len()..];
        Some(cls[..cls.find('"')?].to_string())
    };
    let refreshes = |dom: &str| -> u32 {
        dom.find("data-refreshes=\"")
            .and_then(|i| {
                let rest = &dom[i + "data-refreshes=\"".len()..];
                rest[..rest.find('"')?].parse().ok()
            })
            .unwrap_or(0)
    };

    let dom = browse(&["--dump-dom".to_string()]);
    for i in 1..=3 {
        assert_eq!(
            state_of(&dom, &backend_addr(i)).as_deref(),
            Some("up"),
            "backend {i} up on the page:\n{dom}"
        );
    }
    assert!(
        refreshes(&dom) >= 2,
        "the page polls the agent (refreshes {}):\n{dom}",
        refreshes(&dom)
    );
    assert!(dom.contains("198.18.0.100:8080/tcp"), "the VIP is listed");
    browse(&[
        format!("--screenshot={}", shots.join("status-page.png").display()),
        "--window-size=1280,720".to_string(),
    ]);

    // Kill b2's server: down in the agent within the failover bound, and
    // then on the page.
    let t_kill = Instant::now();
    srv[1].stop();
    let b2 = backend_addr(2);
    while agent
        .backends()
        .iter()
        .any(|b| b.address.to_string() == b2 && b.state != BackendState::Down)
    {
        assert!(
            t_kill.elapsed() < Duration::from_secs(2),
            "b2 is marked down within the failover bound"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dom = browse(&["--dump-dom".to_string()]);
    println!(
        "killed → page shows it: {:?} (agent, then a browser load)",
        t_kill.elapsed()
    );
    assert_eq!(state_of(&dom, &b2).as_deref(), Some("down"), "{dom}");
    assert_eq!(state_of(&dom, &backend_addr(1)).as_deref(), Some("up"));
    browse(&[
        format!(
            "--screenshot={}",
            shots.join("status-page-phone.png").display()
        ),
        "--window-size=390,844".to_string(),
    ]);
    for f in ["status-page.png", "status-page-phone.png"] {
        let len = std::fs::metadata(shots.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 10_000, "a screenshot {f} of the page ({len} bytes)");
    }
    let _ = std::fs::remove_dir_all(&profile);
}
