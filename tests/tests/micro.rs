//! Micro-benchmark (run by `cargo xtask bench micro`, not by the test
//! suite): ns/packet through BPF_PROG_TEST_RUN with `repeat`, the median of
//! five rounds (each round times every case once), for the datapath's
//! paths, two floor programs and the cost programs of the tools object (the
//! floor plus one primitive each), each as the median of its per-round
//! ratios to the swap-MACs-`XDP_TX` floor of the same round.
//!
//! `repeat` runs every repetition on the buffer the previous one left, so
//! each case checks afterwards, with the verdict counters, that every
//! repetition took the path being timed; IPIP is timed through `bench_ipip`,
//! which strips the previous repetition's outer header and tail-calls the
//! balancer.
//!
//! `LB_PROFILE="<case name>"` times only that case, alternating with the
//! swap-MACs floor, for about 8 s, and prints its median and its median
//! ratio to the floor: long enough to sample the JIT image with `perf
//! record -a` while it runs.

use aya::maps::{Array, ProgramArray};
use lb_common::{
    AF_INET, AF_INET6, PROTO_TCP, VIP_F_IPIP, VIP_F_NO_FLOW_TABLE, VipKey, VipMeta, verdict,
};
use lb_tests::{Fixture, VipSpec, loader, tcp4, tcp6, time_action, v4, v6};
use lb_user::policy::sched::{self, Scheduler};

const REPEAT: u32 = 1_000_000;
/// Runs per case (median); `LB_MICRO_RUNS` overrides it (the A/B mode runs
/// each side once per pair).
fn run_count() -> usize {
    std::env::var("LB_MICRO_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(5)
}

struct Row {
    name: &'static str,
    ns: f64,
    /// Multiple of the swap-MACs floor: the median of the per-round ratios
    /// (each case timed against the floor of its own round, so a VM that
    /// speeds up or slows down during the run moves both alike).
    ratio: f64,
    /// Every run's ns per packet, in run order (bench.json keeps them).
    samples: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Every case timed [`run_count`] times, in rounds (each round times every
/// case once, the floors included): per case the median ns and the median
/// of its per-round ratios to the swap-MACs floor (`cases[FLOOR_TX]`).
fn bench_rounds(f: &mut Fixture, tools: &mut aya::Ebpf, cases: &[Case]) -> Vec<Row> {
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..run_count() {
        for (i, c) in cases.iter().enumerate() {
            ns[i].push(time_case(f, tools, c, REPEAT));
        }
    }
    cases
        .iter()
        .zip(&ns)
        .map(|(c, runs)| Row {
            name: c.name,
            samples: runs.clone(),
            ns: median(runs.clone()),
            ratio: median(
                runs.iter()
                    .zip(&ns[FLOOR_TX])
                    .map(|(t, fl)| t / fl.max(0.001))
                    .collect(),
            ),
        })
        .collect()
}

/// Index of the swap-MACs floor in [`cases`].
const FLOOR_TX: usize = 1;

/// Points the wrappers' tail call at `f`'s balancer, or at the tools
/// object's program `to`.
fn jump_to(tools: &mut aya::Ebpf, f: &mut Fixture, to: Option<&str>) {
    let prog = match to {
        None => loader::xdp_program(&mut f.ebpf, lb_common::PROG_BALANCER),
        Some(name) => loader::xdp_program(tools, name),
    };
    let fd = prog
        .expect("prog")
        .fd()
        .expect("fd")
        .try_clone()
        .expect("dup fd");
    let mut jump: ProgramArray<_> =
        ProgramArray::try_from(tools.map_mut(lb_common::MAP_BENCH_JUMP).expect("map"))
            .expect("program array");
    jump.set(0, &fd, 0).expect("set tail call");
}

/// One timed run of `repeat` repetitions of case `c`, checked: every
/// repetition took the case's verdict (balancer cases, also through
/// `bench_ipip`) and nothing else, or the program returned the case's
/// action (floors and cost programs: a cost program returns `XDP_TX` only
/// when its primitive hit).
fn time_case(f: &mut Fixture, tools: &mut aya::Ebpf, c: &Case, repeat: u32) -> f64 {
    let before = f.verdicts().expect("counters");
    let (t, action) = match c.obj {
        Obj::Lb => time_action(&mut f.ebpf, c.prog, &c.pkt, repeat),
        Obj::Tools => {
            if c.prog == lb_common::PROG_BENCH_IPIP || c.prog == lb_common::PROG_BENCH_RESTORE {
                jump_to(tools, f, c.jump);
            }
            if c.prog == lb_common::PROG_BENCH_RESTORE {
                let mut frame: Array<_, [u8; lb_common::BENCH_FRAME_LEN]> =
                    Array::try_from(tools.map_mut(lb_common::MAP_BENCH_FRAME).expect("map"))
                        .expect("array");
                let bytes: [u8; lb_common::BENCH_FRAME_LEN] = c.pkt[..lb_common::BENCH_FRAME_LEN]
                    .try_into()
                    .expect("a frame of at least BENCH_FRAME_LEN bytes");
                frame.set(0, bytes, 0).expect("frame");
            }
            time_action(tools, c.prog, &c.pkt, repeat)
        }
    }
    .expect("timed run");
    let after = f.verdicts().expect("counters");
    match c.check {
        Check::Verdict(r) => {
            let r = r as usize;
            assert_eq!(
                after[r] - before[r],
                u64::from(repeat),
                "{}: every repetition must take the `{}` path; taken: {:?}",
                c.name,
                verdict::NAMES[r],
                lb_tests::moved_verdicts(&before, &after)
                    .into_iter()
                    .map(|(i, n)| (verdict::NAMES[i], n))
                    .collect::<Vec<_>>()
            );
            let total: u64 = after.iter().sum::<u64>() - before.iter().sum::<u64>();
            assert_eq!(
                total,
                u64::from(repeat),
                "{}: no repetition took another path",
                c.name
            );
        }
        Check::Action(a) => assert_eq!(action, a, "{}: the program's action", c.name),
    }
    t
}

/// Programs every VIP the cases use and wires `bench_ipip`'s tail call.
fn setup(f: &mut Fixture) {
    let vip4 = [198, 18, 0, 100];
    let vip6: std::net::Ipv6Addr = "2001:2::100".parse().unwrap();
    let b4 = |n: u32| {
        (1..=n)
            .map(|i| (i, v4([198, 18, 2, i as u8]), 1))
            .collect::<Vec<_>>()
    };
    let b6 = |n: u32| {
        (1..=n)
            .map(|i| (10 + i, v6(format!("2001:2:2::{i}").parse().unwrap()), 1))
            .collect::<Vec<_>>()
    };
    let k4 = |port| VipKey {
        addr: v4(vip4),
        port,
        proto: PROTO_TCP,
        family: AF_INET,
    };
    let k6 = |port| VipKey {
        addr: v6(vip6),
        port,
        proto: PROTO_TCP,
        family: AF_INET6,
    };
    for (key, vip_id, flags, backends) in [
        (k4(80), 0, 0, b4(10)),
        (k4(81), 1, VIP_F_NO_FLOW_TABLE, b4(10)),
        (k4(82), 2, VIP_F_IPIP, b4(10)),
        (k6(82), 3, VIP_F_IPIP, b6(10)),
        (k4(83), 4, VIP_F_NO_FLOW_TABLE, b4(8)),
        (k4(84), 5, VIP_F_NO_FLOW_TABLE, b4(8)),
        (k4(85), 6, VIP_F_NO_FLOW_TABLE, b4(20)),
        (k4(86), 7, 0, b4(10)),
        (k4(88), 9, VIP_F_IPIP | lb_common::VIP_F_GUE, b4(10)),
        // `gue` without a table, and with the second chance (below).
        (
            k4(89),
            10,
            VIP_F_IPIP | lb_common::VIP_F_GUE | VIP_F_NO_FLOW_TABLE,
            b4(10),
        ),
        (
            k4(90),
            11,
            VIP_F_IPIP
                | lb_common::VIP_F_GUE
                | VIP_F_NO_FLOW_TABLE
                | lb_common::VIP_F_SECOND_CHANCE,
            b4(10),
        ),
    ] {
        f.add_vip(&VipSpec {
            key,
            vip_id,
            flags,
            ring_size: 65537,
            backends,
        })
        .expect("vip");
    }
    // The other policies on the stateless path (every packet schedules).
    for (port, sched, n) in [
        (83, Scheduler::RoundRobin, 8u32),
        (84, Scheduler::LeastConnections, 8),
        (85, Scheduler::LeastConnections, 20),
    ] {
        let key = k4(port);
        let mut dp = f.dp();
        let meta = dp.vip(&key).expect("meta");
        dp.upsert_vip(
            &key,
            VipMeta {
                scheduler: sched.datapath(),
                ..meta
            },
        )
        .expect("scheduler");
        let entries: Vec<_> = b4(n)
            .into_iter()
            .map(|(id, addr, weight)| lb_user::policy::maglev::Entry { id, addr, weight })
            .collect();
        dp.install_ring(&key, &sched::ring(sched, &entries, 65537))
            .expect("ring");
    }
    // The second chance: the ring changes so that the timed flow's backend
    // on it differs from the one on the previous ring (that backend leaves
    // the ring, and stays live): every packet names a second hop.
    {
        let entries: Vec<_> = b4(10)
            .into_iter()
            .map(|(id, addr, weight)| lb_user::policy::maglev::Entry { id, addr, weight })
            .collect();
        let before = lb_user::policy::maglev::build(&entries, 65537);
        let h = lb_common::hash::hash_5tuple(&v4(CLIENT), 40000, 90, PROTO_TCP);
        let gone = before[(h % 65537) as usize];
        let after: Vec<_> = entries.into_iter().filter(|e| e.id != gone).collect();
        f.dp()
            .install_ring_keeping(&k4(90), &lb_user::policy::maglev::build(&after, 65537), 600)
            .expect("ring");
        let out = f
            .run(&tcp4(CLIENT, VIP4, 40000, 90, &[0; 10]))
            .expect("run")
            .out;
        assert_eq!(
            out[14 + 20 + 8] & 0x1f,
            2,
            "the timed packet names a second hop"
        );
    }
    // An idle timeout: every established packet reads the clock.
    {
        let mut dp = f.dp();
        let meta = dp.vip(&k4(86)).expect("meta");
        dp.upsert_vip(
            &k4(86),
            VipMeta {
                idle_timeout_s: 300,
                ..meta
            },
        )
        .expect("idle timeout");
        // The flood guard on, as the agent sets it by default, with a limit
        // no run reaches: every new flow reads its clock, none is refused.
        dp.set_flood_limit(u32::MAX).expect("flood guard");
    }
    // Full NAT: one NAT address and one port (so the reply case knows its
    // destination), one backend.
    {
        let mut dp = f.dp();
        dp.set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().unwrap()),
            nat_port_lo: NAT_PORT,
            nat_port_hi: NAT_PORT,
            nat_v4_count: 1,
            nat_v6_count: 1,
            nat_cpus: 1,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            ..Default::default()
        })
        .expect("settings");
        dp.set_nat_addrs(&[v4(NAT_ADDR)], &[nat6_addr()])
            .expect("NAT addresses");
    }
    f.add_vip(&VipSpec {
        key: k4(87),
        vip_id: 8,
        flags: lb_common::VIP_F_NAT,
        ring_size: 65537,
        backends: b4(1),
    })
    .expect("NAT VIP");
    f.add_vip(&VipSpec {
        key: k6(87),
        vip_id: 12,
        flags: lb_common::VIP_F_NAT,
        ring_size: 65537,
        backends: b6(1),
    })
    .expect("IPv6 NAT VIP");
    // Prime the connection table so the established cases are established.
    f.run(&established()).expect("prime");
    let r = f.run(&nat_established()).expect("prime NAT");
    assert_eq!(r.action, lb_tests::action::TX, "the NAT flow starts");
    let r = f.run(&nat6_established()).expect("prime IPv6 NAT");
    assert_eq!(r.action, lb_tests::action::TX, "the IPv6 NAT flow starts");
    f.run(&tcp4(CLIENT, VIP4, 40000, 86, &[0; 10]))
        .expect("prime");
}

const VIP4: [u8; 4] = [198, 18, 0, 100];
const CLIENT: [u8; 4] = [198, 19, 0, 1];

fn established() -> Vec<u8> {
    tcp4(CLIENT, VIP4, 40000, 80, &[0; 10])
}

/// The NAT source the NAT VIP's one flow gets (one address, one port).
const NAT_ADDR: [u8; 4] = [198, 18, 20, 2];
const NAT_PORT: u16 = 40000;

/// A packet of an established flow of the NAT VIP (port 87).
fn nat_established() -> Vec<u8> {
    tcp4(CLIENT, VIP4, 40000, 87, &[0; 10])
}

/// Its backend's reply (the VIP's one backend, 198.18.2.1:87, to the flow's
/// NAT source).
fn nat_reply() -> Vec<u8> {
    tcp4([198, 18, 2, 1], NAT_ADDR, 87, NAT_PORT, &[0; 10])
}

/// The IPv6 NAT VIP's NAT source address (port: `NAT_PORT`).
fn nat6_addr() -> [u8; 16] {
    v6("2001:2:20::2".parse().unwrap())
}

/// A packet of an established flow of the IPv6 NAT VIP ([2001:2::100]:87).
fn nat6_established() -> Vec<u8> {
    tcp6(
        v6("2001:2:1::1".parse().unwrap()),
        v6("2001:2::100".parse().unwrap()),
        40000,
        87,
        &[0; 10],
    )
}

/// Its backend's reply ([2001:2:2::1]:87, to the flow's NAT source).
fn nat6_reply() -> Vec<u8> {
    tcp6(
        v6("2001:2:2::1".parse().unwrap()),
        nat6_addr(),
        87,
        NAT_PORT,
        &[0; 10],
    )
}

/// The datapath-cost issue's target for a case, as a multiple of the
/// swap-MACs floor measured in the same run.
fn target(case: &str) -> Option<f64> {
    match case {
        "established IPv4 TCP dsr" => Some(2.5),
        "IPv4 ipip (via bench_ipip)" | "IPv6 ipip (via bench_ipip)" => Some(3.0),
        "non-VIP pass" => Some(1.6),
        "new flow IPv4 TCP dsr, SYN with table write" => Some(5.0),
        _ => None,
    }
}

/// Which object a case's program is in.
#[derive(Clone, Copy, PartialEq)]
enum Obj {
    /// The datapath (the fixture's; in A/B mode, A's or B's).
    Lb,
    /// The tools object (floors, `bench_ipip`, cost programs).
    Tools,
}

/// How a timed run shows it took the path being timed.
#[derive(Clone, Copy)]
enum Check {
    /// Every repetition counted this verdict of the balancer.
    Verdict(u32),
    /// The program returned this action.
    Action(u32),
}

/// One timed path: its program and object, its packet, its check.
struct Case {
    name: &'static str,
    obj: Obj,
    prog: &'static str,
    pkt: Vec<u8>,
    check: Check,
    /// Where a wrapper (`bench_ipip`, `bench_restore`) tail-calls: the
    /// balancer (`None`) or this tools program.
    jump: Option<&'static str>,
}

impl Case {
    fn lb(name: &'static str, pkt: Vec<u8>, reason: u32) -> Self {
        Self {
            name,
            obj: Obj::Lb,
            prog: lb_common::PROG_BALANCER,
            pkt,
            check: Check::Verdict(reason),
            jump: None,
        }
    }

    fn tools(name: &'static str, prog: &'static str, pkt: Vec<u8>, action: u32) -> Self {
        Self {
            name,
            obj: Obj::Tools,
            prog,
            pkt,
            check: Check::Action(action),
            jump: None,
        }
    }

    /// A tools program timed through `bench_ipip`, as the balancer's ipip
    /// rows are.
    fn tools_via_ipip(name: &'static str, prog: &'static str, pkt: Vec<u8>) -> Self {
        Self {
            name,
            obj: Obj::Tools,
            prog: lb_common::PROG_BENCH_IPIP,
            pkt,
            check: Check::Action(lb_tests::action::TX),
            jump: Some(prog),
        }
    }
}

fn cases() -> Vec<Case> {
    use lb_tests::action::{DROP, TX};
    let (client, vip4) = (CLIENT, VIP4);
    let vip6: std::net::Ipv6Addr = "2001:2::100".parse().unwrap();
    let c6 = v6("2001:2:1::1".parse().unwrap());
    let est = established();
    let ipip = |name, pkt| Case {
        name,
        obj: Obj::Tools,
        prog: lb_common::PROG_BENCH_IPIP,
        pkt,
        check: Check::Verdict(verdict::TX),
        jump: None,
    };
    // Paths that rewrite the packet in place, timed through `bench_restore`.
    let restored = |name, pkt, v| Case {
        name,
        obj: Obj::Tools,
        prog: lb_common::PROG_BENCH_RESTORE,
        pkt,
        check: Check::Verdict(v),
        jump: None,
    };
    vec![
        Case::tools("floor: XDP_DROP", "floor_drop", est.clone(), DROP),
        Case::tools("floor: swap MACs + XDP_TX", "floor_tx", est.clone(), TX),
        Case::lb("established IPv4 TCP dsr", est.clone(), verdict::TX),
        Case::lb(
            "established IPv4 TCP dsr, idle timeout set",
            tcp4(client, vip4, 40000, 86, &[0; 10]),
            verdict::TX,
        ),
        // Every repetition is a SYN for the same 5-tuple: scheduled afresh
        // and written over its table entry each time (with the flood
        // guard's clock read).
        Case::lb(
            "new flow IPv4 TCP dsr, SYN with table write",
            lb_tests::tcp4_syn(client, vip4, 40000, 80),
            verdict::TX,
        ),
        Case::lb(
            "new flow IPv4 TCP dsr (table off)",
            tcp4(client, vip4, 40000, 81, &[0; 10]),
            verdict::TX,
        ),
        ipip(
            "IPv4 ipip (via bench_ipip)",
            tcp4(client, vip4, 40000, 82, &[0; 10]),
        ),
        ipip(
            "IPv6 ipip (via bench_ipip)",
            tcp6(c6, v6(vip6), 40000, 82, &[0; 10]),
        ),
        ipip(
            "IPv4 gue (via bench_ipip)",
            tcp4(client, vip4, 40000, 88, &[0; 10]),
        ),
        ipip(
            "IPv4 gue, table off (via bench_ipip)",
            tcp4(client, vip4, 40000, 89, &[0; 10]),
        ),
        ipip(
            "IPv4 gue, table off, second hop (via bench_ipip)",
            tcp4(client, vip4, 40000, 90, &[0; 10]),
        ),
        restored(
            "established IPv4 TCP full NAT (via bench_restore)",
            nat_established(),
            verdict::TX,
        ),
        restored(
            "NAT reply IPv4 TCP (via bench_restore)",
            nat_reply(),
            verdict::NAT_REPLY,
        ),
        restored(
            "established IPv6 TCP full NAT (via bench_restore)",
            nat6_established(),
            verdict::TX,
        ),
        restored(
            "NAT reply IPv6 TCP (via bench_restore)",
            nat6_reply(),
            verdict::NAT_REPLY,
        ),
        Case::lb(
            "new flow, round-robin (table off)",
            tcp4(client, vip4, 40000, 83, &[0; 10]),
            verdict::TX,
        ),
        Case::lb(
            "new flow, least-connections exact, 8 backends (table off)",
            tcp4(client, vip4, 40000, 84, &[0; 10]),
            verdict::TX,
        ),
        Case::lb(
            "new flow, least-connections P2C, 20 backends (table off)",
            tcp4(client, vip4, 40000, 85, &[0; 10]),
            verdict::TX,
        ),
        Case::lb(
            "non-VIP pass",
            tcp4(client, [198, 18, 0, 99], 40000, 80, &[0; 10]),
            verdict::PASS_NON_VIP,
        ),
        // What the budget is made of: the floor plus one primitive each.
        Case::tools("cost: floor + parse", "cost_parse", est.clone(), TX),
        Case::tools("cost: floor + array lookup", "cost_array", est.clone(), TX),
        Case::tools(
            "cost: floor + connection-table set lookup (table::find, hit)",
            "cost_set",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + VIP directory lookup (dir::lookup_vip_by, first bucket)",
            "cost_dir",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + hash lookup (40-byte key)",
            "cost_hash",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + LRU hash lookup (40-byte key)",
            "cost_lru",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + LRU hash update",
            "cost_lru_update",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + hash lookup (16-byte key)",
            "cost_hash16",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + LRU hash lookup, per-CPU LRU lists",
            "cost_lru_pcpu",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + LRU hash update, per-CPU LRU lists",
            "cost_lru_pcpu_update",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + per-CPU counter update",
            "cost_counter",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + bpf_ktime_get_ns",
            "cost_clock",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + bpf_ktime_get_coarse_ns",
            "cost_clock_coarse",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: floor + 2 x bpf_xdp_adjust_head",
            "cost_adjust_head",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: non-VIP pass alone (parse, address filter, counter)",
            "cost_non_vip",
            tcp4(client, [198, 18, 0, 99], 40000, 80, &[0; 10]),
            lb_tests::action::PASS,
        ),
        Case::tools(
            "cost: minimal balancer (parse, VIP hash, LRU, backend array, counter, MACs)",
            "cost_minimal_lb",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: minimal balancer with a 16-byte IPv4 flow key",
            "cost_minimal_lb16",
            est.clone(),
            TX,
        ),
        Case::tools_via_ipip(
            "cost: floor + IPv4 IPIP encapsulation (via bench_ipip)",
            "cost_encap",
            tcp4(client, vip4, 40000, 82, &[0; 10]),
        ),
        Case::tools_via_ipip(
            "cost: floor + IP6IP6 encapsulation (via bench_ipip)",
            "cost_encap",
            tcp6(c6, v6(vip6), 40000, 82, &[0; 10]),
        ),
        Case::tools_via_ipip(
            "cost: minimal balancer with IPv4 IPIP (via bench_ipip)",
            "cost_minimal_lb_ipip",
            tcp4(client, vip4, 40000, 82, &[0; 10]),
        ),
        Case::tools_via_ipip(
            "cost: minimal balancer with IP6IP6 (via bench_ipip)",
            "cost_minimal_lb_ipip",
            tcp6(c6, v6(vip6), 40000, 82, &[0; 10]),
        ),
        Case::tools(
            "cost: Maglev scheduling without a VIP lookup (parse, scheduling hash, slot, ring, backend, counter, MACs)",
            "cost_sched",
            est.clone(),
            TX,
        ),
        Case::tools(
            "cost: our connection table's part of an established packet (headers, set lookup, backend, counter, MACs)",
            "cost_est",
            est,
            TX,
        ),
    ]
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench micro`"]
fn micro() {
    if let Some(path) = std::env::var_os("LB_AB_OBJECT") {
        return ab(std::path::Path::new(&path));
    }
    let mut f = Fixture::new().expect("load");
    let mut tools = lb_tests::load_tools().expect("tools object");
    setup(&mut f);
    if let Ok(name) = std::env::var("LB_PROFILE") {
        let cs = cases();
        let c = cs.iter().find(|c| c.name == name).expect("case");
        let t0 = std::time::Instant::now();
        let (mut v, mut r) = (Vec::new(), Vec::new());
        while t0.elapsed().as_secs() < 8 {
            let fl = time_case(&mut f, &mut tools, &cs[FLOOR_TX], REPEAT);
            let t = time_case(&mut f, &mut tools, c, REPEAT);
            v.push(t);
            r.push(t / fl);
        }
        eprintln!(
            "PROFILE {name}: median {:.1} ns, {:.2}x floor",
            median(v),
            median(r)
        );
        return;
    }
    let mut rows = bench_rounds(&mut f, &mut tools, &cases());
    let floor = rows[FLOOR_TX].ns.max(0.001);
    rows.extend(next_hop_rows(floor));

    // The Maglev table build the agent does on every ring change.
    let entries: Vec<_> = (1..=1000u32)
        .map(|i| lb_user::policy::maglev::Entry {
            id: i,
            addr: v4([198, 18, (i >> 8) as u8, i as u8]),
            weight: 1,
        })
        .collect();
    let builds: Vec<f64> = (0..run_count())
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(lb_user::policy::maglev::build(&entries, 65537));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let build_ms = median(builds);
    // And as a function of backends and ring size (median of the runs).
    let mut grid = Vec::new();
    for n in [10u32, 100, 1000, 5000] {
        for m in [1021u32, 16381, 65537] {
            if m < 2 * n {
                continue;
            }
            let entries: Vec<_> = (1..=n)
                .map(|i| lb_user::policy::maglev::Entry {
                    id: i,
                    addr: v4([198, 18, (i >> 8) as u8, i as u8]),
                    weight: 1,
                })
                .collect();
            let ms = median(
                (0..run_count())
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(lb_user::policy::maglev::build(&entries, m));
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            );
            grid.push(format!("{{\"backends\":{n},\"ring\":{m},\"ms\":{ms:.2}}}"));
        }
    }

    if std::env::var_os("LB_BENCH_JSON").is_some() {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"case\":\"{}\",\"ns_per_packet\":{:.1},\"ratio_to_floor_tx\":{:.2},\"samples_ns\":[{}]}}",
                    r.name,
                    r.ns,
                    r.ratio,
                    r.samples
                        .iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .collect();
        println!(
            "{{\"repeat\":{REPEAT},\"runs\":{},\"cases\":[{}],\"maglev_build_1000_backends_m65537_ms\":{build_ms:.1},\"maglev_build\":[{}]}}",
            run_count(),
            items.join(","),
            grid.join(",")
        );
    } else {
        println!(
            "\nmicro-benchmark: BPF_PROG_TEST_RUN, repeat {REPEAT}, median of {} rounds (ratio: median of per-round ratios)",
            run_count()
        );
        println!("| case | ns/packet | × swap-MACs floor | target |");
        println!("|---|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.2} | {} |",
                r.name,
                r.ns,
                r.ratio,
                target(r.name)
                    .map(|t| format!("≤ {t:.1}×"))
                    .unwrap_or_default()
            );
        }
        println!(
            "\nMaglev table build, 1000 backends, M = 65537: {build_ms:.1} ms (median of {})",
            run_count()
        );
    }
}

/// The established path with the next hop from the backend entry (what the
/// agent keeps fresh) against `bpf_fib_lookup` per packet, in a namespace
/// with a route and neighbour entries for the backends.
fn next_hop_rows(floor: f64) -> Vec<Row> {
    use lb_tests::{Netns, time_on};
    Netns::sweep("mnh");
    let ns = Netns::new("mnh").expect("ns");
    lb_tests::veth(&ns, "v0", &ns, "v1").expect("veth");
    for cmd in [
        vec!["ip", "addr", "add", "198.18.2.254/24", "dev", "v0"],
        vec!["ip", "link", "set", "v0", "up"],
        vec!["ip", "link", "set", "v1", "up"],
        vec!["sysctl", "-qw", "net.ipv4.ip_forward=1"],
    ] {
        ns.exec(cmd[0], &cmd[1..]).expect("setup");
    }
    for i in 1..=10 {
        ns.exec(
            "ip",
            &[
                "neigh",
                "replace",
                &format!("198.18.2.{i}"),
                "lladdr",
                &format!("02:00:00:00:01:{i:02x}"),
                "dev",
                "v0",
            ],
        )
        .expect("neigh");
    }
    let v0: u32 = ns
        .exec("cat", &["/sys/class/net/v0/ifindex"])
        .expect("ifindex")
        .trim()
        .parse()
        .expect("num");
    let mut out = Vec::new();
    for (name, flags) in [
        (
            "established IPv4 TCP dsr, next hop from the backend entry",
            0,
        ),
        (
            "established IPv4 TCP dsr, next hop from bpf_fib_lookup",
            lb_common::SETTINGS_F_FIB,
        ),
    ] {
        let mut f = Fixture::new().expect("load");
        f.dp()
            .set_settings(&lb_common::Settings {
                flags,
                ..Default::default()
            })
            .expect("settings");
        let key = VipKey {
            addr: v4([198, 18, 0, 100]),
            port: 80,
            proto: PROTO_TCP,
            family: AF_INET,
        };
        let backends = (1..=10u32)
            .map(|i| (i, v4([198, 18, 2, i as u8]), 1))
            .collect();
        f.add_vip(&VipSpec {
            key,
            vip_id: 0,
            flags: 0,
            ring_size: 65537,
            backends,
        })
        .expect("vip");
        let pkt = tcp4([198, 19, 0, 1], [198, 18, 0, 100], 40000, 80, &[0; 10]);
        let ns_runs = ns
            .enter(|| {
                lb_tests::run_on(&mut f.ebpf, lb_common::PROG_BALANCER, &pkt, v0).expect("prime");
                (0..run_count())
                    .map(|_| {
                        let before = f.verdicts().expect("counters")[verdict::TX as usize];
                        let t = time_on(&mut f.ebpf, lb_common::PROG_BALANCER, &pkt, REPEAT, v0)
                            .expect("timed");
                        let after = f.verdicts().expect("counters")[verdict::TX as usize];
                        assert_eq!(
                            after - before,
                            REPEAT as u64,
                            "{name}: every repetition forwarded"
                        );
                        t
                    })
                    .collect::<Vec<_>>()
            })
            .expect("setns");
        // Another fixture, timed after the rounds: against the rounds'
        // median floor.
        let ns = median(ns_runs.clone());
        out.push(Row {
            name,
            ns,
            ratio: ns / floor,
            samples: ns_runs,
        });
    }
    out
}

/// A/B mode (`cargo xtask bench micro --against REV` sets `LB_AB_OBJECT`
/// to REV's datapath object): both objects loaded side by side, each case
/// timed on A then B (order alternating) `LB_AB_PAIRS` times, one JSON line
/// with the B/A ratio of the medians and the per-pair spread. Same process,
/// same packets, same fixture code: only the object differs.
fn ab(path: &std::path::Path) {
    let bytes = std::fs::read(path).expect("A's datapath object");
    // The ELF parser wants the object 8-aligned, as include_bytes_aligned!
    // gives B's.
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` has at least `bytes.len()` bytes of plain u64 storage.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), bytes.len()) };
    buf.copy_from_slice(&bytes);
    let pairs: usize = std::env::var("LB_AB_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    // Many short runs beat few long ones on a VM whose speed drifts.
    let repeat: u32 = std::env::var("LB_AB_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut fa = Fixture::with_object(buf).expect("load A");
    let mut fb = Fixture::new().expect("load B");
    let mut tools = lb_tests::load_tools().expect("tools object");
    setup(&mut fa);
    setup(&mut fb);
    let mut out = Vec::new();
    // Floors and cost programs are the tools object's, the same for A and B.
    for c in cases().into_iter().filter(|c| {
        c.obj == Obj::Lb
            || (c.jump.is_none()
                && (c.prog == lb_common::PROG_BENCH_IPIP
                    || c.prog == lb_common::PROG_BENCH_RESTORE))
    }) {
        let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..pairs {
            let (ta, tb) = if i % 2 == 0 {
                let ta = time_case(&mut fa, &mut tools, &c, repeat);
                (ta, time_case(&mut fb, &mut tools, &c, repeat))
            } else {
                let tb = time_case(&mut fb, &mut tools, &c, repeat);
                (time_case(&mut fa, &mut tools, &c, repeat), tb)
            };
            a.push(ta);
            b.push(tb);
            r.push(tb / ta.max(0.001));
        }
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        let (ma, mb) = (median(a), median(b));
        out.push(format!(
            "{{\"case\":\"{}\",\"a_ns\":{ma:.1},\"b_ns\":{mb:.1},\"b_over_a\":{:.3},\"pair_median\":{:.3},\"pair_min\":{lo:.3},\"pair_max\":{hi:.3}}}",
            c.name,
            mb / ma.max(0.001),
            median(r.clone())
        ));
    }
    // Which objects were compared, so the caller can tell a real A/B from
    // two copies of one object.
    let fnv = |b: &[u8]| {
        b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    println!(
        "{{\"ab_pairs\":{pairs},\"repeat\":{repeat},\"a_object\":\"{:016x}\",\"b_object\":\"{:016x}\",\"ab\":[{}]}}",
        fnv(&bytes),
        fnv(lb_user::datapath::loader::EBPF_OBJECT),
        out.join(",")
    );
}
