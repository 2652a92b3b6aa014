//! `cargo xtask demo` and `cargo xtask lab`: build the agent, then hand over
//! to `lb lab ...` (the lab and the demo live in lb-user, next to the agent
//! they exercise).

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{run, step};

fn build(root: &Path) -> Result<std::path::PathBuf> {
    step("building the agent (release)");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-p", "lb-user"]))?;
    Ok(root.join("target/release/lb"))
}

/// The README's first command: lab, agent, traffic, failover, report.
/// With `nodes` > 1, the multi-node story instead.
pub fn run_demo(root: &Path, nodes: u8) -> Result<()> {
    let lb = build(root)?;
    run(Command::new(lb).args(["lab", "demo", "--nodes", &nodes.to_string()]))
}

/// `cargo xtask lab up|down|status`.
pub fn lab(root: &Path, action: &str) -> Result<()> {
    let lb = build(root)?;
    run(Command::new(lb).args(["lab", action]))
}
