//! Test support for the privileged tests: loading the datapath, running it
//! through BPF_PROG_TEST_RUN, building packets (etherparse), and network
//! namespaces that are always removed.

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use etherparse::PacketBuilder;
pub use lb_user::{datapath::Dataplane, datapath::loader};

pub mod cluster;
pub mod scale;
pub mod wrk;

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

/// One's-complement sum of `b` folded to 16 bits: 0xffff when a checksum
/// over it holds.
pub fn ones_sum(b: &[u8]) -> u16 {
    let mut s = 0u32;
    for w in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
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

/// Address helpers: 16-byte network-order form used by the maps.
pub fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a);
    o
}

pub fn v6(a: std::net::Ipv6Addr) -> [u8; 16] {
    a.octets()
}

/// An Ethernet/IPv4/TCP segment of an established connection (ACK) from
/// `src:sport` to `dst:dport`.
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/TCP SYN (no ACK): a connection being opened.
pub fn tcp4_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let payload: &[u8] = &[];
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/TCP FIN|ACK: a connection being closed.
pub fn tcp4_fin(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1)
        .fin();
    let payload: &[u8] = &[];
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv4/UDP datagram.
pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// The Ethernet frame `p` with an 802.1Q tag (VLAN 42) after its MACs.
pub fn vlan(p: Vec<u8>) -> Vec<u8> {
    let mut o = p[..12].to_vec();
    o.extend_from_slice(&[0x81, 0x00, 0x00, 42]);
    o.extend_from_slice(&p[12..]);
    o
}

/// The Ethernet/IPv4 frame `p` rebuilt with a 4-byte options field (IHL 6).
pub fn with_ip_options(p: Vec<u8>) -> Vec<u8> {
    let (mut h, rest) = etherparse::Ipv4Header::from_slice(&p[14..]).expect("ipv4");
    h.options = [1, 1, 1, 1][..].try_into().expect("options");
    h.total_len += 4;
    h.header_checksum = h.calc_header_checksum();
    let mut o = p[..14].to_vec();
    h.write(&mut o).expect("write");
    o.extend_from_slice(rest);
    o
}

/// An Ethernet/IPv6/TCP segment of an established connection (ACK).
pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .ack(1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv6/TCP SYN (no ACK): a connection opening.
pub fn tcp6_syn(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &[]).expect("writing to a Vec cannot fail");
    v
}

/// An Ethernet/IPv6/UDP datagram.
pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload)
        .expect("writing to a Vec cannot fail");
    v
}

/// Runs a command, failing with its stderr if it fails.
pub use lb_user::host::iproute::run as sh;

/// A network namespace that is deleted when dropped (also when a test fails
/// and unwinds). Names carry the test's prefix and the pid, so parallel and
/// crashed runs never collide; [`Netns::sweep`] removes leftovers.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("lbt-{tag}-{}", std::process::id());
        let _ = sh("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Runs `f` with the calling thread moved into the namespace, then moves
    /// it back. Sockets and BPF attachments made in `f` belong to it.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        lb_user::tools::lab::in_netns(&self.name, f)
    }

    /// Deletes every namespace an earlier (crashed) run of this tag left.
    pub fn sweep(tag: &str) {
        if let Ok(list) = sh("ip", &["netns", "list"]) {
            for line in list.lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if name.starts_with(&format!("lbt-{tag}-")) {
                    let _ = sh("ip", &["netns", "del", name]);
                }
            }
        }
    }
}

/// A veth pair: `a_dev` in namespace `a`, its peer `b_dev` in `b`.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    let args = [
        "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
        &b.name,
    ];
    // `ip` occasionally fails to open a namespace created an instant before
    // while parallel tests add and delete theirs under /run/netns
    // ("Invalid netns value"); the namespace is there, so try again.
    let mut attempt = 0;
    loop {
        match sh("ip", &args) {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 4 && e.to_string().contains("Invalid \"netns\" value") => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// Packets the `sink` program of `ebpf` has counted (all CPUs).
pub fn sink_count(ebpf: &Ebpf) -> u64 {
    let m = ebpf.map(lb_common::MAP_SINK).expect("SINK map");
    let a: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(m).expect("per-CPU array");
    a.get(&0, 0).expect("SINK[0]").iter().sum()
}

/// The MAC the fixtures give backend `id`: 02:00:00:00:01:<id>.
pub fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, (id >> 8) as u8 | 0x01, id as u8]
}

/// Which backend a forwarded frame was sent to, from its destination MAC.
pub fn backend_of(frame: &[u8]) -> u32 {
    assert!(frame.len() >= 6, "frame too short to carry a MAC");
    (((frame[4] & !0x01) as u32) << 8) | frame[5] as u32
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

pub fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let s = ns
        .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
        .expect("mac");
    let mut m = [0u8; 6];
    for (i, p) in s.trim().split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("hex");
    }
    m
}

pub fn ifindex_of(ns: &Netns, dev: &str) -> u32 {
    ns.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])
        .expect("ifindex")
        .trim()
        .parse()
        .expect("num")
}

pub fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The tests' one topology: a client, the LB, and `n` backends, each
/// backend in its own namespace behind its own veth from the LB: client
/// `c0` 198.18.10.2 / 2001:2:10::2 ── `l0` LB (198.18.10.1, 2001:2:10::1);
/// LB `l<i>` 198.18.1<i>.1 / 2001:2:1<i>::1 ── `b0` 198.18.1<i>.2 /
/// 2001:2:1<i>::2 in backend i (1-based), which owns VIPs 198.18.0.100 and
/// 2001:2::100 on loopback and has the `lb_pass` XDP program on `b0`
/// (native redirect into a veth needs a program on the receiving side;
/// [`dc_bare`] leaves `b0` free for a test's own program).
pub struct Dc {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// Keeps the backends' pass programs attached.
    _pass: Vec<Ebpf>,
}

pub fn backend_addr(i: usize) -> String {
    format!("198.18.{}.2", 10 + i)
}

pub fn dc(tag: &str, n: usize) -> Result<Dc> {
    dc_with(tag, n, true)
}

/// [`dc`] without the backends' `lb_pass` programs.
pub fn dc_bare(tag: &str, n: usize) -> Result<Dc> {
    dc_with(tag, n, false)
}

fn dc_with(tag: &str, n: usize, pass_programs: bool) -> Result<Dc> {
    Netns::sweep(tag);
    let client = Netns::new(&format!("{tag}-c"))?;
    let lb = Netns::new(&format!("{tag}-l"))?;
    veth(&client, "c0", &lb, "l0")?;
    let run = |ns: &Netns, cmd: &[&str]| ns.exec(cmd[0], &cmd[1..]).map(|_| ());
    run(
        &client,
        &["ip", "addr", "add", "198.18.10.2/24", "dev", "c0"],
    )?;
    run(
        &client,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:2:10::2/64",
            "dev",
            "c0",
            "nodad",
        ],
    )?;
    run(&client, &["ip", "link", "set", "c0", "up"])?;
    run(
        &client,
        &["ip", "route", "add", "198.18.0.0/24", "via", "198.18.10.1"],
    )?;
    run(
        &client,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "2001:2::/64",
            "via",
            "2001:2:10::1",
        ],
    )?;
    // Packets the XDP program forwards must carry finished checksums: a
    // veth would otherwise hand over a partial one (TX offload).
    run(&client, &["ethtool", "-K", "c0", "tx", "off"])?;
    run(&lb, &["ip", "addr", "add", "198.18.10.1/24", "dev", "l0"])?;
    run(
        &lb,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "2001:2:10::1/64",
            "dev",
            "l0",
            "nodad",
        ],
    )?;
    run(&lb, &["ip", "link", "set", "l0", "up"])?;
    run(&lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    run(&lb, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let mut backends = Vec::new();
    let mut pass = Vec::new();
    for i in 1..=n {
        let b = Netns::new(&format!("{tag}-b{i}"))?;
        let l = format!("l{i}");
        veth(&lb, &l, &b, "b0")?;
        let (lb4, lb6) = (
            format!("198.18.{}.1", 10 + i),
            format!("2001:2:{}::1", 10 + i),
        );
        run(&lb, &["ip", "addr", "add", &format!("{lb4}/24"), "dev", &l])?;
        run(
            &lb,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{lb6}/64"),
                "dev",
                &l,
                "nodad",
            ],
        )?;
        run(&lb, &["ip", "link", "set", &l, "up"])?;
        let b6 = format!("2001:2:{}::2/64", 10 + i);
        run(
            &b,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", backend_addr(i)),
                "dev",
                "b0",
            ],
        )?;
        run(&b, &["ip", "-6", "addr", "add", &b6, "dev", "b0", "nodad"])?;
        run(&b, &["ip", "addr", "add", "198.18.0.100/32", "dev", "lo"])?;
        run(
            &b,
            &["ip", "-6", "addr", "add", "2001:2::100/128", "dev", "lo"],
        )?;
        run(&b, &["ip", "link", "set", "b0", "up"])?;
        run(&b, &["ip", "route", "add", "default", "via", &lb4])?;
        run(&b, &["ip", "-6", "route", "add", "default", "via", &lb6])?;
        if pass_programs {
            let mut e = load()?;
            b.enter(|| {
                loader::attach(
                    &mut e,
                    lb_common::PROG_PASS,
                    "b0",
                    lb_user::vocab::XdpMode::Native,
                )
            })??;
            pass.push(e);
        }
        backends.push(b);
    }
    Ok(Dc {
        client,
        lb,
        backends,
        _pass: pass,
    })
}

/// A test backend server: on `0.0.0.0:8080` in its namespace it answers
/// every connection with its name and a newline, then echoes lines until
/// the client closes. `stop()` closes the listener (new connections are
/// refused, as when the server process dies); open connections go on.
pub struct TestServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(ns: &Netns, name: &str) -> Result<Self> {
        use std::io::{BufRead as _, Write as _};
        let l = ns.enter(|| std::net::TcpListener::bind("0.0.0.0:8080"))??;
        l.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let name = format!("{name}\n");
        let thread = std::thread::spawn(move || {
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(20)));
                            if c.write_all(name.as_bytes()).is_err() {
                                return;
                            }
                            let Ok(r) = c.try_clone() else { return };
                            for line in std::io::BufReader::new(r).lines() {
                                let Ok(line) = line else { return };
                                if c.write_all(format!("{line}\n").as_bytes()).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener and waits until it is closed.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One short request through the VIP from the calling thread's namespace:
/// the name of the backend that answered, or an error.
pub fn ask_vip(timeout: std::time::Duration) -> Result<String> {
    use std::io::BufRead as _;
    let vip: std::net::SocketAddr = "198.18.0.100:8080".parse().expect("literal");
    let s = std::net::TcpStream::connect_timeout(&vip, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        bail!("connection closed without an answer");
    }
    Ok(line.trim().to_string())
}

/// Pins the calling thread to CPU `cpu`: BPF_PROG_TEST_RUN runs the
/// program on the CPU that calls it, as veth and generic XDP run it on the
/// sender's.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}"
        );
        assert_eq!(libc::sched_getcpu(), cpu as i32, "running on CPU {cpu}");
    }
}
