//! Full NAT's side of the facade: the NAT source addresses, and the
//! reply table's sweep (also through a handle of its own, so the agent
//! sweeps without holding the lock that guards the facade).

use std::borrow::BorrowMut;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use lb_common::VipKey;

use super::{Dataplane, Result, map_err};

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    /// Sets the NAT source addresses (IPv4 at 0.., IPv6 at
    /// `MAX_NAT_ADDRS`..; the counts go in `Settings`) and keeps their bits
    /// in the VIP-address filter.
    pub fn set_nat_addrs(&mut self, v4: &[[u8; 16]], v6: &[[u8; 16]]) -> Result<()> {
        let name = lb_common::MAP_NAT_ADDRS;
        let max = lb_common::MAX_NAT_ADDRS as usize;
        let mut arr: Array<_, [u8; 16]> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (base, list) in [(0, v4), (max, v6)] {
            for i in 0..max {
                let a = list.get(i).copied().unwrap_or([0; 16]);
                arr.set((base + i) as u32, a, 0).map_err(map_err(name))?;
            }
        }
        let old = std::mem::take(&mut self.mirror()?.nat_addrs);
        self.mirror()?.nat_addrs = v4.iter().chain(v6).copied().collect();
        for a in old.iter().chain(v4).chain(v6) {
            let key = VipKey {
                addr: *a,
                ..Default::default()
            };
            self.refresh_filter_word(&key)?;
        }
        Ok(())
    }

    /// Removes the NAT entries whose port may be given out again (closed
    /// `NAT_CLOSED_S` ago, or idle `NAT_IDLE_S`), as of `now_s` on the
    /// datapath's clock; returns how many. Each is read again just before its removal, so an entry the
    /// datapath gave to a new flow meanwhile stays (the window left is one
    /// map read).
    pub fn nat_sweep(&mut self, now_s: u32) -> Result<usize> {
        Ok(match self.nat_handle()? {
            Some(mut h) => sweep_nat(&mut h, now_s),
            None => 0,
        })
    }

    /// A handle on `NAT` of its own (the same map, opened again by id), for [`sweep_nat`] outside whatever lock guards this
    /// facade: with many NAT flows a sweep reads the whole table. `None`
    /// for an object without full NAT.
    pub fn nat_handle(&self) -> Result<Option<NatHandle>> {
        let reopen = |name: &'static str| -> Result<Option<MapData>> {
            let Ok(aya::maps::Map::HashMap(map)) = self.map(name) else {
                return Ok(None);
            };
            let id = map.info().map_err(map_err(name))?.id();
            Ok(Some(MapData::from_id(id).map_err(map_err(name))?))
        };
        let Some(nat) = reopen(lb_common::MAP_NAT)? else {
            return Ok(None);
        };
        Ok(Some(NatHandle {
            nat: HashMap::try_from(aya::maps::Map::HashMap(nat))
                .map_err(map_err(lb_common::MAP_NAT))?,
        }))
    }

    /// NAT flows held now (entries in `NAT`).
    pub fn nat_flows(&self) -> Result<usize> {
        let name = lb_common::MAP_NAT;
        let Ok(map) = self.map(name) else {
            return Ok(0);
        };
        let m: HashMap<_, lb_common::NatKey, lb_common::NatEntry> =
            HashMap::try_from(map).map_err(map_err(name))?;
        Ok(m.keys().filter_map(|k| k.ok()).count())
    }
}

/// `NAT` through a handle of its own ([`Dataplane::nat_handle`]).
pub struct NatHandle {
    nat: HashMap<MapData, lb_common::NatKey, lb_common::NatEntry>,
}

/// Removes the NAT entries whose port may be given out again (see
/// [`Dataplane::nat_sweep`]); returns how many.
pub fn sweep_nat(h: &mut NatHandle, now_s: u32) -> usize {
    let stale = |e: &lb_common::NatEntry| lb_common::nat_reclaimable(e.flags, e.last_seen_s, now_s);
    let m = &mut h.nat;
    let keys: Vec<_> = m
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, e)| stale(e))
        .map(|(k, _)| k)
        .collect();
    let mut n = 0;
    for k in keys {
        let Ok(e) = m.get(&k, 0) else { continue };
        if !stale(&e) || m.remove(&k).is_err() {
            continue;
        }
        n += 1;
    }
    n
}
