//! `lb`: the load balancer's agent and CLI.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::verdict;
use lb_user::{dataplane::Dataplane, loader};

#[derive(Parser)]
#[command(name = "lb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Native,
    Skb,
    Auto,
}

impl From<Mode> for loader::AttachMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Native => Self::Native,
            Mode::Skb => Self::Skb,
            Mode::Auto => Self::Auto,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground: load and attach the datapath, program
    /// it from the config file, health-check the backends and fail them over.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Validate a configuration file without touching the datapath.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
    /// Attach the datapath (no VIPs) to an interface for a while and print its
    /// verdict counters every second: a quick check that XDP works there.
    Attach {
        /// Interface to attach to.
        #[arg(long)]
        iface: String,
        /// XDP mode: native (driver), skb (generic), auto (native, else skb).
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
        /// Seconds to stay attached before detaching.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Attach {
            iface,
            mode,
            seconds,
        } => attach(&iface, mode.into(), seconds),
        Cmd::Run { config } => {
            // A bad file is refused before anything touches the datapath.
            let cfg = lb_user::config::load(&config)?;
            lb_user::agent::run(cfg)
        }
        Cmd::Check { config } => {
            let cfg = lb_user::config::load(&config)?;
            println!("{}: ok, {} VIP(s)", config.display(), cfg.vips.len());
            Ok(())
        }
    }
}

fn attach(iface: &str, mode: loader::AttachMode, seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let mut ebpf = loader::load(&loader::LoadOptions {
        flow_table_size: 4096,
    })?;
    let used = loader::attach(&mut ebpf, lb_common::PROG_BALANCER, iface, mode)?;
    println!(
        "attached {} to {iface} in {used:?} mode for {seconds}s",
        lb_common::PROG_BALANCER
    );
    for s in 1..=seconds {
        std::thread::sleep(Duration::from_secs(1));
        let v = Dataplane::new(&mut ebpf)
            .verdicts()
            .context("reading counters")?;
        let shown: Vec<String> = verdict::NAMES
            .iter()
            .zip(&v)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        println!(
            "t={s}s packets={} {}",
            v.iter().sum::<u64>(),
            shown.join(" ")
        );
    }
    println!("detaching");
    Ok(())
}
