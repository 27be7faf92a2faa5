"""Compile every Triton kernel to sm_90 machine code on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts code the real compiler rejects, so CI also
compiles each kernel for Hopper with `triton.compile` over a grid of the constexpr
configurations the wrappers can launch: every dtype, the power-of-two blocks that the
supported widths (d <= 256) and theme counts (K <= 64) map to, and every boolean switch.

Each compiled kernel's Triton IR is also checked for 32-bit address arithmetic
(`narrow_address_products`): a row index times a width overflows int32 once a tensor passes
2^31 elements (4 GB in fp16), far below what the GPUs hold, so every product that feeds an
address must be computed in 64 bits.

Each configuration is compiled as a launch on aligned tensors gets it (pointers and widths
divisible by 16: what decides vector loads and so the registers), and `ptxas -v` judges it: no
spill to local memory unless the kernel's module lists it in SPILLS_ALLOWED, and at least the
resident warps per SM its module declares in MIN_WARPS_PER_SM. The variant any launch can get
(no alignment known) is compiled once per kernel and dtype (every one with --every-unaligned).

    python -m tools.compile_check [--jobs N] [--list] [--kernel NAME] [--resources] [--every-unaligned]

Must run with TRITON_INTERPRET unset (the tests start it in a subprocess).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

from tools.compile_configs import KERNEL_MODULES, LAUNCH_OPTIONS, Config, all_configs

def _kernels():
    # Modules by path: the package re-exports functions under the same names.
    modules = [importlib.import_module(f"mos_kernels.{name}") for name in KERNEL_MODULES]
    # A launched kernel is defined in its module (not imported) and reads its program id (directly
    # or through a helper); @triton.jit helpers are compiled inside the kernels that call them.
    return {name: fn for m in modules for name, fn in vars(m).items()
            if type(fn).__name__ == "JITFunction" and fn.fn.__module__ == m.__name__
            and ("program_id" in fn.src or "session_block(" in fn.src)}


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = ([\w.]+) (.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_LOC = re.compile(r"^(#loc\d*) = loc\((.*)\)$")


def _source_line(loc: str, locs: Dict[str, str], seen=None) -> str:
    """'file.py:123' for a #loc reference of the IR: a file location, or the first one found
    through named and call-site locations (an inlined helper's own location may be unknown)."""
    seen = set() if seen is None else seen
    if loc in seen:
        return "?"
    seen.add(loc)
    text = locs.get(loc, "")
    found = re.match(r'"([^"]+)":(\d+):\d+', text)
    if found:
        return f"{os.path.basename(found.group(1))}:{found.group(2)}"
    for inner in re.findall(r"#loc\d*", text):
        where = _source_line(inner, locs, seen)
        if where != "?":
            return where
    return "?"


def narrow_address_products(ttir: str) -> List[str]:
    """The 32-bit multiplications (muli / shli on i32) that an address offset is computed from.

    Walks back from the offset of every `tt.addptr` through the values it is computed from,
    stopping at loads (a loaded index is data; its own address is checked where it is loaded)
    and comparisons (masks). Returns one 'source-line: operation' entry per product found."""
    defs, locs = {}, {}
    for line in ttir.splitlines():
        loc = _LOC.match(line.strip())
        if loc:
            locs[loc.group(1)] = loc.group(2)
            continue
        found = _DEF.match(line)
        if found:
            name, op, rest = found.groups()
            defs[name] = (op, rest)
    narrow, seen = [], set()
    stack = [_VALUE.findall(rest.split(" : ")[0])[1] for op, rest in defs.values() if op == "tt.addptr"]
    while stack:
        name = stack.pop()
        if name in seen or name not in defs:   # a function or loop argument: nothing to walk
            continue
        seen.add(name)
        op, rest = defs[name]
        if op in ("tt.load", "arith.cmpi"):
            continue
        operands, _, tail = rest.partition(" : ")
        if op in ("arith.muli", "arith.shli") and re.match(r"(i32|tensor<[\dx]*xi32>)", tail):
            where = re.search(r"loc\((#loc\d*)\)", tail)
            narrow.append(f"{_source_line(where.group(1), locs) if where else '?'}: {op} {operands.strip()} : i32")
        stack.extend(_VALUE.findall(operands))
    return sorted(set(narrow))


# Hopper (compute capability 9.0, H100 and H200 alike): what one SM holds.
SM90_REGISTERS = 65536        # 32-bit registers per SM, in four quarters of 16384
SM90_REGISTER_UNIT = 256      # registers are allocated to a warp in units of 256 (8 per thread)
SM90_WARPS = 64
SM90_PROGRAMS = 32
SM90_SHARED = 233472          # bytes per SM; every resident program also reserves 1 KB
SM90_SHARED_RESERVED = 1024

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Resident programs per SM on compute capability 9.0, the least of the register, shared-memory,
    warp and program limits (the CUDA occupancy calculator's rules)."""
    per_warp = -(-registers * 32 // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    warps_by_registers = 4 * ((SM90_REGISTERS // 4) // per_warp) if per_warp else SM90_WARPS
    by_shared = SM90_SHARED // (shared + SM90_SHARED_RESERVED) if shared else SM90_PROGRAMS
    return min(warps_by_registers // num_warps, SM90_WARPS // num_warps, by_shared, SM90_PROGRAMS)


def ptxas_resources(ptx: str, ptxas: str) -> Dict[str, int]:
    """Registers, spill bytes and stack of one kernel's PTX, from `ptxas -v` (what Triton's own
    compile step runs without -v)."""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o", os.path.join(folder, "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    found = [_PTXAS_REGS.search(report), _PTXAS_SPILLS.search(report), _PTXAS_STACK.search(report)]
    if done.returncode or not all(found):
        raise RuntimeError(f"ptxas -v: no resource report (exit {done.returncode}): {report.strip()[:300]}")
    regs, spills, stack = found
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack": int(stack.group(1))}


def _ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


# Integer arguments that are row widths or strides: a launch at the usual widths (multiples of 16)
# specialises them as divisible by 16, as it does every pointer to a fresh 16-byte aligned tensor.
WIDTH_ARGS = frozenset({"dim", "k_dim", "n_dim", "head_dim", "stride_a", "stride_g", "stride_out", "stride_q",
                        "stride_k", "stride_v", "width"})


def _aligned(fn, signature: Dict[str, str]) -> Dict[Tuple[int, ...], list]:
    """The `tt.divisibility` attributes a launch gives aligned pointers and widths: what lets the
    compiler use 16-byte vector loads, so the registers it needs differ from the unaligned variant."""
    return {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
            if signature[arg].startswith("*") or (arg in WIDTH_ARGS and signature[arg] == "i32")}


def compile_one(config: Config, aligned: bool = False) -> Tuple[str, float, str, Dict[str, int]]:
    """(kernel name, seconds, error or '', resources): registers, spill bytes, stack, shared bytes,
    warps and programs per SM of the compiled kernel (empty when it did not compile). aligned:
    compile the variant a launch on aligned tensors at widths divisible by 16 gets (`_aligned`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs = config
    fn = _kernels()[name]
    # num_warps / num_stages travel with the constexprs but are launch options, not arguments.
    options = {key: constexprs[key] for key in LAUNCH_OPTIONS if key in constexprs}
    constexprs = {key: value for key, value in constexprs.items() if key not in options}
    signature = dict(signature)
    for key in constexprs:
        signature[key] = "constexpr"
    missing = [arg for arg in fn.arg_names if arg not in signature]
    if missing or len(signature) != len(fn.arg_names):
        return name, 0.0, f"signature does not match the kernel's arguments: missing {missing}, given {sorted(signature)}", {}
    signature = {arg: signature[arg] for arg in fn.arg_names}   # in the kernel's argument order
    start = time.perf_counter()
    try:
        attrs = _aligned(fn, signature) if aligned else None
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        if "cubin" not in compiled.asm:
            return name, time.perf_counter() - start, "no cubin produced", {}
        narrow = narrow_address_products(compiled.asm["ttir"])
        resources = ptxas_resources(compiled.asm["ptx"], _ptxas_path())
        warps = compiled.metadata.num_warps
        resources.update(shared=compiled.metadata.shared, num_warps=warps,
                         programs_per_sm=programs_per_sm(resources["registers"], compiled.metadata.shared, warps))
        error = f"32-bit address arithmetic at {'; '.join(narrow)}" if narrow else ""
        return name, time.perf_counter() - start, error, resources
    except Exception as exc:  # report every failing configuration, not just the first
        return name, time.perf_counter() - start, f"{type(exc).__name__}: {exc}".splitlines()[0][:300], {}


def declared(attribute: str):
    """The union of what the kernel modules declare beside their kernels under `attribute`:
    MIN_WARPS_PER_SM {kernel: floor} and SPILLS_ALLOWED {(kernel, dtype, width block): why}."""
    found = {}
    for module_name in KERNEL_MODULES:
        found.update(getattr(importlib.import_module(f"mos_kernels.{module_name}"), attribute, {}))
    return found


def spill_key(name: str, signature: Dict[str, str], constexprs: Dict[str, object]) -> Tuple[str, str, object]:
    """(kernel, value dtype, width block): how SPILLS_ALLOWED names configurations."""
    dtype = next((t for t in signature.values() if t[:2] in ("*f", "*b")), "*int")[1:]
    return name, dtype, constexprs.get("BLOCK_D", constexprs.get("BLOCK_DH"))


def resource_errors(name: str, resources: Dict[str, int], floors: Dict[str, int],
                    spill_allowed: bool = False) -> List[str]:
    """Why a compiled configuration fails the resource check: a spill to local memory (every one is
    a round trip through L1/L2 inside the hot loop) unless declared in SPILLS_ALLOWED, or fewer
    resident warps per SM (programs per SM x warps per program, what hides DRAM latency) than its
    kernel's floor."""
    errors = []
    if (resources["spill_stores"] or resources["spill_loads"]) and not spill_allowed:
        errors.append(f"spills {resources['spill_stores']} B stores / {resources['spill_loads']} B loads "
                      f"at {resources['registers']} registers")
    warps = resources["programs_per_sm"] * resources["num_warps"]
    if name not in floors:
        errors.append("no MIN_WARPS_PER_SM entry beside the kernel")
    elif warps < floors[name]:
        errors.append(f"{warps} resident warps per SM ({resources['programs_per_sm']} programs of "
                      f"{resources['num_warps']} warps: {resources['registers']} registers, {resources['shared']} B "
                      f"shared), floor {floors[name]}")
    return errors


def judge(configs, aligned, plain, *, show_resources=False):
    """[(kernel, constexprs, error)]: every failure of the compiled configurations. aligned: each
    configuration's compile_one(aligned=True) result, in order; plain: the unaligned variants'
    errors by repr(configuration). Judged against the kernels' MIN_WARPS_PER_SM and SPILLS_ALLOWED."""
    floors, spills_allowed = declared("MIN_WARPS_PER_SM"), declared("SPILLS_ALLOWED")
    failures, spilled = [], set()
    for (name, signature, constexprs), (_, _, aligned_error, resources) in zip(configs, aligned):
        errors = [aligned_error] if aligned_error else []
        error = plain.get(repr((name, signature, constexprs)), "")
        if error and error != aligned_error:
            errors.append(f"unaligned variant: {error}")
        if resources:
            key = spill_key(name, signature, constexprs)
            if resources["spill_stores"] or resources["spill_loads"]:
                spilled.add(key)
            errors += resource_errors(name, resources, floors, key in spills_allowed)
            if show_resources:
                print(f"{name} {key[1]} {constexprs}: {resources['registers']} regs, {resources['spill_stores']}/"
                      f"{resources['spill_loads']} B spilled, {resources['shared']} B shared, "
                      f"{resources['num_warps']} warps, {resources['programs_per_sm']} programs/SM")
        failures += [(name, constexprs, e) for e in errors]
    compiled = {spill_key(*config) for config in configs}
    # The allowance stays exact: a listed configuration that no longer spills must leave the list.
    failures += [(key[0], {"dtype": key[1], "width": key[2]}, "in SPILLS_ALLOWED but compiles without spilling")
                 for key in sorted(set(spills_allowed) & compiled - spilled, key=repr)]
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--kernel", action="append", default=[], help="only this kernel (repeatable)")
    parser.add_argument("--resources", action="store_true", help="print every configuration's registers, "
                        "spills, shared memory and programs per SM")
    parser.add_argument("--every-unaligned", action="store_true", help="compile the unaligned variant of every "
                        "configuration, not one per kernel and dtype")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: TRITON_INTERPRET=1 is set; unset it to compile for the GPU", file=sys.stderr)
        return 2
    configs = all_configs()
    names = sorted({c[0] for c in configs})
    missing = sorted(set(_kernels()) - set(names))
    if missing:
        print(f"compile_check: kernels without a configuration: {missing}", file=sys.stderr)
        return 1
    unknown = sorted(set(args.kernel) - set(names))
    if unknown:
        print(f"compile_check: --kernel: expected one of {names}, got {unknown}", file=sys.stderr)
        return 2
    if args.kernel:
        configs = [c for c in configs if c[0] in args.kernel]
        names = sorted(set(args.kernel))
    if args.list:
        for name, _, constexprs in configs:
            print(name, constexprs)
        return 0
    start = time.perf_counter()
    # Every configuration as launched on aligned tensors at widths divisible by 16 (the usual case,
    # whose registers, spills and occupancy are judged), and the variant any launch can get
    # (unaligned pointers, odd widths) for the last configuration of each kernel and dtype, every
    # switch on: the two lower the same operations, so one each shows the generic lowering
    # compiles, at half the time of compiling every configuration twice.
    unaligned = configs if args.every_unaligned else list(
        {spill_key(*config)[:2]: config for config in configs}.values())
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        aligned = list(pool.map(functools.partial(compile_one, aligned=True), configs))
        plain = {repr(config): result[2] for config, result in zip(unaligned, pool.map(compile_one, unaligned))}
    failures = judge(configs, aligned, plain, show_resources=args.resources)
    for name, constexprs, error in failures:
        print(f"FAIL {name} {constexprs}: {error}", file=sys.stderr)
    failed = len({repr(f[:2]) for f in failures})
    print(f"compile_check: {len(configs) - failed}/{len(configs)} configurations of {len(names)} kernels "
          f"compiled to sm_90 in {time.perf_counter() - start:.1f}s, without spills and above their "
          f"occupancy floors")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
