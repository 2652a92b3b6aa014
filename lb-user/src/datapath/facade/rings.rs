//! The rings' side of the facade: `RINGS` slots allocated per VIP (two
//! halves each), written in one batch, flipped by the VIP entry's
//! `active_half` (see the facade's module documentation), and read back.

use std::borrow::BorrowMut;

use aya::{Ebpf, maps::Array};
use lb_common::{MAX_RING_SIZE, VipKey, ring_base};

use super::{BatchAttr, Dataplane, DataplaneError, Result, bpf_batch, map_err};

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    /// `RINGS` ranges in use: every VIP's and region's two halves, sorted.
    pub(super) fn ring_ranges(&mut self) -> Result<Vec<(u64, u64)>> {
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
    pub(super) fn alloc_ring(&mut self, size: u32) -> Result<u32> {
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
    pub(super) fn write_rings(&mut self, base: u32, table: &[u32]) -> Result<()> {
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

    /// Installs a Maglev table for the VIP: fills the idle half, then flips
    /// the VIP to it in one update. The table's length is the ring size; a
    /// new size (or a VIP's first ring) gets a range of its own, written
    /// before the one update that moves the VIP onto it. The ring it
    /// replaces stays in the other half: the second chance's previous ring
    /// for `keep_s` seconds (0: none; see `lb_common::VIP_F_SECOND_CHANCE`).
    /// A table the VIP already has changes nothing (its previous ring stays
    /// what it was).
    pub fn install_ring_keeping(&mut self, key: &VipKey, table: &[u32], keep_s: u32) -> Result<()> {
        self.install_ring_with(key, table, keep_s, None)
    }

    /// [`Self::install_ring_keeping`], or, with `second` (a table and its
    /// seconds, `u32::MAX`: no end), that table as the second chance's ring
    /// (the ring with the VIP's drained backends in it, whose connections
    /// then stay reachable whatever node a flow lands on, a fresh one
    /// included; or a previous ring remembered across a reboot).
    pub fn install_ring_with(
        &mut self,
        key: &VipKey,
        table: &[u32],
        keep_s: u32,
        second: Option<(&[u32], u32)>,
    ) -> Result<()> {
        let mut meta = self.vip(key)?;
        let live =
            (meta.ring_size == table.len() as u32).then_some((meta.ring_offset, meta.active_half));
        let placed = self.stage_ring(live, table)?;
        if let Some((offset, half, _)) = placed {
            meta.ring_offset = offset;
            meta.active_half = half;
            meta.ring_size = table.len() as u32;
            self.put_vip(key, meta)?;
        }
        let ring = (meta.ring_offset, meta.ring_size, meta.active_half);
        self.date_second_ring(meta.vip_id, ring, placed, keep_s, second)
    }

    /// [`Self::install_ring_keeping`] without a second chance.
    pub fn install_ring(&mut self, key: &VipKey, table: &[u32]) -> Result<()> {
        self.install_ring_keeping(key, table, 0)
    }

    /// After a ring install (`placed`: flipped to a new table, `fresh` when
    /// in a new range), says what the ring's other half is to the datapath:
    /// the previous ring for `keep_s` seconds, none in a new range, or
    /// `second` (written there) for its seconds. `ring`: (offset, size,
    /// active half).
    pub(super) fn date_second_ring(
        &mut self,
        ring_id: u32,
        ring: (u32, u32, u32),
        placed: Option<(u32, u32, bool)>,
        keep_s: u32,
        second: Option<(&[u32], u32)>,
    ) -> Result<()> {
        let (offset, size, half) = ring;
        if let Some((second, secs)) = second.filter(|s| s.0.len() as u32 == size) {
            let idle = ring_base(offset, size, half ^ 1);
            if self.read_rings(idle, size).as_deref() != Some(second) {
                self.write_rings(idle, second)?;
            }
            return self.set_prev_until(ring_id, secs);
        }
        match placed {
            Some((_, _, fresh)) => self.set_prev_until(ring_id, if fresh { 0 } else { keep_s }),
            None => Ok(()),
        }
    }

    /// Writes `table` where a ring goes next: into the idle half of its
    /// range `live` (offset, active half) when it has one of this size, or
    /// into both halves of a new range (a new ring has no previous one).
    /// `Some((offset, half, fresh))`: where the ring is to be flipped to;
    /// `None`: `live` already holds `table`.
    pub(super) fn stage_ring(
        &mut self,
        live: Option<(u32, u32)>,
        table: &[u32],
    ) -> Result<Option<(u32, u32, bool)>> {
        if table.is_empty() || table.len() > MAX_RING_SIZE as usize {
            return Err(DataplaneError::BadRingSize {
                size: table.len(),
                max: MAX_RING_SIZE,
            });
        }
        let n = table.len() as u32;
        if let Some((offset, half)) = live {
            if self.read_rings(ring_base(offset, n, half), n).as_deref() == Some(table) {
                return Ok(None);
            }
            let idle = half ^ 1;
            self.write_rings(ring_base(offset, n, idle), table)?;
            return Ok(Some((offset, idle, false)));
        }
        let offset = self.alloc_ring(n)?;
        self.write_rings(ring_base(offset, n, 0), table)?;
        self.write_rings(ring_base(offset, n, 1), table)?;
        Ok(Some((offset, 0, true)))
    }

    /// `n` slots of `RINGS` from `base` in one batched read; `None` where
    /// the kernel cannot (the caller then writes as if they differed).
    fn read_rings(&mut self, base: u32, n: u32) -> Option<Vec<u32>> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let name = lb_common::MAP_RINGS;
        let rings: Array<_, u32> = Array::try_from(self.map(name).ok()?).ok()?;
        let fd = aya::maps::IterableMap::<u32, u32>::map(&rings)
            .fd()
            .as_fd()
            .as_raw_fd();
        lookup_batch_u32(fd, base, n).ok()
    }

    /// The backend id in slot `slot` of the VIP's previous ring (the other
    /// half), if the datapath counts it now (`prev_until`).
    pub fn prev_ring_slot(&mut self, key: &VipKey, slot: u32) -> Result<Option<u32>> {
        let meta = self.vip(key)?;
        let until = self.prev_until(meta.vip_id)?;
        if until == 0 || (until != u32::MAX && until < coarse_monotonic_s()) {
            return Ok(None);
        }
        let name = lb_common::MAP_RINGS;
        let rings: Array<_, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        let base = ring_base(meta.ring_offset, meta.ring_size, meta.active_half ^ 1);
        rings
            .get(&(base + slot), 0)
            .map(Some)
            .map_err(map_err(name))
    }

    /// Until when ring `ring_id`'s other half counts as its previous ring
    /// (the datapath's clock, seconds; 0: it does not; `u32::MAX`: while
    /// the agent says so).
    pub fn prev_until(&mut self, ring_id: u32) -> Result<u32> {
        let name = lb_common::MAP_PREV_RING_UNTIL;
        let until: Array<_, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        until.get(&ring_id, 0).map_err(map_err(name))
    }

    /// Says until when ring `ring_id`'s other half is its previous ring:
    /// `keep_s` seconds from now on the datapath's clock (0: it is not;
    /// `u32::MAX`: until said otherwise).
    pub(super) fn set_prev_until(&mut self, ring_id: u32, keep_s: u32) -> Result<()> {
        let name = lb_common::MAP_PREV_RING_UNTIL;
        let mut until: Array<_, u32> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let at = match keep_s {
            0 => 0,
            u32::MAX => u32::MAX,
            s => coarse_monotonic_s().saturating_add(s),
        };
        until.set(ring_id, at, 0).map_err(map_err(name))
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
}

/// Seconds on the clock the datapath's `now_s` reads
/// (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC_COARSE).
fn coarse_monotonic_s() -> u32 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// `BPF_MAP_LOOKUP_BATCH` of `n` slots from `base` of an array of u32
/// values (its batch cursor is the previous key).
fn lookup_batch_u32(fd: i32, base: u32, n: u32) -> std::io::Result<Vec<u32>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut keys = vec![0u32; n as usize];
    let mut values = vec![0u32; n as usize];
    let mut done = 0usize;
    // The cursor names the key before the first one wanted.
    let mut cursor = base.wrapping_sub(1);
    while done < n as usize {
        let mut out = 0u32;
        let mut attr = BatchAttr {
            in_batch: if done == 0 && base == 0 {
                0
            } else {
                &mut cursor as *mut u32 as u64
            },
            out_batch: &mut out as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done..].as_mut_ptr() as u64,
            count: (n as usize - done) as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at live key and value buffers of `count`
        // u32s each and at two u32 cursors; the kernel writes back `count`.
        let r = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = attr.count as usize;
        match r {
            Ok(()) => {}
            // The end of the map: what was read is all there is.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && got > 0 => {}
            Err(e) => return Err(e),
        }
        if got == 0 {
            return Err(std::io::Error::other("batch lookup made no progress"));
        }
        done += got;
        cursor = out;
    }
    if keys.first() != Some(&base) {
        return Err(std::io::Error::other("batch lookup started elsewhere"));
    }
    Ok(values)
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] → values[i]` on a map of u32 keys and
/// values. Partial failure is reported; the caller then writes slot by slot.
pub(super) fn update_batch_u32(fd: i32, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
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
