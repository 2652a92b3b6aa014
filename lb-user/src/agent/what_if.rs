//! `lb explain --what-if EDIT`: what a backend edit (or a VIP's new
//! `ring_size`) would do before it is made. The new ring is computed with
//! the same policy code the agent installs rings with, from the backends as
//! they are now (health included) with the edit applied, and compared with
//! the ring the datapath holds; the VIP's flows in the live connection table
//! are sorted into those that keep their backend (the ring does not move
//! them, or the table protects them) and those that would be rescheduled
//! (their backend leaves: removed). Nothing is changed.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Result, bail};
use lb_common::hash;

use crate::{
    api::{BackendSlots, WhatIfFlows, WhatIfInfo},
    config::edit::Edit,
    policy::maglev,
    vocab::{HashInput, Scheduler, VipRef},
};

use crate::datapath::encode::addr16;

use super::state::State;

/// Hashes sampled to compare rings of different sizes (a `ring_size`
/// change): every slot of the old ring moves, what matters is the share
/// of the hash space that reaches another backend.
const SAMPLES: u32 = 1 << 20;

impl State {
    pub(super) fn what_if(&mut self, edit: &Edit) -> Result<WhatIfInfo> {
        let vip = edit_vip(edit)?;
        let vi = self.find_vip(&vip)?;
        let v = &self.vips[vi];
        if v.cfg.scheduler != Scheduler::Maglev || !v.cfg.regions.is_empty() {
            bail!(
                "--what-if predicts Maglev rings of VIPs without regions; VIP {vip} uses `{}`{}",
                v.cfg.scheduler,
                if v.cfg.regions.is_empty() {
                    ""
                } else {
                    " with regions"
                }
            );
        }
        // (address, id, weight) of the backends in the ring now, and after.
        let now: Vec<(IpAddr, u32, u32)> = v
            .backends
            .iter()
            .filter(|b| b.in_ring())
            .map(|b| (b.cfg.address, b.id, b.cfg.weight))
            .collect();
        let mut after = now.clone();
        let mut ring_size = v.cfg.ring_size;
        let mut removed: Option<(IpAddr, u32)> = None;
        let known = |a: &IpAddr| v.backends.iter().find(|b| b.cfg.address == *a);
        match edit {
            Edit::BackendAdd {
                address, weight, ..
            } => {
                if known(address).is_some() {
                    bail!("{address} is a backend of {vip} already");
                }
                // A new backend enters the ring once its first probe passes:
                // predicted as if it does. Its id is not given yet.
                after.push((*address, u32::MAX, *weight));
            }
            Edit::BackendRemove { address, .. } => {
                let b = known(address)
                    .ok_or_else(|| anyhow::anyhow!("{address} is no backend of {vip}"))?;
                removed = Some((*address, b.id));
                after.retain(|(a, ..)| a != address);
            }
            Edit::BackendSet {
                address,
                weight,
                drain,
                ..
            } => {
                let b = known(address)
                    .ok_or_else(|| anyhow::anyhow!("{address} is no backend of {vip}"))?;
                let w = weight.unwrap_or(b.cfg.weight);
                let drained = drain.unwrap_or(b.cfg.drain);
                after.retain(|(a, ..)| a != address);
                if b.up() && !drained && w > 0 {
                    after.push((*address, b.id, w));
                }
            }
            Edit::VipSet { settings, .. } => {
                for (k, val) in settings {
                    match k.as_str() {
                        "ring_size" => {
                            ring_size = val.parse().map_err(|_| {
                                anyhow::anyhow!("ring_size `{val}` is not a number")
                            })?;
                            if !maglev::is_prime(ring_size) || ring_size > lb_common::MAX_RING_SIZE
                            {
                                bail!(
                                    "ring_size {ring_size} must be a prime ≤ {}",
                                    lb_common::MAX_RING_SIZE
                                );
                            }
                        }
                        other => bail!(
                            "--what-if predicts `ring_size` among the VIP settings, not `{other}`"
                        ),
                    }
                }
            }
            Edit::VipAdd(_) | Edit::VipRemove { .. } => unreachable!("refused by edit_vip"),
        }
        let entries = |list: &[(IpAddr, u32, u32)]| -> Vec<maglev::Entry> {
            list.iter()
                .map(|(a, id, w)| maglev::Entry {
                    id: *id,
                    addr: addr16(*a).0,
                    weight: *w,
                })
                .collect()
        };
        let key = v.key;
        let (hash_input, port, proto, table_on) =
            (v.cfg.hash, v.cfg.port, key.proto, v.cfg.flow_table);
        let vip_id = v.vip_id;
        let addr_of: BTreeMap<u32, IpAddr> = v
            .backends
            .iter()
            .map(|b| (b.id, b.cfg.address))
            .chain(after.iter().map(|(a, id, _)| (*id, *a)))
            .collect();
        let old_ring = self.dp.ring(&key)?;
        let new_ring = maglev::build(&entries(&after), ring_size);
        let slot_of = |ring: &[u32], h: u32| -> u32 {
            if ring.is_empty() {
                0
            } else {
                ring[(h % ring.len() as u32) as usize]
            }
        };
        // The share of new flows that would reach another backend: slot by
        // slot for rings of one size, over sampled hashes otherwise.
        let (moved, of) = if old_ring.len() == new_ring.len() {
            let m = old_ring
                .iter()
                .zip(&new_ring)
                .filter(|(a, b)| a != b)
                .count() as u64;
            (m, old_ring.len() as u64)
        } else {
            let m = (0..SAMPLES)
                .filter(|i| {
                    // An even spread over the hash space (MurmurHash3's
                    // finalizer of the sample's index).
                    let mut h = i.wrapping_mul(0x9e37_79b1);
                    h ^= h >> 16;
                    h = h.wrapping_mul(0x85eb_ca6b);
                    h ^= h >> 13;
                    slot_of(&old_ring, h) != slot_of(&new_ring, h)
                })
                .count() as u64;
            (m, u64::from(SAMPLES))
        };
        let mut slots: BTreeMap<IpAddr, (u64, u64)> = BTreeMap::new();
        for id in &old_ring {
            if let Some(a) = addr_of.get(id) {
                slots.entry(*a).or_default().0 += 1;
            }
        }
        for id in &new_ring {
            if let Some(a) = addr_of.get(id) {
                slots.entry(*a).or_default().1 += 1;
            }
        }
        // The VIP's flows in the connection table.
        let mut flows = WhatIfFlows::default();
        let mut rescheduled_to: BTreeMap<IpAddr, u64> = BTreeMap::new();
        if table_on {
            for (k, f) in self.dp.flows()? {
                if u32::from(f.vip_id) != vip_id {
                    continue;
                }
                flows.total += 1;
                let h = match hash_input {
                    HashInput::SourceIp => hash::hash_src(&k.src),
                    HashInput::FiveTuple => hash::hash_5tuple(&k.src, k.sport, port, proto),
                };
                let next = slot_of(&new_ring, h);
                if removed.is_some_and(|(_, id)| id == f.backend_id) {
                    flows.rescheduled += 1;
                    if let Some(a) = addr_of.get(&next) {
                        *rescheduled_to.entry(*a).or_default() += 1;
                    }
                } else if next != f.backend_id {
                    flows.protected += 1;
                } else {
                    flows.unaffected += 1;
                }
            }
        }
        flows.rescheduled_to = rescheduled_to
            .into_iter()
            .map(|(address, flows)| (address.to_string(), flows))
            .collect();
        Ok(WhatIfInfo {
            vip,
            ring_size_before: old_ring.len() as u32,
            ring_size_after: ring_size,
            new_flows_moved: moved as f64 / of.max(1) as f64,
            slots_moved: (old_ring.len() == new_ring.len()).then_some(moved),
            backends: slots
                .into_iter()
                .map(|(address, (before, after))| BackendSlots {
                    address,
                    slots_before: before,
                    slots_after: after,
                })
                .collect(),
            flow_table: table_on,
            flows,
        })
    }
}

/// The VIP an edit is about; refuses edits no prediction is made for.
fn edit_vip(edit: &Edit) -> Result<VipRef> {
    Ok(match edit {
        Edit::BackendAdd { vip, .. }
        | Edit::BackendRemove { vip, .. }
        | Edit::BackendSet { vip, .. }
        | Edit::VipSet { vip, .. } => vip.clone(),
        Edit::VipAdd(_) | Edit::VipRemove { .. } => {
            bail!("--what-if predicts backend edits and `vip set VIP ring_size=N`")
        }
    })
}
