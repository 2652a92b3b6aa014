//! `lb trace`: sets the datapath's trace filter in the instance's pinned
//! `TRACE_CFG`, reads the records the datapath leaves in the pinned `TRACE`
//! ring buffer, and explains each one. One tracer per instance at a time;
//! the filter names its process, so a tracer that died is replaced rather
//! than blocking the next one. Dropping the [`Tracer`] switches tracing off.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use lb_common::{
    AF_INET, AF_INET6, SCHED_LEAST_CONN, SCHED_ROUND_ROBIN, TraceCfg, TraceRecord, trace_ring,
    trace_table,
};
use serde::Serialize;

use crate::vocab::Protocol;

/// Which packets to trace; `None` fields match anything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Destination address (a VIP's, or any other to see why it is not one).
    pub dst: Option<IpAddr>,
    pub dport: Option<u16>,
    pub proto: Option<Protocol>,
    /// Client address and prefix length.
    pub client: Option<(IpAddr, u8)>,
    pub client_port: Option<u16>,
}

fn addr16(a: IpAddr) -> ([u8; 16], u8, u32) {
    match a {
        IpAddr::V4(v) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v.octets());
            (o, AF_INET, 32)
        }
        IpAddr::V6(v) => (v.octets(), AF_INET6, 128),
    }
}

impl Filter {
    /// The datapath's form, owned by process `pid`.
    pub fn to_cfg(&self, pid: u32) -> Result<TraceCfg> {
        let mut c = TraceCfg {
            owner_pid: pid,
            dport: self.dport.unwrap_or(0),
            sport: self.client_port.unwrap_or(0),
            proto: match self.proto {
                Some(Protocol::Tcp) => lb_common::PROTO_TCP,
                Some(Protocol::Udp) => lb_common::PROTO_UDP,
                None => 0,
            },
            ..Default::default()
        };
        let mut family = None;
        if let Some(d) = self.dst {
            let (a, f, bits) = addr16(d);
            (c.dst, c.dst_len) = (a, bits);
            family = Some(f);
        }
        if let Some((s, len)) = self.client {
            let (a, f, bits) = addr16(s);
            if u32::from(len) > bits {
                bail!("--client {s}/{len}: the prefix is longer than the address ({bits} bits)");
            }
            if family.is_some_and(|x| x != f) {
                bail!("--client {s} and the destination are of different address families");
            }
            (c.src, c.src_len) = (a, u32::from(len));
            family = Some(f);
        }
        c.family = family.unwrap_or(0);
        Ok(c)
    }
}

/// An active trace on one instance's datapath.
pub struct Tracer {
    cfg: Array<MapData, TraceCfg>,
    ring: RingBuf<MapData>,
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Tracer {
    /// Opens the instance's pinned trace maps and starts tracing `filter`.
    pub fn start(instance: &str, filter: &Filter) -> Result<Self> {
        let maps = super::loader::pin_dir(instance).join("maps");
        let open = |name: &str| {
            MapData::from_pin(maps.join(name)).with_context(|| {
                format!(
                    "no pinned `{name}` map for instance `{instance}` in {}: is its agent running \
                     (a version with `lb trace`), and are you root?",
                    maps.display()
                )
            })
        };
        let mut cfg: Array<MapData, TraceCfg> = Array::try_from(Map::Array(open("TRACE_CFG")?))?;
        let mut ring = RingBuf::try_from(Map::RingBuf(open("TRACE")?))?;
        let current = cfg.get(&0, 0)?;
        let me = std::process::id();
        if current.owner_pid != 0 && current.owner_pid != me && pid_alive(current.owner_pid) {
            bail!(
                "another `lb trace` (pid {}) is tracing instance `{instance}`; one at a time",
                current.owner_pid
            );
        }
        // Records a dead tracer left unread are not ours.
        while ring.next().is_some() {}
        cfg.set(0, filter.to_cfg(me)?, 0)?;
        Ok(Self { cfg, ring })
    }

    /// The next record, waiting until `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Option<TraceRecord> {
        loop {
            if let Some(item) = self.ring.next() {
                let bytes: &[u8] = &item;
                if bytes.len() >= std::mem::size_of::<TraceRecord>() {
                    return Some(bytemuck::pod_read_unaligned(
                        &bytes[..std::mem::size_of::<TraceRecord>()],
                    ));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.cfg.set(0, TraceCfg::default(), 0);
    }
}

/// One traced packet, explained (the `--json` form of `lb trace`).
#[derive(Clone, Debug, Serialize)]
pub struct Explained {
    /// Nanoseconds since the first record of this trace.
    pub t_ns: u64,
    pub client: String,
    pub dst: String,
    pub protocol: &'static str,
    /// The VIP matched (`addr:port/proto`), or null.
    pub vip: Option<String>,
    /// What the connection table said: `hit`, `miss`, `syn` (a new
    /// connection on a known 5-tuple), `backend-down`, `idle`, `not-used`.
    pub table: &'static str,
    pub scheduler: Option<&'static str>,
    /// Which ring scheduled a new flow: `vip`, `region`, `region-fallback`.
    pub ring: Option<&'static str>,
    /// Maglev: the ring slot (hash % ring size) and the ring size.
    pub slot: Option<u32>,
    pub ring_size: Option<u32>,
    pub backend_id: Option<u32>,
    /// The backend's address, when the agent could name it.
    pub backend: Option<IpAddr>,
    /// `dsr` (MACs rewritten), `ipip` or `gue` (encapsulated), when
    /// forwarded.
    pub rewrite: Option<&'static str>,
    /// The second chance's second hop named in the GUE header (its
    /// address when the agent could name it, else its id).
    pub second_hop: Option<String>,
    pub verdict: &'static str,
    pub action: &'static str,
}

fn sockaddr(a: [u8; 16], port: u16, v4: bool) -> String {
    if v4 {
        format!("{}.{}.{}.{}:{port}", a[0], a[1], a[2], a[3])
    } else {
        format!("[{}]:{port}", std::net::Ipv6Addr::from(a))
    }
}

/// Explains `r`; `backend_of` names backend ids, `vip_of` the VIP of a
/// matched packet (its id is per node: shown by address instead).
pub fn explain(
    r: &TraceRecord,
    t0_ns: u64,
    backend_of: impl Fn(u32) -> Option<IpAddr>,
) -> Explained {
    let k = &r.key;
    // IPv4 addresses sit in the first four bytes, the rest zero.
    let v4 = k.src[4..] == [0; 12] && k.dst[4..] == [0; 12];
    let protocol = match k.proto {
        lb_common::PROTO_TCP => "tcp",
        lb_common::PROTO_UDP => "udp",
        _ => "other",
    };
    let matched = r.vip_id != u32::MAX;
    let forwarded = matches!(
        r.verdict as u32,
        lb_common::verdict::TX | lb_common::verdict::REDIRECT | lb_common::verdict::ICMP_TO_FLOW
    );
    let scheduler = match r.scheduler as u32 {
        SCHED_ROUND_ROBIN => "round-robin",
        SCHED_LEAST_CONN => "least-connections",
        _ => "maglev",
    };
    let ring = match r.ring {
        trace_ring::VIP => Some("vip"),
        trace_ring::REGION => Some("region"),
        trace_ring::REGION_FALLBACK => Some("region-fallback"),
        _ => None,
    };
    let maglev_slot = ring.is_some() && scheduler == "maglev" && r.ring_size > 0;
    Explained {
        t_ns: r.ts_ns.saturating_sub(t0_ns),
        client: sockaddr(k.src, k.sport, v4),
        dst: sockaddr(k.dst, k.dport, v4),
        protocol,
        vip: matched.then(|| format!("{}/{protocol}", sockaddr(k.dst, k.dport, v4))),
        table: match r.table {
            trace_table::HIT => "hit",
            trace_table::MISS => "miss",
            trace_table::SYN => "syn",
            trace_table::BACKEND_DOWN => "backend-down",
            trace_table::IDLE => "idle",
            _ => "not-used",
        },
        scheduler: matched.then_some(scheduler),
        ring,
        slot: maglev_slot.then(|| r.hash % r.ring_size),
        ring_size: ring.map(|_| r.ring_size),
        backend_id: (r.backend_id != 0).then_some(r.backend_id),
        backend: (r.backend_id != 0)
            .then(|| backend_of(r.backend_id))
            .flatten(),
        rewrite: forwarded.then_some(match r.ipip {
            0 => "dsr",
            2 => "gue",
            _ => "ipip",
        }),
        second_hop: (r.second_hop_id != 0).then(|| {
            backend_of(r.second_hop_id)
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("backend id {}", r.second_hop_id))
        }),
        verdict: lb_common::verdict::NAMES
            .get(r.verdict as usize)
            .copied()
            .unwrap_or("unknown"),
        action: match r.action {
            0 => "XDP_ABORTED",
            1 => "XDP_DROP",
            2 => "XDP_PASS",
            3 => "XDP_TX",
            4 => "XDP_REDIRECT",
            _ => "?",
        },
    }
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10.6}s {} > {} {}",
            self.t_ns as f64 / 1e9,
            self.client,
            self.dst,
            self.protocol
        )?;
        let Some(vip) = &self.vip else {
            return write!(
                f,
                "  not a VIP: {} ({})",
                self.verdict,
                if self.action == "XDP_PASS" {
                    "passed to the kernel"
                } else {
                    self.action
                }
            );
        };
        write!(f, "  VIP {vip}  table {}", self.table)?;
        if let Some(ring) = self.ring {
            write!(f, "  {} ring {ring}", self.scheduler.unwrap_or("?"))?;
            if let (Some(slot), Some(size)) = (self.slot, self.ring_size) {
                write!(f, " slot {slot}/{size}")?;
            }
        }
        match (self.backend, self.backend_id) {
            (Some(b), Some(id)) => write!(f, "  → {b} (id {id})")?,
            (None, Some(id)) => write!(f, "  → backend id {id}")?,
            _ => {}
        }
        if let Some(r) = self.rewrite {
            write!(f, "  {r}")?;
        }
        if let Some(h) = &self.second_hop {
            write!(f, " second hop {h}")?;
        }
        write!(f, "  {} ({})", self.verdict, self.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{FlowKey, PROTO_TCP, verdict};

    fn key(dport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport: 40001,
            dport,
            proto: PROTO_TCP,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[198, 18, 10, 2]);
        k.dst[..4].copy_from_slice(&[198, 18, 0, 100]);
        k
    }

    #[test]
    fn explains_a_scheduled_syn_and_a_non_vip_packet() {
        let syn = TraceRecord {
            ts_ns: 1_002_000,
            key: key(80),
            vip_id: 0,
            backend_id: 3,
            ring_id: 0,
            ring_size: 65537,
            hash: 65537 * 7 + 4711,
            verdict: verdict::TX as u8,
            action: 3,
            table: trace_table::SYN,
            ring: trace_ring::VIP,
            scheduler: 0,
            ..Default::default()
        };
        let e = explain(&syn, 1_000_000, |id| {
            (id == 3).then(|| "198.18.2.3".parse().unwrap())
        });
        assert_eq!(e.slot, Some(4711));
        assert_eq!(
            e.to_string(),
            "  0.000002s 198.18.10.2:40001 > 198.18.0.100:80 tcp  VIP 198.18.0.100:80/tcp  table syn  \
             maglev ring vip slot 4711/65537  → 198.18.2.3 (id 3)  dsr  tx (XDP_TX)"
        );
        let other = TraceRecord {
            ts_ns: 1_000_000,
            key: key(81),
            vip_id: u32::MAX,
            verdict: verdict::PASS_NON_VIP as u8,
            action: 2,
            ..Default::default()
        };
        let e = explain(&other, 1_000_000, |_| None);
        assert_eq!(e.vip, None);
        assert_eq!(
            e.to_string(),
            "  0.000000s 198.18.10.2:40001 > 198.18.0.100:81 tcp  not a VIP: pass_non_vip (passed to the kernel)"
        );
    }
}
