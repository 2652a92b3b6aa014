//! The first real test: a non-VIP packet passes byte-identical and is counted.

use lb_common::verdict;
use lb_tests::{Dataplane, action, load, run, tcp4};

#[test]
fn non_vip_packet_passes_untouched_and_is_counted() {
    let mut ebpf = load().expect("load");
    let pkt = tcp4([198, 18, 0, 1], [198, 18, 0, 2], 40000, 80, b"hello");
    let r = run(&mut ebpf, lb_common::PROG_BALANCER, &pkt).expect("run");
    assert_eq!(r.action, action::PASS);
    assert_eq!(r.out, pkt, "bytes out must equal bytes in");
    let v = Dataplane::new(&mut ebpf).verdicts().expect("verdicts");
    assert_eq!(v[verdict::PASS_NON_VIP as usize], 1);
    assert_eq!(
        v.iter().sum::<u64>(),
        1,
        "exactly one verdict per packet: {v:?}"
    );
}

/// The verifier's budget: every datapath program loads, and the balancer's
/// copies stay below 95 % of the kernel's 1,000,000 verified instructions,
/// so a change that would push them over shows here first, with numbers.
#[test]
fn verifier_budget_has_headroom() {
    let mut ebpf = lb_tests::load().expect("load");
    for name in [
        lb_common::PROG_BALANCER,
        lb_common::PROG_BALANCER_TRACED,
        lb_common::PROG_TOO_BIG,
        lb_common::PROG_NAT_ICMP,
        lb_common::PROG_DROP_LOG,
        lb_common::PROG_DECAP,
    ] {
        let p = lb_tests::loader::xdp_program(&mut ebpf, name).expect("program");
        let n = p
            .info()
            .expect("info")
            .verified_instruction_count()
            .expect("count");
        println!("{name}: {n} instructions verified");
        assert!(
            n < 950_000,
            "{name} needs {n} of the verifier's 1,000,000 instructions: split it (tail calls, as lb_too_big and lb_nat_icmp are) before adding to it"
        );
    }
}
