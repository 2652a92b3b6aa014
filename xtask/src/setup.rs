//! `cargo xtask setup`: the idempotent prerequisite installer (the pinned
//! toolchains, bpf-linker built against apt's LLVM, the Debian packages the
//! tests, the demo and the benchmarks use), and the quiet form other tasks
//! run first.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt_install, have, output, run_logged, step};

/// The nightly that builds the eBPF crate must use this LLVM major, the one
/// bpf-linker is built against.
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and the demo use.
/// bird2: the routing daemon of the multi-node lab (BGP + BFD); redis-server:
/// the lab's shared session store.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("bird", "bird2"),
    ("redis-server", "redis-server"),
    // HTTP load in the lab's NAT scenario (and the benchmarks).
    ("wrk", "wrk"),
    // `man -l` renders the generated manual pages in the tests.
    ("man", "man-db"),
    // Headless browser for the status page's test.
    ("chromium", "chromium"),
];

pub(crate) fn setup() -> Result<()> {
    let t0 = std::time::Instant::now();
    step("setup: checking prerequisites");
    if !have("rustup") {
        bail!(
            "rustup is missing; install it from your distribution or rustup.rs, then rerun `cargo xtask setup`"
        );
    }
    // Host toolchain (pinned in rust-toolchain.toml) and its components.
    let toolchains = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("1.95.0")) {
        bail!("the pinned host toolchain 1.95.0 is missing; run `rustup toolchain install 1.95.0`");
    }
    let comps = output(
        "rustup",
        &["component", "list", "--toolchain", "1.95.0", "--installed"],
    )
    .unwrap_or_default();
    for c in ["rustfmt", "clippy"] {
        if !comps.lines().any(|l| l.starts_with(c)) {
            eprintln!("    installing {c} for 1.95.0");
            run_logged(
                Command::new("rustup").args(["component", "add", c, "--toolchain", "1.95.0"]),
                &format!("rustup-{c}"),
            )?;
        }
    }
    // The nightly that builds the eBPF crate: present, right LLVM, rust-src.
    let Some(vv) = output("rustup", &["run", "nightly", "rustc", "-vV"]) else {
        bail!(
            "the `nightly` toolchain is missing; install one that uses LLVM {LLVM_MAJOR} \
             (e.g. `rustup toolchain install nightly-2026-05-19 && rustup default stable`, then \
             `rustup toolchain link nightly ...`); newer nightlies use LLVM 23, which bpf-linker {BPF_LINKER_VERSION} cannot read"
        );
    };
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("?")
        .to_string();
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "the `nightly` toolchain uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; \
             install a nightly with LLVM {LLVM_MAJOR} (2026-05-19 has 22.1) and do not update it"
        );
    }
    let ncomps = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !ncomps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("    installing rust-src for nightly (needed to build core for the BPF target)");
        run_logged(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "rustup-rust-src",
        )
        .context("`rustup component add rust-src --toolchain nightly` failed")?;
    }
    // Debian packages: LLVM 22 for bpf-linker, and the tools the tests use.
    let mut missing: Vec<&str> = Vec::new();
    if !Path::new(&format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config")).exists() {
        missing.push("llvm-22-dev");
    }
    for (cmd, pkg) in APT_PACKAGES {
        if !have(cmd) {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        eprintln!("    installing Debian packages: {}", missing.join(" "));
        apt_install(&missing)?;
    }
    // bpf-linker, built against LLVM 22.
    let linker = output("bpf-linker", &["--version"]).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        eprintln!(
            "    installing bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)"
        );
        let fix = format!(
            "LLVM_PREFIX=/usr/lib/llvm-{LLVM_MAJOR} cargo install bpf-linker@{BPF_LINKER_VERSION} --locked \
             --no-default-features --features llvm-{LLVM_MAJOR}"
        );
        run_logged(
            Command::new("cargo")
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{LLVM_MAJOR}")])
                .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
            "bpf-linker",
        )
        .with_context(|| format!("installing bpf-linker failed; try: {fix}"))?;
    }
    eprintln!(
        "    ok: toolchain 1.95.0, nightly (LLVM {llvm}) + rust-src, bpf-linker {BPF_LINKER_VERSION}, llvm-{LLVM_MAJOR}, {} ({:.1} s)",
        APT_PACKAGES
            .iter()
            .map(|(_, p)| *p)
            .collect::<Vec<_>>()
            .join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Most lines setup may print when it installs nothing.
const SETUP_QUIET_LINES: usize = 20;

/// [`setup`] in a child process whose output is shown and checked, as
/// `cargo xtask test` runs it: no `warning:` line (the nested builds'
/// progress relayed as cargo warnings, say), and at most
/// [`SETUP_QUIET_LINES`] lines when nothing had to be installed.
pub(crate) fn checked_setup() -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    if std::env::var_os("LB_XTASK_VERBOSE").is_some() {
        return setup();
    }
    let exe = std::env::current_exe().context("the xtask binary's path")?;
    let mut child = Command::new(exe)
        .arg("setup")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `cargo xtask setup`")?;
    let mut lines = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line?;
            eprintln!("{line}");
            lines.push(line);
        }
    }
    if !child.wait()?.success() {
        bail!("`cargo xtask setup` failed (its output is above)");
    }
    setup_output_problem(&lines).map_or(Ok(()), |p| bail!("setup's output: {p}"))
}

/// What is wrong with setup's output `lines`, if anything (see
/// [`checked_setup`]).
pub(crate) fn setup_output_problem(lines: &[String]) -> Option<String> {
    if let Some(w) = lines.iter().find(|l| l.contains("warning:")) {
        return Some(format!("a warning reached the terminal: {w}"));
    }
    let installed = lines
        .iter()
        .any(|l| l.trim_start().starts_with("installing"));
    (!installed && lines.len() > SETUP_QUIET_LINES).then(|| {
        format!(
            "{} lines with nothing to install (at most {SETUP_QUIET_LINES})",
            lines.len()
        )
    })
}
