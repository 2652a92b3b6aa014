//! `cargo xtask bench micro --against REV`: the datapath of the working
//! tree (B) against another revision's (A). REV is built in a temporary git
//! worktree with its own target directory (`target/ab-base`, kept between
//! runs so only what changed is rebuilt); B's micro-benchmark then loads both objects side by side in
//! one process and times every case on A and B in turn (the order
//! alternating), `pairs` times, so the VM's drift hits both alike. Per
//! case: the ratio B/A of the medians and the per-pair ratios' median and
//! range. Below 1.00 means B is faster.

use std::{
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
        .args(
            crate::bench::MICRO_ARGS
                .split(|a| *a == "--")
                .next()
                .unwrap_or_default(),
        )
        .args(["--no-run", "--message-format=json"])
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

/// Builds lb-user in `dir`; returns the datapath object its build script
/// made (the file `lb` in the build script's OUT_DIR).
fn build_object(dir: &Path, target: &Path) -> Result<PathBuf> {
    let out = Command::new("cargo")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .args([
            "build",
            "--release",
            "-p",
            "lb-user",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("building lb-user")?;
    if !out.status.success() {
        bail!("building lb-user in {} failed", dir.display());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        if v["reason"] == "build-script-executed"
            && v["package_id"]
                .as_str()
                .is_some_and(|p| p.contains("lb-user"))
            && let Some(dir) = v["out_dir"].as_str()
        {
            let obj = Path::new(dir).join("lb");
            if obj.exists() {
                return Ok(obj);
            }
        }
    }
    bail!("cargo did not report lb-user's build output")
}

/// What `--record` adds to the A/B history with the run's numbers.
pub struct Record {
    pub change: String,
    pub kept: String,
}

/// The short commit `rev` names (and "+changes" for a dirty working tree
/// when `rev` is `HEAD` of the tree B is).
fn short(root: &Path, rev: &str, dirty_mark: bool) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let c = git(&["rev-parse", "--short=7", rev]).unwrap_or_else(|| rev.to_string());
    let dirty = dirty_mark
        && git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{c}+changes") } else { c }
}

/// Appends a run to the history (see `bench::HISTORY_JSONL`).
fn append_history(
    root: &Path,
    rev: &str,
    pairs: usize,
    rec: &Record,
    rows: &[Value],
) -> Result<()> {
    use std::io::Write as _;
    let date = Command::new("date")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let entry = serde_json::json!({
        "date": date,
        "a": short(root, rev, false),
        "b": short(root, "HEAD", true),
        "pairs": pairs,
        "change": rec.change,
        "kept": rec.kept,
        "cases": rows,
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(crate::bench::HISTORY_JSONL);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{entry}")?;
    step(&format!(
        "recorded in {} (`cargo xtask bench report` renders BENCHMARKS.md)",
        path.display()
    ));
    Ok(())
}

pub fn against(
    root: &Path,
    rev: &str,
    pairs: usize,
    json_out: bool,
    record: Option<Record>,
) -> Result<()> {
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
        // A gets a target directory of its own: cargo names the build
        // output of a workspace member the same in every checkout, so a
        // shared one would let A's datapath object overwrite B's.
        let obj_a = build_object(&wt, &target.join("ab-base"))?;
        let micro_b = build_micro(root, &target)?;
        step(&format!(
            "{pairs} interleaved pairs per case, both objects in one process"
        ));
        let mut child = Command::new(&micro_b)
            .args(["--ignored", "--nocapture", "--exact", "micro"])
            .env("LB_AB_OBJECT", &obj_a)
            .env("LB_AB_PAIRS", pairs.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", micro_b.display()))?;
        let mut rows: Vec<Value> = Vec::new();
        let mut objects = (String::new(), String::new());
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line?;
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && let Some(list) = v["ab"].as_array()
                {
                    rows = list.clone();
                    objects = (
                        v["a_object"].as_str().unwrap_or("").to_string(),
                        v["b_object"].as_str().unwrap_or("").to_string(),
                    );
                }
            }
        }
        step(&format!(
            "datapath objects: A {} ({}), B {}{}",
            objects.0,
            obj_a.display(),
            objects.1,
            if objects.0 == objects.1 {
                " - byte-identical: this run measures the yardstick's own noise"
            } else {
                ""
            }
        ));
        if !child.wait()?.success() || rows.is_empty() {
            bail!(
                "the A/B run failed (A's object must be compatible with this tree's maps; \
                 a revision that changed map layouts cannot be compared this way)"
            );
        }
        if let Some(rec) = &record {
            append_history(root, rev, pairs, rec, &rows)?;
        }
        if json_out {
            println!(
                "{}",
                serde_json::json!({"a": rev, "b": "working tree", "pairs": pairs,
                    "a_object": objects.0, "b_object": objects.1, "cases": rows})
            );
        } else {
            println!(
                "\nA/B micro-benchmark: A = {rev}, B = working tree, {pairs} interleaved pairs per case (repeat 200,000 each)"
            );
            println!("| case | A ns | B ns | B/A (median of per-pair ratios) | per-pair min–max |");
            println!("|---|---:|---:|---:|---:|");
            let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            for r in &rows {
                println!(
                    "| {} | {:.1} | {:.1} | {:.2} | {:.2}–{:.2} |",
                    r["case"].as_str().unwrap_or(""),
                    f(&r["a_ns"]),
                    f(&r["b_ns"]),
                    f(&r["pair_median"]),
                    f(&r["pair_min"]),
                    f(&r["pair_max"])
                );
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
