//! Maglev lookup-table builder: a pure function from a weighted backend set
//! to a table of size M (a prime) of backend ids.
//!
//! Determinism: backends are ordered by address, and each one's permutation
//! comes from the hash of its address, so every node with the same backend
//! set builds the same table bit for bit whatever order the backends were
//! added in. Weights: in each round a backend claims `weight / max_weight`
//! slots (fractions carried over), so shares follow the weights while the
//! classic Maglev property holds: removing one backend mostly moves only the
//! slots it held.

use lb_common::hash::hash_addr_seeded;

/// One backend as the builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Backend id written into the table (never 0).
    pub id: u32,
    /// Address (16 bytes, network order): the key of the permutation.
    pub addr: [u8; 16],
    /// Relative weight; 0 = takes no slots (draining or down).
    pub weight: u32,
}

/// Whether `n` is prime (ring sizes must be).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d * d <= n as u64 {
        if (n as u64).is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds the table. `m` must be prime (callers validate it). Backends with
/// weight 0 are left out; with no weighted backend every slot is 0 ("no
/// backend"), which the datapath drops and counts.
pub fn build(backends: &[Entry], m: u32) -> Vec<u32> {
    let mut table = vec![0u32; m as usize];
    let mut live: Vec<&Entry> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || m == 0 {
        return table;
    }
    live.sort_by_key(|b| b.addr);
    let max_w = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let m64 = m as u64;
    // Per backend: permutation (offset, skip), next permutation index, and
    // the weight credit carried between rounds.
    let mut offset = Vec::with_capacity(live.len());
    let mut skip = Vec::with_capacity(live.len());
    for b in &live {
        offset.push(hash_addr_seeded(&b.addr, 0x5bd1_e995) as u64 % m64);
        skip.push(if m > 1 {
            hash_addr_seeded(&b.addr, 0x1b87_3593) as u64 % (m64 - 1) + 1
        } else {
            1
        });
    }
    let mut next = vec![0u64; live.len()];
    let mut credit = vec![0u64; live.len()];
    let mut filled = 0u64;
    'rounds: loop {
        for i in 0..live.len() {
            credit[i] += live[i].weight as u64;
            while credit[i] >= max_w {
                credit[i] -= max_w;
                // Claim this backend's next free slot in its permutation.
                let mut slot = (offset[i] + next[i] * skip[i]) % m64;
                while table[slot as usize] != 0 {
                    next[i] += 1;
                    slot = (offset[i] + next[i] * skip[i]) % m64;
                }
                table[slot as usize] = live[i].id;
                next[i] += 1;
                filled += 1;
                if filled == m64 {
                    break 'rounds;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    fn backends(n: u32) -> Vec<Entry> {
        (1..=n)
            .map(|i| {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&[198, 18, (i >> 8) as u8, i as u8]);
                Entry {
                    id: i,
                    addr,
                    weight: 1,
                }
            })
            .collect()
    }

    fn shares(table: &[u32], max_id: u32) -> Vec<u64> {
        let mut s = vec![0u64; max_id as usize + 1];
        for &id in table {
            s[id as usize] += 1;
        }
        s
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && is_prime(251) && is_prime(7));
        assert!(
            !is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535) && !is_prime(9)
        );
    }

    #[test]
    fn even_spread_for_equal_weights() {
        for n in [10, 100, 1000] {
            let t = build(&backends(n), M);
            assert!(t.iter().all(|&id| id != 0), "every slot filled");
            let s = shares(&t, n);
            let max = *s[1..].iter().max().unwrap();
            let min = *s[1..].iter().min().unwrap();
            let ratio = max as f64 / min as f64;
            println!("n={n}: max/min slots = {max}/{min} = {ratio:.4}");
            assert!(ratio <= 1.1, "n={n}: max/min {ratio}");
        }
    }

    #[test]
    fn weighted_shares_follow_weights() {
        let mut b = backends(3);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 3;
        let s = shares(&build(&b, M), 3);
        for (i, w) in [(1usize, 1.0f64), (2, 2.0), (3, 3.0)] {
            let want = w / 6.0;
            let got = s[i] as f64 / M as f64;
            println!("weight {w}: share {got:.4} (want {want:.4})");
            assert!(
                (got - want).abs() / want <= 0.02,
                "backend {i}: share {got}, want {want}"
            );
        }
    }

    #[test]
    fn order_independent() {
        let b = backends(50);
        let mut r = b.clone();
        r.reverse();
        r.swap(3, 17);
        assert_eq!(build(&b, M), build(&r, M));
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        let b = backends(10);
        let before = build(&b, M);
        let after = build(&b[..9], M);
        // Slots that pointed at a surviving backend but moved anyway.
        let elsewhere = before.iter().filter(|&&id| id != 10).count();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| **x != 10 && x != y)
            .count();
        let frac = moved as f64 / elsewhere as f64;
        println!(
            "removing 1 of 10: {moved} of {elsewhere} other slots moved ({:.2}%)",
            frac * 100.0
        );
        assert!(frac < 0.05, "too much disruption: {frac}");
        assert!(after.iter().all(|&id| id != 10 && id != 0));
    }

    #[test]
    fn zero_weight_and_empty_sets() {
        let mut b = backends(3);
        b[1].weight = 0;
        let t = build(&b, 251);
        assert!(t.iter().all(|&id| id == 1 || id == 3));
        assert!(build(&[], 251).iter().all(|&id| id == 0));
        b.iter_mut().for_each(|e| e.weight = 0);
        assert!(build(&b, 251).iter().all(|&id| id == 0));
    }
}
