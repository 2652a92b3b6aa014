//! Several LB nodes behind a router (`lb lab up --nodes 2`): real BIRD
//! daemons speaking BGP with BFD, the router's ECMP route hashed on layer 4,
//! one `lb run` per node announcing the VIPs through its kernel table.
//! Scenarios: spread over nodes and backends, a backend failed over by both
//! nodes, a node lost and back under steady traffic with long-lived
//! connections, a graceful `lb node drain`. The tests in this file run one
//! at a time; each removes its lab, daemons, agents and pins, also when it
//! fails.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::cluster::{Cluster, RingChange, ring_change_then_node_loss, vip4};
use lb_user::api::BackendState;
use lb_user::tools::lab::{
    self, KeepAlive, Lab, Sample,
    sessions::{Session, SessionReply, Store},
};

const LB: &str = env!("CARGO_BIN_EXE_lb");
static SERIAL: Mutex<()> = Mutex::new(());

fn per_backend(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        if let Ok(n) = &s.result {
            *m.entry(n.clone()).or_default() += 1;
        }
    }
    m
}

#[test]
fn two_nodes_share_flows_agree_on_backends_and_both_fail_a_backend_over() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(Lab::with_exe("nd-sp", Path::new(LB)).with_nodes(2));

    // Same config, same tables: equal digests, and both announce.
    let (s1, s2) = (c.status(1), c.status(2));
    for (a, b) in s1.vip_status.iter().zip(&s2.vip_status) {
        println!("{}: digest {} / {}", a.vip, a.digest, b.digest);
        assert_eq!(a.vip, b.vip);
        assert_eq!(a.digest, b.digest, "both nodes build the same table");
        assert_eq!((a.announced, b.announced), (Some(true), Some(true)));
    }
    assert_eq!(s1.vip_status.len(), 2);

    // (a) 1,000+ new connections spread over both nodes and all backends.
    let before = [c.new_flows(1), c.new_flows(2)];
    let s = c.load(false, 250, 4.4, |_| {});
    let after = [c.new_flows(1), c.new_flows(2)];
    let per_node = [after[0] - before[0], after[1] - before[1]];
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    let ok = s.len() - failed;
    println!(
        "{} connections, {failed} failed; per node {per_node:?}; per backend {:?}",
        s.len(),
        per_backend(&s)
    );
    assert_eq!(failed, 0);
    assert!(ok >= 1000, "at least 1,000 connections: {ok}");
    let total = (per_node[0] + per_node[1]) as f64;
    // A client may reuse a source port, and so a 5-tuple still in the
    // table: such a connection is not a new flow. Nearly all are.
    assert!(
        total >= 0.95 * ok as f64,
        "new flows {total} for {ok} connections"
    );
    for (i, n) in per_node.iter().enumerate() {
        let share = *n as f64 / total;
        assert!(
            (share - 0.5).abs() <= 0.125,
            "node {}: {share:.3} of the new flows, not within ±25 % of even",
            i + 1
        );
    }
    for (name, n) in per_backend(&s) {
        let share = n as f64 / ok as f64;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.1,
            "{name}: {share:.3} of the connections"
        );
    }
    let s6 = c.load(true, 200, 1.5, |_| {});
    assert!(
        s6.len() >= 200 && s6.iter().all(|x| x.result.is_ok()),
        "IPv6 through both nodes: {} samples, failures {:?}",
        s6.len(),
        s6.iter()
            .filter(|x| x.result.is_err())
            .take(3)
            .collect::<Vec<_>>()
    );

    // (d) A backend dies: both nodes take it out within a second.
    let t_kill = Instant::now();
    c.lab.stop_backend(2).expect("kill b2");
    let mut down_at: [Option<Duration>; 2] = [None, None];
    while down_at.iter().any(Option::is_none) && t_kill.elapsed() < Duration::from_secs(3) {
        for n in 1..=2 {
            if down_at[n - 1].is_none()
                && c.backends(n).iter().any(|b| {
                    b.address.to_string() == lab::backend4(2) && b.state == BackendState::Down
                })
            {
                down_at[n - 1] = Some(t_kill.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "b2 killed: down on node 1 after {:?}, node 2 after {:?}",
        down_at[0], down_at[1]
    );
    for (i, d) in down_at.iter().enumerate() {
        assert!(
            d.is_some_and(|d| d <= Duration::from_secs(1)),
            "node {} took b2 out after {d:?}",
            i + 1
        );
    }
    // Still announced (two backends left) and the digests agree again.
    let (s1, s2) = (c.status(1), c.status(2));
    assert_eq!(s1.vip_status[0].digest, s2.vip_status[0].digest);
    assert_eq!(s1.vip_status[0].announced, Some(true));
}

#[test]
fn node_loss_and_return_break_no_connection() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(Lab::with_exe("nd-fo", Path::new(LB)).with_nodes(2));

    // Long-lived keep-alive connections, one per client address.
    let mut conns = Vec::new();
    for cl in 1..=lab::CLIENTS {
        for k in 0..lab::ADDRS_PER_CLIENT {
            let mut ka = KeepAlive::open(&c.lab, cl, k, false).expect("keep-alive connect");
            let first = ka.ask().expect("first request");
            conns.push((ka, first));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ll_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let ll_requests = Arc::new(Mutex::new(0usize));
    let ll = {
        let (stop, errors, requests) = (stop.clone(), ll_errors.clone(), ll_requests.clone());
        std::thread::spawn(move || {
            // Bounded: at most 30 s whatever happens to the flag.
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(30) {
                for (ka, first) in conns.iter_mut() {
                    match ka.ask() {
                        Ok(name) if name == *first => {}
                        Ok(name) => errors
                            .lock()
                            .unwrap()
                            .push(format!("{}: moved from {first} to {name}", ka.client)),
                        Err(e) => errors.lock().unwrap().push(format!("{}: {e}", ka.client)),
                    }
                    *requests.lock().unwrap() += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut kill_at = Duration::ZERO;
    let mut withdrawn_after = Duration::ZERO;
    let mut back_at = Duration::ZERO;
    let mut flows_node1_back = 0;
    let s = c.load(false, 200, 9.0, |start| {
        std::thread::sleep(Duration::from_secs(2));
        // (b) Node 1 dies: link down, BIRD and agent killed.
        c.lab.kill_node(1).expect("kill node 1");
        c.kill9_agent(1);
        kill_at = start.elapsed();
        withdrawn_after = c
            .lab
            .wait_next_hops(vip4(), 1, Duration::from_secs(5))
            .expect("the router withdraws node 1");
        std::thread::sleep(Duration::from_secs(2));
        // (e) It comes back: link, BIRD, agent (adopting its pinned datapath).
        let t = c.revive(1);
        back_at = start.elapsed();
        println!("node 1 back in the router's route {t:?} after its revival");
        flows_node1_back = c.new_flows(1);
    });
    stop.store(true, Ordering::Relaxed);
    ll.join().expect("long-lived thread");
    let flows_node1_end = c.new_flows(1);

    let failed: Vec<Duration> = s
        .iter()
        .filter(|x| x.result.is_err())
        .map(|x| x.at)
        .collect();
    let last_failed = failed.iter().max().map(|t| t.saturating_sub(kill_at));
    let ll_req = *ll_requests.lock().unwrap();
    let ll_err = ll_errors.lock().unwrap().clone();
    println!(
        "node 1 killed at {kill_at:?}: route withdrawn {withdrawn_after:?} after the kill; {} of {} new connections \
         failed, the last started {last_failed:?} after the kill; long-lived: {ll_req} requests on 16 connections, \
         {} errors {:?}; node 1 back at {back_at:?}, then {} new flows there",
        failed.len(),
        s.len(),
        ll_err.len(),
        ll_err.iter().take(5).collect::<Vec<_>>(),
        flows_node1_end - flows_node1_back
    );
    assert!(s.len() >= 1500, "enough new connections: {}", s.len());
    assert!(
        ll_req >= 16 * 50,
        "long-lived connections kept asking: {ll_req}"
    );
    assert!(
        ll_err.is_empty(),
        "every long-lived connection keeps working on its backend"
    );
    assert!(
        withdrawn_after <= Duration::from_secs(1),
        "BFD withdraws a dead node within a second: {withdrawn_after:?}"
    );
    // New connections fail only inside the detection window (a connection
    // whose SYN went to the dead node just before the withdrawal).
    let in_flight_margin = Duration::from_millis(200);
    for t in &failed {
        assert!(
            *t + in_flight_margin >= kill_at && *t <= kill_at + withdrawn_after + in_flight_margin,
            "a new connection failed at {t:?}, outside the detection window {kill_at:?} + {withdrawn_after:?}"
        );
    }
    assert!(
        s.iter()
            .filter(|x| x.at > back_at)
            .all(|x| x.result.is_ok()),
        "no failure after node 1 is back"
    );
    assert!(
        flows_node1_end > flows_node1_back,
        "node 1 takes new flows again after its return"
    );
}

#[test]
fn graceful_node_drain_loses_no_request() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(Lab::with_exe("nd-dr", Path::new(LB)).with_nodes(2));
    let mut drain_out = Ok(String::new());
    let mut flows_at_drain = 0;
    let s = c.load(false, 200, 5.0, |_| {
        std::thread::sleep(Duration::from_millis(1500));
        drain_out = c.cli(1, &["node", "drain", "--timeout", "5"]);
        flows_at_drain = c.new_flows(1);
    });
    let flows_end = c.new_flows(1);
    let failed = s.iter().filter(|x| x.result.is_err()).count();
    println!(
        "drain: {drain_out:?}; {failed} of {} requests failed; node 1 new flows after the drain: {}",
        s.len(),
        flows_end - flows_at_drain
    );
    let out = drain_out.expect("lb node drain succeeds");
    assert!(out.contains("node drained"), "{out}");
    assert!(s.len() >= 800, "enough requests: {}", s.len());
    assert_eq!(failed, 0, "a graceful drain fails no request");
    assert_eq!(flows_end, flows_at_drain, "a drained node gets no new flow");
    assert_eq!(c.lab.router_next_hops(vip4()).len(), 1);
    let st = c.status(1);
    assert!(st.announce.as_ref().is_some_and(|a| a.drained));
    assert_eq!(st.vip_status[0].announced, Some(false));
    assert!(
        st.vip_status[0]
            .why_not
            .as_deref()
            .is_some_and(|w| w.contains("drained")),
        "{:?}",
        st.vip_status[0]
    );

    c.cli(1, &["node", "resume"]).expect("resume");
    c.lab
        .wait_next_hops(vip4(), 2, Duration::from_secs(5))
        .expect("announced again");
}

/// `n` requests of one session, `gap` apart; failures kept as errors.
fn session_run(s: &mut Session, n: usize, gap: Duration) -> Vec<Result<SessionReply, String>> {
    (0..n)
        .map(|_| {
            let r = s.request().map_err(|e| e.to_string());
            std::thread::sleep(gap);
            r
        })
        .collect()
}

/// The counts of the successful replies continue one by one from `from`.
fn assert_continues(replies: &[Result<SessionReply, String>], from: u64, what: &str) -> u64 {
    let ok: Vec<&SessionReply> = replies.iter().filter_map(|r| r.as_ref().ok()).collect();
    let counts: Vec<u64> = ok.iter().map(|r| r.count).collect();
    let want: Vec<u64> = (from..from + counts.len() as u64).collect();
    assert_eq!(
        counts, want,
        "{what}: every counter continues ({replies:?})"
    );
    from + counts.len() as u64
}

fn backends_of(replies: &[Result<SessionReply, String>]) -> std::collections::BTreeSet<String> {
    replies
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.backend.clone())
        .collect()
}

#[test]
fn sessions_survive_only_outside_the_servers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(
        Lab::with_exe("nd-se", Path::new(LB))
            .with_nodes(2)
            .with_redis(),
    );
    let gap = Duration::from_millis(30);

    // Local sessions, 5-tuple hashing: each new connection may land on
    // another server, which does not know the session.
    let mut local = Session::new(&c.lab, 1, 0, Store::Local).expect("session");
    let r = session_run(&mut local, 30, gap);
    let max = r
        .iter()
        .filter_map(|x| x.as_ref().ok())
        .map(|x| x.count)
        .max();
    println!(
        "local, 5-tuple: backends {:?}, highest count {max:?} of 30",
        backends_of(&r)
    );
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert!(
        backends_of(&r).len() >= 2,
        "connections spread over backends"
    );
    assert!(max < Some(30), "the session is lost across connections");

    // Sessions in Redis, 5-tuple: every server continues the session.
    let mut shared = Session::new(&c.lab, 1, 1, Store::Redis).expect("session");
    let r = session_run(&mut shared, 30, gap);
    println!("redis, 5-tuple: backends {:?}", backends_of(&r));
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert!(backends_of(&r).len() >= 2);
    let mut next = assert_continues(&r, 1, "redis sessions over several backends");

    // ... and survive a backend's death.
    c.lab.stop_backend(3).expect("kill b3");
    let r = session_run(&mut shared, 40, gap);
    let failed = r.iter().filter(|x| x.is_err()).count();
    next = assert_continues(&r, next, "redis sessions across a backend kill");
    println!(
        "redis, b3 killed: {failed} of 40 requests failed (before failover), counter at {next}"
    );
    assert!(failed <= 15, "failures only until failover: {failed}");
    c.lab.start_backend(3).expect("b3 back");
    c.wait_state_everywhere(&lab::backend4(3), BackendState::Up);

    // Local sessions with source-ip hashing: kept while the backend lives.
    c.set_hash(lb_user::vocab::HashInput::SourceIp);
    let mut sticky = Session::new(&c.lab, 2, 0, Store::Local).expect("session");
    let r = session_run(&mut sticky, 20, gap);
    let b = backends_of(&r);
    println!("local, source-ip: backends {b:?}");
    assert_eq!(b.len(), 1, "one backend for every connection of the client");
    assert_continues(&r, 1, "source-ip keeps a local session");
    let home: usize = b
        .iter()
        .next()
        .and_then(|n| n.strip_prefix('b'))
        .and_then(|n| n.parse().ok())
        .expect("backend name");
    c.lab.stop_backend(home).expect("kill the client's backend");
    c.wait_state_everywhere(&lab::backend4(home), BackendState::Down);
    let r = session_run(&mut sticky, 5, gap);
    let first = r
        .iter()
        .find_map(|x| x.as_ref().ok())
        .expect("answers after failover");
    println!(
        "local, source-ip, b{home} killed: now {} with count {}",
        first.backend, first.count
    );
    assert_ne!(first.backend, format!("b{home}"));
    assert_eq!(first.count, 1, "its local session died with its backend");
    c.lab.start_backend(home).expect("backend back");
    c.wait_state_everywhere(&lab::backend4(home), BackendState::Up);

    // Sessions in Redis survive the loss of an LB node.
    let r = session_run(&mut shared, 10, gap);
    next = assert_continues(&r, next, "redis sessions before the node kill");
    c.lab.kill_node(1).expect("kill node 1");
    c.kill9_agent(1);
    let r = session_run(&mut shared, 40, gap);
    let failed = r.iter().filter(|x| x.is_err()).count();
    let end = assert_continues(&r, next, "redis sessions across an LB node kill");
    println!("redis, node 1 killed: {failed} of 40 requests failed, counter {next} -> {end}");
    assert!(end - next >= 30, "most requests answered: {}", end - next);
}

/// Issue 24's scenario (a) and (b) with its control: 64 long-lived
/// connections over two nodes, a backend joins, node 1 dies, then comes
/// back with an empty table (see `cluster::ring_change_then_node_loss`).
#[test]
fn the_second_chance_keeps_connections_through_a_ring_change_and_a_node_loss() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = |tag| Lab::with_exe(tag, Path::new(LB));
    let on = ring_change_then_node_loss(lab("nd-sc"), RingChange::Join, true);
    println!("second chance on: {on}");
    let off = ring_change_then_node_loss(lab("nd-s0"), RingChange::Join, false);
    println!("control (second_chance = 0): {off}");
    assert!(
        on.lost.is_empty() && on.fresh.is_empty(),
        "no connection breaks with the second chance"
    );
    assert!(on.second_hops > 0, "the backends passed packets on");
    assert_eq!(
        off.second_hops, 0,
        "no second hop without the second chance"
    );
    assert!(
        !off.lost.is_empty(),
        "without it, some connection breaks (else the scenario moved no flow)"
    );
}

/// Issue 24's scenario (c): a drained backend keeps its connections on
/// both nodes while no new connection reaches it, node loss and a fresh
/// node included; the control loses some of them.
#[test]
fn a_drained_backend_keeps_its_connections_through_a_node_loss() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = |tag| Lab::with_exe(tag, Path::new(LB));
    let on = ring_change_then_node_loss(lab("nd-dc"), RingChange::Drain, true);
    println!("second chance on: {on}");
    let off = ring_change_then_node_loss(lab("nd-d0"), RingChange::Drain, false);
    println!("control (second_chance = 0): {off}");
    assert!(
        on.lost.is_empty() && on.fresh.is_empty(),
        "no connection breaks with the second chance"
    );
    assert!(on.second_hops > 0, "the backends passed packets on");
    assert!(
        !off.lost.is_empty(),
        "without it, some of the drained backend's connections break"
    );
}
