"""`tuna pipeline` at its defaults, one run per seed (about 2 min 20 s each on 2 cores; ``pytest
benchmarks/test_pipeline_default.py -s``): what the one-command pipeline shows, measured where it is reported.

Per seed it asserts what the default promises (a start model that already ranks the built-in tasks, every
stage done, held-out instructions never trained on, within about 5 minutes); over the seeds, that held-out exact
match rises from the start model to Tuna_p and again from Tuna_p to Tuna_c on every seed, and that each step's
mean rise is larger than the seed-to-seed spread (max - min) of that rise. It prints the table docs/pipeline.md quotes.
The test suite runs the same stages at about half the data (tests/test_score_generate.py).
"""

import json
import statistics
import subprocess
import sys
import time

import pytest

SEEDS = (42, 1, 2)
STAGES = ("start", "tuna_p", "tuna_c")


def run_default(workdir, seed):
    """{stage: held-out exact match}, pairwise accuracies and seconds of `tuna pipeline --seed SEED`."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "pipeline", "--seed", str(seed)], cwd=workdir,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    root = workdir / "runs" / "pipeline"
    summary = json.loads((root / "summary.json").read_text())
    evaluations = summary["eval"]
    assert all(status["status"] in ("done", "skipped") for status in summary["stages"].values())
    assert evaluations["start"]["pair_accuracy"] >= 0.7  # the sft stage makes an instruction-following start
    trained = {r["instruction"] for name in ("sft.jsonl", "data_p.jsonl", "instructions.jsonl")
               for r in map(json.loads, (root / name).read_text().splitlines())}
    assert not trained & {json.loads(line)["instruction"] for line in (root / "eval.jsonl").read_text().splitlines()}
    assert seconds <= 5 * 60 * 1.2, f"the default pipeline took {seconds:.0f} s (about 5 minutes promised)"
    return {"seed": seed, "seconds": round(seconds, 1),
            "exact_match": {stage: evaluations[stage]["exact_match"] for stage in STAGES},
            "pair_accuracy": {stage: evaluations[stage]["pair_accuracy"] for stage in STAGES}}


@pytest.mark.slow
def test_pipeline_default_rises_at_each_stage(tmp_path):
    runs = []
    for seed in SEEDS:
        workdir = tmp_path / f"seed{seed}"
        workdir.mkdir()
        runs.append(run_default(workdir, seed))
        print(json.dumps(runs[-1]))
    for earlier, later in zip(STAGES, STAGES[1:]):
        rises = [run["exact_match"][later] - run["exact_match"][earlier] for run in runs]
        spread = max(rises) - min(rises)
        print(f"{earlier} -> {later}: rises {[round(r, 3) for r in rises]}, mean {statistics.mean(rises):.3f}, "
              f"spread {spread:.3f}")
        assert min(rises) > 0, f"exact match falls from {earlier} to {later} on a seed: {rises}"
        assert statistics.mean(rises) > spread, f"{earlier} -> {later}: mean rise within the seed spread: {rises}"
