//! The flood guard: a SYN flood far larger than the connection table does
//! not evict established flows, because above `agent.new_flow_limit` new
//! flows per second per CPU are forwarded (by the consistent hash) without
//! a table entry. Checked against a control with the guard off, where the
//! same flood evicts them and a ring change then moves them.

use std::time::Instant;

use lb_common::{AF_INET, FlowKey, PROTO_TCP, VipKey};
use lb_tests::{Fixture, VipSpec, action, backend_of, pin_to_cpu, tcp4, tcp4_syn, time_action, v4};

const VIP: [u8; 4] = [198, 18, 0, 100];
const TABLE: u32 = 65_536; // what Fixture::new sizes the table to
const ESTABLISHED: u32 = 1000;

fn spec(backends: u32) -> VipSpec {
    VipSpec {
        key: VipKey {
            addr: v4(VIP),
            port: 80,
            proto: PROTO_TCP,
            family: AF_INET,
        },
        vip_id: 0,
        flags: 0,
        ring_size: 65537,
        backends: (1..=backends)
            .map(|i| (i, v4([198, 18, 2, i as u8]), 1))
            .collect(),
    }
}

fn established(i: u32) -> ([u8; 4], u16) {
    ([198, 18, 30 + (i / 250) as u8, (i % 250) as u8], 40000)
}

/// The connection-table key of a client's flow to the VIP's port 80.
fn key_of(client: [u8; 4], port: u16) -> FlowKey {
    FlowKey {
        src: v4(client),
        dst: v4(VIP),
        sport: port,
        dport: 80,
        proto: PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    }
}

/// Flood source `n`: 65,536 addresses of 198.19.0.0/16, then the next port.
fn flooder(n: u32) -> ([u8; 4], u16) {
    ([198, 19, (n >> 8) as u8, n as u8], 1024 + (n >> 16) as u16)
}

/// Establishes the flows, floods `flood` distinct SYN sources, adds a
/// backend (the ring changes), and returns (established flows still in the
/// table, established flows that changed backend, flows the guard kept out).
fn run(limit: u32, flood: u32) -> (u32, u32, u64) {
    let mut f = Fixture::new().expect("load");
    f.add_vip(&spec(3)).expect("vip");
    let first: Vec<u32> = (0..ESTABLISHED)
        .map(|i| {
            let (a, p) = established(i);
            let r = f.run(&tcp4(a, VIP, p, 80, b"")).expect("run");
            assert_eq!(r.action, action::TX);
            backend_of(&r.out)
        })
        .collect();
    f.dp().set_flood_limit(limit).expect("flood limit");
    let t0 = Instant::now();
    for n in 0..flood {
        let (a, p) = flooder(n);
        let r = f.run(&tcp4_syn(a, VIP, p, 80)).expect("flood");
        assert_eq!(r.action, action::TX, "a flood packet is still forwarded");
    }
    println!(
        "flood of {flood} SYN sources in {:.1} s (limit {limit}/s per CPU)",
        t0.elapsed().as_secs_f64()
    );
    f.add_vip(&spec(4)).expect("ring change");
    let dp = f.dp();
    let in_table = (0..ESTABLISHED)
        .filter(|i| {
            let (a, p) = established(*i);
            dp.flow(&key_of(a, p)).ok().flatten().is_some()
        })
        .count() as u32;
    let unrecorded = dp.flows_unrecorded().expect("counter");
    let moved = (0..ESTABLISHED)
        .filter(|i| {
            let (a, p) = established(*i);
            let r = f.run(&tcp4(a, VIP, p, 80, b"")).expect("run");
            backend_of(&r.out) != first[*i as usize]
        })
        .count() as u32;
    (in_table, moved, unrecorded)
}

/// The guard keeps a flood larger than the table from turning it over: at
/// 500 recorded flows per CPU per second the flood fills a fraction of the
/// table, so established flows leave only where their own set of 4 slots
/// overflowed (a set-associative table evicts per set, not when the whole
/// table is full: here 2 of 1,000 in one run), and none that stays moves.
#[test]
fn a_flood_larger_than_the_table_evicts_established_flows_only_where_a_set_overflows() {
    // Guard on: 1,000,000 flood sources into a 65,536-entry table.
    let flood = 1_000_000;
    // 500 per CPU per second: even a slow machine (or a thread moving
    // between CPUs) records far fewer than the table holds during the flood.
    let (in_table, moved, unrecorded) = run(500, flood);
    println!(
        "guard on: {in_table}/{ESTABLISHED} established flows still in the table, {moved} moved, \
         {unrecorded} flood flows forwarded without an entry"
    );
    assert!(
        in_table >= ESTABLISHED * 99 / 100,
        "at most 1% of established flows evicted: {in_table} of {ESTABLISHED} kept"
    );
    assert!(
        moved <= ESTABLISHED - in_table,
        "only evicted flows may move: {moved} moved, {} evicted",
        ESTABLISHED - in_table
    );
    // At most `limit` per CPU per second may be recorded (2 CPUs here).
    assert!(
        unrecorded as u32 >= flood - TABLE / 2,
        "the guard kept the flood out of the table: {unrecorded}"
    );

    // Control, guard off: the same test fails, so it can.
    let (in_table, moved, unrecorded) = run(0, 200_000);
    println!("guard off: {in_table}/{ESTABLISHED} still in the table, {moved} moved");
    assert_eq!(unrecorded, 0);
    assert!(
        in_table < ESTABLISHED / 2,
        "without the guard the flood evicts: {in_table}"
    );
    assert!(
        moved > 0,
        "and evicted flows follow the ring change: {moved}"
    );
}

/// The guard's window on one CPU, with a limit of 3 new flows per second:
/// the count since the datapath started reaches the limit (3 recorded),
/// the first flow past it begins a window (3 more recorded, counted from
/// 1), and the window refuses the rest for its second; a second later a
/// window begins again. So a flood's first second records at most twice
/// the limit, each second after it at most the limit.
#[test]
fn the_guard_records_its_limit_per_second_per_cpu() {
    // The guard's state is per CPU: every packet from one CPU.
    pin_to_cpu(0);
    let mut f = Fixture::new().expect("load");
    f.add_vip(&spec(3)).expect("vip");
    f.dp().set_flood_limit(3).expect("flood limit");
    let key = |n: u32| {
        let (a, p) = flooder(n);
        key_of(a, p)
    };
    let syns = |f: &mut Fixture, ns: std::ops::Range<u32>| {
        for n in ns.clone() {
            let (a, p) = flooder(n);
            let r = f.run(&tcp4_syn(a, VIP, p, 80)).expect("run");
            assert_eq!(r.action, action::TX, "forwarded, recorded or not");
        }
        ns.map(|n| f.dp().flow(&key(n)).expect("read").is_some())
            .collect::<Vec<_>>()
    };
    let t = [true; 6];
    assert_eq!(syns(&mut f, 0..8), [&t[..], &[false, false]].concat());
    assert_eq!(f.dp().flows_unrecorded().expect("counter"), 2);
    // The window that refused them is over after a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(syns(&mut f, 8..12), [true, true, true, false]);
    assert_eq!(f.dp().flows_unrecorded().expect("counter"), 3);
}

/// The bound the default guard states: at `agent.new_flow_limit`'s default
/// (125,000 new flows per second per CPU), a burst of 1,000,000 SYNs on one
/// CPU (one SYN repeated: every repetition opens a new flow) records at most
/// the limit per window, plus the count the first window found, whatever
/// the burst's speed; all of them are forwarded.
#[test]
fn the_default_guard_records_at_most_its_limit_per_second() {
    pin_to_cpu(0);
    let mut f = Fixture::new().expect("load");
    f.add_vip(&spec(3)).expect("vip");
    let limit = u64::from(lb_common::DEFAULT_NEW_FLOW_LIMIT);
    f.dp()
        .set_flood_limit(lb_common::DEFAULT_NEW_FLOW_LIMIT)
        .expect("flood limit");
    let burst: u32 = 1_000_000;
    let before = f.verdicts().expect("counters")[lb_common::verdict::TX as usize];
    let t0 = std::time::Instant::now();
    let (_, act) = time_action(
        &mut f.ebpf,
        lb_common::PROG_BALANCER,
        &tcp4_syn([198, 18, 40, 1], VIP, 40000, 80),
        burst,
    )
    .expect("timed run");
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(act, action::TX);
    let sent = f.verdicts().expect("counters")[lb_common::verdict::TX as usize] - before;
    assert_eq!(sent, u64::from(burst), "every SYN forwarded");
    let unrecorded = f.dp().flows_unrecorded().expect("counter");
    let recorded = u64::from(burst) - unrecorded;
    // Windows of at least a second each, the first one counting from the
    // count it found (at most the limit more).
    let windows = secs.ceil() as u64 + 1;
    println!(
        "{burst} SYNs in {secs:.2} s at the default guard: {recorded} recorded, {unrecorded} not \
         (bound: {} = {limit}/s x {windows} windows)",
        limit * windows
    );
    assert!(
        recorded <= limit * windows,
        "at most {limit} per window: {recorded} recorded in {secs:.2} s"
    );
    if secs < 4.0 {
        assert!(
            unrecorded > 0,
            "a burst faster than the limit is partly kept out of the table"
        );
    }
}
