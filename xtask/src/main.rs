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
mod setup;
mod test;

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

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.verbose {
        // SAFETY: set before this process starts any thread.
        unsafe { std::env::set_var("LB_XTASK_VERBOSE", "1") };
    }
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test => test::test(),
        Cmd::Dist => {
            setup::setup()?;
            dist(&root()?)
        }
        Cmd::Package => {
            setup::setup()?;
            let root = root()?;
            dist(&root)?;
            step("Debian package (dpkg-deb)");
            let deb = package::build(&root, &root.join("target/dist/lb"), false)?;
            println!("wrote {} (install: dpkg -i; see README)", deb.display());
            Ok(())
        }
        Cmd::Demo { nodes } => {
            setup::setup()?;
            demo::run_demo(&root()?, nodes)
        }
        Cmd::Lab { action } => {
            setup::setup()?;
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
            setup::setup()?;
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

#[cfg(test)]
mod tests {
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
        assert_eq!(super::setup::setup_output_problem(&quiet), None);
        let warned = lines(&["==> setup", "warning: lb-user@0.1.0: Compiling proc-macro2"]);
        assert!(
            super::setup::setup_output_problem(&warned)
                .unwrap()
                .contains("warning reached")
        );
        let noisy: Vec<String> = (0..25).map(|i| format!("line {i}")).collect();
        assert!(
            super::setup::setup_output_problem(&noisy)
                .unwrap()
                .contains("25 lines")
        );
        // Installing something may take more lines.
        let mut installing = noisy.clone();
        installing.push("    installing bpf-linker 0.13.0".into());
        assert_eq!(super::setup::setup_output_problem(&installing), None);
    }
}
