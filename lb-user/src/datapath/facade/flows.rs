//! The connection table's side of the facade: `FLOWS` is an array of sets
//! (see `lb-ebpf/src/table.rs`), read here the way the datapath reads it.
//! Whole arrays are read with `BPF_MAP_LOOKUP_BATCH`, in chunks of 16,384
//! slots, rather than one syscall per slot (a million with the defaults).

use std::{
    borrow::BorrowMut,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use lb_common::{
    FLOW_WAYS, Flow, FlowKey, FlowSlot, flow_set_base, flow_sets, flow_tag, table_hash_of,
};

use super::{BatchAttr, Dataplane, Result, bpf_batch, map_err};

/// The flow of `key` among a set's slots, as the datapath matches it.
pub(crate) fn match_slot(slots: &[FlowSlot], key: &FlowKey) -> Option<Flow> {
    let h = table_hash_of(key);
    let tag = flow_tag(h, key);
    slots
        .iter()
        .find(|s| s.tag == tag && s.key == *key)
        .map(|s| s.flow)
}

/// The slots of the set `key` falls in, in a table of `entries` slots.
pub(crate) fn set_of(key: &FlowKey, entries: u32) -> impl Iterator<Item = u32> {
    let h = table_hash_of(key);
    let base = flow_set_base(h, flow_sets(entries));
    (base..base + FLOW_WAYS).filter(move |&i| i < entries)
}

/// Every value of an array map of `n` entries, by `BPF_MAP_LOOKUP_BATCH`;
/// `None` when the kernel refuses it (the caller then reads one by one).
pub(crate) fn lookup_batch<V: aya::Pod + Default + Clone>(fd: i32, n: u32) -> Option<Vec<V>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: u32 = 16_384;
    let mut out = Vec::with_capacity(n as usize);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values = vec![V::default(); CHUNK as usize];
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor_in as *const u32 as u64
            },
            out_batch: &mut cursor_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at live buffers of `count` keys (u32, the
        // array's key) and values (`V`, the array's value type, checked by
        // the typed `Array` the caller opened) and at the two cursors.
        let done = match unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(()) => false,
            // The end of the map: `count` says how many came with it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(_) => return None,
        };
        out.extend_from_slice(&values[..attr.count as usize]);
        if done || out.len() >= n as usize {
            return Some(out);
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// The flow of `key` in a connection table `a` (`FLOWS`, perhaps opened
/// from its pin by another process), as the datapath finds it.
pub fn flow_in<T: std::borrow::Borrow<MapData>>(
    a: &Array<T, FlowSlot>,
    key: &FlowKey,
) -> Option<Flow> {
    let slots: Vec<FlowSlot> = set_of(key, a.len())
        .filter_map(|i| a.get(&i, 0).ok())
        .collect();
    match_slot(&slots, key)
}

/// Rewrites the flow of `key` in its slot of `a`, keeping the slot's tag
/// and key (an operator's or a test's edit: the clock of an entry, say);
/// `false` when the table does not hold the flow.
pub fn set_flow_in<T: std::borrow::BorrowMut<MapData>>(
    a: &mut Array<T, FlowSlot>,
    key: &FlowKey,
    flow: &Flow,
) -> std::result::Result<bool, aya::maps::MapError> {
    let h = table_hash_of(key);
    let tag = flow_tag(h, key);
    for i in set_of(key, a.len()) {
        let mut s = a.get(&i, 0)?;
        if s.tag == tag && s.key == *key {
            s.flow = *flow;
            a.set(i, s, 0)?;
            return Ok(true);
        }
    }
    Ok(false)
}

impl<E: BorrowMut<Ebpf>> Dataplane<E> {
    /// Rewrites the connection-table entry of `key` (see [`set_flow_in`]).
    pub fn set_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<bool> {
        let name = lb_common::MAP_FLOWS;
        let mut a: Array<_, FlowSlot> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        set_flow_in(&mut a, key, flow).map_err(map_err(name))
    }

    fn flow_slots(&self) -> Result<Array<&MapData, FlowSlot>> {
        let name = lb_common::MAP_FLOWS;
        Array::try_from(self.map(name)?).map_err(map_err(name))
    }

    /// The connection-table entry of a flow, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>> {
        Ok(flow_in(&self.flow_slots()?, key))
    }

    /// Every flow the datapath holds: the occupied slots of `FLOWS`.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let a = self.flow_slots()?;
        let n = a.len();
        let fd = aya::maps::IterableMap::<u32, FlowSlot>::map(&a)
            .fd()
            .as_fd()
            .as_raw_fd();
        let slots = match lookup_batch::<FlowSlot>(fd, n) {
            Some(s) => s,
            None => a.iter().filter_map(|r| r.ok()).collect(),
        };
        Ok(slots
            .into_iter()
            .filter(|s| s.tag != 0)
            .map(|s| (s.key, s.flow))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_matches_only_its_own_slot() {
        let mut key = FlowKey {
            src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40000,
            dport: 80,
            proto: 6,
            ..Default::default()
        };
        let h = table_hash_of(&key);
        let slot = FlowSlot {
            key,
            tag: flow_tag(h, &key),
            flow: Flow {
                backend_id: 7,
                ..Default::default()
            },
            referenced: 1,
        };
        assert_eq!(
            match_slot(&[FlowSlot::default(), slot], &key).map(|f| f.backend_id),
            Some(7)
        );
        // The same ports to another VIP: same set, other key.
        key.dst[3] = 101;
        assert_eq!(match_slot(&[slot], &key), None);
        // A slot whose tag is not the key's (torn, or empty) never matches.
        let mut torn = slot;
        torn.tag ^= 2;
        key.dst[3] = 100;
        assert_eq!(match_slot(&[torn], &key), None);
        assert!(set_of(&key, 1 << 20).all(|i| i < 1 << 20));
        assert_eq!(set_of(&key, 1 << 20).count(), FLOW_WAYS as usize);
    }
}
