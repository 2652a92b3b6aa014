//! The agent end to end, its health and its life: `lb run` (the real CLI
//! binary) in the LB namespace of a small data center, real TCP from a
//! client namespace. Failover, drain, kill -9 and restart, the first probe,
//! least-connections counts, next-hop refresh. (Configuration and edits:
//! `agent_config.rs`; what the agent shows of the datapath:
//! `agent_observe.rs`.) Every namespace, pin and process is removed at the
//! end, also when a test fails.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

mod support;

use lb_tests::{Dc, TestServer, ask_vip, backend_addr, dc};
use lb_user::{
    api::{self, BackendState, Request},
    vocab::Scheduler,
};
use support::{Agent, greeting, servers, traffic};

/// The entry for `key` in instance's pinned connection table, read the way
/// another process would (from bpffs), not through the agent.
fn pinned_flow(instance: &str, key: &lb_common::FlowKey) -> Option<lb_common::Flow> {
    let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/FLOWS")).ok()?;
    let m = aya::maps::Array::<_, lb_common::FlowSlot>::try_from(aya::maps::Map::Array(md)).ok()?;
    lb_user::datapath::flow_in(&m, key)
}

/// The id of the program in slot `slot` of the instance's pinned program
/// array `map`, read the way another process would; `None`: the slot is
/// empty or the map is not pinned.
fn pinned_program_in_slot(instance: &str, map: &str, slot: u32) -> Option<u32> {
    use std::os::fd::{AsFd, AsRawFd};
    let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/{map}")).ok()?;
    // BPF_MAP_LOOKUP_ELEM on a program array answers the program's id.
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut id = 0u32;
    let attr = Attr {
        map_fd: md.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &slot as *const u32 as u64,
        value: &mut id as *mut u32 as u64,
        flags: 0,
    };
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    // SAFETY: bpf(2) with an attribute block that outlives the call, whose
    // key and value point at live u32s.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    (rc == 0).then_some(id)
}

/// Backend `id`'s datapath entry in the instance's pinned map, read the way
/// another process would.
fn pinned_backend(instance: &str, id: u32) -> Option<lb_common::Backend> {
    let md =
        aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/BACKENDS")).ok()?;
    let a = aya::maps::Array::<_, lb_common::Backend>::try_from(aya::maps::Map::Array(md)).ok()?;
    a.get(&id, 0).ok()
}

/// A connection through the VIP from the client that stays open: the
/// stream and the name of the backend serving it.
fn open_long_lived(d: &Dc) -> (TcpStream, String) {
    d.client
        .enter(|| {
            let vip = "198.18.0.100:8080".parse().unwrap();
            greeting(TcpStream::connect_timeout(&vip, Duration::from_secs(1)).expect("connect"))
        })
        .expect("setns")
}

#[test]
fn failover_within_a_second_and_recovery() {
    let d = dc("agf", 3).expect("dc");
    let mut srv = servers(&d);
    let agent = Agent::start("agf", &d, 3);
    let warm = traffic(&d, 60, Duration::ZERO);
    let mut seen: Vec<&str> = warm.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        ["b1", "b2", "b3"],
        "traffic reaches all three backends: {warm:?}"
    );
    assert!(
        warm.iter().all(|(_, r)| r.is_ok()),
        "no errors before the failure"
    );

    // Kill b2's server, keep sending for 2.5 s.
    let t_kill = Instant::now();
    srv[1].stop();
    let during = traffic(&d, 250, Duration::from_millis(10));
    let last_b2 = during
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("b2"))
        .map(|(t, _)| t.duration_since(t_kill))
        .max();
    let errors: Vec<Duration> = during
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(t, _)| t.duration_since(t_kill))
        .collect();
    let last_error = errors.iter().max().copied();
    println!(
        "kill → last new connection answered by b2: {last_b2:?}; {} failed connections, the last {last_error:?} after the kill",
        errors.len()
    );
    assert!(
        during.len() == 250,
        "the load loop must collect every sample: {}",
        during.len()
    );
    assert!(
        last_error.is_none_or(|e| e <= Duration::from_secs(1)),
        "new connections still sent to the dead backend {last_error:?} after the kill"
    );
    let late_ok = during
        .iter()
        .filter(|(t, _)| t.duration_since(t_kill) > Duration::from_secs(1));
    assert!(
        late_ok.clone().all(|(_, r)| r.is_ok()),
        "after failover every connection succeeds"
    );

    // The failure shows in `lb health` and `lb stats`.
    let health = agent.cli(&["health"]).expect("lb health");
    println!("{health}");
    let b2 = agent
        .backends()
        .into_iter()
        .find(|b| b.address.to_string() == backend_addr(2))
        .expect("b2");
    assert_eq!(
        (b2.state, b2.last_result.as_str()),
        (
            BackendState::Down,
            "refused via the path: nothing listens on 198.18.0.100:8080"
        )
    );
    assert!(health.contains("down") && health.contains("refused"));
    // The transition is one structured log event with its fields.
    let down = agent.events(&[
        ("message", "backend health changed"),
        ("state", "down"),
        ("backend", &backend_addr(2)),
        ("vip", "198.18.0.100:8080/tcp"),
        (
            "reason",
            "refused via the path: nothing listens on 198.18.0.100:8080",
        ),
    ]);
    assert_eq!(down.len(), 1, "one DOWN event for b2: {down:?}");
    assert_eq!(down[0]["level"], "WARN");
    let stats: serde_json::Value =
        serde_json::from_str(&agent.cli(&["stats", "--json"]).expect("stats")).expect("json");
    // Every answered connection is at least three client packets through XDP.
    let answered = warm
        .iter()
        .chain(&during)
        .filter(|(_, r)| r.is_ok())
        .count() as u64;
    let forwarded: u64 = ["tx", "redirect"]
        .iter()
        .map(|k| {
            stats["verdicts"][k]
                .as_u64()
                .expect("every reason is listed")
        })
        .sum();
    assert!(
        forwarded >= 3 * answered,
        "{forwarded} packets forwarded by XDP for {answered} answered connections: {stats}"
    );

    // Bring it back: it rejoins after `rise` good probes.
    srv[1] = TestServer::start(&d.backends[1], "b2").expect("server");
    let t_back = Instant::now();
    loop {
        let b2 = agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == backend_addr(2))
            .expect("b2");
        if b2.state == BackendState::Up {
            break;
        }
        assert!(
            t_back.elapsed() < Duration::from_secs(3),
            "b2 did not rejoin"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "b2 rejoined {:?} after its server came back",
        t_back.elapsed()
    );
    let after = traffic(&d, 60, Duration::ZERO);
    assert!(
        after.iter().any(|(_, r)| r.as_deref() == Ok("b2")),
        "new connections reach b2 again"
    );
    assert!(after.iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn drain_keeps_a_long_lived_connection_and_sends_new_ones_elsewhere() {
    let d = dc("agd", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agd", &d, 2);
    let (mut conn, name) = open_long_lived(&d);
    let idx: usize = name.trim_start_matches('b').parse().expect("backend name");
    let addr = backend_addr(idx);
    agent
        .cli(&["backend", "drain", "198.18.0.100:8080", &addr])
        .expect("drain");
    assert!(
        std::fs::read_to_string(&agent.config)
            .unwrap()
            .contains("drain = true"),
        "drain saved to the config"
    );

    // New connections avoid it while the old one keeps working.
    let fresh = traffic(&d, 40, Duration::ZERO);
    assert!(fresh.iter().all(|(_, r)| r.is_ok()), "{fresh:?}");
    assert!(
        fresh.iter().all(|(_, r)| r.as_deref() != Ok(name.as_str())),
        "no new flow to the drained backend"
    );
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    for i in 0..10 {
        conn.write_all(format!("ping {i}\n").as_bytes())
            .expect("write on the drained connection");
        let mut echo = String::new();
        reader
            .read_line(&mut echo)
            .expect("echo on the drained connection");
        assert_eq!(echo, format!("ping {i}\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = agent
        .backends()
        .into_iter()
        .find(|b| b.address.to_string() == addr)
        .unwrap();
    assert_eq!(b.state, BackendState::Draining);

    agent
        .cli(&["backend", "undrain", "198.18.0.100:8080", &addr])
        .expect("undrain");
    let back = traffic(&d, 60, Duration::ZERO);
    assert!(
        back.iter().any(|(_, r)| r.as_deref() == Ok(name.as_str())),
        "undrained backend gets new flows again"
    );
}

#[test]
fn agent_kill_9_and_restart_loses_nothing_and_cli_changes_persist() {
    let d = dc("agr", 2).expect("dc");
    let _srv = servers(&d);
    let mut agent = Agent::start("agr", &d, 2);
    // An operator's comment beside backend 1 (CLI edits read the file
    // afresh and must keep it).
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        text.replacen("[[vip.backend]]\n", "[[vip.backend]] # backend 1\n", 1),
    )
    .unwrap();

    // A CLI change before the crash: a third (weight 0) backend entry.
    agent
        .cli(&[
            "backend",
            "add",
            "198.18.0.100:8080",
            "198.18.0.77",
            "--weight",
            "0",
        ])
        .expect("backend add");
    let listed = agent.cli(&["backend", "list", "--json"]).expect("list");
    assert!(listed.contains("198.18.0.77"), "{listed}");

    // A long-lived connection, and steady short ones, across kill -9 + restart.
    let (mut conn, name) = open_long_lived(&d);
    let client_ns = d.client.name.clone();
    let sender = std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/run/netns/{client_ns}")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: only this thread moves into the client namespace.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let t0 = Instant::now();
        let mut results = Vec::new();
        while t0.elapsed() < Duration::from_secs(4) {
            results.push(ask_vip(Duration::from_millis(800)).map_err(|e| e.to_string()));
            std::thread::sleep(Duration::from_millis(10));
        }
        results
    });
    std::thread::sleep(Duration::from_millis(800));
    // The long-lived connection's entry in the pinned connection table, and
    // the backend ids, before the crash: a restart must reuse both maps.
    let local = conn.local_addr().expect("local address");
    let key = lb_common::FlowKey {
        src: lb_tests::v4(match local.ip() {
            std::net::IpAddr::V4(a) => a.octets(),
            std::net::IpAddr::V6(_) => panic!("IPv4 client"),
        }),
        dst: lb_tests::v4([198, 18, 0, 100]),
        sport: local.port(),
        dport: 8080,
        proto: lb_common::PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    };
    let entry_before = pinned_flow(&agent.instance, &key).expect("the connection is in the table");
    let ids_before: Vec<(String, u32)> = agent
        .backends()
        .iter()
        .map(|b| (b.address.to_string(), b.id))
        .collect();
    let icmp_slots = |agent: &Agent| {
        [0, 1].map(|s| pinned_program_in_slot(&agent.instance, lb_common::MAP_ICMP_JUMP, s))
    };
    assert!(
        icmp_slots(&agent).iter().all(Option::is_some),
        "the ICMP programs are in their slots: {:?}",
        icmp_slots(&agent)
    );
    agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    // Without an agent the balancer still reaches its ICMP programs.
    assert!(
        icmp_slots(&agent).iter().all(Option::is_some),
        "ICMP programs still installed after kill -9: {:?}",
        icmp_slots(&agent)
    );
    agent.spawn();
    agent.wait_ready(2);
    let results = sender.join().expect("sender");
    let failed = results.iter().filter(|r| r.is_err()).count();
    println!(
        "{} requests across kill -9 and restart, {failed} failed",
        results.len()
    );
    println!("{}", agent.cli(&["stats"]).unwrap_or_default());
    println!("{}", agent.log_text());
    assert!(results.len() > 100);
    assert_eq!(
        failed,
        0,
        "requests failed: {:?}",
        results.iter().filter(|r| r.is_err()).collect::<Vec<_>>()
    );
    assert!(
        agent.log_text().contains("adopted the running datapath"),
        "restart adopted the pins:\n{}",
        agent.log_text()
    );

    let entry_after = pinned_flow(&agent.instance, &key).expect("still in the table");
    assert_eq!(
        entry_after.backend_id, entry_before.backend_id,
        "the restarted agent kept the connection table"
    );
    let ids_after: Vec<(String, u32)> = agent
        .backends()
        .iter()
        .map(|b| (b.address.to_string(), b.id))
        .collect();
    assert_eq!(ids_after, ids_before, "backend ids survive the restart");

    // The long-lived connection still talks to the same backend.
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    conn.write_all(b"still there\n")
        .expect("write after restart");
    let mut echo = String::new();
    reader.read_line(&mut echo).expect("echo after restart");
    assert_eq!(
        echo, "still there\n",
        "connection to {name} survived the restart"
    );

    // The CLI change survived the restart (written to the config file).
    let listed = agent.cli(&["backend", "list", "--json"]).expect("list");
    assert!(listed.contains("198.18.0.77"), "{listed}");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(
        text.contains("# backend 1") && text.contains("198.18.0.77"),
        "comments kept, change saved:\n{text}"
    );

    // A backend removed from the configuration while no agent ran: the
    // agent that adopts the datapath forgets it (its entry zeroed), so a
    // flow that still names it reschedules instead of reaching it.
    let gone = ids_after
        .iter()
        .find(|(a, _)| a == "198.18.0.77")
        .expect("the added backend's id")
        .1;
    let family = |agent: &Agent| pinned_backend(&agent.instance, gone).map(|b| b.family);
    assert_eq!(family(&agent), Some(lb_common::AF_INET), "live before");
    agent.kill9();
    let file = Agent::config_file(&agent.instance, &agent.socket, &d.lb.name, 2);
    std::fs::write(&agent.config, file.to_toml("test agent")).expect("config");
    agent.spawn();
    agent.wait_ready(2);
    assert_eq!(
        family(&agent),
        Some(0),
        "a backend gone from the configuration is zeroed on adoption:\n{}",
        agent.log_text()
    );
}

/// Least-connections counts are recounted from the connection table every
/// 5 s, so a count that drifted (evictions and idle expiry never decrement
/// it) comes back to the truth.
#[test]
fn least_connections_counts_are_recounted_from_the_table() {
    let d = dc("agl", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agl", &d, 2);
    agent
        .cli(&[
            "vip",
            "set",
            "198.18.0.100:8080",
            "scheduler=least-connections",
        ])
        .expect("vip set");
    // One open connection: its backend has exactly one active flow.
    let (_conn, name) = open_long_lived(&d);
    let serving = backend_addr(if name == "b1" { 1 } else { 2 });
    let active = |addr: &str| {
        agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == addr)
            .and_then(|b| b.active_flows)
            .expect("active_flows for a least-connections VIP")
    };
    assert_eq!(active(&serving), 1, "{name} counts its connection");

    // Drift: the datapath's count for that backend jumps to 50.
    let id = agent
        .backends()
        .into_iter()
        .find(|b| b.address.to_string() == serving)
        .expect("backend")
        .id;
    {
        let md = aya::maps::MapData::from_pin(format!(
            "/sys/fs/bpf/lb/{}/maps/{}",
            agent.instance,
            lb_common::MAP_ACTIVE
        ))
        .expect("the pinned ACTIVE map");
        let mut a = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(md)).expect("array");
        a.set(id, 50, 0).expect("write the drifted count");
    }
    assert_eq!(active(&serving), 50, "the drift is visible");
    let t0 = Instant::now();
    while active(&serving) != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "not recounted within 8 s: {}",
            active(&serving)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("recounted after {:?}", t0.elapsed());
}

/// A backend's MAC changes and the LB's kernel learns it (as from a
/// gratuitous ARP) with no probe failing: within 25 probes the agent writes
/// the new MAC into the backend's datapath entry, without a health
/// transition, and traffic through the VIP reaches the backend again.
#[test]
fn next_hop_refresh_follows_a_backend_mac_change() {
    let d = dc("agn", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agn", &d, 2);
    let b1 = || {
        agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == backend_addr(1))
            .expect("b1 listed")
    };
    let before = b1();
    let old = pinned_backend(&agent.instance, before.id).expect("pinned entry");
    let new_mac = [0x02, 0x00, 0x5e, 0x00, 0x11, 0x02];
    assert_ne!(old.dst_mac, new_mac);
    let mac = lb_tests::fmt_mac(new_mac);
    d.backends[0]
        .exec("ip", &["link", "set", "b0", "address", &mac])
        .expect("new MAC");
    d.lb.exec(
        "ip",
        &[
            "neigh",
            "replace",
            &backend_addr(1),
            "lladdr",
            &mac,
            "dev",
            "l1",
            "nud",
            "reachable",
        ],
    )
    .expect("neighbour learnt");
    let t0 = Instant::now();
    while pinned_backend(&agent.instance, before.id).map(|b| b.dst_mac) != Some(new_mac) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the datapath entry still has the old MAC after 10 s (25 probes are about 5.5 s)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "new MAC in the datapath {:?} after the change",
        t0.elapsed()
    );
    assert_eq!(
        b1().transitions,
        before.transitions,
        "picked up without a health transition"
    );
    let after = traffic(&d, 60, Duration::ZERO);
    assert!(
        after.iter().all(|(_, r)| r.is_ok()),
        "every request answered: {after:?}"
    );
    assert!(
        after.iter().any(|(_, r)| r.as_deref() == Ok("b1")),
        "b1 answers through its new MAC: {after:?}"
    );
}

/// A backend that is down when its VIP's health settings change starts
/// over as up, in the datapath too: with `health.kind=none` (no probes, so
/// no transition would ever come) its entry is rewritten as up at once.
#[test]
fn health_settings_change_brings_a_down_backend_back_into_the_datapath() {
    let d = dc("agh", 2).expect("dc");
    let mut srv = servers(&d);
    let agent = Agent::start("agh", &d, 2);
    let b2 = || {
        agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == backend_addr(2))
            .expect("b2 listed")
    };
    srv[1].stop();
    let t0 = Instant::now();
    while b2().state != BackendState::Down {
        assert!(t0.elapsed() < Duration::from_secs(3), "b2 never went down");
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = b2().id;
    assert_eq!(
        pinned_backend(&agent.instance, id).map(|b| b.state),
        Some(lb_common::BACKEND_DOWN)
    );
    agent
        .cli(&["vip", "set", "198.18.0.100:8080", "health.kind=none"])
        .expect("vip set");
    assert_eq!(b2().state, BackendState::Up);
    assert_eq!(
        pinned_backend(&agent.instance, id).map(|b| b.state),
        Some(lb_common::BACKEND_UP),
        "the datapath entry follows"
    );
}

/// No traffic to an unchecked backend: of three backends one is dead from
/// the start, and from the moment the agent answers, no connection reaches
/// it (a connection it refuses would fail with "refused"); the same when
/// the dead backend is added to the running agent. Before its first probe
/// a backend is `unchecked`, then `down` with the probe's reason.
#[test]
fn a_backend_takes_no_connection_before_its_first_probe_succeeds() {
    let d = dc("unc", 3).expect("dc");
    let _srv: Vec<TestServer> = d.backends[..2]
        .iter()
        .enumerate()
        .map(|(i, ns)| TestServer::start(ns, &format!("b{}", i + 1)).expect("server"))
        .collect();
    let agent = Agent::launch("unc", &d, 3, |_| {});
    let check = |what: &str, got: &[(Instant, Result<String, String>)]| {
        let reached_dead: Vec<_> = got
            .iter()
            .filter(|(_, r)| match r {
                Ok(name) => name == "b3",
                Err(e) => !e.contains("timed out"),
            })
            .collect();
        assert!(
            reached_dead.is_empty(),
            "{what}: connections that reached the dead backend: {reached_dead:?}; log:\n{}",
            agent.log_text()
        );
        let ok = got.iter().filter(|(_, r)| r.is_ok()).count();
        assert!(
            ok >= got.len() / 2,
            "{what}: only {ok} of {} connections answered",
            got.len()
        );
    };
    check("agent start", &traffic(&d, 40, Duration::from_millis(25)));
    let b3 = backend_addr(3);
    let state = |addr: &str| {
        agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == addr)
            .map(|b| (b.state, b.last_result))
    };
    assert_eq!(
        state(&b3),
        Some((
            BackendState::Down,
            "refused via the path: nothing listens on 198.18.0.100:8080".to_string()
        )),
        "decided by its first probe"
    );
    assert!(
        !agent
            .events(&[("message", "backend checked"), ("state", "down")])
            .is_empty(),
        "its first verdict is logged"
    );

    agent
        .cli(&["backend", "remove", "198.18.0.100:8080", &b3])
        .expect("remove");
    agent
        .cli(&["backend", "add", "198.18.0.100:8080", &b3])
        .expect("add");
    check(
        "backend added live",
        &traffic(&d, 40, Duration::from_millis(25)),
    );
    assert_eq!(state(&b3).map(|s| s.0), Some(BackendState::Down));
}

/// A round-robin VIP (a list, not a Maglev table) whose every backend is
/// down gets a ring with no backend in it, so its packets are dropped as
/// `no_backend`: an empty list cannot be installed, and the last list, with
/// a dead backend in it, must not stay.
#[test]
fn a_list_scheduler_with_every_backend_down_sends_nothing() {
    let d = dc("rrd", 2).expect("dc");
    let mut srv = servers(&d);
    let agent = Agent::start_edited("rrd", &d, 2, |f| {
        f.vips[0].scheduler = Some(Scheduler::RoundRobin);
    });
    for s in &mut srv {
        s.stop();
    }
    let t0 = Instant::now();
    while agent
        .backends()
        .iter()
        .any(|b| b.state != BackendState::Down)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "backends never went down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let no_backend = || -> u64 {
        let v = api::call(&agent.socket, &Request::Stats).expect("stats");
        v["verdicts"]["no_backend"].as_u64().expect("no_backend")
    };
    let before = no_backend();
    let got = traffic(&d, 3, Duration::ZERO);
    assert!(got.iter().all(|(_, r)| r.is_err()), "{got:?}");
    assert!(no_backend() > before, "dropped as no_backend");
    assert!(
        agent
            .events(&[("message", "updating the datapath failed")])
            .is_empty(),
        "every ring change applied; log:\n{}",
        agent.log_text()
    );
}
