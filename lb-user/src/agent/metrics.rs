//! Prometheus `/metrics`: the text exposition of the counters and health.

use super::*;

/// Prometheus text exposition of the counters and health states.
pub(super) fn metrics_text(s: &mut State) -> Result<String> {
    use std::fmt::Write as _;
    let st = s.stats()?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP lb_verdicts_total Packets seen by the balancer, by verdict reason."
    );
    let _ = writeln!(o, "# TYPE lb_verdicts_total counter");
    for (n, v) in &st.verdicts {
        let _ = writeln!(o, "lb_verdicts_total{{reason=\"{n}\"}} {v}");
    }
    let _ = writeln!(
        o,
        "# HELP lb_flows_not_recorded_total New flows forwarded without a connection-table entry by the flood guard."
    );
    let _ = writeln!(o, "# TYPE lb_flows_not_recorded_total counter");
    let _ = writeln!(o, "lb_flows_not_recorded_total {}", st.flows_not_recorded);
    for (name, help) in [
        ("packets", "Packets forwarded"),
        ("bytes", "Bytes forwarded"),
        ("new_flows", "New flows scheduled"),
    ] {
        let _ = writeln!(o, "# HELP lb_vip_{name}_total {help} per VIP.");
        let _ = writeln!(o, "# TYPE lb_vip_{name}_total counter");
        for vt in &st.vips {
            let (v, t) = (&vt.vip, &vt.traffic);
            let x = match name {
                "packets" => t.packets,
                "bytes" => t.bytes,
                _ => t.new_flows,
            };
            let _ = writeln!(o, "lb_vip_{name}_total{{vip=\"{v}\"}} {x}");
        }
        let _ = writeln!(o, "# HELP lb_backend_{name}_total {help} per backend.");
        let _ = writeln!(o, "# TYPE lb_backend_{name}_total counter");
        for bt in &st.backends {
            let (v, b, t) = (&bt.vip, &bt.backend, &bt.traffic);
            let x = match name {
                "packets" => t.packets,
                "bytes" => t.bytes,
                _ => t.new_flows,
            };
            let _ = writeln!(
                o,
                "lb_backend_{name}_total{{vip=\"{v}\",backend=\"{b}\"}} {x}"
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP lb_backend_up 1 if the backend passes its health check."
    );
    let _ = writeln!(o, "# TYPE lb_backend_up gauge");
    for b in s.backend_list(None) {
        let _ = writeln!(
            o,
            "lb_backend_up{{vip=\"{}\",backend=\"{}\"}} {}",
            b.vip,
            b.address,
            u8::from(b.state != BackendState::Down)
        );
    }
    Ok(o)
}

/// A minimal HTTP/1.0 responder for `/metrics`: scrapers need nothing more,
/// and the agent avoids an HTTP server dependency for it.
pub(super) async fn serve_metrics(listener: tokio::net::TcpListener, shared: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                // Off the async workers: the state lock may be held by a writer.
                let text = tokio::task::spawn_blocking(move || {
                    lock(&shared).and_then(|mut s| metrics_text(&mut s))
                })
                .await
                .unwrap_or_else(|e| Err(anyhow!("metrics task: {e}")));
                match text {
                    Ok(b) => ("200 OK", b),
                    Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
