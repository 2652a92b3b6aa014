//! The `lb` command line: `lb run` is the agent; the other commands talk to
//! it over its control socket (see `api`). The binary's `main` only calls
//! [`main`] here, so tests can build the very same CLI.
//!
//! Three rooms: `args` (the clap types: what can be typed), this file (the
//! dispatch: what each command asks of whom) and `render` (what is
//! printed); `trace` is `lb trace`.

mod args;
mod render;
mod trace;
mod what_if;

pub use args::DEFAULT_CONFIG;
use args::{BackendCmd, BackendHostCmd, Cli, Cmd, Conn, LabCmd, LoadgenArgs, NodeCmd, VipCmd};
use render::{backend_list, done, explain, health, print_json, print_stats, status, vip_list};
use what_if::{vip_set_what, what_if_cmd};

use std::{net::IpAddr, time::Duration};

use crate::{
    api::{self, BackendInfo, Edit, Request, StatsInfo, StatusInfo, VipAdd, VipInfo},
    datapath::Dataplane,
    datapath::loader,
};
use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use lb_common::verdict;

/// Runs the CLI with the process's arguments and exits on error.
pub fn main() {
    if let Err(e) = real_main() {
        eprintln!("lb: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    use crate::agent::logging::{self, LogFormat};
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Run { log_format, .. } => logging::init(*log_format, "info"),
        Cmd::BackendHost {
            cmd: BackendHostCmd::Run { .. },
        } => logging::init(LogFormat::Text, "info"),
        _ => logging::init(LogFormat::Text, "warn"),
    }
    match cli.cmd {
        Cmd::Run { config, .. } => crate::agent::run(&config),
        Cmd::Check { config } => {
            let cfg = crate::config::load(&config)?;
            let tokens = match &cfg.agent.api_token_file {
                Some(f) => Some((f, crate::http_api::tokens::Tokens::load(f)?)),
                None => None,
            };
            println!("{}: ok, {} VIP(s)", config.display(), cfg.vips.len());
            if let Some((f, t)) = tokens {
                println!(
                    "{}: ok, {} API token(s), {} read-only",
                    f.display(),
                    t.len(),
                    t.read_only()
                );
            }
            Ok(())
        }
        Cmd::Down { instance, conn } => crate::agent::down(&instance, &conn.socket),
        Cmd::Trace {
            instance,
            vip,
            client,
            client_port,
            count,
            duration,
            conn,
        } => trace::trace(&instance, vip, client, client_port, count, duration, &conn),
        Cmd::Reload { conn } => {
            api::call(&conn.socket, &Request::Reload)?;
            println!("reloaded");
            Ok(())
        }
        Cmd::Status { conn } => {
            let v = api::call(&conn.socket, &Request::Status)?;
            if conn.json {
                return print_json(&v);
            }
            let s: StatusInfo = serde_json::from_value(v)?;
            status(&s);
            Ok(())
        }
        Cmd::Node { cmd, conn } => node(cmd, &conn),
        Cmd::BackendHost { cmd } => backend_host(cmd),
        Cmd::Explain {
            vip,
            client,
            what_if,
            conn,
        } => {
            if let Some(text) = what_if {
                return what_if_cmd(&text, &conn);
            }
            let (Some(vip), Some(client)) = (vip, client) else {
                bail!("lb explain needs VIP and CLIENT, or --what-if EDIT");
            };
            let v = api::call(&conn.socket, &Request::Explain { vip, client })?;
            if conn.json {
                return print_json(&v);
            }
            let e: api::ExplainInfo = serde_json::from_value(v)?;
            explain(&e);
            Ok(())
        }
        Cmd::Vip { cmd, conn } => vip(cmd, &conn),
        Cmd::Backend { cmd, conn } => backend(cmd, &conn),
        Cmd::Health { conn } => {
            let v = api::call(&conn.socket, &Request::Health)?;
            if conn.json {
                return print_json(&v);
            }
            let list: Vec<BackendInfo> = serde_json::from_value(v)?;
            health(&list);
            Ok(())
        }
        Cmd::Stats { watch, conn } => stats(watch, &conn),
        Cmd::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory as _;
            match dir {
                Some(d) => {
                    std::fs::create_dir_all(&d)
                        .with_context(|| format!("creating {}", d.display()))?;
                    clap_mangen::generate_to(Cli::command(), &d)
                        .with_context(|| format!("writing manual pages to {}", d.display()))
                }
                None => clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .context("writing the manual page"),
            }
        }
        Cmd::Attach {
            iface,
            mode,
            seconds,
        } => attach(&iface, mode, seconds),
        Cmd::Lab { cmd } => lab(cmd),
        Cmd::Loadgen(a) => loadgen(a),
    }
}

/// `lb node drain|resume`.
fn node(cmd: NodeCmd, conn: &Conn) -> Result<()> {
    match cmd {
        NodeCmd::Resume => {
            api::call(&conn.socket, &Request::NodeResume)?;
            println!("node resumed: VIPs with a live backend are announced again");
            Ok(())
        }
        NodeCmd::Drain { timeout, quiet } => {
            let new_flows = || -> Result<u64> {
                let st: StatsInfo =
                    serde_json::from_value(api::call(&conn.socket, &Request::Stats)?)?;
                Ok(st.vips.iter().map(|v| v.traffic.new_flows).sum())
            };
            let before = new_flows()?;
            api::call(&conn.socket, &Request::NodeDrain)?;
            let t0 = std::time::Instant::now();
            let (mut last, mut last_change) = (new_flows()?, t0);
            let drained = loop {
                if last_change.elapsed().as_secs_f64() >= quiet {
                    break true;
                }
                if t0.elapsed().as_secs_f64() >= timeout {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
                let n = new_flows()?;
                if n != last {
                    (last, last_change) = (n, std::time::Instant::now());
                }
            };
            let after = last.saturating_sub(before);
            let r = serde_json::json!({
                "drained": drained,
                "seconds": t0.elapsed().as_secs_f64(),
                "new_flows_since_withdraw": after,
                "last_new_flow_after_s": last_change.duration_since(t0).as_secs_f64(),
            });
            if conn.json {
                return print_json(&r);
            }
            if drained {
                println!(
                    "node drained: every VIP withdrawn; {after} new flow(s) arrived after the withdrawal, the last {:.1} s \
                     after it; none for {quiet:.1} s. Established flows keep being forwarded.",
                    last_change.duration_since(t0).as_secs_f64()
                );
                Ok(())
            } else {
                bail!(
                    "every VIP is withdrawn, but new flows still arrived {timeout:.0} s later ({after} since the \
                     withdrawal): is the router still sending here? check its routes and the BGP session"
                )
            }
        }
    }
}

fn loadgen(a: LoadgenArgs) -> Result<()> {
    use crate::{
        host::iproute::parse_mac,
        tools::loadgen::{Options, run},
    };
    if let Some(ns) = &a.netns {
        // Move the whole process (it is still single-threaded here).
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        // SAFETY: setns on an fd we own, before any thread exists.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "entering network namespace {ns}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let dst_mac = match &a.dst_mac {
        Some(m) => Some(
            parse_mac(m)
                .with_context(|| format!("--dst-mac `{m}` is not a MAC like 02:00:00:00:00:01"))?,
        ),
        None => None,
    };
    let src = a.src.unwrap_or_else(|| {
        if a.dst.is_ipv4() {
            "198.19.0.0".parse().expect("literal")
        } else {
            "2001:2:0:1::".parse().expect("literal")
        }
    });
    let o = Options {
        iface: a.iface,
        dst: a.dst,
        dst_mac,
        src,
        tcp_syn: a.proto == "syn",
        size: a.size.unwrap_or(0),
        flows: a.flows,
        rate: a.rate,
        duration: a.duration.map(Duration::from_secs_f64),
        count: a.count,
        threads: a.threads,
        progress: !a.json,
    };
    let s = run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "sent {} packets of {} bytes in {:.2} s: {:.3} Mpps, {:.2} Gbps, {} flows, {} thread(s)",
            s.packets,
            s.frame_size,
            s.seconds,
            s.pps / 1e6,
            s.gbps,
            s.flows,
            s.threads
        );
    }
    Ok(())
}

fn lab(cmd: LabCmd) -> Result<()> {
    use crate::tools::lab::Lab;
    match cmd {
        LabCmd::Up {
            prefix,
            nodes,
            redis,
        } => {
            let mut l = Lab::new(&prefix).with_nodes(nodes as usize);
            if redis {
                l = l.with_redis();
            }
            l.up()?;
            print!("{}", l.status()?);
            Ok(())
        }
        LabCmd::Down { prefix } => {
            Lab::new(&prefix).down()?;
            println!("lab `{prefix}` removed");
            Ok(())
        }
        LabCmd::Status { prefix } => {
            print!("{}", Lab::new(&prefix).status()?);
            Ok(())
        }
        LabCmd::Backend {
            n,
            action,
            ms,
            prefix,
        } => {
            let l = Lab::new(&prefix);
            if !(1..=crate::tools::lab::BACKENDS).contains(&n) {
                bail!(
                    "backend {n} does not exist; the lab has b1..b{}",
                    crate::tools::lab::BACKENDS
                );
            }
            match action.as_str() {
                "stop" => l.stop_backend(n)?,
                "start" => l.start_backend(n)?,
                "fail-health" => println!("{}", l.backend_ctl(n, "/admin/fail-health")?),
                "ok" => println!("{}", l.backend_ctl(n, "/admin/ok")?),
                _ => println!("{}", l.backend_ctl(n, &format!("/admin/slow?ms={ms}"))?),
            }
            Ok(())
        }
        LabCmd::Serve {
            name,
            listen,
            redis,
        } => crate::tools::lab::serve(&name, &listen, redis.as_deref()),
        LabCmd::Demo { nodes: 1 } => crate::tools::demo::run(),
        LabCmd::Demo { nodes } => crate::tools::demo::nodes::run(nodes as usize),
    }
}

fn vip(cmd: VipCmd, conn: &Conn) -> Result<()> {
    match cmd {
        VipCmd::List => {
            let v = api::call(&conn.socket, &Request::VipList)?;
            if conn.json {
                return print_json(&v);
            }
            let list: Vec<VipInfo> = serde_json::from_value(v)?;
            vip_list(&list);
            Ok(())
        }
        VipCmd::Add {
            vip,
            forwarding,
            hash,
            ring_size,
            no_flow_table,
            scheduler,
            idle_timeout,
            second_chance,
            health_kind,
            health_interval_ms,
            health_timeout_ms,
            rise,
            fall,
            health_port,
            health_via,
            health_path,
            expect_status,
        } => {
            let what = format!("added VIP {vip}");
            let mut settings = vec![("scheduler".to_string(), scheduler.to_string())];
            let opt = |k: &str, v: Option<String>| v.map(|v| (k.to_string(), v));
            settings.extend(
                [
                    opt("idle_timeout", idle_timeout.map(|v| v.to_string())),
                    opt("second_chance", second_chance.map(|v| v.to_string())),
                    opt("health.kind", health_kind),
                    opt(
                        "health.interval_ms",
                        health_interval_ms.map(|v| v.to_string()),
                    ),
                    opt(
                        "health.timeout_ms",
                        health_timeout_ms.map(|v| v.to_string()),
                    ),
                    opt("health.rise", rise.map(|v| v.to_string())),
                    opt("health.fall", fall.map(|v| v.to_string())),
                    opt("health.port", health_port.map(|v| v.to_string())),
                    opt("health.via", health_via.map(|v| v.to_string())),
                    opt("health.path", health_path),
                    opt("health.expect_status", expect_status),
                ]
                .into_iter()
                .flatten(),
            );
            api::call(
                &conn.socket,
                &Request::Edit(Edit::VipAdd(VipAdd {
                    vip,
                    forwarding,
                    hash,
                    ring_size,
                    flow_table: !no_flow_table,
                    settings,
                })),
            )?;
            done(conn, what)
        }
        VipCmd::Set { vip, settings } => {
            let what = vip_set_what(&vip, &settings);
            api::call(&conn.socket, &Request::Edit(Edit::VipSet { vip, settings }))?;
            done(conn, what)
        }
        VipCmd::Remove { vip } => {
            let what = format!("removed VIP {vip}");
            api::call(&conn.socket, &Request::Edit(Edit::VipRemove { vip }))?;
            done(conn, what)
        }
    }
}

fn backend(cmd: BackendCmd, conn: &Conn) -> Result<()> {
    if let BackendCmd::List { vip } = cmd {
        let v = api::call(&conn.socket, &Request::BackendList { vip })?;
        if conn.json {
            return print_json(&v);
        }
        let list: Vec<BackendInfo> = serde_json::from_value(v)?;
        backend_list(&list);
        return Ok(());
    }
    let Some((req, what)) = backend_edit(cmd) else {
        return Ok(());
    };
    api::call(&conn.socket, &Request::Edit(req))?;
    done(conn, what)
}

/// The edit a `lb backend` command makes, and how it is reported once made
/// (`None`: `list`, which edits nothing).
fn backend_edit(cmd: BackendCmd) -> Option<(Edit, String)> {
    Some(match cmd {
        BackendCmd::List { .. } => return None,
        BackendCmd::Add {
            vip,
            address,
            weight,
            port,
        } => (
            Edit::BackendAdd {
                vip: vip.clone(),
                address,
                weight,
                port,
            },
            format!("added {address} to {vip}"),
        ),
        BackendCmd::Remove { vip, address } => (
            Edit::BackendRemove {
                vip: vip.clone(),
                address,
            },
            format!("removed {address} from {vip}"),
        ),
        BackendCmd::Drain { vip, address } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: None,
                drain: Some(true),
            },
            format!("draining {address} of {vip}"),
        ),
        BackendCmd::Undrain { vip, address } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: None,
                drain: Some(false),
            },
            format!("{address} of {vip} back in rotation"),
        ),
        BackendCmd::Weight {
            vip,
            address,
            weight,
        } => (
            Edit::BackendSet {
                vip: vip.clone(),
                address,
                weight: Some(weight),
                drain: None,
            },
            format!("weight of {address} in {vip} is now {weight}"),
        ),
    })
}

fn stats(watch: bool, conn: &Conn) -> Result<()> {
    let fetch = || -> Result<(serde_json::Value, StatsInfo)> {
        let v = api::call(&conn.socket, &Request::Stats)?;
        let s = serde_json::from_value(v.clone())?;
        Ok((v, s))
    };
    let (v, mut prev) = fetch()?;
    if conn.json && !watch {
        return print_json(&v);
    }
    if !watch {
        print_stats(&prev, None);
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (v, now) = fetch()?;
        if conn.json {
            println!("{}", serde_json::to_string(&v)?);
        } else {
            // Clear the screen and redraw in place.
            print!("\x1b[2J\x1b[H");
            print_stats(&now, Some(&prev));
        }
        prev = now;
    }
}

fn attach(iface: &str, mode: crate::vocab::XdpMode, seconds: u64) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let mut ebpf = loader::load(&loader::LoadOptions {
        flow_table_size: 4096,
        ..Default::default()
    })?;
    let used = loader::attach(&mut ebpf, lb_common::PROG_BALANCER, iface, mode)?;
    println!(
        "attached {} to {iface} in {used} mode for {seconds}s",
        lb_common::PROG_BALANCER
    );
    for s in 1..=seconds {
        std::thread::sleep(Duration::from_secs(1));
        let v = Dataplane::new(&mut ebpf)
            .verdicts()
            .context("reading counters")?;
        let shown: Vec<String> = verdict::NAMES
            .iter()
            .zip(&v)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        println!(
            "t={s}s packets={} {}",
            v.iter().sum::<u64>(),
            shown.join(" ")
        );
    }
    println!("detaching");
    Ok(())
}

fn backend_host(cmd: BackendHostCmd) -> Result<()> {
    use crate::backend_host as bh;
    match cmd {
        BackendHostCmd::Run {
            interface,
            addresses,
            instance,
            xdp_mode,
            gue_port,
            metrics_listen,
            netns,
        } => {
            let o = bh::Options {
                interface,
                addresses,
                instance,
                xdp_mode,
                gue_port,
            };
            match netns {
                Some(ns) => crate::host::netns::in_netns(&ns, || bh::run(&o, metrics_listen))?,
                None => bh::run(&o, metrics_listen),
            }
        }
        BackendHostCmd::Stats { instance, json } => {
            let s = bh::stats(&instance)?;
            if json {
                return print_json(&serde_json::to_value(s)?);
            }
            println!(
                "decapsulated {}  passed {}  malformed {}  second hop {}  second hop unreachable {}",
                s.decapsulated, s.passed, s.malformed, s.second_hop, s.second_hop_unreachable
            );
            Ok(())
        }
        BackendHostCmd::Down { instance } => {
            if bh::down(&instance)? {
                println!("backend host `{instance}`: lb_decap detached, pins removed");
            } else {
                println!("backend host `{instance}`: nothing pinned, nothing to do");
            }
            Ok(())
        }
    }
}
