//! Code generation options for the BPF objects, passed to bpf-linker (which
//! runs LLVM's BPF back end when it links).
//!
//! `allows-misaligned-mem-access` (LLVM 22): a load or store whose alignment
//! LLVM cannot prove (packet headers at offsets 14, 26, 30, ...; byte arrays
//! such as addresses and MACs) is one instruction of its width instead of a
//! byte at a time with shifts: the VIP paths 3-12 % faster (A/B history,
//! 2026-12-05). The kernel allows misaligned packet and map value accesses
//! where the CPU does (x86-64, arm64: no `BPF_F_STRICT_ALIGNMENT`), but
//! never on the stack, and LLVM may now merge neighbouring stack stores into
//! one wider store at a misaligned offset: the verifier then refuses the
//! program ("misaligned stack access"). Every test loads the programs, so
//! such a build fails at once (seen with a `Packet` parsed in place).
fn main() {
    println!("cargo::rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    println!("cargo::rerun-if-changed=build.rs");
}
