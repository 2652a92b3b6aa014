//! The only module that touches aya's program and link APIs: it loads the
//! embedded datapath object, sizes its maps, and attaches programs.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    EbpfLoader,
    // aya's own name for the kernel's modes; ours (`vocab::XdpMode`, with
    // `auto`) is the one the config, the CLI and the messages use.
    programs::{Xdp, XdpMode as AyaXdpMode},
};

use crate::vocab::XdpMode;

/// The compiled datapath object: the balancer (and its traced copy), the
/// decapsulator, the pass program, and their maps.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The tools object (`lb-ebpf/src/tools.rs`): `lb loadgen`'s generator and
/// sink, the benchmark floors, `bench_ipip` and the cost programs.
pub static TOOLS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-tools"));

/// Loads the tools object and verifies every program in it.
pub fn load_tools() -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new().load(TOOLS_OBJECT).context(
        "loading the tools object into the kernel failed (are you root, with BPF enabled?)",
    )?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        load_program(&mut ebpf, &name)?;
    }
    Ok(ebpf)
}

/// Load-time sizing of the datapath (see README, "Sizing").
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Slots in the connection table (sets of `lb_common::FLOW_WAYS`).
    pub flow_table_size: u32,
    /// VIPs plus regions (ring ids).
    pub max_vips: u32,
    /// Backends over all VIPs (ids 1..max_backends).
    pub max_backends: u32,
    /// `RINGS` slots (every VIP and region: two halves of its ring size).
    pub ring_slots: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
            max_vips: lb_common::MAX_VIPS,
            max_backends: lb_common::MAX_BACKENDS,
            ring_slots: lb_common::DEFAULT_RING_SLOTS,
        }
    }
}

/// The datapath's load-time constants for a [`LoadOptions`], kept apart
/// because the loader borrows them until it loads.
pub struct Globals {
    flow_sets: u32,
    vip_dir_mask: u32,
}

impl LoadOptions {
    pub fn globals(&self) -> Globals {
        Globals {
            flow_sets: lb_common::flow_sets(self.flow_table_size),
            vip_dir_mask: lb_common::vip_dir_buckets(self.max_vips) - 1,
        }
    }

    /// Sets every map's size and the constants that go with them.
    fn apply<'a>(&self, loader: &mut EbpfLoader<'a>, g: &'a Globals) {
        loader.override_global(lb_common::GLOBAL_FLOW_SETS, &g.flow_sets, false);
        loader.override_global(lb_common::GLOBAL_VIP_DIR_MASK, &g.vip_dir_mask, false);
        let vip_keys = self.max_vips.saturating_mul(2);
        for (map, n) in [
            (lb_common::MAP_FLOWS, self.flow_table_size),
            (lb_common::MAP_VIPS, vip_keys),
            (lb_common::MAP_VIP_ADDRS, vip_keys),
            (lb_common::MAP_VIP_STATS, self.max_vips),
            (lb_common::MAP_VIPS_BY_ID, self.max_vips),
            (
                lb_common::MAP_VIP_DIR,
                lb_common::vip_dir_buckets(self.max_vips),
            ),
            (lb_common::MAP_RR_POS, self.max_vips),
            (lb_common::MAP_PREV_RING_UNTIL, self.max_vips),
            (lb_common::MAP_BACKENDS, self.max_backends),
            (lb_common::MAP_BACKEND_STATS, self.max_backends),
            (lb_common::MAP_ACTIVE, self.max_backends),
            // One extra key: the id allocator's high-water mark.
            (
                lb_common::MAP_BACKEND_IDS,
                self.max_backends.saturating_add(1),
            ),
            (lb_common::MAP_RINGS, self.ring_slots),
            // NAT flows' reply direction: one entry per NAT flow.
            (lb_common::MAP_NAT, self.flow_table_size),
        ] {
            loader.map_max_entries(map, n);
        }
    }
}

/// Loads the object and verifies every program in it.
pub fn load(opts: &LoadOptions) -> Result<Ebpf> {
    load_object(EBPF_OBJECT, opts)
}

/// [`load`] of another build of the datapath object (the A/B benchmark
/// loads an older revision's next to this one: one with every program and
/// map of this one's); `obj` must be 8-aligned.
pub fn load_object(obj: &[u8], opts: &LoadOptions) -> Result<Ebpf> {
    let globals = opts.globals();
    let mut loader = EbpfLoader::new();
    opts.apply(&mut loader, &globals);
    let mut ebpf = loader.load(obj).context(
        "loading the datapath object into the kernel failed (are you root, with BPF enabled?)",
    )?;
    for name in [
        lb_common::PROG_BALANCER_TRACED,
        lb_common::PROG_BALANCER,
        lb_common::PROG_DECAP,
        lb_common::PROG_PASS,
    ] {
        load_program(&mut ebpf, name)?;
    }
    install_tail_calls(&mut ebpf)?;
    Ok(ebpf)
}

/// Verifies and loads program `name`. The verifier gives up with EAGAIN
/// when a signal is pending for the loading thread (a test harness reaping
/// children, a terminal resize): that is retried, as libbpf does, up to five
/// times; any other failure is the verifier's answer.
fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let mut attempt = 1;
    loop {
        match xdp_program(ebpf, name)?.load() {
            Ok(()) => return Ok(()),
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < 5 =>
            {
                attempt += 1;
            }
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("the kernel verifier rejected XDP program `{name}`")));
            }
        }
    }
}

/// A datapath that outlived its agent is reused only if it is the one this
/// configuration describes: the same capacities and the same map layout
/// (a pinned map keeps the size and layout it was made with).
fn check_pins(maps_dir: &std::path::Path, opts: &LoadOptions) -> Result<()> {
    let instance = maps_dir
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let down = format!(
        "`lb down --instance {instance}` detaches and removes it (traffic stops until the agent \
         starts again), then start the agent"
    );
    let info = |name: &str| aya::maps::MapInfo::from_pin(maps_dir.join(name)).ok();
    if info(lb_common::MAP_VIP_DIR).is_none() {
        anyhow::bail!(
            "the running datapath of instance `{instance}` was made by an older version of lb \
             (it has no VIP directory, map `{}`); {down}",
            lb_common::MAP_VIP_DIR
        );
    }
    for (map, key, want, what) in [
        (
            lb_common::MAP_VIP_STATS,
            "max_vips",
            opts.max_vips,
            "VIPs plus regions",
        ),
        (
            lb_common::MAP_BACKENDS,
            "max_backends",
            opts.max_backends,
            "backends",
        ),
        (
            lb_common::MAP_RINGS,
            "ring_slots",
            opts.ring_slots,
            "ring slots",
        ),
        (
            lb_common::MAP_FLOWS,
            "flow_table_size",
            opts.flow_table_size,
            "connection-table entries",
        ),
    ] {
        if let Some(i) = info(map)
            && i.max_entries() != want
        {
            anyhow::bail!(
                "the running datapath of instance `{instance}` holds {} {what}, the configuration asks \
                 for {want} (agent.{key}): a datapath's capacity is fixed when it is loaded; {down}",
                i.max_entries()
            );
        }
    }
    for (map, size) in [
        (
            lb_common::MAP_VIPS,
            std::mem::size_of::<lb_common::VipMeta>(),
        ),
        (
            lb_common::MAP_BACKENDS,
            std::mem::size_of::<lb_common::Backend>(),
        ),
        (
            lb_common::MAP_SETTINGS,
            std::mem::size_of::<lb_common::Settings>(),
        ),
        (
            lb_common::MAP_FLOWS,
            std::mem::size_of::<lb_common::FlowSlot>(),
        ),
        (
            lb_common::MAP_VIP_DIR,
            std::mem::size_of::<lb_common::VipDirBucket>(),
        ),
    ] {
        if let Some(i) = info(map)
            && i.value_size() as usize != size
        {
            anyhow::bail!(
                "the running datapath of instance `{instance}` was made by another version of lb \
                 (map `{map}` holds {}-byte values, this version writes {size}); {down}",
                i.value_size()
            );
        }
    }
    Ok(())
}

/// Every program the balancer tail-calls, in its slot: the traced copy
/// (`lb trace`), the ICMP "too big" builder, the NAT ICMP translator and
/// the drop log.
fn install_tail_calls(ebpf: &mut Ebpf) -> Result<()> {
    install_tracer(ebpf)?;
    install_jump(ebpf, lb_common::PROG_TOO_BIG, lb_common::MAP_ICMP_JUMP, 0)?;
    install_jump(ebpf, lb_common::PROG_NAT_ICMP, lb_common::MAP_ICMP_JUMP, 1)?;
    install_jump(ebpf, lb_common::PROG_DROP_LOG, lb_common::MAP_LOG_JUMP, 0)
}

/// Loads program `prog` and puts it in slot `slot` of program array `map`,
/// where the balancer tail-calls it.
fn install_jump(ebpf: &mut Ebpf, prog: &str, map: &str, slot: u32) -> Result<()> {
    load_program(ebpf, prog)?;
    let fd = xdp_program(ebpf, prog)?.fd()?.try_clone()?;
    let m = ebpf
        .map_mut(map)
        .with_context(|| format!("map `{map}` is missing from the object"))?;
    aya::maps::ProgramArray::try_from(m)?
        .set(slot, &fd, 0)
        .with_context(|| format!("installing `{prog}`"))?;
    Ok(())
}

/// Puts the traced copy of the balancer where `lb_xdp` tail-calls it while
/// `lb trace` runs.
fn install_tracer(ebpf: &mut Ebpf) -> Result<()> {
    let fd = xdp_program(ebpf, lb_common::PROG_BALANCER_TRACED)?
        .fd()?
        .try_clone()?;
    let map = ebpf
        .map_mut(lb_common::MAP_TRACE_JUMP)
        .context("map `TRACE_JUMP` is missing from the object")?;
    aya::maps::ProgramArray::try_from(map)?
        .set(0, &fd, 0)
        .context("installing the traced balancer")?;
    Ok(())
}

/// The XDP program `name` of a loaded object.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program `{name}` is missing from the object"))?;
    prog.try_into()
        .with_context(|| format!("program `{name}` is not an XDP program"))
}

/// Attaches program `name` to `iface` in `mode` (`auto`: native, falling
/// back to skb with a message). Returns the mode actually used (native or
/// skb).
pub fn attach(ebpf: &mut Ebpf, name: &str, iface: &str, mode: XdpMode) -> Result<XdpMode> {
    Ok(attach_with_id(ebpf, name, iface, mode)?.0)
}

/// [`attach`], also returning the link's id.
pub fn attach_with_id(
    ebpf: &mut Ebpf,
    name: &str,
    iface: &str,
    mode: XdpMode,
) -> Result<(XdpMode, aya::programs::xdp::XdpLinkId)> {
    let prog = xdp_program(ebpf, name)?;
    match mode {
        XdpMode::Native => {
            let id = prog.attach(iface, AyaXdpMode::Driver).with_context(|| {
                format!(
                    "attaching `{name}` to {iface} in native mode failed - try xdp_mode = \"skb\""
                )
            })?;
            Ok((XdpMode::Native, id))
        }
        XdpMode::Skb => {
            let id = prog
                .attach(iface, AyaXdpMode::Skb)
                .with_context(|| format!("attaching `{name}` to {iface} in skb mode failed"))?;
            Ok((XdpMode::Skb, id))
        }
        XdpMode::Auto => match prog.attach(iface, AyaXdpMode::Driver) {
            Ok(id) => Ok((XdpMode::Native, id)),
            Err(e) => {
                tracing::warn!(interface = iface, error = %e, "native XDP failed; falling back to generic (skb) mode");
                let id = prog.attach(iface, AyaXdpMode::Skb).with_context(|| {
                    format!("attaching `{name}` to {iface} failed in both modes")
                })?;
                Ok((XdpMode::Skb, id))
            }
        },
    }
}

/// Every map the agent pins (all but the benchmark's tail-call slot).
pub const PINNED_MAPS: &[&str] = &[
    lb_common::MAP_VIPS,
    lb_common::MAP_VIP_ADDRS,
    lb_common::MAP_VIP_FILTER,
    lb_common::MAP_VIP_TABLE_FILTER,
    lb_common::MAP_VIP_FAST_FILTER,
    lb_common::MAP_VIP_ONLY_FILTER,
    lb_common::MAP_VIPS_BY_ID,
    lb_common::MAP_VIP_DIR,
    lb_common::MAP_BACKENDS,
    lb_common::MAP_RINGS,
    // The second chance's clock goes with the rings it dates.
    lb_common::MAP_PREV_RING_UNTIL,
    lb_common::MAP_FLOWS,
    lb_common::MAP_VERDICTS,
    lb_common::MAP_DECAP_VERDICTS,
    lb_common::MAP_VIP_STATS,
    lb_common::MAP_BACKEND_STATS,
    lb_common::MAP_TX_PORTS,
    lb_common::MAP_SETTINGS,
    lb_common::MAP_DECAP_ADDRS,
    lb_common::MAP_BACKEND_IDS,
    lb_common::MAP_FLOOD_GUARD,
    lb_common::MAP_FLOOD_STATE,
    // Least-connections counts: a restarted agent keeps them instead of
    // starting from zero until its first recount.
    lb_common::MAP_ACTIVE,
    // NAT flows survive a restart like the connection table, and so do
    // the allocation cursors: a cursor back at the start of its slice would
    // meet the ports just held by closed flows (60 s each).
    lb_common::MAP_NAT,
    lb_common::MAP_NAT_ADDRS,
    lb_common::MAP_NAT_CURSOR,
    // `lb trace` opens these from another process.
    lb_common::MAP_TRACE_CFG,
    lb_common::MAP_TRACE,
    lb_common::MAP_TRACE_JUMP,
    // The kernel empties a program array when the last process holding it
    // closes it, unless it is pinned: without the pin, every agent exit
    // (kill -9, or a clean stop while the datapath keeps forwarding) left
    // ICMP "too big" answers and NAT ICMP translation off until the next
    // agent started.
    lb_common::MAP_ICMP_JUMP,
    // The same for the drop log: its events wait in the log ring for the
    // next agent (each agent's own datapath load brings its own ring).
    lb_common::MAP_LOG_JUMP,
];

/// Where an instance's pins live.
pub fn pin_dir(instance: &str) -> std::path::PathBuf {
    std::path::Path::new("/sys/fs/bpf/lb").join(instance)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs on /sys/fs/bpf if it is not there yet.
pub fn ensure_bpffs() -> Result<()> {
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs into a zeroed struct with a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    // SAFETY: mount(2) with valid C strings and no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "mounting bpffs on /sys/fs/bpf failed: {} - mount it yourself with `mount -t bpf bpf /sys/fs/bpf`",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Loads the datapath with its maps pinned under `dir/maps/`: maps already
/// pinned there (by an earlier agent) are reused with their contents, so the
/// connection table and counters survive a restart.
pub fn load_pinned(opts: &LoadOptions, dir: &std::path::Path) -> Result<(Ebpf, bool)> {
    let maps_dir = dir.join("maps");
    let adopted = maps_dir.join(lb_common::MAP_FLOWS).exists();
    std::fs::create_dir_all(&maps_dir)
        .with_context(|| format!("creating {}", maps_dir.display()))?;
    if adopted {
        check_pins(&maps_dir, opts)?;
    }
    let globals = opts.globals();
    let mut loader = EbpfLoader::new();
    opts.apply(&mut loader, &globals);
    let paths: Vec<(&str, std::path::PathBuf)> =
        PINNED_MAPS.iter().map(|n| (*n, maps_dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).context(
        "loading the datapath object into the kernel failed (are you root, with BPF enabled?)",
    )?;
    for name in [
        lb_common::PROG_BALANCER,
        lb_common::PROG_BALANCER_TRACED,
        lb_common::PROG_PASS,
    ] {
        load_program(&mut ebpf, name)?;
    }
    install_tail_calls(&mut ebpf)?;
    Ok((ebpf, adopted))
}

/// Attaches the balancer to `iface`, or, if `dir/link` holds a pinned link
/// from an earlier agent, swaps the new program into that link atomically
/// (forwarding never stops). Returns the pinned link and what was done.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    mode: XdpMode,
    dir: &std::path::Path,
    link_name: &str,
) -> Result<(aya::programs::links::PinnedLink, String)> {
    attach_pinned_program(ebpf, lb_common::PROG_BALANCER, iface, mode, dir, link_name)
}

/// [`attach_pinned`] for program `prog_name` (the backend host's
/// `lb_decap`).
pub fn attach_pinned_program(
    ebpf: &mut Ebpf,
    prog_name: &str,
    iface: &str,
    mode: XdpMode,
    dir: &std::path::Path,
    link_name: &str,
) -> Result<(aya::programs::links::PinnedLink, String)> {
    use aya::programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    };
    let link_path = dir.join(link_name);
    let prog = xdp_program(ebpf, prog_name)?;
    if link_path.exists() {
        let pinned = PinnedLink::from_pin(&link_path)
            .with_context(|| format!("opening the pinned link {}", link_path.display()))?;
        let fd: FdLink = pinned.into();
        let link = XdpLink::try_from(fd).context("the pinned link is not an XDP link")?;
        prog.attach_to_link(link)
            .context("swapping the new program into the pinned link")?;
        pin_program(ebpf, prog_name, dir)?;
        let pinned = PinnedLink::from_pin(&link_path).context("reopening the pinned link")?;
        return Ok((
            pinned,
            "adopted the running datapath (program replaced atomically)".into(),
        ));
    }
    let (used, id) = attach_with_id(ebpf, prog_name, iface, mode)?;
    let prog = xdp_program(ebpf, prog_name)?;
    let link = prog.take_link(id).context("taking the XDP link")?;
    let fd = FdLink::try_from(link).context("XDP link is not an fd link (kernel < 5.9?)")?;
    let pinned = fd
        .pin(&link_path)
        .with_context(|| format!("pinning the link at {}", link_path.display()))?;
    pin_program(ebpf, prog_name, dir)?;
    Ok((pinned, format!("attached to {iface} in {used} mode")))
}

/// Pins the running program at `dir/prog` (replacing an earlier agent's),
/// next to the maps and the link, for inspection with bpftool.
fn pin_program(ebpf: &mut Ebpf, prog_name: &str, dir: &std::path::Path) -> Result<()> {
    let path = dir.join("prog");
    let _ = std::fs::remove_file(&path);
    xdp_program(ebpf, prog_name)?
        .pin(&path)
        .with_context(|| format!("pinning the program at {}", path.display()))
}

/// Loads the datapath object for a backend host: only `lb_decap` is
/// verified, the balancer's maps at their smallest (it uses none of them),
/// and its own two maps pinned in `dir/maps`, so a restart keeps the
/// addresses and the counters.
pub fn load_decap_pinned(dir: &std::path::Path, gue_port: u16) -> Result<Ebpf> {
    let opts = LoadOptions {
        flow_table_size: 1024,
        max_vips: 1,
        max_backends: 1,
        ring_slots: 1,
    };
    let maps_dir = dir.join("maps");
    std::fs::create_dir_all(&maps_dir)
        .with_context(|| format!("creating {}", maps_dir.display()))?;
    let globals = opts.globals();
    let mut loader = EbpfLoader::new();
    opts.apply(&mut loader, &globals);
    loader.override_global(lb_common::GLOBAL_DECAP_GUE_PORT, &gue_port, false);
    let paths: Vec<(&str, std::path::PathBuf)> =
        DECAP_MAPS.iter().map(|n| (*n, maps_dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).context(
        "loading the datapath object into the kernel failed (are you root, with BPF enabled?)",
    )?;
    load_program(&mut ebpf, lb_common::PROG_DECAP)?;
    Ok(ebpf)
}

/// The maps a backend host pins: the addresses it decapsulates for, and
/// its verdict counters.
pub const DECAP_MAPS: &[&str] = &[lb_common::MAP_DECAP_ADDRS, lb_common::MAP_DECAP_VERDICTS];

/// Detaches and removes everything an instance pinned.
pub fn remove_pins(dir: &std::path::Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(true)
}
