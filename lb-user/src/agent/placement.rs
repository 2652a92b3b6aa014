//! Where new flows go: each VIP's ring (and its regions' rings) rebuilt
//! from the runtime model (`state`) with the VIP's scheduler, and what the
//! second chance keeps of the ring before (its warm-up, its memory across
//! a restart, a drained backend's ring); the ring ids in use; the
//! least-connections counts brought back in line with the table.

use std::collections::HashSet;
use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow};

use crate::api::BackendState;
use crate::config;
use crate::policy::maglev;

use super::history;
use super::state::{BackendRt, RegionRt, State, addr16, monotonic_s, prefix16, vip_ref};

/// FNV-1a over each ring slot's backend address (zeros for an empty slot).
pub(super) fn ring_digest(table: &[u32], addr_of: impl Fn(u32) -> Option<[u8; 16]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in table {
        for b in addr_of(*id).unwrap_or([0; 16]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

impl State {
    pub(super) fn rebuild_ring(&mut self, vi: usize) -> Result<()> {
        let v = &self.vips[vi];
        let entry = |b: &BackendRt| maglev::Entry {
            id: b.id,
            addr: addr16(b.cfg.address).0,
            weight: b.cfg.weight,
        };
        let entries: Vec<_> = v
            .backends
            .iter()
            .filter(|b| b.in_ring())
            .map(entry)
            .collect();
        // The second chance's ring while a backend is drained: the ring
        // with the drained (healthy) backends in it (weight 0 counted as
        // 1), so that their connections stay reachable from any node, a
        // fresh one included, for as long as the drain lasts (see
        // `Dataplane::install_ring_with`).
        let drained: Vec<_> = v
            .backends
            .iter()
            .filter(|b| v.cfg.second_chance_s > 0 && b.state() == BackendState::Draining)
            .map(|b| maglev::Entry {
                weight: b.cfg.weight.max(1),
                ..entry(b)
            })
            .collect();
        // Until every backend has had its first verdict once, the ring is
        // still being built (a start without a datapath to adopt): those
        // rings are no previous ring of anything. (A backend added later
        // is unchecked too, but the ring before it is a real one.)
        let warming = !v.settled
            && v.backends
                .iter()
                .any(|b| b.state() == BackendState::Unchecked);
        let (sched, m, keep_s) = (
            v.cfg.scheduler,
            v.cfg.ring_size,
            if warming { 0 } else { v.cfg.second_chance_s },
        );
        let second_of = |sub: &[maglev::Entry], region: Option<&[IpAddr]>| {
            let extra: Vec<_> = drained
                .iter()
                .filter(|d| region.is_none_or(|r| r.iter().any(|a| addr16(*a).0 == d.addr)))
                .copied()
                .collect();
            (!extra.is_empty()).then(|| {
                let all: Vec<_> = sub.iter().chain(&extra).copied().collect();
                crate::policy::sched::ring(sched, &all, m)
            })
        };
        let mut table = crate::policy::sched::ring(sched, &entries, m);
        if table.is_empty() {
            // No live backend under a list scheduler (round-robin, least
            // connections): one empty slot (id 0 is no backend's), which
            // the datapath answers with `no_backend`, rather than keeping
            // the last list (a dead backend in it) because an empty one
            // cannot be installed.
            table.push(0);
        }
        let digest = ring_digest(&table, |id| {
            entries.iter().find(|e| e.id == id).map(|e| e.addr)
        });
        let drained_ring = second_of(&entries, None);
        let key = v.key;
        let vip_id = v.vip_id;
        let name = vip_ref(&v.cfg).to_string();
        let backends_now: Vec<(IpAddr, u32)> = v
            .backends
            .iter()
            .filter(|b| b.in_ring())
            .map(|b| (b.cfg.address, b.cfg.weight))
            .collect();
        // Started without a datapath that knew a previous ring: the one
        // this node remembers, for what is left of its time.
        let remembered =
            if drained_ring.is_none() && keep_s > 0 && self.dp.prev_until(vip_id)? == 0 {
                self.history.get(&name).map(|(r, left)| {
                    let prev: Vec<_> =
                        r.backends
                            .iter()
                            .filter_map(|(a, w)| {
                                v.backends.iter().find(|b| b.cfg.address == *a).map(|b| {
                                    maglev::Entry {
                                        weight: *w,
                                        ..entry(b)
                                    }
                                })
                            })
                            .collect();
                    (
                        crate::policy::sched::ring(sched, &prev, m),
                        left.min(u64::from(keep_s)) as u32,
                    )
                })
            } else {
                None
            };
        let second = match (&drained_ring, &remembered) {
            (Some(t), _) => Some((t.as_slice(), u32::MAX)),
            (None, Some((t, left))) if !t.is_empty() => {
                tracing::info!(vip = %name, seconds = left, "second chance: the previous ring remembered from before the start");
                Some((t.as_slice(), *left))
            }
            _ => None,
        };
        let changed = digest != self.vips[vi].digest;
        self.dp
            .install_ring_with(&key, &table, keep_s, second)
            .context("installing ring")?;
        // A change after warm-up dates a previous ring: remember it (a ring
        // installed while warming up is nobody's previous ring).
        let old = std::mem::replace(
            &mut self.vips[vi].ring_backends,
            if warming { Vec::new() } else { backends_now },
        );
        if changed && keep_s > 0 && !old.is_empty() && second.is_none() {
            self.history.set(
                &name,
                history::Record {
                    until_unix: history::now_unix() + u64::from(keep_s),
                    backends: old,
                },
            );
        }
        self.vips[vi].digest = digest;
        self.vips[vi].settled |= !warming;
        // Each region: its live backends' ring, or (none live) no entry at
        // all, so that its clients fall back to the whole VIP.
        for r in &self.vips[vi].regions {
            let sub: Vec<_> = entries
                .iter()
                .filter(|e| r.cfg.backends.iter().any(|a| addr16(*a).0 == e.addr))
                .copied()
                .collect();
            let prefixes: Vec<([u8; 16], u32)> = r
                .cfg
                .prefixes
                .iter()
                .map(|(a, l)| (prefix16(*a), *l as u32))
                .collect();
            if sub.is_empty() {
                for (a, l) in &prefixes {
                    self.dp.remove_region(vip_id, *a, *l)?;
                }
                continue;
            }
            let second = second_of(&sub, Some(&r.cfg.backends));
            self.dp.install_region_ring(
                vip_id,
                &prefixes,
                r.ring_id,
                &crate::policy::sched::ring(sched, &sub, m),
                keep_s,
                second.as_deref().map(|t| (t, u32::MAX)),
            )?;
        }
        Ok(())
    }

    /// Ring slots taken: VIP ids and region ring slots share the ring space.
    pub(super) fn ring_ids_in_use(&self) -> HashSet<u32> {
        let vips = self.vips.iter().map(|v| v.vip_id);
        vips.chain(
            self.vips
                .iter()
                .flat_map(|v| v.regions.iter().map(|r| r.ring_id)),
        )
        .collect()
    }

    /// Replaces VIP `vi`'s regions: old prefixes removed, ring slots for new
    /// regions taken from the ids no VIP or region uses.
    pub(super) fn set_regions(&mut self, vi: usize, regions: &[config::Region]) -> Result<()> {
        let vip_id = self.vips[vi].vip_id;
        for r in std::mem::take(&mut self.vips[vi].regions) {
            for (a, l) in &r.cfg.prefixes {
                self.dp.remove_region(vip_id, prefix16(*a), *l as u32)?;
            }
        }
        for r in regions {
            let used = self.ring_ids_in_use();
            let max = self.dp.capacity()?.vips;
            let ring_id = (0..max)
                .rev()
                .find(|i| !used.contains(i))
                .ok_or_else(|| {
                    anyhow!(
                        "no ring id left for region `{}` (VIPs and regions share agent.max_vips = {max})",
                        r.name
                    )
                })?;
            self.vips[vi].regions.push(RegionRt {
                cfg: r.clone(),
                ring_id,
            });
        }
        Ok(())
    }

    /// Least-connections: overwrite each backend's active count with the
    /// number of counted flows in the connection table, so the datapath's
    /// atomic counts cannot drift (evictions and idle expiry never
    /// decrement them).
    pub(super) fn reconcile_active(&mut self) -> Result<()> {
        let lc: Vec<u32> = self
            .vips
            .iter()
            .filter(|v| v.cfg.scheduler == crate::policy::sched::Scheduler::LeastConnections)
            .flat_map(|v| v.backends.iter().map(|b| b.id))
            .collect();
        if lc.is_empty() {
            return Ok(());
        }
        let mut counts: std::collections::HashMap<u32, u64> =
            lc.iter().map(|id| (*id, 0)).collect();
        let now_s = monotonic_s();
        for (_, f) in self.dp.flows()? {
            let idle_limit = self
                .vips
                .iter()
                .find(|v| v.vip_id == f.vip_id as u32)
                .map(|v| v.cfg.idle_timeout_s as u64)
                .unwrap_or(0);
            let expired =
                idle_limit != 0 && now_s.saturating_sub(u64::from(f.last_seen_s)) > idle_limit;
            if f.flags & lb_common::FLOW_F_COUNTED != 0
                && !expired
                && let Some(c) = counts.get_mut(&f.backend_id)
            {
                *c += 1;
            }
        }
        let dp = &mut self.dp;
        for (id, n) in counts {
            dp.set_active(id, n)?;
        }
        Ok(())
    }
}
