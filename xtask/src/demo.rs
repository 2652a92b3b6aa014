//! `cargo xtask demo`: builds the agent, attaches the datapath in a
//! throw-away network namespace, sends real packets across a veth pair and
//! shows the counters moving. Everything it creates is removed at the end,
//! also on failure.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run, step};

const NS_LB: &str = "lbdemo-lb";
const NS_CLIENT: &str = "lbdemo-client";

struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in [NS_LB, NS_CLIENT] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a)
}

pub fn run_demo(root: &Path) -> Result<()> {
    step("building the agent (release)");
    run(Command::new("cargo")
        .current_dir(root)
        .args(["build", "--release", "-p", "lb-user"]))?;
    let lb = root.join("target/release/lb");

    step("creating a throw-away lab: two namespaces joined by a veth pair");
    let _cleanup = Cleanup;
    for ns in [NS_LB, NS_CLIENT] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", ns])?;
    }
    ip(&[
        "link", "add", "lbd-lb", "netns", NS_LB, "type", "veth", "peer", "name", "lbd-cl", "netns",
        NS_CLIENT,
    ])?;
    in_ns(
        NS_LB,
        &["ip", "addr", "add", "198.18.0.1/24", "dev", "lbd-lb"],
    )?;
    in_ns(
        NS_CLIENT,
        &["ip", "addr", "add", "198.18.0.2/24", "dev", "lbd-cl"],
    )?;
    in_ns(NS_LB, &["ip", "link", "set", "lbd-lb", "up"])?;
    in_ns(NS_CLIENT, &["ip", "link", "set", "lbd-cl", "up"])?;

    step(
        "attaching the XDP datapath natively to lbd-lb and sending 200 UDP packets from the client",
    );
    let mut agent = Command::new("ip")
        .args(["netns", "exec", NS_LB])
        .arg(&lb)
        .args([
            "attach",
            "--iface",
            "lbd-lb",
            "--mode",
            "native",
            "--seconds",
            "4",
        ])
        .spawn()
        .context("starting lb attach")?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Bounded: 200 datagrams to the namespace's own peer address.
    let sent = Command::new("ip")
        .args(["netns", "exec", NS_CLIENT, "bash", "-c"])
        .arg("for i in $(seq 200); do echo demo > /dev/udp/198.18.0.1/9; done")
        .status()?;
    let status = agent.wait()?;
    if !sent.success() || !status.success() {
        bail!("demo failed: sender {sent}, agent {status}");
    }
    step(
        "demo done: the packets above were seen by XDP and passed to the kernel (no VIP configured yet)",
    );
    Ok(())
}
