//! `cargo xtask bench`: runs every benchmark, then writes one report:
//! `BENCHMARKS.md` (Markdown), `xtask/report/bench.json`, and
//! `xtask/report/bench.svg` (packet rate and HTTP side by side).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{apt_install, have, run, step};

mod chart;
mod report;

pub(crate) use report::HISTORY_JSONL;

use chart::chart;
use report::{markdown, micro_table};

/// Debian packages only the benchmarks need.
const BENCH_PACKAGES: &[(&str, &str)] =
    &[("wrk", "wrk"), ("haproxy", "haproxy"), ("nft", "nftables")];

fn bench_setup() -> Result<()> {
    let missing: Vec<&str> = BENCH_PACKAGES
        .iter()
        .filter(|(c, _)| !have(c))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("    installing for the benchmarks: {}", missing.join(" "));
    apt_install(&missing)
}

/// Runs a cargo test command and returns the JSON objects it printed.
fn collect(root: &Path, args: &[&str], env: &[(&str, &str)], prefix: &str) -> Result<Vec<Value>> {
    let mut c = Command::new("cargo");
    c.current_dir(root).args(args).stdout(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().context("starting cargo")?;
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let json_line = if prefix.is_empty() {
                line.starts_with('{').then_some(line.as_str())
            } else {
                line.strip_prefix(prefix)
            };
            if let Some(j) = json_line {
                out.push(
                    serde_json::from_str(j)
                        .with_context(|| format!("bad JSON from a benchmark: {j}"))?,
                );
            } else if !line.starts_with("running ") && !line.is_empty() {
                println!("{line}");
            }
        }
    }
    if !child.wait()?.success() {
        bail!("benchmark run failed: cargo {}", args.join(" "));
    }
    Ok(out)
}

pub fn bench(root: &Path, suite: &str, json_out: bool) -> Result<()> {
    match suite {
        "micro" => {
            let mut c = Command::new("cargo");
            c.current_dir(root).args(MICRO_ARGS);
            if json_out {
                c.env("LB_BENCH_JSON", "1");
            }
            run(&mut c)
        }
        "all" => all(root),
        "report" => {
            // Re-render BENCHMARKS.md and the chart from the last run's JSON.
            let dir = root.join("xtask/report");
            let results: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json"))?)?;
            write_report(root, &results).map(|_| ())
        }
        other => bail!("unknown bench suite `{other}`; available: all (default), micro, report"),
    }
}

/// The micro-benchmark's cargo command line (`ab.rs` builds its part
/// before `--`).
pub(crate) const MICRO_ARGS: &[&str] = &[
    "test",
    "--release",
    "-p",
    "lb-tests",
    "--test",
    "micro",
    "--",
    "--ignored",
    "--nocapture",
];

/// Writes BENCHMARKS.md, the chart and README's figures from `results`;
/// returns the Markdown.
fn write_report(root: &Path, results: &Value) -> Result<String> {
    chart(results, &root.join("xtask/report/bench.svg"))?;
    let md = markdown(results);
    std::fs::write(root.join("BENCHMARKS.md"), &md)?;
    let readme = root.join("README.md");
    let text = std::fs::read_to_string(&readme)?;
    std::fs::write(&readme, with_readme_figures(&text, results)?)?;
    Ok(md)
}

/// README's section of figures: between these markers, rendered from
/// bench.json, never typed.
const README_BEGIN: &str =
    "<!-- bench:micro (written by `cargo xtask bench` from xtask/report/bench.json) -->";
const README_END: &str = "<!-- /bench:micro -->";

/// README's text with its figures section rendered from `r`.
fn with_readme_figures(text: &str, r: &Value) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        bail!("README.md has no benchmark section (`{README_BEGIN}` … `{README_END}`)");
    };
    let head = &text[..b + README_BEGIN.len()];
    let m = &r["meta"];
    let body = format!(
        "\nFrom the last `cargo xtask bench` run ({}, revision {}, {} vCPUs, kernel {}):\n\n{}",
        m["date"].as_str().unwrap_or(""),
        m["revision"].as_str().unwrap_or("unrecorded"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or(""),
        micro_table(r)
    );
    Ok(format!("{head}{body}{}", &text[e..]))
}

/// Fails when README's figures are not the ones bench.json renders (a
/// figure typed by hand, or a run whose report was not written back).
pub fn check_readme(root: &Path) -> Result<()> {
    let json = root.join("xtask/report/bench.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)
        .with_context(|| format!("reading {}", json.display()))?;
    let text = std::fs::read_to_string(root.join("README.md"))?;
    if with_readme_figures(&text, &r)? != text {
        bail!(
            "README.md's benchmark figures differ from xtask/report/bench.json: run `cargo xtask bench report` \
             (it renders them) and commit README.md"
        );
    }
    Ok(())
}

fn all(root: &Path) -> Result<()> {
    bench_setup()?;
    let t0 = std::time::Instant::now();
    step("micro-benchmark (BPF_PROG_TEST_RUN)");
    let micro = collect(root, MICRO_ARGS, &[("LB_BENCH_JSON", "1")], "")?
        .into_iter()
        .next()
        .context("the micro-benchmark printed no JSON")?;
    let mut results = json!({"micro": micro});
    for (name, title) in [
        (
            "bench_packet_rate",
            "packet rate: lb loadgen → LB → sink, vs the floor program",
        ),
        (
            "bench_syn_flood",
            "connection table under SYN floods of distinct IPv6 sources, three table/guard rows",
        ),
        (
            "bench_http",
            "HTTP through the lab: lb vs direct, HAProxy, nftables",
        ),
        ("bench_failover", "failover time, ten repetitions"),
        (
            "bench_failover_nat",
            "failover of a NAT backend (its RST signalled), ten repetitions",
        ),
        (
            "bench_failover_hung",
            "failover of a hung backend (SYNs dropped), ten repetitions",
        ),
        (
            "bench_failover_path",
            "failover of a backend without the VIP on its loopback, ten repetitions",
        ),
        (
            "bench_node_failover",
            "LB-node failover behind a BGP router, ten repetitions",
        ),
        (
            "bench_node_failover_ring_change",
            "LB-node failover after a ring change, with and without the second chance",
        ),
        (
            "bench_probe_schedule",
            "health probes of 3 and 300 backends under CLI edits",
        ),
        (
            "bench_scale",
            "scale: 1,000 x 10, 10 x 1,000 and 4,096 x 16 VIPs x backends",
        ),
    ] {
        // Agent benchmarks live in their own file.
        let file = if matches!(name, "bench_probe_schedule" | "bench_scale") {
            "bench_agent"
        } else {
            "bench"
        };
        step(title);
        let v = collect(
            root,
            &[
                "test",
                "--release",
                "-p",
                "lb-tests",
                "--test",
                file,
                "--",
                "--ignored",
                "--nocapture",
                "--exact",
                name,
            ],
            &[],
            "BENCH_JSON ",
        )?;
        let v = v
            .into_iter()
            .next()
            .with_context(|| format!("{name} printed no result"))?;
        let key = v["bench"].as_str().unwrap_or(name).to_string();
        results[key] = v;
    }
    let secs = t0.elapsed().as_secs_f64();
    results["meta"] = json!({
        "date": String::from_utf8_lossy(&Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output()?.stdout).trim(),
        "kernel": String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout).trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "command": "cargo xtask bench",
        "seconds": secs,
        "revision": revision(root),
    });
    let dir = root.join("xtask/report");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = write_report(root, &results)?;
    println!("\n{md}");
    step(&format!(
        "report written: BENCHMARKS.md, xtask/report/bench.json, xtask/report/bench.svg ({secs:.0} s)"
    ));
    Ok(())
}

/// The commit the benchmarked tree is at, with "+changes" when the tree
/// differs from it (`git describe`-like; "unknown" outside a checkout).
fn revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            // The report files themselves are rewritten by the run.
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                ".",
                ":!BENCHMARKS.md",
                ":!xtask/report",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty { format!("{rev}+changes") } else { rev }
        }
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod readme_tests {
    use super::report::with_recorded_rows;
    use super::*;

    #[test]
    fn recorded_ab_runs_render_as_history_rows_after_the_table() {
        let md = "intro\n\n| date | change | kept | B/A |\n|---|---|---|---|\n| 2026-12-04 | old | yes | 0.9 |\n\nA note after.\n";
        let jsonl = r#"{"date":"2026-12-05","a":"abc1234","b":"def5678+changes","pairs":25,"change":"a change | with a bar","kept":"no","cases":[{"case":"established IPv4 TCP dsr","pair_median":0.96,"pair_min":0.8,"pair_max":1.35}]}"#;
        let out = with_recorded_rows(md, jsonl);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[4], "| 2026-12-04 | old | yes | 0.9 |");
        assert_eq!(
            lines[5],
            "| 2026-12-05 | a change \\| with a bar | no | recorded by the tool: B = def5678+changes against A = abc1234 (25 pairs): established IPv4 TCP dsr 0.96 (0.80–1.35) |"
        );
        assert_eq!(lines[7], "A note after.");
    }

    #[test]
    fn readme_figures_are_rendered_and_a_typed_one_is_caught() {
        let r = json!({
            "meta": {"date": "d", "revision": "abc", "cpus": 2, "kernel": "k"},
            "micro": {"cases": [{"case": "floor", "ns_per_packet": 8.0, "ratio_to_floor_tx": 1.0}],
                      "maglev_build_1000_backends_m65537_ms": 2.0}
        });
        let text = format!("# x\n{README_BEGIN}\nold\n{README_END}\nrest\n");
        let out = with_readme_figures(&text, &r).expect("markers");
        assert!(
            out.contains("| floor | 8.0 | 1.00 |")
                && out.ends_with(&format!("{README_END}\nrest\n"))
        );
        assert_eq!(
            with_readme_figures(&out, &r).expect("again"),
            out,
            "rendering is stable"
        );
        let typed = out.replace("| 8.0 |", "| 7.0 |");
        assert_ne!(with_readme_figures(&typed, &r).expect("markers"), typed);
        assert!(with_readme_figures("no markers", &r).is_err());
    }
}
