//! The VIP-address filter in front of the VIP table: non-VIP traffic is
//! passed after one array lookup, and the filter follows VIP adds and
//! removes without ever hiding a live VIP (also one sharing a filter word).

use lb_common::{AF_INET, PROTO_TCP, VipKey, hash::vip_filter_slot, verdict};
use lb_tests::{Fixture, VipSpec, action, tcp4, v4};

fn vip(a: [u8; 4], id: u32) -> VipSpec {
    VipSpec {
        key: VipKey {
            addr: v4(a),
            port: 80,
            proto: PROTO_TCP,
            family: AF_INET,
        },
        vip_id: id,
        flags: 0,
        ring_size: 251,
        backends: (1..=3)
            .map(|i| (10 * id + i, v4([198, 18, 2, i as u8]), 1))
            .collect(),
    }
}

fn verdict_of(f: &mut Fixture, dst: [u8; 4]) -> (u32, usize) {
    let before = f.verdicts().expect("counters");
    let r = f
        .run(&tcp4([198, 19, 0, 1], dst, 40000, 80, b""))
        .expect("run");
    let after = f.verdicts().expect("counters");
    let moved = (0..after.len())
        .find(|i| after[*i] != before[*i])
        .expect("one verdict moved");
    (r.action, moved)
}

#[test]
fn filter_follows_vips_and_never_hides_a_neighbour_in_its_word() {
    // Two addresses whose filter bits share one 32-bit word.
    let a = [198, 18, 0, 100];
    let (wa, ba) = vip_filter_slot(&v4(a));
    let b = (0..=255u8)
        .flat_map(|x| (0..=255u8).map(move |y| [198, 18, x, y]))
        .find(|c| {
            let (w, bit) = vip_filter_slot(&v4(*c));
            *c != a && w == wa && bit != ba
        })
        .expect("an address sharing the word");
    let mut f = Fixture::new().expect("load");
    assert_eq!(
        verdict_of(&mut f, a),
        (action::PASS, verdict::PASS_NON_VIP as usize)
    );
    f.add_vip(&vip(a, 0)).expect("vip a");
    f.add_vip(&vip(b, 1)).expect("vip b");
    assert_eq!(verdict_of(&mut f, a), (action::TX, verdict::TX as usize));
    assert_eq!(verdict_of(&mut f, b), (action::TX, verdict::TX as usize));

    // Removing A clears only A's bit: B is still served.
    f.dp().remove_vip(&vip(a, 0).key).expect("remove a");
    assert_eq!(
        verdict_of(&mut f, a),
        (action::PASS, verdict::PASS_NON_VIP as usize)
    );
    assert_eq!(verdict_of(&mut f, b), (action::TX, verdict::TX as usize));
    let (w, _) = vip_filter_slot(&v4(a));
    let word: u32 = {
        let m = f.ebpf.map(lb_common::MAP_VIP_FILTER).expect("filter map");
        aya::maps::Array::<_, u32>::try_from(m)
            .expect("array")
            .get(&w, 0)
            .expect("word")
    };
    assert_eq!(word, 1 << vip_filter_slot(&v4(b)).1, "only B's bit is left");
}
