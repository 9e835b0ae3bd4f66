"""Launch configurations per kernel and GPU architecture.

Chosen so that, compiled ahead of time (``python -m tuna_kernels.devtools.report``), every kernel runs without
register spills, fits the shared memory of the card (99 KB per block on sm_86 / sm_89, the consumer
RTX 30xx / 40xx cards; 163 KB on sm_80; 227 KB on sm_90) and uses tensor-core MMA for bf16 / fp16.
The report checks each of these; a test asserts them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

KERNELS = ("lse_forward", "backward_atomic", "backward_ordered")
ARCHS = (80, 86, 89, 90)


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        return f"N{self.block_n}_V{self.block_v}_D{self.block_d}_w{self.num_warps}_s{self.num_stages}"


# Ampere-class cards (sm_80 A100, sm_86 RTX 30xx, sm_89 RTX 40xx / L4): 99 KB of shared memory is the
# binding limit on the consumer parts, so one table serves all three.
_AMPERE = {
    "lse_forward": KernelConfig(64, 128, 64, 8, 3),
    "backward_atomic": KernelConfig(64, 128, 32, 8, 2),
    "backward_ordered": KernelConfig(64, 128, 32, 8, 2),
}
# A100 (sm_80) has 163 KB of shared memory per block: its forward takes 128-token tiles, halving the
# weight's L2 re-reads against the 64-token tile (229 registers, 32 KB, no spills in the report).
_A100 = dict(_AMPERE, lse_forward=KernelConfig(128, 128, 32, 8, 3))
# Hopper (sm_90): larger tiles, more shared memory.
_HOPPER = {
    "lse_forward": KernelConfig(128, 128, 64, 8, 3),
    "backward_atomic": KernelConfig(64, 128, 64, 8, 2),
    "backward_ordered": KernelConfig(64, 128, 64, 8, 2),
}
# fp32 inputs with torch's default matmul precision run tl.dot as IEEE FMAs in registers, not tensor cores:
# the 16-bit tiles spill there (224 to 7152 bytes in the report), so fp32 has smaller tiles of its own,
# one table for every architecture (all four compile spill-free; see the report).
_FP32 = {
    "lse_forward": KernelConfig(64, 64, 32, 4, 2),
    "backward_atomic": KernelConfig(32, 32, 32, 4, 2),
    "backward_ordered": KernelConfig(32, 32, 32, 4, 2),
}
# Resident blocks per SM each kernel's configurations must reach on every architecture and dtype (the
# report computes them from registers, shared memory and threads; its test asserts these minima).
MIN_BLOCKS_PER_SM = {"lse_forward": 1, "backward_atomic": 1, "backward_ordered": 1}
# Under TRITON_INTERPRET=1 tiles are small so that test shapes span several tiles in every direction.
INTERPRETER = KernelConfig(16, 32, 32, 1, 1)

# What autotuning (off by default) may choose from, after the default: larger token tiles re-use each
# weight tile more when N is large, smaller ones keep more programs busy when N is small, deeper
# pipelines hide latency when D is large. Each was compiled for its architectures and kept only when
# free of spills, within shared memory and with MMA; the report and its test check all of them.
_AMPERE_ALTERNATIVES = {
    "lse_forward": (KernelConfig(128, 128, 32, 8, 3), KernelConfig(32, 128, 64, 4, 3),
                    KernelConfig(64, 128, 128, 8, 2)),
    # 64 x 64 with 4 warps: 182 registers, 2 resident blocks per SM on sm_86 (the default: 1 block of 8 warps)
    "backward_atomic": (KernelConfig(128, 128, 32, 8, 2), KernelConfig(128, 64, 64, 8, 2),
                        KernelConfig(64, 64, 32, 4, 2)),
    # 64 x 64 with 4 warps: 168 registers, 3 resident blocks per SM (64 x 128 x 64 reached 255 registers)
    "backward_ordered": (KernelConfig(64, 64, 32, 4, 2),),
}
_HOPPER_ALTERNATIVES = {
    "lse_forward": (KernelConfig(64, 128, 64, 8, 3), KernelConfig(64, 256, 64, 8, 3),
                    KernelConfig(128, 128, 32, 8, 3)),
    "backward_atomic": (KernelConfig(128, 128, 64, 8, 3), KernelConfig(128, 64, 64, 8, 2)),
    "backward_ordered": (KernelConfig(128, 128, 64, 8, 2), KernelConfig(64, 128, 64, 8, 3)),
}
# The interpreter's pair lets the tests exercise autotuning (its trials and its cache) on CPU.
_INTERPRETER_ALTERNATIVE = KernelConfig(32, 16, 16, 1, 1)

_override: Optional[KernelConfig] = None


def default_config(kernel: str, arch: int, dtype: str = "bf16") -> KernelConfig:
    """The configuration ``kernel`` launches with on compute capability ``arch`` (e.g. 86) for inputs of
    ``dtype`` ("bf16", "fp16" or "fp32")."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNELS}")
    if dtype == "fp32":
        return _FP32[kernel]
    table = _HOPPER if arch >= 90 else _A100 if arch == 80 else _AMPERE
    return table[kernel]


def candidate_configs(kernel: str, arch: Optional[int], dtype: str = "bf16") -> Tuple[KernelConfig, ...]:
    """The configurations autotuning times for ``kernel`` on ``arch`` (None: the interpreter), default first.
    fp32 has its default only."""
    if arch is None:
        return (INTERPRETER, _INTERPRETER_ALTERNATIVE)
    if dtype == "fp32":
        return (default_config(kernel, arch, dtype),)
    default = default_config(kernel, arch, dtype)
    alternatives = (_HOPPER_ALTERNATIVES if arch >= 90 else _AMPERE_ALTERNATIVES)[kernel]
    return (default,) + tuple(config for config in alternatives if config != default)


def dtype_name(dtype) -> str:
    """"bf16" / "fp16" / "fp32" for a torch dtype (the keys of the tables)."""
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


def launch_config(kernel: str, capability: Optional[Tuple[int, int]], dtype: str = "bf16") -> KernelConfig:
    """The configuration for a launch: an override if set, the interpreter's, or the architecture's."""
    if _override is not None:
        return _override
    if capability is None or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER
    return default_config(kernel, capability[0] * 10 + capability[1], dtype)


def config_overridden() -> bool:
    """Whether :func:`override_config` is in force (it wins over autotuning too)."""
    return _override is not None


@contextlib.contextmanager
def override_config(config: KernelConfig) -> Iterator[None]:
    """Launch every kernel with ``config`` inside the block (tests and tuning)."""
    global _override
    previous, _override = _override, config
    try:
        yield
    finally:
        _override = previous
