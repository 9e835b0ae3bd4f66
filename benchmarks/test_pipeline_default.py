"""`tuna pipeline` at its defaults, one run per seed (about 2 min 45 s each on 2 cores; ``pytest
benchmarks/test_pipeline_default.py``): what the one-command pipeline shows, measured where it is reported.

Per seed it asserts what the default promises (a start model that already ranks the built-in tasks, every
stage done, held-out instructions never trained on, within about 5 minutes) and prints held-out exact match and
pairwise accuracy of the start model, Tuna_p and Tuna_c; the figures in the README come from this run. The
test suite runs the same stages at about half the data (tests/test_score_generate.py).
"""

import json
import subprocess
import sys
import time

import pytest

SEEDS = (42, 1, 2)
STAGES = ("start", "tuna_p", "tuna_c")


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_pipeline_default(tmp_path, seed):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "pipeline", "--seed", str(seed)], cwd=tmp_path,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "runs" / "pipeline"
    summary = json.loads((root / "summary.json").read_text())
    evaluations = summary["eval"]
    row = {stage: {key: evaluations[stage][key] for key in ("exact_match", "pair_accuracy")} for stage in STAGES}
    print(json.dumps({"seed": seed, "seconds": round(seconds, 1), **row}))
    assert all(status["status"] in ("done", "skipped") for status in summary["stages"].values())
    assert evaluations["start"]["pair_accuracy"] >= 0.7  # the sft stage makes an instruction-following start
    trained = {r["instruction"] for name in ("sft.jsonl", "data_p.jsonl", "instructions.jsonl")
               for r in map(json.loads, (root / name).read_text().splitlines())}
    assert not trained & {json.loads(line)["instruction"] for line in (root / "eval.jsonl").read_text().splitlines()}
    assert seconds <= 5 * 60 * 1.2, f"the default pipeline took {seconds:.0f} s (about 5 minutes promised)"
