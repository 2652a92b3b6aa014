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
//!
//! Layout: `state` (the runtime model), `reconcile` (config → datapath),
//! `ids` (backend ids), `nexthop` (MACs from the kernel), `health_task`
//! (one probe loop per backend), `control` (the socket, edits, reloads),
//! `api_server` (the same operations over HTTP, see `crate::http_api`),
//! `views` (what the CLI reads), `metrics` (Prometheus), `announce` (VIP
//! routes for BIRD, pure decision + kernel side) and `node` (this node's
//! announcement and drain state), `drop_events` (the datapath's rare drops
//! into the log), `signals` (the datapath's signs of backend failure wake
//! the probes), `rings` (reading a ring the datapath writes). This file: startup, the instance lock,
//! shutdown and `lb down`.

mod agent_metrics;
mod announce;
mod api_server;
mod control;
mod drop_events;
mod health_task;
pub mod history;
mod ids;
pub mod logging;
mod metrics;
mod nexthop;
mod node;
mod placement;
mod plan;
mod reconcile;
mod rings;
mod signals;
mod state;
mod views;
mod what_if;

// The submodules split one type's work by concern (`impl State` blocks in
// several files); each names what it uses from the others, and from here,
// by its own path.
use self::{
    agent_metrics::AgentMetrics,
    control::{reload, serve_api},
    health_task::{spawn_applier, spawn_probe},
    metrics::{registry, serve_metrics},
    state::{State, vip_key},
};

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::VipKey;
use tokio::{net::UnixListener, sync::Notify};

use crate::{
    api::{self, Request, VipRef},
    config::{self, Config},
    datapath::loader,
    datapath::{Dataplane, encode},
};

/// CPUs of this host, as the datapath numbers them.
fn cpus() -> u16 {
    aya::util::nr_cpus().map_or(1, |n| n as u16)
}

/// A health transition, as the agent reports it to an embedding caller.
#[derive(Clone, Debug)]
pub struct Event {
    pub vip: VipRef,
    pub backend: IpAddr,
    pub up: bool,
    pub reason: String,
    pub at: Instant,
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
struct InstanceLock(std::fs::File);

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

impl InstanceLock {
    /// Writes who holds the lock (pid, control socket) into the lock file,
    /// so `lb down --instance` finds the agent whatever its socket is.
    fn record(&self, socket: &Path) -> Result<()> {
        use std::io::Write as _;
        let mut f = &self.0;
        f.set_len(0)?;
        write!(
            f,
            "pid={}\nsocket={}\n",
            std::process::id(),
            socket.display()
        )?;
        Ok(())
    }
}

/// The agent holding `instance`'s lock: (pid, control socket), if one does.
fn lock_owner(instance: &str) -> Option<(i32, PathBuf)> {
    if lock_instance(instance).is_ok() {
        return None;
    }
    let text = std::fs::read_to_string(format!("/run/lb/{instance}.lock")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_string)
    };
    Some((
        field("pid=")?.parse().ok()?,
        PathBuf::from(field("socket=")?),
    ))
}

/// Runs the agent until `shutdown` completes (or `lb down` asks it to);
/// health transitions are also sent to `events` (tests drive it this way).
pub async fn run_until(
    config_path: &Path,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    events: Option<std::sync::mpsc::Sender<Event>>,
) -> Result<()> {
    // The API's tokens are checked before the datapath is touched.
    let api_tokens = match &cfg.agent.api_token_file {
        Some(f) => Some(crate::http_api::tokens::TokenFile::open(f)?),
        None => None,
    };
    let instance_lock = lock_instance(&cfg.agent.instance)?;
    instance_lock.record(Path::new(&cfg.agent.control_socket))?;
    loader::ensure_bpffs()?;
    let dir = loader::pin_dir(&cfg.agent.instance);
    let (ebpf, adopted) = loader::load_pinned(
        &loader::LoadOptions {
            flow_table_size: cfg.agent.flow_table_size,
            max_vips: cfg.agent.max_vips,
            max_backends: cfg.agent.max_backends,
            ring_slots: cfg.agent.ring_slots,
        },
        &dir,
    )?;
    let mut dp = Dataplane::new(ebpf);
    let drop_log = crate::datapath::drop_log::DropLog::take(dp.object_mut());
    let signal_ring = crate::datapath::signals::SignalRing::take(dp.object_mut());
    dp.set_settings(&encode::settings(&cfg.agent, cpus()))?;
    let (v4, v6) = encode::nat_addrs(&cfg.agent);
    dp.set_nat_addrs(&v4, &v6)?;
    let (observations, reports) = tokio::sync::mpsc::unbounded_channel();
    let metrics = AgentMetrics::default();
    let mut state = State {
        dp,
        observations,
        metrics: metrics.clone(),
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
        history: history::History::load(&cfg.agent.instance),
    };
    if adopted {
        // VIPs the old agent had that the config no longer has.
        let stale: Vec<VipKey> = state
            .dp
            .list_vips()?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !cfg.vips.iter().any(|v| vip_key(v) == *k))
            .collect();
        for k in stale {
            state.dp.remove_vip(&k)?;
        }
        // A datapath pinned by an older version may lack the established
        // path's filter (created empty just now).
        state.dp.rebuild_fast_filter()?;
    }
    let spawns = state.reconcile(cfg.clone())?;
    if adopted {
        state.forget_stale_backends()?;
    }
    let mode = cfg.agent.xdp_mode;
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
                tracing::warn!(
                    family,
                    sysctl,
                    "next_hop = \"fib\" but forwarding is off: VIP traffic of this family will pass as \
                     no_neigh; enable forwarding or use next_hop = \"map\""
                );
            }
        }
    }
    let (_link, desc) = loader::attach_pinned(
        state.dp.object_mut(),
        &cfg.agent.interface,
        mode,
        &dir,
        "link",
    )?;
    // NAT replies arriving elsewhere: the balancer there too, and the main
    // interface a redirect target for the translated replies.
    let mut _reply_links = Vec::new();
    for iface in &cfg.agent.reply_interfaces {
        let (link, d) = loader::attach_pinned(
            state.dp.object_mut(),
            iface,
            mode,
            &dir,
            &format!("link-{iface}"),
        )?;
        tracing::info!(interface = %iface, attach = %d, "attached for NAT replies");
        _reply_links.push(link);
    }
    if !cfg.agent.reply_interfaces.is_empty() {
        let idx = crate::host::netlink::link_by_name(&cfg.agent.interface)?
            .with_context(|| format!("no interface {}", cfg.agent.interface))?
            .index;
        state.dp.add_tx_port(idx)?;
    }
    state.attach_desc = desc.clone();
    state.attached = true;
    state.sync_announce();
    tracing::info!(
        instance = %cfg.agent.instance,
        attach = %desc,
        vips = state.vips.len(),
        backends = state.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
        pins = %dir.display(),
        "datapath attached"
    );
    let shared: Shared = Arc::new(Mutex::new(state));
    spawn_applier(&shared, reports)?;
    match drop_log {
        Ok(log) => drop_events::spawn(&shared, log)?,
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "the datapath's drop events will not be logged"
        ),
    }
    match signal_ring {
        Ok(ring) => signals::spawn(&shared, ring)?,
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "the datapath's signals of backend failure will not be read: probes alone decide"
        ),
    }
    for s in spawns {
        spawn_probe(s);
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
        tracing::info!(url = %format!("http://{addr}/metrics"), status_page = %format!("http://{addr}/"), "serving Prometheus metrics and the status page");
        tokio::spawn(serve_metrics(l, registry(&shared, metrics), shared.clone()));
    }
    if let (Some(addr), Some(tokens)) = (cfg.agent.api_listen, api_tokens) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP API on {addr}"))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                listen = %addr,
                "the HTTP API is plain HTTP: bearer tokens cross the network in clear; put a TLS \
                 reverse proxy in front of it (README \"The HTTP API\")"
            );
        }
        tracing::info!(url = %format!("http://{addr}/api/v1/"), openapi = %format!("http://{addr}{}", crate::http_api::OPENAPI_PATH), "serving the HTTP API");
        tokio::spawn(api_server::serve_http_api(
            l,
            shared.clone(),
            stop.clone(),
            tokens,
        ));
    }
    let lc_shared = shared.clone();
    // The NAT sweep reads the whole NAT table: through a handle of its own,
    // so it never holds the state lock (with a million NAT flows that would
    // stall the CLI and health updates for seconds).
    let mut nat = lock(&shared)?.dp.nat_handle()?;
    tokio::spawn(async move {
        // The counter as first seen: refusals before a restart are old news.
        let mut nat_no_port_seen: Option<u64> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let r = tokio::task::block_in_place(|| {
                lock(&lc_shared).and_then(|mut s| {
                    // A backend whose first verdict is overdue no longer
                    // holds back its VIP's announcement (see `node`).
                    s.sync_announce();
                    s.reconcile_active()
                })
            });
            if let Err(e) = r {
                tracing::error!(
                    error = format!("{e:#}"),
                    "reconciling least-connections counts failed"
                );
            }
            // NAT ports whose flows closed or idled out go back to the pool
            // (the datapath also reclaims one when an allocation meets it).
            if let Some(m) = nat.as_mut() {
                let n = tokio::task::block_in_place(|| {
                    crate::datapath::sweep_nat(m, state::monotonic_s() as u32)
                });
                if n > 0 {
                    tracing::debug!(freed = n, "NAT ports reclaimed");
                }
            }
            // New NAT flows refused for want of a port since the last look.
            let refused = tokio::task::block_in_place(|| {
                lock(&lc_shared)
                    .and_then(|s| Ok(s.dp.verdicts()?[lb_common::verdict::NAT_NO_PORT as usize]))
            });
            if let Ok(n) = refused {
                if let Some(seen) = nat_no_port_seen
                    && n > seen
                {
                    tracing::warn!(
                        refused = n - seen,
                        total = n,
                        "new NAT flows found no free source port: add NAT source addresses \
                         (agent.nat_source_v4/_v6), widen agent.nat_ports, or raise \
                         agent.flow_table_size if the NAT table is full"
                    );
                }
                nat_no_port_seen = Some(n);
            }
        }
    });
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload_shared = shared.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let sh = reload_shared.clone();
            let r = tokio::task::spawn_blocking(move || reload(&sh))
                .await
                .unwrap_or_else(|e| Err(anyhow!("reload task: {e}")));
            match r {
                Ok(()) => tracing::info!(source = "SIGHUP", "configuration reloaded"),
                Err(e) => tracing::warn!(
                    source = "SIGHUP",
                    error = format!("{e:#}"),
                    "reload refused, nothing changed"
                ),
            }
        }
    });

    tokio::select! {
        _ = shutdown => {}
        _ = stop.notified() => {}
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("agent stopping; the datapath stays attached (pinned), `lb down` detaches it");
    Ok(())
}

/// `lb down`: asks a running agent to stop, then detaches and removes every
/// pin of the instance.
pub fn down(instance: &str, socket: &Path) -> Result<()> {
    // The agent of this instance, found through its lock (its socket may
    // not be the one given); asked to stop, else sent SIGTERM.
    if let Some((pid, own_socket)) = lock_owner(instance) {
        let asked = [own_socket.as_path(), socket]
            .iter()
            .any(|s| s.exists() && api::call(s, &Request::Shutdown).is_ok());
        if !asked {
            // SAFETY: kill(2) has no memory effects; the pid is the one the
            // lock's holder wrote, and the lock is still held.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        // Wait (bounded) for the agent to let go of its instance lock.
        for _ in 0..50 {
            if lock_instance(instance).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if lock_owner(instance).is_some() {
            bail!(
                "the agent of instance `{instance}` (pid {pid}) did not stop within 5 s; nothing detached"
            );
        }
    }
    let node = announce::NodeFile::of(instance);
    if let Some(st) = node.read() {
        let routes = announce::Routes { table: st.table };
        let n = match &st.netns {
            Some(ns) => crate::host::netns::in_netns(ns, || routes.flush())??,
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
