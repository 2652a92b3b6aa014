//! A typed facade over the datapath's maps. The agent and the tests program
//! the datapath only through this module.
//!
//! Ring updates are atomic from the datapath's point of view: the new table
//! is written into the VIP's idle half, then the VIP entry is replaced in one
//! map update that flips `active_half`.
//!
//! Rooms: this file (the `Dataplane` type, its errors, VIPs, backends,
//! settings), `rings`, `regions`, `dir` (the VIP directory), `flows` (the
//! connection table), `nat`, `counters`.

use std::{borrow::BorrowMut, collections::HashSet};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash},
};
use lb_common::{Backend, BackendIdKey, RegionMeta, Settings, Traffic, VipById, VipKey, VipMeta};

mod counters;
mod dir;
mod flows;
mod nat;
mod regions;
mod rings;
pub use flows::{flow_in, set_flow_in};
pub use nat::{NatHandle, sweep_nat};
use regions::region_mirror_key;

/// What went wrong programming the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map `{name}` is missing from the datapath object")]
    MissingMap { name: &'static str },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("no VIP {key:?} in the datapath")]
    NoSuchVip { key: VipKey },
    #[error("VIP id {id} is out of range (at most {max} VIPs)")]
    VipIdOutOfRange { id: u32, max: u32 },
    #[error("backend id {id} is out of range (1..{max}; 0 is reserved)")]
    BackendIdOutOfRange { id: u32, max: u32 },
    #[error("ring of size {size} is not allowed (1..={max})")]
    BadRingSize { size: usize, max: u32 },
    #[error(
        "no room for a ring of {need} slots (two halves) in RINGS ({capacity} slots, {used} in use): \
         raise agent.ring_slots (8 bytes each; needs `lb down` first) or lower ring_size"
    )]
    RingsFull { need: u64, capacity: u32, used: u64 },
    #[error(
        "no room for VIP {key:?} in the VIP directory ({slots} slots, both of its buckets full): \
         raise agent.max_vips (needs `lb down` first)"
    )]
    VipDirectoryFull { key: VipKey, slots: u32 },
    #[error("devmap: {0}")]
    DevMap(String),
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// The `ADDRS` key for an address: port 0, protocol 0.
fn addr_key(key: &VipKey) -> VipKey {
    VipKey {
        addr: key.addr,
        port: 0,
        proto: 0,
        family: key.family,
    }
}

/// What a loaded datapath can hold, read from its maps (the loader sizes
/// them from `agent.max_vips`, `agent.max_backends`, `agent.ring_slots`,
/// `agent.flow_table_size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capacity {
    /// VIP and region ring ids (`0..vips`).
    pub vips: u32,
    /// Backend ids (`1..backends`).
    pub backends: u32,
    /// `RINGS` slots.
    pub ring_slots: u32,
    /// Connection-table entries.
    pub flows: u32,
}

fn max_entries<K: aya::Pod, V>(m: &impl aya::maps::IterableMap<K, V>) -> u32 {
    m.map().info().map(|i| i.max_entries()).unwrap_or(0)
}

/// `union bpf_attr`'s `batch` member (aya has no batch operations).
#[repr(C)]
#[derive(Default)]
pub(crate) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// Runs BPF command `cmd` (a `BPF_MAP_*_BATCH`) on `attr`; the kernel writes
/// the count it handled back into `attr.count`.
///
/// # Safety
/// `attr`'s pointers must name live buffers of `count` keys and values of
/// the map's key and value sizes (and cursors where the command uses them).
pub(crate) unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The facade's copy of `VIPS` and `REGIONS`, read from the maps on first
/// use (a restarted agent finds them pinned). The facade is their only
/// writer, so the copy stays exact; allocating a ring range, rewriting a
/// filter word and "is this address still a VIP" read it instead of
/// iterating the maps (loading 4,096 VIPs took ~17 million map syscalls and
/// 20 s that way).
struct Mirror {
    capacity: Capacity,
    vips: std::collections::HashMap<VipKey, VipMeta>,
    /// By (VIP id, address, prefix length).
    regions: std::collections::HashMap<(u32, [u8; 16], u32), RegionMeta>,
    /// NAT source addresses: their bits in the VIP-address filter stay set
    /// (backends' replies must reach the balancer's NAT lookup).
    nat_addrs: Vec<[u8; 16]>,
}

/// Typed access to a loaded datapath's maps. The agent's `Dataplane` owns
/// the loaded object (`Dataplane<Ebpf>`); tests and one-shot commands that
/// also run its programs wrap a borrow (`Dataplane::new(&mut ebpf)`).
pub struct Dataplane<E: BorrowMut<Ebpf> = Ebpf> {
    ebpf: E,
    mirror: Option<Mirror>,
}

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    pub fn new(ebpf: E) -> Self {
        Self { ebpf, mirror: None }
    }

    /// The copy of `VIPS` and `REGIONS` (see [`Mirror`]).
    fn mirror(&mut self) -> Result<&mut Mirror> {
        if self.mirror.is_none() {
            let capacity = self.capacity()?;
            let vips = self.vips()?;
            let vips = vips
                .iter()
                .map(|r| r.map_err(map_err(lb_common::MAP_VIPS)))
                .collect::<Result<_>>()?;
            let regions = self
                .regions()?
                .iter()
                .filter_map(|r| r.ok())
                .map(|(k, m)| {
                    let d = k.data();
                    let key = region_mirror_key(
                        u32::from_be_bytes(d.vip_id_be),
                        d.addr,
                        k.prefix_len().saturating_sub(32),
                    );
                    (key, m)
                })
                .collect();
            let nat_addrs = Array::<_, [u8; 16]>::try_from(self.map(lb_common::MAP_NAT_ADDRS)?)
                .map_err(map_err(lb_common::MAP_NAT_ADDRS))?
                .iter()
                .filter_map(|a| a.ok())
                .filter(|a| *a != [0; 16])
                .collect();
            // The directory must point at every VIP of the record (an agent
            // stopped between writing a VIP and its slot left it without
            // one); from here on every change keeps them in step.
            let vips: std::collections::HashMap<VipKey, VipMeta> = vips;
            for (k, m) in &vips {
                if self.vip_dir_id(k)? != Some(m.vip_id) {
                    self.put_vip_dir(k, Some(m.vip_id))?;
                }
            }
            self.mirror = Some(Mirror {
                capacity,
                vips,
                regions,
                nat_addrs,
            });
        }
        Ok(self.mirror.as_mut().expect("just filled"))
    }

    /// The loaded object, for the loader only (attaching and pinning the
    /// programs); maps are reached through the methods below.
    pub fn object_mut(&mut self) -> &mut Ebpf {
        self.ebpf.borrow_mut()
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .borrow_mut()
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf
            .borrow()
            .map(name)
            .ok_or(DataplaneError::MissingMap { name })
    }

    /// What this datapath can hold.
    pub fn capacity(&self) -> Result<Capacity> {
        let stats: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.map(lb_common::MAP_VIP_STATS)?)
                .map_err(map_err(lb_common::MAP_VIP_STATS))?;
        let backends: Array<_, Backend> = Array::try_from(self.map(lb_common::MAP_BACKENDS)?)
            .map_err(map_err(lb_common::MAP_BACKENDS))?;
        let rings: Array<_, u32> = Array::try_from(self.map(lb_common::MAP_RINGS)?)
            .map_err(map_err(lb_common::MAP_RINGS))?;
        let flows = match self.map(lb_common::MAP_FLOWS)? {
            aya::maps::Map::Array(d) => d.info().map(|i| i.max_entries()).unwrap_or(0),
            _ => 0,
        };
        Ok(Capacity {
            vips: max_entries(&stats),
            backends: max_entries(&backends),
            ring_slots: max_entries(&rings),
            flows,
        })
    }

    fn vips(&mut self) -> Result<HashMap<&mut MapData, VipKey, VipMeta>> {
        let name = lb_common::MAP_VIPS;
        HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    /// Adds or replaces a VIP. `meta.active_half`, `meta.ring_size` and
    /// `meta.ring_offset` are kept from the existing entry if there is one
    /// (the ring stays live).
    pub fn upsert_vip(&mut self, key: &VipKey, mut meta: VipMeta) -> Result<()> {
        let max = self.mirror()?.capacity.vips;
        if meta.vip_id >= max {
            return Err(DataplaneError::VipIdOutOfRange {
                id: meta.vip_id,
                max,
            });
        }
        if let Some(old) = self.mirror()?.vips.get(key)
            && old.vip_id == meta.vip_id
        {
            meta.active_half = old.active_half;
            meta.ring_size = old.ring_size;
            meta.ring_offset = old.ring_offset;
        }
        self.put_vip(key, meta)?;
        let name = lb_common::MAP_VIP_ADDRS;
        let mut addrs: HashMap<_, VipKey, u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        addrs.insert(addr_key(key), 1, 0).map_err(map_err(name))?;
        self.refresh_filter_word(key)
    }

    /// Rewrites the VIP-address filter word that `key`'s address falls in
    /// from the VIPs in the table, in one 32-bit store: a VIP that shares the
    /// word never sees its bit cleared, even for an instant.
    /// Also rewrites the same word of `VIP_ONLY_FILTER` (VIP addresses
    /// without the NAT addresses) and the `VIP_TABLE_FILTER` word of
    /// `key`'s address and port (VIPs that keep a connection table, whose
    /// established flows find their VIP by id), and that of
    /// `VIP_FAST_FILTER` (for the datapath's established path: in the low
    /// half the same without full-NAT VIPs, in the high half the VIPs
    /// without a table, not full NAT, which it schedules).
    fn refresh_filter_word(&mut self, key: &VipKey) -> Result<()> {
        let (w, _) = lb_common::hash::vip_filter_slot(&key.addr);
        let (tw, _) = lb_common::hash::vip_table_slot(&key.addr, key.port);
        let (mut word, mut vip_word, mut table_word) = (0u32, 0u32, 0u32);
        let (mut fast_word, mut stateless_word) = (0u32, 0u32);
        let m = self.mirror()?;
        let bit_in = |(kw, bit): (u32, u32), w: u32| if kw == w { 1u32 << bit } else { 0 };
        for (k, meta) in &m.vips {
            vip_word |= bit_in(lb_common::hash::vip_filter_slot(&k.addr), w);
            let nat = meta.flags & lb_common::VIP_F_NAT != 0;
            let bit = bit_in(lb_common::hash::vip_table_slot(&k.addr, k.port), tw);
            if meta.flags & lb_common::VIP_F_NO_FLOW_TABLE == 0 || nat {
                table_word |= bit;
                if !nat {
                    fast_word |= bit;
                }
            } else {
                stateless_word |= bit;
            }
        }
        for a in &m.nat_addrs {
            word |= bit_in(lb_common::hash::vip_filter_slot(a), w);
        }
        word |= vip_word;
        for (name, w, word) in [
            (lb_common::MAP_VIP_FILTER, w, word),
            (lb_common::MAP_VIP_ONLY_FILTER, w, vip_word),
            (lb_common::MAP_VIP_TABLE_FILTER, tw, table_word),
        ] {
            let mut filter: Array<_, u32> =
                Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            filter.set(w, word, 0).map_err(map_err(name))?;
        }
        // Both of the established path's bits of a slot in one 8-byte store.
        let name = lb_common::MAP_VIP_FAST_FILTER;
        let mut filter: Array<_, u64> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let both = u64::from(fast_word) | (u64::from(stateless_word) << 32);
        filter.set(tw, both, 0).map_err(map_err(name))
    }

    /// Writes every word of `VIP_FAST_FILTER` from the VIP record, in one
    /// pass. The agent calls it when it adopts a pinned datapath: one
    /// pinned by a version without the established path's filter leaves it
    /// empty, and the established path would hand every packet to the
    /// general balancer until each VIP changed.
    pub fn rebuild_fast_filter(&mut self) -> Result<()> {
        let mut words = vec![0u64; lb_common::hash::VIP_FILTER_WORDS as usize];
        for (k, meta) in &self.mirror()?.vips {
            if meta.flags & lb_common::VIP_F_NAT != 0 {
                continue;
            }
            let (w, bit) = lb_common::hash::vip_table_slot(&k.addr, k.port);
            let half = if meta.flags & lb_common::VIP_F_NO_FLOW_TABLE == 0 {
                0
            } else {
                32
            };
            words[w as usize] |= 1u64 << (bit + half);
        }
        let name = lb_common::MAP_VIP_FAST_FILTER;
        let mut filter: Array<_, u64> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (i, word) in words.into_iter().enumerate() {
            if filter.get(&(i as u32), 0).map_err(map_err(name))? != word {
                filter.set(i as u32, word, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// The VIP entry for `key`.
    pub fn vip(&mut self, key: &VipKey) -> Result<VipMeta> {
        self.vips()?
            .get(key, 0)
            .map_err(|_| DataplaneError::NoSuchVip { key: *key })
    }

    /// Every VIP in the datapath (the first read of the record also puts
    /// back a directory slot an interrupted agent left out, see `mirror`).
    pub fn list_vips(&mut self) -> Result<Vec<(VipKey, VipMeta)>> {
        self.mirror()?;
        let vips = self.vips()?;
        vips.iter()
            .map(|r| r.map_err(map_err(lb_common::MAP_VIPS)))
            .collect()
    }

    /// Removes a VIP (its ring range is free for other rings from then on).
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        // The record read first (reading it may repair the directory).
        self.mirror()?;
        // Packets stop finding it (the directory, then by id) first.
        self.put_vip_dir(key, None)?;
        if let Some(old) = self.mirror()?.vips.get(key).copied() {
            self.put_vip_by_id(old.vip_id, key, None)?;
        }
        self.vips()?
            .remove(key)
            .map_err(|_| DataplaneError::NoSuchVip { key: *key })?;
        let m = self.mirror()?;
        m.vips.remove(key);
        let still_used = m
            .vips
            .keys()
            .any(|k| k.addr == key.addr && k.family == key.family);
        if !still_used {
            let name = lb_common::MAP_VIP_ADDRS;
            let mut addrs: HashMap<_, VipKey, u32> =
                HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
            let _ = addrs.remove(&addr_key(key));
        }
        self.refresh_filter_word(key)
    }

    /// Writes backend `id` (1..capacity).
    pub fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        let max = self.capacity()?.backends;
        if id == 0 || id >= max {
            return Err(DataplaneError::BackendIdOutOfRange { id, max });
        }
        let name = lb_common::MAP_BACKENDS;
        let mut a: Array<_, Backend> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        a.set(id, b, 0).map_err(map_err(name))
    }

    /// Reads backend `id`.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        let name = lb_common::MAP_BACKENDS;
        let a: Array<_, Backend> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        a.get(&id, 0).map_err(map_err(name))
    }

    /// Changes only the state of backend `id` (`BACKEND_UP`, `_DRAINING`, `_DOWN`).
    pub fn set_backend_state(&mut self, id: u32, state: u8) -> Result<()> {
        let mut b = self.backend(id)?;
        b.state = state;
        self.set_backend(id, &b)
    }

    /// Writes a VIP entry to `VIPS` and the mirror.
    fn put_vip(&mut self, key: &VipKey, meta: VipMeta) -> Result<()> {
        // The record read before it changes (reading it may repair the
        // directory, which must not see this entry before its id does).
        self.mirror()?;
        self.vips()?
            .insert(key, meta, 0)
            .map_err(map_err(lb_common::MAP_VIPS))?;
        let old = self.mirror()?.vips.insert(*key, meta);
        // The entry first, then the directory's pointer to it, then the
        // old id's entry cleared: a packet always finds a VIP that exists.
        self.put_vip_by_id(meta.vip_id, key, Some(meta))?;
        // A ring flip or a new setting keeps the id: the directory already
        // points at it (`mirror` made sure of that when it read the record).
        if old.is_none_or(|o| o.vip_id != meta.vip_id) {
            self.put_vip_dir(key, Some(meta.vip_id))?;
        }
        if let Some(old) = old
            && old.vip_id != meta.vip_id
        {
            self.put_vip_by_id(old.vip_id, key, None)?;
        }
        Ok(())
    }

    /// Writes VIP `key`'s entry under id `id` in `VIPS_BY_ID`, where
    /// established flows find their VIP; with `None`, clears the slot if it
    /// still holds `key` (another VIP may have taken the id meanwhile).
    fn put_vip_by_id(&mut self, id: u32, key: &VipKey, meta: Option<VipMeta>) -> Result<()> {
        let name = lb_common::MAP_VIPS_BY_ID;
        let mut a: Array<_, VipById> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let e = match meta {
            Some(meta) => VipById { key: *key, meta },
            None if a.get(&id, 0).is_ok_and(|e| e.key == *key) => VipById::default(),
            None => return Ok(()),
        };
        a.set(id, e, 0).map_err(map_err(name))
    }

    fn backend_ids(&mut self) -> Result<HashMap<&mut MapData, BackendIdKey, u32>> {
        let name = lb_common::MAP_BACKEND_IDS;
        HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    /// The backend id recorded for a key (a backend, or a counter key).
    pub fn backend_id(&mut self, key: &BackendIdKey) -> Result<Option<u32>> {
        match self.backend_ids()?.get(key, 0) {
            Ok(id) => Ok(Some(id)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(lb_common::MAP_BACKEND_IDS)(e)),
        }
    }

    pub fn set_backend_id(&mut self, key: &BackendIdKey, id: u32) -> Result<()> {
        self.backend_ids()?
            .insert(key, id, 0)
            .map_err(map_err(lb_common::MAP_BACKEND_IDS))
    }

    /// Forgets a key; forgetting an absent key is not an error.
    pub fn remove_backend_id(&mut self, key: &BackendIdKey) -> Result<()> {
        match self.backend_ids()?.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(lb_common::MAP_BACKEND_IDS)(e)),
        }
    }

    /// Every (key, id) of `BACKEND_IDS`.
    pub fn backend_id_entries(&mut self) -> Result<Vec<(BackendIdKey, u32)>> {
        Ok(self.backend_ids()?.iter().filter_map(|r| r.ok()).collect())
    }

    /// Every id some key holds.
    pub fn backend_ids_held(&mut self) -> Result<HashSet<u32>> {
        Ok(self
            .backend_ids()?
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| v)
            .collect())
    }

    /// Sets the global settings (IPIP outer source addresses).
    pub fn set_settings(&mut self, s: &Settings) -> Result<()> {
        let name = lb_common::MAP_SETTINGS;
        let mut a: Array<_, Settings> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        a.set(0, s, 0).map_err(map_err(name))
    }

    /// Adds `ifindex` as a redirect target.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        let name = lb_common::MAP_TX_PORTS;
        let mut m: DevMapHash<_> =
            DevMapHash::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::DevMap(e.to_string()))
    }

    /// Adds a local address the `decap` program strips tunnels for.
    pub fn add_decap_addr(&mut self, addr: [u8; 16]) -> Result<()> {
        let name = lb_common::MAP_DECAP_ADDRS;
        let mut m: HashMap<_, [u8; 16], u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.insert(addr, 1, 0).map_err(map_err(name))
    }
}
