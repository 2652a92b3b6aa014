//! `lb run`: load the datapath, attach it, program VIPs, backends and rings
//! from the configuration, and keep them in line with the backends' health.
//!
//! One tokio task per backend probes it; a transition updates the backend's
//! state in the datapath and rebuilds its VIP's ring (one atomic flip).
//! Backend ids are handed out once, in configuration order, and never reused
//! while the agent runs.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use lb_common::{AF_INET, AF_INET6, BACKEND_DOWN, BACKEND_UP, Backend, VipKey, VipMeta};

use crate::{
    config::{Config, Forwarding, HashInput, Protocol, Vip, XdpMode},
    dataplane::Dataplane,
    health::{HealthState, Outcome, Transition, probe},
    loader, maglev,
};

fn addr16(a: IpAddr) -> ([u8; 16], u8) {
    match a {
        IpAddr::V4(v) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v.octets());
            (o, AF_INET)
        }
        IpAddr::V6(v) => (v.octets(), AF_INET6),
    }
}

fn vip_key(v: &Vip) -> VipKey {
    let (addr, family) = addr16(v.address);
    let proto = match v.protocol {
        Protocol::Tcp => lb_common::PROTO_TCP,
        Protocol::Udp => lb_common::PROTO_UDP,
    };
    VipKey {
        addr,
        port: v.port,
        proto,
        family,
    }
}

/// The next hop towards an address as the kernel knows it.
struct NextHop {
    dev: String,
    own_mac: [u8; 6],
    ifindex: u32,
    /// The neighbour's MAC, once resolved.
    mac: Option<[u8; 6]>,
}

fn next_hop(addr: IpAddr) -> Option<NextHop> {
    let out = std::process::Command::new("ip")
        .args(["-j", "route", "get", &addr.to_string()])
        .output()
        .ok()?;
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let r = routes.get(0)?;
    let dev = r.get("dev")?.as_str()?.to_string();
    let via = r
        .get("gateway")
        .and_then(|g| g.as_str())
        .map(str::to_string)
        .unwrap_or(addr.to_string());
    // Ask netlink (not /sys, which shows the mount namespace's view) for the
    // egress device's own address and index.
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", &dev])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let link = links.get(0)?;
    let own = parse_mac(link.get("address")?.as_str()?)?;
    let ifindex = link.get("ifindex")?.as_u64()? as u32;
    let out = std::process::Command::new("ip")
        .args(["-j", "neigh", "show", "to", &via, "dev", &dev])
        .output()
        .ok()?;
    let neigh: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mac = neigh
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n.get("state")
                .and_then(|s| s.as_array())
                .is_none_or(|s| !s.iter().any(|x| x == "FAILED"))
        })
        .find_map(|n| n.get("lladdr").and_then(|m| m.as_str()).and_then(parse_mac));
    Some(NextHop {
        dev,
        own_mac: own,
        ifindex,
        mac,
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

struct BackendRt {
    id: u32,
    address: IpAddr,
    weight: u32,
    up: bool,
    /// Whether the next-hop MAC is known in the datapath.
    resolved: bool,
}

struct VipRt {
    cfg: Vip,
    key: VipKey,
    backends: Vec<BackendRt>,
}

struct Shared {
    ebpf: Ebpf,
    vips: Vec<VipRt>,
    iface: String,
}

impl Shared {
    fn rebuild_ring(&mut self, vi: usize) -> Result<()> {
        let v = &self.vips[vi];
        let entries: Vec<_> = v
            .backends
            .iter()
            .filter(|b| b.up)
            .map(|b| maglev::Entry {
                id: b.id,
                addr: addr16(b.address).0,
                weight: b.weight,
            })
            .collect();
        let table = maglev::build(&entries, v.cfg.ring_size);
        let key = v.key;
        Dataplane::new(&mut self.ebpf)
            .install_ring(&key, &table)
            .context("installing ring")?;
        Ok(())
    }

    /// Writes backend `bi` of VIP `vi` with its current next hop and state.
    fn write_backend(&mut self, vi: usize, bi: usize) -> Result<bool> {
        let b = &self.vips[vi].backends[bi];
        let (addr, family) = addr16(b.address);
        let mut entry = Backend {
            addr,
            family,
            state: if b.up { BACKEND_UP } else { BACKEND_DOWN },
            ..Default::default()
        };
        let id = b.id;
        let mut resolved = false;
        if let Some(NextHop {
            dev,
            own_mac,
            ifindex,
            mac,
        }) = next_hop(b.address)
        {
            entry.src_mac = own_mac;
            entry.ifindex = if dev == self.iface { 0 } else { ifindex };
            if let Some(m) = mac {
                entry.dst_mac = m;
                resolved = true;
            }
            let mut dp = Dataplane::new(&mut self.ebpf);
            if entry.ifindex != 0 {
                dp.add_tx_port(ifindex)
                    .with_context(|| format!("adding {dev} as a redirect target"))?;
            }
        }
        Dataplane::new(&mut self.ebpf).set_backend(id, &entry)?;
        self.vips[vi].backends[bi].resolved = resolved;
        Ok(resolved)
    }
}

/// A health transition, as the agent reports it to an embedding caller.
#[derive(Clone, Debug)]
pub struct Event {
    pub backend: IpAddr,
    pub up: bool,
    pub reason: String,
    pub at: std::time::Instant,
}

/// Runs the agent until SIGINT/SIGTERM.
pub fn run(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        run_until(cfg, shutdown, None).await
    })
}

/// Runs the agent until `shutdown` completes; health transitions are also
/// sent to `events` (tests drive the agent this way).
pub async fn run_until(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    events: Option<std::sync::mpsc::Sender<Event>>,
) -> Result<()> {
    let mut ebpf = loader::load(&loader::LoadOptions {
        flow_table_size: cfg.agent.flow_table_size,
    })?;
    Dataplane::new(&mut ebpf).set_settings(&lb_common::Settings {
        ipip_src_v4: cfg.agent.ipip_source_v4.octets(),
        ipip_src_v6: cfg.agent.ipip_source_v6.octets(),
    })?;
    let mut next_id = 1u32;
    let mut vips = Vec::new();
    for (vip_id, v) in cfg.vips.iter().enumerate() {
        let key = vip_key(v);
        let mut flags = 0;
        if v.forwarding == Forwarding::Ipip {
            flags |= lb_common::VIP_F_IPIP;
        }
        if v.hash == HashInput::SourceIp {
            flags |= lb_common::VIP_F_HASH_SRC_IP;
        }
        if !v.flow_table {
            flags |= lb_common::VIP_F_NO_FLOW_TABLE;
        }
        let meta = VipMeta {
            vip_id: vip_id as u32,
            flags,
            idle_timeout_s: v.idle_timeout_s,
            ..Default::default()
        };
        Dataplane::new(&mut ebpf).upsert_vip(&key, meta)?;
        let backends = v
            .backends
            .iter()
            .map(|b| {
                let id = next_id;
                next_id += 1;
                BackendRt {
                    id,
                    address: b.address,
                    weight: b.weight,
                    up: true,
                    resolved: false,
                }
            })
            .collect();
        vips.push(VipRt {
            cfg: v.clone(),
            key,
            backends,
        });
    }
    let mut shared = Shared {
        ebpf,
        vips,
        iface: cfg.agent.interface.clone(),
    };
    for vi in 0..shared.vips.len() {
        for bi in 0..shared.vips[vi].backends.len() {
            shared.write_backend(vi, bi)?;
        }
        shared.rebuild_ring(vi)?;
    }
    let mode = match cfg.agent.xdp_mode {
        XdpMode::Native => loader::AttachMode::Native,
        XdpMode::Skb => loader::AttachMode::Skb,
        XdpMode::Auto => loader::AttachMode::Auto,
    };
    let used = loader::attach(
        &mut shared.ebpf,
        lb_common::PROG_BALANCER,
        &cfg.agent.interface,
        mode,
    )?;
    eprintln!(
        "lb: attached to {} ({used:?} mode), {} VIP(s), {} backend(s)",
        cfg.agent.interface,
        shared.vips.len(),
        next_id - 1
    );

    let shared = Arc::new(Mutex::new(shared));
    let started = Instant::now();
    let n_vips = shared
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .vips
        .len();
    for vi in 0..n_vips {
        let (health, addrs) = {
            let s = shared.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let v = &s.vips[vi];
            (
                v.cfg.health.clone(),
                v.backends.iter().map(|b| b.address).collect::<Vec<_>>(),
            )
        };
        for (bi, address) in addrs.into_iter().enumerate() {
            let shared = shared.clone();
            let health = health.clone();
            let events = events.clone();
            tokio::spawn(async move {
                let mut state = HealthState::new(health.rise, health.fall);
                let interval = Duration::from_millis(health.interval_ms);
                let target = SocketAddr::new(address, health.port);
                // Spread the probes of different backends (and a little
                // jitter per round) so they do not fire in lockstep.
                let mut seed = (vi as u64 * 7919 + bi as u64 * 104_729) | 1;
                loop {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let jitter = Duration::from_millis(seed % (health.interval_ms / 10 + 1));
                    let next = tokio::time::Instant::now() + interval + jitter;
                    let outcome = probe(
                        &health.kind,
                        target,
                        Duration::from_millis(health.timeout_ms),
                    )
                    .await;
                    let ok = outcome == Outcome::Ok;
                    let transition = state.observe(ok);
                    if let Ok(mut s) = shared.lock() {
                        if let Some(t) = transition {
                            s.vips[vi].backends[bi].up = t == Transition::Up;
                            let why = match &outcome {
                                Outcome::Ok => "healthy".to_string(),
                                Outcome::Fail(r) => r.clone(),
                            };
                            eprintln!(
                                "lb: t={:.3}s backend {address} of VIP {}:{} is {} ({why})",
                                started.elapsed().as_secs_f64(),
                                s.vips[vi].cfg.address,
                                s.vips[vi].cfg.port,
                                if t == Transition::Up { "UP" } else { "DOWN" },
                            );
                            if let Err(e) = s.write_backend(vi, bi).and_then(|_| s.rebuild_ring(vi))
                            {
                                eprintln!("lb: updating the datapath failed: {e:#}");
                            }
                            if let Some(ev) = &events {
                                let _ = ev.send(Event {
                                    backend: address,
                                    up: t == Transition::Up,
                                    reason: why,
                                    at: std::time::Instant::now(),
                                });
                            }
                        } else if ok && !s.vips[vi].backends[bi].resolved {
                            // Probes resolve the neighbour; pick up a MAC that was unknown.
                            let _ = s.write_backend(vi, bi);
                        }
                    }
                    tokio::time::sleep_until(next).await;
                }
            });
        }
    }

    shutdown.await;
    eprintln!("lb: shutting down, detaching from {}", cfg.agent.interface);
    Ok(())
}
