//! The connection table on arrays: `FLOWS` is a set-associative table of
//! [`FlowSlot`]s, sets of `FLOW_WAYS` slots chosen by the flow hash, the key
//! compared in full. An established packet is answered with array reads (no
//! hash-map operation: BENCHMARKS.md's cost rows price a hash or LRU lookup
//! at 50–60 ns and an LRU update at about 200 ns, an array read at about
//! 1 ns), a new flow written with array writes.
//!
//! One table for every CPU, so a flow whose packets arrive on several CPUs
//! (veth and generic XDP run on the sender's CPU; RSS can be reconfigured)
//! keeps its backend on each. Writers do not lock: a slot's tag and backend
//! id are one 8-byte word, zeroed before the slot is rewritten and written
//! last; a reader reads that word, the key and the entry, then the word
//! again, and takes the entry only if the word held still (a seqlock whose
//! sequence is the tag; the entry's other fields are then read through the
//! pointer, so a slot replaced in those nanoseconds may still be read
//! torn). Every access is volatile, so the compiler keeps
//! this order; x86's stores and loads keep it in hardware (a weakly ordered
//! CPU could, in the nanoseconds of a rewrite, see a torn entry of a slot
//! being replaced).
//!
//! Replacement is not-recently-used: a packet sets its slot's `referenced`
//! (one write, only when clear), a new flow takes an empty slot, else the
//! first slot not referenced; when every way was referenced, all are
//! cleared and one chosen by the hash is replaced. A replaced flow that was
//! counted for least connections is uncounted.
//!
//! A NAT flow lives here like any other: one that is replaced loses its
//! source port (its next packet gets another), as with the LRU table this
//! replaced; not-recently-used replacement picks an active flow last.

use core::ptr::{NonNull, read_volatile, write_volatile};

use lb_common::{
    FLOW_F_COUNTED, FLOW_WAYS, Flow, FlowKey, FlowSlot, flow_set_base, flow_tag_folded, hash,
};

use crate::{
    maps::{FLOWS, flow_sets},
    sched::active_add,
};

/// Where a flow's entry lives: its set, its tag, and its table hash
/// (`hash::table_hash`, also the IPIP outer source's per-flow part; not the
/// scheduling hash, which only a new flow needs).
pub(crate) struct Probe {
    pub(crate) hash: u32,
    pub(crate) tag: u32,
    pub(crate) base: u32,
}

impl Probe {
    /// Not computed (the table not looked up yet).
    pub(crate) const NONE: Probe = Probe {
        hash: 0,
        tag: 0,
        base: 0,
    };
}

#[inline(always)]
pub(crate) fn probe(key: &FlowKey) -> Probe {
    // SAFETY: `FlowKey` is `align(4)`, `src` at offset 0 and `dst` at 16,
    // 16 bytes each: four little-endian words, as `hash::fold_addr` reads.
    let (src, dst) = unsafe {
        (
            &*(key.src.as_ptr() as *const [u32; 4]),
            &*(key.dst.as_ptr() as *const [u32; 4]),
        )
    };
    let fold = |a: &[u32; 4]| a[0] ^ a[1] ^ a[2] ^ a[3];
    let hash = hash::table_hash(fold(src), key.sport, key.dport, key.proto);
    Probe {
        hash,
        tag: flow_tag_folded(hash, fold(dst)),
        base: flow_set_base(hash, flow_sets()),
    }
}

/// The slot's tag and backend id, as one 8-byte word (see the module).
#[inline(always)]
fn word_ptr(s: *mut FlowSlot) -> *mut u64 {
    // SAFETY: offset 40 of a 64-byte slot (asserted in lb-common), 8-aligned
    // in the array's values.
    unsafe { (s as *mut u8).add(40) as *mut u64 }
}

/// The slot's key equals `key`, compared a word at a time (volatile: see
/// the module; a byte comparison is a call of `bcmp`).
#[inline(always)]
fn same_key(a: *const u32, key: &FlowKey) -> bool {
    let b = key as *const FlowKey as *const u32;
    let mut diff = 0u32;
    for i in 0..10 {
        // SAFETY: both are 40-byte, 4-aligned keys (the slot's at offset 0).
        diff |= unsafe { read_volatile(a.add(i)) ^ *b.add(i) };
    }
    diff == 0
}

/// The flow's entry in `FLOWS`: where it is, found as the module
/// describes (the tag word the same before and after the key compared),
/// and its slot marked referenced. The caller reads the entry through the
/// pointer: a slot replaced in the nanoseconds since may be read torn, as
/// by a weakly ordered CPU (see the module). (`NonNull`: an `Option` of a
/// raw pointer is two words, returned through the caller's stack, which
/// the verifier refuses.)
#[inline(always)]
pub(crate) fn lookup(base: u32, tag: u32, key: &FlowKey) -> Option<NonNull<Flow>> {
    let (s, _) = find(base, tag, |s| same_key(s, key))?;
    NonNull::new(flow_of(s))
}

/// The entry of slot `s` (from [`find`]).
#[inline(always)]
pub(crate) fn flow_of(s: *mut FlowSlot) -> *mut Flow {
    // SAFETY: a field of the slot, no read.
    unsafe { &raw mut (*s).flow }
}

/// The slot of set `base` whose tag is `tag` and whose key `same` accepts
/// (it is given the slot's 40-byte key as ten words, to read with
/// `read_volatile`), read as the module describes, and marked referenced;
/// with its tag word (tag, and the backend id in the high half).
/// [`lookup`] compares a `FlowKey`; the established path (`fast`) compares
/// the words it read from the headers.
#[inline(always)]
pub(crate) fn find(
    base: u32,
    tag: u32,
    same: impl Fn(*const u32) -> bool,
) -> Option<(*mut FlowSlot, u64)> {
    for w in 0..FLOW_WAYS {
        let Some(s) = FLOWS.get_ptr_mut(base + w) else {
            continue;
        };
        let word = word_ptr(s);
        // SAFETY: a value pointer from a successful lookup (every access to
        // the slot below is through it).
        let before = unsafe { read_volatile(word) };
        if before as u32 != tag || !same(s as *const u32) {
            continue;
        }
        // SAFETY: as above.
        if unsafe { read_volatile(word) } != before {
            // Rewritten as we read: the flow is being replaced.
            return None;
        }
        // SAFETY: as above; a plain flag, written only when clear.
        unsafe {
            if read_volatile(&raw const (*s).referenced) == 0 {
                write_volatile(&raw mut (*s).referenced, 1);
            }
        }
        return Some((s, before));
    }
    None
}

/// Writes `flow` for `key`: over the flow's own slot if it has one, else an
/// empty slot, else the set's first slot not referenced (see the module).
/// A replaced least-connections flow is uncounted.
#[inline(always)]
pub(crate) fn insert(base: u32, tag: u32, key: &FlowKey, flow: &Flow) {
    let mut same = None;
    let mut empty = None;
    let mut unused = None;
    for w in 0..FLOW_WAYS {
        let Some(s) = FLOWS.get_ptr_mut(base + w) else {
            continue;
        };
        // SAFETY: a value pointer from a successful lookup.
        let (slot_tag, referenced) = unsafe {
            (
                read_volatile(word_ptr(s)) as u32,
                read_volatile(&raw const (*s).referenced),
            )
        };
        if slot_tag == tag && same_key(s as *const u32, key) {
            same = Some(s);
            break;
        }
        if slot_tag == 0 {
            if empty.is_none() {
                empty = Some(s);
            }
        } else if referenced == 0 && unused.is_none() {
            unused = Some(s);
        }
    }
    let slot = match same.or(empty).or(unused) {
        Some(s) => s,
        None => {
            // Every way referenced since the last sweep: clear them all and
            // replace the one the hash picks.
            for w in 0..FLOW_WAYS {
                if let Some(s) = FLOWS.get_ptr_mut(base + w) {
                    // SAFETY: as above.
                    unsafe { write_volatile(&raw mut (*s).referenced, 0) };
                }
            }
            // Looked up again rather than kept from the loop: the verifier
            // loses a pointer carried through the loop's branches.
            match FLOWS.get_ptr_mut(base + (tag >> 30) % FLOW_WAYS) {
                Some(s) => s,
                None => return,
            }
        }
    };
    let word = word_ptr(slot);
    // SAFETY: a value pointer from a successful lookup; the write order is
    // the module's protocol.
    unsafe {
        let old = read_volatile(word);
        if same.is_none() && old as u32 != 0 {
            // Another flow is replaced: its least-connections count goes.
            if read_volatile(&raw const (*slot).flow.flags) & FLOW_F_COUNTED != 0 {
                active_add((old >> 32) as u32, u64::MAX);
            }
        }
        write_volatile(word, 0);
        let dst = slot as *mut u32;
        let src = key as *const FlowKey as *const u32;
        for i in 0..10 {
            write_volatile(dst.add(i), *src.add(i));
        }
        let f = &raw mut (*slot).flow;
        write_volatile(&raw mut (*f).vip_id, flow.vip_id);
        write_volatile(&raw mut (*f).flags, flow.flags);
        write_volatile(&raw mut (*f).last_seen_s, flow.last_seen_s);
        write_volatile(&raw mut (*f).nat_port, flow.nat_port);
        write_volatile(&raw mut (*f).nat_addr, flow.nat_addr);
        write_volatile(&raw mut (*slot).referenced, 1);
        write_volatile(word, u64::from(tag) | (u64::from(flow.backend_id) << 32));
    }
}
