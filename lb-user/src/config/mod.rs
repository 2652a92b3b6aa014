//! The agent's configuration: TOML (serde) → a validated model.
//!
//! Every error names the file, line and column and says what is wrong, and
//! is found before anything touches the datapath: [`load`] either returns a
//! complete, consistent [`Config`] or an error.
//!
//! Rooms: `raw` (the file as written: serde types and the defaults of
//! omitted keys), this file (the validated model, its errors and limits),
//! `validate` (raw → model: every check), `edit` (CLI edits written back to
//! the file), `file` (a file built in code, for the lab, the demo and the
//! tests), `tests`.

pub mod edit;
pub mod file;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use validate::parse;

use std::{fmt, net::IpAddr, ops::Range, path::Path};

/// A configuration error, located in the file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.msg)
    }
}

impl std::error::Error for ConfigError {}

fn locate(text: &str, file: &str, span: Option<Range<usize>>, msg: String) -> ConfigError {
    let at = span.map(|s| s.start).unwrap_or(0).min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = at - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    ConfigError {
        file: file.to_string(),
        line,
        col,
        msg,
    }
}

/// An error about key `key` of table `table` (e.g. `agent`,
/// `ipip_mtu`), located where the file sets it; at the table's header when
/// the file leaves it to its default, at the start when neither is there.
pub fn error_at_key(text: &str, file: &str, table: &str, key: &str, msg: String) -> ConfigError {
    let span = toml_edit::ImDocument::parse(text).ok().and_then(|doc| {
        let t = doc.get(table)?.as_table()?;
        t.key(key).and_then(|k| k.span()).or_else(|| t.span())
    });
    locate(text, file, span, msg)
}

/// NAT source ports by default: below Linux's ephemeral range (32768 and
/// up), so the host's own connections from a NAT address never collide.
pub const DEFAULT_NAT_PORTS: &str = "1024-32767";

/// Largest capacities accepted (see README, "Sizing").
pub const MAX_MAX_VIPS: u32 = 65_536;
pub const MAX_MAX_BACKENDS: u32 = 1 << 20;
/// 1 GiB of ring slots.
pub const MAX_RING_SLOTS: u32 = 1 << 28;

/// Default probe interval: with `fall = 3`, a refused or timed-out backend
/// is out of the ring well within one second.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Kernel routing table the agent keeps announced VIP routes in.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;
/// `second_chance` of a `gue` Maglev VIP unless the file says otherwise:
/// ten minutes of a deploy's ring changes.
pub const DEFAULT_SECOND_CHANCE_S: u32 = 600;
pub const DEFAULT_TIMEOUT_MS: u64 = 150;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

// ---- the validated model ----

pub use crate::vocab::{CheckKind, Forwarding, HashInput, Protocol, XdpMode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// Port to probe (default: the VIP's port).
    pub port: u16,
    /// Along the forwarding path (the default) or to the backend's address.
    pub via: crate::vocab::ProbeVia,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCfg {
    pub address: IpAddr,
    /// NAT VIPs: the port the backend listens on (None = the VIP's).
    pub port: Option<u16>,
    pub weight: u32,
    /// Out of the ring for new flows; existing flows stay.
    pub drain: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashInput,
    pub ring_size: u32,
    pub flow_table: bool,
    pub idle_timeout_s: u32,
    /// How long after a ring change a packet that is not a SYN also names
    /// the backend the previous ring gave it (`gue` Maglev VIPs; 0 = off).
    pub second_chance_s: u32,
    pub health: Health,
    pub scheduler: crate::policy::sched::Scheduler,
    pub backends: Vec<BackendCfg>,
    pub regions: Vec<Region>,
}

/// Clients from `prefixes` are balanced over `backends` (a subset of the
/// VIP's) while any of those is up; otherwise over all of the VIP's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    /// (network address, prefix length).
    pub prefixes: Vec<(IpAddr, u8)>,
    pub backends: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub flow_table_size: u32,
    pub control_socket: String,
    pub instance: String,
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where the HTTP API listens (off when `None`); always with
    /// `api_token_file`.
    pub api_listen: Option<std::net::SocketAddr>,
    /// The API's bearer tokens (`ACCESS TOKEN [NAME]` per line, mode 0600).
    pub api_token_file: Option<std::path::PathBuf>,
    /// Network namespace (a name under /run/netns) the agent enters before
    /// anything else; for labs and tests. Unlike `ip netns exec`, this keeps
    /// the host's mount namespace, so pins land in the host's bpffs.
    pub netns: Option<String>,
    /// Next hop per packet from `bpf_fib_lookup` (`next_hop = "fib"`)
    /// instead of the backend entry the agent keeps fresh (`"map"`).
    pub next_hop_fib: bool,
    pub ipip_source_v4: std::net::Ipv4Addr,
    pub ipip_source_v6: std::net::Ipv6Addr,
    /// New flows per second per CPU written to the connection table; above
    /// it new flows are forwarded statelessly (flood guard). 0 = no limit.
    pub new_flow_limit: u32,
    /// Capacity in VIPs plus regions (each takes a ring id).
    pub max_vips: u32,
    /// Capacity in backends over all VIPs (one id each; id 0 is reserved).
    pub max_backends: u32,
    /// `RINGS` slots: every VIP and region takes two halves of its ring size.
    pub ring_slots: u32,
    /// NAT VIPs' source addresses (at most `lb_common::MAX_NAT_ADDRS` each).
    pub nat_source_v4: Vec<std::net::Ipv4Addr>,
    pub nat_source_v6: Vec<std::net::Ipv6Addr>,
    /// NAT source ports, first and last.
    pub nat_ports: (u16, u16),
    /// Interfaces NAT replies arrive on besides `interface`: the balancer
    /// is attached there too.
    pub reply_interfaces: Vec<String>,
    /// MTU of the path to `ipip` backends (see `lb_common::Settings`).
    pub ipip_mtu: u16,
    /// UDP destination port of `gue` VIPs (the backend hosts' `--gue-port`).
    pub gue_port: u16,
}

/// VIP announcement: the agent keeps one host route per servable VIP
/// address in kernel table `table`; the routing daemon (BIRD) learns that
/// table and announces its routes by BGP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announce {
    pub table: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub agent: Agent,
    pub announce: Option<Announce>,
    pub vips: Vec<Vip>,
}

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        col: 0,
        msg: format!("cannot read the file: {e}"),
    })?;
    parse(&text, &file)
}
