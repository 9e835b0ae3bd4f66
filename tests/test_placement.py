"""Every command that loads a model to run it takes the same placement options, through the training loader."""

import json
import subprocess
import sys

import pytest
import torch

from tuna_train.cli import build_parser, parse_config
from tuna_train.model import Placement
from tuna_train.synthetic import make_records

MODEL_COMMANDS = {"score": ["--teacher", "M", "--data", "D", "--out", "O"],
                  "generate": ["--model", "M", "--data", "D", "--out", "O"],
                  "rank": ["--judge", "local:M", "--data", "D", "--out", "O"],
                  "eval": ["ranking", "--model", "M", "--data", "D"]}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_every_model_command_has_the_placement_options_with_help(command):
    parser = build_parser()
    _, config = parse_config([command, *MODEL_COMMANDS[command], "--device", "cpu", "--dtype", "bfloat16",
                              "--load-in-4bit"])
    assert config.placement == Placement(device="cpu", dtype="bfloat16", load_in_4bit=True)
    subparser = parser._subparsers._group_actions[0].choices[command]
    helps = {action.dest: action.help for action in subparser._actions}
    assert all(helps[name] for name in ("device", "dtype", "load_in_4bit"))
    with pytest.raises(SystemExit):
        parser.parse_args([command, *MODEL_COMMANDS[command], "--dtype", "float8"])


def test_placement_loads_in_the_chosen_dtype_and_refuses_a_missing_gpu(tiny_model_dir):
    model = Placement(device="cpu", dtype="bfloat16").load(str(tiny_model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert Placement().resolved_dtype() == ("float32" if not torch.cuda.is_available() else Placement().resolved_dtype())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Placement(device="cuda").load(str(tiny_model_dir))


def test_tuna_score_runs_on_the_chosen_placement(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_records(3, seed=1)))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.jsonl"
        done = subprocess.run([sys.executable, "-m", "tuna_train.cli", "score", "--teacher", str(tiny_model_dir),
                               "--data", str(data), "--out", str(out), "--device", "cpu", "--dtype", dtype],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[dtype] = [json.loads(line) for line in out.read_text().splitlines()]
    for full, half in zip(runs["float32"], runs["bfloat16"]):
        assert full["responses"] == half["responses"]
        # bf16 weights give other (close) numbers: the dtype option reached the model
        assert full["scores"] != half["scores"]
        assert half["scores"] == pytest.approx(full["scores"], rel=0.05, abs=0.05)
