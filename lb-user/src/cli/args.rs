//! The `lb` command line's definition: clap types only (every command, its
//! arguments, their help: also the source of `lb man` and `lb
//! completions`). Dispatch is in `mod.rs`, output in `render.rs`.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::api::{self, Forwarding, HashInput, Scheduler, VipRef};

/// Where a host install keeps the configuration (see README, "Install on a
/// host").
pub const DEFAULT_CONFIG: &str = "/etc/lb/lb.toml";

#[derive(Parser)]
#[command(
    name = "lb",
    version = api::VERSION,
    about = "XDP layer-4 load balancer: agent and CLI"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

/// Options every command that talks to the agent takes.
#[derive(Args, Clone)]
pub(super) struct Conn {
    /// The agent's control socket (`agent.control_socket`).
    #[arg(long, global = true, default_value = "/run/lb/lb.sock")]
    pub(super) socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(super) json: bool,
}

#[derive(Subcommand)]
pub(super) enum Cmd {
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
    /// The backend side of `ipip` VIPs, on each backend host: `lb_decap`
    /// attached and pinned (`lb backend-host run --interface eth0`), its
    /// counters, and its removal.
    #[command(name = "backend-host")]
    BackendHost {
        #[command(subcommand)]
        cmd: BackendHostCmd,
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
    /// live maps: `lb explain 198.18.0.100:80 198.19.4.7:51234`. Or, with
    /// `--what-if`, what an edit would do before it is made: `lb explain
    /// --what-if 'backend drain 198.18.0.100:80 198.18.0.31'`.
    Explain {
        /// The VIP (with CLIENT).
        #[arg(required_unless_present = "what_if")]
        vip: Option<VipRef>,
        /// The client's ADDRESS:PORT (IPv6 in brackets).
        #[arg(required_unless_present = "what_if")]
        client: Option<std::net::SocketAddr>,
        /// An edit, written as the `lb` command that would make it (`backend
        /// add|remove|drain|undrain|weight ...` or `vip set VIP
        /// ring_size=N`): the VIP's ring after it, the share of new flows that
        /// would move and to which backends, and the VIP's established flows
        /// the connection table protects or that would be rescheduled.
        /// Nothing is changed.
        #[arg(long, value_name = "EDIT", conflicts_with_all = ["vip", "client"])]
        what_if: Option<String>,
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
pub(super) struct LoadgenArgs {
    /// Interface to send on (frames leave it as if received and bounced by XDP).
    #[arg(long)]
    pub(super) iface: String,
    /// Destination ADDRESS:PORT (IPv4, or IPv6 in brackets), e.g. the VIP.
    #[arg(long)]
    pub(super) dst: std::net::SocketAddr,
    /// Destination MAC (default: the kernel's neighbour entry for --dst).
    #[arg(long)]
    pub(super) dst_mac: Option<String>,
    /// Base source address. IPv4: flow f sets its last two bytes, and the
    /// source port past 65,536 flows. IPv6: flow f sets its last four bytes
    /// (every flow its own address). Default 198.19.0.0 or 2001:2:0:1::.
    #[arg(long)]
    pub(super) src: Option<IpAddr>,
    /// udp, or syn (TCP SYNs).
    #[arg(long, default_value = "udp", value_parser = ["udp", "syn"])]
    pub(super) proto: String,
    /// Frame size in bytes without the FCS the NIC adds. Default: the
    /// smallest frame the headers allow, at least 60 (the minimum 64-byte
    /// Ethernet frame on the wire; 62 for IPv6 UDP, 74 for IPv6 SYNs).
    #[arg(long)]
    pub(super) size: Option<usize>,
    /// Number of distinct flows.
    #[arg(long, default_value_t = 1)]
    pub(super) flows: u32,
    /// Packets per second over all threads; 0 = flat out.
    #[arg(long, default_value_t = 0)]
    pub(super) rate: u64,
    /// Seconds to send (one of --duration and --count is needed).
    #[arg(long)]
    pub(super) duration: Option<f64>,
    /// Packets to send.
    #[arg(long)]
    pub(super) count: Option<u64>,
    /// Sending threads (each runs on its own CPU when it can).
    #[arg(long, default_value_t = 1)]
    pub(super) threads: usize,
    /// Network namespace to send from (a name under /run/netns).
    #[arg(long)]
    pub(super) netns: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Subcommand)]
pub(super) enum LabCmd {
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
pub(super) enum BackendHostCmd {
    /// Attach `lb_decap` to INTERFACE (or swap it into the link an earlier
    /// run pinned: no packet goes undecapsulated), keep the addresses it
    /// decapsulates for current, serve its counters; stopped, it stays
    /// attached. `lb backend-host run --interface eth0 --metrics-listen
    /// 127.0.0.1:9101`
    Run {
        /// The interface the balancer's encapsulated packets arrive on.
        #[arg(long)]
        interface: String,
        /// An address to decapsulate for (the backend's address in the
        /// balancer's `[[vip.backend]]`); repeatable. Default: every global
        /// address of the interface, followed as it changes.
        #[arg(long = "address")]
        addresses: Vec<std::net::IpAddr>,
        /// Names the pins (`/sys/fs/bpf/lb-backend/<instance>/`).
        #[arg(long, default_value = "default")]
        instance: String,
        #[arg(long, value_enum, default_value_t = crate::vocab::XdpMode::Auto)]
        xdp_mode: crate::vocab::XdpMode,
        /// The UDP port of `gue` VIPs (the balancers' `agent.gue_port`).
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Serve `lb_decap_packets_total{verdict}` on ADDRESS:PORT.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Network namespace (a name under /run/netns) to work in; for labs
        /// and tests. Unlike `ip netns exec`, this keeps the host's mount
        /// namespace, so the pins land in the host's bpffs.
        #[arg(long)]
        netns: Option<String>,
    },
    /// The decap counters of an instance (read from its pins): `lb
    /// backend-host stats --json`
    Stats {
        #[arg(long, default_value = "default")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// Detach `lb_decap` and remove the instance's pins.
    Down {
        #[arg(long, default_value = "default")]
        instance: String,
    },
}

#[derive(Subcommand)]
pub(super) enum NodeCmd {
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
pub(super) enum VipCmd {
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
        /// Seconds after a ring change in which a packet that is not a SYN
        /// also names its previous backend (`gue` Maglev VIPs; default 600,
        /// 0: off).
        #[arg(long)]
        second_chance: Option<u32>,
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
        /// Probes along the forwarding path (default) or to the backend's
        /// address.
        #[arg(long, value_enum)]
        health_via: Option<crate::vocab::ProbeVia>,
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
    /// second_chance, health.kind, health.via, health.interval_ms, health.timeout_ms, health.rise,
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
pub(super) enum BackendCmd {
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

/// `KEY=VALUE` of `lb vip set`.
pub(super) fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!(
            "`{s}` is not KEY=VALUE (e.g. scheduler=round-robin)"
        )),
    }
}
