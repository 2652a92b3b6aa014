//! What the agent observes as it happens, for `/metrics`: health-probe
//! durations, health transitions and the datapath's signals, recorded by the health task and
//! registered by `metrics`. A room of its own below both, so the runtime
//! state can hold it without `state` and `metrics` importing each other.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BackendLabels {
    pub(super) vip: String,
    pub(super) backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TransitionLabels {
    pub(super) vip: String,
    pub(super) backend: String,
    /// `up` or `down`.
    pub(super) to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SignalLabels {
    pub(super) vip: String,
    pub(super) backend: String,
    /// `syn_again` or `rst_on_syn` (see `datapath::signals`).
    pub(super) signal: String,
}

type HistogramFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

/// Health-probe durations: 0.5 ms to 1 s (the probe timeout is at most
/// the interval, 200 ms by default).
fn probe_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0,
    ])
}

/// What the agent observes as it happens.
#[derive(Clone)]
pub(super) struct AgentMetrics {
    pub(super) probe_seconds: HistogramFamily,
    pub(super) transitions: Family<TransitionLabels, Counter>,
    /// The datapath's signals of failure, per backend.
    pub(super) signals: Family<SignalLabels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            probe_seconds: Family::new_with_constructor(probe_histogram),
            transitions: Family::default(),
            signals: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// A backend's health verdict: `first` (an unchecked backend's first
    /// one) opens both of its transition series at 0, so the family is
    /// exported and a dashboard's increase() sees the first real
    /// transition; a later one counts the state entered.
    pub(super) fn verdict(&self, vip: &str, backend: &str, up: bool, first: bool) {
        for to in ["up", "down"] {
            let c = self.transitions.get_or_create(&TransitionLabels {
                vip: vip.to_string(),
                backend: backend.to_string(),
                to: to.to_string(),
            });
            if !first && (to == "up") == up {
                c.inc();
            }
        }
    }
}
