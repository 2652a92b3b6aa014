//! `lb lab demo` (what `cargo xtask demo` runs): the lab, the agent in front
//! of three backends, steady HTTP from the clients, a backend killed and
//! brought back, a live view, and a report of what was measured in this run.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub mod nodes;

use crate::{
    api::{self, BackendInfo, BackendState, Request, StatsInfo},
    config::file::Health,
    tools::lab::{self, Lab, Sample},
    vocab::{Forwarding, HashInput},
};

const RATE: u32 = 200;
const KILL_AT: f64 = 5.0;
const BACK_AT: f64 = 10.0;
const END_AT: f64 = 15.0;
const VICTIM: usize = 2;

struct Cleanup {
    lab: Lab,
    agent: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exe = std::env::current_exe();
        if let Ok(exe) = exe {
            let _ = Command::new(exe)
                .args(["down", "--instance", &self.lab.prefix, "--socket"])
                .arg(self.lab.socket())
                .stdout(Stdio::null())
                .status();
        }
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.lab.down();
    }
}

fn backends(socket: &Path) -> Result<Vec<BackendInfo>> {
    Ok(serde_json::from_value(api::call(
        socket,
        &Request::BackendList { vip: None },
    )?)?)
}

pub fn run() -> Result<()> {
    let lab = Lab::new("lab");
    println!(
        "==> building the lab: 2 clients (16 addresses), LB, 3 backends, one bridge (network namespaces)"
    );
    lab.up()?;
    let mut cleanup = Cleanup {
        lab: lab.clone(),
        agent: None,
    };
    let cfg_path = lab.run_dir().join("lb.toml");
    std::fs::write(
        &cfg_path,
        lab.agent_file(
            Forwarding::Dsr,
            HashInput::FiveTuple,
            Health::http("/healthz"),
        )
        .to_toml("lab agent"),
    )?;
    let log = std::fs::File::create(lab.run_dir().join("agent.log"))?;
    println!(
        "==> starting the agent: VIP {}:80 and [{}]:80, L2 DSR, Maglev, http health checks",
        lab::VIP4,
        lab::VIP6
    );
    let agent = Command::new(std::env::current_exe()?)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    cleanup.agent = Some(agent);
    let socket = lab.socket();
    let t0 = Instant::now();
    loop {
        if let Ok(b) = backends(&socket)
            && b.iter()
                .filter(|b| b.state == BackendState::Up && b.next_hop_known)
                .count()
                == 2 * lab::BACKENDS
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let log = std::fs::read_to_string(lab.run_dir().join("agent.log")).unwrap_or_default();
            bail!("the agent did not become ready; its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    println!(
        "==> {RATE} HTTP requests/s from 16 client addresses, one TCP connection each; \
         b{VICTIM} is killed at {KILL_AT:.0} s and restarted at {BACK_AT:.0} s\n"
    );
    println!(
        "{:>4}  {:>7} {:>7} {:>7} {:>6}   {:<24} datapath",
        "t", "b1/s", "b2/s", "b3/s", "fail", "health b1 b2 b3"
    );
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let start = Instant::now();
    let handles = lab::load(
        &lab,
        false,
        RATE,
        Duration::from_secs_f64(END_AT),
        samples.clone(),
    );
    let mut kill_at = None;
    let mut prev: Option<StatsInfo> = None;
    for sec in 1..=(END_AT as u64) {
        let target = Duration::from_secs(sec);
        loop {
            let now = start.elapsed();
            if kill_at.is_none() && now.as_secs_f64() >= KILL_AT {
                lab.stop_backend(VICTIM)?;
                kill_at = Some(now);
                println!(
                    "      --- b{VICTIM} killed (kill -9 of its server) at t={:.2}s ---",
                    now.as_secs_f64()
                );
            }
            if now.as_secs_f64() >= BACK_AT
                && kill_at.is_some()
                && !std::fs::exists(lab.run_dir().join(format!("b{VICTIM}.pid")))?
            {
                lab.start_backend(VICTIM)?;
                println!(
                    "      --- b{VICTIM} server restarted at t={:.2}s ---",
                    start.elapsed().as_secs_f64()
                );
            }
            if now >= target {
                break;
            }
            std::thread::sleep(Duration::from_millis(20).min(target - now));
        }
        let window = |s: &&Sample| s.at >= target - Duration::from_secs(1) && s.at < target;
        let snap: Vec<Sample> = samples
            .lock()
            .map(|s| s.iter().filter(window).cloned().collect())
            .unwrap_or_default();
        let count = |name: &str| {
            snap.iter()
                .filter(|s| s.result.as_deref() == Ok(name))
                .count()
        };
        let fails = snap.iter().filter(|s| s.result.is_err()).count();
        let health = backends(&socket)
            .map(|b| {
                b.iter()
                    .filter(|b| b.address.is_ipv4())
                    .map(|b| format!("{:<4}", b.state))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|e| format!("? ({e})"));
        let stats: Option<StatsInfo> = api::call(&socket, &Request::Stats)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok());
        let dp = match (&stats, &prev) {
            (Some(s), Some(p)) => {
                let total = |x: &StatsInfo| x.verdicts.values().sum::<u64>();
                let fwd = |x: &StatsInfo| {
                    ["tx", "redirect"]
                        .iter()
                        .filter_map(|k| x.verdicts.get(*k))
                        .sum::<u64>()
                };
                format!(
                    "{} pkt/s, {} forwarded by XDP",
                    total(s) - total(p),
                    fwd(s) - fwd(p)
                )
            }
            _ => String::new(),
        };
        prev = stats;
        println!(
            "{:>3}s  {:>7} {:>7} {:>7} {:>6}   {:<24} {}",
            sec,
            count("b1"),
            count("b2"),
            count("b3"),
            fails,
            health,
            dp
        );
    }
    for h in handles {
        let _ = h.join();
    }
    let kill_at = kill_at.context("the kill never happened")?;
    let all = samples.lock().map(|s| s.clone()).unwrap_or_default();
    report(&all, kill_at, &socket)?;
    println!("\n==> tearing the lab down");
    drop(cleanup);
    println!("done.");
    Ok(())
}

fn report(all: &[Sample], kill_at: Duration, socket: &Path) -> Result<()> {
    let failed: Vec<&Sample> = all.iter().filter(|s| s.result.is_err()).collect();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for s in all {
        if let Ok(n) = &s.result {
            *per.entry(n.clone()).or_default() += 1;
        }
    }
    let ok = all.len() - failed.len();
    println!("\n==> report (measured in this run)");
    println!("requests sent        {}", all.len());
    println!(
        "requests failed      {} (all while b{VICTIM} was dead and not yet taken out)",
        failed.len()
    );
    let last_to_dead = failed.iter().map(|s| s.at).filter(|a| *a >= kill_at).max();
    match last_to_dead {
        Some(t) => println!(
            "kill → last new connection reaching the dead backend: {:.0} ms",
            (t - kill_at).as_secs_f64() * 1e3
        ),
        None => println!("kill → last new connection reaching the dead backend: none reached it"),
    }
    if let Ok(b) = backends(socket) {
        for b in b.iter().filter(|b| b.address.is_ipv4()) {
            println!(
                "health {:<14} {:<5} transitions {}",
                b.address.to_string(),
                b.state,
                b.transitions
            );
        }
    }
    println!("distribution of the {ok} answered requests:");
    for (name, n) in &per {
        println!(
            "  {name}: {n:>6}  ({:.1} %)",
            *n as f64 * 100.0 / ok.max(1) as f64
        );
    }
    // Requests already in flight to b2 when it dies fail too: allow those
    // that started up to 200 ms before the kill.
    let outside = failed
        .iter()
        .filter(|s| {
            s.at + Duration::from_millis(200) < kill_at || s.at > kill_at + Duration::from_secs(1)
        })
        .count();
    if outside > 0 {
        bail!("{outside} requests failed outside the second after the kill");
    }
    Ok(())
}
