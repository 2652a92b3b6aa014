//! `cargo xtask bench micro --against REV`: the micro-benchmark of the
//! working tree (B) against another revision (A), interleaved A B A B …
//! so that the VM's drift between runs hits both alike. Each side's micro
//! test binary is built once (REV in a temporary git worktree sharing this
//! tree's target directory, so dependencies are not rebuilt); then `pairs`
//! pairs of runs; per case, the ratio B/A of the medians and the spread
//! (lowest and highest per-pair ratio). Below 1.00 means B is faster.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{run, step};

/// Builds the micro test binary of the tree at `dir`; returns its path.
fn build_micro(dir: &Path, target: &Path) -> Result<PathBuf> {
    let out = Command::new("cargo")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .args([
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--test",
            "micro",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("building the micro-benchmark")?;
    if !out.status.success() {
        bail!("building the micro-benchmark in {} failed", dir.display());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == "micro"
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo did not report the micro-benchmark's executable")
}

/// One run of a micro binary: case name → ns per packet.
fn run_micro(exe: &Path, runs: usize) -> Result<BTreeMap<String, f64>> {
    let mut child = Command::new(exe)
        .args(["--ignored", "--nocapture", "--exact", "micro"])
        .env("LB_BENCH_JSON", "1")
        .env("LB_MICRO_RUNS", runs.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let mut cases = BTreeMap::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(list) = v["cases"].as_array()
            {
                for c in list {
                    if let (Some(name), Some(ns)) =
                        (c["case"].as_str(), c["ns_per_packet"].as_f64())
                    {
                        cases.insert(name.to_string(), ns);
                    }
                }
            }
        }
    }
    if !child.wait()?.success() || cases.is_empty() {
        bail!("{} failed or printed no cases", exe.display());
    }
    Ok(cases)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn against(root: &Path, rev: &str, pairs: usize, json_out: bool) -> Result<()> {
    let target = root.join("target");
    let wt = std::env::temp_dir().join(format!("lb-ab-{}", std::process::id()));
    step(&format!(
        "A = {rev} (worktree {}), B = working tree",
        wt.display()
    ));
    run(Command::new("git")
        .current_dir(root)
        .args(["worktree", "add", "--detach", "-f"])
        .arg(&wt)
        .arg(rev))
    .with_context(|| format!("`{rev}` is not a revision git knows"))?;
    let result = (|| -> Result<()> {
        let a = build_micro(&wt, &target)?;
        let b = build_micro(root, &target)?;
        let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut a_ns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut b_ns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for p in 0..pairs {
            step(&format!("pair {}/{pairs}", p + 1));
            // Alternate which side runs first, so neither always runs on
            // a warmer (or more tired) VM.
            let (ra, rb) = if p % 2 == 0 {
                let ra = run_micro(&a, 1)?;
                (ra, run_micro(&b, 1)?)
            } else {
                let rb = run_micro(&b, 1)?;
                (run_micro(&a, 1)?, rb)
            };
            for (case, nb) in &rb {
                if let Some(na) = ra.get(case) {
                    ratios.entry(case.clone()).or_default().push(nb / na);
                    a_ns.entry(case.clone()).or_default().push(*na);
                    b_ns.entry(case.clone()).or_default().push(*nb);
                }
            }
        }
        let mut rows = Vec::new();
        for (case, r) in &ratios {
            let (ma, mb) = (median(a_ns[case].clone()), median(b_ns[case].clone()));
            let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = r.iter().copied().fold(0.0, f64::max);
            rows.push((case.clone(), ma, mb, mb / ma, lo, hi));
        }
        if json_out {
            let v: Vec<Value> = rows
                .iter()
                .map(|(c, a, b, r, lo, hi)| {
                    serde_json::json!({"case": c, "a_ns": a, "b_ns": b, "b_over_a": r, "pair_min": lo, "pair_max": hi})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"a": rev, "b": "working tree", "pairs": pairs, "cases": v})
            );
        } else {
            println!(
                "\nA/B micro-benchmark: A = {rev}, B = working tree, {pairs} interleaved pairs, repeat 1,000,000"
            );
            println!("| case | A ns | B ns | B/A (median) | per-pair B/A min–max |");
            println!("|---|---:|---:|---:|---:|");
            for (c, a, b, r, lo, hi) in &rows {
                println!("| {c} | {a:.1} | {b:.1} | {r:.2} | {lo:.2}–{hi:.2} |");
            }
        }
        Ok(())
    })();
    let _ = Command::new("git")
        .current_dir(root)
        .args(["worktree", "remove", "--force"])
        .arg(&wt)
        .status();
    result
}
