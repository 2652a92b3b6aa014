//! `cargo xtask test`: the whole suite as CI runs it (formatting, clippy,
//! every test binary, README's figures), with one tally at the end.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{bench, cargo, package, root, run, setup::checked_setup, step};

pub(crate) fn test() -> Result<()> {
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
pub(crate) struct Tally {
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

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
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
}
