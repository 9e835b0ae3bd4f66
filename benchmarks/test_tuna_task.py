"""Forward + backward of the Tuna task for every implementation: correctness guard, time, peak memory."""

from __future__ import annotations

import pytest
import torch

from bench_memory import measure
from bench_tasks import IMPLEMENTATIONS, make_problem

_PROBLEMS: dict = {}
_NAIVE: dict = {}


def problem_for(shape, dtype, device):
    key = (shape, dtype, device)
    if key not in _PROBLEMS:
        _PROBLEMS.clear()
        _NAIVE.clear()
        _PROBLEMS[key] = make_problem(shape, dtype, device)
    return _PROBLEMS[key]


def leaves(problem):
    return (problem.hidden.detach().clone().requires_grad_(), problem.weight.detach().clone().requires_grad_())


def forward_backward(impl, problem, hidden, weight):
    loss = impl.run(problem, hidden, weight)
    loss.backward()
    return loss.detach()


def loss_and_grads(impl, problem):
    hidden, weight = leaves(problem)
    loss = forward_backward(impl, problem, hidden, weight)
    return loss.double(), hidden.grad.double(), weight.grad.double()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("impl_name", list(IMPLEMENTATIONS))
def test_forward_backward(benchmark, results, shape, impl_name, bench_device, bench_dtype):
    impl = IMPLEMENTATIONS[impl_name]
    row = {"shape": shape.label, "task": shape.task, "N": shape.num_tokens, "V": shape.vocab_size,
           "D": shape.hidden_dim, "K": shape.num_candidates, "impl": impl_name, "dtype": str(bench_dtype),
           "device": bench_device.type}
    reason = impl.skip_reason(shape, bench_device)
    if reason:
        results.append(dict(row, status="skipped", reason=reason))
        pytest.skip(reason)
    problem = problem_for(shape, bench_dtype, bench_device)
    try:
        if shape not in _NAIVE:
            _NAIVE[shape] = loss_and_grads(IMPLEMENTATIONS["naive"], problem)
        want = _NAIVE[shape]
        got = loss_and_grads(impl, problem)  # also the warm-up (torch.compile of the peers happens here)
    except torch.cuda.OutOfMemoryError as error:
        results.append(dict(row, status="OOM", reason=str(error).splitlines()[0]))
        pytest.skip(f"{impl_name} ran out of GPU memory")

    # correctness guard: a wrong fast path fails here instead of winning the benchmark
    tolerance = 1e-4 if bench_dtype == torch.float32 else 3e-2
    errors = {"loss": rel(got[0], want[0]), "grad_hidden": rel(got[1], want[1]), "grad_weight": rel(got[2], want[2])}
    assert all(err <= tolerance for err in errors.values()), f"{impl_name} disagrees with naive: {errors}"

    def setup():
        return leaves(problem), {}

    def target(hidden, weight):
        forward_backward(impl, problem, hidden, weight)
        if bench_device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = shape.label
    benchmark.extra_info.update(row)
    rounds = 3 if bench_device.type == "cpu" else 10
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
    hidden, weight = leaves(problem)
    memory = measure(lambda: forward_backward(impl, problem, hidden, weight), bench_device)
    stats = benchmark.stats.stats
    results.append(dict(row, status="ok", time_median_s=stats.median, time_min_s=stats.min, rounds=rounds,
                        peak_bytes=memory.peak_bytes, largest_bytes=memory.largest_bytes,
                        rel_err_loss=errors["loss"], rel_err_grad_hidden=errors["grad_hidden"],
                        rel_err_grad_weight=errors["grad_weight"]))


def test_chunked_against_naive_on_the_reference_cpu_shape(results, bench_device):
    """On CPU at N=4096, V=32000, D=256, K=4 (fp32): peak extra memory <= 10% of naive, time <= 1.2x."""
    if bench_device.type != "cpu":
        pytest.skip("the CPU acceptance shape")
    rows = {r["impl"]: r for r in results if r["shape"] == "tuna N=4096 V=32000 D=256 K=4" and r["status"] == "ok"}
    if not {"naive", "tuna-chunked"} <= set(rows):
        pytest.skip("run together with test_forward_backward on the default CPU shapes")
    naive, chunked = rows["naive"], rows["tuna-chunked"]
    assert chunked["peak_bytes"] <= 0.10 * naive["peak_bytes"]
    assert chunked["time_median_s"] <= 1.2 * naive["time_median_s"]
