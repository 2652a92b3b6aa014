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

pub mod routed;
pub mod sessions;

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{datapath::Dataplane, datapath::loader};

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
        // XDP helpers, kept attached by pinned links.
        for n in 1..=self.nodes {
            let port = format!("p-{}", routed::short(n));
            self.pin_program(&br, &port, lb_common::PROG_PASS, &[])?;
        }
        for i in (1..=BACKENDS).filter(|_| !self.bare) {
            let addrs = [backend4(i).parse()?, backend6(i).parse()?];
            self.pin_program(&self.backend_ns(i), "eth0", lb_common::PROG_DECAP, &addrs)?;
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
        let list = run_ok("ip", &["netns", "list"]).unwrap_or_default();
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if self.nodes_of(true).iter().any(|n| n == name) {
                run_ok("ip", &["netns", "del", name])?;
            }
        }
        let _ = std::fs::remove_dir_all(self.run_dir());
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
    /// three backends. `forwarding` is "dsr", "ipip" or "nat", `hash` "5-tuple" or
    /// "source-ip".
    pub fn agent_config(&self, forwarding: &str, hash: &str, health: &str) -> String {
        self.agent_config_with(forwarding, hash, "maglev", health)
    }

    /// [`Lab::agent_config`] with a scheduler.
    pub fn agent_config_with(
        &self,
        forwarding: &str,
        hash: &str,
        scheduler: &str,
        health: &str,
    ) -> String {
        let mut s = format!(
            "# lab agent\n[agent]\ninterface = \"eth0\"\nxdp_mode = \"native\"\nflow_table_size = 65536\n\
             instance = \"{p}\"\ncontrol_socket = \"{sock}\"\nnetns = \"{ns}\"\n",
            p = self.prefix,
            sock = self.socket().display(),
            ns = self.lb_ns()
        );
        if forwarding == "nat" {
            // The LB's own addresses on the segment: backends reply there.
            s.push_str(&format!(
                "nat_source_v4 = [\"{LB4}\"]\nnat_source_v6 = [\"{LB6}\"]\n"
            ));
        }
        for (vip, f) in [(VIP4, backend4 as fn(usize) -> String), (VIP6, backend6)] {
            s.push_str(&format!(
                "\n[[vip]]\naddress = \"{vip}\"\nport = 80\nforwarding = \"{forwarding}\"\nhash = \"{hash}\"\nscheduler = \"{scheduler}\"\n\n[vip.health]\n{health}\n"
            ));
            for i in 1..=BACKENDS {
                s.push_str(&format!("\n[[vip.backend]]\naddress = \"{}\"\n", f(i)));
            }
        }
        s
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("lb.sock")
    }
}

/// A TCP connection to `to` from local address `from` (any port), made in
/// the calling thread's network namespace.
pub(crate) fn connect_from(from: IpAddr, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    sock.bind(&SocketAddr::new(from, 0).into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    Ok(sock.into())
}

/// The status line and headers of an HTTP/1.x response.
pub(crate) struct ResponseHead {
    pub code: u16,
    pub content_length: Option<usize>,
    /// The value of a `Set-Cookie: session=...` header, if any.
    pub session_cookie: Option<String>,
}

/// Reads a response's status line and headers from `r` (the body follows).
pub(crate) fn read_head(r: &mut impl BufRead) -> Result<ResponseHead> {
    let mut status = String::new();
    if r.read_line(&mut status)? == 0 {
        bail!("connection closed by the peer");
    }
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {status:?}"))?;
    let mut head = ResponseHead {
        code,
        content_length: None,
        session_cookie: None,
    };
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(v.trim().parse().context("bad Content-Length")?);
        } else if k.eq_ignore_ascii_case("set-cookie") {
            head.session_cookie = v
                .trim()
                .split(';')
                .next()
                .and_then(|kv| kv.strip_prefix("session="))
                .map(str::to_string);
        }
    }
    Ok(head)
}

/// One HTTP/1.0 GET over a new connection, optionally from a given local
/// address; returns the body.
pub fn http_get(to: &SocketAddr, from: Option<IpAddr>, path: &str) -> Result<String> {
    let timeout = Duration::from_millis(1000);
    let s = match from {
        None => TcpStream::connect_timeout(to, timeout)?,
        Some(src) => connect_from(src, *to, timeout)?,
    };
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut w = s.try_clone()?;
    write!(w, "GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n")?;
    let mut r = BufReader::new(s);
    let code = read_head(&mut r)?.code;
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    if code != 200 {
        bail!("status {code}");
    }
    Ok(body.trim().to_string())
}

/// `lb lab serve`: the lab's backend HTTP server. `/` answers the server's
/// name; `/sleep?ms=N` answers it after N ms (a long request);
/// `/healthz` answers 200 (or 503 after `/admin/fail-health`, until
/// `/admin/ok`); `/admin/slow?ms=N` delays every answer by N ms;
/// `/admin/inflight` tells how many requests are being served;
/// `/session?store=local|redis` counts requests per session cookie (see
/// [`sessions`]; `redis` is the lab Redis's `ADDR:PORT`).
pub fn serve(name: &str, listen: &str, redis: Option<&str>) -> Result<()> {
    let sessions = Arc::new(sessions::Sessions::new(name, redis));
    let server = Arc::new(
        tiny_http::Server::http(listen)
            .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?,
    );
    let failing = Arc::new(AtomicBool::new(false));
    let slow_ms = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..64 {
        let server = server.clone();
        let failing = failing.clone();
        let slow_ms = slow_ms.clone();
        let inflight = inflight.clone();
        let sessions = sessions.clone();
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                let url = req.url().to_string();
                if url.starts_with("/session") {
                    let cookie = req
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("Cookie"))
                        .map(|h| h.value.as_str().to_string());
                    let (code, body, set) = sessions.handle(&url, cookie.as_deref());
                    let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
                    if let Some(id) = set {
                        resp = resp.with_header(
                            tiny_http::Header::from_bytes(
                                &b"Set-Cookie"[..],
                                format!("session={id}; Path=/").as_bytes(),
                            )
                            .expect("header"),
                        );
                    }
                    let _ = req.respond(resp);
                    continue;
                }
                inflight.fetch_add(1, Ordering::Relaxed);
                let (code, body) = match url.split('?').next().unwrap_or("") {
                    "/admin/inflight" => {
                        (200, format!("{}\n", inflight.load(Ordering::Relaxed) - 1))
                    }
                    "/sleep" => {
                        let ms = url
                            .split("ms=")
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        std::thread::sleep(Duration::from_millis(ms));
                        (200, format!("{name}\n"))
                    }
                    "/healthz" if failing.load(Ordering::Relaxed) => (503, "failing\n".to_string()),
                    "/healthz" => (200, "ok\n".to_string()),
                    "/admin/fail-health" => {
                        failing.store(true, Ordering::Relaxed);
                        (200, "health now fails\n".into())
                    }
                    "/admin/ok" => {
                        failing.store(false, Ordering::Relaxed);
                        slow_ms.store(0, Ordering::Relaxed);
                        (200, "healthy\n".into())
                    }
                    "/admin/slow" => {
                        let ms = url
                            .split("ms=")
                            .nth(1)
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        slow_ms.store(ms, Ordering::Relaxed);
                        (200, format!("slow {ms} ms\n"))
                    }
                    _ => {
                        let ms = slow_ms.load(Ordering::Relaxed);
                        if ms > 0 {
                            std::thread::sleep(Duration::from_millis(ms));
                        }
                        (200, format!("{name}\n"))
                    }
                };
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(
                        tiny_http::Header::from_bytes(&b"X-Backend"[..], name.as_bytes())
                            .expect("header"),
                    );
                let _ = req.respond(resp);
                inflight.fetch_sub(1, Ordering::Relaxed);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One request's outcome in a load run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    /// How long the request took (connect to answer, or to the error).
    pub took: Duration,
    pub client: IpAddr,
    /// The answering backend's name, or the error.
    pub result: Result<String, String>,
}

/// Steady HTTP load from every client address of the lab, `rate` requests
/// per second in all, for `duration`; each request on a new connection.
/// Samples are appended to `out` as they complete.
pub fn load(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    out: Arc<std::sync::Mutex<Vec<Sample>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    load_mix(lab, v6, rate, duration, None, out)
}

/// [`load`] for `duration`, calling `during` with the start time while it
/// runs; returns every sample once all senders are done.
pub fn load_during(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    during: impl FnOnce(Instant),
) -> Vec<Sample> {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    let handles = load(lab, v6, rate, duration, samples.clone());
    during(start);
    for h in handles {
        // A sender only panics on a bug; let the caller see it.
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    }
    samples.lock().map(|s| s.clone()).unwrap_or_default()
}

/// [`load`] where every `n`-th request of each sender is a long one
/// (`/sleep?ms=ms`), given `long = Some((n, ms))`. Each sender thread waits
/// for its request to finish, so long requests hold a connection open.
pub fn load_mix(
    lab: &Lab,
    v6: bool,
    rate: u32,
    duration: Duration,
    long: Option<(usize, u64)>,
    out: Arc<std::sync::Mutex<Vec<Sample>>>,
) -> Vec<std::thread::JoinHandle<()>> {
    let start = Instant::now();
    let senders = CLIENTS * ADDRS_PER_CLIENT;
    let gap = Duration::from_secs_f64(senders as f64 / rate.max(1) as f64);
    let vip: SocketAddr = if v6 {
        format!("[{VIP6}]:80")
    } else {
        format!("{VIP4}:80")
    }
    .parse()
    .expect("literal");
    let mut handles = Vec::new();
    for c in 1..=CLIENTS {
        for k in 0..ADDRS_PER_CLIENT {
            let ns = lab.client_ns(c);
            let src: IpAddr = if v6 { client6(c, k) } else { client4(c, k) }
                .parse()
                .expect("literal");
            let out = out.clone();
            handles.push(std::thread::spawn(move || {
                let entered = in_netns(&ns, || {
                    // Stagger the senders over one gap.
                    std::thread::sleep(
                        gap.mul_f64((k as f64 + c as f64 * 0.5) / ADDRS_PER_CLIENT as f64),
                    );
                    let mut next = Instant::now();
                    let mut n = 0usize;
                    while start.elapsed() < duration {
                        let at = start.elapsed();
                        n += 1;
                        let path = match long {
                            Some((every, ms)) if n.is_multiple_of(every) => {
                                format!("/sleep?ms={ms}")
                            }
                            _ => "/".to_string(),
                        };
                        let result = http_get(&vip, Some(src), &path).map_err(|e| e.to_string());
                        let took = start.elapsed().saturating_sub(at);
                        if let Ok(mut o) = out.lock() {
                            o.push(Sample {
                                at,
                                took,
                                client: src,
                                result,
                            });
                        }
                        next += gap;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                });
                // A sender that could not enter its namespace sent nothing:
                // say so in the samples instead of silently sending less.
                if let Err(e) = entered
                    && let Ok(mut o) = out.lock()
                {
                    o.push(Sample {
                        at: start.elapsed(),
                        took: Duration::ZERO,
                        client: src,
                        result: Err(format!("sender could not enter {ns}: {e:#}")),
                    });
                }
            }));
        }
    }
    handles
}

/// A long-lived HTTP/1.1 keep-alive connection from one lab client address
/// to a VIP: every [`KeepAlive::ask`] sends one request on the same TCP
/// connection and returns the answering backend's name.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub client: IpAddr,
}

impl KeepAlive {
    /// Opens the connection from client `c`'s address `k` (in its namespace).
    pub fn open(lab: &Lab, c: usize, k: usize, v6: bool) -> Result<Self> {
        let (src, vip): (IpAddr, SocketAddr) = if v6 {
            (client6(c, k).parse()?, format!("[{VIP6}]:80").parse()?)
        } else {
            (client4(c, k).parse()?, format!("{VIP4}:80").parse()?)
        };
        let s = in_netns(&lab.client_ns(c), || {
            connect_from(src, vip, Duration::from_secs(2))
        })??;
        // Longer than any failover: a request may wait out a node's loss.
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
            client: src,
        })
    }

    /// One request on the open connection; the body (the backend's name).
    pub fn ask(&mut self) -> Result<String> {
        write!(self.writer, "GET / HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let head = read_head(&mut self.reader)?;
        let (code, len) = (head.code, head.content_length.unwrap_or(0));
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        if code != 200 {
            bail!("status {code}");
        }
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }
}
