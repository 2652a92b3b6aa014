//! What the datapath counts, read (and, for least connections, set) here:
//! verdicts, per-VIP and per-backend traffic, active flows, the flood
//! guard's limit and the flows it kept out.

use std::borrow::BorrowMut;

use aya::{
    Ebpf,
    maps::{Array, PerCpuArray},
};
use lb_common::{Traffic, decap_verdict, verdict};

use super::{Dataplane, Result, map_err};

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    /// Active flows of a backend (least-connections).
    pub fn active(&self, id: u32) -> Result<u64> {
        let name = lb_common::MAP_ACTIVE;
        let a: Array<_, u64> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        a.get(&id, 0).map_err(map_err(name))
    }

    /// Overwrites a backend's active-flow count (the agent's reconciliation).
    pub fn set_active(&mut self, id: u32, n: u64) -> Result<()> {
        let name = lb_common::MAP_ACTIVE;
        let mut a: Array<_, u64> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        a.set(id, n, 0).map_err(map_err(name))
    }

    /// Sets the flood guard: new flows per second per CPU that may be
    /// written to the connection table (0 = no limit). A datapath object
    /// without the guard (an older one) ignores it.
    pub fn set_flood_limit(&mut self, per_cpu_s: u32) -> Result<()> {
        let name = lb_common::MAP_FLOOD_GUARD;
        let Ok(map) = self.map_mut(name) else {
            return Ok(());
        };
        let mut a: Array<_, lb_common::FloodGuard> = Array::try_from(map).map_err(map_err(name))?;
        a.set(
            0,
            lb_common::FloodGuard {
                new_flows_per_cpu_s: per_cpu_s,
                _pad: 0,
            },
            0,
        )
        .map_err(map_err(name))
    }

    /// New flows the flood guard forwarded without a table entry (all CPUs).
    pub fn flows_unrecorded(&self) -> Result<u64> {
        let name = lb_common::MAP_FLOOD_STATE;
        let Ok(map) = self.map(name) else {
            return Ok(0);
        };
        let a: PerCpuArray<_, lb_common::FloodState> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        Ok(a.get(&0, 0)
            .map_err(map_err(name))?
            .iter()
            .map(|s| s.unrecorded)
            .sum())
    }

    pub(super) fn sum_counters(&self, name: &'static str, count: u32) -> Result<Vec<u64>> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        // A datapath built before a reason was added (a pinned map adopted
        // across an upgrade, or the A side of an A/B benchmark) has fewer
        // slots: the reasons it cannot count read as 0.
        let slots = a.len().min(count);
        (0..count)
            .map(|i| {
                if i < slots {
                    a.get(&i, 0).map(|v| v.iter().sum()).map_err(map_err(name))
                } else {
                    Ok(0)
                }
            })
            .collect()
    }

    /// Verdict counters of the balancer, summed over CPUs, by `verdict::*` index.
    pub fn verdicts(&self) -> Result<Vec<u64>> {
        self.sum_counters(lb_common::MAP_VERDICTS, verdict::COUNT)
    }

    /// Verdict counters of the decap program, by `decap_verdict::*` index.
    pub fn decap_verdicts(&self) -> Result<Vec<u64>> {
        self.sum_counters(lb_common::MAP_DECAP_VERDICTS, decap_verdict::COUNT)
    }

    pub(super) fn traffic(&self, name: &'static str, id: u32) -> Result<Traffic> {
        let a: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = a.get(&id, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(Traffic::default(), |acc, t| Traffic {
            packets: acc.packets + t.packets,
            bytes: acc.bytes + t.bytes,
            new_flows: acc.new_flows + t.new_flows,
        }))
    }

    /// Packets, bytes and new flows of a VIP, summed over CPUs.
    pub fn vip_traffic(&self, vip_id: u32) -> Result<Traffic> {
        self.traffic(lb_common::MAP_VIP_STATS, vip_id)
    }

    /// Packets, bytes and new flows of a backend, summed over CPUs.
    pub fn backend_traffic(&self, id: u32) -> Result<Traffic> {
        self.traffic(lb_common::MAP_BACKEND_STATS, id)
    }
}
