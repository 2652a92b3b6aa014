//! Builds `lb-ebpf` for the BPF target with aya-build (the aya-template
//! pattern); `src/datapath/loader.rs` embeds the object with `include_bytes_aligned!`.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .context("lb-user has no parent directory")?;
    let ebpf_dir = root.join("lb-ebpf");
    let common_dir = root.join("lb-common");
    // aya-build watches lb-ebpf; the shared types live in lb-common.
    println!("cargo::rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to lb-ebpf")?;
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("building the eBPF datapath failed; run `cargo xtask setup` to install bpf-linker and the nightly's rust-src")
}
