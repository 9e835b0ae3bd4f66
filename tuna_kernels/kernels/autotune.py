"""Autotuning on the GPU: time each candidate configuration once per problem shape, keep the fastest.

Off by default (``token_logprobs(..., autotune=True)`` or ``TUNA_AUTOTUNE=1`` turns it on). The candidates
of a kernel and architecture are :func:`configs.candidate_configs`; the static report compiles every one
of them and a test asserts they are all spill-free, fit the card's shared memory and use tensor cores,
so tuning only chooses among configurations known to compile well.

Trials run the real launch on the real tensors. A trial must leave nothing behind that the final launch
would see: the launchers zero every accumulated output inside the timed closure (the atomic backward adds
into ``grad_hidden`` / ``grad_weight``), and the forward allocates its per-config split buffer per trial.
The choice is remembered per (kernel, arch, dtype, token-count bucket, V, D, flags), so a training run
pays the trials once per shape bucket.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

from .configs import KernelConfig

Timer = Callable[[Callable[[], None]], float]


def token_bucket(num_tokens: int) -> int:
    """Token counts share a tuned choice within a power of two (at least 64)."""
    return max(64, 1 << max(0, num_tokens - 1).bit_length())


def cuda_timer(run: Callable[[], None]) -> float:
    """Median milliseconds of ``run`` on the current CUDA stream (Triton's benchmarking helper)."""
    from triton.testing import do_bench

    return float(do_bench(run, warmup=5, rep=25, return_mode="median"))


class Autotuner:
    """Remembers the fastest of ``candidates`` per key; ``timer`` is injectable for tests."""

    def __init__(self, timer: Optional[Timer] = None) -> None:
        self.timer = timer
        self.trials = 0
        self._best: Dict[Tuple[Hashable, ...], KernelConfig] = {}
        self._lock = threading.Lock()

    def choose(self, key: Tuple[Hashable, ...], candidates: Sequence[KernelConfig],
               trial: Callable[[KernelConfig], None]) -> KernelConfig:
        with self._lock:
            if key not in self._best:
                if len(candidates) == 1:
                    self._best[key] = candidates[0]
                else:
                    timer = self.timer or cuda_timer
                    timings = []
                    for order, config in enumerate(candidates):
                        self.trials += 1
                        timings.append((timer(lambda config=config: trial(config)), order, config))
                    self._best[key] = min(timings)[2]  # ties go to the earlier (default-first) candidate
            return self._best[key]

    def chosen(self) -> Dict[Tuple[Hashable, ...], KernelConfig]:
        """What has been chosen so far (for logs)."""
        return dict(self._best)

    def clear(self) -> None:
        with self._lock:
            self._best.clear()
            self.trials = 0


# The process-wide tuner the launchers use.
TUNER = Autotuner()
