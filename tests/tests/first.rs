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
