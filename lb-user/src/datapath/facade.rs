//! A typed facade over the datapath's maps. The agent and the tests program
//! the datapath only through this module.
//!
//! Ring updates are atomic from the datapath's point of view: the new table
//! is written into the VIP's idle half, then the VIP entry is replaced in one
//! map update that flips `active_half`.

use std::{borrow::BorrowMut, collections::HashSet};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, xdp::DevMapHash},
};
use lb_common::{
    Backend, BackendIdKey, MAX_RING_SIZE, RegionKey, RegionMeta, Settings, Traffic, VipById,
    VipKey, VipMeta, decap_verdict, ring_base, verdict,
};

mod dir;
mod flows;
mod nat;
pub use flows::{flow_in, set_flow_in};
pub use nat::{NatHandle, sweep_nat};

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

/// The `REGIONS` trie key of a VIP's client prefix: 32 bits of VIP id
/// always match, then `prefix_len` bits of the address.
fn region_key(vip_id: u32, addr: [u8; 16], prefix_len: u32) -> aya::maps::lpm_trie::Key<RegionKey> {
    aya::maps::lpm_trie::Key::new(
        32 + prefix_len,
        RegionKey {
            vip_id_be: vip_id.to_be_bytes(),
            addr,
        },
    )
}

/// The mirror's key of a region prefix: the address's bits past the prefix
/// cleared, as the trie compares them (a prefix read back from the trie and
/// one given by the agent are the same key).
fn region_mirror_key(vip_id: u32, addr: [u8; 16], prefix_len: u32) -> (u32, [u8; 16], u32) {
    let mut a = addr;
    for (i, b) in a.iter_mut().enumerate() {
        let keep = prefix_len.saturating_sub(8 * i as u32).min(8);
        *b &= !(0xffu8.checked_shr(keep).unwrap_or(0));
    }
    (vip_id, a, prefix_len)
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

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] → values[i]` on a map of u32 keys and
/// values. Partial failure is reported; the caller then writes slot by slot.
fn update_batch_u32(fd: i32, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    assert_eq!(keys.len(), values.len());
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at live key and value buffers of `count`
        // u32s each, matching the map's key and value sizes; the kernel
        // writes back only `count`.
        unsafe { bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) }?;
        if attr.count == 0 {
            return Err(std::io::Error::other("batch update made no progress"));
        }
        done += attr.count as usize;
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
            let nat_addrs = match self.map(lb_common::MAP_NAT_ADDRS) {
                Ok(m) => Array::<_, [u8; 16]>::try_from(m)
                    .map_err(map_err(lb_common::MAP_NAT_ADDRS))?
                    .iter()
                    .filter_map(|a| a.ok())
                    .filter(|a| *a != [0; 16])
                    .collect(),
                // An older datapath object (the A/B base) has no NAT.
                Err(_) => Vec::new(),
            };
            // The directory must point at every VIP of the record (an agent
            // stopped between writing a VIP and its slot left it without
            // one); from here on every change keeps them in step.
            let vips: std::collections::HashMap<VipKey, VipMeta> = vips;
            for (k, m) in &vips {
                if self.map(lb_common::MAP_VIP_DIR).is_ok() && self.vip_dir_id(k)? != Some(m.vip_id)
                {
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
        // Any map type: an older object (the A/B base) has an LRU table.
        let flows = match self.map(lb_common::MAP_FLOWS)? {
            aya::maps::Map::Array(d) | aya::maps::Map::LruHashMap(d) => {
                d.info().map(|i| i.max_entries()).unwrap_or(0)
            }
            _ => 0,
        };
        Ok(Capacity {
            vips: max_entries(&stats),
            backends: max_entries(&backends),
            ring_slots: max_entries(&rings),
            flows,
        })
    }

    /// `RINGS` ranges in use: every VIP's and region's two halves, sorted.
    fn ring_ranges(&mut self) -> Result<Vec<(u64, u64)>> {
        let m = self.mirror()?;
        let mut used: Vec<(u64, u64)> = m
            .vips
            .values()
            .map(|v| (v.ring_offset, v.ring_size))
            .chain(m.regions.values().map(|r| (r.ring_offset, r.ring_size)))
            .filter(|&(_, size)| size > 0)
            .map(|(off, size)| (u64::from(off), 2 * u64::from(size)))
            .collect();
        used.sort_unstable();
        used.dedup();
        Ok(used)
    }

    /// The offset of a free range for a ring of `size` slots per half
    /// (first fit). The range a ring is being moved away from stays in use
    /// until the update that moves it, so old and new never overlap.
    fn alloc_ring(&mut self, size: u32) -> Result<u32> {
        let need = 2 * u64::from(size);
        let capacity = self.mirror()?.capacity.ring_slots;
        let used = self.ring_ranges()?;
        let mut at = 0u64;
        for &(off, len) in &used {
            if off >= at + need {
                break;
            }
            at = at.max(off + len);
        }
        if at + need > u64::from(capacity) {
            return Err(DataplaneError::RingsFull {
                need,
                capacity,
                used: used.iter().map(|r| r.1).sum(),
            });
        }
        Ok(at as u32)
    }

    /// Writes `table` into `RINGS` from slot `base`: one batched update
    /// (a 65,537-slot ring was 65,537 syscalls), slot by slot where the
    /// kernel has no batch operation for arrays.
    fn write_rings(&mut self, base: u32, table: &[u32]) -> Result<()> {
        let name = lb_common::MAP_RINGS;
        let mut rings: Array<_, u32> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let keys: Vec<u32> = (0..table.len() as u32).map(|i| base + i).collect();
        {
            use std::os::fd::{AsFd as _, AsRawFd as _};
            let fd = aya::maps::IterableMap::<u32, u32>::map(&rings)
                .fd()
                .as_fd()
                .as_raw_fd();
            if update_batch_u32(fd, &keys, table).is_ok() {
                return Ok(());
            }
        }
        for (k, id) in keys.iter().zip(table) {
            rings.set(*k, id, 0).map_err(map_err(name))?;
        }
        Ok(())
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
    /// established flows find their VIP by id).
    fn refresh_filter_word(&mut self, key: &VipKey) -> Result<()> {
        let (w, _) = lb_common::hash::vip_filter_slot(&key.addr);
        let (tw, _) = lb_common::hash::vip_table_slot(&key.addr, key.port);
        let (mut word, mut vip_word, mut table_word) = (0u32, 0u32, 0u32);
        let m = self.mirror()?;
        let bit_in = |(kw, bit): (u32, u32), w: u32| if kw == w { 1u32 << bit } else { 0 };
        for (k, meta) in &m.vips {
            vip_word |= bit_in(lb_common::hash::vip_filter_slot(&k.addr), w);
            if meta.flags & lb_common::VIP_F_NO_FLOW_TABLE == 0
                || meta.flags & lb_common::VIP_F_NAT != 0
            {
                table_word |= bit_in(lb_common::hash::vip_table_slot(&k.addr, k.port), tw);
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
            let Ok(map) = self.map_mut(name) else {
                // An older datapath object without the filter (the A/B
                // benchmark loads one): nothing to keep.
                continue;
            };
            let mut filter: Array<_, u32> = Array::try_from(map).map_err(map_err(name))?;
            filter.set(w, word, 0).map_err(map_err(name))?;
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

    /// Installs a Maglev table for the VIP: fills the idle half, then flips
    /// the VIP to it in one update. The table's length is the ring size; a
    /// new size (or a VIP's first ring) gets a range of its own, written
    /// before the one update that moves the VIP onto it.
    pub fn install_ring(&mut self, key: &VipKey, table: &[u32]) -> Result<()> {
        if table.is_empty() || table.len() > MAX_RING_SIZE as usize {
            return Err(DataplaneError::BadRingSize {
                size: table.len(),
                max: MAX_RING_SIZE,
            });
        }
        let n = table.len() as u32;
        let mut meta = self.vip(key)?;
        let (offset, half) = if meta.ring_size == n {
            (meta.ring_offset, meta.active_half ^ 1)
        } else {
            (self.alloc_ring(n)?, 0)
        };
        self.write_rings(ring_base(offset, n, half), table)?;
        meta.ring_offset = offset;
        meta.active_half = half;
        meta.ring_size = n;
        self.put_vip(key, meta)
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
        let Ok(map) = self.map_mut(name) else {
            // An older datapath object without it (the A/B benchmark's
            // base): its flows look their VIP up by address.
            return Ok(());
        };
        let mut a: Array<_, VipById> = Array::try_from(map).map_err(map_err(name))?;
        let e = match meta {
            Some(meta) => VipById { key: *key, meta },
            None if a.get(&id, 0).is_ok_and(|e| e.key == *key) => VipById::default(),
            None => return Ok(()),
        };
        a.set(id, e, 0).map_err(map_err(name))
    }

    fn regions(
        &mut self,
    ) -> Result<aya::maps::lpm_trie::LpmTrie<&mut MapData, RegionKey, RegionMeta>> {
        let name = lb_common::MAP_REGIONS;
        aya::maps::lpm_trie::LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))
    }

    /// The region entry for a VIP's client prefix, if any.
    pub fn region(
        &mut self,
        vip_id: u32,
        addr: [u8; 16],
        prefix_len: u32,
    ) -> Result<Option<RegionMeta>> {
        Ok(self
            .regions()?
            .get(&region_key(vip_id, addr, prefix_len), 0)
            .ok())
    }

    /// Installs `table` as the ring of a region of VIP `vip_id` with ring id
    /// `ring_id`: fills the idle half of its range (a new range when the size
    /// changes), then points every prefix (address, length) at it.
    pub fn install_region_ring(
        &mut self,
        vip_id: u32,
        prefixes: &[([u8; 16], u32)],
        ring_id: u32,
        table: &[u32],
    ) -> Result<()> {
        if table.is_empty() || table.len() > MAX_RING_SIZE as usize {
            return Err(DataplaneError::BadRingSize {
                size: table.len(),
                max: MAX_RING_SIZE,
            });
        }
        let n = table.len() as u32;
        let (offset, half) = match prefixes.first() {
            Some(&(addr, len)) => match self.region(vip_id, addr, len)? {
                Some(m) if m.ring_id == ring_id && m.ring_size == n => {
                    (m.ring_offset, m.active_half ^ 1)
                }
                _ => (self.alloc_ring(n)?, 0),
            },
            None => return Ok(()),
        };
        self.write_rings(ring_base(offset, n, half), table)?;
        let m = RegionMeta {
            ring_id,
            active_half: half,
            ring_size: n,
            ring_offset: offset,
        };
        for &(addr, len) in prefixes {
            self.regions()?
                .insert(&region_key(vip_id, addr, len), m, 0)
                .map_err(map_err(lb_common::MAP_REGIONS))?;
            self.mirror()?
                .regions
                .insert(region_mirror_key(vip_id, addr, len), m);
        }
        Ok(())
    }

    /// Removes a region's prefix: its clients use the VIP's ring again.
    pub fn remove_region(&mut self, vip_id: u32, addr: [u8; 16], prefix_len: u32) -> Result<()> {
        let _ = self
            .regions()?
            .remove(&region_key(vip_id, addr, prefix_len));
        self.mirror()?
            .regions
            .remove(&region_mirror_key(vip_id, addr, prefix_len));
        Ok(())
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

    /// Every id some key holds.
    pub fn backend_ids_held(&mut self) -> Result<HashSet<u32>> {
        Ok(self
            .backend_ids()?
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| v)
            .collect())
    }

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

    /// The VIP's live ring, as the datapath reads it.
    pub fn ring(&mut self, key: &VipKey) -> Result<Vec<u32>> {
        let meta = self.vip(key)?;
        let base = ring_base(meta.ring_offset, meta.ring_size, meta.active_half);
        let name = lb_common::MAP_RINGS;
        let rings: Array<_, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        (0..meta.ring_size)
            .map(|i| rings.get(&(base + i), 0).map_err(map_err(name)))
            .collect()
    }

    /// The backend id in slot `slot` of the VIP's active ring.
    pub fn ring_slot(&mut self, key: &VipKey, slot: u32) -> Result<u32> {
        let meta = self.vip(key)?;
        let name = lb_common::MAP_RINGS;
        let rings: Array<_, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        rings
            .get(
                &(ring_base(meta.ring_offset, meta.ring_size, meta.active_half) + slot),
                0,
            )
            .map_err(map_err(name))
    }

    /// Sets the global settings (IPIP outer source addresses).
    pub fn set_settings(&mut self, s: &Settings) -> Result<()> {
        let name = lb_common::MAP_SETTINGS;
        let mut a: Array<_, Settings> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        a.set(0, s, 0).map_err(map_err(name))
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

    fn sum_counters(&self, name: &'static str, count: u32) -> Result<Vec<u64>> {
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

    fn traffic(&self, name: &'static str, id: u32) -> Result<Traffic> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_mirror_key_clears_bits_past_the_prefix() {
        let mut a = [0xffu8; 16];
        a[4..].fill(0);
        let (_, k, _) = region_mirror_key(7, a, 20);
        assert_eq!(&k[..4], &[0xff, 0xff, 0xf0, 0]);
        assert_eq!(region_mirror_key(7, a, 32).1, a);
        assert_eq!(region_mirror_key(7, a, 0).1, [0u8; 16]);
        assert_eq!(region_mirror_key(7, [0xff; 16], 128).1, [0xff; 16]);
    }
}
