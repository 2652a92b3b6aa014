//! The flow hashes: one definition each, used by the datapath to pick a ring
//! slot and a connection-table set, and by userspace and the tests to
//! predict those choices.
//!
//! A flow's hash ([`hash_5tuple`] = [`table_hash`]) is the client address
//! folded to one word, then two rounds of MurmurHash3's finalizer over it,
//! the protocol and the ports. The client-address hash of source-ip
//! stickiness and the Maglev permutation's backend hash are MurmurHash3 (x86,
//! 32-bit) over the address's four words. All are cheap in BPF (no loops the
//! verifier must bound, no tables), well mixed, and identical on every
//! little- and big-endian host because words are read little-endian.

const SEED: u32 = 0x6c62_7831; // "lbx1"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len_bytes: u32) -> u32 {
    fmix(h ^ len_bytes)
}

/// MurmurHash3's finalizer: a bijection of 32-bit words that mixes every
/// input bit into every output bit.
#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn word(a: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// Hash of a client address alone (`source-ip` hashing: every connection of
/// one client lands on one backend).
#[inline(always)]
pub const fn hash_src(src: &[u8; 16]) -> u32 {
    let mut h = SEED;
    h = mix(h, word(src, 0));
    h = mix(h, word(src, 4));
    h = mix(h, word(src, 8));
    h = mix(h, word(src, 12));
    finish(h, 16)
}

/// The scheduling hash of a flow's 5-tuple: the ring slot of a new flow
/// (`% ring_size`), which every node, `lb explain` and `lb what-if` compute
/// alike. It is the connection table's hash ([`table_hash`]), so a new flow
/// hashes once for both. (Until 2026-12-05 it was MurmurHash3 over six
/// words, twenty multiplications where this has four; a change here moves
/// every flow without a table entry, on every node, so it is deliberate and
/// pinned by a test.) The destination address is left out: within one VIP's
/// ring it is the same for every flow (ports are host order).
#[inline(always)]
pub const fn hash_5tuple(src: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    table_hash(fold_addr(src), sport, dport, proto)
}

/// The connection table's hash of a flow (its set, and with the
/// destination its tag; see `lb_common::flow_set_base`), also the
/// scheduling hash ([`hash_5tuple`]): the client address folded to 32 bits
/// ([`fold_addr`], passed in so the datapath can fold aligned words), the
/// protocol and the ports, through two rounds of [`fmix`] (a bijection of
/// 32-bit words that mixes every input bit into every output bit): four
/// multiplications (BENCHMARKS.md: hashing was a fifth of an established
/// packet's time).
#[inline(always)]
pub const fn table_hash(src_folded: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let a = fmix(src_folded ^ proto as u32);
    fmix(a ^ (((sport as u32) << 16) | dport as u32))
}

/// Hash of a backend address with a seed, for the Maglev permutation.
#[inline(always)]
pub const fn hash_addr_seeded(addr: &[u8; 16], seed: u32) -> u32 {
    let mut h = SEED ^ seed;
    h = mix(h, word(addr, 0));
    h = mix(h, word(addr, 4));
    h = mix(h, word(addr, 8));
    h = mix(h, word(addr, 12));
    finish(h, 16)
}

/// An address folded to 32 bits: the XOR of its four little-endian words
/// (an IPv4 address is its one word), as the datapath folds a destination
/// straight from the IP header.
#[inline(always)]
pub const fn fold_addr(a: &[u8; 16]) -> u32 {
    word(a, 0) ^ word(a, 4) ^ word(a, 8) ^ word(a, 12)
}

/// Words in the VIP-address filter: 4,096 × 32 = 131,072 bits.
pub const VIP_FILTER_WORDS: u32 = 4096;

/// Where the VIP-address filter keeps `addr`'s bit: (word, bit). A clear bit
/// means "no VIP on this address" for sure, so non-VIP traffic is passed
/// after one array lookup; a set bit may be a collision and the VIP table
/// decides. One multiplication over the address folded to 32 bits: this
/// runs for every packet the NIC receives.
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u8; 16]) -> (u32, u32) {
    vip_filter_slot_folded(word(addr, 0) ^ word(addr, 4) ^ word(addr, 8) ^ word(addr, 12))
}

/// [`vip_filter_slot`] of an address already folded: the XOR of its four
/// little-endian 32-bit words (an IPv4 address is its one word). The
/// datapath folds the destination straight from the IP header.
#[inline(always)]
pub const fn vip_filter_slot_folded(folded: u32) -> (u32, u32) {
    let slot = folded.wrapping_mul(0x9e37_79b1) >> 15; // 17 bits
    (slot >> 5, slot & 31)
}

/// Where `VIP_TABLE_FILTER` keeps the bit of (address, port): set when a
/// VIP that keeps a connection table lives there (port 0: a VIP of every
/// port, which the datapath checks too). Per port, so a VIP without a table
/// that shares its address with one that has a table is not looked up in
/// the table first.
#[inline(always)]
pub const fn vip_table_slot(addr: &[u8; 16], port: u16) -> (u32, u32) {
    vip_table_slot_folded(
        word(addr, 0) ^ word(addr, 4) ^ word(addr, 8) ^ word(addr, 12),
        port,
    )
}

/// [`vip_table_slot`] of an address already folded (see
/// [`vip_filter_slot_folded`]).
#[inline(always)]
pub const fn vip_table_slot_folded(folded: u32, port: u16) -> (u32, u32) {
    vip_filter_slot_folded(folded ^ ((port as u32) << 16))
}

/// The last word of a [`VipKey`](crate::VipKey) as the datapath reads it:
/// port (low half), protocol, family (top byte), little-endian as
/// `#[repr(C)]` lays them out.
#[inline(always)]
pub const fn vip_key_tail(port: u16, proto: u8, family: u8) -> u32 {
    port as u32 | (proto as u32) << 16 | (family as u32) << 24
}

/// The two buckets of the VIP directory where the key (address folded to
/// 32 bits as [`fold_addr`], [`vip_key_tail`]) may live, for a directory of
/// `mask + 1` buckets (a power of two). The second comes from the hash's
/// other half and always differs from the first.
#[inline(always)]
pub const fn vip_dir_buckets(folded: u32, tail: u32, mask: u32) -> (u32, u32) {
    let mut h = folded ^ tail.wrapping_mul(0x9e37_79b1);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    let first = h & mask;
    let mut second = h.rotate_right(16) & mask;
    if second == first {
        second = first ^ 1;
    }
    (first, second & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_per_field() {
        let a = [1u8; 16];
        let mut b = a;
        b[15] = 2;
        assert_ne!(hash_src(&a), hash_src(&b));
        assert_ne!(hash_5tuple(&a, 1, 80, 6), hash_5tuple(&a, 2, 80, 6));
        assert_ne!(hash_5tuple(&a, 1, 80, 6), hash_5tuple(&a, 1, 80, 17));
        assert_ne!(hash_addr_seeded(&a, 1), hash_addr_seeded(&a, 2));
    }

    #[test]
    fn folded_slot_is_the_address_slot() {
        let v4 = [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            vip_filter_slot(&v4),
            vip_filter_slot_folded(u32::from_le_bytes([198, 18, 0, 100]))
        );
        let v6 = [0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let folded = word(&v6, 0) ^ word(&v6, 4) ^ word(&v6, 8) ^ word(&v6, 12);
        assert_eq!(vip_filter_slot(&v6), vip_filter_slot_folded(folded));
    }

    #[test]
    fn table_slots_differ_per_port() {
        let v4 = [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_ne!(vip_table_slot(&v4, 80), vip_table_slot(&v4, 443));
        assert_ne!(vip_table_slot(&v4, 80), vip_table_slot(&v4, 0));
        assert_eq!(
            vip_table_slot(&v4, 80),
            vip_table_slot_folded(u32::from_le_bytes([198, 18, 0, 100]), 80)
        );
    }

    #[test]
    fn filter_slots_stay_in_range_and_spread() {
        // (no_std crate: count distinct words with a fixed bitmap)
        let mut seen = [0u32; (VIP_FILTER_WORDS / 32) as usize];
        let mut distinct = 0;
        for i in 0..=255u8 {
            let a = [198, 18, 0, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let (w, b) = vip_filter_slot(&a);
            assert!(w < VIP_FILTER_WORDS && b < 32);
            let (i, m) = ((w / 32) as usize, 1u32 << (w % 32));
            if seen[i] & m == 0 {
                seen[i] |= m;
                distinct += 1;
            }
        }
        // 256 neighbouring VIP addresses do not pile into a few words.
        assert!(distinct > 200, "{distinct} words");
    }

    #[test]
    fn known_vector() {
        // Pins the function: a change here changes every LB node's choices,
        // so it must be deliberate.
        let client = [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(hash_5tuple(&client, 40000, 80, 6), 4086582105);
        assert_eq!(hash_src(&client), 3358244290);
    }

    #[test]
    fn vip_directory_places_a_full_house_of_vips() {
        // The agent's placement (the less full of the two buckets) for as
        // many VIPs as the directory is sized for, in the shapes VIPs come
        // in: neighbouring addresses, and one address with many ports.
        for (max_vips, shape) in [(1000u32, 0), (1000, 1), (256, 0), (16, 1), (65536, 0)] {
            let buckets = crate::vip_dir_buckets(max_vips);
            let mask = buckets - 1;
            let mut fill = [0u8; 65536];
            let mut in_first = 0;
            for i in 0..max_vips {
                let (addr, port) = if shape == 0 {
                    let b = i.to_be_bytes();
                    (
                        [
                            198,
                            18 | (b[1] & 1),
                            b[2],
                            b[3],
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                        ],
                        80,
                    )
                } else {
                    (
                        [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        i as u16 + 1,
                    )
                };
                let tail = vip_key_tail(port, 6, 4);
                let (a, b) = vip_dir_buckets(fold_addr(&addr), tail, mask);
                assert!(a <= mask && b <= mask && a != b);
                let (a, b) = (a as usize, b as usize);
                let at = if fill[b] < fill[a] { b } else { a };
                assert!(
                    (fill[at] as usize) < crate::VIP_DIR_WAYS,
                    "{max_vips} VIPs: no room for {i}"
                );
                fill[at] += 1;
                in_first += (at == a) as u32;
            }
            // Most VIPs are found in their first bucket (one array read).
            assert!(
                in_first * 10 >= max_vips * 7,
                "{in_first} of {max_vips} in the first bucket"
            );
        }
    }

    #[test]
    fn the_flow_hash_spreads_the_shapes_traffic_comes_in() {
        // 10,000 flows into 65,536 table sets (the hash's high bits) and
        // into the 65,537 slots of a ring (`% 65537`, all bits): a random
        // function fills about 9,264 distinct ones. Shapes: one client's
        // ports, many clients of one port, IPv6 clients differing in one
        // word.
        let sets = 65536u32;
        for shape in 0..3 {
            let mut seen = [0u32; 65536 / 32];
            let mut distinct = 0;
            let mut seen_slot = [0u32; 65537 / 32 + 1];
            let mut distinct_slots = 0;
            for i in 0..10_000u32 {
                let (src, sport) = match shape {
                    0 => (
                        [198, 19, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        20000 + i as u16,
                    ),
                    1 => {
                        let b = i.to_be_bytes();
                        (
                            [198, 19, b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                            40000,
                        )
                    }
                    _ => {
                        let b = i.to_be_bytes();
                        let mut a = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                        a[8..12].copy_from_slice(&b);
                        (a, 40000)
                    }
                };
                let h = table_hash(fold_addr(&src), sport, 80, 6);
                assert_eq!(h, hash_5tuple(&src, sport, 80, 6));
                let slot = h % 65537;
                let (w, m) = ((slot / 32) as usize, 1u32 << (slot % 32));
                if seen_slot[w] & m == 0 {
                    seen_slot[w] |= m;
                    distinct_slots += 1;
                }
                let set = crate::flow_set_base(h, sets) / crate::FLOW_WAYS;
                let (w, m) = ((set / 32) as usize, 1u32 << (set % 32));
                if seen[w] & m == 0 {
                    seen[w] |= m;
                    distinct += 1;
                }
            }
            assert!(
                distinct > 9000,
                "shape {shape}: {distinct} distinct sets of 10,000 flows"
            );
            assert!(
                distinct_slots > 9000,
                "shape {shape}: {distinct_slots} distinct ring slots of 10,000 flows"
            );
        }
    }
}
