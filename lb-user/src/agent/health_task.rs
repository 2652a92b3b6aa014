//! One health-check task per backend: probes on its own schedule (with
//! jitter) and applies each transition to the datapath. The state lock is
//! taken only for in-memory work and map writes: the next hop is resolved
//! (with `ip` subprocesses) before the lock, and a transition changes only
//! the backend's state in its entry, so no probe waits on a subprocess.

use super::*;

pub(super) fn spawn_health(shared: Shared, (key, address, generation): Spawn) {
    tokio::spawn(async move {
        let mut seed = (generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let mut round = 0u64;
        loop {
            let (health, vip, needs_hop) = {
                let Ok(s) = lock(&shared) else { return };
                let Some((vi, bi)) = s.find(&key, address) else {
                    return;
                };
                let b = &s.vips[vi].backends[bi];
                if b.generation != generation {
                    return;
                }
                // Probes make the kernel resolve the neighbour: pick up a MAC
                // that was unknown or has changed (every 25 probes).
                let needs_hop = !b.resolved || round.is_multiple_of(25);
                (
                    s.vips[vi].cfg.health.clone(),
                    vip_ref(&s.vips[vi].cfg),
                    needs_hop,
                )
            };
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Up to 10 % jitter so probes of many backends do not fire in lockstep.
            let jitter = Duration::from_millis(seed % (health.interval_ms / 10 + 1));
            let next =
                tokio::time::Instant::now() + Duration::from_millis(health.interval_ms) + jitter;
            let t0 = Instant::now();
            let outcome = probe(
                &health.kind,
                SocketAddr::new(address, health.port),
                Duration::from_millis(health.timeout_ms),
            )
            .await;
            let latency = t0.elapsed().as_secs_f64() * 1e3;
            let hop = if outcome == Outcome::Ok && needs_hop {
                tokio::task::spawn_blocking(move || next_hop(address))
                    .await
                    .ok()
                    .flatten()
            } else {
                None
            };
            {
                let Ok(mut s) = lock(&shared) else { return };
                let Some((vi, bi)) = s.find(&key, address) else {
                    return;
                };
                if s.vips[vi].backends[bi].generation != generation {
                    return;
                }
                let ok = outcome == Outcome::Ok;
                let b = &mut s.vips[vi].backends[bi];
                b.last_result = match &outcome {
                    Outcome::Ok => "ok".into(),
                    Outcome::Fail(r) => r.clone(),
                };
                b.last_latency_ms = ok.then_some(latency);
                let transition = b.health.observe(ok);
                if let Some(t) = transition {
                    b.transitions += 1;
                    // The next good probe re-reads the next hop (a backend
                    // that comes back may have moved).
                    b.resolved = false;
                    let why = b.last_result.clone();
                    eprintln!(
                        "lb: t={:.3}s backend {address} of VIP {vip} is {} ({why})",
                        s.started.elapsed().as_secs_f64(),
                        if t == Transition::Up { "UP" } else { "DOWN" }
                    );
                    let (id, state) = {
                        let b = &s.vips[vi].backends[bi];
                        (b.id, datapath_state(b.state()))
                    };
                    let r =
                        s.dp.set_backend_state(id, state)
                            .map_err(anyhow::Error::from)
                            .and_then(|_| s.rebuild_ring(vi));
                    if let Err(e) = r {
                        eprintln!("lb: updating the datapath failed: {e:#}");
                    }
                    s.sync_announce();
                    if let Some(ev) = &s.events {
                        let _ = ev.send(Event {
                            vip: vip.clone(),
                            backend: address,
                            up: t == Transition::Up,
                            reason: why,
                            at: Instant::now(),
                        });
                    }
                }
                if hop.is_some()
                    && let Err(e) = s.write_backend_with(vi, bi, hop)
                {
                    eprintln!("lb: refreshing the next hop of {address} failed: {e:#}");
                }
            }
            round += 1;
            tokio::time::sleep_until(next).await;
        }
    });
}
