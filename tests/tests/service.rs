//! The systemd unit in `dist/lb.service`, exercised the way systemd would
//! use it (there is no systemd here to run it): its `ExecStartPre` refuses a
//! bad file with `file:line:column` and passes a good one, `ExecStart` runs
//! the agent, `ExecReload` re-reads the file, and the `KillSignal` stops the
//! agent with exit status 0 while the datapath stays attached and
//! forwarding. The unit's paths (/usr/local/bin/lb, /etc/lb/lb.toml) are
//! replaced by this build's binary and a temporary file.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{TestServer, ask_vip, backend_addr, dc};
use lb_user::{
    api::{self, BackendInfo, BackendState, Request},
    config::file::{self, File},
};

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// `Key=value` lines of the unit's `[Service]` section.
fn service_keys(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn key<'a>(keys: &'a [(String, String)], k: &str) -> &'a str {
    keys.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("dist/lb.service has no {k}="))
}

/// A unit command line with this test's binary and config file.
fn command(line: &str, config: &std::path::Path, pid: Option<u32>) -> Command {
    let line = line
        .replace("/usr/local/bin/lb", LB)
        .replace("/etc/lb/lb.toml", &config.display().to_string())
        .replace("$MAINPID", &pid.map(|p| p.to_string()).unwrap_or_default());
    let mut words = line.split_whitespace();
    let mut c = Command::new(words.next().expect("a command"));
    c.args(words);
    c
}

#[test]
fn the_systemd_unit_checks_starts_reloads_and_stops_the_agent() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/lb.service"))
        .expect("dist/lb.service");
    let keys = service_keys(&unit);
    assert_eq!(key(&keys, "KillSignal"), "SIGTERM");

    let d = dc("svc", 1).expect("dc");
    let _srv = TestServer::start(&d.backends[0], "b1").expect("server");
    let instance = format!("t-svc-{}", std::process::id());
    let socket = format!("/run/lb/{instance}.sock");
    let dir = std::env::temp_dir().join(&instance);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("lb.toml");
    let mut file = File {
        agent: file::Agent::instance("l0", &instance, std::path::Path::new(&socket), &d.lb.name),
        announce: None,
        vips: vec![file::Vip::new(
            "198.18.0.100",
            8080,
            vec![file::Backend::at(backend_addr(1))],
        )],
    };
    let good = file.to_toml("service test agent");
    // Removes the agent and its pins however the test ends.
    struct Down(String, String, std::path::PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = Command::new(LB)
                .args(["down", "--instance", &self.0, "--socket", &self.1])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&self.2);
        }
    }
    let _down = Down(instance.clone(), socket.clone(), dir.clone());

    // ExecStartPre refuses a bad file, saying where, and passes a good one.
    // (A port out of range: only text can say it.)
    std::fs::write(&config, good.replace("port = 8080", "port = 80800")).expect("write");
    let pre = command(key(&keys, "ExecStartPre"), &config, None)
        .output()
        .expect("ExecStartPre");
    let err = String::from_utf8_lossy(&pre.stderr);
    assert!(!pre.status.success(), "a bad file must fail ExecStartPre");
    assert!(err.contains("lb.toml:"), "where the error is: {err}");
    std::fs::write(&config, &good).expect("write");
    let pre = command(key(&keys, "ExecStartPre"), &config, None)
        .output()
        .expect("ExecStartPre");
    assert!(
        pre.status.success(),
        "{}",
        String::from_utf8_lossy(&pre.stderr)
    );

    // ExecStart: the agent comes up and serves the VIP.
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let mut agent = command(key(&keys, "ExecStart"), &config, None)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("ExecStart");
    let up = |want: u32| {
        let t0 = Instant::now();
        loop {
            let list: Option<Vec<BackendInfo>> = api::call(
                std::path::Path::new(&socket),
                &Request::BackendList { vip: None },
            )
            .ok()
            .and_then(|v| serde_json::from_value(v).ok());
            if list.is_some_and(|l| {
                l.iter()
                    .filter(|b| b.state == BackendState::Up && b.weight == want)
                    .count()
                    == 1
            }) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "agent not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    up(1);
    let ask = || {
        d.client
            .enter(|| ask_vip(Duration::from_secs(2)))
            .expect("setns")
    };
    assert_eq!(ask().expect("through the VIP"), "b1");

    // ExecReload: an edited file is applied.
    file.vips[0].backends[0].weight = Some(3);
    std::fs::write(&config, file.to_toml("service test agent")).expect("write");
    let st = command(key(&keys, "ExecReload"), &config, Some(agent.id()))
        .status()
        .expect("ExecReload");
    assert!(st.success());
    up(3);

    // KillSignal: exit status 0 within seconds, the datapath still forwards.
    let st = Command::new("kill")
        .args(["-s", "TERM", &agent.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = agent.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the agent did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "SIGTERM is a clean stop: {status}, log:\n{}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );
    assert_eq!(
        ask().expect("the datapath outlives the agent"),
        "b1",
        "still forwarding after the agent stopped"
    );
}

/// `lb completions` and `lb man` (what `cargo xtask dist` installs) come
/// from the CLI's own definitions: every subcommand `lb --help` lists has a
/// manual page and is completed, and the bash script parses.
#[test]
fn completions_and_manual_pages_cover_every_subcommand() {
    let help = Command::new(LB).arg("--help").output().expect("lb --help");
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let subcommands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(subcommands.len() > 10, "{help}");
    let dir = std::env::temp_dir().join(format!("lb-man-{}", std::process::id()));
    let out = Command::new(LB)
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .expect("lb man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main = std::fs::read_to_string(dir.join("lb.1")).expect("lb.1");
    assert!(main.contains(".TH lb 1"), "{main}");
    for c in &subcommands {
        assert!(
            dir.join(format!("lb-{c}.1")).exists(),
            "no manual page for lb {c}"
        );
    }
    // The pages render as a reader sees them (`man -l`, no pager).
    for page in ["lb.1", "lb-vip-add.1"] {
        let shown = Command::new("man")
            .arg("-l")
            .arg(dir.join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man -l");
        let text = String::from_utf8_lossy(&shown.stdout).to_string();
        assert!(
            shown.status.success() && text.contains("NAME") && text.contains("SYNOPSIS"),
            "man -l {page}: {text}{}",
            String::from_utf8_lossy(&shown.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let bash = Command::new(LB)
        .args(["completions", "bash"])
        .output()
        .expect("lb completions");
    let script = String::from_utf8_lossy(&bash.stdout).to_string();
    for c in &subcommands {
        assert!(script.contains(c.as_str()), "bash completion lacks {c}");
    }
    let check = Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .expect("bash -n");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
