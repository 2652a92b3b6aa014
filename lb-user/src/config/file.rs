//! A configuration file written in code: the lab, the demo and the tests
//! build the agent's file with these types and write it with
//! [`File::to_toml`] (serde → TOML), so each key is spelled here and in
//! `raw` (which reads it), never in format strings, and values are the
//! vocabulary's enums. Every key the file may leave out is an `Option` (or
//! an empty list) that is then left out: the file says what its builder
//! set and nothing else. `tests` parses what it writes.

use serde::Serialize;

use crate::vocab::{Forwarding, HashInput, ProbeVia, Protocol, Scheduler, XdpMode};

/// The whole file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct File {
    pub agent: Agent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce: Option<Announce>,
    #[serde(rename = "vip", skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<Vip>,
}

impl File {
    /// The file's text, headed by a comment line (`# {comment}`).
    pub fn to_toml(&self, comment: &str) -> String {
        let body = toml::to_string(self).expect("every field of a config file serializes");
        format!("# {comment}\n{body}")
    }

    /// Every VIP's backends, in order (each VIP's in turn).
    pub fn backends_mut(&mut self) -> impl Iterator<Item = &mut Backend> {
        self.vips.iter_mut().flat_map(|v| v.backends.iter_mut())
    }
}

/// `[agent]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Agent {
    pub interface: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<XdpMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_table_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vips: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_backends: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_slots: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nat_source_v4: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nat_source_v6: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_ports: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reply_interfaces: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipip_mtu: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

impl Agent {
    /// An agent instance of the lab's or a test's, in network namespace
    /// `netns` on `interface`: native XDP, a 65,536-flow table, its own
    /// instance name and control socket.
    pub fn instance(
        interface: &str,
        instance: &str,
        socket: &std::path::Path,
        netns: &str,
    ) -> Self {
        Self {
            interface: interface.into(),
            xdp_mode: Some(XdpMode::Native),
            flow_table_size: Some(65536),
            instance: Some(instance.into()),
            control_socket: Some(socket.display().to_string()),
            netns: Some(netns.into()),
            ..Default::default()
        }
    }
}

/// `[announce]`.
#[derive(Clone, Debug, Serialize)]
pub struct Announce {
    pub table: u32,
}

/// One `[[vip]]`. (The plain keys come before the tables: TOML writes a
/// table's values before its subtables.)
#[derive(Clone, Debug, Default, Serialize)]
pub struct Vip {
    pub address: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashInput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Scheduler>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_table: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_chance: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    #[serde(rename = "region", skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<Region>,
}

impl Vip {
    /// A VIP at `address`:`port` with these backends, every other key left
    /// to its default.
    pub fn new(address: impl Into<String>, port: u16, backends: Vec<Backend>) -> Self {
        Self {
            address: address.into(),
            port,
            backends,
            ..Default::default()
        }
    }
}

/// `[vip.health]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    /// "none", "tcp" or "http" (`vocab::CheckKind`'s spellings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<ProbeVia>,
}

impl Health {
    /// No health checks: every backend counts as up.
    pub fn none() -> Self {
        Self {
            kind: Some("none"),
            ..Default::default()
        }
    }

    /// A TCP connect.
    pub fn tcp() -> Self {
        Self {
            kind: Some("tcp"),
            ..Default::default()
        }
    }

    /// An HTTP GET of `path`.
    pub fn http(path: &str) -> Self {
        Self {
            kind: Some("http"),
            path: Some(path.into()),
            ..Default::default()
        }
    }
}

/// One `[[vip.backend]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Backend {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

impl Backend {
    /// A backend at `address`, weight and port left to their defaults.
    pub fn at(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Default::default()
        }
    }
}

/// One `[[vip.region]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Region {
    pub name: String,
    pub prefixes: Vec<String>,
    pub backends: Vec<String>,
}
