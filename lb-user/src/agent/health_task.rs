//! Health checking in two halves, so probes keep their own schedule whatever
//! the rest of the agent does:
//!
//! - one probe task per backend ([`spawn_probe`]) owns everything it needs
//!   (a snapshot of the VIP's health settings; new settings start a new
//!   task) and never takes the state lock: it probes, reports the outcome on
//!   a channel, and sleeps until its next turn;
//! - one applier thread ([`spawn_applier`]) takes each report under the
//!   state lock, like every other writer: rise/fall, the datapath entry, the
//!   ring, announcement, and the next hop (a few netlink requests).
//!
//! A CLI edit that holds the lock for a ring rebuild delays when a
//! transition is applied, never when a probe is sent.

use tokio::sync::{Notify, mpsc, watch};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use lb_common::VipKey;

use crate::api::VipRef;
use crate::config::{self, BackendCfg, Vip};
use crate::host::syn_probe;
use crate::policy::health::{Outcome, Transition, probe};
use crate::vocab::{Forwarding, ProbeVia};

use super::nexthop::datapath_state;
use super::state::{Observation, State, vip_ref};
use super::{Event, Shared, agent_metrics, lock};

/// What a probe task needs, fixed for its life.
pub(super) struct ProbeJob {
    pub(super) key: VipKey,
    pub(super) vip: VipRef,
    pub(super) address: IpAddr,
    pub(super) generation: u64,
    pub(super) health: config::Health,
    /// Closed when the backend is removed or its task replaced.
    pub(super) alive: watch::Receiver<()>,
    /// A datapath signal: probe now, a burst (see [`BURST_GAP`]).
    pub(super) kick: Arc<Notify>,
    /// Probe along the VIP's forwarding path (`health.via = "path"`, `dsr`
    /// and `ipip`): a SYN to VIP:port as the balancer delivers it, then,
    /// for `http`, the request to the backend's address.
    pub(super) path: Option<syn_probe::Path>,
    pub(super) report: mpsc::UnboundedSender<Observation>,
}

impl State {
    /// A probe job for backend `bi` of VIP `vi` with `health` (the new
    /// settings: reconcile updates the VIP's own copy last) under a new
    /// generation; the backend's previous task, if any, ends. With health
    /// checks off (`kind = "none"`) there is no task: the backend is up.
    pub(super) fn probe_job(
        &mut self,
        vi: usize,
        bi: usize,
        health: config::Health,
    ) -> Option<ProbeJob> {
        self.next_generation += 1;
        let gue_port = self.cfg.agent.gue_port;
        let v = &mut self.vips[vi];
        let b = &mut v.backends[bi];
        b.generation = self.next_generation;
        if health.kind == config::CheckKind::None {
            b.probe = None;
            b.kick = None;
            b.last_result = "not checked (kind = none)".into();
            return None;
        }
        let (alive_tx, alive) = watch::channel(());
        b.probe = Some(alive_tx);
        let kick = Arc::new(Notify::new());
        b.kick = Some(kick.clone());
        let mut health = health;
        health.port = probe_port(&v.cfg, &b.cfg, &health);
        let path = probe_path(&v.cfg, &b.cfg, &health, gue_port);
        Some(ProbeJob {
            key: v.key,
            vip: vip_ref(&v.cfg),
            address: b.cfg.address,
            generation: b.generation,
            health,
            alive,
            kick,
            path,
            report: self.observations.clone(),
        })
    }

    /// Applies one probe outcome (the applier thread, under the lock).
    fn observe(&mut self, o: Observation) {
        let Some((vi, bi)) = self.find(&o.key, o.address) else {
            return;
        };
        if self.vips[vi].backends[bi].generation != o.generation {
            return;
        }
        let ok = o.outcome == Outcome::Ok;
        let b = &mut self.vips[vi].backends[bi];
        b.last_result = match &o.outcome {
            Outcome::Ok => "ok".into(),
            Outcome::Fail(r) => r.clone(),
        };
        b.last_latency_ms = ok.then_some(o.latency_ms);
        self.metrics
            .probe_seconds
            .get_or_create(&agent_metrics::BackendLabels {
                vip: o.vip.to_string(),
                backend: o.address.to_string(),
            })
            .observe(o.latency_ms / 1e3);
        let b = &mut self.vips[vi].backends[bi];
        // Probes make the kernel resolve the neighbour: pick up a MAC that
        // was unknown or has changed (every 25 probes).
        let needs_hop = ok && (!b.resolved || o.round.is_multiple_of(25));
        if let Some(t) = b.health.observe(ok) {
            // The first verdict of an unchecked backend is not a transition
            // (it was never in the ring), but the ring follows it as well.
            let (up, first) = match t {
                Transition::Up => (true, false),
                Transition::Down => (false, false),
                Transition::Checked { up } => (up, true),
            };
            if !first {
                b.transitions += 1;
            }
            // The next good probe re-reads the next hop (a backend that
            // comes back may have moved).
            b.resolved = false;
            let why = b.last_result.clone();
            let (id, state) = (b.id, datapath_state(b.state()));
            let entered = if up { "up" } else { "down" };
            let msg = if first {
                "backend checked"
            } else {
                "backend health changed"
            };
            if up {
                tracing::info!(vip = %o.vip, backend = %o.address, state = entered, reason = %why, "{msg}");
            } else {
                tracing::warn!(vip = %o.vip, backend = %o.address, state = entered, reason = %why, "{msg}");
            }
            self.metrics
                .verdict(&o.vip.to_string(), &o.address.to_string(), up, first);
            let r = self
                .dp
                .set_backend_state(id, state)
                .map_err(anyhow::Error::from)
                .and_then(|_| self.rebuild_ring(vi));
            if let Err(e) = r {
                tracing::error!(vip = %o.vip, backend = %o.address, error = format!("{e:#}"), "updating the datapath failed");
            }
            self.sync_announce();
            if !first && let Some(ev) = &self.events {
                let _ = ev.send(Event {
                    vip: o.vip.clone(),
                    backend: o.address,
                    up,
                    reason: why,
                    at: Instant::now(),
                });
            }
        }
        if needs_hop && let Err(e) = self.write_backend(vi, bi) {
            tracing::error!(vip = %o.vip, backend = %o.address, error = format!("{e:#}"), "refreshing the next hop failed");
        }
    }
}

/// The gap between the probes of a burst: a datapath signal (see
/// `signals`) makes the probe task probe at once and, while probes fail,
/// again after this gap, up to `fall` probes: a backend that is gone is
/// down after `fall` quick failures instead of `fall` intervals, and a
/// false signal costs a probe that succeeds.
pub(super) const BURST_GAP: Duration = Duration::from_millis(10);

/// The least time between two bursts of one backend: a stream of signals
/// (a busy VIP whose backend hangs) costs at most one burst a second.
pub(super) const BURST_EVERY: Duration = Duration::from_secs(1);

/// Starts the probe task of one backend.
pub(super) fn spawn_probe(job: ProbeJob) {
    tokio::spawn(async move {
        let ProbeJob {
            key,
            vip,
            address,
            generation,
            health,
            mut alive,
            kick,
            path,
            report,
        } = job;
        let mut seed = (generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let target = SocketAddr::new(address, health.port);
        let timeout = Duration::from_millis(health.timeout_ms);
        // The path prober's packet socket, kept from probe to probe.
        let mut prober: Option<syn_probe::Prober> = None;
        // Probes left in the current burst, and when the last one began.
        let mut burst = 0u32;
        let mut last_burst: Option<Instant> = None;
        for round in 0u64.. {
            if alive.has_changed().is_err() {
                return;
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Up to 10 % jitter so probes of many backends do not fire in lockstep.
            let jitter = Duration::from_millis(seed % (health.interval_ms / 10 + 1));
            let mut next =
                tokio::time::Instant::now() + Duration::from_millis(health.interval_ms) + jitter;
            let t0 = Instant::now();
            let outcome = match &path {
                Some(p) => path_probe(&mut prober, p, &health.kind, target, timeout).await,
                None => probe(&health.kind, target, timeout).await,
            };
            let latency_ms = t0.elapsed().as_secs_f64() * 1e3;
            burst = match (burst, &outcome) {
                (0, _) | (_, Outcome::Ok) => 0,
                (n, Outcome::Fail(_)) => n - 1,
            };
            if burst > 0 {
                next = tokio::time::Instant::now() + BURST_GAP;
            }
            let o = Observation {
                key,
                vip: vip.clone(),
                address,
                generation,
                outcome,
                latency_ms,
                round,
            };
            if report.send(o).is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => break,
                    // Only a closed channel wakes this: the task is over.
                    _ = alive.changed() => break,
                    _ = kick.notified() => {
                        if last_burst.is_none_or(|t| t.elapsed() >= BURST_EVERY) {
                            last_burst = Some(Instant::now());
                            burst = health.fall.max(1);
                            tracing::info!(vip = %vip, backend = %address, "a datapath signal: probing the backend at once");
                            break;
                        }
                    }
                }
            }
        }
    });
}

/// Starts the thread that applies probe outcomes. It holds the state only
/// weakly: it ends with the agent (the state dropped, or every sender gone).
pub(super) fn spawn_applier(
    shared: &Shared,
    mut reports: mpsc::UnboundedReceiver<Observation>,
) -> Result<()> {
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("lb-health".into())
        .spawn(move || {
            while let Some(o) = reports.blocking_recv() {
                let Some(shared) = weak.upgrade() else { return };
                let Ok(mut s) = lock(&shared) else { return };
                s.observe(o);
            }
        })
        .context("starting the health applier thread")?;
    Ok(())
}

/// A path probe: the SYN along the path within `limit`, then, for `http`,
/// the request to the backend's own address in what is left of it.
async fn path_probe(
    prober: &mut Option<syn_probe::Prober>,
    p: &syn_probe::Path,
    kind: &config::CheckKind,
    target: SocketAddr,
    limit: Duration,
) -> Outcome {
    let t0 = Instant::now();
    let pp = *p;
    let mine = prober.take();
    let r = tokio::task::spawn_blocking(move || {
        let mut pr = match mine {
            Some(pr) => pr,
            None => match syn_probe::Prober::new(pp.vip.is_ipv4()) {
                Ok(pr) => pr,
                Err(e) => return (None, Err(e)),
            },
        };
        let r = pr.probe(&pp, limit);
        (Some(pr), r)
    })
    .await
    .map(|(pr, r)| {
        *prober = pr;
        r
    });
    match r {
        Ok(Ok(syn_probe::Answer::Open)) => match kind {
            config::CheckKind::Http { .. } => {
                probe(kind, target, limit.saturating_sub(t0.elapsed())).await
            }
            _ => Outcome::Ok,
        },
        Ok(Ok(syn_probe::Answer::Refused)) => Outcome::Fail(format!(
            "refused via the path: nothing listens on {}",
            p.vip
        )),
        Ok(Ok(syn_probe::Answer::Silent)) => Outcome::Fail(match p.encap {
            syn_probe::Encap::None => format!(
                "no answer via the path: is {} on the backend's loopback?",
                p.vip.ip()
            ),
            syn_probe::Encap::Ip | syn_probe::Encap::Gue(_) => format!(
                "no answer via the path: does the backend run lb backend-host, with {} on its \
                 loopback?",
                p.vip.ip()
            ),
        }),
        Ok(Err(e)) => Outcome::Fail(format!("path probe: {e:#}")),
        Err(e) => Outcome::Fail(format!("path probe: {e}")),
    }
}

/// The path a backend's probe takes with `health.via = "path"`: `dsr` and
/// `ipip` VIPs (a `nat` backend's own address is its path). `None`: the
/// probe goes to the backend's address.
pub(super) fn probe_path(
    vip: &Vip,
    b: &BackendCfg,
    health: &config::Health,
    gue_port: u16,
) -> Option<syn_probe::Path> {
    if health.via != ProbeVia::Path || health.kind == config::CheckKind::None {
        return None;
    }
    let encap = match vip.forwarding {
        Forwarding::Dsr => syn_probe::Encap::None,
        Forwarding::Ipip => syn_probe::Encap::Ip,
        Forwarding::Gue => syn_probe::Encap::Gue(gue_port),
        Forwarding::Nat => return None,
    };
    Some(syn_probe::Path {
        vip: SocketAddr::new(vip.address, health.port),
        backend: b.address,
        encap,
    })
}

/// The port a backend's probe goes to: a NAT backend on a port of its own
/// is probed there, unless the health check names a port other than the
/// VIP's; otherwise `health.port` (the VIP's port by default).
pub(super) fn probe_port(vip: &Vip, b: &BackendCfg, health: &config::Health) -> u16 {
    match b.port {
        Some(p) if health.port == vip.port => p,
        _ => health.port,
    }
}

/// What a backend's probe is, as `lb health` and `lb vip list` show it:
/// kind, address, port (and path), exactly where the probe task connects;
/// `None` with `kind = "none"`.
pub(super) fn probe_target(vip: &Vip, b: &BackendCfg, gue_port: u16) -> Option<String> {
    let h = &vip.health;
    let to = SocketAddr::new(b.address, probe_port(vip, b, h));
    let mut hp = h.clone();
    hp.port = probe_port(vip, b, h);
    let via = probe_path(vip, b, &hp, gue_port).map(|p| {
        format!(
            "{} via the path ({}) to {}",
            match p.encap {
                syn_probe::Encap::None => "SYN",
                syn_probe::Encap::Ip => "SYN in IPIP",
                syn_probe::Encap::Gue(_) => "SYN in GUE",
            },
            vip.forwarding,
            p.vip
        )
    });
    match (&h.kind, via) {
        (config::CheckKind::None, _) => None,
        (config::CheckKind::Tcp, Some(via)) => Some(format!("tcp: {via}")),
        (config::CheckKind::Tcp, None) => Some(format!("tcp {to}")),
        (config::CheckKind::Http { path, .. }, Some(via)) => {
            Some(format!("http {to}{path} after a {via}"))
        }
        (config::CheckKind::Http { path, .. }, None) => Some(format!("http {to}{path}")),
    }
}
