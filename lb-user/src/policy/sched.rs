//! What the datapath's ring holds for each scheduler (pure functions):
//!
//! - `maglev`: the Maglev table ([`crate::policy::maglev::build`]).
//! - `round-robin` / `weighted-round-robin`: one period of smooth weighted
//!   round-robin (the nginx algorithm): each backend appears `weight` times
//!   (weights divided by their gcd), spread out so that a backend with half
//!   the weight gets every other slot, never a burst. The datapath walks it
//!   with a per-CPU position.
//! - `least-connections`: each live backend once; the datapath picks the one
//!   with the fewest active flows per weight.

use crate::policy::maglev::Entry;

pub use crate::vocab::Scheduler;

impl Scheduler {
    /// The datapath's `SCHED_*` value.
    pub fn datapath(self) -> u32 {
        match self {
            Self::Maglev => lb_common::SCHED_MAGLEV,
            Self::RoundRobin | Self::WeightedRoundRobin => lb_common::SCHED_ROUND_ROBIN,
            Self::LeastConnections => lb_common::SCHED_LEAST_CONN,
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One period of smooth weighted round-robin over the backends with a
/// positive weight: each appears `weight` times (weights divided by their
/// gcd) and the occurrences are spread evenly around the cycle: the heaviest
/// backend takes evenly spaced slots first, each next one spreads over the
/// slots still free. Unlike nginx's algorithm this is smooth across the
/// wrap of the period too, which matters because the datapath walks it as
/// a ring. Deterministic (ties by address). At most about `max_len` slots:
/// larger weight sums are scaled down proportionally.
pub fn smooth_wrr(backends: &[Entry], max_len: usize) -> Vec<u32> {
    let mut live: Vec<&Entry> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Vec::new();
    }
    let g = live.iter().fold(0u64, |g, b| gcd(g, b.weight as u64));
    let mut w: Vec<(u64, &Entry)> = live
        .drain(..)
        .map(|b| (b.weight as u64 / g.max(1), b))
        .collect();
    let total: u64 = w.iter().map(|x| x.0).sum();
    if total as usize > max_len {
        let scale = max_len as f64 / total as f64;
        w.iter_mut()
            .for_each(|x| x.0 = ((x.0 as f64 * scale).round() as u64).max(1));
    }
    w.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.addr.cmp(&b.1.addr)));
    let total: usize = w.iter().map(|x| x.0 as usize).sum();
    let mut seq = vec![0u32; total];
    let mut free: Vec<usize> = (0..total).collect();
    for (weight, b) in w {
        let n = free.len();
        let picks: Vec<usize> = (0..weight as usize)
            .map(|k| k * n / weight as usize)
            .collect();
        for &p in &picks {
            seq[free[p]] = b.id;
        }
        let taken: std::collections::HashSet<usize> = picks.into_iter().collect();
        free = free
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !taken.contains(i))
            .map(|(_, s)| s)
            .collect();
    }
    seq
}

/// Each backend with a positive weight once, ordered by address.
pub fn least_conn_list(backends: &[Entry]) -> Vec<u32> {
    let mut live: Vec<&Entry> = backends.iter().filter(|b| b.weight > 0).collect();
    live.sort_by_key(|b| b.addr);
    live.iter().map(|b| b.id).collect()
}

/// The ring contents for `sched` (`m`: the Maglev table size).
pub fn ring(sched: Scheduler, backends: &[Entry], m: u32) -> Vec<u32> {
    match sched {
        Scheduler::Maglev => crate::policy::maglev::build(backends, m),
        Scheduler::RoundRobin => {
            let equal: Vec<Entry> = backends
                .iter()
                .map(|b| Entry {
                    weight: b.weight.min(1),
                    ..*b
                })
                .collect();
            smooth_wrr(&equal, lb_common::MAX_RING_SIZE as usize)
        }
        Scheduler::WeightedRoundRobin => smooth_wrr(backends, lb_common::MAX_RING_SIZE as usize),
        Scheduler::LeastConnections => least_conn_list(backends),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(id: u32, w: u32) -> Entry {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 2, id as u8]);
        Entry {
            id,
            addr,
            weight: w,
        }
    }

    fn longest_run(seq: &[u32]) -> usize {
        let mut best = 0;
        let mut run = 0;
        for i in 0..seq.len() {
            run = if i > 0 && seq[i] == seq[i - 1] {
                run + 1
            } else {
                1
            };
            best = best.max(run);
        }
        best
    }

    #[test]
    fn smooth_interleaving() {
        // Weight 3 of 6 gets every other slot, not three in a row.
        let s = smooth_wrr(&[e(1, 1), e(2, 2), e(3, 3)], 65537);
        assert_eq!(s.len(), 6);
        assert_eq!(s.iter().filter(|&&x| x == 3).count(), 3);
        assert_eq!(s.iter().filter(|&&x| x == 2).count(), 2);
        assert_eq!(longest_run(&s), 1, "{s:?}");
        // Across the wrap of the period, too.
        let twice: Vec<u32> = s.iter().chain(&s).copied().collect();
        assert_eq!(longest_run(&twice), 1, "{twice:?}");
    }

    #[test]
    fn weights_reduced_and_scaled() {
        assert_eq!(
            smooth_wrr(&[e(1, 100), e(2, 200)], 65537).len(),
            3,
            "divided by the gcd"
        );
        let big: Vec<Entry> = (1..=20).map(|i| e(i, 9_999 - i)).collect();
        let s = smooth_wrr(&big, 1000);
        assert!(s.len() <= 1000 + 20, "scaled to fit: {}", s.len());
        assert!(smooth_wrr(&[e(1, 0)], 10).is_empty());
    }

    #[test]
    fn round_robin_ignores_weights_and_least_conn_lists_each_once() {
        let b = [e(3, 5), e(1, 1), e(2, 0)];
        assert_eq!(ring(Scheduler::RoundRobin, &b, 251), vec![1, 3]);
        assert_eq!(ring(Scheduler::LeastConnections, &b, 251), vec![1, 3]);
    }
}
