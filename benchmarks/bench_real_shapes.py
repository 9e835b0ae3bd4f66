"""Speed and peak memory at the shapes of the real checkpoints (SmolLM2-135M-Instruct and Gemma 3 270M, fp32, CPU),
interleaved in one process.

- ``head``: forward + backward of the mean token cross-entropy from ``hidden [N, D]`` and a trainable
  ``weight [V, D]`` at each model's head shape (SmolLM2: V = 49152, D = 576; Gemma 3: V = 262144, D = 640;
  N = 2048), random inputs: the naive materialised path, ours (``linear_cross_entropy``, chunked) and torch's
  chunked ``F.linear_cross_entropy`` (``LinearCrossEntropyOptions()``). Every path's loss and gradients are
  checked against the naive path first (on 256 tokens).
- ``model``: one full fine-tuning step (forward + backward, every weight trains, the tied embedding too) of the
  real model on ``--batch`` rows of ``N / batch`` tokens: the model's own loss (``model(..., labels=...).loss``)
  against ``tuna_hf.causal_lm_loss`` (the fused drop-in); the two losses are checked against each other first.

    python benchmarks/bench_real_shapes.py [--part head|model|all] [--models smollm2-135m-instruct,gemma3-270m]
                                           [--tokens 2048] [--rounds 2] [--peer-rounds 1] [--json OUT]

Paths run one after the other inside each round and the median is reported with its ratio to the naive (or
the model's own) path; only ratios of one run mean anything on a shared machine. Peak extra memory comes from
the allocator events the PyTorch profiler records (``bench_memory.measure``), in a separate call after the
timed rounds. torch's chunked path is slow on CPU (about 145 s at Gemma 3's head), so it has its own round
count, and its rounds sit in the first rounds of the others. ``benchmarks/test_real_shapes.py`` runs it and
asserts the acceptance figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from bench_frozen_head import _chunked_scalar, _naive, _torch_lce, check_against_naive  # noqa: E402
from bench_memory import measure  # noqa: E402

# (name, V, D) of the lm_head of each real checkpoint
HEAD_SHAPES = {"smollm2-135m-instruct": (49152, 576), "gemma3-270m": (262144, 640)}
TORCH_CHUNKED = "torch F.linear_cross_entropy, LinearCrossEntropyOptions()"
CPU = torch.device("cpu")


def head_paths() -> Dict[str, Callable]:
    paths = {"naive linear + cross-entropy": _naive, "tuna linear_cross_entropy (chunked)": _chunked_scalar}
    if hasattr(F, "linear_cross_entropy"):
        paths[TORCH_CHUNKED] = _torch_lce(torch.nn.LinearCrossEntropyOptions())
    return paths


def _head_step(fn, hidden, weight, labels) -> Callable[[], None]:
    """One forward + backward into fresh gradients; the leaves are made here, outside the timed and measured
    call, so the peak counts what the path allocates (its gradients included), not copies of the inputs."""
    leaves = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves, labels).backward()
    return step


def _interleaved(steps: Dict[str, Callable[[], None]], rounds: Dict[str, int]) -> Dict[str, List[float]]:
    """Each step's wall-clock seconds: round r runs, one after the other, every step with more than r rounds."""
    times = {name: [] for name in steps}
    for r in range(max(rounds.values())):
        for name, step in steps.items():
            if r < rounds[name]:
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def _rows(times, peaks, baseline: str) -> List[dict]:
    base_time, base_peak = statistics.median(times[baseline]), peaks[baseline]
    return [{"path": name, "seconds": statistics.median(t), "rounds": len(t),
             "time_ratio": statistics.median(t) / base_time, "peak_mib": peaks[name] / 2 ** 20,
             "peak_ratio": peaks[name] / base_peak} for name, t in times.items()]


def run_head(name: str, tokens: int, rounds: int, peer_rounds: int) -> dict:
    vocab, dim = HEAD_SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) / dim ** 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    paths = head_paths()
    for path, fn in paths.items():  # the correctness guard, and first-call costs out of the timings
        check_against_naive(path, fn, hidden[:256], weight, labels[:256], frozen=False)
    steps = {path: _head_step(fn, hidden, weight, labels) for path, fn in paths.items()}
    times = _interleaved(steps, {path: peer_rounds if path == TORCH_CHUNKED else rounds for path in steps})
    peaks = {path: measure(step, CPU).peak_bytes for path, step in steps.items()}
    return {"part": "head", "model": name, "N": tokens, "V": vocab, "D": dim,
            "rows": _rows(times, peaks, "naive linear + cross-entropy")}


def _model_batch(model, tokens: int, batch: int):
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab, (batch, tokens // batch), generator=generator)
    return input_ids, torch.ones_like(input_ids), input_ids.clone()


def run_model(name: str, tokens: int, batch: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from tuna_hf import causal_lm_loss
    from tuna_train.real_models import prepare

    model = AutoModelForCausalLM.from_pretrained(str(prepare(name)), dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    input_ids, attention_mask, labels = _model_batch(model, tokens, batch)
    losses = {
        "model's own loss": lambda: model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss,
        "tuna_hf.causal_lm_loss (fused)": lambda: causal_lm_loss(model, input_ids, attention_mask, labels),
    }

    def step_of(loss_fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
        return step

    with torch.no_grad():  # the guard: the same loss (the drop-in's own tests check gradients too)
        own, fused = (float(fn()) for fn in losses.values())
    if not abs(own - fused) <= 1e-4 * abs(own):
        raise AssertionError(f"{name}: fused loss {fused} against the model's own {own}")
    steps = {path: step_of(fn) for path, fn in losses.items()}  # the guard's forwards were the warm-up
    times = _interleaved(steps, {path: rounds for path in steps})
    peaks = {}
    for path, step in steps.items():
        model.zero_grad(set_to_none=True)  # the gradients are counted as what the step allocates
        peaks[path] = measure(step, CPU).peak_bytes
    model.zero_grad(set_to_none=True)
    return {"part": "model", "model": name, "N": tokens, "batch": batch, "loss": own,
            "rows": _rows(times, peaks, "model's own loss")}


def markdown(result: dict) -> str:
    if result["part"] == "head":
        title = f"head of {result['model']}: N={result['N']}, V={result['V']}, D={result['D']}, fp32, trainable"
    else:
        title = (f"whole-model step of {result['model']}: {result['batch']} x {result['N'] // result['batch']} "
                 f"tokens, fp32, full fine-tuning")
    lines = [f"**{title}**", "", "| path | seconds (median) | rounds | time ratio | peak extra (MiB) | peak ratio |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['path']} | {row['seconds']:.2f} | {row['rounds']} | {row['time_ratio']:.2f}x | "
                     f"{row['peak_mib']:.0f} | {row['peak_ratio']:.2f}x |")
    return "\n".join(lines)


def run(parts: List[str], models: List[str], tokens: int = 2048, batch: int = 2, rounds: int = 2,
        peer_rounds: int = 1, report: Optional[Callable[[str], None]] = print) -> List[dict]:
    results = []
    for name in models:
        if "head" in parts:
            results.append(run_head(name, tokens, rounds, peer_rounds))
            report and report(markdown(results[-1]))
        if "model" in parts:
            results.append(run_model(name, tokens, batch, rounds))
            report and report(markdown(results[-1]))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["head", "model", "all"], default="all",
                        help="head: the lm_head shapes alone; model: the whole-model step; all (default): both")
    parser.add_argument("--models", default=",".join(HEAD_SHAPES),
                        help=f"comma-separated, of {', '.join(HEAD_SHAPES)} (default: both)")
    parser.add_argument("--tokens", type=int, default=2048, help="N, tokens per step (default 2048)")
    parser.add_argument("--batch", type=int, default=2, help="rows of the whole-model step (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each path (default 2)")
    parser.add_argument("--peer-rounds", type=int, default=1,
                        help="timed rounds of torch's chunked F.linear_cross_entropy (default 1: slow on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(HEAD_SHAPES))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(HEAD_SHAPES)}")
    parts = ["head", "model"] if args.part == "all" else [args.part]
    print(f"fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = run(parts, models, args.tokens, args.batch, args.rounds, args.peer_rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
