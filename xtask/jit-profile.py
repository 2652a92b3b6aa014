#!/usr/bin/env python3
"""Where the balancer spends its time, per source line of the JIT image.

Usage (root, after `cargo test --release -p lb-tests --test micro --no-run`):

    python3 xtask/jit-profile.py "established IPv4 TCP dsr" [LINES]

It runs the micro-benchmark with LB_PROFILE=<case> (that case alternating
with the swap-MACs floor for about 8 s) under `perf record -a`, fetches the
loaded `lb_xdp` program's JIT image, line info and BTF over bpf(2) (no
bpftool needed), and prints the share of samples per source file and per
source line; target/jit-profile/annot.txt is the disassembly (objdump) with
each instruction's share and the source line it belongs to. Needs perf and
objdump (Debian: linux-perf, binutils). cpu-clock samples in a VM skid to
the instructions after a slow one: decide with `cargo xtask bench micro
--against`, not with these shares.
"""
import bisect
import collections
import ctypes
import os
import re
import struct
import subprocess
import sys
import time

SYS_BPF = 321  # x86-64
PROG_GET_NEXT_ID, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, BTF_GET_FD_BY_ID = 11, 13, 15, 19
libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def info(fd, buf):
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("IIQ", fd, len(buf), ctypes.addressof(buf)))


def find_prog(name):
    i = 0
    while True:
        try:
            b = ctypes.create_string_buffer(struct.pack("II", i, 0), 128)
            if libc.syscall(SYS_BPF, PROG_GET_NEXT_ID, b, 128) < 0:
                return None
            i = struct.unpack_from("I", b, 4)[0]
        except OSError:
            return None
        fd = bpf(PROG_GET_FD_BY_ID, struct.pack("I", i))
        ib = ctypes.create_string_buffer(256)
        info(fd, ib)
        if ib.raw[64:80].split(b"\0")[0].decode() == name:
            return fd, ib
        os.close(fd)


def dump(name, out):
    """JIT image and (address, file:line, source) per line-info record."""
    found = find_prog(name)
    if not found:
        sys.exit(f"no loaded program {name}")
    fd, ib = found
    u = lambda off: struct.unpack_from("I", ib, off)[0]
    jlen, btf_id, nli, nj, lrs, jrs = u(16), u(128), u(148), u(168), u(172), u(176)
    jit = ctypes.create_string_buffer(jlen)
    li = ctypes.create_string_buffer(nli * lrs)
    jli = ctypes.create_string_buffer(nj * jrs)
    q = ctypes.create_string_buffer(256)
    for off, fmt, val in [(16, "I", jlen), (24, "Q", ctypes.addressof(jit)), (148, "I", nli),
                          (152, "Q", ctypes.addressof(li)), (160, "Q", ctypes.addressof(jli)),
                          (168, "I", nj), (172, "I", lrs), (176, "I", jrs)]:
        struct.pack_into(fmt, q, off, val)
    info(fd, q)
    with open(os.path.join(out, "jit.bin"), "wb") as f:
        f.write(jit.raw)
    bfd = bpf(BTF_GET_FD_BY_ID, struct.pack("I", btf_id))
    bb = ctypes.create_string_buffer(32)
    info(bfd, bb)
    size = struct.unpack_from("I", bb, 8)[0]
    raw = ctypes.create_string_buffer(size)
    bb2 = ctypes.create_string_buffer(32)
    struct.pack_into("Q", bb2, 0, ctypes.addressof(raw))
    struct.pack_into("I", bb2, 8, size)
    info(bfd, bb2)
    b = raw.raw
    hdr_len, _, _, str_off, str_len = struct.unpack_from("IIIII", b, 4)
    strs = b[hdr_len + str_off: hdr_len + str_off + str_len]
    s = lambda o: strs[o:strs.index(b"\0", o)].decode(errors="replace")
    lines = []
    for k in range(min(nli, nj)):
        _, fo, lo, lc = struct.unpack_from("IIII", li, k * lrs)
        addr = struct.unpack_from("Q", jli, k * jrs)[0]
        lines.append((addr, f"{os.path.basename(s(fo))}:{lc >> 10}", s(lo).strip()[:90]))
    return lines


def main():
    case = sys.argv[1] if len(sys.argv) > 1 else "established IPv4 TCP dsr"
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(root, "target", "jit-profile")
    os.makedirs(out, exist_ok=True)
    deps = os.path.join(root, "target", "release", "deps")
    exe = max((os.path.join(deps, f) for f in os.listdir(deps)
               if f.startswith("micro-") and not f.endswith(".d")), key=os.path.getmtime)
    data = os.path.join(out, "perf.data")
    env = dict(os.environ, LB_PROFILE=case)
    p = subprocess.Popen(["perf", "record", "-a", "-e", "cpu-clock", "-F", "10000", "-o", data,
                          "--", exe, "--ignored", "--nocapture", "micro"],
                         cwd=os.path.join(root, "tests"), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)  # the program is loaded and running by now
    lines = dump("lb_xdp", out)
    text = p.communicate()[0]
    print("\n".join(l for l in text.splitlines() if l.startswith("PROFILE")))
    samples = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,symoff"],
                             capture_output=True, text=True).stdout
    addrs = sorted((a, i) for i, (a, _, _) in enumerate(lines))
    keys = [a for a, _ in addrs]
    by_line, offs, n = collections.Counter(), collections.Counter(), 0
    for l in samples.splitlines():
        f = l.split()
        if len(f) < 2 or not f[1].startswith("bpf_prog_") or "_lb_xdp" not in f[1]:
            continue
        k = bisect.bisect_right(keys, int(f[0], 16)) - 1
        if k >= 0:
            by_line[lines[addrs[k][1]][1:]] += 1
            n += 1
        if "+0x" in f[1]:
            offs[int(f[1].split("+")[1], 16)] += 1
    if not n:
        sys.exit("no samples in lb_xdp")
    by_file = collections.Counter()
    for (fl, _), v in by_line.items():
        by_file[fl.split(":")[0]] += v
    print(f"{n} samples in lb_xdp")
    for f, v in by_file.most_common():
        print(f"{100 * v / n:5.1f}% {f}")
    print()
    for (fl, src), v in by_line.most_common(top):
        print(f"{100 * v / n:5.1f}% {fl:28} {src}")
    asm = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "--no-show-raw-insn",
                          os.path.join(out, "jit.bin")], capture_output=True, text=True).stdout
    base = lines[0][0]
    at = {a - base: (fl, src) for a, fl, src in lines}
    tot = sum(offs.values()) or 1
    with open(os.path.join(out, "annot.txt"), "w") as f:
        for l in asm.splitlines():
            m = re.match(r"\s+([0-9a-f]+):\s+(.*)", l)
            if not m:
                continue
            o = int(m.group(1), 16)
            if o in at:
                f.write(f"          ---- {at[o][0]}  {at[o][1]}\n")
            f.write(f"{100 * offs.get(o, 0) / tot:5.1f} {o:6x}: {m.group(2)}\n")
    print(f"\nannotated disassembly: {os.path.join(out, 'annot.txt')}")


if __name__ == "__main__":
    main()
