//! The datapath's signals of backend failure (see `datapath::signals`):
//! each one is counted (`lb_backend_signals_total`) and wakes the probe
//! task of its backend for a burst of probes (`health_task::BURST_GAP`).
//! Only failed probes take a backend down, so a false signal costs probes,
//! never a failover.

use tokio::io::{Interest, unix::AsyncFd};

use super::{Shared, agent_metrics::SignalLabels, lock, state::vip_ref};
use crate::datapath::signals::{Signal, SignalRing};
use crate::vocab::Forwarding;

/// Reads `ring` whenever the datapath writes to it, until the agent stops.
pub(super) fn spawn(shared: &Shared, ring: SignalRing) -> anyhow::Result<()> {
    // SAFETY: the descriptor is the ring's, owned by `ring`, which the
    // `AsyncFd` owns until the task ends; it never changes.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the datapath's signal ring: {e}"))?;
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let got = guard.get_inner_mut().read();
            guard.clear_ready();
            if got.is_empty() {
                continue;
            }
            // One entry per backend and sign, however many arrived (a
            // flood of repeated SYNs): the work under the lock is bounded
            // by the backends, not by the flood.
            let mut counts: std::collections::HashMap<Signal, u64> = Default::default();
            for sig in got {
                *counts.entry(sig).or_default() += 1;
            }
            let Ok(s) = lock(&shared) else { return };
            for (sig, n) in counts {
                s.signal(&sig, n);
            }
        }
    });
    Ok(())
}

impl super::State {
    /// Counts `n` of one signal and kicks its backend's probe task.
    fn signal(&self, sig: &Signal, n: u64) {
        let found = self.vips.iter().find_map(|v| {
            let b = match *sig {
                Signal::SynAgain { backend_id } => v.backends.iter().find(|b| b.id == backend_id),
                Signal::RstOnSyn {
                    vip,
                    vip_port,
                    proto,
                    backend,
                } => (v.cfg.forwarding == Forwarding::Nat
                    && v.cfg.address == vip
                    && (v.cfg.port == vip_port || v.cfg.port == 0)
                    && v.key.proto == proto)
                    .then(|| v.backends.iter().find(|b| b.cfg.address == backend))
                    .flatten(),
            }?;
            Some((v, b))
        });
        let Some((v, b)) = found else {
            tracing::debug!(?sig, "a datapath signal for no backend the agent knows");
            return;
        };
        self.metrics
            .signals
            .get_or_create(&SignalLabels {
                vip: vip_ref(&v.cfg).to_string(),
                backend: b.cfg.address.to_string(),
                signal: sig.name().to_string(),
            })
            .inc_by(n);
        if let Some(k) = &b.kick {
            k.notify_one();
        }
    }
}
