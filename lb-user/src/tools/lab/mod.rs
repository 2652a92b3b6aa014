//! The lab: a small data center in network namespaces, for the demo, the
//! end-to-end tests and the benchmarks. Only 198.18.0.0/15 and 2001:2::/48,
//! only inside namespaces it creates; nothing touches the host's interfaces.
//!
//! ```text
//!  <p>-c1 (198.18.0.11-18)  <p>-c2 (198.18.0.21-28)     clients
//!        │ eth0                   │ eth0
//!  ┌─────┴────────── <p>-br: bridge br0 ──────────┬─────────┬─────────┐
//!  │                                              │         │         │
//!  <p>-lb eth0 198.18.0.2 (lb_xdp, native)   <p>-b1 .31  <p>-b2 .32  <p>-b3 .33
//!                                             VIP 198.18.0.100 / 2001:2::100 on lo
//! ```
//! IPv6 alongside: 2001:2::2 (LB), 2001:2::11.. (clients), 2001:2::31.. (backends).
//! Clients route the VIPs via the LB; backends answer clients directly (DSR).
//! The bridge-side peer of the LB's veth carries `lb_pass` (native `XDP_TX`
//! on a veth needs an XDP program on the peer); backends carry `lb_decap`
//! for `ipip` VIPs. These programs stay attached through pinned links under
//! `/sys/fs/bpf/lb-lab/<prefix>/`.
//!
//! With `nodes >= 2` (see [`routed`]) the lab grows a routed front: LB nodes
//! `<p>-lb` (.2), `<p>-lb2` (.3), `<p>-lb3` (.4) and a router `<p>-rt`
//! (198.18.0.1 / 2001:2::1) on the same segment, each running BIRD; the
//! router learns the VIPs from every node by BGP (with BFD) and installs an
//! ECMP route with layer-4 hashing; clients route the VIPs via the router.

mod http;
mod load;
pub mod routed;
pub mod sessions;

pub(crate) use http::{connect_from, read_head};
pub use http::{http_get, serve};
pub use load::{KeepAlive, Sample, load, load_during, load_mix};

use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    config::file::{self, File, Health},
    datapath::Dataplane,
    datapath::loader,
    vocab::{Forwarding, HashInput},
};

pub const VIP4: &str = "198.18.0.100";
pub const VIP6: &str = "2001:2::100";
pub const LB4: &str = "198.18.0.2";
pub const LB6: &str = "2001:2::2";
pub const BACKENDS: usize = 3;
pub const CLIENTS: usize = 2;
pub const ADDRS_PER_CLIENT: usize = 8;

pub fn backend4(i: usize) -> String {
    format!("198.18.0.{}", 30 + i)
}
pub fn backend6(i: usize) -> String {
    format!("2001:2::{}", 30 + i)
}
/// Client `c` (1-based), address `k` (0-based).
pub fn client4(c: usize, k: usize) -> String {
    format!("198.18.0.{}", 10 * c + 1 + k)
}
pub fn client6(c: usize, k: usize) -> String {
    format!("2001:2::{}", 10 * c + 1 + k)
}

use crate::host::iproute::run as run_ok;

pub use crate::host::netns::in_netns;

/// One lab, named by a prefix (so tests can run several side by side).
#[derive(Clone, Debug)]
pub struct Lab {
    pub prefix: String,
    /// The `lb` binary that runs the backend servers.
    pub exe: PathBuf,
    /// LB nodes: 1 (clients route the VIPs to it) or 2..=3 behind a router.
    pub nodes: usize,
    /// A Redis in `<p>-rd` that the backends keep `store=redis` sessions in.
    pub redis: bool,
    /// Backends without the VIP on loopback and without `lb_decap`: what a
    /// NAT VIP's backends look like (they know nothing of the balancer).
    pub bare: bool,
}

impl Lab {
    /// A lab whose backend servers run this very binary (`lb lab serve`).
    pub fn new(prefix: &str) -> Self {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lb"));
        Self {
            prefix: prefix.to_string(),
            exe,
            nodes: 1,
            redis: false,
            bare: false,
        }
    }

    /// The same lab with bare backends (see [`Lab::bare`]).
    pub fn with_bare_backends(mut self) -> Self {
        self.bare = true;
        self
    }

    /// The same lab with a Redis for the backends' shared sessions.
    pub fn with_redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// The same lab with `n` LB nodes behind a BGP router (1..=3).
    pub fn with_nodes(mut self, n: usize) -> Self {
        self.nodes = n.clamp(1, routed::MAX_NODES);
        self
    }

    /// A lab whose backend servers run `exe` (tests pass the `lb` binary).
    pub fn with_exe(prefix: &str, exe: &std::path::Path) -> Self {
        Self {
            prefix: prefix.to_string(),
            exe: exe.to_path_buf(),
            nodes: 1,
            redis: false,
            bare: false,
        }
    }

    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    pub fn lb_ns(&self) -> String {
        self.ns("lb")
    }
    pub fn client_ns(&self, c: usize) -> String {
        self.ns(&format!("c{c}"))
    }
    pub fn backend_ns(&self, i: usize) -> String {
        self.ns(&format!("b{i}"))
    }
    /// LB node `n`'s namespace (1-based; node 1 is `<p>-lb`).
    pub fn lb_ns_of(&self, n: usize) -> String {
        if n <= 1 {
            self.lb_ns()
        } else {
            self.ns(&format!("lb{n}"))
        }
    }
    /// The namespaces of this lab; with `all`, every one a lab of this
    /// prefix may have, whatever `nodes` says (for `down`).
    fn nodes_of(&self, all: bool) -> Vec<String> {
        let lbs = if all { routed::MAX_NODES } else { self.nodes };
        let mut v = vec![self.ns("br")];
        v.extend((1..=lbs).map(|n| self.lb_ns_of(n)));
        if all || self.nodes > 1 {
            v.push(self.ns("rt"));
        }
        if all || self.redis {
            v.push(self.redis_ns());
        }
        v.extend((1..=CLIENTS).map(|c| self.client_ns(c)));
        v.extend((1..=BACKENDS).map(|i| self.backend_ns(i)));
        v
    }
    /// Runtime files: pid files, the agent's config and log.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run/lb-lab").join(&self.prefix)
    }
    fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/lb-lab").join(&self.prefix)
    }

    /// The `lb backend-host` instance of backend `i`.
    pub fn backend_host_instance(&self, i: usize) -> String {
        format!("{}-b{i}", self.prefix)
    }

    pub(crate) fn exec(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", ns];
        a.extend_from_slice(args);
        run_ok("ip", &a)
    }

    /// Builds the lab (after removing whatever an earlier run left).
    pub fn up(&self) -> Result<()> {
        self.down()?;
        loader::ensure_bpffs()?;
        std::fs::create_dir_all(self.run_dir())?;
        std::fs::create_dir_all(self.pin_dir())?;
        for ns in self.nodes_of(false) {
            run_ok("ip", &["netns", "add", &ns])?;
            self.exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        let br = self.ns("br");
        self.exec(&br, &["ip", "link", "add", "br0", "type", "bridge"])?;
        self.exec(&br, &["ip", "link", "set", "br0", "up"])?;
        // One veth per node: eth0 in the node, p-<node> on the bridge.
        let mut nodes: Vec<(String, String)> = (1..=self.nodes)
            .map(|n| (routed::short(n), self.lb_ns_of(n)))
            .collect();
        if self.nodes > 1 {
            nodes.push(("rt".into(), self.ns("rt")));
        }
        if self.redis {
            nodes.push(("rd".into(), self.redis_ns()));
        }
        nodes.extend((1..=CLIENTS).map(|c| (format!("c{c}"), self.client_ns(c))));
        nodes.extend((1..=BACKENDS).map(|i| (format!("b{i}"), self.backend_ns(i))));
        for (short, ns) in &nodes {
            let port = format!("p-{short}");
            run_ok(
                "ip",
                &[
                    "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port,
                    "netns", &br,
                ],
            )?;
            self.exec(&br, &["ip", "link", "set", &port, "master", "br0"])?;
            self.exec(&br, &["ip", "link", "set", &port, "up"])?;
            self.exec(ns, &["ip", "link", "set", "eth0", "up"])?;
        }
        for n in 1..=self.nodes {
            self.add_addrs(
                &self.lb_ns_of(n),
                "eth0",
                &routed::lb4(n),
                &routed::lb6(n),
                (24, 64),
            )?;
        }
        // One LB: clients route the VIPs to it; several: to the router.
        let (gw4, gw6) = if self.nodes > 1 {
            (routed::RT4, routed::RT6)
        } else {
            (LB4, LB6)
        };
        for c in 1..=CLIENTS {
            let ns = self.client_ns(c);
            for k in 0..ADDRS_PER_CLIENT {
                self.add_addrs(&ns, "eth0", &client4(c, k), &client6(c, k), (24, 64))?;
            }
            self.exec(
                &ns,
                &["ip", "route", "add", &format!("{VIP4}/32"), "via", gw4],
            )?;
            self.exec(
                &ns,
                &[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    &format!("{VIP6}/128"),
                    "via",
                    gw6,
                ],
            )?;
            // The LB forwards client packets with XDP: they must leave with
            // finished checksums (no TX checksum offload on the veth).
            self.exec(&ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        for i in 1..=BACKENDS {
            let ns = self.backend_ns(i);
            self.add_addrs(&ns, "eth0", &backend4(i), &backend6(i), (24, 64))?;
            if self.bare {
                // Their replies pass the LB's XDP (NAT): they must leave
                // with finished checksums, as on a wire (veth offload
                // would leave a partial one that XDP cannot amend).
                self.exec(&ns, &["ethtool", "-K", "eth0", "tx", "off"])?;
                continue;
            }
            self.add_addrs(&ns, "lo", VIP4, VIP6, (32, 128))?;
            // The VIP on loopback must not be announced on the segment.
            self.exec(&ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])?;
            self.exec(&ns, &["sysctl", "-qw", "net.ipv4.conf.all.arp_announce=2"])?;
        }
        // XDP helpers, kept attached by pinned links: on the LB's bridge
        // port, and on the backends' (their `lb_decap` sends the second
        // chance's packets on with native `XDP_TX`).
        for n in 1..=self.nodes {
            let port = format!("p-{}", routed::short(n));
            self.pin_program(&br, &port, lb_common::PROG_PASS, &[])?;
        }
        for i in (1..=BACKENDS).filter(|_| !self.bare) {
            self.pin_program(&br, &format!("p-b{i}"), lb_common::PROG_PASS, &[])?;
        }
        // LB nodes route what a backend sends back for the second chance
        // (a backend host that does not forward returns a packet for
        // another backend to the L2 hop it came from).
        for n in 1..=self.nodes {
            for kv in [
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
                // The outer source of an encapsulation is no address of
                // the segment (`agent.ipip_source_v4` + the flow hash).
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ] {
                self.exec(&self.lb_ns_of(n), &["sysctl", "-qw", kv])?;
            }
        }
        // The backends' `lb_decap` the way a backend host runs it (`lb
        // backend-host run`), pinned under its own instance.
        for i in (1..=BACKENDS).filter(|_| !self.bare) {
            let o = crate::backend_host::Options {
                interface: "eth0".into(),
                addresses: vec![backend4(i).parse()?, backend6(i).parse()?],
                instance: self.backend_host_instance(i),
                xdp_mode: crate::vocab::XdpMode::Native,
                gue_port: lb_common::DEFAULT_GUE_PORT,
            };
            in_netns(&self.backend_ns(i), || crate::backend_host::attach(&o))??;
        }
        if self.redis {
            self.add_addrs(
                &self.redis_ns(),
                "eth0",
                sessions::REDIS4,
                sessions::REDIS6,
                (24, 64),
            )?;
            self.start_redis()?;
        }
        for i in 1..=BACKENDS {
            self.start_backend(i)?;
        }
        if self.nodes > 1 {
            self.up_routed()?;
        }
        Ok(())
    }

    /// Adds an IPv4 and an IPv6 address (prefix lengths `len`) to `dev` in `ns`.
    pub(crate) fn add_addrs(
        &self,
        ns: &str,
        dev: &str,
        v4: &str,
        v6: &str,
        len: (u8, u8),
    ) -> Result<()> {
        self.exec(
            ns,
            &["ip", "addr", "add", &format!("{v4}/{}", len.0), "dev", dev],
        )?;
        self.exec(
            ns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/{}", len.1),
                "dev",
                dev,
                "nodad",
            ],
        )?;
        Ok(())
    }

    /// Attaches `prog` natively to `dev` in `ns` and pins its link, so it
    /// stays after this process exits (`decap_addrs` for `lb_decap`).
    fn pin_program(&self, ns: &str, dev: &str, prog: &str, decap_addrs: &[IpAddr]) -> Result<()> {
        use aya::programs::links::FdLink;
        let path = self.pin_dir().join(format!("{ns}-{dev}"));
        let mut ebpf = loader::load(&loader::LoadOptions {
            flow_table_size: 1024,
            // Tooling: no VIPs, no rings.
            max_vips: 1,
            ring_slots: 1,
            ..Default::default()
        })?;
        for a in decap_addrs {
            let mut k = [0u8; 16];
            match a {
                IpAddr::V4(v) => k[..4].copy_from_slice(&v.octets()),
                IpAddr::V6(v) => k = v.octets(),
            }
            Dataplane::new(&mut ebpf).add_decap_addr(k)?;
        }
        in_netns(ns, || -> Result<()> {
            let (_, id) =
                loader::attach_with_id(&mut ebpf, prog, dev, crate::vocab::XdpMode::Native)?;
            let p = loader::xdp_program(&mut ebpf, prog)?;
            let link = p.take_link(id)?;
            let fd = FdLink::try_from(link).context("XDP link is not an fd link")?;
            fd.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            Ok(())
        })??;
        Ok(())
    }

    fn pid_file(&self, i: usize) -> PathBuf {
        self.run_dir().join(format!("b{i}.pid"))
    }

    /// Starts backend i's HTTP server (`lb lab serve`) in its namespace.
    pub fn start_backend(&self, i: usize) -> Result<()> {
        let exe = &self.exe;
        let log = std::fs::File::create(self.run_dir().join(format!("b{i}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.backend_ns(i)])
            .arg(exe)
            .args(["lab", "serve", "--name", &format!("b{i}")])
            .args(if self.redis {
                vec![
                    "--redis".to_string(),
                    format!("{}:{}", sessions::REDIS4, sessions::REDIS_PORT),
                ]
            } else {
                Vec::new()
            })
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a lab backend server")?;
        std::fs::write(self.pid_file(i), child.id().to_string())?;
        // Wait until it answers (bounded).
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.backend_ctl(i, "/healthz").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "lab backend b{i} did not come up; see {}",
            self.run_dir().join(format!("b{i}.log")).display()
        )
    }

    /// Kills backend i's server (as a crash would).
    pub fn stop_backend(&self, i: usize) -> Result<()> {
        if let Ok(pid) = std::fs::read_to_string(self.pid_file(i)) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
            let _ = std::fs::remove_file(self.pid_file(i));
        }
        Ok(())
    }

    /// Sends `GET path` to backend i's own server (inside its namespace):
    /// `/healthz`, `/admin/fail-health`, `/admin/ok`, `/admin/slow?ms=N`.
    pub fn backend_ctl(&self, i: usize, path: &str) -> Result<String> {
        in_netns(&self.backend_ns(i), || {
            http_get(&format!("{}:80", backend4(i)).parse()?, None, path)
        })?
    }

    pub fn down(&self) -> Result<()> {
        for i in 1..=BACKENDS {
            let _ = self.stop_backend(i);
        }
        self.stop_daemons();
        let _ = std::fs::remove_dir_all(self.pin_dir());
        for i in 1..=BACKENDS {
            let _ = crate::backend_host::down(&self.backend_host_instance(i));
        }
        let list = run_ok("ip", &["netns", "list"]).unwrap_or_default();
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if self.nodes_of(true).iter().any(|n| n == name) {
                run_ok("ip", &["netns", "del", name])?;
            }
        }
        let _ = std::fs::remove_dir_all(self.run_dir());
        // The agents' second-chance memory (`/var/lib/lb/<instance>...`).
        for n in 1..=self.nodes.max(1) {
            let _ = std::fs::remove_file(crate::agent::history::path_of(&self.instance_of(n)));
        }
        // (Only if nothing else is kept there.)
        let _ = std::fs::remove_dir("/var/lib/lb");
        Ok(())
    }

    pub fn status(&self) -> Result<String> {
        let list = run_ok("ip", &["netns", "list"]).unwrap_or_default();
        let mut o = String::new();
        for n in self.nodes_of(false) {
            let up = list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&n));
            o.push_str(&format!("{n:<16} {}\n", if up { "up" } else { "absent" }));
        }
        for i in 1..=BACKENDS {
            let s = match self.backend_ctl(i, "/healthz") {
                Ok(_) => "serving".to_string(),
                Err(e) => format!("not serving ({e})"),
            };
            o.push_str(&format!("backend b{i:<8} {} {s}\n", backend4(i)));
        }
        Ok(o)
    }

    /// An agent configuration for the lab: one VIP (IPv4 and IPv6) over the
    /// three backends, with this forwarding, hash input and health check
    /// (write it with `File::to_toml`; change what else a caller needs in
    /// the returned file).
    pub fn agent_file(&self, forwarding: Forwarding, hash: HashInput, health: Health) -> File {
        let mut agent = self.agent_section(&self.prefix, &self.socket(), &self.lb_ns());
        if forwarding == Forwarding::Nat {
            // The LB's own addresses on the segment: backends reply there.
            agent.nat_source_v4 = vec![LB4.into()];
            agent.nat_source_v6 = vec![LB6.into()];
        }
        File {
            agent,
            announce: None,
            vips: lab_vips(forwarding, hash, health),
        }
    }

    /// The `[agent]` section of the lab's agents (and routed nodes').
    pub(super) fn agent_section(
        &self,
        instance: &str,
        socket: &std::path::Path,
        netns: &str,
    ) -> file::Agent {
        file::Agent::instance("eth0", instance, socket, netns)
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("lb.sock")
    }
}

/// The lab's two VIPs (IPv4 and IPv6, port 80), each over the three
/// backends of its family.
pub(super) fn lab_vips(forwarding: Forwarding, hash: HashInput, health: Health) -> Vec<file::Vip> {
    [(VIP4, backend4 as fn(usize) -> String), (VIP6, backend6)]
        .into_iter()
        .map(|(vip, addr)| file::Vip {
            forwarding: Some(forwarding),
            hash: Some(hash),
            health: Some(health.clone()),
            ..file::Vip::new(
                vip,
                80,
                (1..=BACKENDS).map(|i| file::Backend::at(addr(i))).collect(),
            )
        })
        .collect()
}
