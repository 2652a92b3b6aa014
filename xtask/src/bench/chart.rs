//! The run's chart (`xtask/report/bench.svg`): packet rate and HTTP side
//! by side, drawn with plotters.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::report::f;

pub(super) fn chart(r: &Value, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);

    let rows = r["packet_rate"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let max = rows
        .iter()
        .map(|x| f(&x["floor_pps"]).max(f(&x["lb_pps"])))
        .fold(0.0, f64::max)
        / 1e6;
    let mut c = ChartBuilder::on(&left)
        .caption("Packet rate, 64-byte frames (Mpps)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        // Headroom above the bars for the legend.
        // Group i is centred on x = i, where its label goes.
        .build_cartesian_2d(
            -0.5f64..(rows.len() as f64 - 0.5),
            0f64..(max * 1.45).max(0.1),
        )?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| {
            label_at(*x, |i| {
                rows.get(i).map(|r| {
                    let n = r["flows"].as_u64().unwrap_or(0);
                    format!("{n} flow{}", if n == 1 { "" } else { "s" })
                })
            })
        })
        .draw()?;
    let minimal = MAGENTA.mix(0.35);
    for (i, row) in rows.iter().enumerate() {
        let x = i as f64;
        c.draw_series([Rectangle::new(
            [(x - 0.42, 0.0), (x - 0.15, f(&row["floor_pps"]) / 1e6)],
            BLUE.mix(0.5).filled(),
        )])?;
        c.draw_series([Rectangle::new(
            [(x - 0.13, 0.0), (x + 0.13, f(&row["lb_pps"]) / 1e6)],
            RED.mix(0.7).filled(),
        )])?;
        if row.get("minimal_pps").is_some() {
            c.draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.42, f(&row["minimal_pps"]) / 1e6)],
                minimal.filled(),
            )])?;
        }
    }
    c.draw_series([Rectangle::new(
        [(0.0, 0.0), (0.0, 0.0)],
        BLUE.mix(0.5).filled(),
    )])?
    .label("floor (swap MACs + XDP_TX)")
    .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], BLUE.mix(0.5).filled()));
    c.draw_series([Rectangle::new(
        [(0.0, 0.0), (0.0, 0.0)],
        RED.mix(0.7).filled(),
    )])?
    .label("lb")
    .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RED.mix(0.7).filled()));
    c.draw_series([Rectangle::new([(0.0, 0.0), (0.0, 0.0)], minimal.filled())])?
        .label("minimal balancer (VIP hash + connection table)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], minimal.filled()));
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;

    let rows = r["http"]["rows"].as_array().cloned().unwrap_or_default();
    let max = rows.iter().map(|x| f(&x["rps"])).fold(0.0, f64::max);
    // Short labels in the benchmark's row order; a row without one shows
    // its target's words up to the first parenthesis.
    let short = ["direct", "lb DSR", "HAProxy", "nftables", "lb NAT"];
    let names: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| match short.get(i) {
            Some(s) => s.to_string(),
            None => row["target"]
                .as_str()
                .unwrap_or("?")
                .split(" (")
                .next()
                .unwrap_or("?")
                .to_string(),
        })
        .collect();
    let mut c = ChartBuilder::on(&right)
        .caption(
            "HTTP requests/s (bar) and p99 ms (label)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(
            -0.5f64..(rows.len() as f64 - 0.5),
            0f64..(max * 1.2).max(1.0),
        )?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| label_at(*x, |i| names.get(i).cloned()))
        .draw()?;
    for (i, row) in rows.iter().enumerate() {
        let x = i as f64;
        let v = f(&row["rps"]);
        c.draw_series([Rectangle::new(
            [(x - 0.3, 0.0), (x + 0.3, v)],
            GREEN.mix(0.6).filled(),
        )])?;
        c.draw_series([Text::new(
            format!("p99 {:.1}", f(&row["p99_ms"])),
            (x - 0.28, v * 1.02 + max * 0.02),
            ("sans-serif", 13),
        )])?;
    }
    root.present()?;
    Ok(())
}

/// The category label for axis position `x`: only at whole numbers (the
/// groups' centres), empty between them.
fn label_at(x: f64, name: impl Fn(usize) -> Option<String>) -> String {
    if x < -0.01 || (x - x.round()).abs() > 0.01 {
        return String::new();
    }
    name(x.round() as usize).unwrap_or_default()
}
