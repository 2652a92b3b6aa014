//! The only module that touches aya's program and link APIs: it loads the
//! embedded datapath object, sizes its maps, and attaches programs.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};

/// The compiled datapath object (all XDP programs and maps).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Load-time sizing of the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries in the connection table (LRU).
    pub flow_table_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
        }
    }
}

/// Loads the object and verifies every program in it.
pub fn load(opts: &LoadOptions) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(lb_common::MAP_FLOWS, opts.flow_table_size)
        .load(EBPF_OBJECT)
        .context(
            "loading the datapath object into the kernel failed (are you root, with BPF enabled?)",
        )?;
    for name in [
        lb_common::PROG_BALANCER,
        lb_common::PROG_DECAP,
        lb_common::PROG_PASS,
        lb_common::PROG_FLOOR_DROP,
        lb_common::PROG_FLOOR_TX,
        lb_common::PROG_BENCH_IPIP,
    ] {
        xdp_program(&mut ebpf, name)?
            .load()
            .with_context(|| format!("the kernel verifier rejected XDP program `{name}`"))?;
    }
    Ok(ebpf)
}

/// The XDP program `name` of a loaded object.
pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program `{name}` is missing from the datapath object"))?;
    prog.try_into()
        .with_context(|| format!("program `{name}` is not an XDP program"))
}

/// How to attach: `native` (driver), `skb` (generic), or `auto` (native,
/// falling back to skb with a message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Skb,
    Auto,
}

/// Attaches program `name` to `iface`. Returns the mode actually used.
pub fn attach(ebpf: &mut Ebpf, name: &str, iface: &str, mode: AttachMode) -> Result<AttachMode> {
    let prog = xdp_program(ebpf, name)?;
    match mode {
        AttachMode::Native => {
            prog.attach(iface, XdpMode::Driver).with_context(|| {
                format!(
                    "attaching `{name}` to {iface} in native mode failed - try xdp_mode = \"skb\""
                )
            })?;
            Ok(AttachMode::Native)
        }
        AttachMode::Skb => {
            prog.attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching `{name}` to {iface} in skb mode failed"))?;
            Ok(AttachMode::Skb)
        }
        AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(_) => Ok(AttachMode::Native),
            Err(e) => {
                eprintln!("native XDP on {iface} failed ({e}); falling back to generic (skb) mode");
                prog.attach(iface, XdpMode::Skb).with_context(|| {
                    format!("attaching `{name}` to {iface} failed in both modes")
                })?;
                Ok(AttachMode::Skb)
            }
        },
    }
}
