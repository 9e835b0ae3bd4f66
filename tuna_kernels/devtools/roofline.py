"""A roofline model of the kernels' time on three GPUs: a model, not a measurement (no GPU here).

    python -m tuna_kernels.devtools.report --roofline

Per kernel, bf16 inputs, tile [BN tokens, BV vocabulary] (the launch's default configuration):

- one pass over N x V x D (a logit tile, or one of the backward's two products) costs
  ``flops = 2 N V D``; every tile re-reads its operands from L2: ``l2 = (N / BN) V D * 2 + (V / BV) N D * 2``
  bytes; DRAM sees each operand once (``(V + N) D * 2``), assuming concurrent tiles share L2;
- fp32 atomic adds (``RED``) of a product: ``4`` bytes per element per tile that adds it
  (grad_hidden: ``(V / BV) N D``, grad_weight: ``(N / BN) V D``), served by L2;
  Cut Cross-Entropy's locked bf16 read-modify-write: ``2 * 2`` bytes per element per tile;
- a kernel takes ``max(flops / peak, l2 / l2_bandwidth, dram / dram_bandwidth) + atomic_bytes / l2_bandwidth``.

Not modelled: latency, occupancy, wave quantisation, the softmax's exp work, Cut Cross-Entropy's gradient
filtering (which skips most backward tiles in practice), and L2 misses from concurrent tiles that do not
share operands. Peak rates are the vendors' dense bf16 tensor rates with fp32 accumulation; L2 bandwidths
are rough public estimates. Use the table to compare designs, not to predict a wall-clock time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ..kernels.configs import default_config


@dataclass(frozen=True)
class GPU:
    name: str
    arch: int
    tensor_tflops: float  # dense bf16, fp32 accumulate
    dram_tbps: float
    l2_tbps: float  # rough estimate


GPUS = (
    GPU("A100 SXM 80GB", 80, 312.0, 2.04, 5.5),
    GPU("RTX 4090", 89, 165.2, 1.01, 5.0),
    GPU("H100 SXM", 90, 989.0, 3.35, 10.0),
)
# (N tokens, V vocabulary, D hidden): Gemma-2 2B's head at 8192 tokens, Llama-3 8B's at 16384.
SHAPES = ((8192, 256000, 2304), (16384, 128256, 4096))
# Cut Cross-Entropy's default tiles (its fixed configurations, compiled in benchmarks/bench_peer_kernels.py)
CCE_FORWARD_TILE = (256, 128)
CCE_BACKWARD_TILE = (128, 128)
BYTES = 2  # bf16


def _pass(n: int, v: int, d: int, tile: Tuple[int, int]) -> Tuple[float, float, float]:
    """(flops, L2 bytes, DRAM bytes) of one N x V x D product in [BN, BV] tiles."""
    block_n, block_v = tile
    flops = 2.0 * n * v * d
    l2 = (n / block_n) * v * d * BYTES + (v / block_v) * n * d * BYTES
    dram = (v + n) * d * BYTES
    return flops, l2, dram


def _time(gpu: GPU, passes: List[Tuple[float, float, float]], atomic_bytes: float = 0.0, extra_l2: float = 0.0) -> float:
    flops = sum(p[0] for p in passes)
    l2 = sum(p[1] for p in passes) + extra_l2
    dram = sum(p[2] for p in passes)
    return max(flops / (gpu.tensor_tflops * 1e12), l2 / (gpu.l2_tbps * 1e12), dram / (gpu.dram_tbps * 1e12)) \
        + atomic_bytes / (gpu.l2_tbps * 1e12)


def estimate(gpu: GPU, n: int, v: int, d: int) -> Dict[str, float]:
    """Seconds per design and kernel for one forward + backward at (N, V, D)."""
    def tile(kernel):
        config = default_config(kernel, gpu.arch, "bf16")
        return config.block_n, config.block_v

    forward = _pass(n, v, d, tile("lse_forward"))
    back_tile = tile("backward_atomic")
    recompute = _pass(n, v, d, back_tile)
    atomics = 4.0 * ((v / back_tile[1]) * n * d + (n / back_tile[0]) * v * d)
    ours_forward = _time(gpu, [forward])
    ours_backward = _time(gpu, [recompute] * 3, atomic_bytes=atomics)
    # frozen head: the forward's second product re-reads W tiles and updates the fp32 E partial of its rows
    # once per vocabulary tile (load + store)
    f_tile = tile("lse_forward")
    expected_rmw = (v / f_tile[1]) * n * d * 4 * 2
    frozen_forward = _time(gpu, [forward, forward], extra_l2=expected_rmw)
    frozen_backward = (n * d * (BYTES + 4 + BYTES)) / (gpu.dram_tbps * 1e12)
    cce_forward = _time(gpu, [_pass(n, v, d, CCE_FORWARD_TILE)])
    cce_back = _pass(n, v, d, CCE_BACKWARD_TILE)
    cce_locked = 2.0 * BYTES * ((v / CCE_BACKWARD_TILE[1]) * n * d + (n / CCE_BACKWARD_TILE[0]) * v * d)
    cce_backward = _time(gpu, [cce_back] * 3, atomic_bytes=cce_locked)
    return {
        "ours forward": ours_forward, "ours backward": ours_backward, "ours total": ours_forward + ours_backward,
        "ours frozen head total": frozen_forward + frozen_backward,
        "CCE forward": cce_forward, "CCE backward": cce_backward, "CCE total": cce_forward + cce_backward,
    }


def roofline_table() -> str:
    columns = ["ours forward", "ours backward", "ours total", "ours frozen head total", "CCE forward",
               "CCE backward", "CCE total"]
    lines = ["| GPU | N, V, D | " + " | ".join(f"{c} (ms)" for c in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for gpu in GPUS:
        for n, v, d in SHAPES:
            found = estimate(gpu, n, v, d)
            lines.append(f"| {gpu.name} | {n}, {v}, {d} | " + " | ".join(f"{found[c] * 1e3:.0f}" for c in columns) + " |")
    return "\n".join(lines)
