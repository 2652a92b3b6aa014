//! `lb loadgen`: a line-rate traffic generator that sends from XDP itself,
//! with BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//! kernel >= 5.18), the technique of xdp-trafficgen. The `loadgen` XDP
//! program turns one template frame into `flows` distinct flows (source
//! address and port) and transmits every run with `XDP_TX` on the chosen
//! interface. On a veth the peer must have an XDP program for those frames
//! to arrive (the LB's, or `lb_pass`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::{AF_INET, AF_INET6, LoadgenCfg, PROTO_TCP, PROTO_UDP};
use serde::Serialize;

use crate::{datapath::loader, host::netlink};

/// What to send.
#[derive(Clone, Debug)]
pub struct Options {
    pub iface: String,
    pub dst: SocketAddr,
    /// Destination MAC; `None` = the kernel's neighbour entry for `dst`.
    pub dst_mac: Option<[u8; 6]>,
    /// Base source address (see [`LoadgenCfg::flows`] for what each flow varies).
    pub src: IpAddr,
    pub tcp_syn: bool,
    /// Frame size in bytes (without FCS), >= the headers; 0 = the smallest
    /// the headers allow, at least 60.
    pub size: usize,
    pub flows: u32,
    /// Packets per second in all; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub threads: usize,
    /// Print a progress line each second.
    pub progress: bool,
}

/// What was sent.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub packets: u64,
    pub seconds: f64,
    pub pps: f64,
    /// Layer-2 bits per second (frame bytes × 8, no preamble or gap).
    pub gbps: f64,
    pub frame_size: usize,
    pub flows: u32,
    pub threads: usize,
}

fn neighbour_mac(dst: IpAddr, iface: &str, ifindex: u32) -> Result<[u8; 6]> {
    let via = netlink::route(dst)?.map(|r| r.via).unwrap_or(dst);
    // Make the kernel resolve it (one UDP datagram to the discard port of the next hop).
    let _ = std::net::UdpSocket::bind(if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .and_then(|s| s.send_to(b"", SocketAddr::new(via, 9)));
    for _ in 0..50 {
        if let Some(m) = netlink::neighbour(via, ifindex)? {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no neighbour entry for {via} on {iface}; give the destination MAC with --dst-mac")
}

/// Builds the template frame and the program's settings.
/// Writes `frame`'s headers into the tools object's `LOADGEN_FRAME`: the
/// generator restores them on every frame before patching the source.
pub fn set_frame_template(ebpf: &mut aya::Ebpf, frame: &[u8]) -> Result<()> {
    let mut t = [0u8; lb_common::LOADGEN_FRAME_LEN];
    let n = frame.len().min(t.len());
    t[..n].copy_from_slice(&frame[..n]);
    let m = ebpf
        .map_mut(lb_common::MAP_LOADGEN_FRAME)
        .context("LOADGEN_FRAME map")?;
    let mut a: aya::maps::Array<_, [u8; lb_common::LOADGEN_FRAME_LEN]> =
        aya::maps::Array::try_from(m)?;
    a.set(0, t, 0)?;
    Ok(())
}

pub fn template(o: &Options, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Result<(Vec<u8>, LoadgenCfg)> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let (ip, family, l4_off) = match (o.src, o.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (eth.ipv4(s.octets(), d.octets(), 64), AF_INET, 34u32),
        (IpAddr::V6(s), IpAddr::V6(d)) => (eth.ipv6(s.octets(), d.octets(), 64), AF_INET6, 54u32),
        _ => bail!("--src and the destination must be the same address family"),
    };
    let (proto, hdr) = if o.tcp_syn {
        (PROTO_TCP, 20)
    } else {
        (PROTO_UDP, 8)
    };
    let min = l4_off as usize + hdr;
    let size = if o.size == 0 { min.max(60) } else { o.size };
    if size < min.max(60) {
        bail!(
            "--size {size} is too small: at least {} bytes for these headers",
            min.max(60)
        );
    }
    let payload = vec![0u8; size - min];
    let mut frame = Vec::with_capacity(size);
    if o.tcp_syn {
        ip.tcp(1024, o.dst.port(), 1, 65535)
            .syn()
            .write(&mut frame, &payload)?;
    } else {
        ip.udp(1024, o.dst.port()).write(&mut frame, &payload)?;
    }
    let cfg = LoadgenCfg {
        flows: o.flows.max(1),
        l3_off: 14,
        l4_off,
        family,
        proto,
        _pad: [0; 2],
    };
    Ok((frame, cfg))
}

/// Sends until the count or duration is reached; returns what was sent.
pub fn run(o: &Options) -> Result<Summary> {
    if o.duration.is_none() && o.count.is_none() {
        bail!("give --duration or --count");
    }
    let link = netlink::link_by_name(&o.iface)?.with_context(|| {
        format!(
            "no interface `{}` here (check the namespace: `ip link`)",
            o.iface
        )
    })?;
    let (src_mac, idx) = (
        link.mac
            .with_context(|| format!("interface `{}` has no MAC address", o.iface))?,
        link.index,
    );
    let dst_mac = match o.dst_mac {
        Some(m) => m,
        None => neighbour_mac(o.dst.ip(), &o.iface, idx)?,
    };
    let (frame, cfg) = template(o, src_mac, dst_mac)?;
    let mut ebpf = loader::load_tools()?;
    {
        let m = ebpf
            .map_mut(lb_common::MAP_LOADGEN)
            .context("LOADGEN map")?;
        let mut a: aya::maps::Array<_, LoadgenCfg> = aya::maps::Array::try_from(m)?;
        a.set(0, cfg, 0)?;
    }
    set_frame_template(&mut ebpf, &frame)?;
    let prog = loader::xdp_program(&mut ebpf, lb_common::PROG_LOADGEN)?;
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&idx.to_ne_bytes());

    let sent = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let failed = std::sync::Mutex::new(None::<String>);
    let start = Instant::now();
    let threads = o.threads.max(1);
    let per_thread_rate = if o.rate == 0 {
        0
    } else {
        (o.rate / threads as u64).max(1)
    };
    let done = |n: u64, t: Instant| {
        o.count.is_some_and(|c| n >= c) || o.duration.is_some_and(|d| t.elapsed() >= d)
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // Batches small enough to keep the rate limit smooth.
                let batch: u32 = if per_thread_rate == 0 {
                    1 << 16
                } else {
                    (per_thread_rate / 100).clamp(1, 1 << 16) as u32
                };
                let mut my = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut reps = batch;
                    if let Some(c) = o.count {
                        let so_far = sent.load(Ordering::Relaxed);
                        if so_far >= c {
                            break;
                        }
                        reps = reps.min((c - so_far) as u32);
                    }
                    let opts = TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat: reps,
                        attrs: TestRunAttrs::new().xdp_live_frames(64.min(reps)),
                        ..Default::default()
                    };
                    if let Err(e) = prog.test_run(opts) {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    my += reps as u64;
                    let total = sent.fetch_add(reps as u64, Ordering::Relaxed) + reps as u64;
                    if done(total, start) {
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    if per_thread_rate > 0 {
                        let due = Duration::from_secs_f64(my as f64 / per_thread_rate as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            });
        }
        if o.progress {
            s.spawn(|| {
                let mut last = 0u64;
                let mut sec = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let next = start + Duration::from_secs(sec + 1);
                    while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    sec += 1;
                    let now = sent.load(Ordering::Relaxed);
                    let pps = (now - last) as f64;
                    last = now;
                    eprintln!(
                        "t={sec}s  {:.3} Mpps  {:.2} Gbps  ({now} sent)",
                        pps / 1e6,
                        pps * frame.len() as f64 * 8.0 / 1e9
                    );
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        bail!(
            "BPF_PROG_TEST_RUN (live frames) failed: {e} (kernel >= 5.18 and an XDP-capable interface needed)"
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let packets = sent.load(Ordering::Relaxed);
    let pps = packets as f64 / seconds.max(1e-9);
    Ok(Summary {
        packets,
        seconds,
        pps,
        gbps: pps * frame.len() as f64 * 8.0 / 1e9,
        frame_size: frame.len(),
        flows: cfg.flows,
        threads,
    })
}
