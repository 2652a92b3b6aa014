//! `lb lab demo --nodes 2` (what `cargo xtask demo --nodes 2` runs): two LB
//! nodes behind a BGP router, steady new connections, long-lived keep-alive
//! connections and a session kept in Redis; LB node 1 dies at 5 s and comes
//! back at 10 s, node 2 is drained gracefully at 15 s. A live view, then a
//! report of what was measured in this run.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    api::{self, BackendInfo, BackendState, Request, StatsInfo},
    config::file::Health,
    tools::lab::{
        self, KeepAlive, Lab, Sample,
        sessions::{Session, Store},
    },
    vocab::{Forwarding, HashInput},
};

const RATE: u32 = 200;
const KILL_AT: f64 = 5.0;
const BACK_AT: f64 = 10.0;
const DRAIN_AT: f64 = 15.0;
const END_AT: f64 = 20.0;

struct Cluster {
    lab: Lab,
    exe: std::path::PathBuf,
    agents: Vec<Option<Child>>,
}

impl Cluster {
    fn spawn(&mut self, n: usize) -> Result<()> {
        let cfg = self.lab.run_dir().join(format!("lb{n}.toml"));
        let file = self.lab.node_file(
            n,
            Forwarding::Dsr,
            HashInput::FiveTuple,
            Health::http("/healthz"),
        );
        std::fs::write(&cfg, file.to_toml(&format!("lab agent, node {n}")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.lab.run_dir().join(format!("agent{n}.log")))?;
        self.agents[n - 1] = Some(
            Command::new(&self.exe)
                .args(["run", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting an agent")?,
        );
        Ok(())
    }

    fn kill(&mut self, n: usize) {
        if let Some(mut c) = self.agents[n - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_ready(&self, n: usize) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(v) = api::call(&self.lab.socket_of(n), &Request::BackendList { vip: None })
                && let Ok(b) = serde_json::from_value::<Vec<BackendInfo>>(v)
                && b.iter()
                    .filter(|b| b.state == BackendState::Up && b.next_hop_known)
                    .count()
                    == 2 * lab::BACKENDS
            {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(15) {
                let log = std::fs::read_to_string(self.lab.run_dir().join(format!("agent{n}.log")))
                    .unwrap_or_default();
                bail!("agent {n} did not become ready; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn new_flows(&self, n: usize) -> Option<u64> {
        let v = api::call(&self.lab.socket_of(n), &Request::Stats).ok()?;
        let s: StatsInfo = serde_json::from_value(v).ok()?;
        Some(s.vips.iter().map(|v| v.traffic.new_flows).sum())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in 1..=self.agents.len() {
            let _ = Command::new(&self.exe)
                .args(["down", "--instance", &self.lab.instance_of(n), "--socket"])
                .arg(self.lab.socket_of(n))
                .stdout(Stdio::null())
                .status();
            self.kill(n);
        }
        let _ = self.lab.down();
    }
}

/// One request on a long-lived connection or of the session: (time, result).
type Probe = (Duration, Result<String, String>);
/// One request of the Redis session: (time, counter or error).
type SessionProbe = (Duration, Result<u64, String>);

pub fn run(nodes: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let lab = Lab::new("lab").with_nodes(nodes).with_redis();
    println!(
        "==> building the lab: 2 clients (16 addresses), a router, {nodes} LB nodes, 3 backends, Redis; \
         BIRD on the router and on every node (eBGP + BFD 100 ms x 3, ECMP hashed on layer 4)"
    );
    lab.up()?;
    let mut c = Cluster {
        lab: lab.clone(),
        exe,
        agents: (0..nodes).map(|_| None).collect(),
    };
    println!(
        "==> starting one agent per node: VIP {}:80 (and IPv6), DSR, Maglev, announced through kernel table 100",
        lab::VIP4
    );
    for n in 1..=nodes {
        c.spawn(n)?;
    }
    for n in 1..=nodes {
        c.wait_ready(n)?;
    }
    let vip: std::net::IpAddr = lab::VIP4.parse()?;
    lab.wait_next_hops(vip, nodes, Duration::from_secs(15))?;
    println!(
        "==> {RATE} new connections/s, 16 long-lived keep-alive connections, one session in Redis (10 requests/s);\n    \
         node 1 dies at {KILL_AT:.0} s (link down, BIRD and agent killed), comes back at {BACK_AT:.0} s; node 2 is drained at {DRAIN_AT:.0} s\n"
    );

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // The router's next hops for the VIP, sampled every 20 ms.
    let hops: Arc<Mutex<Vec<(Duration, usize)>>> = Arc::default();
    let watcher = {
        let (lab, hops, stop) = (lab.clone(), hops.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = usize::MAX;
            while !stop.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() < END_AT + 5.0 {
                let n = lab.router_next_hops(vip).len();
                if n != last {
                    hops.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((start.elapsed(), n));
                    last = n;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut conns = Vec::new();
    for cl in 1..=lab::CLIENTS {
        for k in 0..lab::ADDRS_PER_CLIENT {
            let mut ka = KeepAlive::open(&lab, cl, k, false)?;
            let first = ka.ask()?;
            conns.push((ka, first));
        }
    }
    let long: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let long_thread = {
        let (long, stop) = (long.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() < END_AT + 5.0 {
                for (ka, first) in conns.iter_mut() {
                    let r = match ka.ask() {
                        Ok(n) if n == *first => Ok(n),
                        Ok(n) => Err(format!("moved from {first} to {n}")),
                        Err(e) => Err(e.to_string()),
                    };
                    long.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((start.elapsed(), r));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let session: Arc<Mutex<Vec<SessionProbe>>> = Arc::default();
    let session_thread = {
        let (session, stop, lab) = (session.clone(), stop.clone(), lab.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut s = Session::new(&lab, 2, lab::ADDRS_PER_CLIENT - 1, Store::Redis)?;
            while !stop.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() < END_AT + 5.0 {
                let r = s.request().map(|r| r.count).map_err(|e| e.to_string());
                session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((start.elapsed(), r));
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
    };
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let load = lab::load(
        &lab,
        false,
        RATE,
        Duration::from_secs_f64(END_AT),
        samples.clone(),
    );

    println!(
        "{:>4}  {:>8} {:>8} {:>6} {:>10} {:>8} {:>7}",
        "t", "node1/s", "node2/s", "failed", "long errs", "session", "routes"
    );
    let (mut kill_at, mut back_at, mut drain) = (None, None, None);
    let mut prev: Vec<Option<u64>> = (1..=nodes).map(|n| c.new_flows(n)).collect();
    for sec in 1..=(END_AT as u64) {
        let target = Duration::from_secs(sec);
        loop {
            let now = start.elapsed();
            let t = now.as_secs_f64();
            if kill_at.is_none() && t >= KILL_AT {
                lab.kill_node(1)?;
                c.kill(1);
                kill_at = Some(now);
                println!("      --- node 1 dies at t={t:.2}s ---");
            }
            if back_at.is_none() && t >= BACK_AT {
                lab.revive_node(1)?;
                c.spawn(1)?;
                back_at = Some(now);
                println!("      --- node 1 back (link, BIRD, agent) at t={t:.2}s ---");
            }
            if drain.is_none() && t >= DRAIN_AT {
                let (exe, sock) = (c.exe.clone(), lab.socket_of(2));
                println!("      --- `lb node drain` on node 2 at t={t:.2}s ---");
                drain = Some(std::thread::spawn(move || {
                    Command::new(exe)
                        .args(["node", "drain", "--timeout", "4", "--socket"])
                        .arg(sock)
                        .output()
                }));
            }
            if now >= target {
                break;
            }
            std::thread::sleep(Duration::from_millis(20).min(target - now));
        }
        let in_sec = |at: Duration| at >= target - Duration::from_secs(1) && at < target;
        // Failures counted in the second they ended (a lost SYN ends with
        // the 1 s connect timeout), so the live view misses none.
        let fails = samples
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|x| in_sec(x.at + x.took) && x.result.is_err())
                    .count()
            })
            .unwrap_or(0);
        let long_errs = long
            .lock()
            .map(|l| l.iter().filter(|(at, r)| in_sec(*at) && r.is_err()).count())
            .unwrap_or(0);
        let sess = session
            .lock()
            .ok()
            .and_then(|s| s.iter().rev().find_map(|(_, r)| r.as_ref().ok().copied()))
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        let now_flows: Vec<Option<u64>> = (1..=nodes).map(|n| c.new_flows(n)).collect();
        let rate = |i: usize| match (
            now_flows.get(i).copied().flatten(),
            prev.get(i).copied().flatten(),
        ) {
            (Some(a), Some(b)) => a.saturating_sub(b).to_string(),
            (None, _) => "down".into(),
            _ => "-".into(),
        };
        let routes = lab.router_next_hops(vip).len();
        println!(
            "{sec:>3}s  {:>8} {:>8} {fails:>6} {long_errs:>10} {sess:>8} {routes:>7}",
            rate(0),
            rate(1)
        );
        prev = now_flows;
    }
    for h in load {
        let _ = h.join();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = long_thread.join();
    let _ = watcher.join();
    session_thread
        .join()
        .map_err(|_| anyhow::anyhow!("session thread panicked"))??;
    let drain_out = match drain.map(|h| h.join()) {
        Some(Ok(Ok(o))) => String::from_utf8_lossy(if o.status.success() {
            &o.stdout
        } else {
            &o.stderr
        })
        .trim()
        .to_string(),
        _ => "did not run".into(),
    };

    let kill_at = kill_at.context("the kill never happened")?;
    let back_at = back_at.context("the node never came back")?;
    let all = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let failed: Vec<Duration> = all
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| s.at)
        .collect();
    let hops = hops.lock().map(|h| h.clone()).unwrap_or_default();
    let withdrawn = hops
        .iter()
        .find(|(at, n)| *at >= kill_at && *n < nodes)
        .map(|(at, _)| *at - kill_at);
    let returned = hops
        .iter()
        .find(|(at, n)| *at >= back_at && *n == nodes)
        .map(|(at, _)| *at - back_at);
    let long = long.lock().map(|l| l.clone()).unwrap_or_default();
    let long_errs: Vec<&Probe> = long.iter().filter(|(_, r)| r.is_err()).collect();
    let sess = session.lock().map(|s| s.clone()).unwrap_or_default();
    let counts: Vec<u64> = sess
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    let continuous = counts.windows(2).all(|w| w[1] == w[0] + 1);

    println!("\n==> report (measured in this run)");
    println!(
        "new connections      {} sent, {} failed",
        all.len(),
        failed.len()
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    match withdrawn {
        Some(d) => println!(
            "kill → node 1's route withdrawn on the router: {:.0} ms (BFD)",
            ms(d)
        ),
        None => println!("kill → node 1's route withdrawn on the router: not seen"),
    }
    match failed
        .iter()
        .filter(|t| **t + Duration::from_millis(200) >= kill_at)
        .max()
    {
        Some(t) => println!(
            "kill → last failed new connection: {:.0} ms after the kill",
            ms(t.saturating_sub(kill_at))
        ),
        None => println!("kill → last failed new connection: none failed"),
    }
    println!(
        "long-lived            {} requests on 16 keep-alive connections, {} errors",
        long.len(),
        long_errs.len()
    );
    println!(
        "Redis session         {} answers, counter {} → {}, {}",
        counts.len(),
        counts.first().copied().unwrap_or(0),
        counts.last().copied().unwrap_or(0),
        if continuous {
            "no count lost or repeated"
        } else {
            "COUNTS NOT CONTINUOUS"
        }
    );
    match returned {
        Some(d) => println!("node 1 back → in the router's route again: {:.0} ms", ms(d)),
        None => println!("node 1 back → in the router's route again: not seen"),
    }
    println!("drain of node 2       {drain_out}");
    println!("\n==> tearing the lab down");
    let outside = failed
        .iter()
        .filter(|t| {
            **t + Duration::from_millis(200) < kill_at || **t > kill_at + Duration::from_secs(2)
        })
        .count();
    drop(c);
    println!("done.");
    if outside > 0 || !long_errs.is_empty() || !continuous {
        bail!(
            "{outside} new connections failed outside the node-loss window, {} long-lived errors, session continuous: {continuous}",
            long_errs.len()
        );
    }
    Ok(())
}
