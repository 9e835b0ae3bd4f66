"""Issue 23's speed acceptance at the real checkpoints' shapes, as a benchmark (not a unit test;
``pytest benchmarks/test_real_shapes.py -s``, prepares the models first; measured time in docs/benchmarks.md): at
Gemma 3's head (N = 2048, V = 262144, D = 640) the fused loss's forward + backward takes at most the naive
path's time and at most 1.1x torch's chunked ``F.linear_cross_entropy``, and the whole-model step of Gemma 3
with the fused loss takes at most the time of the model's own loss at no more than half its peak extra memory.
SmolLM2's figures are printed beside them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench_real_shapes import TORCH_CHUNKED, markdown, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def _row(result, prefix):
    return next(row for row in result["rows"] if row["path"].startswith(prefix))


def test_fused_loss_at_real_shapes_is_no_slower_and_lighter():
    results = run(["head", "model"], ["smollm2-135m-instruct", "gemma3-270m"], report=None)
    for result in results:
        print("\n" + markdown(result))
    gemma_head, gemma_model = (r for r in results if r["model"] == "gemma3-270m")
    ours = _row(gemma_head, "tuna")
    assert ours["time_ratio"] <= 1.0, gemma_head
    assert ours["seconds"] <= 1.1 * _row(gemma_head, TORCH_CHUNKED)["seconds"], gemma_head
    fused = _row(gemma_model, "tuna_hf")
    assert fused["time_ratio"] <= 1.0 and fused["peak_ratio"] <= 0.5, gemma_model
