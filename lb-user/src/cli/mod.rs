//! The `lb` command line: `lb run` is the agent; the other commands talk to
//! it over its control socket (see `api`). The binary's `main` only calls
//! [`main`] here, so tests can build the very same CLI.

mod trace;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use crate::{
    api::{
        self, BackendInfo, Edit, Forwarding, HashInput, Request, Scheduler, StatsInfo, StatusInfo,
        VipAdd, VipInfo, VipRef,
    },
    datapath::Dataplane,
    datapath::loader,
};
use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use lb_common::verdict;

#[derive(Parser)]
#[command(
    name = "lb",
    version = api::VERSION,
    about = "XDP layer-4 load balancer: agent and CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every command that talks to the agent takes.
#[derive(Args, Clone)]
struct Conn {
    /// The agent's control socket (`agent.control_socket`).
    #[arg(long, global = true, default_value = "/run/lb/lb.sock")]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground (logs to stderr): load and attach the
    /// datapath, program it from the config file, health-check the backends
    /// and fail them over. SIGHUP reloads the file.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Log lines as text or JSON (one object per line); levels follow
        /// `RUST_LOG` (default `info`).
        #[arg(long, value_enum, default_value_t = crate::agent::logging::LogFormat::Text)]
        log_format: crate::agent::logging::LogFormat,
    },
    /// Show what the balancer does with each packet matching a filter: the
    /// VIP (or why none), the connection table, the ring and slot, the
    /// backend, the rewrite and the verdict. Reads the instance's datapath
    /// directly (root); names backends through the agent when it answers.
    /// `lb trace --vip 198.18.0.100:80 --client 198.18.1.0/24 --count 10`.
    Trace {
        /// Instance name (`agent.instance`).
        #[arg(long, default_value = "default")]
        instance: String,
        /// Destination: `ADDR`, `ADDR:PORT` or `ADDR:PORT/PROTO` (a VIP, or
        /// any address to see why it is not one).
        #[arg(long)]
        vip: Option<String>,
        /// Client address or prefix (`198.18.1.7`, `198.18.1.0/24`).
        #[arg(long)]
        client: Option<String>,
        /// Client port.
        #[arg(long)]
        client_port: Option<u16>,
        /// Stop after this many packets.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Validate a configuration file without touching anything.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Stop the agent of an instance and detach and remove its datapath.
    Down {
        /// Instance name (`agent.instance`).
        #[arg(long, default_value = "default")]
        instance: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Ask the running agent to re-read its config file and apply the difference.
    Reload {
        #[command(flatten)]
        conn: Conn,
    },
    /// The agent's instance, interface, uptime and backend counts.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage VIPs.
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Manage backends of a VIP.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// This node's VIP announcement: `drain` withdraws every VIP and waits
    /// until new flows stop arriving; `resume` announces again.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Which backend a client's connection to a VIP goes to now, and why
    /// (connection table, or the Maglev ring slot of its hash), from the
    /// live maps: `lb explain 198.18.0.100:80 198.19.4.7:51234`.
    Explain {
        vip: VipRef,
        /// The client's ADDRESS:PORT (IPv6 in brackets).
        client: std::net::SocketAddr,
        #[command(flatten)]
        conn: Conn,
    },
    /// Health of every backend: state, last result, latency, transitions.
    Health {
        #[command(flatten)]
        conn: Conn,
    },
    /// Traffic per VIP and per backend, and the verdict counters.
    Stats {
        /// Refresh in place every second, with rates.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Line-rate traffic generator: sends from XDP with BPF_PROG_TEST_RUN
    /// live frames. Progress each second on stderr, a summary on stdout.
    Loadgen(LoadgenArgs),
    /// The namespace lab: a small data center to try the LB in (see README).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Print a shell completion script for `lb` (from its own argument
    /// definitions): `lb completions bash > /etc/bash_completion.d/lb`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page of `lb` (roff, from its own argument
    /// definitions), or with `--dir` write it and one page per subcommand
    /// (`lb-run.1`, `lb-vip-add.1`, ...): `lb man --dir /usr/local/share/man/man1`.
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Attach the datapath (no VIPs) to an interface for a while and print
    /// its verdict counters every second: a check that XDP works there.
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "auto")]
        mode: crate::vocab::XdpMode,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

#[derive(Args)]
struct LoadgenArgs {
    /// Interface to send on (frames leave it as if received and bounced by XDP).
    #[arg(long)]
    iface: String,
    /// Destination ADDRESS:PORT (IPv4, or IPv6 in brackets), e.g. the VIP.
    #[arg(long)]
    dst: std::net::SocketAddr,
    /// Destination MAC (default: the kernel's neighbour entry for --dst).
    #[arg(long)]
    dst_mac: Option<String>,
    /// Base source address. IPv4: flow f sets its last two bytes, and the
    /// source port past 65,536 flows. IPv6: flow f sets its last four bytes
    /// (every flow its own address). Default 198.19.0.0 or 2001:2:0:1::.
    #[arg(long)]
    src: Option<IpAddr>,
    /// udp, or syn (TCP SYNs).
    #[arg(long, default_value = "udp", value_parser = ["udp", "syn"])]
    proto: String,
    /// Frame size in bytes without the FCS the NIC adds. Default: the
    /// smallest frame the headers allow, at least 60 (the minimum 64-byte
    /// Ethernet frame on the wire; 62 for IPv6 UDP, 74 for IPv6 SYNs).
    #[arg(long)]
    size: Option<usize>,
    /// Number of distinct flows.
    #[arg(long, default_value_t = 1)]
    flows: u32,
    /// Packets per second over all threads; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds to send (one of --duration and --count is needed).
    #[arg(long)]
    duration: Option<f64>,
    /// Packets to send.
    #[arg(long)]
    count: Option<u64>,
    /// Sending threads (each runs on its own CPU when it can).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Network namespace to send from (a name under /run/netns).
    #[arg(long)]
    netns: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the lab (removing what an earlier run left first).
    Up {
        #[arg(long, default_value = "lab")]
        prefix: String,
        /// LB nodes: 1, or 2..=3 behind a router running BIRD (BGP + BFD,
        /// ECMP hashed on layer 4); each node's BIRD exports what its agent
        /// announces.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
        /// Start a Redis (198.18.0.40:6379 in `<prefix>-rd`) that the
        /// backends keep `/session?store=redis` sessions in.
        #[arg(long)]
        redis: bool,
    },
    /// Remove every namespace, process and pin of the lab.
    Down {
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
    /// Show which lab namespaces exist and which backends serve.
    Status {
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
    /// Control a lab backend: stop, start, fail-health, ok, slow (with --ms).
    Backend {
        /// Backend number, 1..=3.
        n: usize,
        #[arg(value_parser = ["stop", "start", "fail-health", "ok", "slow"])]
        action: String,
        #[arg(long, default_value_t = 200)]
        ms: u64,
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
    /// The lab's backend HTTP server (the lab starts it in each backend).
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "[::]:80")]
        listen: String,
        /// Redis ADDR:PORT for `/session?store=redis`.
        #[arg(long)]
        redis: Option<String>,
    },
    /// The demo: lab, agent, traffic, a backend killed and restored, report.
    /// With `--nodes 2`: LB nodes behind a BGP router, one dies and returns,
    /// one is drained, with long-lived connections and a Redis session.
    Demo {
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Withdraw every VIP, then wait until no new flow has arrived for
    /// `--quiet` seconds (or `--timeout` passes) and report.
    Drain {
        /// Give up waiting after this many seconds (the routes stay withdrawn).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Seconds without a new flow that count as drained.
        #[arg(long, default_value_t = 1.0)]
        quiet: f64,
    },
    /// Announce again every VIP this node can serve.
    Resume,
}

#[derive(Subcommand)]
enum VipCmd {
    /// List VIPs.
    List,
    /// Add a VIP (no backends yet): `lb vip add 198.18.0.100:80/tcp`.
    Add {
        /// ADDRESS:PORT[/tcp|udp]
        vip: VipRef,
        #[arg(long, value_enum, default_value_t = Forwarding::Dsr)]
        forwarding: Forwarding,
        #[arg(long, value_enum, default_value_t = HashInput::FiveTuple)]
        hash: HashInput,
        #[arg(long, default_value_t = lb_common::DEFAULT_RING_SIZE)]
        ring_size: u32,
        /// Disable the connection table (stateless Maglev).
        #[arg(long)]
        no_flow_table: bool,
        #[arg(long, value_enum, default_value_t = Scheduler::Maglev)]
        scheduler: Scheduler,
        /// Seconds of idleness before a flow is rescheduled (0: LRU only).
        #[arg(long)]
        idle_timeout: Option<u32>,
        #[arg(long, value_parser = ["tcp", "http", "none"])]
        health_kind: Option<String>,
        #[arg(long)]
        health_interval_ms: Option<u64>,
        #[arg(long)]
        health_timeout_ms: Option<u64>,
        #[arg(long)]
        rise: Option<u32>,
        #[arg(long)]
        fall: Option<u32>,
        /// Port probed on the backend (default: the VIP's).
        #[arg(long)]
        health_port: Option<u16>,
        /// http checks: the path to GET.
        #[arg(long)]
        health_path: Option<String>,
        /// http checks: a status or range such as 200-399.
        #[arg(long)]
        expect_status: Option<String>,
    },
    /// Change VIP settings live, written back to the file:
    /// `lb vip set 198.18.0.100:80 scheduler=least-connections health.interval_ms=500`.
    /// Keys: forwarding, hash, scheduler, ring_size, flow_table, idle_timeout,
    /// health.kind, health.interval_ms, health.timeout_ms, health.rise,
    /// health.fall, health.port, health.path, health.expect_status.
    Set {
        vip: VipRef,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
    /// Remove a VIP and its backends.
    Remove { vip: VipRef },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// List backends (of one VIP, or all).
    List { vip: Option<VipRef> },
    /// Add a backend: `lb backend add 198.18.0.100:80 198.18.2.4 --weight 2`
    /// (NAT VIPs: `--port 8080` if it listens on another port than the VIP).
    Add {
        vip: VipRef,
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// The backend's own port (NAT VIPs only).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Remove a backend (its flows move to the others).
    Remove { vip: VipRef, address: IpAddr },
    /// No new flows, existing flows stay until they end.
    Drain { vip: VipRef, address: IpAddr },
    /// Undo `drain`.
    Undrain { vip: VipRef, address: IpAddr },
    /// Change a backend's weight (0 drains it).
    Weight {
        vip: VipRef,
        address: IpAddr,
        weight: u32,
    },
}

/// Runs the CLI with the process's arguments and exits on error.
pub fn main() {
    if let Err(e) = real_main() {
        eprintln!("lb: error: {e:#}");
        std::process::exit(1);
    }
}

/// Where a host install keeps the configuration (see README, "Install on a
/// host").
pub const DEFAULT_CONFIG: &str = "/etc/lb/lb.toml";

fn real_main() -> Result<()> {
    use crate::agent::logging::{self, LogFormat};
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Run { log_format, .. } => logging::init(*log_format, "info"),
        _ => logging::init(LogFormat::Text, "warn"),
    }
    match cli.cmd {
        Cmd::Run { config, .. } => crate::agent::run(&config),
        Cmd::Check { config } => {
            let cfg = crate::config::load(&config)?;
            println!("{}: ok, {} VIP(s)", config.display(), cfg.vips.len());
            Ok(())
        }
        Cmd::Down { instance, conn } => crate::agent::down(&instance, &conn.socket),
        Cmd::Trace {
            instance,
            vip,
            client,
            client_port,
            count,
            duration,
            conn,
        } => trace::trace(&instance, vip, client, client_port, count, duration, &conn),
        Cmd::Reload { conn } => {
            api::call(&conn.socket, &Request::Reload)?;
            println!("reloaded");
            Ok(())
        }
        Cmd::Status { conn } => {
            let v = api::call(&conn.socket, &Request::Status)?;
            if conn.json {
                return print_json(&v);
            }
            let s: StatusInfo = serde_json::from_value(v)?;
            println!("agent      lb {}", s.version);
            println!("instance   {}", s.instance);
            println!("interface  {} ({})", s.interface, s.attach);
            println!("config     {}", s.config);
            println!("uptime     {:.0} s", s.uptime_s);
            println!("VIPs       {}", s.vips);
            println!("backends   {} up of {}", s.backends_up, s.backends);
            if let Some(c) = &s.capacity {
                println!(
                    "capacity   VIPs+regions {}/{}, backends {}/{}, ring slots {}/{}, flow table {}; \
                     maps hold {:.1} MiB",
                    c.vips_used,
                    c.max_vips,
                    c.backends_used,
                    c.max_backends.saturating_sub(1),
                    c.ring_slots_used,
                    c.ring_slots,
                    c.flow_table_size,
                    c.maps_memory_bytes as f64 / (1 << 20) as f64
                );
            }
            match &s.announce {
                None => println!("announce   off (no [announce] section)"),
                Some(a) => println!(
                    "announce   kernel table {}{}",
                    a.table,
                    if a.drained {
                        ", node DRAINED (`lb node resume`)"
                    } else {
                        ""
                    }
                ),
            }
            if !s.vip_status.is_empty() {
                println!();
                println!("{:<28} {:<18} ANNOUNCED", "VIP", "RING DIGEST");
                for v in &s.vip_status {
                    let ann = match (v.announced, &v.why_not) {
                        (None, _) => "-".to_string(),
                        (Some(true), _) => "yes".to_string(),
                        (Some(false), Some(w)) => format!("no: {w}"),
                        (Some(false), None) => "no".to_string(),
                    };
                    println!("{:<28} {:<18} {ann}", v.vip.to_string(), v.digest);
                }
            }
            Ok(())
        }
        Cmd::Node { cmd, conn } => node(cmd, &conn),
        Cmd::Explain { vip, client, conn } => {
            let v = api::call(&conn.socket, &Request::Explain { vip, client })?;
            if conn.json {
                return print_json(&v);
            }
            let e: api::ExplainInfo = serde_json::from_value(v)?;
            let show = |a: Option<std::net::IpAddr>| {
                a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
            };
            println!("{} → {}", e.client, e.vip);
            println!("  scheduler        {}", e.scheduler);
            println!("  flow hash        {:#010x}", e.hash);
            match e.slot {
                Some(s) => println!("  ring slot        {s} → {}", show(e.ring_backend)),
                None => println!("  ring slot        -"),
            }
            println!("  connection table {}", show(e.table_backend));
            println!("  goes to          {} (via {})", show(e.backend), e.via);
            Ok(())
        }
        Cmd::Vip { cmd, conn } => vip(cmd, &conn),
        Cmd::Backend { cmd, conn } => backend(cmd, &conn),
        Cmd::Health { conn } => {
            let v = api::call(&conn.socket, &Request::Health)?;
            if conn.json {
                return print_json(&v);
            }
            let list: Vec<BackendInfo> = serde_json::from_value(v)?;
            println!(
                "{:<28} {:<40} {:<9} {:<14} {:>9} {:>11}  PROBE",
                "VIP", "BACKEND", "STATE", "LAST", "LATENCY", "TRANSITIONS"
            );
            for b in list {
                let lat = b
                    .last_latency_ms
                    .map(|l| format!("{l:.1} ms"))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<28} {:<40} {:<9} {:<14} {:>9} {:>11}  {}",
                    b.vip.to_string(),
                    b.address.to_string(),
                    b.state,
                    b.last_result,
                    lat,
                    b.transitions,
                    b.probe.as_deref().unwrap_or("none")
                );
            }
            Ok(())
        }
        Cmd::Stats { watch, conn } => stats(watch, &conn),
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory as _;
            match dir {
                Some(d) => {
                    std::fs::create_dir_all(&d)
                        .with_context(|| format!("creating {}", d.display()))?;
                    clap_mangen::generate_to(Cli::command(), &d)
                        .with_context(|| format!("writing manual pages to {}", d.display()))
                }
                None => clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .context("writing the manual page"),
            }
        }
        Cmd::Attach {
            iface,
            mode,
            seconds,
        } => attach(&iface, mode, seconds),
        Cmd::Lab { cmd } => lab(cmd),
        Cmd::Loadgen(a) => loadgen(a),
    }
}

/// `lb node drain|resume`.
fn node(cmd: NodeCmd, conn: &Conn) -> Result<()> {
    match cmd {
        NodeCmd::Resume => {
            api::call(&conn.socket, &Request::NodeResume)?;
            println!("node resumed: VIPs with a live backend are announced again");
            Ok(())
        }
        NodeCmd::Drain { timeout, quiet } => {
            let new_flows = || -> Result<u64> {
                let st: StatsInfo =
                    serde_json::from_value(api::call(&conn.socket, &Request::Stats)?)?;
                Ok(st.vips.iter().map(|v| v.traffic.new_flows).sum())
            };
            let before = new_flows()?;
            api::call(&conn.socket, &Request::NodeDrain)?;
            let t0 = std::time::Instant::now();
            let (mut last, mut last_change) = (new_flows()?, t0);
            let drained = loop {
                if last_change.elapsed().as_secs_f64() >= quiet {
                    break true;
                }
                if t0.elapsed().as_secs_f64() >= timeout {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
                let n = new_flows()?;
                if n != last {
                    (last, last_change) = (n, std::time::Instant::now());
                }
            };
            let after = last.saturating_sub(before);
            let r = serde_json::json!({
                "drained": drained,
                "seconds": t0.elapsed().as_secs_f64(),
                "new_flows_since_withdraw": after,
                "last_new_flow_after_s": last_change.duration_since(t0).as_secs_f64(),
            });
            if conn.json {
                return print_json(&r);
            }
            if drained {
                println!(
                    "node drained: every VIP withdrawn; {after} new flow(s) arrived after the withdrawal, the last {:.1} s \
                     after it; none for {quiet:.1} s. Established flows keep being forwarded.",
                    last_change.duration_since(t0).as_secs_f64()
                );
                Ok(())
            } else {
                bail!(
                    "every VIP is withdrawn, but new flows still arrived {timeout:.0} s later ({after} since the \
                     withdrawal): is the router still sending here? check its routes and the BGP session"
                )
            }
        }
    }
}

fn loadgen(a: LoadgenArgs) -> Result<()> {
    use crate::{
        host::iproute::parse_mac,
        tools::loadgen::{Options, run},
    };
    if let Some(ns) = &a.netns {
        // Move the whole process (it is still single-threaded here).
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        // SAFETY: setns on an fd we own, before any thread exists.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "entering network namespace {ns}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let dst_mac = match &a.dst_mac {
        Some(m) => Some(
            parse_mac(m)
                .with_context(|| format!("--dst-mac `{m}` is not a MAC like 02:00:00:00:00:01"))?,
        ),
        None => None,
    };
    let src = a.src.unwrap_or_else(|| {
        if a.dst.is_ipv4() {
            "198.19.0.0".parse().expect("literal")
        } else {
            "2001:2:0:1::".parse().expect("literal")
        }
    });
    let o = Options {
        iface: a.iface,
        dst: a.dst,
        dst_mac,
        src,
        tcp_syn: a.proto == "syn",
        size: a.size.unwrap_or(0),
        flows: a.flows,
        rate: a.rate,
        duration: a.duration.map(Duration::from_secs_f64),
        count: a.count,
        threads: a.threads,
        progress: !a.json,
    };
    let s = run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "sent {} packets of {} bytes in {:.2} s: {:.3} Mpps, {:.2} Gbps, {} flows, {} thread(s)",
            s.packets,
            s.frame_size,
            s.seconds,
            s.pps / 1e6,
            s.gbps,
            s.flows,
            s.threads
        );
    }
    Ok(())
}

fn lab(cmd: LabCmd) -> Result<()> {
    use crate::tools::lab::Lab;
    match cmd {
        LabCmd::Up {
            prefix,
            nodes,
            redis,
        } => {
            let mut l = Lab::new(&prefix).with_nodes(nodes as usize);
            if redis {
                l = l.with_redis();
            }
            l.up()?;
            print!("{}", l.status()?);
            Ok(())
        }
        LabCmd::Down { prefix } => {
            Lab::new(&prefix).down()?;
            println!("lab `{prefix}` removed");
            Ok(())
        }
        LabCmd::Status { prefix } => {
            print!("{}", Lab::new(&prefix).status()?);
            Ok(())
        }
        LabCmd::Backend {
            n,
            action,
            ms,
            prefix,
        } => {
            let l = Lab::new(&prefix);
            if !(1..=crate::tools::lab::BACKENDS).contains(&n) {
                bail!(
                    "backend {n} does not exist; the lab has b1..b{}",
                    crate::tools::lab::BACKENDS
                );
            }
            match action.as_str() {
                "stop" => l.stop_backend(n)?,
                "start" => l.start_backend(n)?,
                "fail-health" => println!("{}", l.backend_ctl(n, "/admin/fail-health")?),
                "ok" => println!("{}", l.backend_ctl(n, "/admin/ok")?),
                _ => println!("{}", l.backend_ctl(n, &format!("/admin/slow?ms={ms}"))?),
            }
            Ok(())
        }
        LabCmd::Serve {
            name,
            listen,
            redis,
        } => crate::tools::lab::serve(&name, &listen, redis.as_deref()),
        LabCmd::Demo { nodes: 1 } => crate::tools::demo::run(),
        LabCmd::Demo { nodes } => crate::tools::demo::nodes::run(nodes as usize),
    }
}

/// `KEY=VALUE` of `lb vip set`.
fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!(
            "`{s}` is not KEY=VALUE (e.g. scheduler=round-robin)"
        )),
    }
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn done(conn: &Conn, what: String) -> Result<()> {
    if conn.json {
        println!("{{\"ok\":true}}");
    } else {
        println!("{what} (saved to the config file)");
    }
    Ok(())
}

fn vip(cmd: VipCmd, conn: &Conn) -> Result<()> {
    match cmd {
        VipCmd::List => {
            let v = api::call(&conn.socket, &Request::VipList)?;
            if conn.json {
                return print_json(&v);
            }
            let list: Vec<VipInfo> = serde_json::from_value(v)?;
            println!(
                "{:<28} {:<5} {:<10} {:<8} {:>6} {:<6} {:<9} HEALTH",
                "VIP", "FWD", "HASH", "SCHED", "RING", "TABLE", "BACKENDS"
            );
            for v in list {
                println!(
                    "{:<28} {:<5} {:<10} {:<8} {:>6} {:<6} {:<9} {}",
                    v.vip.to_string(),
                    v.forwarding,
                    v.hash,
                    v.scheduler,
                    v.ring_size,
                    if v.flow_table { "on" } else { "off" },
                    format!("{}/{} up", v.backends_up, v.backends),
                    v.health
                );
            }
            Ok(())
        }
        VipCmd::Add {
            vip,
            forwarding,
            hash,
            ring_size,
            no_flow_table,
            scheduler,
            idle_timeout,
            health_kind,
            health_interval_ms,
            health_timeout_ms,
            rise,
            fall,
            health_port,
            health_path,
            expect_status,
        } => {
            let what = format!("added VIP {vip}");
            let mut settings = vec![("scheduler".to_string(), scheduler.to_string())];
            let opt = |k: &str, v: Option<String>| v.map(|v| (k.to_string(), v));
            settings.extend(
                [
                    opt("idle_timeout", idle_timeout.map(|v| v.to_string())),
                    opt("health.kind", health_kind),
                    opt(
                        "health.interval_ms",
                        health_interval_ms.map(|v| v.to_string()),
                    ),
                    opt(
                        "health.timeout_ms",
                        health_timeout_ms.map(|v| v.to_string()),
                    ),
                    opt("health.rise", rise.map(|v| v.to_string())),
                    opt("health.fall", fall.map(|v| v.to_string())),
                    opt("health.port", health_port.map(|v| v.to_string())),
                    opt("health.path", health_path),
                    opt("health.expect_status", expect_status),
                ]
                .into_iter()
                .flatten(),
            );
            api::call(
                &conn.socket,
                &Request::Edit(Edit::VipAdd(VipAdd {
                    vip,
                    forwarding,
                    hash,
                    ring_size,
                    flow_table: !no_flow_table,
                    settings,
                })),
            )?;
            done(conn, what)
        }
        VipCmd::Set { vip, settings } => {
            let what = format!(
                "VIP {vip}: {}",
                settings
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            api::call(&conn.socket, &Request::Edit(Edit::VipSet { vip, settings }))?;
            done(conn, what)
        }
        VipCmd::Remove { vip } => {
            let what = format!("removed VIP {vip}");
            api::call(&conn.socket, &Request::Edit(Edit::VipRemove { vip }))?;
            done(conn, what)
        }
    }
}

fn backend(cmd: BackendCmd, conn: &Conn) -> Result<()> {
    let (req, what) = match cmd {
        BackendCmd::List { vip } => {
            let v = api::call(&conn.socket, &Request::BackendList { vip })?;
            if conn.json {
                return print_json(&v);
            }
            let list: Vec<BackendInfo> = serde_json::from_value(v)?;
            println!(
                "{:<28} {:<40} {:>5} {:>6} {:<9} {:<10} ACTIVE",
                "VIP", "BACKEND", "ID", "WEIGHT", "STATE", "NEXT HOP"
            );
            for b in list {
                let active = b
                    .active_flows
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into());
                // A NAT backend on a port of its own shows it.
                let addr = match b.port {
                    Some(p) => std::net::SocketAddr::new(b.address, p).to_string(),
                    None => b.address.to_string(),
                };
                println!(
                    "{:<28} {:<40} {:>5} {:>6} {:<9} {:<10} {active}",
                    b.vip.to_string(),
                    addr,
                    b.id,
                    b.weight,
                    b.state,
                    if b.next_hop_known {
                        "known"
                    } else {
                        "unresolved"
                    }
                );
            }
            return Ok(());
        }
        BackendCmd::Add {
            vip,
            address,
            weight,
            port,
        } => (
            Edit::BackendAdd {
                vip: vip.clone(),
                address,
                weight,
                port,
            },
            format!("added {address} to {vip}"),
        ),
        BackendCmd::Remove { vip, address } => (
            Edit::BackendRemove {
                vip: vip.clone(),
                address,
            },
            format!("removed {address} from {vip}"),
        ),
        BackendCmd::Drain { vip, address } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: None,
                drain: Some(true),
            },
            format!("draining {address} of {vip}"),
        ),
        BackendCmd::Undrain { vip, address } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: None,
                drain: Some(false),
            },
            format!("{address} of {vip} back in rotation"),
        ),
        BackendCmd::Weight {
            vip,
            address,
            weight,
        } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: Some(weight),
                drain: None,
            },
            format!("weight of {address} in {vip} is now {weight}"),
        ),
    };
    api::call(&conn.socket, &Request::Edit(req))?;
    done(conn, what)
}

fn stats(watch: bool, conn: &Conn) -> Result<()> {
    let fetch = || -> Result<(serde_json::Value, StatsInfo)> {
        let v = api::call(&conn.socket, &Request::Stats)?;
        let s = serde_json::from_value(v.clone())?;
        Ok((v, s))
    };
    let (v, mut prev) = fetch()?;
    if conn.json && !watch {
        return print_json(&v);
    }
    if !watch {
        print_stats(&prev, None);
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (v, now) = fetch()?;
        if conn.json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            // Clear the screen and redraw in place.
            print!("\x1b[2J\x1b[H");
            print_stats(&now, Some(&prev));
        }
        prev = now;
    }
}

fn print_stats(s: &StatsInfo, prev: Option<&StatsInfo>) {
    let dt = prev.map(|p| (s.at_s - p.at_s).max(1e-3));
    let rate = |now: u64, before: Option<u64>| match (dt, before) {
        (Some(dt), Some(b)) => format!("{:.0}/s", now.saturating_sub(b) as f64 / dt),
        _ => "-".into(),
    };
    println!(
        "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
        "VIP", "BACKEND", "PACKETS", "PPS", "BYTES", "NEW FLOWS", "FLOWS/S", "ACTIVE"
    );
    for (i, vt) in s.vips.iter().enumerate() {
        let (v, t) = (&vt.vip, &vt.traffic);
        let p = prev.and_then(|p| p.vips.get(i)).map(|x| &x.traffic);
        println!(
            "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
            v.to_string(),
            "(all)",
            t.packets,
            rate(t.packets, p.map(|x| x.packets)),
            t.bytes,
            t.new_flows,
            rate(t.new_flows, p.map(|x| x.new_flows)),
            "-"
        );
        for (j, row) in s
            .backends
            .iter()
            .enumerate()
            .filter(|(_, row)| row.vip == *v)
        {
            let (b, bt) = (&row.backend, &row.traffic);
            let p = prev
                .and_then(|p| p.backends.get(j))
                .filter(|x| x.vip == row.vip && x.backend == row.backend)
                .map(|x| &x.traffic);
            println!(
                "{:<28} {:<40} {:>12} {:>10} {:>14} {:>10} {:>10} {:>8}",
                "",
                b.to_string(),
                bt.packets,
                rate(bt.packets, p.map(|x| x.packets)),
                bt.bytes,
                bt.new_flows,
                rate(bt.new_flows, p.map(|x| x.new_flows)),
                bt.active
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    println!();
    // In the datapath's order (tx first), not the JSON object's.
    let shown: Vec<String> = verdict::NAMES
        .iter()
        .filter_map(|k| {
            s.verdicts
                .get(*k)
                .filter(|n| **n > 0)
                .map(|n| format!("{k}={n}"))
        })
        .collect();
    println!(
        "verdicts: {}",
        if shown.is_empty() {
            "none yet".into()
        } else {
            shown.join(" ")
        }
    );
    if s.flows_not_recorded > 0 {
        println!(
            "flood guard: {} new flows forwarded without a table entry (agent.new_flow_limit)",
            s.flows_not_recorded
        );
    }
}

fn attach(iface: &str, mode: crate::vocab::XdpMode, seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let mut ebpf = loader::load(&loader::LoadOptions {
        flow_table_size: 4096,
        ..Default::default()
    })?;
    let used = loader::attach(&mut ebpf, lb_common::PROG_BALANCER, iface, mode)?;
    println!(
        "attached {} to {iface} in {used} mode for {seconds}s",
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
