//! The file as written: serde's view of the TOML (every value with its
//! span, so errors can point at it) and the defaults of omitted keys.
//! `validate` turns it into the model in `mod.rs`.

use serde::Deserialize;
use toml::Spanned;

use super::{DEFAULT_ANNOUNCE_TABLE, DEFAULT_INTERVAL_MS, DEFAULT_NAT_PORTS, DEFAULT_TIMEOUT_MS};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) agent: RawAgent,
    pub(super) announce: Option<RawAnnounce>,
    #[serde(default)]
    pub(super) vip: Vec<RawVip>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    #[serde(default = "default_announce_table")]
    pub(super) table: Spanned<u32>,
}

pub(super) fn default_announce_table() -> Spanned<u32> {
    sp(DEFAULT_ANNOUNCE_TABLE)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) interface: String,
    #[serde(default = "default_mode")]
    pub(super) xdp_mode: Spanned<String>,
    #[serde(default = "default_flow_table")]
    pub(super) flow_table_size: Spanned<u32>,
    #[serde(default = "default_socket")]
    pub(super) control_socket: String,
    #[serde(default = "default_instance")]
    pub(super) instance: String,
    pub(super) metrics_listen: Option<Spanned<String>>,
    pub(super) api_listen: Option<Spanned<String>>,
    pub(super) api_token_file: Option<Spanned<String>>,
    pub(super) netns: Option<String>,
    #[serde(default = "default_next_hop")]
    pub(super) next_hop: Spanned<String>,
    #[serde(default = "default_src4")]
    pub(super) ipip_source_v4: Spanned<String>,
    #[serde(default = "default_src6")]
    pub(super) ipip_source_v6: Spanned<String>,
    #[serde(default = "default_new_flow_limit")]
    pub(super) new_flow_limit: u32,
    #[serde(default = "default_max_vips")]
    pub(super) max_vips: Spanned<u32>,
    #[serde(default = "default_max_backends")]
    pub(super) max_backends: Spanned<u32>,
    #[serde(default = "default_ring_slots")]
    pub(super) ring_slots: Spanned<u32>,
    #[serde(default)]
    pub(super) nat_source_v4: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) nat_source_v6: Vec<Spanned<String>>,
    #[serde(default = "default_nat_ports")]
    pub(super) nat_ports: Spanned<String>,
    #[serde(default)]
    pub(super) reply_interfaces: Vec<String>,
    #[serde(default = "default_ipip_mtu")]
    pub(super) ipip_mtu: Spanned<u16>,
    #[serde(default = "default_gue_port")]
    pub(super) gue_port: Spanned<u16>,
}

pub(super) fn default_gue_port() -> Spanned<u16> {
    sp(lb_common::DEFAULT_GUE_PORT)
}

pub(super) fn default_ipip_mtu() -> Spanned<u16> {
    sp(1500)
}

pub(super) fn default_nat_ports() -> Spanned<String> {
    sp(DEFAULT_NAT_PORTS.into())
}

pub(super) fn default_max_vips() -> Spanned<u32> {
    sp(lb_common::MAX_VIPS)
}
pub(super) fn default_max_backends() -> Spanned<u32> {
    sp(lb_common::MAX_BACKENDS)
}
pub(super) fn default_ring_slots() -> Spanned<u32> {
    sp(lb_common::DEFAULT_RING_SLOTS)
}

pub(super) fn default_new_flow_limit() -> u32 {
    lb_common::DEFAULT_NEW_FLOW_LIMIT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub(super) address: Spanned<String>,
    pub(super) port: u16,
    #[serde(default = "default_proto")]
    pub(super) protocol: Spanned<String>,
    #[serde(default = "default_forwarding")]
    pub(super) forwarding: Spanned<String>,
    #[serde(default = "default_hash")]
    pub(super) hash: Spanned<String>,
    #[serde(default = "default_ring")]
    pub(super) ring_size: Spanned<u32>,
    #[serde(default = "default_true")]
    pub(super) flow_table: bool,
    #[serde(default)]
    pub(super) idle_timeout: u32,
    /// Seconds; default: `DEFAULT_SECOND_CHANCE_S` for `gue` Maglev VIPs.
    pub(super) second_chance: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default = "default_scheduler")]
    pub(super) scheduler: Spanned<String>,
    #[serde(default)]
    pub(super) backend: Vec<RawBackend>,
    #[serde(default)]
    pub(super) region: Vec<RawRegion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    #[serde(default = "default_check")]
    pub(super) kind: Spanned<String>,
    #[serde(default = "default_interval")]
    pub(super) interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub(super) timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub(super) rise: u32,
    #[serde(default = "default_fall")]
    pub(super) fall: u32,
    pub(super) port: Option<u16>,
    #[serde(default = "default_path")]
    pub(super) path: String,
    #[serde(default = "default_status")]
    pub(super) expect_status: Spanned<String>,
    #[serde(default = "default_via")]
    pub(super) via: Spanned<String>,
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
            via: default_via(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    pub(super) name: String,
    pub(super) prefixes: Vec<Spanned<String>>,
    pub(super) backends: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: Spanned<String>,
    pub(super) port: Option<Spanned<u16>>,
    #[serde(default = "default_weight")]
    pub(super) weight: Spanned<u32>,
    #[serde(default)]
    pub(super) drain: bool,
}

pub(super) fn sp<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
pub(super) fn default_mode() -> Spanned<String> {
    sp("auto".into())
}
pub(super) fn default_flow_table() -> Spanned<u32> {
    sp(lb_common::DEFAULT_FLOW_TABLE_SIZE)
}
pub(super) fn default_socket() -> String {
    "/run/lb/lb.sock".into()
}
pub(super) fn default_instance() -> String {
    "default".into()
}
pub(super) fn default_next_hop() -> Spanned<String> {
    sp("map".into())
}
pub(super) fn default_src4() -> Spanned<String> {
    sp("198.19.0.0".into())
}
pub(super) fn default_src6() -> Spanned<String> {
    sp("2001:2:0:ff::".into())
}
pub(super) fn default_proto() -> Spanned<String> {
    sp("tcp".into())
}
pub(super) fn default_forwarding() -> Spanned<String> {
    sp("dsr".into())
}
pub(super) fn default_hash() -> Spanned<String> {
    sp("5-tuple".into())
}
pub(super) fn default_ring() -> Spanned<u32> {
    sp(lb_common::DEFAULT_RING_SIZE)
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_check() -> Spanned<String> {
    sp("tcp".into())
}
pub(super) fn default_interval() -> u64 {
    DEFAULT_INTERVAL_MS
}
pub(super) fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}
pub(super) fn default_rise() -> u32 {
    2
}
pub(super) fn default_fall() -> u32 {
    3
}
pub(super) fn default_path() -> String {
    "/healthz".into()
}
pub(super) fn default_via() -> Spanned<String> {
    sp("path".into())
}

fn default_status() -> Spanned<String> {
    sp("200-399".into())
}
pub(super) fn default_scheduler() -> Spanned<String> {
    sp("maglev".into())
}
pub(super) fn default_weight() -> Spanned<u32> {
    sp(1)
}
