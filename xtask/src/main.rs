//! Developer and CI tasks: `setup` (idempotent prerequisite installer),
//! `test` (the whole suite, as CI runs it), `demo` (the README's first
//! command), `bench`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod ab;
mod bench;
mod demo;
mod package;

#[derive(Parser)]
#[command(about = "Developer and CI tasks for the load balancer")]
struct Cli {
    /// Show every step's output live (apt, installs) instead of keeping it
    /// in target/xtask-logs/.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (only what is missing).
    Setup,
    /// Build the release `lb` and what installs with it into target/dist:
    /// the binary, manual pages (man1/) and shell completions
    /// (completions/), all generated from the CLI's own definitions.
    Dist,
    /// A Debian package (target/deb/lb_<version>_<arch>.deb) of the release
    /// build: binary, unit, /etc/lb/lb.toml, manual pages, completions,
    /// the Grafana dashboard.
    Package,
    /// fmt check, clippy, unit tests, privileged tests: what CI runs.
    Test,
    /// The lab, the agent, steady traffic, a backend killed and brought back, a report.
    /// `--nodes 2`: two LB nodes behind a BGP router, one lost and back, one drained.
    Demo {
        #[arg(long, default_value_t = 1)]
        nodes: u8,
    },
    /// The namespace lab on its own: up, down or status.
    Lab {
        #[arg(value_parser = ["up", "down", "status"])]
        action: String,
    },
    /// Benchmarks: `all` (default) writes BENCHMARKS.md; `micro` only the datapath.
    Bench {
        #[arg(default_value = "all")]
        suite: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// `micro` only: A/B against this git revision (A) with the working
        /// tree as B, interleaved runs, ratio B/A per case.
        #[arg(long)]
        against: Option<String>,
        /// Pairs of interleaved runs per case for `--against`.
        #[arg(long, default_value_t = 25)]
        pairs: usize,
        /// `--against` only: append this run to the A/B history
        /// (`xtask/report/ab-history.jsonl`, rendered into BENCHMARKS.md by
        /// `cargo xtask bench report`) as the change it measured.
        #[arg(long, value_name = "CHANGE", requires = "against")]
        record: Option<String>,
        /// With `--record`: whether the change was kept, and why (e.g.
        /// "yes", "no", "yes (structure)").
        #[arg(long, default_value = "yes", requires = "record")]
        kept: String,
    },
}

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

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.verbose {
        // SAFETY: set before this process starts any thread.
        unsafe { std::env::set_var("LB_XTASK_VERBOSE", "1") };
    }
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test => test(),
        Cmd::Dist => {
            setup()?;
            dist(&root()?)
        }
        Cmd::Package => {
            setup()?;
            let root = root()?;
            dist(&root)?;
            step("Debian package (dpkg-deb)");
            let deb = package::build(&root, &root.join("target/dist/lb"), false)?;
            println!("wrote {} (install: dpkg -i; see README)", deb.display());
            Ok(())
        }
        Cmd::Demo { nodes } => {
            setup()?;
            demo::run_demo(&root()?, nodes)
        }
        Cmd::Lab { action } => {
            setup()?;
            demo::lab(&root()?, &action)
        }
        Cmd::Bench {
            suite,
            json,
            against,
            pairs,
            record,
            kept,
        } => {
            setup()?;
            match against {
                Some(rev) if suite == "micro" => ab::against(
                    &root()?,
                    &rev,
                    pairs.max(1),
                    json,
                    record.map(|change| ab::Record { change, kept }),
                ),
                Some(_) => anyhow::bail!("--against works with `cargo xtask bench micro` only"),
                None => bench::bench(&root()?, &suite, json),
            }
        }
    }
}

fn root() -> Result<PathBuf> {
    let dir = env!("CARGO_MANIFEST_DIR");
    Ok(Path::new(dir)
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

/// Prints a step's line; the step before it (in this process) gets its
/// time first.
fn step(msg: &str) {
    use std::sync::Mutex;
    static LAST: Mutex<Option<(std::time::Instant, String)>> = Mutex::new(None);
    let now = std::time::Instant::now();
    if let Ok(mut last) = LAST.lock()
        && let Some((t, name)) = last.replace((now, msg.to_string()))
    {
        eprintln!("    ({name}: {:.1} s)", now.duration_since(t).as_secs_f64());
    }
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// Runs a command with inherited output; fails if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command with its output going to `target/xtask-logs/<name>.log`
/// instead of the terminal (`cargo xtask -v ...`, or `LB_XTASK_VERBOSE=1`,
/// shows it live instead); on failure the log's last
/// lines and its path are shown with the error.
fn run_logged(cmd: &mut Command, name: &str) -> Result<()> {
    if std::env::var_os("LB_XTASK_VERBOSE").is_some() {
        return run(cmd);
    }
    let dir = root()?.join("target/xtask-logs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.log"));
    let log =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let shown = format!("{cmd:?}");
    let t0 = std::time::Instant::now();
    // A spinner with the time so far while it runs (drawn only on a
    // terminal: piped or logged, nothing of it is written).
    let spin = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("    {spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    spin.set_message(format!("(output: {})", path.display()));
    spin.enable_steady_tick(std::time::Duration::from_millis(120));
    let status = cmd
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("could not start {shown}"));
    spin.finish_and_clear();
    let status = status?;
    if !status.success() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("    last lines of {}:", path.display());
        for l in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("    | {l}");
        }
        bail!(
            "{shown} failed with {status} (whole output: {})",
            path.display()
        );
    }
    eprintln!(
        "    done in {:.1} s (output: {})",
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

/// Runs a command and returns its stdout, or None if it cannot run or fails.
fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `cmd` is on PATH (or in /usr/sbin, which a non-login PATH may lack).
fn have(cmd: &str) -> bool {
    output("sh", &["-c", &format!("command -v {cmd}")]).is_some()
        || Path::new(&format!("/usr/sbin/{cmd}")).exists()
}

/// `apt-get install` of `packages` (after `apt-get update`), failing with
/// the command to run by hand.
fn apt_install(packages: &[&str]) -> Result<()> {
    let fix = format!(
        "apt-get update && apt-get install -y {}",
        packages.join(" ")
    );
    eprintln!("    apt-get install {} (quiet)", packages.join(" "));
    run_logged(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-update",
    )
    .with_context(|| format!("apt-get update failed; run as root: {fix}"))?;
    run_logged(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-install",
    )
    .with_context(|| {
        format!(
            "installing {} failed; run as root: {fix}",
            packages.join(" ")
        )
    })
}

fn setup() -> Result<()> {
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
fn checked_setup() -> Result<()> {
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
fn setup_output_problem(lines: &[String]) -> Option<String> {
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

/// `cargo xtask dist`: target/dist/lb, target/dist/man1/*.1 and
/// target/dist/completions/{lb.bash,_lb,lb.fish}.
fn dist(root: &Path) -> Result<()> {
    step("cargo build --release --bin lb");
    run(cargo(root).args(["build", "--release", "-p", "lb-user", "--bin", "lb"]))?;
    let out = root.join("target/dist");
    let comp = out.join("completions");
    std::fs::create_dir_all(&comp)?;
    let lb = out.join("lb");
    std::fs::copy(root.join("target/release/lb"), &lb).context("copying the binary")?;
    step("manual pages and shell completions (generated by lb itself)");
    run(Command::new(&lb)
        .arg("man")
        .arg("--dir")
        .arg(out.join("man1")))?;
    for (shell, file) in [("bash", "lb.bash"), ("zsh", "_lb"), ("fish", "lb.fish")] {
        let o = Command::new(&lb).args(["completions", shell]).output()?;
        if !o.status.success() {
            bail!(
                "lb completions {shell} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::fs::write(comp.join(file), o.stdout)?;
    }
    println!(
        "wrote {}: lb, man1/, completions/ (see README, \"Install on a host\")",
        out.display()
    );
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root);
    c
}

fn test() -> Result<()> {
    let root = root()?;
    let t0 = std::time::Instant::now();
    checked_setup()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "the privileged tests load BPF programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    step("README's figures are bench.json's");
    bench::check_readme(&root)?;
    step("cargo fmt --check");
    run(cargo(&root).args(["fmt", "--all", "--check"]))
        .context("formatting differs; run `cargo fmt --all`")?;
    step("cargo clippy (host crates) -- -D warnings");
    run(cargo(&root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    let mut total = Tally::default();
    step("unit tests");
    total.add(run_tests(cargo(&root).args([
        "test",
        "-p",
        "lb-common",
        "-p",
        "lb-user",
        "-p",
        "xtask",
    ]))?);
    step("privileged tests (BPF_PROG_TEST_RUN, network namespaces)");
    total.add(run_tests(cargo(&root).args(["test", "-p", "lb-tests"]))?);
    step("package: built from the tested binary, installed, checked, purged");
    package::install_check(&root, &root.join("target/debug/lb"))?;
    step(&format!(
        "all tests passed in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    Ok(())
}

/// Sums of libtest's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }

    /// Reads `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
    fn parse(line: &str) -> Option<Tally> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let num = |word: &str| -> u64 {
            rest.split(';')
                .find_map(|part| {
                    let part = part
                        .trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ");
                    part.strip_suffix(word).and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        Some(Tally {
            passed: num("passed"),
            failed: num("failed"),
            ignored: num("ignored"),
        })
    }
}

/// Runs `cargo test ...`, streaming its output, and tallies its results.
fn run_tests(cmd: &mut Command) -> Result<Tally> {
    use std::io::{BufRead as _, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {shown}"))?;
    let mut tally = Tally::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(t) = Tally::parse(&line) {
                tally.add(t);
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!(
            "summary: {} passed, {} failed, {} skipped",
            tally.passed,
            tally.failed.max(1),
            tally.ignored
        );
        bail!("{shown} failed with {status}");
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn parses_libtest_summary() {
        let t = Tally::parse(
            "test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out",
        )
        .unwrap();
        assert_eq!((t.passed, t.failed, t.ignored), (3, 1, 2));
        let t = Tally::parse("test result: FAILED. 0 passed; 4 failed; 0 ignored").unwrap();
        assert_eq!((t.passed, t.failed), (0, 4));
        assert!(Tally::parse("running 3 tests").is_none());
    }

    #[test]
    fn a_quiet_step_keeps_its_output_in_a_log_and_shows_it_on_failure() {
        let ok = super::run_logged(
            std::process::Command::new("sh").args(["-c", "echo quiet-ok"]),
            "unit-ok",
        );
        assert!(ok.is_ok());
        let log = super::root().unwrap().join("target/xtask-logs/unit-ok.log");
        assert_eq!(std::fs::read_to_string(log).unwrap().trim(), "quiet-ok");
        let err = super::run_logged(
            std::process::Command::new("sh").args(["-c", "echo broken-step; exit 3"]),
            "unit-fail",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unit-fail.log") && err.contains("exit status: 3"),
            "{err}"
        );
    }

    #[test]
    fn setup_output_is_refused_with_a_warning_or_too_many_lines() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let quiet = lines(&["==> setup: checking prerequisites", "    ok: ... (0.4 s)"]);
        assert_eq!(super::setup_output_problem(&quiet), None);
        let warned = lines(&["==> setup", "warning: lb-user@0.1.0: Compiling proc-macro2"]);
        assert!(
            super::setup_output_problem(&warned)
                .unwrap()
                .contains("warning reached")
        );
        let noisy: Vec<String> = (0..25).map(|i| format!("line {i}")).collect();
        assert!(
            super::setup_output_problem(&noisy)
                .unwrap()
                .contains("25 lines")
        );
        // Installing something may take more lines.
        let mut installing = noisy.clone();
        installing.push("    installing bpf-linker 0.13.0".into());
        assert_eq!(super::setup_output_problem(&installing), None);
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
