//! Test support for the privileged tests: loading the datapath and running
//! it through BPF_PROG_TEST_RUN (the `Fixture`) here; packets built with
//! etherparse in `packets`; network namespaces that are always removed and
//! the tests' topology in `net`; the routed cluster, the scale runs and wrk
//! in their own modules.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
pub use lb_user::{datapath::Dataplane, datapath::loader};

pub mod cluster;
mod net;
mod packets;
pub mod scale;
pub mod wrk;

pub use net::{
    Dc, Netns, TestServer, ask_vip, backend_addr, dc, dc_bare, fmt_mac, ifindex_of, mac_of,
    pin_to_cpu, sh, veth,
};
pub use packets::{
    backend_mac, backend_of, ones_sum, tcp4, tcp4_fin, tcp4_syn, tcp6, tcp6_syn, udp4, udp6, v4,
    v6, vlan, with_ip_options,
};

/// MACs used in fixtures.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];

/// Loads the datapath with a small connection table (tests run many loads).
pub fn load() -> Result<Ebpf> {
    loader::load(&loader::LoadOptions {
        flow_table_size: 65536,
        ..Default::default()
    })
}

/// Loads the tools object (generator, sink, floors, cost programs).
pub fn load_tools() -> Result<Ebpf> {
    loader::load_tools()
}

/// The verdict counters that moved between `before` and `after`: (reason,
/// by how much).
pub fn moved_verdicts(before: &[u64], after: &[u64]) -> Vec<(usize, u64)> {
    after
        .iter()
        .zip(before)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, a - b))
        .collect()
}

/// Result of one BPF_PROG_TEST_RUN.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    pub out: Vec<u8>,
}

/// Runs program `prog` once on `pkt`.
pub fn run(ebpf: &mut Ebpf, prog: &str, pkt: &[u8]) -> Result<Run> {
    let p = loader::xdp_program(ebpf, prog)?;
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = p.test_run(opts).context("BPF_PROG_TEST_RUN failed")?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        action: r.return_value,
        out,
    })
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN's context: the whole packet
/// (`data_end` = its length) received on `ifindex` (of the calling thread's
/// network namespace).
pub fn xdp_ctx(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// Runs `prog` on `pkt` `repeat` times (at least once) with `meta` bytes of
/// XDP metadata in front of it, which leaves the packet only 256 − `meta`
/// bytes of headroom (the kernel keeps 40 of them for its frame header).
pub fn run_with_headroom_taken(
    prog: &aya::programs::Xdp,
    pkt: &[u8],
    meta: u32,
    repeat: u32,
) -> Result<Run> {
    let mut data = vec![0u8; meta as usize];
    data.extend_from_slice(pkt);
    let mut ctx = xdp_ctx(data.len(), 0);
    ctx[0..4].copy_from_slice(&meta.to_ne_bytes());
    let mut out = vec![0u8; data.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(&data),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        action: r.return_value,
        out,
    })
}

/// [`run`] with the packet received on interface `ifindex`.
pub fn run_on(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], ifindex: u32) -> Result<Run> {
    let p = loader::xdp_program(ebpf, prog)?;
    let mut out = vec![0u8; pkt.len() + 256];
    let ctx = xdp_ctx(pkt.len(), ifindex);
    let mut ctx_out = [0u8; 24];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    };
    let r = p.test_run(opts).context("BPF_PROG_TEST_RUN failed")?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        action: r.return_value,
        out,
    })
}

/// [`time`] with the packet received on interface `ifindex`.
pub fn time_on(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32, ifindex: u32) -> Result<f64> {
    let p = loader::xdp_program(ebpf, prog)?;
    let mut out = vec![0u8; pkt.len() + 256];
    let ctx = xdp_ctx(pkt.len(), ifindex);
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    let r = p.test_run(opts).context("BPF_PROG_TEST_RUN failed")?;
    Ok(r.duration.as_nanos() as f64)
}

/// Runs `prog` `repeat` times on `pkt` and returns the kernel's mean ns per run.
pub fn time(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32) -> Result<f64> {
    Ok(time_action(ebpf, prog, pkt, repeat)?.0)
}

/// [`time`], and the XDP action of the last repetition.
pub fn time_action(ebpf: &mut Ebpf, prog: &str, pkt: &[u8], repeat: u32) -> Result<(f64, u32)> {
    let p = loader::xdp_program(ebpf, prog)?;
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    };
    let r = p.test_run(opts).context("BPF_PROG_TEST_RUN failed")?;
    Ok((r.duration.as_nanos() as f64, r.return_value))
}

/// XDP action codes.
pub mod action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
}

/// Packets the `sink` program of `ebpf` has counted (all CPUs).
pub fn sink_count(ebpf: &Ebpf) -> u64 {
    let m = ebpf.map(lb_common::MAP_SINK).expect("SINK map");
    let a: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(m).expect("per-CPU array");
    a.get(&0, 0).expect("SINK[0]").iter().sum()
}

/// A loaded datapath with VIPs and backends programmed through the facade.
pub struct Fixture {
    pub ebpf: Ebpf,
}

/// One VIP as the fixtures set it up.
pub struct VipSpec {
    pub key: lb_common::VipKey,
    pub vip_id: u32,
    pub flags: u32,
    pub ring_size: u32,
    /// (backend id, address, weight)
    pub backends: Vec<(u32, [u8; 16], u32)>,
}

impl Fixture {
    pub fn new() -> Result<Self> {
        Self::with_ebpf(load()?)
    }

    /// A fixture loaded with other capacities.
    pub fn with_options(opts: &loader::LoadOptions) -> Result<Self> {
        Self::with_ebpf(loader::load(opts)?)
    }

    /// A fixture on another build of the datapath object (8-aligned bytes).
    pub fn with_object(obj: &[u8]) -> Result<Self> {
        Self::with_ebpf(loader::load_object(
            obj,
            &loader::LoadOptions {
                flow_table_size: 65536,
                ..Default::default()
            },
        )?)
    }

    fn with_ebpf(mut ebpf: Ebpf) -> Result<Self> {
        Dataplane::new(&mut ebpf).set_settings(&lb_common::Settings {
            ipip_src_v4: [198, 19, 0, 0],
            ipip_src_v6: v6("2001:2:0:ff::".parse().expect("literal")),
            flags: 0,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            ..Default::default()
        })?;
        Ok(Self { ebpf })
    }

    pub fn dp(&mut self) -> Dataplane<&mut aya::Ebpf> {
        Dataplane::new(&mut self.ebpf)
    }

    /// Programs the VIP, its backends (each with [`backend_mac`]) and its ring.
    pub fn add_vip(&mut self, spec: &VipSpec) -> Result<()> {
        let mut dp = self.dp();
        dp.upsert_vip(
            &spec.key,
            lb_common::VipMeta {
                vip_id: spec.vip_id,
                flags: spec.flags,
                ..Default::default()
            },
        )?;
        for &(id, addr, _) in &spec.backends {
            dp.set_backend(
                id,
                &lb_common::Backend {
                    addr,
                    dst_mac: backend_mac(id),
                    src_mac: LB_MAC,
                    ifindex: 0,
                    family: spec.key.family,
                    state: lb_common::BACKEND_UP,
                    weight: 1,
                    ..Default::default()
                },
            )?;
        }
        self.set_ring(spec)
    }

    /// Rebuilds and installs the VIP's ring from `spec.backends` (weights).
    pub fn set_ring(&mut self, spec: &VipSpec) -> Result<()> {
        let entries: Vec<_> = spec
            .backends
            .iter()
            .map(|&(id, addr, weight)| lb_user::policy::maglev::Entry { id, addr, weight })
            .collect();
        let table = lb_user::policy::maglev::build(&entries, spec.ring_size);
        self.dp().install_ring(&spec.key, &table)?;
        Ok(())
    }

    pub fn run(&mut self, pkt: &[u8]) -> Result<Run> {
        run(&mut self.ebpf, lb_common::PROG_BALANCER, pkt)
    }

    pub fn verdicts(&mut self) -> Result<Vec<u64>> {
        Ok(self.dp().verdicts()?)
    }
}
