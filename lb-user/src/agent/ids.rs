//! Backend ids: kept in the pinned `BACKEND_IDS` map with a high-water
//! mark, so they are stable across restarts and never reused while the
//! agent runs; a zeroed backend entry makes flows that still point at a
//! removed id reschedule.

use std::collections::HashSet;
use std::net::IpAddr;

use anyhow::{Result, anyhow};
use lb_common::{Backend, BackendIdKey, VipKey};

use super::state::{State, addr16};

/// Sentinel key in BACKEND_IDS whose value is the next unused backend id.
pub(super) const HIGH_WATER: BackendIdKey = BackendIdKey {
    vip: VipKey {
        addr: [0; 16],
        port: 0,
        proto: 0,
        family: 0,
    },
    addr: [0; 16],
};

impl State {
    /// The backend id of (VIP, address): the one it already has (also from
    /// an earlier agent), or a new one above every id handed out so far.
    pub(super) fn backend_id(&mut self, key: &VipKey, addr: IpAddr) -> Result<u32> {
        let k = BackendIdKey {
            vip: *key,
            addr: addr16(addr).0,
        };
        if let Some(id) = self.dp.backend_id(&k)? {
            return Ok(id);
        }
        let next = self.dp.backend_id(&HIGH_WATER)?.unwrap_or(1).max(1);
        let max = self.dp.capacity()?.backends;
        let id = if next < max {
            next
        } else {
            // Ids exhausted: take one no backend holds and no flow refers to.
            let held = self.dp.backend_ids_held()?;
            let in_flows: HashSet<u32> = self
                .dp
                .flows()?
                .into_iter()
                .map(|(_, f)| f.backend_id)
                .collect();
            (1..max)
                .find(|i| !held.contains(i) && !in_flows.contains(i))
                .ok_or_else(|| anyhow!("all {max} backend ids are in use (agent.max_backends)"))?
        };
        self.dp.set_backend_id(&k, id)?;
        self.dp.set_backend_id(&HIGH_WATER, (id + 1).max(next))?;
        Ok(id)
    }

    /// Forgets every backend an adopted datapath holds that the agent does
    /// not run (its VIP, or the backend itself, left the configuration
    /// while no agent ran): its entry zeroed and its id released, so its
    /// flows reschedule instead of reaching a backend no longer configured
    /// (a VIP the adopting agent removes is gone from the directory, but
    /// a removed backend of a VIP that stays would otherwise stay live).
    pub(super) fn forget_stale_backends(&mut self) -> Result<()> {
        let running: HashSet<(VipKey, [u8; 16], u32)> = self
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |b| (v.key, addr16(b.cfg.address).0, b.id))
            })
            .collect();
        for (k, id) in self.dp.backend_id_entries()? {
            if k == HIGH_WATER || running.contains(&(k.vip, k.addr, id)) {
                continue;
            }
            self.dp.remove_backend_id(&k)?;
            self.dp.set_backend(id, &Backend::default())?;
            tracing::info!(id, "backend no longer configured: forgotten");
        }
        Ok(())
    }

    pub(super) fn forget_backend(&mut self, key: &VipKey, addr: IpAddr, id: u32) -> Result<()> {
        let k = BackendIdKey {
            vip: *key,
            addr: addr16(addr).0,
        };
        self.dp.remove_backend_id(&k)?;
        // A zeroed entry: flows that still point here are rescheduled.
        self.dp.set_backend(id, &Backend::default())?;
        Ok(())
    }
}
