//! The datapath's signals of backend failure (see `datapath::signals`):
//! each one is counted (`lb_backend_signals_total`) and wakes the probe
//! task of its backend for a burst of probes (`health_task::BURST_GAP`).
//! Only failed probes take a backend down, so a false signal costs probes,
//! never a failover.

use super::{Shared, agent_metrics::SignalLabels, lock, state::vip_ref};
use crate::datapath::signals::{Signal, SignalRing};
use crate::vocab::Forwarding;

/// Reads `ring` whenever the datapath writes to it, until the agent stops.
pub(super) fn spawn(shared: &Shared, ring: SignalRing) -> anyhow::Result<()> {
    let shared = shared.clone();
    super::rings::watch(ring, "signal ring", SignalRing::read, move |got| {
        // One entry per backend and sign, however many arrived (a flood of
        // repeated SYNs): the work under the lock is bounded by the
        // backends, not by the flood.
        let mut counts: std::collections::HashMap<Signal, u64> = Default::default();
        for sig in got {
            *counts.entry(sig).or_default() += 1;
        }
        let Ok(s) = lock(&shared) else { return false };
        for (sig, n) in counts {
            s.signal(&sig, n);
        }
        true
    })
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
