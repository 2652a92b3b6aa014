//! Packet fixtures for the scheduling policies: round-robin, weighted
//! round-robin, least-connections (exact and power-of-two choices) and
//! regions, through the real program with BPF_PROG_TEST_RUN.

use lb_common::{AF_INET, PROTO_TCP, VIP_F_REGIONS, VipKey, VipMeta};
use lb_tests::{Fixture, VipSpec, action, backend_of, tcp4, v4};
use lb_user::policy::sched::{self, Scheduler};

const VIP4: [u8; 4] = [198, 18, 0, 100];

/// Per-CPU state (round-robin positions) needs one CPU for exact counts.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

fn key() -> VipKey {
    VipKey {
        addr: v4(VIP4),
        port: 80,
        proto: PROTO_TCP,
        family: AF_INET,
    }
}

fn backends(weights: &[u32]) -> Vec<(u32, [u8; 16], u32)> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| (i as u32 + 1, v4([198, 18, 2, i as u8 + 1]), *w))
        .collect()
}

/// A VIP with `sched` over backends of the given weights.
fn setup(weights: &[u32], sched: Scheduler, flags: u32) -> (Fixture, VipSpec) {
    let mut f = Fixture::new().expect("load");
    let spec = VipSpec {
        key: key(),
        vip_id: 0,
        flags,
        ring_size: 251,
        backends: backends(weights),
    };
    f.add_vip(&spec).expect("vip");
    install(&mut f, &spec, sched);
    (f, spec)
}

fn install(f: &mut Fixture, spec: &VipSpec, sched: Scheduler) {
    let mut dp = f.dp();
    let meta = dp.vip(&spec.key).expect("meta");
    dp.upsert_vip(
        &spec.key,
        VipMeta {
            scheduler: sched.datapath(),
            ..meta
        },
    )
    .expect("scheduler");
    for &(id, _, w) in &spec.backends {
        let mut b = dp.backend(id).expect("backend");
        b.weight = w as u16;
        dp.set_backend(id, &b).expect("weight");
    }
    let entries: Vec<_> = spec
        .backends
        .iter()
        .map(|&(id, addr, weight)| lb_user::policy::maglev::Entry { id, addr, weight })
        .collect();
    dp.install_ring(&spec.key, &sched::ring(sched, &entries, spec.ring_size))
        .expect("ring");
}

/// Client `i`'s address and port.
fn client(i: u32) -> ([u8; 4], u16) {
    (
        [198, 19, (i >> 8) as u8, i as u8],
        1024 + (i % 60000) as u16,
    )
}

/// Client `i` opens a connection (a SYN without ACK: a new flow, scheduled
/// and written to the table); returns the backend it went to.
fn syn(f: &mut Fixture, i: u32) -> u32 {
    let (a, p) = client(i);
    let r = f.run(&lb_tests::tcp4_syn(a, VIP4, p, 80)).expect("run");
    assert_eq!(r.action, action::TX);
    backend_of(&r.out)
}

/// A segment of client `i`'s established connection (ACK).
fn ack(f: &mut Fixture, i: u32) -> u32 {
    let (a, p) = client(i);
    let r = f.run(&tcp4(a, VIP4, p, 80, b"")).expect("run");
    assert_eq!(r.action, action::TX);
    backend_of(&r.out)
}

/// Client `i` closes its connection (FIN|ACK).
fn fin(f: &mut Fixture, i: u32) -> u32 {
    let (a, p) = client(i);
    let r = f.run(&lb_tests::tcp4_fin(a, VIP4, p, 80)).expect("run");
    backend_of(&r.out)
}

fn longest_run(seq: &[u32]) -> usize {
    let (mut best, mut run) = (0, 0);
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
fn round_robin_spreads_within_one_flow_per_cpu() {
    pin_to_cpu0();
    let (mut f, _) = setup(&[1, 1, 1], Scheduler::RoundRobin, 0);
    let seq: Vec<u32> = (0..3001).map(|i| syn(&mut f, i)).collect();
    let mut n = [0usize; 4];
    seq.iter().for_each(|&b| n[b as usize] += 1);
    println!("round-robin, 3001 new flows: {:?}", &n[1..]);
    let (max, min) = (n[1..].iter().max().unwrap(), n[1..].iter().min().unwrap());
    assert!(max - min <= 1, "round-robin spread {:?}", &n[1..]);
    assert_eq!(longest_run(&seq), 1);
}

#[test]
fn weighted_round_robin_follows_weights_and_interleaves() {
    pin_to_cpu0();
    let (mut f, _) = setup(&[1, 2, 3], Scheduler::WeightedRoundRobin, 0);
    let seq: Vec<u32> = (0..6000).map(|i| syn(&mut f, i)).collect();
    let mut n = [0usize; 4];
    seq.iter().for_each(|&b| n[b as usize] += 1);
    println!(
        "weighted 1:2:3, 6000 new flows: {:?}, longest run {}",
        &n[1..],
        longest_run(&seq)
    );
    for (i, w) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let share = n[i] as f64 / 6000.0;
        assert!(
            (share - w / 6.0).abs() / (w / 6.0) <= 0.05,
            "backend {i} share {share}"
        );
    }
    // Weight 3 of 6: every other new flow, never two in a row.
    assert_eq!(longest_run(&seq), 1, "no burst to one backend");
}

#[test]
fn least_connections_sends_new_flows_to_the_least_loaded() {
    let (mut f, _) = setup(&[1, 1, 1], Scheduler::LeastConnections, 0);
    // 30 new flows with none closing: an even 10/10/10.
    for i in 0..30 {
        syn(&mut f, i);
    }
    let active: Vec<u64> = (1..=3).map(|id| f.dp().active(id).unwrap()).collect();
    assert_eq!(active, vec![10, 10, 10]);
    // Close the 10 flows of backend 1 (FIN): the next 10 go there.
    let on_1: Vec<u32> = (0..30).filter(|&i| ack(&mut f, i) == 1).collect();
    assert_eq!(on_1.len(), 10, "established flows keep their backend");
    for &i in &on_1 {
        fin(&mut f, i);
    }
    assert_eq!(f.dp().active(1).unwrap(), 0, "FIN uncounts once");
    for &i in &on_1 {
        fin(&mut f, i); // a second FIN must not uncount again
    }
    assert_eq!(f.dp().active(1).unwrap(), 0);
    let next: Vec<u32> = (100..110).map(|i| syn(&mut f, i)).collect();
    assert!(
        next.iter().all(|&b| b == 1),
        "new flows go to the emptied backend: {next:?}"
    );
}

#[test]
fn least_connections_avoids_a_backend_where_long_flows_pile_up() {
    let (mut f, _) = setup(&[1, 1, 1], Scheduler::LeastConnections, 0);
    // Short requests close right away, long ones (on backend 2) stay open.
    let mut to_2 = 0;
    for i in 0..300 {
        let b = syn(&mut f, i);
        if b == 2 {
            to_2 += 1;
        } else {
            fin(&mut f, i);
        }
    }
    println!(
        "least-connections: {to_2} of 300 new flows went to the backend holding the long flows"
    );
    // Round-robin would send 100 of them there; least-connections only the
    // few that arrive while backend 2 ties with the others.
    assert!(
        (1..=5).contains(&to_2),
        "new flows avoid the loaded backend ({to_2})"
    );
}

#[test]
fn least_connections_power_of_two_choices_on_large_pools() {
    // 20 backends (> LC_EXACT_MAX): two hashed candidates, the less loaded wins.
    let (mut f, _) = setup(
        &[1; 20],
        Scheduler::LeastConnections,
        lb_common::VIP_F_NO_FLOW_TABLE,
    );
    for id in 1..=10 {
        f.dp().set_active(id, 1000).unwrap();
    }
    let n = 2000;
    let loaded = (0..n).filter(|&i| syn(&mut f, i) <= 10).count();
    println!(
        "power of two choices: {loaded} of {n} new flows to the loaded half (uniform would be ~{})",
        n / 2
    );
    assert!((loaded as f64) < 0.35 * n as f64, "{loaded}");
}

#[test]
fn weighted_least_connections_compares_per_weight() {
    let (mut f, _) = setup(&[1, 3], Scheduler::LeastConnections, 0);
    for i in 0..400 {
        syn(&mut f, i);
    }
    let (a1, a2) = (f.dp().active(1).unwrap(), f.dp().active(2).unwrap());
    println!("weights 1:3 → active {a1}:{a2}");
    assert!((a2 as f64 / a1 as f64 - 3.0).abs() < 0.1, "{a1}:{a2}");
}

#[test]
fn regions_keep_clients_on_their_backends_and_fall_back() {
    let (mut f, spec) = setup(&[1, 1, 1], Scheduler::Maglev, VIP_F_REGIONS);
    // Region: clients in 198.19.7.0/24 → backend 1 only, in ring slot 5.
    let mut prefix = [0u8; 16];
    prefix[..4].copy_from_slice(&[198, 19, 7, 0]);
    let entries = [lb_user::policy::maglev::Entry {
        id: 1,
        addr: spec.backends[0].1,
        weight: 1,
    }];
    f.dp()
        .install_region_ring(
            0,
            &[(prefix, 24)],
            5,
            &lb_user::policy::maglev::build(&entries, 251),
            0,
            None,
        )
        .unwrap();
    let regional: Vec<u32> = (0..200u32)
        .map(|i| {
            let r = f
                .run(&tcp4([198, 19, 7, i as u8], VIP4, 2000 + i as u16, 80, b""))
                .unwrap();
            backend_of(&r.out)
        })
        .collect();
    assert!(
        regional.iter().all(|&b| b == 1),
        "a region's clients land only on its backends"
    );
    let others: std::collections::BTreeSet<u32> = (0..200u32)
        .map(|i| {
            let r = f
                .run(&tcp4([198, 19, 8, i as u8], VIP4, 2000 + i as u16, 80, b""))
                .unwrap();
            backend_of(&r.out)
        })
        .collect();
    assert_eq!(others.len(), 3, "other clients use every backend");

    // Backend 1 goes down: the region's clients fall back to the rest.
    f.dp()
        .set_backend_state(1, lb_common::BACKEND_DOWN)
        .unwrap();
    let mut spec2 = VipSpec {
        key: spec.key,
        vip_id: 0,
        flags: VIP_F_REGIONS,
        ring_size: 251,
        backends: spec.backends.clone(),
    };
    spec2.backends.retain(|b| b.0 != 1);
    f.set_ring(&spec2).unwrap();
    for i in 0..50u32 {
        let r = f
            .run(&tcp4([198, 19, 7, i as u8], VIP4, 3000 + i as u16, 80, b""))
            .unwrap();
        assert_eq!(r.action, action::TX, "not dropped");
        assert_ne!(backend_of(&r.out), 1);
    }
}

#[test]
fn established_flows_never_move_when_policy_state_changes() {
    pin_to_cpu0();
    for s in [
        Scheduler::RoundRobin,
        Scheduler::LeastConnections,
        Scheduler::WeightedRoundRobin,
    ] {
        let (mut f, mut spec) = setup(&[1, 1, 1], s, 0);
        let first: Vec<u32> = (0..90).map(|i| syn(&mut f, i)).collect();
        spec.backends = backends(&[1, 1, 1, 2]);
        for &(id, addr, _) in &spec.backends[3..] {
            let mut b = f.dp().backend(1).unwrap();
            b.addr = addr;
            b.dst_mac = lb_tests::backend_mac(id);
            f.dp().set_backend(id, &b).unwrap();
        }
        install(&mut f, &spec, s);
        if s == Scheduler::LeastConnections {
            f.dp().set_active(2, 500).unwrap();
        }
        let again: Vec<u32> = (0..90).map(|i| ack(&mut f, i)).collect();
        assert_eq!(first, again, "{}: established flows moved", s.name());
    }
}

/// Regions with nested prefixes: the longest one that covers a client
/// decides (198.19.0.0/16 → backend 2, inside it 198.19.7.0/24 → backend 1).
#[test]
fn the_longest_region_prefix_wins() {
    let (mut f, spec) = setup(&[1, 1, 1], Scheduler::Maglev, VIP_F_REGIONS);
    let prefix = |a: [u8; 4]| {
        let mut p = [0u8; 16];
        p[..4].copy_from_slice(&a);
        p
    };
    let only = |i: usize| {
        [lb_user::policy::maglev::Entry {
            id: spec.backends[i].0,
            addr: spec.backends[i].1,
            weight: 1,
        }]
    };
    f.dp()
        .install_region_ring(
            0,
            &[(prefix([198, 19, 0, 0]), 16)],
            6,
            &lb_user::policy::maglev::build(&only(1), 251),
            0,
            None,
        )
        .unwrap();
    f.dp()
        .install_region_ring(
            0,
            &[(prefix([198, 19, 7, 0]), 24)],
            5,
            &lb_user::policy::maglev::build(&only(0), 251),
            0,
            None,
        )
        .unwrap();
    let backends_of = |f: &mut Fixture, net: [u8; 3]| -> std::collections::BTreeSet<u32> {
        (0..100u32)
            .map(|i| {
                let r = f
                    .run(&tcp4(
                        [net[0], net[1], net[2], i as u8],
                        VIP4,
                        4000 + i as u16,
                        80,
                        b"",
                    ))
                    .unwrap();
                backend_of(&r.out)
            })
            .collect()
    };
    assert_eq!(
        backends_of(&mut f, [198, 19, 7]),
        [1].into(),
        "the /24 wins inside it"
    );
    assert_eq!(
        backends_of(&mut f, [198, 19, 8]),
        [2].into(),
        "the /16 elsewhere in it"
    );
    assert_eq!(
        backends_of(&mut f, [198, 18, 9]).len(),
        3,
        "clients outside both use the whole VIP"
    );
}
