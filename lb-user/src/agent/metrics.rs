//! Prometheus `/metrics`, built with `prometheus-client` and served by
//! `axum`, beside the status page (`/`, a page embedded in the binary, and
//! the `/status.json` it polls every second). Two kinds of metric: what the
//! agent observes as it happens ([`AgentMetrics`]: health-probe durations,
//! health transitions) and what the datapath counts, read from its maps at
//! each scrape ([`DatapathCollector`]). Names follow Prometheus
//! conventions: counters end in `_total`, durations are in seconds, bytes
//! in bytes.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use std::sync::{Arc, Mutex};

use crate::api::BackendState;

use super::Shared;
use super::agent_metrics::AgentMetrics;
use super::state::State;

/// The registry `/metrics` encodes: the agent's own metrics and the
/// datapath collector.
pub(super) fn registry(shared: &Shared, m: AgentMetrics) -> Arc<Registry> {
    let mut r = agent_registry(m);
    r.register_collector(Box::new(DatapathCollector {
        state: Arc::downgrade(shared),
    }));
    Arc::new(r)
}

/// The agent's own metrics, registered as `/metrics` serves them.
fn agent_registry(m: AgentMetrics) -> Registry {
    let mut r = Registry::default();
    r.register_with_unit(
        "lb_health_probe_duration",
        "Health-probe durations (failed probes included, a timeout at its limit).",
        Unit::Seconds,
        m.probe_seconds,
    );
    r.register(
        "lb_health_transitions",
        "Backend health transitions, by the state entered.",
        m.transitions,
    );
    r.register(
        "lb_backend_signals",
        "Signs of failure the datapath saw, by backend and signal (syn_again: a client sent its SYN \
         again; rst_on_syn: a NAT backend refused a new connection); each makes the agent probe \
         the backend at once.",
        m.signals,
    );
    r
}

/// Reads the datapath's counters and the backends' health at each scrape.
struct DatapathCollector {
    state: std::sync::Weak<Mutex<State>>,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let Some(shared) = self.state.upgrade() else {
            return Ok(());
        };
        let (st, backends) = {
            let Ok(mut s) = shared.lock() else {
                return Ok(());
            };
            let Ok(st) = s.stats() else {
                return Ok(());
            };
            (st, s.backend_list(None))
        };
        let mut m = enc.encode_descriptor(
            "lb_verdicts",
            "Packets seen by the balancer, by verdict reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in &st.verdicts {
            ConstCounter::new(*v).encode(m.encode_family(&[("reason", reason.as_str())])?)?;
        }
        let m = enc.encode_descriptor(
            "lb_flows_not_recorded",
            "New flows forwarded without a connection-table entry by the flood guard.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(st.flows_not_recorded).encode(m)?;
        for (name, help) in [
            ("packets", "Packets forwarded"),
            ("bytes", "Bytes forwarded"),
            ("new_flows", "New flows scheduled"),
        ] {
            let pick = |t: &crate::api::TrafficInfo| match name {
                "packets" => t.packets,
                "bytes" => t.bytes,
                _ => t.new_flows,
            };
            let n = format!("lb_vip_{name}");
            let mut m =
                enc.encode_descriptor(&n, &format!("{help} per VIP."), None, MetricType::Counter)?;
            for vt in &st.vips {
                let vip = vt.vip.to_string();
                ConstCounter::new(pick(&vt.traffic))
                    .encode(m.encode_family(&[("vip", vip.as_str())])?)?;
            }
            let n = format!("lb_backend_{name}");
            let mut m = enc.encode_descriptor(
                &n,
                &format!("{help} per backend."),
                None,
                MetricType::Counter,
            )?;
            for bt in &st.backends {
                let (vip, backend) = (bt.vip.to_string(), bt.backend.to_string());
                ConstCounter::new(pick(&bt.traffic)).encode(
                    m.encode_family(&[("vip", vip.as_str()), ("backend", backend.as_str())])?,
                )?;
            }
        }
        let mut m = enc.encode_descriptor(
            "lb_backend_up",
            "1 if the backend passes its health check.",
            None,
            MetricType::Gauge,
        )?;
        for b in &backends {
            let (vip, backend) = (b.vip.to_string(), b.address.to_string());
            let up = matches!(b.state, BackendState::Up | BackendState::Draining);
            ConstGauge::new(i64::from(up)).encode(
                m.encode_family(&[("vip", vip.as_str()), ("backend", backend.as_str())])?,
            )?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` (and 404 elsewhere) until the agent stops.
pub(super) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shared: Shared,
) {
    use axum::{extract::State as Shared_, http::StatusCode, response::IntoResponse, routing::get};
    async fn scrape(
        Shared_((reg, _)): Shared_<(Arc<Registry>, Shared)>,
    ) -> axum::response::Response {
        // Off the async workers: the collector takes the state lock.
        let body = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut s, &reg).map(|_| s)
        })
        .await;
        match body {
            Ok(Ok(b)) => (
                [(
                    axum::http::header::CONTENT_TYPE,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )],
                b,
            )
                .into_response(),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
        }
    }
    /// What the status page shows, in one answer: `lb status`, `lb vip
    /// list`, `lb health` (the backends) and `lb stats`.
    async fn status_json(
        Shared_((_, shared)): Shared_<(Arc<Registry>, Shared)>,
    ) -> axum::response::Response {
        // Off the async workers: the views take the state lock and read maps.
        let body = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
            let mut s = shared
                .lock()
                .map_err(|_| anyhow::anyhow!("the agent's state lock is poisoned"))?;
            Ok(serde_json::json!({
                "status": s.status(),
                "vips": s.vip_list(),
                "backends": s.backend_list(None),
                "stats": s.stats()?,
            }))
        })
        .await;
        match body {
            // axum's `json` feature is off: the body is serialized here.
            Ok(Ok(v)) => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                v.to_string(),
            )
                .into_response(),
            Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "status failed\n").into_response(),
        }
    }
    async fn page() -> axum::response::Html<&'static str> {
        axum::response::Html(include_str!("status.html"))
    }
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try / (status page) or /metrics\n") })
        .with_state((registry, shared));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::super::agent_metrics::BackendLabels;
    use super::*;

    #[test]
    fn exposition_has_probe_histograms_and_transitions() {
        let m = AgentMetrics::default();
        let r = agent_registry(m.clone());
        let text = |r: &Registry| {
            let mut s = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut s, r).unwrap();
            s
        };
        // Nothing observed yet: no series.
        assert!(
            !text(&r).contains("lb_health_transitions_total{"),
            "{}",
            text(&r)
        );
        let l = BackendLabels {
            vip: "v".into(),
            backend: "b".into(),
        };
        m.probe_seconds.get_or_create(&l).observe(0.002);
        // The first verdict opens both series at 0; then b goes down once.
        m.verdict("v", "b", true, true);
        let s = text(&r);
        assert!(
            s.contains(
                "lb_health_probe_duration_seconds_bucket{vip=\"v\",backend=\"b\",le=\"0.0025\"} 1"
            ),
            "{s}"
        );
        for to in ["up", "down"] {
            assert!(
                s.contains(&format!(
                    "lb_health_transitions_total{{vip=\"v\",backend=\"b\",to=\"{to}\"}} 0"
                )),
                "{s}"
            );
        }
        m.verdict("v", "b", false, false);
        let s = text(&r);
        assert!(
            s.contains("lb_health_transitions_total{vip=\"v\",backend=\"b\",to=\"down\"} 1")
                && s.contains("lb_health_transitions_total{vip=\"v\",backend=\"b\",to=\"up\"} 0"),
            "{s}"
        );
    }
}
