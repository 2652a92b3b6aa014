//! Agent benchmarks run by `cargo xtask bench` (ignored by the test suite):
//! health probes keep their own schedule whatever the number of backends
//! and whatever else the agent is doing. Prints one `BENCH_JSON {...}` line.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{Netns, veth};
use lb_user::{
    api::{self, BackendInfo, BackendState, Edit, Request, VipRef},
    config::file,
    vocab::{ProbeVia, XdpMode},
};
use serde_json::json;

const LB: &str = env!("CARGO_BIN_EXE_lb");
const INTERVAL_MS: u64 = 200;

fn median(mut v: Vec<f64>) -> f64 {
    assert!(!v.is_empty(), "median of no samples");
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    assert!(!v.is_empty(), "quantile of no samples");
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Answers every health probe in namespace `p` on 0.0.0.0:8080 and records
/// when it arrived, per backend address (from the probe's Host header): 200,
/// or 503 for addresses marked dead.
struct Recorder {
    arrivals: Arc<Mutex<HashMap<IpAddr, Vec<Instant>>>>,
    dead: Arc<Mutex<HashSet<IpAddr>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start(p: &Netns) -> Self {
        let server = Arc::new(
            p.enter(|| tiny_http::Server::http("0.0.0.0:8080"))
                .expect("enter")
                .expect("recorder listens"),
        );
        let arrivals = Arc::new(Mutex::new(HashMap::<IpAddr, Vec<Instant>>::new()));
        let dead = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let (server, arrivals, dead, stop) =
                    (server.clone(), arrivals.clone(), dead.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                            continue;
                        };
                        let at = Instant::now();
                        let host = req
                            .headers()
                            .iter()
                            .find(|h| h.field.equiv("Host"))
                            .map(|h| h.value.as_str().to_string())
                            .unwrap_or_default();
                        let addr: Option<IpAddr> = host
                            .parse::<std::net::SocketAddr>()
                            .map(|s| s.ip())
                            .or_else(|_| host.parse())
                            .ok();
                        let code = match addr {
                            Some(a) => {
                                arrivals.lock().unwrap().entry(a).or_default().push(at);
                                if dead.lock().unwrap().contains(&a) {
                                    503
                                } else {
                                    200
                                }
                            }
                            None => 400,
                        };
                        let _ = req.respond(tiny_http::Response::empty(code));
                    }
                })
            })
            .collect();
        Self {
            arrivals,
            dead,
            stop,
            threads,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `lb run` in namespace `l`, removed with its pins when dropped.
struct Agent(lb_tests::scale::RunningAgent);

impl std::ops::Deref for Agent {
    type Target = lb_tests::scale::RunningAgent;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Agent {
    fn start(l: &Netns, vips: &[(VipRef, Vec<Ipv4Addr>)]) -> Self {
        let instance = format!("bp-{}-{}", vips[0].1.len(), std::process::id());
        let socket = PathBuf::from(format!("/run/lb/{instance}.sock"));
        let dir = std::env::temp_dir().join(&instance);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let cfg = file::File {
            agent: file::Agent {
                interface: "l0".into(),
                xdp_mode: Some(XdpMode::Skb),
                instance: Some(instance.clone()),
                control_socket: Some(socket.display().to_string()),
                netns: Some(l.name.clone()),
                ..Default::default()
            },
            announce: None,
            // The backends are probe counters on their own addresses,
            // without the VIP: what is measured is the probes' schedule,
            // not a path.
            vips: vips
                .iter()
                .map(|(vip, backends)| file::Vip {
                    health: Some(file::Health {
                        kind: Some("http"),
                        port: Some(8080),
                        via: Some(ProbeVia::Address),
                        interval_ms: Some(INTERVAL_MS),
                        timeout_ms: Some(150),
                        ..Default::default()
                    }),
                    ..file::Vip::new(
                        vip.address.to_string(),
                        vip.port,
                        backends
                            .iter()
                            .map(|b| file::Backend::at(b.to_string()))
                            .collect(),
                    )
                })
                .collect(),
        };
        let config = dir.join("lb.toml");
        std::fs::write(&config, cfg.to_toml("probe benchmark agent")).expect("config");
        let log = std::fs::File::create(dir.join("agent.log")).expect("log");
        let child = Command::new(LB)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start lb run");
        Self(lb_tests::scale::RunningAgent {
            lb: PathBuf::from(LB),
            child,
            instance,
            socket,
            dir,
        })
    }

    fn backends(&self) -> Option<Vec<BackendInfo>> {
        let v = api::call(&self.socket, &Request::BackendList { vip: None }).ok()?;
        serde_json::from_value(v).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits until every backend is up.
    fn wait_up(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            if let Some(b) = self.backends()
                && b.iter().filter(|b| b.state == BackendState::Up).count() == n
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{n} backends not up; agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn state_of(&self, addr: IpAddr) -> Option<BackendState> {
        self.backends()?
            .into_iter()
            .find(|b| b.address == addr)
            .map(|b| b.state)
    }
}

/// One agent health-checking 3 VIPs × `per_vip` backends over HTTP every
/// 200 ms while a CLI edit (a weight change, which rebuilds a 65,537-slot
/// Maglev ring) arrives every 100 ms. Measures the intervals between probe
/// arrivals at every backend over 8 s, then five times the time from a
/// backend starting to answer 503 to the agent marking it down (fall 3).
fn probe_schedule(per_vip: usize) -> serde_json::Value {
    let tag = format!("bp{per_vip}");
    Netns::sweep(&tag);
    let l = Netns::new(&format!("{tag}-l")).expect("netns");
    let p = Netns::new(&format!("{tag}-p")).expect("netns");
    veth(&l, "l0", &p, "p0").expect("veth");
    l.exec("ip", &["addr", "add", "198.18.20.1/23", "dev", "l0"])
        .expect("addr");
    l.exec("ip", &["link", "set", "l0", "up"]).expect("up");
    p.exec("ip", &["link", "set", "p0", "up"]).expect("up");
    let first = u32::from(Ipv4Addr::new(198, 18, 20, 10));
    let vips: Vec<(VipRef, Vec<Ipv4Addr>)> = (0..3u32)
        .map(|v| {
            let vip = VipRef {
                address: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 210 + v as u8)),
                port: 80,
                protocol: lb_user::api::Protocol::Tcp,
            };
            let backends = (0..per_vip as u32)
                .map(|i| Ipv4Addr::from(first + v * per_vip as u32 + i))
                .collect();
            (vip, backends)
        })
        .collect();
    let batch: String = vips
        .iter()
        .flat_map(|(_, b)| b)
        .map(|a| format!("addr add {a}/23 dev p0\n"))
        .collect();
    let batch_file = std::env::temp_dir().join(format!("{tag}-{}.ip", std::process::id()));
    std::fs::write(&batch_file, batch).expect("batch");
    p.exec("ip", &["-batch", &batch_file.to_string_lossy()])
        .expect("backend addresses");
    let _ = std::fs::remove_file(&batch_file);

    let rec = Recorder::start(&p);
    let agent = Agent::start(&l, &vips);
    let n = 3 * per_vip;
    agent.wait_up(n);

    // Background work for the agent: a weight edit every 100 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let edits = {
        let (socket, stop) = (agent.socket.clone(), stop.clone());
        let (vip, b) = (vips[0].0.clone(), IpAddr::V4(vips[0].1[0]));
        std::thread::spawn(move || {
            let mut done = 0u32;
            let mut w = 1;
            while !stop.load(Ordering::Relaxed) {
                w = if w == 1 { 2 } else { 1 };
                let e = Edit::BackendSet {
                    vip: vip.clone(),
                    address: b,
                    weight: Some(w),
                    drain: None,
                };
                if api::call(&socket, &Request::Edit(e)).is_ok() {
                    done += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            done
        })
    };
    rec.arrivals.lock().unwrap().clear();
    let window = Duration::from_secs(8);
    std::thread::sleep(window);
    let arrivals = std::mem::take(&mut *rec.arrivals.lock().unwrap());
    stop.store(true, Ordering::Relaxed);
    let edits_done = edits.join().expect("edit thread");
    assert!(
        edits_done >= 40,
        "only {edits_done} CLI edits in {window:?}"
    );

    let mut intervals = Vec::new();
    for (addr, times) in &arrivals {
        assert!(
            times.len() >= 20,
            "{addr}: only {} probes in {window:?}",
            times.len()
        );
        intervals.extend(times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3));
    }
    assert_eq!(arrivals.len(), n, "probes reached only some backends");

    // Failover: five backends (spread over the VIPs), one at a time.
    let mut detect = Vec::new();
    for k in 0..5 {
        let (_, bs) = &vips[k % 3];
        let victim = IpAddr::V4(bs[(k * 7) % bs.len()]);
        rec.dead.lock().unwrap().insert(victim);
        let t0 = Instant::now();
        while agent.state_of(victim) != Some(BackendState::Down) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{victim} not down after 5 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        detect.push(t0.elapsed().as_secs_f64() * 1e3);
        rec.dead.lock().unwrap().remove(&victim);
        let t1 = Instant::now();
        while agent.state_of(victim) != Some(BackendState::Up) {
            assert!(
                t1.elapsed() < Duration::from_secs(5),
                "{victim} not up again"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(agent);
    drop(rec);
    let row = json!({
        "backends": n,
        "probes": intervals.len() + arrivals.len(),
        "cli_edits": edits_done,
        "interval_p50_ms": median(intervals.clone()),
        "interval_p99_ms": quantile(intervals.clone(), 0.99),
        "interval_max_ms": quantile(intervals.clone(), 1.0),
        "interval_min_ms": quantile(intervals, 0.0),
        "failover_median_ms": median(detect.clone()),
        "failover_max_ms": quantile(detect, 1.0),
    });
    println!("{row}");
    row
}

#[test]
#[ignore = "benchmark: cargo xtask bench"]
fn bench_probe_schedule() {
    let rows: Vec<_> = [1, 100].into_iter().map(probe_schedule).collect();
    let line = json!({
        "bench": "probe_schedule",
        "interval_ms": INTERVAL_MS,
        "jitter": "up to 10 % of the interval, by design",
        "health": "http, timeout 150 ms, fall 3, rise 2",
        "background": "a CLI weight edit every 100 ms",
        "rows": rows,
    });
    println!("BENCH_JSON {line}");
}

/// Scale: load from scratch, one backend address out of every VIP by
/// reload, agent memory and the datapath maps' memory, for 1,000 VIPs × 10
/// backends, 10 × 1,000 and 4,096 × 16 (65,536 backends), health checks off.
#[test]
#[ignore = "benchmark: cargo xtask bench"]
fn bench_scale() {
    let rows: Vec<_> = [
        ("bsa", 1000, 10, 1021),
        ("bsb", 10, 1000, 65537),
        ("bsc", 4096, 16, 1021),
    ]
    .into_iter()
    .map(|(tag, v, b, ring)| lb_tests::scale::run(LB, tag, v, b, ring, false))
    .collect();
    let line = json!({
        "bench": "scale",
        "health": "none (kind = \"none\")",
        "build": "release",
        "rows": rows,
    });
    println!("BENCH_JSON {line}");
}
