"""Issue 25's cost acceptance, as a benchmark (``pytest benchmarks/test_reference_cost.py -s``; SmolLM2 with LoRA,
about 3 min): a step with ``reference="adapter"`` costs less than a step without it plus one forward of the model
without gradients, and the reference adds no weights in memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bench_reference import markdown, run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def test_the_adapter_reference_costs_less_than_one_extra_forward():
    result = run()
    print("\n" + markdown(result))
    seconds = result["seconds"]
    extra = seconds["fused, reference='adapter'"] - seconds["fused, no reference"]
    assert extra < seconds["one forward, no gradient (model(...))"], result
    before, after = result["weights_mib"]
    assert before == after, result
