//! End-to-end scenarios on the lab (`lb lab`): the real agent binary, the
//! lab's backend HTTP servers, HTTP from 16 client addresses. The tests in
//! this file run one at a time (each builds its own lab, and the VM has two
//! cores); each removes its lab, agent and pins, also when it fails.
//! (Failover and drain run once, in `agent.rs`, on the data-center
//! topology.)

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_user::{
    api::{self, BackendInfo, BackendState, Request},
    config::file::{self, File, Health},
    tools::lab::{self, Lab, Sample},
    vocab::{
        Forwarding::{self, Dsr, Gue, Ipip, Nat},
        HashInput::{self, FiveTuple, SourceIp},
        Scheduler,
    },
};

const LB: &str = env!("CARGO_BIN_EXE_lb");
static SERIAL: Mutex<()> = Mutex::new(());

struct Running {
    lab: Lab,
    agent: Option<Child>,
    config: PathBuf,
}

impl Running {
    /// Builds the lab `prefix` and starts the agent with the given VIP
    /// settings and health check.
    fn start(prefix: &str, forwarding: Forwarding, hash: HashInput, health: Health) -> Self {
        Self::start_on(
            Lab::with_exe(prefix, std::path::Path::new(LB)),
            forwarding,
            hash,
            health,
        )
    }

    /// [`Running::start`] on a lab built as the caller chose.
    fn start_on(lab: Lab, forwarding: Forwarding, hash: HashInput, health: Health) -> Self {
        lab.up().expect("lab up");
        let config = lab.run_dir().join("lb.toml");
        let mut r = Running {
            lab,
            agent: None,
            config,
        };
        r.agent_with(forwarding, hash, health);
        r
    }

    fn agent_with(&mut self, forwarding: Forwarding, hash: HashInput, health: Health) {
        self.agent_sched(forwarding, hash, Scheduler::Maglev, health);
    }

    fn agent_sched(
        &mut self,
        forwarding: Forwarding,
        hash: HashInput,
        scheduler: Scheduler,
        health: Health,
    ) {
        let mut file = self.lab.agent_file(forwarding, hash, health);
        for v in &mut file.vips {
            v.scheduler = Some(scheduler);
        }
        self.agent_from(&file);
    }

    /// Restarts the agent (detached first) with this configuration and
    /// waits until it is ready.
    fn agent_from(&mut self, file: &File) {
        self.stop_agent();
        std::fs::write(&self.config, file.to_toml("lab agent")).expect("config");
        self.spawn_agent("agent.log");
        let t0 = Instant::now();
        loop {
            if let Ok(b) = self.backends()
                && b.iter()
                    .filter(|b| b.state == BackendState::Up && b.next_hop_known)
                    .count()
                    == 2 * lab::BACKENDS
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "agent not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `lb run` on the config file, logging to `log` in the run dir.
    fn spawn_agent(&mut self, log: &str) {
        let log = std::fs::File::create(self.lab.run_dir().join(log)).expect("log");
        self.agent = Some(
            Command::new(LB)
                .args(["run", "--config"])
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("lb run"),
        );
    }

    /// The agent log `name` once it contains `line` (waiting at most
    /// `limit`; printed with how long it took), or as it is at the limit.
    fn wait_for_log(&self, name: &str, line: &str, limit: Duration) -> String {
        let t0 = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(self.lab.run_dir().join(name)).unwrap_or_default();
            if log.contains(line) || t0.elapsed() > limit {
                println!("{name}: `{line}` after {:.1} s", t0.elapsed().as_secs_f64());
                return log;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_agent(&mut self) {
        let _ = Command::new(LB)
            .args(["down", "--instance", &self.lab.prefix, "--socket"])
            .arg(self.lab.socket())
            .stdout(Stdio::null())
            .status();
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.lab.run_dir().join("agent.log")).unwrap_or_default()
    }

    fn backends(&self) -> anyhow::Result<Vec<BackendInfo>> {
        Ok(serde_json::from_value(api::call(
            &self.lab.socket(),
            &Request::BackendList { vip: None },
        )?)?)
    }

    fn state(&self, addr: &str) -> String {
        self.backends()
            .expect("backends")
            .into_iter()
            .find(|b| b.address.to_string() == addr)
            .map(|b| b.state.to_string())
            .unwrap_or_default()
    }

    /// 4 s of the lab's load (200 requests/s over IPv4) during which the
    /// agent is killed with SIGKILL after 1 s and started again 0.5 s later
    /// (logging to `agent2.log`); every sample.
    fn load_across_kill_9(&mut self) -> Vec<Sample> {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let handles = lab::load(
            &self.lab.clone(),
            false,
            200,
            Duration::from_secs(4),
            samples.clone(),
        );
        std::thread::sleep(Duration::from_millis(1000));
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill(); // SIGKILL: no clean-up at all
            let _ = a.wait();
        }
        std::thread::sleep(Duration::from_millis(500));
        self.spawn_agent("agent2.log");
        for h in handles {
            h.join().unwrap();
        }
        samples.lock().unwrap().clone()
    }

    /// Runs the lab's load for `secs` at `rate`, calling `during` once with
    /// the start time, and returns every sample.
    fn load(&self, v6: bool, rate: u32, secs: f64, during: impl FnOnce(Instant)) -> Vec<Sample> {
        lab::load_during(&self.lab, v6, rate, Duration::from_secs_f64(secs), during)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = self.lab.down();
    }
}

fn per_backend(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        if let Ok(n) = &s.result {
            *m.entry(n.clone()).or_default() += 1;
        }
    }
    m
}

#[test]
fn five_tuple_spreads_evenly_and_source_ip_sticks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-sp", Dsr, FiveTuple, Health::tcp());
    let s = r.load(false, 400, 6.0, |_| {});
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    let m = per_backend(&s);
    let ok = s.len() - failed;
    println!(
        "5-tuple: {} connections from 16 addresses, {failed} failed, per backend {m:?}",
        s.len()
    );
    assert_eq!(failed, 0);
    assert!(ok >= 1500, "enough connections for the statistic");
    for (name, n) in &m {
        let share = *n as f64 / ok as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.1 / 3.0,
            "{name}: share {share:.3} not within ±10 % of 1/3"
        );
    }

    r.agent_with(Dsr, SourceIp, Health::tcp());
    let s = r.load(false, 300, 3.0, |_| {});
    let mut by_client: HashMap<std::net::IpAddr, BTreeMap<String, usize>> = HashMap::new();
    for x in &s {
        let name = x.result.clone().expect("no failures with source-ip");
        *by_client
            .entry(x.client)
            .or_default()
            .entry(name)
            .or_default() += 1;
    }
    let used: std::collections::BTreeSet<&String> =
        by_client.values().flat_map(|m| m.keys()).collect();
    println!(
        "source-ip: {} clients, backends used {used:?}",
        by_client.len()
    );
    assert_eq!(by_client.len(), 16);
    for (c, m) in &by_client {
        assert_eq!(
            m.len(),
            1,
            "every connection of client {c} goes to one backend: {m:?}"
        );
    }
    assert!(
        used.len() >= 2,
        "different clients land on different backends"
    );
}

/// `ipip` and then `gue` (IP in UDP), each over IPv4 and IPv6, through
/// the backends' `lb backend-host` decap; the agent restarts in between
/// and comes up only when every backend's path probe (encapsulated the
/// same way) succeeds.
#[test]
fn ipip_and_gue_with_decap_carry_http_over_ipv4_and_ipv6() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-ip", Ipip, FiveTuple, Health::tcp());
    for mode in ["ipip", "gue"] {
        if mode == "gue" {
            r.agent_with(Gue, FiveTuple, Health::tcp());
        }
        for v6 in [false, true] {
            let s = r.load(v6, 200, 2.0, |_| {});
            let m = per_backend(&s);
            let failed = s.iter().filter(|x| x.result.is_err()).count();
            println!(
                "{mode} {}: {} requests, {failed} failed, {m:?}",
                if v6 { "IPv6" } else { "IPv4" },
                s.len()
            );
            assert_eq!(failed, 0);
            assert_eq!(m.len(), 3, "all three backends answer through their decap");
        }
    }
}

#[test]
fn http_check_takes_out_a_503_backend_and_tcp_check_keeps_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-hc", Dsr, FiveTuple, Health::http("/healthz"));
    r.lab
        .backend_ctl(1, "/admin/fail-health")
        .expect("fail health");
    let t0 = Instant::now();
    while r.state(&lab::backend4(1)) != "down" {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "503 backend not taken out under an http check"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "http check: b1 down {:?} after /healthz turned 503",
        t0.elapsed()
    );
    let b1 = r
        .backends()
        .unwrap()
        .into_iter()
        .find(|b| b.address.to_string() == lab::backend4(1))
        .unwrap();
    assert_eq!(b1.last_result, "status 503");
    let s = r.load(false, 200, 1.5, |_| {});
    assert!(
        s.iter()
            .all(|x| x.result.is_ok() && x.result.as_deref() != Ok("b1")),
        "no traffic to b1"
    );

    // The same failure under a tcp check: the port still accepts, so b1 stays.
    r.agent_with(Dsr, FiveTuple, Health::tcp());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        r.state(&lab::backend4(1)),
        "up",
        "a tcp check only sees that the port accepts"
    );
    let s = r.load(false, 200, 1.5, |_| {});
    assert!(per_backend(&s).contains_key("b1"));
}

/// Mean over the run of (most − fewest) requests in flight across the
/// three backends, under steady load where every 4th request takes 600 ms.
fn inflight_spread(r: &Running) -> (f64, usize) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let handles = lab::load_mix(
        &r.lab,
        false,
        120,
        Duration::from_secs(5),
        Some((4, 600)),
        samples.clone(),
    );
    let mut spreads = Vec::new();
    std::thread::sleep(Duration::from_millis(1000));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(3500) {
        let n: Vec<i64> = (1..=lab::BACKENDS)
            .map(|i| {
                r.lab
                    .backend_ctl(i, "/admin/inflight")
                    .expect("in-flight count of a backend")
                    .trim()
                    .parse()
                    .expect("a number")
            })
            .collect();
        spreads.push((n.iter().max().unwrap() - n.iter().min().unwrap()) as f64);
        std::thread::sleep(Duration::from_millis(50));
    }
    for h in handles {
        h.join().unwrap();
    }
    let samples = samples.lock().unwrap();
    // Enough of both to mean something (a spread over no sample is 0).
    assert!(spreads.len() >= 30, "only {} spread samples", spreads.len());
    assert!(samples.len() >= 400, "only {} requests", samples.len());
    let failed = samples.iter().filter(|s| s.result.is_err()).count();
    (spreads.iter().sum::<f64>() / spreads.len() as f64, failed)
}

#[test]
fn least_connections_keeps_backends_closer_than_round_robin() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-lc", Dsr, FiveTuple, Health::tcp());
    r.agent_sched(Dsr, FiveTuple, Scheduler::RoundRobin, Health::tcp());
    let (rr, rr_failed) = inflight_spread(&r);
    r.agent_sched(Dsr, FiveTuple, Scheduler::LeastConnections, Health::tcp());
    let (lc, lc_failed) = inflight_spread(&r);
    println!(
        "mean spread of in-flight requests across backends (max - min): round-robin {rr:.2}, least-connections {lc:.2}"
    );
    assert_eq!((rr_failed, lc_failed), (0, 0));
    // Three runs on this VM (2026-11-27): round-robin 3.80 / 4.74 / 4.29,
    // least-connections 1.08 / 0.98 / 1.00, a ratio of 0.21-0.28; 0.6 leaves
    // room for a noisy machine and still fails when least-connections is no
    // better than round-robin.
    assert!(
        lc <= 0.6 * rr,
        "least-connections ({lc:.2}) should keep backends much closer than round-robin ({rr:.2})"
    );
}

#[test]
fn region_clients_stay_on_their_backend_and_fall_back_when_it_dies() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-rg", Dsr, FiveTuple, Health::tcp());
    // Client 1's eight addresses form region "near", served by b1 alone.
    let prefixes: Vec<String> = (0..lab::ADDRS_PER_CLIENT)
        .map(|k| format!("{}/32", lab::client4(1, k)))
        .collect();
    let mut file = r.lab.agent_file(Dsr, FiveTuple, Health::tcp());
    file.vips[0].regions.push(file::Region {
        name: "near".into(),
        prefixes,
        backends: vec![lab::backend4(1)],
    });
    r.agent_from(&file);
    let is_c1 =
        |s: &Sample| (0..lab::ADDRS_PER_CLIENT).any(|k| s.client.to_string() == lab::client4(1, k));
    let s = r.load(false, 200, 2.0, |_| {});
    let near: BTreeMap<String, usize> =
        per_backend(&s.iter().filter(|x| is_c1(x)).cloned().collect::<Vec<_>>());
    let far: BTreeMap<String, usize> =
        per_backend(&s.iter().filter(|x| !is_c1(x)).cloned().collect::<Vec<_>>());
    println!("region clients: {near:?}; other clients: {far:?}");
    assert_eq!(
        near.keys().collect::<Vec<_>>(),
        ["b1"],
        "region clients only on the region's backend"
    );
    assert_eq!(far.len(), 3, "other clients over every backend");

    // b1 dies: once it is out, the region's clients fall back to b2 and b3.
    r.lab.stop_backend(1).unwrap();
    let t0 = Instant::now();
    while r.state(&lab::backend4(1)) != "down" {
        assert!(t0.elapsed() < Duration::from_secs(2), "b1 not taken out");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = r.load(false, 200, 2.0, |_| {});
    let near = per_backend(&s.iter().filter(|x| is_c1(x)).cloned().collect::<Vec<_>>());
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    println!("after b1 died, region clients: {near:?}, {failed} failed");
    assert_eq!(failed, 0, "region clients are not dropped");
    assert!(!near.contains_key("b1") && !near.is_empty());
}

#[test]
fn agent_kill_9_and_restart_under_steady_traffic_fails_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-rs", Dsr, FiveTuple, Health::tcp());
    let s = r.load_across_kill_9();
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    // The new agent loads (and the kernel verifies) the datapath while the
    // pinned one goes on forwarding; its log says when it has adopted it.
    let log = r.wait_for_log(
        "agent2.log",
        "adopted the running datapath",
        Duration::from_secs(20),
    );
    println!(
        "{} requests across kill -9 and restart of the agent, {failed} failed",
        s.len()
    );
    assert!(s.len() > 600);
    assert_eq!(failed, 0);
    assert!(log.contains("adopted the running datapath"), "{log}");
}

/// Full NAT on the lab with bare backends (no VIP on loopback, no
/// `lb_decap`: they see the balancer's address as the client): HTTP over
/// IPv4 and IPv6 reaches every backend with no failure, wrk's load passes
/// with no error, and a kill -9 of the agent under steady traffic fails
/// nothing (the flows and their ports are pinned).
#[test]
fn nat_carries_http_to_bare_backends_and_survives_kill_9() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::with_exe("lt-nat", std::path::Path::new(LB)).with_bare_backends();
    let mut r = Running::start_on(lab, Nat, FiveTuple, Health::tcp());
    // A DSR VIP could not work here: the backends do not own the VIP.
    for v6 in [false, true] {
        let s = r.load(v6, 200, 2.0, |_| {});
        let failed = s.iter().filter(|x| x.result.is_err()).count();
        let m = per_backend(&s);
        println!(
            "nat {}: {} requests, {failed} failed, {m:?}",
            if v6 { "IPv6" } else { "IPv4" },
            s.len()
        );
        if failed > 0 {
            let st: serde_json::Value = api::call(&r.lab.socket(), &Request::Stats).expect("stats");
            println!("verdicts {}", st["verdicts"]);
            println!("first error {:?}", s.iter().find(|x| x.result.is_err()));
        }
        assert!(s.len() >= 300, "enough requests");
        assert_eq!(failed, 0, "{}", r.log());
        assert_eq!(m.len(), 3, "all three backends answer");
    }
    // Under wrk (32 connections, Connection: close, 3 s): no connect,
    // write or timeout error, no failed answer.
    let (rps, _, _, _, errors) =
        lb_tests::wrk::wrk(&r.lab.client_ns(1), &format!("http://{}/", lab::VIP4), 3);
    println!("nat: wrk {rps:.0} requests/s, {errors} errors");
    assert_eq!(errors, 0.0, "wrk through the NAT VIP");
    // The translation is the datapath's: replies were counted as such.
    let st: serde_json::Value = api::call(&r.lab.socket(), &Request::Stats).expect("stats");
    let replies = st["verdicts"]["nat_reply"].as_u64().unwrap_or(0);
    assert!(replies >= 600, "nat_reply verdicts: {st}");

    // Live: a NAT VIP on another port to a backend's port 80.
    let cli = |args: &[&str]| {
        let out = Command::new(LB)
            .args(args)
            .arg("--socket")
            .arg(r.lab.socket())
            .output()
            .expect("lb");
        assert!(
            out.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let vip8080 = format!("{}:8080", lab::VIP4);
    cli(&["vip", "add", &vip8080, "--forwarding", "nat"]);
    cli(&[
        "backend",
        "add",
        &vip8080,
        &lab::backend4(2),
        "--port",
        "80",
    ]);
    let listed: Vec<BackendInfo> = serde_json::from_value(
        api::call(
            &r.lab.socket(),
            &Request::BackendList {
                vip: Some(vip8080.parse().unwrap()),
            },
        )
        .expect("backend list"),
    )
    .expect("backend list");
    assert_eq!(
        listed.iter().map(|b| b.port).collect::<Vec<_>>(),
        vec![Some(80)],
        "the backend's own port is listed"
    );
    let t0 = Instant::now();
    let got = loop {
        let got = lb_user::host::netns::in_netns(&r.lab.client_ns(1), || {
            lab::http_get(
                &vip8080.parse().unwrap(),
                Some(lab::client4(1, 0).parse().unwrap()),
                "/",
            )
        })
        .expect("enter the client namespace");
        match got {
            Ok(body) => break body,
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(5),
                "VIP :8080 never answered: {e:#}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("nat: {vip8080} → {}:80 answered {got:?}", lab::backend4(2));
    assert!(got.contains("b2"), "{got}");

    let s = r.load_across_kill_9();
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    println!(
        "nat: {} requests across kill -9 and restart of the agent, {failed} failed",
        s.len()
    );
    assert!(s.len() > 600);
    assert_eq!(failed, 0);
}

/// Path probes (the default, `health.via = "path"`) see what a probe of
/// the backend's address cannot: a `dsr` backend that lost the VIP from its
/// loopback, an `ipip` backend whose `lb backend-host` program is gone. The
/// server keeps answering on its own address all along; the backend is out
/// within the failover bound and back when the path is mended, and `lb
/// health` says why.
#[test]
fn path_probes_take_out_a_backend_the_vip_no_longer_reaches() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = Running::start("lt-pp", Dsr, FiveTuple, Health::tcp());
    let b2 = lab::backend4(2);
    let ns = r.lab.backend_ns(2);
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ip"])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    let wait = |r: &Running, want: &str, what: &str| {
        let t0 = Instant::now();
        while r.state(&b2) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "{what}: b2 is {}",
                r.state(&b2)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    };
    let last_result = |r: &Running| {
        r.backends()
            .expect("backends")
            .into_iter()
            .find(|b| b.address.to_string() == b2)
            .map(|b| (b.last_result, b.probe.unwrap_or_default()))
            .unwrap_or_default()
    };
    let (_, probe) = last_result(&r);
    assert!(probe.contains("via the path (dsr)"), "{probe}");

    // dsr: the VIP leaves b2's loopback; the server still listens.
    ip(&["addr", "del", &format!("{}/32", lab::VIP4), "dev", "lo"]);
    let out = wait(&r, "down", "VIP off the loopback");
    let (why, _) = last_result(&r);
    println!("dsr, VIP removed → b2 down in {out:?}: {why}");
    assert!(why.contains("no answer via the path"), "{why}");
    let direct = lb_user::host::netns::in_netns(&r.lab.lb_ns(), || {
        lab::http_get(&format!("{b2}:80").parse().unwrap(), None, "/")
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .expect("setns");
    assert_eq!(
        direct,
        Ok(()),
        "b2's server still answers on its own address"
    );
    ip(&["addr", "add", &format!("{}/32", lab::VIP4), "dev", "lo"]);
    let back = wait(&r, "up", "VIP back");
    println!("dsr, VIP back → b2 up in {back:?}");

    // ipip: b2's lb_decap is detached.
    r.agent_with(Ipip, FiveTuple, Health::tcp());
    let (_, probe) = last_result(&r);
    assert!(probe.contains("via the path (ipip)"), "{probe}");
    lb_user::backend_host::down(&r.lab.backend_host_instance(2)).expect("detach");
    let out = wait(&r, "down", "decap detached");
    let (why, _) = last_result(&r);
    println!("ipip, decap detached → b2 down in {out:?}: {why}");
    assert!(why.contains("lb backend-host"), "{why}");
    let o = lb_user::backend_host::Options {
        interface: "eth0".into(),
        addresses: vec![b2.parse().unwrap(), lab::backend6(2).parse().unwrap()],
        instance: r.lab.backend_host_instance(2),
        xdp_mode: lb_user::vocab::XdpMode::Native,
        gue_port: lb_common::DEFAULT_GUE_PORT,
    };
    lb_user::host::netns::in_netns(&ns, || lb_user::backend_host::attach(&o).map(|_| ()))
        .expect("setns")
        .expect("attach again");
    let back = wait(&r, "up", "decap back");
    println!("ipip, decap back → b2 up in {back:?}");
}
