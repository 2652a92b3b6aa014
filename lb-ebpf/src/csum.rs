//! Every checksum helper (RFC 1071 ones'-complement sums, RFC 1624
//! incremental updates): pure functions, and one sum over packet bytes.

use aya_ebpf::programs::XdpContext;

use crate::parse::ptr_at;

/// Folds a 32-bit running sum into the 16-bit ones'-complement checksum.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum of a 20-byte IPv4 header given as ten big-endian words (the
/// checksum word itself must be zero).
#[inline(always)]
pub fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    fold(sum)
}

/// Ones'-complement sum of `~old + new` over the first `words` 16-bit words
/// (RFC 1624): what replacing `old` by `new` adds to a checksum.
#[inline(always)]
pub(crate) fn delta(old: &[u8; 16], new: &[u8; 16], words: usize) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 8 && i < words {
        let o = u16::from_be_bytes([old[2 * i], old[2 * i + 1]]);
        let n = u16::from_be_bytes([new[2 * i], new[2 * i + 1]]);
        sum += (!o) as u32 + n as u32;
        i += 1;
    }
    sum
}

/// Applies a delta to a checksum as stored in the packet (big-endian).
#[inline(always)]
pub(crate) fn apply(check: [u8; 2], delta: u32) -> [u8; 2] {
    let mut sum = (!u16::from_be_bytes(check)) as u32 + delta;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Ones'-complement sum of `~old + new` over a 4-byte address.
#[inline(always)]
pub(crate) fn delta4(old: [u8; 4], new: &[u8; 16]) -> u32 {
    (!u16::from_be_bytes([old[0], old[1]])) as u32
        + u16::from_be_bytes([new[0], new[1]]) as u32
        + (!u16::from_be_bytes([old[2], old[3]])) as u32
        + u16::from_be_bytes([new[2], new[3]]) as u32
}

/// What replacing the ports `p` by `from, to` adds to a checksum.
#[inline(always)]
pub(crate) fn delta_ports(p: [u8; 4], from: u16, to: u16) -> u32 {
    (!u16::from_be_bytes([p[0], p[1]])) as u32
        + from as u32
        + (!u16::from_be_bytes([p[2], p[3]])) as u32
        + to as u32
}

/// Sum of the big-endian 16-bit words of the `N` packet bytes at `off`:
/// one bounds check for the whole quote, then reads through the pointer.
#[inline(always)]
pub(crate) fn words_sum<const N: usize>(ctx: &XdpContext, off: usize) -> Result<u32, ()> {
    let q: *const [u8; N] = ptr_at(ctx, off)?;
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        // SAFETY: ptr_at checked all N bytes.
        sum += u16::from_be_bytes(unsafe { [(*q)[i], (*q)[i + 1]] }) as u32;
        i += 2;
    }
    Ok(sum)
}
