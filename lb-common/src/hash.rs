//! The flow hash: one definition, used by the datapath to pick a ring slot and
//! by userspace and the tests to predict that choice.
//!
//! MurmurHash3 (x86, 32-bit) over a fixed number of 32-bit words: cheap in BPF
//! (no loops the verifier must bound, no tables), well mixed, and identical on
//! every little- and big-endian host because words are read little-endian.

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
    let mut h = h ^ len_bytes;
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

/// Hash of a flow's 5-tuple. The destination address is left out: within one
/// VIP's ring it is the same for every flow (ports are host order).
#[inline(always)]
pub const fn hash_5tuple(src: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, word(src, 0));
    h = mix(h, word(src, 4));
    h = mix(h, word(src, 8));
    h = mix(h, word(src, 12));
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 24)
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
        assert_eq!(hash_5tuple(&client, 40000, 80, 6), 614508554);
        assert_eq!(hash_src(&client), 3358244290);
    }
}
