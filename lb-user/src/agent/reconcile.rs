//! Reconcile: brings the datapath from the running configuration to a new
//! one, touching only what differs. Every change goes through here:
//! startup, reload, CLI edits.

use super::*;

impl State {
    /// Brings the datapath from the current configuration to `new`, touching
    /// only what differs. Returns the health tasks to start.
    pub(super) fn reconcile(&mut self, new: Config) -> Result<Vec<Spawn>> {
        if !self.vips.is_empty() && new.agent.interface != self.cfg.agent.interface {
            bail!(
                "agent.interface changed from {} to {}: detach first with `lb down`, then start the agent again",
                self.cfg.agent.interface,
                new.agent.interface
            );
        }
        let mut spawns = Vec::new();
        // VIPs that are gone.
        let keep: HashSet<VipKey> = new.vips.iter().map(vip_key).collect();
        let mut vi = 0;
        while vi < self.vips.len() {
            if keep.contains(&self.vips[vi].key) {
                vi += 1;
                continue;
            }
            let v = self.vips.remove(vi);
            Dataplane::new(&mut self.ebpf).remove_vip(&v.key)?;
            for b in &v.backends {
                self.forget_backend(&v.key, b.cfg.address, b.id)?;
            }
            eprintln!("lb: removed VIP {}", vip_ref(&v.cfg));
        }
        // VIPs that are new or changed.
        let existing_ids: std::collections::HashMap<VipKey, u32> = Dataplane::new(&mut self.ebpf)
            .list_vips()?
            .into_iter()
            .map(|(k, m)| (k, m.vip_id))
            .collect();
        for vcfg in &new.vips {
            let key = vip_key(vcfg);
            let vi = match self.vips.iter().position(|v| v.key == key) {
                Some(i) => i,
                None => {
                    let used = self.ring_ids_in_use();
                    // Keep the id the pinned datapath already has for this VIP;
                    // otherwise take one neither live nor pinned.
                    let vip_id = match existing_ids.get(&key) {
                        Some(id) if !used.contains(id) => *id,
                        _ => (0..MAX_VIPS)
                            .find(|i| !used.contains(i) && !existing_ids.values().any(|e| e == i))
                            .or_else(|| (0..MAX_VIPS).find(|i| !used.contains(i)))
                            .ok_or_else(|| anyhow!("at most {MAX_VIPS} VIPs"))?,
                    };
                    self.vips.push(VipRt {
                        // Regions empty: the comparison below installs them.
                        cfg: Vip {
                            regions: Vec::new(),
                            ..vcfg.clone()
                        },
                        key,
                        vip_id,
                        backends: Vec::new(),
                        regions: Vec::new(),
                        digest: 0,
                    });
                    self.vips.len() - 1
                }
            };
            let meta = VipMeta {
                vip_id: self.vips[vi].vip_id,
                flags: vip_flags(vcfg),
                idle_timeout_s: vcfg.idle_timeout_s,
                scheduler: vcfg.scheduler.datapath(),
                ..Default::default()
            };
            Dataplane::new(&mut self.ebpf).upsert_vip(&key, meta)?;
            let health_changed = self.vips[vi].cfg.health != vcfg.health;
            let mut ring_changed = self.vips[vi].cfg.ring_size != vcfg.ring_size
                || self.vips[vi].backends.is_empty()
                || self.vips[vi].cfg.scheduler != vcfg.scheduler
                || self.vips[vi].cfg.regions != vcfg.regions;
            if self.vips[vi].cfg.regions != vcfg.regions {
                self.set_regions(vi, &vcfg.regions)?;
            }
            self.vips[vi].cfg = vcfg.clone();
            // Backends that are gone.
            let want: HashSet<IpAddr> = vcfg.backends.iter().map(|b| b.address).collect();
            let mut bi = 0;
            while bi < self.vips[vi].backends.len() {
                if want.contains(&self.vips[vi].backends[bi].cfg.address) {
                    bi += 1;
                    continue;
                }
                let b = self.vips[vi].backends.remove(bi);
                self.forget_backend(&key, b.cfg.address, b.id)?;
                ring_changed = true;
            }
            // Backends that are new or changed.
            for bcfg in &vcfg.backends {
                match self.vips[vi]
                    .backends
                    .iter()
                    .position(|b| b.cfg.address == bcfg.address)
                {
                    Some(bi) => {
                        if self.vips[vi].backends[bi].cfg != *bcfg {
                            self.vips[vi].backends[bi].cfg = bcfg.clone();
                            self.write_backend(vi, bi)?;
                            ring_changed = true;
                        }
                        if health_changed {
                            self.next_generation += 1;
                            let b = &mut self.vips[vi].backends[bi];
                            b.generation = self.next_generation;
                            b.health = HealthState::new(vcfg.health.rise, vcfg.health.fall);
                            spawns.push((key, b.cfg.address, b.generation));
                        }
                    }
                    None => {
                        let b = self.new_backend(&key, bcfg, &vcfg.health)?;
                        spawns.push((key, b.cfg.address, b.generation));
                        self.vips[vi].backends.push(b);
                        let bi = self.vips[vi].backends.len() - 1;
                        self.write_backend(vi, bi)?;
                        ring_changed = true;
                    }
                }
            }
            if ring_changed {
                self.rebuild_ring(vi)?;
            }
        }
        if new.announce != self.cfg.announce || self.announce.is_none() {
            self.set_announce(new.announce.as_ref())?;
        }
        warn_multi_node(&new);
        self.cfg = new;
        self.sync_announce();
        Ok(spawns)
    }
}
