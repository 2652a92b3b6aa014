//! The agent's configuration end to end: a bad file refused with nothing
//! changed, settings in a reload applied or refused, concurrent CLI edits,
//! `lb down`, VIP edits with SIGHUP and their metrics, `lb explain
//! --what-if`. Same harness as `agent.rs`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod support;

use lb_tests::{backend_addr, dc};
use lb_user::api::{self, BackendState};
use support::{Agent, LB, servers, traffic};

/// What the instance's pinned maps hold for its VIPs, backends and
/// settings (every VIP by id, every backend entry, the settings), read the
/// way another process would: two reads compare equal when the datapath's
/// configuration did not change.
fn pinned_datapath_config(
    instance: &str,
) -> (
    Vec<lb_common::VipById>,
    Vec<lb_common::Backend>,
    lb_common::Settings,
) {
    fn entries<T: aya::Pod + Default + PartialEq>(instance: &str, map: &str) -> Vec<T> {
        let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/{map}"))
            .unwrap_or_else(|e| panic!("pinned {map}: {e}"));
        let a = aya::maps::Array::<_, T>::try_from(aya::maps::Map::Array(md)).expect("array");
        a.iter()
            .map(|v| v.expect("read"))
            .filter(|v| *v != T::default())
            .collect()
    }
    let settings = entries::<lb_common::Settings>(instance, "SETTINGS");
    (
        entries(instance, "VIPS_BY_ID"),
        entries(instance, "BACKENDS"),
        settings.first().copied().unwrap_or_default(),
    )
}

#[test]
fn bad_config_is_refused_and_changes_nothing() {
    let d = dc("agb", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agb", &d, 2);
    let before = agent.cli(&["vip", "list", "--json"]).expect("vip list");
    let maps_before = pinned_datapath_config(&agent.instance);
    assert!(
        !maps_before.0.is_empty() && !maps_before.1.is_empty(),
        "the agent's VIP and backends are in the maps: {maps_before:?}"
    );

    let good = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        good.replace("port = 8080", "port = 8080\nring_size = 65536"),
    )
    .unwrap();
    let err = agent
        .cli(&["reload"])
        .expect_err("reload of a bad file must fail");
    println!("lb reload: {err}");
    assert!(
        err.contains("lb.toml:") && err.contains("ring_size 65536 must be a prime"),
        "{err}"
    );
    assert_eq!(
        agent.cli(&["vip", "list", "--json"]).expect("vip list"),
        before,
        "the agent's model unchanged"
    );
    assert_eq!(
        pinned_datapath_config(&agent.instance),
        maps_before,
        "the datapath's maps unchanged"
    );
    let t = traffic(&d, 30, Duration::ZERO);
    assert!(
        t.iter().all(|(_, r)| r.is_ok()),
        "traffic unaffected: {t:?}"
    );

    // `lb check` says the same without an agent; `lb run` refuses it too.
    let out = Command::new(LB)
        .args(["check", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("must be a prime")
    );

    // A second agent on the same instance is refused.
    std::fs::write(&agent.config, &good).unwrap();
    let out = Command::new(LB)
        .args(["run", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("another agent is already running"),
        "{msg}"
    );

    // And the good file reloads.
    agent.cli(&["reload"]).expect("reload good file");
}

/// The instance's pinned `SETTINGS` entry, read the way another process
/// would.
fn pinned_settings(instance: &str) -> lb_common::Settings {
    let md = aya::maps::MapData::from_pin(format!("/sys/fs/bpf/lb/{instance}/maps/SETTINGS"))
        .expect("SETTINGS pinned");
    let a = aya::maps::Array::<_, lb_common::Settings>::try_from(aya::maps::Map::Array(md))
        .expect("an array");
    a.get(&0, 0).expect("entry 0")
}

/// A reload that changes `agent.*` settings applies those the datapath can
/// take live (read back from the pinned map, not the agent's model) and
/// refuses the rest where the file sets them, changing nothing.
#[test]
fn agent_settings_in_a_reload_are_applied_or_refused_where_the_file_sets_them() {
    let d = dc("ags", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("ags", &d, 2);
    let good = std::fs::read_to_string(&agent.config).unwrap();
    let before = pinned_settings(&agent.instance);
    assert_eq!(before.ipip_mtu, 1500);

    // Applied live: the path MTU of ipip backends and the NAT port range.
    let live = good.replace(
        "xdp_mode = \"native\"\n",
        "xdp_mode = \"native\"\nipip_mtu = 1400\nnat_ports = \"2000-2999\"\n",
    );
    std::fs::write(&agent.config, &live).unwrap();
    agent.cli(&["reload"]).expect("reload with new settings");
    let s = pinned_settings(&agent.instance);
    assert_eq!(s.ipip_mtu, 1400, "agent.ipip_mtu reached the datapath");
    assert_eq!(
        (s.nat_port_lo, s.nat_port_hi),
        (2000, 2999),
        "agent.nat_ports too"
    );

    // Refused where the file sets it: a capacity (line 7 once the two
    // lines above are in), then a setting read at start.
    for (from, to, want) in [
        (
            "flow_table_size = 65536",
            "flow_table_size = 131072",
            "lb.toml:7:1: agent.flow_table_size: fixed when the datapath is loaded",
        ),
        (
            "metrics_listen = \"127.0.0.1:9100\"",
            "metrics_listen = \"127.0.0.1:9101\"",
            "agent.metrics_listen: read when the agent starts",
        ),
    ] {
        assert!(live.contains(from), "{from}");
        std::fs::write(&agent.config, live.replace(from, to)).unwrap();
        let err = agent.cli(&["reload"]).expect_err("refused");
        println!("lb reload: {err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(
            pinned_settings(&agent.instance),
            s,
            "a refused reload changes nothing"
        );
    }
    // The applied file again: the agent still serves.
    std::fs::write(&agent.config, &live).unwrap();
    agent.cli(&["reload"]).expect("reload");
    let t = traffic(&d, 20, Duration::ZERO);
    assert!(
        t.iter().all(|(_, r)| r.is_ok()),
        "traffic unaffected: {t:?}"
    );
    // And back to the defaults, live.
    std::fs::write(&agent.config, &good).unwrap();
    agent.cli(&["reload"]).expect("reload of the first file");
    assert_eq!(pinned_settings(&agent.instance), before);
}

/// Concurrent CLI edits: 40 `lb backend add` processes at once, then 40
/// removes. Every edit that reports success is in the datapath and in the
/// file, and the file stays valid; a request that merely carries the word
/// "shutdown" in an argument does not stop the agent.
#[test]
fn concurrent_cli_edits_are_all_applied_and_saved() {
    let d = dc("agc", 1).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agc", &d, 1);
    let extra: Vec<String> = (1..=40).map(|i| format!("198.18.5.{i}")).collect();
    let run_all = |verb: &str| -> Vec<Result<String, String>> {
        let children: Vec<_> = extra
            .iter()
            .map(|a| {
                Command::new(LB)
                    .args(["backend", verb, "198.18.0.100:8080", a, "--socket"])
                    .arg(&agent.socket)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn lb")
            })
            .collect();
        children
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().expect("wait lb");
                if out.status.success() {
                    Ok(String::new())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            })
            .collect()
    };
    let in_file = |a: &str| {
        let text = std::fs::read_to_string(&agent.config).expect("config");
        text.contains(&format!("\"{a}\""))
    };

    let added = run_all("add");
    let failed: Vec<_> = added.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "every add succeeds: {failed:?}");
    let listed: Vec<String> = agent
        .backends()
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    for a in &extra {
        assert!(
            listed.contains(a),
            "{a} reported added but not in the agent"
        );
        assert!(in_file(a), "{a} reported added but not in the file");
    }
    let check = Command::new(LB)
        .args(["check", "--config"])
        .arg(&agent.config)
        .output()
        .expect("lb check");
    assert!(check.status.success(), "the edited file stays valid");

    let removed = run_all("remove");
    let failed: Vec<_> = removed.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "every remove succeeds: {failed:?}");
    assert_eq!(
        agent.backends().len(),
        1,
        "only the original backend remains"
    );
    for a in &extra {
        assert!(!in_file(a), "{a} reported removed but still in the file");
    }

    // The word "shutdown" as a value is data, not a command: the CLI
    // refuses it with the valid values, and the agent refuses a raw request
    // that carries it and keeps running.
    let err = agent
        .cli(&["vip", "add", "198.18.0.101:80", "--forwarding", "shutdown"])
        .expect_err("an unknown forwarding mode is refused");
    assert!(
        err.contains("shutdown") && err.contains("dsr, ipip"),
        "{err}"
    );
    let mut raw = std::os::unix::net::UnixStream::connect(&agent.socket).expect("socket");
    raw.write_all(
        b"{\"cmd\":\"edit\",\"edit\":\"vip-add\",\"vip\":\"198.18.0.101:80/tcp\",\"forwarding\":\"shutdown\",\
          \"hash\":\"5-tuple\",\"ring_size\":251,\"flow_table\":true}\n",
    )
    .expect("send");
    let mut answer = String::new();
    BufReader::new(&raw).read_line(&mut answer).expect("answer");
    assert!(
        answer.contains("\"ok\":false") && answer.contains("shutdown"),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let status = agent
        .cli(&["status"])
        .expect("the agent still runs after a request carrying \"shutdown\"");
    // The agent names its version and commit, as `lb --version` does.
    let out = Command::new(LB)
        .arg("--version")
        .output()
        .expect("lb --version");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        version.starts_with("lb ") && version.contains("(commit "),
        "{version}"
    );
    assert!(
        status.contains(&format!("agent      {version}")),
        "lb status names the agent's version: {status}"
    );
}

/// `lb down --instance` finds its agent through the instance lock even when
/// the agent's socket is not the default one; a user who may not use the
/// control socket is told so, not that the agent is not running.
#[test]
fn down_finds_its_agent_and_permission_errors_say_so() {
    let d = dc("agw", 1).expect("dc");
    let _srv = servers(&d);
    let mut agent = Agent::start("agw", &d, 1);

    // As an unprivileged user (a copy of the binary any user may run).
    let dir = std::env::temp_dir().join(format!("lb-agw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let exe = dir.join("lb");
    std::fs::copy(LB, &exe).expect("copy lb");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("setpriv");
    let _ = std::fs::remove_dir_all(&dir);
    let msg = String::from_utf8_lossy(&out.stderr);
    println!("as nobody: {msg}");
    assert!(!out.status.success());
    assert!(
        msg.contains("permission denied") && msg.contains("root-only"),
        "{msg}"
    );

    // `lb down` with the default socket (not this agent's).
    let out = Command::new(LB)
        .args(["down", "--instance", &agent.instance])
        .output()
        .expect("lb down");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child = agent.child.as_mut().expect("agent process");
    let t0 = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the agent is still running after `lb down --instance`"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/lb/{}", agent.instance)).exists(),
        "pins removed"
    );
}

/// Documented behaviour, end to end: `lb vip remove` / `lb vip add` /
/// `lb backend add` change the live datapath and the file; SIGHUP reloads
/// an edited file; `/metrics` serves an exposition a real Prometheus parser
/// reads, with the counters the traffic moved.
#[test]
fn vip_edits_sighup_and_metrics_end_to_end() {
    let d = dc("age", 2).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("age", &d, 2);
    assert!(
        traffic(&d, 10, Duration::ZERO)
            .iter()
            .all(|(_, r)| r.is_ok())
    );

    // Remove the VIP: nothing answers on it any more, the file lost it.
    agent
        .cli(&["vip", "remove", "198.18.0.100:8080"])
        .expect("vip remove");
    let gone = traffic(&d, 5, Duration::ZERO);
    assert!(
        gone.iter().all(|(_, r)| r.is_err()),
        "a removed VIP is not served: {gone:?}"
    );
    let text = std::fs::read_to_string(&agent.config).expect("config");
    assert!(!text.contains("198.18.0.100"), "{text}");

    // Add it back with its backends through the CLI.
    agent
        .cli(&[
            "vip",
            "add",
            "198.18.0.100:8080",
            "--hash",
            "source-ip",
            "--health-interval-ms",
            "250",
        ])
        .expect("vip add");
    for i in 1..=2 {
        agent
            .cli(&["backend", "add", "198.18.0.100:8080", &backend_addr(i)])
            .expect("backend add");
    }
    agent.wait_ready(2);
    let back = traffic(&d, 10, Duration::ZERO);
    assert!(back.iter().all(|(_, r)| r.is_ok()), "{back:?}");
    let names: std::collections::BTreeSet<&str> =
        back.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    assert_eq!(
        names.len(),
        1,
        "source-ip: one client, one backend: {names:?}"
    );
    let vips: Vec<api::VipInfo> =
        serde_json::from_str(&agent.cli(&["vip", "list", "--json"]).expect("list")).expect("json");
    assert_eq!(vips[0].hash, api::HashInput::SourceIp);
    assert!(
        vips[0].health.contains("every 250 ms"),
        "{}",
        vips[0].health
    );

    // `lb vip set` changes keys live and writes them back; bad keys and bad
    // values are refused and change nothing.
    agent
        .cli(&[
            "vip",
            "set",
            "198.18.0.100:8080",
            "scheduler=round-robin",
            "health.interval_ms=300",
        ])
        .expect("vip set");
    let vips: Vec<api::VipInfo> =
        serde_json::from_str(&agent.cli(&["vip", "list", "--json"]).expect("list")).expect("json");
    assert_eq!(vips[0].scheduler, api::Scheduler::RoundRobin);
    assert!(
        vips[0].health.contains("every 300 ms"),
        "{}",
        vips[0].health
    );
    let saved = std::fs::read_to_string(&agent.config).expect("config");
    assert!(saved.contains("scheduler = \"round-robin\"") && saved.contains("interval_ms = 300"));
    let err = agent
        .cli(&["vip", "set", "198.18.0.100:8080", "ring_size=100"])
        .expect_err("not a prime");
    assert!(
        err.contains("lb.toml:") && err.contains("must be a prime"),
        "{err}"
    );
    let err = agent
        .cli(&["vip", "set", "198.18.0.100:8080", "port=81"])
        .expect_err("identity key");
    assert!(err.contains("`port` is not a VIP key"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&agent.config).expect("config"),
        saved,
        "refused edits change nothing"
    );
    // Each refusal is one structured log event naming the edit and why.
    let refused = agent.events(&[("message", "change refused, nothing changed")]);
    assert_eq!(refused.len(), 2, "two refusals logged: {refused:?}");
    assert!(
        refused[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("must be a prime"))
            && refused[0]["edit"]
                .as_str()
                .is_some_and(|e| e.contains("ring_size")),
        "{refused:?}"
    );
    agent
        .cli(&["vip", "set", "198.18.0.100:8080", "scheduler=maglev"])
        .expect("back to maglev");

    // SIGHUP: an edited file is applied (weight 0 drains backend 1).
    let text = std::fs::read_to_string(&agent.config).expect("config");
    // The CLI wrote `weight = 1` after the address: set it to 0.
    let at = text
        .find(&format!("address = \"{}\"", backend_addr(1)))
        .expect("backend 1 in the file");
    let w = at + text[at..].find("weight = 1").expect("its weight");
    let edited = format!(
        "{}weight = 0{}",
        &text[..w],
        &text[w + "weight = 1".len()..]
    );
    assert_ne!(edited, text);
    std::fs::write(&agent.config, edited).expect("write");
    let pid = agent.child.as_ref().expect("agent").id().to_string();
    Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    let t0 = Instant::now();
    loop {
        let b1 = agent
            .backends()
            .into_iter()
            .find(|b| b.address.to_string() == backend_addr(1))
            .expect("b1");
        if b1.state == BackendState::Draining && b1.weight == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "SIGHUP did not apply the edited file:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t0 = Instant::now();
    while agent
        .events(&[("message", "configuration reloaded"), ("source", "SIGHUP")])
        .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(2), "no reload event");
        std::thread::sleep(Duration::from_millis(20));
    }

    // /metrics (inside the agent's namespace), read by a Prometheus parser.
    let body =
        d.lb.enter(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect("127.0.0.1:9100")?;
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out)?;
            Ok(out)
        })
        .expect("setns")
        .expect("GET /metrics");
    let (head, text) = body.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a valid Prometheus exposition");
    let value = |name: &str, label: (&str, &str)| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name}{label:?} in:\n{text}"))
    };
    let answered = (10 + 10) as f64;
    // This topology forwards to the backend's segment with XDP_REDIRECT.
    let forwarded = value("lb_verdicts_total", ("reason", "tx"))
        + value("lb_verdicts_total", ("reason", "redirect"));
    assert!(
        forwarded >= 3.0 * answered,
        "{forwarded} packets forwarded for {answered} answered connections"
    );
    assert!(value("lb_vip_new_flows_total", ("vip", "198.18.0.100:8080/tcp")) >= 10.0);
    assert_eq!(
        value("lb_backend_up", ("backend", &backend_addr(2))),
        1.0,
        "a healthy backend is up"
    );
    // Health-probe durations: a histogram per backend, with probes in it.
    let probes = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "lb_health_probe_duration_seconds"
                && s.labels.get("backend") == Some(&backend_addr(2))
        })
        .unwrap_or_else(|| panic!("no probe histogram for b2 in:\n{text}"));
    let prometheus_parse::Value::Histogram(buckets) = &probes.value else {
        panic!("probe durations are not a histogram: {:?}", probes.value);
    };
    let all = buckets.last().expect("buckets").count;
    assert!(all >= 2.0, "b2 probed at least twice: {buckets:?}");
    assert!(
        buckets.iter().any(|b| b.less_than <= 0.01 && b.count > 0.0),
        "probes on a local veth finish within 10 ms: {buckets:?}"
    );
    // The shipped Grafana dashboard queries only what this exports.
    let exposed = exposed_names(text);
    for (q, names) in dashboard_metrics() {
        for n in names {
            assert!(
                exposed.contains(&n),
                "the dashboard's query {q:?} reads {n}, which /metrics does not export: {exposed:?}"
            );
        }
    }
}

/// The metric names a Prometheus exposition offers to queries: every
/// sample's name, and what each `# TYPE` line's family is queried as
/// (a counter as `NAME_total`, a histogram as `NAME_bucket`, `_sum` and
/// `_count`), so families without a series yet count too.
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut w = t.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every PromQL query of the shipped Grafana dashboard (`dist/grafana/lb.json`:
/// panel targets and template variables), checked to parse as PromQL, and
/// the `lb_*` metric names they use.
fn dashboard_metrics() -> Vec<(String, Vec<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/lb.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut queries = Vec::new();
    walk(&dash, &mut queries);
    assert!(queries.len() >= 10, "the dashboard's queries: {queries:?}");
    queries
        .into_iter()
        .map(|q| {
            // Grafana's own variables, as Grafana substitutes them.
            let promql = q.replace("$__rate_interval", "1m").replace("$vip", ".*");
            let names: Vec<String> = promql
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("lb_"))
                .map(str::to_string)
                .collect();
            if !promql.starts_with("label_values(") {
                promql_parser::parser::parse(&promql)
                    .unwrap_or_else(|e| panic!("dashboard query {q:?} is not PromQL: {e}"));
            }
            assert!(!names.is_empty(), "{q:?} reads no lb metric");
            (q, names)
        })
        .collect()
}

/// `lb explain --what-if` predicts what an edit does before it is made:
/// the prediction for removing a backend names the ring the removal then
/// installs, slot for slot per backend (read back from the datapath after
/// the change), sorts the VIP's established flows (those on the removed
/// backend rescheduled, the rest kept), and changes nothing by itself.
#[test]
fn what_if_predicts_the_ring_an_edit_installs() {
    let d = dc("agw", 3).expect("dc");
    let _srv = servers(&d);
    let agent = Agent::start("agw", &d, 3);
    let t = traffic(&d, 30, Duration::ZERO);
    assert!(t.iter().all(|(_, r)| r.is_ok()), "traffic: {t:?}");
    let vip = "198.18.0.100:8080";
    let gone = backend_addr(3);
    let predict = |edit: String| -> serde_json::Value {
        let out = agent
            .cli(&["explain", "--what-if", &edit, "--json"])
            .unwrap_or_else(|e| panic!("what-if {edit}: {e}"));
        serde_json::from_str(&out).expect("JSON")
    };
    let slots = |w: &serde_json::Value, field: &str| -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = w["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().expect("address").to_string(),
                    b[field].as_u64().expect("slots"),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    };
    let p = predict(format!("backend remove {vip} {gone}"));
    println!("prediction: {p:#}");
    let before = slots(&p, "slots_before");
    let after = slots(&p, "slots_after");
    assert_eq!(
        before.len(),
        3,
        "three backends in the ring now: {before:?}"
    );
    assert!(
        after.iter().all(|(a, _)| *a != gone) && after.len() == 2,
        "{gone} leaves the ring: {after:?}"
    );
    let f = &p["flows"];
    let n = |k: &str| f[k].as_u64().expect(k);
    assert!(
        n("total") >= 30,
        "the requests' flows are in the table: {f}"
    );
    assert_eq!(
        n("rescheduled") + n("protected") + n("unaffected"),
        n("total"),
        "{f}"
    );
    assert!(n("rescheduled") > 0, "flows on {gone} are rescheduled: {f}");
    // As a person reads it.
    let text = agent
        .cli(&[
            "explain",
            "--what-if",
            &format!("backend remove {vip} {gone}"),
        ])
        .expect("what-if");
    println!("{text}");
    assert!(
        text.contains(&format!(
            "prediction (nothing changed): removed {gone} from {vip}"
        )) && text.contains(&format!("{} would be rescheduled", n("rescheduled"))),
        "{text}"
    );
    // Nothing changed: the backend is still there.
    let listed = agent.cli(&["backend", "list", "--json"]).expect("list");
    assert!(listed.contains(&gone), "{listed}");

    agent
        .cli(&["backend", "remove", vip, &gone])
        .expect("remove");
    // The ring the datapath holds now (a prediction's "now" reads it back).
    let b1 = backend_addr(1);
    let now = predict(format!("backend weight {vip} {b1} 1"));
    assert_eq!(
        slots(&now, "slots_before"),
        after,
        "the installed ring is the one predicted"
    );
    // An edit it does not predict is refused with what it takes.
    let err = agent
        .cli(&["explain", "--what-if", &format!("vip remove {vip}")])
        .expect_err("vip remove is no prediction");
    assert!(err.contains("--what-if"), "{err}");
}
