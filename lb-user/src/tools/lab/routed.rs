//! The lab's routed front, for several LB nodes: a router namespace and one
//! BIRD per node. The router (AS 65000) has an eBGP session with BFD
//! (100 ms × 3) to every LB node (AS 65001), over IPv4 and IPv6; its kernel
//! protocol merges the equal routes into one ECMP route, hashed on layer 4
//! (`fib_multipath_hash_policy = 1`). Each node's BIRD learns the routes
//! its `lb` agent keeps in kernel table [`ANNOUNCE_TABLE`] and exports them.
//!
//! Daemons are started with their own config, control socket, pid file and
//! log under the lab's run directory, and killed by `Lab::down`.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Lab, lab_vips, run_ok};
use crate::{
    config::file::{Announce, File, Health},
    vocab::{Forwarding, HashInput},
};

pub const MAX_NODES: usize = 3;
pub const RT4: &str = "198.18.0.1";
pub const RT6: &str = "2001:2::1";
/// Kernel table the lab's agents announce into (`announce.table`).
pub const ANNOUNCE_TABLE: u32 = 100;
const ROUTER_AS: u32 = 65000;
const LB_AS: u32 = 65001;

/// Node `n`'s short name: `lb`, `lb2`, `lb3` (its bridge port is `p-<short>`).
pub fn short(n: usize) -> String {
    if n <= 1 {
        "lb".into()
    } else {
        format!("lb{n}")
    }
}
pub fn lb4(n: usize) -> String {
    format!("198.18.0.{}", 1 + n)
}
pub fn lb6(n: usize) -> String {
    format!("2001:2::{}", 1 + n)
}

/// BIRD's binaries live in /usr/sbin, which a non-login PATH may lack.
fn sbin(name: &str) -> String {
    let p = format!("/usr/sbin/{name}");
    if std::path::Path::new(&p).exists() {
        p
    } else {
        name.to_string()
    }
}

const BFD: &str = "protocol bfd {\n  interface \"eth0\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };\n}\n";

fn session(
    name: &str,
    local: &str,
    local_as: u32,
    peer: &str,
    peer_as: u32,
    channel: &str,
) -> String {
    format!(
        "protocol bgp {name} {{\n  local {local} as {local_as};\n  neighbor {peer} as {peer_as};\n  bfd on;\n  \
         hold time 3;\n  keepalive time 1;\n  connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 2;\n  {channel}\n}}\n"
    )
}

impl Lab {
    fn bird_file(&self, name: &str, ext: &str) -> PathBuf {
        self.run_dir().join(format!("bird-{name}.{ext}"))
    }

    /// The router's BIRD configuration: a session per node and family.
    pub fn bird_router_conf(&self) -> String {
        let mut c = format!(
            "log \"{}\" all;\nrouter id {RT4};\nprotocol device {{ scan time 2; }}\n{BFD}\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths yes limit 8; }}\n\
             protocol kernel {{ ipv6 {{ import none; export all; }}; merge paths yes limit 8; }}\n",
            self.bird_file("rt", "log").display()
        );
        for n in 1..=self.nodes {
            c.push_str(&session(
                &format!("lb{n}_v4"),
                RT4,
                ROUTER_AS,
                &lb4(n),
                LB_AS,
                "ipv4 { import all; export none; };",
            ));
            c.push_str(&session(
                &format!("lb{n}_v6"),
                RT6,
                ROUTER_AS,
                &lb6(n),
                LB_AS,
                "ipv6 { import all; export none; };",
            ));
        }
        c
    }

    /// An LB node's BIRD configuration: learn the agent's announce table,
    /// export it to the router. This is the configuration `lb` expects of
    /// a node's routing daemon (README, "Running several nodes").
    pub fn bird_node_conf(&self, n: usize) -> String {
        let mut c = format!(
            "log \"{}\" all;\nrouter id {};\nprotocol device {{ scan time 2; }}\n{BFD}\
             protocol kernel vips4 {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; ipv4 {{ import all; export none; }}; }}\n\
             protocol kernel vips6 {{ kernel table {ANNOUNCE_TABLE}; learn; scan time 1; ipv6 {{ import all; export none; }}; }}\n",
            self.bird_file(&short(n), "log").display(),
            lb4(n)
        );
        c.push_str(&session(
            "up_v4",
            &lb4(n),
            LB_AS,
            RT4,
            ROUTER_AS,
            "ipv4 { import none; export all; };",
        ));
        c.push_str(&session(
            "up_v6",
            &lb6(n),
            LB_AS,
            RT6,
            ROUTER_AS,
            "ipv6 { import none; export all; };",
        ));
        c
    }

    /// Starts BIRD `name` in `ns` with `conf`.
    fn start_bird(&self, ns: &str, name: &str, conf: &str) -> Result<()> {
        let cf = self.bird_file(name, "conf");
        std::fs::write(&cf, conf)?;
        let pid = self.bird_file(name, "pid");
        let ctl = self.bird_file(name, "ctl");
        let _ = std::fs::remove_file(&ctl);
        let bird = sbin("bird");
        let out = Command::new("ip")
            .args(["netns", "exec", ns, &bird, "-c"])
            .arg(&cf)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(&pid)
            .output()
            .with_context(|| {
                format!("starting BIRD ({bird}); `cargo xtask setup` installs bird2")
            })?;
        if !out.status.success() {
            bail!(
                "BIRD `{name}` in {ns} did not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `birdc show ...` against BIRD `name` (router: "rt", nodes: [`short`]).
    pub fn birdc(&self, name: &str, cmd: &str) -> Result<String> {
        let ctl = self.bird_file(name, "ctl");
        let mut args = vec!["-s".to_string(), ctl.display().to_string()];
        args.extend(cmd.split_whitespace().map(str::to_string));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&sbin("birdc"), &a)
    }

    /// The router, its sysctls and every BIRD.
    pub(crate) fn up_routed(&self) -> Result<()> {
        let rt = self.ns("rt");
        self.add_addrs(&rt, "eth0", RT4, RT6, (24, 64))?;
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            // Per-flow (layer-4) ECMP, not per source/destination pair.
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
            // Clients and LB nodes share the router's segment: no redirect
            // may send clients around the ECMP route.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.eth0.send_redirects=0",
        ] {
            self.exec(&rt, &["sysctl", "-qw", kv])?;
        }
        self.exec(&rt, &["ethtool", "-K", "eth0", "tx", "off"])?;
        for c in 1..=super::CLIENTS {
            let ns = self.client_ns(c);
            for kv in [
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.eth0.accept_redirects=0",
            ] {
                self.exec(&ns, &["sysctl", "-qw", kv])?;
            }
        }
        for n in 1..=self.nodes {
            // A node "dies" by its link going down (`kill_node`); Linux
            // would drop its IPv6 addresses with the link, a real host keeps
            // its configuration.
            self.exec(
                &self.lb_ns_of(n),
                &["sysctl", "-qw", "net.ipv6.conf.eth0.keep_addr_on_down=1"],
            )?;
        }
        // A switch port sends a host only frames for its MAC; a Linux bridge
        // floods frames for a MAC it has not learned (or forgot when the
        // port went down) to every port. Without this, a dead node's traffic
        // would be flooded to the live nodes, whose XDP (which, like a NIC
        // filtering unicast in hardware, does not check the destination
        // MAC) would serve it: node loss would look better than it is.
        let br = self.ns("br");
        for n in 1..=self.nodes {
            let port = format!("p-{}", short(n));
            self.exec(
                &br,
                &["bridge", "link", "set", "dev", &port, "flood", "off"],
            )?;
        }
        self.start_bird(&rt, "rt", &self.bird_router_conf())?;
        for n in 1..=self.nodes {
            self.start_bird(&self.lb_ns_of(n), &short(n), &self.bird_node_conf(n))?;
        }
        Ok(())
    }

    /// Kills every daemon the lab started (BIRD, Redis) by its pid file.
    pub(crate) fn stop_daemons(&self) {
        let Ok(dir) = std::fs::read_dir(self.run_dir()) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("bird-") || name.starts_with("redis")) && name.ends_with(".pid") {
                if let Ok(pid) = std::fs::read_to_string(e.path()) {
                    let _ = Command::new("kill")
                        .args(["-9", pid.trim()])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The router's next hops for `vip` (empty: no route).
    pub fn router_next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let (fam, len) = if vip.is_ipv4() {
            ("-4", 32)
        } else {
            ("-6", 128)
        };
        let dst = format!("{vip}/{len}");
        let Ok(text) = self.exec(&self.ns("rt"), &["ip", "-j", fam, "route", "show", &dst]) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        let mut hops: Vec<IpAddr> = Vec::new();
        for r in v.as_array().into_iter().flatten() {
            if let Some(g) = r.get("gateway").and_then(|g| g.as_str()) {
                hops.extend(g.parse::<IpAddr>().ok());
            }
            for nh in r
                .get("nexthops")
                .and_then(|n| n.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(g) = nh.get("gateway").and_then(|g| g.as_str()) {
                    hops.extend(g.parse::<IpAddr>().ok());
                }
            }
        }
        hops
    }

    /// Waits (bounded) until the router's route to `vip` has exactly `n`
    /// next hops; returns how long that took.
    pub fn wait_next_hops(&self, vip: IpAddr, n: usize, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let hops = self.router_next_hops(vip);
            if hops.len() == n {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                bail!(
                    "the router's route to {vip} has next hops {hops:?}, not {n}, after {limit:?}; router BIRD:\n{}",
                    self.birdc("rt", "show protocols").unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node `n` dies: its link goes down (nothing in or out) and its BIRD
    /// is killed. Its agent is the caller's to kill.
    pub fn kill_node(&self, n: usize) -> Result<()> {
        let ns = self.lb_ns_of(n);
        self.exec(&ns, &["ip", "link", "set", "eth0", "down"])?;
        if let Ok(pid) = std::fs::read_to_string(self.bird_file(&short(n), "pid")) {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        Ok(())
    }

    /// Node `n` comes back: link up, BIRD started again.
    pub fn revive_node(&self, n: usize) -> Result<()> {
        let ns = self.lb_ns_of(n);
        self.exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
        self.start_bird(&ns, &short(n), &self.bird_node_conf(n))
    }

    /// The control socket of node `n`'s agent.
    pub fn socket_of(&self, n: usize) -> PathBuf {
        if n <= 1 {
            self.socket()
        } else {
            self.run_dir().join(format!("lb{n}.sock"))
        }
    }

    /// Node `n`'s agent instance name.
    pub fn instance_of(&self, n: usize) -> String {
        if n <= 1 {
            self.prefix.clone()
        } else {
            format!("{}-n{n}", self.prefix)
        }
    }

    /// Node `n`'s agent configuration: the lab's VIPs (IPv4 and IPv6) over
    /// the three backends, announced through table [`ANNOUNCE_TABLE`].
    pub fn node_file(
        &self,
        n: usize,
        forwarding: Forwarding,
        hash: HashInput,
        health: Health,
    ) -> File {
        File {
            agent: self.agent_section(&self.instance_of(n), &self.socket_of(n), &self.lb_ns_of(n)),
            announce: Some(Announce {
                table: ANNOUNCE_TABLE,
            }),
            vips: lab_vips(forwarding, hash, health),
        }
    }
}
