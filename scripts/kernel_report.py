#!/usr/bin/env python3
"""The static kernel report: per kernel of kernels/*.cu, what ptxas and the
sm_90 SASS say about it (registers, spills, stack, shared memory, the
occupancy its registers allow, global loads and stores by width, MUFU,
barriers, shuffles, asynchronous copies, tensor-core instructions), and the
rules CI enforces. Called by scripts/kernel-report.sh with a folder holding
<file>.sass and <file>.ptxas for each kernel file.

Counts are static: instructions in the machine code, not executed ones. A
loop body counts once, so "MUFU 2" means two special-function instructions
in the code, which may run once per element or once per row.
"""
import json
import os
import re
import sys
from pathlib import Path

# sm_90: 64 Ki 32-bit registers and 64 warps per SM; registers are
# allocated per warp in units of 256.
REGS_PER_SM, MAX_WARPS, REG_UNIT = 65536, 64, 256

# What kernels are written to load wide, as (name pattern, bits, at least
# this many such global loads in the code, why). A kernel matching a
# pattern fails the check when its SASS has fewer loads of that width or
# wider: the compiler (or an edit) made the vector path scalar. The scalar
# heads and tails that handle misaligned ends are allowed beside them.
INTENDED = [
    (r"^sym_kl_\w+_vw_(warp|block)$", 128, 2, "a and b read in 16-byte packs"),
    (r"^dropout_f32$", 128, 1, "x read 4 elements at a time when aligned"),
    (r"^(mixout|dropout_add)_f32$", 128, 2, "both inputs read 4 elements at a time when aligned"),
    (r"^dropout_(bf16|f16)$", 128, 1, "8 elements (16 bytes) at a time when aligned"),
    (r"^(mixout|dropout_add)_(bf16|f16)$", 128, 2, "8 elements (16 bytes) at a time when aligned"),
    (r"^layer_norm_fwd_\w+$", 128, 3, "x, w and b read in 16-byte packs when aligned"),
    (r"^layer_norm_bwd_dx_\w+$", 128, 3, "x, dy and w read in 16-byte packs when aligned"),
    (r"^layer_norm_bwd_wb_\w+$", 128, 1, "the row statistics read x in 16-byte packs when aligned"),
    (r"^perturb_token_\w+$", 128, 2, "delta and g read in 16-byte packs by a warp per token"),
]

# The same for global stores: (pattern, bits, stores of at least that width).
INTENDED_STORES = [
    (r"^(dropout|mixout|dropout_add)_(f32|bf16|f16)$", 128, 1, "16 bytes of output per thread when aligned"),
    (r"^perturb_noise_\w+$", 128, 1, "16 bytes of noise per thread when H is a multiple of them"),
    (r"^perturb_token_\w+$", 128, 1, "the stepped row written in 16-byte packs"),
]

# Spill limits in bytes: the adapter's r in (128, 256] kernels (nf16) hold
# 128 f32 accumulators per thread; every other kernel at most 8 (one 64-bit
# value stored outside an inner loop), but for those named here.
SPILL_ALLOWED = [
    (r"^sym_kl_(bf16|f16)_vw_block$", 16,
     "__launch_bounds__(1024) caps registers at 64 and the half-precision 16-byte path needs "
     "a few more; the row-kernel rewrite (a warp or a few per row) removes the 1024-thread block"),
    (r"_nf16_", 64, "128 f32 accumulators per thread (r in (128, 256])"),
]


def spill_limit(name):
    for pat, limit, _ in SPILL_ALLOWED:
        if re.search(pat, name):
            return limit
    return 8


def parse_ptxas(text):
    # "Compiling entry function 'K'" opens a kernel's block; "Function
    # properties for F" names whose stack and spills the next line gives (a
    # kernel's, or a device function's that was not inlined, which must not
    # overwrite the kernel's).
    info, fn, props = {}, None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            fn = props = m.group(1)
            info[fn] = {"regs": 0, "spill": 0, "stack": 0, "smem": 0, "barriers": 0}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
            continue
        if not fn:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props == fn:
            info[fn]["stack"] = int(m.group(1))
            info[fn]["spill"] = max(int(m.group(2)), int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[fn]["regs"] = int(m.group(1))
        m = re.search(r"used (\d+) barriers", line)
        if m:
            info[fn]["barriers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            info[fn]["smem"] = int(m.group(1))
    return info


def width(op):
    """Bits of a global load/store opcode (LDG.E.128 -> 128, LDG.E -> 32)."""
    for w in ("128", "64", "U16", "S16", "U8", "S8"):
        if f".{w}" in op:
            return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[w]
    return 32


def parse_sass(text):
    out, fn = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            out[fn] = {"ldg": {}, "stg": {}, "mufu": 0, "bar": 0, "shfl": 0, "hmma": 0, "ldgsts": 0, "ldgsts_bits": {}, "atom": 0}
            continue
        if not fn:
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op, k = m.group(1), out[fn]
        if op.startswith("LDGDEPBAR"):
            k["bar"] += 1
        elif op.startswith("LDGSTS"):
            k["ldgsts"] += 1
            w = width(op)
            k["ldgsts_bits"][w] = k["ldgsts_bits"].get(w, 0) + 1
        # Global loads and stores, and generic ones (LD/ST: through a
        # pointer the compiler cannot place, such as an address from a
        # table, which at run time is global memory here).
        elif op.startswith("LDG") or op == "LD" or op.startswith("LD."):
            w = width(op)
            k["ldg"][w] = k["ldg"].get(w, 0) + 1
        elif op.startswith("STG") or op == "ST" or op.startswith("ST."):
            w = width(op)
            k["stg"][w] = k["stg"].get(w, 0) + 1
        elif op.startswith("MUFU"):
            k["mufu"] += 1
        elif op.startswith("BAR"):
            k["bar"] += 1
        elif op.startswith("SHFL"):
            k["shfl"] += 1
        elif op.startswith("HMMA"):
            k["hmma"] += 1
        elif op.startswith(("ATOM", "RED")) and not op.startswith("REDUX"):
            k["atom"] += 1
    return out


def occupancy(regs):
    """Percent of the SM's 64 warps that its registers allow (block size
    and shared memory may allow fewer)."""
    if regs == 0:
        return 100
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    return round(100 * min(MAX_WARPS, REGS_PER_SM // per_warp) / MAX_WARPS)


def rules(name, k):
    bad = []
    if k["spill"] > spill_limit(name):
        bad.append(f"{name}: {k['spill']} bytes of spills (limit {spill_limit(name)})")
    if name.startswith("adapter_") and not name.startswith("adapter_cast"):
        half = "_bf16_" in name or "_f16_" in name
        if half and k["hmma"] == 0:
            bad.append(f"{name}: no HMMA (tensor cores unused)")
        if not half and k["hmma"] > 0:
            bad.append(f"{name}: HMMA in an f32 kernel")
    for pat, bits, count, why in INTENDED:
        if re.search(pat, name):
            wide = sum(n for w, n in k["ldg"].items() if w >= bits)
            wide += sum(n for w, n in k.get("ldgsts_bits", {}).items() if w >= bits)
            if wide < count:
                bad.append(
                    f"{name}: written to load {bits} bits at a time ({why}); the SASS has "
                    f"{wide} such loads of at least {count} (global loads by bits: {k['ldg']})"
                )
    for pat, bits, count, why in INTENDED_STORES:
        if re.search(pat, name):
            wide = sum(n for w, n in k["stg"].items() if w >= bits)
            if wide < count:
                bad.append(
                    f"{name}: written to store {bits} bits at a time ({why}); the SASS has "
                    f"{wide} such stores of at least {count} (global stores by bits: {k['stg']})"
                )
    return bad


def main():
    folder, out = Path(sys.argv[1]), sys.argv[2]
    check = "--check" in sys.argv
    kernels = {}
    for ptxas in sorted(folder.glob("*.ptxas")):
        stem = ptxas.stem
        info = parse_ptxas(ptxas.read_text())
        sass = parse_sass((folder / f"{stem}.sass").read_text())
        for name in sorted(sass):
            k = {"file": f"kernels/{stem}.cu", **info.get(name, {}), **sass[name]}
            k["occupancy_pct"] = occupancy(k.get("regs", 0))
            kernels[name] = k
    if not kernels:
        print("kernel-report: no kernels found in the SASS")
        sys.exit(1)
    # Every pattern matches a kernel, so no rule checks nothing; and the
    # width rule fires on a kernel of scalar loads.
    for pat, *_ in INTENDED + INTENDED_STORES + SPILL_ALLOWED:
        if not any(re.search(pat, n) for n in kernels):
            print(f"kernel-report: the pattern {pat} matches no kernel")
            sys.exit(1)
    for dt in ("_bf16_", "_f16_", "_f32_"):
        if not any(n.startswith("adapter_") and not n.startswith("adapter_cast") and dt in n for n in kernels):
            print(f"kernel-report: no adapter product kernel with {dt} in its name: the tensor-core rule would check nothing")
            sys.exit(1)
    assert rules("sym_kl_f32_vw_warp", {"spill": 0, "hmma": 0, "ldgsts": 0, "ldg": {32: 9}, "stg": {}}), \
        "the width rule did not fire on scalar loads"
    assert rules("perturb_noise_bf16", {"spill": 0, "hmma": 0, "ldgsts": 0, "ldg": {}, "stg": {16: 8}}), \
        "the store width rule did not fire on scalar stores"

    hdr = f"{'kernel':44s} {'regs':>4} {'occ%':>4} {'spill':>5} {'stack':>5} {'smem':>6} {'LDG 128/64/32/<32':>18} {'STG 128/64/32/<32':>18} {'MUFU':>4} {'BAR':>3} {'SHFL':>4} {'HMMA':>4} {'cp.async':>8}"
    print(hdr)
    bad = []
    by_file = {}
    for name, k in kernels.items():
        def w4(d):
            return "/".join(str(x) for x in (d.get(128, 0), d.get(64, 0), d.get(32, 0), sum(n for w, n in d.items() if w < 32)))
        print(f"{name[:44]:44s} {k.get('regs', 0):4d} {k['occupancy_pct']:4d} {k.get('spill', 0):5d} {k.get('stack', 0):5d} {k.get('smem', 0):6d} {w4(k['ldg']):>18} {w4(k['stg']):>18} {k['mufu']:4d} {k['bar']:3d} {k['shfl']:4d} {k['hmma']:4d} {k['ldgsts']:8d}")
        bad += rules(name, k)
        f = by_file.setdefault(k["file"], {"kernels": 0, "ldg_bits": {}})
        f["kernels"] += 1
        for w, n in k["ldg"].items():
            f["ldg_bits"][w] = f["ldg_bits"].get(w, 0) + n
    print()
    for f, v in sorted(by_file.items()):
        total = sum(v["ldg_bits"].values())
        wide = v["ldg_bits"].get(128, 0)
        print(f"{f}: {v['kernels']} kernels, {total} global (or generic) loads in the code, {100 * wide / max(total, 1):.0f} % of them 16 bytes wide")
    json.dump(
        {
            "arch": "sm_90",
            "stamp": os.environ.get("KERNEL_REPORT_STAMP", ""),
            "note": "static counts from ptxas -v and cuobjdump -sass; occupancy_pct: the share of the SM's 64 warps the registers allow",
            "kernels": {n: {**k, "ldg": {str(w): c for w, c in k["ldg"].items()}, "stg": {str(w): c for w, c in k["stg"].items()}} for n, k in kernels.items()},
        },
        open(out, "w"),
        indent=1,
        sort_keys=True,
    )
    print(f"kernel-report: {len(kernels)} kernels, written to {out}")
    if bad:
        print("kernel-report FAILED:\n  " + "\n  ".join(bad))
        sys.exit(1 if check else 0)
    print(
        "kernel-report: spills within limits; every bf16/f16 adapter product on tensor cores "
        "(HMMA), f32 on CUDA cores; the vector loads where kernels are written for them"
    )


main()
