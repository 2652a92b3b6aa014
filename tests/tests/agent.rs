//! The agent end to end: `lb run` (the real CLI binary) in the LB namespace
//! of a small data center, real TCP from a client namespace, and the CLI
//! driving it. Every namespace, pin and process is removed at the end, also
//! when a test fails.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod support;

use lb_tests::{Dc, TestServer, ask_vip, backend_addr, dc};
use lb_user::{
    api::{self, BackendInfo, BackendState, Request},
    config::file,
    vocab::{Forwarding, ProbeVia, Scheduler},
};
use support::{Agent, LB, servers};

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

/// What the instance's pinned maps hold for its VIPs, backends and
/// settings (every VIP by id, every backend entry, the settings), read the
/// way another process would: two reads compare equal when the datapath's
/// configuration did not change.
fn pinned_datapath_config(
    instance: &str,
) -> (
    Vec<lb_common::VipById>,
    Vec<lb_common::Backend>,
    lb_common::Settings,
) {
    fn entries<T: aya::Pod + Default + PartialEq>(instance: &str, map: &str) -> Vec<T> {
        let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/{map}"))
            .unwrap_or_else(|e| panic!("pinned {map}: {e}"));
        let a = aya::maps::Array::<_, T>::try_from(aya::maps::Map::Array(md)).expect("array");
        a.iter()
            .map(|v| v.expect("read"))
            .filter(|v| *v != T::default())
            .collect()
    }
    let settings = entries::<lb_common::Settings>(instance, "SETTINGS");
    (
        entries(instance, "VIPS_BY_ID"),
        entries(instance, "BACKENDS"),
        settings.first().copied().unwrap_or_default(),
    )
}

/// Sends `n` requests, `gap` apart, from the client namespace; returns
/// (send time, backend name or error) for each.
fn traffic(d: &Dc, n: usize, gap: Duration) -> Vec<(Instant, Result<String, String>)> {
    d.client
        .enter(|| {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    let r = ask_vip(Duration::from_millis(500)).map_err(|e| e.to_string());
                    if let Some(rest) = gap.checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                    (t, r)
                })
                .collect()
        })
        .expect("setns")
}

/// A connection through the VIP from the client that stays open: the
/// stream and the name of the backend serving it.
fn open_long_lived(d: &Dc) -> (TcpStream, String) {
    d.client
        .enter(|| {
            let vip = "198.18.0.100:8080".parse().unwrap();
            let c = TcpStream::connect_timeout(&vip, Duration::from_secs(1)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut line = String::new();
            BufReader::new(c.try_clone().unwrap())
                .read_line(&mut line)
                .expect("name");
            (c, line.trim().to_string())
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
}

#[test]
fn bad_config_is_refused_and_changes_nothing() {
    let d = dc("agb", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agb", &d, 2);
    let before = agent.cli(&["vip", "list", "--json"]).expect("vip list");
    let maps_before = pinned_datapath_config(&agent.instance);
    assert!(
        !maps_before.0.is_empty() && !maps_before.1.is_empty(),
        "the agent's VIP and backends are in the maps: {maps_before:?}"
    );

    let good = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        good.replace("port = 8080", "port = 8080\nring_size = 65536"),
    )
    .unwrap();
    let err = agent
        .cli(&["reload"])
        .expect_err("reload of a bad file must fail");
    println!("lb reload: {err}");
    assert!(
        err.contains("lb.toml:") && err.contains("ring_size 65536 must be a prime"),
        "{err}"
    );
    assert_eq!(
        agent.cli(&["vip", "list", "--json"]).expect("vip list"),
        before,
        "the agent's model unchanged"
    );
    assert_eq!(
        pinned_datapath_config(&agent.instance),
        maps_before,
        "the datapath's maps unchanged"
    );
    let t = traffic(&d, 30, Duration::ZERO);
    assert!(
        t.iter().all(|(_, r)| r.is_ok()),
        "traffic unaffected: {t:?}"
    );

    // `lb check` says the same without an agent; `lb run` refuses it too.
    let out = Command::new(LB)
        .args(["check", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("must be a prime")
    );

    // A second agent on the same instance is refused.
    std::fs::write(&agent.config, &good).unwrap();
    let out = Command::new(LB)
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("another agent is already running"),
        "{msg}"
    );

    // And the good file reloads.
    agent.cli(&["reload"]).expect("reload good file");
}

/// The instance's pinned `SETTINGS` entry, read the way another process
/// would.
fn pinned_settings(instance: &str) -> lb_common::Settings {
    let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/SETTINGS"))
        .expect("SETTINGS pinned");
    let a = aya::maps::Array::<_, lb_common::Settings>::try_from(aya::maps::Map::Array(md))
        .expect("an array");
    a.get(&0, 0).expect("entry 0")
}

/// A reload that changes `agent.*` settings applies those the datapath can
/// take live (read back from the pinned map, not the agent's model) and
/// refuses the rest where the file sets them, changing nothing.
#[test]
fn agent_settings_in_a_reload_are_applied_or_refused_where_the_file_sets_them() {
    let d = dc("ags", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("ags", &d, 2);
    let good = std::fs::read_to_string(&agent.config).unwrap();
    let before = pinned_settings(&agent.instance);
    assert_eq!(before.ipip_mtu, 1500);

    // Applied live: the path MTU of ipip backends and the NAT port range.
    let live = good.replace(
        "xdp_mode = \"native\"\n",
        "xdp_mode = \"native\"\nipip_mtu = 1400\nnat_ports = \"2000-2999\"\n",
    );
    std::fs::write(&agent.config, &live).unwrap();
    agent.cli(&["reload"]).expect("reload with new settings");
    let s = pinned_settings(&agent.instance);
    assert_eq!(s.ipip_mtu, 1400, "agent.ipip_mtu reached the datapath");
    assert_eq!(
        (s.nat_port_lo, s.nat_port_hi),
        (2000, 2999),
        "agent.nat_ports too"
    );

    // Refused where the file sets it: a capacity (line 7 once the two
    // lines above are in), then a setting read at start.
    for (from, to, want) in [
        (
            "flow_table_size = 65536",
            "flow_table_size = 131072",
            "lb.toml:7:1: agent.flow_table_size: fixed when the datapath is loaded",
        ),
        (
            "metrics_listen = \"127.0.0.1:9100\"",
            "metrics_listen = \"127.0.0.1:9101\"",
            "agent.metrics_listen: read when the agent starts",
        ),
    ] {
        assert!(live.contains(from), "{from}");
        std::fs::write(&agent.config, live.replace(from, to)).unwrap();
        let err = agent.cli(&["reload"]).expect_err("refused");
        println!("lb reload: {err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(
            pinned_settings(&agent.instance),
            s,
            "a refused reload changes nothing"
        );
    }
    // The applied file again: the agent still serves.
    std::fs::write(&agent.config, &live).unwrap();
    agent.cli(&["reload"]).expect("reload");
    let t = traffic(&d, 20, Duration::ZERO);
    assert!(
        t.iter().all(|(_, r)| r.is_ok()),
        "traffic unaffected: {t:?}"
    );
    // And back to the defaults, live.
    std::fs::write(&agent.config, &good).unwrap();
    agent.cli(&["reload"]).expect("reload of the first file");
    assert_eq!(pinned_settings(&agent.instance), before);
}

/// Concurrent CLI edits: 40 `lb backend add` processes at once, then 40
/// removes. Every edit that reports success is in the datapath and in the
/// file, and the file stays valid; a request that merely carries the word
/// "shutdown" in an argument does not stop the agent.
#[test]
fn concurrent_cli_edits_are_all_applied_and_saved() {
    let d = dc("agc", 1).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agc", &d, 1);
    let extra: Vec<String> = (1..=40).map(|i| format!("198.18.5.{i}")).collect();
    let run_all = |verb: &str| -> Vec<Result<String, String>> {
        let children: Vec<_> = extra
            .iter()
            .map(|a| {
                Command::new(LB)
                    .args(["backend", verb, "198.18.0.100:8080", a, "--socket"])
                    .arg(&agent.socket)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn lb")
            })
            .collect();
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().expect("wait lb");
                if out.status.success() {
                    Ok(String::new())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            })
            .collect()
    };
    let in_file = |a: &str| {
        let text = std::fs::read_to_string(&agent.config).expect("config");
        text.contains(&format!("\"{a}\""))
    };

    let added = run_all("add");
    let failed: Vec<_> = added.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "every add succeeds: {failed:?}");
    let listed: Vec<String> = agent
        .backends()
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    for a in &extra {
        assert!(
            listed.contains(a),
            "{a} reported added but not in the agent"
        );
        assert!(in_file(a), "{a} reported added but not in the file");
    }
    let check = Command::new(LB)
        .args(["check", "--config"])
        .arg(&agent.config)
        .output()
        .expect("lb check");
    assert!(check.status.success(), "the edited file stays valid");

    let removed = run_all("remove");
    let failed: Vec<_> = removed.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "every remove succeeds: {failed:?}");
    assert_eq!(
        agent.backends().len(),
        1,
        "only the original backend remains"
    );
    for a in &extra {
        assert!(!in_file(a), "{a} reported removed but still in the file");
    }

    // The word "shutdown" as a value is data, not a command: the CLI
    // refuses it with the valid values, and the agent refuses a raw request
    // that carries it and keeps running.
    let err = agent
        .cli(&["vip", "add", "198.18.0.101:80", "--forwarding", "shutdown"])
        .expect_err("an unknown forwarding mode is refused");
    assert!(
        err.contains("shutdown") && err.contains("dsr, ipip"),
        "{err}"
    );
    let mut raw = std::os::unix::net::UnixStream::connect(&agent.socket).expect("socket");
    raw.write_all(
        b"{\"cmd\":\"edit\",\"edit\":\"vip-add\",\"vip\":\"198.18.0.101:80/tcp\",\"forwarding\":\"shutdown\",\
          \"hash\":\"5-tuple\",\"ring_size\":251,\"flow_table\":true}\n",
    )
    .expect("send");
    let mut answer = String::new();
    BufReader::new(&raw).read_line(&mut answer).expect("answer");
    assert!(
        answer.contains("\"ok\":false") && answer.contains("shutdown"),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let status = agent
        .cli(&["status"])
        .expect("the agent still runs after a request carrying \"shutdown\"");
    // The agent names its version and commit, as `lb --version` does.
    let out = Command::new(LB)
        .arg("--version")
        .output()
        .expect("lb --version");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        version.starts_with("lb ") && version.contains("(commit "),
        "{version}"
    );
    assert!(
        status.contains(&format!("agent      {version}")),
        "lb status names the agent's version: {status}"
    );
}

/// `lb down --instance` finds its agent through the instance lock even when
/// the agent's socket is not the default one; a user who may not use the
/// control socket is told so, not that the agent is not running.
#[test]
fn down_finds_its_agent_and_permission_errors_say_so() {
    let d = dc("agw", 1).expect("dc");
    let _srv = servers(&d);
    let mut agent = Agent::start("agw", &d, 1);

    // As an unprivileged user (a copy of the binary any user may run).
    let dir = std::env::temp_dir().join(format!("lb-agw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let exe = dir.join("lb");
    std::fs::copy(LB, &exe).expect("copy lb");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let msg = String::from_utf8_lossy(&out.stderr);
    println!("as nobody: {msg}");
    assert!(!out.status.success());
    assert!(
        msg.contains("permission denied") && msg.contains("root-only"),
        "{msg}"
    );

    // `lb down` with the default socket (not this agent's).
    let out = Command::new(LB)
        .args(["down", "--instance", &agent.instance])
        .output()
        .expect("lb down");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = agent.child.as_mut().expect("agent process");
    let t0 = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the agent is still running after `lb down --instance`"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/lb/{}", agent.instance)).exists(),
        "pins removed"
    );
}

/// Documented behaviour, end to end: `lb vip remove` / `lb vip add` /
/// `lb backend add` change the live datapath and the file; SIGHUP reloads
/// an edited file; `/metrics` serves an exposition a real Prometheus parser
/// reads, with the counters the traffic moved.
#[test]
fn vip_edits_sighup_and_metrics_end_to_end() {
    let d = dc("age", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("age", &d, 2);
    assert!(
        traffic(&d, 10, Duration::ZERO)
            .iter()
            .all(|(_, r)| r.is_ok())
    );

    // Remove the VIP: nothing answers on it any more, the file lost it.
    agent
        .cli(&["vip", "remove", "198.18.0.100:8080"])
        .expect("vip remove");
    let gone = traffic(&d, 5, Duration::ZERO);
    assert!(
        gone.iter().all(|(_, r)| r.is_err()),
        "a removed VIP is not served: {gone:?}"
    );
    let text = std::fs::read_to_string(&agent.config).expect("config");
    assert!(!text.contains("198.18.0.100"), "{text}");

    // Add it back with its backends through the CLI.
    agent
        .cli(&[
            "vip",
            "add",
            "198.18.0.100:8080",
            "--hash",
            "source-ip",
            "--health-interval-ms",
            "250",
        ])
        .expect("vip add");
    for i in 1..=2 {
        agent
            .cli(&["backend", "add", "198.18.0.100:8080", &backend_addr(i)])
            .expect("backend add");
    }
    agent.wait_ready(2);
    let back = traffic(&d, 10, Duration::ZERO);
    assert!(back.iter().all(|(_, r)| r.is_ok()), "{back:?}");
    let names: std::collections::BTreeSet<&str> =
        back.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    assert_eq!(
        names.len(),
        1,
        "source-ip: one client, one backend: {names:?}"
    );
    let vips: Vec<api::VipInfo> =
        serde_json::from_str(&agent.cli(&["vip", "list", "--json"]).expect("list")).expect("json");
    assert_eq!(vips[0].hash, api::HashInput::SourceIp);
    assert!(
        vips[0].health.contains("every 250 ms"),
        "{}",
        vips[0].health
    );

    // `lb vip set` changes keys live and writes them back; bad keys and bad
    // values are refused and change nothing.
    agent
        .cli(&[
            "vip",
            "set",
            "198.18.0.100:8080",
            "scheduler=round-robin",
            "health.interval_ms=300",
        ])
        .expect("vip set");
    let vips: Vec<api::VipInfo> =
        serde_json::from_str(&agent.cli(&["vip", "list", "--json"]).expect("list")).expect("json");
    assert_eq!(vips[0].scheduler, api::Scheduler::RoundRobin);
    assert!(
        vips[0].health.contains("every 300 ms"),
        "{}",
        vips[0].health
    );
    let saved = std::fs::read_to_string(&agent.config).expect("config");
    assert!(saved.contains("scheduler = \"round-robin\"") && saved.contains("interval_ms = 300"));
    let err = agent
        .cli(&["vip", "set", "198.18.0.100:8080", "ring_size=100"])
        .expect_err("not a prime");
    assert!(
        err.contains("lb.toml:") && err.contains("must be a prime"),
        "{err}"
    );
    let err = agent
        .cli(&["vip", "set", "198.18.0.100:8080", "port=81"])
        .expect_err("identity key");
    assert!(err.contains("`port` is not a VIP key"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&agent.config).expect("config"),
        saved,
        "refused edits change nothing"
    );
    // Each refusal is one structured log event naming the edit and why.
    let refused = agent.events(&[("message", "change refused, nothing changed")]);
    assert_eq!(refused.len(), 2, "two refusals logged: {refused:?}");
    assert!(
        refused[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("must be a prime"))
            && refused[0]["edit"]
                .as_str()
                .is_some_and(|e| e.contains("ring_size")),
        "{refused:?}"
    );
    agent
        .cli(&["vip", "set", "198.18.0.100:8080", "scheduler=maglev"])
        .expect("back to maglev");

    // SIGHUP: an edited file is applied (weight 0 drains backend 1).
    let text = std::fs::read_to_string(&agent.config).expect("config");
    // The CLI wrote `weight = 1` after the address: set it to 0.
    let at = text
        .find(&format!("address = \"{}\"", backend_addr(1)))
        .expect("backend 1 in the file");
    let w = at + text[at..].find("weight = 1").expect("its weight");
    let edited = format!(
        "{}weight = 0{}",
        &text[..w],
        &text[w + "weight = 1".len()..]
    );
    assert_ne!(edited, text);
    std::fs::write(&agent.config, edited).expect("write");
    let pid = agent.child.as_ref().expect("agent").id().to_string();
    Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    let t0 = Instant::now();
    loop {
        let b1 = agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == backend_addr(1))
            .expect("b1");
        if b1.state == BackendState::Draining && b1.weight == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "SIGHUP did not apply the edited file:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    while agent
        .events(&[("message", "configuration reloaded"), ("source", "SIGHUP")])
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(2), "no reload event");
        std::thread::sleep(Duration::from_millis(20));
    }

    // /metrics (inside the agent's namespace), read by a Prometheus parser.
    let body =
        d.lb.enter(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect("127.0.0.1:9100")?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out)?;
            Ok(out)
        })
        .expect("setns")
        .expect("GET /metrics");
    let (head, text) = body.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a valid Prometheus exposition");
    let value = |name: &str, label: (&str, &str)| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name}{label:?} in:\n{text}"))
    };
    let answered = (10 + 10) as f64;
    // This topology forwards to the backend's segment with XDP_REDIRECT.
    let forwarded = value("lb_verdicts_total", ("reason", "tx"))
        + value("lb_verdicts_total", ("reason", "redirect"));
    assert!(
        forwarded >= 3.0 * answered,
        "{forwarded} packets forwarded for {answered} answered connections"
    );
    assert!(value("lb_vip_new_flows_total", ("vip", "198.18.0.100:8080/tcp")) >= 10.0);
    assert_eq!(
        value("lb_backend_up", ("backend", &backend_addr(2))),
        1.0,
        "a healthy backend is up"
    );
    // Health-probe durations: a histogram per backend, with probes in it.
    let probes = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "lb_health_probe_duration_seconds"
                && s.labels.get("backend") == Some(&backend_addr(2))
        })
        .unwrap_or_else(|| panic!("no probe histogram for b2 in:\n{text}"));
    let prometheus_parse::Value::Histogram(buckets) = &probes.value else {
        panic!("probe durations are not a histogram: {:?}", probes.value);
    };
    let all = buckets.last().expect("buckets").count;
    assert!(all >= 2.0, "b2 probed at least twice: {buckets:?}");
    assert!(
        buckets.iter().any(|b| b.less_than <= 0.01 && b.count > 0.0),
        "probes on a local veth finish within 10 ms: {buckets:?}"
    );
    // The shipped Grafana dashboard queries only what this exports.
    let exposed = exposed_names(text);
    for (q, names) in dashboard_metrics() {
        for n in names {
            assert!(
                exposed.contains(&n),
                "the dashboard's query {q:?} reads {n}, which /metrics does not export: {exposed:?}"
            );
        }
    }
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
                let c: TcpStream = sock.into();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                BufReader::new(c.try_clone().unwrap())
                    .read_line(&mut line)
                    .expect("name");
                (c, line.trim().to_string())
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

/// The metric names a Prometheus exposition offers to queries: every
/// sample's name, and what each `# TYPE` line's family is queried as
/// (a counter as `NAME_total`, a histogram as `NAME_bucket`, `_sum` and
/// `_count`), so families without a series yet count too.
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut w = t.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every PromQL query of the shipped Grafana dashboard (`dist/grafana/lb.json`:
/// panel targets and template variables), checked to parse as PromQL, and
/// the `lb_*` metric names they use.
fn dashboard_metrics() -> Vec<(String, Vec<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/lb.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    walk(&dash, &mut queries);
    assert!(queries.len() >= 10, "the dashboard's queries: {queries:?}");
    queries
        .into_iter()
        .map(|q| {
            // Grafana's own variables, as Grafana substitutes them.
            let promql = q.replace("$__rate_interval", "1m").replace("$vip", ".*");
            let names: Vec<String> = promql
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("lb_"))
                .map(str::to_string)
                .collect();
            if !promql.starts_with("label_values(") {
                promql_parser::parser::parse(&promql)
                    .unwrap_or_else(|e| panic!("dashboard query {q:?} is not PromQL: {e}"));
            }
            assert!(!names.is_empty(), "{q:?} reads no lb metric");
            (q, names)
        })
        .collect()
}

/// `lb explain --what-if` predicts what an edit does before it is made:
/// the prediction for removing a backend names the ring the removal then
/// installs, slot for slot per backend (read back from the datapath after
/// the change), sorts the VIP's established flows (those on the removed
/// backend rescheduled, the rest kept), and changes nothing by itself.
#[test]
fn what_if_predicts_the_ring_an_edit_installs() {
    let d = dc("agw", 3).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agw", &d, 3);
    let t = traffic(&d, 30, Duration::ZERO);
    assert!(t.iter().all(|(_, r)| r.is_ok()), "traffic: {t:?}");
    let vip = "198.18.0.100:8080";
    let gone = backend_addr(3);
    let predict = |edit: String| -> serde_json::Value {
        let out = agent
            .cli(&["explain", "--what-if", &edit, "--json"])
            .unwrap_or_else(|e| panic!("what-if {edit}: {e}"));
        serde_json::from_str(&out).expect("JSON")
    };
    let slots = |w: &serde_json::Value, field: &str| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = w["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().expect("address").to_string(),
                    b[field].as_u64().expect("slots"),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    };
    let p = predict(format!("backend remove {vip} {gone}"));
    println!("prediction: {p:#}");
    let before = slots(&p, "slots_before");
    let after = slots(&p, "slots_after");
    assert_eq!(
        before.len(),
        3,
        "three backends in the ring now: {before:?}"
    );
    assert!(
        after.iter().all(|(a, _)| *a != gone) && after.len() == 2,
        "{gone} leaves the ring: {after:?}"
    );
    let f = &p["flows"];
    let n = |k: &str| f[k].as_u64().expect(k);
    assert!(
        n("total") >= 30,
        "the requests' flows are in the table: {f}"
    );
    assert_eq!(
        n("rescheduled") + n("protected") + n("unaffected"),
        n("total"),
        "{f}"
    );
    assert!(n("rescheduled") > 0, "flows on {gone} are rescheduled: {f}");
    // As a person reads it.
    let text = agent
        .cli(&[
            "explain",
            "--what-if",
            &format!("backend remove {vip} {gone}"),
        ])
        .expect("what-if");
    println!("{text}");
    assert!(
        text.contains(&format!(
            "prediction (nothing changed): removed {gone} from {vip}"
        )) && text.contains(&format!("{} would be rescheduled", n("rescheduled"))),
        "{text}"
    );
    // Nothing changed: the backend is still there.
    let listed = agent.cli(&["backend", "list", "--json"]).expect("list");
    assert!(listed.contains(&gone), "{listed}");

    agent
        .cli(&["backend", "remove", vip, &gone])
        .expect("remove");
    // The ring the datapath holds now (a prediction's "now" reads it back).
    let b1 = backend_addr(1);
    let now = predict(format!("backend weight {vip} {b1} 1"));
    assert_eq!(
        slots(&now, "slots_before"),
        after,
        "the installed ring is the one predicted"
    );
    // An edit it does not predict is refused with what it takes.
    let err = agent
        .cli(&["explain", "--what-if", &format!("vip remove {vip}")])
        .expect_err("vip remove is no prediction");
    assert!(err.contains("--what-if"), "{err}");
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
