//! The agent's runtime model: every VIP with its backends (health, ids,
//! generation of their probe task) and regions, as programmed into the
//! datapath (`placement` rebuilds their rings from it).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use lb_common::VipKey;

use crate::api::{BackendState, VipRef};
use crate::config::{self, BackendCfg, Config, Forwarding, HashInput, Protocol, Vip};
use crate::datapath::Dataplane;
use crate::policy::health::{HealthState, Outcome};

use super::{Event, agent_metrics, announce, history};

pub(super) use crate::datapath::encode::addr16;

pub(super) fn vip_key(v: &Vip) -> VipKey {
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

pub(super) fn vip_ref(v: &Vip) -> VipRef {
    VipRef {
        address: v.address,
        port: v.port,
        protocol: v.protocol,
    }
}

pub(super) fn vip_flags(v: &Vip) -> u32 {
    let mut f = 0;
    match v.forwarding {
        Forwarding::Ipip => f |= lb_common::VIP_F_IPIP,
        Forwarding::Gue => f |= lb_common::VIP_F_IPIP | lb_common::VIP_F_GUE,
        Forwarding::Nat => f |= lb_common::VIP_F_NAT,
        Forwarding::Dsr => {}
    }
    if v.hash == HashInput::SourceIp {
        f |= lb_common::VIP_F_HASH_SRC_IP;
    }
    if !v.flow_table {
        f |= lb_common::VIP_F_NO_FLOW_TABLE;
    }
    if !v.regions.is_empty() {
        f |= lb_common::VIP_F_REGIONS;
    }
    if v.second_chance_s > 0 {
        f |= lb_common::VIP_F_SECOND_CHANCE;
    }
    f
}

/// A client prefix as the REGIONS trie stores it.
pub(super) fn prefix16(a: IpAddr) -> [u8; 16] {
    addr16(a).0
}

/// Seconds on the clock `bpf_ktime_get_ns` reads (CLOCK_MONOTONIC).
pub(super) fn monotonic_s() -> u64 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// How long announcement waits for a new backend's first verdict: two
/// probe rounds (the first probe is sent at once, and gives its verdict
/// within `timeout_ms`).
pub(super) fn first_verdict_bound(h: &config::Health) -> std::time::Duration {
    std::time::Duration::from_millis(2 * (h.interval_ms + h.timeout_ms))
}

pub(super) struct BackendRt {
    pub(super) cfg: BackendCfg,
    pub(super) id: u32,
    pub(super) health: HealthState,
    pub(super) last_result: String,
    pub(super) last_latency_ms: Option<f64>,
    pub(super) transitions: u64,
    pub(super) resolved: bool,
    /// Probe task generation: reports of an older task (health settings
    /// changed since) are ignored.
    pub(super) generation: u64,
    /// Keeps the probe task alive; dropping it (backend removed, task
    /// replaced) ends the task.
    pub(super) probe: Option<tokio::sync::watch::Sender<()>>,
    /// Wakes the probe task for a burst of probes now (a datapath signal).
    pub(super) kick: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Until when announcement waits for this backend's first verdict
    /// (see `unsettled`).
    pub(super) verdict_due: Instant,
}

impl BackendRt {
    pub(super) fn up(&self) -> bool {
        self.health.up
    }
    /// Not probed yet, and not for long: its VIP's address waits for its
    /// verdict before it is announced.
    pub(super) fn unsettled(&self, now: Instant) -> bool {
        !self.health.checked() && now < self.verdict_due
    }
    pub(super) fn in_ring(&self) -> bool {
        self.up() && !self.cfg.drain && self.cfg.weight > 0
    }
    pub(super) fn state(&self) -> BackendState {
        if !self.health.checked() {
            BackendState::Unchecked
        } else if !self.up() {
            BackendState::Down
        } else if self.cfg.drain || self.cfg.weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Up
        }
    }
}

pub(super) struct VipRt {
    pub(super) cfg: Vip,
    pub(super) key: VipKey,
    pub(super) vip_id: u32,
    pub(super) backends: Vec<BackendRt>,
    pub(super) regions: Vec<RegionRt>,
    /// Digest of the active ring as backend addresses (not ids, which are
    /// per node): equal on every node that makes the same choices.
    pub(super) digest: u64,
    /// The backends (address, weight) of the ring installed last: the
    /// previous ring's, remembered on disk, when it changes (`history`).
    pub(super) ring_backends: Vec<(IpAddr, u32)>,
    /// Every backend has had a verdict since the agent started: rings
    /// from now on are real ones (see `rebuild_ring`).
    pub(super) settled: bool,
}

/// A region and its ring slot (allocated like a VIP id). With no live
/// backend its prefixes are removed, so its clients use the whole VIP.
pub(super) struct RegionRt {
    pub(super) cfg: config::Region,
    pub(super) ring_id: u32,
}

pub(super) struct State {
    pub(super) dp: Dataplane,
    pub(super) cfg_path: PathBuf,
    pub(super) cfg: Config,
    pub(super) vips: Vec<VipRt>,
    pub(super) attach_desc: String,
    pub(super) started: Instant,
    pub(super) events: Option<std::sync::mpsc::Sender<Event>>,
    pub(super) next_generation: u64,
    /// Probe durations and transitions, for `/metrics`.
    pub(super) metrics: agent_metrics::AgentMetrics,
    /// Where probe tasks report (see `health_task`).
    pub(super) observations: tokio::sync::mpsc::UnboundedSender<Observation>,
    /// VIP announcement (`[announce]`): the kernel table of our routes.
    pub(super) announce: Option<announce::Routes>,
    /// `lb node drain`: withdraw everything, whatever the backends say.
    pub(super) drained: bool,
    /// Until the datapath is attached nothing is announced or withdrawn.
    pub(super) attached: bool,
    /// The second chance's previous rings, kept on disk across reboots.
    pub(super) history: history::History,
}

/// One probe's outcome, for the applier.
pub(super) struct Observation {
    pub(super) key: VipKey,
    pub(super) vip: VipRef,
    pub(super) address: IpAddr,
    pub(super) generation: u64,
    pub(super) outcome: Outcome,
    pub(super) latency_ms: f64,
    /// Probes sent so far by this task (the next hop is re-read every 25).
    pub(super) round: u64,
}

impl State {
    pub(super) fn new_backend(
        &mut self,
        key: &VipKey,
        cfg: &BackendCfg,
        health: &config::Health,
    ) -> Result<BackendRt> {
        let id = self.backend_id(key, cfg.address)?;
        Ok(BackendRt {
            cfg: cfg.clone(),
            id,
            health: self.initial_health(id, health),
            last_result: "not probed yet".into(),
            last_latency_ms: None,
            transitions: 0,
            resolved: false,
            generation: 0,
            probe: None,
            kick: None,
            verdict_due: Instant::now() + first_verdict_bound(health),
        })
    }

    /// Where a backend's health starts: with checks off (`kind = "none"`)
    /// up; with the state a datapath this agent adopted holds for its id
    /// (a restarted agent keeps what its predecessor knew); else unchecked,
    /// out of the ring until its first probe succeeds.
    fn initial_health(&self, id: u32, health: &config::Health) -> HealthState {
        if health.kind == config::CheckKind::None {
            return HealthState::known(true, health.rise, health.fall);
        }
        match self.dp.backend(id) {
            // A zeroed entry (family 0) is no backend's: removed or never set.
            Ok(b) if b.family != 0 => {
                HealthState::known(b.state != lb_common::BACKEND_DOWN, health.rise, health.fall)
            }
            _ => HealthState::unchecked(health.rise, health.fall),
        }
    }

    pub(super) fn find(&self, key: &VipKey, addr: IpAddr) -> Option<(usize, usize)> {
        let vi = self.vips.iter().position(|v| v.key == *key)?;
        let bi = self.vips[vi]
            .backends
            .iter()
            .position(|b| b.cfg.address == addr)?;
        Some((vi, bi))
    }

    pub(super) fn find_vip(&self, r: &VipRef) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| vip_ref(&v.cfg) == *r)
            .ok_or_else(|| anyhow!("no VIP {r}; `lb vip list` shows the VIPs"))
    }
}
