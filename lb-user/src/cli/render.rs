//! What the `lb` commands print: text tables and JSON, from the agent's
//! answers (the `api` types). No I/O besides stdout.

use anyhow::Result;
use lb_common::verdict;

use crate::api::{BackendInfo, ExplainInfo, StatsInfo, StatusInfo, VipInfo, WhatIfInfo};

use super::args::Conn;

pub(super) fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(super) fn done(conn: &Conn, what: String) -> Result<()> {
    if conn.json {
        println!("{{\"ok\":true}}");
    } else {
        println!("{what} (saved to the config file)");
    }
    Ok(())
}

pub(super) fn print_stats(s: &StatsInfo, prev: Option<&StatsInfo>) {
    let dt = prev.map(|p| (s.at_s - p.at_s).max(1e-3));
    let rate = |now: u64, before: Option<u64>| match (dt, before) {
        (Some(dt), Some(b)) => format!("{:.0}/s", now.saturating_sub(b) as f64 / dt),
        _ => "-".into(),
    };
    println!(
        "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
        "VIP", "BACKEND", "PACKETS", "PPS", "BYTES", "NEW FLOWS", "FLOWS/S", "ACTIVE"
    );
    for (i, vt) in s.vips.iter().enumerate() {
        let (v, t) = (&vt.vip, &vt.traffic);
        let p = prev.and_then(|p| p.vips.get(i)).map(|x| &x.traffic);
        println!(
            "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
            v.to_string(),
            "(all)",
            t.packets,
            rate(t.packets, p.map(|x| x.packets)),
            t.bytes,
            t.new_flows,
            rate(t.new_flows, p.map(|x| x.new_flows)),
            "-"
        );
        for (j, row) in s
            .backends
            .iter()
            .enumerate()
            .filter(|(_, row)| row.vip == *v)
        {
            let (b, bt) = (&row.backend, &row.traffic);
            let p = prev
                .and_then(|p| p.backends.get(j))
                .filter(|x| x.vip == row.vip && x.backend == row.backend)
                .map(|x| &x.traffic);
            println!(
                "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
                "",
                b.to_string(),
                bt.packets,
                rate(bt.packets, p.map(|x| x.packets)),
                bt.bytes,
                bt.new_flows,
                rate(bt.new_flows, p.map(|x| x.new_flows)),
                bt.active
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    println!();
    // In the datapath's order (tx first), not the JSON object's.
    let shown: Vec<String> = verdict::NAMES
        .iter()
        .filter_map(|k| {
            s.verdicts
                .get(*k)
                .filter(|n| **n > 0)
                .map(|n| format!("{k}={n}"))
        })
        .collect();
    println!(
        "verdicts: {}",
        if shown.is_empty() {
            "none yet".into()
        } else {
            shown.join(" ")
        }
    );
    if s.flows_not_recorded > 0 {
        println!(
            "flood guard: {} new flows forwarded without a table entry (agent.new_flow_limit)",
            s.flows_not_recorded
        );
    }
}

/// `lb status`.
pub(super) fn status(s: &StatusInfo) {
    println!("agent      lb {}", s.version);
    println!("instance   {}", s.instance);
    println!("interface  {} ({})", s.interface, s.attach);
    println!("config     {}", s.config);
    println!("uptime     {:.0} s", s.uptime_s);
    println!("VIPs       {}", s.vips);
    println!("backends   {} up of {}", s.backends_up, s.backends);
    if let Some(c) = &s.capacity {
        println!(
            "capacity   VIPs+regions {}/{}, backends {}/{}, ring slots {}/{}, flow table {}; \
             maps hold {:.1} MiB",
            c.vips_used,
            c.max_vips,
            c.backends_used,
            c.max_backends.saturating_sub(1),
            c.ring_slots_used,
            c.ring_slots,
            c.flow_table_size,
            c.maps_memory_bytes as f64 / (1 << 20) as f64
        );
    }
    match &s.announce {
        None => println!("announce   off (no [announce] section)"),
        Some(a) => println!(
            "announce   kernel table {}{}",
            a.table,
            if a.drained {
                ", node DRAINED (`lb node resume`)"
            } else {
                ""
            }
        ),
    }
    if !s.vip_status.is_empty() {
        println!();
        println!("{:<28} {:<18} ANNOUNCED", "VIP", "RING DIGEST");
        for v in &s.vip_status {
            let ann = match (v.announced, &v.why_not) {
                (None, _) => "-".to_string(),
                (Some(true), _) => "yes".to_string(),
                (Some(false), Some(w)) => format!("no: {w}"),
                (Some(false), None) => "no".to_string(),
            };
            println!("{:<28} {:<18} {ann}", v.vip.to_string(), v.digest);
        }
    }
}

/// `lb explain`.
pub(super) fn explain(e: &ExplainInfo) {
    let show = |a: Option<std::net::IpAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!("{} → {}", e.client, e.vip);
    println!("  scheduler        {}", e.scheduler);
    println!("  flow hash        {:#010x}", e.hash);
    match e.slot {
        Some(s) => println!("  ring slot        {s} → {}", show(e.ring_backend)),
        None => println!("  ring slot        -"),
    }
    println!("  connection table {}", show(e.table_backend));
    println!("  goes to          {} (via {})", show(e.backend), e.via);
    if let Some(h) = e.second_hop {
        println!("  second hop       {h} (the previous ring's, for a packet that is not a SYN)");
    }
}

/// `lb health`.
pub(super) fn health(list: &[BackendInfo]) {
    println!(
        "{:<28} {:<40} {:<9} {:<14} {:>9} {:>11}  PROBE",
        "VIP", "BACKEND", "STATE", "LAST", "LATENCY", "TRANSITIONS"
    );
    for b in list {
        let lat = b
            .last_latency_ms
            .map(|l| format!("{l:.1} ms"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<28} {:<40} {:<9} {:<14} {:>9} {:>11}  {}",
            b.vip.to_string(),
            b.address.to_string(),
            b.state,
            b.last_result,
            lat,
            b.transitions,
            b.probe.as_deref().unwrap_or("none")
        );
    }
}

/// `lb vip list`.
pub(super) fn vip_list(list: &[VipInfo]) {
    println!(
        "{:<28} {:<5} {:<10} {:<8} {:>6} {:<6} {:<9} HEALTH",
        "VIP", "FWD", "HASH", "SCHED", "RING", "TABLE", "BACKENDS"
    );
    for v in list {
        println!(
            "{:<28} {:<5} {:<10} {:<8} {:>6} {:<6} {:<9} {}",
            v.vip.to_string(),
            v.forwarding,
            v.hash,
            v.scheduler,
            v.ring_size,
            if v.flow_table { "on" } else { "off" },
            format!("{}/{} up", v.backends_up, v.backends),
            v.health
        );
    }
}

/// `lb backend list`.
pub(super) fn backend_list(list: &[BackendInfo]) {
    println!(
        "{:<28} {:<40} {:>5} {:>6} {:<9} {:<10} ACTIVE",
        "VIP", "BACKEND", "ID", "WEIGHT", "STATE", "NEXT HOP"
    );
    for b in list {
        let active = b
            .active_flows
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        // A NAT backend on a port of its own shows it.
        let addr = match b.port {
            Some(p) => std::net::SocketAddr::new(b.address, p).to_string(),
            None => b.address.to_string(),
        };
        println!(
            "{:<28} {:<40} {:>5} {:>6} {:<9} {:<10} {active}",
            b.vip.to_string(),
            addr,
            b.id,
            b.weight,
            b.state,
            if b.next_hop_known {
                "known"
            } else {
                "unresolved"
            }
        );
    }
}

/// `lb explain --what-if`.
pub(super) fn what_if(w: &WhatIfInfo, what: &str) {
    println!("prediction (nothing changed): {what}");
    let size = if w.ring_size_before == w.ring_size_after {
        format!("{}", w.ring_size_after)
    } else {
        format!("{} → {}", w.ring_size_before, w.ring_size_after)
    };
    let slots = w
        .slots_moved
        .map(|n| format!("{n} of {} slots", w.ring_size_before))
        .unwrap_or_else(|| "sampled hashes".into());
    println!(
        "  new flows        {:.1} % would reach another backend ({slots}; ring {size})",
        100.0 * w.new_flows_moved
    );
    println!(
        "  {:<40} {:>12} {:>12}",
        "BACKEND", "SLOTS NOW", "SLOTS AFTER"
    );
    for b in &w.backends {
        println!(
            "  {:<40} {:>12} {:>12}",
            b.address.to_string(),
            b.slots_before,
            b.slots_after
        );
    }
    if !w.flow_table {
        println!("  established      no connection table: every flow follows the new ring");
        return;
    }
    let f = &w.flows;
    println!(
        "  established      {} flows in the table: {} keep their backend (the ring agrees), \
         {} are kept by the table (the ring would move them), {} would be rescheduled",
        f.total, f.unaffected, f.protected, f.rescheduled
    );
    for (to, n) in &f.rescheduled_to {
        println!("    {n} rescheduled to {to}");
    }
}
