//! `lb run`: the agent. It loads the datapath with its maps pinned under
//! `/sys/fs/bpf/lb/<instance>/`, attaches it (or adopts the datapath an
//! earlier agent left running), programs it from the configuration, health
//! checks every backend, and serves the control API.
//!
//! Everything that changes the datapath goes through [`State::reconcile`]:
//! startup, `SIGHUP`/`lb reload`, and CLI changes (which edit the config
//! file's text, validate it like a file, reconcile, then save it). So a bad
//! change is refused before anything is touched, and only the difference is
//! applied.
//!
//! Backend ids live in the pinned `BACKEND_IDS` map with a high-water mark,
//! so they are stable across restarts and never reused while the agent runs.

mod announce;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, maps::HashMap as BpfHashMap};
use lb_common::{
    AF_INET, AF_INET6, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, Backend, BackendIdKey,
    MAX_BACKENDS, MAX_VIPS, VipKey, VipMeta,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
    sync::Notify,
};

use crate::{
    api::{
        self, AnnounceStatus, BackendInfo, Request, Response, StatsInfo, StatusInfo, TrafficInfo,
        VipInfo, VipRef, VipStatus,
    },
    confedit::{self, Edit},
    config::{self, BackendCfg, CheckKind, Config, Forwarding, HashInput, Protocol, Vip, XdpMode},
    dataplane::Dataplane,
    health::{HealthState, Outcome, Transition, probe},
    iproute, loader, maglev,
};

/// A health transition, as the agent reports it to an embedding caller.
#[derive(Clone, Debug)]
pub struct Event {
    pub vip: VipRef,
    pub backend: IpAddr,
    pub up: bool,
    pub reason: String,
    pub at: Instant,
}

fn addr16(a: IpAddr) -> ([u8; 16], u8) {
    match a {
        IpAddr::V4(v) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v.octets());
            (o, AF_INET)
        }
        IpAddr::V6(v) => (v.octets(), AF_INET6),
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn vip_key(v: &Vip) -> VipKey {
    let (addr, family) = addr16(v.address);
    let proto = match v.protocol {
        Protocol::Tcp => lb_common::PROTO_TCP,
        Protocol::Udp => lb_common::PROTO_UDP,
    };
    VipKey {
        addr,
        port: v.port,
        proto,
        family,
    }
}

fn vip_ref(v: &Vip) -> VipRef {
    VipRef {
        address: v.address,
        port: v.port,
        protocol: proto_name(v.protocol).into(),
    }
}

fn vip_flags(v: &Vip) -> u32 {
    let mut f = 0;
    if v.forwarding == Forwarding::Ipip {
        f |= lb_common::VIP_F_IPIP;
    }
    if v.hash == HashInput::SourceIp {
        f |= lb_common::VIP_F_HASH_SRC_IP;
    }
    if !v.flow_table {
        f |= lb_common::VIP_F_NO_FLOW_TABLE;
    }
    if !v.regions.is_empty() {
        f |= lb_common::VIP_F_REGIONS;
    }
    f
}

/// A client prefix as the REGIONS trie stores it.
fn prefix16(a: IpAddr) -> [u8; 16] {
    addr16(a).0
}

/// Seconds on the clock `bpf_ktime_get_ns` reads (CLOCK_MONOTONIC).
fn monotonic_s() -> u64 {
    // SAFETY: clock_gettime into a zeroed timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64
}

/// The next hop towards an address as the kernel knows it.
struct NextHop {
    dev: String,
    own_mac: [u8; 6],
    ifindex: u32,
    /// The neighbour's MAC, once resolved.
    mac: Option<[u8; 6]>,
}

/// The route, egress device and neighbour entry for `addr` (see `iproute`).
fn next_hop(addr: IpAddr) -> Option<NextHop> {
    let (dev, via) = iproute::route(addr)?;
    let (own_mac, ifindex) = iproute::link(&dev)?;
    let mac = iproute::neighbour(&via, &dev);
    Some(NextHop {
        dev,
        own_mac,
        ifindex,
        mac,
    })
}

struct BackendRt {
    cfg: BackendCfg,
    id: u32,
    health: HealthState,
    last_result: String,
    last_latency_ms: Option<f64>,
    transitions: u64,
    resolved: bool,
    /// Health task generation: a task whose generation no longer matches
    /// (backend removed, health settings changed) ends.
    generation: u64,
}

impl BackendRt {
    fn up(&self) -> bool {
        self.health.up
    }
    fn in_ring(&self) -> bool {
        self.up() && !self.cfg.drain && self.cfg.weight > 0
    }
    fn state_name(&self) -> &'static str {
        if !self.up() {
            "down"
        } else if self.cfg.drain || self.cfg.weight == 0 {
            "draining"
        } else {
            "up"
        }
    }
}

struct VipRt {
    cfg: Vip,
    key: VipKey,
    vip_id: u32,
    backends: Vec<BackendRt>,
    regions: Vec<RegionRt>,
    /// Digest of the active ring as backend addresses (not ids, which are
    /// per node): equal on every node that makes the same choices.
    digest: u64,
}

/// FNV-1a over each ring slot's backend address (zeros for an empty slot).
fn ring_digest(table: &[u32], addr_of: impl Fn(u32) -> Option<[u8; 16]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in table {
        for b in addr_of(*id).unwrap_or([0; 16]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A region and its ring slot (allocated like a VIP id). With no live
/// backend its prefixes are removed, so its clients use the whole VIP.
struct RegionRt {
    cfg: config::Region,
    ring_id: u32,
}

/// A health task to start: (VIP key, backend address, generation).
type Spawn = (VipKey, IpAddr, u64);

struct State {
    ebpf: Ebpf,
    cfg_path: PathBuf,
    cfg: Config,
    vips: Vec<VipRt>,
    attach_desc: String,
    started: Instant,
    events: Option<std::sync::mpsc::Sender<Event>>,
    next_generation: u64,
    /// VIP announcement (`[announce]`): the kernel table of our routes.
    announce: Option<announce::Routes>,
    /// `lb node drain`: withdraw everything, whatever the backends say.
    drained: bool,
    /// Until the datapath is attached nothing is announced or withdrawn.
    attached: bool,
}

/// Sentinel key in BACKEND_IDS whose value is the next unused backend id.
const HIGH_WATER: BackendIdKey = BackendIdKey {
    vip: VipKey {
        addr: [0; 16],
        port: 0,
        proto: 0,
        family: 0,
    },
    addr: [0; 16],
};

impl State {
    fn ids(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, BackendIdKey, u32>> {
        let m = self
            .ebpf
            .map_mut(lb_common::MAP_BACKEND_IDS)
            .context("BACKEND_IDS map missing")?;
        Ok(BpfHashMap::try_from(m)?)
    }

    /// The backend id of (VIP, address): the one it already has (also from
    /// an earlier agent), or a new one above every id handed out so far.
    fn backend_id(&mut self, key: &VipKey, addr: IpAddr) -> Result<u32> {
        let k = BackendIdKey {
            vip: *key,
            addr: addr16(addr).0,
        };
        let mut ids = self.ids()?;
        if let Ok(id) = ids.get(&k, 0) {
            return Ok(id);
        }
        let next = ids.get(&HIGH_WATER, 0).unwrap_or(1).max(1);
        let id = if next < MAX_BACKENDS {
            next
        } else {
            // Ids exhausted: take one no backend holds and no flow refers to.
            let held: HashSet<u32> = ids.iter().filter_map(|r| r.ok()).map(|(_, v)| v).collect();
            let in_flows: HashSet<u32> = Dataplane::new(&mut self.ebpf)
                .flows()?
                .into_iter()
                .map(|(_, f)| f.backend_id)
                .collect();
            let id = (1..MAX_BACKENDS)
                .find(|i| !held.contains(i) && !in_flows.contains(i))
                .ok_or_else(|| anyhow!("all {MAX_BACKENDS} backend ids are in use"))?;
            ids = self.ids()?;
            id
        };
        ids.insert(k, id, 0)?;
        ids.insert(HIGH_WATER, (id + 1).max(next), 0)?;
        Ok(id)
    }

    fn forget_backend(&mut self, key: &VipKey, addr: IpAddr, id: u32) -> Result<()> {
        let k = BackendIdKey {
            vip: *key,
            addr: addr16(addr).0,
        };
        let _ = self.ids()?.remove(&k);
        // A zeroed entry: flows that still point here are rescheduled.
        Dataplane::new(&mut self.ebpf).set_backend(id, &Backend::default())?;
        Ok(())
    }

    fn rebuild_ring(&mut self, vi: usize) -> Result<()> {
        let v = &self.vips[vi];
        let entries: Vec<_> = v
            .backends
            .iter()
            .filter(|b| b.in_ring())
            .map(|b| maglev::Entry {
                id: b.id,
                addr: addr16(b.cfg.address).0,
                weight: b.cfg.weight,
            })
            .collect();
        let table = crate::sched::ring(v.cfg.scheduler, &entries, v.cfg.ring_size);
        let digest = ring_digest(&table, |id| {
            entries.iter().find(|e| e.id == id).map(|e| e.addr)
        });
        self.vips[vi].digest = digest;
        let v = &self.vips[vi];
        let key = v.key;
        let vip_id = v.vip_id;
        Dataplane::new(&mut self.ebpf)
            .install_ring(&key, &table)
            .context("installing ring")?;
        // Each region: its live backends' ring, or (none live) no entry at
        // all, so that its clients fall back to the whole VIP.
        for ri in 0..self.vips[vi].regions.len() {
            let r = &self.vips[vi].regions[ri];
            let sched = self.vips[vi].cfg.scheduler;
            let m = self.vips[vi].cfg.ring_size;
            let sub: Vec<_> = entries
                .iter()
                .filter(|e| r.cfg.backends.iter().any(|a| addr16(*a).0 == e.addr))
                .copied()
                .collect();
            let ring_id = r.ring_id;
            let prefixes: Vec<([u8; 16], u32)> = r
                .cfg
                .prefixes
                .iter()
                .map(|(a, l)| (prefix16(*a), *l as u32))
                .collect();
            let mut dp = Dataplane::new(&mut self.ebpf);
            if sub.is_empty() {
                for (a, l) in &prefixes {
                    dp.remove_region(vip_id, *a, *l)?;
                }
                continue;
            }
            dp.install_region_ring(
                vip_id,
                &prefixes,
                ring_id,
                &crate::sched::ring(sched, &sub, m),
            )?;
        }
        Ok(())
    }

    /// Ring slots taken: VIP ids and region ring slots share the ring space.
    fn ring_ids_in_use(&self) -> HashSet<u32> {
        let vips = self.vips.iter().map(|v| v.vip_id);
        vips.chain(
            self.vips
                .iter()
                .flat_map(|v| v.regions.iter().map(|r| r.ring_id)),
        )
        .collect()
    }

    /// Replaces VIP `vi`'s regions: old prefixes removed, ring slots for new
    /// regions taken from the ids no VIP or region uses.
    fn set_regions(&mut self, vi: usize, regions: &[config::Region]) -> Result<()> {
        let vip_id = self.vips[vi].vip_id;
        for r in std::mem::take(&mut self.vips[vi].regions) {
            for (a, l) in &r.cfg.prefixes {
                Dataplane::new(&mut self.ebpf).remove_region(vip_id, prefix16(*a), *l as u32)?;
            }
        }
        for r in regions {
            let used = self.ring_ids_in_use();
            let ring_id = (0..MAX_VIPS)
                .rev()
                .find(|i| !used.contains(i))
                .ok_or_else(|| {
                    anyhow!(
                        "no ring slot left for region `{}` (VIPs and regions share {MAX_VIPS})",
                        r.name
                    )
                })?;
            self.vips[vi].regions.push(RegionRt {
                cfg: r.clone(),
                ring_id,
            });
        }
        Ok(())
    }

    /// Least-connections: overwrite each backend's active count with the
    /// number of counted flows in the connection table, so the datapath's
    /// atomic counts cannot drift (evictions and idle expiry never
    /// decrement them).
    fn reconcile_active(&mut self) -> Result<()> {
        let lc: Vec<u32> = self
            .vips
            .iter()
            .filter(|v| v.cfg.scheduler == crate::sched::Scheduler::LeastConnections)
            .flat_map(|v| v.backends.iter().map(|b| b.id))
            .collect();
        if lc.is_empty() {
            return Ok(());
        }
        let mut counts: std::collections::HashMap<u32, u64> =
            lc.iter().map(|id| (*id, 0)).collect();
        let now_s = monotonic_s();
        for (_, f) in Dataplane::new(&mut self.ebpf).flows()? {
            let idle_limit = self
                .vips
                .iter()
                .find(|v| v.vip_id == f.vip_id as u32)
                .map(|v| v.cfg.idle_timeout_s as u64)
                .unwrap_or(0);
            let expired = idle_limit != 0 && now_s.saturating_sub(f.last_seen_s) > idle_limit;
            if f.flags & lb_common::FLOW_F_COUNTED != 0
                && !expired
                && let Some(c) = counts.get_mut(&f.backend_id)
            {
                *c += 1;
            }
        }
        let mut dp = Dataplane::new(&mut self.ebpf);
        for (id, n) in counts {
            dp.set_active(id, n)?;
        }
        Ok(())
    }

    /// Writes backend `bi` of VIP `vi` with its next hop and state.
    fn write_backend(&mut self, vi: usize, bi: usize) -> Result<()> {
        let b = &self.vips[vi].backends[bi];
        let (addr, family) = addr16(b.cfg.address);
        let state = match b.state_name() {
            "down" => BACKEND_DOWN,
            "draining" => BACKEND_DRAINING,
            _ => BACKEND_UP,
        };
        let mut entry = Backend {
            addr,
            family,
            state,
            ..Default::default()
        };
        let id = b.id;
        let mut resolved = false;
        if let Some(NextHop {
            dev,
            own_mac,
            ifindex,
            mac,
        }) = next_hop(b.cfg.address)
        {
            entry.src_mac = own_mac;
            entry.ifindex = if dev == self.cfg.agent.interface {
                0
            } else {
                ifindex
            };
            if let Some(m) = mac {
                entry.dst_mac = m;
                resolved = true;
            }
            if entry.ifindex != 0 {
                Dataplane::new(&mut self.ebpf)
                    .add_tx_port(ifindex)
                    .with_context(|| format!("adding {dev} as a redirect target"))?;
            }
        }
        Dataplane::new(&mut self.ebpf).set_backend(id, &entry)?;
        self.vips[vi].backends[bi].resolved = resolved;
        Ok(())
    }

    fn new_backend(
        &mut self,
        key: &VipKey,
        cfg: &BackendCfg,
        health: &config::Health,
    ) -> Result<BackendRt> {
        let id = self.backend_id(key, cfg.address)?;
        self.next_generation += 1;
        Ok(BackendRt {
            cfg: cfg.clone(),
            id,
            health: HealthState::new(health.rise, health.fall),
            last_result: "not probed yet".into(),
            last_latency_ms: None,
            transitions: 0,
            resolved: false,
            generation: self.next_generation,
        })
    }

    /// Brings the datapath from the current configuration to `new`, touching
    /// only what differs. Returns the health tasks to start.
    fn reconcile(&mut self, new: Config) -> Result<Vec<Spawn>> {
        if !self.vips.is_empty() && new.agent.interface != self.cfg.agent.interface {
            bail!(
                "agent.interface changed from {} to {}: detach first with `lb down`, then start the agent again",
                self.cfg.agent.interface,
                new.agent.interface
            );
        }
        let mut spawns = Vec::new();
        // VIPs that are gone.
        let keep: HashSet<VipKey> = new.vips.iter().map(vip_key).collect();
        let mut vi = 0;
        while vi < self.vips.len() {
            if keep.contains(&self.vips[vi].key) {
                vi += 1;
                continue;
            }
            let v = self.vips.remove(vi);
            Dataplane::new(&mut self.ebpf).remove_vip(&v.key)?;
            for b in &v.backends {
                self.forget_backend(&v.key, b.cfg.address, b.id)?;
            }
            eprintln!("lb: removed VIP {}", vip_ref(&v.cfg));
        }
        // VIPs that are new or changed.
        let existing_ids: std::collections::HashMap<VipKey, u32> = Dataplane::new(&mut self.ebpf)
            .list_vips()?
            .into_iter()
            .map(|(k, m)| (k, m.vip_id))
            .collect();
        for vcfg in &new.vips {
            let key = vip_key(vcfg);
            let vi = match self.vips.iter().position(|v| v.key == key) {
                Some(i) => i,
                None => {
                    let used = self.ring_ids_in_use();
                    // Keep the id the pinned datapath already has for this VIP;
                    // otherwise take one neither live nor pinned.
                    let vip_id = match existing_ids.get(&key) {
                        Some(id) if !used.contains(id) => *id,
                        _ => (0..MAX_VIPS)
                            .find(|i| !used.contains(i) && !existing_ids.values().any(|e| e == i))
                            .or_else(|| (0..MAX_VIPS).find(|i| !used.contains(i)))
                            .ok_or_else(|| anyhow!("at most {MAX_VIPS} VIPs"))?,
                    };
                    self.vips.push(VipRt {
                        // Regions empty: the comparison below installs them.
                        cfg: Vip {
                            regions: Vec::new(),
                            ..vcfg.clone()
                        },
                        key,
                        vip_id,
                        backends: Vec::new(),
                        regions: Vec::new(),
                        digest: 0,
                    });
                    self.vips.len() - 1
                }
            };
            let meta = VipMeta {
                vip_id: self.vips[vi].vip_id,
                flags: vip_flags(vcfg),
                idle_timeout_s: vcfg.idle_timeout_s,
                scheduler: vcfg.scheduler.datapath(),
                ..Default::default()
            };
            Dataplane::new(&mut self.ebpf).upsert_vip(&key, meta)?;
            let health_changed = self.vips[vi].cfg.health != vcfg.health;
            let mut ring_changed = self.vips[vi].cfg.ring_size != vcfg.ring_size
                || self.vips[vi].backends.is_empty()
                || self.vips[vi].cfg.scheduler != vcfg.scheduler
                || self.vips[vi].cfg.regions != vcfg.regions;
            if self.vips[vi].cfg.regions != vcfg.regions {
                self.set_regions(vi, &vcfg.regions)?;
            }
            self.vips[vi].cfg = vcfg.clone();
            // Backends that are gone.
            let want: HashSet<IpAddr> = vcfg.backends.iter().map(|b| b.address).collect();
            let mut bi = 0;
            while bi < self.vips[vi].backends.len() {
                if want.contains(&self.vips[vi].backends[bi].cfg.address) {
                    bi += 1;
                    continue;
                }
                let b = self.vips[vi].backends.remove(bi);
                self.forget_backend(&key, b.cfg.address, b.id)?;
                ring_changed = true;
            }
            // Backends that are new or changed.
            for bcfg in &vcfg.backends {
                match self.vips[vi]
                    .backends
                    .iter()
                    .position(|b| b.cfg.address == bcfg.address)
                {
                    Some(bi) => {
                        if self.vips[vi].backends[bi].cfg != *bcfg {
                            self.vips[vi].backends[bi].cfg = bcfg.clone();
                            self.write_backend(vi, bi)?;
                            ring_changed = true;
                        }
                        if health_changed {
                            self.next_generation += 1;
                            let b = &mut self.vips[vi].backends[bi];
                            b.generation = self.next_generation;
                            b.health = HealthState::new(vcfg.health.rise, vcfg.health.fall);
                            spawns.push((key, b.cfg.address, b.generation));
                        }
                    }
                    None => {
                        let b = self.new_backend(&key, bcfg, &vcfg.health)?;
                        spawns.push((key, b.cfg.address, b.generation));
                        self.vips[vi].backends.push(b);
                        let bi = self.vips[vi].backends.len() - 1;
                        self.write_backend(vi, bi)?;
                        ring_changed = true;
                    }
                }
            }
            if ring_changed {
                self.rebuild_ring(vi)?;
            }
        }
        if new.announce != self.cfg.announce || self.announce.is_none() {
            self.set_announce(new.announce.as_ref())?;
        }
        warn_multi_node(&new);
        self.cfg = new;
        self.sync_announce();
        Ok(spawns)
    }

    /// Switches announcement on, off, or to another table (withdrawing
    /// from the old one).
    fn set_announce(&mut self, cfg: Option<&config::Announce>) -> Result<()> {
        let file = announce::NodeFile::of(&self.cfg.agent.instance);
        if let Some(old) = &self.announce
            && cfg.is_none_or(|c| c.table != old.table)
        {
            let n = old.flush()?;
            eprintln!(
                "lb: announce: withdrew {n} route(s) from table {}",
                old.table
            );
            file.remove();
        }
        self.announce = cfg.map(|c| announce::Routes { table: c.table });
        if let Some(c) = cfg {
            file.write(&announce::NodeState {
                table: c.table,
                drained: self.drained,
                netns: self.cfg.agent.netns.clone(),
            })?;
        }
        Ok(())
    }

    /// Per VIP address: announced, or why not.
    fn announce_view(&self) -> BTreeMap<IpAddr, announce::Verdict> {
        let views: Vec<announce::VipView> = self
            .vips
            .iter()
            .map(|v| announce::VipView {
                address: v.cfg.address,
                serving: v.backends.iter().filter(|b| b.in_ring()).count(),
            })
            .collect();
        announce::desired(&views, self.attached, self.drained)
    }

    /// Brings the kernel's announce table in line with what this node can
    /// serve; logs every change. Does nothing before the datapath is
    /// attached, so a restarting agent withdraws nothing.
    fn sync_announce(&mut self) {
        let Some(routes) = &self.announce else { return };
        if !self.attached {
            return;
        }
        let view = self.announce_view();
        match routes.sync(&view) {
            Ok((added, removed)) => {
                for a in added {
                    eprintln!("lb: announce: {a} announced (table {})", routes.table);
                }
                for a in removed {
                    let why = match view.get(&a) {
                        Some(announce::Verdict::Withhold(r)) => *r,
                        _ => "no VIP on this address",
                    };
                    eprintln!("lb: announce: {a} withdrawn ({why})");
                }
            }
            Err(e) => eprintln!(
                "lb: announce: updating table {} failed: {e:#}",
                routes.table
            ),
        }
    }

    fn set_drained(&mut self, drained: bool) -> Result<()> {
        let Some(routes) = &self.announce else {
            bail!(
                "announcement is off: add an [announce] section to the config to use `lb node drain`"
            );
        };
        self.drained = drained;
        announce::NodeFile::of(&self.cfg.agent.instance).write(&announce::NodeState {
            table: routes.table,
            drained,
            netns: self.cfg.agent.netns.clone(),
        })?;
        eprintln!(
            "lb: node {}",
            if drained {
                "drained: withdrawing every VIP"
            } else {
                "resumed: announcing VIPs that can be served"
            }
        );
        self.sync_announce();
        Ok(())
    }

    fn find(&self, key: &VipKey, addr: IpAddr) -> Option<(usize, usize)> {
        let vi = self.vips.iter().position(|v| v.key == *key)?;
        let bi = self.vips[vi]
            .backends
            .iter()
            .position(|b| b.cfg.address == addr)?;
        Some((vi, bi))
    }

    fn find_vip(&self, r: &VipRef) -> Result<usize> {
        self.vips
            .iter()
            .position(|v| vip_ref(&v.cfg) == *r)
            .ok_or_else(|| anyhow!("no VIP {r}; `lb vip list` shows the VIPs"))
    }

    fn status(&self) -> StatusInfo {
        let backends: Vec<&BackendRt> = self.vips.iter().flat_map(|v| &v.backends).collect();
        StatusInfo {
            instance: self.cfg.agent.instance.clone(),
            interface: self.cfg.agent.interface.clone(),
            attach: self.attach_desc.clone(),
            config: self.cfg_path.display().to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            vips: self.vips.len(),
            backends: backends.len(),
            backends_up: backends.iter().filter(|b| b.up()).count(),
            announce: self.announce.as_ref().map(|r| AnnounceStatus {
                table: r.table,
                drained: self.drained,
            }),
            vip_status: {
                let view = self.announce_view();
                self.vips
                    .iter()
                    .map(|v| VipStatus {
                        vip: vip_ref(&v.cfg),
                        digest: format!("{:016x}", v.digest),
                        announced: self.announce.as_ref().map(|_| {
                            view.get(&v.cfg.address) == Some(&announce::Verdict::Announce)
                        }),
                        why_not: match (&self.announce, view.get(&v.cfg.address)) {
                            (Some(_), Some(announce::Verdict::Withhold(r))) => Some(r.to_string()),
                            _ => None,
                        },
                    })
                    .collect()
            },
        }
    }

    fn vip_list(&self) -> Vec<VipInfo> {
        self.vips
            .iter()
            .map(|v| VipInfo {
                vip: vip_ref(&v.cfg),
                forwarding: match v.cfg.forwarding {
                    Forwarding::Dsr => "dsr".into(),
                    Forwarding::Ipip => "ipip".into(),
                },
                hash: match v.cfg.hash {
                    HashInput::FiveTuple => "5-tuple".into(),
                    HashInput::SourceIp => "source-ip".into(),
                },
                scheduler: v.cfg.scheduler.name().into(),
                ring_size: v.cfg.ring_size,
                flow_table: v.cfg.flow_table,
                health: match &v.cfg.health.kind {
                    CheckKind::None => "none".into(),
                    CheckKind::Tcp => format!(
                        "tcp :{} every {} ms",
                        v.cfg.health.port, v.cfg.health.interval_ms
                    ),
                    CheckKind::Http { path, .. } => {
                        format!(
                            "http :{}{path} every {} ms",
                            v.cfg.health.port, v.cfg.health.interval_ms
                        )
                    }
                },
                backends: v.backends.len(),
                backends_up: v.backends.iter().filter(|b| b.up()).count(),
            })
            .collect()
    }

    fn backend_list(&self, only: Option<&VipRef>) -> Vec<BackendInfo> {
        self.vips
            .iter()
            .filter(|v| only.is_none_or(|r| vip_ref(&v.cfg) == *r))
            .flat_map(|v| {
                v.backends.iter().map(|b| BackendInfo {
                    vip: vip_ref(&v.cfg),
                    address: b.cfg.address,
                    id: b.id,
                    weight: b.cfg.weight,
                    state: b.state_name().into(),
                    last_result: b.last_result.clone(),
                    last_latency_ms: b.last_latency_ms,
                    transitions: b.transitions,
                    active_flows: (v.cfg.scheduler == crate::sched::Scheduler::LeastConnections)
                        .then(|| self.active_of(b.id)),
                    next_hop_known: b.resolved,
                })
            })
            .collect()
    }

    fn active_of(&self, id: u32) -> u64 {
        self.ebpf
            .map(lb_common::MAP_ACTIVE)
            .and_then(|m| aya::maps::Array::<_, u64>::try_from(m).ok())
            .and_then(|a| a.get(&id, 0).ok())
            .unwrap_or(0)
    }

    fn stats(&mut self) -> Result<StatsInfo> {
        let at_s = self.started.elapsed().as_secs_f64();
        let t = |x: lb_common::Traffic| TrafficInfo {
            packets: x.packets,
            bytes: x.bytes,
            new_flows: x.new_flows,
            active: None,
        };
        let dp = Dataplane::new(&mut self.ebpf);
        let mut vips = Vec::new();
        let mut backends = Vec::new();
        for v in &self.vips {
            vips.push((vip_ref(&v.cfg), t(dp.vip_traffic(v.vip_id)?)));
            for b in &v.backends {
                let mut tr = t(dp.backend_traffic(b.id)?);
                if v.cfg.scheduler == crate::sched::Scheduler::LeastConnections {
                    tr.active = Some(dp.active(b.id)?);
                }
                backends.push((vip_ref(&v.cfg), b.cfg.address, tr));
            }
        }
        let verdicts = lb_common::verdict::NAMES
            .iter()
            .map(|n| n.to_string())
            .zip(dp.verdicts()?)
            .collect::<Vec<_>>();
        Ok(StatsInfo {
            at_s,
            vips,
            backends,
            verdicts,
        })
    }
}

/// Schedulers whose choice depends on this node's own state pick different
/// backends on different nodes: a flow that ECMP moves loses its backend.
fn warn_multi_node(cfg: &Config) {
    if cfg.announce.is_none() {
        return;
    }
    for v in &cfg.vips {
        if v.scheduler != crate::sched::Scheduler::Maglev {
            eprintln!(
                "lb: warning: VIP {} uses scheduler `{}` with announcement on: it is not consistent across \
                 nodes, so a flow moved to another node by ECMP may reach another backend; use \"maglev\"",
                vip_ref(v),
                v.scheduler.name()
            );
        }
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> Result<std::sync::MutexGuard<'_, State>> {
    s.lock()
        .map_err(|_| anyhow!("agent state poisoned by a panic"))
}

/// Runs the agent until SIGINT/SIGTERM or `lb down`.
pub fn run(config_path: &Path) -> Result<()> {
    let cfg = config::load(config_path)?;
    if let Some(ns) = &cfg.agent.netns {
        // Before any thread exists, so the whole process moves.
        enter_netns(ns)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        run_until(config_path, cfg, shutdown, None).await
    })
}

fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{name}")).with_context(|| {
        format!("agent.netns: no network namespace `{name}` (see `ip netns list`)")
    })?;
    // SAFETY: setns on an fd we own; called while the process is single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering network namespace `{name}`: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Holds the per-instance lock file; a second agent on the same instance is
/// refused while it is held.
struct InstanceLock(#[expect(dead_code, reason = "held for its lock")] std::fs::File);

fn lock_instance(instance: &str) -> Result<InstanceLock> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all("/run/lb").context("creating /run/lb")?;
    let path = format!("/run/lb/{instance}.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another agent is already running instance `{instance}` (it holds {path}); stop it first, \
             or give this one another `agent.instance`"
        );
    }
    Ok(InstanceLock(f))
}

/// Runs the agent until `shutdown` completes (or `lb down` asks it to);
/// health transitions are also sent to `events` (tests drive it this way).
pub async fn run_until(
    config_path: &Path,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    events: Option<std::sync::mpsc::Sender<Event>>,
) -> Result<()> {
    let _lock = lock_instance(&cfg.agent.instance)?;
    loader::ensure_bpffs()?;
    let dir = loader::pin_dir(&cfg.agent.instance);
    let (mut ebpf, adopted) = loader::load_pinned(
        &loader::LoadOptions {
            flow_table_size: cfg.agent.flow_table_size,
        },
        &dir,
    )?;
    Dataplane::new(&mut ebpf).set_settings(&lb_common::Settings {
        ipip_src_v4: cfg.agent.ipip_source_v4.octets(),
        ipip_src_v6: cfg.agent.ipip_source_v6.octets(),
        flags: if cfg.agent.next_hop_fib {
            lb_common::SETTINGS_F_FIB
        } else {
            0
        },
    })?;
    let mut state = State {
        ebpf,
        cfg_path: config_path.to_path_buf(),
        cfg: cfg.clone(),
        vips: Vec::new(),
        attach_desc: String::new(),
        started: Instant::now(),
        events,
        next_generation: 0,
        announce: None,
        drained: announce::NodeFile::of(&cfg.agent.instance)
            .read()
            .is_some_and(|n| n.drained),
        attached: false,
    };
    if adopted {
        // VIPs the old agent had that the config no longer has.
        let stale: Vec<VipKey> = Dataplane::new(&mut state.ebpf)
            .list_vips()?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !cfg.vips.iter().any(|v| vip_key(v) == *k))
            .collect();
        for k in stale {
            Dataplane::new(&mut state.ebpf).remove_vip(&k)?;
        }
    }
    let spawns = state.reconcile(cfg.clone())?;
    let mode = match cfg.agent.xdp_mode {
        XdpMode::Native => loader::AttachMode::Native,
        XdpMode::Skb => loader::AttachMode::Skb,
        XdpMode::Auto => loader::AttachMode::Auto,
    };
    if cfg.agent.next_hop_fib {
        // bpf_fib_lookup refuses ("forwarding disabled") on a host that does
        // not forward: every packet would pass as `no_neigh`.
        for (sysctl, family) in [
            ("/proc/sys/net/ipv4/ip_forward", "IPv4"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6"),
        ] {
            if std::fs::read_to_string(sysctl)
                .map(|v| v.trim() == "0")
                .unwrap_or(false)
            {
                eprintln!(
                    "lb: warning: next_hop = \"fib\" but {family} forwarding is off ({sysctl} = 0); \
                     {family} VIP traffic will pass as no_neigh - enable forwarding or use next_hop = \"map\""
                );
            }
        }
    }
    let (_link, desc) = loader::attach_pinned(&mut state.ebpf, &cfg.agent.interface, mode, &dir)?;
    state.attach_desc = desc.clone();
    state.attached = true;
    state.sync_announce();
    eprintln!(
        "lb: instance `{}`: {desc}; {} VIP(s), {} backend(s); pins in {}",
        cfg.agent.instance,
        state.vips.len(),
        state.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
        dir.display()
    );
    let shared: Shared = Arc::new(Mutex::new(state));
    for s in spawns {
        spawn_health(shared.clone(), s);
    }

    let stop = Arc::new(Notify::new());
    let socket = PathBuf::from(&cfg.agent.control_socket);
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("binding the control socket {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    tokio::spawn(serve_api(listener, shared.clone(), stop.clone()));
    if let Some(addr) = cfg.agent.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics on {addr}"))?;
        eprintln!("lb: Prometheus metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(l, shared.clone()));
    }
    let lc_shared = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let r = tokio::task::block_in_place(|| {
                lock(&lc_shared).and_then(|mut s| s.reconcile_active())
            });
            if let Err(e) = r {
                eprintln!("lb: reconciling least-connections counts failed: {e:#}");
            }
        }
    });
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload_shared = shared.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match reload(&reload_shared) {
                Ok(()) => eprintln!("lb: SIGHUP: configuration reloaded"),
                Err(e) => eprintln!("lb: SIGHUP: reload refused, nothing changed: {e:#}"),
            }
        }
    });

    tokio::select! {
        _ = shutdown => {}
        _ = stop.notified() => {}
    }
    let _ = std::fs::remove_file(&socket);
    eprintln!("lb: agent stopping; the datapath stays attached (pinned) - `lb down` detaches it");
    Ok(())
}

fn reload(shared: &Shared) -> Result<()> {
    // The state lock is held from reading the file to applying it, so a
    // reload and a CLI edit cannot interleave.
    let spawns = {
        let mut s = lock(shared)?;
        let cfg = config::load(&s.cfg_path)?;
        s.reconcile(cfg)?
    };
    for s in spawns {
        spawn_health(shared.clone(), s);
    }
    Ok(())
}

/// Applies a CLI change: edit the file's text, validate it like a file,
/// reconcile, then save it atomically. The whole read → edit → validate →
/// apply → save runs under the state lock: the agent is the file's only
/// writer, and two concurrent edits are applied one after the other, never
/// one over the other.
fn change(shared: &Shared, edit: Edit) -> Result<()> {
    let spawns = {
        let mut s = lock(shared)?;
        let path = s.cfg_path.clone();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let new_text = confedit::apply(&text, &edit)?;
        let cfg = config::parse(&new_text, &path.display().to_string())?;
        let spawns = s.reconcile(cfg)?;
        confedit::write_atomic(&path, &new_text)?;
        spawns
    };
    for s in spawns {
        spawn_health(shared.clone(), s);
    }
    Ok(())
}

fn spawn_health(shared: Shared, (key, address, generation): Spawn) {
    tokio::spawn(async move {
        let mut seed = (generation.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        let mut round = 0u64;
        loop {
            let (health, vip) = {
                let Ok(s) = lock(&shared) else { return };
                let Some((vi, bi)) = s.find(&key, address) else {
                    return;
                };
                if s.vips[vi].backends[bi].generation != generation {
                    return;
                }
                (s.vips[vi].cfg.health.clone(), vip_ref(&s.vips[vi].cfg))
            };
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Up to 10 % jitter so probes of many backends do not fire in lockstep.
            let jitter = Duration::from_millis(seed % (health.interval_ms / 10 + 1));
            let next =
                tokio::time::Instant::now() + Duration::from_millis(health.interval_ms) + jitter;
            let t0 = Instant::now();
            let outcome = probe(
                &health.kind,
                SocketAddr::new(address, health.port),
                Duration::from_millis(health.timeout_ms),
            )
            .await;
            let latency = t0.elapsed().as_secs_f64() * 1e3;
            {
                let Ok(mut s) = lock(&shared) else { return };
                let Some((vi, bi)) = s.find(&key, address) else {
                    return;
                };
                if s.vips[vi].backends[bi].generation != generation {
                    return;
                }
                let ok = outcome == Outcome::Ok;
                let b = &mut s.vips[vi].backends[bi];
                b.last_result = match &outcome {
                    Outcome::Ok => "ok".into(),
                    Outcome::Fail(r) => r.clone(),
                };
                b.last_latency_ms = ok.then_some(latency);
                let transition = b.health.observe(ok);
                if let Some(t) = transition {
                    b.transitions += 1;
                    let why = b.last_result.clone();
                    eprintln!(
                        "lb: t={:.3}s backend {address} of VIP {vip} is {} ({why})",
                        s.started.elapsed().as_secs_f64(),
                        if t == Transition::Up { "UP" } else { "DOWN" }
                    );
                    if let Err(e) = s.write_backend(vi, bi).and_then(|_| s.rebuild_ring(vi)) {
                        eprintln!("lb: updating the datapath failed: {e:#}");
                    }
                    s.sync_announce();
                    if let Some(ev) = &s.events {
                        let _ = ev.send(Event {
                            vip: vip.clone(),
                            backend: address,
                            up: t == Transition::Up,
                            reason: why,
                            at: Instant::now(),
                        });
                    }
                } else if ok && (!s.vips[vi].backends[bi].resolved || round.is_multiple_of(25)) {
                    // Probes make the kernel resolve the neighbour; pick up a
                    // MAC that was unknown or has changed.
                    if let Err(e) = s.write_backend(vi, bi) {
                        eprintln!("lb: refreshing the next hop of {address} failed: {e:#}");
                    }
                }
            }
            round += 1;
            tokio::time::sleep_until(next).await;
        }
    });
}

async fn serve_api(listener: UnixListener, shared: Shared, stop: Arc<Notify>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            // Only a request that parses as `Shutdown` stops the agent; the
            // word inside another request's arguments is just data.
            let parsed = serde_json::from_str::<Request>(&line);
            let shutdown = matches!(parsed, Ok(Request::Shutdown));
            let resp = match parsed {
                Err(e) => Response {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                    data: Default::default(),
                },
                Ok(req) => {
                    let sh = shared.clone();
                    let r = tokio::task::spawn_blocking(move || handle(&sh, req)).await;
                    match r {
                        Ok(Ok(data)) => Response {
                            ok: true,
                            error: None,
                            data,
                        },
                        Ok(Err(e)) => Response {
                            ok: false,
                            error: Some(format!("{e:#}")),
                            data: Default::default(),
                        },
                        Err(e) => Response {
                            ok: false,
                            error: Some(e.to_string()),
                            data: Default::default(),
                        },
                    }
                }
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
            if shutdown {
                stop.notify_one();
            }
        });
    }
}

fn handle(shared: &Shared, req: Request) -> Result<serde_json::Value> {
    use serde_json::to_value;
    Ok(match req {
        Request::Status => to_value(lock(shared)?.status())?,
        Request::VipList => to_value(lock(shared)?.vip_list())?,
        Request::BackendList { vip } => {
            let s = lock(shared)?;
            if let Some(v) = &vip {
                s.find_vip(v)?;
            }
            to_value(s.backend_list(vip.as_ref()))?
        }
        Request::Health => to_value(lock(shared)?.backend_list(None))?,
        Request::Stats => to_value(lock(shared)?.stats()?)?,
        Request::VipAdd(a) => {
            change(shared, Edit::VipAdd(a))?;
            serde_json::Value::Null
        }
        Request::VipRemove { vip } => {
            change(shared, Edit::VipRemove(vip))?;
            serde_json::Value::Null
        }
        Request::BackendAdd {
            vip,
            address,
            weight,
        } => {
            change(
                shared,
                Edit::BackendAdd {
                    vip,
                    address,
                    weight,
                },
            )?;
            serde_json::Value::Null
        }
        Request::BackendRemove { vip, address } => {
            change(shared, Edit::BackendRemove { vip, address })?;
            serde_json::Value::Null
        }
        Request::BackendDrain { vip, address } => {
            change(
                shared,
                Edit::BackendSet {
                    vip,
                    address,
                    weight: None,
                    drain: Some(true),
                },
            )?;
            serde_json::Value::Null
        }
        Request::BackendUndrain { vip, address } => {
            change(
                shared,
                Edit::BackendSet {
                    vip,
                    address,
                    weight: None,
                    drain: Some(false),
                },
            )?;
            serde_json::Value::Null
        }
        Request::BackendWeight {
            vip,
            address,
            weight,
        } => {
            change(
                shared,
                Edit::BackendSet {
                    vip,
                    address,
                    weight: Some(weight),
                    drain: None,
                },
            )?;
            serde_json::Value::Null
        }
        Request::Reload => {
            reload(shared)?;
            serde_json::Value::Null
        }
        Request::NodeDrain => {
            lock(shared)?.set_drained(true)?;
            serde_json::Value::Null
        }
        Request::NodeResume => {
            lock(shared)?.set_drained(false)?;
            serde_json::Value::Null
        }
        Request::Shutdown => serde_json::Value::Null,
    })
}

/// Prometheus text exposition of the counters and health states.
fn metrics_text(s: &mut State) -> Result<String> {
    use std::fmt::Write as _;
    let st = s.stats()?;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP lb_verdicts_total Packets seen by the balancer, by verdict reason."
    );
    let _ = writeln!(o, "# TYPE lb_verdicts_total counter");
    for (n, v) in &st.verdicts {
        let _ = writeln!(o, "lb_verdicts_total{{reason=\"{n}\"}} {v}");
    }
    for (name, help) in [
        ("packets", "Packets forwarded"),
        ("bytes", "Bytes forwarded"),
        ("new_flows", "New flows scheduled"),
    ] {
        let _ = writeln!(o, "# HELP lb_vip_{name}_total {help} per VIP.");
        let _ = writeln!(o, "# TYPE lb_vip_{name}_total counter");
        for (v, t) in &st.vips {
            let x = match name {
                "packets" => t.packets,
                "bytes" => t.bytes,
                _ => t.new_flows,
            };
            let _ = writeln!(o, "lb_vip_{name}_total{{vip=\"{v}\"}} {x}");
        }
        let _ = writeln!(o, "# HELP lb_backend_{name}_total {help} per backend.");
        let _ = writeln!(o, "# TYPE lb_backend_{name}_total counter");
        for (v, b, t) in &st.backends {
            let x = match name {
                "packets" => t.packets,
                "bytes" => t.bytes,
                _ => t.new_flows,
            };
            let _ = writeln!(
                o,
                "lb_backend_{name}_total{{vip=\"{v}\",backend=\"{b}\"}} {x}"
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP lb_backend_up 1 if the backend passes its health check."
    );
    let _ = writeln!(o, "# TYPE lb_backend_up gauge");
    for b in s.backend_list(None) {
        let _ = writeln!(
            o,
            "lb_backend_up{{vip=\"{}\",backend=\"{}\"}} {}",
            b.vip,
            b.address,
            u8::from(b.state != "down")
        );
    }
    Ok(o)
}

/// A minimal HTTP/1.0 responder for `/metrics`: scrapers need nothing more,
/// and the agent avoids an HTTP server dependency for it.
async fn serve_metrics(listener: tokio::net::TcpListener, shared: Shared) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
                .await
                .unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                match lock(&shared).and_then(|mut s| metrics_text(&mut s)) {
                    Ok(b) => ("200 OK", b),
                    Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

/// `lb down`: asks a running agent to stop, then detaches and removes every
/// pin of the instance.
pub fn down(instance: &str, socket: &Path) -> Result<()> {
    if socket.exists() && api::call(socket, &Request::Shutdown).is_ok() {
        // Wait (bounded) for the agent to let go of its instance lock.
        for _ in 0..50 {
            if lock_instance(instance).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let node = announce::NodeFile::of(instance);
    if let Some(st) = node.read() {
        let routes = announce::Routes { table: st.table };
        let n = match &st.netns {
            Some(ns) => crate::netns::in_netns(ns, || routes.flush())??,
            None => routes.flush()?,
        };
        println!(
            "instance `{instance}`: withdrew {n} announced route(s) from table {}",
            st.table
        );
        node.remove();
    }
    let dir = loader::pin_dir(instance);
    if loader::remove_pins(&dir)? {
        println!(
            "instance `{instance}`: datapath detached, pins in {} removed",
            dir.display()
        );
    } else {
        println!(
            "instance `{instance}`: nothing pinned in {}, nothing to do",
            dir.display()
        );
    }
    Ok(())
}
