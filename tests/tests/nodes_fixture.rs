//! What lets a flow move between LB nodes: two separately loaded datapaths
//! (two nodes) with the same backends, whose ids were handed out in a
//! different order, send every 5-tuple to the same backend address; and a
//! packet of an established TCP connection (ACK, no SYN) that is not in a
//! node's connection table goes where the consistent hash says.

use etherparse::PacketBuilder;
use lb_common::{AF_INET, PROTO_TCP, VipKey};
use lb_tests::{Fixture, VipSpec, action, backend_of, v4};

const VIP4: [u8; 4] = [198, 18, 0, 100];

/// An ACK-only segment of an established connection (no SYN).
fn ack4(src: [u8; 4], sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xc1], [2, 0, 0, 0, 0, 0x1b])
        .ipv4(src, VIP4, 64)
        .tcp(sport, 80, 777_000, 65535)
        .ack(1_000_001);
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).expect("writing to a Vec cannot fail");
    v
}

fn node(ids: [u32; 5]) -> (Fixture, Vec<(u32, [u8; 16])>) {
    let mut f = Fixture::new().expect("load");
    let backends: Vec<(u32, [u8; 16], u32)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, v4([198, 18, 2, 10 + i as u8]), 1))
        .collect();
    f.add_vip(&VipSpec {
        key: VipKey {
            addr: v4(VIP4),
            port: 80,
            proto: PROTO_TCP,
            family: AF_INET,
        },
        vip_id: 0,
        flags: 0,
        ring_size: 65537,
        backends: backends.clone(),
    })
    .expect("vip");
    (f, backends.iter().map(|(id, a, _)| (*id, *a)).collect())
}

#[test]
fn two_nodes_send_a_mid_connection_packet_to_the_same_backend() {
    // Node A handed out ids 1..5; node B, after other edits, 9, 4, 12, 7, 2.
    let (mut a, ids_a) = node([1, 2, 3, 4, 5]);
    let (mut b, ids_b) = node([9, 4, 12, 7, 2]);
    let addr_of = |ids: &[(u32, [u8; 16])], id: u32| {
        ids.iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("backend id {id} is not one of this VIP's backends"))
    };
    let mut per_backend = std::collections::BTreeMap::new();
    for i in 0..500u32 {
        let src = [198, 19, (i >> 8) as u8, i as u8];
        let sport = 20000 + i as u16;
        let pkt = ack4(src, sport);
        let ra = a.run(&pkt).expect("run A");
        let rb = b.run(&pkt).expect("run B");
        assert_eq!(
            (ra.action, rb.action),
            (action::TX, action::TX),
            "flow {i}: a mid-connection packet with no table entry is forwarded, not dropped or passed"
        );
        let (ba, bb) = (
            addr_of(&ids_a, backend_of(&ra.out)),
            addr_of(&ids_b, backend_of(&rb.out)),
        );
        assert_eq!(ba, bb, "flow {i}: both nodes pick the same backend address");
        *per_backend.entry(ba).or_insert(0u32) += 1;
    }
    // The hash really spreads (a constant choice would also agree).
    assert_eq!(
        per_backend.len(),
        5,
        "all five backends chosen: {per_backend:?}"
    );
    // Each flow is now in each node's table: one new flow per packet.
    for f in [&mut a, &mut b] {
        let new_flows = f.dp().vip_traffic(0).expect("stats").new_flows;
        assert_eq!(
            new_flows, 500,
            "every ACK was a table miss scheduled afresh"
        );
    }
}
