//! The agent harness the end-to-end test files share: `lb run` (the real
//! CLI binary) started in a small data center's balancer namespace, the CLI
//! pointed at it, and everything removed on drop.
// Each test file uses a part of this module.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{Dc, TestServer, ask_vip, backend_addr};
use lb_user::{
    api::{self, BackendInfo, BackendState, Request},
    config::file::{self, File},
};

pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// A running `lb run` process and everything it owns.
pub struct Agent {
    pub child: Option<Child>,
    pub instance: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// The test agent's configuration: VIP 198.18.0.100:8080 over the data
    /// center's first `n` backends, metrics on 127.0.0.1:9100.
    pub fn config_file(instance: &str, socket: &std::path::Path, lb_ns: &str, n: usize) -> File {
        File {
            agent: file::Agent {
                metrics_listen: Some("127.0.0.1:9100".into()),
                ..file::Agent::instance("l0", instance, socket, lb_ns)
            },
            announce: None,
            vips: vec![file::Vip::new(
                "198.18.0.100",
                8080,
                (1..=n)
                    .map(|i| file::Backend::at(backend_addr(i)))
                    .collect(),
            )],
        }
    }

    pub fn start(tag: &str, d: &Dc, n: usize) -> Self {
        Self::start_edited(tag, d, n, |_| {})
    }

    /// [`Agent::start`] with the configuration changed by `edit`.
    pub fn start_edited(tag: &str, d: &Dc, n: usize, edit: impl FnOnce(&mut File)) -> Self {
        let a = Self::launch(tag, d, n, edit);
        a.wait_ready(n);
        a
    }

    /// Starts the agent with `n` backends, edited by `edit`, and returns
    /// once its control socket answers (its datapath attached), without
    /// waiting for any backend.
    pub fn launch(tag: &str, d: &Dc, n: usize, edit: impl FnOnce(&mut File)) -> Self {
        let instance = format!("t-{tag}-{}", std::process::id());
        let socket = PathBuf::from(format!("/run/lb/{instance}.sock"));
        let dir = std::env::temp_dir().join(&instance);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let config = dir.join("lb.toml");
        let mut file = Self::config_file(&instance, &socket, &d.lb.name, n);
        edit(&mut file);
        std::fs::write(&config, file.to_toml("test agent")).expect("config");
        let mut a = Agent {
            child: None,
            instance,
            socket,
            config,
            log: dir.join("agent.log"),
        };
        a.spawn();
        let t0 = Instant::now();
        while api::call(&a.socket, &Request::Status).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "agent not answering; its log:\n{}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(LB)
            .args(["run", "--log-format", "json", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start lb run");
        self.child = Some(child);
    }

    /// Waits until the agent answers and `n` backends are up with their
    /// next hop known.
    pub fn wait_ready(&self, n: usize) {
        let t0 = Instant::now();
        loop {
            if let Ok(v) = api::call(&self.socket, &Request::BackendList { vip: None }) {
                let list: Vec<BackendInfo> = serde_json::from_value(v).expect("backend list");
                if list
                    .iter()
                    .filter(|b| b.next_hop_known && b.state == BackendState::Up)
                    .count()
                    >= n
                {
                    return;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "agent not ready; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's log events (one JSON object per line) whose fields
    /// include every `(key, value)` of `want`.
    pub fn events(&self, want: &[(&str, &str)]) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| want.iter().all(|(k, v)| e[*k].as_str() == Some(*v)))
            .collect()
    }

    /// Runs the CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(LB)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run lb");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn backends(&self) -> Vec<BackendInfo> {
        serde_json::from_str(
            &self
                .cli(&["backend", "list", "--json"])
                .expect("backend list"),
        )
        .expect("json")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new(LB)
            .args(["down", "--instance", &self.instance, "--socket"])
            .arg(&self.socket)
            .stdout(Stdio::null())
            .status();
        self.kill9();
        let _ = std::fs::remove_file(format!("/run/lb/{}.lock", self.instance));
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A test HTTP server on every backend of `d`.
pub fn servers(d: &Dc) -> Vec<TestServer> {
    d.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| TestServer::start(ns, &format!("b{}", i + 1)).expect("server"))
        .collect()
}

/// Readies `d` for NAT on a two-armed balancer (clients on `l0`, backends
/// behind `l1`, `l2`, ...): the backends' replies pass the LB's XDP, so
/// they leave with finished checksums, as on a wire; and native redirects
/// into `l0` need a program on its peer `c0`. Keep the returned object
/// while the test runs.
pub fn nat_two_armed(d: &Dc) -> aya::Ebpf {
    for b in &d.backends {
        b.exec("ethtool", &["-K", "b0", "tx", "off"])
            .expect("ethtool");
    }
    let mut pass = lb_tests::load().expect("load");
    d.client
        .enter(|| {
            lb_tests::loader::attach(
                &mut pass,
                lb_common::PROG_PASS,
                "c0",
                lb_user::vocab::XdpMode::Native,
            )
        })
        .expect("setns")
        .expect("pass on c0");
    pass
}
/// Sends `n` requests, `gap` apart, from the client namespace; returns
/// (send time, backend name or error) for each.
pub fn traffic(d: &Dc, n: usize, gap: Duration) -> Vec<(Instant, Result<String, String>)> {
    d.client
        .enter(|| {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    let r = ask_vip(Duration::from_millis(500)).map_err(|e| e.to_string());
                    if let Some(rest) = gap.checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                    (t, r)
                })
                .collect()
        })
        .expect("setns")
}

/// A connection to a test server with its greeting read: the stream (2 s
/// read timeout) and the name of the backend that answered.
pub fn greeting(c: std::net::TcpStream) -> (std::net::TcpStream, String) {
    use std::io::BufRead as _;
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(c.try_clone().unwrap())
        .read_line(&mut line)
        .expect("name");
    (c, line.trim().to_string())
}
