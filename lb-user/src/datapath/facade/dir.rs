//! The VIP directory's side of the facade: `VIP_DIR` (see
//! `lb-ebpf/src/vip.rs`) maps a VIP's key to its id in buckets of
//! [`VIP_DIR_WAYS`] slots; a key lives in one of its two buckets
//! ([`hash::vip_dir_buckets`]). The agent writes it after `VIPS_BY_ID`
//! (a packet that finds an id finds the VIP behind it) and clears it
//! before (a removed VIP's id is found no more). The kernel's array is read
//! for every change, so an adopted datapath needs no rebuild.

use std::borrow::BorrowMut;

use aya::{Ebpf, maps::Array};
use lb_common::{VIP_DIR_WAYS, VipDirBucket, VipDirSlot, VipKey, hash};

use super::{Dataplane, DataplaneError, Result, map_err};

/// The two buckets of `key` in a directory of `buckets` (a power of two).
pub(crate) fn buckets_of(key: &VipKey, buckets: u32) -> (u32, u32) {
    let tail = hash::vip_key_tail(key.port, key.proto, key.family);
    hash::vip_dir_buckets(hash::fold_addr(&key.addr), tail, buckets - 1)
}

/// Where `key` goes: its slot if it is there already, else a free slot of
/// the less full of its two buckets (the first on a tie: one read for the
/// packets). `None`: both buckets are full.
fn place(key: &VipKey, first: &VipDirBucket, second: &VipDirBucket) -> Option<(bool, usize)> {
    for (in_second, b) in [(false, first), (true, second)] {
        if let Some(i) = b.slots.iter().position(|s| s.key == *key) {
            return Some((in_second, i));
        }
    }
    let used = |b: &VipDirBucket| b.slots.iter().filter(|s| s.key.family != 0).count();
    let in_second = used(second) < used(first);
    let b = if in_second { second } else { first };
    let i = b.slots.iter().position(|s| s.key.family == 0)?;
    Some((in_second, i))
}

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    /// Points `key` at VIP id `id` in the directory, or (`None`) removes it.
    pub(super) fn put_vip_dir(&mut self, key: &VipKey, id: Option<u32>) -> Result<()> {
        let name = lb_common::MAP_VIP_DIR;
        let mut dir: Array<_, VipDirBucket> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let (b1, b2) = buckets_of(key, dir.len());
        let (first, second) = (
            dir.get(&b1, 0).map_err(map_err(name))?,
            dir.get(&b2, 0).map_err(map_err(name))?,
        );
        let Some(id) = id else {
            for (b, mut bucket) in [(b1, first), (b2, second)] {
                if let Some(s) = bucket.slots.iter_mut().find(|s| s.key == *key) {
                    *s = VipDirSlot::default();
                    dir.set(b, bucket, 0).map_err(map_err(name))?;
                }
            }
            return Ok(());
        };
        let Some((in_second, i)) = place(key, &first, &second) else {
            return Err(DataplaneError::VipDirectoryFull {
                key: *key,
                slots: dir.len() * VIP_DIR_WAYS as u32,
            });
        };
        let (b, mut bucket) = if in_second { (b2, second) } else { (b1, first) };
        bucket.slots[i] = VipDirSlot {
            key: *key,
            vip_id: id,
        };
        dir.set(b, bucket, 0).map_err(map_err(name))
    }

    /// Bucket `b` of the directory, as the kernel holds it.
    pub fn vip_dir_bucket(&self, b: u32) -> Result<VipDirBucket> {
        let name = lb_common::MAP_VIP_DIR;
        let dir: Array<_, VipDirBucket> =
            Array::try_from(self.map(name)?).map_err(map_err(name))?;
        dir.get(&b, 0).map_err(map_err(name))
    }

    /// The id `key` has in the directory, as the datapath finds it.
    pub fn vip_dir_id(&self, key: &VipKey) -> Result<Option<u32>> {
        let name = lb_common::MAP_VIP_DIR;
        let dir: Array<_, VipDirBucket> =
            Array::try_from(self.map(name)?).map_err(map_err(name))?;
        let (b1, b2) = buckets_of(key, dir.len());
        for b in [b1, b2] {
            let bucket = dir.get(&b, 0).map_err(map_err(name))?;
            if let Some(s) = bucket.slots.iter().find(|s| s.key == *key) {
                return Ok(Some(s.vip_id));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> VipKey {
        VipKey {
            addr: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            proto: lb_common::PROTO_TCP,
            family: lb_common::AF_INET,
        }
    }

    #[test]
    fn a_key_keeps_its_slot_and_a_full_pair_of_buckets_is_refused() {
        let mut first = VipDirBucket::default();
        let mut second = VipDirBucket::default();
        assert_eq!(place(&key(1), &first, &second), Some((false, 0)));
        first.slots[0] = VipDirSlot {
            key: key(1),
            vip_id: 7,
        };
        // The same key again: its own slot.
        assert_eq!(place(&key(1), &first, &second), Some((false, 0)));
        // A new key: the less full bucket.
        assert_eq!(place(&key(2), &first, &second), Some((true, 0)));
        second.slots[2] = VipDirSlot {
            key: key(2),
            vip_id: 8,
        };
        assert_eq!(place(&key(2), &first, &second), Some((true, 2)));
        for (i, s) in first
            .slots
            .iter_mut()
            .chain(second.slots.iter_mut())
            .enumerate()
        {
            *s = VipDirSlot {
                key: key(10 + i as u16),
                vip_id: i as u32,
            };
        }
        assert_eq!(place(&key(3), &first, &second), None);
    }
}
