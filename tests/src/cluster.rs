//! A routed lab with one `lb run` per LB node, for the multi-node tests
//! and the node-failover benchmark. Everything it starts (agents, pins,
//! the lab's namespaces and daemons) is removed when it drops, also when a
//! test fails.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_user::{
    api::{self, BackendInfo, BackendState, Request, StatsInfo, StatusInfo},
    config::file::{File, Health},
    tools::lab::{self, Lab, Sample},
    vocab::{Forwarding, HashInput},
};

/// Node `n`'s configuration with the lab's VIPs in `forwarding` mode,
/// hashing `hash`, TCP-checked (every scenario's health check).
pub fn node_file(lab: &Lab, n: usize, forwarding: Forwarding, hash: HashInput) -> File {
    lab.node_file(n, forwarding, hash, Health::tcp())
}

/// Writes node `n`'s configuration file.
fn write_node(path: &std::path::Path, n: usize, file: &File) {
    std::fs::write(path, file.to_toml(&format!("lab agent, node {n}"))).expect("config");
}

pub fn vip4() -> IpAddr {
    lab::VIP4.parse().expect("literal")
}
pub fn vip6() -> IpAddr {
    lab::VIP6.parse().expect("literal")
}

/// A routed lab with one agent per node.
pub struct Cluster {
    pub lab: Lab,
    /// The `lb` binary the agents run.
    exe: PathBuf,
    /// One slot per node; a Mutex so scenarios can kill and restart agents
    /// from inside a load run.
    agents: Mutex<Vec<Option<Child>>>,
}

impl Cluster {
    /// Builds `lab` (its `exe` is the `lb` binary) and starts one agent per
    /// node; returns once every agent is ready and the router routes each
    /// VIP over every node.
    pub fn start(lab: Lab) -> Self {
        Self::start_with(lab, |lab, n| {
            node_file(lab, n, Forwarding::Dsr, HashInput::FiveTuple)
        })
    }

    /// [`Cluster::start`] with node `n`'s configuration from `config`.
    pub fn start_with(lab: Lab, config: impl Fn(&Lab, usize) -> File) -> Self {
        let nodes = lab.nodes;
        lab.up().expect("lab up");
        for n in 1..=nodes {
            write_node(
                &lab.run_dir().join(format!("lb{n}.toml")),
                n,
                &config(&lab, n),
            );
        }
        let c = Cluster {
            exe: lab.exe.clone(),
            lab,
            agents: Mutex::new((0..nodes).map(|_| None).collect()),
        };
        for n in 1..=nodes {
            c.spawn(n);
        }
        for n in 1..=nodes {
            c.wait_ready(n);
        }
        for vip in [vip4(), vip6()] {
            let t = c
                .lab
                .wait_next_hops(vip, nodes, Duration::from_secs(15))
                .expect("router learns the VIP from every node");
            println!("router: {vip} via {nodes} nodes after {t:?} more");
        }
        c
    }

    pub fn config_path(&self, n: usize) -> PathBuf {
        self.lab.run_dir().join(format!("lb{n}.toml"))
    }

    /// Brings node `n` back (link, BIRD, its agent) and waits until the
    /// agent is ready and the router routes the IPv4 VIP over every node
    /// again; how long the router took after the agent was ready.
    pub fn revive(&self, n: usize) -> Duration {
        self.lab.revive_node(n).expect("revive the node");
        self.spawn(n);
        self.wait_ready(n);
        let nodes = self.agents.lock().expect("agents").len();
        self.lab
            .wait_next_hops(vip4(), nodes, Duration::from_secs(10))
            .expect("the router takes the node back")
    }

    pub fn spawn(&self, n: usize) {
        let config = self.config_path(n);
        if !config.exists() {
            write_node(
                &config,
                n,
                &node_file(&self.lab, n, Forwarding::Dsr, HashInput::FiveTuple),
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.run_dir().join(format!("agent{n}.log")))
            .expect("log");
        self.agents.lock().expect("agents")[n - 1] = Some(
            Command::new(&self.exe)
                .args(["run", "--config"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("lb run"),
        );
    }

    pub fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.lab.run_dir().join(format!("agent{n}.log")))
            .unwrap_or_default()
    }

    pub fn call(&self, n: usize, req: &Request) -> anyhow::Result<serde_json::Value> {
        api::call(&self.lab.socket_of(n), req)
    }

    pub fn backends(&self, n: usize) -> Vec<BackendInfo> {
        serde_json::from_value(
            self.call(n, &Request::BackendList { vip: None })
                .expect("backend list"),
        )
        .expect("json")
    }

    pub fn status(&self, n: usize) -> StatusInfo {
        serde_json::from_value(self.call(n, &Request::Status).expect("status")).expect("json")
    }

    /// New flows node `n` has scheduled (both VIPs).
    pub fn new_flows(&self, n: usize) -> u64 {
        let s: StatsInfo =
            serde_json::from_value(self.call(n, &Request::Stats).expect("stats")).expect("json");
        s.vips.iter().map(|v| v.traffic.new_flows).sum()
    }

    pub fn wait_ready(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            if let Ok(v) = self.call(n, &Request::BackendList { vip: None })
                && let Ok(list) = serde_json::from_value::<Vec<BackendInfo>>(v)
                && !list.is_empty()
                && list
                    .iter()
                    // (Checked and healthy; a drained backend is too.)
                    .all(|b| {
                        matches!(b.state, BackendState::Up | BackendState::Draining)
                            && b.next_hop_known
                    })
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "agent {n} not ready:\n{}",
                self.log(n)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node switches to `hash` (file rewritten, `lb reload`).
    pub fn set_hash(&self, hash: HashInput) {
        let nodes = self.agents.lock().expect("agents").len();
        for n in 1..=nodes {
            write_node(
                &self.config_path(n),
                n,
                &node_file(&self.lab, n, Forwarding::Dsr, hash),
            );
            self.call(n, &Request::Reload).expect("reload");
        }
    }

    /// Waits until backend `addr` is in `state` on every node; the time.
    pub fn wait_state_everywhere(&self, addr: &str, state: BackendState) -> Duration {
        let t0 = Instant::now();
        let nodes = self.agents.lock().expect("agents").len();
        loop {
            if (1..=nodes).all(|n| {
                self.backends(n)
                    .iter()
                    .any(|b| b.address.to_string() == addr && b.state == state)
            }) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{addr} not {state} on every node"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9_agent(&self, n: usize) {
        let child = self.agents.lock().expect("agents")[n - 1].take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, n: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.exe)
            .args(args)
            .arg("--socket")
            .arg(self.lab.socket_of(n))
            .output()
            .expect("run lb");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Steady new connections (one request each) at `rate`/s for `secs`,
    /// calling `during` with the start time meanwhile.
    pub fn load(
        &self,
        v6: bool,
        rate: u32,
        secs: f64,
        during: impl FnOnce(Instant),
    ) -> Vec<Sample> {
        let s = lab::load_during(&self.lab, v6, rate, Duration::from_secs_f64(secs), during);
        // Every sender must have produced samples (a thread that could not
        // enter its namespace produces none).
        let clients: std::collections::HashSet<IpAddr> = s.iter().map(|x| x.client).collect();
        assert_eq!(
            clients.len(),
            lab::CLIENTS * lab::ADDRS_PER_CLIENT,
            "every client address sent"
        );
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let nodes = self.agents.lock().map(|a| a.len()).unwrap_or(0);
        for n in 1..=nodes {
            let _ = Command::new(&self.exe)
                .args(["down", "--instance", &self.lab.instance_of(n), "--socket"])
                .arg(self.lab.socket_of(n))
                .stdout(Stdio::null())
                .status();
            self.kill9_agent(n);
        }
        let _ = self.lab.down();
    }
}

/// How the second-chance scenario changes every node's ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingChange {
    /// Backends 1 and 2, then backend 3 joins.
    Join,
    /// Backends 1–3, then backend 1 is drained (out of the ring; its
    /// connections stay).
    Drain,
}

/// Node `n`'s configuration for the second-chance scenario: `gue` VIPs,
/// before (`changed = false`) or after the ring change, the second chance
/// on or off.
pub fn gue_config(
    lab: &Lab,
    n: usize,
    change: RingChange,
    changed: bool,
    second_chance: bool,
) -> File {
    let mut f = node_file(lab, n, Forwarding::Gue, HashInput::FiveTuple);
    for vip in &mut f.vips {
        match (change, changed) {
            // Backend 3 joins: before, the VIPs have backends 1 and 2.
            (RingChange::Join, false) => vip.backends.truncate(2),
            // Backend 1 drains.
            (RingChange::Drain, true) => vip.backends[0].drain = true,
            _ => {}
        }
        if !second_chance {
            vip.second_chance = Some(0);
        }
    }
    f
}

/// What [`ring_change_then_node_loss`] saw.
#[derive(Debug, Default)]
pub struct RingChangeRun {
    /// Requests sent after node 1 died, and after it came back fresh.
    pub requests: usize,
    /// Connections broken after node 1 died (client and error).
    pub lost: Vec<String>,
    /// Connections broken after node 1 came back with an empty table.
    pub fresh: Vec<String>,
    /// Packets the backends passed to a second hop.
    pub second_hops: u64,
}

impl std::fmt::Display for RingChangeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests on 64 connections; broken when node 1 died: {} {:?}; when it came back \
             with an empty table: {} {:?}; {} packets passed to a second hop",
            self.requests,
            self.lost.len(),
            self.lost.iter().take(3).collect::<Vec<_>>(),
            self.fresh.len(),
            self.fresh.iter().take(3).collect::<Vec<_>>(),
            self.second_hops
        )
    }
}

/// 64 long-lived keep-alive connections (IPv4) through two nodes; a third
/// backend joins, or backend 1 is drained (`change`: every node's ring
/// changes; a drained backend must then get no new connection); node 1
/// dies, and node 2,
/// which holds none of node 1's flows, takes them and schedules them on
/// the new ring; then node 1 comes back with an empty table (its pins
/// removed) and the router moves flows to it again. The connections the
/// new ring puts elsewhere are saved by the second chance (their first hop
/// has no connection for them and passes them to the backend the previous
/// ring named); without it they break. Each connection asks three times
/// after each event; a broken one is not asked again.
pub fn ring_change_then_node_loss(
    lab: Lab,
    change: RingChange,
    second_chance: bool,
) -> RingChangeRun {
    use lab::KeepAlive;
    let c = Cluster::start_with(lab.with_nodes(2), |lab, n| {
        gue_config(lab, n, change, false, second_chance)
    });
    let mut conns = Vec::new();
    for cl in 1..=lab::CLIENTS {
        for k in 0..lab::ADDRS_PER_CLIENT {
            for _ in 0..4 {
                let mut ka = KeepAlive::open(&c.lab, cl, k, false).expect("keep-alive connect");
                let first = ka.ask().expect("first request");
                conns.push((ka, first));
            }
        }
    }
    assert_eq!(conns.len(), 64);
    for n in 1..=2 {
        write_node(
            &c.config_path(n),
            n,
            &gue_config(&c.lab, n, change, true, second_chance),
        );
        c.call(n, &Request::Reload).expect("reload");
    }
    match change {
        RingChange::Join => c.wait_state_everywhere(&lab::backend4(3), BackendState::Up),
        RingChange::Drain => {
            c.wait_state_everywhere(&lab::backend4(1), BackendState::Draining);
            // No new connection reaches the drained backend.
            for k in 0..lab::ADDRS_PER_CLIENT {
                let mut ka = KeepAlive::open(&c.lab, 1, k, false).expect("new connection");
                let name = ka.ask().expect("new request");
                assert_ne!(name, "b1", "a new connection reached the drained backend");
            }
            Duration::ZERO
        }
    };
    // `lb explain` names the second hop of flows the change moved.
    let vip: lb_user::api::VipRef = format!("{}:80/tcp", lab::VIP4).parse().expect("vip");
    let named = (40000..40100u16)
        .filter(|port| {
            let v = c
                .call(
                    2,
                    &Request::Explain {
                        vip: vip.clone(),
                        client: std::net::SocketAddr::new(
                            lab::client4(1, 0).parse().unwrap(),
                            *port,
                        ),
                    },
                )
                .expect("explain");
            !v["second_hop"].is_null()
        })
        .count();
    assert_eq!(
        named > 0,
        second_chance,
        "lb explain names a second hop for {named} of 100 new clients"
    );
    // Every connection still works (each node's table keeps its flows).
    for (ka, first) in conns.iter_mut() {
        assert_eq!(&ka.ask().expect("before the loss"), first);
    }
    let mut run = RingChangeRun::default();
    let mut ask_all = |conns: &mut Vec<(KeepAlive, String)>| {
        let mut broken = Vec::new();
        conns.retain_mut(|(ka, first)| {
            for _ in 0..3 {
                run.requests += 1;
                let why = match ka.ask() {
                    Ok(name) if name == *first => continue,
                    Ok(name) => format!("moved from {first} to {name}"),
                    Err(e) => e.to_string(),
                };
                broken.push(format!("{}: {why}", ka.client));
                return false;
            }
            true
        });
        broken
    };
    c.lab.kill_node(1).expect("kill node 1");
    c.kill9_agent(1);
    c.lab
        .wait_next_hops(vip4(), 1, Duration::from_secs(5))
        .expect("the router withdraws node 1");
    let lost = ask_all(&mut conns);
    // Node 1 comes back with nothing pinned: an empty connection table.
    let _ = Command::new(&c.exe)
        .args(["down", "--instance", &c.lab.instance_of(1), "--socket"])
        .arg(c.lab.socket_of(1))
        .stdout(Stdio::null())
        .status();
    c.revive(1);
    let fresh = ask_all(&mut conns);
    // The fresh node took its previous ring from its memory on disk (a
    // drained backend's ring needs none: it follows from the config).
    if second_chance && change == RingChange::Join {
        assert!(
            c.log(1).contains("previous ring remembered"),
            "node 1 remembered its previous ring:\n{}",
            c.log(1)
        );
    }
    run.lost = lost;
    run.fresh = fresh;
    run.second_hops = (1..=lab::BACKENDS)
        .map(|i| {
            lb_user::backend_host::stats(&c.lab.backend_host_instance(i))
                .expect("backend host counters")
                .second_hop
        })
        .sum();
    run
}
