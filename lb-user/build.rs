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
    git_commit(root);
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to lb-ebpf")?;
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    // The nested cargo's progress ("Compiling proc-macro2 ..."), which
    // aya-build relays line by line as cargo warnings, stays quiet; its
    // real diagnostics (compiler warnings and errors) still come through.
    // SAFETY: set before any thread of this build script starts.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("building the eBPF datapath failed; run `cargo xtask setup` to install bpf-linker and the nightly's rust-src")
}

/// `LB_GIT_COMMIT` for `lb --version` and `lb status`: the commit the binary
/// is built from, "+changes" when the tree differed from it, "unknown"
/// outside a git checkout (a source tarball).
fn git_commit(root: &std::path::Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{c}+changes") } else { c }
        }
        None => "unknown".into(),
    };
    println!("cargo::rustc-env=LB_GIT_COMMIT={commit}");
    // A new commit (HEAD moves, or the branch it names does) rebuilds it.
    for f in [".git/HEAD", ".git/refs/heads", ".git/index"] {
        let p = root.join(f);
        if p.exists() {
            println!("cargo::rerun-if-changed={}", p.display());
        }
    }
}
