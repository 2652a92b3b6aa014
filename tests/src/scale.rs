//! Scale runs for `tests/tests/scale.rs` and the scale benchmark: one agent
//! with V VIPs × B backends in the small data center of the agent tests.
//! [`run`] loads the configuration from scratch, checks that the
//! capacities and their use are reported, sends a request through the last
//! VIP, fails one backend address over everywhere it appears (an edited file
//! and `lb reload`), and returns the times. Health checks are off (`kind =
//! "none"`): at 10,000 backends the probes, not the datapath, would be what
//! is measured (see README, "Sizing").
//!
//! Addresses: VIPs in 198.19.0.0/20 and backends in 198.18.16.0/22 are
//! "AnyIP" local routes in the one backend namespace, which the LB reaches
//! through 198.18.11.2, so every backend has the same next hop.

use std::{
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_user::{
    api::{self, Request, StatusInfo},
    config::file,
};

use crate::{Dc, TestServer, dc};

fn vip_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i)
}
fn backend_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i)
}

/// A running `lb run` (binary `lb`) and its files: on drop, `lb down`
/// removes its datapath and pins, the process is killed, its lock file and
/// directory removed.
pub struct RunningAgent {
    pub lb: PathBuf,
    pub child: Child,
    pub instance: String,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = Command::new(&self.lb)
            .args(["down", "--instance", &self.instance, "--socket"])
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/run/lb/{}.lock", self.instance));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The small data center with one backend namespace owning every VIP and
/// backend address.
fn topology(tag: &str) -> Dc {
    let d = dc(tag, 1).expect("dc");
    let b = &d.backends[0];
    b.exec(
        "ip",
        &["route", "add", "local", "198.19.0.0/20", "dev", "lo"],
    )
    .expect("VIPs local");
    b.exec(
        "ip",
        &["route", "add", "local", "198.18.16.0/22", "dev", "lo"],
    )
    .expect("backends local");
    d.lb.exec(
        "ip",
        &[
            "route",
            "add",
            "198.18.16.0/22",
            "via",
            "198.18.11.2",
            "dev",
            "l1",
        ],
    )
    .expect("route to backends");
    d.client
        .exec(
            "ip",
            &["route", "add", "198.19.0.0/20", "via", "198.18.10.1"],
        )
        .expect("route to VIPs");
    // With health checks off nothing makes the kernel resolve the next hop.
    let mac = crate::fmt_mac(crate::mac_of(b, "b0"));
    d.lb.exec(
        "ip",
        &[
            "neigh",
            "replace",
            "198.18.11.2",
            "lladdr",
            &mac,
            "dev",
            "l1",
            "nud",
            "permanent",
        ],
    )
    .expect("neighbour");
    d
}

fn config(
    instance: &str,
    socket: &std::path::Path,
    lb_ns: &str,
    vips: u32,
    per_vip: u32,
    ring: u32,
    skip: Option<u32>,
) -> String {
    let vips = (0..vips)
        .map(|v| file::Vip {
            ring_size: Some(ring),
            health: Some(file::Health::none()),
            ..file::Vip::new(
                vip_addr(v).to_string(),
                8080,
                (0..per_vip)
                    .filter(|b| Some(*b) != skip)
                    .map(|b| file::Backend::at(backend_addr(b).to_string()))
                    .collect(),
            )
        })
        .collect::<Vec<_>>();
    file::File {
        agent: file::Agent {
            max_vips: Some((vips.len() as u32).next_power_of_two().max(16)),
            max_backends: Some((vips.len() as u32 * per_vip + 1).next_power_of_two()),
            ..file::Agent::instance("l0", instance, socket, lb_ns)
        },
        announce: None,
        vips,
    }
    .to_toml("scale test agent")
}

fn status(socket: &std::path::Path) -> Option<StatusInfo> {
    api::call(socket, &Request::Status)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// Agent RSS in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Every BPF map process `pid` holds: (name, max entries, kernel memlock).
fn maps_of(pid: u32) -> Vec<(String, u32, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(t) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |k: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        if let Ok(info) = aya::maps::MapInfo::from_id(id as u32) {
            out.push((
                info.name_as_str().unwrap_or("?").to_string(),
                info.max_entries(),
                mem,
            ));
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.2));
    out.dedup();
    out
}

/// What one scale run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ScaleRun {
    pub vips: u32,
    pub backends_per_vip: u32,
    pub ring_size: u32,
    /// Agent start → every backend up (and serving).
    pub load_s: f64,
    /// `lb reload` of a file without one backend address in any VIP.
    pub reload_one_backend_out_s: f64,
    pub agent_rss_mib: u64,
    pub maps_mib: f64,
}

/// Runs one scale configuration with the `lb` binary at `lb` (see the
/// module text); `print_maps` lists every map's memory.
pub fn run(lb: &str, tag: &str, vips: u32, per_vip: u32, ring: u32, print_maps: bool) -> ScaleRun {
    const MIB: f64 = (1u64 << 20) as f64;
    let d = topology(tag);
    let _srv = TestServer::start(&d.backends[0], "b1").expect("server");
    let instance = format!("t-{tag}-{}", std::process::id());
    let socket = PathBuf::from(format!("/run/lb/{instance}.sock"));
    let dir = std::env::temp_dir().join(&instance);
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("lb.toml");
    std::fs::write(
        &cfg,
        config(&instance, &socket, &d.lb.name, vips, per_vip, ring, None),
    )
    .expect("config");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let t0 = Instant::now();
    let child = Command::new(lb)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("lb run");
    let agent = RunningAgent {
        lb: PathBuf::from(lb),
        child,
        instance,
        socket: socket.clone(),
        dir: dir.clone(),
    };
    let total = (vips * per_vip) as usize;
    let s = loop {
        if let Some(s) = status(&socket)
            && s.backends_up == total
        {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "not loaded in 300 s; log:\n{}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let load = t0.elapsed();
    assert_eq!(s.vips, vips as usize);
    let c = s.capacity.expect("capacity reported");
    assert_eq!(c.vips_used, vips);
    assert_eq!(c.backends_used, vips * per_vip);
    assert_eq!(c.ring_slots_used, 2 * u64::from(ring) * u64::from(vips));
    assert!(c.maps_memory_bytes > 0);
    let rss = rss_kib(agent.child.id());
    if print_maps {
        for (name, n, mem) in maps_of(agent.child.id()) {
            println!("map {name:<16} {n:>10} entries {mem:>12} bytes");
        }
    }

    // A request through the last VIP reaches the backend.
    let v = vip_addr(vips - 1);
    let got = d
        .client
        .enter(|| -> std::io::Result<String> {
            use std::io::BufRead as _;
            let s = TcpStream::connect_timeout(&(v, 8080).into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim().to_string())
        })
        .expect("setns")
        .expect("a request through the last VIP");
    assert_eq!(got, "b1");

    // One backend address leaves every VIP: the edited file, `lb reload`.
    std::fs::write(
        &cfg,
        config(
            &agent.instance,
            &socket,
            &d.lb.name,
            vips,
            per_vip,
            ring,
            Some(0),
        ),
    )
    .expect("config");
    let t1 = Instant::now();
    let out = Command::new(lb)
        .args(["reload", "--socket"])
        .arg(&socket)
        .output()
        .expect("lb reload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reload = t1.elapsed();
    let s = status(&socket).expect("status");
    assert_eq!(s.backends, (vips * (per_vip - 1)) as usize);
    println!(
        "{vips} VIPs x {per_vip} backends (ring {ring}): loaded and serving in {:.2} s, one backend out of every \
         VIP by reload in {:.2} s, agent RSS {} MiB, datapath maps {:.1} MiB",
        load.as_secs_f64(),
        reload.as_secs_f64(),
        rss / 1024,
        c.maps_memory_bytes as f64 / MIB
    );
    ScaleRun {
        vips,
        backends_per_vip: per_vip,
        ring_size: ring,
        load_s: load.as_secs_f64(),
        reload_one_backend_out_s: reload.as_secs_f64(),
        agent_rss_mib: rss / 1024,
        maps_mib: c.maps_memory_bytes as f64 / MIB,
    }
}
