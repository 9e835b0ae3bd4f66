"""The long commands show progress (count, rate, ETA) on a terminal; TUNA_PROGRESS=1 forces it in a pipe."""

import json
import os
import subprocess
import sys

import pytest

from tuna_train.synthetic import make_records


@pytest.mark.slow
def test_score_generate_and_rank_show_progress(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(3, seed=1)))
    env = dict(os.environ, TUNA_PROGRESS="1")
    commands = {
        "score": ["--teacher", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "scored.jsonl")],
        "generate": ["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "gen.jsonl"),
                     "-k", "2", "--max-new-tokens", "4"],
        "rank": ["--judge", "rule", "--data", str(data), "--out", str(tmp_path / "ranked.jsonl")],
        "train": ["--synthetic-examples", "40", "--max-steps", "2", "--batch-groups", "4", "--tiny-hidden-size", "32",
                  "--eval-groups", "4", "--eval-controls", "false", "--output-dir", str(tmp_path / "run")],
    }
    for command, args in commands.items():
        done = subprocess.run([sys.executable, "-m", "tuna_train.cli", command, *args], capture_output=True,
                              text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        # tqdm shows the rate as steps per second, or as seconds per step when a step takes longer than one
        desc, rates = ("tuna train", ("step/s,", "s/step,")) if command == "train" else (command, ("/s]",))
        assert f"{desc}: 100%" in done.stderr and any(rate in done.stderr for rate in rates), \
            (command, done.stderr[-500:])
