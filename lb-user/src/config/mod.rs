//! The agent's configuration: TOML (serde) → a validated model.
//!
//! Every error names the file, line and column and says what is wrong, and
//! is found before anything touches the datapath: [`load`] either returns a
//! complete, consistent [`Config`] or an error.

pub mod edit;

use std::{collections::HashSet, fmt, net::IpAddr, ops::Range, path::Path};

use serde::Deserialize;
use toml::Spanned;

use crate::policy::maglev::is_prime;

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

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agent: RawAgent,
    announce: Option<RawAnnounce>,
    #[serde(default)]
    vip: Vec<RawVip>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnnounce {
    #[serde(default = "default_announce_table")]
    table: Spanned<u32>,
}

fn default_announce_table() -> Spanned<u32> {
    sp(DEFAULT_ANNOUNCE_TABLE)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    interface: String,
    #[serde(default = "default_mode")]
    xdp_mode: Spanned<String>,
    #[serde(default = "default_flow_table")]
    flow_table_size: Spanned<u32>,
    #[serde(default = "default_socket")]
    control_socket: String,
    #[serde(default = "default_instance")]
    instance: String,
    metrics_listen: Option<Spanned<String>>,
    netns: Option<String>,
    #[serde(default = "default_next_hop")]
    next_hop: Spanned<String>,
    #[serde(default = "default_src4")]
    ipip_source_v4: Spanned<String>,
    #[serde(default = "default_src6")]
    ipip_source_v6: Spanned<String>,
    #[serde(default = "default_new_flow_limit")]
    new_flow_limit: u32,
    #[serde(default = "default_max_vips")]
    max_vips: Spanned<u32>,
    #[serde(default = "default_max_backends")]
    max_backends: Spanned<u32>,
    #[serde(default = "default_ring_slots")]
    ring_slots: Spanned<u32>,
    #[serde(default)]
    nat_source_v4: Vec<Spanned<String>>,
    #[serde(default)]
    nat_source_v6: Vec<Spanned<String>>,
    #[serde(default = "default_nat_ports")]
    nat_ports: Spanned<String>,
    #[serde(default)]
    reply_interfaces: Vec<String>,
    #[serde(default = "default_ipip_mtu")]
    ipip_mtu: Spanned<u16>,
}

fn default_ipip_mtu() -> Spanned<u16> {
    sp(1500)
}

fn default_nat_ports() -> Spanned<String> {
    sp(DEFAULT_NAT_PORTS.into())
}

/// NAT source ports by default: below Linux's ephemeral range (32768 and
/// up), so the host's own connections from a NAT address never collide.
pub const DEFAULT_NAT_PORTS: &str = "1024-32767";

fn default_max_vips() -> Spanned<u32> {
    sp(lb_common::MAX_VIPS)
}
fn default_max_backends() -> Spanned<u32> {
    sp(lb_common::MAX_BACKENDS)
}
fn default_ring_slots() -> Spanned<u32> {
    sp(lb_common::DEFAULT_RING_SLOTS)
}

/// Largest capacities accepted (see README, "Sizing").
pub const MAX_MAX_VIPS: u32 = 65_536;
pub const MAX_MAX_BACKENDS: u32 = 1 << 20;
/// 1 GiB of ring slots.
pub const MAX_RING_SLOTS: u32 = 1 << 28;

fn default_new_flow_limit() -> u32 {
    lb_common::DEFAULT_NEW_FLOW_LIMIT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    address: Spanned<String>,
    port: u16,
    #[serde(default = "default_proto")]
    protocol: Spanned<String>,
    #[serde(default = "default_forwarding")]
    forwarding: Spanned<String>,
    #[serde(default = "default_hash")]
    hash: Spanned<String>,
    #[serde(default = "default_ring")]
    ring_size: Spanned<u32>,
    #[serde(default = "default_true")]
    flow_table: bool,
    #[serde(default)]
    idle_timeout: u32,
    #[serde(default)]
    health: RawHealth,
    #[serde(default = "default_scheduler")]
    scheduler: Spanned<String>,
    #[serde(default)]
    backend: Vec<RawBackend>,
    #[serde(default)]
    region: Vec<RawRegion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_check")]
    kind: Spanned<String>,
    #[serde(default = "default_interval")]
    interval_ms: u64,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
    port: Option<u16>,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default = "default_status")]
    expect_status: Spanned<String>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            kind: default_check(),
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            port: None,
            path: default_path(),
            expect_status: default_status(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    prefixes: Vec<Spanned<String>>,
    backends: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    port: Option<Spanned<u16>>,
    #[serde(default = "default_weight")]
    weight: Spanned<u32>,
    #[serde(default)]
    drain: bool,
}

fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_mode() -> Spanned<String> {
    sp("auto".into())
}
fn default_flow_table() -> Spanned<u32> {
    sp(lb_common::DEFAULT_FLOW_TABLE_SIZE)
}
fn default_socket() -> String {
    "/run/lb/lb.sock".into()
}
fn default_instance() -> String {
    "default".into()
}
fn default_next_hop() -> Spanned<String> {
    sp("map".into())
}
fn default_src4() -> Spanned<String> {
    sp("198.19.0.0".into())
}
fn default_src6() -> Spanned<String> {
    sp("2001:2:0:ff::".into())
}
fn default_proto() -> Spanned<String> {
    sp("tcp".into())
}
fn default_forwarding() -> Spanned<String> {
    sp("dsr".into())
}
fn default_hash() -> Spanned<String> {
    sp("5-tuple".into())
}
fn default_ring() -> Spanned<u32> {
    sp(lb_common::DEFAULT_RING_SIZE)
}
fn default_true() -> bool {
    true
}
fn default_check() -> Spanned<String> {
    sp("tcp".into())
}
fn default_interval() -> u64 {
    DEFAULT_INTERVAL_MS
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_path() -> String {
    "/healthz".into()
}
fn default_status() -> Spanned<String> {
    sp("200-399".into())
}
fn default_scheduler() -> Spanned<String> {
    sp("maglev".into())
}
fn default_weight() -> Spanned<u32> {
    sp(1)
}

/// Default probe interval: with `fall = 3`, a refused or timed-out backend
/// is out of the ring well within one second.
pub const DEFAULT_INTERVAL_MS: u64 = 200;
/// Kernel routing table the agent keeps announced VIP routes in.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;
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

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let err = |span: Option<Range<usize>>, msg: String| locate(text, file, span, msg);
    let raw: RawFile = toml::from_str(text).map_err(|e| err(e.span(), e.message().to_string()))?;

    let a = &raw.agent;
    let xdp_mode = a
        .xdp_mode
        .get_ref()
        .parse::<XdpMode>()
        .map_err(|e| err(Some(a.xdp_mode.span()), e))?;
    if *a.flow_table_size.get_ref() == 0 {
        return Err(err(
            Some(a.flow_table_size.span()),
            "flow_table_size must be at least 1".into(),
        ));
    }
    if a.interface.is_empty() {
        return Err(err(
            None,
            "agent.interface must name the interface to attach to".into(),
        ));
    }
    for (name, v, lo, hi) in [
        ("max_vips", &a.max_vips, 1, MAX_MAX_VIPS),
        ("max_backends", &a.max_backends, 2, MAX_MAX_BACKENDS),
        ("ring_slots", &a.ring_slots, 1, MAX_RING_SLOTS),
    ] {
        if !(lo..=hi).contains(v.get_ref()) {
            return Err(err(
                Some(v.span()),
                format!(
                    "agent.{name} = {} is out of range: {lo}..={hi}",
                    v.get_ref()
                ),
            ));
        }
    }
    let (max_vips, max_backends, ring_slots) = (
        *a.max_vips.get_ref(),
        *a.max_backends.get_ref(),
        *a.ring_slots.get_ref(),
    );
    // Running totals against the capacities, checked VIP by VIP so that an
    // error points at the VIP that does not fit.
    let (mut ring_ids, mut backend_ids, mut slots) = (0u64, 0u64, 0u64);
    let metrics_listen = match &a.metrics_listen {
        None => None,
        Some(s) => Some(s.get_ref().parse().map_err(|_| {
            err(
                Some(s.span()),
                format!(
                    "metrics_listen `{}` is not an address:port such as 127.0.0.1:9100",
                    s.get_ref()
                ),
            )
        })?),
    };
    let ipip_source_v4 = a.ipip_source_v4.get_ref().parse().map_err(|_| {
        err(
            Some(a.ipip_source_v4.span()),
            format!(
                "ipip_source_v4 `{}` is not an IPv4 address",
                a.ipip_source_v4.get_ref()
            ),
        )
    })?;
    let ipip_source_v6 = a.ipip_source_v6.get_ref().parse().map_err(|_| {
        err(
            Some(a.ipip_source_v6.span()),
            format!(
                "ipip_source_v6 `{}` is not an IPv6 address",
                a.ipip_source_v6.get_ref()
            ),
        )
    })?;
    let mut nat_source_v4 = Vec::new();
    let mut nat_source_v6 = Vec::new();
    for (list, v6) in [(&a.nat_source_v4, false), (&a.nat_source_v6, true)] {
        for s in list {
            let key = if v6 { "nat_source_v6" } else { "nat_source_v4" };
            let bad = || {
                err(
                    Some(s.span()),
                    format!(
                        "{key} `{}` is not an IPv{} address",
                        s.get_ref(),
                        if v6 { 6 } else { 4 }
                    ),
                )
            };
            if v6 {
                nat_source_v6.push(s.get_ref().parse().map_err(|_| bad())?);
            } else {
                nat_source_v4.push(s.get_ref().parse().map_err(|_| bad())?);
            }
            if nat_source_v4.len().max(nat_source_v6.len()) > lb_common::MAX_NAT_ADDRS as usize {
                return Err(err(
                    Some(s.span()),
                    format!(
                        "{key}: at most {} addresses per family",
                        lb_common::MAX_NAT_ADDRS
                    ),
                ));
            }
        }
    }
    let nat_ports = {
        let s = &a.nat_ports;
        let bad = |why: &str| {
            err(
                Some(s.span()),
                format!(
                    "nat_ports `{}` {why}: give a range such as \"{DEFAULT_NAT_PORTS}\" (first-last, \
                     1024 or above, outside the kernel's ephemeral ports, net.ipv4.ip_local_port_range)",
                    s.get_ref()
                ),
            )
        };
        let (lo, hi) = s
            .get_ref()
            .split_once('-')
            .ok_or_else(|| bad("is not a range"))?;
        let lo: u16 = lo
            .trim()
            .parse()
            .map_err(|_| bad("is not a range of ports"))?;
        let hi: u16 = hi
            .trim()
            .parse()
            .map_err(|_| bad("is not a range of ports"))?;
        if lo < 1024 || hi < lo {
            return Err(bad("is empty or starts below 1024"));
        }
        (lo, hi)
    };
    let ipip_mtu = *a.ipip_mtu.get_ref();
    if !(1280..=9216).contains(&ipip_mtu) {
        return Err(err(
            Some(a.ipip_mtu.span()),
            format!(
                "ipip_mtu {ipip_mtu} is out of range 1280..=9216 (the MTU of the path to the \
                 backends: 1500 on plain Ethernet, 9000 with jumbo frames)"
            ),
        ));
    }
    let agent = Agent {
        ipip_mtu,
        nat_source_v4,
        nat_source_v6,
        nat_ports,
        reply_interfaces: a.reply_interfaces.clone(),
        interface: a.interface.clone(),
        xdp_mode,
        flow_table_size: *a.flow_table_size.get_ref(),
        max_vips,
        max_backends,
        ring_slots,
        control_socket: a.control_socket.clone(),
        instance: a.instance.clone(),
        metrics_listen,
        netns: a.netns.clone(),
        next_hop_fib: match a.next_hop.get_ref().as_str() {
            "map" => false,
            "fib" => true,
            other => {
                return Err(err(
                    Some(a.next_hop.span()),
                    format!("next_hop `{other}` is not \"map\" or \"fib\""),
                ));
            }
        },
        ipip_source_v4,
        ipip_source_v6,
        new_flow_limit: a.new_flow_limit,
    };

    let announce = match &raw.announce {
        None => None,
        Some(an) => {
            let table = *an.table.get_ref();
            if table == 0 || (253..=255).contains(&table) {
                return Err(err(
                    Some(an.table.span()),
                    format!(
                        "announce.table {table} is reserved (0 unspec, 253 default, 254 main, 255 local); \
                         use a table of its own such as {DEFAULT_ANNOUNCE_TABLE}, the one BIRD's kernel protocol learns"
                    ),
                ));
            }
            Some(Announce { table })
        }
    };

    let mut seen_vips = HashSet::new();
    let mut vips = Vec::new();
    for v in &raw.vip {
        let address: IpAddr = v.address.get_ref().parse().map_err(|_| {
            err(
                Some(v.address.span()),
                format!(
                    "VIP address `{}` is not an IPv4 or IPv6 address",
                    v.address.get_ref()
                ),
            )
        })?;
        let protocol = v
            .protocol
            .get_ref()
            .parse::<Protocol>()
            .map_err(|e| err(Some(v.protocol.span()), e))?;
        let forwarding = v
            .forwarding
            .get_ref()
            .parse::<Forwarding>()
            .map_err(|e| err(Some(v.forwarding.span()), e))?;
        let hash = v
            .hash
            .get_ref()
            .parse::<HashInput>()
            .map_err(|e| err(Some(v.hash.span()), e))?;
        if forwarding == Forwarding::Nat {
            let (have, key) = if address.is_ipv4() {
                (!agent.nat_source_v4.is_empty(), "nat_source_v4")
            } else {
                (!agent.nat_source_v6.is_empty(), "nat_source_v6")
            };
            if !have {
                return Err(err(
                    Some(v.forwarding.span()),
                    format!(
                        "VIP {address}: forwarding = \"nat\" needs a source address of its family: \
                         set agent.{key} (an address of this host the backends reach it by)"
                    ),
                ));
            }
            if !v.flow_table {
                return Err(err(
                    Some(v.forwarding.span()),
                    format!(
                        "VIP {address}: forwarding = \"nat\" keeps every flow in the connection \
                         table (its source port is there); remove flow_table = false"
                    ),
                ));
            }
        }
        let ring = *v.ring_size.get_ref();
        if !is_prime(ring) || ring > lb_common::MAX_RING_SIZE {
            return Err(err(
                Some(v.ring_size.span()),
                format!(
                    "ring_size {ring} must be a prime no larger than {} (Maglev needs a prime; e.g. 65537, 16381, 251)",
                    lb_common::MAX_RING_SIZE
                ),
            ));
        }
        if !seen_vips.insert((address, v.port, protocol)) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "duplicate VIP {address} port {} {:?}: each (address, port, protocol) may appear once",
                    v.port, protocol
                ),
            ));
        }
        let h = &v.health;
        let kind = match h.kind.get_ref().as_str() {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp,
            "http" => CheckKind::Http { path: h.path.clone(), status: parse_status(h.expect_status.get_ref()).ok_or_else(|| {
                err(Some(h.expect_status.span()), format!("expect_status `{}` is not a status or range such as \"200\" or \"200-399\"", h.expect_status.get_ref()))
            })? },
            other => return Err(err(Some(h.kind.span()), format!("health kind `{other}` is not \"tcp\", \"http\" or \"none\""))),
        };
        if h.interval_ms == 0 || h.timeout_ms == 0 || h.rise == 0 || h.fall == 0 {
            return Err(err(
                Some(h.kind.span()),
                "health interval_ms, timeout_ms, rise and fall must all be at least 1".into(),
            ));
        }
        let mut seen_b = HashSet::new();
        let mut backends = Vec::new();
        for b in &v.backend {
            let baddr: IpAddr = b.address.get_ref().parse().map_err(|_| {
                err(
                    Some(b.address.span()),
                    format!(
                        "backend address `{}` is not an IPv4 or IPv6 address",
                        b.address.get_ref()
                    ),
                )
            })?;
            if baddr.is_ipv4() != address.is_ipv4() {
                return Err(err(
                    Some(b.address.span()),
                    format!(
                        "backend {baddr} is {} but VIP {address} is {}: `{}` forwarding carries a VIP only to backends of its own family",
                        fam(&baddr),
                        fam(&address),
                        v.forwarding.get_ref()
                    ),
                ));
            }
            if !seen_b.insert(baddr) {
                return Err(err(
                    Some(b.address.span()),
                    format!("duplicate backend {baddr} in VIP {address}:{}", v.port),
                ));
            }
            let w = *b.weight.get_ref();
            if w > MAX_WEIGHT {
                return Err(err(
                    Some(b.weight.span()),
                    format!("weight {w} is out of range 0..={MAX_WEIGHT} (0 drains the backend)"),
                ));
            }
            if let Some(p) = &b.port
                && forwarding != Forwarding::Nat
            {
                return Err(err(
                    Some(p.span()),
                    format!(
                        "backend {baddr}: a backend port needs forwarding = \"nat\" (with `{}` the \
                         packet keeps the VIP's port)",
                        v.forwarding.get_ref()
                    ),
                ));
            }
            if b.port.as_ref().is_some_and(|p| *p.get_ref() == 0) {
                return Err(err(
                    Some(b.port.as_ref().expect("checked").span()),
                    format!("backend {baddr}: port 0 is not a port"),
                ));
            }
            backends.push(BackendCfg {
                address: baddr,
                port: b.port.as_ref().map(|p| *p.get_ref()),
                weight: w,
                drain: b.drain,
            });
        }
        use crate::vocab::Scheduler;
        let scheduler = v
            .scheduler
            .get_ref()
            .parse::<Scheduler>()
            .map_err(|e| err(Some(v.scheduler.span()), e))?;
        let mut regions = Vec::new();
        for r in &v.region {
            let mut prefixes = Vec::new();
            for p in &r.prefixes {
                let bad = || {
                    err(
                        Some(p.span()),
                        format!(
                            "region `{}`: `{}` is not a prefix such as 198.18.7.0/24 or 2001:2:7::/48",
                            r.name,
                            p.get_ref()
                        ),
                    )
                };
                let (a, l) = p.get_ref().split_once('/').ok_or_else(bad)?;
                let a: IpAddr = a.parse().map_err(|_| bad())?;
                let l: u8 = l.parse().map_err(|_| bad())?;
                if l > if a.is_ipv4() { 32 } else { 128 } {
                    return Err(bad());
                }
                if a.is_ipv4() != address.is_ipv4() {
                    return Err(err(
                        Some(p.span()),
                        format!(
                            "region `{}`: prefix {} is not of the VIP's address family",
                            r.name,
                            p.get_ref()
                        ),
                    ));
                }
                prefixes.push((a, l));
            }
            let mut rb = Vec::new();
            for b in &r.backends {
                let a: IpAddr = b.get_ref().parse().map_err(|_| {
                    err(
                        Some(b.span()),
                        format!("region `{}`: `{}` is not an address", r.name, b.get_ref()),
                    )
                })?;
                if !backends.iter().any(|x: &BackendCfg| x.address == a) {
                    return Err(err(
                        Some(b.span()),
                        format!(
                            "region `{}`: {a} is not one of this VIP's backends; add it as a [[vip.backend]] first",
                            r.name
                        ),
                    ));
                }
                rb.push(a);
            }
            ring_ids += 1;
            slots += 2 * u64::from(ring);
            regions.push(Region {
                name: r.name.clone(),
                prefixes,
                backends: rb,
            });
        }
        ring_ids += 1;
        slots += 2 * u64::from(ring);
        backend_ids += backends.len() as u64;
        if ring_ids > u64::from(max_vips) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "this VIP and its regions do not fit: VIPs plus regions come to {ring_ids}, \
                     agent.max_vips is {max_vips} (raise it; see README, \"Sizing\")"
                ),
            ));
        }
        if backend_ids >= u64::from(max_backends) {
            return Err(err(
                Some(v.address.span()),
                format!(
                    "this VIP's backends do not fit: backends over all VIPs come to {backend_ids}, \
                     agent.max_backends is {max_backends} (one id is reserved; raise it)"
                ),
            ));
        }
        if slots > u64::from(ring_slots) {
            return Err(err(
                Some(v.ring_size.span()),
                format!(
                    "this VIP's rings do not fit: two halves of ring_size per VIP and region come to \
                     {slots} slots, agent.ring_slots is {ring_slots} (raise it, 8 bytes a slot, or \
                     lower ring_size)"
                ),
            ));
        }
        vips.push(Vip {
            scheduler,
            regions,
            address,
            port: v.port,
            protocol,
            forwarding,
            hash,
            ring_size: ring,
            flow_table: v.flow_table,
            idle_timeout_s: v.idle_timeout,
            health: Health {
                kind,
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                rise: h.rise,
                fall: h.fall,
                port: h.port.unwrap_or(v.port),
            },
            backends,
        });
    }
    Ok(Config {
        agent,
        announce,
        vips,
    })
}

fn fam(a: &IpAddr) -> &'static str {
    if a.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// "200" or "200-399" → (low, high).
fn parse_status(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
interface = "eth1"

[[vip]]
address = "198.18.0.100"
port = 80

[[vip.backend]]
address = "198.18.2.1"

[[vip.backend]]
address = "198.18.2.2"
weight = 3
"#;

    fn error_of(text: &str) -> String {
        parse(text, "lb.toml")
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn announce_section() {
        let c = parse(GOOD, "lb.toml").expect("valid");
        assert_eq!(c.announce, None, "announcement is off without the section");
        let text = GOOD.replace("[[vip]]", "[announce]\n\n[[vip]]");
        let c = parse(&text, "lb.toml").expect("valid");
        assert_eq!(c.announce, Some(Announce { table: 100 }));
        let text = GOOD.replace("[[vip]]", "[announce]\ntable = 254\n\n[[vip]]");
        let e = error_of(&text);
        assert!(
            e.starts_with("lb.toml:6:9:") && e.contains("table 254 is reserved"),
            "{e}"
        );
        let text = GOOD.replace("[[vip]]", "[announce]\nprotocol = \"bgp\"\n\n[[vip]]");
        let e = error_of(&text);
        assert!(e.contains("unknown field `protocol`"), "{e}");
    }

    #[test]
    fn capacities_are_checked_where_they_are_exceeded() {
        let c = parse(GOOD, "lb.toml").expect("valid");
        assert_eq!(
            (c.agent.max_vips, c.agent.max_backends, c.agent.ring_slots),
            (256, 4096, 8_388_736)
        );
        // Two backends need three ids (0 is reserved).
        let e = error_of(&GOOD.replace(
            "interface = \"eth1\"",
            "interface = \"eth1\"\nmax_backends = 2",
        ));
        assert!(e.contains("agent.max_backends is 2"), "{e}");
        // One ring of 65,537 needs 131,074 slots.
        let e = error_of(&GOOD.replace(
            "interface = \"eth1\"",
            "interface = \"eth1\"\nring_slots = 131073",
        ));
        assert!(
            e.starts_with("lb.toml:") && e.contains("agent.ring_slots is 131073"),
            "{e}"
        );
        let e =
            error_of(&GOOD.replace("interface = \"eth1\"", "interface = \"eth1\"\nmax_vips = 0"));
        assert!(e.contains("agent.max_vips = 0 is out of range"), "{e}");
        let two = format!("{GOOD}\n[[vip]]\naddress = \"198.18.0.101\"\nport = 80\n");
        let e =
            error_of(&two.replace("interface = \"eth1\"", "interface = \"eth1\"\nmax_vips = 1"));
        assert!(e.contains("agent.max_vips is 1"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = parse(GOOD, "lb.toml").expect("valid");
        assert_eq!(c.agent.xdp_mode, XdpMode::Auto);
        // The value README's configuration table documents, not the
        // constant the default is made of (comparing those checks nothing).
        assert_eq!(c.agent.flow_table_size, 1_048_576);
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains("| `agent.flow_table_size` | `1048576` |"),
            "README documents the default table size"
        );
        let v = &c.vips[0];
        assert_eq!(
            (v.protocol, v.forwarding, v.hash, v.ring_size),
            (Protocol::Tcp, Forwarding::Dsr, HashInput::FiveTuple, 65537)
        );
        assert_eq!(v.health.kind, CheckKind::Tcp);
        assert_eq!(
            (
                v.health.interval_ms,
                v.health.fall,
                v.health.rise,
                v.health.port
            ),
            (200, 3, 2, 80)
        );
        assert_eq!(v.backends[1].weight, 3);
    }

    #[test]
    fn nat_vips_and_their_sources() {
        let nat = GOOD
            .replace("port = 80", "port = 80\nforwarding = \"nat\"")
            .replace(
                "address = \"198.18.2.1\"",
                "address = \"198.18.2.1\"\nport = 8080",
            );
        // No NAT source of the VIP's family: refused where it is asked for.
        let e = error_of(&nat);
        assert!(
            e.starts_with("lb.toml:8:14:") && e.contains("set agent.nat_source_v4"),
            "{e}"
        );
        let with_src = nat.replace(
            "interface = \"eth1\"",
            "interface = \"eth1\"\nnat_source_v4 = [\"198.18.11.1\"]",
        );
        let c = parse(&with_src, "lb.toml").expect("valid");
        assert_eq!(c.vips[0].forwarding, Forwarding::Nat);
        assert_eq!(c.vips[0].backends[0].port, Some(8080));
        assert_eq!(c.vips[0].backends[1].port, None);
        assert_eq!(c.agent.nat_ports, (1024, 32767));
        assert_eq!(
            c.agent.nat_source_v4,
            vec![std::net::Ipv4Addr::new(198, 18, 11, 1)]
        );
        // A backend port only means something with NAT.
        let e = error_of(&GOOD.replace(
            "address = \"198.18.2.1\"",
            "address = \"198.18.2.1\"\nport = 8080",
        ));
        assert!(
            e.contains("a backend port needs forwarding = \"nat\""),
            "{e}"
        );
        // NAT keeps every flow in the table.
        let e = error_of(&with_src.replace("port = 80\n", "port = 80\nflow_table = false\n"));
        assert!(e.contains("remove flow_table = false"), "{e}");
        for (ports, why) in [
            ("\"100-200\"", "starts below 1024"),
            ("\"5000-4000\"", "is empty"),
            ("\"http\"", "is not a range"),
        ] {
            let e = error_of(&with_src.replace(
                "interface = \"eth1\"",
                &format!("interface = \"eth1\"\nnat_ports = {ports}"),
            ));
            assert!(e.contains(why) && e.contains("nat_ports"), "{ports}: {e}");
        }
        let e = error_of(&with_src.replace("198.18.11.1", "198.18.11.300"));
        assert!(
            e.contains("nat_source_v4 `198.18.11.300` is not an IPv4 address"),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_is_located() {
        let e = error_of("[agent]\ninterface = \"eth1\"\nport = = 3\n");
        assert!(e.starts_with("lb.toml:3:"), "{e}");
    }

    #[test]
    fn unknown_key() {
        let e = error_of(&GOOD.replace("port = 80", "port = 80\nwieght = 2"));
        assert!(
            e.contains("unknown field `wieght`") && e.starts_with("lb.toml:8:1:"),
            "{e}"
        );
    }

    #[test]
    fn bad_address() {
        let e = error_of(&GOOD.replace("198.18.2.1", "198.18.2.300"));
        assert!(
            e.contains("backend address `198.18.2.300` is not an IPv4 or IPv6 address"),
            "{e}"
        );
        assert!(e.starts_with("lb.toml:10:11:"), "{e}");
    }

    #[test]
    fn ring_size_not_prime() {
        let e = error_of(&GOOD.replace("port = 80", "port = 80\nring_size = 65536"));
        assert!(e.contains("ring_size 65536 must be a prime"), "{e}");
    }

    #[test]
    fn backend_family_mismatch() {
        let e = error_of(
            &GOOD
                .replace("port = 80", "port = 80\nforwarding = \"ipip\"")
                .replace("198.18.2.1", "2001:2::1"),
        );
        assert!(
            e.contains("backend 2001:2::1 is IPv6 but VIP 198.18.0.100 is IPv4"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_vip_and_backend() {
        let twice = format!("{GOOD}\n[[vip]]\naddress = \"198.18.0.100\"\nport = 80\n");
        assert!(error_of(&twice).contains("duplicate VIP 198.18.0.100 port 80"));
        let e = error_of(&GOOD.replace("198.18.2.2", "198.18.2.1"));
        assert!(e.contains("duplicate backend 198.18.2.1"), "{e}");
    }

    #[test]
    fn weight_out_of_range() {
        let e = error_of(&GOOD.replace("weight = 3", "weight = 10001"));
        assert!(e.contains("weight 10001 is out of range"), "{e}");
    }

    #[test]
    fn schedulers_and_regions() {
        let t = GOOD.replace("port = 80", "port = 80\nscheduler = \"least-connections\"")
            + "\n[[vip.region]]\nname = \"east\"\nprefixes = [\"198.19.7.0/24\"]\nbackends = [\"198.18.2.1\"]\n";
        let c = parse(&t, "x").expect("valid");
        assert_eq!(
            c.vips[0].scheduler,
            crate::policy::sched::Scheduler::LeastConnections
        );
        assert_eq!(
            c.vips[0].regions[0].prefixes,
            vec![("198.19.7.0".parse().unwrap(), 24)]
        );
        assert!(
            error_of(&GOOD.replace("port = 80", "port = 80\nscheduler = \"random\""))
                .contains("scheduler `random`")
        );
        let e = error_of(&t.replace("backends = [\"198.18.2.1\"]", "backends = [\"198.18.2.9\"]"));
        assert!(
            e.contains("198.18.2.9 is not one of this VIP's backends"),
            "{e}"
        );
        let e = error_of(&t.replace("198.19.7.0/24", "198.19.7.0/33"));
        assert!(e.contains("is not a prefix"), "{e}");
        let e = error_of(&t.replace("198.19.7.0/24", "2001:2::/48"));
        assert!(e.contains("not of the VIP's address family"), "{e}");
    }

    #[test]
    fn bad_enums_and_http_status() {
        assert!(
            error_of(&GOOD.replace("port = 80", "port = 80\nhash = \"random\""))
                .contains("hash `random`")
        );
        assert!(
            error_of(&GOOD.replace(
                "interface = \"eth1\"",
                "interface = \"eth1\"\nxdp_mode = \"fast\""
            ))
            .contains("xdp_mode `fast`")
        );
        let http = GOOD.replace(
            "port = 80",
            "port = 80\n[vip.health]\nkind = \"http\"\nexpect_status = \"200-99\"",
        );
        assert!(error_of(&http).contains("expect_status `200-99`"));
        let ok = GOOD.replace(
            "port = 80",
            "port = 80\n[vip.health]\nkind = \"http\"\nexpect_status = \"200\"",
        );
        let c = parse(&ok, "x").expect("valid");
        assert_eq!(
            c.vips[0].health.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                status: (200, 200)
            }
        );
    }
}

#[cfg(test)]
mod example {
    #[test]
    fn shipped_example_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/lb.example.toml");
        let c = super::load(std::path::Path::new(path)).expect("the shipped example must be valid");
        assert_eq!(c.vips.len(), 1);
        assert_eq!(c.vips[0].backends.len(), 2);
    }
}
