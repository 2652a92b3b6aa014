//! The control API between `lb` CLI commands and the running agent: one
//! JSON request per line on a Unix socket (mode 0600), one JSON response
//! line back.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::config::edit::{Edit, VipAdd};
pub use crate::vocab::{BackendState, Forwarding, HashInput, Protocol, Scheduler, VipRef};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    VipList,
    BackendList {
        vip: Option<VipRef>,
    },
    Health,
    Stats,
    Reload,
    /// Any change to the configuration.
    Edit(Edit),
    /// Which backend a client's connection to a VIP goes to now, and why.
    Explain {
        vip: VipRef,
        client: std::net::SocketAddr,
    },
    /// What an edit would do to a VIP's ring and its flows, without making
    /// it (`lb explain --what-if`).
    WhatIf {
        edit: Edit,
    },
    /// Withdraw every VIP announcement (the node keeps forwarding).
    NodeDrain,
    /// Announce again what this node can serve.
    NodeResume,
    Shutdown,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `lb explain --what-if`: a prediction, nothing changed.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfInfo {
    pub vip: VipRef,
    pub ring_size_before: u32,
    pub ring_size_after: u32,
    /// Share of new flows (of the hash space) that would reach another
    /// backend than today.
    pub new_flows_moved: f64,
    /// Ring slots that would change (rings of one size only).
    pub slots_moved: Option<u64>,
    /// Ring slots per backend, now and after the edit.
    pub backends: Vec<BackendSlots>,
    /// Whether the VIP keeps a connection table (else every flow follows
    /// the ring).
    pub flow_table: bool,
    pub flows: WhatIfFlows,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct BackendSlots {
    pub address: std::net::IpAddr,
    pub slots_before: u64,
    pub slots_after: u64,
}

/// The VIP's established flows in the connection table, sorted by what the
/// edit would do to them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct WhatIfFlows {
    pub total: u64,
    /// The ring would send them elsewhere, but their entry keeps them on
    /// their backend.
    pub protected: u64,
    /// Their backend leaves (removed): scheduled again by the new ring.
    pub rescheduled: u64,
    /// The new ring sends them where they are.
    pub unaffected: u64,
    /// Where the rescheduled flows would go: (backend address, flows).
    pub rescheduled_to: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct StatusInfo {
    /// The agent's version and the commit it was built from ([`VERSION`]).
    #[serde(default)]
    pub version: String,
    pub instance: String,
    pub interface: String,
    pub attach: String,
    pub config: String,
    pub uptime_s: f64,
    pub vips: usize,
    pub backends: usize,
    pub backends_up: usize,
    /// Announcement (`[announce]`), if configured.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
    /// Per VIP: ring digest and announcement.
    #[serde(default)]
    pub vip_status: Vec<VipStatus>,
    /// What the datapath can hold and what it holds now.
    #[serde(default)]
    pub capacity: Option<CapacityStatus>,
}

/// This binary's version and the commit it was built from, as `lb
/// --version` prints it and `lb status` reports the agent's.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LB_GIT_COMMIT"),
    ")"
);

/// `lb status`: capacities (fixed when the datapath is loaded), their use,
/// and the memory the datapath's maps hold.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct CapacityStatus {
    pub max_vips: u32,
    /// VIPs plus regions (each holds a ring id).
    pub vips_used: u32,
    pub max_backends: u32,
    pub backends_used: u32,
    pub ring_slots: u32,
    pub ring_slots_used: u64,
    pub flow_table_size: u32,
    /// Sum of the kernel's `memlock` for every map the agent holds.
    pub maps_memory_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct AnnounceStatus {
    /// Kernel table holding the announced routes.
    pub table: u32,
    /// `lb node drain` is in effect.
    pub drained: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct VipStatus {
    pub vip: VipRef,
    /// Digest of the active ring as backend addresses: equal on nodes that
    /// send the same 5-tuple to the same backend.
    pub digest: String,
    /// Whether the VIP's address is announced (None: announcement off).
    pub announced: Option<bool>,
    /// Why not, when not.
    pub why_not: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct VipInfo {
    pub vip: VipRef,
    pub forwarding: Forwarding,
    pub hash: HashInput,
    pub scheduler: Scheduler,
    pub ring_size: u32,
    pub flow_table: bool,
    pub health: String,
    pub backends: usize,
    pub backends_up: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct BackendInfo {
    pub vip: VipRef,
    pub address: IpAddr,
    /// NAT VIPs: the backend's own port, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub id: u32,
    pub weight: u32,
    pub state: BackendState,
    pub last_result: String,
    pub last_latency_ms: Option<f64>,
    pub transitions: u64,
    pub next_hop_known: bool,
    /// What the health probe is, exactly: kind, address:port and path
    /// (e.g. `http 198.18.10.2:9090/healthz`); absent with `kind = "none"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Active flows (least-connections VIPs only).
    #[serde(default)]
    pub active_flows: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct TrafficInfo {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Active flows, for backends of least-connections VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u64>,
}

/// `lb stats --json`, a stable schema: `vips` and `backends` are lists of
/// objects with named fields, `verdicts` an object keyed by reason.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct StatsInfo {
    /// Seconds since the agent started (rates are differences over it).
    pub at_s: f64,
    pub vips: Vec<VipTraffic>,
    pub backends: Vec<BackendTraffic>,
    pub verdicts: std::collections::BTreeMap<String, u64>,
    /// New flows the flood guard forwarded without a table entry.
    #[serde(default)]
    pub flows_not_recorded: u64,
}

/// `lb explain`: the backend a 5-tuple maps to now, from the live maps.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExplainInfo {
    pub vip: VipRef,
    pub client: std::net::SocketAddr,
    pub scheduler: Scheduler,
    /// The flow hash the datapath computes for this 5-tuple (or client).
    pub hash: u32,
    /// The Maglev ring slot the hash selects, and its backend.
    pub slot: Option<u32>,
    pub ring_backend: Option<IpAddr>,
    /// The backend of this 5-tuple's connection-table entry, if it has one.
    pub table_backend: Option<IpAddr>,
    /// Where the next packet of this 5-tuple goes.
    pub backend: Option<IpAddr>,
    /// "connection table", "ring slot N", or why there is no answer.
    pub via: String,
    /// The second chance: the backend a packet of this 5-tuple that is not
    /// a SYN also names, as its second hop, when the ring decides and the
    /// VIP's previous ring gave the slot to another backend.
    pub second_hop: Option<IpAddr>,
}

/// `{"vip": "198.18.0.100:80/tcp", "packets": …, "bytes": …, "new_flows": …}`
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct VipTraffic {
    pub vip: VipRef,
    #[serde(flatten)]
    pub traffic: TrafficInfo,
}

/// `{"vip": …, "backend": "198.18.2.1", "packets": …, …, "active": …}`
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct BackendTraffic {
    pub vip: VipRef,
    pub backend: IpAddr,
    #[serde(flatten)]
    pub traffic: TrafficInfo,
}

/// Sends one request to the agent at `socket` and returns its data.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let mut s = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied on the control socket {}: it is root-only (mode 0600); run the command as root \
             (e.g. with sudo)",
            socket.display()
        ),
        Err(e) => bail!(
            "the agent is not running (cannot connect to {}: {e}); start it with `lb run --config FILE`, \
             or point at its socket with --socket",
            socket.display()
        ),
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .context("sending the request")?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .context("reading the agent's answer")?;
    let r: Response =
        serde_json::from_str(&resp).context("the agent's answer is not valid JSON")?;
    if !r.ok {
        bail!(
            "{}",
            r.error
                .unwrap_or_else(|| "the agent refused the request".into())
        );
    }
    Ok(r.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_refs() {
        let v: VipRef = "198.18.0.100:80".parse().unwrap();
        assert_eq!(v.to_string(), "198.18.0.100:80/tcp");
        let v: VipRef = "[2001:2::100]:53/udp".parse().unwrap();
        assert_eq!((v.port, v.protocol), (53, Protocol::Udp));
        assert_eq!(v.to_string(), "[2001:2::100]:53/udp");
        assert!(
            "198.18.0.100"
                .parse::<VipRef>()
                .unwrap_err()
                .contains("ADDRESS:PORT")
        );
        assert!(
            "198.18.0.100:80/sctp"
                .parse::<VipRef>()
                .unwrap_err()
                .contains("sctp")
        );
        // In JSON a VIP is its CLI spelling.
        let j = serde_json::to_string(&v).unwrap();
        assert_eq!(j, "\"[2001:2::100]:53/udp\"");
        assert_eq!(serde_json::from_str::<VipRef>(&j).unwrap(), v);
    }

    #[test]
    fn requests_round_trip() {
        let r = Request::Edit(Edit::BackendAdd {
            vip: "198.18.0.100:80".parse().unwrap(),
            address: "198.18.2.9".parse().unwrap(),
            weight: 2,
            port: None,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(
            s.contains("\"cmd\":\"edit\"") && s.contains("\"edit\":\"backend-add\""),
            "{s}"
        );
        let back: Request = serde_json::from_str(&s).unwrap();
        assert!(matches!(
            back,
            Request::Edit(Edit::BackendAdd { weight: 2, .. })
        ));
    }
}
