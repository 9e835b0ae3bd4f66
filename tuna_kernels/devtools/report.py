"""Static GPU report: compile every kernel ahead of time for sm_80/86/89/90, no GPU needed.

    python -m tuna_kernels.devtools.report [--json] [--dtype bf16 --dtype fp16] [--arch 86] [--defaults-only]
    python -m tuna_kernels.devtools.report --roofline     # estimated times from a roofline model (tuna_kernels/devtools/roofline.py)

For each kernel, dtype, configuration (the default, then the candidates autotuning may choose) and
architecture it prints the registers per thread, spill bytes
(stack / local memory, and the STL/LDL instructions in the SASS), shared memory per block against the
card's limit, and whether tensor-core instructions (HMMA on sm_8x, HGMMA on sm_90) are present.
The cubin is read with the ``cuobjdump`` that ships inside the triton wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from ..kernels.backward_atomic import logprob_backward_atomic_kernel
from ..kernels.backward_ordered import logprob_backward_ordered_kernel
from ..kernels.configs import KERNELS, candidate_configs
from ..kernels.forward import lse_forward_kernel
from ..kernels.launch import GROUP_V
from .roofline import roofline_table

# Shared memory a block may use, per architecture (bytes).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds (CUDA programming guide, compute capability table)."""

    registers: int = 65536
    max_threads: int = 2048
    max_blocks: int = 32
    shared_bytes: int = 164 * 1024  # per SM; a block also reserves 1 KB
    register_granule: int = 256  # registers are allocated per warp in units of 256


SM_LIMITS = {
    80: SMLimits(max_threads=2048, max_blocks=32, shared_bytes=164 * 1024),
    86: SMLimits(max_threads=1536, max_blocks=16, shared_bytes=100 * 1024),
    89: SMLimits(max_threads=1536, max_blocks=24, shared_bytes=100 * 1024),
    90: SMLimits(max_threads=2048, max_blocks=32, shared_bytes=228 * 1024),
}
_RESERVED_SHARED_PER_BLOCK = 1024


def resident_blocks(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Blocks of a kernel resident on one SM at once: the least of what registers, shared memory, threads
    and the block limit allow (the occupancy calculator's rules; 0 when one block does not fit)."""
    limits = SM_LIMITS[arch]
    granule = limits.register_granule
    registers_per_warp = -(-max(registers, 1) * 32 // granule) * granule
    by_registers = (limits.registers // registers_per_warp) // num_warps
    by_shared = limits.shared_bytes // (shared_bytes + _RESERVED_SHARED_PER_BLOCK)
    by_threads = limits.max_threads // (32 * num_warps)
    return max(0, min(by_registers, by_shared, by_threads, limits.max_blocks))


@dataclass
class ReportRow:
    kernel: str
    arch: str
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    spill_instructions: int
    shared_bytes: int
    shared_limit: int
    mma: bool
    mma_instructions: int
    default: bool = True
    blocks_per_sm: int = 0
    fenced_atomics: int = 0  # GPU-scope MEMBARs in the SASS (an acq_rel atomic compiles to one each)
    atomics: int = 0  # RED / ATOM instructions
    float_atomics: int = 0  # of which on fp32 values (gradient sums)
    l1_invalidates: int = 0  # CCTL.IVALL: what an acquire compiles to (with a strong load or atomic)

    @property
    def mma_expected(self) -> bool:
        """fp32 runs IEEE FMA by default (torch's "highest" matmul precision): no tensor cores expected."""
        return self.dtype != "fp32"

    @property
    def ok(self) -> bool:
        return (self.spill_bytes == 0 and self.shared_bytes <= self.shared_limit and self.blocks_per_sm >= 1
                and (self.mma or not self.mma_expected) and self.fenced_atomics == HANDOVER_FENCES.get(self.kernel, 0))


# GPU-scope fences a kernel is built with: the deterministic backward's ticket hand-over releases once per
# vocabulary tile (its acquire compiles to a strong access + L1 invalidate, CCTL.IVALL, no MEMBAR); it adds no
# gradient with an atomic. Every other kernel: none (its atomics are relaxed).
HANDOVER_FENCES = {"backward_ordered": 1}


def _kernel_specs():
    """name -> (jit function, the launch's constexprs other than tiles)."""
    flags = {"HAS_BIAS": False, "HAS_SOFTCAP": False}
    return {
        "lse_forward": (lse_forward_kernel, {**flags, "WITH_EXPECTED": False}),
        "backward_atomic": (logprob_backward_atomic_kernel,
                            {**flags, "NEED_GRAD_HIDDEN": True, "NEED_GRAD_WEIGHT": True, "NEED_GRAD_BIAS": False,
                             "FILTER": False, "GROUP_V": GROUP_V}),
        "backward_ordered": (logprob_backward_ordered_kernel,
                             {**flags, "NEED_GRAD_HIDDEN": True, "NEED_GRAD_WEIGHT": True, "NEED_GRAD_BIAS": False,
                              "FILTER": False}),
    }


def _signature(fn, dtype: str, constexprs: Dict[str, object]):
    """Types of every argument as a real launch specialises them; unit strides become constants."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("hidden_ptr", "weight_ptr", "bias_ptr"):
            signature[name] = "*" + TRITON_DTYPES[dtype]
        elif name == "labels_ptr":
            signature[name] = "*i64"
        elif name == "tickets_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in ("logit_scale", "softcap", "filter_eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # torch allocations are 16-byte aligned and hidden sizes are multiples of 16, as a launch sees them
        if name.endswith("_ptr") or name in ("hidden_dim", "stride_hn", "stride_wv"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _cuobjdump() -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}; the triton wheel should ship it")
    return str(path)


@dataclass
class Resources:
    """What a cubin says about one compiled kernel."""

    registers: int
    spill_bytes: int
    spill_instructions: int
    shared_bytes: int
    mma_instructions: int
    fenced_atomics: int = 0
    atomics: int = 0
    float_atomics: int = 0
    l1_invalidates: int = 0


def compile_and_inspect(fn, signature: Dict[str, str], constexprs: Dict[str, object], attrs, arch: int,
                        num_warps: int, num_stages: int) -> Resources:
    """Compile a @triton.jit function ahead of time for ``sm_<arch>`` and read the cubin: registers,
    spills (stack/local bytes and STL/LDL instructions), shared memory, tensor-core instructions."""
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)],
                               check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", usage)
        return int(match.group(1)) if match else 0

    mma_pattern = r"\bHGMMA\b|\bHMMA\b" if arch >= 90 else r"\bHMMA\b"
    return Resources(
        registers=field("REG"), spill_bytes=field("STACK") + field("LOCAL"),
        spill_instructions=len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass)),
        shared_bytes=field("SHARED") + int(compiled.metadata.shared),
        mma_instructions=len(re.findall(mma_pattern, sass)),
        # an acq_rel atomic is fenced at GPU scope (MEMBAR.ALL.GPU); sm_90's MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC
        # order shared memory for the wgmma pipeline, inside the block, and are not counted
        fenced_atomics=len(re.findall(r"\bMEMBAR\.\S*(?:GPU|SYS)\b", sass)),
        atomics=len(re.findall(r"\b(?:RED|REDG|ATOM|ATOMG)\b", sass)),
        float_atomics=len(re.findall(r"\b(?:RED|REDG|ATOM|ATOMG)\.\S*F32", sass)),
        l1_invalidates=len(re.findall(r"\bCCTL\.IVALL\b", sass)),
    )


def triton_ir(kernel: str, dtype: str = "fp16", arch: int = 86) -> str:
    """The kernel's Triton IR before lowering (names kept), as a launch with runtime strides sees it."""
    fn, flags = _kernel_specs()[kernel]
    constexprs = dict(flags, BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    signature, attrs = _signature(fn, dtype, constexprs)
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({"num_warps": 1})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return str(source.make_ir(target, options, backend.get_codegen_implementation(options),
                              backend.get_module_map(), context))


def narrow_stride_uses(kernel: str):
    """(number of uses, the 32-bit ones) of the hidden-dimension strides in the kernel's IR: each use
    must widen the stride to i64 first, as cols * stride_wd passes 2^31 for a transposed [V, D] weight."""
    uses = [line.strip() for line in triton_ir(kernel).splitlines()
            if re.search(r"%stride_(hd|wd)\b", line) and not re.search(r"tt\.func|tt\.call", line)]
    narrow = [line for line in uses if not re.match(r"%\S+ = arith\.extsi %stride_(hd|wd) : i32 to i64", line)]
    return len(uses), narrow


def compile_row(kernel: str, arch: int, dtype: str, config, default: bool = True) -> ReportRow:
    """Compile one of our kernels in ``config`` for one architecture and dtype."""
    fn, flags = _kernel_specs()[kernel]
    constexprs = dict(flags, BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", stride_hd=1, stride_wd=1)
    signature, attrs = _signature(fn, dtype, constexprs)
    found = compile_and_inspect(fn, signature, constexprs, attrs, arch, config.num_warps, config.num_stages)
    return ReportRow(
        kernel=kernel, arch=f"sm_{arch}", dtype=dtype, config=config.label(), registers=found.registers,
        spill_bytes=found.spill_bytes, spill_instructions=found.spill_instructions,
        shared_bytes=found.shared_bytes, shared_limit=SHARED_LIMIT[arch],
        mma=found.mma_instructions > 0, mma_instructions=found.mma_instructions, default=default,
        blocks_per_sm=resident_blocks(arch, found.registers, found.shared_bytes, config.num_warps),
        fenced_atomics=found.fenced_atomics, atomics=found.atomics, float_atomics=found.float_atomics,
        l1_invalidates=found.l1_invalidates,
    )


def build_report(archs: Sequence[int], dtypes: Sequence[str], kernels: Optional[Sequence[str]] = None,
                 defaults_only: bool = False, jobs: int = 1) -> List[ReportRow]:
    """Rows for every configuration each kernel can launch with (its default, then its autotuning
    candidates; only the default with ``defaults_only``) on each architecture and dtype, in that order.
    ``jobs`` > 1 compiles in that many processes (each compilation is independent and CPU-bound)."""
    work = []
    for kernel in kernels or KERNELS:
        for arch in archs:
            for dtype in dtypes:
                configs = candidate_configs(kernel, arch, dtype)
                for index, config in enumerate(configs[:1] if defaults_only else configs):
                    work.append((kernel, arch, dtype, config, index == 0))
    if jobs <= 1:
        return [compile_row(*item) for item in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_item, work))


def _compile_item(item) -> ReportRow:
    return compile_row(*item)


def format_table(rows: Sequence[ReportRow]) -> str:
    header = ["kernel", "arch", "dtype", "config", "regs", "spill B", "STL/LDL", "shared KB", "limit KB", "MMA",
              "blocks/SM", "atomics (fenced)", "ok"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.kernel, row.arch, row.dtype, row.config + ("" if row.default else " (tuning)"), str(row.registers), str(row.spill_bytes),
                 str(row.spill_instructions), f"{row.shared_bytes / 1024:.1f}", f"{row.shared_limit / 1024:.0f}",
                 f"yes ({row.mma_instructions})" if row.mma else ("no" if row.mma_expected else "no (IEEE fp32)"),
                 str(row.blocks_per_sm), f"{row.atomics} ({row.fenced_atomics})", "yes" if row.ok else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuna_kernels.devtools.report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document (a list of rows)")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability, repeatable (default: 80 86 89 90)")
    parser.add_argument("--dtype", action="append", choices=sorted(TRITON_DTYPES),
                        help="input dtype, repeatable (default: all; fp32 compiles IEEE FMA, torch's default precision)")
    parser.add_argument("--kernel", action="append", help="kernel name, repeatable (default: all)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only each kernel's default configuration, not the autotuning candidates")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes (default: the CPU count)")
    parser.add_argument("--roofline", action="store_true",
                        help="print the roofline model's time estimates (a model, not a measurement) and exit")
    args = parser.parse_args(argv)
    if args.roofline:
        print("Roofline MODEL, not a measurement (see tuna_kernels/devtools/roofline.py for its assumptions):")
        print(roofline_table())
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles real GPU code")
    rows = build_report(args.arch or sorted(SHARED_LIMIT), args.dtype or ["bf16", "fp16", "fp32"], args.kernel,
                        args.defaults_only, args.jobs)
    if args.json:
        json.dump([dict(asdict(row), ok=row.ok) for row in rows], sys.stdout, indent=1)
        print()
    else:
        print(format_table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
