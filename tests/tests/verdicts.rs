//! Verdicts that name the right reason: a redirect that cannot happen is
//! `redirect_failed` (dropped), not `redirect`.

use lb_common::{AF_INET, PROTO_TCP, VipKey, verdict};
use lb_tests::{Fixture, LB_MAC, VipSpec, action, tcp4, v4};

#[test]
fn a_redirect_to_an_unknown_interface_is_counted_as_failed_and_dropped() {
    let mut f = Fixture::new().expect("load");
    let key = VipKey {
        addr: v4([198, 18, 0, 100]),
        port: 80,
        proto: PROTO_TCP,
        family: AF_INET,
    };
    f.add_vip(&VipSpec {
        key,
        vip_id: 0,
        flags: 0,
        ring_size: 251,
        backends: vec![(1, v4([198, 18, 2, 1]), 1)],
    })
    .expect("vip");
    // The backend sits behind interface 4242, which is not in TX_PORTS.
    f.dp()
        .set_backend(
            1,
            &lb_common::Backend {
                addr: v4([198, 18, 2, 1]),
                dst_mac: [2, 0, 0, 0, 1, 1],
                src_mac: LB_MAC,
                ifindex: 4242,
                family: AF_INET,
                state: lb_common::BACKEND_UP,
                weight: 1,
                ..Default::default()
            },
        )
        .expect("backend");
    let before = f.verdicts().expect("counters");
    let r = f
        .run(&tcp4([198, 19, 0, 1], [198, 18, 0, 100], 40000, 80, b""))
        .expect("run");
    let after = f.verdicts().expect("counters");
    assert_eq!(r.action, action::DROP);
    let moved: Vec<&str> = (0..after.len())
        .filter(|i| after[*i] != before[*i])
        .map(|i| verdict::NAMES[i])
        .collect();
    assert_eq!(moved, ["redirect_failed"]);
}
