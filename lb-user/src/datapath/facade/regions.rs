//! Regions: per-VIP client prefixes (an LPM trie) that choose a ring of
//! their own, and the agent's mirror of their keys.

use std::borrow::BorrowMut;

use aya::{Ebpf, maps::MapData};
use lb_common::{RegionKey, RegionMeta};

use super::{Dataplane, Result, map_err};

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    pub(super) fn regions(
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
    /// changes), then points every prefix (address, length) at it. The
    /// ring it replaces is the region's previous ring for `keep_s` seconds,
    /// or `second` its second chance's ring, as for a VIP's
    /// (`install_ring_with`).
    pub fn install_region_ring(
        &mut self,
        vip_id: u32,
        prefixes: &[([u8; 16], u32)],
        ring_id: u32,
        table: &[u32],
        keep_s: u32,
        second: Option<(&[u32], u32)>,
    ) -> Result<()> {
        let n = table.len() as u32;
        let live = match prefixes.first() {
            Some(&(addr, len)) => match self.region(vip_id, addr, len)? {
                Some(m) if m.ring_id == ring_id && m.ring_size == n => {
                    Some((m.ring_offset, m.active_half))
                }
                _ => None,
            },
            None => return Ok(()),
        };
        let placed = self.stage_ring(live, table)?;
        // Unchanged: the prefixes (perhaps more of them) point at it.
        let (offset, half) = placed.map_or(live.unwrap_or_default(), |(o, h, _)| (o, h));
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
        self.date_second_ring(ring_id, (offset, n, half), placed, keep_s, second)
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
}

/// The `REGIONS` trie key of a VIP's client prefix: 32 bits of VIP id
/// always match, then `prefix_len` bits of the address.
pub(super) fn region_key(
    vip_id: u32,
    addr: [u8; 16],
    prefix_len: u32,
) -> aya::maps::lpm_trie::Key<RegionKey> {
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
pub(super) fn region_mirror_key(
    vip_id: u32,
    addr: [u8; 16],
    prefix_len: u32,
) -> (u32, [u8; 16], u32) {
    let mut a = addr;
    for (i, b) in a.iter_mut().enumerate() {
        let keep = prefix_len.saturating_sub(8 * i as u32).min(8);
        *b &= !(0xffu8.checked_shr(keep).unwrap_or(0));
    }
    (vip_id, a, prefix_len)
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
