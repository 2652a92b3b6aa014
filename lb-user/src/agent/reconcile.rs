//! Reconcile: brings the datapath from the running configuration to a new
//! one, touching only what differs. Every change goes through here:
//! startup (from nothing, or adopting a pinned datapath), reload, CLI edits.
//!
//! `plan` (the pure half, in `plan.rs`) decides, purely from the two VIP
//! lists, what to do; it is unit-tested without BPF. [`State::reconcile`]
//! applies the plan to the datapath and the runtime model.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow};
use lb_common::{VipKey, VipMeta};

use crate::config::{self, Config, Vip};
use crate::datapath::encode;
use crate::policy::health::HealthState;

use super::cpus;
use super::health_task::ProbeJob;
use super::node::warn_multi_node;
use super::plan::{Change, plan, plan_settings};
use super::state::{State, VipRt, vip_flags, vip_key, vip_ref};

impl State {
    fn vip_index(&self, key: &VipKey) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| v.key == *key)
            .context("internal: a planned VIP is not in the runtime model")
    }

    fn backend_index(&self, vi: usize, addr: IpAddr) -> Result<usize> {
        self.vips[vi]
            .backends
            .iter()
            .position(|b| b.cfg.address == addr)
            .context("internal: a planned backend is not in the runtime model")
    }

    /// Brings the datapath from the current configuration to `new`,
    /// applying [`plan`]. Returns the probe tasks to start.
    pub(super) fn reconcile(&mut self, new: Config) -> Result<Vec<ProbeJob>> {
        let settings_changed = plan_settings(&self.cfg.agent, &new.agent)
            .map_err(|r| anyhow!("agent.{}: {}", r.key, r.why))?;
        if settings_changed {
            // Before the VIPs: a new NAT VIP may need a new NAT address.
            self.dp
                .set_settings(&encode::settings(&new.agent, cpus()))?;
            let (v4, v6) = encode::nat_addrs(&new.agent);
            self.dp.set_nat_addrs(&v4, &v6)?;
            tracing::info!("agent settings applied to the datapath");
        }
        // Probe tasks made below encapsulate to the new GUE port.
        let gue_port_changed = new.agent.gue_port != self.cfg.agent.gue_port;
        self.cfg.agent.gue_port = new.agent.gue_port;
        let old: Vec<Vip> = self.vips.iter().map(|v| v.cfg.clone()).collect();
        let want: HashMap<VipKey, &Vip> = new.vips.iter().map(|v| (vip_key(v), v)).collect();
        let cfg_of = |k: &VipKey| -> Result<Vip> {
            want.get(k)
                .map(|v| (*v).clone())
                .context("internal: a planned VIP is not in the new configuration")
        };
        let existing_ids: HashMap<VipKey, u32> = self
            .dp
            .list_vips()?
            .into_iter()
            .map(|(k, m)| (k, m.vip_id))
            .collect();
        let mut spawns = Vec::new();
        for change in plan(&old, &new.vips) {
            match change {
                Change::RemoveVip(key) => {
                    let vi = self.vip_index(&key)?;
                    let v = self.vips.remove(vi);
                    self.dp.remove_vip(&v.key)?;
                    for b in &v.backends {
                        self.forget_backend(&v.key, b.cfg.address, b.id)?;
                    }
                    tracing::info!(vip = %vip_ref(&v.cfg), "VIP removed");
                }
                Change::AddVip(key) => {
                    let used = self.ring_ids_in_use();
                    let max = self.dp.capacity()?.vips;
                    // Keep the id the pinned datapath already has for this
                    // VIP; otherwise take one neither live nor pinned.
                    let vip_id = match existing_ids.get(&key) {
                        Some(id) if !used.contains(id) => *id,
                        _ => (0..max)
                            .find(|i| !used.contains(i) && !existing_ids.values().any(|e| e == i))
                            .or_else(|| (0..max).find(|i| !used.contains(i)))
                            .ok_or_else(|| {
                                anyhow!("at most {max} VIPs plus regions (agent.max_vips)")
                            })?,
                    };
                    self.vips.push(VipRt {
                        // Backends and regions empty: the plan adds them.
                        cfg: Vip {
                            backends: Vec::new(),
                            regions: Vec::new(),
                            ..cfg_of(&key)?
                        },
                        key,
                        vip_id,
                        backends: Vec::new(),
                        regions: Vec::new(),
                        digest: 0,
                        ring_backends: Vec::new(),
                        settled: false,
                    });
                }
                Change::ConfigureVip(key) => {
                    let vcfg = cfg_of(&key)?;
                    let vi = self.vip_index(&key)?;
                    let meta = VipMeta {
                        vip_id: self.vips[vi].vip_id,
                        flags: vip_flags(&vcfg),
                        idle_timeout_s: vcfg.idle_timeout_s,
                        scheduler: vcfg.scheduler.datapath(),
                        ..Default::default()
                    };
                    self.dp.upsert_vip(&key, meta)?;
                }
                Change::SetRegions(key) => {
                    let vi = self.vip_index(&key)?;
                    self.set_regions(vi, &cfg_of(&key)?.regions)?;
                }
                Change::RemoveBackend(key, addr) => {
                    let vi = self.vip_index(&key)?;
                    let bi = self.backend_index(vi, addr)?;
                    let b = self.vips[vi].backends.remove(bi);
                    self.forget_backend(&key, b.cfg.address, b.id)?;
                }
                Change::AddBackend(key, addr) => {
                    let vcfg = cfg_of(&key)?;
                    let bcfg = vcfg
                        .backends
                        .iter()
                        .find(|b| b.address == addr)
                        .context("internal: a planned backend is not configured")?;
                    let vi = self.vip_index(&key)?;
                    let b = self.new_backend(&key, bcfg, &vcfg.health)?;
                    self.vips[vi].backends.push(b);
                    let bi = self.vips[vi].backends.len() - 1;
                    // Its probe takes the VIP's path as configured now.
                    self.vips[vi].cfg = vcfg.clone();
                    spawns.extend(self.probe_job(vi, bi, vcfg.health.clone()));
                    self.write_backend(vi, bi)?;
                }
                Change::UpdateBackend(key, addr) => {
                    let vcfg = cfg_of(&key)?;
                    let vi = self.vip_index(&key)?;
                    let bi = self.backend_index(vi, addr)?;
                    if let Some(bcfg) = vcfg.backends.iter().find(|b| b.address == addr) {
                        self.vips[vi].backends[bi].cfg = bcfg.clone();
                    }
                    self.write_backend(vi, bi)?;
                }
                Change::RestartHealth(key, addr) => {
                    let vcfg = cfg_of(&key)?;
                    let health = vcfg.health.clone();
                    let vi = self.vip_index(&key)?;
                    // The probe takes the VIP's new path (forwarding).
                    self.vips[vi].cfg = vcfg;
                    let bi = self.backend_index(vi, addr)?;
                    let old = &self.vips[vi].backends[bi].health;
                    let was = (old.up, old.checked());
                    // The verdict so far stays (an unchecked backend stays
                    // unchecked), counted again under the new settings;
                    // without checks (`kind = "none"`) a backend is up.
                    let new = if health.kind == config::CheckKind::None {
                        HealthState::known(true, health.rise, health.fall)
                    } else if old.checked() {
                        HealthState::known(old.up, health.rise, health.fall)
                    } else {
                        HealthState::unchecked(health.rise, health.fall)
                    };
                    let changed = (new.up, new.checked()) != was;
                    self.vips[vi].backends[bi].health = new;
                    spawns.extend(self.probe_job(vi, bi, health));
                    if changed {
                        // Its entry and its VIP's ring follow at once (with
                        // `kind = "none"` no transition would ever come).
                        self.write_backend(vi, bi)?;
                        self.rebuild_ring(vi)?;
                    }
                }
                Change::RebuildRing(key) => {
                    let vi = self.vip_index(&key)?;
                    // The ring follows the new settings (size, scheduler).
                    self.vips[vi].cfg = cfg_of(&key)?;
                    self.rebuild_ring(vi)?;
                }
            }
        }
        // Every VIP's runtime settings are the new ones (health settings,
        // ports and paths that the datapath does not hold).
        for v in &mut self.vips {
            if let Some(c) = want.get(&v.key) {
                v.cfg = (*c).clone();
            }
        }
        // A new GUE port: every `gue` backend's path probe goes there.
        if gue_port_changed {
            for vi in 0..self.vips.len() {
                if self.vips[vi].cfg.forwarding == crate::vocab::Forwarding::Gue {
                    let health = self.vips[vi].cfg.health.clone();
                    for bi in 0..self.vips[vi].backends.len() {
                        spawns.extend(self.probe_job(vi, bi, health.clone()));
                    }
                }
            }
        }
        self.dp.set_flood_limit(new.agent.new_flow_limit)?;
        if new.announce != self.cfg.announce || self.announce.is_none() {
            self.set_announce(new.announce.as_ref())?;
        }
        warn_multi_node(&new);
        self.cfg = new;
        self.sync_announce();
        Ok(spawns)
    }
}
