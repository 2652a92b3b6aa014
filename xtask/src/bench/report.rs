//! The report of a benchmark run, rendered from its JSON alone: the
//! Markdown of BENCHMARKS.md (every table, the targets judged on the run,
//! what a packet costs, the reading), README's micro table, and the A/B
//! history rows the tool recorded.

use std::path::Path;

use serde_json::Value;

/// The micro-benchmark's table (case, ns per packet, × floor) and the
/// Maglev build time, as BENCHMARKS.md and README show them.
pub(super) fn micro_table(r: &Value) -> String {
    let mut o = String::from("| case | ns/packet | × swap-MACs floor |\n|---|---:|---:|\n");
    for c in r["micro"]["cases"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "| {} | {:.1} | {:.2} |\n",
            c["case"].as_str().unwrap_or(""),
            f(&c["ns_per_packet"]),
            f(&c["ratio_to_floor_tx"])
        ));
    }
    o.push_str(&format!(
        "\nMaglev table build, 1000 backends, M = 65537: {:.1} ms.\n",
        f(&r["micro"]["maglev_build_1000_backends_m65537_ms"])
    ));
    o
}

pub(super) fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

pub(super) fn markdown(r: &Value) -> String {
    let mut o = String::new();
    let m = &r["meta"];
    o.push_str("# Benchmarks\n\n");
    o.push_str(&format!(
        "Measured by `{}` on {} at revision {} ({} vCPUs, kernel {}), {:.0} s in all. Each section says how many runs its figures are the median of; \
         every comparison was measured in the same run; absolute numbers on a small shared VM are noisy, the ratios less so.\n\n",
        m["command"].as_str().unwrap_or(""),
        m["date"].as_str().unwrap_or(""),
        m["revision"].as_str().unwrap_or("unrecorded"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or(""),
        f(&m["seconds"])
    ));
    o.push_str("![packet rate and HTTP](xtask/report/bench.svg)\n\n");
    o.push_str(
        "## Datapath micro-benchmark (BPF_PROG_TEST_RUN, repeat 1,000,000, median of 5 rounds; × floor: median of the per-round ratios)\n\n",
    );
    o.push_str(&micro_table(r));
    o.push('\n');
    let grid = r["micro"]["maglev_build"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !grid.is_empty() {
        o.push_str("Maglev table build time (ms, median of the micro-benchmark's runs) by backends and ring size:\n\n| backends | M = 1021 | M = 16381 | M = 65537 |\n|---:|---:|---:|---:|\n");
        for n in [10, 100, 1000, 5000] {
            let cell = |m: u64| {
                grid.iter()
                    .find(|g| g["backends"] == n && g["ring"] == m)
                    .map(|g| format!("{:.2}", f(&g["ms"])))
                    .unwrap_or_else(|| "—".into())
            };
            o.push_str(&format!(
                "| {n} | {} | {} | {} |\n",
                cell(1021),
                cell(16381),
                cell(65537)
            ));
        }
        o.push('\n');
    }
    o.push_str(
        "## Packet rate (minimum-size UDP frames: 60 bytes + FCS = 64 on the wire; `lb loadgen` → LB veth → sink, 2 s runs, median of 3)\n\n",
    );
    o.push_str(
        "| flows | floor offered Mpps | floor (swap MACs + XDP_TX) Mpps | lb offered Mpps | lb Mpps | lb / floor | lb full NAT Mpps \
         | minimal balancer Mpps (/ floor) | minimal, 16-byte key Mpps (/ floor) | floor + our set lookup Mpps (/ floor) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in r["packet_rate"]["rows"].as_array().into_iter().flatten() {
        let mpps = |k: &str| {
            row.get(k)
                .map(|v| format!("{:.3}", f(v) / 1e6))
                .unwrap_or_else(|| "not run".into())
        };
        let of_floor = |k: &str| {
            row.get(k)
                .map(|v| format!("{:.3} ({:.2})", f(v) / 1e6, f(v) / f(&row["floor_pps"])))
                .unwrap_or_else(|| "not run".into())
        };
        o.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {} | {} | {} | {} |\n",
            row["flows"],
            f(&row["floor_offered_pps"]) / 1e6,
            f(&row["floor_pps"]) / 1e6,
            f(&row["offered_pps"]) / 1e6,
            f(&row["lb_pps"]) / 1e6,
            f(&row["ratio"]),
            mpps("nat_pps"),
            of_floor("minimal_pps"),
            of_floor("minimal16_pps"),
            of_floor("set_pps"),
        ));
    }
    o.push_str(
        "\nThe generator shares the VM's two vCPUs with the program it measures: the offered columns show whether it \
         offered both programs the same rate (if it offered the balancer less, part of the gap is the generator's).\n",
    );
    o.push_str(&program_times(&r["packet_rate"]["rows"]));
    let s = &r["syn_flood"];
    o.push_str(&format!(
        "\n**SYN flood** ({} s per run, median of {} runs per row; sources: {}). {} established flows, {}; {}. Flows the guard \
         keeps out are still forwarded, by the consistent hash.\n\n\
         | connection table | flood sources | flood guard (new flows/s per CPU) | offered Mpps | forwarded Mpps | established still in the table | of those, kept their backend | not in the table and moved |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
        s["seconds"],
        s["runs"],
        s["sources_vary"].as_str().unwrap_or(""),
        s["established"],
        s["established_activity"].as_str().unwrap_or(""),
        s["ring_change"].as_str().unwrap_or(""),
    ));
    for row in s["rows"].as_array().into_iter().flatten() {
        let guard = row["flood_guard_per_cpu_s"].as_u64().unwrap_or(0);
        o.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.0} | {:.0} | {:.0} |\n",
            row["table_size"],
            row["sources"],
            if guard == 0 {
                "off".to_string()
            } else {
                guard.to_string()
            },
            f(&row["offered_pps"]) / 1e6,
            f(&row["forwarded_pps"]) / 1e6,
            f(&row["established_still_in_table"]),
            f(&row["established_kept_backend"]),
            f(&row["moved_not_in_table"]),
        ));
    }
    o.push('\n');
    o.push_str(&format!(
        "## HTTP through the lab ({}; median of {} runs)\n\n",
        r["http"]["tool"].as_str().unwrap_or(""),
        r["http"]["runs"]
    ));
    o.push_str(
        "| path | requests/s | vs direct | p50 ms | p99 ms | VM CPU µs/request | errors (3 runs: connect, write, timeout, non-2xx) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let rows = r["http"]["rows"].as_array().cloned().unwrap_or_default();
    let direct = rows.first().map(|x| f(&x["rps"])).unwrap_or(f64::NAN);
    for row in &rows {
        o.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |\n",
            row["target"].as_str().unwrap_or(""),
            f(&row["rps"]),
            f(&row["rps"]) / direct,
            f(&row["p50_ms"]),
            f(&row["p99_ms"]),
            f(&row["vm_cpu_us_per_request"]),
            f(&row["errors"])
        ));
    }
    if rows
        .iter()
        .any(|r| r.get("vm_cpu_us_per_request").is_some())
    {
        o.push_str(
            "\nVM CPU per request is the busy time of the whole VM (wrk, balancer, backends: user, system, irq and \
             softirq, where XDP runs) over the requests served. The difference to `direct` is what each path \
             costs per request in this lab, and for every balancer it includes the lab's extra hop: client packets \
             cross the bridge and a veth pair twice (to the balancer and back out), which costs far more kernel \
             time than the XDP program itself (see the micro-benchmark's ns per packet above) and which a \
             balancer on a real NIC does not pay in the same way.\n",
        );
    }
    let fo = &r["failover"];
    let fo_text = format!(
        "\n## Failover ({} repetitions, {}, {} req/s)\n\nKill → last new connection reaching the dead backend: \
         min {:.0} ms, median {:.0} ms, max {:.0} ms.\n",
        fo["repetitions"],
        fo["health"].as_str().unwrap_or(""),
        fo["rate_rps"],
        f(&fo["min_s"]) * 1e3,
        f(&fo["median_s"]) * 1e3,
        f(&fo["max_s"]) * 1e3
    );
    o.push_str(&fo_text);
    if fo.get("measured").is_some() {
        o.push_str(&format!(
            "\n{} of {} repetitions had a connection reach the dead backend (the figures above); in {} none did, \
             and they are left out rather than counted as 0 ms.\n",
            fo["measured"], fo["repetitions"], fo["no_failure"]
        ));
    }
    // The datapath's signals beside probes alone (README \"Failure seen by
    // the datapath\"); runs before they existed have only the first row.
    let rows: Vec<&Value> = ["failover", "failover_nat", "failover_hung", "failover_path"]
        .iter()
        .map(|k| &r[*k])
        .filter(|v| v.get("what").is_some())
        .collect();
    if rows.len() > 1 {
        o.push_str(
            "\nBy failure (same load and health settings; kill → last new connection that failed, ten \
             repetitions each):\n\n| failure | median | max | repetitions measured |\n|---|---:|---:|---:|\n",
        );
        for v in rows {
            o.push_str(&format!(
                "| {} | {:.0} ms | {:.0} ms | {} of {} |\n",
                v["what"].as_str().unwrap_or(""),
                f(&v["median_s"]) * 1e3,
                f(&v["max_s"]) * 1e3,
                v["measured"],
                v["repetitions"]
            ));
        }
    }
    let nf = &r["node_failover"];
    if !nf.is_null() {
        let opt_ms = |v: &Value| {
            v.as_f64()
                .map(|x| format!("{:.0} ms", x * 1e3))
                .unwrap_or_else(|| "none".into())
        };
        o.push_str(&format!(
            "\n## LB-node failover ({} repetitions, {} nodes behind a router, {}, {} new connections/s plus 16 \
             long-lived keep-alive connections)\n\n\
             | measure | median | max |\n|---|---:|---:|\n\
             | kill → node's route withdrawn on the router | {:.0} ms | {:.0} ms |\n\
             | kill → last failed new connection | {} | {} |\n\
             | new connections delayed ≥ 500 ms (SYN retransmitted) per repetition | {} | |\n\
             | kill → start of the last delayed new connection | {} | |\n\n\
             Repetitions with a failed new connection: {}. Long-lived requests: {} sent, **{} failed**.\n",
            nf["repetitions"],
            nf["nodes"],
            nf["detection"].as_str().unwrap_or(""),
            nf["rate_rps"],
            f(&nf["withdrawn_median_s"]) * 1e3,
            f(&nf["withdrawn_max_s"]) * 1e3,
            opt_ms(&nf["last_failed_new_median_s"]),
            opt_ms(&nf["last_failed_new_max_s"]),
            nf["delayed_new_median"],
            opt_ms(&nf["last_delayed_new_median_s"]),
            nf["reps_with_failed_new"],
            nf["long_lived_requests"],
            nf["long_lived_failed"],
        ));
    }
    if let (Some(on), Some(off)) = (ring_change_row(r, true), ring_change_row(r, false)) {
        let list = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        o.push_str(&format!(
            "\n## LB-node failover after a ring change (the second chance)\n\n\
             Two nodes, `gue` VIPs, 64 long-lived keep-alive connections; a third backend joins \
             (every ring changes), node 1 dies, then comes back with an empty table. Per \
             repetition ({} each): connections broken.\n\n\
             | second chance | broken when node 1 dies | broken when it comes back empty | packets passed to a second hop | requests |\n\
             |---|---:|---:|---:|---:|\n\
             | on (`second_chance = 600`) | {} | {} | {} | {} |\n\
             | off (`second_chance = 0`) | {} | {} | {} | {} |\n",
            r["node_failover_ring_change"]["repetitions"],
            list(&on["broken_node_loss"]),
            list(&on["broken_fresh_node"]),
            list(&on["second_hops"]),
            on["requests"],
            list(&off["broken_node_loss"]),
            list(&off["broken_fresh_node"]),
            list(&off["second_hops"]),
            off["requests"],
        ));
    }
    let ps = &r["probe_schedule"];
    if !ps.is_null() {
        o.push_str(&format!(
            "\n## Health probes at scale (one agent, 3 VIPs, {}; interval {} ms plus {}; {} during the measurement)\n\n\
             Probe arrivals recorded at the backends over 8 s; failover is a backend answering 503 → the agent \
             marking it down, five backends one at a time.\n\n\
             | backends | probes | CLI edits | interval p50 | p99 | min–max | failover median | max |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
            ps["health"].as_str().unwrap_or(""),
            ps["interval_ms"],
            ps["jitter"].as_str().unwrap_or(""),
            ps["background"].as_str().unwrap_or(""),
        ));
        for row in ps["rows"].as_array().into_iter().flatten() {
            o.push_str(&format!(
                "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.0}–{:.0} ms | {:.0} ms | {:.0} ms |\n",
                row["backends"],
                row["probes"],
                row["cli_edits"],
                f(&row["interval_p50_ms"]),
                f(&row["interval_p99_ms"]),
                f(&row["interval_min_ms"]),
                f(&row["interval_max_ms"]),
                f(&row["failover_median_ms"]),
                f(&row["failover_max_ms"]),
            ));
        }
    }
    let sc = &r["scale"];
    if !sc.is_null() {
        o.push_str(&format!(
            "\n## Scale (one agent, health checks {}; {} build; one run each)\n\n\
             | VIPs × backends | ring size | load from scratch until every backend is up | one backend address out of every VIP (`lb reload`) | agent RSS | datapath maps |\n\
             |---|---:|---:|---:|---:|---:|\n",
            sc["health"].as_str().unwrap_or(""),
            sc["build"].as_str().unwrap_or(""),
        ));
        for row in sc["rows"].as_array().into_iter().flatten() {
            o.push_str(&format!(
                "| {} × {} | {} | {:.2} s | {:.2} s | {} MiB | {:.1} MiB |\n",
                row["vips"],
                row["backends_per_vip"],
                row["ring_size"],
                f(&row["load_s"]),
                f(&row["reload_one_backend_out_s"]),
                row["agent_rss_mib"],
                f(&row["maps_mib"]),
            ));
        }
    }
    o.push_str(&targets(r));
    // What was tried on the datapath, measured with `bench micro --against`
    // (kept as a record with each entry's own date and numbers).
    if let Ok(h) =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("report/ab-history.md"))
    {
        let recorded =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(HISTORY_JSONL))
                .unwrap_or_default();
        o.push('\n');
        o.push_str(&with_recorded_rows(&h, &recorded));
    }
    o
}

/// The hand-kept history (`ab-history.md`) with the rows the A/B tool
/// recorded (`ab-history.jsonl`, one run per line) after its table's last
/// row.
pub(super) fn with_recorded_rows(md: &str, jsonl: &str) -> String {
    let rows: Vec<String> = jsonl
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| history_row(&e))
        .collect();
    let lines: Vec<&str> = md.lines().collect();
    let Some(last) = lines.iter().rposition(|l| l.starts_with('|')) else {
        return md.to_string();
    };
    let mut out: Vec<String> = lines[..=last].iter().map(|l| l.to_string()).collect();
    out.extend(rows);
    out.extend(lines[last + 1..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// The cost programs that bound the established, ipip and stateless targets.
const EST: &str = "cost: our connection table's part of an established packet (headers, set lookup, backend, counter, MACs)";
const ENCAP4: &str = "cost: floor + IPv4 IPIP encapsulation (via bench_ipip)";
const ENCAP6: &str = "cost: floor + IP6IP6 encapsulation (via bench_ipip)";
const MINIMAL_IPIP4: &str = "cost: minimal balancer with IPv4 IPIP (via bench_ipip)";
const MINIMAL_IPIP6: &str = "cost: minimal balancer with IP6IP6 (via bench_ipip)";
const SCHED: &str = "cost: Maglev scheduling without a VIP lookup (parse, scheduling hash, slot, ring, backend, counter, MACs)";

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// The targets of the load-testing issue, judged on this run, and a reading.
fn targets(r: &Value) -> String {
    let cases = r["micro"]["cases"].as_array().cloned().unwrap_or_default();
    let ratio = |name: &str| {
        cases
            .iter()
            .find(|c| c["case"] == name)
            .map(|c| f(&c["ratio_to_floor_tx"]))
            .unwrap_or(f64::NAN)
    };
    let est = ratio("established IPv4 TCP dsr");
    let syn = ratio("new flow IPv4 TCP dsr, SYN with table write");
    let ipip = ratio("IPv4 ipip (via bench_ipip)").max(ratio("IPv6 ipip (via bench_ipip)"));
    let pass = ratio("non-VIP pass");
    let pps = r["packet_rate"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let worst_pps = pps
        .iter()
        .map(|x| f(&x["ratio"]))
        .fold(f64::INFINITY, f64::min);
    let http = r["http"]["rows"].as_array().cloned().unwrap_or_default();
    let rps = |i: usize| http.get(i).map(|x| f(&x["rps"])).unwrap_or(f64::NAN);
    let (direct, lb, hap) = (rps(0), rps(1), rps(2));
    let fo = f(&r["failover"]["median_s"]);
    let mut o = String::from(
        "\n## Targets, judged on this run\n\n| target | this run | |\n|---|---|---|\n",
    );
    // The per-packet targets of the datapath-cost issue (ratios to the
    // swap-MACs floor measured in the same run).
    for (what, v, limit) in [
        ("established IPv4 TCP dsr ≤ 2.5× the floor", est, 2.5),
        ("IPv4 and IPv6 ipip (via bench_ipip) ≤ 3.0×", ipip, 3.0),
        ("non-VIP pass ≤ 1.6×", pass, 1.6),
        ("new flow with a table write (SYN) ≤ 5×", syn, 5.0),
    ] {
        o.push_str(&format!("| {what} | {v:.2}× | {} |\n", met(v <= limit)));
    }
    // Bounded, at the worst flow count, by our own table's lookup alone.
    let set_bound = pps
        .iter()
        .min_by(|a, b| f(&a["ratio"]).total_cmp(&f(&b["ratio"])))
        .and_then(|w| w.get("set_pps").map(|s| f(s) / f(&w["floor_pps"])))
        .filter(|b| worst_pps < 0.85 && *b < 0.85);
    o.push_str(&format!(
        "| forwarded pps ≥ 0.85× the floor program | {worst_pps:.2}× (worst flow count) | {} |\n",
        match set_bound {
            Some(b) =>
                format!("**missed**: out of reach, the floor plus our table lookup alone {b:.2}×"),
            None => met(worst_pps >= 0.85).to_string(),
        }
    ));
    // The fast-path issue's targets: ratios to the minimal balancer
    // (`cost_minimal_lb`, parse + VIP hash + LRU + backend + counter + MACs)
    // in the same run, each the quotient of the two "× floor" figures.
    // A missed one is shown beside the primitive that bounds it, where
    // the run measured one: the cost program doing the same job's
    // unavoidable part and nothing else ("What a packet costs").
    let minimal =
        ratio("cost: minimal balancer (parse, VIP hash, LRU, backend array, counter, MACs)");
    for (what, case, limit, bound) in [
        (
            "established IPv4 TCP dsr ≤ 0.5× the minimal balancer",
            "established IPv4 TCP dsr",
            0.5,
            Some((
                "our table's part alone (set lookup, backend, counter, MACs)",
                EST,
            )),
        ),
        (
            "IPv4 ipip ≤ 0.5× the minimal balancer",
            "IPv4 ipip (via bench_ipip)",
            0.5,
            Some(("the bare encapsulation alone", ENCAP4)),
        ),
        (
            "IPv6 ipip ≤ 0.5× the minimal balancer",
            "IPv6 ipip (via bench_ipip)",
            0.5,
            Some(("the bare encapsulation alone", ENCAP6)),
        ),
        (
            "new flow with a table write (SYN) ≤ 1.0× the minimal balancer",
            "new flow IPv4 TCP dsr, SYN with table write",
            1.0,
            None,
        ),
        (
            "stateless VIP (table off) ≤ 0.4× the minimal balancer",
            "new flow IPv4 TCP dsr (table off)",
            0.4,
            Some(("Maglev scheduling alone, no VIP lookup", SCHED)),
        ),
    ] {
        let v = ratio(case) / minimal;
        if !v.is_finite() {
            continue;
        }
        let b = bound.map(|(name, case)| (name, ratio(case) / minimal));
        let verdict = match b {
            Some((name, b)) if v > limit && b > limit => {
                format!("**missed**: out of reach, {name} {b:.2}×")
            }
            _ => met(v <= limit).to_string(),
        };
        o.push_str(&format!("| {what} | {v:.2}× | {verdict} |\n"));
    }
    if let Some(w) = pps
        .iter()
        .filter(|x| x.get("minimal_pps").is_some())
        .max_by_key(|x| x["flows"].as_u64())
    {
        let v = f(&w["lb_pps"]) / f(&w["minimal_pps"]);
        // Bounded by our own table's lookup alone at that flow count.
        let bound = w
            .get("set_pps")
            .map(|s| f(s) / f(&w["minimal_pps"]))
            .filter(|b| v < 1.3 && *b < 1.3);
        let verdict = match bound {
            Some(b) => {
                format!("**missed**: out of reach, the floor plus our table lookup alone {b:.2}×")
            }
            None => met(v >= 1.3).to_string(),
        };
        o.push_str(&format!(
            "| forwarded pps at {} flows ≥ 1.3× the minimal balancer's | {v:.2}× | {verdict} |\n",
            w["flows"],
        ));
    }
    o.push_str(&format!(
        "| HTTP ≥ 0.9× direct | {:.2}× | {} |\n",
        lb / direct,
        met(lb / direct >= 0.9)
    ));
    o.push_str(&format!(
        "| HTTP above HAProxy | {:.2}× HAProxy | {} |\n",
        lb / hap,
        met(lb > hap)
    ));
    o.push_str(&format!(
        "| failover median ≤ 1 s | {:.0} ms | {} |\n",
        fo * 1e3,
        met(fo <= 1.0)
    ));
    let nf = &r["node_failover"];
    if !nf.is_null() {
        let w = f(&nf["withdrawn_median_s"]);
        o.push_str(&format!(
            "| LB-node failover median ≤ 1 s (kill → route withdrawn) | {:.0} ms | {} |\n",
            w * 1e3,
            met(w <= 1.0)
        ));
        let lf = nf["long_lived_failed"].as_u64().unwrap_or(u64::MAX);
        o.push_str(&format!(
            "| no long-lived connection fails when a node dies | {lf} failed | {} |\n",
            met(lf == 0)
        ));
    }
    if let Some(on) = ring_change_row(r, true) {
        let broken: u64 = on["broken_node_loss"]
            .as_array()
            .into_iter()
            .chain(on["broken_fresh_node"].as_array())
            .flatten()
            .filter_map(Value::as_u64)
            .sum();
        o.push_str(&format!(
            "| no long-lived connection breaks when a node dies after a ring change (second chance) | {broken} broken | {} |\n",
            met(broken == 0)
        ));
    }
    o.push_str(&costs(r, &ratio, est, syn, ipip));
    o.push_str(&reading(r, est, worst_pps, direct, lb, hap));
    o
}

/// The packet-rate rows' program times (`program_ns`: each program's own
/// time per packet by the kernel's accounting), as a table; empty for a run
/// that did not measure them.
fn program_times(rows: &Value) -> String {
    let rows: Vec<&Value> = rows
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r.get("program_ns").is_some())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut o = String::from(
        "\n**Where the time goes**: each program's own run time per packet by the kernel's accounting \
         (`BPF_ENABLE_STATS`, on for a further 1 s of the same traffic after each rate run; median of 3). The \
         accounting reads the clock around every run, so each figure carries the same few tens of ns: compare \
         them with each other.\n\n\
         | flows | floor ns | floor + our set lookup ns | minimal balancer ns | minimal, 16-byte key ns | lb ns | lb full NAT ns |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let ns = |k: &str| {
            row["program_ns"]
                .get(k)
                .map(|v| format!("{:.0}", f(v)))
                .unwrap_or_else(|| "not run".into())
        };
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row["flows"],
            ns("floor"),
            ns("set"),
            ns("minimal"),
            ns("minimal16"),
            ns("lb"),
            ns("nat"),
        ));
    }
    o
}

/// "What a packet costs": the cost programs of the tools object (the floor
/// plus one primitive each) read against the per-packet targets, so a
/// target below what its path's unavoidable primitives cost shows as such,
/// with this run's numbers.
fn costs(r: &Value, ratio: &dyn Fn(&str) -> f64, est: f64, syn: f64, ipip: f64) -> String {
    let lru = ratio("cost: floor + LRU hash lookup (40-byte key)");
    let upd = ratio("cost: floor + LRU hash update");
    let upd_pcpu = ratio("cost: floor + LRU hash update, per-CPU LRU lists");
    let hash = ratio("cost: floor + hash lookup (40-byte key)");
    let hash16 = ratio("cost: floor + hash lookup (16-byte key)");
    let clock = ratio("cost: floor + bpf_ktime_get_ns");
    let coarse = ratio("cost: floor + bpf_ktime_get_coarse_ns");
    let minimal =
        ratio("cost: minimal balancer (parse, VIP hash, LRU, backend array, counter, MACs)");
    let minimal16 = ratio("cost: minimal balancer with a 16-byte IPv4 flow key");
    if lru.is_nan() {
        return String::new();
    }
    let mut o = String::from(
        "
## What a packet costs

The tools object's cost programs are the swap-MACs floor plus one \
         primitive each (micro-benchmark rows \"cost: …\"), so each ratio minus 1 is that primitive's \
         price in floors on this run:\n\n",
    );
    o.push_str(&format!(
        "- One hash-map lookup with the connection table's 40-byte key: {hash:.2}× the floor; with a \
         16-byte key {hash16:.2}×. One LRU-hash lookup: {lru:.2}×. An array lookup {arr:.2}×, a \
         per-CPU counter update {ctr:.2}× (the JIT inlines both).\n",
        arr = ratio("cost: floor + array lookup"),
        ctr = ratio("cost: floor + per-CPU counter update"),
    ));
    o.push_str(&format!(
        "- So the floor-relative targets (established ≤ 2.5×, ipip ≤ 3.0×) lie below the price of one \
         hash-map operation ({lru:.2}× alone), and our datapath makes none on those paths: the \
         connection table and the VIP directory are arrays. A minimal balancer in Katran's order \
         (parse, VIP hash lookup, LRU lookup, backend array read, one counter, MAC rewrite: \
         `cost_minimal_lb`) measured {minimal:.2}×; our established path {est:.2}×, {:.2}× that, \
         while it also keeps idle times, least-connections counts, NAT and tracing; ipip, through \
         the `bench_ipip` wrapper: {ipip:.2}×. With a compact 16-byte IPv4 flow key the minimal \
         balancer measured {minimal16:.2}×: its compiler drops the 40-byte key altogether, which a \
         balancer that also serves IPv6 cannot (A/B history: tried, slower). What the established \
         path is made of once no hash map is left is read from profiles, not from this run: see the \
         A/B history.\n",
        est / minimal
    ));
    let (dir, set) = (
        ratio("cost: floor + VIP directory lookup (dir::lookup_vip_by, first bucket)"),
        ratio("cost: floor + connection-table set lookup (table::find, hit)"),
    );
    if dir.is_finite() && set.is_finite() {
        o.push_str(&format!(
            "- The two array structures that replaced hash maps, each run as the datapath's own code \
             over the tools object's maps: the VIP directory lookup (`dir::lookup_vip_by`: the key's \
             first bucket and the VIP's entry by id) {dir:.2}× the floor, the connection table's set \
             lookup (`table::find`, a hit) {set:.2}×; a hash-map lookup {hash:.2}×. An established \
             packet of a VIP with a table makes the set lookup and no directory lookup (the flow's \
             entry names its VIP); a SYN and a packet of a VIP without a table make the directory \
             lookup.\n"
        ));
    }
    o.push_str(&format!(
        "- A new flow's table write in an LRU hash would be one update: {upd:.2}× the floor alone \
         ({upd_pcpu:.2}× with per-CPU LRU lists); ours is array writes, and our SYN path measured \
         {syn:.2}× in all (scheduling included), against the ≤ 5× target.\n"
    ));
    o.push_str(&format!(
        "- The clock: `bpf_ktime_get_ns` {clock:.2}×, `bpf_ktime_get_coarse_ns` {coarse:.2}×.\n"
    ));
    let (e4, e6, m4, m6) = (
        ratio(ENCAP4),
        ratio(ENCAP6),
        ratio(MINIMAL_IPIP4),
        ratio(MINIMAL_IPIP6),
    );
    let (ipip4, ipip6) = (
        ratio("IPv4 ipip (via bench_ipip)"),
        ratio("IPv6 ipip (via bench_ipip)"),
    );
    if e4.is_finite() && e6.is_finite() {
        o.push_str(&format!(
            "- Encapsulating: the floor's packet wrapped in a bare outer header through the same \
             `bench_ipip` wrapper (its strip and tail call, one `bpf_xdp_adjust_head`, the Ethernet \
             header, the outer header from constants and the packet's length, IPv4's checksum): IPv4 \
             {e4:.2}× the floor, {:.2}× the minimal balancer; IPv6 {e6:.2}×, {:.2}×. So the ≤ 0.5× \
             ipip targets lie below the price of encapsulating alone, before any balancing. What our \
             encapsulation path costs beyond that: IPv4 ipip minus established dsr {:.2} floors, the \
             bare encapsulation minus the floor {:.2}. Like for like, the minimal balancer sending by \
             IPIP through the same wrapper measured {m4:.2}× (IPv4) and {m6:.2}× (IPv6): our ipip \
             {:.2}× and {:.2}× that.\n",
            e4 / minimal,
            e6 / minimal,
            ipip4 - est,
            e4 - 1.0,
            ipip4 / m4,
            ipip6 / m6,
        ));
    }
    let (bare, est, set) = (
        ratio(EST),
        ratio("established IPv4 TCP dsr"),
        ratio("cost: floor + connection-table set lookup (table::find, hit)"),
    );
    if bare.is_finite() {
        let b = bare / minimal;
        o.push_str(&format!(
            "- An established packet through our connection table and nothing else, read the \
             established path's way (`cost_est`: the headers into registers, the table hash, the set \
             lookup, the backend its entry names read and checked, a counter, the backend's MACs \
             written): {bare:.2}× the floor, {b:.2}× the minimal balancer{}. The set lookup alone \
             measured {set:.2}×: there nothing waits for what the lookup found, while a packet sent to \
             its backend waits for the whole chain of dependent reads (hash → slot → backend → MACs). \
             Our established path measured {est:.2}× ({:+.2} floors beside it): what it adds (the \
             address and established filters, the trace check, the VIP read, the settings, two more \
             counters) mostly runs in that chain's shadow (each priced by leaving it out: A/B \
             history).\n",
            if b > 0.5 {
                ", so the ≤ 0.5× established target lies below it"
            } else {
                ": the ≤ 0.5× established target lies above it, within what our path adds"
            },
            est - bare,
        ));
    }
    let (sched, stateless) = (ratio(SCHED), ratio("new flow IPv4 TCP dsr (table off)"));
    if sched.is_finite() {
        o.push_str(&format!(
            "- Scheduling a packet with no table entry: parse, the scheduling hash (the one every node \
             and `lb explain` share), the Maglev slot (`% 65537`), one ring and one backend read, a \
             counter and the MACs, with no VIP lookup at all (`cost_sched`): {sched:.2}× the floor, \
             {:.2}× the minimal balancer, so the ≤ 0.4× stateless target lies below it. Our stateless \
             path measured {stateless:.2}×, {:.2} floors more (the VIP directory, the region and \
             second-chance checks, the VIP's counters).\n",
            sched / minimal,
            stateless - sched,
        ));
    }
    // The packet-rate target at the largest flow count, read against the
    // minimal balancer run in the same rig (its table is as large as ours).
    let rows = r["packet_rate"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(w) = rows
        .iter()
        .filter(|x| x.get("minimal_pps").is_some())
        .max_by_key(|x| x["flows"].as_u64())
    {
        let floor = f(&w["floor_pps"]);
        let (lb, m, m16) = (
            f(&w["lb_pps"]) / floor,
            f(&w["minimal_pps"]) / floor,
            f(&w["minimal16_pps"]) / floor,
        );
        let first = rows
            .iter()
            .filter(|x| x.get("minimal_pps").is_some())
            .min_by_key(|x| x["flows"].as_u64())
            .unwrap_or(w);
        o.push_str(&format!(
            "- Packet rate at {} flows (\"Packet rate\" above): the minimal balancer forwarded {m:.2}× the floor \
             program's rate ({:.2}× at {} flow{}), {m16:.2}× with a compact 16-byte IPv4 flow key; ours {lb:.2}×, \
             {:.2}× the minimal one. So the 0.85× target {} for a balancer that looks every packet up in a \
             connection table: what falls with the flow count is the table lookup's, whatever the key's size, \
             not our code's.\n",
            w["flows"],
            f(&first["minimal_pps"]) / f(&first["floor_pps"]),
            first["flows"],
            if first["flows"].as_u64() == Some(1) { "" } else { "s" },
            lb / m,
            if m < 0.85 && m16 < 0.85 { "lies out of reach at this flow count (both measured below it)" } else { "is within reach" }
        ));
        if w.get("set_pps").is_some() {
            let set = f(&w["set_pps"]) / floor;
            o.push_str(&format!(
                "- Our connection table alone (the floor plus `table::find` of the datapath, a miss \
                 recorded: \"floor + our set lookup\" above) forwarded {set:.2}× the floor's rate at {} \
                 flows, {:.2}× the minimal balancer's: the price of a table lookup that misses the CPU's \
                 caches, before any balancing. Ours forwarded {:.2}× that.\n",
                w["flows"],
                set / m,
                lb / set,
            ));
        }
        let ns = |row: &Value, k: &str| row.get("program_ns").map_or(f64::NAN, |n| f(&n[k]));
        let (set_hi, set_lo, lb_hi, floor_hi) =
            (ns(w, "set"), ns(first, "set"), ns(w, "lb"), ns(w, "floor"));
        if set_hi.is_finite() && set_lo.is_finite() {
            o.push_str(&format!(
                "- By the programs' own times (\"Where the time goes\" above): at {} flows the table alone \
                 took {set_hi:.0} ns a packet against {set_lo:.0} ns at {} flow{}, so the one set lookup \
                 that misses the caches costs about {:.0} ns, {:.1}× the whole floor program ({floor_hi:.0} \
                 ns); ours took {lb_hi:.0} ns, {:.0} ns more than the table alone. Laying the table out \
                 in small arrays of kmalloc'd (huge-page) memory, to spare the TLB, measured no faster \
                 (A/B history).\n",
                w["flows"],
                first["flows"],
                if first["flows"].as_u64() == Some(1) { "" } else { "s" },
                set_hi - set_lo,
                (set_hi - set_lo) / floor_hi,
                lb_hi - set_hi,
            ));
        }
    }
    o
}

/// "Reading the numbers": every sentence computed from this run's figures,
/// so the prose cannot claim what the run did not measure.
fn reading(r: &Value, est: f64, worst_pps: f64, direct: f64, lb: f64, hap: f64) -> String {
    let mut o = String::from("\n## Reading the numbers\n\n");
    let fo = &r["failover"];
    let (fmed, fmax) = (f(&fo["median_s"]), f(&fo["max_s"]));
    o.push_str(&format!(
        "- Failover: median {:.0} ms, worst {:.0} ms over {} repetitions; the worst repetition {} the 1 s target.\n",
        fmed * 1e3,
        fmax * 1e3,
        fo["repetitions"],
        if fmax <= 1.0 { "also met" } else { "missed" }
    ));
    // The guard bounds how fast a flood turns the table over; whether that
    // was enough is read from each row.
    for row in r["syn_flood"]["rows"].as_array().into_iter().flatten() {
        let guard = row["flood_guard_per_cpu_s"].as_u64().unwrap_or(0);
        o.push_str(&format!(
            "- SYN flood, {}-entry table, guard {}: {:.0} of 1000 idle established flows kept their backend across the ring change.\n",
            row["table_size"],
            if guard == 0 { "off".to_string() } else { format!("{guard}/s per CPU") },
            f(&row["established_kept_backend"]),
        ));
    }
    let http = r["http"]["rows"].as_array().cloned().unwrap_or_default();
    let nft = http.get(3).map(|x| f(&x["rps"])).unwrap_or(f64::NAN);
    let p50 = |i: usize| http.get(i).map(|x| f(&x["p50_ms"])).unwrap_or(f64::NAN);
    o.push_str(&format!(
        "- HTTP: the XDP path served {:.2}× the requests/s of a direct connection, {:.2}× HAProxy's and {:.2}× \
         nftables DNAT's; its median latency was {:.2} ms against {:.2} ms direct.\n",
        lb / direct,
        lb / hap,
        lb / nft,
        p50(1),
        p50(0)
    ));
    o.push_str(&format!(
        "- Per packet, the established path cost {est:.2}× the swap-MACs floor and the forwarded packet rate was at worst \
         {worst_pps:.2}× the floor program's. The floor touches only the Ethernet header; the balancer parses to layer 4 \
         and, on the established path, reads arrays only (address filters, the connection table's set, the VIP by id, \
         the backend, the settings) and updates per-CPU counters. Beside it in this run: the minimal balancer \
         (\"What a packet costs\"), HAProxy and nftables (HTTP).\n",
    ));
    o
}

/// The node-failover-after-a-ring-change row with the second chance on or
/// off, if the run has one.
fn ring_change_row(r: &Value, second_chance: bool) -> Option<&Value> {
    r["node_failover_ring_change"]["rows"]
        .as_array()?
        .iter()
        .find(|row| row["second_chance"].as_bool() == Some(second_chance))
}

/// The A/B history `cargo xtask bench micro --against --record` writes:
/// one JSON object per line (here, where its rows are rendered).
pub(crate) const HISTORY_JSONL: &str = "report/ab-history.jsonl";

/// A history row (Markdown) for one recorded run: every case's B/A, the
/// median of its per-pair ratios with their range.
pub(crate) fn history_row(e: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let cases: Vec<String> = e["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{} {:.2} ({:.2}–{:.2})",
                c["case"].as_str().unwrap_or("?"),
                f(&c["pair_median"]),
                f(&c["pair_min"]),
                f(&c["pair_max"])
            )
        })
        .collect();
    format!(
        "| {} | {} | {} | recorded by the tool: B = {} against A = {} ({} pairs): {} |",
        e["date"].as_str().unwrap_or("?"),
        e["change"].as_str().unwrap_or("?").replace('|', "\\|"),
        e["kept"].as_str().unwrap_or("?"),
        e["b"].as_str().unwrap_or("?"),
        e["a"].as_str().unwrap_or("?"),
        e["pairs"],
        cases.join("; ")
    )
}
