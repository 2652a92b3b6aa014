//! What the CLI reads: status, VIP and backend lists, traffic counters.

use std::net::SocketAddr;

use anyhow::{Result, bail};

use crate::api::{
    self, AnnounceStatus, BackendInfo, BackendTraffic, CapacityStatus, ExplainInfo, StatsInfo,
    StatusInfo, TrafficInfo, VipInfo, VipRef, VipStatus, VipTraffic,
};
use crate::config::{CheckKind, HashInput};

use super::announce;
use super::health_task::{probe_port, probe_target};
use super::state::{BackendRt, State, addr16, vip_ref};

impl State {
    pub(super) fn status(&self) -> StatusInfo {
        let backends: Vec<&BackendRt> = self.vips.iter().flat_map(|v| &v.backends).collect();
        StatusInfo {
            version: api::VERSION.into(),
            instance: self.cfg.agent.instance.clone(),
            interface: self.cfg.agent.interface.clone(),
            attach: self.attach_desc.clone(),
            config: self.cfg_path.display().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            vips: self.vips.len(),
            backends: backends.len(),
            backends_up: backends.iter().filter(|b| b.up()).count(),
            announce: self.announce.as_ref().map(|r| AnnounceStatus {
                table: r.table,
                drained: self.drained,
            }),
            vip_status: {
                let view = self.announce_view();
                self.vips
                    .iter()
                    .map(|v| VipStatus {
                        vip: vip_ref(&v.cfg),
                        digest: format!("{:016x}", v.digest),
                        announced: self.announce.as_ref().map(|_| {
                            view.get(&v.cfg.address) == Some(&announce::Verdict::Announce)
                        }),
                        why_not: match (&self.announce, view.get(&v.cfg.address)) {
                            (Some(_), Some(announce::Verdict::Withhold(r))) => Some(r.to_string()),
                            _ => None,
                        },
                    })
                    .collect()
            },
            capacity: self.capacity_status().ok(),
        }
    }

    fn capacity_status(&self) -> Result<CapacityStatus> {
        let cap = self.dp.capacity()?;
        let regions: usize = self.vips.iter().map(|v| v.regions.len()).sum();
        Ok(CapacityStatus {
            max_vips: cap.vips,
            vips_used: (self.vips.len() + regions) as u32,
            max_backends: cap.backends,
            backends_used: self.vips.iter().map(|v| v.backends.len()).sum::<usize>() as u32,
            ring_slots: cap.ring_slots,
            ring_slots_used: self
                .vips
                .iter()
                .map(|v| 2 * u64::from(v.cfg.ring_size) * (1 + v.regions.len() as u64))
                .sum(),
            flow_table_size: cap.flows,
            maps_memory_bytes: maps_memlock(),
        })
    }

    pub(super) fn vip_list(&self) -> Vec<VipInfo> {
        self.vips
            .iter()
            .map(|v| VipInfo {
                vip: vip_ref(&v.cfg),
                forwarding: v.cfg.forwarding,
                hash: v.cfg.hash,
                scheduler: v.cfg.scheduler,
                ring_size: v.cfg.ring_size,
                flow_table: v.cfg.flow_table,
                health: {
                    // The ports the probes really go to (a NAT backend with
                    // a port of its own is probed there), as `lb health`
                    // shows per backend.
                    let mut ports: Vec<u16> = v
                        .cfg
                        .backends
                        .iter()
                        .map(|b| probe_port(&v.cfg, b, &v.cfg.health))
                        .collect();
                    ports.sort_unstable();
                    ports.dedup();
                    if ports.is_empty() {
                        ports.push(v.cfg.health.port);
                    }
                    let ports = ports
                        .iter()
                        .map(|p| format!(":{p}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    match &v.cfg.health.kind {
                        CheckKind::None => "none".into(),
                        CheckKind::Tcp => {
                            format!("tcp {ports} every {} ms", v.cfg.health.interval_ms)
                        }
                        CheckKind::Http { path, .. } => {
                            format!("http {ports}{path} every {} ms", v.cfg.health.interval_ms)
                        }
                    }
                },
                backends: v.backends.len(),
                backends_up: v.backends.iter().filter(|b| b.up()).count(),
            })
            .collect()
    }

    pub(super) fn backend_list(&self, only: Option<&VipRef>) -> Vec<BackendInfo> {
        self.vips
            .iter()
            .filter(|v| only.is_none_or(|r| vip_ref(&v.cfg) == *r))
            .flat_map(|v| {
                v.backends.iter().map(|b| BackendInfo {
                    vip: vip_ref(&v.cfg),
                    address: b.cfg.address,
                    port: b.cfg.port,
                    id: b.id,
                    weight: b.cfg.weight,
                    state: b.state(),
                    last_result: b.last_result.clone(),
                    last_latency_ms: b.last_latency_ms,
                    transitions: b.transitions,
                    active_flows: (v.cfg.scheduler
                        == crate::policy::sched::Scheduler::LeastConnections)
                        .then(|| self.active_of(b.id)),
                    next_hop_known: b.resolved,
                    probe: probe_target(&v.cfg, &b.cfg, self.cfg.agent.gue_port),
                })
            })
            .collect()
    }

    pub(super) fn active_of(&self, id: u32) -> u64 {
        self.dp.active(id).unwrap_or(0)
    }

    /// `lb explain`: where a client's connection goes now, computed from
    /// the live maps the way the datapath does (connection table first,
    /// then the Maglev ring slot of the flow hash).
    pub(super) fn explain(&mut self, r: &VipRef, client: SocketAddr) -> Result<ExplainInfo> {
        let vi = self.find_vip(r)?;
        let v = &self.vips[vi];
        if client.is_ipv4() != v.cfg.address.is_ipv4() {
            bail!("client {client} is not of VIP {r}'s address family");
        }
        let (key, cfg) = (v.key, v.cfg.clone());
        let src = addr16(client.ip()).0;
        let hash = match cfg.hash {
            HashInput::SourceIp => lb_common::hash::hash_src(&src),
            HashInput::FiveTuple => {
                lb_common::hash::hash_5tuple(&src, client.port(), cfg.port, key.proto)
            }
        };
        let addr_of = |s: &Self, id: u32| {
            s.vips[vi]
                .backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| b.cfg.address)
        };
        let flow_key = lb_common::FlowKey {
            src,
            dst: key.addr,
            sport: client.port(),
            dport: cfg.port,
            proto: key.proto,
            _pad: 0,
            _pad2: 0,
        };
        let table_backend = if cfg.flow_table {
            self.dp
                .flow(&flow_key)?
                .and_then(|f| addr_of(self, f.backend_id))
        } else {
            None
        };
        let (slot, ring_backend) =
            if cfg.scheduler == crate::vocab::Scheduler::Maglev && cfg.regions.is_empty() {
                let slot = hash % cfg.ring_size;
                let id = self.dp.ring_slot(&key, slot)?;
                (Some(slot), addr_of(self, id))
            } else {
                (None, None)
            };
        let (backend, via) = match (table_backend, slot, ring_backend) {
            (Some(b), _, _) => (Some(b), "connection table".to_string()),
            (None, Some(s), Some(b)) => (Some(b), format!("ring slot {s}")),
            (None, Some(s), None) => (None, format!("ring slot {s} is empty: no live backend")),
            (None, None, _) if !cfg.regions.is_empty() => (
                None,
                "the VIP has regions: the client's region ring decides (not evaluated here)".into(),
            ),
            (None, None, _) => (
                None,
                format!(
                    "scheduler `{}` decides per new flow from its own state; no fixed answer",
                    cfg.scheduler
                ),
            ),
        };
        // The second chance: where the ring decides, the previous ring's
        // backend of the same slot, if it is another live one.
        let second_hop = match (table_backend, slot, cfg.second_chance_s > 0) {
            (None, Some(s), true) => self
                .dp
                .prev_ring_slot(&key, s)?
                .filter(|id| Some(*id) != self.dp.ring_slot(&key, s).ok())
                .and_then(|id| {
                    self.vips[vi]
                        .backends
                        .iter()
                        .find(|b| b.id == id && b.health.up)
                        .map(|b| b.cfg.address)
                }),
            _ => None,
        };
        Ok(ExplainInfo {
            vip: r.clone(),
            client,
            scheduler: cfg.scheduler,
            hash,
            slot,
            ring_backend,
            table_backend,
            backend,
            via,
            second_hop,
        })
    }

    pub(super) fn stats(&mut self) -> Result<StatsInfo> {
        let at_s = self.started.elapsed().as_secs_f64();
        let t = |x: lb_common::Traffic| TrafficInfo {
            packets: x.packets,
            bytes: x.bytes,
            new_flows: x.new_flows,
            active: None,
        };
        let dp = &self.dp;
        let mut vips = Vec::new();
        let mut backends = Vec::new();
        for v in &self.vips {
            vips.push(VipTraffic {
                vip: vip_ref(&v.cfg),
                traffic: t(dp.vip_traffic(v.vip_id)?),
            });
            for b in &v.backends {
                let mut tr = t(dp.backend_traffic(b.id)?);
                if v.cfg.scheduler == crate::policy::sched::Scheduler::LeastConnections {
                    tr.active = Some(dp.active(b.id)?);
                }
                backends.push(BackendTraffic {
                    vip: vip_ref(&v.cfg),
                    backend: b.cfg.address,
                    traffic: tr,
                });
            }
        }
        let verdicts = lb_common::verdict::NAMES
            .iter()
            .map(|n| n.to_string())
            .zip(dp.verdicts()?)
            .collect();
        let flows_not_recorded = dp.flows_unrecorded()?;
        Ok(StatsInfo {
            at_s,
            vips,
            backends,
            verdicts,
            flows_not_recorded,
        })
    }
}

/// The kernel's `memlock` of every BPF map this process holds open (its
/// `/proc/self/fdinfo`): the memory the datapath's maps take. Each map once,
/// by its id: the NAT sweep holds a second handle on `NAT`.
pub(super) fn maps_memlock() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    let field = |t: &str, name: &str| {
        t.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let by_id: std::collections::HashMap<u64, u64> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| Some((field(&t, "map_id:")?, field(&t, "memlock:")?)))
        .collect();
    by_id.values().sum()
}
